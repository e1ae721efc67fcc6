//! What every area's cases share: specs, workers, claims, polls and error matchers.

pub(crate) use std::collections::{BTreeMap, BTreeSet};
pub(crate) use std::time::{Duration, Instant};

pub(crate) use tether_testkit::eventually;

pub(crate) use tether_domain::machine::AttemptOutcome;
pub(crate) use tether_domain::{
    ErrorCode, LanePolicy, Millis, Resources, RunSpec, RunStatus, Submission, SubmitDefaults,
};
pub(crate) use tether_store::{
    Admission, AdmissionPolicy, AppendOutcome, BatchAdmission, BatchRefusal, ClaimLimits,
    EventBody, EventKind, EventRecord, FinishReport, HandOff, NewWorker, OutputChunk, OutputStream,
    ReapPolicy, RunBeat, RunFilter, RunRef, SharedStore, Signal, StatusBody, StoreError,
    StreamOffsets,
};

/// How long any poll ([`eventually`]) waits before the case fails.
pub(crate) const PATIENCE: Duration = Duration::from_secs(10);

pub(crate) fn defaults() -> SubmitDefaults {
    SubmitDefaults {
        stale_after_ms: 60_000,
        ..SubmitDefaults::default()
    }
}

pub(crate) fn resolve_with(request: Submission, defaults: &SubmitDefaults) -> RunSpec {
    // The submission's own text stands in for the wire body's fingerprint: equal only for
    // equal submissions.
    let fingerprint = format!("{request:?}");
    request
        .resolve(Some(&LanePolicy::default()), defaults, fingerprint)
        .expect("a valid submission")
}

pub(crate) fn request() -> Submission {
    Submission {
        command: vec!["true".into()],
        ..Submission::default()
    }
}

/// A spec in the default lane with the given changes to its submission.
pub(crate) fn spec_with(change: impl FnOnce(&mut Submission)) -> RunSpec {
    let mut req = request();
    change(&mut req);
    resolve_with(req, &defaults())
}

pub(crate) fn spec() -> RunSpec {
    spec_with(|_| {})
}

/// A spec judged stale `ms` after its last heartbeat.
pub(crate) fn stale_after(ms: u32, max_attempts: u32) -> RunSpec {
    spec_with(|r| {
        r.heartbeat_timeout_s = Some(Some(f64::from(ms) / 1000.0));
        r.max_attempts = Some(max_attempts);
    })
}

pub(crate) fn worker(cpus: f64, lanes: &[&str]) -> NewWorker {
    NewWorker {
        name: "test-worker".into(),
        capacity: Resources {
            cpus,
            memory_mb: 64 * 1024,
        },
        lanes: lanes.iter().map(|l| l.to_string()).collect(),
        labels: BTreeMap::new(),
        secret_hash: None,
    }
}

pub(crate) fn limits(max_runs: u32) -> ClaimLimits {
    ClaimLimits {
        max_runs,
        lane_max_concurrency: BTreeMap::new(),
        ..ClaimLimits::default()
    }
}

pub(crate) fn quick_policy() -> ReapPolicy {
    ReapPolicy {
        timeout_grace_ms: 0,
        ..ReapPolicy::default()
    }
}

pub(crate) fn finish(outcome: AttemptOutcome, exit_code: Option<i32>) -> FinishReport {
    FinishReport {
        outcome,
        exit_code,
        error_message: None,
    }
}

pub(crate) fn chunk(stream: OutputStream, data: &[u8]) -> OutputChunk {
    OutputChunk {
        stream,
        ts: 0,
        data: data.to_vec(),
        offset: None,
    }
}

pub(crate) fn chunk_at(stream: OutputStream, offset: i64, data: &[u8]) -> OutputChunk {
    OutputChunk {
        offset: Some(offset),
        ..chunk(stream, data)
    }
}

pub(crate) fn beat(run_id: &str, attempt: u32) -> RunBeat {
    RunBeat {
        run_id: run_id.into(),
        attempt,
        stdout_bytes: 0,
        stderr_bytes: 0,
        since_last_output_s: None,
    }
}

pub(crate) async fn create(store: &SharedStore, spec: &RunSpec) -> String {
    store.create_run(spec).await.expect("create_run").run.id
}

pub(crate) async fn register(store: &SharedStore, cpus: f64) -> String {
    store
        .register_worker(&worker(cpus, &[]))
        .await
        .expect("register_worker")
        .id
}

/// Creates a run and has a new worker claim it: `(run_id, worker_id)`, attempt 1.
pub(crate) async fn claimed_run(store: &SharedStore, spec: &RunSpec) -> (String, String) {
    let run_id = create(store, spec).await;
    let worker_id = register(store, spec.resources.cpus.max(1.0)).await;
    let claimed = store
        .claim_runs(&worker_id, &limits(1))
        .await
        .expect("claim_runs");
    assert_eq!(claimed.len(), 1, "the new run is claimed");
    assert_eq!(claimed[0].run.id, run_id);
    (run_id, worker_id)
}

pub(crate) async fn all_events(store: &SharedStore, run_id: &str) -> Vec<EventRecord> {
    store
        .events_after(run_id, 0, 10_000)
        .await
        .expect("events_after")
}

pub(crate) fn kinds(events: &[EventRecord]) -> Vec<EventKind> {
    events.iter().map(|e| e.kind).collect()
}

/// What a `status` or `end` event reports; `None` for other kinds.
pub(crate) fn status_of(event: &EventRecord) -> Option<StatusBody> {
    event.body.status().copied()
}

/// The run status a `status` or `end` event reports.
pub(crate) fn status_in(event: &EventRecord) -> Option<RunStatus> {
    status_of(event).map(|s| s.status)
}

/// The error code a `status` or `end` event reports.
pub(crate) fn error_in(event: &EventRecord) -> Option<ErrorCode> {
    status_of(event).and_then(|s| s.error_code)
}

/// The stream a `log` event carries.
pub(crate) fn stream_in(event: &EventRecord) -> Option<OutputStream> {
    match event.body {
        EventBody::Log { stream } => Some(stream),
        _ => None,
    }
}

pub(crate) async fn status(store: &SharedStore, run_id: &str) -> RunStatus {
    store
        .get_run(run_id)
        .await
        .expect("get_run")
        .expect("the run exists")
        .status
}

/// Waits until the store's clock has passed `moment`.
pub(crate) async fn wait_past(store: &SharedStore, moment: Millis) {
    eventually("the store's clock to pass a deadline", PATIENCE, || async {
        (store.now().await.expect("now") > moment).then_some(())
    })
    .await;
}

pub(crate) fn assert_err<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    expected: fn(&StoreError) -> bool,
    what: &str,
) {
    match result {
        Err(e) if expected(&e) => {}
        other => panic!("{what}: expected a different answer, got {other:?}"),
    }
}

pub(crate) fn is_stale(e: &StoreError) -> bool {
    matches!(e, StoreError::StaleAttempt)
}

pub(crate) fn is_terminal(e: &StoreError) -> bool {
    matches!(e, StoreError::Terminal)
}

pub(crate) fn is_unknown_worker(e: &StoreError) -> bool {
    matches!(e, StoreError::UnknownWorker)
}
