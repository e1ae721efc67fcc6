//! What the door says when a lane cannot take a run now: how long until it likely can
//! (`Retry-After`), and why a queued run is still waiting.

use crate::spec::Resources;
use crate::time::Millis;

/// An in-flight run, as far as guessing its end goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InFlightRun {
    /// When its process started (else when it was claimed).
    pub since: Millis,
    pub timeout_ms: Option<i64>,
}

/// Bounds on `Retry-After`, in seconds.
const MIN_RETRY_S: u64 = 1;
const MAX_RETRY_S: u64 = 3_600;

/// Seconds until the lane's soonest in-flight run is expected to end: each run is expected to
/// take as long as the median of the lane's recent runs, and never past its own `timeout`.
/// With nothing to go on (nothing in flight, or no history and no timeouts), `fallback_ms`.
pub fn retry_after_s(
    now: Millis,
    in_flight: &[InFlightRun],
    recent_durations_ms: &[i64],
    fallback_ms: i64,
) -> u64 {
    let typical = median(recent_durations_ms);
    let soonest = in_flight
        .iter()
        .filter_map(|run| {
            let elapsed = (now - run.since).max(0);
            let by_history = typical.map(|t| t - elapsed);
            let by_timeout = run.timeout_ms.map(|t| t - elapsed);
            match (by_history, by_timeout) {
                (Some(h), Some(t)) => Some(h.min(t)),
                (h, t) => h.or(t),
            }
        })
        // A run already past its typical length may end any moment.
        .map(|remaining| remaining.max(0))
        .min();
    let ms = soonest.unwrap_or(fallback_ms).max(0) as u64;
    ms.div_ceil(1_000).clamp(MIN_RETRY_S, MAX_RETRY_S)
}

fn median(values: &[i64]) -> Option<i64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    Some(sorted[sorted.len() / 2])
}

/// A live worker serving the lane, as a waiting run sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkerRoom {
    pub capacity: Resources,
    pub free: Resources,
}

/// Why a pending run is not running yet, in words a person can act on; `None` when it is
/// simply waiting its turn.
pub fn waiting_reason(
    needs: &Resources,
    lane: &str,
    workers: &[WorkerRoom],
    lane_in_flight: i64,
    lane_max_concurrency: Option<u32>,
) -> Option<String> {
    if workers.is_empty() {
        return Some(format!("no live worker serves lane `{lane}`"));
    }
    if !workers.iter().any(|w| needs.fits_in(&w.capacity)) {
        return Some(format!(
            "needs {} cpus and {} MB, more than any live worker serving lane `{lane}` offers",
            needs.cpus, needs.memory_mb
        ));
    }
    if let Some(max) = lane_max_concurrency {
        if lane_in_flight >= i64::from(max) {
            return Some(format!("lane `{lane}` is at its max_concurrency of {max}"));
        }
    }
    if !workers.iter().any(|w| needs.fits_in(&w.free)) {
        return Some(format!(
            "waiting for {} cpus and {} MB to free up on a worker",
            needs.cpus, needs.memory_mb
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_follows_the_soonest_expected_end() {
        let runs = [
            InFlightRun {
                since: 0,
                timeout_ms: None,
            },
            InFlightRun {
                since: 5_000,
                timeout_ms: None,
            },
        ];
        // Recent runs took 10 s; the oldest started 8 s ago: about 2 s left.
        assert_eq!(
            retry_after_s(8_000, &runs, &[9_000, 10_000, 11_000], 30_000),
            2
        );
        // A timeout sooner than the history bounds it.
        let capped = [InFlightRun {
            since: 0,
            timeout_ms: Some(4_000),
        }];
        assert_eq!(retry_after_s(1_000, &capped, &[60_000], 30_000), 3);
        // Past its typical length: any moment now, but never 0.
        assert_eq!(retry_after_s(100_000, &runs, &[10_000], 30_000), 1);
        // Nothing to go on: the fallback.
        assert_eq!(retry_after_s(0, &[], &[10_000], 30_000), 30);
        assert_eq!(retry_after_s(0, &runs, &[], 7_500), 8);
    }

    #[test]
    fn waiting_reasons_name_what_blocks_the_run() {
        let one = Resources {
            cpus: 1.0,
            memory_mb: 256,
        };
        let big = Resources {
            cpus: 16.0,
            memory_mb: 256,
        };
        let worker = WorkerRoom {
            capacity: Resources {
                cpus: 4.0,
                memory_mb: 4096,
            },
            free: Resources {
                cpus: 0.0,
                memory_mb: 4096,
            },
        };
        assert!(waiting_reason(&one, "l", &[], 0, None)
            .unwrap()
            .contains("no live worker"));
        assert!(waiting_reason(&big, "l", &[worker], 0, None)
            .unwrap()
            .contains("more than any"));
        assert!(waiting_reason(&one, "l", &[worker], 2, Some(2))
            .unwrap()
            .contains("max_concurrency"));
        assert!(waiting_reason(&one, "l", &[worker], 0, None)
            .unwrap()
            .contains("free up"));
        let idle = WorkerRoom {
            free: worker.capacity,
            ..worker
        };
        assert_eq!(waiting_reason(&one, "l", &[idle], 0, None), None);
    }
}
