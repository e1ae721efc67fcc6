//! What this server knows of its store's health, for readiness and for the reaper.
//!
//! A call that fails for want of the store (`503 store_unavailable`, a failed sweep, a failed
//! readiness ping) is recorded here. Two things follow from it:
//! - `/readyz` answers `503` while such a failure is recent ([`RECENT`]), so a load balancer
//!   stops sending traffic to a server that can only refuse it, even when reads still work
//!   (a full disk fails writes only);
//! - the server owes the runs a heartbeat grace: heartbeats sent during the outage were not
//!   recorded, which is no evidence against their workers. Before its next sweep, the reaper
//!   grants it (`Store::grant_heartbeat_grace`) once the store answers again.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::AppState;

/// How long a store failure keeps `/readyz` at `503`.
pub const RECENT: Duration = Duration::from_secs(5);

/// Marks a response that failed because the store could not be reached.
#[derive(Debug, Clone, Copy)]
pub struct StoreFailed;

#[derive(Debug, Default)]
struct Health {
    last_failure: Option<(Instant, String)>,
    /// Rises with every failure, so a grace granted while a newer failure happened does not
    /// clear the debt that newer failure created.
    failures: u64,
    /// The failure count a grace is owed for; `None` when nothing is owed.
    owed: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct StoreHealth {
    inner: Arc<Mutex<Health>>,
}

impl StoreHealth {
    fn lock(&self) -> MutexGuard<'_, Health> {
        // A poisoned lock still holds plain data worth reading.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A call could not reach the store.
    pub fn failed(&self, error: impl Into<String>) {
        let mut h = self.lock();
        h.failures += 1;
        h.owed = Some(h.failures);
        h.last_failure = Some((Instant::now(), error.into()));
        metrics::counter!("tether_store_failures_total").increment(1);
    }

    /// The last failure, if it happened within `within`.
    pub fn recent_failure(&self, within: Duration) -> Option<String> {
        let h = self.lock();
        h.last_failure
            .as_ref()
            .filter(|(at, _)| at.elapsed() <= within)
            .map(|(_, error)| error.clone())
    }

    /// A grace is owed: the token to hand [`StoreHealth::grace_granted`] once it is.
    pub fn grace_owed(&self) -> Option<u64> {
        self.lock().owed
    }

    /// The grace owed up to `token` was granted.
    pub fn grace_granted(&self, token: u64) {
        let mut h = self.lock();
        if h.owed == Some(token) {
            h.owed = None;
        }
    }
}

/// Records every response that failed for want of the store.
pub async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if response.extensions().get::<StoreFailed>().is_some() {
        state.health.failed("a request could not reach the store");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grace_is_owed_after_a_failure_until_granted_for_the_latest() {
        let h = StoreHealth::default();
        assert_eq!(h.grace_owed(), None);
        assert!(h.recent_failure(RECENT).is_none());
        h.failed("down");
        let token = h.grace_owed().unwrap();
        assert_eq!(h.recent_failure(RECENT).as_deref(), Some("down"));
        h.failed("still down");
        // Granted for an older failure: still owed for the newer one.
        h.grace_granted(token);
        let newer = h.grace_owed().unwrap();
        assert_ne!(newer, token);
        h.grace_granted(newer);
        assert_eq!(h.grace_owed(), None);
    }
}
