//! `GET /v1/runs/{id}/output`: a run's output a window at a time, newest first, so the
//! dashboard can show the tail of a 50 MB log at once and load earlier parts on demand.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use tether_api::OutputPage;
use tether_store::EventKind;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery};
use crate::views::event_view;
use crate::AppState;

/// The window when the caller names none, and the most it may ask for.
const DEFAULT_WINDOW_BYTES: u64 = 256 * 1024;
const MAX_WINDOW_BYTES: u64 = 4 * 1024 * 1024;
/// Events read from the store per step backwards.
const STEP: u32 = 256;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct OutputQuery {
    /// Only events with a seq below this (from a previous page's `earlier_before`); absent:
    /// the tail.
    before: Option<i64>,
    /// About this many bytes of output (a whole event more at most); default 256 KiB, at most
    /// 4 MiB.
    max_bytes: Option<u64>,
}

/// `GET /v1/runs/{id}/output?before=&max_bytes=`.
#[utoipa::path(get, path = "/v1/runs/{id}/output", params(OutputQuery),
    responses((status = 200, body = OutputPage), (status = 404, body = tether_api::ErrorBody),
              (status = 422, body = tether_api::ErrorBody)))]
pub async fn run_output(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<OutputQuery>,
) -> ApiResult<Json<OutputPage>> {
    let max_bytes = query.max_bytes.unwrap_or(DEFAULT_WINDOW_BYTES);
    if !(1..=MAX_WINDOW_BYTES).contains(&max_bytes) {
        return Err(ApiError::invalid(
            "invalid_field",
            format!("max_bytes: must be 1 to {MAX_WINDOW_BYTES}"),
        ));
    }
    if query.before.is_some_and(|b| b < 1) {
        return Err(ApiError::invalid(
            "invalid_field",
            "before: must be an event seq",
        ));
    }
    let run = state
        .store
        .get_run(&id)
        .await?
        .ok_or(ApiError::RunNotFound)?;
    let mut before = query.before.unwrap_or(i64::MAX);
    // From the tail: whatever the newest event read is, the page covers everything up to it.
    let mut through_seq = query.before.map(|b| b - 1);
    let mut newest_first = Vec::new();
    let mut bytes = 0u64;
    let mut exhausted = false;
    while bytes < max_bytes {
        let step = state.store.events_before(&id, before, STEP).await?;
        let Some(oldest) = step.last() else {
            exhausted = true;
            break;
        };
        before = oldest.seq;
        through_seq = through_seq.or(step.first().map(|e| e.seq));
        for event in step {
            if bytes >= max_bytes {
                break;
            }
            if event.kind == EventKind::Log {
                bytes += event.data.as_ref().map_or(0, |d| d.len() as u64);
                newest_first.push(event);
            }
        }
    }
    let oldest_shown = newest_first.last().map(|e| e.seq);
    // More is earlier unless the walk reached seq 1.
    let earlier_before = match (exhausted, oldest_shown) {
        (true, _) => None,
        (false, Some(seq)) if seq > 1 => Some(seq),
        _ => None,
    };
    newest_first.reverse();
    Ok(Json(OutputPage {
        events: newest_first.iter().map(event_view).collect(),
        through_seq: through_seq.unwrap_or(run.last_event_seq),
        earlier_before,
    }))
}
