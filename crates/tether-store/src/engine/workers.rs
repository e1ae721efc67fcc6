//! Workers: registration, heartbeats (one per interval for the worker and all it holds),
//! draining, and leaving on purpose.

use tether_domain::machine::Command;
use tether_domain::ErrorCode;

use super::reap_one;
use crate::driver::{Driver, DriverTx, Lock, RunChange};
use crate::{
    HeartbeatAnswer, NewWorker, Outbox, RunBeat, RunRef, StoreError, StoreResult, WorkerRecord,
};

pub(super) async fn register<D: Driver>(d: &D, worker: &NewWorker) -> StoreResult<WorkerRecord> {
    let mut tx = d.begin().await?;
    let id = uuid::Uuid::now_v7().to_string();
    tx.insert_worker(&id, worker).await?;
    let record = live_worker(&mut tx, &id).await?;
    d.commit(tx, Outbox::default()).await?;
    Ok(record)
}

/// A worker that may still act (registered and not deregistered), its row locked.
async fn live_worker<T: DriverTx>(tx: &mut T, worker_id: &str) -> StoreResult<WorkerRecord> {
    match tx.lock_worker(worker_id).await? {
        Some((worker, None)) => Ok(worker),
        _ => Err(StoreError::UnknownWorker),
    }
}

pub(super) async fn set_draining<D: Driver>(d: &D, worker_id: &str) -> StoreResult<()> {
    let mut tx = d.begin().await?;
    live_worker(&mut tx, worker_id).await?;
    tx.mark_worker_draining(worker_id).await?;
    d.commit(tx, Outbox::default()).await
}

pub(super) async fn deregister<D: Driver>(d: &D, worker_id: &str) -> StoreResult<Vec<String>> {
    let mut tx = d.begin().await?;
    let mut out = Outbox::default();
    match tx.lock_worker(worker_id).await? {
        None => return Err(StoreError::UnknownWorker),
        // Already gone, and its runs already handed back.
        Some((_, Some(_))) => return Ok(Vec::new()),
        Some((_, None)) => {}
    }
    tx.mark_worker_gone(worker_id).await?;
    let (held, _) = tx.held_by(worker_id).await?;
    let mut handed_back = Vec::with_capacity(held.len());
    // `held` is in seq order: the order every multi-run writer locks in.
    for (run_id, _) in held {
        let Some(loaded) = tx.load_run(&run_id, Lock::Wait).await? else {
            continue;
        };
        if reap_one(&mut tx, &mut out, &loaded, ErrorCode::WorkerHeartbeatLost)
            .await?
            .is_some()
        {
            handed_back.push(run_id);
        }
    }
    d.commit(tx, out).await?;
    Ok(handed_back)
}

pub(super) async fn heartbeat<D: Driver>(
    d: &D,
    worker_id: &str,
    beats: &[RunBeat],
) -> StoreResult<HeartbeatAnswer> {
    let mut tx = d.begin().await?;
    if !tx.stamp_worker(worker_id).await? {
        return Err(StoreError::UnknownWorker);
    }
    let ids: Vec<&str> = beats.iter().map(|b| b.run_id.as_str()).collect();
    tx.lock_runs(&ids).await?;
    let mut answer = HeartbeatAnswer::default();
    for beat in beats {
        let reference = RunRef {
            run_id: beat.run_id.clone(),
            attempt: beat.attempt,
        };
        let Some(loaded) = tx.load_run(&beat.run_id, Lock::None).await? else {
            answer.not_owned.push(reference);
            continue;
        };
        let touch = Command::Touch {
            attempt: beat.attempt,
            worker_id: worker_id.to_string(),
        };
        if loaded.run.state().apply(&touch).is_err() {
            answer.not_owned.push(reference);
            continue;
        }
        let change = RunChange::Heartbeat {
            worker_id,
            stdout_bytes: beat.stdout_bytes,
            stderr_bytes: beat.stderr_bytes,
        };
        if !tx.write_run(&loaded, change).await? {
            answer.not_owned.push(reference);
        } else if loaded.run.cancel_requested_at.is_some() {
            answer.cancel.push(reference);
        }
    }
    // A worker whose heartbeat had gone stale was handed nothing: wake its open claim.
    let mut out = Outbox::default();
    out.worker_beat(worker_id);
    d.commit(tx, out).await?;
    Ok(answer)
}

pub(super) async fn list<D: Driver>(d: &D) -> StoreResult<Vec<WorkerRecord>> {
    let mut workers = d.read_live_workers().await?;
    for worker in &mut workers {
        let (runs, reserved) = d.read_held_by(&worker.id).await?;
        worker.runs = runs;
        worker.reserved = reserved;
    }
    Ok(workers)
}
