//! The synthetic path: throughput, submit-to-start latency and the reaper's sweep time
//! (issue 5).
//!
//! An in-process server on 127.0.0.1:0, driven over real HTTP by the same client the CLI and
//! the worker use. Submitters post no-op runs (`["true"]`) in batches (`POST /v1/runs/batch`).
//! Synthetic workers register, heartbeat once per interval and speak the real worker's batched
//! protocol: a long-poll claim while they have room, and one report call at a time
//! (`POST /v1/workers/{id}/attempts`) carrying every start and finish queued meanwhile, which
//! also claims the room its finishes free. No process is spawned: a run "ends" as soon as it is
//! handed out, silently as `true` does, so its start and its finish ride in the same call (a
//! run chosen to print, `--log-every`, has its start answered, its line uploaded by a logs call
//! of its own, and its finish in the next call). The figures are the system's own cost per run
//! (HTTP, JSON, the store's transactions, signals), not a fork/exec. `--single-calls` keeps the
//! old per-run calls for comparison. A sample of runs is followed over SSE to its `end` event
//! to prove events flow.
//!
//! Then, optionally, a long history is written straight into the store (`--seed-finished`,
//! default one million finished runs) and the reaper's sweep, its next-deadline query, a list
//! page and a claim are timed against it, with a handful of runs in flight, and the throughput
//! run is repeated on the big table.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tether_api::{
    Assignment, AttemptFinishWire, AttemptReportsRequest, AttemptStartWire, BatchSubmitRequest,
    ClaimRequest, ClientError, HeartbeatRequest, ListRunsQuery, RegisterWorkerRequest, ReportClaim,
    RunBeatWire, SubmitRequest, TetherClient,
};
use tether_domain::{Resources, RunStatus};
use tether_server::ServerConfig;
use tether_store::{EventKind, ReapPolicy, SharedStore};
use tether_worker::{
    AttemptReporter, Finish, HttpReporter, OutputChunk, OutputStream, ReportError,
};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::db::BenchDb;
use crate::{progress, store_error, BenchArgs, BenchError, Percentiles};

/// Runs left in flight while the big table is measured.
const IN_FLIGHT: u32 = 8;
/// How long a claim long-polls.
const CLAIM_WAIT_MS: u64 = 1000;
/// How long a followed event stream may take to reach `end` once every run has finished.
const FOLLOW_GRACE: Duration = Duration::from_secs(60);

// ---- the report ------------------------------------------------------------------------------

/// One pass of N runs through the whole cycle.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub runs: u64,
    /// From the first submit to the last finish.
    pub seconds: f64,
    pub runs_per_s: f64,
    /// From the submit's answer to the start's answer, per run.
    pub submit_to_start_ms: Percentiles,
    /// Each call's round trip (`claim` only for claims that brought work; it includes the
    /// long-poll's wait for that work; `attempts` is the batched report call, `submit` one
    /// submission call, batch or single).
    pub calls_ms: BTreeMap<String, Percentiles>,
    /// Submission and worker calls (claims, reports, logs; not heartbeats, not SSE) per run.
    pub http_calls_per_run: f64,
    /// Claims that brought work (long-polls and claims riding on a report call), and the runs
    /// they brought.
    pub claims: u64,
    /// Of those, the claims that rode on a report call.
    pub riding_claims: u64,
    pub runs_per_claim: f64,
    /// Starts and finishes per report call (batched path; 0 with `--single-calls`).
    pub reports_per_call: f64,
    /// Heartbeats the synthetic workers sent (one per interval each).
    pub heartbeats: u64,
    /// Stored events of the N runs, read back from the store afterwards.
    pub events_written: u64,
    /// Runs whose stored events end with `end`.
    pub runs_ended: u64,
    /// Runs followed over SSE, and those whose stream gave every seq from 1 up to `end`.
    pub followed: u64,
    pub followed_complete: u64,
    /// Runs finished exactly once, `succeeded` on attempt 1.
    pub succeeded_once: u64,
}

impl Throughput {
    fn ok(&self) -> bool {
        self.succeeded_once == self.runs
            && self.runs_ended == self.runs
            && self.followed_complete == self.followed
    }
}

/// The calls that must not degrade with a long history, timed against it.
#[derive(Debug, Clone, Serialize)]
pub struct BigTable {
    pub seeded_runs: u64,
    pub seed_seconds: f64,
    /// The store's tables with their indexes (SQLite: the database file's pages in use).
    pub database_bytes: u64,
    pub in_flight: u32,
    /// `Store::reap_stale_runs(&ReapPolicy::default())`, called directly.
    pub reap_sweep_ms: Percentiles,
    /// Runs the timed sweeps ended (0 expected: nothing in flight is due).
    pub reaped: u64,
    /// `Store::next_reap_deadline`, called directly.
    pub next_deadline_ms: Percentiles,
    /// `GET /v1/runs?limit=50`, over HTTP.
    pub list_runs_ms: Percentiles,
    /// `POST /v1/workers/{id}/claim` with `max_runs: 1, wait_ms: 0` right after a submit,
    /// over HTTP.
    pub claim_ms: Percentiles,
    /// Claims that came back empty (0 expected).
    pub empty_claims: u64,
    /// The same throughput pass, on the big table.
    pub throughput: Throughput,
}

#[derive(Debug, Clone, Serialize)]
pub struct SyntheticReport {
    /// `sqlite` or `postgres`.
    pub store: String,
    /// The database URL, without its password.
    pub database: String,
    pub runs: u64,
    pub workers: u32,
    pub concurrency: u32,
    pub claim_batch: u32,
    /// `batched` (the real worker's protocol and batch submission) or `single` (one call per
    /// submission, start and finish).
    pub protocol: String,
    /// Runs per submission call.
    pub submit_batch: u32,
    /// Every Nth run printed one line (0: none).
    pub log_every: u64,
    pub throughput: Throughput,
    /// One run at a time on an idle system.
    pub paced: Option<Throughput>,
    pub big_table: Option<BigTable>,
}

impl SyntheticReport {
    /// Every run succeeded exactly once with all its events, in every pass.
    pub fn ok(&self) -> bool {
        self.throughput.ok()
            && self.paced.as_ref().is_none_or(Throughput::ok)
            && self
                .big_table
                .as_ref()
                .is_none_or(|b| b.throughput.ok() && b.empty_claims == 0)
    }
}

pub(crate) async fn run(args: &BenchArgs, db: &BenchDb) -> Result<SyntheticReport, BenchError> {
    let store = db.shared();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let config = ServerConfig {
        database: db.label(),
        ..ServerConfig::default()
    };
    let server = tether_server::start(config, store.clone(), listener).await?;
    let client = TetherClient::new(&format!("http://{}", server.addr), None)?;
    let result = phases(args, db, &store, &client).await;
    if tokio::time::timeout(Duration::from_secs(10), server.stop())
        .await
        .is_err()
    {
        eprintln!("tether bench: the server took more than 10 s to stop");
    }
    result
}

async fn phases(
    args: &BenchArgs,
    db: &BenchDb,
    store: &SharedStore,
    client: &TetherClient,
) -> Result<SyntheticReport, BenchError> {
    progress(args, &format!("{} runs on an empty table…", args.runs));
    let throughput = throughput(args, client, store, "empty").await?;
    let paced = if args.paced > 0 {
        progress(args, &format!("{} runs one at a time…", args.paced));
        let one_at_a_time = BenchArgs {
            runs: args.paced,
            concurrency: 1,
            follow_every: 0,
            ..args.clone()
        };
        Some(throughput_paced(&one_at_a_time, client, store).await?)
    } else {
        None
    };
    let big_table = if args.seed_finished > 0 {
        Some(big_table(args, db, store, client).await?)
    } else {
        None
    };
    Ok(SyntheticReport {
        store: db.kind().to_string(),
        database: db.label(),
        runs: args.runs,
        workers: synthetic_workers(args),
        concurrency: args.concurrency,
        claim_batch: args.claim_batch,
        protocol: if args.single_calls {
            "single"
        } else {
            "batched"
        }
        .to_string(),
        submit_batch: submit_batch(args),
        log_every: args.log_every,
        throughput,
        paced,
        big_table,
    })
}

// ---- the throughput pass -----------------------------------------------------------------------

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A task that panicked holding the lock left data we only append to: keep going.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Synthetic workers unless `--workers` says otherwise.
fn synthetic_workers(args: &BenchArgs) -> u32 {
    args.workers.unwrap_or(4)
}

/// Runs per submission call.
fn submit_batch(args: &BenchArgs) -> u32 {
    if args.single_calls {
        1
    } else {
        args.submit_batch
    }
}

/// What the tasks of one pass share.
struct Pass {
    total: u64,
    submitted: Mutex<HashMap<String, Instant>>,
    started: Mutex<HashMap<String, Instant>>,
    /// Told at every start, for the paced submitter.
    start_seen: Notify,
    /// Per run: finishes answered `succeeded` on attempt 1.
    finished: Mutex<HashMap<String, u32>>,
    finished_count: AtomicU64,
    last_finish: Mutex<Option<Instant>>,
    calls: Mutex<BTreeMap<&'static str, Vec<f64>>>,
    /// Every submission and worker call, answered or not (heartbeats and SSE aside).
    http_calls: AtomicU64,
    claims: AtomicU64,
    riding_claims: AtomicU64,
    claimed_runs: AtomicU64,
    /// Starts and finishes sent in report calls.
    reports: AtomicU64,
    /// Runs handed out so far, to choose every `log_every`th to print.
    handed_out: AtomicU64,
    log_every: u64,
    done: CancellationToken,
    failure: Mutex<Option<String>>,
    /// Each submitter waits for its run to start before it submits the next.
    paced: bool,
}

impl Pass {
    fn fail(&self, what: String) {
        let mut failure = lock(&self.failure);
        if failure.is_none() {
            *failure = Some(what);
        }
        self.done.cancel();
    }

    /// Awaits a call and records its round trip under `kind`.
    async fn timed<T, E, F>(&self, kind: &'static str, call: F) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
    {
        let t = Instant::now();
        let result = call.await;
        let took = millis(t.elapsed());
        lock(&self.calls).entry(kind).or_default().push(took);
        self.http_calls.fetch_add(1, Ordering::Relaxed);
        result
    }

    /// Whether the run just handed out prints a line.
    fn prints(&self) -> bool {
        let n = self.handed_out.fetch_add(1, Ordering::Relaxed);
        self.log_every > 0 && n.is_multiple_of(self.log_every)
    }

    fn claimed(&self, runs: usize, riding: bool) {
        self.claims.fetch_add(1, Ordering::Relaxed);
        if riding {
            self.riding_claims.fetch_add(1, Ordering::Relaxed);
        }
        self.claimed_runs.fetch_add(runs as u64, Ordering::Relaxed);
    }

    fn started(&self, run_id: String) {
        lock(&self.started).insert(run_id, Instant::now());
        self.start_seen.notify_waiters();
    }

    /// Until `run_id` has started (or the pass is over).
    async fn until_started(&self, run_id: &str) {
        loop {
            let seen = self.start_seen.notified();
            tokio::pin!(seen);
            // Registered before the look, so a start between the two is not missed.
            seen.as_mut().enable();
            if lock(&self.started).contains_key(run_id) {
                return;
            }
            tokio::select! {
                _ = self.done.cancelled() => return,
                _ = seen => {}
            }
        }
    }

    /// A finish answered: the pass is done with the last one.
    fn finished(&self, run_id: String) {
        // Whether it ended `succeeded` on attempt 1 is read back from the store after the
        // pass.
        *lock(&self.finished).entry(run_id).or_insert(0) += 1;
        if self.finished_count.fetch_add(1, Ordering::SeqCst) + 1 == self.total {
            *lock(&self.last_finish) = Some(Instant::now());
            self.done.cancel();
        }
    }
}

/// The one line a printing run writes.
fn one_line() -> [OutputChunk; 1] {
    [OutputChunk {
        stream: OutputStream::Stdout,
        ts_ms: now_ms(),
        data: Bytes::from_static(b"ok\n"),
        offset: Some(0),
    }]
}

/// Uploads a printing run's line as the worker's uploader does, through its own call.
async fn upload_line(worker: &Worker, run_id: &str, attempt: u32, pass: &Pass) -> bool {
    let line = one_line();
    let appended = pass
        .timed("logs", worker.reporter.append(run_id, attempt, &line))
        .await;
    match appended {
        Ok(ack) if !ack.stop && ack.resend_from.is_none() => true,
        Ok(ack) => {
            pass.fail(format!("logs {run_id}: not taken as sent: {ack:?}"));
            false
        }
        Err(e) => {
            pass.fail(format!("logs {run_id}: {e}"));
            false
        }
    }
}

/// A synthetic worker: its id, its slots, the runs it holds (for its heartbeats and its room),
/// the reports queued for its next report call, and the worker's own reporter for its logs
/// (and for the single calls), so its calls are the ones a real worker makes.
#[derive(Clone)]
struct Worker {
    id: String,
    reporter: HttpReporter,
    heartbeat_interval: Duration,
    slots: u32,
    held: Arc<Mutex<HashMap<String, u32>>>,
    queued: Arc<Mutex<Queued>>,
    /// Told when a report is queued.
    ready: Arc<Notify>,
    /// Told when finishes free room, so a full worker's claim loop looks again at once.
    freed: Arc<Notify>,
}

/// What waits for a synthetic worker's next report call.
#[derive(Default)]
struct Queued {
    /// Runs just handed out: their start goes in the next call (and their finish with it,
    /// unless they print).
    handed_out: Vec<(String, u32)>,
    /// Runs that printed: their finish goes in the next call.
    printed: Vec<(String, u32)>,
}

impl Worker {
    /// Takes on runs handed out by a claim: each runs (and ends) at once.
    fn admit(&self, assignments: Vec<Assignment>) {
        if assignments.is_empty() {
            return;
        }
        let mut held = lock(&self.held);
        let mut queued = lock(&self.queued);
        for a in assignments {
            held.insert(a.run_id.clone(), a.attempt);
            queued.handed_out.push((a.run_id, a.attempt));
        }
        drop((held, queued));
        self.ready.notify_one();
    }

    fn has_room(&self) -> bool {
        lock(&self.held).len() < self.slots as usize
    }
}

async fn register(client: &TetherClient, name: String, slots: u32) -> Result<Worker, BenchError> {
    let answer = client
        .register_worker(&RegisterWorkerRequest {
            name,
            capacity: Resources {
                cpus: f64::from(slots),
                memory_mb: u64::from(slots) * Resources::default().memory_mb,
            },
            lanes: Vec::new(),
            labels: BTreeMap::new(),
        })
        .await?;
    Ok(Worker {
        reporter: HttpReporter::new(client.clone(), answer.worker_id.clone()),
        id: answer.worker_id,
        heartbeat_interval: Duration::from_millis(answer.heartbeat_interval_ms.max(100)),
        slots,
        held: Arc::new(Mutex::new(HashMap::new())),
        queued: Arc::new(Mutex::new(Queued::default())),
        ready: Arc::new(Notify::new()),
        freed: Arc::new(Notify::new()),
    })
}

/// One heartbeat per interval for the worker and every run it holds, as a real worker sends
/// (a worker that stops heartbeating is handed nothing).
async fn heartbeat_loop(
    client: TetherClient,
    worker: Worker,
    stop: CancellationToken,
    sent: Arc<AtomicU64>,
) -> Result<(), ClientError> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(worker.heartbeat_interval) => {}
        }
        let runs = lock(&worker.held)
            .iter()
            .map(|(run_id, attempt)| RunBeatWire {
                run_id: run_id.clone(),
                attempt: *attempt,
                stdout_bytes: 0,
                stderr_bytes: 0,
                since_last_output_s: None,
            })
            .collect();
        client
            .heartbeat(
                &worker.id,
                &HeartbeatRequest {
                    runs,
                    draining: false,
                },
            )
            .await?;
        sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// The real worker's claim loop: while it has room, a long-poll claim for as many runs as
/// its slots hold (the server hands out no more than fits); when full, it waits for a finish
/// to free room (no timer).
async fn claim_loop(client: TetherClient, worker: Worker, pass: Arc<Pass>) {
    let request = ClaimRequest {
        max_runs: worker.slots,
        wait_ms: CLAIM_WAIT_MS,
        reserve: None,
    };
    loop {
        if !worker.has_room() {
            tokio::select! {
                _ = pass.done.cancelled() => return,
                _ = worker.freed.notified() => continue,
            }
        }
        let Some(assignments) = claim_once(&client, &worker, &pass, &request).await else {
            return;
        };
        if assignments.is_empty() {
            continue;
        }
        worker.admit(assignments);
    }
}

/// One long-poll claim, counted and timed as the pass counts calls; `None` once the pass is
/// over or the claim failed (the pass is failed then).
async fn claim_once(
    client: &TetherClient,
    worker: &Worker,
    pass: &Pass,
    request: &ClaimRequest,
) -> Option<Vec<Assignment>> {
    let t = Instant::now();
    let answer = tokio::select! {
        _ = pass.done.cancelled() => return None,
        answer = client.claim(&worker.id, request) => answer,
    };
    pass.http_calls.fetch_add(1, Ordering::Relaxed);
    let assignments = match answer {
        Ok(answer) => answer.assignments,
        Err(e) => {
            pass.fail(format!("claim: {e}"));
            return None;
        }
    };
    if !assignments.is_empty() {
        lock(&pass.calls)
            .entry("claim")
            .or_default()
            .push(millis(t.elapsed()));
        pass.claimed(assignments.len(), false);
    }
    Some(assignments)
}

fn succeeded(run_id: String, attempt: u32) -> AttemptFinishWire {
    AttemptFinishWire {
        run_id,
        attempt,
        status: RunStatus::Succeeded,
        error_code: None,
        exit_code: Some(0),
        error_message: None,
        ago_ms: None,
    }
}

/// The real worker's report sender: one `POST /v1/workers/{id}/attempts` at a time, carrying
/// whatever queued while the last was in flight (no timer); a call with finishes also claims
/// the room they free, and what it hands out goes in the next call.
async fn report_loop(client: TetherClient, worker: Worker, pass: Arc<Pass>) {
    loop {
        let (handed_out, printed) = {
            let mut queued = lock(&worker.queued);
            (
                std::mem::take(&mut queued.handed_out),
                std::mem::take(&mut queued.printed),
            )
        };
        if handed_out.is_empty() && printed.is_empty() {
            tokio::select! {
                _ = pass.done.cancelled() => return,
                _ = worker.ready.notified() => continue,
            }
        }
        let mut request = AttemptReportsRequest::default();
        let mut printing = Vec::new();
        for (run_id, attempt) in handed_out {
            request.starts.push(AttemptStartWire {
                run_id: run_id.clone(),
                attempt,
                pid: Some(std::process::id()),
                ago_ms: None,
            });
            if pass.prints() {
                printing.push((run_id, attempt));
            } else {
                // Ended silently before its start was answered: the finish rides behind it.
                request.finishes.push(succeeded(run_id, attempt));
            }
        }
        for (run_id, attempt) in printed {
            request.finishes.push(succeeded(run_id, attempt));
        }
        if !request.finishes.is_empty() {
            request.claim = Some(ReportClaim {
                max_runs: worker.slots,
                reserve: None,
            });
        }
        pass.reports.fetch_add(
            (request.starts.len() + request.finishes.len()) as u64,
            Ordering::Relaxed,
        );
        let answer = tokio::select! {
            _ = pass.done.cancelled() => return,
            answer = pass.timed("attempts", client.report_attempts(&worker.id, &request)) => answer,
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                pass.fail(format!("attempts: {e}"));
                return;
            }
        };
        // The new runs first, as the worker launches them before it answers the rest.
        if !answer.assignments.is_empty() {
            pass.claimed(answer.assignments.len(), true);
            worker.admit(answer.assignments);
        }
        for item in answer.starts {
            if let Some(refusal) = item.error {
                pass.fail(format!("start {}: {refusal:?}", item.run_id));
                return;
            }
            pass.started(item.run_id);
        }
        for (run_id, attempt) in printing {
            let (worker, pass) = (worker.clone(), pass.clone());
            tokio::spawn(async move {
                if upload_line(&worker, &run_id, attempt, &pass).await {
                    lock(&worker.queued).printed.push((run_id, attempt));
                    worker.ready.notify_one();
                }
            });
        }
        if answer.finishes.len() != request.finishes.len() {
            pass.fail("attempts: fewer finishes answered than sent".into());
            return;
        }
        for item in answer.finishes {
            if let Some(refusal) = item.error {
                pass.fail(format!("finish {}: {refusal:?}", item.run_id));
                return;
            }
            lock(&worker.held).remove(&item.run_id);
            pass.finished(item.run_id);
        }
        if !request.finishes.is_empty() {
            worker.freed.notify_one();
        }
    }
}

/// `--single-calls`: long-polls claims and plays each assignment through with one call per
/// report, claiming again only once the whole batch has finished.
async fn single_calls_loop(client: TetherClient, worker: Worker, pass: Arc<Pass>) {
    let request = ClaimRequest {
        max_runs: worker.slots,
        wait_ms: CLAIM_WAIT_MS,
        reserve: None,
    };
    loop {
        let Some(assignments) = claim_once(&client, &worker, &pass, &request).await else {
            return;
        };
        if assignments.is_empty() {
            continue;
        }
        let plays = assignments.into_iter().map(|a| play(&worker, a, &pass));
        futures::future::join_all(plays).await;
    }
}

/// start, a log line if it prints, finish `succeeded`: what a worker reports for the run,
/// without running it, one call each.
async fn play(worker: &Worker, a: Assignment, pass: &Pass) {
    let reporter = &worker.reporter;
    lock(&worker.held).insert(a.run_id.clone(), a.attempt);
    let started = pass
        .timed(
            "start",
            reporter.start(
                &a.run_id,
                a.attempt,
                std::process::id(),
                std::time::Instant::now(),
            ),
        )
        .await;
    if let Err(e) = started {
        pass.fail(format!("start {}: {e}", a.run_id));
        return;
    }
    pass.started(a.run_id.clone());
    if pass.prints() && !upload_line(worker, &a.run_id, a.attempt, pass).await {
        return;
    }
    let finish = Finish {
        status: RunStatus::Succeeded,
        error_code: None,
        exit_code: Some(0),
        error_message: None,
    };
    let finished = pass
        .timed(
            "finish",
            reporter.finish(&a.run_id, a.attempt, &finish, std::time::Instant::now()),
        )
        .await;
    lock(&worker.held).remove(&a.run_id);
    if let Err(e) = finished {
        pass.fail(format!("finish {}: {e}", a.run_id));
        return;
    }
    pass.finished(a.run_id);
}

/// What following one run's events over SSE showed.
struct Followed {
    complete: bool,
}

/// Follows a run's events to `end`, checking the seqs rise by one from 1.
async fn follow(client: TetherClient, run_id: String) -> Result<Followed, String> {
    let mut stream = client.events(&run_id, None, true);
    let mut next = 1;
    while let Some(item) = stream.next().await {
        let item = item.map_err(|e| format!("events of {run_id}: {e}"))?;
        if item.event == "heartbeat" {
            continue;
        }
        if item.id != Some(next) {
            return Err(format!(
                "events of {run_id}: seq {:?} where {next} was due",
                item.id
            ));
        }
        next += 1;
        if item.is_end() {
            return Ok(Followed { complete: true });
        }
    }
    Ok(Followed { complete: false })
}

/// Submits as fast as `concurrency` submitters can, `batch` runs per call, following every
/// `follow_every`th run.
async fn submitter(
    client: TetherClient,
    pass: Arc<Pass>,
    next: Arc<AtomicU64>,
    batch: u32,
    follow_every: u64,
) -> Vec<JoinHandle<Result<Followed, String>>> {
    let noop = SubmitRequest {
        command: vec!["true".into()],
        ..SubmitRequest::default()
    };
    let mut followers = Vec::new();
    loop {
        let first = next.fetch_add(u64::from(batch), Ordering::Relaxed);
        if first >= pass.total || pass.done.is_cancelled() {
            return followers;
        }
        let n = (pass.total - first).min(u64::from(batch));
        let submitted = if n == 1 {
            pass.timed("submit", client.submit(&noop))
                .await
                .map(|run| vec![run])
        } else {
            let request = BatchSubmitRequest {
                runs: vec![noop.clone(); n as usize],
            };
            pass.timed("submit", client.submit_batch(&request))
                .await
                .map(|answer| answer.runs)
        };
        let runs = match submitted {
            Ok(runs) if runs.len() as u64 == n => runs,
            Ok(runs) => {
                pass.fail(format!("submit: {} runs answered for {n}", runs.len()));
                return followers;
            }
            Err(e) => {
                pass.fail(format!("submit: {e}"));
                return followers;
            }
        };
        let at = Instant::now();
        lock(&pass.submitted).extend(runs.iter().map(|run| (run.id.clone(), at)));
        for (i, run) in (first..).zip(runs) {
            if pass.paced {
                // The latency itself is stamped by the worker; this only paces.
                pass.until_started(&run.id).await;
            }
            if i.checked_rem(follow_every) == Some(0) {
                followers.push(tokio::spawn(follow(client.clone(), run.id)));
            }
        }
    }
}

/// N no-op runs through submit, claim, start, finish (and logs, for those that print) and events.
async fn throughput(
    args: &BenchArgs,
    client: &TetherClient,
    store: &SharedStore,
    tag: &str,
) -> Result<Throughput, BenchError> {
    pass_of(args, client, store, tag, false).await
}

/// N runs, each submitted once the one before has started.
async fn throughput_paced(
    args: &BenchArgs,
    client: &TetherClient,
    store: &SharedStore,
) -> Result<Throughput, BenchError> {
    pass_of(args, client, store, "paced", true).await
}

async fn pass_of(
    args: &BenchArgs,
    client: &TetherClient,
    store: &SharedStore,
    tag: &str,
    paced: bool,
) -> Result<Throughput, BenchError> {
    let pass = Arc::new(Pass {
        total: args.runs,
        submitted: Mutex::new(HashMap::new()),
        started: Mutex::new(HashMap::new()),
        start_seen: Notify::new(),
        finished: Mutex::new(HashMap::new()),
        finished_count: AtomicU64::new(0),
        last_finish: Mutex::new(None),
        calls: Mutex::new(BTreeMap::new()),
        http_calls: AtomicU64::new(0),
        claims: AtomicU64::new(0),
        riding_claims: AtomicU64::new(0),
        claimed_runs: AtomicU64::new(0),
        reports: AtomicU64::new(0),
        handed_out: AtomicU64::new(0),
        log_every: args.log_every,
        done: CancellationToken::new(),
        failure: Mutex::new(None),
        paced,
    });
    let mut workers = Vec::new();
    for i in 0..synthetic_workers(args) {
        workers.push(register(client, format!("bench-{tag}-{i}"), args.claim_batch).await?);
    }
    let beats = Arc::new(AtomicU64::new(0));
    let mut beat_tasks = Vec::new();
    let mut worker_tasks = Vec::new();
    for worker in &workers {
        beat_tasks.push(tokio::spawn(heartbeat_loop(
            client.clone(),
            worker.clone(),
            pass.done.clone(),
            beats.clone(),
        )));
        if args.single_calls {
            worker_tasks.push(tokio::spawn(single_calls_loop(
                client.clone(),
                worker.clone(),
                pass.clone(),
            )));
        } else {
            worker_tasks.push(tokio::spawn(claim_loop(
                client.clone(),
                worker.clone(),
                pass.clone(),
            )));
            worker_tasks.push(tokio::spawn(report_loop(
                client.clone(),
                worker.clone(),
                pass.clone(),
            )));
        }
    }
    let first_submit = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let submitters: Vec<_> = (0..args.concurrency)
        .map(|_| {
            tokio::spawn(submitter(
                client.clone(),
                pass.clone(),
                next.clone(),
                if paced { 1 } else { submit_batch(args) },
                args.follow_every,
            ))
        })
        .collect();
    // Generous: a pass that makes no progress for this long is broken, not slow.
    let limit = Duration::from_secs(600) + Duration::from_millis(args.runs.saturating_mul(50));
    tokio::select! {
        _ = pass.done.cancelled() => {}
        _ = tokio::time::sleep(limit) => pass.fail(format!(
            "only {} of {} runs finished within {} s",
            pass.finished_count.load(Ordering::SeqCst),
            args.runs,
            limit.as_secs()
        )),
    }
    let mut followers = Vec::new();
    for task in submitters {
        followers.extend(task.await.unwrap_or_default());
    }
    for task in worker_tasks {
        let _ = task.await;
    }
    for task in beat_tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => pass.fail(format!("heartbeat: {e}")),
            Err(e) => pass.fail(format!("heartbeat task: {e}")),
        }
    }
    let followed = followers.len() as u64;
    let mut followed_complete = 0;
    for task in followers {
        match tokio::time::timeout(FOLLOW_GRACE, task).await {
            Ok(Ok(Ok(f))) if f.complete => followed_complete += 1,
            Ok(Ok(Ok(_))) => pass.fail("an event stream closed before `end`".into()),
            Ok(Ok(Err(e))) => pass.fail(e),
            Ok(Err(e)) => pass.fail(format!("follower task: {e}")),
            Err(_) => pass.fail("an event stream did not reach `end` in time".into()),
        }
    }
    for worker in &workers {
        client.deregister_worker(&worker.id).await?;
    }
    if let Some(failure) = lock(&pass.failure).take() {
        return Err(BenchError::Usage(format!("bench failed: {failure}")));
    }

    let end = lock(&pass.last_finish).unwrap_or_else(Instant::now);
    let seconds = end.duration_since(first_submit).as_secs_f64();
    let submitted = std::mem::take(&mut *lock(&pass.submitted));
    let started = std::mem::take(&mut *lock(&pass.started));
    let latencies = submitted
        .iter()
        .filter_map(|(id, at)| {
            started
                .get(id)
                .map(|s| millis(s.saturating_duration_since(*at)))
        })
        .collect();
    let finished = std::mem::take(&mut *lock(&pass.finished));
    let read_back = read_back(store, submitted.keys().cloned()).await?;
    let succeeded_once = read_back
        .iter()
        .filter(|r| r.succeeded_first_time && finished.get(&r.run_id) == Some(&1))
        .count() as u64;
    let events_written = read_back.iter().map(|r| r.events).sum();
    let runs_ended = read_back.iter().filter(|r| r.ended).count() as u64;
    let calls: BTreeMap<String, Percentiles> = std::mem::take(&mut *lock(&pass.calls))
        .into_iter()
        .map(|(k, v)| (k.to_string(), Percentiles::of(v)))
        .collect();
    let claims = pass.claims.load(Ordering::Relaxed);
    let claimed = pass.claimed_runs.load(Ordering::Relaxed);
    let per_run = |n: u64| n as f64 / args.runs.max(1) as f64;
    let report_calls = calls
        .get("attempts")
        .map_or(0, |p: &Percentiles| p.count as u64);
    Ok(Throughput {
        runs: args.runs,
        seconds,
        runs_per_s: if seconds > 0.0 {
            args.runs as f64 / seconds
        } else {
            0.0
        },
        submit_to_start_ms: Percentiles::of(latencies),
        http_calls_per_run: per_run(pass.http_calls.load(Ordering::Relaxed)),
        calls_ms: calls,
        claims,
        riding_claims: pass.riding_claims.load(Ordering::Relaxed),
        runs_per_claim: if claims > 0 {
            claimed as f64 / claims as f64
        } else {
            0.0
        },
        reports_per_call: if report_calls > 0 {
            pass.reports.load(Ordering::Relaxed) as f64 / report_calls as f64
        } else {
            0.0
        },
        heartbeats: beats.load(Ordering::Relaxed),
        events_written,
        runs_ended,
        followed,
        followed_complete,
        succeeded_once,
    })
}

/// One run as the store has it after a pass.
struct ReadBack {
    run_id: String,
    /// Its stored events.
    events: u64,
    /// Its last event is `end`.
    ended: bool,
    /// It is `succeeded` on attempt 1.
    succeeded_first_time: bool,
}

/// Reads every run and its events back from the store.
async fn read_back(
    store: &SharedStore,
    run_ids: impl Iterator<Item = String>,
) -> Result<Vec<ReadBack>, BenchError> {
    let reads = futures::stream::iter(run_ids)
        .map(|id| {
            let store = store.clone();
            async move {
                let run = store.get_run(&id).await?;
                let events = store.events_after(&id, 0, 10_000).await?;
                Ok::<_, tether_store::StoreError>(ReadBack {
                    ended: events.last().map(|e| e.kind) == Some(EventKind::End),
                    events: events.len() as u64,
                    succeeded_first_time: run
                        .is_some_and(|r| r.status == RunStatus::Succeeded && r.attempt == 1),
                    run_id: id,
                })
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    reads
        .into_iter()
        .map(|r| r.map_err(store_error("reading runs back")))
        .collect()
}

// ---- the big table -----------------------------------------------------------------------------

/// Times `samples` calls of `call`, in milliseconds.
async fn sample<T, E, F, Fut>(samples: u32, mut call: F) -> Result<(Percentiles, Vec<T>), E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut times = Vec::new();
    let mut answers = Vec::new();
    for _ in 0..samples {
        let t = Instant::now();
        let answer = call().await?;
        times.push(millis(t.elapsed()));
        answers.push(answer);
    }
    Ok((Percentiles::of(times), answers))
}

async fn big_table(
    args: &BenchArgs,
    db: &BenchDb,
    store: &SharedStore,
    client: &TetherClient,
) -> Result<BigTable, BenchError> {
    progress(
        args,
        &format!("seeding {} finished runs…", args.seed_finished),
    );
    let t = Instant::now();
    db.seed(args.seed_finished)
        .await
        .map_err(store_error("seeding finished runs"))?;
    let seed_seconds = t.elapsed().as_secs_f64();
    let database_bytes = db
        .bytes()
        .await
        .map_err(store_error("measuring the tables"))?;
    progress(
        args,
        &format!(
            "seeded in {seed_seconds:.1} s; timing the reaper, a list and a claim with {IN_FLIGHT} runs in flight…"
        ),
    );

    // A handful of runs in flight, held (and heartbeated) by one worker.
    let stop = CancellationToken::new();
    let holder = register(client, "bench-holder".into(), IN_FLIGHT).await?;
    let claimer = register(client, "bench-claimer".into(), 1).await?;
    let beats = Arc::new(AtomicU64::new(0));
    let beat_tasks = [&holder, &claimer].map(|w| {
        tokio::spawn(heartbeat_loop(
            client.clone(),
            w.clone(),
            stop.clone(),
            beats.clone(),
        ))
    });
    let result = measure_big_table(args, store, client, &holder, &claimer).await;
    stop.cancel();
    for task in beat_tasks {
        let _ = task.await;
    }
    client.deregister_worker(&holder.id).await?;
    client.deregister_worker(&claimer.id).await?;
    let measured = result?;

    progress(args, &format!("{} runs on the big table…", args.runs));
    let throughput = throughput(args, client, store, "big").await?;
    Ok(BigTable {
        seeded_runs: args.seed_finished,
        seed_seconds,
        database_bytes,
        in_flight: IN_FLIGHT,
        reap_sweep_ms: measured.reap_sweep_ms,
        reaped: measured.reaped,
        next_deadline_ms: measured.next_deadline_ms,
        list_runs_ms: measured.list_runs_ms,
        claim_ms: measured.claim_ms,
        empty_claims: measured.empty_claims,
        throughput,
    })
}

struct Measured {
    reap_sweep_ms: Percentiles,
    reaped: u64,
    next_deadline_ms: Percentiles,
    list_runs_ms: Percentiles,
    claim_ms: Percentiles,
    empty_claims: u64,
}

fn report_error(what: &'static str) -> impl FnOnce(ReportError) -> BenchError {
    move |e| BenchError::Failed(format!("{what}: {e}"))
}

async fn start(worker: &Worker, run_id: &str, attempt: u32) -> Result<(), BenchError> {
    worker
        .reporter
        .start(
            run_id,
            attempt,
            std::process::id(),
            std::time::Instant::now(),
        )
        .await
        .map_err(report_error("start"))
}

async fn finish(worker: &Worker, run_id: &str, attempt: u32) -> Result<(), BenchError> {
    let finish = Finish {
        status: RunStatus::Succeeded,
        error_code: None,
        exit_code: Some(0),
        error_message: None,
    };
    worker
        .reporter
        .finish(run_id, attempt, &finish, std::time::Instant::now())
        .await
        .map_err(report_error("finish"))
}

async fn measure_big_table(
    args: &BenchArgs,
    store: &SharedStore,
    client: &TetherClient,
    holder: &Worker,
    claimer: &Worker,
) -> Result<Measured, BenchError> {
    let noop = SubmitRequest {
        command: vec!["true".into()],
        ..SubmitRequest::default()
    };
    for _ in 0..IN_FLIGHT {
        client.submit(&noop).await?;
    }
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while held.len() < IN_FLIGHT as usize && Instant::now() < deadline {
        let request = ClaimRequest {
            max_runs: IN_FLIGHT - held.len() as u32,
            wait_ms: CLAIM_WAIT_MS,
            reserve: None,
        };
        held.extend(client.claim(&holder.id, &request).await?.assignments);
    }
    for a in &held {
        lock(&holder.held).insert(a.run_id.clone(), a.attempt);
        start(holder, &a.run_id, a.attempt).await?;
    }

    let policy = ReapPolicy::default();
    let (reap_sweep_ms, reports) = sample(args.samples, || store.reap_stale_runs(&policy))
        .await
        .map_err(store_error("sweeping"))?;
    let reaped = reports.iter().map(|r| r.reaped.len() as u64).sum();
    let (next_deadline_ms, _) = sample(args.samples, || store.next_reap_deadline(&policy))
        .await
        .map_err(store_error("reading the next deadline"))?;
    let page = ListRunsQuery {
        limit: Some(50),
        ..ListRunsQuery::default()
    };
    let (list_runs_ms, pages) = sample(args.samples, || client.list_runs(&page)).await?;
    if pages.iter().any(|p| p.runs.len() != 50) {
        return Err(BenchError::Usage(
            "GET /v1/runs?limit=50 gave fewer than 50 runs on the big table".into(),
        ));
    }

    let mut claim_times = Vec::new();
    let mut empty_claims = 0;
    let one = ClaimRequest {
        max_runs: 1,
        wait_ms: 0,
        reserve: None,
    };
    for _ in 0..args.samples {
        let run = client.submit(&noop).await?;
        let t = Instant::now();
        let answer = client.claim(&claimer.id, &one).await?;
        claim_times.push(millis(t.elapsed()));
        match answer.assignments.first() {
            Some(a) => {
                start(claimer, &a.run_id, a.attempt).await?;
                finish(claimer, &a.run_id, a.attempt).await?;
            }
            None => {
                empty_claims += 1;
                client.cancel_run(&run.id).await?;
            }
        }
    }

    for a in &held {
        finish(holder, &a.run_id, a.attempt).await?;
        lock(&holder.held).remove(&a.run_id);
    }
    Ok(Measured {
        reap_sweep_ms,
        reaped,
        next_deadline_ms,
        list_runs_ms,
        claim_ms: Percentiles::of(claim_times),
        empty_claims,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(database: Option<String>) -> BenchArgs {
        BenchArgs {
            database,
            runs: 20,
            workers: Some(2),
            concurrency: 4,
            claim_batch: 16,
            submit_batch: 8,
            log_every: 2,
            single_calls: false,
            follow_every: 5,
            seed_finished: 1000,
            samples: 5,
            paced: 5,
            real: false,
            command: "true".into(),
            cpus: 8,
            backlog: 0,
            followers: 0,
            sse_heartbeat: Duration::from_secs(2),
            json: true,
        }
    }

    async fn tiny_bench(args: BenchArgs) -> SyntheticReport {
        match crate::measure(&args).await.unwrap() {
            crate::Report::Synthetic(report) => *report,
            crate::Report::Real(_) => panic!("a synthetic bench gave a real report"),
        }
    }

    fn assert_every_run_succeeded_once(t: &Throughput) {
        assert_eq!(t.succeeded_once, 20);
        assert_eq!(t.runs_ended, 20);
        assert_eq!(t.followed, 4);
        assert_eq!(t.followed_complete, 4);
        // pending, claimed, attempt, running, succeeded, end; and a log for every other run.
        assert_eq!(t.events_written, 20 * 6 + 10);
        assert_eq!(t.submit_to_start_ms.count, 20);
        assert!(t.runs_per_s > 0.0);
    }

    fn assert_big_table(b: &BigTable) {
        assert_eq!(b.seeded_runs, 1000);
        assert!(b.database_bytes > 0);
        assert_eq!(b.reaped, 0);
        assert_eq!(b.empty_claims, 0);
        assert_eq!(b.reap_sweep_ms.count, 5);
        assert_eq!(b.claim_ms.count, 5);
        assert_every_run_succeeded_once(&b.throughput);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tiny_bench_on_sqlite_succeeds_every_run_exactly_once() {
        let report = tiny_bench(tiny(None)).await;
        assert!(report.ok());
        assert_eq!(report.store, "sqlite");
        assert_every_run_succeeded_once(&report.throughput);
        assert_big_table(report.big_table.as_ref().unwrap());
        let paced = report.paced.as_ref().unwrap();
        assert_eq!(
            (paced.succeeded_once, paced.submit_to_start_ms.count),
            (5, 5)
        );
        // Batch submission and the batched report call: fewer calls than runs.
        let t = &report.throughput;
        assert_eq!(report.protocol, "batched");
        assert!(t.calls_ms["submit"].count < 20, "{t:?}");
        assert!(t.calls_ms["attempts"].count > 0, "{t:?}");
        assert!(!t.calls_ms.contains_key("start"), "{t:?}");
        assert!(!t.calls_ms.contains_key("finish"), "{t:?}");
        assert_eq!(t.calls_ms["logs"].count, 10, "{t:?}");
        assert!(t.reports_per_call >= 1.0, "{t:?}");
        let text = crate::render::synthetic(&report);
        assert!(text.contains("reaper sweep"));
        assert!(text.contains("One run at a time"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_single_calls_still_succeed_every_run_exactly_once() {
        let args = BenchArgs {
            single_calls: true,
            seed_finished: 0,
            paced: 0,
            ..tiny(None)
        };
        let report = tiny_bench(args).await;
        assert!(report.ok());
        assert_eq!(report.protocol, "single");
        let t = &report.throughput;
        assert_eq!(t.succeeded_once, 20);
        assert_eq!(t.events_written, 20 * 6 + 10);
        for (call, count) in [("submit", 20), ("start", 20), ("finish", 20), ("logs", 10)] {
            assert_eq!(t.calls_ms[call].count, count, "{call}: {t:?}");
        }
        assert!(!t.calls_ms.contains_key("attempts"), "{t:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn seeded_runs_read_back_as_finished_runs() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("seed.db").display());
        let store = tether_store_sqlite::SqliteStore::open(&url).await.unwrap();
        store.seed_finished_runs(10).await.unwrap();
        store.seed_finished_runs(5).await.unwrap();
        let page = tether_store::Store::list_runs(
            &store,
            &tether_store::RunFilter {
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(page.runs.len(), 15);
        for run in &page.runs {
            assert_eq!(run.status, RunStatus::Succeeded);
            assert_eq!(run.attempt, 1);
            assert_eq!(run.spec.command, vec!["true".to_string()]);
            let events = tether_store::Store::events_after(&store, &run.id, 0, 10)
                .await
                .unwrap();
            assert_eq!(events.len() as i64, run.last_event_seq);
            assert_eq!(events.last().unwrap().kind, EventKind::End);
        }
    }

    /// The same on PostgreSQL (the database the store's own tests use), in a schema of its
    /// own that the bench drops.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tiny_bench_on_postgres_succeeds_every_run_exactly_once() {
        let url = std::env::var("TETHER_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
        let report = tiny_bench(tiny(Some(url))).await;
        assert!(report.ok());
        assert_eq!(report.store, "postgres");
        assert_every_run_succeeded_once(&report.throughput);
        assert_big_table(report.big_table.as_ref().unwrap());
    }
}
