//! What the supervisor tells the server about one attempt, behind a small trait so that
//! supervision can be tested without a server.

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use tether_api::{
    AppendLogRequest, Assignment, AttemptFinishWire, AttemptReportsRequest, AttemptStartWire,
    ClientError, FinishRequest, LogChunkWire, ReportAnswer, ReportClaim, StartRequest,
    TetherClient, MAX_ATTEMPT_REPORTS,
};
use tether_domain::{ErrorCode, RunStatus};
use tokio::sync::{mpsc, oneshot};

/// Which pipe a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
}

/// One piece of output as read: a line (with its `\n`), or a partial line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub stream: OutputStream,
    /// Milliseconds since the epoch, by this worker's clock, when it was read.
    pub ts_ms: i64,
    pub data: Bytes,
    /// Where in its stream (of this attempt) it begins, in bytes; set by the uploader, so a
    /// batch sent again after a lost answer is recognised and stored once.
    pub offset: Option<i64>,
}

/// How an attempt ended, as `finish` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub status: RunStatus,
    pub error_code: Option<ErrorCode>,
    pub exit_code: Option<i32>,
    pub error_message: Option<String>,
}

/// The server's answer to a log upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendAck {
    /// The output limit was reached and the server already ended the run.
    pub stop: bool,
    /// Nothing was stored: the batch began past what the server has of the attempt's
    /// output (`409 output_gap`). Send it again from these offsets (stdout, stderr).
    pub resend_from: Option<(i64, i64)>,
}

/// Why a report was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// The attempt is no longer ours (`409 stale_attempt`, or the run or worker is unknown):
    /// stop it and report nothing more.
    #[error("the attempt is no longer current")]
    Stale,
    /// The server could not be reached or could not take it now; the same report may succeed
    /// later.
    #[error("transient: {0}")]
    Transient(String),
    /// Refused for another reason; sending it again would be refused again.
    #[error("refused: {0}")]
    Refused(String),
}

/// Reports one attempt's life to whoever tracks it (the server, or a fake in tests).
#[async_trait]
pub trait AttemptReporter: Send + Sync + 'static {
    /// The process started, with this pid, `at` that moment.
    async fn start(
        &self,
        run_id: &str,
        attempt: u32,
        pid: u32,
        at: std::time::Instant,
    ) -> Result<(), ReportError>;
    /// Output, in the order it was read.
    async fn append(
        &self,
        run_id: &str,
        attempt: u32,
        chunks: &[OutputChunk],
    ) -> Result<AppendAck, ReportError>;
    /// The attempt ended. For a command that ended silently before its start was answered,
    /// this is called while `start` is still waiting: the start must reach the server first.
    /// The attempt ended, `at` that moment (when its process was seen to end).
    async fn finish(
        &self,
        run_id: &str,
        attempt: u32,
        finish: &Finish,
        at: std::time::Instant,
    ) -> Result<(), ReportError>;
}

/// Reports over HTTP, as one registered worker, one call per report. Alone it does not hold a
/// finish back behind its start's answer; the worker uses it through [`send_reports`], which
/// does.
#[derive(Debug, Clone)]
pub struct HttpReporter {
    client: TetherClient,
    worker_id: String,
}

impl HttpReporter {
    pub fn new(client: TetherClient, worker_id: String) -> HttpReporter {
        HttpReporter { client, worker_id }
    }
}

/// Sorts a client error into what the supervisor can act on.
pub fn classify(err: ClientError) -> ReportError {
    if err.is_retryable() {
        return ReportError::Transient(err.to_string());
    }
    // 404: the run or this worker is unknown to the server, so the attempt is not ours either.
    if matches!(err.status(), Some(409 | 404)) {
        return ReportError::Stale;
    }
    ReportError::Refused(err.to_string())
}

#[async_trait]
impl AttemptReporter for HttpReporter {
    /// One call per start: the server stamps it when the call arrives (`at` is not sent).
    async fn start(
        &self,
        run_id: &str,
        attempt: u32,
        pid: u32,
        _at: std::time::Instant,
    ) -> Result<(), ReportError> {
        let request = StartRequest {
            worker_id: self.worker_id.clone(),
            pid: Some(pid),
        };
        self.client
            .start_attempt(run_id, attempt, &request)
            .await
            .map(drop)
            .map_err(classify)
    }

    async fn append(
        &self,
        run_id: &str,
        attempt: u32,
        chunks: &[OutputChunk],
    ) -> Result<AppendAck, ReportError> {
        let engine = base64::engine::general_purpose::STANDARD;
        let request = AppendLogRequest {
            worker_id: self.worker_id.clone(),
            chunks: chunks
                .iter()
                .map(|c| LogChunkWire {
                    stream: c.stream.as_str().to_string(),
                    ts: c.ts_ms,
                    data: engine.encode(&c.data),
                    offset: c.offset,
                })
                .collect(),
        };
        match self.client.append_logs(run_id, attempt, &request).await {
            Ok(resp) => Ok(AppendAck {
                stop: resp.stop,
                resend_from: None,
            }),
            Err(ClientError::OutputGap { expected }) => Ok(AppendAck {
                stop: false,
                resend_from: Some((expected.stdout, expected.stderr)),
            }),
            Err(err) => Err(classify(err)),
        }
    }

    async fn finish(
        &self,
        run_id: &str,
        attempt: u32,
        finish: &Finish,
        _at: std::time::Instant,
    ) -> Result<(), ReportError> {
        let request = FinishRequest {
            worker_id: self.worker_id.clone(),
            status: finish.status,
            error_code: finish.error_code,
            exit_code: finish.exit_code,
            error_message: finish.error_message.clone(),
        };
        self.client
            .finish_attempt(run_id, attempt, &request)
            .await
            .map(drop)
            .map_err(classify)
    }
}

/// A start or finish waiting for the next batch, with where its answer goes.
#[derive(Debug)]
pub struct QueuedReport {
    run_id: String,
    attempt: u32,
    kind: ReportKind,
    reply: oneshot::Sender<Result<(), ReportError>>,
    /// Set on a just-launched attempt's first report: the launch is settled once it is read.
    launch: Option<LaunchGuard>,
    /// When it happened (the process started, the attempt ended): the call says how long
    /// before it that was, so the run's stamps are when it happened, not when a call went.
    at: std::time::Instant,
}

/// Attempts launched whose first report (the start, or a spawn failure's finish) has not been
/// read yet. Before a call goes, the sender waits for the ones launched so far: a claim's
/// answer launches its runs, and their starts go together in the next call instead of one
/// behind a call that carries only what ended meanwhile. Spawns take about a millisecond, so
/// this is a wait on events the worker itself is producing, not a timer.
///
/// Only the launches made before the wait began are waited for (they count in the closed
/// epoch; later ones in the next): a worker whose slots keep launching from its local queue
/// would otherwise rarely see none unsettled, and hold its finishes, and the claim riding on
/// them, until the queue ran dry.
#[derive(Debug, Default)]
struct Launches {
    /// The epoch new launches count in (0 or 1).
    epoch: std::sync::atomic::AtomicUsize,
    unsettled: [std::sync::atomic::AtomicUsize; 2],
    settled: tokio::sync::Notify,
}

impl Launches {
    fn launch(&self) -> usize {
        use std::sync::atomic::Ordering;
        let epoch = self.epoch.load(Ordering::Acquire) & 1;
        self.unsettled[epoch].fetch_add(1, Ordering::AcqRel);
        epoch
    }

    fn settle(&self, epoch: usize) {
        use std::sync::atomic::Ordering;
        if self.unsettled[epoch].fetch_sub(1, Ordering::AcqRel) == 1 {
            self.settled.notify_waiters();
        }
    }

    /// Closes the current epoch: launches from now on count in the other. Returns the closed
    /// one, to wait on with [`Launches::settled_in`].
    fn close_epoch(&self) -> usize {
        self.epoch.fetch_xor(1, std::sync::atomic::Ordering::AcqRel) & 1
    }

    /// Whether every launch of `epoch` has settled; `settled` must have been enabled first,
    /// so a launch settling right after this answers still wakes it.
    fn settled_in(&self, epoch: usize) -> bool {
        self.unsettled[epoch].load(std::sync::atomic::Ordering::Acquire) == 0
    }

    /// Whether every launch so far has settled (as [`Launches::settled_in`]).
    fn all_settled(&self) -> bool {
        self.settled_in(0) && self.settled_in(1)
    }
}

/// One launch not yet settled; dropped once its first report is read, or once its
/// supervision ends without one.
#[derive(Debug)]
pub struct LaunchGuard {
    launches: std::sync::Arc<Launches>,
    epoch: usize,
}

impl Drop for LaunchGuard {
    fn drop(&mut self) {
        self.launches.settle(self.epoch);
    }
}

/// Where [`send_reports`] reads what [`ReportQueue`]s queue.
#[derive(Debug)]
pub struct ReportInbox {
    rx: mpsc::UnboundedReceiver<QueuedReport>,
    launches: std::sync::Arc<Launches>,
}

impl ReportInbox {
    /// Waits until every launch made before it began is settled, reading what arrives meanwhile
    /// into `reports`.
    async fn settle_launches(&mut self, reports: &mut Vec<QueuedReport>) {
        let epoch = self.launches.close_epoch();
        loop {
            while let Ok(mut more) = self.rx.try_recv() {
                more.launch = None;
                reports.push(more);
            }
            let settled = self.launches.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self.launches.settled_in(epoch) {
                return;
            }
            tokio::select! {
                more = self.rx.recv() => match more {
                    Some(mut more) => {
                        more.launch = None;
                        reports.push(more);
                    }
                    None => return,
                },
                _ = &mut settled => {}
            }
        }
    }
}

#[derive(Debug)]
enum ReportKind {
    Start { pid: u32 },
    Finish(Finish),
}

/// Where the supervisors of one registration queue their starts and finishes; one task
/// ([`send_reports`]) sends whatever queued as one call.
#[derive(Debug, Clone)]
pub struct ReportQueue {
    tx: mpsc::UnboundedSender<QueuedReport>,
    launches: std::sync::Arc<Launches>,
}

impl ReportQueue {
    pub fn new() -> (ReportQueue, ReportInbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        let launches = std::sync::Arc::new(Launches::default());
        (
            ReportQueue {
                tx,
                launches: launches.clone(),
            },
            ReportInbox { rx, launches },
        )
    }

    /// Until every attempt launched so far has made its first report (started, or failed
    /// to): its process is up.
    pub async fn launches_settled(&self) {
        loop {
            let settled = self.launches.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self.launches.all_settled() {
                return;
            }
            settled.await;
        }
    }

    /// An attempt is being launched: the next call waits for its first report.
    pub fn launching(&self) -> LaunchGuard {
        let epoch = self.launches.launch();
        LaunchGuard {
            launches: self.launches.clone(),
            epoch,
        }
    }

    async fn report(
        &self,
        run_id: &str,
        attempt: u32,
        kind: ReportKind,
        launch: Option<LaunchGuard>,
        at: std::time::Instant,
    ) -> Result<(), ReportError> {
        let (reply, answer) = oneshot::channel();
        let queued = QueuedReport {
            run_id: run_id.to_string(),
            attempt,
            kind,
            reply,
            launch,
            at,
        };
        if self.tx.send(queued).is_err() {
            return Err(ReportError::Transient(
                "the worker stopped sending reports".into(),
            ));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(ReportError::Transient("the report was dropped".into())))
    }
}

/// Reports over HTTP as one registered worker: starts and finishes through its
/// [`ReportQueue`] (batched with every other attempt's), output directly.
#[derive(Debug)]
pub struct BatchReporter {
    http: HttpReporter,
    queue: ReportQueue,
    /// Until the first report goes: this attempt's launch, not yet settled.
    launch: std::sync::Mutex<Option<LaunchGuard>>,
}

impl BatchReporter {
    pub fn new(http: HttpReporter, queue: ReportQueue) -> BatchReporter {
        let launch = std::sync::Mutex::new(Some(queue.launching()));
        BatchReporter {
            http,
            queue,
            launch,
        }
    }

    fn first_report(&self) -> Option<LaunchGuard> {
        crate::lock(&self.launch).take()
    }
}

#[async_trait]
impl AttemptReporter for BatchReporter {
    async fn start(
        &self,
        run_id: &str,
        attempt: u32,
        pid: u32,
        at: std::time::Instant,
    ) -> Result<(), ReportError> {
        self.queue
            .report(
                run_id,
                attempt,
                ReportKind::Start { pid },
                self.first_report(),
                at,
            )
            .await
    }

    async fn append(
        &self,
        run_id: &str,
        attempt: u32,
        chunks: &[OutputChunk],
    ) -> Result<AppendAck, ReportError> {
        self.http.append(run_id, attempt, chunks).await
    }

    async fn finish(
        &self,
        run_id: &str,
        attempt: u32,
        finish: &Finish,
        at: std::time::Instant,
    ) -> Result<(), ReportError> {
        self.queue
            .report(
                run_id,
                attempt,
                ReportKind::Finish(finish.clone()),
                self.first_report(),
                at,
            )
            .await
    }
}

/// What the batches ask of the worker around them: whether a finish may claim the room it
/// frees (and for how many runs), and where the runs it claims go.
pub trait ClaimRider: Send + Sync {
    /// The claim a call carrying finishes makes (how many runs, and the reserve of the
    /// worker's local queue); `None` once the worker takes nothing new (shutting down,
    /// draining).
    fn claim(&self) -> Option<ReportClaim>;
    fn launch(&self, assignment: Assignment);
}

/// At most this many report calls in flight. One: the local queue keeps the slots busy while
/// a call is out, so the next call waits and carries more. Measured with a local queue, two at
/// once made twice the calls, each slower (they queue for the same writer), and drained fewer
/// runs a second (BENCHMARKS.md).
const CALLS_IN_FLIGHT: usize = 1;

type Key = (String, u32);

/// Sends the queued starts and finishes: whatever queued while the calls in flight are out
/// goes together in the next one (no timer), with the first report of every attempt just
/// launched (see [`LaunchGuard`]); at most [`CALLS_IN_FLIGHT`] calls at once, and a finish
/// never before the answer to its own start. A call carrying finishes also claims the room
/// they free. Each report gets its own answer. A server without the batch call gets the
/// single-attempt calls instead. Returns when every [`ReportQueue`] is gone.
pub async fn send_reports(
    http: HttpReporter,
    mut queue: ReportInbox,
    rider: std::sync::Arc<dyn ClaimRider>,
) {
    use futures::StreamExt;
    let mut batched = true;
    let mut unconfirmed = Unconfirmed::default();
    let mut pending: Vec<QueuedReport> = Vec::new();
    // Starts in a call not answered yet: a finish of the same attempt waits for that answer.
    let mut starting: std::collections::HashSet<Key> = std::collections::HashSet::new();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut open = true;
    loop {
        let sendable = |pending: &[QueuedReport], starting: &std::collections::HashSet<Key>| {
            pending.iter().any(|r| !waits_for_start(r, starting))
        };
        if in_flight.len() < CALLS_IN_FLIGHT && sendable(&pending, &starting) {
            queue.settle_launches(&mut pending).await;
            let (now, later) = next_call(std::mem::take(&mut pending), &starting);
            pending = later;
            if !batched {
                send_one_by_one(&http, now, &mut unconfirmed).await;
                continue;
            }
            if let Some((request, reports)) = prepare_batch(now, &*rider, &mut unconfirmed) {
                starting.extend(
                    reports
                        .iter()
                        .filter(|r| matches!(r.kind, ReportKind::Start { .. }))
                        .map(key),
                );
                let http = http.clone();
                in_flight.push(async move {
                    let answer = http.client.report_attempts(&http.worker_id, &request).await;
                    (reports, answer)
                });
            }
            continue;
        }
        if !open && in_flight.is_empty() && pending.is_empty() {
            return;
        }
        tokio::select! {
            Some((reports, answer)) = in_flight.next(), if !in_flight.is_empty() => {
                for r in reports.iter().filter(|r| matches!(r.kind, ReportKind::Start { .. })) {
                    starting.remove(&key(r));
                }
                if let Some(unsent) = settle_batch(reports, answer, &*rider, &mut unconfirmed) {
                    tracing::info!("the server has no batch call; reporting attempts one by one");
                    batched = false;
                    pending.extend(unsent);
                }
            }
            more = queue.rx.recv(), if open => match more {
                Some(mut more) => {
                    more.launch = None;
                    pending.push(more);
                    while let Ok(mut more) = queue.rx.try_recv() {
                        more.launch = None;
                        pending.push(more);
                    }
                }
                None => open = false,
            },
            // Nothing in flight, nothing to read, and only finishes whose starts are unanswered:
            // cannot happen (their starts are in flight), but never spin.
            else => return,
        }
    }
}

/// What the next call carries: the reports that may go now, in the order they queued, at
/// most [`MAX_ATTEMPT_REPORTS`] (the server refuses a call with more); the rest wait. A
/// prefix in queue order keeps an attempt's start in the call before, or the same call as,
/// its finish.
fn next_call(
    pending: Vec<QueuedReport>,
    starting: &std::collections::HashSet<Key>,
) -> (Vec<QueuedReport>, Vec<QueuedReport>) {
    let mut now = Vec::new();
    let mut later = Vec::new();
    for r in pending {
        if now.len() < MAX_ATTEMPT_REPORTS && !waits_for_start(&r, starting) {
            now.push(r);
        } else {
            later.push(r);
        }
    }
    (now, later)
}

fn key(r: &QueuedReport) -> Key {
    (r.run_id.clone(), r.attempt)
}

/// A finish whose start is in a call not answered yet.
fn waits_for_start(r: &QueuedReport, starting: &std::collections::HashSet<Key>) -> bool {
    matches!(r.kind, ReportKind::Finish(_)) && starting.contains(&key(r))
}

/// The single-attempt calls, for a server without the batch call: starts before finishes, as
/// a finish may be queued behind its own start.
async fn send_one_by_one(
    http: &HttpReporter,
    reports: Vec<QueuedReport>,
    unconfirmed: &mut Unconfirmed,
) {
    let (starts, finishes): (Vec<_>, Vec<_>) = reports
        .into_iter()
        .partition(|r| matches!(r.kind, ReportKind::Start { .. }));
    for (key, result) in
        futures::future::join_all(starts.into_iter().map(|r| send_alone(http, r))).await
    {
        unconfirmed.note(&key.0, key.1, &result);
    }
    let finishes = unconfirmed.hold_back(finishes, &std::collections::HashSet::new());
    futures::future::join_all(finishes.into_iter().map(|r| send_alone(http, r))).await;
}

/// Attempts whose start failed in a way that may succeed later: their finish waits until the
/// start lands, so no run ends without having been `running`.
#[derive(Debug, Default)]
struct Unconfirmed(std::collections::HashSet<(String, u32)>);

impl Unconfirmed {
    fn note(&mut self, run_id: &str, attempt: u32, result: &Result<(), ReportError>) {
        let key = (run_id.to_string(), attempt);
        match result {
            Err(ReportError::Transient(_)) => {
                self.0.insert(key);
            }
            _ => {
                self.0.remove(&key);
            }
        }
    }

    /// Answers, as "try again", each finish whose start failed and is not in `starting`.
    fn hold_back(
        &self,
        reports: Vec<QueuedReport>,
        starting: &std::collections::HashSet<(String, u32)>,
    ) -> Vec<QueuedReport> {
        if self.0.is_empty() {
            return reports;
        }
        reports
            .into_iter()
            .filter_map(|r| {
                let key = (r.run_id.clone(), r.attempt);
                if matches!(r.kind, ReportKind::Finish(_))
                    && self.0.contains(&key)
                    && !starting.contains(&key)
                {
                    let _ = r.reply.send(Err(ReportError::Transient(
                        "its start is not confirmed yet".into(),
                    )));
                    None
                } else {
                    Some(r)
                }
            })
            .collect()
    }
}

/// The request for `reports`, and the reports it carries (a finish whose start failed and
/// is not among them is answered "try again" at once); `None` if nothing is left to send.
fn prepare_batch(
    reports: Vec<QueuedReport>,
    rider: &dyn ClaimRider,
    unconfirmed: &mut Unconfirmed,
) -> Option<(AttemptReportsRequest, Vec<QueuedReport>)> {
    let starting: std::collections::HashSet<Key> = reports
        .iter()
        .filter(|r| matches!(r.kind, ReportKind::Start { .. }))
        .map(key)
        .collect();
    let reports = unconfirmed.hold_back(reports, &starting);
    if reports.is_empty() {
        return None;
    }
    let mut request = AttemptReportsRequest::default();
    for r in &reports {
        // To the nearest millisecond: flooring would stamp every report up to 1 ms late.
        let ago_ms = Some(
            ((r.at.elapsed().as_micros() + 500) / 1000)
                .try_into()
                .unwrap_or(u64::MAX),
        );
        match &r.kind {
            ReportKind::Start { pid } => request.starts.push(AttemptStartWire {
                run_id: r.run_id.clone(),
                attempt: r.attempt,
                pid: Some(*pid),
                ago_ms,
            }),
            ReportKind::Finish(f) => request.finishes.push(AttemptFinishWire {
                run_id: r.run_id.clone(),
                attempt: r.attempt,
                status: f.status,
                error_code: f.error_code,
                exit_code: f.exit_code,
                error_message: f.error_message.clone(),
                ago_ms,
            }),
        }
    }
    if !request.finishes.is_empty() {
        request.claim = rider.claim();
    }
    Some((request, reports))
}

/// Applies a call's answer: launches what it assigned and answers each report. `Some`: the
/// server has no such call, nothing was taken.
fn settle_batch(
    mut reports: Vec<QueuedReport>,
    answer: Result<tether_api::AttemptReportsResponse, ClientError>,
    rider: &dyn ClaimRider,
    unconfirmed: &mut Unconfirmed,
) -> Option<Vec<QueuedReport>> {
    let answer = match answer {
        Ok(answer) => answer,
        // An older server: a Tether server names a missing route `no_route`; anything else
        // answering 404 without a Tether error body has no such route either.
        Err(err)
            if err.code() == Some("no_route")
                || (err.status() == Some(404) && err.code() == Some("http_404")) =>
        {
            return Some(reports);
        }
        Err(err) => {
            let why = Err(classify(err));
            for r in reports.drain(..) {
                if matches!(r.kind, ReportKind::Start { .. }) {
                    unconfirmed.note(&r.run_id, r.attempt, &why);
                }
                let _ = r.reply.send(why.clone());
            }
            return None;
        }
    };
    // The new attempts first: their processes start while the answered ones wrap up.
    for assignment in answer.assignments {
        rider.launch(assignment);
    }
    let mut starts = answer.starts.into_iter();
    let mut finishes = answer.finishes.into_iter();
    for r in reports {
        let item = match r.kind {
            ReportKind::Start { .. } => starts.next(),
            ReportKind::Finish(_) => finishes.next(),
        };
        let result = match item {
            Some(ReportAnswer { error: None, .. }) => Ok(()),
            Some(ReportAnswer {
                error: Some(refusal),
                ..
            }) => Err(classify(ClientError::Api {
                status: refusal.status,
                code: refusal.code,
                message: refusal.message,
                retry_after: None,
            })),
            None => Err(ReportError::Transient(
                "the server answered fewer items than were sent".into(),
            )),
        };
        if matches!(r.kind, ReportKind::Start { .. }) {
            unconfirmed.note(&r.run_id, r.attempt, &result);
        }
        let _ = r.reply.send(result);
    }
    None
}

/// One report through its single-attempt call; answers it, and says which attempt and how.
async fn send_alone(
    http: &HttpReporter,
    report: QueuedReport,
) -> ((String, u32), Result<(), ReportError>) {
    let result = match &report.kind {
        ReportKind::Start { pid } => {
            http.start(&report.run_id, report.attempt, *pid, report.at)
                .await
        }
        ReportKind::Finish(f) => {
            http.finish(&report.run_id, report.attempt, f, report.at)
                .await
        }
    };
    let _ = report.reply.send(result.clone());
    ((report.run_id, report.attempt), result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_waits_only_for_the_launches_made_before_it() {
        let (queue, mut inbox) = ReportQueue::new();
        let before = queue.launching();
        let mut reports = Vec::new();
        let after = {
            let settle = inbox.settle_launches(&mut reports);
            tokio::pin!(settle);
            assert!(futures::poll!(settle.as_mut()).is_pending());
            // A launch after the wait began does not hold it.
            let after = queue.launching();
            drop(before);
            assert!(futures::poll!(settle.as_mut()).is_ready());
            after
        };
        // The next wait waits for it.
        let settle = inbox.settle_launches(&mut reports);
        tokio::pin!(settle);
        assert!(futures::poll!(settle.as_mut()).is_pending());
        drop(after);
        assert!(futures::poll!(settle.as_mut()).is_ready());
    }

    #[tokio::test]
    async fn launches_settle_once_every_launch_has_reported() {
        let (queue, _inbox) = ReportQueue::new();
        // Nothing launched: settled at once.
        queue.launches_settled().await;
        let first = queue.launching();
        let second = queue.launching();
        let settled = queue.launches_settled();
        tokio::pin!(settled);
        assert!(futures::poll!(settled.as_mut()).is_pending());
        drop(first);
        assert!(futures::poll!(settled.as_mut()).is_pending());
        drop(second);
        assert!(futures::poll!(settled.as_mut()).is_ready());
    }

    fn api(status: u16, code: &str) -> ClientError {
        ClientError::Api {
            status,
            code: code.into(),
            message: "m".into(),
            retry_after: None,
        }
    }

    #[test]
    fn client_errors_sort_into_what_the_supervisor_does() {
        assert_eq!(classify(api(409, "stale_attempt")), ReportError::Stale);
        assert_eq!(classify(api(404, "unknown_worker")), ReportError::Stale);
        assert!(matches!(
            classify(api(503, "store_unavailable")),
            ReportError::Transient(_)
        ));
        assert!(matches!(
            classify(ClientError::Transport("refused".into())),
            ReportError::Transient(_)
        ));
        assert!(matches!(
            classify(api(400, "invalid_field")),
            ReportError::Refused(_)
        ));
    }

    fn queued(run: usize, kind: ReportKind) -> QueuedReport {
        QueuedReport {
            run_id: format!("run-{run}"),
            attempt: 1,
            kind,
            reply: oneshot::channel().0,
            launch: None,
            at: std::time::Instant::now(),
        }
    }

    fn finish() -> ReportKind {
        ReportKind::Finish(Finish {
            status: RunStatus::Succeeded,
            error_code: None,
            exit_code: Some(0),
            error_message: None,
        })
    }

    struct NoClaim;

    impl ClaimRider for NoClaim {
        fn claim(&self) -> Option<ReportClaim> {
            None
        }
        fn launch(&self, _assignment: Assignment) {}
    }

    /// Each start and finish says how long before the call it happened, so the server dates
    /// it then and not at the call.
    #[test]
    fn a_call_says_how_long_ago_each_report_happened() {
        let long_ago = |mut r: QueuedReport, ms: u64| {
            r.at = std::time::Instant::now()
                .checked_sub(std::time::Duration::from_millis(ms))
                .unwrap_or(r.at);
            r
        };
        let reports = vec![
            long_ago(queued(1, ReportKind::Start { pid: 7 }), 250),
            long_ago(queued(1, finish()), 40),
        ];
        let (request, _) =
            prepare_batch(reports, &NoClaim, &mut Unconfirmed::default()).expect("a call");
        let started = request.starts[0].ago_ms.expect("the start's age");
        let ended = request.finishes[0].ago_ms.expect("the finish's age");
        assert!((250..1_000).contains(&started), "{started}");
        assert!((40..790).contains(&ended), "{ended}");
        assert!(started - ended >= 200, "{started} then {ended}");
    }

    /// A local queue of hundreds of short runs can queue more reports than the server takes
    /// in one call (it refuses the whole call): the rest wait for the next one, and no
    /// attempt's finish goes before its start.
    #[test]
    fn a_call_carries_no_more_than_the_server_takes() {
        let mut pending = Vec::new();
        for run in 0..MAX_ATTEMPT_REPORTS {
            pending.push(queued(run, ReportKind::Start { pid: 1 }));
            pending.push(queued(run, finish()));
        }
        // A finish whose start is in the call in flight waits for its answer.
        pending.insert(0, queued(MAX_ATTEMPT_REPORTS, finish()));
        let starting = std::collections::HashSet::from([(format!("run-{MAX_ATTEMPT_REPORTS}"), 1)]);
        let (now, later) = next_call(pending, &starting);
        assert_eq!(now.len(), MAX_ATTEMPT_REPORTS);
        assert_eq!(later.len(), MAX_ATTEMPT_REPORTS + 1);
        assert!(matches!(now[0].kind, ReportKind::Start { .. }));
        assert_eq!(later[0].run_id, format!("run-{MAX_ATTEMPT_REPORTS}"));
        let started: std::collections::HashSet<&str> = now
            .iter()
            .filter(|r| matches!(r.kind, ReportKind::Start { .. }))
            .map(|r| r.run_id.as_str())
            .collect();
        assert!(now
            .iter()
            .filter(|r| matches!(r.kind, ReportKind::Finish(_)))
            .all(|r| started.contains(r.run_id.as_str())));
    }
}
