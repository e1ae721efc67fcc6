//! The config file (`--config`, TOML): how it spells lanes and pools, read into the domain's
//! [`domain::TetherConfig`]. The domain says what a lane or a pool means; the file's form is
//! the server's, so the domain carries no serde. Each type here keeps its domain twin's name,
//! which is what TOML errors quote (`expected struct LanePolicy`).

use std::collections::BTreeMap;

use serde::Deserialize;
use tether_domain as domain;

use crate::routes::endpoints::DEFAULT_FRESHNESS_S;

/// Reads a config file's text.
pub fn parse(text: &str) -> Result<domain::TetherConfig, toml::de::Error> {
    toml::from_str::<TetherConfig>(text).map(Into::into)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TetherConfig {
    #[serde(default)]
    lanes: BTreeMap<String, LanePolicy>,
    #[serde(default)]
    pools: BTreeMap<String, PoolConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LanePolicy {
    #[serde(default)]
    on_full: OnFull,
    max_concurrency: Option<u32>,
    heartbeat_timeout_s: Option<f64>,
    max_attempts: Option<u32>,
    timeout_s: Option<f64>,
    resources: Option<Resources>,
    output_limit_mb: Option<u64>,
    retention_s: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "snake_case")]
enum OnFull {
    #[default]
    Queue,
    Reject,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resources {
    #[serde(default = "default_cpus")]
    cpus: f64,
    #[serde(default = "default_memory_mb")]
    memory_mb: u64,
}

// A key left out takes the domain's default request.
fn default_cpus() -> f64 {
    domain::Resources::default().cpus
}

fn default_memory_mb() -> u64 {
    domain::Resources::default().memory_mb
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolConfig {
    fallback_url: Option<String>,
    #[serde(default = "default_freshness_s")]
    freshness_s: f64,
}

fn default_freshness_s() -> f64 {
    DEFAULT_FRESHNESS_S
}

impl From<TetherConfig> for domain::TetherConfig {
    fn from(file: TetherConfig) -> domain::TetherConfig {
        domain::TetherConfig {
            lanes: file
                .lanes
                .into_iter()
                .map(|(name, lane)| (name, lane.into()))
                .collect(),
            pools: file
                .pools
                .into_iter()
                .map(|(name, pool)| (name, pool.into()))
                .collect(),
        }
    }
}

impl From<LanePolicy> for domain::LanePolicy {
    fn from(lane: LanePolicy) -> domain::LanePolicy {
        domain::LanePolicy {
            on_full: match lane.on_full {
                OnFull::Queue => domain::OnFull::Queue,
                OnFull::Reject => domain::OnFull::Reject,
            },
            max_concurrency: lane.max_concurrency,
            heartbeat_timeout_s: lane.heartbeat_timeout_s,
            max_attempts: lane.max_attempts,
            timeout_s: lane.timeout_s,
            resources: lane.resources.map(|r| domain::Resources {
                cpus: r.cpus,
                memory_mb: r.memory_mb,
            }),
            output_limit_mb: lane.output_limit_mb,
            retention_s: lane.retention_s,
        }
    }
}

impl From<PoolConfig> for domain::PoolConfig {
    fn from(pool: PoolConfig) -> domain::PoolConfig {
        domain::PoolConfig {
            fallback_url: pool.fallback_url,
            freshness_s: pool.freshness_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_reads_into_the_domain() {
        let config = parse(
            r#"
            [lanes.gpu]
            on_full = "reject"
            max_concurrency = 2
            heartbeat_timeout_s = 30
            max_attempts = 3
            timeout_s = 600
            resources = { cpus = 4 }
            output_limit_mb = 8
            retention_s = 0

            [pools.llm]
            fallback_url = "https://public"
            "#,
        )
        .unwrap();
        let gpu = config.lane("gpu").unwrap();
        assert_eq!(
            gpu,
            domain::LanePolicy {
                on_full: domain::OnFull::Reject,
                max_concurrency: Some(2),
                heartbeat_timeout_s: Some(30.0),
                max_attempts: Some(3),
                timeout_s: Some(600.0),
                resources: Some(domain::Resources {
                    cpus: 4.0,
                    memory_mb: domain::Resources::default().memory_mb,
                }),
                output_limit_mb: Some(8),
                retention_s: Some(0.0),
            }
        );
        assert_eq!(
            config.pools["llm"],
            domain::PoolConfig {
                fallback_url: Some("https://public".into()),
                freshness_s: DEFAULT_FRESHNESS_S,
            }
        );
    }

    #[test]
    fn an_empty_file_is_the_default_config() {
        assert_eq!(parse("").unwrap(), domain::TetherConfig::default());
        let lane = parse("[lanes.a]\n").unwrap().lane("a").unwrap();
        assert_eq!(lane, domain::LanePolicy::default());
    }

    #[test]
    fn unknown_keys_and_values_are_refused_by_name() {
        let err = parse("[lanes.a]\nonfull = \"queue\"\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `onfull`"), "{err}");
        let err = parse("[lanes.a]\non_full = \"drop\"\n").unwrap_err();
        assert!(err.to_string().contains("unknown variant `drop`"), "{err}");
        let err = parse("[lanes.a]\nresources = { gpus = 1 }\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `gpus`"), "{err}");
        let err = parse("lanes = 1\n").unwrap_err();
        assert!(err.to_string().contains("expected a map"), "{err}");
        let err = parse("[lanes]\na = 1\n").unwrap_err();
        assert!(
            err.to_string().contains("expected struct LanePolicy"),
            "{err}"
        );
    }
}
