//! The status machine. Stores load a run's [`RunState`], ask [`RunState::apply`] what a command
//! does to it, and write the answer back conditionally on the state they loaded (status and
//! attempt), so the machine below is the only place that decides what may happen to a run.

use crate::status::{ErrorCode, RunStatus};

/// The part of a run the status machine reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunState {
    pub status: RunStatus,
    /// The current attempt, 1-based once claimed; the fencing token of every worker call.
    pub attempt: u32,
    pub max_attempts: u32,
    /// Attempts their worker handed back before starting them ([`Command::Release`]): they
    /// do not count against `max_attempts`.
    pub released: u32,
    /// The worker holding the current attempt, while it is in flight.
    pub worker_id: Option<String>,
    pub cancel_requested: bool,
}

/// How an attempt ended, as its worker (or the reaper) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Succeeded,
    Failed { error_code: ErrorCode },
    TimedOut { error_code: ErrorCode },
    Cancelled,
}

impl AttemptOutcome {
    pub fn status(self) -> RunStatus {
        match self {
            AttemptOutcome::Succeeded => RunStatus::Succeeded,
            AttemptOutcome::Failed { .. } => RunStatus::Failed,
            AttemptOutcome::TimedOut { .. } => RunStatus::TimedOut,
            AttemptOutcome::Cancelled => RunStatus::Cancelled,
        }
    }

    pub fn error_code(self) -> Option<ErrorCode> {
        match self {
            AttemptOutcome::Succeeded => None,
            AttemptOutcome::Failed { error_code } | AttemptOutcome::TimedOut { error_code } => {
                Some(error_code)
            }
            AttemptOutcome::Cancelled => Some(ErrorCode::Cancelled),
        }
    }
}

/// What ending an attempt does to the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The attempt is recorded with `ended` and the run goes back to `pending` with
    /// `attempt + 1`, in one transaction.
    Retry {
        ended: RunStatus,
        error_code: Option<ErrorCode>,
    },
    /// The run takes this terminal status for good.
    Terminal {
        status: RunStatus,
        error_code: Option<ErrorCode>,
    },
    /// The worker handed the attempt back unstarted: it is recorded `claimed` with
    /// `released`, and the run goes back to `pending` without it counting against
    /// `max_attempts`.
    Released,
}

impl Decision {
    /// The run's status once the decision is written.
    pub fn run_status(self) -> RunStatus {
        match self {
            Decision::Retry { .. } | Decision::Released => RunStatus::Pending,
            Decision::Terminal { status, .. } => status,
        }
    }

    /// The status and error code the ended attempt is recorded with.
    pub fn attempt_result(self) -> (RunStatus, Option<ErrorCode>) {
        match self {
            Decision::Retry { ended, error_code } => (ended, error_code),
            Decision::Terminal { status, error_code } => (status, error_code),
            Decision::Released => (RunStatus::Claimed, Some(ErrorCode::Released)),
        }
    }
}

/// Something that may happen to a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A worker takes a pending run.
    Claim { worker_id: String },
    /// The worker confirms the process started.
    Start { attempt: u32, worker_id: String },
    /// A worker call that only needs to be about the current attempt (heartbeat, log append).
    Touch { attempt: u32, worker_id: String },
    /// The worker reports how the attempt ended.
    Finish {
        attempt: u32,
        worker_id: String,
        outcome: AttemptOutcome,
    },
    /// The reaper ends an attempt whose worker went silent or ran out of time.
    Reap { attempt: u32, error_code: ErrorCode },
    /// The worker hands back an attempt it never started: the run goes back to `pending`
    /// (or ends `cancelled`, if a cancel was asked) and the attempt does not count.
    Release { attempt: u32, worker_id: String },
    /// A person or a program asks the run to stop.
    Cancel,
}

/// Why a command was refused. A refused command changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("the run is already terminal")]
    Terminal,
    #[error("that attempt is no longer current")]
    StaleAttempt,
    #[error("the run is not pending")]
    NotPending,
    #[error("a cancel was requested for this run")]
    CancelRequested,
    #[error("the run's process has started")]
    Started,
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub next: RunState,
    /// Set when the command ended an attempt.
    pub decision: Option<Decision>,
}

impl RunState {
    /// A freshly accepted run.
    pub fn new(max_attempts: u32) -> RunState {
        RunState {
            status: RunStatus::Pending,
            attempt: 0,
            max_attempts: max_attempts.max(1),
            released: 0,
            worker_id: None,
            cancel_requested: false,
        }
    }

    /// Is `attempt` by `worker_id` the one in flight? Every worker call is fenced by this.
    pub fn is_current(&self, attempt: u32, worker_id: &str) -> bool {
        self.status.is_in_flight()
            && self.attempt == attempt
            && self.worker_id.as_deref() == Some(worker_id)
    }

    /// Whether another attempt may start: the attempts that counted (all but the released
    /// ones) are fewer than `max_attempts`.
    pub fn attempts_left(&self) -> bool {
        self.attempt.saturating_sub(self.released) < self.max_attempts
    }

    /// What ending the current attempt with `outcome` does: a cancel wins; a retryable failure
    /// with attempts left goes back to `pending`; anything else is final.
    pub fn decide(&self, outcome: AttemptOutcome) -> Decision {
        if self.cancel_requested && outcome != AttemptOutcome::Succeeded {
            return Decision::Terminal {
                status: RunStatus::Cancelled,
                error_code: Some(ErrorCode::Cancelled),
            };
        }
        let error_code = outcome.error_code();
        let retryable = error_code.is_some_and(ErrorCode::is_retryable);
        if retryable && self.attempts_left() {
            Decision::Retry {
                ended: outcome.status(),
                error_code,
            }
        } else {
            Decision::Terminal {
                status: outcome.status(),
                error_code,
            }
        }
    }

    /// Applies `command`, or says why it may not happen. Invariants enforced here: a terminal
    /// status never changes; a command naming an attempt that is not current changes nothing;
    /// the attempt number only ever rises, and the attempts that count (all but the released
    /// ones) never pass `max_attempts`.
    pub fn apply(&self, command: &Command) -> Result<Transition, TransitionError> {
        if self.status.is_terminal() {
            return Err(match command {
                Command::Cancel | Command::Claim { .. } => TransitionError::Terminal,
                _ => TransitionError::StaleAttempt,
            });
        }
        let mut next = self.clone();
        let decision = match command {
            Command::Claim { worker_id } => {
                if self.status != RunStatus::Pending {
                    return Err(TransitionError::NotPending);
                }
                if self.cancel_requested {
                    return Err(TransitionError::CancelRequested);
                }
                if !self.attempts_left() {
                    // Unreachable through `decide`, kept so no sequence can exceed the budget.
                    return Err(TransitionError::NotPending);
                }
                next.status = RunStatus::Claimed;
                next.attempt = self.attempt + 1;
                next.worker_id = Some(worker_id.clone());
                None
            }
            Command::Start { attempt, worker_id } => {
                if !self.is_current(*attempt, worker_id) {
                    return Err(TransitionError::StaleAttempt);
                }
                // A repeated start (the worker retried after a lost answer) is a no-op.
                next.status = RunStatus::Running;
                None
            }
            Command::Touch { attempt, worker_id } => {
                if !self.is_current(*attempt, worker_id) {
                    return Err(TransitionError::StaleAttempt);
                }
                None
            }
            Command::Finish {
                attempt,
                worker_id,
                outcome,
            } => {
                if !self.is_current(*attempt, worker_id) {
                    return Err(TransitionError::StaleAttempt);
                }
                Some(self.end_attempt(&mut next, *outcome))
            }
            Command::Reap {
                attempt,
                error_code,
            } => {
                if !self.status.is_in_flight() || self.attempt != *attempt {
                    return Err(TransitionError::StaleAttempt);
                }
                Some(self.end_attempt(
                    &mut next,
                    AttemptOutcome::TimedOut {
                        error_code: *error_code,
                    },
                ))
            }
            Command::Release { attempt, worker_id } => {
                if !self.is_current(*attempt, worker_id) {
                    return Err(TransitionError::StaleAttempt);
                }
                // Only a worker's word that the process never started lets the attempt go
                // uncounted; once started, the run may have done its work.
                if self.status != RunStatus::Claimed {
                    return Err(TransitionError::Started);
                }
                next.worker_id = None;
                if self.cancel_requested {
                    next.status = RunStatus::Cancelled;
                    Some(Decision::Terminal {
                        status: RunStatus::Cancelled,
                        error_code: Some(ErrorCode::Cancelled),
                    })
                } else {
                    next.status = RunStatus::Pending;
                    next.released = self.released + 1;
                    Some(Decision::Released)
                }
            }
            Command::Cancel => {
                next.cancel_requested = true;
                if self.status == RunStatus::Pending {
                    // Nobody holds it: cancelled at once, and it never starts.
                    next.status = RunStatus::Cancelled;
                    next.worker_id = None;
                    Some(Decision::Terminal {
                        status: RunStatus::Cancelled,
                        error_code: Some(ErrorCode::Cancelled),
                    })
                } else {
                    None
                }
            }
        };
        Ok(Transition { next, decision })
    }

    fn end_attempt(&self, next: &mut RunState, outcome: AttemptOutcome) -> Decision {
        let decision = self.decide(outcome);
        next.status = decision.run_status();
        next.worker_id = None;
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn claimed(max_attempts: u32) -> RunState {
        RunState::new(max_attempts)
            .apply(&Command::Claim {
                worker_id: "w1".into(),
            })
            .unwrap()
            .next
    }

    #[test]
    fn a_lost_worker_is_retried_while_attempts_remain() {
        let s = claimed(2);
        let t = s
            .apply(&Command::Reap {
                attempt: 1,
                error_code: ErrorCode::WorkerHeartbeatLost,
            })
            .unwrap();
        assert_eq!(t.next.status, RunStatus::Pending);
        assert_eq!(t.next.attempt, 1);
        let s2 = t
            .next
            .apply(&Command::Claim {
                worker_id: "w2".into(),
            })
            .unwrap()
            .next;
        assert_eq!(s2.attempt, 2);
        let t = s2
            .apply(&Command::Reap {
                attempt: 2,
                error_code: ErrorCode::WorkerHeartbeatLost,
            })
            .unwrap();
        assert_eq!(t.next.status, RunStatus::TimedOut);
    }

    #[test]
    fn a_zombie_attempt_is_fenced() {
        let s = claimed(3);
        let retried = s
            .apply(&Command::Reap {
                attempt: 1,
                error_code: ErrorCode::WorkerHeartbeatLost,
            })
            .unwrap()
            .next
            .apply(&Command::Claim {
                worker_id: "w2".into(),
            })
            .unwrap()
            .next;
        let zombie = Command::Finish {
            attempt: 1,
            worker_id: "w1".into(),
            outcome: AttemptOutcome::Succeeded,
        };
        assert_eq!(retried.apply(&zombie), Err(TransitionError::StaleAttempt));
    }

    #[test]
    fn exit_nonzero_is_final() {
        let s = claimed(3);
        let t = s
            .apply(&Command::Finish {
                attempt: 1,
                worker_id: "w1".into(),
                outcome: AttemptOutcome::Failed {
                    error_code: ErrorCode::ExitNonzero,
                },
            })
            .unwrap();
        assert_eq!(t.next.status, RunStatus::Failed);
    }

    #[test]
    fn cancel_of_pending_is_immediate_and_of_in_flight_is_requested() {
        let t = RunState::new(1).apply(&Command::Cancel).unwrap();
        assert_eq!(t.next.status, RunStatus::Cancelled);
        let t = claimed(1).apply(&Command::Cancel).unwrap();
        assert_eq!(t.next.status, RunStatus::Claimed);
        assert!(t.next.cancel_requested);
        // The worker vanished: the reaper ends it cancelled, never retried.
        let t = t
            .next
            .apply(&Command::Reap {
                attempt: 1,
                error_code: ErrorCode::WorkerHeartbeatLost,
            })
            .unwrap();
        assert_eq!(t.next.status, RunStatus::Cancelled);
    }

    #[test]
    fn a_released_attempt_does_not_count_and_a_started_one_cannot_be_released() {
        let s = claimed(1);
        let release = |s: &RunState, attempt| {
            s.apply(&Command::Release {
                attempt,
                worker_id: "w1".into(),
            })
        };
        let t = release(&s, 1).unwrap();
        assert_eq!(t.next.status, RunStatus::Pending);
        assert_eq!((t.next.attempt, t.next.released), (1, 1));
        assert_eq!(t.next.worker_id, None);
        assert_eq!(
            t.decision.map(Decision::attempt_result),
            Some((RunStatus::Claimed, Some(ErrorCode::Released)))
        );
        // With one attempt allowed, it may still be claimed: the release did not count.
        let again = t
            .next
            .apply(&Command::Claim {
                worker_id: "w1".into(),
            })
            .unwrap()
            .next;
        assert_eq!(again.attempt, 2);
        // A stale release (the old attempt) is fenced.
        assert_eq!(release(&again, 1), Err(TransitionError::StaleAttempt));
        let running = again
            .apply(&Command::Start {
                attempt: 2,
                worker_id: "w1".into(),
            })
            .unwrap()
            .next;
        assert_eq!(release(&running, 2), Err(TransitionError::Started));
        // Its one counted attempt lost: final, not retried.
        let t = running
            .apply(&Command::Reap {
                attempt: 2,
                error_code: ErrorCode::WorkerHeartbeatLost,
            })
            .unwrap();
        assert_eq!(t.next.status, RunStatus::TimedOut);
    }

    #[test]
    fn a_released_run_with_a_cancel_asked_ends_cancelled() {
        let s = claimed(3).apply(&Command::Cancel).unwrap().next;
        let t = s
            .apply(&Command::Release {
                attempt: 1,
                worker_id: "w1".into(),
            })
            .unwrap();
        assert_eq!(t.next.status, RunStatus::Cancelled);
        assert_eq!(t.next.released, 0);
    }

    fn arb_outcome() -> impl Strategy<Value = AttemptOutcome> {
        prop_oneof![
            Just(AttemptOutcome::Succeeded),
            Just(AttemptOutcome::Cancelled),
            Just(AttemptOutcome::Failed {
                error_code: ErrorCode::ExitNonzero
            }),
            Just(AttemptOutcome::TimedOut {
                error_code: ErrorCode::Timeout
            }),
            Just(AttemptOutcome::TimedOut {
                error_code: ErrorCode::WorkerHeartbeatLost
            }),
        ]
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let worker = prop_oneof![Just("w1".to_string()), Just("w2".to_string())];
        prop_oneof![
            worker
                .clone()
                .prop_map(|worker_id| Command::Claim { worker_id }),
            (0u32..5, worker.clone())
                .prop_map(|(attempt, worker_id)| Command::Start { attempt, worker_id }),
            (0u32..5, worker.clone())
                .prop_map(|(attempt, worker_id)| Command::Touch { attempt, worker_id }),
            (0u32..5, worker.clone(), arb_outcome()).prop_map(|(attempt, worker_id, outcome)| {
                Command::Finish {
                    attempt,
                    worker_id,
                    outcome,
                }
            }),
            (0u32..5).prop_map(|attempt| Command::Reap {
                attempt,
                error_code: ErrorCode::WorkerHeartbeatLost
            }),
            (0u32..5, worker.clone())
                .prop_map(|(attempt, worker_id)| Command::Release { attempt, worker_id }),
            Just(Command::Cancel),
        ]
    }

    fn names_attempt(command: &Command) -> Option<(u32, Option<&str>)> {
        match command {
            Command::Start { attempt, worker_id }
            | Command::Touch { attempt, worker_id }
            | Command::Finish {
                attempt, worker_id, ..
            }
            | Command::Release { attempt, worker_id } => Some((*attempt, Some(worker_id))),
            Command::Reap { attempt, .. } => Some((*attempt, None)),
            _ => None,
        }
    }

    proptest! {
        #[test]
        fn no_sequence_moves_a_terminal_run_or_obeys_an_old_attempt(
            max_attempts in 1u32..4,
            commands in proptest::collection::vec(arb_command(), 0..40),
        ) {
            let mut state = RunState::new(max_attempts);
            for command in &commands {
                let before = state.clone();
                match state.apply(command) {
                    Ok(t) => {
                        // Nothing moves a terminal run.
                        prop_assert!(!before.status.is_terminal());
                        // A call naming an attempt other than the current one changes nothing.
                        if let Some((attempt, worker)) = names_attempt(command) {
                            prop_assert_eq!(attempt, before.attempt);
                            prop_assert!(before.status.is_in_flight());
                            if let Some(worker) = worker {
                                prop_assert_eq!(before.worker_id.as_deref(), Some(worker));
                            }
                        }
                        // Attempts only rise, by one at a claim, and never past the budget.
                        prop_assert!(t.next.attempt >= before.attempt);
                        prop_assert!(t.next.attempt <= before.attempt + 1);
                        prop_assert!(t.next.attempt - t.next.released <= max_attempts);
                        // Only a release uncounts an attempt, and only one never started.
                        prop_assert!(t.next.released <= before.released + 1);
                        if t.next.released > before.released {
                            let released = matches!(command, Command::Release { .. });
                            prop_assert!(released);
                            prop_assert_eq!(before.status, RunStatus::Claimed);
                        }
                        // A requested cancel is never forgotten.
                        prop_assert!(!before.cancel_requested || t.next.cancel_requested);
                        // Only a worker holds an in-flight run.
                        prop_assert_eq!(t.next.status.is_in_flight(), t.next.worker_id.is_some());
                        state = t.next;
                    }
                    Err(_) => {
                        // A refused command changes nothing: the state stays as it was.
                        prop_assert_eq!(&state, &before);
                    }
                }
            }
        }

        #[test]
        fn a_cancelled_request_never_starts_again(
            commands in proptest::collection::vec(arb_command(), 0..40),
        ) {
            let mut state = RunState::new(3).apply(&Command::Cancel).unwrap().next;
            for command in &commands {
                if let Ok(t) = state.apply(command) {
                    state = t.next;
                }
                prop_assert_eq!(state.status, RunStatus::Cancelled);
            }
        }
    }
}
