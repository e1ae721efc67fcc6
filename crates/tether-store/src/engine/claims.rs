//! Handing pending runs to a worker: first in first out within a lane, within the worker's
//! room and each lane's ceiling.

use std::collections::BTreeMap;

use tether_domain::admission::{claim_reach, under_ceiling, Room};
use tether_domain::machine::Command;
use tether_domain::{Freshness, Resources, RunStatus};

use super::work::Committed;
use super::{push_status, Ticket, Work};
use crate::driver::{Driver, DriverTx, Lock, RunChange};
use crate::{
    ClaimLimits, ClaimedRun, EventBody, StatusBody, StoreError, StoreResult, WorkerRecord,
};

/// How many pending runs one claim looks at before giving up on finding more that fit.
const CLAIM_SCAN_LIMIT: usize = 2048;
const CLAIM_PAGE: i64 = 256;

pub(super) async fn claim_runs<D: Driver>(
    d: &D,
    worker_id: &str,
    limits: &ClaimLimits,
) -> StoreResult<Vec<ClaimedRun>> {
    let mut work = Work::begin(d).await?;
    let worker = lock_worker(&mut work, worker_id).await?;
    let claimed = claim_in(&mut work, worker_id, worker?, limits).await?;
    if claimed.is_empty() {
        return Ok(Vec::new());
    }
    let done = work.commit(d).await?;
    claimed.answer(&done)
}

/// What a claim took, answered once its transaction commits (the writes go out with the
/// commit, their rows read back from it).
pub(super) struct Claims(Vec<Claim>);

/// One run taken: its new attempt, and its write's place among those answered.
struct Claim {
    run_id: String,
    attempt: u32,
    ticket: Ticket,
}

impl Claims {
    pub(super) fn none() -> Claims {
        Claims(Vec::new())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The runs taken.
    pub(super) fn run_ids(&self) -> std::collections::HashSet<&str> {
        self.0.iter().map(|c| c.run_id.as_str()).collect()
    }

    pub(super) fn answer(self, done: &Committed) -> StoreResult<Vec<ClaimedRun>> {
        self.0
            .into_iter()
            .map(|c| {
                Ok(ClaimedRun {
                    attempt: c.attempt,
                    run: done.written(c.ticket)?,
                })
            })
            .collect()
    }
}

/// Locks the worker's row, which serializes its claims (the room a claim computes stays
/// true) and comes first in every writer's lock order; `UnknownWorker` (the claim's own
/// answer) for an unknown or deregistered worker.
pub(super) async fn lock_worker<T: DriverTx>(
    work: &mut Work<T>,
    worker_id: &str,
) -> StoreResult<StoreResult<WorkerRecord>> {
    Ok(match work.tx().await?.lock_worker(worker_id).await? {
        Some((worker, None)) => Ok(worker),
        _ => Err(StoreError::UnknownWorker),
    })
}

/// Claims for `worker` (its row locked by this transaction) inside the caller's transaction.
pub(super) async fn claim_in<T: DriverTx>(
    work: &mut Work<T>,
    worker_id: &str,
    worker: WorkerRecord,
    limits: &ClaimLimits,
) -> StoreResult<Claims> {
    let now = work.now();
    // A draining worker finishes what it holds and takes nothing new; a frozen one (its own
    // heartbeat stale, its long-poll still open) takes nothing either.
    let frozen = limits.worker_fresh_ms > 0
        && !Freshness::new(limits.worker_fresh_ms).is_fresh(Some(worker.last_heartbeat_at), now);
    if worker.draining || frozen {
        return Ok(Claims::none());
    }
    // The reads below run before this transaction's own queued writes are sent (they go with
    // the commit): what those take out of flight is taken off what the reads count.
    let leaving = work.leaving_flight();
    let leaving: Vec<(String, String, Resources)> = leaving
        .into_iter()
        .map(|(id, lane, needs)| (id.to_string(), lane.to_string(), needs))
        .collect();
    // Lanes with a ceiling that this worker serves: how many runs each has in flight now, and
    // its ceiling. The lane locks (taken in name order, like every lane lock) make the count
    // hold until this claim commits.
    let mut lane_count: BTreeMap<&str, (i64, u32)> = BTreeMap::new();
    for (lane, max) in &limits.lane_max_concurrency {
        if !worker.lanes.is_empty() && !worker.lanes.contains(lane) {
            continue;
        }
        let tx = work.tx_unsent();
        tx.lock_lane(lane).await?;
        let n = tx.lane_in_flight(lane).await?;
        let leaving_lane = leaving.iter().filter(|(_, l, _)| l == lane).count() as i64;
        lane_count.insert(lane.as_str(), ((n - leaving_lane).max(0), *max));
    }

    // Where rows are locked as they are read, lock no more than could be taken.
    let page_size = |claimed: usize| {
        if limits.max_runs > 0 {
            (i64::from(limits.max_runs) - claimed as i64).clamp(1, CLAIM_PAGE)
        } else {
            CLAIM_PAGE
        }
    };
    // What the worker holds and the first page, read together.
    let ((held_runs, mut held), first_page) = work
        .tx_unsent()
        .held_and_pending_page(worker_id, 0, &worker.lanes, page_size(0))
        .await?;
    for (id, _, needs) in &leaving {
        if held_runs.iter().any(|(held_id, _)| held_id == id) {
            held.cpus = (held.cpus - needs.cpus).max(0.0);
            held.memory_mb = held.memory_mb.saturating_sub(needs.memory_mb);
        }
    }
    // Room up to the worker's reach: its capacity, plus the reserve its local queue asks for.
    let reach = claim_reach(&worker.capacity, &limits.reserve);
    let mut room = Room::left(&reach, &held, &Resources::NONE);

    let wanted = |claimed: usize| limits.max_runs == 0 || claimed < limits.max_runs as usize;
    let mut claimed: Vec<Claim> = Vec::new();
    let mut after_seq = 0_i64;
    let mut scanned = 0_usize;
    let mut next_page = Some(first_page);
    loop {
        let page = page_size(claimed.len());
        // A run a queued write sends back to pending is not seen here: the commit's
        // `RunPending` brings a claim for it.
        let rows = match next_page.take() {
            Some(rows) => rows,
            None => {
                work.tx_unsent()
                    .pending_page(after_seq, &worker.lanes, page)
                    .await?
            }
        };
        scanned += rows.len();
        let last_page = (rows.len() as i64) < page;
        // First the runs this page can give, as if each were taken: what fits the room left
        // and its lane's ceiling, first in first out, a run too big for what is left skipped
        // so smaller ones behind it still go.
        let mut picks = Vec::new();
        let mut room_if = room;
        let mut lanes_if = lane_count.clone();
        for pending in &rows {
            if !wanted(claimed.len() + picks.len()) {
                break;
            }
            after_seq = pending.seq;
            if let Some((n, max)) = lanes_if.get(pending.lane.as_str()) {
                if !under_ceiling(*n, Some(*max)) {
                    continue;
                }
            }
            // Within the reach, yet never a run the worker could not run alone.
            if !room_if.fits(&pending.needs) || !pending.needs.fits_in(&worker.capacity) {
                continue;
            }
            room_if.take(&pending.needs);
            if let Some((n, _)) = lanes_if.get_mut(pending.lane.as_str()) {
                *n += 1;
            }
            picks.push(pending);
        }
        // Then all of them loaded in one statement (already locked by the page read, where
        // the store locks; not at all where the page read them whole) and each judged and
        // claimed; one refused leaves room unused, which the next page can fill.
        let mut ids: Vec<&str> = Vec::with_capacity(picks.len());
        for pending in &picks {
            match &pending.loaded {
                Some(loaded) => work.adopt(loaded.clone()),
                None => ids.push(pending.id.as_str()),
            }
        }
        work.load(&ids, Lock::Wait).await?;
        for pending in picks {
            let Some(loaded) = work.run(&pending.id, Lock::Wait).await? else {
                continue;
            };
            let Ok(transition) = loaded.run.state().apply(&Command::Claim {
                worker_id: worker_id.to_string(),
            }) else {
                continue;
            };
            let attempt = transition.next.attempt;
            let change = RunChange::Claim {
                status: transition.next.status,
                attempt,
                worker_id: worker_id.to_string(),
            };
            let ticket = work.write(&loaded, change).await?;
            work.insert_attempt(&pending.id, attempt, worker_id);
            let status = StatusBody::plain(RunStatus::Claimed, attempt);
            push_status(work, &pending.id, status)?;
            let body = EventBody::Attempt {
                attempt,
                worker_id: worker_id.to_string(),
            };
            work.push(&pending.id, attempt, body, None)?;
            room.take(&pending.needs);
            if let Some((n, _)) = lane_count.get_mut(pending.lane.as_str()) {
                *n += 1;
            }
            claimed.push(Claim {
                run_id: pending.id.clone(),
                attempt,
                ticket,
            });
        }
        if last_page || scanned >= CLAIM_SCAN_LIMIT || room.is_spent() || !wanted(claimed.len()) {
            break;
        }
    }
    Ok(Claims(claimed))
}
