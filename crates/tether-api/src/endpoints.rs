//! The wire types of endpoint readiness and dispatch (SPEC §5).

use serde::{Deserialize, Serialize};
use tether_domain::{DispatchSource, EndpointKind};

/// `PUT /v1/endpoints/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutEndpointRequest {
    pub pool: String,
    /// What runs are handed while the endpoint is ready.
    pub url: String,
    /// Probed every `--probe-interval`; only a 2xx answer stamps the endpoint ready. Required
    /// for `probed` endpoints.
    #[serde(default)]
    pub readiness_url: Option<String>,
    /// `probed` (default) or `always_ready`.
    #[serde(default)]
    #[schema(value_type = crate::schema::EndpointKind)]
    pub kind: EndpointKind,
}

/// An endpoint with its readiness, as `GET /v1/endpoints` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EndpointView {
    pub name: String,
    pub pool: String,
    pub url: String,
    pub readiness_url: Option<String>,
    #[schema(value_type = crate::schema::EndpointKind)]
    pub kind: EndpointKind,
    /// Would dispatch hand it out now: `always_ready`, or stamped within the pool's
    /// `freshness_s`.
    pub ready: bool,
    /// The last 2xx readiness answer, by the store's clock.
    pub last_ready_at: Option<String>,
    /// Seconds since `last_ready_at`; `null` if never stamped.
    pub stamp_age_s: Option<f64>,
    /// The last probe, ready or not.
    pub last_probe_at: Option<String>,
    /// Why the last probe did not count as ready; `null` after a ready answer.
    pub last_error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EndpointList {
    pub endpoints: Vec<EndpointView>,
}

/// `PUT /v1/pools/{pool}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutPoolRequest {
    /// Handed out when no endpoint of the pool is ready.
    #[serde(default)]
    pub fallback_url: Option<String>,
    /// How young a readiness stamp must be to count; default 120.
    #[serde(default)]
    pub freshness_s: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolView {
    pub name: String,
    pub fallback_url: Option<String>,
    pub freshness_s: f64,
    /// `config` (a server's config file) or `api` (`PUT /v1/pools/{pool}`, which config
    /// files never override).
    pub source: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolList {
    pub pools: Vec<PoolView>,
}

/// What a pool hands out: `GET /v1/pools/{pool}/dispatch`, and per env var in an attempt's
/// `endpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DispatchView {
    /// `null` only in an attempt's record, when nothing was ready and the pool has no
    /// fallback (the variable was then not set).
    pub url: Option<String>,
    #[schema(value_type = crate::schema::DispatchSource)]
    pub source: DispatchSource,
    /// The endpoint's name when `source` is `endpoint`.
    pub endpoint: Option<String>,
}

impl From<tether_domain::Dispatch> for DispatchView {
    fn from(d: tether_domain::Dispatch) -> DispatchView {
        DispatchView {
            url: d.url,
            source: d.source,
            endpoint: d.endpoint,
        }
    }
}
