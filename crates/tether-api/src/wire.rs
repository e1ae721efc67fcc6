use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tether_domain::{ErrorCode, Liveness, Resources, RunStatus, WorkerState};

use crate::shape;
use crate::SubmitRequest;

/// `{ "error": { "code", "message" } }`: every error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `malformed_json`, `invalid_field`, `unknown_lane`,
    /// `not_found`, `terminal`, `idempotency_conflict`, `stale_attempt`, `unknown_worker`,
    /// `unauthorized`, `body_too_large`, `store_unavailable`, ...
    pub code: String,
    pub message: String,
    /// For `POST /v1/runs/batch`: the entry the error is about (counting from 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// With `output_gap`: the offsets the server expects, to resend from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_offsets: Option<StreamOffsets>,
}

/// The body of `POST /v1/runs/batch`: many submissions, admitted in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchSubmitRequest {
    pub runs: Vec<SubmitRequest>,
}

/// The answer to `POST /v1/runs/batch`: every run, in the request's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchSubmitResponse {
    pub runs: Vec<RunView>,
}

/// One attempt in a run's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttemptView {
    pub attempt: u32,
    pub worker_id: String,
    /// The name the worker registered with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_name: Option<String>,
    pub claimed_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// `None` while in flight.
    #[serde(default, with = "shape::Optional::<shape::RunStatus>")]
    #[schema(value_type = Option<shape::RunStatus>)]
    pub status: Option<RunStatus>,
    #[serde(default, with = "shape::Optional::<shape::ErrorCode>")]
    #[schema(value_type = Option<shape::ErrorCode>)]
    pub error_code: Option<ErrorCode>,
    pub exit_code: Option<i32>,
    pub error_message: Option<String>,
    /// What the run's `endpoints` resolved to when this attempt was claimed, by env var.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoints: BTreeMap<String, crate::DispatchView>,
}

/// A run as every API answer shows it (SPEC §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunView {
    pub id: String,
    #[serde(with = "shape::RunStatus")]
    #[schema(value_type = shape::RunStatus)]
    pub status: RunStatus,
    pub attempt: u32,
    pub max_attempts: u32,
    /// Attempts a worker handed back before starting them: they do not count against
    /// `max_attempts`, so a run may reach `attempt` `max_attempts + released_attempts`.
    #[serde(default)]
    pub released_attempts: u32,
    pub lane: String,
    pub command: Vec<String>,
    /// Values of keys in `secret_env` read `***`.
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_env: Vec<String>,
    pub cwd: Option<String>,
    #[serde(with = "shape::Resources")]
    #[schema(value_type = shape::Resources)]
    pub resources: Resources,
    pub labels: BTreeMap<String, String>,
    pub endpoints: BTreeMap<String, String>,
    pub timeout_s: Option<f64>,
    pub heartbeat_timeout_s: Option<f64>,
    pub stall_timeout_s: Option<f64>,
    pub idempotency_key: Option<String>,
    pub worker_id: Option<String>,
    pub created_at: String,
    pub claimed_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub last_heartbeat_at: Option<String>,
    pub last_output_at: Option<String>,
    pub cancel_requested_at: Option<String>,
    pub exit_code: Option<i32>,
    #[serde(default, with = "shape::Optional::<shape::ErrorCode>")]
    #[schema(value_type = Option<shape::ErrorCode>)]
    pub error_code: Option<ErrorCode>,
    pub error_message: Option<String>,
    pub stdout_bytes: i64,
    pub stderr_bytes: i64,
    pub queue_position: Option<i64>,
    /// While pending: why it is not running yet, when something other than its turn holds it
    /// (no live worker serves its lane, it is larger than every worker, the lane is at its
    /// `max_concurrency`, no worker has room now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_reason: Option<String>,
    #[serde(with = "shape::Liveness")]
    #[schema(value_type = shape::Liveness)]
    pub liveness: Liveness,
    /// Present on `GET /v1/runs/{id}`; left out of lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<AttemptView>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunList {
    pub runs: Vec<RunView>,
    pub next_cursor: Option<String>,
}

// ---- workers -----------------------------------------------------------------------------

/// `POST /v1/workers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterWorkerRequest {
    pub name: String,
    #[serde(with = "shape::Resources")]
    #[schema(value_type = shape::Resources)]
    pub capacity: Resources,
    /// Empty or absent: every lane.
    #[serde(default)]
    pub lanes: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegisterWorkerResponse {
    pub worker_id: String,
    /// This worker's secret: every later worker call for `worker_id` sends it in the
    /// `Tether-Worker-Secret` header. Shown once; the server keeps only its hash.
    pub worker_secret: String,
    /// How often the worker must heartbeat, in milliseconds.
    pub heartbeat_interval_ms: u64,
}

/// `POST /v1/workers/{id}/claim`: long-polls up to `wait_ms` for work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// The most runs one answer hands out (the server takes at most 512).
    #[serde(default = "one")]
    pub max_runs: u32,
    #[serde(default)]
    pub wait_ms: u64,
    /// Beyond its capacity, what the worker may also hold in runs waiting in it to start the
    /// moment a slot frees (its local queue); at most 64 times its capacity. Absent: nothing.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "shape::Optional::<shape::Resources>"
    )]
    #[schema(value_type = Option<shape::Resources>)]
    pub reserve: Option<Resources>,
}

fn one() -> u32 {
    1
}

/// What a worker needs to run one attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Assignment {
    pub run_id: String,
    pub attempt: u32,
    pub command: Vec<String>,
    /// The run's env, plus its resolved endpoints.
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub timeout_ms: Option<u64>,
    pub stall_timeout_ms: Option<u64>,
    pub output_limit_bytes: u64,
    /// What the run reserves of the worker, so the worker knows when it has room to ask for
    /// more. Absent from older servers: then the default request.
    #[serde(default, with = "shape::Optional::<shape::Resources>")]
    #[schema(value_type = Option<shape::Resources>)]
    pub resources: Option<Resources>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClaimResponse {
    pub assignments: Vec<Assignment>,
}

/// One run's part of a worker heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunBeatWire {
    pub run_id: String,
    pub attempt: u32,
    #[serde(default)]
    pub stdout_bytes: i64,
    #[serde(default)]
    pub stderr_bytes: i64,
    #[serde(default)]
    pub since_last_output_s: Option<f64>,
}

/// `POST /v1/workers/{id}/heartbeat`: one per interval for the worker and all its runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    #[serde(default)]
    pub runs: Vec<RunBeatWire>,
    /// The worker is finishing what it holds before it leaves: show it `draining` and hand it
    /// nothing new.
    #[serde(default)]
    pub draining: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunRefWire {
    pub run_id: String,
    pub attempt: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatResponse {
    /// Stop these (SIGTERM, then SIGKILL after the grace period) and finish them `cancelled`.
    pub cancel: Vec<RunRefWire>,
    /// Not yours any more: kill at once, report nothing.
    pub not_owned: Vec<RunRefWire>,
}

/// The most runs one `POST /v1/workers/{id}/release` may hand back.
pub const MAX_RELEASED_RUNS: usize = 1_000;

/// `POST /v1/workers/{id}/release`: attempts the worker holds but never started, handed back
/// (it is stopping, or they waited too long in its local queue). Their attempts do not count
/// against `max_attempts`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// At most 1,000.
    pub runs: Vec<RunRefWire>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReleaseResponse {
    /// Taken back: pending again (or cancelled, if a cancel was asked). The others were not
    /// this worker's unstarted attempts any more (started, ended, or reaped) and are as they
    /// were.
    pub released: Vec<RunRefWire>,
}

/// `POST /v1/workers/{id}/control`: a long-poll the worker keeps open so a cancel reaches it
/// at once; the heartbeat still carries cancels too, as the fallback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ControlRequest {
    #[serde(default)]
    pub wait_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ControlResponse {
    /// Stop these (SIGTERM, then SIGKILL after the grace period) and finish them `cancelled`.
    pub cancel: Vec<RunRefWire>,
}

/// `POST /v1/runs/{id}/attempts/{attempt}/start`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub worker_id: String,
    #[serde(default)]
    pub pid: Option<u32>,
}

/// One piece of output. `data` is base64 so that bytes that are not UTF-8 survive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogChunkWire {
    /// `stdout` or `stderr`.
    pub stream: String,
    /// Milliseconds since the epoch, by the worker's clock, when the worker read it.
    pub ts: i64,
    /// Base64 (standard alphabet, padded) of the raw bytes.
    pub data: String,
    /// Where in its stream (of this attempt) the chunk begins, in bytes. A repeat of stored
    /// bytes is acknowledged and not stored again; a chunk past the stored end is refused
    /// with `409 output_gap` and the offsets expected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
}

/// How many bytes of each stream an attempt has stored: where its next chunks begin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StreamOffsets {
    pub stdout: i64,
    pub stderr: i64,
}

/// `POST /v1/runs/{id}/attempts/{attempt}/logs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppendLogRequest {
    pub worker_id: String,
    pub chunks: Vec<LogChunkWire>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppendLogResponse {
    pub last_seq: i64,
    /// The run's output limit was reached and the run has ended: kill the process, finish
    /// nothing.
    pub stop: bool,
    /// What the attempt has stored of each stream after this append.
    #[serde(default)]
    pub offsets: StreamOffsets,
}

/// `POST /v1/runs/{id}/attempts/{attempt}/finish`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FinishRequest {
    pub worker_id: String,
    /// `succeeded`, `failed`, `timed_out` or `cancelled`.
    #[serde(with = "shape::RunStatus")]
    #[schema(value_type = shape::RunStatus)]
    pub status: RunStatus,
    #[serde(default, with = "shape::Optional::<shape::ErrorCode>")]
    #[schema(value_type = Option<shape::ErrorCode>)]
    pub error_code: Option<ErrorCode>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub error_message: Option<String>,
}

/// The most starts and finishes one `POST /v1/workers/{id}/attempts` may carry.
pub const MAX_ATTEMPT_REPORTS: usize = 1_000;

/// `POST /v1/workers/{id}/attempts`: several attempts' starts and finishes in one call, and
/// optionally a claim for the room the finishes free. Starts are applied first, then
/// finishes, then the claim, each item judged alone: a stale item is refused in its own
/// answer, never the whole call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttemptReportsRequest {
    #[serde(default)]
    pub starts: Vec<AttemptStartWire>,
    #[serde(default)]
    pub finishes: Vec<AttemptFinishWire>,
    /// Claim the next runs in the same call, after the finishes have freed their room. Never
    /// waits: an empty answer means nothing fits now (the claim long-poll is for waiting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<ReportClaim>,
}

/// One start of [`AttemptReportsRequest`]: the process of this attempt runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttemptStartWire {
    pub run_id: String,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// How long before this call the process started, in milliseconds, by the worker's own
    /// monotonic clock: `started_at` is stamped that long before the store's time at the
    /// call (never before the claim, never after the call). A duration, not a time, so the
    /// worker's wall clock is never believed. Absent: the time of the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ago_ms: Option<u64>,
}

/// One finish of [`AttemptReportsRequest`]: how this attempt ended (as
/// `POST /v1/runs/{id}/attempts/{attempt}/finish` says it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttemptFinishWire {
    pub run_id: String,
    pub attempt: u32,
    /// `succeeded`, `failed`, `timed_out` or `cancelled`.
    #[serde(with = "shape::RunStatus")]
    #[schema(value_type = shape::RunStatus)]
    pub status: RunStatus,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "shape::Optional::<shape::ErrorCode>"
    )]
    #[schema(value_type = Option<shape::ErrorCode>)]
    pub error_code: Option<ErrorCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// How long before this call the attempt ended, as [`AttemptStartWire::ago_ms`]
    /// (`finished_at`, never before `started_at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ago_ms: Option<u64>,
}

/// The claim riding on [`AttemptReportsRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportClaim {
    #[serde(default = "one")]
    pub max_runs: u32,
    /// As [`ClaimRequest::reserve`].
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "shape::Optional::<shape::Resources>"
    )]
    #[schema(value_type = Option<shape::Resources>)]
    pub reserve: Option<Resources>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttemptReportsResponse {
    /// One answer per start, in order.
    pub starts: Vec<ReportAnswer>,
    /// One answer per finish, in order.
    pub finishes: Vec<ReportAnswer>,
    /// What the claim handed out (empty without a claim).
    #[serde(default)]
    pub assignments: Vec<Assignment>,
}

/// The answer to one item: the run's status after it, or the error the single-attempt call
/// would have answered (`status` is that call's HTTP status: `409 stale_attempt`, say).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReportAnswer {
    pub run_id: String,
    pub attempt: u32,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "shape::Optional::<shape::RunStatus>"
    )]
    #[schema(value_type = Option<shape::RunStatus>)]
    pub run_status: Option<RunStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ReportRefusal>,
}

/// Why one item of a batch was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReportRefusal {
    /// The HTTP status the single-attempt call would have answered.
    pub status: u16,
    /// As in [`ErrorDetail`]: `stale_attempt`, `not_found`, `invalid_field`,
    /// `store_unavailable`, ...
    pub code: String,
    pub message: String,
}

/// A worker as `GET /v1/workers` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerView {
    pub id: String,
    pub name: String,
    #[serde(with = "shape::WorkerState")]
    #[schema(value_type = shape::WorkerState)]
    pub state: WorkerState,
    #[serde(with = "shape::Resources")]
    #[schema(value_type = shape::Resources)]
    pub capacity: Resources,
    #[serde(with = "shape::Resources")]
    #[schema(value_type = shape::Resources)]
    pub reserved: Resources,
    pub lanes: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub registered_at: String,
    pub last_heartbeat_at: String,
    pub heartbeat_age_s: f64,
    pub runs: Vec<RunRefWire>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerList {
    pub workers: Vec<WorkerView>,
}

// ---- events ------------------------------------------------------------------------------

/// One event as SSE `data:` and as an NDJSON line carry it. `seq` is absent on `heartbeat`
/// events, which are never stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventView {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    pub ts: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "shape::Optional::<shape::RunStatus>"
    )]
    #[schema(value_type = Option<shape::RunStatus>)]
    pub status: Option<RunStatus>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "shape::Optional::<shape::ErrorCode>"
    )]
    #[schema(value_type = Option<shape::ErrorCode>)]
    pub error_code: Option<ErrorCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// `log`: `stdout` or `stderr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// `log`: the output as text (invalid UTF-8 replaced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `log`: base64 of the raw bytes, present only when they are not valid UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<String>,
    /// `heartbeat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<i64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "shape::Optional::<shape::Liveness>"
    )]
    #[schema(value_type = Option<shape::Liveness>)]
    pub liveness: Option<Liveness>,
}

// ---- lanes -------------------------------------------------------------------------------

/// A lane as `GET /v1/lanes` shows it: its policy and what it holds now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LaneView {
    pub name: String,
    #[serde(with = "shape::OnFull")]
    #[schema(value_type = shape::OnFull)]
    pub on_full: tether_domain::OnFull,
    pub max_concurrency: Option<u32>,
    pub heartbeat_timeout_s: Option<f64>,
    pub max_attempts: Option<u32>,
    pub timeout_s: Option<f64>,
    #[serde(default, with = "shape::Optional::<shape::Resources>")]
    #[schema(value_type = Option<shape::Resources>)]
    pub resources: Option<Resources>,
    pub output_limit_mb: Option<u64>,
    /// What live workers serving the lane advertise, summed.
    #[serde(with = "shape::Resources")]
    #[schema(value_type = shape::Resources)]
    pub capacity: Resources,
    /// What the lane's in-flight runs reserve.
    #[serde(with = "shape::Resources")]
    #[schema(value_type = shape::Resources)]
    pub reserved: Resources,
    pub live_workers: u32,
    pub in_flight: i64,
    pub pending: i64,
    /// Submissions this server refused at the door since it started (`503` or `422`).
    #[serde(default)]
    pub refused: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LaneList {
    pub lanes: Vec<LaneView>,
}

// ---- output pages --------------------------------------------------------------------------

/// `GET /v1/runs/{id}/output`: a window of a run's output, read from its tail backwards, so a
/// long log is shown without loading all of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OutputPage {
    /// `log` events, oldest first, each with its `stream`, `attempt` and `seq`.
    pub events: Vec<EventView>,
    /// Every event up to this seq is in this page or before it: follow the event stream from
    /// here (`Last-Event-ID`) to miss nothing and repeat nothing.
    pub through_seq: i64,
    /// Pass as `before` to read the output just before this page; absent at the log's start.
    pub earlier_before: Option<i64>,
}
