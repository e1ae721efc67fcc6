//! `tether bench` (method and figures in `BENCHMARKS.md`), a library the `tether` binary calls
//! for its `bench` subcommand.
//!
//! Two paths:
//! - **synthetic** (the default, `synthetic.rs`): an in-process server driven over real HTTP by
//!   batch submitters and synthetic workers that speak the real worker's batched protocol
//!   (claims, and report calls carrying many starts and finishes that claim the room they
//!   free) for runs that end as soon as they are handed out, without spawning anything: the
//!   system's own cost per run. Optionally a long history is seeded straight into
//!   the store and the reaper, a list and a claim are timed against it.
//! - **real** (`--real`, `real.rs`): a `tether server` child process and real `tether worker`
//!   processes, all spawned from the current executable, running a real command: runs/s
//!   draining a queue, the refill gap, submit→start on an idle system, peak RSS while a backlog
//!   drains, and thousands of SSE followers of one run.

mod db;
mod real;
mod render;
mod stats;
mod synthetic;

use std::time::Duration;

use clap::Args;
use serde::Serialize;
use tether_api::ClientError;
use tether_store::StoreError;

pub use real::{Backlog, Drain, Followers, Idle, RealReport, Rss};
pub use stats::{percentile, Percentiles};
pub use synthetic::{BigTable, SyntheticReport, Throughput};

/// The most runs one claim may ask for (the server's own ceiling).
const MAX_CLAIM_BATCH: u32 = 64;
/// The most runs one `POST /v1/runs/batch` may carry (the server's own ceiling).
const MAX_SUBMIT_BATCH: u32 = 1_000;

fn duration(text: &str) -> Result<Duration, String> {
    tether_domain::time::parse_duration_ms(text).map(Duration::from_millis)
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// `sqlite://PATH` or `postgres://…` (default: a fresh SQLite file in a temporary
    /// directory, removed afterwards). On PostgreSQL the bench works in a schema of its own,
    /// `tether_bench_…`, which it creates and drops.
    #[arg(long)]
    pub database: Option<String>,
    /// Runs pushed through the whole cycle (with --real: queued in batches, then drained).
    #[arg(long, default_value_t = 2000)]
    pub runs: u64,
    /// Synthetic workers: HTTP clients that claim, start and finish without spawning anything
    /// (default 4); with --real, `tether worker` processes (default 1).
    #[arg(long)]
    pub workers: Option<u32>,
    /// Concurrent submitters.
    #[arg(long, default_value_t = 8)]
    pub concurrency: u32,
    /// Synthetic path: the runs each worker keeps in flight, its slots (each claim may take
    /// this many).
    #[arg(long, default_value_t = 16)]
    pub claim_batch: u32,
    /// Runs per `POST /v1/runs/batch` of the synthetic path's submitters (1: one
    /// `POST /v1/runs` per run).
    #[arg(long, default_value_t = 250)]
    pub submit_batch: u32,
    /// Synthetic path: every Nth run prints one line, uploaded by a logs call of its own as a
    /// worker uploads output (0: no run prints, as `true` does not).
    #[arg(long, default_value_t = 0)]
    pub log_every: u64,
    /// Synthetic path: the old per-run calls instead of the batched protocol (one
    /// `POST /v1/runs` per run; one start and one finish call per run, each synthetic worker
    /// claiming only once its batch has finished), for comparison.
    #[arg(long)]
    pub single_calls: bool,
    /// Follow the events of every Nth run over SSE to its `end` (0: none).
    #[arg(long, default_value_t = 50)]
    pub follow_every: u64,
    /// Finished runs written straight into the store before the reaper, a list and a claim
    /// are timed against the big table (0 skips that part).
    #[arg(long, default_value_t = 1_000_000)]
    pub seed_finished: u64,
    /// How many times each big-table call is timed.
    #[arg(long, default_value_t = 50)]
    pub samples: u32,
    /// Then this many runs submitted one at a time, each once the one before has started:
    /// submit-to-start latency on an idle system, where it is the wake-up path alone and not
    /// the queue of a saturated one (0 skips that part).
    #[arg(long, default_value_t = 200)]
    pub paced: u64,
    /// Real workers: a `tether server` child process and `tether worker` processes spawned
    /// from this executable, running --command, instead of synthetic workers.
    #[arg(long)]
    pub real: bool,
    /// With --real: the command each run executes, split on spaces.
    #[arg(long, default_value = "true")]
    pub command: String,
    /// With --real: CPUs each worker offers (each run takes one).
    #[arg(long, default_value_t = 8)]
    pub cpus: u32,
    /// With --real: runs queued before fresh workers start, to record the server's and the
    /// workers' peak RSS while they drain (0 skips that part).
    #[arg(long, default_value_t = 0)]
    pub backlog: u64,
    /// With --real: SSE followers of one run, to record the server's RSS with them connected
    /// and whether every follower's heartbeats arrive on time (0 skips that part).
    #[arg(long, default_value_t = 0)]
    pub followers: u64,
    /// With --real: the server's SSE heartbeat interval (its --sse-heartbeat); each follower
    /// is watched for four of them.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub sse_heartbeat: Duration,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// What can stop a bench, said plainly.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    /// The bench ran but something in it went wrong (a run lost, a call refused).
    #[error("bench failed: {0}")]
    Failed(String),
    #[error("{what}: {source}")]
    Store {
        what: &'static str,
        #[source]
        source: StoreError,
    },
    #[error(transparent)]
    Start(#[from] tether_server::StartError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn store_error(what: &'static str) -> impl FnOnce(StoreError) -> BenchError {
    move |source| BenchError::Store { what, source }
}

/// One bench's findings.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Report {
    Synthetic(Box<SyntheticReport>),
    Real(Box<RealReport>),
}

impl Report {
    /// Every run succeeded exactly once (with all its events, on the synthetic path), in every
    /// pass, and every follower heard every heartbeat in time.
    pub fn ok(&self) -> bool {
        match self {
            Report::Synthetic(r) => r.ok(),
            Report::Real(r) => r.ok(),
        }
    }

    /// The report for a person.
    pub fn render(&self) -> String {
        match self {
            Report::Synthetic(r) => render::synthetic(r),
            Report::Real(r) => render::real(r),
        }
    }
}

/// Runs the bench; the exit status is 0 only if every check passed.
pub async fn bench(args: BenchArgs) -> Result<u8, BenchError> {
    let report = measure(&args).await?;
    if args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| BenchError::Usage(format!("cannot write the report: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", report.render());
    }
    if report.ok() {
        Ok(0)
    } else {
        eprintln!("tether bench: some checks failed (see the report)");
        Ok(1)
    }
}

/// Runs the bench and hands back its report, printing nothing but progress (on stderr, unless
/// `--json`).
pub async fn measure(args: &BenchArgs) -> Result<Report, BenchError> {
    validate(args)?;
    let db = db::BenchDb::open(args.database.as_deref()).await?;
    let result = if args.real {
        real::run(args, &db)
            .await
            .map(|r| Report::Real(Box::new(r)))
    } else {
        synthetic::run(args, &db)
            .await
            .map(|r| Report::Synthetic(Box::new(r)))
    };
    db.cleanup().await;
    result
}

fn validate(args: &BenchArgs) -> Result<(), BenchError> {
    if args.runs == 0
        || args.workers == Some(0)
        || args.concurrency == 0
        || args.samples == 0
        || args.cpus == 0
    {
        return Err(BenchError::Usage(
            "--runs, --workers, --concurrency, --samples and --cpus must be at least 1".into(),
        ));
    }
    if !(1..=MAX_CLAIM_BATCH).contains(&args.claim_batch) {
        return Err(BenchError::Usage(format!(
            "--claim-batch must be 1 to {MAX_CLAIM_BATCH}"
        )));
    }
    if !(1..=MAX_SUBMIT_BATCH).contains(&args.submit_batch) {
        return Err(BenchError::Usage(format!(
            "--submit-batch must be 1 to {MAX_SUBMIT_BATCH}"
        )));
    }
    if args.real && args.command.split_whitespace().next().is_none() {
        return Err(BenchError::Usage("--command must name a program".into()));
    }
    if args.sse_heartbeat < Duration::from_millis(100) {
        return Err(BenchError::Usage(
            "--sse-heartbeat must be at least 100ms".into(),
        ));
    }
    Ok(())
}

fn progress(args: &BenchArgs, text: &str) {
    if !args.json {
        eprintln!("tether bench: {text}");
    }
}
