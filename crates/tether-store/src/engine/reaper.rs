//! The reaper's sweep and its next wake-up.

use tether_domain::Millis;

use super::{reap_one, Work};
use crate::driver::{Driver, DriverTx, Lock};
use crate::{reap_reason, ReapDeadlines, ReapPolicy, ReapReport, StoreResult};

pub(super) async fn sweep<D: Driver>(d: &D, policy: &ReapPolicy) -> StoreResult<ReapReport> {
    let mut work = Work::begin(d).await?;
    // One sweep at a time across every server sharing the store; a server that finds the
    // sweep taken leaves it to the holder.
    if !work.tx().await?.try_lock_sweep().await? {
        return Ok(ReapReport {
            reaped: Vec::new(),
            swept: false,
        });
    }
    let now = work.now();
    let mut reaped = Vec::new();
    // In seq order, the order every multi-run writer locks in.
    let due = work.tx().await?.reap_candidates(policy).await?;
    // A run a worker call is writing right now is skipped, not waited on: that call is a
    // sign of life, and the next sweep judges the run afresh.
    let ids: Vec<&str> = due.iter().map(String::as_str).collect();
    work.load(&ids, Lock::Skip).await?;
    for run_id in &due {
        let Some(loaded) = work.locked(run_id).await? else {
            continue;
        };
        // Judged again on the row as loaded in this transaction: a run another sweep has
        // already ended is no longer in flight, and one that heartbeated is no longer due.
        let deadlines = ReapDeadlines {
            stale_at: loaded.stale_at,
            timeout_at: loaded.timeout_at,
            confirmed: loaded.confirmed,
        };
        let Some(code) = reap_reason(&loaded.run, deadlines, now, policy) else {
            continue;
        };
        if let Some(r) = reap_one(&mut work, &loaded, code).await? {
            reaped.push(r);
        }
    }
    work.commit(d).await?;
    Ok(ReapReport {
        reaped,
        swept: true,
    })
}

pub(super) async fn next_deadline<D: Driver>(
    d: &D,
    policy: &ReapPolicy,
) -> StoreResult<Option<Millis>> {
    let earliest = d.read_earliest_deadlines().await?;
    Ok([
        earliest.stale_at,
        earliest
            .timeout_at
            .map(|t| t.saturating_add(policy.timeout_grace_ms)),
        earliest
            .cancel_base
            .map(|c| c.saturating_add(policy.cancel_stale_after_ms)),
    ]
    .into_iter()
    .flatten()
    .min())
}
