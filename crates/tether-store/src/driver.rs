//! The thin interface each store implements: one method per query, named by intent (as River's
//! `riverdriver`). No method decides anything: which command applies, whether a write lost a
//! race, what a transaction signals — all of that lives once, in [`crate::engine`], over these.
//!
//! A store implements [`Driver`] (transactions, and the read-only queries served outside one)
//! and [`DriverTx`] (what runs inside a write transaction). Every type that implements
//! `Driver` and `EndpointStore` is a [`crate::Store`], through the engine.

use async_trait::async_trait;
use tether_domain::{Millis, Resources, RunSpec, RunStatus};
use tokio::sync::broadcast;

use crate::{
    AttemptRecord, EventBody, EventRecord, LaneFlight, LaneQueue, NewWorker, Outbox, ReapPolicy,
    RunFilter, RunRecord, Signal, StoreResult, StreamOffsets, WorkerRecord,
};

/// How a run is read inside a write transaction. SQLite's single writer makes every read
/// exclusive, so it treats all three alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// A plain read: the row is already locked by this transaction, or only read.
    None,
    /// Wait for other writers, then read the latest committed version (`FOR UPDATE`).
    Wait,
    /// A row another transaction is writing reads as absent (`FOR UPDATE SKIP LOCKED`).
    Skip,
}

/// A run as loaded inside a write transaction: the record, plus what the engine needs to write
/// it back conditionally and to judge it.
#[derive(Debug, Clone)]
pub struct LoadedRun {
    pub run: RunRecord,
    /// The status exactly as stored (maybe the legacy `queued`): the guard of a write.
    pub raw_status: String,
    /// Output stored so far, both streams, against the run's limit.
    pub output_bytes: i64,
    /// The worker confirmed the current attempt (a start or a heartbeat).
    pub confirmed: bool,
    pub stale_at: Option<Millis>,
    pub timeout_at: Option<Millis>,
}

/// A change to a run's row, written only if the run still has the id, status and attempt it
/// was loaded with (the guard). Each variant is one `UPDATE` shape, for any number of runs;
/// deadlines (`stale_at`, `timeout_at`) are derived from the row's own timeouts and the
/// transaction's `now`.
#[derive(Debug, Clone, PartialEq)]
pub enum RunChange {
    /// Handed to a worker: `status`, the new `attempt`, `claimed_at = last_heartbeat_at = now`,
    /// unconfirmed, fresh deadlines.
    Claim {
        status: RunStatus,
        attempt: u32,
        worker_id: String,
    },
    /// The process started: `status`, `started_at = at` (when the worker says it started,
    /// `time::reported_at`), `last_heartbeat_at = now`, confirmed; the timeout runs from now.
    Start { status: RunStatus, at: Millis },
    /// A heartbeat for the run, also guarded by the worker holding it: stamps, confirms, and
    /// keeps the worker's own output counters.
    Heartbeat {
        worker_id: String,
        stdout_bytes: i64,
        stderr_bytes: i64,
    },
    /// Output stored: the counters grow, `last_output_at = now`.
    Output { stdout: i64, stderr: i64 },
    /// Back to `pending` for a retry: what the next claim stamps afresh is cleared.
    BackToPending,
    /// Back to `pending` as [`RunChange::BackToPending`], handed back unstarted: one more
    /// released attempt.
    Release,
    /// The process started and the run ended for good, both reported in one call: `started_at`
    /// (and `confirmed`) as a start stamps them, then the end as [`RunChange::Finish`] writes
    /// it, in one write instead of two.
    Ran {
        status: RunStatus,
        exit_code: Option<i32>,
        error_code: Option<tether_domain::ErrorCode>,
        error_message: Option<String>,
        started_at: Millis,
        at: Millis,
    },
    /// The run ends for good, `finished_at = at`.
    Finish {
        status: RunStatus,
        exit_code: Option<i32>,
        error_code: Option<tether_domain::ErrorCode>,
        error_message: Option<String>,
        at: Millis,
    },
    /// A cancel was asked; the first request's stamp is kept.
    CancelAsked,
}

/// The shapes of [`RunChange`], one `UPDATE` statement each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    Claim,
    Start,
    Heartbeat,
    Output,
    BackToPending,
    Release,
    Finish,
    Ran,
    CancelAsked,
}

impl RunChange {
    /// The `started_at` and `finished_at` the change writes, where it writes one.
    pub fn stamps(&self) -> (Option<Millis>, Option<Millis>) {
        match self {
            RunChange::Start { at, .. } => (Some(*at), None),
            RunChange::Finish { at, .. } => (None, Some(*at)),
            RunChange::Ran { started_at, at, .. } => (Some(*started_at), Some(*at)),
            _ => (None, None),
        }
    }

    pub fn kind(&self) -> ChangeKind {
        match self {
            RunChange::Claim { .. } => ChangeKind::Claim,
            RunChange::Start { .. } => ChangeKind::Start,
            RunChange::Heartbeat { .. } => ChangeKind::Heartbeat,
            RunChange::Output { .. } => ChangeKind::Output,
            RunChange::BackToPending => ChangeKind::BackToPending,
            RunChange::Release => ChangeKind::Release,
            RunChange::Finish { .. } => ChangeKind::Finish,
            RunChange::Ran { .. } => ChangeKind::Ran,
            RunChange::CancelAsked => ChangeKind::CancelAsked,
        }
    }
}

/// One guarded write: `change` lands on the run only if it still has `status` (exactly as
/// stored, see [`LoadedRun::raw_status`]) and `attempt`. The same statement sets the run's
/// `last_event_seq`, the events the transaction numbered for it in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct RunWrite {
    pub run_id: String,
    pub status: String,
    pub attempt: u32,
    pub change: RunChange,
    pub last_event_seq: i64,
}

/// `writes` split by the shape of their change, each group in the order given: what one
/// `UPDATE` statement writes.
pub fn by_kind(writes: &[RunWrite]) -> Vec<(ChangeKind, Vec<&RunWrite>)> {
    let mut groups: Vec<(ChangeKind, Vec<&RunWrite>)> = Vec::new();
    for write in writes {
        let kind = write.change.kind();
        match groups.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, group)) => group.push(write),
            None => groups.push((kind, vec![write])),
        }
    }
    groups
}

/// An event to append, its `seq` numbered by the engine under the run's lock.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub run_id: String,
    pub seq: i64,
    pub attempt: u32,
    pub body: EventBody,
    pub data: Option<Vec<u8>>,
}

/// A new attempt's row, `claimed_at = now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAttempt {
    pub run_id: String,
    pub attempt: u32,
    pub worker_id: String,
}

/// How an attempt ended, for its row.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptEnd {
    pub status: RunStatus,
    pub error_code: Option<tether_domain::ErrorCode>,
    pub exit_code: Option<i32>,
    pub error_message: Option<String>,
}

/// An attempt's end, written if its end is not recorded yet: `finished_at = at`.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptClose {
    pub run_id: String,
    pub attempt: u32,
    pub end: AttemptEnd,
    pub at: Millis,
    /// Its start, written with its end (`started_at`): both came in one call.
    pub started: Option<Millis>,
}

/// What a transaction has queued for the store, sent together: guarded run writes, the
/// attempt rows that go with them, runs' event seqs and events. Nothing in one flush names the
/// same run twice (the engine sends an earlier write first).
#[derive(Debug, Clone, Copy, Default)]
pub struct Flush<'a> {
    pub writes: &'a [RunWrite],
    /// Attempt rows to insert, `claimed_at = now`.
    pub new_attempts: &'a [NewAttempt],
    /// Attempts, `(run_id, attempt, started_at)`, to stamp started.
    pub started_attempts: &'a [(String, u32, Millis)],
    pub closed_attempts: &'a [AttemptClose],
    /// Runs that took events without a write of their own: their `last_event_seq`.
    pub event_seqs: &'a [(String, i64)],
    /// Events to append, each with the `seq` it names, `ts = now`.
    pub events: &'a [NewEvent],
    /// The transaction's signals, on its last flush before commit: a store that tells other
    /// servers inside the transaction may send them with these writes.
    pub signals: &'a [Signal],
}

impl Flush<'_> {
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
            && self.new_attempts.is_empty()
            && self.started_attempts.is_empty()
            && self.closed_attempts.is_empty()
            && self.event_seqs.is_empty()
            && self.events.is_empty()
    }
}

/// A pending run as a claim scans it.
#[derive(Debug, Clone)]
pub struct PendingRun {
    pub seq: i64,
    pub id: String,
    pub lane: String,
    pub needs: Resources,
    /// The whole run, where the page read it so (locked, as the page locks): a claim then
    /// judges it without loading it again.
    pub loaded: Option<LoadedRun>,
}

/// The in-flight runs a worker holds, `(id, attempt)` in `seq` order, and what they reserve.
pub type HeldRuns = (Vec<(String, u32)>, Resources);

/// A run accepted under an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedRun {
    pub run_id: String,
    pub request_fingerprint: String,
}

/// What a lane's admitted, not yet claimed runs are owed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Waiting {
    pub count: i64,
    pub needs: Resources,
}

/// The earliest of each reaper deadline over in-flight runs, as stored (no grace added).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EarliestDeadlines {
    pub stale_at: Option<Millis>,
    pub timeout_at: Option<Millis>,
    /// The oldest `coalesce(last_heartbeat_at, claimed_at)` of a run whose cancel was asked.
    pub cancel_base: Option<Millis>,
}

/// A store's transactions and its read-only queries.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    type Tx: DriverTx;

    /// A write transaction with the store's clock read once for all of it. Dropping it without
    /// [`Driver::commit`] (an error, a refusal, a cancelled future) rolls it back.
    async fn begin(&self) -> StoreResult<Self::Tx>;

    /// Commits, then sends what the transaction earned (and, where servers share the store,
    /// tells them inside the transaction, so they hear of it only if it commits).
    async fn commit(&self, tx: Self::Tx, out: Outbox) -> StoreResult<()>;

    /// The store's clock.
    async fn clock(&self) -> StoreResult<Millis>;
    /// Is the database answering?
    async fn ping_database(&self) -> StoreResult<()>;
    /// Signals, delivered after commit.
    fn signals(&self) -> broadcast::Receiver<Signal>;

    async fn read_run(&self, run_id: &str) -> StoreResult<Option<RunRecord>>;
    /// Up to `limit` runs newest first, filtered, older than `before_seq` if given.
    async fn read_runs(
        &self,
        filter: &RunFilter,
        before_seq: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<RunRecord>>;
    async fn read_attempts(&self, run_id: &str) -> StoreResult<Vec<AttemptRecord>>;
    /// `Some(hash)` for a live worker, `None` for an unknown or deregistered one.
    async fn read_secret_hash(&self, worker_id: &str) -> StoreResult<Option<Option<String>>>;
    /// Live (not deregistered) workers, oldest first; `runs` and `reserved` left empty.
    async fn read_live_workers(&self) -> StoreResult<Vec<WorkerRecord>>;
    /// The in-flight runs a worker holds, in `seq` order, and what they reserve.
    async fn read_held_by(&self, worker_id: &str) -> StoreResult<(Vec<(String, u32)>, Resources)>;
    /// Each lane's queue: its pending runs and the oldest one's acceptance, counted from the
    /// queued runs alone (an index of its own, never a finished run).
    async fn read_lane_queues(&self) -> StoreResult<Vec<LaneQueue>>;
    /// Each lane's runs in flight and what they reserve.
    async fn read_lane_flights(&self) -> StoreResult<Vec<LaneFlight>>;
    /// A run's events after `after_seq` ascending, or before `before_seq` descending.
    async fn read_events(
        &self,
        run_id: &str,
        seq: EventRange,
        limit: i64,
    ) -> StoreResult<Vec<EventRecord>>;
    async fn read_earliest_deadlines(&self) -> StoreResult<EarliestDeadlines>;

    /// Deletes up to `batch` runs of `lane` finished before `now - retention_ms` by the store's
    /// clock, oldest first, with their events and attempts, in one short transaction of its
    /// own. Returns how many runs.
    async fn prune_finished(&self, lane: &str, retention_ms: i64, batch: i64) -> StoreResult<u64>;
}

/// Which events of a run to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventRange {
    After(i64),
    Before(i64),
}

/// The primitives inside one write transaction.
#[async_trait]
pub trait DriverTx: Send {
    /// The store's clock, read once when the transaction began.
    fn now(&self) -> Millis;

    // ---- runs ---------------------------------------------------------------------------
    // Writes inside a transaction are set-based: one statement for any number of runs, so a
    // batch of worker calls costs a handful of statements, not a handful per run.

    /// These runs as this transaction sees them, without their queue positions (counting what
    /// is ahead of a run scans its lane's queue; [`DriverTx::queue_position`] is asked where
    /// needed), in `seq` order: the order every multi-run writer locks in. A run that does
    /// not exist (or, under [`Lock::Skip`], that another transaction is writing) is left out.
    async fn load_runs(&mut self, run_ids: &[&str], lock: Lock) -> StoreResult<Vec<LoadedRun>>;
    /// A pending run's place in its lane: 1 + the pending runs of `lane` before `seq`.
    async fn queue_position(&mut self, lane: &str, seq: i64) -> StoreResult<i64>;
    /// Sends a [`Flush`], the only way a transaction writes runs, attempts and events:
    /// each run write lands only where its guard still holds (the run's status and attempt as
    /// judged), one statement per [`ChangeKind`] for any number of runs; answers the runs
    /// written, as they are now stored, in no particular order. A store sends it in as few
    /// round trips as it can (one, on both stores).
    async fn flush(&mut self, batch: Flush<'_>) -> StoreResult<Vec<LoadedRun>>;
    /// The run accepted earlier under this key, if any.
    async fn find_by_key(&mut self, key: &str) -> StoreResult<Option<KeyedRun>>;
    /// Inserts a run `pending` (attempt 0) and answers it as stored; `None` when its
    /// idempotency key was taken by a concurrent submission that committed first. With
    /// `place`, a store may answer its queue position too (counted by the same statement, as
    /// [`DriverTx::queue_position`] would count it); left `None`, the engine asks for it.
    async fn insert_run(
        &mut self,
        id: &str,
        spec: &RunSpec,
        status: RunStatus,
        place: bool,
    ) -> StoreResult<Option<LoadedRun>>;

    // ---- attempts -----------------------------------------------------------------------
    /// What the attempt has stored of each stream (zero for an attempt with no row).
    async fn attempt_offsets(&mut self, run_id: &str, attempt: u32) -> StoreResult<StreamOffsets>;
    async fn set_attempt_offsets(
        &mut self,
        run_id: &str,
        attempt: u32,
        offsets: StreamOffsets,
    ) -> StoreResult<()>;

    // ---- workers ------------------------------------------------------------------------
    async fn insert_worker(&mut self, id: &str, worker: &NewWorker) -> StoreResult<()>;
    /// A worker row and when it deregistered, locked so that one worker's claims and
    /// heartbeats go one at a time.
    async fn lock_worker(
        &mut self,
        worker_id: &str,
    ) -> StoreResult<Option<(WorkerRecord, Option<Millis>)>>;
    /// Stamps a live worker's heartbeat; `false` if it is unknown or deregistered.
    async fn stamp_worker(&mut self, worker_id: &str) -> StoreResult<bool>;
    async fn mark_worker_gone(&mut self, worker_id: &str) -> StoreResult<()>;
    async fn mark_worker_draining(&mut self, worker_id: &str) -> StoreResult<()>;
    /// The in-flight runs a worker holds, in `seq` order, and what they reserve.
    async fn held_by(&mut self, worker_id: &str) -> StoreResult<(Vec<(String, u32)>, Resources)>;
    /// Live workers, not draining, heartbeat at or after `fresh_since`, serving `lane`: their
    /// ids and capacities.
    async fn workers_serving(
        &mut self,
        lane: &str,
        fresh_since: Millis,
    ) -> StoreResult<Vec<(String, Resources)>>;
    /// What the in-flight runs of these workers hold between them.
    async fn reserved_by(&mut self, worker_ids: &[String]) -> StoreResult<Resources>;

    // ---- lanes --------------------------------------------------------------------------
    /// Serializes, until the transaction ends, everything that decides a lane's room
    /// (admissions to it and claims under its ceiling). A no-op where writes are serial.
    async fn lock_lane(&mut self, lane: &str) -> StoreResult<()>;
    async fn lane_in_flight(&mut self, lane: &str) -> StoreResult<i64>;
    /// Pending runs of the lane, cancels asked excluded.
    async fn lane_waiting(&mut self, lane: &str) -> StoreResult<Waiting>;
    /// Up to `limit` pending runs (cancels asked excluded) after `after_seq`, oldest first,
    /// of `lanes` (empty: every lane). Where claims run concurrently, rows another claim is
    /// taking are skipped and those returned are locked. A store may answer each run whole
    /// ([`PendingRun::loaded`]), saving the claim a load.
    async fn pending_page(
        &mut self,
        after_seq: i64,
        lanes: &[String],
        limit: i64,
    ) -> StoreResult<Vec<PendingRun>>;

    /// What a claim reads first, together: the worker's held runs ([`DriverTx::held_by`])
    /// and a page of pending runs ([`DriverTx::pending_page`]). By default two statements; a
    /// store may send one.
    async fn held_and_pending_page(
        &mut self,
        worker_id: &str,
        after_seq: i64,
        lanes: &[String],
        limit: i64,
    ) -> StoreResult<(HeldRuns, Vec<PendingRun>)> {
        let held = self.held_by(worker_id).await?;
        let page = self.pending_page(after_seq, lanes, limit).await?;
        Ok((held, page))
    }

    // ---- the reaper ---------------------------------------------------------------------
    /// Takes the one-sweep-at-a-time lock; `false` if another server holds it.
    async fn try_lock_sweep(&mut self) -> StoreResult<bool>;
    /// In-flight runs past a deadline by `now` under `policy`, in `seq` order, at most a batch.
    async fn reap_candidates(&mut self, policy: &ReapPolicy) -> StoreResult<Vec<String>>;
    /// Moves every in-flight `stale_at` to at least a heartbeat timeout from now; how many.
    async fn extend_stale_deadlines(&mut self) -> StoreResult<u64>;
}
