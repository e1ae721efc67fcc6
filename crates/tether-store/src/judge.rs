//! Judgements every store makes the same way over what it has loaded: which reaper deadline an
//! in-flight run has passed, and what a list cursor names. Pure: the store supplies `now`.

use tether_domain::{ErrorCode, Millis, RunStatus};

use crate::{Admission, BatchRefusal, CreatedRun, ReapPolicy, RunRecord, StoreError, StoreResult};

/// One batch entry's outcome, as both stores read [`crate::Store::admit_runs`]'s per-entry
/// decision: the run, or why the batch stops at it. Other errors fail the whole call.
pub fn batch_entry(
    lane: &str,
    decided: StoreResult<Admission>,
) -> StoreResult<Result<CreatedRun, BatchRefusal>> {
    match decided {
        Ok(Admission::Accepted(created)) => Ok(Ok(*created)),
        Ok(Admission::LaneFull) => Ok(Err(BatchRefusal::LaneFull {
            lane: lane.to_string(),
        })),
        Ok(Admission::NeverFits) => Ok(Err(BatchRefusal::NeverFits)),
        Err(StoreError::IdempotencyConflict { run_id }) => {
            Ok(Err(BatchRefusal::IdempotencyConflict { run_id }))
        }
        Err(e) => Err(e),
    }
}

/// The reaper's deadlines of one in-flight run, as the store keeps them on the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReapDeadlines {
    /// Last heartbeat (or claim) plus the run's heartbeat timeout; `None` when it has none.
    pub stale_at: Option<Millis>,
    /// Start (or claim) plus the run's `timeout`.
    pub timeout_at: Option<Millis>,
    /// The worker confirmed this attempt with a start or a heartbeat.
    pub confirmed: bool,
}

/// Which reaper deadline `run` passed first by `now`, as the error its attempt ends with; `None`
/// while none has passed. A requested cancel whose worker went quiet is reported as a lost
/// heartbeat: the status machine ends it `cancelled`, since a requested cancel wins over a retry.
pub fn reap_reason(
    run: &RunRecord,
    deadlines: ReapDeadlines,
    now: Millis,
    policy: &ReapPolicy,
) -> Option<ErrorCode> {
    let mut due: Vec<(Millis, ErrorCode)> = Vec::new();
    if let Some(stale_at) = deadlines.stale_at.filter(|at| *at < now) {
        let code = if run.status == RunStatus::Claimed && !deadlines.confirmed {
            ErrorCode::WorkerClaimTimeout
        } else {
            ErrorCode::WorkerHeartbeatLost
        };
        due.push((stale_at, code));
    }
    if let Some(timeout_at) = deadlines.timeout_at {
        let deadline = timeout_at.saturating_add(policy.timeout_grace_ms);
        if deadline < now {
            due.push((deadline, ErrorCode::Timeout));
        }
    }
    if run.cancel_requested_at.is_some() {
        if let Some(base) = run.last_heartbeat_at.or(run.claimed_at) {
            let deadline = base.saturating_add(policy.cancel_stale_after_ms);
            if deadline < now {
                due.push((deadline, ErrorCode::WorkerHeartbeatLost));
            }
        }
    }
    due.into_iter()
        .min_by_key(|(at, _)| *at)
        .map(|(_, code)| code)
}

/// The seq a list cursor names (cursors are the last seq of the previous page).
pub fn parse_cursor(cursor: &str) -> StoreResult<i64> {
    match cursor.parse::<i64>() {
        Ok(seq) if seq > 0 => Ok(seq),
        _ => Err(StoreError::InvalidCursor),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_domain::{LanePolicy, Submission, SubmitDefaults};

    fn run(status: RunStatus) -> RunRecord {
        let spec = Submission {
            command: vec!["true".into()],
            ..Submission::default()
        }
        .resolve(
            Some(&LanePolicy::default()),
            &SubmitDefaults::default(),
            String::new(),
        )
        .unwrap();
        RunRecord {
            id: "r".into(),
            seq: 1,
            spec,
            status,
            attempt: 1,
            released_attempts: 0,
            worker_id: Some("w".into()),
            created_at: 0,
            claimed_at: Some(0),
            started_at: None,
            finished_at: None,
            last_heartbeat_at: Some(0),
            last_output_at: None,
            cancel_requested_at: None,
            exit_code: None,
            error_code: None,
            error_message: None,
            stdout_bytes: 0,
            stderr_bytes: 0,
            queue_position: None,
            last_event_seq: 0,
        }
    }

    fn deadlines(
        stale_at: Option<Millis>,
        timeout_at: Option<Millis>,
        confirmed: bool,
    ) -> ReapDeadlines {
        ReapDeadlines {
            stale_at,
            timeout_at,
            confirmed,
        }
    }

    #[test]
    fn the_first_deadline_passed_names_the_error() {
        let policy = ReapPolicy {
            timeout_grace_ms: 100,
            ..ReapPolicy::default()
        };
        let running = run(RunStatus::Running);
        assert_eq!(
            reap_reason(&running, deadlines(Some(50), None, true), 40, &policy),
            None
        );
        assert_eq!(
            reap_reason(&running, deadlines(Some(50), None, true), 60, &policy),
            Some(ErrorCode::WorkerHeartbeatLost)
        );
        assert_eq!(
            reap_reason(
                &run(RunStatus::Claimed),
                deadlines(Some(50), None, false),
                60,
                &policy
            ),
            Some(ErrorCode::WorkerClaimTimeout)
        );
        // The timeout's deadline (10 + grace 100) passed before the stale one (500).
        assert_eq!(
            reap_reason(&running, deadlines(Some(500), Some(10), true), 600, &policy),
            Some(ErrorCode::Timeout)
        );
        // No heartbeat timeout: never reaped for a missing heartbeat.
        assert_eq!(
            reap_reason(&running, deadlines(None, None, true), 1_000_000, &policy),
            None
        );
    }

    #[test]
    fn cursors_are_positive_seqs() {
        assert_eq!(parse_cursor("42").unwrap(), 42);
        assert!(matches!(parse_cursor("0"), Err(StoreError::InvalidCursor)));
        assert!(matches!(
            parse_cursor("zzz"),
            Err(StoreError::InvalidCursor)
        ));
    }
}
