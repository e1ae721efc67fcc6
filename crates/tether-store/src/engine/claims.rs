//! Handing pending runs to a worker: first in first out within a lane, within the worker's
//! room and each lane's ceiling.

use std::collections::BTreeMap;

use tether_domain::admission::{under_ceiling, Room};
use tether_domain::machine::Command;
use tether_domain::{Freshness, RunStatus};

use super::{push, push_status, reload};
use crate::driver::{Driver, DriverTx, Lock, RunChange};
use crate::{ClaimLimits, ClaimedRun, EventBody, Outbox, StatusBody, StoreError, StoreResult};

/// How many pending runs one claim looks at before giving up on finding more that fit.
const CLAIM_SCAN_LIMIT: usize = 2048;
const CLAIM_PAGE: i64 = 256;

pub(super) async fn claim_runs<D: Driver>(
    d: &D,
    worker_id: &str,
    limits: &ClaimLimits,
) -> StoreResult<Vec<ClaimedRun>> {
    let mut tx = d.begin().await?;
    let now = tx.now();
    let mut out = Outbox::default();
    // The worker's row lock serializes its claims: the room computed below stays true.
    let worker = match tx.lock_worker(worker_id).await? {
        Some((worker, None)) => worker,
        _ => return Err(StoreError::UnknownWorker),
    };
    // A draining worker finishes what it holds and takes nothing new; a frozen one (its own
    // heartbeat stale, its long-poll still open) takes nothing either.
    let frozen = limits.worker_fresh_ms > 0
        && !Freshness::new(limits.worker_fresh_ms).is_fresh(Some(worker.last_heartbeat_at), now);
    if worker.draining || frozen {
        return Ok(Vec::new());
    }
    let (_, held) = tx.held_by(worker_id).await?;
    let mut room = Room::left(&worker.capacity, &held, &tether_domain::Resources::NONE);

    // Lanes with a ceiling that this worker serves: how many runs each has in flight now, and
    // its ceiling. The lane locks (taken in name order, like every lane lock) make the count
    // hold until this claim commits.
    let mut lane_count: BTreeMap<&str, (i64, u32)> = BTreeMap::new();
    for (lane, max) in &limits.lane_max_concurrency {
        if !worker.lanes.is_empty() && !worker.lanes.contains(lane) {
            continue;
        }
        tx.lock_lane(lane).await?;
        let n = tx.lane_in_flight(lane).await?;
        lane_count.insert(lane.as_str(), (n.max(0), *max));
    }

    let wanted = |claimed: usize| limits.max_runs == 0 || claimed < limits.max_runs as usize;
    let mut claimed: Vec<String> = Vec::new();
    let mut after_seq = 0_i64;
    let mut scanned = 0_usize;
    loop {
        // Where rows are locked as they are read, lock no more than could be taken.
        let page = if limits.max_runs > 0 {
            (i64::from(limits.max_runs) - claimed.len() as i64).clamp(1, CLAIM_PAGE)
        } else {
            CLAIM_PAGE
        };
        let rows = tx.pending_page(after_seq, &worker.lanes, page).await?;
        scanned += rows.len();
        let last_page = (rows.len() as i64) < page;
        for pending in rows {
            if !wanted(claimed.len()) {
                break;
            }
            after_seq = pending.seq;
            if let Some((n, max)) = lane_count.get(pending.lane.as_str()) {
                if !under_ceiling(*n, Some(*max)) {
                    continue;
                }
            }
            // A run too big for what is left is skipped; smaller ones behind it still go.
            if !room.fits(&pending.needs) {
                continue;
            }
            // Already locked by the page read, where the store locks.
            let Some(loaded) = tx.load_run(&pending.id, Lock::None).await? else {
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
                worker_id,
            };
            if !tx.write_run(&loaded, change).await? {
                // Someone else took it between our read and write: not ours.
                continue;
            }
            tx.insert_attempt(&pending.id, attempt, worker_id).await?;
            let status = StatusBody::plain(RunStatus::Claimed, attempt);
            push_status(&mut tx, &mut out, &pending.id, status).await?;
            let body = EventBody::Attempt {
                attempt,
                worker_id: worker_id.to_string(),
            };
            push(&mut tx, &mut out, &pending.id, attempt, &body, None).await?;
            room.take(&pending.needs);
            if let Some((n, _)) = lane_count.get_mut(pending.lane.as_str()) {
                *n += 1;
            }
            claimed.push(pending.id);
        }
        if last_page || scanned >= CLAIM_SCAN_LIMIT || room.is_spent() || !wanted(claimed.len()) {
            break;
        }
    }
    let mut runs = Vec::with_capacity(claimed.len());
    for run_id in &claimed {
        let run = reload(&mut tx, run_id).await?;
        runs.push(ClaimedRun {
            attempt: run.attempt,
            run,
        });
    }
    d.commit(tx, out).await?;
    Ok(runs)
}
