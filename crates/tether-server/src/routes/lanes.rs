//! `GET /v1/lanes`: each lane's policy and what it holds now.

use axum::extract::State;
use axum::Json;
use tether_api::{LaneList, LaneView};

use crate::error::ApiResult;
use crate::AppState;

/// `GET /v1/lanes`.
///
/// Answered from a read of the store shared with whoever asks at the same time (at most one
/// per 250 ms, each begun after the request arrived).
#[utoipa::path(get, path = "/v1/lanes", responses((status = 200, body = LaneList)))]
pub async fn list_lanes(State(state): State<AppState>) -> ApiResult<Json<LaneList>> {
    let capacity = state.lane_reads.read(&state).await?;
    let lanes: Vec<LaneView> = state
        .config
        .lanes
        .lane_names()
        .iter()
        .filter_map(|name| {
            let policy = state.config.lanes.lane(name)?;
            Some(capacity.lane_view(name, &policy))
        })
        .collect();
    Ok(Json(LaneList { lanes }))
}
