//! The body of `POST /v1/runs`: the wire form of a [`Submission`].

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use tether_domain::{LanePolicy, Resources, RunSpec, Submission, SubmitDefaults, ValidationError};

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
    #[schema(value_type = Option<crate::schema::Resources>)]
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
    /// Keys of `env` whose values are secrets: API views show them as `***` and nothing logs
    /// them; the command still receives them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_env: Vec<String>,
}

/// Tells a field that was sent as `null` (`Some(None)`) from one that was left out (`None`).
fn present_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

impl SubmitRequest {
    /// The submission this body asks for.
    pub fn submission(&self) -> Submission {
        Submission {
            command: self.command.clone(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            lane: self.lane.clone(),
            resources: self.resources,
            timeout_s: self.timeout_s,
            heartbeat_timeout_s: self.heartbeat_timeout_s,
            stall_timeout_s: self.stall_timeout_s,
            max_attempts: self.max_attempts,
            idempotency_key: self.idempotency_key.clone(),
            labels: self.labels.clone(),
            endpoints: self.endpoints.clone(),
            secret_env: self.secret_env.clone(),
        }
    }

    /// The body as canonical JSON: what a reused idempotency key must come with. Stored with
    /// every run, so it must stay byte-for-byte what earlier versions wrote.
    pub fn fingerprint(&self) -> String {
        // Serializing plain strings, numbers and maps cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks the submission and resolves its defaults against its lane
    /// ([`Submission::resolve`]), fingerprinted by this body.
    pub fn resolve(
        &self,
        lane: Option<&LanePolicy>,
        defaults: &SubmitDefaults,
    ) -> Result<RunSpec, ValidationError> {
        self.submission()
            .resolve(lane, defaults, self.fingerprint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_domain::spec::limits;

    fn submit(json: &str) -> SubmitRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_fingerprint_is_what_earlier_versions_stored() {
        let request = submit(
            r#"{"command":["sh","-c","x"],"env":{"A":"1"},"resources":{"cpus":0.5,"memory_mb":64},
                "labels":{"k":"v"},"idempotency_key":"key"}"#,
        );
        assert_eq!(
            request.fingerprint(),
            r#"{"command":["sh","-c","x"],"env":{"A":"1"},"cwd":null,"lane":null,"resources":{"cpus":0.5,"memory_mb":64},"timeout_s":null,"stall_timeout_s":null,"max_attempts":null,"idempotency_key":"key","labels":{"k":"v"},"endpoints":{}}"#
        );
        let spec = request
            .resolve(Some(&LanePolicy::default()), &SubmitDefaults::default())
            .unwrap();
        assert_eq!(spec.request_fingerprint, request.fingerprint());
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
    fn numbers_beyond_the_stored_types_are_refused() {
        let d = SubmitDefaults::default();
        let lane = LanePolicy::default();
        let err =
            submit(r#"{"command":["x"],"resources":{"cpus":1,"memory_mb":9223372036854775808}}"#)
                .resolve(Some(&lane), &d)
                .unwrap_err();
        assert_eq!(err.field, "resources.memory_mb");
        let ok =
            submit(r#"{"command":["x"],"resources":{"cpus":1,"memory_mb":9223372036854775807}}"#)
                .resolve(Some(&lane), &d)
                .unwrap();
        assert_eq!(ok.resources.memory_mb, i64::MAX as u64);
        let err = submit(r#"{"command":["x"],"resources":{"cpus":1e308,"memory_mb":1}}"#)
            .resolve(Some(&lane), &d)
            .unwrap_err();
        assert_eq!(err.field, "resources.cpus");
    }

    #[test]
    fn sizes_and_nul_are_bounded() {
        let d = SubmitDefaults::default();
        let lane = LanePolicy::default();
        let big = "x".repeat(limits::MAX_LABEL_BYTES);
        let err = submit(&format!(r#"{{"command":["x"],"labels":{{"a":"{big}"}}}}"#))
            .resolve(Some(&lane), &d)
            .unwrap_err();
        assert_eq!((err.code, err.field.as_str()), ("invalid_field", "labels"));
        let err = submit(r#"{"command":["x"],"labels":{"a":"b\u0000"}}"#)
            .resolve(Some(&lane), &d)
            .unwrap_err();
        assert_eq!(err.field, "labels");
        let err = submit(r#"{"command":["x"],"idempotency_key":"k\u0000"}"#)
            .resolve(Some(&lane), &d)
            .unwrap_err();
        assert_eq!(err.field, "idempotency_key");
        let args = vec!["\"a\""; limits::MAX_COMMAND_ARGS + 1].join(",");
        let err = submit(&format!(r#"{{"command":[{args}]}}"#))
            .resolve(Some(&lane), &d)
            .unwrap_err();
        assert_eq!(err.field, "command");
        let err = submit(r#"{"command":["x"],"env":{"A":"1"},"secret_env":["B"]}"#)
            .resolve(Some(&lane), &d)
            .unwrap_err();
        assert_eq!(err.field, "secret_env");
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
