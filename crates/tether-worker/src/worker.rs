//! The worker process: register, claim, supervise, heartbeat, and leave cleanly.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tether_api::{
    Assignment, ClaimRequest, ClientError, ControlRequest, HeartbeatRequest, HeartbeatResponse,
    RegisterWorkerRequest, ReportClaim, RunBeatWire, TetherClient,
};
use tether_domain::admission::claim_reach;
use tether_domain::Resources;
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::control::{AttemptControl, AttemptStats, Directive};
use crate::release::Releaser;
use crate::reporter::{
    send_reports, BatchReporter, ClaimRider, HttpReporter, OutputStream, ReportInbox, ReportQueue,
};
use crate::slots::{SlotPermit, Slots, MAX_QUEUE_WAIT};
use crate::supervisor::{supervise, AttemptEnd, SupervisorOptions, Unreported};

/// How a worker runs.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerConfig {
    /// The server's root URL, e.g. `http://127.0.0.1:7070`.
    pub server: String,
    /// The worker token, sent as `Authorization: Bearer`.
    pub token: Option<String>,
    pub name: String,
    /// What this worker offers; the server places runs within it.
    pub capacity: Resources,
    /// Empty: every lane.
    pub lanes: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// How long one claim may wait at the server for work.
    pub claim_wait: Duration,
    pub max_runs_per_claim: u32,
    /// On shutdown, how long to let the commands it holds finish (shown `draining`, taking
    /// nothing new) before stopping them. Zero stops them at once.
    pub drain_timeout: Duration,
    /// CA certificates (PEM) trusted for an `https://` server besides the system's.
    pub ca_cert_pem: Option<Vec<u8>>,
    /// Names of this worker's environment variables its commands receive besides the run's
    /// `env` (never `TETHER_*`, never the token).
    pub pass_env: Vec<String>,
    /// Run each command under a shim, so that no process of it outlives its attempt
    /// (`crate::shim`). Off only for benchmarks.
    pub run_shim: bool,
    /// Have one run host fork the shims (`crate::run_host`), so the worker never forks.
    /// Off only for benchmarks.
    pub run_host: bool,
    /// Hold a local queue of claimed runs beyond the capacity, sized by the recent runs' pace
    /// (`crate::slots`), so a freed slot starts its next run without a round trip.
    pub local_queue: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            server: "http://127.0.0.1:7070".into(),
            token: None,
            name: "worker".into(),
            capacity: Resources::default(),
            lanes: Vec::new(),
            labels: BTreeMap::new(),
            kill_grace: Duration::from_secs(10),
            claim_wait: Duration::from_secs(20),
            // The server hands out no more than fits, so asking for many costs nothing.
            max_runs_per_claim: 512,
            drain_timeout: Duration::ZERO,
            ca_cert_pem: None,
            pass_env: crate::supervisor::DEFAULT_PASS_ENV
                .iter()
                .map(|s| s.to_string())
                .collect(),
            run_shim: true,
            run_host: true,
            local_queue: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid worker configuration: {0}")]
    Config(#[from] ClientError),
    /// The server refused to register this worker (a bad token, a bad request): retrying
    /// would be refused again.
    #[error("the server refused to register this worker: {0}")]
    Registration(ClientError),
}

/// The shortest heartbeat interval we accept from a server, so a bad answer cannot make the
/// worker spin.
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// A claim answered faster than this with nothing in it is followed by a short pause, in case
/// the server does not hold claims.
const EMPTY_CLAIM_PAUSE: Duration = Duration::from_millis(200);
/// The longest a claim waits for the runs the last one handed out to start (a safety bound:
/// spawns take about a millisecond).
const LAUNCH_SETTLE_LIMIT: Duration = Duration::from_millis(50);
/// How long leaving (`DELETE /v1/workers/{id}`) may take before we give up on it.
const DEREGISTER_PATIENCE: Duration = Duration::from_secs(5);

/// Runs a worker until `shutdown` is cancelled: then it stops claiming, stops every process
/// it holds (SIGTERM, SIGKILL after the grace), reports nothing for them, deregisters (the
/// server hands those runs back at once) and returns.
///
/// A server that cannot be reached is waited for; a server that forgot this worker (it
/// answers `unknown_worker`) gets everything killed and a new registration.
pub async fn run_worker(
    config: WorkerConfig,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let client = TetherClient::with_ca(
        &config.server,
        config.token.clone(),
        config.ca_cert_pem.as_deref(),
    )?;
    loop {
        let Some((worker_id, interval)) = register(&client, &config, &shutdown).await? else {
            return Ok(());
        };
        tracing::info!(
            worker_id,
            ?interval,
            server = client.base_url(),
            "registered"
        );
        let (queue, reports) = ReportQueue::new();
        let (releaser, release_loop) = Releaser::new(client.clone(), worker_id.clone());
        let release_loop = tokio::spawn(release_loop);
        let session = Session {
            client: client.clone(),
            config: config.clone(),
            worker_id: worker_id.clone(),
            launcher: Launcher {
                client: client.clone(),
                config: Arc::new(config.clone()),
                worker_id: worker_id.clone(),
                held: Held::default(),
                slots: Slots::new(config.capacity, config.local_queue),
                tracker: TaskTracker::new(),
                freed: Arc::new(Notify::new()),
                queue,
                claiming: Arc::new(AtomicBool::new(true)),
                ending: Arc::new(Mutex::new(None)),
                releaser,
            },
        };
        let end = session.run(interval, &shutdown, reports).await;
        // Every attempt's supervision is over, its hand-back answered.
        release_loop.abort();
        match end {
            SessionEnd::Shutdown => {
                deregister(&client, &worker_id).await;
                return Ok(());
            }
            SessionEnd::Forgotten => {
                tracing::warn!(
                    worker_id,
                    "the server no longer knows this worker; registering again"
                );
            }
        }
    }
}

/// Registers, retrying while the server is away. `None`: shut down meanwhile.
async fn register(
    client: &TetherClient,
    config: &WorkerConfig,
    shutdown: &CancellationToken,
) -> Result<Option<(String, Duration)>, WorkerError> {
    let request = RegisterWorkerRequest {
        name: config.name.clone(),
        capacity: config.capacity,
        lanes: config.lanes.clone(),
        labels: config.labels.clone(),
    };
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            r = client.register_worker(&request) => r,
        };
        match result {
            Ok(answer) => {
                let interval =
                    Duration::from_millis(answer.heartbeat_interval_ms).max(MIN_HEARTBEAT_INTERVAL);
                return Ok(Some((answer.worker_id, interval)));
            }
            Err(err) if err.is_retryable() => {
                let delay = backoff.next_delay();
                tracing::warn!(%err, ?delay, "cannot register; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(err) => return Err(WorkerError::Registration(err)),
        }
    }
}

async fn deregister(client: &TetherClient, worker_id: &str) {
    let attempt = async {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
        loop {
            match client.deregister_worker(worker_id).await {
                Ok(()) => return true,
                Err(err) if err.is_retryable() => {
                    tracing::warn!(worker_id, %err, "cannot deregister; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(err) => {
                    // Already forgotten (404) is as good as gone.
                    tracing::info!(worker_id, %err, "deregistration refused");
                    return false;
                }
            }
        }
    };
    match tokio::time::timeout(DEREGISTER_PATIENCE, attempt).await {
        Ok(true) => tracing::info!(worker_id, "deregistered"),
        Ok(false) => {}
        Err(_) => tracing::warn!(
            worker_id,
            "could not deregister; the server will reap this worker's runs when its heartbeat goes stale"
        ),
    }
}

/// The attempts a registration holds, by run id and attempt.
#[derive(Debug, Clone, Default)]
struct Held(Arc<Mutex<HashMap<(String, u32), HeldAttempt>>>);

#[derive(Debug)]
struct HeldAttempt {
    control: AttemptControl,
    stats: Arc<AttemptStats>,
    /// What the attempt reserves of this worker's capacity.
    reserves: Resources,
}

impl Held {
    fn lock(&self) -> MutexGuard<'_, HashMap<(String, u32), HeldAttempt>> {
        crate::lock(&self.0)
    }

    /// Whether `reach` (the capacity and the local queue's reserve), less what the held
    /// attempts reserve, could take another run.
    fn has_room(&self, reach: &Resources) -> bool {
        let held = self.lock();
        let cpus: f64 = held.values().map(|h| h.reserves.cpus).sum();
        let memory_mb: u64 = held.values().map(|h| h.reserves.memory_mb).sum();
        reach.cpus - cpus > 1e-9 && reach.memory_mb > memory_mb
    }

    /// Every attempt's part of a heartbeat.
    fn beats(&self) -> Vec<RunBeatWire> {
        self.lock()
            .iter()
            .map(|((run_id, attempt), held)| RunBeatWire {
                run_id: run_id.clone(),
                attempt: *attempt,
                stdout_bytes: held.stats.bytes(OutputStream::Stdout),
                stderr_bytes: held.stats.bytes(OutputStream::Stderr),
                since_last_output_s: held.stats.since_last_output().map(|d| d.as_secs_f64()),
            })
            .collect()
    }

    fn order(&self, run_id: &str, attempt: u32, directive: Directive) {
        if let Some(held) = self.lock().get(&(run_id.to_string(), attempt)) {
            held.control.order(directive);
        }
    }
}

enum SessionEnd {
    Shutdown,
    /// The server answered `unknown_worker`.
    Forgotten,
}

/// One registration's life.
struct Session {
    client: TetherClient,
    config: WorkerConfig,
    worker_id: String,
    launcher: Launcher,
}

/// Starts the attempts a registration is handed, by its claim loop or by a claim riding on a
/// batch of finishes.
#[derive(Clone)]
struct Launcher {
    client: TetherClient,
    config: Arc<WorkerConfig>,
    worker_id: String,
    held: Held,
    /// Where held attempts wait for room to run: the local queue.
    slots: Slots,
    tracker: TaskTracker,
    /// Told each time an attempt ends, so a full worker asks for more at once.
    freed: Arc<Notify>,
    /// Where the attempts' starts and finishes queue for the next batch.
    queue: ReportQueue,
    /// Whether finishes may claim the room they free: not once the worker stops claiming.
    claiming: Arc<AtomicBool>,
    /// The order every held attempt got when the session ended; an attempt handed out by a
    /// claim still in flight then gets it too.
    ending: Arc<Mutex<Option<Directive>>>,
    /// Where attempts never started go back to the server.
    releaser: Releaser,
}

impl Session {
    async fn run(
        self,
        interval: Duration,
        shutdown: &CancellationToken,
        reports: ReportInbox,
    ) -> SessionEnd {
        let launcher = &self.launcher;
        let forgotten = CancellationToken::new();
        let stop_beating = CancellationToken::new();
        let draining = Arc::new(AtomicBool::new(false));
        // Its own task: neither claims nor log uploads may delay a heartbeat.
        let beats = tokio::spawn(heartbeat_loop(
            self.client.clone(),
            self.worker_id.clone(),
            interval,
            launcher.held.clone(),
            forgotten.clone(),
            stop_beating.clone(),
            draining.clone(),
        ));
        let control = tokio::spawn(control_loop(
            self.client.clone(),
            self.worker_id.clone(),
            self.config.claim_wait,
            launcher.held.clone(),
            stop_beating.clone(),
        ));
        let sender = tokio::spawn(send_reports(
            HttpReporter::new(self.client.clone(), self.worker_id.clone()),
            reports,
            Arc::new(launcher.clone()),
        ));
        let end = self.claim_loop(shutdown, &forgotten).await;
        launcher.claiming.store(false, Ordering::Relaxed);
        if matches!(end, SessionEnd::Shutdown) && !self.config.drain_timeout.is_zero() {
            // Drain: the server is told at the next heartbeat, and the commands get their
            // chance to finish and report before anything is stopped.
            draining.store(true, Ordering::Relaxed);
            tracing::info!(timeout = ?self.config.drain_timeout, "draining");
            if tokio::time::timeout(self.config.drain_timeout, launcher.wait_idle())
                .await
                .is_err()
            {
                tracing::warn!("drain timed out; stopping what is left");
            }
        }
        let directive = match end {
            SessionEnd::Shutdown => Directive::Shutdown,
            SessionEnd::Forgotten => Directive::Abandon,
        };
        launcher.end_all(directive);
        // Heartbeats go on while the processes wind down, so the server does not judge the
        // runs lost meanwhile.
        launcher.tracker.close();
        launcher.tracker.wait().await;
        // Every attempt has had its reports answered: nothing is left to send.
        sender.abort();
        stop_beating.cancel();
        let _ = beats.await;
        let _ = control.await;
        end
    }

    async fn claim_loop(
        &self,
        shutdown: &CancellationToken,
        forgotten: &CancellationToken,
    ) -> SessionEnd {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            // A full worker asks for nothing: the end of one of its attempts wakes it (a
            // claim held open meanwhile would only be woken to take nothing).
            let claim = self.launcher.claim();
            let reach = claim_reach(
                &self.config.capacity,
                &claim.reserve.unwrap_or(Resources::NONE),
            );
            // Nor while runs wait in its local queue: their ends bring finishes, and the
            // finishes carry the claim (a long-poll beside them would only contend with them
            // for the worker's row).
            if !self.launcher.held.has_room(&reach) || self.launcher.slots.waiting() > 0 {
                tokio::select! {
                    _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                    _ = forgotten.cancelled() => return SessionEnd::Forgotten,
                    _ = self.launcher.freed.notified() => {}
                }
                continue;
            }
            let request = ClaimRequest {
                max_runs: claim.max_runs,
                wait_ms: self.config.claim_wait.as_millis() as u64,
                reserve: claim.reserve,
            };
            let asked = Instant::now();
            let result = tokio::select! {
                _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                _ = forgotten.cancelled() => return SessionEnd::Forgotten,
                r = self.client.claim(&self.worker_id, &request) => r,
            };
            let pause = match result {
                Ok(answer) => {
                    backoff.reset();
                    let empty = answer.assignments.is_empty();
                    for assignment in answer.assignments {
                        self.launcher.launch(assignment);
                    }
                    // The next claim waits for those processes to be up: sent at once, it
                    // sets the server and the store to work on the same cores as the spawns,
                    // delaying the starts it follows (by about a millisecond on 2 cores).
                    // Bounded, as a spawn that hangs must not stop the claims.
                    if !empty {
                        let _ = tokio::time::timeout(
                            LAUNCH_SETTLE_LIMIT,
                            self.launcher.queue.launches_settled(),
                        )
                        .await;
                    }
                    (empty && asked.elapsed() < EMPTY_CLAIM_PAUSE / 4).then_some(EMPTY_CLAIM_PAUSE)
                }
                Err(err) if err.is_unknown_worker() => {
                    forgotten.cancel();
                    return SessionEnd::Forgotten;
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    if err.is_retryable() {
                        tracing::warn!(%err, ?delay, "claim failed; retrying");
                    } else {
                        tracing::error!(%err, ?delay, "claim refused; retrying");
                    }
                    Some(delay)
                }
            };
            if let Some(pause) = pause {
                tokio::select! {
                    _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                    _ = forgotten.cancelled() => return SessionEnd::Forgotten,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

impl Launcher {
    fn launch(&self, assignment: Assignment) {
        let key = (assignment.run_id.clone(), assignment.attempt);
        let (control, directives) = AttemptControl::new();
        let stats = Arc::new(AttemptStats::new());
        {
            let mut held = self.held.lock();
            if held.contains_key(&key) {
                tracing::warn!(
                    run_id = key.0,
                    attempt = key.1,
                    "assigned an attempt it already holds; ignoring"
                );
                return;
            }
            // Handed out by a claim that was in flight when the session ended: it ends too
            // (never spawned), and the server gets it back as it gets the others.
            if let Some(directive) = *self.lock_ending() {
                control.order(directive);
            }
            held.insert(
                key.clone(),
                HeldAttempt {
                    control,
                    stats: stats.clone(),
                    reserves: assignment.resources.unwrap_or_default(),
                },
            );
        }
        tracing::debug!(run_id = key.0, attempt = key.1, "claimed");
        // The reporter is made once the attempt has its slot: until its first report, the
        // next call waits for it (so starts go together), which must not be a wait on the
        // runs ahead of it in the local queue.
        let new_reporter = {
            let http = HttpReporter::new(self.client.clone(), self.worker_id.clone());
            let queue = self.queue.clone();
            move || Arc::new(BatchReporter::new(http, queue))
        };
        let options = SupervisorOptions {
            kill_grace: self.config.kill_grace,
            pass_env: self.config.pass_env.iter().cloned().collect(),
            run_shim: self.config.run_shim,
            run_host: self.config.run_host,
        };
        let held = self.held.clone();
        let freed = self.freed.clone();
        let slots = self.slots.clone();
        let needs = assignment.resources.unwrap_or_default();
        // Its place in the local queue is taken here, in the order runs were handed out.
        let now = match self.slots.try_acquire(needs) {
            Some(permit) => Ok((permit, new_reporter.clone()())),
            None => Err(self.slots.acquire(needs)),
        };
        let releaser = self.releaser.clone();
        self.tracker.spawn(async move {
            // `None`: it waited too long in the local queue and the server took it back.
            let reporter = match now {
                Ok((permit, reporter)) => {
                    stats.hold_slot(permit);
                    Some(reporter)
                }
                Err(place) => {
                    let release = || releaser.release(&key.0, key.1);
                    match wait_for_slot(place, directives.clone(), release).await {
                        SlotWait::Permit(permit) => {
                            stats.hold_slot(permit);
                            Some(new_reporter())
                        }
                        SlotWait::Ordered => Some(new_reporter()),
                        SlotWait::Released => {
                            // The pace it was taken at no longer holds: no reserve until a
                            // run ends and says what the pace is now.
                            slots.forget_pace();
                            None
                        }
                    }
                }
            };
            if let Some(reporter) = reporter {
                let end = supervise(assignment, reporter, stats, directives, options).await;
                tracing::debug!(run_id = key.0, attempt = key.1, ?end, "attempt over");
                if end == AttemptEnd::Unreported(Unreported::NeverStarted) {
                    // Stopping: the server takes it back uncounted (or, failing that, gets
                    // it back when this worker deregisters, as an ended attempt).
                    releaser.release(&key.0, key.1).await;
                }
            } else {
                tracing::debug!(
                    run_id = key.0,
                    attempt = key.1,
                    "waited too long in the local queue; handed back"
                );
            }
            held.lock().remove(&key);
            // A stored permit if the claim loop is not waiting: it looks again at once.
            freed.notify_one();
        });
    }

    /// The claim this worker makes now: as many runs as one answer may carry, within its
    /// capacity and its local queue's reserve.
    fn claim(&self) -> ReportClaim {
        let reserve = self.slots.reserve();
        ReportClaim {
            max_runs: self.config.max_runs_per_claim.max(1),
            reserve: (reserve.cpus > 0.0).then_some(reserve),
        }
    }

    fn lock_ending(&self) -> MutexGuard<'_, Option<Directive>> {
        crate::lock(&self.ending)
    }

    /// Orders every attempt held now, and any handed out later, to end.
    fn end_all(&self, directive: Directive) {
        // Under the held map's lock, so no launch slips between the two.
        let held = self.held.lock();
        *self.lock_ending() = Some(directive);
        for attempt in held.values() {
            attempt.control.order(directive);
        }
    }

    /// Until no attempt is held (a drain).
    async fn wait_idle(&self) {
        loop {
            let freed = self.freed.notified();
            if self.held.lock().is_empty() {
                return;
            }
            freed.await;
        }
    }
}

impl ClaimRider for Launcher {
    fn claim(&self) -> Option<ReportClaim> {
        self.claiming
            .load(Ordering::Relaxed)
            .then(|| Launcher::claim(self))
    }

    fn launch(&self, assignment: Assignment) {
        Launcher::launch(self, assignment);
    }
}

/// How an attempt's wait in the local queue ended.
enum SlotWait {
    /// Its room: it starts.
    Permit(SlotPermit),
    /// An order (a cancel, a shutdown) came first: it never starts.
    Ordered,
    /// It waited past [`MAX_QUEUE_WAIT`] and the server took it back.
    Released,
}

/// Waits for the attempt's room in the slots (`acquire`, its place in line), unless an order
/// comes first. Past [`MAX_QUEUE_WAIT`] it asks `release` to hand the attempt back, keeping
/// its place in line while it asks, and asks again each [`MAX_QUEUE_WAIT`] after that if the
/// server did not take it.
async fn wait_for_slot<F, R>(
    acquire: impl std::future::Future<Output = SlotPermit>,
    mut orders: watch::Receiver<Directive>,
    release: F,
) -> SlotWait
where
    F: Fn() -> R,
    R: std::future::Future<Output = bool>,
{
    tokio::pin!(acquire);
    let mut patience = Instant::now() + MAX_QUEUE_WAIT;
    loop {
        if *orders.borrow_and_update() != Directive::Run {
            return SlotWait::Ordered;
        }
        tokio::select! {
            permit = &mut acquire => return SlotWait::Permit(permit),
            changed = orders.changed() => {
                if changed.is_err() {
                    // No more orders can come: only the room is left to wait for.
                    return SlotWait::Permit(acquire.await);
                }
            }
            _ = tokio::time::sleep_until(patience) => {
                if release().await {
                    return SlotWait::Released;
                }
                patience = Instant::now() + MAX_QUEUE_WAIT;
            }
        }
    }
}

/// One heartbeat per interval for the worker and every attempt it holds, whether or not they
/// print; applies the answer's cancels and "not yours any more".
async fn heartbeat_loop(
    client: TetherClient,
    worker_id: String,
    interval: Duration,
    held: Held,
    forgotten: CancellationToken,
    stop: CancellationToken,
    draining: Arc<AtomicBool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // A heartbeat that takes longer than this is abandoned, so the next one goes out in time.
    let patience = interval.clamp(Duration::from_secs(2), Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let request = HeartbeatRequest {
            runs: held.beats(),
            draining: draining.load(Ordering::Relaxed),
        };
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(patience, client.heartbeat(&worker_id, &request)) => r,
        };
        match result {
            Ok(Ok(answer)) => apply(&held, &answer),
            Ok(Err(err)) if err.is_unknown_worker() => {
                forgotten.cancel();
                return;
            }
            Ok(Err(err)) => tracing::warn!(worker_id, %err, "heartbeat failed"),
            Err(_) => tracing::warn!(worker_id, ?patience, "heartbeat timed out"),
        }
    }
}

/// Keeps a control long-poll open, so a cancel reaches its attempt about one round trip after
/// it is asked rather than at the next heartbeat (which still carries it, as the fallback).
async fn control_loop(
    client: TetherClient,
    worker_id: String,
    wait: Duration,
    held: Held,
    stop: CancellationToken,
) {
    let request = ControlRequest {
        wait_ms: wait.as_millis() as u64,
    };
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = client.control(&worker_id, &request) => r,
        };
        let pause = match result {
            Ok(answer) => {
                backoff.reset();
                for run in &answer.cancel {
                    tracing::info!(
                        run_id = run.run_id,
                        attempt = run.attempt,
                        "cancel requested"
                    );
                    held.order(&run.run_id, run.attempt, Directive::Cancel);
                }
                None
            }
            // A server without the control call: the heartbeat carries cancels alone.
            Err(err) if err.code() == Some("no_route") => {
                tracing::info!("the server has no control channel; cancels arrive by heartbeat");
                return;
            }
            // The heartbeat loop handles a forgotten worker; this loop only waits.
            Err(err) => {
                tracing::debug!(worker_id, %err, "control poll failed; retrying");
                Some(backoff.next_delay())
            }
        };
        if let Some(pause) = pause {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

fn apply(held: &Held, answer: &HeartbeatResponse) {
    for run in &answer.cancel {
        tracing::info!(
            run_id = run.run_id,
            attempt = run.attempt,
            "cancel requested"
        );
        held.order(&run.run_id, run.attempt, Directive::Cancel);
    }
    for run in &answer.not_owned {
        let key = (run.run_id.clone(), run.attempt);
        // A heartbeat sent while the attempt's finish was landing, or answered after the
        // attempt ended here: the run ended as we said, nothing to kill.
        let ended = held.lock().get(&key).is_none_or(|h| h.stats.is_finishing());
        if ended {
            tracing::debug!(
                run_id = run.run_id,
                attempt = run.attempt,
                "finished meanwhile"
            );
        } else {
            tracing::warn!(
                run_id = run.run_id,
                attempt = run.attempt,
                "no longer ours; killing"
            );
        }
        held.order(&run.run_id, run.attempt, Directive::Abandon);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn one_cpu() -> Resources {
        Resources {
            cpus: 1.0,
            memory_mb: 1,
        }
    }

    /// Waits in a full one-cpu worker's local queue; `release` refuses the first `refusals`
    /// asks. Answers how the wait ended, how many asks were made, and how long it took.
    async fn wait_behind_a_full_slot(
        refusals: usize,
        frees_after: Option<Duration>,
    ) -> (SlotWait, usize, Duration) {
        let slots = Slots::new(one_cpu(), true);
        let running = slots.try_acquire(one_cpu()).unwrap();
        if let Some(after) = frees_after {
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                drop(running);
            });
        } else {
            std::mem::forget(running);
        }
        let (_orders_tx, orders) = watch::channel(Directive::Run);
        let asks = Arc::new(AtomicUsize::new(0));
        let release = || {
            let n = asks.fetch_add(1, Ordering::Relaxed);
            async move { n >= refusals }
        };
        let began = Instant::now();
        let end = wait_for_slot(slots.acquire(one_cpu()), orders, release).await;
        (end, asks.load(Ordering::Relaxed), began.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_waiting_past_the_limit_is_handed_back_asking_again_until_taken() {
        let (end, asks, took) = wait_behind_a_full_slot(1, None).await;
        assert!(matches!(end, SlotWait::Released));
        assert_eq!(asks, 2, "refused once, then taken back");
        assert!(took >= 2 * MAX_QUEUE_WAIT && took < 3 * MAX_QUEUE_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_whose_slot_frees_in_time_starts_without_asking() {
        let (end, asks, _) = wait_behind_a_full_slot(0, Some(MAX_QUEUE_WAIT / 2)).await;
        assert!(matches!(end, SlotWait::Permit(_)));
        assert_eq!(asks, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_hand_back_keeps_the_place_in_line() {
        // The slot frees while the first ask is refused: the run starts.
        let (end, asks, took) =
            wait_behind_a_full_slot(usize::MAX, Some(MAX_QUEUE_WAIT + MAX_QUEUE_WAIT / 2)).await;
        assert!(matches!(end, SlotWait::Permit(_)));
        assert_eq!(asks, 1);
        assert!(took < 2 * MAX_QUEUE_WAIT);
    }
}
