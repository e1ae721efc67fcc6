//! Accepting runs (admission decided in the accepting transaction), cancels, and lists.

use std::collections::{BTreeMap, BTreeSet};

use tether_domain::admission::{door, Door, LaneHolds};
use tether_domain::machine::{Command, RunState};
use tether_domain::{Resources, RunSpec};

use super::claims::{claim_in, lock_worker, Claims};
use super::{end_attempt, must_lock, push_status, reload, reload_unplaced, transition_error};
use super::{Ending, Work};
use crate::driver::{Driver, DriverTx, RunChange};
use crate::{
    batch_entry, parse_cursor, Admission, AdmissionPolicy, BatchAdmission, ClaimedRun, CreatedRun,
    HandOff, RunFilter, RunPage, RunRecord, StatusBody, StoreError, StoreResult, WorkerRecord,
};

/// One submission in its own transaction: committed only when a run was created (a refusal or
/// a replayed key wrote nothing, and dropping the transaction rolls it back). With a
/// `hand_off`, a created run's transaction also claims for that waiting worker.
pub(super) async fn admit_one<D: Driver>(
    d: &D,
    spec: &RunSpec,
    policy: Option<&AdmissionPolicy>,
    hand_off: Option<&HandOff<'_>>,
) -> StoreResult<(Admission, Vec<ClaimedRun>)> {
    let mut work = Work::begin(d).await?;
    let worker = lock_hand_off_worker(&mut work, hand_off).await?;
    if policy.is_some_and(|p| p.reject_when_full) {
        work.tx().await?.lock_lane(&spec.lane).await?;
    }
    let mut doors = Doors::default();
    let mut admission = accept(&mut work, spec, policy, &mut Places::default(), &mut doors).await?;
    let Admission::Accepted(created) = &mut admission else {
        return Ok((admission, Vec::new()));
    };
    if !created.created {
        return Ok((admission, Vec::new()));
    }
    let claims = hand_off_in(&mut work, hand_off, worker, &[&created.run]).await?;
    let done = work.commit(d).await?;
    let claimed = claims.answer(&done)?;
    // The answer shows the run as the transaction left it: claimed, not queued.
    if let Some(taken) = claimed.iter().find(|c| c.run.id == created.run.id) {
        created.run = taken.run.clone();
    }
    Ok((admission, claimed))
}

pub(super) async fn admit_batch<D: Driver>(
    d: &D,
    batch: &[(RunSpec, AdmissionPolicy)],
    hand_off: Option<&HandOff<'_>>,
) -> StoreResult<(BatchAdmission, Vec<ClaimedRun>)> {
    let mut work = Work::begin(d).await?;
    let worker = lock_hand_off_worker(&mut work, hand_off).await?;
    // Every `reject` lane of the batch locked up front, in one order, so two batches naming
    // the same lanes cannot deadlock.
    let lanes: BTreeSet<&str> = batch
        .iter()
        .filter(|(_, policy)| policy.reject_when_full)
        .map(|(spec, _)| spec.lane.as_str())
        .collect();
    for lane in lanes {
        work.tx().await?.lock_lane(lane).await?;
    }
    let mut runs = Vec::with_capacity(batch.len());
    let mut places = Places::default();
    let mut doors = Doors::default();
    for (index, (spec, policy)) in batch.iter().enumerate() {
        let decided = accept(&mut work, spec, Some(policy), &mut places, &mut doors).await;
        match batch_entry(&spec.lane, decided)? {
            Ok(created) => runs.push(created),
            // Dropping the transaction un-writes the entries before this one.
            Err(refusal) => return Ok((BatchAdmission::Refused { index, refusal }, Vec::new())),
        }
    }
    let new: Vec<&RunRecord> = runs.iter().filter(|c| c.created).map(|c| &c.run).collect();
    let claims = hand_off_in(&mut work, hand_off, worker, &new).await?;
    let done = work.commit(d).await?;
    let claimed = claims.answer(&done)?;
    for created in &mut runs {
        if let Some(taken) = claimed.iter().find(|c| c.run.id == created.run.id) {
            created.run = taken.run.clone();
        }
    }
    Ok((BatchAdmission::Accepted(runs), claimed))
}

/// The hand-off's worker row, locked before anything else: it heads every writer's lock order
/// (worker, lanes, runs), which the claim at the end of the transaction relies on. `None`
/// without a hand-off, or for a worker that is gone (the submission goes on without it).
async fn lock_hand_off_worker<T: DriverTx>(
    work: &mut Work<T>,
    hand_off: Option<&HandOff<'_>>,
) -> StoreResult<Option<WorkerRecord>> {
    match hand_off {
        Some(hand_off) => Ok(lock_worker(work, hand_off.worker_id).await?.ok()),
        None => Ok(None),
    }
}

/// Claims for the hand-off's worker as its own claim would, after the runs `new` were
/// accepted in this transaction. The lanes of the new runs that stay pending still signal
/// `RunPending`; a lane whose new runs were all taken does not, so no other claim is woken
/// to find nothing.
async fn hand_off_in<T: DriverTx>(
    work: &mut Work<T>,
    hand_off: Option<&HandOff<'_>>,
    worker: Option<WorkerRecord>,
    new: &[&RunRecord],
) -> StoreResult<Claims> {
    let (Some(hand_off), Some(worker)) = (hand_off, worker) else {
        return Ok(Claims::none());
    };
    if new.is_empty() {
        return Ok(Claims::none());
    }
    let claims = claim_in(work, hand_off.worker_id, worker, hand_off.limits).await?;
    let taken = claims.run_ids();
    work.out.forget_pending();
    for run in new.iter().filter(|r| !taken.contains(r.id.as_str())) {
        work.out.run_pending(&run.spec.lane);
    }
    Ok(claims)
}

/// Accepts a run inside the caller's transaction (after the lane's door, if a policy is given,
/// lets it in), or answers the run an identical submission under the same key already made.
/// The caller holds the lane's lock when the lane is a `reject` one, so the room one
/// admission sees is the room it gets; a queue lane reserves nothing at the door.
async fn accept<T: DriverTx>(
    work: &mut Work<T>,
    spec: &RunSpec,
    policy: Option<&AdmissionPolicy>,
    places: &mut Places,
    doors: &mut Doors,
) -> StoreResult<Admission> {
    if let Some(run) = find_by_key(work, spec).await? {
        return Ok(replayed(run));
    }
    if let Some(policy) = policy {
        match judge_door(work, spec, policy, doors).await? {
            Door::Admit => {}
            Door::Full => return Ok(Admission::LaneFull),
            Door::NeverFits => return Ok(Admission::NeverFits),
        }
    }
    let id = uuid::Uuid::now_v7().to_string();
    let state = RunState::new(spec.max_attempts);
    let place = !places.knows(&spec.lane);
    let inserted = work
        .tx()
        .await?
        .insert_run(&id, spec, state.status, place)
        .await?;
    let Some(inserted) = inserted else {
        // A concurrent submission with the same key committed first: answer as if it had come
        // before us.
        return match find_by_key(work, spec).await? {
            Some(run) => Ok(replayed(run)),
            None => Err(StoreError::unavailable(
                "idempotency key conflict vanished; retry",
            )),
        };
    };
    work.inserted(inserted);
    let first = StatusBody::plain(state.status, 0);
    push_status(work, &id, first)?;
    work.out.run_pending(&spec.lane);
    let mut run = reload_unplaced(work, &id).await?;
    run.queue_position = Some(places.next(work, &run).await?);
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
    fn knows(&self, lane: &str) -> bool {
        self.last.contains_key(lane)
    }

    async fn next<T: DriverTx>(&mut self, work: &mut Work<T>, run: &RunRecord) -> StoreResult<i64> {
        let place = match (self.last.get(&run.spec.lane), run.queue_position) {
            (Some(last), _) => last + 1,
            // Counted by the insert itself.
            (None, Some(place)) => place,
            (None, None) => {
                work.tx()
                    .await?
                    .queue_position(&run.spec.lane, run.seq)
                    .await?
            }
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
async fn find_by_key<T: DriverTx>(
    work: &mut Work<T>,
    spec: &RunSpec,
) -> StoreResult<Option<RunRecord>> {
    let Some(key) = &spec.idempotency_key else {
        return Ok(None);
    };
    let Some(keyed) = work.tx().await?.find_by_key(key).await? else {
        return Ok(None);
    };
    if keyed.request_fingerprint != spec.request_fingerprint {
        return Err(StoreError::IdempotencyConflict {
            run_id: keyed.run_id,
        });
    }
    Ok(Some(reload(work, &keyed.run_id).await?))
}

/// The workers serving each lane, as one transaction finds them: admission writes no worker
/// row, so a batch asks once per lane and freshness.
#[derive(Default)]
struct Doors {
    serving: BTreeMap<(String, i64), Vec<(String, Resources)>>,
}

/// The lane's door for `spec` under `policy`, from what the lane holds now.
async fn judge_door<T: DriverTx>(
    work: &mut Work<T>,
    spec: &RunSpec,
    policy: &AdmissionPolicy,
    doors: &mut Doors,
) -> StoreResult<Door> {
    let fresh_since = work.now().saturating_sub(policy.worker_fresh_ms);
    let key = (spec.lane.clone(), fresh_since);
    let serving = match doors.serving.get(&key) {
        Some(serving) => serving.clone(),
        None => {
            let serving = work
                .tx()
                .await?
                .workers_serving(&spec.lane, fresh_since)
                .await?;
            doors.serving.insert(key, serving.clone());
            serving
        }
    };
    let capacities: Vec<_> = serving.iter().map(|(_, capacity)| *capacity).collect();
    let holds = if policy.reject_when_full {
        let ids: Vec<String> = serving.into_iter().map(|(id, _)| id).collect();
        let tx = work.tx().await?;
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
    let mut work = Work::begin(d).await?;
    let loaded = must_lock(&mut work, run_id).await?;
    let transition = loaded
        .run
        .state()
        .apply(&Command::Cancel)
        .map_err(transition_error)?;
    work.write(&loaded, RunChange::CancelAsked).await?;
    match (transition.decision, &loaded.run.worker_id) {
        (Some(decision), _) => {
            end_attempt(&mut work, &loaded, decision, Ending::default()).await?;
        }
        // In flight: its worker's control poll hears of it now, its heartbeat later.
        (None, Some(worker_id)) => work
            .out
            .cancel_requested(run_id, loaded.run.attempt, worker_id),
        (None, None) => {}
    }
    let run = reload(&mut work, run_id).await?;
    work.commit(d).await?;
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
