//! Store records as the API shows them. Liveness is judged here, at the store's `now`.

use base64::Engine;
use tether_api::{AttemptView, EventView, RunRefWire, RunView, WorkerView};
use tether_domain::liveness::RunLivenessInput;
use tether_domain::time::{age_s, format_rfc3339};
use tether_domain::{judge_run_liveness, judge_worker, Liveness, Millis};
use tether_store::{AttemptRecord, EventBody, EventRecord, RunRecord, WorkerRecord};

use crate::config::ServerConfig;

fn ts(ms: Option<Millis>) -> Option<String> {
    ms.map(format_rfc3339)
}

fn seconds(ms: Option<i64>) -> Option<f64> {
    ms.map(|ms| ms as f64 / 1000.0)
}

pub fn liveness(run: &RunRecord, config: &ServerConfig, now: Millis) -> Liveness {
    judge_run_liveness(
        RunLivenessInput {
            status: run.status,
            claimed_at: run.claimed_at,
            started_at: run.started_at,
            last_heartbeat_at: run.last_heartbeat_at,
            last_output_at: run.last_output_at,
            heartbeat_interval_ms: config.heartbeat_interval_ms(),
            heartbeat_timeout_ms: run.spec.heartbeat_timeout_ms,
        },
        now,
    )
}

/// What API views show of a run's secrets.
pub const REDACTED: &str = "***";

/// The run's `env` with every `secret_env` value replaced: views never carry a secret (the
/// worker's assignment, built from the spec, does).
fn redacted_env(spec: &tether_domain::RunSpec) -> std::collections::BTreeMap<String, String> {
    let mut env = spec.env.clone();
    for key in &spec.secret_env {
        if let Some(value) = env.get_mut(key) {
            *value = REDACTED.to_string();
        }
    }
    env
}

pub fn run_view(
    run: &RunRecord,
    attempts: Option<&[AttemptRecord]>,
    config: &ServerConfig,
    now: Millis,
) -> RunView {
    let spec = &run.spec;
    RunView {
        id: run.id.clone(),
        status: run.status,
        attempt: run.attempt,
        max_attempts: spec.max_attempts,
        released_attempts: run.released_attempts,
        lane: spec.lane.clone(),
        command: spec.command.clone(),
        env: redacted_env(spec),
        secret_env: spec.secret_env.clone(),
        cwd: spec.cwd.clone(),
        resources: spec.resources,
        labels: spec.labels.clone(),
        endpoints: spec.endpoints.clone(),
        timeout_s: seconds(spec.timeout_ms),
        heartbeat_timeout_s: seconds(spec.heartbeat_timeout_ms),
        stall_timeout_s: seconds(spec.stall_timeout_ms),
        idempotency_key: spec.idempotency_key.clone(),
        worker_id: run.worker_id.clone(),
        created_at: format_rfc3339(run.created_at),
        claimed_at: ts(run.claimed_at),
        started_at: ts(run.started_at),
        finished_at: ts(run.finished_at),
        last_heartbeat_at: ts(run.last_heartbeat_at),
        last_output_at: ts(run.last_output_at),
        cancel_requested_at: ts(run.cancel_requested_at),
        exit_code: run.exit_code,
        error_code: run.error_code,
        error_message: run.error_message.clone(),
        stdout_bytes: run.stdout_bytes,
        stderr_bytes: run.stderr_bytes,
        queue_position: run.queue_position,
        // Filled in by handlers that read capacity (see `admission::Capacity`).
        waiting_reason: None,
        liveness: liveness(run, config, now),
        attempts: attempts.map(|a| a.iter().map(attempt_view).collect()),
    }
}

pub fn attempt_view(a: &AttemptRecord) -> AttemptView {
    AttemptView {
        attempt: a.attempt,
        worker_id: a.worker_id.clone(),
        worker_name: a.worker_name.clone(),
        claimed_at: format_rfc3339(a.claimed_at),
        started_at: ts(a.started_at),
        finished_at: ts(a.finished_at),
        status: a.status,
        error_code: a.error_code,
        exit_code: a.exit_code,
        error_message: a.error_message.clone(),
        endpoints: a
            .endpoints
            .iter()
            .map(|(var, d)| (var.clone(), d.clone().into()))
            .collect(),
    }
}

/// A stored event as SSE `data:` and NDJSON carry it.
pub fn event_view(e: &EventRecord) -> EventView {
    let mut view = EventView {
        kind: e.kind.as_str().to_string(),
        seq: Some(e.seq),
        ts: format_rfc3339(e.ts),
        attempt: Some(e.attempt),
        ..EventView::default()
    };
    match &e.body {
        EventBody::Status(s) | EventBody::End(s) => {
            view.status = Some(s.status);
            view.error_code = s.error_code;
            view.exit_code = s.exit_code;
        }
        EventBody::Attempt { worker_id, .. } => {
            view.worker_id = Some(worker_id.clone());
        }
        EventBody::Log { stream } => {
            view.stream = Some(stream.as_str().to_string());
            let data = e.data.as_deref().unwrap_or_default();
            match std::str::from_utf8(data) {
                Ok(text) => view.text = Some(text.to_string()),
                Err(_) => {
                    view.text = Some(String::from_utf8_lossy(data).into_owned());
                    view.data_b64 = Some(base64::engine::general_purpose::STANDARD.encode(data));
                }
            }
        }
    }
    view
}

/// The `heartbeat` event: never stored, so it has no `seq`.
pub fn heartbeat_view(run: &RunRecord, config: &ServerConfig, now: Millis) -> EventView {
    EventView {
        kind: "heartbeat".into(),
        seq: None,
        ts: format_rfc3339(now),
        attempt: Some(run.attempt),
        status: Some(run.status),
        queue_position: run.queue_position,
        liveness: Some(liveness(run, config, now)),
        ..EventView::default()
    }
}

pub fn worker_view(w: &WorkerRecord, config: &ServerConfig, now: Millis) -> WorkerView {
    WorkerView {
        id: w.id.clone(),
        name: w.name.clone(),
        state: judge_worker(
            w.last_heartbeat_at,
            w.draining,
            config.heartbeat_interval_ms(),
            config.stale_after.as_millis() as i64,
            now,
        ),
        capacity: w.capacity,
        reserved: w.reserved,
        lanes: w.lanes.clone(),
        labels: w.labels.clone(),
        registered_at: format_rfc3339(w.registered_at),
        last_heartbeat_at: format_rfc3339(w.last_heartbeat_at),
        heartbeat_age_s: age_s(now, w.last_heartbeat_at),
        runs: w
            .runs
            .iter()
            .map(|(run_id, attempt)| RunRefWire {
                run_id: run_id.clone(),
                attempt: *attempt,
            })
            .collect(),
    }
}

/// An endpoint with its readiness judged at the snapshot's `now` by its pool's freshness.
pub fn endpoint_view(
    e: &tether_store::EndpointRecord,
    snapshot: &crate::dispatch::PoolSnapshot,
) -> tether_api::EndpointView {
    let ready = snapshot.pools.get(&e.pool).is_some_and(|pool| {
        tether_domain::dispatch::is_ready(
            e.kind,
            e.last_ready_at,
            crate::dispatch::freshness(pool),
            snapshot.now,
        )
    });
    tether_api::EndpointView {
        name: e.name.clone(),
        pool: e.pool.clone(),
        url: e.url.clone(),
        readiness_url: e.readiness_url.clone(),
        kind: e.kind,
        ready,
        last_ready_at: ts(e.last_ready_at),
        stamp_age_s: e.last_ready_at.map(|t| age_s(snapshot.now, t)),
        last_probe_at: ts(e.last_probe_at),
        last_error: e.last_error.clone(),
        created_at: format_rfc3339(e.created_at),
        updated_at: format_rfc3339(e.updated_at),
    }
}

pub fn pool_view(p: &tether_store::PoolRecord) -> tether_api::PoolView {
    tether_api::PoolView {
        name: p.name.clone(),
        fallback_url: p.fallback_url.clone(),
        freshness_s: p.freshness_ms as f64 / 1000.0,
        source: p.source.as_str().to_string(),
        updated_at: format_rfc3339(p.updated_at),
    }
}
