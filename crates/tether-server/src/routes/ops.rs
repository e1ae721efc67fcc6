//! Operating the server: health, readiness, metrics, the OpenAPI document, the dashboard.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::AppState;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "ok": true }))
}

/// Ready while the store answers and no call failed for want of it in the last few seconds
/// (a full disk fails writes while reads still answer).
pub async fn readyz(State(state): State<AppState>) -> Response {
    let failure = match state.store.ping().await {
        Ok(()) => state.health.recent_failure(crate::health::RECENT),
        Err(e) => {
            state.health.failed(e.to_string());
            Some(e.to_string())
        }
    };
    match failure {
        None => Json(json!({ "ready": true })).into_response(),
        Some(message) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            Json(json!({ "ready": false, "error": { "code": "store_unavailable", "message": message } })),
        )
            .into_response(),
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    crate::reconciler::export_gauges(&state).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
        .into_response()
}

pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(crate::openapi::document())
}

pub async fn dashboard() -> Html<&'static str> {
    Html(include_str!("../dashboard.html"))
}
