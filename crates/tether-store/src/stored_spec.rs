//! The form a run's spec is stored in, apart from the domain's [`RunSpec`]: the stored JSON
//! keeps its own field names and a version, so renaming a domain field cannot make stored rows
//! unreadable. A new stored form is a new version here, with the old one still decoded.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tether_domain::{Resources, RunSpec};

use crate::{StoreError, StoreResult};

/// The version [`encode_spec`] writes.
pub const SPEC_VERSION: u32 = 1;

/// Version 1. Its field names are those of the rows written before the stored form had a
/// version, so those rows (no `version` key) decode as version 1 unchanged.
#[derive(Debug, Serialize, Deserialize)]
struct StoredSpecV1 {
    #[serde(default = "unversioned")]
    version: u32,
    command: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    lane: String,
    resources: StoredResources,
    timeout_ms: Option<i64>,
    heartbeat_timeout_ms: Option<i64>,
    stall_timeout_ms: Option<i64>,
    max_attempts: u32,
    idempotency_key: Option<String>,
    labels: BTreeMap<String, String>,
    endpoints: BTreeMap<String, String>,
    /// Absent in rows older than secret env.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    secret_env: Vec<String>,
    output_limit_bytes: i64,
    request_fingerprint: String,
}

fn unversioned() -> u32 {
    1
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredResources {
    cpus: f64,
    memory_mb: u64,
}

/// A run's spec as the JSON text a store keeps.
pub fn encode_spec(spec: &RunSpec) -> StoreResult<String> {
    let stored = StoredSpecV1 {
        version: SPEC_VERSION,
        command: spec.command.clone(),
        env: spec.env.clone(),
        cwd: spec.cwd.clone(),
        lane: spec.lane.clone(),
        resources: StoredResources {
            cpus: spec.resources.cpus,
            memory_mb: spec.resources.memory_mb,
        },
        timeout_ms: spec.timeout_ms,
        heartbeat_timeout_ms: spec.heartbeat_timeout_ms,
        stall_timeout_ms: spec.stall_timeout_ms,
        max_attempts: spec.max_attempts,
        idempotency_key: spec.idempotency_key.clone(),
        labels: spec.labels.clone(),
        endpoints: spec.endpoints.clone(),
        secret_env: spec.secret_env.clone(),
        output_limit_bytes: spec.output_limit_bytes,
        request_fingerprint: spec.request_fingerprint.clone(),
    };
    serde_json::to_string(&stored).map_err(StoreError::corrupt)
}

/// A stored spec read back, whichever version wrote it; `Corrupt` if it is no version this code
/// knows.
pub fn decode_spec(text: &str) -> StoreResult<RunSpec> {
    let stored: StoredSpecV1 = serde_json::from_str(text).map_err(StoreError::corrupt)?;
    if stored.version != SPEC_VERSION {
        return Err(StoreError::corrupt(format!(
            "run spec version {} is newer than this server knows ({SPEC_VERSION})",
            stored.version
        )));
    }
    Ok(RunSpec {
        command: stored.command,
        env: stored.env,
        cwd: stored.cwd,
        lane: stored.lane,
        resources: Resources {
            cpus: stored.resources.cpus,
            memory_mb: stored.resources.memory_mb,
        },
        timeout_ms: stored.timeout_ms,
        heartbeat_timeout_ms: stored.heartbeat_timeout_ms,
        stall_timeout_ms: stored.stall_timeout_ms,
        max_attempts: stored.max_attempts,
        idempotency_key: stored.idempotency_key,
        labels: stored.labels,
        endpoints: stored.endpoints,
        secret_env: stored.secret_env,
        output_limit_bytes: stored.output_limit_bytes,
        request_fingerprint: stored.request_fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row exactly as stores wrote it before the stored form had a version.
    const UNVERSIONED: &str = r#"{"command":["sh","-c","echo hi"],"env":{"A":"1","TOKEN":"s"},"cwd":"/tmp","lane":"default","resources":{"cpus":0.5,"memory_mb":128},"timeout_ms":5000,"heartbeat_timeout_ms":60000,"stall_timeout_ms":null,"max_attempts":3,"idempotency_key":"k-1","labels":{"team":"a"},"endpoints":{"LLM_URL":"llm"},"secret_env":["TOKEN"],"output_limit_bytes":67108864,"request_fingerprint":"{\"command\":[\"sh\"]}"}"#;

    fn expected() -> RunSpec {
        RunSpec {
            command: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: [("A", "1"), ("TOKEN", "s")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            cwd: Some("/tmp".into()),
            lane: "default".into(),
            resources: Resources {
                cpus: 0.5,
                memory_mb: 128,
            },
            timeout_ms: Some(5000),
            heartbeat_timeout_ms: Some(60_000),
            stall_timeout_ms: None,
            max_attempts: 3,
            idempotency_key: Some("k-1".into()),
            labels: [("team".to_string(), "a".to_string())].into(),
            endpoints: [("LLM_URL".to_string(), "llm".to_string())].into(),
            secret_env: vec!["TOKEN".into()],
            output_limit_bytes: 64 * 1024 * 1024,
            request_fingerprint: r#"{"command":["sh"]}"#.into(),
        }
    }

    #[test]
    fn rows_written_before_the_version_still_decode() {
        assert_eq!(decode_spec(UNVERSIONED).unwrap(), expected());
        // Older still: no `secret_env` key at all.
        let older = UNVERSIONED.replace(r#""secret_env":["TOKEN"],"#, "");
        let spec = decode_spec(&older).unwrap();
        assert!(spec.secret_env.is_empty());
    }

    #[test]
    fn what_is_written_names_its_version_and_reads_back() {
        let text = encode_spec(&expected()).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["version"], 1);
        assert_eq!(decode_spec(&text).unwrap(), expected());
    }

    #[test]
    fn an_unknown_version_is_corrupt_not_misread() {
        let newer = UNVERSIONED.replacen('{', r#"{"version":2,"#, 1);
        assert!(matches!(decode_spec(&newer), Err(StoreError::Corrupt(_))));
        assert!(matches!(decode_spec("[]"), Err(StoreError::Corrupt(_))));
    }
}
