//! Endpoint readiness (SPEC §5): pools, their endpoints, the reconciler's probe stamps, and what
//! each attempt was handed. A supertrait of [`crate::Store`], so every store keeps these promises
//! too and the conformance suite holds it to them.

use std::collections::BTreeMap;

use async_trait::async_trait;
use tether_domain::{Dispatch, EndpointKind, Millis};

use crate::StoreResult;

mod engine;
pub use engine::EndpointDriver;

/// Who last set a pool. A pool set through the API keeps its settings when a server starts
/// with a config file that names it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSource {
    Config,
    Api,
}

impl PoolSource {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolSource::Config => "config",
            PoolSource::Api => "api",
        }
    }

    pub fn parse(text: &str) -> Option<PoolSource> {
        match text {
            "config" => Some(PoolSource::Config),
            "api" => Some(PoolSource::Api),
            _ => None,
        }
    }
}

/// A pool as it is set.
#[derive(Debug, Clone, PartialEq)]
pub struct NewPool {
    pub name: String,
    pub fallback_url: Option<String>,
    /// An endpoint's readiness stamp counts while it is younger than this.
    pub freshness_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolRecord {
    pub name: String,
    pub fallback_url: Option<String>,
    pub freshness_ms: i64,
    pub source: PoolSource,
    pub updated_at: Millis,
}

/// An endpoint as `PUT /v1/endpoints/{name}` registers it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEndpoint {
    pub name: String,
    pub pool: String,
    pub url: String,
    /// Required for `probed` endpoints.
    pub readiness_url: Option<String>,
    pub kind: EndpointKind,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndpointRecord {
    pub name: String,
    pub pool: String,
    pub url: String,
    pub readiness_url: Option<String>,
    pub kind: EndpointKind,
    /// Rises whenever the definition changes; fences probe results taken of an older one.
    pub revision: i64,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// The store's clock at the last 2xx readiness answer; `None`: never (or not since the
    /// definition last changed).
    pub last_ready_at: Option<Millis>,
    /// The store's clock at the last probe result, ready or not.
    pub last_probe_at: Option<Millis>,
    /// Why the last probe did not count as ready; `None` after a ready answer.
    pub last_error: Option<String>,
}

impl EndpointRecord {
    /// Does `new` define this endpoint exactly as it is (so a `PUT` of it changes nothing)?
    pub fn is_defined_as(&self, new: &NewEndpoint) -> bool {
        self.pool == new.pool
            && self.url == new.url
            && self.readiness_url == new.readiness_url
            && self.kind == new.kind
    }
}

/// What [`EndpointStore::upsert_endpoint`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum EndpointSaved {
    Created(EndpointRecord),
    /// Updated, or unchanged when the definition was the same (its stamp is then kept).
    Updated(EndpointRecord),
    /// The pool it names does not exist. Nothing was written.
    UnknownPool,
}

/// The right to probe one endpoint once, handed to exactly one server per probe interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeClaim {
    pub endpoint: String,
    pub pool: String,
    pub revision: i64,
    pub readiness_url: String,
    /// The store's clock when the claim was taken; the result is recorded only against it.
    pub claimed_at: Millis,
}

/// How a probe went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// A 2xx answer.
    Ready,
    /// Anything else: a non-2xx status, a connection error, a timeout.
    NotReady { error: String },
}

#[async_trait]
pub trait EndpointStore: Send + Sync {
    /// Sets a pool. `PoolSource::Config` (servers upsert their config file's pools at start)
    /// does not overwrite a pool last set through the API; `PoolSource::Api` always writes.
    /// Answers the pool as stored afterwards.
    async fn upsert_pool(&self, pool: &NewPool, source: PoolSource) -> StoreResult<PoolRecord>;

    /// Every pool, by name.
    async fn list_pools(&self) -> StoreResult<Vec<PoolRecord>>;

    /// Registers or replaces an endpoint. A changed definition (pool, URLs or kind) bumps the
    /// revision and clears the readiness stamp: a stamp vouches only for what was probed. An
    /// unchanged definition keeps its stamp.
    async fn upsert_endpoint(&self, endpoint: &NewEndpoint) -> StoreResult<EndpointSaved>;

    /// Removes an endpoint; `false` if there was none.
    async fn delete_endpoint(&self, name: &str) -> StoreResult<bool>;

    /// Every endpoint, by name.
    async fn list_endpoints(&self) -> StoreResult<Vec<EndpointRecord>>;

    /// Claims the right to probe every `probed` endpoint whose probe is due, at most `limit`.
    /// Invariant: an endpoint is claimed at most once per `due_after_ms` of the store's clock,
    /// whichever server asks (a conditional write on the last claim's stamp), so N servers
    /// probe each endpoint about once per interval between them, not N times.
    async fn claim_due_probes(&self, due_after_ms: i64, limit: u32)
        -> StoreResult<Vec<ProbeClaim>>;

    /// Records a probe's outcome: `last_probe_at = now` and, only when ready,
    /// `last_ready_at = now` (else `last_error`). Lands only if the claim is still the
    /// endpoint's latest and its definition unchanged; answers whether it landed.
    async fn record_probe(&self, claim: &ProbeClaim, outcome: &ProbeOutcome) -> StoreResult<bool>;

    /// Records what the named attempt was handed, by env var. Written once, only while the
    /// attempt is the run's current one and held by `worker_id`; `StaleAttempt` otherwise.
    async fn record_dispatch(
        &self,
        run_id: &str,
        attempt: u32,
        worker_id: &str,
        endpoints: &BTreeMap<String, Dispatch>,
    ) -> StoreResult<()>;
}
