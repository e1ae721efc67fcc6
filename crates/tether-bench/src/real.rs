//! The real path (`--real`, issue 15): a `tether server` child process and real
//! `tether worker` processes, all spawned from the current executable, each run executing a
//! real command (`true` by default).
//!
//! Child processes, so each one's resident memory (`/proc/<pid>/status`) is its own. The
//! figures come from the runs' own stamps, read back over the API (`started_at`,
//! `finished_at`, `worker_id`, all by the store's clock, in milliseconds):
//! - **drain**: N runs queued with `POST /v1/runs/batch`, then W workers of C cpus started;
//!   runs/s from the first start to the last finish, and the refill gap: for each start on a
//!   worker whose C slots were full, the time since the earliest end not yet followed by a
//!   start on that worker (a backlog waits throughout, but for the last C runs);
//! - **idle**: one run at a time on the idle system, from just before its `POST /v1/runs` (the
//!   bench's wall clock) to its `started_at`;
//! - **backlog**: peak RSS of the server and of fresh workers while `--backlog` queued runs
//!   drain;
//! - **followers**: `--followers` SSE streams of one run: the server's RSS with them connected,
//!   and whether each follower's heartbeats arrive on time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde::Serialize;
use tether_api::{
    BatchSubmitRequest, LaneList, ListRunsQuery, RunView, SubmitRequest, TetherClient,
};
use tether_domain::{Resources, RunStatus};
use tokio::sync::Semaphore;

use crate::db::BenchDb;
use crate::{progress, BenchArgs, BenchError, Percentiles};

/// The most runs one `POST /v1/runs/batch` takes.
const BATCH: usize = 1000;
/// How often the drain's end and the processes' memory are looked at.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Heartbeat intervals each follower is watched for once all are connected.
const WATCHED_HEARTBEATS: u32 = 4;
/// Followers connecting at once (the rest wait their turn rather than overflow the listen
/// backlog).
const CONNECTING: usize = 256;

// ---- the report --------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub struct RealReport {
    /// `sqlite` or `postgres`.
    pub store: String,
    /// The database URL, without its password.
    pub database: String,
    pub command: Vec<String>,
    /// `tether worker` processes, and the CPUs each offers.
    pub workers: u32,
    pub cpus: u32,
    pub drain: Drain,
    pub idle: Option<Idle>,
    pub backlog: Option<Backlog>,
    pub followers: Option<Followers>,
}

impl RealReport {
    /// Every run succeeded exactly once, and every follower was connected and heard every
    /// heartbeat in time and the run's `end`.
    pub fn ok(&self) -> bool {
        self.drain.succeeded_once == self.drain.runs
            && self
                .idle
                .as_ref()
                .is_none_or(|i| i.succeeded_once == i.runs)
            && self
                .backlog
                .as_ref()
                .is_none_or(|b| b.succeeded_once == b.runs)
            && self.followers.as_ref().is_none_or(|f| {
                f.connected == f.followers && f.on_time == f.followers && f.ended == f.followers
            })
    }
}

/// One process's resident memory, from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rss {
    /// `VmRSS`: now.
    pub rss_kib: u64,
    /// `VmHWM`: the most it ever had.
    pub hwm_kib: u64,
}

/// N queued runs drained by W workers.
#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    pub runs: u64,
    /// Queuing them with `POST /v1/runs/batch`, before any worker started.
    pub submit_seconds: f64,
    /// From the first run's `started_at` to the last run's `finished_at`.
    pub seconds: f64,
    pub runs_per_s: f64,
    /// From a run's end to the next start on the same worker, while runs waited.
    pub refill_gap_ms: Percentiles,
    /// Runs that ended `succeeded` on their one counted attempt (attempts a worker handed
    /// back unstarted do not count: the command ran once).
    pub succeeded_once: u64,
    /// Runs a worker handed back unstarted at least once (they waited past its local
    /// queue's limit).
    pub handed_back: u64,
    /// Runs each worker ran, by worker id.
    pub runs_per_worker: BTreeMap<String, u64>,
}

/// One run at a time on an idle system.
#[derive(Debug, Clone, Serialize)]
pub struct Idle {
    pub runs: u64,
    /// From just before the `POST /v1/runs` to the run's `started_at`.
    pub submit_to_start_ms: Percentiles,
    pub succeeded_once: u64,
}

/// Memory while a big backlog drains.
#[derive(Debug, Clone, Serialize)]
pub struct Backlog {
    pub runs: u64,
    pub submit_seconds: f64,
    /// From the workers' start until nothing was pending or in flight.
    pub drain_seconds: f64,
    pub runs_per_s: f64,
    pub succeeded_once: u64,
    /// Runs a worker handed back unstarted at least once.
    pub handed_back: u64,
    /// The server before the backlog was queued, once it was queued, and after the drain.
    pub server_before: Rss,
    pub server_queued: Rss,
    pub server_after: Rss,
    /// The most `VmRSS` the server had at any sample during the drain.
    pub server_peak_rss_kib: u64,
    /// The most `VmHWM` of any one worker (fresh processes, started for this drain).
    pub worker_peak_hwm_kib: u64,
    /// The workers' `VmRSS` at the end of the drain, the largest.
    pub worker_after_rss_kib: u64,
}

/// Many followers of one run's event stream.
#[derive(Debug, Clone, Serialize)]
pub struct Followers {
    pub followers: u64,
    /// Followers that got their first frame.
    pub connected: u64,
    pub connect_seconds: f64,
    pub heartbeat_interval_ms: f64,
    /// How long they were watched once all were connected.
    pub watched_seconds: f64,
    /// Followers whose every heartbeat in the watch came at most 1.5 intervals after the one
    /// before (and the watch did not end longer than that after the last).
    pub on_time: u64,
    /// Every gap between two heartbeats of one follower within the watch.
    pub heartbeat_gap_ms: Percentiles,
    pub server_before: Rss,
    /// At the end of the watch, all connected.
    pub server_connected: Rss,
    /// (`server_connected` − `server_before`) / followers, of `VmRSS`.
    pub per_follower_kib: f64,
    /// Followers whose stream ended with the run's `end` once it was cancelled.
    pub ended: u64,
}

// ---- processes ---------------------------------------------------------------------------------

/// A `tether` child process; killed if dropped without `stop`.
struct Child {
    process: tokio::process::Child,
    pid: u32,
}

impl Child {
    fn spawn(exe: &PathBuf, args: &[String]) -> Result<Child, BenchError> {
        let mut command = tokio::process::Command::new(exe);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // The bench's own TETHER_* settings (tokens, a database, a config) are not the
        // children's: they get only their flags, and say only what goes wrong.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("TETHER_") {
                command.env_remove(name);
            }
        }
        command.env("TETHER_LOG", "warn");
        let process = command.spawn()?;
        let pid = process
            .id()
            .ok_or_else(|| BenchError::Failed("a child exited as it started".into()))?;
        Ok(Child { process, pid })
    }

    fn rss(&self) -> Rss {
        rss_of(self.pid)
    }

    /// SIGTERM (a worker deregisters, a server stops gracefully), then SIGKILL after 15 s.
    async fn stop(mut self) {
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(15), self.process.wait())
            .await
            .is_err()
        {
            let _ = self.process.kill().await;
        }
    }
}

/// `VmRSS` and `VmHWM` of a process; zeros once it is gone.
fn rss_of(pid: u32) -> Rss {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Rss {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
    }
}

/// A port free now on loopback, for the server child to listen on.
fn free_port() -> Result<u16, BenchError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Lets this process hold `wanted` files open, up to the hard limit.
fn raise_open_files(wanted: u64) -> Result<(), BenchError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| BenchError::Failed(format!("reading the open-files limit: {e}")))?;
    if soft >= wanted {
        return Ok(());
    }
    if hard < wanted {
        return Err(BenchError::Usage(format!(
            "--followers needs about {wanted} open files here; the hard limit is {hard}"
        )));
    }
    setrlimit(Resource::RLIMIT_NOFILE, wanted, hard)
        .map_err(|e| BenchError::Failed(format!("raising the open-files limit: {e}")))
}

/// The server and its workers.
struct Fleet {
    exe: PathBuf,
    server: Child,
    base: String,
    client: TetherClient,
    http: reqwest::Client,
    workers: Vec<Child>,
    /// Fresh names for each set of workers.
    generation: u32,
}

impl Fleet {
    async fn start(args: &BenchArgs, db: &BenchDb) -> Result<Fleet, BenchError> {
        let exe = std::env::current_exe()?;
        let listen = format!("127.0.0.1:{}", free_port()?);
        let server_args = vec![
            "server".to_string(),
            "--listen".into(),
            listen.clone(),
            "--database".into(),
            db.server_url(),
            "--sse-heartbeat".into(),
            format!("{}ms", args.sse_heartbeat.as_millis()),
            "--max-connections".into(),
            (args.followers as usize + 1024).max(8192).to_string(),
        ];
        let server = Child::spawn(&exe, &server_args)?;
        let base = format!("http://{listen}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ready = http
                .get(format!("{base}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                break;
            }
            if Instant::now() > deadline {
                return Err(BenchError::Failed(format!(
                    "the server on {listen} was not ready within 120 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Fleet {
            exe,
            server,
            client: TetherClient::new(&base, None)?,
            base,
            http,
            workers: Vec::new(),
            generation: 0,
        })
    }

    /// Starts `count` workers of `cpus` each and waits until all are registered.
    async fn start_workers(&mut self, count: u32, cpus: u32) -> Result<(), BenchError> {
        self.generation += 1;
        let names: Vec<String> = (0..count)
            .map(|i| format!("bench-{}-{i}", self.generation))
            .collect();
        for name in &names {
            let args = vec![
                "worker".to_string(),
                "--server".into(),
                self.base.clone(),
                "--name".into(),
                name.clone(),
                "--cpus".into(),
                cpus.to_string(),
                // Room for `cpus` runs of the default size, so CPUs alone bound the slots.
                "--memory-mb".into(),
                (u64::from(cpus) * Resources::default().memory_mb).to_string(),
            ];
            self.workers.push(Child::spawn(&self.exe, &args)?);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let listed = self.client.list_workers().await?;
            let up = listed
                .workers
                .iter()
                .filter(|w| names.contains(&w.name))
                .count();
            if up == names.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Failed(format!(
                    "{up} of {count} workers registered within 60 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop_workers(&mut self) {
        for worker in std::mem::take(&mut self.workers) {
            worker.stop().await;
        }
    }

    /// The default lane's pending and in-flight runs.
    async fn queue(&self) -> Result<(i64, i64), BenchError> {
        let lanes: LaneList = self
            .http
            .get(format!("{}/v1/lanes", self.base))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| BenchError::Failed(format!("GET /v1/lanes: {e}")))?
            .json()
            .await
            .map_err(|e| BenchError::Failed(format!("GET /v1/lanes: {e}")))?;
        Ok(lanes
            .lanes
            .iter()
            .find(|l| l.name == "default")
            .map(|l| (l.pending, l.in_flight))
            .unwrap_or((0, 0)))
    }

    /// Queues `n` runs of `command`, 1,000 per call; their ids.
    async fn submit(&self, command: &[String], n: u64) -> Result<Vec<String>, BenchError> {
        let mut ids = Vec::with_capacity(n as usize);
        let mut left = n as usize;
        while left > 0 {
            let k = left.min(BATCH);
            let request = BatchSubmitRequest {
                runs: vec![
                    SubmitRequest {
                        command: command.to_vec(),
                        ..SubmitRequest::default()
                    };
                    k
                ],
            };
            let answer = self.client.submit_batch(&request).await?;
            ids.extend(answer.runs.into_iter().map(|r| r.id));
            left -= k;
        }
        Ok(ids)
    }

    async fn stop(mut self) {
        self.stop_workers().await;
        self.server.stop().await;
    }
}

// ---- the passes --------------------------------------------------------------------------------

pub(crate) async fn run(args: &BenchArgs, db: &BenchDb) -> Result<RealReport, BenchError> {
    if args.followers > 0 {
        raise_open_files(args.followers + 1024)?;
    }
    progress(args, "starting a server…");
    let mut fleet = Fleet::start(args, db).await?;
    let result = passes(args, db, &mut fleet).await;
    fleet.stop().await;
    result
}

fn command_of(args: &BenchArgs) -> Vec<String> {
    args.command
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn real_workers(args: &BenchArgs) -> u32 {
    args.workers.unwrap_or(1)
}

async fn passes(
    args: &BenchArgs,
    db: &BenchDb,
    fleet: &mut Fleet,
) -> Result<RealReport, BenchError> {
    let command = command_of(args);
    let workers = real_workers(args);
    progress(
        args,
        &format!(
            "{} runs of `{}` queued, then drained by {workers} worker(s) of {} cpus…",
            args.runs, args.command, args.cpus
        ),
    );
    let drain = drain(args, fleet, &command).await?;
    let idle = if args.paced > 0 {
        progress(args, &format!("{} runs one at a time…", args.paced));
        Some(idle(args, fleet, &command).await?)
    } else {
        None
    };
    fleet.stop_workers().await;
    let backlog = if args.backlog > 0 {
        progress(
            args,
            &format!(
                "{} runs queued, then drained by fresh workers…",
                args.backlog
            ),
        );
        let backlog = backlog(args, fleet, &command).await;
        fleet.stop_workers().await;
        Some(backlog?)
    } else {
        None
    };
    let followers = if args.followers > 0 {
        progress(args, &format!("{} followers of one run…", args.followers));
        Some(followers(args, fleet).await?)
    } else {
        None
    };
    Ok(RealReport {
        store: db.kind().to_string(),
        database: db.label(),
        command,
        workers,
        cpus: args.cpus,
        drain,
        idle,
        backlog,
        followers,
    })
}

/// Waits until nothing is pending or in flight, calling `sample` at each look. Until `last`
/// (the run queued last) has ended it reads that one run only: counting the lane reads every
/// unfinished run, which on a long queue would cost the server more than the drain itself.
async fn wait_drained(
    fleet: &Fleet,
    runs: u64,
    mut last: Option<&str>,
    mut sample: impl FnMut(),
) -> Result<(), BenchError> {
    // Generous: a drain that makes no progress for this long is broken, not slow.
    let limit = Duration::from_secs(600) + Duration::from_millis(runs.saturating_mul(50));
    let deadline = Instant::now() + limit;
    loop {
        sample();
        if let Some(id) = last {
            if fleet.client.get_run(id).await?.status.is_terminal() {
                last = None;
            }
        }
        if last.is_none() && fleet.queue().await? == (0, 0) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Failed(format!(
                "the queue did not drain within {} s",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

/// A run's stamps, in milliseconds by the store's clock.
struct Stamps {
    worker_id: Option<String>,
    started: Option<i64>,
    finished: Option<i64>,
    succeeded_once: bool,
    handed_back: bool,
}

fn stamp_ms(text: Option<&str>) -> Option<i64> {
    let t = humantime::parse_rfc3339(text?).ok()?;
    t.duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as i64)
}

impl Stamps {
    fn of(run: &RunView) -> Stamps {
        // A finished run names no worker; its attempts do (on `GET /v1/runs/{id}` only).
        let attempt_worker = run
            .attempts
            .as_ref()
            .and_then(|attempts| attempts.iter().find(|a| a.attempt == run.attempt))
            .map(|a| a.worker_id.clone());
        Stamps {
            worker_id: run.worker_id.clone().or(attempt_worker),
            started: stamp_ms(run.started_at.as_deref()),
            finished: stamp_ms(run.finished_at.as_deref()),
            succeeded_once: run.status == RunStatus::Succeeded
                && run.attempt == 1 + run.released_attempts,
            handed_back: run.released_attempts > 0,
        }
    }
}

/// The stamps of the runs named in `ids`, read page by page from `GET /v1/runs`.
async fn read_stamps(
    client: &TetherClient,
    ids: &[String],
) -> Result<HashMap<String, Stamps>, BenchError> {
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut found = HashMap::with_capacity(ids.len());
    let mut query = ListRunsQuery {
        limit: Some(500),
        ..ListRunsQuery::default()
    };
    loop {
        let page = client.list_runs(&query).await?;
        for run in &page.runs {
            if wanted.contains(run.id.as_str()) {
                found.insert(run.id.clone(), Stamps::of(run));
            }
        }
        match page.next_cursor {
            Some(cursor) if found.len() < wanted.len() => query.cursor = Some(cursor),
            _ => return Ok(found),
        }
    }
}

/// The stamps of each run, with the worker that ran it, one `GET /v1/runs/{id}` each.
async fn read_runs(
    client: &TetherClient,
    ids: &[String],
) -> Result<HashMap<String, Stamps>, BenchError> {
    let reads = futures::stream::iter(ids)
        .map(|id| async move { client.get_run(id).await })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    let mut found = HashMap::with_capacity(ids.len());
    for run in reads {
        let run = run?;
        found.insert(run.id.clone(), Stamps::of(&run));
    }
    Ok(found)
}

/// For each start on a worker whose `slots` were all taken, the time since the slot it took
/// was freed: the earliest end on that worker not yet followed by a start.
fn refill_gaps(runs: &[&Stamps], slots: usize) -> Vec<f64> {
    let mut by_worker: HashMap<&str, Vec<(i64, i64)>> = HashMap::new();
    for run in runs {
        if let (Some(worker), Some(start), Some(end)) =
            (run.worker_id.as_deref(), run.started, run.finished)
        {
            by_worker.entry(worker).or_default().push((start, end));
        }
    }
    let mut gaps = Vec::new();
    for spans in by_worker.values_mut() {
        spans.sort_unstable();
        let mut ends: BinaryHeap<Reverse<i64>> = BinaryHeap::new();
        for &(start, end) in spans.iter() {
            if ends.len() == slots {
                if let Some(Reverse(freed)) = ends.pop() {
                    gaps.push((start - freed).max(0) as f64);
                }
            }
            ends.push(Reverse(end));
        }
    }
    gaps
}

async fn drain(
    args: &BenchArgs,
    fleet: &mut Fleet,
    command: &[String],
) -> Result<Drain, BenchError> {
    let t = Instant::now();
    let ids = fleet.submit(command, args.runs).await?;
    let submit_seconds = t.elapsed().as_secs_f64();
    fleet.start_workers(real_workers(args), args.cpus).await?;
    wait_drained(fleet, args.runs, ids.last().map(String::as_str), || {}).await?;
    let stamps = read_runs(&fleet.client, &ids).await?;
    let runs: Vec<&Stamps> = stamps.values().collect();
    let first = runs.iter().filter_map(|r| r.started).min().unwrap_or(0);
    let last = runs.iter().filter_map(|r| r.finished).max().unwrap_or(0);
    let seconds = ((last - first).max(0) as f64) / 1000.0;
    let mut runs_per_worker = BTreeMap::new();
    for run in &runs {
        if let Some(worker) = &run.worker_id {
            *runs_per_worker.entry(worker.clone()).or_insert(0) += 1;
        }
    }
    Ok(Drain {
        runs: args.runs,
        submit_seconds,
        seconds,
        runs_per_s: if seconds > 0.0 {
            args.runs as f64 / seconds
        } else {
            0.0
        },
        refill_gap_ms: Percentiles::of(refill_gaps(&runs, args.cpus as usize)),
        succeeded_once: runs.iter().filter(|r| r.succeeded_once).count() as u64,
        handed_back: runs.iter().filter(|r| r.handed_back).count() as u64,
        runs_per_worker,
    })
}

fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

async fn idle(args: &BenchArgs, fleet: &Fleet, command: &[String]) -> Result<Idle, BenchError> {
    let request = SubmitRequest {
        command: command.to_vec(),
        ..SubmitRequest::default()
    };
    let mut latencies = Vec::new();
    let mut succeeded_once = 0;
    for _ in 0..args.paced {
        let sent = wall_ms();
        let run = fleet.client.submit(&request).await?;
        // Waits on the run's own event stream, so nothing polls the idle system.
        let mut events = fleet.client.events(&run.id, None, true);
        while let Some(item) = events.next().await {
            if item?.is_end() {
                break;
            }
        }
        drop(events);
        let run = fleet.client.get_run(&run.id).await?;
        let stamps = Stamps::of(&run);
        if let Some(started) = stamps.started {
            latencies.push((started as f64 - sent).max(0.0));
        }
        if stamps.succeeded_once {
            succeeded_once += 1;
        }
    }
    Ok(Idle {
        runs: args.paced,
        submit_to_start_ms: Percentiles::of(latencies),
        succeeded_once,
    })
}

async fn backlog(
    args: &BenchArgs,
    fleet: &mut Fleet,
    command: &[String],
) -> Result<Backlog, BenchError> {
    let server_before = fleet.server.rss();
    let t = Instant::now();
    let ids = fleet.submit(command, args.backlog).await?;
    let submit_seconds = t.elapsed().as_secs_f64();
    let server_queued = fleet.server.rss();
    let t = Instant::now();
    fleet.start_workers(real_workers(args), args.cpus).await?;
    let mut server_peak_rss_kib = server_queued.rss_kib;
    let mut worker_peak_hwm_kib = 0;
    let mut worker_after_rss_kib = 0;
    let (server, workers) = (&fleet.server, &fleet.workers);
    let mut look = || {
        server_peak_rss_kib = server_peak_rss_kib.max(server.rss().rss_kib);
        worker_after_rss_kib = 0;
        for worker in workers {
            let rss = worker.rss();
            worker_peak_hwm_kib = worker_peak_hwm_kib.max(rss.hwm_kib);
            worker_after_rss_kib = worker_after_rss_kib.max(rss.rss_kib);
        }
    };
    wait_drained(
        fleet,
        args.backlog,
        ids.last().map(String::as_str),
        &mut look,
    )
    .await?;
    look();
    let drain_seconds = t.elapsed().as_secs_f64();
    let server_after = fleet.server.rss();
    let stamps = read_stamps(&fleet.client, &ids).await?;
    Ok(Backlog {
        runs: args.backlog,
        submit_seconds,
        drain_seconds,
        runs_per_s: args.backlog as f64 / drain_seconds.max(f64::EPSILON),
        succeeded_once: stamps.values().filter(|r| r.succeeded_once).count() as u64,
        handed_back: stamps.values().filter(|r| r.handed_back).count() as u64,
        server_before,
        server_queued,
        server_after,
        server_peak_rss_kib,
        worker_peak_hwm_kib,
        worker_after_rss_kib,
    })
}

/// What one follower saw.
#[derive(Default)]
struct Followed {
    heartbeats: Vec<Instant>,
    ended: bool,
    error: Option<String>,
}

async fn follow_one(
    client: TetherClient,
    run_id: String,
    connecting: Arc<Semaphore>,
    connected: Arc<AtomicU64>,
) -> Followed {
    let mut permit = connecting.acquire_owned().await.ok();
    let mut seen = Followed::default();
    let mut stream = client.events(&run_id, None, true);
    while let Some(item) = stream.next().await {
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                seen.error = Some(e.to_string());
                break;
            }
        };
        if permit.take().is_some() {
            connected.fetch_add(1, Ordering::SeqCst);
        }
        if item.event == "heartbeat" {
            seen.heartbeats.push(Instant::now());
        }
        if item.is_end() {
            seen.ended = true;
            break;
        }
    }
    seen
}

async fn followers(args: &BenchArgs, fleet: &Fleet) -> Result<Followers, BenchError> {
    // No worker runs now, so the run stays pending while it is followed.
    let request = SubmitRequest {
        command: vec!["true".into()],
        ..SubmitRequest::default()
    };
    let run = fleet.client.submit(&request).await?;
    let server_before = fleet.server.rss();
    let connecting = Arc::new(Semaphore::new(CONNECTING));
    let connected = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let tasks: Vec<_> = (0..args.followers)
        .map(|_| {
            tokio::spawn(follow_one(
                fleet.client.clone(),
                run.id.clone(),
                connecting.clone(),
                connected.clone(),
            ))
        })
        .collect();
    let deadline = t + Duration::from_secs(300);
    while connected.load(Ordering::SeqCst) < args.followers && Instant::now() < deadline {
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let connect_seconds = t.elapsed().as_secs_f64();
    let interval = args.sse_heartbeat;
    let watch_from = Instant::now();
    // The watch is the measurement itself: heartbeats are what is being timed.
    tokio::time::sleep(interval * WATCHED_HEARTBEATS).await;
    let watch_to = Instant::now();
    let server_connected = fleet.server.rss();
    fleet.client.cancel_run(&run.id).await?;
    let mut seen = Vec::with_capacity(tasks.len());
    let ends_by = Instant::now() + Duration::from_secs(120);
    for task in tasks {
        let left = ends_by.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, task).await {
            Ok(Ok(followed)) => seen.push(followed),
            Ok(Err(e)) => seen.push(Followed {
                error: Some(e.to_string()),
                ..Followed::default()
            }),
            Err(_) => seen.push(Followed::default()),
        }
    }
    if let Some(error) = seen.iter().find_map(|f| f.error.clone()) {
        progress(args, &format!("a follower's stream failed: {error}"));
    }
    let late = interval.mul_f64(1.5);
    let mut gaps = Vec::new();
    let mut on_time = 0;
    for followed in &seen {
        let mut timely = true;
        let mut last_in_watch = None;
        for pair in followed.heartbeats.windows(2) {
            let (before, after) = (pair[0], pair[1]);
            if after < watch_from || after > watch_to {
                continue;
            }
            let gap = after.duration_since(before);
            gaps.push(gap.as_secs_f64() * 1000.0);
            timely &= gap <= late;
            last_in_watch = Some(after);
        }
        // A follower that heard nothing for the watch's last 1.5 intervals is late too.
        timely &= last_in_watch.is_some_and(|at| watch_to.duration_since(at) <= late);
        if timely {
            on_time += 1;
        }
    }
    let rss_delta = server_connected
        .rss_kib
        .saturating_sub(server_before.rss_kib);
    Ok(Followers {
        followers: args.followers,
        connected: connected.load(Ordering::SeqCst),
        connect_seconds,
        heartbeat_interval_ms: interval.as_secs_f64() * 1000.0,
        watched_seconds: watch_to.duration_since(watch_from).as_secs_f64(),
        on_time,
        heartbeat_gap_ms: Percentiles::of(gaps),
        server_before,
        server_connected,
        per_follower_kib: rss_delta as f64 / args.followers as f64,
        ended: seen.iter().filter(|f| f.ended).count() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(worker: &str, started: i64, finished: i64) -> Stamps {
        Stamps {
            worker_id: Some(worker.into()),
            started: Some(started),
            finished: Some(finished),
            succeeded_once: true,
            handed_back: false,
        }
    }

    #[test]
    fn a_refill_gap_runs_from_the_earliest_free_slot_to_the_next_start_on_that_worker() {
        let runs = [
            // Worker a, two slots: both taken at 0; one frees at 10, refilled at 12; the
            // other frees at 11, refilled at 20.
            span("a", 0, 10),
            span("a", 0, 11),
            span("a", 12, 30),
            span("a", 20, 25),
            // Worker b, its own slots: a start before its slots fill is no refill.
            span("b", 5, 6),
        ];
        let refs: Vec<&Stamps> = runs.iter().collect();
        let mut gaps = refill_gaps(&refs, 2);
        gaps.sort_by(f64::total_cmp);
        assert_eq!(gaps, vec![2.0, 9.0]);
    }

    #[test]
    fn rss_reads_this_process() {
        let rss = rss_of(std::process::id());
        assert!(rss.rss_kib > 0 && rss.hwm_kib >= rss.rss_kib, "{rss:?}");
    }
}
