//! Operating the server: health, readiness, metrics, the OpenAPI document, the dashboard.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::AppState;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "ok": true }))
}

/// Ready while the store answers and no call failed for want of it in the last few seconds
/// (a full disk fails writes while reads still answer).
pub async fn readyz(State(state): State<AppState>) -> Response {
    let failed = match state.store.ping().await {
        Ok(()) => state.health.recent_failure(crate::health::RECENT).is_some(),
        Err(e) => {
            let chain = crate::error::source_chain(&e);
            tracing::warn!(error = %chain, "readiness: the store did not answer");
            state.health.failed(chain);
            true
        }
    };
    if !failed {
        return Json(json!({ "ready": true })).into_response();
    }
    // What failed is in the log; the answer says only that the store is unavailable.
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "1")],
        Json(json!({ "ready": false, "error": {
            "code": "store_unavailable", "message": "the store is unavailable" } })),
    )
        .into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    crate::metrics::export_store_gauges(&state).await;
    crate::reconciler::export_gauges(&state).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
        .into_response()
}

pub async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}

/// The dashboard's files, built into the binary: nothing is fetched from elsewhere, and the
/// policy below forbids the page from trying.
const DASHBOARD_HTML: &str = include_str!("../dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("../dashboard/app.js");
const DASHBOARD_CSS: &str = include_str!("../dashboard/app.css");

const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self' \
    'unsafe-inline'; connect-src 'self'; img-src 'self' data:; form-action 'none'; \
    frame-ancestors 'none'; base-uri 'none'";

fn dashboard_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        ],
        body,
    )
        .into_response()
}

pub async fn dashboard() -> Response {
    dashboard_file("text/html; charset=utf-8", DASHBOARD_HTML)
}

pub async fn dashboard_js() -> Response {
    dashboard_file("text/javascript; charset=utf-8", DASHBOARD_JS)
}

pub async fn dashboard_css() -> Response {
    dashboard_file("text/css; charset=utf-8", DASHBOARD_CSS)
}
