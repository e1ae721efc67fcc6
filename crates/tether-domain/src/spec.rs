//! A submission, its validation, and the run spec it resolves to once the lane's and the
//! server's defaults are filled in.

use std::collections::BTreeMap;

use crate::config::{LanePolicy, DEFAULT_LANE};

/// What a run reserves on a worker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resources {
    pub cpus: f64,
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
    /// Nothing at all: the sum of no runs.
    pub const NONE: Resources = Resources {
        cpus: 0.0,
        memory_mb: 0,
    };

    /// Whether `self` fits inside `room`.
    pub fn fits_in(&self, room: &Resources) -> bool {
        // A small tolerance so 0.1 + 0.2 cpus fit in 0.3.
        self.cpus <= room.cpus + 1e-9 && self.memory_mb <= room.memory_mb
    }
}

/// A submission as the domain judges it: what a client asked for, before the lane's and the
/// server's defaults. Its wire form (`POST /v1/runs`, JSON) is `tether_api::SubmitRequest`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Submission {
    /// The argv to run; required and non-empty.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub lane: Option<String>,
    pub resources: Option<Resources>,
    pub timeout_s: Option<f64>,
    /// `None`: the lane's default, else `--stale-after`. `Some(None)`: never reaped for a
    /// missing heartbeat (then `timeout_s` is required).
    pub heartbeat_timeout_s: Option<Option<f64>>,
    pub stall_timeout_s: Option<f64>,
    pub max_attempts: Option<u32>,
    pub idempotency_key: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub endpoints: BTreeMap<String, String>,
    /// Keys of `env` whose values are secrets: API views show them as `***` and nothing logs
    /// them; the command still receives them.
    pub secret_env: Vec<String>,
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

/// A submission with every default resolved: what the store keeps (in a stored form of the
/// store's own, so renaming a field here breaks no stored row).
#[derive(Debug, Clone, PartialEq)]
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
    /// Keys of `env` that views redact.
    pub secret_env: Vec<String>,
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

/// The sizes every submitted or registered input is held to, so no one request can make a
/// stored row (and every list answer that shows it) large. Bytes are UTF-8 bytes.
pub mod limits {
    /// Idempotency keys, label keys, lane, worker and endpoint names.
    pub const MAX_KEY_BYTES: usize = 255;
    pub const MAX_COMMAND_ARGS: usize = 4096;
    /// All of `command` together.
    pub const MAX_COMMAND_BYTES: usize = 128 * 1024;
    pub const MAX_ENV_VARS: usize = 1024;
    /// All of `env` (keys and values) together.
    pub const MAX_ENV_BYTES: usize = 128 * 1024;
    pub const MAX_LABELS: usize = 64;
    /// All of `labels` (keys and values) together.
    pub const MAX_LABEL_BYTES: usize = 16 * 1024;
    pub const MAX_ENDPOINTS: usize = 64;
    pub const MAX_PATH_BYTES: usize = 4096;
    /// `cpus` a run may ask for or a worker may offer.
    pub const MAX_CPUS: f64 = 100_000.0;
    /// `memory_mb` is stored as a signed 64-bit integer.
    pub const MAX_MEMORY_MB: u64 = i64::MAX as u64;
}

use limits::*;

/// Text every store can hold: PostgreSQL refuses NUL in `text`, so no store takes it.
pub fn storable_text(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.contains('\0') {
        return Err(ValidationError::field(field, "must not contain NUL bytes"));
    }
    Ok(())
}

/// A string→string map within a count and a total size, every key 1 to `MAX_KEY_BYTES`, and
/// nothing in it a store cannot hold.
pub fn bounded_map(
    field: &str,
    map: &BTreeMap<String, String>,
    max_entries: usize,
    max_bytes: usize,
) -> Result<(), ValidationError> {
    if map.len() > max_entries {
        return Err(ValidationError::field(
            field,
            format!("at most {max_entries} entries"),
        ));
    }
    let mut total = 0usize;
    for (k, v) in map {
        if k.is_empty() || k.len() > MAX_KEY_BYTES {
            return Err(ValidationError::field(
                field,
                format!("keys must be 1 to {MAX_KEY_BYTES} bytes"),
            ));
        }
        storable_text(field, k)?;
        storable_text(field, v)?;
        total += k.len() + v.len();
    }
    if total > max_bytes {
        return Err(ValidationError::field(
            field,
            format!("at most {max_bytes} bytes in all"),
        ));
    }
    Ok(())
}

/// Resources a store can keep exactly and a lane can add up: `cpus` finite, positive and at
/// most `MAX_CPUS`; `memory_mb` positive and within a signed 64-bit integer.
pub fn check_resources(field: &str, r: &Resources) -> Result<(), ValidationError> {
    if !r.cpus.is_finite() || r.cpus <= 0.0 || r.cpus > MAX_CPUS {
        return Err(ValidationError::field(
            &format!("{field}.cpus"),
            format!("must be a positive number, at most {MAX_CPUS}"),
        ));
    }
    if r.memory_mb == 0 || r.memory_mb > MAX_MEMORY_MB {
        return Err(ValidationError::field(
            &format!("{field}.memory_mb"),
            format!("must be 1 to {MAX_MEMORY_MB}"),
        ));
    }
    Ok(())
}

/// A worker's claim `reserve` (see [`crate::admission::claim_reach`]): like a capacity, but
/// nothing at all is allowed.
pub fn check_reserve(field: &str, r: &Resources) -> Result<(), ValidationError> {
    if !r.cpus.is_finite() || r.cpus < 0.0 || r.cpus > MAX_CPUS {
        return Err(ValidationError::field(
            &format!("{field}.cpus"),
            format!("must be a number from 0 to {MAX_CPUS}"),
        ));
    }
    if r.memory_mb > MAX_MEMORY_MB {
        return Err(ValidationError::field(
            &format!("{field}.memory_mb"),
            format!("must be 0 to {MAX_MEMORY_MB}"),
        ));
    }
    Ok(())
}

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

impl Submission {
    /// Checks the submission and resolves its defaults against its lane. `lane` is looked up by
    /// the caller: `None` means the lane does not exist. `request_fingerprint` identifies the
    /// submission as sent (a reused idempotency key must come with the same one).
    pub fn resolve(
        &self,
        lane: Option<&LanePolicy>,
        defaults: &SubmitDefaults,
        request_fingerprint: String,
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
        if self.command.len() > MAX_COMMAND_ARGS
            || self.command.iter().map(String::len).sum::<usize>() > MAX_COMMAND_BYTES
        {
            return Err(ValidationError::field(
                "command",
                format!("at most {MAX_COMMAND_ARGS} arguments and {MAX_COMMAND_BYTES} bytes"),
            ));
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return Err(ValidationError::field(
                "command",
                "must not contain NUL bytes",
            ));
        }
        bounded_map("env", &self.env, MAX_ENV_VARS, MAX_ENV_BYTES)?;
        bounded_map("labels", &self.labels, MAX_LABELS, MAX_LABEL_BYTES)?;
        bounded_map(
            "endpoints",
            &self.endpoints,
            MAX_ENDPOINTS,
            MAX_ENDPOINTS * 2 * MAX_KEY_BYTES,
        )?;
        if self.secret_env.len() > MAX_ENV_VARS {
            return Err(ValidationError::field(
                "secret_env",
                format!("at most {MAX_ENV_VARS} entries"),
            ));
        }
        if let Some(k) = self.secret_env.iter().find(|k| !self.env.contains_key(*k)) {
            return Err(ValidationError::field(
                "secret_env",
                format!("`{k}` is not a key of env"),
            ));
        }
        if let Some(lane) = &self.lane {
            storable_text("lane", lane)?;
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
            if cwd.is_empty() || cwd.contains('\0') || cwd.len() > MAX_PATH_BYTES {
                return Err(ValidationError::field(
                    "cwd",
                    format!("must be a path of 1 to {MAX_PATH_BYTES} bytes"),
                ));
            }
        }
        if self
            .idempotency_key
            .as_ref()
            .is_some_and(|k| k.is_empty() || k.len() > MAX_KEY_BYTES || k.contains('\0'))
        {
            return Err(ValidationError::field(
                "idempotency_key",
                format!("must be 1 to {MAX_KEY_BYTES} bytes, without NUL"),
            ));
        }
        let resources = self.resources.or(policy.resources).unwrap_or_default();
        check_resources("resources", &resources)?;
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
            secret_env: self.secret_env.clone(),
            output_limit_bytes,
            request_fingerprint,
        })
    }
}
