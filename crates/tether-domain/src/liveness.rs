//! Liveness judgements. One mechanism, [`Freshness`], answers "is this stamp younger than that
//! window, by the store's clock" for runs, workers and endpoints alike.

use serde::{Deserialize, Serialize};

use crate::status::RunStatus;
use crate::time::{age_s, Millis};

/// A window a stamp must be younger than to count. Judged against the store's `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    pub window_ms: i64,
}

impl Freshness {
    pub const fn new(window_ms: i64) -> Freshness {
        Freshness { window_ms }
    }

    /// A stamp is fresh while `now - stamp <= window`. A stamp that was never written is stale.
    pub fn is_fresh(self, stamp: Option<Millis>, now: Millis) -> bool {
        stamp.is_some_and(|s| now - s <= self.window_ms)
    }
}

/// How alive an in-flight run looks (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LivenessState {
    /// Pending: no worker holds it yet.
    Waiting,
    /// Heartbeats fresh and output recent.
    Alive,
    /// Heartbeats fresh but nothing printed for a while: alive, just silent.
    Quiet,
    /// At least one heartbeat interval missed, not yet past the stale window.
    Suspect,
    /// Past the stale window: the reaper ends (or has ended) this attempt.
    Lost,
    /// Terminal.
    Done,
}

/// The `liveness` object on every run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Liveness {
    pub state: LivenessState,
    /// Seconds since the last heartbeat (or the claim, before any heartbeat).
    pub heartbeat_age_s: Option<f64>,
    /// Seconds since the last output line.
    pub since_last_output_s: Option<f64>,
    /// Seconds since the run last showed progress: its last output, else its start or claim.
    pub idle_for_s: Option<f64>,
}

/// The stamps and windows a run's liveness is judged from.
#[derive(Debug, Clone, Copy)]
pub struct RunLivenessInput {
    pub status: RunStatus,
    pub claimed_at: Option<Millis>,
    pub started_at: Option<Millis>,
    pub last_heartbeat_at: Option<Millis>,
    pub last_output_at: Option<Millis>,
    /// The workers' heartbeat interval.
    pub heartbeat_interval_ms: i64,
    /// `None`: the run is never judged lost for a missing heartbeat.
    pub heartbeat_timeout_ms: Option<i64>,
}

/// A run with fresh heartbeats is `quiet` once it has printed nothing for this many intervals.
pub const QUIET_AFTER_INTERVALS: i64 = 2;

/// How old a heartbeat may be before at least one was missed: one and a half intervals. Past
/// it a run or a worker is `suspect`, and a worker is handed no runs and counts for no capacity.
pub fn suspect_after_ms(heartbeat_interval_ms: i64) -> i64 {
    heartbeat_interval_ms.max(1) * 3 / 2
}

/// Judges a run's liveness at the store's `now`.
pub fn judge_run_liveness(input: RunLivenessInput, now: Millis) -> Liveness {
    let since_last_output_s = input.last_output_at.map(|t| age_s(now, t));
    if input.status.is_terminal() {
        return Liveness {
            state: LivenessState::Done,
            heartbeat_age_s: None,
            since_last_output_s,
            idle_for_s: None,
        };
    }
    if input.status == RunStatus::Pending {
        return Liveness {
            state: LivenessState::Waiting,
            heartbeat_age_s: None,
            since_last_output_s,
            idle_for_s: None,
        };
    }
    let beat = input.last_heartbeat_at.or(input.claimed_at);
    let progress = input
        .last_output_at
        .or(input.started_at)
        .or(input.claimed_at);
    let interval = input.heartbeat_interval_ms.max(1);
    let suspect = Freshness::new(suspect_after_ms(interval));
    let quiet = Freshness::new(interval * QUIET_AFTER_INTERVALS);
    let state = match input.heartbeat_timeout_ms {
        Some(window) if !Freshness::new(window).is_fresh(beat, now) => LivenessState::Lost,
        _ if !suspect.is_fresh(beat, now) => LivenessState::Suspect,
        _ if !quiet.is_fresh(progress, now) => LivenessState::Quiet,
        _ => LivenessState::Alive,
    };
    Liveness {
        state,
        heartbeat_age_s: beat.map(|t| age_s(now, t)),
        since_last_output_s,
        idle_for_s: progress.map(|t| age_s(now, t)),
    }
}

/// A worker's state as `GET /v1/workers` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Active,
    Suspect,
    Lost,
    Draining,
}

impl WorkerState {
    /// The name the API and metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Active => "active",
            WorkerState::Suspect => "suspect",
            WorkerState::Lost => "lost",
            WorkerState::Draining => "draining",
        }
    }
}

/// Judges a worker from its last heartbeat: `lost` past the stale window, `suspect` after one
/// missed interval, `draining` while it finishes its runs before leaving.
pub fn judge_worker(
    last_heartbeat_at: Millis,
    draining: bool,
    heartbeat_interval_ms: i64,
    stale_after_ms: i64,
    now: Millis,
) -> WorkerState {
    let beat = Some(last_heartbeat_at);
    if !Freshness::new(stale_after_ms).is_fresh(beat, now) {
        WorkerState::Lost
    } else if !Freshness::new(suspect_after_ms(heartbeat_interval_ms)).is_fresh(beat, now) {
        WorkerState::Suspect
    } else if draining {
        WorkerState::Draining
    } else {
        WorkerState::Active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(now_minus_beat: i64, now_minus_output: Option<i64>) -> Liveness {
        let now = 100_000;
        judge_run_liveness(
            RunLivenessInput {
                status: RunStatus::Running,
                claimed_at: Some(now - 50_000),
                started_at: Some(now - 50_000),
                last_heartbeat_at: Some(now - now_minus_beat),
                last_output_at: now_minus_output.map(|d| now - d),
                heartbeat_interval_ms: 1_000,
                heartbeat_timeout_ms: Some(5_000),
            },
            now,
        )
    }

    #[test]
    fn quiet_and_lost_are_different_states() {
        assert_eq!(running(100, Some(100)).state, LivenessState::Alive);
        assert_eq!(running(100, Some(10_000)).state, LivenessState::Quiet);
        assert_eq!(running(100, None).state, LivenessState::Quiet);
        assert_eq!(running(2_000, Some(100)).state, LivenessState::Suspect);
        assert_eq!(running(6_000, Some(100)).state, LivenessState::Lost);
    }

    #[test]
    fn without_a_heartbeat_timeout_a_run_is_never_lost() {
        let l = judge_run_liveness(
            RunLivenessInput {
                status: RunStatus::Running,
                claimed_at: Some(0),
                started_at: Some(0),
                last_heartbeat_at: Some(0),
                last_output_at: None,
                heartbeat_interval_ms: 1_000,
                heartbeat_timeout_ms: None,
            },
            1_000_000,
        );
        assert_eq!(l.state, LivenessState::Suspect);
    }

    #[test]
    fn freshness_treats_missing_stamps_as_stale() {
        let f = Freshness::new(1_000);
        assert!(!f.is_fresh(None, 0));
        assert!(f.is_fresh(Some(0), 1_000));
        assert!(!f.is_fresh(Some(0), 1_001));
    }

    #[test]
    fn workers_go_suspect_then_lost() {
        assert_eq!(
            judge_worker(0, false, 1_000, 5_000, 500),
            WorkerState::Active
        );
        assert_eq!(
            judge_worker(0, true, 1_000, 5_000, 500),
            WorkerState::Draining
        );
        assert_eq!(
            judge_worker(0, false, 1_000, 5_000, 2_000),
            WorkerState::Suspect
        );
        assert_eq!(
            judge_worker(0, false, 1_000, 5_000, 6_000),
            WorkerState::Lost
        );
    }
}
