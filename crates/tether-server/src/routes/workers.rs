//! Worker calls: register, claim (long-poll), heartbeat, deregister; and the client's view of
//! workers.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use tether_api::{
    Assignment, ClaimRequest, ClaimResponse, ControlRequest, ControlResponse, HeartbeatRequest,
    HeartbeatResponse, RegisterWorkerRequest, RegisterWorkerResponse, ReleaseRequest,
    ReleaseResponse, RunRefWire, WorkerList, MAX_RELEASED_RUNS,
};
use tether_domain::Resources;
use tether_store::{ClaimLimits, ClaimedRun, NewWorker, RunBeat, RunRef, Signal};
use tokio::sync::broadcast::error::RecvError;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath};
use crate::views::worker_view;
use crate::AppState;

const MAX_RUNS_PER_CLAIM: u32 = 512;

/// `POST /v1/workers`.
#[utoipa::path(post, path = "/v1/workers", request_body = tether_api::RegisterWorkerRequest,
    responses((status = 201, body = tether_api::RegisterWorkerResponse), (status = 422, body = tether_api::ErrorBody)))]
pub async fn register_worker(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<RegisterWorkerRequest>,
) -> ApiResult<(StatusCode, Json<RegisterWorkerResponse>)> {
    use tether_domain::spec::{bounded_map, check_resources, limits};
    if request.name.trim().is_empty() || request.name.len() > limits::MAX_KEY_BYTES {
        return Err(ApiError::invalid(
            "invalid_field",
            "name: must be 1 to 255 bytes",
        ));
    }
    let cap = request.capacity;
    // The same bounds a run's resources meet, so a worker's capacity is stored exactly.
    check_resources("capacity", &cap)?;
    bounded_map(
        "labels",
        &request.labels,
        limits::MAX_LABELS,
        limits::MAX_LABEL_BYTES,
    )?;
    if request.lanes.len() > limits::MAX_LABELS {
        return Err(ApiError::invalid(
            "invalid_field",
            format!("lanes: at most {} lanes", limits::MAX_LABELS),
        ));
    }
    for lane in &request.lanes {
        if state.config.lanes.lane(lane).is_none() {
            return Err(ApiError::invalid(
                "unknown_lane",
                format!("lanes: no lane is named `{lane}`"),
            ));
        }
    }
    let (secret, secret_hash) = crate::auth::new_worker_secret()?;
    let worker = state
        .store
        .register_worker(&NewWorker {
            secret_hash: Some(secret_hash.clone()),
            name: request.name,
            capacity: cap,
            lanes: request.lanes,
            labels: request.labels,
        })
        .await?;
    state.worker_secrets.remember(&worker.id, secret_hash);
    state.waiting_claims.know_lanes(&worker.id, &worker.lanes);
    tracing::info!(worker_id = %worker.id, name = %worker.name, "worker registered");
    Ok((
        StatusCode::CREATED,
        Json(RegisterWorkerResponse {
            worker_id: worker.id,
            worker_secret: secret,
            heartbeat_interval_ms: state.config.heartbeat_interval.as_millis() as u64,
        }),
    ))
}

/// `DELETE /v1/workers/{id}`: a worker leaving on purpose; its runs are handed back at once.
#[utoipa::path(delete, path = "/v1/workers/{id}",
    responses((status = 204), (status = 404, body = tether_api::ErrorBody)))]
pub async fn deregister_worker(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    state
        .worker_secrets
        .verify(&state.store, &id, &headers)
        .await?;
    let runs = state.store.deregister_worker(&id).await?;
    // Each handed-back attempt ended as if its heartbeat was lost.
    for run_id in &runs {
        if let Ok(Some(run)) = state.store.get_run(run_id).await {
            crate::metrics::attempt_ended(
                &run,
                tether_domain::RunStatus::TimedOut,
                Some(tether_domain::ErrorCode::WorkerHeartbeatLost),
            );
        }
    }
    tracing::info!(worker_id = %id, handed_back = runs.len(), "worker deregistered");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/workers`.
#[utoipa::path(get, path = "/v1/workers", responses((status = 200, body = tether_api::WorkerList)))]
pub async fn list_workers(State(state): State<AppState>) -> ApiResult<Json<WorkerList>> {
    let workers = state.store.list_workers().await?;
    let now = state.store.now().await?;
    Ok(Json(WorkerList {
        workers: workers
            .iter()
            .map(|w| worker_view(w, &state.config, now))
            .collect(),
    }))
}

fn assignment(claimed: ClaimedRun) -> Assignment {
    let spec = claimed.run.spec;
    Assignment {
        run_id: claimed.run.id,
        attempt: claimed.attempt,
        command: spec.command,
        env: spec.env,
        cwd: spec.cwd,
        timeout_ms: spec.timeout_ms.map(|ms| ms.max(0) as u64),
        stall_timeout_ms: spec.stall_timeout_ms.map(|ms| ms.max(0) as u64),
        output_limit_bytes: spec.output_limit_bytes.max(0) as u64,
        resources: Some(spec.resources),
    }
}

/// What one claim of `worker_id` may hand out: at most `max_runs` (clamped), within the lanes'
/// `max_concurrency`, within the worker's capacity plus the `reserve` it asks for, and nothing
/// to a worker whose heartbeat is not fresh. `422 invalid_field` for a reserve out of bounds.
pub(crate) fn claim_limits(
    state: &AppState,
    max_runs: u32,
    reserve: Option<Resources>,
) -> ApiResult<ClaimLimits> {
    let reserve = reserve.unwrap_or(Resources::NONE);
    tether_domain::spec::check_reserve("reserve", &reserve)?;
    Ok(ClaimLimits {
        max_runs: max_runs.clamp(1, MAX_RUNS_PER_CLAIM),
        lane_max_concurrency: state
            .config
            .lanes
            .lanes
            .iter()
            .filter_map(|(name, lane)| lane.max_concurrency.map(|m| (name.clone(), m)))
            .collect(),
        // Missing one heartbeat interval and a half makes a worker suspect: it gets no runs.
        worker_fresh_ms: state.config.worker_fresh_ms(),
        reserve,
    })
}

/// Claimed runs as the worker receives them, with their endpoints resolved.
pub(crate) async fn assignments(
    state: &AppState,
    worker_id: &str,
    claimed: Vec<ClaimedRun>,
) -> Vec<Assignment> {
    // Endpoints resolve per claim, so a retried attempt gets a fresh answer.
    let dispatched = crate::dispatch::resolve_claimed(state, worker_id, &claimed).await;
    claimed
        .into_iter()
        .zip(dispatched)
        .map(|(c, env)| {
            let mut a = assignment(c);
            a.env.extend(env);
            a
        })
        .collect()
}

/// While a claim waits, it also retries this often without a wake-up: a safety net only (a
/// signal lost with a PostgreSQL listener's connection, a worker's heartbeat turning fresh
/// again). Every change that frees room wakes the claim itself.
const CLAIM_RECHECK: Duration = Duration::from_millis(1_000);

/// Whether `signal` may let `worker_id`'s claim take something it could not before: a run
/// became pending, this worker has room again, or a lane capped by `max_concurrency` has.
fn may_free_room(signal: &Signal, worker_id: &str, limits: &ClaimLimits) -> bool {
    match signal {
        Signal::RunPending { .. } => true,
        Signal::RoomFreed {
            lane,
            worker_id: freed,
        } => freed == worker_id || limits.lane_max_concurrency.contains_key(lane),
        Signal::WorkerBeat { worker_id: beat } => beat == worker_id,
        Signal::RunEvents { .. } | Signal::CancelRequested { .. } => false,
    }
}

/// `POST /v1/workers/{id}/claim`: hands out what fits now, or waits up to `wait_ms` for
/// something to fit, woken by the store's signals (a run became pending, room was freed)
/// rather than a poll.
#[utoipa::path(post, path = "/v1/workers/{id}/claim", request_body = tether_api::ClaimRequest,
    responses((status = 200, body = tether_api::ClaimResponse), (status = 404, body = tether_api::ErrorBody)))]
pub async fn claim(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(worker_id): ApiPath<String>,
    ApiJson(request): ApiJson<ClaimRequest>,
) -> ApiResult<Json<ClaimResponse>> {
    state
        .worker_secrets
        .verify(&state.store, &worker_id, &headers)
        .await?;
    let limits = claim_limits(&state, request.max_runs, request.reserve)?;
    let waiting_since = std::time::Instant::now();
    let wait = Duration::from_millis(request.wait_ms).min(state.config.max_claim_wait);
    let deadline = tokio::time::Instant::now() + wait;
    let answer = |claimed: Vec<ClaimedRun>| {
        crate::metrics::claim_answered(waiting_since.elapsed(), claimed.len());
        assignments(&state, &worker_id, claimed)
    };
    // Subscribe before the first try so a run submitted in between is not missed.
    let mut signals = state.store.subscribe();
    loop {
        let claimed = state.store.claim_runs(&worker_id, &limits).await?;
        if !claimed.is_empty() || tokio::time::Instant::now() >= deadline {
            let assignments = answer(claimed).await;
            return Ok(Json(ClaimResponse { assignments }));
        }
        let recheck = (tokio::time::Instant::now() + CLAIM_RECHECK).min(deadline);
        // In line for a submission on this server to hand its runs to; the signals bring
        // the rest (runs submitted elsewhere, room freed).
        let mut waiting = state.waiting_claims.enter(&worker_id, &limits);
        let handed = loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => break waiting.leave().await,
                _ = tokio::time::sleep_until(recheck) => break waiting.leave().await,
                handed = waiting.handed() => {
                    if !handed.is_empty() {
                        break handed;
                    }
                    // Taken, but nothing fit: back in line.
                    waiting = state.waiting_claims.enter(&worker_id, &limits);
                }
                signal = signals.recv() => match signal {
                    Ok(signal) if may_free_room(&signal, &worker_id, &limits) => {
                        break waiting.leave().await;
                    }
                    Err(RecvError::Lagged(_)) => break waiting.leave().await,
                    Ok(_) => continue,
                    Err(RecvError::Closed) => {
                        tokio::time::sleep_until(recheck).await;
                        break waiting.leave().await;
                    }
                },
            }
        };
        if !handed.is_empty() || state.shutdown.is_cancelled() {
            let assignments = answer(handed).await;
            return Ok(Json(ClaimResponse { assignments }));
        }
    }
}

/// `POST /v1/workers/{id}/control`: answers as soon as a cancel is asked of a run this worker
/// holds, or empty after `wait_ms`. Woken by the store's signal, so a cancel reaches the
/// worker in about a round trip instead of at its next heartbeat; a cancel asked while no
/// poll is open (or lost with a lagging channel) still reaches it by the heartbeat.
#[utoipa::path(post, path = "/v1/workers/{id}/control", request_body = tether_api::ControlRequest,
    responses((status = 200, body = tether_api::ControlResponse)))]
pub async fn control(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(worker_id): ApiPath<String>,
    ApiJson(request): ApiJson<ControlRequest>,
) -> ApiResult<Json<ControlResponse>> {
    state
        .worker_secrets
        .verify(&state.store, &worker_id, &headers)
        .await?;
    let wait = Duration::from_millis(request.wait_ms).min(state.config.max_claim_wait);
    let deadline = tokio::time::Instant::now() + wait;
    let mut signals = state.store.subscribe();
    let mut cancel = Vec::new();
    loop {
        let signal = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => break,
            signal = signals.recv() => signal,
        };
        match signal {
            Ok(Signal::CancelRequested {
                run_id,
                attempt,
                worker_id: holder,
            }) if holder == worker_id => {
                cancel.push(RunRefWire { run_id, attempt });
                break;
            }
            Ok(_) | Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => {
                tokio::time::sleep_until(deadline).await;
                break;
            }
        }
    }
    Ok(Json(ControlResponse { cancel }))
}

fn wire_refs(refs: Vec<RunRef>) -> Vec<RunRefWire> {
    refs.into_iter()
        .map(|r| RunRefWire {
            run_id: r.run_id,
            attempt: r.attempt,
        })
        .collect()
}

/// `POST /v1/workers/{id}/release`: attempts the worker never started, handed back
/// uncounted.
#[utoipa::path(post, path = "/v1/workers/{id}/release", request_body = tether_api::ReleaseRequest,
    responses((status = 200, body = tether_api::ReleaseResponse), (status = 404, body = tether_api::ErrorBody),
        (status = 422, body = tether_api::ErrorBody)))]
pub async fn release(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(worker_id): ApiPath<String>,
    ApiJson(request): ApiJson<ReleaseRequest>,
) -> ApiResult<Json<ReleaseResponse>> {
    state
        .worker_secrets
        .verify(&state.store, &worker_id, &headers)
        .await?;
    if request.runs.len() > MAX_RELEASED_RUNS {
        return Err(ApiError::invalid(
            "invalid_field",
            format!("runs: at most {MAX_RELEASED_RUNS} in one call"),
        ));
    }
    let runs: Vec<RunRef> = request
        .runs
        .into_iter()
        .map(|r| RunRef {
            run_id: r.run_id,
            attempt: r.attempt,
        })
        .collect();
    let released = state.store.release_runs(&worker_id, &runs).await?;
    if !released.is_empty() {
        tracing::debug!(
            worker_id,
            released = released.len(),
            "runs handed back unstarted"
        );
    }
    for run in &released {
        crate::metrics::attempt_released(run);
    }
    Ok(Json(ReleaseResponse {
        released: released
            .into_iter()
            .map(|run| RunRefWire {
                run_id: run.id,
                attempt: run.attempt,
            })
            .collect(),
    }))
}

/// `POST /v1/workers/{id}/heartbeat`: one call for the worker and all its runs.
#[utoipa::path(post, path = "/v1/workers/{id}/heartbeat", request_body = tether_api::HeartbeatRequest,
    responses((status = 200, body = tether_api::HeartbeatResponse), (status = 404, body = tether_api::ErrorBody)))]
pub async fn heartbeat(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(worker_id): ApiPath<String>,
    ApiJson(request): ApiJson<HeartbeatRequest>,
) -> ApiResult<Json<HeartbeatResponse>> {
    state
        .worker_secrets
        .verify(&state.store, &worker_id, &headers)
        .await?;
    let beats: Vec<RunBeat> = request
        .runs
        .into_iter()
        .map(|b| RunBeat {
            run_id: b.run_id,
            attempt: b.attempt,
            stdout_bytes: b.stdout_bytes,
            stderr_bytes: b.stderr_bytes,
            since_last_output_s: b.since_last_output_s,
        })
        .collect();
    if request.draining {
        state.store.set_worker_draining(&worker_id).await?;
    }
    let answer = state.store.heartbeat(&worker_id, &beats).await?;
    Ok(Json(HeartbeatResponse {
        cancel: wire_refs(answer.cancel),
        not_owned: wire_refs(answer.not_owned),
    }))
}
