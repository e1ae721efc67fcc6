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

/// A live worker serving the lane: what it advertises and what its in-flight runs hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkerRoom {
    pub capacity: Resources,
    pub held: Resources,
}

impl WorkerRoom {
    /// What is left of this worker once its in-flight runs are counted.
    pub fn free(&self) -> Room {
        Room::left(&self.capacity, &self.held, &Resources::NONE)
    }
}

/// Room left for new runs: capacity less what in-flight runs hold and less what admitted,
/// not yet claimed runs are owed. Signed, so an overcommitted lane reads as no room at all.
/// The one arithmetic behind admission (fleet-wide), claims (one worker) and
/// [`waiting_reason`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Room {
    pub cpus: f64,
    pub memory_mb: i64,
}

impl Room {
    /// `capacity` less what is `held` and less what `waiting` runs are owed.
    pub fn left(capacity: &Resources, held: &Resources, waiting: &Resources) -> Room {
        Room {
            cpus: capacity.cpus - held.cpus - waiting.cpus,
            memory_mb: capacity.memory_mb as i64 - held.memory_mb as i64 - waiting.memory_mb as i64,
        }
    }

    /// Does `needs` fit in what is left? Never when the room is overcommitted.
    pub fn fits(&self, needs: &Resources) -> bool {
        self.memory_mb >= 0
            && needs.fits_in(&Resources {
                cpus: self.cpus,
                memory_mb: self.memory_mb as u64,
            })
    }

    /// Counts `needs` as taken.
    pub fn take(&mut self, needs: &Resources) {
        self.cpus -= needs.cpus;
        self.memory_mb -= needs.memory_mb as i64;
    }

    /// Nothing more can fit (a scan for runs that fit may stop).
    pub fn is_spent(&self) -> bool {
        self.cpus <= 1e-9 || self.memory_mb <= 0
    }
}

/// At most this many times its capacity may a worker hold in reserve: runs of a few
/// milliseconds, 8 at a time, free about 500 slots in the 400 ms a worker sizes its reserve by.
pub const MAX_RESERVE_FACTOR: u32 = 64;

/// How much a worker may hold at once: its `capacity`, plus a `reserve` of runs waiting in it
/// to start the moment one of its slots frees (its local queue), so a slot never waits a round
/// trip for its next run. The reserve counts at most [`MAX_RESERVE_FACTOR`] times the
/// capacity (the worker sizes it by time: what its slots free within a few hundred
/// milliseconds, enough to outlast two calls to a busy server); a claim still hands it only
/// runs that fit its capacity alone.
pub fn claim_reach(capacity: &Resources, reserve: &Resources) -> Resources {
    let factor = f64::from(MAX_RESERVE_FACTOR);
    let cpus = if reserve.cpus.is_finite() {
        reserve.cpus.clamp(0.0, factor * capacity.cpus)
    } else {
        0.0
    };
    Resources {
        cpus: capacity.cpus + cpus,
        memory_mb: capacity.memory_mb.saturating_add(
            reserve.memory_mb.min(
                capacity
                    .memory_mb
                    .saturating_mul(u64::from(MAX_RESERVE_FACTOR)),
            ),
        ),
    }
}

/// Is a lane with `count` runs (in flight, plus waiting where the caller counts them) under
/// its `max_concurrency`? A lane without one always is.
pub fn under_ceiling(count: i64, max_concurrency: Option<u32>) -> bool {
    max_concurrency.is_none_or(|max| count < i64::from(max))
}

/// What a lane's door decides for a submission now (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    Admit,
    /// A `reject` lane has no room for it now.
    Full,
    /// Live workers serve the lane but none could ever hold it.
    NeverFits,
}

/// What a `reject` lane holds, for [`door`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LaneHolds {
    /// What the in-flight runs of the serving workers hold.
    pub held: Resources,
    /// Runs in flight in the lane.
    pub in_flight: i64,
    /// Runs admitted and not yet claimed (cancels asked excluded), and what they are owed.
    pub waiting: i64,
    pub waiting_needs: Resources,
}

/// Admission: `NeverFits` when live workers serve the lane (`capacities`) and none advertises
/// enough; in a `reject` lane (`holds` given), `Full` unless [`Room::left`] of the serving
/// workers has room for it now and the lane, counting its waiting runs, is under its ceiling.
pub fn door(
    needs: &Resources,
    capacities: &[Resources],
    holds: Option<&LaneHolds>,
    max_concurrency: Option<u32>,
) -> Door {
    if !capacities.is_empty() && !capacities.iter().any(|c| needs.fits_in(c)) {
        return Door::NeverFits;
    }
    let Some(holds) = holds else {
        return Door::Admit;
    };
    let total = capacities.iter().fold(Resources::NONE, |sum, c| Resources {
        cpus: sum.cpus + c.cpus,
        memory_mb: sum.memory_mb + c.memory_mb,
    });
    if !Room::left(&total, &holds.held, &holds.waiting_needs).fits(needs)
        || !under_ceiling(holds.in_flight + holds.waiting, max_concurrency)
    {
        return Door::Full;
    }
    Door::Admit
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
        if !under_ceiling(lane_in_flight, Some(max)) {
            return Some(format!("lane `{lane}` is at its max_concurrency of {max}"));
        }
    }
    if !workers.iter().any(|w| w.free().fits(needs)) {
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
    fn a_reserve_reaches_at_most_a_few_times_the_capacity() {
        let capacity = Resources {
            cpus: 8.0,
            memory_mb: 4096,
        };
        let reach =
            |cpus: f64, memory_mb: u64| claim_reach(&capacity, &Resources { cpus, memory_mb });
        assert_eq!(reach(0.0, 0), capacity);
        assert_eq!(
            reach(4.0, 1024),
            Resources {
                cpus: 12.0,
                memory_mb: 5120
            }
        );
        let factor = f64::from(MAX_RESERVE_FACTOR);
        let most = Resources {
            cpus: 8.0 * (1.0 + factor),
            memory_mb: 4096 * (1 + u64::from(MAX_RESERVE_FACTOR)),
        };
        assert_eq!(reach(1e6, u64::MAX), most);
        // Nonsense never widens what a worker may hold.
        assert_eq!(reach(f64::NAN, 0), capacity);
        assert_eq!(reach(f64::INFINITY, 0), capacity);
        assert_eq!(reach(-3.0, 0), capacity);
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
            held: Resources {
                cpus: 4.0,
                memory_mb: 0,
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
            held: Resources::NONE,
            ..worker
        };
        assert_eq!(waiting_reason(&one, "l", &[idle], 0, None), None);
    }

    #[test]
    fn the_door_counts_capacity_less_held_less_waiting_and_the_ceiling() {
        let one = Resources {
            cpus: 1.0,
            memory_mb: 100,
        };
        let two = Resources {
            cpus: 2.0,
            memory_mb: 200,
        };
        let idle = LaneHolds {
            held: one,
            in_flight: 1,
            waiting: 0,
            waiting_needs: Resources::NONE,
        };
        assert_eq!(door(&one, &[two], Some(&idle), None), Door::Admit);
        let owed = LaneHolds {
            waiting: 1,
            waiting_needs: one,
            ..idle
        };
        assert_eq!(door(&one, &[two], Some(&owed), None), Door::Full);
        assert_eq!(door(&one, &[two], None, None), Door::Admit);
        assert_eq!(door(&one, &[two], Some(&idle), Some(1)), Door::Full);
        let big = Resources {
            cpus: 8.0,
            memory_mb: 1,
        };
        assert_eq!(door(&big, &[two], None, None), Door::NeverFits);
        assert_eq!(door(&big, &[], Some(&idle), None), Door::Full);
        assert_eq!(door(&big, &[], None, None), Door::Admit);
    }
}
