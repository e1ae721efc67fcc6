//! The transactions of [`Store`], written once over a store's [`Driver`]: load, decide through
//! [`RunState::apply`](tether_domain::machine::RunState::apply), guarded write, events, the
//! signals earned, commit. Split by area: `runs` (admission, cancel, reads), `claims`,
//! `attempts` (start, output, finish), `workers` (register, heartbeat, deregister), `reaper`
//! (sweeps, deadlines, grace, retention).
//!
//! Every type that is a [`Driver`] and an [`EndpointStore`] is a [`Store`] through this one
//! implementation, so `SqliteStore` and `PgStore` keep their names and constructors.

mod attempts;
mod claims;
mod reaper;
mod runs;
mod work;
mod workers;

use async_trait::async_trait;
use tether_domain::machine::{Command, Decision, TransitionError};
use tether_domain::time::reported_at;
use tether_domain::{ErrorCode, Millis, RunSpec, RunStatus};
use tokio::sync::broadcast;

use crate::driver::{AttemptEnd, Driver, DriverTx, LoadedRun, Lock, RunChange};
use crate::{
    Admission, AdmissionPolicy, AppendOutcome, AttemptFinish, AttemptRecord, AttemptReports,
    AttemptStart, BatchAdmission, ClaimLimits, ClaimedRun, CreatedRun, EndpointStore, EventBody,
    EventRecord, FinishReport, HandOff, HeartbeatAnswer, LaneLoad, NewWorker, OutputChunk,
    ReapPolicy, ReapReport, ReapedRun, RunBeat, RunFilter, RunPage, RunRecord, RunRef, Signal,
    StatusBody, Store, StoreError, StoreResult, WorkerRecord,
};
use work::{Ticket, Work};

#[async_trait]
impl<D: Driver + EndpointStore> Store for D {
    async fn now(&self) -> StoreResult<Millis> {
        self.clock().await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.ping_database().await
    }

    async fn create_run(&self, spec: &RunSpec) -> StoreResult<CreatedRun> {
        match runs::admit_one(self, spec, None, None).await?.0 {
            Admission::Accepted(created) => Ok(*created),
            // Without a policy nothing is refused; kept total rather than panicking.
            Admission::LaneFull | Admission::NeverFits => Err(StoreError::corrupt(
                "a run without an admission policy was refused",
            )),
        }
    }

    async fn admit_run(&self, spec: &RunSpec, policy: &AdmissionPolicy) -> StoreResult<Admission> {
        Ok(runs::admit_one(self, spec, Some(policy), None).await?.0)
    }

    async fn admit_runs(
        &self,
        batch: &[(RunSpec, AdmissionPolicy)],
    ) -> StoreResult<BatchAdmission> {
        Ok(runs::admit_batch(self, batch, None).await?.0)
    }

    async fn admit_run_and_claim(
        &self,
        spec: &RunSpec,
        policy: &AdmissionPolicy,
        hand_off: &HandOff<'_>,
    ) -> StoreResult<(Admission, Vec<ClaimedRun>)> {
        runs::admit_one(self, spec, Some(policy), Some(hand_off)).await
    }

    async fn admit_runs_and_claim(
        &self,
        batch: &[(RunSpec, AdmissionPolicy)],
        hand_off: &HandOff<'_>,
    ) -> StoreResult<(BatchAdmission, Vec<ClaimedRun>)> {
        runs::admit_batch(self, batch, Some(hand_off)).await
    }

    async fn get_run(&self, run_id: &str) -> StoreResult<Option<RunRecord>> {
        self.read_run(run_id).await
    }

    async fn list_runs(&self, filter: &RunFilter) -> StoreResult<RunPage> {
        runs::list_runs(self, filter).await
    }

    async fn list_attempts(&self, run_id: &str) -> StoreResult<Vec<AttemptRecord>> {
        self.read_attempts(run_id).await
    }

    async fn request_cancel(&self, run_id: &str) -> StoreResult<RunRecord> {
        runs::request_cancel(self, run_id).await
    }

    async fn register_worker(&self, worker: &NewWorker) -> StoreResult<WorkerRecord> {
        workers::register(self, worker).await
    }

    async fn worker_secret_hash(&self, worker_id: &str) -> StoreResult<Option<String>> {
        self.read_secret_hash(worker_id)
            .await?
            .ok_or(StoreError::UnknownWorker)
    }

    async fn deregister_worker(&self, worker_id: &str) -> StoreResult<Vec<String>> {
        workers::deregister(self, worker_id).await
    }

    async fn set_worker_draining(&self, worker_id: &str) -> StoreResult<()> {
        workers::set_draining(self, worker_id).await
    }

    async fn release_runs(&self, worker_id: &str, runs: &[RunRef]) -> StoreResult<Vec<RunRecord>> {
        workers::release(self, worker_id, runs).await
    }

    async fn list_workers(&self) -> StoreResult<Vec<WorkerRecord>> {
        workers::list(self).await
    }

    async fn lane_loads(&self) -> StoreResult<Vec<LaneLoad>> {
        let queues = self.read_lane_queues().await?;
        let flights = self.read_lane_flights().await?;
        Ok(LaneLoad::from_parts(queues, flights))
    }

    async fn claim_runs(
        &self,
        worker_id: &str,
        limits: &ClaimLimits,
    ) -> StoreResult<Vec<ClaimedRun>> {
        claims::claim_runs(self, worker_id, limits).await
    }

    async fn heartbeat(&self, worker_id: &str, beats: &[RunBeat]) -> StoreResult<HeartbeatAnswer> {
        workers::heartbeat(self, worker_id, beats).await
    }

    async fn start_attempt(
        &self,
        run_id: &str,
        attempt: u32,
        worker_id: &str,
    ) -> StoreResult<RunRecord> {
        attempts::start_one(self, run_id, attempt, worker_id).await
    }

    async fn append_output(
        &self,
        run_id: &str,
        attempt: u32,
        worker_id: &str,
        chunks: &[OutputChunk],
    ) -> StoreResult<AppendOutcome> {
        attempts::append_output(self, run_id, attempt, worker_id, chunks).await
    }

    async fn finish_attempt(
        &self,
        run_id: &str,
        attempt: u32,
        worker_id: &str,
        report: &FinishReport,
    ) -> StoreResult<RunRecord> {
        attempts::finish_one(self, run_id, attempt, worker_id, report).await
    }

    async fn finish_attempts(
        &self,
        worker_id: &str,
        items: &[AttemptFinish],
    ) -> StoreResult<Vec<StoreResult<RunRecord>>> {
        attempts::finish_many(self, worker_id, items).await
    }

    async fn start_attempts(
        &self,
        worker_id: &str,
        items: &[AttemptStart],
    ) -> StoreResult<Vec<StoreResult<RunRecord>>> {
        attempts::start_many(self, worker_id, items).await
    }

    async fn report_attempts(
        &self,
        worker_id: &str,
        starts: &[AttemptStart],
        finishes: &[AttemptFinish],
        claim: Option<&ClaimLimits>,
        received: std::time::Instant,
    ) -> StoreResult<AttemptReports> {
        attempts::report(self, worker_id, starts, finishes, claim, received).await
    }

    async fn events_after(
        &self,
        run_id: &str,
        after_seq: i64,
        limit: u32,
    ) -> StoreResult<Vec<EventRecord>> {
        let range = crate::driver::EventRange::After(after_seq);
        self.read_events(run_id, range, event_limit(limit)).await
    }

    async fn events_before(
        &self,
        run_id: &str,
        before_seq: i64,
        limit: u32,
    ) -> StoreResult<Vec<EventRecord>> {
        let range = crate::driver::EventRange::Before(before_seq);
        self.read_events(run_id, range, event_limit(limit)).await
    }

    fn subscribe(&self) -> broadcast::Receiver<Signal> {
        self.signals()
    }

    async fn reap_stale_runs(&self, policy: &ReapPolicy) -> StoreResult<ReapReport> {
        reaper::sweep(self, policy).await
    }

    async fn next_reap_deadline(&self, policy: &ReapPolicy) -> StoreResult<Option<Millis>> {
        reaper::next_deadline(self, policy).await
    }

    async fn grant_heartbeat_grace(&self) -> StoreResult<u64> {
        let mut work = Work::begin(self).await?;
        let moved = work.tx().await?.extend_stale_deadlines().await?;
        work.commit(self).await?;
        Ok(moved)
    }

    async fn prune_finished_runs(
        &self,
        lane: &str,
        retention_ms: i64,
        batch: u32,
    ) -> StoreResult<u64> {
        self.prune_finished(lane, retention_ms.max(0), i64::from(batch.max(1)))
            .await
    }
}

/// How many events one read returns: 1000 unless asked, never more than 10,000.
fn event_limit(limit: u32) -> i64 {
    match limit {
        0 => 1000,
        n => i64::from(n.min(10_000)),
    }
}

pub(crate) fn transition_error(e: TransitionError) -> StoreError {
    match e {
        TransitionError::Terminal => StoreError::Terminal,
        // Not pending / cancel requested only arise on claims, which skip such runs; any other
        // refusal names an attempt that is not current.
        TransitionError::StaleAttempt
        | TransitionError::NotPending
        | TransitionError::CancelRequested
        | TransitionError::Started => StoreError::StaleAttempt,
    }
}

/// Locks and loads a run for a worker or client call, or `NotFound`.
async fn must_lock<T: DriverTx>(work: &mut Work<T>, run_id: &str) -> StoreResult<LoadedRun> {
    work.run(run_id, Lock::Wait)
        .await?
        .ok_or(StoreError::NotFound)
}

/// The run as this transaction left it, with its queue position while pending.
async fn reload<T: DriverTx>(work: &mut Work<T>, run_id: &str) -> StoreResult<RunRecord> {
    let run = reload_unplaced(work, run_id).await?;
    placed(work, run).await
}

/// The run as this transaction left it, its queue position left for the caller to fill:
/// from memory when this transaction locked or wrote it, else read without a lock.
async fn reload_unplaced<T: DriverTx>(work: &mut Work<T>, run_id: &str) -> StoreResult<RunRecord> {
    work.run(run_id, Lock::None)
        .await?
        .map(|l| l.run)
        .ok_or(StoreError::NotFound)
}

/// `run` with its queue position filled in while it is pending.
async fn placed<T: DriverTx>(work: &mut Work<T>, mut run: RunRecord) -> StoreResult<RunRecord> {
    if run.status == RunStatus::Pending && run.queue_position.is_none() {
        let place = work
            .tx()
            .await?
            .queue_position(&run.spec.lane, run.seq)
            .await?;
        run.queue_position = Some(place);
    }
    Ok(run)
}

/// What one item of a call answers: a run as it is now, or as a queued write will leave it
/// (`to_pending`: back in the queue, so answered with its place).
enum Answer {
    Now(Box<RunRecord>),
    Written { ticket: Ticket, to_pending: bool },
}

impl Answer {
    async fn resolve<T: DriverTx>(self, work: &mut Work<T>) -> StoreResult<RunRecord> {
        let run = match self {
            Answer::Now(run) => *run,
            Answer::Written { ticket, .. } => work.written(ticket).await?,
        };
        placed(work, run).await
    }

    /// Whether the answer needs a read inside the transaction (a pending run's place), so it
    /// cannot wait for the commit's rows.
    fn needs_place(&self) -> bool {
        match self {
            Answer::Now(run) => run.status == RunStatus::Pending && run.queue_position.is_none(),
            Answer::Written { to_pending, .. } => *to_pending,
        }
    }

    /// The answer from the committed transaction's rows (see [`Answer::needs_place`]).
    fn after(self, done: &work::Committed) -> StoreResult<RunRecord> {
        match self {
            Answer::Now(run) => Ok(*run),
            Answer::Written { ticket, .. } => done.written(ticket),
        }
    }
}

/// Writes a `status` event, and an `end` event after it when the status is terminal.
fn push_status<T: DriverTx>(
    work: &mut Work<T>,
    run_id: &str,
    body: StatusBody,
) -> StoreResult<i64> {
    let mut seq = work.push(run_id, body.attempt, EventBody::Status(body), None)?;
    if body.status.is_terminal() {
        seq = work.push(run_id, body.attempt, EventBody::End(body), None)?;
    }
    Ok(seq)
}

/// How an attempt's end is described beyond the decision.
#[derive(Debug, Clone, Copy, Default)]
struct Ending<'a> {
    exit_code: Option<i32>,
    error_message: Option<&'a str>,
    /// How long before the call the worker saw it end (`time::reported_at`); 0 for an end
    /// Tether decides itself.
    ago_ms: u64,
}

/// Queues what the status machine decided when the current attempt ended (or, for a pending
/// run being cancelled, when the run ended without one): the attempt's record, the run going
/// back to `pending` for a retry or to its terminal status, and the events.
async fn end_attempt<T: DriverTx>(
    work: &mut Work<T>,
    loaded: &LoadedRun,
    decision: Decision,
    ending: Ending<'_>,
) -> StoreResult<Ticket> {
    let run = &loaded.run;
    let (ended, error_code) = decision.attempt_result();
    let floor = run.started_at.or(run.claimed_at).unwrap_or(run.created_at);
    let at = reported_at(work.now(), ending.ago_ms, floor);
    let ticket = match decision {
        Decision::Retry { .. } | Decision::Released => {
            // The next claim stamps afresh; the run's own error fields describe only its
            // final outcome, the attempt keeps this one.
            let change = match decision {
                Decision::Released => RunChange::Release,
                _ => RunChange::BackToPending,
            };
            let ticket = work.write(loaded, change).await?;
            work.out.run_pending(&run.spec.lane);
            ticket
        }
        Decision::Terminal { status, .. } => {
            let change = RunChange::Finish {
                status,
                exit_code: ending.exit_code,
                error_code,
                error_message: ending.error_message.map(str::to_string),
                at,
            };
            work.write(loaded, change).await?
        }
    };
    if run.status.is_in_flight() {
        if let Some(worker_id) = &run.worker_id {
            work.out.room_freed(&run.spec.lane, worker_id);
        }
        let end = AttemptEnd {
            status: ended,
            error_code,
            exit_code: ending.exit_code,
            error_message: ending.error_message.map(str::to_string),
        };
        work.close_attempt(&run.id, run.attempt, end, at);
    }
    let body = StatusBody {
        status: decision.run_status(),
        attempt: run.attempt,
        error_code,
        exit_code: ending.exit_code,
    };
    push_status(work, &run.id, body)?;
    Ok(ticket)
}

/// Ends a run's current attempt as the reaper would, with `error_code`, if it is still the
/// attempt judged. Answers what happened, or `None` if the run had moved on.
async fn reap_one<T: DriverTx>(
    work: &mut Work<T>,
    loaded: &LoadedRun,
    error_code: ErrorCode,
) -> StoreResult<Option<ReapedRun>> {
    let run = &loaded.run;
    let Ok(transition) = run.state().apply(&Command::Reap {
        attempt: run.attempt,
        error_code,
    }) else {
        return Ok(None);
    };
    let Some(decision) = transition.decision else {
        return Ok(None);
    };
    end_attempt(work, loaded, decision, Ending::default()).await?;
    Ok(Some(ReapedRun {
        run_id: run.id.clone(),
        attempt: run.attempt,
        error_code: decision.attempt_result().1.unwrap_or(error_code),
        status_after: decision.run_status(),
    }))
}
