//! Prometheus metrics, rendered by `GET /metrics`.
//!
//! The recorder is installed when the process starts ([`install`], called first thing by the
//! binary and again by [`crate::start`]), so nothing counted before the first scrape is lost.
//! One recorder per process: several servers in one test process share it. Every series is
//! described here, so each carries `# HELP`. Labels are bounded: lanes and pools come from
//! the config (an unknown lane is refused before anything is counted), statuses and error
//! codes are enums, routes are the router's templates; never a run id.
//!
//! Gauges read from the store (runs per lane and status, queue age, workers) are set by
//! [`export_store_gauges`] when `/metrics` is scraped.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tether_domain::time::age_s;
use tether_domain::{judge_worker, ErrorCode, Millis, RunStatus, WorkerState};
use tether_store::RunRecord;

use crate::AppState;

pub const RUNS_CREATED: &str = "tether_runs_created_total";
pub const RUNS_REFUSED: &str = "tether_runs_refused_total";
pub const ATTEMPTS_FINISHED: &str = "tether_attempts_finished_total";
pub const RUNS_REAPED: &str = "tether_runs_reaped_total";
pub const RETRIES: &str = "tether_retries_total";
pub const STALE_ATTEMPT_REFUSALS: &str = "tether_stale_attempt_refusals_total";
pub const SSE_CONNECTIONS: &str = "tether_sse_connections_total";
pub const RUNS_CLAIMED: &str = "tether_runs_claimed_total";
pub const RUNS_HANDED_OFF: &str = "tether_runs_handed_off_total";
pub const RUN_DURATION: &str = "tether_run_duration_seconds";
pub const QUEUE_WAIT: &str = "tether_queue_wait_seconds";
pub const CLAIM_WAIT: &str = "tether_claim_wait_seconds";
pub const HTTP_DURATION: &str = "tether_http_request_duration_seconds";
pub const REAPER_SWEEP: &str = "tether_reaper_sweep_seconds";
pub const RUNS: &str = "tether_runs";
pub const OLDEST_PENDING_AGE: &str = "tether_oldest_pending_age_seconds";
pub const WORKERS: &str = "tether_workers";
pub const OLDEST_WORKER_HEARTBEAT_AGE: &str = "tether_worker_oldest_heartbeat_age_seconds";
pub const EVENT_FOLLOWERS: &str = "tether_event_followers";

/// Seconds to hours: run durations and queue waits.
const LONG_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    7200.0, 14400.0, 43200.0,
];

/// Milliseconds to a minute: HTTP requests and claim long-polls.
const SHORT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder and describes every series, once per process. Does nothing if
/// another recorder was installed first.
pub fn install() {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new();
        let builder = [RUN_DURATION, QUEUE_WAIT]
            .iter()
            .try_fold(builder, |b, name| {
                b.set_buckets_for_metric(Matcher::Full(name.to_string()), LONG_BUCKETS)
            })
            .and_then(|b| {
                [CLAIM_WAIT, HTTP_DURATION, REAPER_SWEEP]
                    .iter()
                    .try_fold(b, |b, name| {
                        b.set_buckets_for_metric(Matcher::Full(name.to_string()), SHORT_BUCKETS)
                    })
            });
        let builder = match builder {
            Ok(builder) => builder,
            Err(e) => {
                tracing::warn!(error = %e, "metrics buckets refused; using summaries");
                PrometheusBuilder::new()
            }
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let installed = metrics::set_global_recorder(recorder).ok().map(|_| handle);
        describe();
        installed
    });
}

fn describe() {
    describe_counter!(RUNS_CREATED, "Runs accepted, by lane.");
    describe_counter!(
        RUNS_REFUSED,
        "Submissions refused at the door, by lane and reason (full: a reject lane had no room; never_fits: no live worker could ever hold it)."
    );
    describe_counter!(
        ATTEMPTS_FINISHED,
        "Attempts ended, by lane, status and error_code (none when it succeeded): reported by workers or ended by the reaper."
    );
    describe_counter!(
        RUNS_REAPED,
        "Attempts the reaper ended, by reason: worker_heartbeat_lost, worker_claim_timeout, timeout, cancelled."
    );
    describe_counter!(
        RETRIES,
        "Runs sent back to pending for another attempt after their attempt failed for infrastructure reasons, by lane."
    );
    describe_counter!(
        STALE_ATTEMPT_REFUSALS,
        "Worker writes refused because they named an attempt that is no longer current (409 stale_attempt)."
    );
    describe_counter!(
        SSE_CONNECTIONS,
        "Event streams opened (GET /v1/runs/{id}/events), by format: sse or ndjson."
    );
    describe_counter!(RUNS_CLAIMED, "Runs handed to workers by claims.");
    describe_counter!(
        RUNS_HANDED_OFF,
        "Runs claimed in their own submission's transaction for a claim waiting on this server (counted in tether_runs_claimed_total too)."
    );
    describe_counter!(
        "tether_dispatch_total",
        "Endpoint dispatch answers, by pool and source (endpoint or fallback)."
    );
    describe_counter!(
        "tether_endpoint_probes_total",
        "Readiness probes run by this server, by endpoint, pool and outcome."
    );
    describe_histogram!(
        RUN_DURATION,
        Unit::Seconds,
        "How long finished runs ran (start, or claim if never started, to end), by lane and final status."
    );
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "From submission to the first attempt's start, by lane."
    );
    describe_histogram!(
        CLAIM_WAIT,
        Unit::Seconds,
        "How long a worker's claim long-poll waited before it was answered, by outcome (assigned or empty)."
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "HTTP request handling time until the response head, by route template, method and status class."
    );
    describe_histogram!(
        REAPER_SWEEP,
        Unit::Seconds,
        "How long one reaper sweep took."
    );
    describe_gauge!(
        RUNS,
        "Unfinished runs by lane and status (pending, claimed, running), read from the store at scrape."
    );
    describe_gauge!(
        OLDEST_PENDING_AGE,
        Unit::Seconds,
        "Age of the lane's oldest pending run (0 when none waits), read from the store at scrape."
    );
    describe_gauge!(
        WORKERS,
        "Registered workers by state (active, suspect, lost, draining), read from the store at scrape."
    );
    describe_gauge!(
        OLDEST_WORKER_HEARTBEAT_AGE,
        Unit::Seconds,
        "The oldest heartbeat age among workers not yet lost (0 when there are none), read from the store at scrape."
    );
    describe_gauge!(
        EVENT_FOLLOWERS,
        "Event streams (SSE or NDJSON) open on this server now."
    );
    describe_gauge!(
        "tether_endpoint_ready",
        "1 while the endpoint would be handed out by dispatch, else 0."
    );
    describe_gauge!(
        "tether_endpoint_stamp_age_seconds",
        Unit::Seconds,
        "Age of the endpoint's last ready stamp."
    );
}

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds recorded histogram samples into their buckets on a timer: the recorder holds raw
/// samples until then, so a server nobody scrapes would otherwise grow without bound.
pub async fn run_upkeep(shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                if let Some(Some(handle)) = HANDLE.get() {
                    handle.run_upkeep();
                }
            }
        }
    }
}

/// The text exposition of every metric so far.
pub fn render() -> String {
    install();
    match HANDLE.get() {
        Some(Some(handle)) => {
            handle.run_upkeep();
            handle.render()
        }
        _ => String::new(),
    }
}

fn seconds(ms: i64) -> f64 {
    ms.max(0) as f64 / 1000.0
}

/// Refusals per lane since this process started, for `GET /v1/lanes`; the same events as
/// [`RUNS_REFUSED`], which Prometheus reads but a handler cannot.
static REFUSALS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// A submission refused at the door.
pub fn run_refused(lane: &str, reason: &'static str) {
    metrics::counter!(RUNS_REFUSED, "lane" => lane.to_string(), "reason" => reason).increment(1);
    if let Ok(mut map) = REFUSALS.lock() {
        *map.entry(lane.to_string()).or_default() += 1;
    }
}

/// How many submissions to `lane` this process refused.
pub fn refusals(lane: &str) -> u64 {
    REFUSALS
        .lock()
        .map(|map| map.get(lane).copied().unwrap_or(0))
        .unwrap_or(0)
}

/// An attempt ended with `status`/`error_code`; `run` is the run after that write. Counts a
/// retry when the run went back to pending, and its duration when it ended.
pub fn attempt_ended(run: &RunRecord, status: RunStatus, error_code: Option<ErrorCode>) {
    count_attempt(run, status, error_code);
    if run.status == RunStatus::Pending {
        metrics::counter!(RETRIES, "lane" => run.spec.lane.clone()).increment(1);
    } else {
        run_ended(run);
    }
}

fn count_attempt(run: &RunRecord, status: RunStatus, error_code: Option<ErrorCode>) {
    metrics::counter!(ATTEMPTS_FINISHED, "lane" => run.spec.lane.clone(),
        "status" => status.as_str(), "error_code" => error_code.map_or("none", ErrorCode::as_str))
    .increment(1);
}

/// A worker handed an attempt back unstarted: it ended `claimed` with `released`, and the
/// run is back in line (not a retry: the attempt did not count) or, if a cancel was asked,
/// ended.
pub fn attempt_released(run: &RunRecord) {
    count_attempt(run, RunStatus::Claimed, Some(ErrorCode::Released));
    if run.status.is_terminal() {
        run_ended(run);
    }
}

/// A run reached its terminal status.
pub fn run_ended(run: &RunRecord) {
    if let (Some(since), Some(end)) = (run.started_at.or(run.claimed_at), run.finished_at) {
        metrics::histogram!(RUN_DURATION, "lane" => run.spec.lane.clone(),
            "status" => run.status.as_str())
        .record(seconds(end - since));
    }
}

/// A run's first attempt started: how long it queued.
pub fn run_started(run: &RunRecord) {
    // The first attempt that ran: attempts handed back unstarted came before it.
    if let (true, Some(started)) = (run.attempt == 1 + run.released_attempts, run.started_at) {
        metrics::histogram!(QUEUE_WAIT, "lane" => run.spec.lane.clone())
            .record(seconds(started - run.created_at));
    }
}

/// Runs a submission claimed for a waiting claim, which took them.
pub fn runs_handed_off(count: usize) {
    metrics::counter!(RUNS_HANDED_OFF).increment(count as u64);
}

/// A claim long-poll answered after `waited`.
pub fn claim_answered(waited: std::time::Duration, assigned: usize) {
    let outcome = if assigned > 0 { "assigned" } else { "empty" };
    metrics::counter!(RUNS_CLAIMED).increment(assigned as u64);
    metrics::histogram!(CLAIM_WAIT, "outcome" => outcome).record(waited.as_secs_f64());
}

/// Middleware: times every request by its route template (never its path: ids stay out of
/// labels), method and status class.
pub async fn time_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = request.method().as_str().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let class = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics::histogram!(HTTP_DURATION, "route" => route, "method" => method, "status" => class)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Sets the gauges read from the store, at the store's `now`. A store that cannot answer
/// leaves them as they were (and `/readyz` says why).
pub async fn export_store_gauges(state: &AppState) {
    if let Err(e) = store_gauges(state).await {
        tracing::debug!(error = %e, "cannot read the store for metrics");
    }
    metrics::gauge!(EVENT_FOLLOWERS).set(state.hub.follower_count() as f64);
}

async fn store_gauges(state: &AppState) -> tether_store::StoreResult<()> {
    let now: Millis = state.store.now().await?;
    let loads = state.store.lane_loads().await?;
    let mut lanes: Vec<String> = state.config.lanes.lane_names();
    lanes.extend(loads.iter().map(|l| l.lane.clone()));
    lanes.sort();
    lanes.dedup();
    for lane in lanes {
        let load = loads.iter().find(|l| l.lane == lane);
        let (pending, in_flight, running) =
            load.map_or((0, 0, 0), |l| (l.pending, l.in_flight, l.running));
        for (status, count) in [
            ("pending", pending),
            ("claimed", in_flight - running),
            ("running", running),
        ] {
            metrics::gauge!(RUNS, "lane" => lane.clone(), "status" => status).set(count as f64);
        }
        let oldest = load
            .and_then(|l| l.oldest_pending_at)
            .map_or(0.0, |t| age_s(now, t));
        metrics::gauge!(OLDEST_PENDING_AGE, "lane" => lane).set(oldest);
    }
    let workers = state.store.list_workers().await?;
    let mut by_state: BTreeMap<&'static str, u64> = [
        WorkerState::Active,
        WorkerState::Suspect,
        WorkerState::Lost,
        WorkerState::Draining,
    ]
    .into_iter()
    .map(|s| (s.as_str(), 0))
    .collect();
    let mut oldest_live = 0.0f64;
    for w in &workers {
        let judged = judge_worker(
            w.last_heartbeat_at,
            w.draining,
            state.config.heartbeat_interval_ms(),
            state.config.stale_after.as_millis() as i64,
            now,
        );
        *by_state.entry(judged.as_str()).or_default() += 1;
        if judged != WorkerState::Lost {
            oldest_live = oldest_live.max(age_s(now, w.last_heartbeat_at));
        }
    }
    for (worker_state, count) in by_state {
        metrics::gauge!(WORKERS, "state" => worker_state).set(count as f64);
    }
    metrics::gauge!(OLDEST_WORKER_HEARTBEAT_AGE).set(oldest_live);
    Ok(())
}
