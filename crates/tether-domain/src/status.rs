//! Run statuses and error codes, with the exact strings of SPEC §2.

/// Where a run is in its life. `Pending → Claimed → Running → one terminal status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunStatus {
    Pending,
    Claimed,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl RunStatus {
    pub const ALL: [RunStatus; 7] = [
        RunStatus::Pending,
        RunStatus::Claimed,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Cancelled,
        RunStatus::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Pending => "pending",
            RunStatus::Claimed => "claimed",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::TimedOut => "timed_out",
        }
    }

    /// Reads a stored status. `queued`, written by older versions, reads as `pending`.
    pub fn parse(text: &str) -> Option<RunStatus> {
        Some(match text {
            "pending" | "queued" => RunStatus::Pending,
            "claimed" => RunStatus::Claimed,
            "running" => RunStatus::Running,
            "succeeded" => RunStatus::Succeeded,
            "failed" => RunStatus::Failed,
            "cancelled" => RunStatus::Cancelled,
            "timed_out" => RunStatus::TimedOut,
            _ => return None,
        })
    }

    /// A terminal status never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled | RunStatus::TimedOut
        )
    }

    /// Held by a worker: the states the reaper watches.
    pub fn is_in_flight(self) -> bool {
        matches!(self, RunStatus::Claimed | RunStatus::Running)
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an attempt ended the way it did (SPEC §2 `error_code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The worker heartbeated for this attempt, then went silent.
    WorkerHeartbeatLost,
    /// Claimed, but the worker never confirmed with a start or a heartbeat.
    WorkerClaimTimeout,
    /// Ran past `timeout_s`.
    Timeout,
    /// Alive, but printed nothing for `stall_timeout_s`.
    Stalled,
    ExitNonzero,
    SpawnFailed,
    Cancelled,
    OutputLimit,
    /// The worker handed the run back before starting it (it was stopping, or the run waited
    /// too long in its local queue): the attempt does not count against `max_attempts`.
    Released,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::WorkerHeartbeatLost => "worker_heartbeat_lost",
            ErrorCode::WorkerClaimTimeout => "worker_claim_timeout",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Stalled => "stalled",
            ErrorCode::ExitNonzero => "exit_nonzero",
            ErrorCode::SpawnFailed => "spawn_failed",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::OutputLimit => "output_limit",
            ErrorCode::Released => "released",
        }
    }

    pub fn parse(text: &str) -> Option<ErrorCode> {
        Some(match text {
            "worker_heartbeat_lost" => ErrorCode::WorkerHeartbeatLost,
            "worker_claim_timeout" => ErrorCode::WorkerClaimTimeout,
            "timeout" => ErrorCode::Timeout,
            "stalled" => ErrorCode::Stalled,
            "exit_nonzero" => ErrorCode::ExitNonzero,
            "spawn_failed" => ErrorCode::SpawnFailed,
            "cancelled" => ErrorCode::Cancelled,
            "output_limit" => ErrorCode::OutputLimit,
            "released" => ErrorCode::Released,
            _ => return None,
        })
    }

    /// Failures of the infrastructure, not of the command: only these are retried. A command
    /// that exits non-zero, times out or floods its output would do the same again.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::WorkerHeartbeatLost | ErrorCode::WorkerClaimTimeout
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_queued_reads_as_pending() {
        assert_eq!(RunStatus::parse("queued"), Some(RunStatus::Pending));
    }

    #[test]
    fn every_status_round_trips() {
        for s in RunStatus::ALL {
            assert_eq!(RunStatus::parse(s.as_str()), Some(s));
        }
    }
}
