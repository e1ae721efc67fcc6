//! The reaper: inside every server, it ends the attempts of workers that went silent, runs past
//! their timeout, and cancelled runs whose worker vanished (SPEC §3). It sleeps until the
//! earliest moment any in-flight run could go stale, never longer than `--reaper-interval`, and
//! re-reads that moment when a run is claimed or started (50 ms after the signal, at most every
//! 100 ms), so a dead worker is noticed within about a second of its deadline.

use std::time::Duration;

use tether_domain::{ErrorCode, Millis, RunStatus};
use tether_store::{ReapPolicy, Signal, StoreResult};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use crate::AppState;

/// A little past the deadline, so the sweep sees the run as stale by the store's clock.
const PAST_DEADLINE: Duration = Duration::from_millis(25);
/// After a store error, wait this long before trying again.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// Re-read the next deadline at most this often when signals pour in.
const DEADLINE_RECHECK: Duration = Duration::from_millis(100);
/// And no sooner than this after the signal that asks for it: the claim or start that sent it
/// is usually followed at once by the worker's next call, and the re-read's two queries would
/// compete with it for the store and the cores. A deadline is seconds away; this is not.
const RECHECK_DELAY: Duration = Duration::from_millis(50);

pub fn reap_policy(state: &AppState) -> ReapPolicy {
    ReapPolicy {
        // The worker enforces timeouts itself; the reaper steps in only if it did not.
        timeout_grace_ms: (state.config.heartbeat_interval_ms() * 2).max(1_000),
        cancel_stale_after_ms: state.config.stale_after.as_millis() as i64,
        ..ReapPolicy::default()
    }
}

/// One sweep, recorded in the metrics. Returns how many runs it ended.
pub async fn sweep(state: &AppState, policy: &ReapPolicy) -> StoreResult<usize> {
    let started = std::time::Instant::now();
    let report = state.store.reap_stale_runs(policy).await?;
    metrics::histogram!(crate::metrics::REAPER_SWEEP).record(started.elapsed().as_secs_f64());
    for reaped in &report.reaped {
        tracing::info!(run_id = %reaped.run_id, attempt = reaped.attempt,
            error_code = %reaped.error_code, status = %reaped.status_after, "reaped");
        metrics::counter!(crate::metrics::RUNS_REAPED, "reason" => reaped.error_code.as_str())
            .increment(1);
        // The lane is on the run; reaps are rare enough to read it back.
        if let Ok(Some(run)) = state.store.get_run(&reaped.run_id).await {
            let status = if reaped.error_code == ErrorCode::Cancelled {
                RunStatus::Cancelled
            } else {
                RunStatus::TimedOut
            };
            crate::metrics::attempt_ended(&run, status, Some(reaped.error_code));
        }
    }
    Ok(report.reaped.len())
}

/// How long to sleep until `deadline` (store clock), capped by the reaper interval.
fn sleep_for(deadline: Option<Millis>, now: Millis, interval: Duration) -> Duration {
    match deadline {
        Some(d) => Duration::from_millis((d - now).max(0) as u64)
            .saturating_add(PAST_DEADLINE)
            .min(interval),
        None => interval,
    }
}

async fn next_wake(state: &AppState, policy: &ReapPolicy) -> StoreResult<Instant> {
    let deadline = state.store.next_reap_deadline(policy).await?;
    let now = state.store.now().await?;
    Ok(Instant::now() + sleep_for(deadline, now, state.config.reaper_interval))
}

/// Before judging anyone after this server could not reach its store: every in-flight run
/// gets one full stale window from now (`Store::grant_heartbeat_grace`), since heartbeats
/// sent meanwhile may not have been recorded. The deadline moves; the rule stays.
async fn grant_owed_grace(state: &AppState) -> StoreResult<()> {
    let Some(token) = state.health.grace_owed() else {
        return Ok(());
    };
    let moved = state.store.grant_heartbeat_grace().await?;
    state.health.grace_granted(token);
    tracing::info!(
        runs = moved,
        "the store answers again: in-flight runs get a full stale window before they are judged"
    );
    Ok(())
}

/// Runs until the server shuts down.
pub async fn run_reaper(state: AppState) {
    let policy = reap_policy(&state);
    let mut signals = state.store.subscribe();
    loop {
        if state.shutdown.is_cancelled() {
            return;
        }
        let swept = match grant_owed_grace(&state).await {
            Ok(()) => sweep(&state, &policy).await,
            Err(e) => Err(e),
        };
        if let Err(e) = swept {
            if matches!(e, tether_store::StoreError::Unavailable(_)) {
                state.health.failed(e.to_string());
            }
            tracing::warn!(error = %e, "reaper sweep failed; retrying");
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = tokio::time::sleep(ERROR_BACKOFF) => continue,
            }
        }
        let mut wake = match next_wake(&state, &policy).await {
            Ok(wake) => wake,
            Err(_) => Instant::now() + ERROR_BACKOFF,
        };
        // A claim or start may bring the earliest deadline forward: re-read it, at most every
        // DEADLINE_RECHECK, and never drop a request to re-read.
        let mut last_recheck = Instant::now();
        let mut recheck_at: Option<Instant> = None;
        loop {
            let recheck = async {
                match recheck_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(wake) => break,
                _ = recheck => {
                    recheck_at = None;
                    last_recheck = Instant::now();
                    if let Ok(sooner) = next_wake(&state, &policy).await {
                        wake = wake.min(sooner);
                    }
                }
                signal = signals.recv() => match signal {
                    // A run's first event is its creation: a pending run has no deadline.
                    Ok(Signal::RunEvents { seq: 1, .. }) => {}
                    Ok(Signal::RunEvents { .. }) | Err(RecvError::Lagged(_)) => {
                        if recheck_at.is_none() {
                            let soonest = Instant::now() + RECHECK_DELAY;
                            recheck_at = Some((last_recheck + DEADLINE_RECHECK).max(soonest));
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Closed) => {
                        // No more signals will come: fall back to the timer alone.
                        tokio::time::sleep_until(wake).await;
                        break;
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_until_the_deadline_but_never_past_the_interval() {
        let interval = Duration::from_secs(30);
        assert_eq!(sleep_for(None, 0, interval), interval);
        assert_eq!(
            sleep_for(Some(1_000), 0, interval),
            Duration::from_millis(1_000) + PAST_DEADLINE
        );
        assert_eq!(sleep_for(Some(-5), 0, interval), PAST_DEADLINE);
        assert_eq!(sleep_for(Some(100_000), 0, interval), interval);
    }
}
