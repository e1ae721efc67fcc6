//! What a server is told at start.

use std::time::Duration;

use tether_domain::{SubmitDefaults, TetherConfig};

/// A server's settings (SPEC §6). The CLI fills these from flags and `TETHER_*` variables.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `sqlite://…` or `postgres://…`.
    pub database: String,
    /// Lanes and pools from `--config`.
    pub lanes: TetherConfig,
    /// Handed to workers when they register.
    pub heartbeat_interval: Duration,
    /// The `heartbeat_timeout_s` of runs whose lane sets none.
    pub stale_after: Duration,
    pub sse_heartbeat: Duration,
    /// The longest gap between two reaper sweeps.
    pub reaper_interval: Duration,
    pub probe_interval: Duration,
    pub api_token: Option<String>,
    pub worker_token: Option<String>,
    /// How long a claim may be held open waiting for work, at most.
    pub max_claim_wait: Duration,
    /// How long finished runs are kept in lanes that set no `retention_s`; zero keeps them
    /// for ever.
    pub retention: Duration,
    /// Serve HTTPS with this (`--tls-cert`, `--tls-key`); `None` serves plain HTTP.
    pub tls: Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>,
    /// CA certificates (PEM) trusted for `https://` readiness probes besides the public CAs.
    pub ca_cert_pem: Option<Vec<u8>>,
    /// Where readiness probes may go (`--probe-networks`).
    pub probe_networks: crate::probe_policy::ProbeNetworks,
    /// Timeouts and the cap on connections (see `accept.rs`).
    pub connections: crate::accept::ConnectionLimits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            database: "sqlite://./.tether/tether.db".into(),
            lanes: TetherConfig::default(),
            heartbeat_interval: Duration::from_secs(10),
            stale_after: Duration::from_secs(60),
            sse_heartbeat: Duration::from_secs(15),
            reaper_interval: Duration::from_secs(30),
            probe_interval: Duration::from_secs(30),
            api_token: None,
            worker_token: None,
            max_claim_wait: Duration::from_secs(30),
            retention: Duration::from_secs(14 * 24 * 3600),
            tls: None,
            ca_cert_pem: None,
            probe_networks: crate::probe_policy::ProbeNetworks::default(),
            connections: crate::accept::ConnectionLimits::default(),
        }
    }
}

impl ServerConfig {
    pub fn submit_defaults(&self) -> SubmitDefaults {
        SubmitDefaults {
            stale_after_ms: self.stale_after.as_millis() as i64,
            ..SubmitDefaults::default()
        }
    }

    pub fn heartbeat_interval_ms(&self) -> i64 {
        self.heartbeat_interval.as_millis() as i64
    }

    /// Each lane's retention in milliseconds, for the lanes that prune at all (a zero
    /// retention keeps everything and is left out).
    pub fn lane_retentions_ms(&self) -> Vec<(String, i64)> {
        self.lanes
            .lane_names()
            .into_iter()
            .filter_map(|name| {
                let lane = self.lanes.lane(&name).unwrap_or_default();
                let ms = match lane.retention_s {
                    Some(s) if s.is_finite() && s > 0.0 => (s * 1000.0) as i64,
                    Some(_) => 0,
                    None => self.retention.as_millis() as i64,
                };
                (ms > 0).then_some((name, ms))
            })
            .collect()
    }

    /// A worker whose last heartbeat is older than this is `suspect`: it is handed no runs
    /// and its capacity counts for nothing.
    pub fn worker_fresh_ms(&self) -> i64 {
        tether_domain::liveness::suspect_after_ms(self.heartbeat_interval_ms())
    }
}
