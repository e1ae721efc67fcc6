//! What a store's write transaction leaves to do after it commits, and the body of the events
//! every store writes the same way.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;
use tether_domain::{ErrorCode, RunStatus};

use crate::Signal;

/// Signals a transaction earns, sent only once it commits.
#[derive(Debug, Default)]
pub struct Outbox {
    last_seq: BTreeMap<String, i64>,
    pending_lanes: BTreeSet<String>,
}

impl Outbox {
    /// A run became pending in `lane`.
    pub fn run_pending(&mut self, lane: &str) {
        self.pending_lanes.insert(lane.to_string());
    }

    /// A run's events now reach `seq`.
    pub fn events_written(&mut self, run_id: &str, seq: i64) {
        self.last_seq.insert(run_id.to_string(), seq);
    }

    pub fn into_signals(self) -> Vec<Signal> {
        let events = self
            .last_seq
            .into_iter()
            .map(|(run_id, seq)| Signal::RunEvents { run_id, seq });
        let lanes = self
            .pending_lanes
            .into_iter()
            .map(|lane| Signal::RunPending { lane });
        events.chain(lanes).collect()
    }
}

/// The body of `status` and `end` events.
pub fn status_body(
    status: RunStatus,
    attempt: u32,
    error_code: Option<ErrorCode>,
    exit_code: Option<i32>,
) -> serde_json::Value {
    json!({
        "status": status.as_str(),
        "attempt": attempt,
        "error_code": error_code.map(|c| c.as_str()),
        "exit_code": exit_code,
    })
}
