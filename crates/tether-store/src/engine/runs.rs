//! Accepting runs (admission decided in the accepting transaction), cancels, and lists.

use std::collections::{BTreeMap, BTreeSet};

use tether_domain::admission::{door, Door, LaneHolds};
use tether_domain::machine::{Command, RunState};
use tether_domain::RunSpec;

use super::{end_attempt, must_lock, push_status, reload, reload_unplaced, transition_error};
use super::{write_one, Ending};
use crate::driver::{Driver, DriverTx, RunChange};
use crate::{
    batch_entry, parse_cursor, Admission, AdmissionPolicy, BatchAdmission, CreatedRun, Outbox,
    RunFilter, RunPage, RunRecord, StatusBody, StoreError, StoreResult,
};

/// One submission in its own transaction: committed only when a run was created (a refusal or
/// a replayed key wrote nothing, and dropping the transaction rolls it back).
pub(super) async fn admit_one<D: Driver>(
    d: &D,
    spec: &RunSpec,
    policy: Option<&AdmissionPolicy>,
) -> StoreResult<Admission> {
    let mut tx = d.begin().await?;
    let mut out = Outbox::default();
    if policy.is_some_and(|p| p.reject_when_full) {
        tx.lock_lane(&spec.lane).await?;
    }
    let admission = accept(&mut tx, &mut out, spec, policy, &mut Places::default()).await?;
    if matches!(&admission, Admission::Accepted(created) if created.created) {
        d.commit(tx, out).await?;
    }
    Ok(admission)
}

pub(super) async fn admit_batch<D: Driver>(
    d: &D,
    batch: &[(RunSpec, AdmissionPolicy)],
) -> StoreResult<BatchAdmission> {
    let mut tx = d.begin().await?;
    let mut out = Outbox::default();
    // Every `reject` lane of the batch locked up front, in one order, so two batches naming
    // the same lanes cannot deadlock.
    let lanes: BTreeSet<&str> = batch
        .iter()
        .filter(|(_, policy)| policy.reject_when_full)
        .map(|(spec, _)| spec.lane.as_str())
        .collect();
    for lane in lanes {
        tx.lock_lane(lane).await?;
    }
    let mut runs = Vec::with_capacity(batch.len());
    let mut places = Places::default();
    for (index, (spec, policy)) in batch.iter().enumerate() {
        let decided = accept(&mut tx, &mut out, spec, Some(policy), &mut places).await;
        match batch_entry(&spec.lane, decided)? {
            Ok(created) => runs.push(created),
            // Dropping the transaction un-writes the entries before this one.
            Err(refusal) => return Ok(BatchAdmission::Refused { index, refusal }),
        }
    }
    d.commit(tx, out).await?;
    Ok(BatchAdmission::Accepted(runs))
}

/// Accepts a run inside the caller's transaction (after the lane's door, if a policy is given,
/// lets it in), or answers the run an identical submission under the same key already made.
/// The caller holds the lane's lock when the lane is a `reject` one, so the room one
/// admission sees is the room it gets; a queue lane reserves nothing at the door.
async fn accept<T: DriverTx>(
    tx: &mut T,
    out: &mut Outbox,
    spec: &RunSpec,
    policy: Option<&AdmissionPolicy>,
    places: &mut Places,
) -> StoreResult<Admission> {
    if let Some(run) = find_by_key(tx, spec).await? {
        return Ok(replayed(run));
    }
    if let Some(policy) = policy {
        match judge_door(tx, spec, policy).await? {
            Door::Admit => {}
            Door::Full => return Ok(Admission::LaneFull),
            Door::NeverFits => return Ok(Admission::NeverFits),
        }
    }
    let id = uuid::Uuid::now_v7().to_string();
    let state = RunState::new(spec.max_attempts);
    if !tx.insert_run(&id, spec, state.status).await? {
        // A concurrent submission with the same key committed first: answer as if it had come
        // before us.
        return match find_by_key(tx, spec).await? {
            Some(run) => Ok(replayed(run)),
            None => Err(StoreError::unavailable(
                "idempotency key conflict vanished; retry",
            )),
        };
    }
    let first = StatusBody::plain(state.status, 0);
    push_status(tx, out, &id, first).await?;
    out.run_pending(&spec.lane);
    let mut run = reload_unplaced(tx, &id).await?;
    run.queue_position = Some(places.next(tx, &run).await?);
    Ok(Admission::Accepted(Box::new(CreatedRun {
        run,
        created: true,
    })))
}

/// The queue position of each run a transaction accepts. A new run is the last of its lane's
/// queue, so the transaction counts a lane's queue once, at its first new run, and places the
/// ones after it behind it: a batch of n runs costs one count per lane, not n.
#[derive(Default)]
struct Places {
    last: BTreeMap<String, i64>,
}

impl Places {
    async fn next<T: DriverTx>(&mut self, tx: &mut T, run: &RunRecord) -> StoreResult<i64> {
        let place = match self.last.get(&run.spec.lane) {
            Some(last) => last + 1,
            None => tx.queue_position(&run.spec.lane, run.seq).await?,
        };
        self.last.insert(run.spec.lane.clone(), place);
        Ok(place)
    }
}

fn replayed(run: RunRecord) -> Admission {
    Admission::Accepted(Box::new(CreatedRun {
        run,
        created: false,
    }))
}

/// The run an earlier submission with this spec's idempotency key made, if it is the same
/// submission; `IdempotencyConflict` if it is not.
async fn find_by_key<T: DriverTx>(tx: &mut T, spec: &RunSpec) -> StoreResult<Option<RunRecord>> {
    let Some(key) = &spec.idempotency_key else {
        return Ok(None);
    };
    let Some(keyed) = tx.find_by_key(key).await? else {
        return Ok(None);
    };
    if keyed.request_fingerprint != spec.request_fingerprint {
        return Err(StoreError::IdempotencyConflict {
            run_id: keyed.run_id,
        });
    }
    Ok(Some(reload(tx, &keyed.run_id).await?))
}

/// The lane's door for `spec` under `policy`, from what the lane holds now.
async fn judge_door<T: DriverTx>(
    tx: &mut T,
    spec: &RunSpec,
    policy: &AdmissionPolicy,
) -> StoreResult<Door> {
    let fresh_since = tx.now().saturating_sub(policy.worker_fresh_ms);
    let serving = tx.workers_serving(&spec.lane, fresh_since).await?;
    let capacities: Vec<_> = serving.iter().map(|(_, capacity)| *capacity).collect();
    let holds = if policy.reject_when_full {
        let ids: Vec<String> = serving.into_iter().map(|(id, _)| id).collect();
        let held = tx.reserved_by(&ids).await?;
        let waiting = tx.lane_waiting(&spec.lane).await?;
        // The in-flight count matters only under a ceiling.
        let in_flight = match policy.max_concurrency {
            Some(_) => tx.lane_in_flight(&spec.lane).await?,
            None => 0,
        };
        Some(LaneHolds {
            held,
            in_flight,
            waiting: waiting.count,
            waiting_needs: waiting.needs,
        })
    } else {
        None
    };
    Ok(door(
        &spec.resources,
        &capacities,
        holds.as_ref(),
        policy.max_concurrency,
    ))
}

pub(super) async fn request_cancel<D: Driver>(d: &D, run_id: &str) -> StoreResult<RunRecord> {
    let mut tx = d.begin().await?;
    let mut out = Outbox::default();
    let loaded = must_lock(&mut tx, run_id).await?;
    let transition = loaded
        .run
        .state()
        .apply(&Command::Cancel)
        .map_err(transition_error)?;
    write_one(&mut tx, &loaded, RunChange::CancelAsked).await?;
    match (transition.decision, &loaded.run.worker_id) {
        (Some(decision), _) => {
            end_attempt(&mut tx, &mut out, &loaded, decision, Ending::default()).await?
        }
        // In flight: its worker's control poll hears of it now, its heartbeat later.
        (None, Some(worker_id)) => out.cancel_requested(run_id, loaded.run.attempt, worker_id),
        (None, None) => {}
    }
    let run = reload(&mut tx, run_id).await?;
    d.commit(tx, out).await?;
    Ok(run)
}

pub(super) async fn list_runs<D: Driver>(d: &D, filter: &RunFilter) -> StoreResult<RunPage> {
    let limit = match filter.limit {
        0 => 50,
        n => n.min(500),
    } as usize;
    let before = filter.cursor.as_deref().map(parse_cursor).transpose()?;
    // One more than asked, to know whether another page follows.
    let mut runs = d.read_runs(filter, before, limit as i64 + 1).await?;
    let next_cursor = if runs.len() > limit {
        runs.truncate(limit);
        runs.last().map(|r| r.seq.to_string())
    } else {
        None
    };
    Ok(RunPage { runs, next_cursor })
}
