//! A fake Tether server that speaks the worker's half of the protocol, records what it is
//! told, and can be steered (queue work, ask for a cancel, forget a worker).

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};
use tether_api::{
    AppendLogRequest, Assignment, AttemptReportsRequest, ClaimRequest, FinishRequest,
    HeartbeatRequest, RegisterWorkerRequest, RunRefWire, StartRequest,
};

pub const HEARTBEAT_MS: u64 = 200;

#[derive(Debug, Default)]
pub struct World {
    pub registrations: Vec<RegisterWorkerRequest>,
    pub known: HashSet<String>,
    pub deregistered: Vec<String>,
    pub pending: VecDeque<Assignment>,
    pub heartbeats: Vec<(String, Instant, HeartbeatRequest)>,
    pub to_cancel: Vec<RunRefWire>,
    pub to_disown: Vec<RunRefWire>,
    pub starts: Vec<(String, StartRequest)>,
    pub output: Vec<u8>,
    pub finishes: Vec<(String, FinishRequest)>,
    /// Act as a server without `POST /v1/workers/{id}/attempts` (404, no body).
    pub no_batch_call: bool,
    /// How many batch calls came, and the most items one carried.
    pub batch_calls: usize,
    pub largest_batch: usize,
    /// Hold each batch call that carries starts this long before taking it.
    pub slow_starts: Option<Duration>,
    /// Batch calls being served now, and the most at once.
    pub calls_now: usize,
    pub most_calls_at_once: usize,
    /// Finishes that came before their attempt's start.
    pub finishes_before_start: usize,
}

#[derive(Clone, Default)]
pub struct FakeServer {
    pub world: Arc<Mutex<World>>,
}

impl FakeServer {
    pub fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap()
    }

    /// Serves on `addr` (port 0: any) until the test ends.
    pub async fn serve(&self, addr: SocketAddr) -> SocketAddr {
        let app = Router::new()
            .route("/v1/workers", post(register))
            .route("/v1/workers/{id}", delete(deregister))
            .route("/v1/workers/{id}/claim", post(claim))
            .route("/v1/workers/{id}/heartbeat", post(heartbeat))
            .route("/v1/workers/{id}/attempts", post(attempts))
            .route("/v1/runs/{id}/attempts/{attempt}/start", post(start))
            .route("/v1/runs/{id}/attempts/{attempt}/logs", post(logs))
            .route("/v1/runs/{id}/attempts/{attempt}/finish", post(finish))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let bound = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        bound
    }

    /// Polls `check` until it holds, for at most `limit`.
    pub async fn wait_for(&self, limit: Duration, what: &str, check: impl Fn(&World) -> bool) {
        tether_testkit::eventually(what, limit, async || check(&self.world())).await;
    }
}

fn error(status: StatusCode, code: &str) -> Response {
    (
        status,
        Json(json!({ "error": { "code": code, "message": code } })),
    )
        .into_response()
}

fn run_view(id: &str) -> Value {
    json!({
        "id": id, "status": "running", "attempt": 1, "max_attempts": 3, "lane": "default",
        "command": ["x"], "env": {}, "cwd": null, "resources": { "cpus": 1.0, "memory_mb": 256 },
        "labels": {}, "endpoints": {}, "timeout_s": null, "heartbeat_timeout_s": 60.0,
        "stall_timeout_s": null, "idempotency_key": null, "worker_id": "w1",
        "created_at": "2026-01-01T00:00:00Z", "claimed_at": null, "started_at": null,
        "finished_at": null, "last_heartbeat_at": null, "last_output_at": null,
        "cancel_requested_at": null, "exit_code": null, "error_code": null,
        "error_message": null, "stdout_bytes": 0, "stderr_bytes": 0, "queue_position": null,
        "liveness": { "state": "alive", "heartbeat_age_s": null, "since_last_output_s": null,
                      "idle_for_s": null }
    })
}

async fn register(State(s): State<FakeServer>, Json(req): Json<RegisterWorkerRequest>) -> Response {
    let mut w = s.world();
    w.registrations.push(req);
    let id = format!("w{}", w.registrations.len());
    w.known.insert(id.clone());
    (
        StatusCode::CREATED,
        Json(
            json!({ "worker_id": id, "worker_secret": "s", "heartbeat_interval_ms": HEARTBEAT_MS }),
        ),
    )
        .into_response()
}

async fn deregister(State(s): State<FakeServer>, Path(id): Path<String>) -> Response {
    let mut w = s.world();
    w.known.remove(&id);
    w.deregistered.push(id);
    StatusCode::NO_CONTENT.into_response()
}

async fn claim(
    State(s): State<FakeServer>,
    Path(id): Path<String>,
    Json(req): Json<ClaimRequest>,
) -> Response {
    let deadline = Instant::now() + Duration::from_millis(req.wait_ms);
    loop {
        {
            let mut w = s.world();
            if !w.known.contains(&id) {
                return error(StatusCode::NOT_FOUND, "unknown_worker");
            }
            if let Some(a) = w.pending.pop_front() {
                return Json(json!({ "assignments": [a] })).into_response();
            }
        }
        if Instant::now() >= deadline {
            return Json(json!({ "assignments": [] })).into_response();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn heartbeat(
    State(s): State<FakeServer>,
    Path(id): Path<String>,
    Json(req): Json<HeartbeatRequest>,
) -> Response {
    let mut w = s.world();
    if !w.known.contains(&id) {
        return error(StatusCode::NOT_FOUND, "unknown_worker");
    }
    w.heartbeats.push((id, Instant::now(), req));
    let cancel = std::mem::take(&mut w.to_cancel);
    let not_owned = std::mem::take(&mut w.to_disown);
    Json(json!({ "cancel": cancel, "not_owned": not_owned })).into_response()
}

async fn start(
    State(s): State<FakeServer>,
    Path((id, _attempt)): Path<(String, u32)>,
    Json(req): Json<StartRequest>,
) -> Response {
    s.world().starts.push((id.clone(), req));
    Json(run_view(&id)).into_response()
}

async fn logs(
    State(s): State<FakeServer>,
    Path((_id, _attempt)): Path<(String, u32)>,
    Json(req): Json<AppendLogRequest>,
) -> Response {
    let mut w = s.world();
    for chunk in req.chunks {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(chunk.data)
            .unwrap();
        w.output.extend_from_slice(&bytes);
    }
    Json(json!({ "last_seq": 1, "stop": false })).into_response()
}

async fn finish(
    State(s): State<FakeServer>,
    Path((id, _attempt)): Path<(String, u32)>,
    Json(req): Json<FinishRequest>,
) -> Response {
    s.world().finishes.push((id.clone(), req));
    Json(run_view(&id)).into_response()
}

/// The batch call, recorded as the single calls it stands for; a claim riding on it hands out
/// what is queued.
async fn attempts(
    State(s): State<FakeServer>,
    Path(id): Path<String>,
    Json(req): Json<AttemptReportsRequest>,
) -> Response {
    let slow = {
        let mut w = s.world();
        w.calls_now += 1;
        w.most_calls_at_once = w.most_calls_at_once.max(w.calls_now);
        w.slow_starts.filter(|_| !req.starts.is_empty())
    };
    if let Some(slow) = slow {
        tokio::time::sleep(slow).await;
    }
    let mut w = s.world();
    w.calls_now -= 1;
    if w.no_batch_call {
        return StatusCode::NOT_FOUND.into_response();
    }
    if !w.known.contains(&id) {
        return error(StatusCode::NOT_FOUND, "unknown_worker");
    }
    w.batch_calls += 1;
    w.largest_batch = w.largest_batch.max(req.starts.len() + req.finishes.len());
    let mut starts = Vec::new();
    for st in req.starts {
        starts.push(json!({"run_id": st.run_id, "attempt": st.attempt, "run_status": "running"}));
        w.starts.push((
            st.run_id.clone(),
            StartRequest {
                worker_id: id.clone(),
                pid: st.pid,
            },
        ));
    }
    let mut finishes = Vec::new();
    for f in req.finishes {
        if !w.starts.iter().any(|(id, _)| *id == f.run_id) {
            w.finishes_before_start += 1;
        }
        finishes.push(
            json!({"run_id": f.run_id, "attempt": f.attempt, "run_status": f.status.as_str()}),
        );
        w.finishes.push((
            f.run_id.clone(),
            FinishRequest {
                worker_id: id.clone(),
                status: f.status,
                error_code: f.error_code,
                exit_code: f.exit_code,
                error_message: f.error_message,
            },
        ));
    }
    let mut assignments = Vec::new();
    if let Some(claim) = req.claim {
        while assignments.len() < claim.max_runs as usize {
            match w.pending.pop_front() {
                Some(a) => assignments.push(a),
                None => break,
            }
        }
    }
    Json(json!({ "starts": starts, "finishes": finishes, "assignments": assignments }))
        .into_response()
}
