//! The wire shape of the domain's types. The domain knows nothing of serde or OpenAPI: each
//! type here is serde's remote definition of a domain type (`#[serde(remote = …)]`) and its
//! OpenAPI schema at once, so the JSON and the document come from one definition. A wire type
//! names one for a field of the domain type:
//!
//! ```ignore
//! #[serde(with = "shape::RunStatus")]
//! #[schema(value_type = shape::RunStatus)]
//! pub status: RunStatus,
//! #[serde(default, with = "shape::Optional::<shape::ErrorCode>")]
//! #[schema(value_type = Option<shape::ErrorCode>)]
//! pub error_code: Option<ErrorCode>,
//! ```
//!
//! A remote definition names every variant and field of its domain type, so one the domain
//! adds or renames stops this crate compiling until its shape here says how it is written.
//! These types are never built; serde and utoipa read them.

#![allow(dead_code)]

use std::marker::PhantomData;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tether_domain as domain;

/// Where a run is in its life. `Pending → Claimed → Running → one terminal status`.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(remote = "domain::RunStatus", rename_all = "snake_case")]
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
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(remote = "domain::ErrorCode", rename_all = "snake_case")]
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
    /// The worker handed the run back before starting it; the attempt did not count.
    Released,
}

/// How alive an in-flight run looks (SPEC §2).
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(remote = "domain::LivenessState", rename_all = "snake_case")]
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
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(remote = "domain::Liveness")]
pub struct Liveness {
    #[serde(with = "LivenessState")]
    #[schema(value_type = LivenessState)]
    pub state: domain::LivenessState,
    /// Seconds since the last heartbeat (or the claim, before any heartbeat).
    pub heartbeat_age_s: Option<f64>,
    /// Seconds since the last output line.
    pub since_last_output_s: Option<f64>,
    /// Seconds since the run last showed progress: its last output, else its start or claim.
    pub idle_for_s: Option<f64>,
}

/// A worker's state as `GET /v1/workers` shows it.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(remote = "domain::WorkerState", rename_all = "snake_case")]
pub enum WorkerState {
    Active,
    Suspect,
    Lost,
    Draining,
}

/// What a lane does with a submission that does not fit now.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(remote = "domain::OnFull", rename_all = "snake_case")]
pub enum OnFull {
    /// Wait `pending`, first in first out within the lane.
    Queue,
    /// Refuse at the door with `503` and `Retry-After`.
    Reject,
}

/// What a run reserves on a worker.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(remote = "domain::Resources", deny_unknown_fields)]
pub struct Resources {
    #[serde(default = "default_cpus")]
    pub cpus: f64,
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
}

// A field left out takes the domain's default request.
fn default_cpus() -> f64 {
    domain::Resources::default().cpus
}

fn default_memory_mb() -> u64 {
    domain::Resources::default().memory_mb
}

/// How an endpoint's readiness is known.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(remote = "domain::EndpointKind", rename_all = "snake_case")]
pub enum EndpointKind {
    /// Ready only while the reconciler's last 2xx from its `readiness_url` is fresh.
    Probed,
    /// Always handed out; never probed.
    AlwaysReady,
}

/// Where a dispatched URL came from.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(remote = "domain::DispatchSource", rename_all = "snake_case")]
pub enum DispatchSource {
    /// A ready endpoint of the pool.
    Endpoint,
    /// The pool's public fallback: no endpoint was ready.
    Fallback,
}

/// A shape of a domain type: the two functions serde's remote derive writes for it, so
/// [`Optional`] can reach them.
pub trait Shape {
    type Domain;
    fn write<S: Serializer>(value: &Self::Domain, serializer: S) -> Result<S::Ok, S::Error>;
    fn read<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self::Domain, D::Error>;
}

macro_rules! shapes {
    ($($shape:ident),* $(,)?) => {$(
        impl Shape for $shape {
            type Domain = domain::$shape;

            fn write<S: Serializer>(value: &domain::$shape, serializer: S) -> Result<S::Ok, S::Error> {
                $shape::serialize(value, serializer)
            }

            fn read<'de, D: Deserializer<'de>>(deserializer: D) -> Result<domain::$shape, D::Error> {
                $shape::deserialize(deserializer)
            }
        }
    )*};
}

shapes!(
    RunStatus,
    ErrorCode,
    LivenessState,
    Liveness,
    WorkerState,
    OnFull,
    Resources,
    EndpointKind,
    DispatchSource,
);

/// An `Option` of a domain type, written as its shape `S` or `null`, exactly as a plain
/// `Option` field would be. Name it with `default` (`#[serde(default, with = …)]`): serde
/// reads an absent field as `None` only for fields it deserializes itself.
pub struct Optional<S>(PhantomData<S>);

impl<S: Shape> Optional<S> {
    pub fn serialize<Z: Serializer>(
        value: &Option<S::Domain>,
        serializer: Z,
    ) -> Result<Z::Ok, Z::Error> {
        value.as_ref().map(Out::<S>::new).serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<S::Domain>, D::Error> {
        Ok(Option::<In<S>>::deserialize(deserializer)?.map(|value| value.0))
    }
}

/// A domain value on its way out through its shape.
struct Out<'a, S: Shape>(&'a S::Domain, PhantomData<S>);

impl<'a, S: Shape> Out<'a, S> {
    fn new(value: &'a S::Domain) -> Self {
        Out(value, PhantomData)
    }
}

impl<S: Shape> Serialize for Out<'_, S> {
    fn serialize<Z: Serializer>(&self, serializer: Z) -> Result<Z::Ok, Z::Error> {
        S::write(self.0, serializer)
    }
}

/// A domain value read through its shape.
struct In<S: Shape>(S::Domain);

impl<'de, S: Shape> Deserialize<'de> for In<S> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        S::read(deserializer).map(In)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};
    use tether_domain as domain;
    use utoipa::PartialSchema;

    use super::*;

    fn schema_of<T: PartialSchema>() -> Value {
        serde_json::to_value(T::schema()).unwrap()
    }

    fn write<S: Shape>(value: &S::Domain) -> Value {
        serde_json::to_value(Out::<S>::new(value)).unwrap()
    }

    fn read<S: Shape>(value: Value) -> Result<S::Domain, serde_json::Error> {
        serde_json::from_value::<In<S>>(value).map(|v| v.0)
    }

    /// The names an enum's schema lists are exactly those its values are written as, in
    /// order, each read back as itself; and they are the names the domain's `as_str` gives,
    /// which the stores write.
    fn assert_enum<S: Shape + PartialSchema>(
        all: &[S::Domain],
        as_str: Option<fn(&S::Domain) -> &'static str>,
    ) where
        S::Domain: PartialEq + std::fmt::Debug,
    {
        let written: Vec<Value> = all.iter().map(write::<S>).collect();
        assert_eq!(schema_of::<S>()["enum"], Value::Array(written.clone()));
        for (value, json) in all.iter().zip(written) {
            if let Some(as_str) = as_str {
                assert_eq!(json, json!(as_str(value)));
            }
            assert_eq!(&read::<S>(json).unwrap(), value);
        }
    }

    #[test]
    fn run_statuses() {
        assert_enum::<RunStatus>(&domain::RunStatus::ALL, Some(|s| s.as_str()));
        // The stores' legacy `queued` is theirs: the wire never took it.
        assert!(read::<RunStatus>(json!("queued")).is_err());
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
            Released,
        ];
        assert_enum::<ErrorCode>(&all, Some(|c| c.as_str()));
    }

    #[test]
    fn liveness() {
        use domain::LivenessState::*;
        assert_enum::<LivenessState>(
            &[Waiting, Alive, Quiet, Suspect, Lost, Done],
            Some(|s| s.as_str()),
        );
        let alive = domain::Liveness {
            state: Alive,
            heartbeat_age_s: Some(1.5),
            since_last_output_s: None,
            idle_for_s: None,
        };
        let json = write::<Liveness>(&alive);
        assert_eq!(
            json,
            json!({"state": "alive", "heartbeat_age_s": 1.5, "since_last_output_s": null,
                   "idle_for_s": null})
        );
        // The schema describes exactly the fields written.
        let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
        assert_eq!(keys(&schema_of::<Liveness>()["properties"]), keys(&json));
        assert_eq!(read::<Liveness>(json).unwrap(), alive);
    }

    #[test]
    fn worker_states() {
        use domain::WorkerState::*;
        assert_enum::<WorkerState>(&[Active, Suspect, Lost, Draining], Some(|s| s.as_str()));
    }

    #[test]
    fn lanes_endpoints_and_dispatch() {
        use domain::{DispatchSource as D, EndpointKind as K, OnFull as F};
        assert_enum::<OnFull>(&[F::Queue, F::Reject], None);
        assert_enum::<EndpointKind>(&[K::Probed, K::AlwaysReady], Some(|k| k.as_str()));
        assert_enum::<DispatchSource>(&[D::Endpoint, D::Fallback], Some(|d| d.as_str()));
    }

    #[test]
    fn resources() {
        let json = write::<Resources>(&domain::Resources::default());
        assert_eq!(json, json!({"cpus": 1.0, "memory_mb": 256}));
        // Both fields have defaults, and nothing else is accepted, as the schema says.
        let schema = schema_of::<Resources>();
        assert!(schema.get("required").is_none(), "{schema}");
        assert_eq!(schema["additionalProperties"], json!(false));
        assert_eq!(
            read::<Resources>(json!({})).unwrap(),
            domain::Resources::default()
        );
        assert!(read::<Resources>(json!({"gpus": 1})).is_err());
    }

    #[test]
    fn options_are_null_or_the_shape() {
        #[derive(Serialize, Deserialize)]
        struct Holder {
            #[serde(default, with = "Optional::<ErrorCode>")]
            code: Option<domain::ErrorCode>,
        }
        let some = Holder {
            code: Some(domain::ErrorCode::Stalled),
        };
        assert_eq!(
            serde_json::to_string(&some).unwrap(),
            r#"{"code":"stalled"}"#
        );
        assert_eq!(
            serde_json::to_string(&Holder { code: None }).unwrap(),
            r#"{"code":null}"#
        );
        for (text, code) in [
            (r#"{"code":"stalled"}"#, Some(domain::ErrorCode::Stalled)),
            (r#"{"code":null}"#, None),
            ("{}", None),
        ] {
            assert_eq!(serde_json::from_str::<Holder>(text).unwrap().code, code);
        }
        assert!(serde_json::from_str::<Holder>(r#"{"code":"nope"}"#).is_err());
    }
}
