//! Lanes and pools, as the config file (`--config`, TOML) names them (SPEC §4).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::spec::Resources;

/// What a lane does with a submission that does not fit now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Wait `pending`, first in first out within the lane.
    #[default]
    Queue,
    /// Refuse at the door with `503` and `Retry-After`.
    Reject,
}

/// A lane's policy. Every key is optional; what a lane leaves out comes from the server's
/// defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LanePolicy {
    #[serde(default)]
    pub on_full: OnFull,
    pub max_concurrency: Option<u32>,
    pub heartbeat_timeout_s: Option<f64>,
    pub max_attempts: Option<u32>,
    pub timeout_s: Option<f64>,
    pub resources: Option<Resources>,
    pub output_limit_mb: Option<u64>,
    /// How long the lane's finished runs (with their events and output) are kept, in seconds;
    /// `0` keeps them for ever. Unset: the server's `--retention`.
    pub retention_s: Option<f64>,
}

/// A pool of service endpoints with its public fallback (SPEC §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub fallback_url: Option<String>,
    #[serde(default = "default_freshness_s")]
    pub freshness_s: f64,
}

fn default_freshness_s() -> f64 {
    120.0
}

/// The whole config file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TetherConfig {
    #[serde(default)]
    pub lanes: BTreeMap<String, LanePolicy>,
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
}

/// The lane every run without one goes to; it always exists.
pub const DEFAULT_LANE: &str = "default";

impl TetherConfig {
    /// The policy of a lane, or `None` if the config does not name it (`default` always exists).
    pub fn lane(&self, name: &str) -> Option<LanePolicy> {
        match self.lanes.get(name) {
            Some(policy) => Some(policy.clone()),
            None if name == DEFAULT_LANE => Some(LanePolicy::default()),
            None => None,
        }
    }

    /// Every lane, `default` included.
    pub fn lane_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lanes.keys().cloned().collect();
        if !self.lanes.contains_key(DEFAULT_LANE) {
            names.insert(0, DEFAULT_LANE.to_string());
        }
        names
    }
}
