//! Dispatch on the server (SPEC §5): what a pool hands out now, and the URLs a claimed run's
//! `endpoints` resolve to. The decision itself is the domain's ([`tether_domain::dispatch`]);
//! this module reads the pools and endpoints from the store, at the store's `now`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use tether_domain::dispatch::{choose, Candidate};
use tether_domain::{Dispatch, DispatchSource, Freshness, Millis, TetherConfig};
use tether_store::{ClaimedRun, EndpointRecord, PoolRecord, StoreResult};

use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// Rotates each pool's pick among its ready endpoints, so load spreads across them.
static NEXT_PICK: AtomicU64 = AtomicU64::new(0);

/// Pools and endpoints as read at one moment of the store's clock.
pub struct PoolSnapshot {
    pub pools: BTreeMap<String, PoolRecord>,
    pub endpoints: Vec<EndpointRecord>,
    pub now: Millis,
}

/// A pool's freshness window.
pub fn freshness(pool: &PoolRecord) -> Freshness {
    Freshness::new(pool.freshness_ms)
}

impl PoolSnapshot {
    pub async fn load(state: &AppState) -> StoreResult<PoolSnapshot> {
        let pools = state.store.list_pools().await?;
        let endpoints = state.store.list_endpoints().await?;
        // Read after the stamps, so no stamp is judged younger than it is.
        let now = state.store.now().await?;
        Ok(PoolSnapshot {
            pools: pools.into_iter().map(|p| (p.name.clone(), p)).collect(),
            endpoints,
            now,
        })
    }

    /// What `pool` hands out now; `None` for a pool that does not exist.
    pub fn dispatch(&self, pool: &str) -> Option<Dispatch> {
        let record = self.pools.get(pool)?;
        let candidates: Vec<Candidate<'_>> = self
            .endpoints
            .iter()
            .filter(|e| e.pool == pool)
            .map(|e| Candidate {
                name: &e.name,
                url: &e.url,
                kind: e.kind,
                last_ready_at: e.last_ready_at,
            })
            .collect();
        Some(choose(
            &candidates,
            freshness(record),
            record.fallback_url.as_deref(),
            self.now,
            NEXT_PICK.fetch_add(1, Ordering::Relaxed),
        ))
    }
}

/// `422 unknown_pool` if a submission's `endpoints` names a pool that does not exist. Call it
/// before accepting a run.
pub async fn check_run_endpoints(
    state: &AppState,
    endpoints: &BTreeMap<String, String>,
) -> ApiResult<()> {
    if endpoints.is_empty() {
        return Ok(());
    }
    let pools = state.store.list_pools().await?;
    for (var, pool) in endpoints {
        if !pools.iter().any(|p| &p.name == pool) {
            return Err(ApiError::invalid(
                "unknown_pool",
                format!("endpoints: `{var}` names pool `{pool}`, and no pool is named so"),
            ));
        }
    }
    Ok(())
}

/// What each claimed run's `endpoints` resolve to now, as env vars to add to its assignment
/// (aligned with `claimed`). Each attempt's dispatch is recorded in its history. Claims are
/// already made, so a store failure here does not fail the claim: the runs get the config
/// file's fallbacks and the record is skipped.
pub async fn resolve_claimed(
    state: &AppState,
    worker_id: &str,
    claimed: &[ClaimedRun],
) -> Vec<BTreeMap<String, String>> {
    if claimed.iter().all(|c| c.run.spec.endpoints.is_empty()) {
        return vec![BTreeMap::new(); claimed.len()];
    }
    let snapshot = match PoolSnapshot::load(state).await {
        Ok(snapshot) => Some(snapshot),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read pools for dispatch; handing out fallbacks");
            None
        }
    };
    let mut envs = Vec::with_capacity(claimed.len());
    for c in claimed {
        let mut dispatched: BTreeMap<String, Dispatch> = BTreeMap::new();
        for (var, pool) in &c.run.spec.endpoints {
            let dispatch = match &snapshot {
                Some(s) => s.dispatch(pool),
                None => config_fallback(&state.config.lanes, pool),
            };
            // A pool gone since the run was accepted gets nothing, like a pool with no
            // fallback and nothing ready.
            let dispatch = dispatch.unwrap_or(Dispatch {
                url: None,
                source: DispatchSource::Fallback,
                endpoint: None,
            });
            metrics::counter!("tether_dispatch_total", "pool" => pool.clone(),
                "source" => dispatch.source.as_str())
            .increment(1);
            dispatched.insert(var.clone(), dispatch);
        }
        if snapshot.is_some() && !dispatched.is_empty() {
            if let Err(e) = state
                .store
                .record_dispatch(&c.run.id, c.attempt, worker_id, &dispatched)
                .await
            {
                tracing::warn!(run_id = %c.run.id, attempt = c.attempt, error = %e,
                    "could not record the attempt's dispatch");
            }
        }
        envs.push(
            dispatched
                .into_iter()
                .filter_map(|(var, d)| d.url.map(|url| (var, url)))
                .collect(),
        );
    }
    envs
}

fn config_fallback(config: &TetherConfig, pool: &str) -> Option<Dispatch> {
    config.pools.get(pool).map(|p| Dispatch {
        url: p.fallback_url.clone(),
        source: DispatchSource::Fallback,
        endpoint: None,
    })
}
