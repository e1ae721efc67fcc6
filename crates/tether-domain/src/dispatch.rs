//! Endpoint dispatch (SPEC §5): which URL a pool hands out right now. An endpoint is ready
//! while its readiness stamp is younger than the pool's freshness window, judged by
//! [`Freshness`] at the store's `now`; an `always_ready` endpoint needs no stamp. With no
//! ready endpoint the pool's public fallback is handed out instead.

use serde::{Deserialize, Serialize};

use crate::liveness::Freshness;
use crate::time::Millis;

/// How an endpoint's readiness is known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointKind {
    /// Ready only while the reconciler's last 2xx from its `readiness_url` is fresh.
    #[default]
    Probed,
    /// Always handed out; never probed.
    AlwaysReady,
}

impl EndpointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointKind::Probed => "probed",
            EndpointKind::AlwaysReady => "always_ready",
        }
    }

    pub fn parse(text: &str) -> Option<EndpointKind> {
        match text {
            "probed" => Some(EndpointKind::Probed),
            "always_ready" => Some(EndpointKind::AlwaysReady),
            _ => None,
        }
    }
}

/// Where a dispatched URL came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DispatchSource {
    /// A ready endpoint of the pool.
    Endpoint,
    /// The pool's public fallback: no endpoint was ready.
    Fallback,
}

impl DispatchSource {
    pub fn as_str(self) -> &'static str {
        match self {
            DispatchSource::Endpoint => "endpoint",
            DispatchSource::Fallback => "fallback",
        }
    }
}

/// What a pool handed out. `url` is `None` only when no endpoint was ready and the pool has
/// no fallback: the run then gets no variable for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispatch {
    pub url: Option<String>,
    pub source: DispatchSource,
    /// The endpoint's name when `source` is `endpoint`.
    pub endpoint: Option<String>,
}

/// An endpoint as dispatch judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub url: &'a str,
    pub kind: EndpointKind,
    /// The store's clock when a probe last got a 2xx; `None`: never.
    pub last_ready_at: Option<Millis>,
}

/// Is an endpoint ready now? A probed endpoint never stamped is not; one whose stamp is older
/// than the window is not either, so a stalled reconciler degrades to the fallback instead of
/// trusting an old stamp.
pub fn is_ready(
    kind: EndpointKind,
    last_ready_at: Option<Millis>,
    freshness: Freshness,
    now: Millis,
) -> bool {
    match kind {
        EndpointKind::AlwaysReady => true,
        EndpointKind::Probed => freshness.is_fresh(last_ready_at, now),
    }
}

/// Picks what a pool hands out at `now`: one of its ready endpoints, chosen by `pick` among
/// them in name order (a rotating `pick` spreads load across them), else the fallback.
pub fn choose(
    candidates: &[Candidate<'_>],
    freshness: Freshness,
    fallback_url: Option<&str>,
    now: Millis,
    pick: u64,
) -> Dispatch {
    let mut ready: Vec<&Candidate<'_>> = candidates
        .iter()
        .filter(|c| is_ready(c.kind, c.last_ready_at, freshness, now))
        .collect();
    ready.sort_by(|a, b| a.name.cmp(b.name));
    if ready.is_empty() {
        return Dispatch {
            url: fallback_url.map(str::to_string),
            source: DispatchSource::Fallback,
            endpoint: None,
        };
    }
    let chosen = ready[(pick % ready.len() as u64) as usize];
    Dispatch {
        url: Some(chosen.url.to_string()),
        source: DispatchSource::Endpoint,
        endpoint: Some(chosen.name.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRESH: Freshness = Freshness::new(1_000);

    fn probed<'a>(name: &'a str, stamp: Option<Millis>) -> Candidate<'a> {
        Candidate {
            name,
            url: name,
            kind: EndpointKind::Probed,
            last_ready_at: stamp,
        }
    }

    #[test]
    fn a_fresh_endpoint_is_handed_out() {
        let d = choose(&[probed("a", Some(9_500))], FRESH, Some("fb"), 10_000, 0);
        assert_eq!(d.source, DispatchSource::Endpoint);
        assert_eq!(d.url.as_deref(), Some("a"));
        assert_eq!(d.endpoint.as_deref(), Some("a"));
    }

    #[test]
    fn never_stamped_and_old_stamps_fall_back() {
        for stamp in [None, Some(8_999)] {
            let d = choose(&[probed("a", stamp)], FRESH, Some("fb"), 10_000, 0);
            assert_eq!(d.source, DispatchSource::Fallback);
            assert_eq!(d.url.as_deref(), Some("fb"));
            assert_eq!(d.endpoint, None);
        }
    }

    #[test]
    fn always_ready_needs_no_stamp() {
        let c = Candidate {
            name: "a",
            url: "u",
            kind: EndpointKind::AlwaysReady,
            last_ready_at: None,
        };
        let d = choose(&[c], FRESH, None, 10_000, 0);
        assert_eq!(d.url.as_deref(), Some("u"));
    }

    #[test]
    fn no_ready_endpoint_and_no_fallback_gives_no_url() {
        let d = choose(&[probed("a", None)], FRESH, None, 10_000, 0);
        assert_eq!((d.url, d.source), (None, DispatchSource::Fallback));
    }

    #[test]
    fn picks_rotate_over_ready_endpoints_only() {
        let c = [
            probed("c", Some(10_000)),
            probed("stale", Some(0)),
            probed("a", Some(10_000)),
        ];
        let picks: Vec<String> = (0..4)
            .map(|p| choose(&c, FRESH, None, 10_000, p).endpoint.unwrap())
            .collect();
        assert_eq!(picks, ["a", "c", "a", "c"]);
    }

    #[test]
    fn kinds_round_trip() {
        for k in [EndpointKind::Probed, EndpointKind::AlwaysReady] {
            assert_eq!(EndpointKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(EndpointKind::parse("sometimes"), None);
    }
}
