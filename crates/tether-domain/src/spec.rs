//! A submission, its validation, and the run spec it resolves to once the lane's and the
//! server's defaults are filled in.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::config::{LanePolicy, DEFAULT_LANE};

/// What a run reserves on a worker.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default = "default_cpus")]
    pub cpus: f64,
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
}

fn default_cpus() -> f64 {
    1.0
}

fn default_memory_mb() -> u64 {
    256
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpus: default_cpus(),
            memory_mb: default_memory_mb(),
        }
    }
}

impl Resources {
    /// Whether `self` fits inside `room`.
    pub fn fits_in(&self, room: &Resources) -> bool {
        // A small tolerance so 0.1 + 0.2 cpus fit in 0.3.
        self.cpus <= room.cpus + 1e-9 && self.memory_mb <= room.memory_mb
    }
}

/// The body of `POST /v1/runs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The argv to run; required and non-empty.
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub lane: Option<String>,
    pub resources: Option<Resources>,
    pub timeout_s: Option<f64>,
    /// Absent: the lane's default, else `--stale-after`. `null`: never reaped for a missing
    /// heartbeat (then `timeout_s` is required).
    #[serde(
        default,
        deserialize_with = "present_or_null",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<f64>)]
    pub heartbeat_timeout_s: Option<Option<f64>>,
    pub stall_timeout_s: Option<f64>,
    pub max_attempts: Option<u32>,
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub endpoints: BTreeMap<String, String>,
}

/// Tells a field that was sent as `null` (`Some(None)`) from one that was left out (`None`).
fn present_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

/// The server's defaults for what neither the submission nor its lane says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubmitDefaults {
    /// `--stale-after`.
    pub stale_after_ms: i64,
    pub max_attempts: u32,
    pub output_limit_bytes: i64,
}

impl Default for SubmitDefaults {
    fn default() -> Self {
        SubmitDefaults {
            stale_after_ms: 60_000,
            max_attempts: 3,
            output_limit_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A submission with every default resolved: what the store keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub lane: String,
    pub resources: Resources,
    pub timeout_ms: Option<i64>,
    pub heartbeat_timeout_ms: Option<i64>,
    pub stall_timeout_ms: Option<i64>,
    pub max_attempts: u32,
    pub idempotency_key: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub endpoints: BTreeMap<String, String>,
    pub output_limit_bytes: i64,
    /// The submission as sent, canonical JSON: a reused idempotency key must come with it.
    pub request_fingerprint: String,
}

/// A submission that cannot be accepted, with the field at fault and a stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// `invalid_field` or `unknown_lane`.
    pub code: &'static str,
    pub field: String,
    pub message: String,
}

impl ValidationError {
    fn field(field: &str, message: impl Into<String>) -> ValidationError {
        ValidationError {
            code: "invalid_field",
            field: field.to_string(),
            message: message.into(),
        }
    }
}

const MAX_ATTEMPTS_LIMIT: u32 = 100;
const MAX_KEY_LEN: usize = 255;

fn seconds_to_ms(field: &str, seconds: f64) -> Result<i64, ValidationError> {
    if !seconds.is_finite() || seconds <= 0.0 || seconds > 366.0 * 86_400.0 {
        return Err(ValidationError::field(
            field,
            "must be a positive number of seconds, at most a year",
        ));
    }
    Ok((seconds * 1000.0).round().max(1.0) as i64)
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('=') && !name.contains('\0')
}

impl SubmitRequest {
    /// Checks the submission and resolves its defaults against its lane. `lane` is looked up by
    /// the caller: `None` means the lane does not exist.
    pub fn resolve(
        &self,
        lane: Option<&LanePolicy>,
        defaults: &SubmitDefaults,
    ) -> Result<RunSpec, ValidationError> {
        let lane_name = self.lane.clone().unwrap_or_else(|| DEFAULT_LANE.into());
        let Some(policy) = lane else {
            return Err(ValidationError {
                code: "unknown_lane",
                field: "lane".into(),
                message: format!("no lane is named `{lane_name}`"),
            });
        };
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(ValidationError::field(
                "command",
                "must be a non-empty argv array whose first element names a program",
            ));
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return Err(ValidationError::field(
                "command",
                "must not contain NUL bytes",
            ));
        }
        for (k, v) in &self.env {
            if !valid_env_name(k) || v.contains('\0') {
                return Err(ValidationError::field(
                    "env",
                    format!("`{k}` is not a valid environment variable"),
                ));
            }
        }
        for k in self.endpoints.keys() {
            if !valid_env_name(k) {
                return Err(ValidationError::field(
                    "endpoints",
                    format!("`{k}` is not a valid environment variable name"),
                ));
            }
        }
        if let Some(cwd) = &self.cwd {
            if cwd.is_empty() || cwd.contains('\0') {
                return Err(ValidationError::field("cwd", "must be a non-empty path"));
            }
        }
        if self
            .idempotency_key
            .as_ref()
            .is_some_and(|k| k.is_empty() || k.len() > MAX_KEY_LEN)
        {
            return Err(ValidationError::field(
                "idempotency_key",
                format!("must be 1 to {MAX_KEY_LEN} bytes"),
            ));
        }
        let resources = self.resources.or(policy.resources).unwrap_or_default();
        if !resources.cpus.is_finite() || resources.cpus <= 0.0 || resources.cpus > 100_000.0 {
            return Err(ValidationError::field(
                "resources.cpus",
                "must be a positive number",
            ));
        }
        if resources.memory_mb == 0 {
            return Err(ValidationError::field(
                "resources.memory_mb",
                "must be a positive number",
            ));
        }
        let timeout_ms = match self.timeout_s.or(policy.timeout_s) {
            Some(s) => Some(seconds_to_ms("timeout_s", s)?),
            None => None,
        };
        let heartbeat_timeout_ms = match self.heartbeat_timeout_s {
            Some(Some(s)) => Some(seconds_to_ms("heartbeat_timeout_s", s)?),
            Some(None) => {
                if timeout_ms.is_none() {
                    return Err(ValidationError::field(
                        "heartbeat_timeout_s",
                        "null (never reaped for a missing heartbeat) requires timeout_s",
                    ));
                }
                None
            }
            None => match policy.heartbeat_timeout_s {
                Some(s) => Some(seconds_to_ms("heartbeat_timeout_s", s)?),
                None => Some(defaults.stale_after_ms),
            },
        };
        let stall_timeout_ms = match self.stall_timeout_s {
            Some(s) => Some(seconds_to_ms("stall_timeout_s", s)?),
            None => None,
        };
        let max_attempts = self
            .max_attempts
            .or(policy.max_attempts)
            .unwrap_or(defaults.max_attempts);
        if max_attempts == 0 || max_attempts > MAX_ATTEMPTS_LIMIT {
            return Err(ValidationError::field(
                "max_attempts",
                format!("must be 1 to {MAX_ATTEMPTS_LIMIT}"),
            ));
        }
        let output_limit_bytes = policy
            .output_limit_mb
            .map(|mb| (mb as i64).saturating_mul(1024 * 1024))
            .unwrap_or(defaults.output_limit_bytes);
        Ok(RunSpec {
            command: self.command.clone(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            lane: lane_name,
            resources,
            timeout_ms,
            heartbeat_timeout_ms,
            stall_timeout_ms,
            max_attempts,
            idempotency_key: self.idempotency_key.clone(),
            labels: self.labels.clone(),
            endpoints: self.endpoints.clone(),
            output_limit_bytes,
            request_fingerprint: serde_json::to_string(self).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(json: &str) -> SubmitRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn null_and_absent_heartbeat_timeouts_differ() {
        let d = SubmitDefaults::default();
        let lane = LanePolicy::default();
        let absent = submit(r#"{"command":["true"]}"#)
            .resolve(Some(&lane), &d)
            .unwrap();
        assert_eq!(absent.heartbeat_timeout_ms, Some(60_000));
        let err = submit(r#"{"command":["true"],"heartbeat_timeout_s":null}"#)
            .resolve(Some(&lane), &d)
            .unwrap_err();
        assert_eq!(err.field, "heartbeat_timeout_s");
        let never = submit(r#"{"command":["true"],"heartbeat_timeout_s":null,"timeout_s":5}"#)
            .resolve(Some(&lane), &d)
            .unwrap();
        assert_eq!(never.heartbeat_timeout_ms, None);
        assert_eq!(never.timeout_ms, Some(5_000));
    }

    #[test]
    fn an_absent_heartbeat_timeout_stays_absent_when_sent_on() {
        let absent = SubmitRequest {
            command: vec!["x".into()],
            ..SubmitRequest::default()
        };
        let json = serde_json::to_string(&absent).unwrap();
        assert!(!json.contains("heartbeat_timeout_s"), "{json}");
        let null = SubmitRequest {
            heartbeat_timeout_s: Some(None),
            ..absent
        };
        let back: SubmitRequest =
            serde_json::from_str(&serde_json::to_string(&null).unwrap()).unwrap();
        assert_eq!(back.heartbeat_timeout_s, Some(None));
    }

    #[test]
    fn empty_commands_and_unknown_lanes_are_refused() {
        let d = SubmitDefaults::default();
        let err = submit(r#"{"command":[]}"#)
            .resolve(Some(&LanePolicy::default()), &d)
            .unwrap_err();
        assert_eq!((err.code, err.field.as_str()), ("invalid_field", "command"));
        let err = submit(r#"{"command":["x"],"lane":"nope"}"#)
            .resolve(None, &d)
            .unwrap_err();
        assert_eq!(err.code, "unknown_lane");
    }

    #[test]
    fn lane_defaults_apply() {
        let lane = LanePolicy {
            max_attempts: Some(2),
            heartbeat_timeout_s: Some(30.0),
            resources: Some(Resources {
                cpus: 2.0,
                memory_mb: 2048,
            }),
            output_limit_mb: Some(1),
            ..LanePolicy::default()
        };
        let spec = submit(r#"{"command":["x"]}"#)
            .resolve(Some(&lane), &SubmitDefaults::default())
            .unwrap();
        assert_eq!(spec.max_attempts, 2);
        assert_eq!(spec.heartbeat_timeout_ms, Some(30_000));
        assert_eq!(spec.resources.cpus, 2.0);
        assert_eq!(spec.output_limit_bytes, 1024 * 1024);
    }
}
