//! The OpenAPI schemas of the domain's types that travel on the wire. The domain crate knows
//! nothing of OpenAPI: the wire types name these with `#[schema(value_type = …)]`, and the tests
//! below hold each to the JSON its domain type really reads and writes, so the document cannot
//! drift from the wire.
//!
//! These types are never built; they exist only to be described.

#![allow(dead_code)]

use serde::Deserialize;

/// Where a run is in its life. `Pending → Claimed → Running → one terminal status`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Pending,
    Claimed,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

/// Why an attempt ended the way it did (SPEC §2 `error_code`).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The worker heartbeated for this attempt, then went silent.
    WorkerHeartbeatLost,
    /// Claimed, but the worker never confirmed with a start or a heartbeat.
    WorkerClaimTimeout,
    /// Ran past `timeout_s`.
    Timeout,
    /// Alive, but printed nothing for `stall_timeout_s`.
    Stalled,
    ExitNonzero,
    SpawnFailed,
    Cancelled,
    OutputLimit,
}

/// How alive an in-flight run looks (SPEC §2).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LivenessState {
    /// Pending: no worker holds it yet.
    Waiting,
    /// Heartbeats fresh and output recent.
    Alive,
    /// Heartbeats fresh but nothing printed for a while: alive, just silent.
    Quiet,
    /// At least one heartbeat interval missed, not yet past the stale window.
    Suspect,
    /// Past the stale window: the reaper ends (or has ended) this attempt.
    Lost,
    /// Terminal.
    Done,
}

/// The `liveness` object on every run.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct Liveness {
    pub state: LivenessState,
    /// Seconds since the last heartbeat (or the claim, before any heartbeat).
    pub heartbeat_age_s: Option<f64>,
    /// Seconds since the last output line.
    pub since_last_output_s: Option<f64>,
    /// Seconds since the run last showed progress: its last output, else its start or claim.
    pub idle_for_s: Option<f64>,
}

/// A worker's state as `GET /v1/workers` shows it.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Active,
    Suspect,
    Lost,
    Draining,
}

/// What a lane does with a submission that does not fit now.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Wait `pending`, first in first out within the lane.
    Queue,
    /// Refuse at the door with `503` and `Retry-After`.
    Reject,
}

/// What a run reserves on a worker.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub cpus: f64,
    #[serde(default)]
    pub memory_mb: u64,
}

/// How an endpoint's readiness is known.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EndpointKind {
    /// Ready only while the reconciler's last 2xx from its `readiness_url` is fresh.
    Probed,
    /// Always handed out; never probed.
    AlwaysReady,
}

/// Where a dispatched URL came from.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DispatchSource {
    /// A ready endpoint of the pool.
    Endpoint,
    /// The pool's public fallback: no endpoint was ready.
    Fallback,
}

#[cfg(test)]
mod tests {
    use serde::Serialize;
    use serde_json::{json, Value};
    use tether_domain as domain;
    use utoipa::PartialSchema;

    fn schema_of<T: PartialSchema>() -> Value {
        serde_json::to_value(T::schema()).unwrap()
    }

    fn as_json(values: &[impl Serialize]) -> Value {
        serde_json::to_value(values).unwrap()
    }

    /// The names an enum's schema lists are exactly those the domain type is written as.
    fn assert_enum<T: PartialSchema>(domain_values: &[impl Serialize]) {
        assert_eq!(schema_of::<T>()["enum"], as_json(domain_values));
    }

    /// The properties an object's schema lists are exactly those the domain type is written
    /// with.
    fn assert_fields<T: PartialSchema>(domain_value: impl Serialize) {
        let schema = schema_of::<T>();
        let mut described: Vec<&String> =
            schema["properties"].as_object().unwrap().keys().collect();
        let value = serde_json::to_value(domain_value).unwrap();
        let mut written: Vec<&String> = value.as_object().unwrap().keys().collect();
        described.sort();
        written.sort();
        assert_eq!(described, written);
    }

    // Each list is checked whole by a `match` without a wildcard: a new domain variant stops
    // this test from compiling until its schema is updated too.

    #[test]
    fn run_statuses() {
        for s in domain::RunStatus::ALL {
            match s {
                domain::RunStatus::Pending
                | domain::RunStatus::Claimed
                | domain::RunStatus::Running
                | domain::RunStatus::Succeeded
                | domain::RunStatus::Failed
                | domain::RunStatus::Cancelled
                | domain::RunStatus::TimedOut => {}
            }
        }
        assert_enum::<super::RunStatus>(&domain::RunStatus::ALL);
    }

    #[test]
    fn error_codes() {
        use domain::ErrorCode::*;
        let all = [
            WorkerHeartbeatLost,
            WorkerClaimTimeout,
            Timeout,
            Stalled,
            ExitNonzero,
            SpawnFailed,
            Cancelled,
            OutputLimit,
        ];
        for c in all {
            match c {
                WorkerHeartbeatLost | WorkerClaimTimeout | Timeout | Stalled | ExitNonzero
                | SpawnFailed | Cancelled | OutputLimit => {}
            }
        }
        assert_enum::<super::ErrorCode>(&all);
    }

    #[test]
    fn liveness() {
        use domain::LivenessState::*;
        let all = [Waiting, Alive, Quiet, Suspect, Lost, Done];
        for s in all {
            match s {
                Waiting | Alive | Quiet | Suspect | Lost | Done => {}
            }
        }
        assert_enum::<super::LivenessState>(&all);
        assert_fields::<super::Liveness>(domain::Liveness {
            state: Alive,
            heartbeat_age_s: None,
            since_last_output_s: None,
            idle_for_s: None,
        });
    }

    #[test]
    fn worker_states() {
        use domain::WorkerState::*;
        let all = [Active, Suspect, Lost, Draining];
        for s in all {
            match s {
                Active | Suspect | Lost | Draining => {}
            }
        }
        assert_enum::<super::WorkerState>(&all);
    }

    #[test]
    fn lanes_endpoints_and_dispatch() {
        use domain::{DispatchSource, EndpointKind, OnFull};
        for v in [OnFull::Queue, OnFull::Reject] {
            match v {
                OnFull::Queue | OnFull::Reject => {}
            }
        }
        assert_enum::<super::OnFull>(&[OnFull::Queue, OnFull::Reject]);
        for v in [EndpointKind::Probed, EndpointKind::AlwaysReady] {
            match v {
                EndpointKind::Probed | EndpointKind::AlwaysReady => {}
            }
        }
        assert_enum::<super::EndpointKind>(&[EndpointKind::Probed, EndpointKind::AlwaysReady]);
        for v in [DispatchSource::Endpoint, DispatchSource::Fallback] {
            match v {
                DispatchSource::Endpoint | DispatchSource::Fallback => {}
            }
        }
        assert_enum::<super::DispatchSource>(&[DispatchSource::Endpoint, DispatchSource::Fallback]);
    }

    #[test]
    fn resources() {
        assert_fields::<super::Resources>(domain::Resources::default());
        // Both fields have defaults, and nothing else is accepted, as the schema says.
        let schema = schema_of::<super::Resources>();
        assert!(schema.get("required").is_none(), "{schema}");
        assert_eq!(schema["additionalProperties"], json!(false));
        let empty: domain::Resources = serde_json::from_value(json!({})).unwrap();
        assert_eq!(empty, domain::Resources::default());
        assert!(serde_json::from_value::<domain::Resources>(json!({"gpus": 1})).is_err());
    }
}
