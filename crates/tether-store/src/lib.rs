//! The storage interface the server calls ([`Store`]), the engine that implements it once for
//! every store, and the thin per-store interface it runs over ([`Driver`], [`DriverTx`]: one
//! method per query, as River's `riverdriver`). One shared suite holds every store to it:
//! `tether-store-conformance`.
//!
//! A store owns the clock: every stamp it writes and every freshness comparison it makes uses
//! its own `now` (SQL `now()` on PostgreSQL), never a worker's or a server's. Every status
//! change is one conditional write on the run's current status and attempt, decided by the
//! domain's status machine ([`tether_domain::machine::RunState::apply`]).

pub mod driver;
mod endpoints;
mod engine;
mod error;
mod events;
mod judge;
mod outbox;
mod output;
mod records;
mod stored_dispatch;
mod stored_spec;

pub use driver::{Driver, DriverTx};
pub use endpoints::*;
pub use error::{BoxError, StoreError};
pub use events::{EventBody, StatusBody};
pub use judge::{batch_entry, parse_cursor, reap_reason, ReapDeadlines};
pub use outbox::Outbox;
pub use output::new_output;
pub use records::*;
pub use stored_dispatch::{decode_dispatches, encode_dispatches};
pub use stored_spec::{decode_spec, encode_spec, SPEC_VERSION};

use async_trait::async_trait;
use tether_domain::{Millis, RunSpec};
use tokio::sync::broadcast;

pub type StoreResult<T> = Result<T, StoreError>;

/// A Tether store. Implementations: `tether-store-sqlite` (embedded) and
/// `tether-store-postgres` (many servers on one database).
#[async_trait]
pub trait Store: EndpointStore + Send + Sync + 'static {
    /// The store's clock, in milliseconds since the epoch.
    async fn now(&self) -> StoreResult<Millis>;

    /// Is the store reachable right now? (`/readyz`)
    async fn ping(&self) -> StoreResult<()>;

    // ---- runs -------------------------------------------------------------------------

    /// Accepts a run as `pending` (attempt 0) and writes its first `status` event. With an
    /// idempotency key already used by an identical submission, returns that run with
    /// `created: false`; used by a different one, fails with `IdempotencyConflict`.
    async fn create_run(&self, spec: &RunSpec) -> StoreResult<CreatedRun>;

    /// [`Store::create_run`] with the lane's admission decided in the same transaction, so
    /// concurrent submissions cannot all see room that only one of them gets. A run is
    /// `NeverFits` when live workers serve its lane and none advertises enough for it (with no
    /// live worker it may still queue). In a `reject` lane it is `LaneFull` unless the live
    /// workers serving the lane, less what their in-flight runs and the lane's waiting runs
    /// reserve, have room for it now and the lane is under its `max_concurrency`. A resubmission
    /// under an accepted idempotency key is accepted (`created: false`) whatever the room.
    async fn admit_run(&self, spec: &RunSpec, policy: &AdmissionPolicy) -> StoreResult<Admission>;

    /// Many submissions in one transaction, each decided as [`Store::admit_run`] would, in
    /// order, seeing the runs admitted before it in the same batch (so a `reject` lane's room
    /// is counted once for all of them, and a key repeated in the batch answers its first
    /// run). All are written, or, at the first refusal, none.
    async fn admit_runs(&self, batch: &[(RunSpec, AdmissionPolicy)])
        -> StoreResult<BatchAdmission>;

    /// [`Store::admit_run`], and, when it creates the run, a claim for `hand_off`'s worker in
    /// the same transaction, as [`Store::claim_runs`] would make it (the new run or older
    /// ones, within the worker's room, lanes and the lanes' ceilings). For a claim waiting on
    /// this server: a submission to an idle system reaches its worker in one transaction
    /// instead of two. The answer shows a run taken as claimed. A worker that is gone claims
    /// nothing, and the submission stands.
    async fn admit_run_and_claim(
        &self,
        spec: &RunSpec,
        policy: &AdmissionPolicy,
        hand_off: &HandOff<'_>,
    ) -> StoreResult<(Admission, Vec<ClaimedRun>)>;

    /// [`Store::admit_runs`], with a claim for `hand_off`'s worker as
    /// [`Store::admit_run_and_claim`] makes it.
    async fn admit_runs_and_claim(
        &self,
        batch: &[(RunSpec, AdmissionPolicy)],
        hand_off: &HandOff<'_>,
    ) -> StoreResult<(BatchAdmission, Vec<ClaimedRun>)>;

    /// One run, with `queue_position` filled in while it is pending.
    async fn get_run(&self, run_id: &str) -> StoreResult<Option<RunRecord>>;

    /// Runs newest first, filtered, paged by an opaque cursor.
    async fn list_runs(&self, filter: &RunFilter) -> StoreResult<RunPage>;

    /// The history of a run's attempts, oldest first.
    async fn list_attempts(&self, run_id: &str) -> StoreResult<Vec<AttemptRecord>>;

    /// Asks a run to stop. A pending run is cancelled at once (it never starts); an in-flight
    /// one is flagged and its worker learns of it at its next heartbeat. Fails with `NotFound`
    /// or `Terminal`.
    async fn request_cancel(&self, run_id: &str) -> StoreResult<RunRecord>;

    // ---- workers ----------------------------------------------------------------------

    async fn register_worker(&self, worker: &NewWorker) -> StoreResult<WorkerRecord>;

    /// The secret hash a live worker registered with (`None` if it registered without one).
    /// `UnknownWorker` if there is no such worker or it has deregistered.
    async fn worker_secret_hash(&self, worker_id: &str) -> StoreResult<Option<String>>;

    /// A worker leaving on purpose: marks it gone and hands its in-flight runs back at once
    /// (each current attempt ends as if its heartbeat was lost: retried if attempts remain).
    /// Returns the runs it held.
    async fn deregister_worker(&self, worker_id: &str) -> StoreResult<Vec<String>>;

    /// A worker handing back attempts it holds but never started (it is stopping, or they
    /// waited too long in its local queue). Each that is current, held by this worker and
    /// still `claimed` goes back to `pending` and its attempt does not count against
    /// `max_attempts` (its record ends `claimed` with `released`); one whose cancel was asked
    /// ends `cancelled`. Any other is left alone. Answers those taken back, as they are now
    /// (their `attempt` is the one released). `UnknownWorker` for an unknown or deregistered
    /// worker.
    async fn release_runs(&self, worker_id: &str, runs: &[RunRef]) -> StoreResult<Vec<RunRecord>>;

    /// A worker finishing what it holds before it leaves: it is shown `draining` and handed
    /// no new runs. `UnknownWorker` for an unknown or deregistered worker.
    async fn set_worker_draining(&self, worker_id: &str) -> StoreResult<()>;

    /// Registered workers that have not deregistered, with the runs each holds.
    async fn list_workers(&self) -> StoreResult<Vec<WorkerRecord>>;

    /// Per lane with any unfinished run: how many are pending and in flight, and what the
    /// in-flight ones reserve. Computed from the runs themselves, never from a counter, so
    /// after a restart or a crash the totals are recomputed, not trusted.
    async fn lane_loads(&self) -> StoreResult<Vec<LaneLoad>>;

    /// Hands the worker up to `limits.max_runs` pending runs from its lanes, first in first out
    /// within a lane, that fit in its advertised capacity less what it already holds, and do
    /// not push a lane past its `max_concurrency`. Each claim is a conditional write on
    /// `status = 'pending'`, so a run goes to exactly one worker. A claim stamps `claimed_at`
    /// and `last_heartbeat_at` at once and writes `status` and `attempt` events.
    async fn claim_runs(
        &self,
        worker_id: &str,
        limits: &ClaimLimits,
    ) -> StoreResult<Vec<ClaimedRun>>;

    /// One heartbeat for the worker and all its runs. Stamps the worker, and each run whose
    /// attempt is current and held by this worker. The answer lists runs to cancel and runs the
    /// worker no longer holds. Fails with `UnknownWorker` for a deregistered or unknown worker.
    async fn heartbeat(&self, worker_id: &str, beats: &[RunBeat]) -> StoreResult<HeartbeatAnswer>;

    // ---- attempts: worker calls, each fenced by the attempt ----------------------------

    /// The process started: `claimed → running`. `StaleAttempt` if the attempt is not current.
    async fn start_attempt(
        &self,
        run_id: &str,
        attempt: u32,
        worker_id: &str,
    ) -> StoreResult<RunRecord>;

    /// Appends output as `log` events, in order. Past the run's output limit, stores what fits,
    /// notes the cut in the log and ends the run `failed`/`output_limit` in the same
    /// transaction, answering `LimitReached`. `StaleAttempt` if the attempt is not current.
    ///
    /// Exactly once: the attempt keeps how many bytes of each stream it stored, and chunks
    /// that name their offset are judged against them by [`new_output`]: what was stored
    /// already is acknowledged and not stored again; a chunk past the stored end is refused
    /// (`OutputGap`, nothing stored) with the offsets expected.
    async fn append_output(
        &self,
        run_id: &str,
        attempt: u32,
        worker_id: &str,
        chunks: &[OutputChunk],
    ) -> StoreResult<AppendOutcome>;

    /// Ends the attempt as the worker reports, retrying or finishing the run as the status
    /// machine decides, with `status` (and, when terminal, `end`) events in the same
    /// transaction. `StaleAttempt` if the attempt is not current.
    async fn finish_attempt(
        &self,
        run_id: &str,
        attempt: u32,
        worker_id: &str,
        report: &FinishReport,
    ) -> StoreResult<RunRecord>;

    /// One finish per item, in one transaction where the store can, each judged exactly as
    /// `finish_attempt` would be; one answer per item, in order.
    async fn finish_attempts(
        &self,
        worker_id: &str,
        items: &[AttemptFinish],
    ) -> StoreResult<Vec<StoreResult<RunRecord>>> {
        let mut answers = Vec::with_capacity(items.len());
        for item in items {
            answers.push(
                self.finish_attempt(&item.run_id, item.attempt, worker_id, &item.report)
                    .await,
            );
        }
        Ok(answers)
    }

    /// One start per item, in one transaction where the store can, each judged exactly as
    /// `start_attempt` would be; one answer per item, in order.
    async fn start_attempts(
        &self,
        worker_id: &str,
        items: &[AttemptStart],
    ) -> StoreResult<Vec<StoreResult<RunRecord>>> {
        let mut answers = Vec::with_capacity(items.len());
        for item in items {
            answers.push(
                self.start_attempt(&item.run_id, item.attempt, worker_id)
                    .await,
            );
        }
        Ok(answers)
    }

    /// One worker call's reports: `starts`, then `finishes`, each judged exactly as its
    /// single call would be, then, if `claim` is given, a claim for the room they freed, as
    /// [`Store::claim_runs`] would make it; in one transaction. A refusal
    /// of one item, or of the claim, is its own answer; a database failure fails the whole
    /// call, which then writes nothing. `received`: when the call arrived; the time it waited
    /// for its transaction counts into each item's `ago_ms`, so a call that queued behind
    /// others does not stamp what it reports late.
    async fn report_attempts(
        &self,
        worker_id: &str,
        starts: &[AttemptStart],
        finishes: &[AttemptFinish],
        claim: Option<&ClaimLimits>,
        received: std::time::Instant,
    ) -> StoreResult<AttemptReports>;

    // ---- events -----------------------------------------------------------------------

    /// A run's persisted events with `seq > after_seq`, in order, at most `limit`.
    async fn events_after(
        &self,
        run_id: &str,
        after_seq: i64,
        limit: u32,
    ) -> StoreResult<Vec<EventRecord>>;

    /// A run's persisted events with `seq < before_seq`, newest first, at most `limit`: reads a
    /// long log backwards from its tail.
    async fn events_before(
        &self,
        run_id: &str,
        before_seq: i64,
        limit: u32,
    ) -> StoreResult<Vec<EventRecord>>;

    /// Notifications of changes, delivered after commit: new pending runs and new events. On
    /// PostgreSQL they arrive from every server sharing the database. Receivers that lag lose
    /// signals, never data: they re-read the store.
    fn subscribe(&self) -> broadcast::Receiver<Signal>;

    // ---- the reaper ---------------------------------------------------------------------

    /// One sweep. Ends every in-flight attempt whose heartbeat (or claim, if it never had one)
    /// is older than its `heartbeat_timeout` (`worker_heartbeat_lost`, or
    /// `worker_claim_timeout` if the worker never confirmed), that ran past `timeout` plus
    /// `policy.timeout_grace_ms` (`timeout`), or whose cancel was requested and whose worker
    /// is gone (`cancelled`). Each end is one conditional write; sweeping the same rows twice,
    /// or from two servers at once, changes nothing the second time.
    async fn reap_stale_runs(&self, policy: &ReapPolicy) -> StoreResult<ReapReport>;

    /// The earliest moment any in-flight run could be reaped, for the reaper's next wake-up.
    async fn next_reap_deadline(&self, policy: &ReapPolicy) -> StoreResult<Option<Millis>>;

    /// After the store was unreachable, heartbeats sent meanwhile were not recorded: that is
    /// no evidence against any worker. Moves every in-flight run's heartbeat deadline
    /// (`stale_at`) to at least one full heartbeat timeout from now, never earlier than it
    /// was; the rule that judges it is unchanged. Returns how many runs it moved.
    async fn grant_heartbeat_grace(&self) -> StoreResult<u64>;

    // ---- retention ----------------------------------------------------------------------

    /// Deletes up to `batch` runs of `lane` that finished more than `retention_ms` ago by the
    /// store's clock, oldest first, with their events and attempts, in one short transaction.
    /// In-flight and pending runs are never touched. Returns how many runs it deleted.
    async fn prune_finished_runs(
        &self,
        lane: &str,
        retention_ms: i64,
        batch: u32,
    ) -> StoreResult<u64>;
}

/// A store shared by the server's tasks.
pub type SharedStore = std::sync::Arc<dyn Store>;

/// The capacity of a broadcast channel of [`Signal`]s.
pub const SIGNAL_CAPACITY: usize = 4096;

/// A new broadcast channel for a store's signals.
pub fn signal_channel() -> broadcast::Sender<Signal> {
    broadcast::channel(SIGNAL_CAPACITY).0
}
