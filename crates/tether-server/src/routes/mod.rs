//! The HTTP surface: which path goes to which handler, and which token guards it.

pub(crate) mod attempts;
pub(crate) mod endpoints;
pub(crate) mod lanes;
mod ops;
pub(crate) mod output;
pub(crate) mod runs;
pub(crate) mod workers;

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;

use crate::auth::{require_client_token, require_worker_token};
use crate::error::ApiError;
use crate::AppState;

pub fn router(state: AppState) -> Router {
    let client = Router::new()
        .route("/v1/runs", post(runs::create_run).get(runs::list_runs))
        .route("/v1/runs/batch", post(runs::create_runs))
        .route("/v1/runs/{id}", get(runs::get_run))
        .route("/v1/runs/{id}/cancel", post(runs::cancel_run))
        .route("/v1/runs/{id}/logs", get(runs::run_logs))
        .route("/v1/runs/{id}/output", get(output::run_output))
        .route("/v1/runs/{id}/events", get(crate::events::run_events))
        .route("/v1/workers", get(workers::list_workers))
        .route("/v1/endpoints", get(endpoints::list_endpoints))
        .route(
            "/v1/endpoints/{name}",
            axum::routing::put(endpoints::put_endpoint).delete(endpoints::delete_endpoint),
        )
        .route("/v1/pools", get(endpoints::list_pools))
        .route("/v1/pools/{pool}", axum::routing::put(endpoints::put_pool))
        .route("/v1/pools/{pool}/dispatch", get(endpoints::dispatch))
        .route("/v1/lanes", get(lanes::list_lanes))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_client_token,
        ));
    let worker = Router::new()
        .route("/v1/workers", post(workers::register_worker))
        .route(
            "/v1/workers/{id}",
            axum::routing::delete(workers::deregister_worker),
        )
        .route("/v1/workers/{id}/claim", post(workers::claim))
        .route("/v1/workers/{id}/heartbeat", post(workers::heartbeat))
        .route("/v1/workers/{id}/release", post(workers::release))
        .route("/v1/workers/{id}/control", post(workers::control))
        .route("/v1/workers/{id}/attempts", post(attempts::report_attempts))
        .route(
            "/v1/runs/{id}/attempts/{attempt}/start",
            post(attempts::start),
        )
        .route(
            "/v1/runs/{id}/attempts/{attempt}/logs",
            post(attempts::append_logs),
        )
        .route(
            "/v1/runs/{id}/attempts/{attempt}/finish",
            post(attempts::finish),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_worker_token,
        ));
    let open = Router::new()
        .route("/", get(ops::dashboard))
        .route("/ui/app.js", get(ops::dashboard_js))
        .route("/ui/app.css", get(ops::dashboard_css))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi));
    // `merge` keeps each route's own guard: GET /v1/workers is a client call, POST a worker's.
    Router::new()
        .merge(client)
        .merge(worker)
        .merge(open)
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::health::observe,
        ))
        .layer(middleware::from_fn(crate::extract::check_request_head))
        .layer(DefaultBodyLimit::max(crate::BODY_LIMIT_BYTES))
        .layer(middleware::from_fn(crate::metrics::time_requests))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}
