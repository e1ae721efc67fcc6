//! The retention pruner: one background service that deletes finished runs, with their
//! events, attempts and output, once they are older than their lane's retention (the lane's
//! `retention_s`, else `--retention`; zero keeps everything).
//!
//! Like River's job cleaner and Oban's pruner it works in small batches, each its own short
//! transaction, with a pause between them: the SQLite writer and PostgreSQL's row locks are
//! held for one batch at a time, so submissions and worker calls wait on a batch at most, never
//! on a whole pass. Pending and in-flight runs are never touched (the store's query selects
//! terminal runs only, and a terminal status never changes).
//!
//! A batch's cost depends on the machine (a debug build, a loaded host, a slow disk), so on
//! SQLite the pruner times each one and sizes the next to stay within [`BUDGET`]: what a
//! submission may wait behind it (see [`budget_for`]). It also pauses at least as long as the
//! last batch took, so on a machine slow enough that every batch overruns, the pruner still
//! holds the store at most about half the time.

use std::time::{Duration, Instant};

use tether_store::Store;
use tokio_util::sync::CancellationToken;

use crate::AppState;

/// Runs deleted per transaction at most (and the first batch of a pass).
pub const BATCH: u32 = 100;
/// The fewest runs a batch deletes, however slow batches are: a pass must end.
pub const MIN_BATCH: u32 = 10;
/// How long one batch should take, from asking the store to its answer.
pub const BUDGET: Duration = Duration::from_millis(10);
/// Between two batches of one pass, at least: room for everyone else's writes.
const PAUSE: Duration = Duration::from_millis(20);
/// Passes run at most this far apart...
const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// ...and at least this far apart.
const MIN_INTERVAL: Duration = Duration::from_millis(500);

/// How often passes run: a fraction of the shortest retention, within bounds.
fn interval(retentions_ms: &[(String, i64)]) -> Duration {
    retentions_ms
        .iter()
        .map(|(_, ms)| Duration::from_millis((*ms / 4).max(0) as u64))
        .min()
        .unwrap_or(MAX_INTERVAL)
        .clamp(MIN_INTERVAL, MAX_INTERVAL)
}

/// The size of the batch after one of `size` runs that took `took`: halved past the budget,
/// grown by a quarter well under it (a single slow batch, such as one that waited for the
/// CPU, costs a few smaller batches, not a pass of them).
pub fn next_batch(size: u32, took: Duration, budget: Duration) -> u32 {
    if took > budget {
        (size / 2).max(MIN_BATCH)
    } else if took < budget / 2 {
        (size + size / 4 + 1).min(BATCH)
    } else {
        size
    }
}

/// The batch budget for the store a database URL names. SQLite has one writer, so a batch's
/// time is what the next submission may wait. A PostgreSQL batch blocks no one (one statement,
/// `SKIP LOCKED`, rows nobody else writes) and costs about the same per statement whatever its
/// size, so smaller batches there only mean more statements (BENCHMARKS.md): no budget, the
/// pause alone.
pub fn budget_for(database_url: &str) -> Option<Duration> {
    database_url.starts_with("sqlite:").then_some(BUDGET)
}

/// The pause after a batch that took `took`: never shorter than the batch itself.
fn pause_after(took: Duration) -> Duration {
    PAUSE.max(took)
}

/// One pass over every lane that prunes. Returns how many runs it deleted.
pub async fn prune_pass(state: &AppState) -> tether_store::StoreResult<u64> {
    let mut total = 0;
    let budget = budget_for(&state.config.database);
    for (lane, retention_ms) in state.config.lane_retentions_ms() {
        let deleted = prune_lane(
            state.store.as_ref(),
            &lane,
            retention_ms,
            budget,
            &state.shutdown,
            |_| {},
        )
        .await?;
        total += deleted;
    }
    Ok(total)
}

/// What one batch did, for whoever watches a pass (the measurement in BENCHMARKS.md).
#[derive(Debug, Clone, Copy)]
pub struct BatchDone {
    /// Runs the batch was allowed to delete.
    pub size: u32,
    pub deleted: u64,
    /// From asking the store to its answer: waiting for the writer included.
    pub took: Duration,
}

/// Prunes one lane until nothing past `retention_ms` is left (or shutdown), batch by batch.
/// Returns how many runs it deleted.
pub async fn prune_lane(
    store: &dyn Store,
    lane: &str,
    retention_ms: i64,
    budget: Option<Duration>,
    shutdown: &CancellationToken,
    mut on_batch: impl FnMut(BatchDone),
) -> tether_store::StoreResult<u64> {
    let mut total = 0;
    let mut size = BATCH;
    loop {
        if shutdown.is_cancelled() {
            return Ok(total);
        }
        let asked = Instant::now();
        let deleted = store.prune_finished_runs(lane, retention_ms, size).await?;
        let took = asked.elapsed();
        on_batch(BatchDone {
            size,
            deleted,
            took,
        });
        total += deleted;
        if deleted > 0 {
            metrics::counter!("tether_runs_pruned_total", "lane" => lane.to_string())
                .increment(deleted);
        }
        if deleted < u64::from(size) {
            return Ok(total);
        }
        if let Some(budget) = budget {
            size = next_batch(size, took, budget);
        }
        // The pause can be as long as a stalled batch was: shutdown does not wait for it.
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(total),
            _ = tokio::time::sleep(pause_after(took)) => {}
        }
    }
}

/// Runs until the server shuts down.
pub async fn run_pruner(state: AppState) {
    let retentions = state.config.lane_retentions_ms();
    if retentions.is_empty() {
        return;
    }
    let every = interval(&retentions);
    loop {
        match prune_pass(&state).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(runs = n, "pruned finished runs past their retention"),
            Err(e) => tracing::warn!(error = %e, "pruning failed; trying again later"),
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_follow_the_shortest_retention_within_bounds() {
        let lanes = |ms: &[i64]| -> Vec<(String, i64)> {
            ms.iter().map(|m| ("l".to_string(), *m)).collect()
        };
        assert_eq!(interval(&lanes(&[])), MAX_INTERVAL);
        assert_eq!(interval(&lanes(&[2_000])), MIN_INTERVAL);
        assert_eq!(
            interval(&lanes(&[8_000, 3_600_000])),
            Duration::from_secs(2)
        );
        assert_eq!(interval(&lanes(&[14 * 86_400_000])), MAX_INTERVAL);
    }

    #[test]
    fn batches_shrink_past_the_budget_and_grow_back_under_it() {
        let slow = BUDGET * 3;
        let fast = BUDGET / 10;
        assert_eq!(next_batch(BATCH, slow, BUDGET), BATCH / 2);
        assert_eq!(
            next_batch(MIN_BATCH, slow, BUDGET),
            MIN_BATCH,
            "never below the floor"
        );
        assert_eq!(
            next_batch(BATCH, fast, BUDGET),
            BATCH,
            "never above the cap"
        );
        assert_eq!(
            next_batch(40, BUDGET * 3 / 4, BUDGET),
            40,
            "near the budget: kept"
        );
        // From the floor back to the cap in a few fast batches.
        let mut size = MIN_BATCH;
        let mut steps = 0;
        while size < BATCH {
            size = next_batch(size, fast, BUDGET);
            steps += 1;
        }
        assert!(steps <= 12, "{steps} batches to grow back");
        assert_eq!(pause_after(fast), PAUSE);
        assert_eq!(pause_after(slow * 10), slow * 10);
        assert_eq!(budget_for("sqlite://./.tether/tether.db"), Some(BUDGET));
        assert_eq!(budget_for("postgres://db/tether"), None);
    }
}
