//! Tether's domain: what a run is, how its status may move, how alive it is, and what a lane
//! allows. Everything here is pure: no clocks, no I/O. Callers pass the store's `now` in, so
//! every judgement is made by one clock (the store's), never a worker's.

pub mod admission;
pub mod config;
pub mod dispatch;
pub mod liveness;
pub mod machine;
pub mod spec;
pub mod status;
pub mod time;

pub use config::{LanePolicy, OnFull, PoolConfig, TetherConfig};
pub use dispatch::{Dispatch, DispatchSource, EndpointKind};
pub use liveness::{
    judge_run_liveness, judge_worker, Freshness, Liveness, LivenessState, WorkerState,
};
pub use machine::{AttemptOutcome, Decision, TransitionError};
pub use spec::{Resources, RunSpec, Submission, SubmitDefaults, ValidationError};
pub use status::{ErrorCode, RunStatus};
pub use time::Millis;
