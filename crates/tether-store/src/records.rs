//! The records a store reads and writes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tether_domain::machine::{AttemptOutcome, RunState};
use tether_domain::{ErrorCode, Millis, Resources, RunSpec, RunStatus};

/// A run as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub id: String,
    /// Rises with every run accepted; orders lanes first in first out and pages lists.
    pub seq: i64,
    pub spec: RunSpec,
    pub status: RunStatus,
    /// 0 while the run was never claimed; then the current (or last) attempt.
    pub attempt: u32,
    /// Attempts handed back by their worker before they started: they did not count against
    /// `max_attempts`.
    pub released_attempts: u32,
    pub worker_id: Option<String>,
    pub created_at: Millis,
    pub claimed_at: Option<Millis>,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    pub last_heartbeat_at: Option<Millis>,
    pub last_output_at: Option<Millis>,
    pub cancel_requested_at: Option<Millis>,
    pub exit_code: Option<i32>,
    pub error_code: Option<ErrorCode>,
    pub error_message: Option<String>,
    pub stdout_bytes: i64,
    pub stderr_bytes: i64,
    /// 1-based place among the lane's pending runs, while pending.
    pub queue_position: Option<i64>,
    /// The highest event `seq` written for this run.
    pub last_event_seq: i64,
}

impl RunRecord {
    /// What the status machine needs to judge a command on this run.
    pub fn state(&self) -> RunState {
        RunState {
            status: self.status,
            attempt: self.attempt,
            max_attempts: self.spec.max_attempts,
            released: self.released_attempts,
            worker_id: self.worker_id.clone(),
            cancel_requested: self.cancel_requested_at.is_some(),
        }
    }
}

/// One execution of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    pub run_id: String,
    pub attempt: u32,
    pub worker_id: String,
    /// The name the worker registered with (`None` if its row is gone).
    pub worker_name: Option<String>,
    pub claimed_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    /// `None` while the attempt is in flight.
    pub status: Option<RunStatus>,
    pub error_code: Option<ErrorCode>,
    pub exit_code: Option<i32>,
    pub error_message: Option<String>,
    /// What this attempt's `endpoints` resolved to when it was claimed, by env var.
    pub endpoints: BTreeMap<String, tether_domain::Dispatch>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CreatedRun {
    pub run: RunRecord,
    /// `false` when an identical submission with the same idempotency key already existed.
    pub created: bool,
}

/// How a lane admits a submission (SPEC §4), decided by [`crate::Store::admit_run`] in the
/// same transaction that accepts the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionPolicy {
    /// The lane's `on_full = "reject"`: refuse what does not fit now instead of queueing it.
    pub reject_when_full: bool,
    /// The lane's `max_concurrency`: runs in flight plus runs admitted and waiting.
    pub max_concurrency: Option<u32>,
    /// A worker counts as live while its last heartbeat is younger than this.
    pub worker_fresh_ms: i64,
}

/// What admission decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    Accepted(Box<CreatedRun>),
    /// A `reject` lane has no room now: `503` with `Retry-After`. Nothing was written.
    LaneFull,
    /// Live workers serve the lane but none could ever hold the run: `422`. Nothing was
    /// written.
    NeverFits,
}

/// What admission decided for a batch: all of it, or the first entry refused and why (then
/// nothing of the batch was written).
#[derive(Debug, Clone, PartialEq)]
pub enum BatchAdmission {
    /// Every run, in the batch's order.
    Accepted(Vec<CreatedRun>),
    Refused {
        index: usize,
        refusal: BatchRefusal,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum BatchRefusal {
    LaneFull {
        lane: String,
    },
    NeverFits,
    /// The entry's idempotency key names a different submission (`run_id`).
    IdempotencyConflict {
        run_id: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunFilter {
    pub status: Option<RunStatus>,
    pub lane: Option<String>,
    /// 1..=500; the store clamps.
    pub limit: u32,
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Only runs whose id starts with this (`tether logs 019a2b`). Matched as a range on the
    /// id, so no character in it is a wildcard.
    pub id_prefix: Option<String>,
}

impl RunFilter {
    /// `id_prefix` as the range scan both stores run: `id >= start` and, when there is an
    /// upper bound, `id < end` (the first string after every one that starts with the prefix).
    pub fn id_range(&self) -> Option<(String, Option<String>)> {
        let prefix = self.id_prefix.as_deref().filter(|p| !p.is_empty())?;
        let mut chars: Vec<char> = prefix.chars().collect();
        let mut end = None;
        while let Some(last) = chars.pop() {
            if let Some(next) = char::from_u32(u32::from(last) + 1) {
                chars.push(next);
                end = Some(chars.into_iter().collect());
                break;
            }
        }
        Some((prefix.to_string(), end))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunPage {
    pub runs: Vec<RunRecord>,
    pub next_cursor: Option<String>,
}

/// `POST /v1/workers`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewWorker {
    pub name: String,
    /// SHA-256 (hex) of the secret the worker was handed at registration; every worker call
    /// presents the secret.
    pub secret_hash: Option<String>,
    pub capacity: Resources,
    /// Empty: every lane.
    pub lanes: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRecord {
    pub id: String,
    pub name: String,
    pub capacity: Resources,
    pub lanes: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub registered_at: Millis,
    pub last_heartbeat_at: Millis,
    pub draining: bool,
    /// The runs it holds now (claimed or running), with their attempts.
    pub runs: Vec<(String, u32)>,
    /// The resources those runs reserve.
    pub reserved: Resources,
}

/// What a lane holds right now.
#[derive(Debug, Clone, PartialEq)]
pub struct LaneLoad {
    pub lane: String,
    pub pending: i64,
    pub in_flight: i64,
    /// The part of `in_flight` whose process started (the rest are `claimed`).
    pub running: i64,
    /// When the lane's oldest pending run was accepted: how long its queue has been stuck.
    pub oldest_pending_at: Option<Millis>,
    /// What the in-flight runs reserve.
    pub reserved: Resources,
}

/// A lane's queue, as a store counts it: how many runs wait and since when.
#[derive(Debug, Clone, PartialEq)]
pub struct LaneQueue {
    pub lane: String,
    pub pending: i64,
    pub oldest_pending_at: Option<Millis>,
}

/// A lane's runs in flight, as a store counts them.
#[derive(Debug, Clone, PartialEq)]
pub struct LaneFlight {
    pub lane: String,
    pub in_flight: i64,
    pub running: i64,
    pub reserved: Resources,
}

impl LaneLoad {
    /// Every lane with runs waiting or in flight, in name order, from the two counts a store
    /// makes apart (each over an index of its own rows, so neither reads the other's). Two
    /// reads, not one snapshot: a run claimed between them may show in both or neither for a
    /// moment, which is fine for what reads these (views and gauges; admission counts inside
    /// its own transaction).
    pub fn from_parts(queues: Vec<LaneQueue>, flights: Vec<LaneFlight>) -> Vec<LaneLoad> {
        let mut loads: std::collections::BTreeMap<String, LaneLoad> =
            std::collections::BTreeMap::new();
        let empty = |lane: &str| LaneLoad {
            lane: lane.to_string(),
            pending: 0,
            in_flight: 0,
            running: 0,
            oldest_pending_at: None,
            reserved: Resources::NONE,
        };
        for q in queues {
            let load = loads
                .entry(q.lane.clone())
                .or_insert_with(|| empty(&q.lane));
            load.pending = q.pending;
            load.oldest_pending_at = q.oldest_pending_at;
        }
        for f in flights {
            let load = loads
                .entry(f.lane.clone())
                .or_insert_with(|| empty(&f.lane));
            load.in_flight = f.in_flight;
            load.running = f.running;
            load.reserved = f.reserved;
        }
        loads.into_values().collect()
    }
}

/// What a claim may hand out.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimLimits {
    /// At most this many runs in one answer; 0 sets no count limit (capacity still does).
    pub max_runs: u32,
    /// Lanes with a `max_concurrency`: no claim pushes a lane's in-flight count past it.
    pub lane_max_concurrency: BTreeMap<String, u32>,
    /// Hand nothing to a worker whose own last heartbeat is older than this (a frozen worker
    /// whose long-poll is still open must not take runs); 0 checks nothing. A claim is not a
    /// heartbeat: only the heartbeat call says the worker is alive.
    pub worker_fresh_ms: i64,
    /// Beyond its capacity, what the worker may also hold in runs waiting in it to start
    /// ([`tether_domain::admission::claim_reach`]). Nothing by default.
    pub reserve: Resources,
}

impl Default for ClaimLimits {
    fn default() -> Self {
        ClaimLimits {
            max_runs: 0,
            lane_max_concurrency: BTreeMap::new(),
            worker_fresh_ms: 0,
            reserve: Resources::NONE,
        }
    }
}

/// A worker's claim that waits for work, handed a submission's runs in the submission's own
/// transaction ([`crate::Store::admit_run_and_claim`]).
#[derive(Debug, Clone, Copy)]
pub struct HandOff<'a> {
    pub worker_id: &'a str,
    /// The limits the waiting claim asked with.
    pub limits: &'a ClaimLimits,
}

/// A run handed to a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedRun {
    pub run: RunRecord,
    pub attempt: u32,
}

/// One run's part of a worker heartbeat. The byte counts and output age are diagnostics,
/// never a gate: liveness is the heartbeat itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunBeat {
    pub run_id: String,
    pub attempt: u32,
    #[serde(default)]
    pub stdout_bytes: i64,
    #[serde(default)]
    pub stderr_bytes: i64,
    #[serde(default)]
    pub since_last_output_s: Option<f64>,
}

/// A run named in a heartbeat answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRef {
    pub run_id: String,
    pub attempt: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeartbeatAnswer {
    /// Current attempts whose cancel was requested: the worker stops them.
    pub cancel: Vec<RunRef>,
    /// Attempts the worker named that it no longer holds: it kills them at once.
    pub not_owned: Vec<RunRef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

impl OutputStream {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }

    pub fn parse(text: &str) -> Option<OutputStream> {
        match text {
            "stdout" => Some(OutputStream::Stdout),
            "stderr" => Some(OutputStream::Stderr),
            _ => None,
        }
    }
}

/// Output as the worker read it: whole lines where it could, raw bytes (not necessarily UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub stream: OutputStream,
    /// When the worker read it (informational; liveness uses the store's clock).
    pub ts: Millis,
    pub data: Vec<u8>,
    /// Where in its stream (of this attempt) the chunk begins, in bytes. With it, a repeated
    /// append is recognised and stored once, and a gap is refused; without it (older workers)
    /// the chunk is appended as is.
    pub offset: Option<i64>,
}

/// How many bytes of each stream an attempt has stored: the offset its next chunk must name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamOffsets {
    pub stdout: i64,
    pub stderr: i64,
}

impl StreamOffsets {
    pub fn of(&self, stream: OutputStream) -> i64 {
        match stream {
            OutputStream::Stdout => self.stdout,
            OutputStream::Stderr => self.stderr,
        }
    }

    pub fn add(&mut self, stream: OutputStream, n: i64) {
        match stream {
            OutputStream::Stdout => self.stdout += n,
            OutputStream::Stderr => self.stderr += n,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum AppendOutcome {
    Accepted {
        last_seq: i64,
        /// What the attempt has stored of each stream after this append.
        offsets: StreamOffsets,
    },
    /// The output limit was reached; the run has ended `failed` with `output_limit`.
    LimitReached { run: Box<RunRecord> },
}

/// How a worker says an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishReport {
    pub outcome: AttemptOutcome,
    pub exit_code: Option<i32>,
    pub error_message: Option<String>,
}

/// What [`crate::Store::report_attempts`] answers: one answer per start and per finish, in
/// order, and the claim's, if one was asked.
#[derive(Debug)]
pub struct AttemptReports {
    pub starts: Vec<crate::StoreResult<RunRecord>>,
    pub finishes: Vec<crate::StoreResult<RunRecord>>,
    /// The claim's own refusal (an unknown worker) leaves the starts and finishes standing.
    pub claimed: Option<crate::StoreResult<Vec<ClaimedRun>>>,
}

/// One start of a batch ([`crate::Store::start_attempts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptStart {
    pub run_id: String,
    pub attempt: u32,
    /// How long before the call the worker saw the process start, by its own monotonic
    /// clock: `started_at` is placed that long before the store's time at the call
    /// (`tether_domain::time::reported_at`).
    pub ago_ms: u64,
}

/// One finish of a batch ([`crate::Store::finish_attempts`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptFinish {
    pub run_id: String,
    pub attempt: u32,
    pub report: FinishReport,
    /// As [`AttemptStart::ago_ms`], for `finished_at`.
    pub ago_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Every status transition.
    Status,
    /// A new attempt began.
    Attempt,
    /// Output.
    Log,
    /// The run is terminal; nothing follows.
    End,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Status => "status",
            EventKind::Attempt => "attempt",
            EventKind::Log => "log",
            EventKind::End => "end",
        }
    }

    pub fn parse(text: &str) -> Option<EventKind> {
        Some(match text {
            "status" => EventKind::Status,
            "attempt" => EventKind::Attempt,
            "log" => EventKind::Log,
            "end" => EventKind::End,
            _ => return None,
        })
    }
}

/// A persisted event. `seq` rises by one per run.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub run_id: String,
    pub seq: i64,
    pub kind: EventKind,
    pub ts: Millis,
    pub attempt: u32,
    /// What the event says, typed by its kind (`body.kind() == kind`). Stored, and sent, as
    /// [`EventBody::to_json`](crate::EventBody::to_json).
    pub body: crate::EventBody,
    /// For `log`: the raw output bytes.
    pub data: Option<Vec<u8>>,
}

/// A change other tasks may want to wake for. Delivered after the change commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// A run became pending in this lane (new, or back for a retry).
    RunPending { lane: String },
    /// A run has new events up to `seq`.
    RunEvents { run_id: String, seq: i64 },
    /// An attempt held by `worker_id` in `lane` ended (finished, reaped, cancelled, handed
    /// back), so that worker, and the lane's `max_concurrency`, have room again: waiting claims
    /// re-try at once instead of on a timer.
    RoomFreed { lane: String, worker_id: String },
    /// A cancel was asked of an in-flight attempt: its worker's control poll answers at once
    /// instead of at the next heartbeat.
    CancelRequested {
        run_id: String,
        attempt: u32,
        worker_id: String,
    },
    /// `worker_id`'s heartbeat landed. A worker whose heartbeat had gone stale is handed
    /// nothing, so a claim it held open then may take runs again now: it re-tries at once
    /// instead of on a timer.
    WorkerBeat { worker_id: String },
}

/// How the reaper judges in-flight runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReapPolicy {
    /// After a run's `timeout` passes, how long its worker gets to end it itself before the
    /// reaper does.
    pub timeout_grace_ms: i64,
    /// A run whose cancel was requested is ended `cancelled` once its heartbeat is this old,
    /// even when it has no heartbeat timeout of its own.
    pub cancel_stale_after_ms: i64,
    /// At most this many runs ended in one sweep.
    pub batch: u32,
}

impl Default for ReapPolicy {
    fn default() -> Self {
        ReapPolicy {
            timeout_grace_ms: 5_000,
            cancel_stale_after_ms: 60_000,
            batch: 500,
        }
    }
}

/// One run ended by a sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReapedRun {
    pub run_id: String,
    pub attempt: u32,
    pub error_code: ErrorCode,
    /// `pending` when retried, else its terminal status.
    pub status_after: RunStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReapReport {
    pub reaped: Vec<ReapedRun>,
    /// `false` when another server holds the sweep (PostgreSQL only).
    pub swept: bool,
}
