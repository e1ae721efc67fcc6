//! Client calls on endpoints and pools (SPEC §5): register, remove and list endpoints with
//! their readiness; set and list pools; ask a pool what it hands out now.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use tether_api::{
    DispatchView, EndpointList, EndpointView, PoolList, PoolView, PutEndpointRequest,
    PutPoolRequest,
};
use tether_domain::EndpointKind;
use tether_store::{EndpointSaved, NewEndpoint, NewPool, PoolSource};

use crate::dispatch::PoolSnapshot;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath};
use crate::views::{endpoint_view, pool_view};
use crate::AppState;

/// A pool's `freshness_s` when none is given.
pub const DEFAULT_FRESHNESS_S: f64 = 120.0;

/// Endpoint and pool names: 1 to 128 of `A-Z a-z 0-9 . _ -`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// An absolute `http://` or `https://` URL with a host.
pub fn check_url(field: &str, url: &str) -> ApiResult<()> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err(ApiError::invalid(
            "invalid_field",
            format!("{field}: `{url}` is not an absolute http:// or https:// URL"),
        )),
    }
}

fn check_name(field: &str, name: &str) -> ApiResult<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "invalid_field",
            format!("{field}: must be 1 to 128 letters, digits, `.`, `_` or `-`"),
        ))
    }
}

/// A pool's settings, checked; used for `PUT /v1/pools/{pool}` and the config file's pools.
pub fn new_pool(
    name: &str,
    fallback_url: Option<String>,
    freshness_s: Option<f64>,
) -> ApiResult<NewPool> {
    check_name("pool", name)?;
    if let Some(url) = &fallback_url {
        check_url("fallback_url", url)?;
    }
    let freshness_s = freshness_s.unwrap_or(DEFAULT_FRESHNESS_S);
    if !freshness_s.is_finite() || freshness_s <= 0.0 || freshness_s > 86_400.0 * 365.0 {
        return Err(ApiError::invalid(
            "invalid_field",
            "freshness_s: must be a positive number of seconds",
        ));
    }
    Ok(NewPool {
        name: name.to_string(),
        fallback_url,
        freshness_ms: (freshness_s * 1000.0).round().max(1.0) as i64,
    })
}

/// `PUT /v1/endpoints/{name}`: `201` registered, `200` replaced (or unchanged).
#[utoipa::path(put, path = "/v1/endpoints/{name}", request_body = tether_api::PutEndpointRequest,
    responses((status = 201, body = tether_api::EndpointView), (status = 200, body = tether_api::EndpointView),
              (status = 422, body = tether_api::ErrorBody)))]
pub async fn put_endpoint(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(request): ApiJson<PutEndpointRequest>,
) -> ApiResult<(StatusCode, Json<EndpointView>)> {
    check_name("name", &name)?;
    check_name("pool", &request.pool)?;
    check_url("url", &request.url)?;
    match (&request.readiness_url, request.kind) {
        (Some(url), _) => {
            check_url("readiness_url", url)?;
            if !state.config.probe_networks.allows_url(url) {
                return Err(ApiError::invalid(
                    "invalid_field",
                    "readiness_url: probes may not reach that address (see --probe-networks)",
                ));
            }
        }
        (None, EndpointKind::Probed) => {
            return Err(ApiError::invalid(
                "invalid_field",
                "readiness_url: required for a `probed` endpoint",
            ))
        }
        (None, EndpointKind::AlwaysReady) => {}
    }
    let saved = state
        .store
        .upsert_endpoint(&NewEndpoint {
            name,
            pool: request.pool.clone(),
            url: request.url,
            readiness_url: request.readiness_url,
            kind: request.kind,
        })
        .await?;
    let (status, record) = match saved {
        EndpointSaved::Created(record) => (StatusCode::CREATED, record),
        EndpointSaved::Updated(record) => (StatusCode::OK, record),
        EndpointSaved::UnknownPool => {
            return Err(ApiError::invalid(
                "unknown_pool",
                format!(
                    "pool: no pool is named `{}`; set it in the config file or with \
                     PUT /v1/pools/{{pool}}",
                    request.pool
                ),
            ))
        }
    };
    let snapshot = PoolSnapshot::load(&state).await?;
    tracing::info!(endpoint = %record.name, pool = %record.pool, kind = record.kind.as_str(),
        "endpoint registered");
    Ok((status, Json(endpoint_view(&record, &snapshot))))
}

/// `DELETE /v1/endpoints/{name}`.
#[utoipa::path(delete, path = "/v1/endpoints/{name}", responses((status = 204), (status = 404, body = tether_api::ErrorBody)))]
pub async fn delete_endpoint(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<StatusCode> {
    if state.store.delete_endpoint(&name).await? {
        tracing::info!(endpoint = %name, "endpoint removed");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no endpoint is named `{name}`")))
    }
}

/// `GET /v1/endpoints`: each endpoint with its readiness and stamp age.
#[utoipa::path(get, path = "/v1/endpoints", responses((status = 200, body = tether_api::EndpointList)))]
pub async fn list_endpoints(State(state): State<AppState>) -> ApiResult<Json<EndpointList>> {
    let snapshot = PoolSnapshot::load(&state).await?;
    Ok(Json(EndpointList {
        endpoints: snapshot
            .endpoints
            .iter()
            .map(|e| endpoint_view(e, &snapshot))
            .collect(),
    }))
}

/// `PUT /v1/pools/{pool}`: sets a pool; config files never override it afterwards.
#[utoipa::path(put, path = "/v1/pools/{pool}", request_body = tether_api::PutPoolRequest,
    responses((status = 200, body = tether_api::PoolView), (status = 422, body = tether_api::ErrorBody)))]
pub async fn put_pool(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(request): ApiJson<PutPoolRequest>,
) -> ApiResult<Json<PoolView>> {
    let pool = new_pool(&name, request.fallback_url, request.freshness_s)?;
    let record = state.store.upsert_pool(&pool, PoolSource::Api).await?;
    Ok(Json(pool_view(&record)))
}

/// `GET /v1/pools`.
#[utoipa::path(get, path = "/v1/pools", responses((status = 200, body = tether_api::PoolList)))]
pub async fn list_pools(State(state): State<AppState>) -> ApiResult<Json<PoolList>> {
    let pools = state.store.list_pools().await?;
    Ok(Json(PoolList {
        pools: pools.iter().map(pool_view).collect(),
    }))
}

/// `GET /v1/pools/{pool}/dispatch`: a ready endpoint, else the fallback; `503
/// no_ready_endpoint` when neither exists.
#[utoipa::path(get, path = "/v1/pools/{pool}/dispatch",
    responses((status = 200, body = tether_api::DispatchView), (status = 404, body = tether_api::ErrorBody), (status = 503, body = tether_api::ErrorBody)))]
pub async fn dispatch(
    State(state): State<AppState>,
    ApiPath(pool): ApiPath<String>,
) -> ApiResult<Json<DispatchView>> {
    let snapshot = PoolSnapshot::load(&state).await?;
    let dispatch = snapshot
        .dispatch(&pool)
        .ok_or_else(|| ApiError::NotFound(format!("no pool is named `{pool}`")))?;
    metrics::counter!("tether_dispatch_total", "pool" => pool.clone(),
        "source" => dispatch.source.as_str())
    .increment(1);
    if dispatch.url.is_none() {
        return Err(ApiError::NoReadyEndpoint(format!(
            "pool `{pool}` has no ready endpoint and no fallback_url"
        )));
    }
    Ok(Json(dispatch.into()))
}
