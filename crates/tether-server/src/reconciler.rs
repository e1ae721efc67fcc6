//! The readiness reconciler (SPEC §5): inside every server, it probes each `probed` endpoint's
//! `readiness_url` every `--probe-interval` and stamps `last_ready_at` (the store's clock) only
//! on a 2xx answer. Probes run concurrently, each with a short timeout, so one hanging endpoint
//! delays no other. Servers sharing a database share the probing: each endpoint is claimed by
//! one server per interval ([`tether_store::EndpointStore::claim_due_probes`]), and a stamp from
//! any server counts for all. If every reconciler stops, stamps age past their pool's
//! freshness and dispatch falls back, rather than trusting an old stamp.
//!
//! Probes speak `http://` and `https://` (rustls), trusting the public CAs (webpki-roots) plus the
//! server's `--ca-cert`.

use std::time::Duration;

use tether_domain::dispatch::is_ready;
use tether_domain::time::age_s;
use tether_domain::EndpointKind;
use tether_store::{ProbeClaim, ProbeOutcome, SharedStore};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::dispatch::{freshness, PoolSnapshot};
use crate::AppState;

/// The longest a probe waits for an answer.
const MAX_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many endpoints claimed per tick by one server.
const MAX_CLAIMS_PER_TICK: u32 = 512;

/// How long a probe waits: short, and well inside the interval, so its result lands while its
/// claim is still the endpoint's latest.
pub fn probe_timeout(interval: Duration) -> Duration {
    (interval / 2).min(MAX_PROBE_TIMEOUT)
}

/// An endpoint is due again once its last claim is this old: a little less than the interval,
/// so a server ticking every interval is not refused by its own previous claim through timer
/// jitter (which would skip a whole interval).
pub fn due_after(interval: Duration) -> Duration {
    interval * 4 / 5
}

/// Runs until the server shuts down.
pub async fn run_reconciler(state: AppState) {
    let interval = state.config.probe_interval.max(Duration::from_millis(10));
    let timeout = probe_timeout(interval);
    let due_after_ms = due_after(interval).as_millis() as i64;
    let builder = match tether_api::client::http_client(state.config.ca_cert_pem.as_deref(), true) {
        Ok(builder) => builder,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the readiness prober; endpoints will go stale");
            return;
        }
    };
    let http = match builder
        .timeout(timeout)
        .connect_timeout(timeout)
        .no_proxy()
        // Only where the probe policy allows, and a redirect is an answer, not a hop.
        .dns_resolver(state.config.probe_networks.resolver())
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(http) => http,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the readiness prober; endpoints will go stale");
            return;
        }
    };
    warn_about_flapping_pools(&state, interval).await;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Each probe is its own task: a hanging one holds up nothing else, and all end with the
    // reconciler (dropping the set aborts them).
    let mut probes = JoinSet::new();
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = ticker.tick() => {
                match state.store.claim_due_probes(due_after_ms, MAX_CLAIMS_PER_TICK).await {
                    Ok(claims) => {
                        for claim in claims {
                            let allowed = state.config.probe_networks.allows_url(&claim.readiness_url);
                            probes.spawn(probe(state.store.clone(), http.clone(), claim, timeout, allowed));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot claim readiness probes"),
                }
            }
            Some(_) = probes.join_next(), if !probes.is_empty() => {}
        }
    }
}

/// Probes one endpoint and records the outcome against its claim. `last_error` says only
/// what kind of failure it was (`HTTP 503`, `unreachable`, a timeout): nothing of the answer's
/// body or of the network's detail reaches clients.
async fn probe(
    store: SharedStore,
    http: reqwest::Client,
    claim: ProbeClaim,
    timeout: Duration,
    allowed: bool,
) {
    let not_ready = |error: String| ProbeOutcome::NotReady { error };
    let outcome = if !allowed {
        not_ready("refused: the probe policy does not allow this address".into())
    } else {
        match tokio::time::timeout(timeout, http.get(&claim.readiness_url).send()).await {
            Ok(Ok(resp)) if resp.status().is_success() => ProbeOutcome::Ready,
            Ok(Ok(resp)) => not_ready(format!("HTTP {}", resp.status().as_u16())),
            Ok(Err(e)) if e.is_timeout() => {
                not_ready(format!("no readiness answer within {timeout:?}"))
            }
            Ok(Err(e)) => {
                tracing::debug!(endpoint = %claim.endpoint, error = %e, "readiness probe failed");
                not_ready("unreachable".into())
            }
            Err(_) => not_ready(format!("no readiness answer within {timeout:?}")),
        }
    };
    let label = match outcome {
        ProbeOutcome::Ready => "ready",
        ProbeOutcome::NotReady { .. } => "not_ready",
    };
    metrics::counter!("tether_endpoint_probes_total", "endpoint" => claim.endpoint.clone(),
        "pool" => claim.pool.clone(), "outcome" => label)
    .increment(1);
    match store.record_probe(&claim, &outcome).await {
        Ok(true) => {
            if let ProbeOutcome::NotReady { error } = &outcome {
                tracing::debug!(endpoint = %claim.endpoint, %error, "endpoint not ready");
            }
        }
        // Superseded: the endpoint changed, or its claim passed to another probe.
        Ok(false) => tracing::debug!(endpoint = %claim.endpoint, "probe result superseded"),
        Err(e) => tracing::warn!(endpoint = %claim.endpoint, error = %e, "cannot record probe"),
    }
}

/// A freshness window no longer than the probe interval flaps on every late probe.
async fn warn_about_flapping_pools(state: &AppState, interval: Duration) {
    if let Ok(pools) = state.store.list_pools().await {
        for pool in pools
            .iter()
            .filter(|p| p.freshness_ms <= interval.as_millis() as i64)
        {
            tracing::warn!(pool = %pool.name, freshness_ms = pool.freshness_ms,
                probe_interval = ?interval,
                "the pool's freshness is not longer than the probe interval: one missed probe \
                 will make its endpoints unready; make freshness_s at least two intervals");
        }
    }
}

/// Sets the per-endpoint gauges `tether_endpoint_ready{endpoint,pool}` and
/// `tether_endpoint_stamp_age_seconds{endpoint,pool}` (absent until first stamped) from the
/// store, at the store's `now`. Called when `/metrics` is scraped.
pub async fn export_gauges(state: &AppState) {
    crate::metrics::install();
    let snapshot = match PoolSnapshot::load(state).await {
        Ok(snapshot) => snapshot,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read endpoints for metrics");
            return;
        }
    };
    for e in &snapshot.endpoints {
        let Some(pool) = snapshot.pools.get(&e.pool) else {
            continue;
        };
        let ready = is_ready(e.kind, e.last_ready_at, freshness(pool), snapshot.now);
        let labels = [("endpoint", e.name.clone()), ("pool", e.pool.clone())];
        metrics::gauge!("tether_endpoint_ready", &labels).set(if ready { 1.0 } else { 0.0 });
        if let (EndpointKind::Probed, Some(stamp)) = (e.kind, e.last_ready_at) {
            metrics::gauge!("tether_endpoint_stamp_age_seconds", &labels)
                .set(age_s(snapshot.now, stamp));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_fit_inside_the_interval() {
        assert_eq!(
            probe_timeout(Duration::from_secs(30)),
            Duration::from_secs(5)
        );
        assert_eq!(
            probe_timeout(Duration::from_millis(200)),
            Duration::from_millis(100)
        );
        assert!(due_after(Duration::from_secs(30)) < Duration::from_secs(30));
        assert!(probe_timeout(Duration::from_secs(1)) < due_after(Duration::from_secs(1)));
    }
}
