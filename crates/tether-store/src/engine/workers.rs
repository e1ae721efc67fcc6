//! Workers: registration, heartbeats (one per interval for the worker and all it holds),
//! draining, and leaving on purpose.

use tether_domain::machine::Command;
use tether_domain::ErrorCode;

use super::{end_attempt, reap_one, Ending, Work};
use crate::driver::{Driver, DriverTx, Lock, RunChange};
use crate::{
    HeartbeatAnswer, NewWorker, RunBeat, RunRecord, RunRef, StoreError, StoreResult, WorkerRecord,
};

pub(super) async fn register<D: Driver>(d: &D, worker: &NewWorker) -> StoreResult<WorkerRecord> {
    let mut work = Work::begin(d).await?;
    let id = uuid::Uuid::now_v7().to_string();
    work.tx().await?.insert_worker(&id, worker).await?;
    let record = live_worker(&mut work, &id).await?;
    work.commit(d).await?;
    Ok(record)
}

/// A worker that may still act (registered and not deregistered), its row locked.
async fn live_worker<T: DriverTx>(
    work: &mut Work<T>,
    worker_id: &str,
) -> StoreResult<WorkerRecord> {
    match work.tx().await?.lock_worker(worker_id).await? {
        Some((worker, None)) => Ok(worker),
        _ => Err(StoreError::UnknownWorker),
    }
}

pub(super) async fn set_draining<D: Driver>(d: &D, worker_id: &str) -> StoreResult<()> {
    let mut work = Work::begin(d).await?;
    live_worker(&mut work, worker_id).await?;
    work.tx().await?.mark_worker_draining(worker_id).await?;
    work.commit(d).await?;
    Ok(())
}

pub(super) async fn deregister<D: Driver>(d: &D, worker_id: &str) -> StoreResult<Vec<String>> {
    let mut work = Work::begin(d).await?;
    let tx = work.tx().await?;
    match tx.lock_worker(worker_id).await? {
        None => return Err(StoreError::UnknownWorker),
        // Already gone, and its runs already handed back.
        Some((_, Some(_))) => return Ok(Vec::new()),
        Some((_, None)) => {}
    }
    tx.mark_worker_gone(worker_id).await?;
    let (held, _) = tx.held_by(worker_id).await?;
    // `held` is in seq order: the order every multi-run writer locks in.
    let ids: Vec<&str> = held.iter().map(|(id, _)| id.as_str()).collect();
    work.load(&ids, Lock::Wait).await?;
    let mut handed_back = Vec::with_capacity(held.len());
    for (run_id, _) in &held {
        let Some(loaded) = work.run(run_id, Lock::Wait).await? else {
            continue;
        };
        if reap_one(&mut work, &loaded, ErrorCode::WorkerHeartbeatLost)
            .await?
            .is_some()
        {
            handed_back.push(run_id.clone());
        }
    }
    work.commit(d).await?;
    Ok(handed_back)
}

/// Takes back the attempts a worker says it never started. Each one current, held by this
/// worker and still `claimed` goes back to `pending` uncounted (or ends `cancelled`, if a
/// cancel was asked); any other is left as it is. Answers those taken back.
pub(super) async fn release<D: Driver>(
    d: &D,
    worker_id: &str,
    runs: &[RunRef],
) -> StoreResult<Vec<RunRecord>> {
    let mut work = Work::begin(d).await?;
    live_worker(&mut work, worker_id).await?;
    let ids: Vec<&str> = runs.iter().map(|r| r.run_id.as_str()).collect();
    work.load(&ids, Lock::Wait).await?;
    let mut released = Vec::with_capacity(runs.len());
    for reference in runs {
        let Some(loaded) = work.run(&reference.run_id, Lock::Wait).await? else {
            continue;
        };
        let release = Command::Release {
            attempt: reference.attempt,
            worker_id: worker_id.to_string(),
        };
        let Ok(transition) = loaded.run.state().apply(&release) else {
            continue;
        };
        let Some(decision) = transition.decision else {
            continue;
        };
        released.push(end_attempt(&mut work, &loaded, decision, Ending::default()).await?);
    }
    let done = work.commit(d).await?;
    released.into_iter().map(|t| done.written(t)).collect()
}

pub(super) async fn heartbeat<D: Driver>(
    d: &D,
    worker_id: &str,
    beats: &[RunBeat],
) -> StoreResult<HeartbeatAnswer> {
    let mut work = Work::begin(d).await?;
    if !work.tx().await?.stamp_worker(worker_id).await? {
        return Err(StoreError::UnknownWorker);
    }
    let ids: Vec<&str> = beats.iter().map(|b| b.run_id.as_str()).collect();
    work.load(&ids, Lock::Wait).await?;
    let mut answer = HeartbeatAnswer::default();
    for beat in beats {
        let reference = RunRef {
            run_id: beat.run_id.clone(),
            attempt: beat.attempt,
        };
        let Some(loaded) = work.run(&beat.run_id, Lock::Wait).await? else {
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
            worker_id: worker_id.to_string(),
            stdout_bytes: beat.stdout_bytes,
            stderr_bytes: beat.stderr_bytes,
        };
        work.write(&loaded, change).await?;
        if loaded.run.cancel_requested_at.is_some() {
            answer.cancel.push(reference);
        }
    }
    // A worker whose heartbeat had gone stale was handed nothing: wake its open claim.
    work.out.worker_beat(worker_id);
    work.commit(d).await?;
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
