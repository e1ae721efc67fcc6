//! What a store's write transaction leaves to do after it commits.

use std::collections::{BTreeMap, BTreeSet};

use crate::Signal;

/// Signals a transaction earns, sent only once it commits.
#[derive(Debug, Default, Clone)]
pub struct Outbox {
    last_seq: BTreeMap<String, i64>,
    pending_lanes: BTreeSet<String>,
    /// (lane, worker) pairs that have room again.
    room_freed: BTreeSet<(String, String)>,
    cancels: Vec<(String, u32, String)>,
    beats: BTreeSet<String>,
}

impl Outbox {
    /// A run became pending in `lane`.
    pub fn run_pending(&mut self, lane: &str) {
        self.pending_lanes.insert(lane.to_string());
    }

    /// No run is left pending after all: the lanes noted so far are dropped.
    pub fn forget_pending(&mut self) {
        self.pending_lanes.clear();
    }

    /// An attempt `worker_id` held in `lane` ended.
    pub fn room_freed(&mut self, lane: &str, worker_id: &str) {
        self.room_freed
            .insert((lane.to_string(), worker_id.to_string()));
    }

    /// A cancel was asked of the in-flight `attempt` that `worker_id` holds.
    pub fn cancel_requested(&mut self, run_id: &str, attempt: u32, worker_id: &str) {
        self.cancels
            .push((run_id.to_string(), attempt, worker_id.to_string()));
    }

    /// `worker_id`'s heartbeat was stamped.
    pub fn worker_beat(&mut self, worker_id: &str) {
        self.beats.insert(worker_id.to_string());
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
        let freed = self
            .room_freed
            .into_iter()
            .map(|(lane, worker_id)| Signal::RoomFreed { lane, worker_id });
        let cancels = self
            .cancels
            .into_iter()
            .map(|(run_id, attempt, worker_id)| Signal::CancelRequested {
                run_id,
                attempt,
                worker_id,
            });
        let beats = self
            .beats
            .into_iter()
            .map(|worker_id| Signal::WorkerBeat { worker_id });
        events
            .chain(lanes)
            .chain(freed)
            .chain(cancels)
            .chain(beats)
            .collect()
    }
}
