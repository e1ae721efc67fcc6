//! The door of a lane (SPEC §4): the policy a submission is admitted under, the `Retry-After`
//! a full `reject` lane answers with, and what a lane holds for `GET /v1/lanes` and for the
//! `waiting_reason` of queued runs. The admit-or-refuse decision itself is one transaction in
//! the store (`Store::admit_run`); this module only feeds it and explains it.

use tether_api::LaneView;
use tether_domain::admission::{retry_after_s, waiting_reason, InFlightRun, WorkerRoom};
use tether_domain::{judge_worker, LanePolicy, OnFull, Resources, RunStatus, WorkerState};
use tether_store::{AdmissionPolicy, LaneLoad, RunFilter, RunRecord, StoreResult, WorkerRecord};

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::AppState;

/// How `lane` admits: a worker counts as live while it has missed less than one and a half
/// heartbeat intervals, the same line that makes it `suspect`.
pub fn admission_policy(state: &AppState, lane: &LanePolicy) -> AdmissionPolicy {
    AdmissionPolicy {
        reject_when_full: lane.on_full == OnFull::Reject,
        max_concurrency: lane.max_concurrency,
        worker_fresh_ms: state.config.worker_fresh_ms(),
    }
}

/// How many recent runs of a lane inform its expected run length.
const HISTORY: u32 = 20;

/// `Retry-After` for a full lane, from what it is running now and how long its recent runs
/// took. With nothing in flight (no live worker), one heartbeat interval: a worker may join.
pub async fn retry_after(state: &AppState, lane: &str) -> StoreResult<u64> {
    let now = state.store.now().await?;
    let mut in_flight = Vec::new();
    for status in [RunStatus::Running, RunStatus::Claimed] {
        let page = state
            .store
            .list_runs(&RunFilter {
                status: Some(status),
                lane: Some(lane.to_string()),
                limit: 500,
                ..RunFilter::default()
            })
            .await?;
        in_flight.extend(page.runs.iter().filter_map(|r| {
            r.started_at.or(r.claimed_at).map(|since| InFlightRun {
                since,
                timeout_ms: r.spec.timeout_ms,
            })
        }));
    }
    let recent = state
        .store
        .list_runs(&RunFilter {
            status: Some(RunStatus::Succeeded),
            lane: Some(lane.to_string()),
            limit: HISTORY,
            ..RunFilter::default()
        })
        .await?;
    let durations: Vec<i64> = recent
        .runs
        .iter()
        .filter_map(|r| Some(r.finished_at? - r.started_at?))
        .collect();
    Ok(retry_after_s(
        now,
        &in_flight,
        &durations,
        state.config.heartbeat_interval_ms(),
    ))
}

/// How often, at most, the lanes' loads are read for `GET /v1/lanes`: each read counts every
/// queued run, and dashboards (and benchmark harnesses) poll the call many times a second.
pub const LANE_READ_INTERVAL: Duration = Duration::from_millis(250);

/// `GET /v1/lanes`'s reads of what the lanes hold, shared: however many ask at once, the store
/// is read at most once per [`LANE_READ_INTERVAL`]. Never stale for the asker: each answer
/// comes from a read that began after the request arrived (a request waits for the next read
/// rather than take an older one), so a client sees its own writes.
#[derive(Default)]
pub struct LaneReads {
    last: tokio::sync::Mutex<Option<(Instant, Arc<Capacity>)>>,
}

impl LaneReads {
    pub async fn read(&self, state: &AppState) -> StoreResult<Arc<Capacity>> {
        let arrived = Instant::now();
        // Held across the read: whoever waits here takes the read that ran meanwhile.
        let mut last = self.last.lock().await;
        if let Some((began, capacity)) = last.as_ref() {
            if *began >= arrived {
                return Ok(capacity.clone());
            }
            tokio::time::sleep_until((*began + LANE_READ_INTERVAL).into()).await;
        }
        let began = Instant::now();
        let capacity = Arc::new(Capacity::read(state).await?);
        *last = Some((began, capacity.clone()));
        Ok(capacity)
    }
}

/// What the lanes hold now: live workers and per-lane loads, read once per request.
pub struct Capacity {
    workers: Vec<WorkerRecord>,
    loads: Vec<LaneLoad>,
}

impl Capacity {
    pub async fn read(state: &AppState) -> StoreResult<Capacity> {
        let now = state.store.now().await?;
        let workers = state
            .store
            .list_workers()
            .await?
            .into_iter()
            .filter(|w| {
                judge_worker(
                    w.last_heartbeat_at,
                    w.draining,
                    state.config.heartbeat_interval_ms(),
                    state.config.stale_after.as_millis() as i64,
                    now,
                ) == WorkerState::Active
            })
            .collect();
        let loads = state.store.lane_loads().await?;
        Ok(Capacity { workers, loads })
    }

    fn serving<'a>(&'a self, lane: &'a str) -> impl Iterator<Item = &'a WorkerRecord> + 'a {
        self.workers
            .iter()
            .filter(move |w| w.lanes.is_empty() || w.lanes.iter().any(|l| l == lane))
    }

    fn load(&self, lane: &str) -> Option<&LaneLoad> {
        self.loads.iter().find(|l| l.lane == lane)
    }

    /// Why a pending run waits, if something other than its turn holds it.
    pub fn waiting_reason(&self, run: &RunRecord, policy: Option<&LanePolicy>) -> Option<String> {
        if run.status != RunStatus::Pending {
            return None;
        }
        let lane = run.spec.lane.as_str();
        let rooms: Vec<WorkerRoom> = self
            .serving(lane)
            .map(|w| WorkerRoom {
                capacity: w.capacity,
                held: w.reserved,
            })
            .collect();
        waiting_reason(
            &run.spec.resources,
            lane,
            &rooms,
            self.load(lane).map_or(0, |l| l.in_flight),
            policy.and_then(|p| p.max_concurrency),
        )
    }

    /// A lane's policy and what it holds now.
    pub fn lane_view(&self, name: &str, policy: &LanePolicy) -> LaneView {
        let mut capacity = Resources {
            cpus: 0.0,
            memory_mb: 0,
        };
        let mut live_workers = 0;
        for w in self.serving(name) {
            capacity.cpus += w.capacity.cpus;
            capacity.memory_mb += w.capacity.memory_mb;
            live_workers += 1;
        }
        let load = self.load(name);
        LaneView {
            name: name.to_string(),
            on_full: policy.on_full,
            max_concurrency: policy.max_concurrency,
            heartbeat_timeout_s: policy.heartbeat_timeout_s,
            max_attempts: policy.max_attempts,
            timeout_s: policy.timeout_s,
            resources: policy.resources,
            output_limit_mb: policy.output_limit_mb,
            capacity,
            reserved: load.map_or(
                Resources {
                    cpus: 0.0,
                    memory_mb: 0,
                },
                |l| l.reserved,
            ),
            live_workers,
            in_flight: load.map_or(0, |l| l.in_flight),
            pending: load.map_or(0, |l| l.pending),
            refused: crate::metrics::refusals(name),
        }
    }
}
