//! The conformance suite every store runs unchanged (like River's driver tests): one case per
//! promise of the [`Store`] trait. Nothing here knows which store it is testing.
//!
//! A store's integration tests provide a [`Harness`] that makes a fresh, empty store per case
//! and expand [`store_conformance_tests!`](crate::store_conformance_tests) once:
//!
//! ```ignore
//! tether_store::store_conformance_tests!(MyHarness);
//! ```
//!
//! Each case becomes its own `#[tokio::test]`, so they run in parallel and fail by name.
//! Time-based cases use windows of a few hundred milliseconds and poll with a deadline.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tether_domain::machine::AttemptOutcome;
use tether_domain::{
    ErrorCode, LanePolicy, Millis, Resources, RunSpec, RunStatus, Submission, SubmitDefaults,
};

use crate::{
    Admission, AdmissionPolicy, AppendOutcome, BatchAdmission, BatchRefusal, ClaimLimits,
    EventKind, EventRecord, FinishReport, NewWorker, OutputChunk, OutputStream, ReapPolicy,
    RunBeat, RunFilter, RunRef, SharedStore, Signal, StoreError, StreamOffsets,
};

/// A fresh store, and whatever must stay alive while it is used (a temp dir, a database).
pub struct Fixture {
    pub store: SharedStore,
    pub guard: Box<dyn Any + Send + Sync>,
}

/// What a store's tests provide to run the suite.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A new, empty store, unaffected by any other case running at the same time.
    async fn fresh(&self) -> Fixture;

    /// Overwrites a run's stored status text as an older version would have written it (the
    /// legacy `queued`), behind the store's back.
    async fn write_status_text(&self, fixture: &Fixture, run_id: &str, status: &str);
}

/// Expands to one `#[tokio::test]` per conformance case, each on a fresh store from
/// `$harness` (an expression whose reference is a `&dyn Harness`). The caller's crate needs
/// `tokio` with the `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! store_conformance_tests {
    ($harness:expr) => {
        $crate::store_conformance_tests!(@cases $harness;
            create_get_and_list_newest_first,
            legacy_queued_reads_as_pending,
            runs_are_found_by_id_prefix,
            idempotency_key_returns_the_same_run_or_conflicts,
            a_reject_lane_admits_only_what_fits_at_once,
            a_batch_is_written_whole_in_order_and_replays_by_key,
            a_batch_refused_at_one_entry_writes_nothing,
            a_batch_into_a_reject_lane_is_all_or_nothing,
            concurrent_claims_hand_each_run_to_one_worker,
            claims_are_first_in_first_out_within_a_lane,
            claims_stay_within_worker_capacity,
            a_run_too_big_is_skipped_without_blocking_smaller_ones,
            claims_respect_lane_max_concurrency,
            unknown_and_deregistered_workers_are_refused,
            a_worker_s_secret_hash_is_kept_while_it_is_registered,
            a_worker_with_a_stale_heartbeat_is_handed_nothing,
            lane_loads_count_pending_and_in_flight_runs,
            events_before_reads_a_log_backwards_from_its_tail,
            a_draining_worker_is_handed_nothing_new,
            writes_survive_callers_dropped_mid_transaction,
            a_run_goes_from_pending_to_succeeded_with_events_in_order,
            old_attempts_and_other_workers_are_fenced,
            terminal_runs_never_change,
            cancel_of_pending_is_immediate_and_it_is_never_claimed,
            cancel_of_in_flight_reaches_the_worker_at_its_heartbeat,
            output_past_the_limit_ends_the_run_failed,
            non_utf8_output_round_trips_exactly,
            heartbeat_stamps_held_runs_and_names_the_rest_not_owned,
            list_workers_shows_held_runs_and_reserved_resources,
            a_stale_run_is_retried_then_timed_out,
            a_stale_run_with_one_attempt_ends_timed_out,
            a_claim_never_confirmed_ends_worker_claim_timeout,
            no_heartbeat_timeout_means_reaped_only_for_timeout,
            cancel_requested_with_the_worker_gone_ends_cancelled,
            concurrent_sweeps_retry_each_stale_run_once,
            deregister_hands_runs_back_at_once,
            next_reap_deadline_is_the_earliest_deadline,
            signals_are_delivered_after_commit,
            pools_from_config_never_override_pools_set_through_the_api,
            endpoints_register_replace_and_delete,
            probes_are_claimed_once_per_interval_across_callers,
            probe_results_stamp_only_ready_answers_for_the_current_claim,
            an_attempts_dispatch_is_recorded_once_while_current,
            repeated_output_is_stored_once_and_gaps_are_refused,
            heartbeat_grace_moves_stale_deadlines_only_forward,
            pruning_deletes_old_finished_runs_only,
        );
    };
    (@cases $harness:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::conformance::$case(&$harness).await;
            }
        )*
    };
}

// ---- helpers ------------------------------------------------------------------------------

/// How long any poll waits before the case fails.
const PATIENCE: Duration = Duration::from_secs(10);

fn defaults() -> SubmitDefaults {
    SubmitDefaults {
        stale_after_ms: 60_000,
        ..SubmitDefaults::default()
    }
}

fn resolve_with(request: Submission, defaults: &SubmitDefaults) -> RunSpec {
    // The submission's own text stands in for the wire body's fingerprint: equal only for
    // equal submissions.
    let fingerprint = format!("{request:?}");
    request
        .resolve(Some(&LanePolicy::default()), defaults, fingerprint)
        .expect("a valid submission")
}

fn request() -> Submission {
    Submission {
        command: vec!["true".into()],
        ..Submission::default()
    }
}

/// A spec in the default lane with the given changes to its submission.
fn spec_with(change: impl FnOnce(&mut Submission)) -> RunSpec {
    let mut req = request();
    change(&mut req);
    resolve_with(req, &defaults())
}

fn spec() -> RunSpec {
    spec_with(|_| {})
}

/// A spec judged stale `ms` after its last heartbeat.
fn stale_after(ms: u32, max_attempts: u32) -> RunSpec {
    spec_with(|r| {
        r.heartbeat_timeout_s = Some(Some(f64::from(ms) / 1000.0));
        r.max_attempts = Some(max_attempts);
    })
}

fn worker(cpus: f64, lanes: &[&str]) -> NewWorker {
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

fn limits(max_runs: u32) -> ClaimLimits {
    ClaimLimits {
        max_runs,
        lane_max_concurrency: BTreeMap::new(),
        worker_fresh_ms: 0,
    }
}

fn quick_policy() -> ReapPolicy {
    ReapPolicy {
        timeout_grace_ms: 0,
        ..ReapPolicy::default()
    }
}

fn finish(outcome: AttemptOutcome, exit_code: Option<i32>) -> FinishReport {
    FinishReport {
        outcome,
        exit_code,
        error_message: None,
    }
}

fn chunk(stream: OutputStream, data: &[u8]) -> OutputChunk {
    OutputChunk {
        stream,
        ts: 0,
        data: data.to_vec(),
        offset: None,
    }
}

fn chunk_at(stream: OutputStream, offset: i64, data: &[u8]) -> OutputChunk {
    OutputChunk {
        offset: Some(offset),
        ..chunk(stream, data)
    }
}

fn beat(run_id: &str, attempt: u32) -> RunBeat {
    RunBeat {
        run_id: run_id.into(),
        attempt,
        stdout_bytes: 0,
        stderr_bytes: 0,
        since_last_output_s: None,
    }
}

async fn create(store: &SharedStore, spec: &RunSpec) -> String {
    store.create_run(spec).await.expect("create_run").run.id
}

async fn register(store: &SharedStore, cpus: f64) -> String {
    store
        .register_worker(&worker(cpus, &[]))
        .await
        .expect("register_worker")
        .id
}

/// Creates a run and has a new worker claim it: `(run_id, worker_id)`, attempt 1.
async fn claimed_run(store: &SharedStore, spec: &RunSpec) -> (String, String) {
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

async fn all_events(store: &SharedStore, run_id: &str) -> Vec<EventRecord> {
    store
        .events_after(run_id, 0, 10_000)
        .await
        .expect("events_after")
}

fn kinds(events: &[EventRecord]) -> Vec<EventKind> {
    events.iter().map(|e| e.kind).collect()
}

fn status_of(event: &EventRecord) -> Option<String> {
    event.body["status"].as_str().map(str::to_string)
}

async fn status(store: &SharedStore, run_id: &str) -> RunStatus {
    store
        .get_run(run_id)
        .await
        .expect("get_run")
        .expect("the run exists")
        .status
}

/// Polls `probe` until it answers `Some`, failing the case after [`PATIENCE`].
async fn poll<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the store's clock has passed `moment`.
async fn wait_past(store: &SharedStore, moment: Millis) {
    poll("the store's clock to pass a deadline", || async {
        (store.now().await.expect("now") > moment).then_some(())
    })
    .await;
}

fn assert_err<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    expected: fn(&StoreError) -> bool,
    what: &str,
) {
    match result {
        Err(e) if expected(&e) => {}
        other => panic!("{what}: expected a different answer, got {other:?}"),
    }
}

fn is_stale(e: &StoreError) -> bool {
    matches!(e, StoreError::StaleAttempt)
}

fn is_terminal(e: &StoreError) -> bool {
    matches!(e, StoreError::Terminal)
}

fn is_unknown_worker(e: &StoreError) -> bool {
    matches!(e, StoreError::UnknownWorker)
}

// ---- runs ---------------------------------------------------------------------------------

pub async fn create_get_and_list_newest_first(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let mut ids = Vec::new();
    for i in 0..5 {
        let lane = if i % 2 == 0 { "a" } else { "b" };
        ids.push(create(store, &spec_with(|r| r.lane = Some(lane.into()))).await);
    }
    let expected_positions = [1, 1, 2, 2, 3];
    for (id, position) in ids.iter().zip(expected_positions) {
        let run = store
            .get_run(id)
            .await
            .unwrap()
            .expect("created run reads back");
        assert_eq!(run.status, RunStatus::Pending);
        assert_eq!(run.attempt, 0);
        assert_eq!(run.worker_id, None);
        assert_eq!(
            run.queue_position,
            Some(position),
            "queue position within its lane"
        );
        assert_eq!(run.last_event_seq, 1);
        let events = all_events(store, id).await;
        assert_eq!(kinds(&events), vec![EventKind::Status]);
        assert_eq!(events[0].seq, 1);
        assert_eq!(status_of(&events[0]).as_deref(), Some("pending"));
    }
    assert!(store.get_run("no-such-run").await.unwrap().is_none());

    // Paged newest first, two at a time, with nothing lost or repeated.
    let mut seen = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = store
            .list_runs(&RunFilter {
                limit: 2,
                cursor: cursor.clone(),
                ..RunFilter::default()
            })
            .await
            .unwrap();
        pages += 1;
        assert!(page.runs.len() <= 2);
        seen.extend(page.runs.iter().map(|r| r.id.clone()));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);
    assert_eq!(pages, 3);

    let everything = store.list_runs(&RunFilter::default()).await.unwrap();
    assert_eq!(everything.runs.len(), 5, "limit 0 means the default page");
    assert_eq!(everything.next_cursor, None);

    let lane_b = store
        .list_runs(&RunFilter {
            lane: Some("b".into()),
            limit: 10,
            ..RunFilter::default()
        })
        .await
        .unwrap();
    let lane_b_ids: Vec<&str> = lane_b.runs.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(lane_b_ids, vec![ids[3].as_str(), ids[1].as_str()]);

    // Claim the oldest; the status filter sees it move.
    let worker_id = register(store, 1.0).await;
    let claimed = store.claim_runs(&worker_id, &limits(1)).await.unwrap();
    assert_eq!(claimed[0].run.id, ids[0]);
    let by_status = |status| RunFilter {
        status: Some(status),
        limit: 10,
        ..RunFilter::default()
    };
    let pending = store
        .list_runs(&by_status(RunStatus::Pending))
        .await
        .unwrap();
    assert_eq!(pending.runs.len(), 4);
    let claimed_page = store
        .list_runs(&by_status(RunStatus::Claimed))
        .await
        .unwrap();
    assert_eq!(claimed_page.runs.len(), 1);
    assert_eq!(claimed_page.runs[0].id, ids[0]);
    assert_eq!(claimed_page.runs[0].queue_position, None);
    // The next run in lane a moved up.
    let next = store.get_run(&ids[2]).await.unwrap().unwrap();
    assert_eq!(next.queue_position, Some(1));

    assert_err(
        store
            .list_runs(&RunFilter {
                cursor: Some("not a cursor".into()),
                ..RunFilter::default()
            })
            .await,
        |e| matches!(e, StoreError::InvalidCursor),
        "a garbage cursor",
    );
}

pub async fn runs_are_found_by_id_prefix(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(create(store, &spec()).await);
    }
    let by_prefix = |prefix: &str| RunFilter {
        id_prefix: Some(prefix.to_string()),
        limit: 10,
        ..RunFilter::default()
    };
    // Every length, including ones that end on an id's `-`: exactly the runs it starts.
    for id in &ids {
        for len in [1, 8, 9, 13, 14, 20, 30, id.len()] {
            let prefix = &id[..len];
            let page = store.list_runs(&by_prefix(prefix)).await.unwrap();
            let found: Vec<&str> = page.runs.iter().map(|r| r.id.as_str()).collect();
            let expected: Vec<&str> = ids
                .iter()
                .rev()
                .filter(|i| i.starts_with(prefix))
                .map(String::as_str)
                .collect();
            assert_eq!(found, expected, "prefix `{prefix}`");
        }
    }
    let whole = store.list_runs(&by_prefix(&ids[2])).await.unwrap();
    assert_eq!(whole.runs.len(), 1);
    assert_eq!(whole.runs[0].id, ids[2]);
    for nothing in ["zz", "%", "_", "0000000"] {
        let page = store.list_runs(&by_prefix(nothing)).await.unwrap();
        assert!(page.runs.is_empty(), "`{nothing}` matches no run");
    }
}

pub async fn legacy_queued_reads_as_pending(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let old = create(store, &spec()).await;
    let new = create(store, &spec()).await;
    h.write_status_text(&fx, &old, "queued").await;

    let run = store.get_run(&old).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Pending);
    assert_eq!(run.queue_position, Some(1));
    let behind = store.get_run(&new).await.unwrap().unwrap();
    assert_eq!(
        behind.queue_position,
        Some(2),
        "a queued row counts as pending ahead"
    );
    let pending = store
        .list_runs(&RunFilter {
            status: Some(RunStatus::Pending),
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(
        pending.runs.len(),
        2,
        "filtering pending finds queued rows too"
    );

    let worker_id = register(store, 1.0).await;
    let claimed = store.claim_runs(&worker_id, &limits(1)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        claimed[0].run.id, old,
        "a queued row is claimed like a pending one"
    );
    assert_eq!(claimed[0].run.status, RunStatus::Claimed);
    assert_eq!(claimed[0].attempt, 1);
}

pub async fn idempotency_key_returns_the_same_run_or_conflicts(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let keyed = spec_with(|r| r.idempotency_key = Some("deploy-42".into()));
    let first = store.create_run(&keyed).await.unwrap();
    assert!(first.created);
    let again = store.create_run(&keyed).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.run.id, first.run.id);
    assert_eq!(again.run.seq, first.run.seq);

    let different = spec_with(|r| {
        r.idempotency_key = Some("deploy-42".into());
        r.command = vec!["false".into()];
    });
    match store.create_run(&different).await {
        Err(StoreError::IdempotencyConflict { run_id }) => assert_eq!(run_id, first.run.id),
        other => panic!("a reused key with another body must conflict, got {other:?}"),
    }
    let page = store.list_runs(&RunFilter::default()).await.unwrap();
    assert_eq!(page.runs.len(), 1, "no second run was made");
    assert_eq!(all_events(store, &first.run.id).await.len(), 1);
}

fn queue_policy() -> AdmissionPolicy {
    AdmissionPolicy {
        reject_when_full: false,
        max_concurrency: None,
        worker_fresh_ms: 60_000,
    }
}

fn keyed(key: &str, command: &str) -> RunSpec {
    spec_with(|r| {
        r.idempotency_key = Some(key.into());
        r.command = vec![command.into()];
    })
}

pub async fn a_batch_is_written_whole_in_order_and_replays_by_key(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let mut signals = store.subscribe();
    let batch: Vec<_> = (0..5)
        .map(|i| (keyed(&format!("k{i}"), "true"), queue_policy()))
        .collect();
    let BatchAdmission::Accepted(first) = store.admit_runs(&batch).await.unwrap() else {
        panic!("a queue lane admits the whole batch");
    };
    assert_eq!(first.len(), 5);
    assert!(first.iter().all(|c| c.created));
    let keys: Vec<_> = first
        .iter()
        .map(|c| c.run.spec.idempotency_key.clone().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["k0", "k1", "k2", "k3", "k4"],
        "answers in the batch's order"
    );
    for created in &first {
        assert_eq!(created.run.status, RunStatus::Pending);
        assert_eq!(all_events(store, &created.run.id).await.len(), 1);
    }
    let woke = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Ok(Signal::RunPending { lane }) = signals.recv().await {
                return lane;
            }
        }
    })
    .await
    .expect("a RunPending signal after the batch commits");
    assert_eq!(woke, "default");

    // The same batch again: the same runs, nothing new; a key repeated inside one batch
    // answers its first run.
    let BatchAdmission::Accepted(again) = store.admit_runs(&batch).await.unwrap() else {
        panic!("a replayed batch is accepted");
    };
    let ids =
        |runs: &[crate::CreatedRun]| runs.iter().map(|c| c.run.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&again), ids(&first));
    assert!(again.iter().all(|c| !c.created));
    let twice = vec![
        (keyed("dup", "true"), queue_policy()),
        (keyed("dup", "true"), queue_policy()),
    ];
    let BatchAdmission::Accepted(dup) = store.admit_runs(&twice).await.unwrap() else {
        panic!("a key repeated in a batch is accepted");
    };
    assert_eq!(dup[0].run.id, dup[1].run.id);
    assert!(dup[0].created && !dup[1].created);
    let page = store.list_runs(&RunFilter::default()).await.unwrap();
    assert_eq!(page.runs.len(), 6);
}

pub async fn a_batch_refused_at_one_entry_writes_nothing(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let earlier = store.create_run(&keyed("taken", "true")).await.unwrap();
    let batch = vec![
        (keyed("a", "true"), queue_policy()),
        (keyed("b", "true"), queue_policy()),
        (keyed("taken", "false"), queue_policy()),
        (keyed("c", "true"), queue_policy()),
    ];
    match store.admit_runs(&batch).await.unwrap() {
        BatchAdmission::Refused {
            index: 2,
            refusal: BatchRefusal::IdempotencyConflict { run_id },
        } => assert_eq!(run_id, earlier.run.id),
        other => panic!("entry 2 reuses a key with another body, got {other:?}"),
    }
    let page = store.list_runs(&RunFilter::default()).await.unwrap();
    assert_eq!(page.runs.len(), 1, "entries 0 and 1 were not kept");

    register(store, 2.0).await;
    let huge = spec_with(|r| {
        r.resources = Some(Resources {
            cpus: 64.0,
            memory_mb: 256,
        })
    });
    let batch = vec![(spec(), queue_policy()), (huge, queue_policy())];
    assert_eq!(
        store.admit_runs(&batch).await.unwrap(),
        BatchAdmission::Refused {
            index: 1,
            refusal: BatchRefusal::NeverFits
        }
    );
    let page = store.list_runs(&RunFilter::default()).await.unwrap();
    assert_eq!(page.runs.len(), 1, "a refused batch writes nothing");
}

pub async fn a_batch_into_a_reject_lane_is_all_or_nothing(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let reject = AdmissionPolicy {
        reject_when_full: true,
        ..queue_policy()
    };
    let strict = || (spec_with(|r| r.lane = Some("strict".into())), reject);
    register(store, 3.0).await;
    // Room for three: a batch of four is refused whole, naming the lane; of three, admitted.
    let four: Vec<_> = (0..4).map(|_| strict()).collect();
    assert_eq!(
        store.admit_runs(&four).await.unwrap(),
        BatchAdmission::Refused {
            index: 3,
            refusal: BatchRefusal::LaneFull {
                lane: "strict".into()
            }
        }
    );
    assert!(store
        .list_runs(&RunFilter::default())
        .await
        .unwrap()
        .runs
        .is_empty());
    let three: Vec<_> = (0..3).map(|_| strict()).collect();
    let BatchAdmission::Accepted(runs) = store.admit_runs(&three).await.unwrap() else {
        panic!("room for three");
    };
    assert_eq!(runs.len(), 3);
    assert_eq!(
        store.admit_runs(&[strict()]).await.unwrap(),
        BatchAdmission::Refused {
            index: 0,
            refusal: BatchRefusal::LaneFull {
                lane: "strict".into()
            }
        },
        "the batch's runs hold the room"
    );
}

pub async fn a_reject_lane_admits_only_what_fits_at_once(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = fx.store.clone();
    let reject = AdmissionPolicy {
        reject_when_full: true,
        max_concurrency: None,
        worker_fresh_ms: 60_000,
    };
    let strict = || spec_with(|r| r.lane = Some("strict".into()));
    // No live worker serves the lane: a reject lane has no room.
    assert_eq!(
        store.admit_run(&strict(), &reject).await.unwrap(),
        Admission::LaneFull
    );
    register(&store, 2.0).await;

    // Eight submissions at once into room for two: exactly two are accepted.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            let spec = strict();
            tokio::spawn(async move { store.admit_run(&spec, &reject).await.unwrap() })
        })
        .collect();
    let mut accepted = 0;
    let mut full = 0;
    for task in tasks {
        match task.await.unwrap() {
            Admission::Accepted(created) => {
                assert!(created.created);
                accepted += 1;
            }
            Admission::LaneFull => full += 1,
            Admission::NeverFits => panic!("a 1-cpu run fits a 2-cpu worker"),
        }
    }
    assert_eq!((accepted, full), (2, 6));
    let page = store.list_runs(&RunFilter::default()).await.unwrap();
    assert_eq!(page.runs.len(), 2, "a refusal writes nothing");

    // Too big for any live worker: refused in every lane.
    let huge = |lane: &str| {
        let lane = lane.to_string();
        spec_with(move |r| {
            r.lane = Some(lane);
            r.resources = Some(Resources {
                cpus: 64.0,
                memory_mb: 256,
            });
        })
    };
    assert_eq!(
        store.admit_run(&huge("strict"), &reject).await.unwrap(),
        Admission::NeverFits
    );
    let queue = AdmissionPolicy {
        reject_when_full: false,
        ..reject
    };
    assert_eq!(
        store.admit_run(&huge("default"), &queue).await.unwrap(),
        Admission::NeverFits
    );
    // A queue lane that is full still accepts: the run waits.
    assert!(matches!(
        store.admit_run(&spec(), &queue).await.unwrap(),
        Admission::Accepted(_)
    ));

    // An accepted idempotent submission is answered as accepted even when the lane is full.
    let keyed = spec_with(|r| {
        r.lane = Some("capped".into());
        r.idempotency_key = Some("once".into());
    });
    let capped = AdmissionPolicy {
        max_concurrency: Some(1),
        ..reject
    };
    let worker_b = register(&store, 8.0).await;
    let Admission::Accepted(first) = store.admit_run(&keyed, &capped).await.unwrap() else {
        panic!("room for one in the capped lane");
    };
    let other = spec_with(|r| r.lane = Some("capped".into()));
    assert_eq!(
        store.admit_run(&other, &capped).await.unwrap(),
        Admission::LaneFull,
        "max_concurrency counts admitted runs"
    );
    match store.admit_run(&keyed, &capped).await.unwrap() {
        Admission::Accepted(again) => {
            assert!(!again.created);
            assert_eq!(again.run.id, first.run.id);
        }
        other => panic!("a resubmission is accepted, got {other:?}"),
    }
    // Once claimed it still counts, until it ends.
    let claimed = store.claim_runs(&worker_b, &limits(10)).await.unwrap();
    let held = claimed.iter().find(|c| c.run.id == first.run.id).unwrap();
    assert_eq!(
        store.admit_run(&other, &capped).await.unwrap(),
        Admission::LaneFull
    );
    store
        .finish_attempt(
            &held.run.id,
            1,
            &worker_b,
            &finish(AttemptOutcome::Succeeded, Some(0)),
        )
        .await
        .unwrap();
    assert!(matches!(
        store.admit_run(&other, &capped).await.unwrap(),
        Admission::Accepted(_)
    ));
}

// ---- claims -------------------------------------------------------------------------------

pub async fn concurrent_claims_hand_each_run_to_one_worker(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = fx.store.clone();
    let mut ids = BTreeSet::new();
    for _ in 0..25 {
        ids.insert(create(&store, &spec()).await);
    }
    let mut workers = Vec::new();
    for _ in 0..20 {
        workers.push(register(&store, 2.0).await);
    }
    let tasks: Vec<_> = workers
        .iter()
        .cloned()
        .map(|worker_id| {
            let store = store.clone();
            tokio::spawn(async move {
                let claimed = store.claim_runs(&worker_id, &limits(2)).await.unwrap();
                (worker_id, claimed)
            })
        })
        .collect();
    let mut holder: BTreeMap<String, String> = BTreeMap::new();
    for task in tasks {
        let (worker_id, claimed) = task.await.unwrap();
        assert!(claimed.len() <= 2);
        for c in claimed {
            assert_eq!(c.attempt, 1);
            assert_eq!(c.run.worker_id.as_deref(), Some(worker_id.as_str()));
            if let Some(other) = holder.insert(c.run.id.clone(), worker_id.clone()) {
                panic!(
                    "run {} went to two workers: {other} and {worker_id}",
                    c.run.id
                );
            }
        }
    }
    // 40 slots for 25 runs: every run is claimed, each exactly once.
    let claimed: BTreeSet<String> = holder.keys().cloned().collect();
    assert_eq!(claimed, ids);
    for id in &ids {
        let attempts = store.list_attempts(id).await.unwrap();
        assert_eq!(attempts.len(), 1, "one attempt row per run");
        assert_eq!(attempts[0].worker_id, holder[id]);
        let events = all_events(&store, id).await;
        assert_eq!(
            kinds(&events),
            vec![EventKind::Status, EventKind::Status, EventKind::Attempt]
        );
    }
}

pub async fn claims_are_first_in_first_out_within_a_lane(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let mut ids = Vec::new();
    for i in 0..6 {
        let lane = if i % 3 == 0 { "other" } else { "default" };
        ids.push(create(store, &spec_with(|r| r.lane = Some(lane.into()))).await);
    }
    let worker_id = store
        .register_worker(&worker(16.0, &["default"]))
        .await
        .unwrap()
        .id;
    let mut order = Vec::new();
    for _ in 0..5 {
        for c in store.claim_runs(&worker_id, &limits(1)).await.unwrap() {
            order.push(c.run.id);
        }
    }
    let default_lane: Vec<String> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(
        order, default_lane,
        "oldest first, and only the worker's lanes"
    );
    for (i, id) in ids.iter().enumerate() {
        if i % 3 == 0 {
            assert_eq!(status(store, id).await, RunStatus::Pending);
        }
    }
}

pub async fn claims_stay_within_worker_capacity(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    for _ in 0..6 {
        create(store, &spec()).await;
    }
    let worker_id = register(store, 4.0).await;
    let first = store.claim_runs(&worker_id, &limits(10)).await.unwrap();
    assert_eq!(first.len(), 4, "four 1-cpu runs fill a 4-cpu worker");
    assert!(store
        .claim_runs(&worker_id, &limits(10))
        .await
        .unwrap()
        .is_empty());

    // Finishing one frees its room.
    let done = &first[0];
    store
        .finish_attempt(
            &done.run.id,
            done.attempt,
            &worker_id,
            &finish(AttemptOutcome::Succeeded, Some(0)),
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .claim_runs(&worker_id, &limits(10))
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(store
        .claim_runs(&worker_id, &limits(10))
        .await
        .unwrap()
        .is_empty());
}

pub async fn a_run_too_big_is_skipped_without_blocking_smaller_ones(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let big = create(
        store,
        &spec_with(|r| {
            r.resources = Some(Resources {
                cpus: 4.0,
                memory_mb: 256,
            })
        }),
    )
    .await;
    let small_a = create(store, &spec()).await;
    let small_b = create(store, &spec()).await;
    let worker_id = register(store, 2.0).await;
    let claimed: Vec<String> = store
        .claim_runs(&worker_id, &limits(10))
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.run.id)
        .collect();
    assert_eq!(claimed, vec![small_a, small_b]);
    let big_run = store.get_run(&big).await.unwrap().unwrap();
    assert_eq!(big_run.status, RunStatus::Pending);
    assert_eq!(big_run.queue_position, Some(1));
}

pub async fn claims_respect_lane_max_concurrency(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    for _ in 0..4 {
        create(store, &spec_with(|r| r.lane = Some("builds".into()))).await;
    }
    let other = create(store, &spec()).await;
    let lane_limits = ClaimLimits {
        max_runs: 10,
        lane_max_concurrency: BTreeMap::from([("builds".to_string(), 2)]),
        worker_fresh_ms: 0,
    };
    let w1 = register(store, 8.0).await;
    let w2 = register(store, 8.0).await;
    let first = store.claim_runs(&w1, &lane_limits).await.unwrap();
    let builds = first.iter().filter(|c| c.run.spec.lane == "builds").count();
    assert_eq!(builds, 2, "the lane's ceiling holds within one claim");
    assert!(
        first.iter().any(|c| c.run.id == other),
        "other lanes are not held back"
    );
    assert!(
        store
            .claim_runs(&w2, &lane_limits)
            .await
            .unwrap()
            .is_empty(),
        "the lane's ceiling holds across workers"
    );
}

/// A claim is not a heartbeat, and a worker whose heartbeat went stale gets nothing: a frozen
/// worker's long-poll must not take runs it will never start.
pub async fn a_worker_with_a_stale_heartbeat_is_handed_nothing(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let run = create(store, &spec()).await;
    let worker_id = register(store, 1.0).await;
    let fresh_only = ClaimLimits {
        worker_fresh_ms: 150,
        ..limits(1)
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(store
        .claim_runs(&worker_id, &fresh_only)
        .await
        .unwrap()
        .is_empty());
    // Claiming did not make it look alive.
    assert!(store
        .claim_runs(&worker_id, &fresh_only)
        .await
        .unwrap()
        .is_empty());
    store.heartbeat(&worker_id, &[]).await.unwrap();
    let claimed = store.claim_runs(&worker_id, &fresh_only).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].run.id, run);
}

/// Lane loads are counted from the runs: pending, in flight, and what the in-flight reserve.
pub async fn lane_loads_count_pending_and_in_flight_runs(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    for _ in 0..3 {
        create(store, &spec()).await;
    }
    create(store, &spec_with(|r| r.lane = Some("builds".into()))).await;
    let worker = register(store, 2.0).await;
    let claimed = store.claim_runs(&worker, &limits(2)).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let loads = store.lane_loads().await.unwrap();
    let lane = |name: &str| loads.iter().find(|l| l.lane == name).cloned().unwrap();
    let total_in_flight: i64 = loads.iter().map(|l| l.in_flight).sum();
    let total_pending: i64 = loads.iter().map(|l| l.pending).sum();
    assert_eq!((total_in_flight, total_pending), (2, 2));
    let reserved: f64 = loads.iter().map(|l| l.reserved.cpus).sum();
    assert!((reserved - 2.0).abs() < 1e-9);
    assert_eq!(lane("default").pending + lane("default").in_flight, 3);
    assert_eq!(lane("builds").pending + lane("builds").in_flight, 1);
    assert_eq!(loads.iter().map(|l| l.running).sum::<i64>(), 0);
    let started = &claimed[0].run;
    store
        .start_attempt(&started.id, 1, &worker)
        .await
        .expect("start_attempt");
    let loads = store.lane_loads().await.unwrap();
    let lane = |name: &str| loads.iter().find(|l| l.lane == name).cloned().unwrap();
    assert_eq!(
        lane(&started.spec.lane).running,
        1,
        "a started run is running"
    );
    assert_eq!(loads.iter().map(|l| l.running).sum::<i64>(), 1);
    // The oldest pending run of a lane is the earliest accepted one still waiting.
    for load in &loads {
        let pending = store
            .list_runs(&RunFilter {
                status: Some(RunStatus::Pending),
                lane: Some(load.lane.clone()),
                limit: 500,
                ..RunFilter::default()
            })
            .await
            .unwrap();
        let oldest = pending.runs.iter().map(|r| r.created_at).min();
        assert_eq!(load.oldest_pending_at, oldest, "lane {}", load.lane);
    }
    assert!(loads.iter().any(|l| l.oldest_pending_at.is_some()));
}

/// `events_before` pages a run's events backwards, newest first, so a long log is read from its
/// tail without loading its head.
pub async fn events_before_reads_a_log_backwards_from_its_tail(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (run_id, worker_id) = claimed_run(store, &spec()).await;
    store.start_attempt(&run_id, 1, &worker_id).await.unwrap();
    let lines: Vec<OutputChunk> = (0..10)
        .map(|i| chunk(OutputStream::Stdout, format!("line {i}\n").as_bytes()))
        .collect();
    store
        .append_output(&run_id, 1, &worker_id, &lines)
        .await
        .unwrap();
    let last = store
        .get_run(&run_id)
        .await
        .unwrap()
        .unwrap()
        .last_event_seq;
    let newest = store.events_before(&run_id, i64::MAX, 3).await.unwrap();
    let seqs: Vec<i64> = newest.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![last, last - 1, last - 2], "newest first");
    assert_eq!(newest[0].data.as_deref(), Some(&b"line 9\n"[..]));
    let earlier = store.events_before(&run_id, last - 2, 1000).await.unwrap();
    assert_eq!(earlier.len() as i64, last - 3, "everything before, once");
    assert_eq!(earlier.last().map(|e| e.seq), Some(1));
    assert!(store
        .events_before(&run_id, 1, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .events_before("no-such-run", i64::MAX, 10)
        .await
        .unwrap()
        .is_empty());
}

/// A draining worker keeps what it holds (and its heartbeats count) but is handed nothing new.
pub async fn a_draining_worker_is_handed_nothing_new(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (held, worker_id) = claimed_run(store, &spec()).await;
    create(store, &spec()).await;
    store.set_worker_draining(&worker_id).await.unwrap();
    let listed = store.list_workers().await.unwrap();
    let me = listed.iter().find(|w| w.id == worker_id).unwrap();
    assert!(me.draining);
    assert_eq!(me.runs, vec![(held.clone(), 1)]);
    assert!(store
        .claim_runs(&worker_id, &limits(4))
        .await
        .unwrap()
        .is_empty());
    let beat = RunBeat {
        run_id: held.clone(),
        attempt: 1,
        stdout_bytes: 0,
        stderr_bytes: 0,
        since_last_output_s: None,
    };
    let answer = store.heartbeat(&worker_id, &[beat]).await.unwrap();
    assert!(
        answer.not_owned.is_empty(),
        "a draining worker still holds its run"
    );
    assert_err(
        store.set_worker_draining("no-such-worker").await,
        is_unknown_worker,
        "draining an unknown worker",
    );
}

/// Callers dropped at any point of a write (a client that hung up) leave the store whole:
/// each run exists with its first event or not at all, and the next write works.
pub async fn writes_survive_callers_dropped_mid_transaction(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = fx.store.clone();
    for i in 0..300u64 {
        let store = store.clone();
        let task = tokio::spawn(async move { store.create_run(&spec()).await });
        // Abort after a varying delay: some before BEGIN, some inside it, some after.
        std::thread::sleep(Duration::from_micros((i * 7) % 400));
        task.abort();
        let _ = task.await;
    }
    let after = create(&store, &spec()).await;
    let page = store
        .list_runs(&RunFilter {
            limit: 500,
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert!(page.runs.iter().any(|r| r.id == after));
    for run in &page.runs {
        assert_eq!(run.status, RunStatus::Pending);
        assert_eq!(
            all_events(&store, &run.id).await.len(),
            1,
            "a run without its first event"
        );
    }
}

/// The hash a worker registered with reads back while it is registered; an unknown or
/// deregistered worker has none to read.
pub async fn a_worker_s_secret_hash_is_kept_while_it_is_registered(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let with = store
        .register_worker(&NewWorker {
            secret_hash: Some("ab12".into()),
            ..worker(1.0, &[])
        })
        .await
        .unwrap();
    let without = register(store, 1.0).await;
    assert_eq!(
        store.worker_secret_hash(&with.id).await.unwrap().as_deref(),
        Some("ab12")
    );
    assert_eq!(store.worker_secret_hash(&without).await.unwrap(), None);
    assert_err(
        store.worker_secret_hash("no-such-worker").await,
        is_unknown_worker,
        "secret of an unknown worker",
    );
    store.deregister_worker(&with.id).await.unwrap();
    assert_err(
        store.worker_secret_hash(&with.id).await,
        is_unknown_worker,
        "secret of a deregistered worker",
    );
}

pub async fn unknown_and_deregistered_workers_are_refused(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    create(store, &spec()).await;
    assert_err(
        store.claim_runs("no-such-worker", &limits(1)).await,
        is_unknown_worker,
        "claim by an unknown worker",
    );
    assert_err(
        store.heartbeat("no-such-worker", &[]).await,
        is_unknown_worker,
        "heartbeat by an unknown worker",
    );
    assert_err(
        store.deregister_worker("no-such-worker").await,
        is_unknown_worker,
        "deregister an unknown worker",
    );
    let worker_id = register(store, 1.0).await;
    assert!(store
        .deregister_worker(&worker_id)
        .await
        .unwrap()
        .is_empty());
    assert_err(
        store.claim_runs(&worker_id, &limits(1)).await,
        is_unknown_worker,
        "claim by a deregistered worker",
    );
    assert_err(
        store.heartbeat(&worker_id, &[]).await,
        is_unknown_worker,
        "heartbeat by a deregistered worker",
    );
    assert!(store.list_workers().await.unwrap().is_empty());
}

// ---- attempts -----------------------------------------------------------------------------

pub async fn a_run_goes_from_pending_to_succeeded_with_events_in_order(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (run_id, worker_id) = claimed_run(store, &spec()).await;
    let claimed = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(claimed.status, RunStatus::Claimed);
    assert_eq!(claimed.attempt, 1);
    assert!(claimed.claimed_at.is_some());
    assert_eq!(
        claimed.last_heartbeat_at, claimed.claimed_at,
        "a claim stamps the heartbeat at once"
    );

    let started = store.start_attempt(&run_id, 1, &worker_id).await.unwrap();
    assert_eq!(started.status, RunStatus::Running);
    assert!(started.started_at.is_some());

    let outcome = store
        .append_output(
            &run_id,
            1,
            &worker_id,
            &[
                chunk(OutputStream::Stdout, b"hello\n"),
                chunk(OutputStream::Stderr, b"warn\n"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        outcome,
        AppendOutcome::Accepted {
            last_seq: 6,
            offsets: StreamOffsets {
                stdout: 6,
                stderr: 5
            }
        }
    );

    let done = store
        .finish_attempt(
            &run_id,
            1,
            &worker_id,
            &finish(AttemptOutcome::Succeeded, Some(0)),
        )
        .await
        .unwrap();
    assert_eq!(done.status, RunStatus::Succeeded);
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(done.error_code, None);
    assert_eq!(done.worker_id, None);
    assert!(done.finished_at.is_some());
    assert!(done.last_output_at.is_some());
    assert_eq!((done.stdout_bytes, done.stderr_bytes), (6, 5));
    assert_eq!(done.last_event_seq, 8);

    let events = all_events(store, &run_id).await;
    assert_eq!(
        kinds(&events),
        vec![
            EventKind::Status,
            EventKind::Status,
            EventKind::Attempt,
            EventKind::Status,
            EventKind::Log,
            EventKind::Log,
            EventKind::Status,
            EventKind::End,
        ]
    );
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>(), "seq rises by one");
    let statuses: Vec<String> = events.iter().filter_map(status_of).collect();
    assert_eq!(
        statuses,
        vec!["pending", "claimed", "running", "succeeded", "succeeded"]
    );
    assert_eq!(
        events[2].body["worker_id"].as_str(),
        Some(worker_id.as_str())
    );
    assert_eq!(events[2].body["attempt"].as_u64(), Some(1));
    assert_eq!(events[4].body["stream"].as_str(), Some("stdout"));
    assert_eq!(events[4].data.as_deref(), Some(&b"hello\n"[..]));
    assert_eq!(events[5].body["stream"].as_str(), Some("stderr"));
    assert_eq!(events[7].body["exit_code"].as_i64(), Some(0));
    let tail = store.events_after(&run_id, 6, 100).await.unwrap();
    assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![7, 8]);

    let attempts = store.list_attempts(&run_id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status, Some(RunStatus::Succeeded));
    assert_eq!(
        attempts[0].worker_name.as_deref(),
        Some("test-worker"),
        "an attempt names its worker"
    );
    assert_eq!(attempts[0].exit_code, Some(0));
    assert!(attempts[0].started_at.is_some() && attempts[0].finished_at.is_some());
}

pub async fn old_attempts_and_other_workers_are_fenced(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (run_id, w1) = claimed_run(store, &spec()).await;
    let w2 = register(store, 1.0).await;
    let before = all_events(store, &run_id).await.len();

    // Another worker, or an attempt that never was, changes nothing.
    assert_err(
        store.start_attempt(&run_id, 1, &w2).await,
        is_stale,
        "start by another worker",
    );
    assert_err(
        store.start_attempt(&run_id, 2, &w1).await,
        is_stale,
        "start of a future attempt",
    );
    assert_err(
        store
            .append_output(&run_id, 1, &w2, &[chunk(OutputStream::Stdout, b"x")])
            .await,
        is_stale,
        "append by another worker",
    );
    assert_err(
        store
            .finish_attempt(&run_id, 1, &w2, &finish(AttemptOutcome::Succeeded, Some(0)))
            .await,
        is_stale,
        "finish by another worker",
    );
    let answer = store.heartbeat(&w2, &[beat(&run_id, 1)]).await.unwrap();
    assert_eq!(
        answer.not_owned,
        vec![RunRef {
            run_id: run_id.clone(),
            attempt: 1
        }]
    );
    assert_eq!(all_events(store, &run_id).await.len(), before);
    assert_eq!(status(store, &run_id).await, RunStatus::Claimed);

    // The run is handed back and claimed again: attempt 1 is now a zombie.
    store.deregister_worker(&w1).await.unwrap();
    let again = store.claim_runs(&w2, &limits(1)).await.unwrap();
    assert_eq!(again[0].attempt, 2);
    let before = all_events(store, &run_id).await.len();
    assert_err(
        store.start_attempt(&run_id, 1, &w1).await,
        is_stale,
        "zombie start",
    );
    assert_err(
        store
            .append_output(&run_id, 1, &w1, &[chunk(OutputStream::Stdout, b"late")])
            .await,
        is_stale,
        "zombie append",
    );
    assert_err(
        store
            .finish_attempt(&run_id, 1, &w1, &finish(AttemptOutcome::Succeeded, Some(0)))
            .await,
        is_stale,
        "zombie finish",
    );
    let answer = store.heartbeat(&w2, &[beat(&run_id, 1)]).await.unwrap();
    assert_eq!(answer.not_owned.len(), 1, "the old attempt is not owned");
    assert_eq!(all_events(store, &run_id).await.len(), before);
    let run = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!((run.status, run.attempt), (RunStatus::Claimed, 2));
    assert_eq!(run.stdout_bytes, 0);
    store.start_attempt(&run_id, 2, &w2).await.unwrap();
}

pub async fn terminal_runs_never_change(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (run_id, worker_id) = claimed_run(store, &spec()).await;
    store.start_attempt(&run_id, 1, &worker_id).await.unwrap();
    store
        .finish_attempt(
            &run_id,
            1,
            &worker_id,
            &finish(
                AttemptOutcome::Failed {
                    error_code: ErrorCode::ExitNonzero,
                },
                Some(3),
            ),
        )
        .await
        .unwrap();
    let before = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(before.status, RunStatus::Failed);
    assert_eq!(before.error_code, Some(ErrorCode::ExitNonzero));
    assert_eq!(before.exit_code, Some(3));
    let events_before = all_events(store, &run_id).await;

    assert_err(
        store.request_cancel(&run_id).await,
        is_terminal,
        "cancel of a terminal run",
    );
    assert_err(
        store
            .finish_attempt(
                &run_id,
                1,
                &worker_id,
                &finish(AttemptOutcome::Succeeded, Some(0)),
            )
            .await,
        is_stale,
        "finish of a terminal run",
    );
    assert_err(
        store.start_attempt(&run_id, 1, &worker_id).await,
        is_stale,
        "start",
    );
    assert_err(
        store
            .append_output(&run_id, 1, &worker_id, &[chunk(OutputStream::Stdout, b"x")])
            .await,
        is_stale,
        "append",
    );
    assert!(store
        .claim_runs(&worker_id, &limits(5))
        .await
        .unwrap()
        .is_empty());
    let answer = store
        .heartbeat(&worker_id, &[beat(&run_id, 1)])
        .await
        .unwrap();
    assert_eq!(answer.not_owned.len(), 1);
    assert!(store
        .reap_stale_runs(&quick_policy())
        .await
        .unwrap()
        .reaped
        .is_empty());

    let after = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(after, before);
    assert_eq!(all_events(store, &run_id).await, events_before);
}

pub async fn cancel_of_pending_is_immediate_and_it_is_never_claimed(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let run_id = create(store, &spec()).await;
    let cancelled = store.request_cancel(&run_id).await.unwrap();
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    assert_eq!(cancelled.error_code, Some(ErrorCode::Cancelled));
    assert!(cancelled.finished_at.is_some());
    assert!(cancelled.cancel_requested_at.is_some());
    assert_eq!(cancelled.queue_position, None);
    let events = all_events(store, &run_id).await;
    assert_eq!(
        kinds(&events),
        vec![EventKind::Status, EventKind::Status, EventKind::End]
    );
    assert_eq!(status_of(&events[1]).as_deref(), Some("cancelled"));
    assert_eq!(events[1].body["error_code"].as_str(), Some("cancelled"));

    let worker_id = register(store, 4.0).await;
    assert!(store
        .claim_runs(&worker_id, &limits(5))
        .await
        .unwrap()
        .is_empty());
    assert_err(
        store.request_cancel(&run_id).await,
        is_terminal,
        "a second cancel",
    );
    assert_err(
        store.request_cancel("no-such-run").await,
        |e| matches!(e, StoreError::NotFound),
        "cancel of an unknown run",
    );
    assert!(store.list_attempts(&run_id).await.unwrap().is_empty());
}

pub async fn cancel_of_in_flight_reaches_the_worker_at_its_heartbeat(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (run_id, worker_id) = claimed_run(store, &spec()).await;
    store.start_attempt(&run_id, 1, &worker_id).await.unwrap();
    let answer = store
        .heartbeat(&worker_id, &[beat(&run_id, 1)])
        .await
        .unwrap();
    assert!(answer.cancel.is_empty() && answer.not_owned.is_empty());

    let flagged = store.request_cancel(&run_id).await.unwrap();
    assert_eq!(
        flagged.status,
        RunStatus::Running,
        "the worker stops it, not the store"
    );
    assert!(flagged.cancel_requested_at.is_some());
    // Asking twice is fine.
    store.request_cancel(&run_id).await.unwrap();

    let answer = store
        .heartbeat(&worker_id, &[beat(&run_id, 1)])
        .await
        .unwrap();
    assert_eq!(
        answer.cancel,
        vec![RunRef {
            run_id: run_id.clone(),
            attempt: 1
        }]
    );
    assert!(answer.not_owned.is_empty());

    // However the process ended after a cancel, the run ends cancelled, never retried.
    let done = store
        .finish_attempt(
            &run_id,
            1,
            &worker_id,
            &finish(
                AttemptOutcome::TimedOut {
                    error_code: ErrorCode::WorkerHeartbeatLost,
                },
                Some(-15),
            ),
        )
        .await
        .unwrap();
    assert_eq!(done.status, RunStatus::Cancelled);
    assert_eq!(done.error_code, Some(ErrorCode::Cancelled));
    let attempts = store.list_attempts(&run_id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status, Some(RunStatus::Cancelled));
    let events = all_events(store, &run_id).await;
    assert_eq!(events.last().map(|e| e.kind), Some(EventKind::End));
}

pub async fn output_past_the_limit_ends_the_run_failed(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let limited = resolve_with(
        request(),
        &SubmitDefaults {
            output_limit_bytes: 10,
            ..defaults()
        },
    );
    let (run_id, worker_id) = claimed_run(store, &limited).await;
    store.start_attempt(&run_id, 1, &worker_id).await.unwrap();
    let first = store
        .append_output(
            &run_id,
            1,
            &worker_id,
            &[chunk(OutputStream::Stdout, b"abcdef")],
        )
        .await
        .unwrap();
    assert!(matches!(first, AppendOutcome::Accepted { .. }));
    let second = store
        .append_output(
            &run_id,
            1,
            &worker_id,
            &[
                chunk(OutputStream::Stdout, b"ghijklmn"),
                chunk(OutputStream::Stdout, b"never stored"),
            ],
        )
        .await
        .unwrap();
    let AppendOutcome::LimitReached { run } = second else {
        panic!("the limit was passed: {second:?}");
    };
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.error_code, Some(ErrorCode::OutputLimit));
    assert_eq!(run.stdout_bytes, 10);

    let events = all_events(store, &run_id).await;
    let logs: Vec<&EventRecord> = events.iter().filter(|e| e.kind == EventKind::Log).collect();
    assert_eq!(logs.len(), 3);
    assert_eq!(logs[0].data.as_deref(), Some(&b"abcdef"[..]));
    assert_eq!(logs[1].data.as_deref(), Some(&b"ghij"[..]));
    assert_eq!(logs[2].body["stream"].as_str(), Some("stderr"));
    let note = String::from_utf8_lossy(logs[2].data.as_deref().unwrap_or_default()).to_string();
    assert!(note.contains("output limit"), "the cut is noted: {note}");
    assert_eq!(
        kinds(&events[events.len() - 2..]),
        vec![EventKind::Status, EventKind::End]
    );
    let attempts = store.list_attempts(&run_id).await.unwrap();
    assert_eq!(attempts[0].status, Some(RunStatus::Failed));
    assert_eq!(attempts[0].error_code, Some(ErrorCode::OutputLimit));
    assert_err(
        store
            .append_output(&run_id, 1, &worker_id, &[chunk(OutputStream::Stdout, b"x")])
            .await,
        is_stale,
        "append after the run ended",
    );
}

pub async fn non_utf8_output_round_trips_exactly(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (run_id, worker_id) = claimed_run(store, &spec()).await;
    store.start_attempt(&run_id, 1, &worker_id).await.unwrap();
    let raw: Vec<u8> = vec![0xff, 0xfe, 0x00, b'a', 0xc3, 0x28, b'\n', 0x80];
    store
        .append_output(
            &run_id,
            1,
            &worker_id,
            &[
                chunk(OutputStream::Stdout, &raw),
                chunk(OutputStream::Stderr, &[0]),
            ],
        )
        .await
        .unwrap();
    let logs: Vec<EventRecord> = all_events(store, &run_id)
        .await
        .into_iter()
        .filter(|e| e.kind == EventKind::Log)
        .collect();
    assert_eq!(logs[0].data.as_deref(), Some(&raw[..]));
    assert_eq!(logs[1].data.as_deref(), Some(&[0u8][..]));
}

// ---- workers ------------------------------------------------------------------------------

pub async fn heartbeat_stamps_held_runs_and_names_the_rest_not_owned(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (run_id, worker_id) = claimed_run(store, &spec()).await;
    let claimed = store.get_run(&run_id).await.unwrap().unwrap();
    wait_past(store, claimed.claimed_at.unwrap_or_default()).await;
    let answer = store
        .heartbeat(
            &worker_id,
            &[
                RunBeat {
                    stdout_bytes: 12,
                    stderr_bytes: 3,
                    since_last_output_s: Some(1.5),
                    ..beat(&run_id, 1)
                },
                beat("no-such-run", 1),
            ],
        )
        .await
        .unwrap();
    assert!(answer.cancel.is_empty());
    assert_eq!(
        answer.not_owned,
        vec![RunRef {
            run_id: "no-such-run".into(),
            attempt: 1
        }]
    );
    let beaten = store.get_run(&run_id).await.unwrap().unwrap();
    assert!(beaten.last_heartbeat_at > claimed.last_heartbeat_at);
    assert_eq!(
        beaten.status,
        RunStatus::Claimed,
        "a heartbeat is not a start"
    );
    assert_eq!(
        beaten.last_event_seq, claimed.last_event_seq,
        "heartbeats write no events"
    );
    let workers = store.list_workers().await.unwrap();
    assert_eq!(workers.len(), 1);
    assert!(workers[0].last_heartbeat_at >= beaten.last_heartbeat_at.unwrap_or_default());

    // A repeated start is a no-op success.
    let started = store.start_attempt(&run_id, 1, &worker_id).await.unwrap();
    let again = store.start_attempt(&run_id, 1, &worker_id).await.unwrap();
    assert_eq!(again.status, RunStatus::Running);
    assert_eq!(again.started_at, started.started_at);
    assert_eq!(again.last_event_seq, started.last_event_seq);
}

pub async fn list_workers_shows_held_runs_and_reserved_resources(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    create(store, &spec()).await;
    create(store, &spec()).await;
    let registered = store
        .register_worker(&NewWorker {
            labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
            ..worker(4.0, &["default", "builds"])
        })
        .await
        .unwrap();
    assert!(registered.runs.is_empty());
    let idle = register(store, 1.0).await;
    let claimed = store.claim_runs(&registered.id, &limits(5)).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let workers = store.list_workers().await.unwrap();
    assert_eq!(workers.len(), 2);
    let busy = workers.iter().find(|w| w.id == registered.id).unwrap();
    assert_eq!(
        busy.lanes,
        vec!["default".to_string(), "builds".to_string()]
    );
    assert_eq!(busy.labels.get("zone").map(String::as_str), Some("a"));
    assert_eq!(busy.capacity.cpus, 4.0);
    let held: BTreeSet<&str> = busy.runs.iter().map(|(id, _)| id.as_str()).collect();
    let expected: BTreeSet<&str> = claimed.iter().map(|c| c.run.id.as_str()).collect();
    assert_eq!(held, expected);
    assert!(busy.runs.iter().all(|(_, attempt)| *attempt == 1));
    assert_eq!(busy.reserved.cpus, 2.0);
    assert_eq!(busy.reserved.memory_mb, 512);
    let quiet = workers.iter().find(|w| w.id == idle).unwrap();
    assert!(quiet.runs.is_empty());
    assert_eq!(quiet.reserved.cpus, 0.0);
}

// ---- the reaper ---------------------------------------------------------------------------

/// Sweeps until something is reaped.
async fn reap_until_some(store: &SharedStore, policy: &ReapPolicy) -> Vec<crate::ReapedRun> {
    poll("a sweep to reap something", || async {
        let report = store
            .reap_stale_runs(policy)
            .await
            .expect("reap_stale_runs");
        assert!(report.swept);
        (!report.reaped.is_empty()).then_some(report.reaped)
    })
    .await
}

pub async fn a_stale_run_is_retried_then_timed_out(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (run_id, w1) = claimed_run(store, &stale_after(200, 2)).await;
    // A heartbeat confirms the claim, so losing it afterwards is a lost heartbeat.
    store.heartbeat(&w1, &[beat(&run_id, 1)]).await.unwrap();

    let reaped = reap_until_some(store, &quick_policy()).await;
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].run_id, run_id);
    assert_eq!(reaped[0].attempt, 1);
    assert_eq!(reaped[0].error_code, ErrorCode::WorkerHeartbeatLost);
    assert_eq!(reaped[0].status_after, RunStatus::Pending);

    let retried = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(retried.status, RunStatus::Pending);
    assert_eq!(retried.attempt, 1, "the next claim takes attempt 2");
    assert_eq!(retried.worker_id, None);
    assert_eq!(retried.queue_position, Some(1));
    let attempts = store.list_attempts(&run_id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status, Some(RunStatus::TimedOut));
    assert_eq!(attempts[0].error_code, Some(ErrorCode::WorkerHeartbeatLost));
    assert!(attempts[0].finished_at.is_some());
    let events = all_events(store, &run_id).await;
    let last = events.last().unwrap();
    assert_eq!(last.kind, EventKind::Status);
    assert_eq!(status_of(last).as_deref(), Some("pending"));
    assert_eq!(
        last.body["error_code"].as_str(),
        Some("worker_heartbeat_lost")
    );

    // Attempt 2 goes the same way, and with no attempts left the run ends.
    let w2 = register(store, 1.0).await;
    let again = store.claim_runs(&w2, &limits(1)).await.unwrap();
    assert_eq!(again[0].attempt, 2);
    store.start_attempt(&run_id, 2, &w2).await.unwrap();
    let reaped = reap_until_some(store, &quick_policy()).await;
    assert_eq!(reaped[0].status_after, RunStatus::TimedOut);
    let ended = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(ended.status, RunStatus::TimedOut);
    assert_eq!(ended.error_code, Some(ErrorCode::WorkerHeartbeatLost));
    assert!(ended.finished_at.is_some());
    assert_eq!(store.list_attempts(&run_id).await.unwrap().len(), 2);
    let events = all_events(store, &run_id).await;
    assert_eq!(events.last().map(|e| e.kind), Some(EventKind::End));
}

pub async fn a_stale_run_with_one_attempt_ends_timed_out(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (run_id, worker_id) = claimed_run(store, &stale_after(200, 1)).await;
    store.start_attempt(&run_id, 1, &worker_id).await.unwrap();
    let reaped = reap_until_some(store, &quick_policy()).await;
    assert_eq!(reaped[0].error_code, ErrorCode::WorkerHeartbeatLost);
    assert_eq!(reaped[0].status_after, RunStatus::TimedOut);
    let run = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::TimedOut);
    assert_eq!(run.error_code, Some(ErrorCode::WorkerHeartbeatLost));
    assert_eq!(run.worker_id, None);
    let attempts = store.list_attempts(&run_id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status, Some(RunStatus::TimedOut));
    let events = all_events(store, &run_id).await;
    assert_eq!(
        kinds(&events[events.len() - 2..]),
        vec![EventKind::Status, EventKind::End]
    );
    assert_eq!(
        events.last().unwrap().body["error_code"].as_str(),
        Some("worker_heartbeat_lost")
    );
}

pub async fn a_claim_never_confirmed_ends_worker_claim_timeout(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (run_id, _worker) = claimed_run(store, &stale_after(200, 1)).await;
    let reaped = reap_until_some(store, &quick_policy()).await;
    assert_eq!(reaped[0].error_code, ErrorCode::WorkerClaimTimeout);
    let run = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::TimedOut, "max_attempts 1: no retry");
    assert_eq!(run.error_code, Some(ErrorCode::WorkerClaimTimeout));
}

pub async fn no_heartbeat_timeout_means_reaped_only_for_timeout(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let short = spec_with(|r| {
        r.heartbeat_timeout_s = Some(None);
        r.timeout_s = Some(0.3);
    });
    let long = spec_with(|r| {
        r.heartbeat_timeout_s = Some(None);
        r.timeout_s = Some(3600.0);
    });
    let short_id = create(store, &short).await;
    let long_id = create(store, &long).await;
    let worker_id = register(store, 2.0).await;
    assert_eq!(
        store
            .claim_runs(&worker_id, &limits(2))
            .await
            .unwrap()
            .len(),
        2
    );
    store.start_attempt(&short_id, 1, &worker_id).await.unwrap();
    // The long run is never started nor heartbeated: with no heartbeat timeout it still stays.

    let reaped = reap_until_some(store, &quick_policy()).await;
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].run_id, short_id);
    assert_eq!(reaped[0].error_code, ErrorCode::Timeout);
    assert_eq!(
        reaped[0].status_after,
        RunStatus::TimedOut,
        "a timeout is not retried"
    );
    let short_run = store.get_run(&short_id).await.unwrap().unwrap();
    assert_eq!(short_run.error_code, Some(ErrorCode::Timeout));

    let long_run = store.get_run(&long_id).await.unwrap().unwrap();
    let now = store.now().await.unwrap();
    assert!(now - long_run.claimed_at.unwrap_or(now) >= 300);
    assert_eq!(long_run.status, RunStatus::Claimed);
    assert!(store
        .reap_stale_runs(&quick_policy())
        .await
        .unwrap()
        .reaped
        .is_empty());
    let deadline = store.next_reap_deadline(&quick_policy()).await.unwrap();
    assert_eq!(
        deadline,
        long_run.claimed_at.map(|c| c + 3_600_000),
        "only its timeout is a deadline"
    );
}

pub async fn cancel_requested_with_the_worker_gone_ends_cancelled(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (run_id, worker_id) = claimed_run(store, &stale_after(60_000, 3)).await;
    store.start_attempt(&run_id, 1, &worker_id).await.unwrap();
    store.request_cancel(&run_id).await.unwrap();
    let policy = ReapPolicy {
        cancel_stale_after_ms: 150,
        ..quick_policy()
    };
    let reaped = reap_until_some(store, &policy).await;
    assert_eq!(reaped[0].run_id, run_id);
    assert_eq!(reaped[0].status_after, RunStatus::Cancelled);
    let run = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Cancelled);
    assert_eq!(run.error_code, Some(ErrorCode::Cancelled));
    let attempts = store.list_attempts(&run_id).await.unwrap();
    assert_eq!(attempts.len(), 1, "not retried");
    assert_eq!(attempts[0].status, Some(RunStatus::Cancelled));
}

pub async fn concurrent_sweeps_retry_each_stale_run_once(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = fx.store.clone();
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(create(&store, &stale_after(200, 3)).await);
    }
    let worker_id = register(&store, 8.0).await;
    assert_eq!(
        store
            .claim_runs(&worker_id, &limits(10))
            .await
            .unwrap()
            .len(),
        6
    );
    let beats: Vec<RunBeat> = ids.iter().map(|id| beat(id, 1)).collect();
    store.heartbeat(&worker_id, &beats).await.unwrap();
    let mut latest_stale = 0;
    for id in &ids {
        let run = store.get_run(id).await.unwrap().unwrap();
        latest_stale = latest_stale.max(run.last_heartbeat_at.unwrap_or_default() + 200);
    }
    wait_past(&store, latest_stale).await;

    let sweeps: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.reap_stale_runs(&quick_policy()).await.unwrap() })
        })
        .collect();
    let mut reaped = Vec::new();
    for sweep in sweeps {
        reaped.extend(sweep.await.unwrap().reaped);
    }
    let reaped_ids: BTreeSet<&str> = reaped.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(
        reaped.len(),
        6,
        "each stale run reaped by exactly one sweep"
    );
    assert_eq!(reaped_ids.len(), 6);

    let mut events_before = BTreeMap::new();
    for id in &ids {
        let run = store.get_run(id).await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Pending);
        let attempts = store.list_attempts(id).await.unwrap();
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].error_code, Some(ErrorCode::WorkerHeartbeatLost));
        let events = all_events(&store, id).await;
        let back_to_pending = events
            .iter()
            .filter(|e| e.kind == EventKind::Status && status_of(e).as_deref() == Some("pending"))
            .count();
        assert_eq!(back_to_pending, 2, "created, then retried once");
        events_before.insert(id.clone(), events.len());
    }

    // Sweeping again changes nothing.
    assert!(store
        .reap_stale_runs(&quick_policy())
        .await
        .unwrap()
        .reaped
        .is_empty());
    for id in &ids {
        assert_eq!(all_events(&store, id).await.len(), events_before[id]);
        assert_eq!(store.list_attempts(id).await.unwrap().len(), 1);
    }
}

pub async fn deregister_hands_runs_back_at_once(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let a = create(store, &spec()).await;
    let b = create(store, &spec_with(|r| r.max_attempts = Some(1))).await;
    let worker_id = register(store, 2.0).await;
    assert_eq!(
        store
            .claim_runs(&worker_id, &limits(2))
            .await
            .unwrap()
            .len(),
        2
    );
    store.start_attempt(&a, 1, &worker_id).await.unwrap();

    let handed_back: BTreeSet<String> = store
        .deregister_worker(&worker_id)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(handed_back, BTreeSet::from([a.clone(), b.clone()]));
    let run_a = store.get_run(&a).await.unwrap().unwrap();
    assert_eq!(run_a.status, RunStatus::Pending, "retried: attempts remain");
    let run_b = store.get_run(&b).await.unwrap().unwrap();
    assert_eq!(run_b.status, RunStatus::TimedOut, "no attempts left");
    assert_eq!(run_b.error_code, Some(ErrorCode::WorkerHeartbeatLost));
    let attempts = store.list_attempts(&a).await.unwrap();
    assert_eq!(attempts[0].status, Some(RunStatus::TimedOut));
    assert_eq!(attempts[0].error_code, Some(ErrorCode::WorkerHeartbeatLost));
    assert!(store.list_workers().await.unwrap().is_empty());
    assert_err(
        store.heartbeat(&worker_id, &[beat(&a, 1)]).await,
        is_unknown_worker,
        "heartbeat after deregistering",
    );
    let other = register(store, 2.0).await;
    let again = store.claim_runs(&other, &limits(2)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].run.id.as_str(), again[0].attempt),
        (a.as_str(), 2)
    );
}

pub async fn next_reap_deadline_is_the_earliest_deadline(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let policy = ReapPolicy::default();
    assert_eq!(store.next_reap_deadline(&policy).await.unwrap(), None);
    let soon = create(store, &stale_after(2_000, 3)).await;
    let later = create(store, &stale_after(9_000, 3)).await;
    // Pending runs are never reaped.
    assert_eq!(store.next_reap_deadline(&policy).await.unwrap(), None);
    let worker_id = register(store, 2.0).await;
    store.claim_runs(&worker_id, &limits(2)).await.unwrap();
    let soon_run = store.get_run(&soon).await.unwrap().unwrap();
    let claimed_at = soon_run.claimed_at.unwrap();
    assert_eq!(
        store.next_reap_deadline(&policy).await.unwrap(),
        Some(claimed_at + 2_000)
    );
    // A heartbeat moves the deadline on.
    wait_past(store, claimed_at).await;
    store
        .heartbeat(&worker_id, &[beat(&soon, 1)])
        .await
        .unwrap();
    let beaten = store.get_run(&soon).await.unwrap().unwrap();
    let hb = beaten.last_heartbeat_at.unwrap();
    assert!(hb > claimed_at);
    assert_eq!(
        store.next_reap_deadline(&policy).await.unwrap(),
        Some(hb + 2_000)
    );
    // Ending it leaves the other run's deadline.
    store
        .finish_attempt(
            &soon,
            1,
            &worker_id,
            &finish(AttemptOutcome::Succeeded, Some(0)),
        )
        .await
        .unwrap();
    let later_run = store.get_run(&later).await.unwrap().unwrap();
    assert_eq!(
        store.next_reap_deadline(&policy).await.unwrap(),
        later_run.claimed_at.map(|c| c + 9_000)
    );
}

pub async fn signals_are_delivered_after_commit(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let mut signals = store.subscribe();
    let run_id = create(store, &spec_with(|r| r.lane = Some("builds".into()))).await;
    let mut wanted = vec![
        Signal::RunPending {
            lane: "builds".into(),
        },
        Signal::RunEvents {
            run_id: run_id.clone(),
            seq: 1,
        },
    ];
    let deadline = Instant::now() + PATIENCE;
    while !wanted.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let signal = tokio::time::timeout(left, signals.recv())
            .await
            .expect("signals arrive in time")
            .expect("the channel is open");
        wanted.retain(|w| *w != signal);
    }

    let worker_id = register(store, 1.0).await;
    store.claim_runs(&worker_id, &limits(1)).await.unwrap();
    store.start_attempt(&run_id, 1, &worker_id).await.unwrap();
    let AppendOutcome::Accepted { last_seq, .. } = store
        .append_output(
            &run_id,
            1,
            &worker_id,
            &[chunk(OutputStream::Stdout, b"hi\n")],
        )
        .await
        .unwrap()
    else {
        panic!("accepted");
    };
    let expected = Signal::RunEvents {
        run_id: run_id.clone(),
        seq: last_seq,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let signal = tokio::time::timeout(left, signals.recv())
            .await
            .expect("the append's signal arrives in time")
            .expect("the channel is open");
        if let Signal::RunEvents { run_id: id, seq } = &signal {
            // Delivered after commit: whatever a signal names can already be read.
            let stored = store.events_after(id, 0, 10_000).await.unwrap();
            assert!(
                stored.iter().any(|e| e.seq == *seq),
                "signalled seq {seq} is stored"
            );
        }
        if signal == expected {
            break;
        }
    }
}

// ---- endpoints (SPEC §5) --------------------------------------------------------------------

fn pool(name: &str, fallback: &str, freshness_ms: i64) -> crate::NewPool {
    crate::NewPool {
        name: name.into(),
        fallback_url: Some(fallback.into()),
        freshness_ms,
    }
}

fn probed(name: &str, pool: &str) -> crate::NewEndpoint {
    crate::NewEndpoint {
        name: name.into(),
        pool: pool.into(),
        url: format!("http://{name}.internal"),
        readiness_url: Some(format!("http://{name}.internal/ready")),
        kind: tether_domain::EndpointKind::Probed,
    }
}

async fn endpoint(store: &SharedStore, name: &str) -> Option<crate::EndpointRecord> {
    store
        .list_endpoints()
        .await
        .expect("list_endpoints")
        .into_iter()
        .find(|e| e.name == name)
}

pub async fn pools_from_config_never_override_pools_set_through_the_api(h: &dyn Harness) {
    use crate::PoolSource;
    let fx = h.fresh().await;
    let store = &fx.store;
    let p = store
        .upsert_pool(&pool("cache", "http://a", 1_000), PoolSource::Config)
        .await
        .unwrap();
    assert_eq!((p.source, p.freshness_ms), (PoolSource::Config, 1_000));
    // Another server's config: config over config lands.
    let p = store
        .upsert_pool(&pool("cache", "http://b", 2_000), PoolSource::Config)
        .await
        .unwrap();
    assert_eq!(p.fallback_url.as_deref(), Some("http://b"));
    let p = store
        .upsert_pool(&pool("cache", "http://api", 3_000), PoolSource::Api)
        .await
        .unwrap();
    assert_eq!((p.source, p.freshness_ms), (PoolSource::Api, 3_000));
    // A server restarting with its config file leaves the API's settings alone.
    let p = store
        .upsert_pool(&pool("cache", "http://c", 4_000), PoolSource::Config)
        .await
        .unwrap();
    assert_eq!(p.fallback_url.as_deref(), Some("http://api"));
    assert_eq!(p.freshness_ms, 3_000);
    store
        .upsert_pool(&pool("other", "http://o", 5_000), PoolSource::Config)
        .await
        .unwrap();
    let names: Vec<String> = store
        .list_pools()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["cache", "other"]);
}

pub async fn endpoints_register_replace_and_delete(h: &dyn Harness) {
    use crate::{EndpointSaved, PoolSource, ProbeOutcome};
    let fx = h.fresh().await;
    let store = &fx.store;
    assert_eq!(
        store.upsert_endpoint(&probed("a", "nope")).await.unwrap(),
        EndpointSaved::UnknownPool
    );
    assert!(store.list_endpoints().await.unwrap().is_empty());
    store
        .upsert_pool(&pool("cache", "http://fb", 60_000), PoolSource::Config)
        .await
        .unwrap();
    let EndpointSaved::Created(created) =
        store.upsert_endpoint(&probed("a", "cache")).await.unwrap()
    else {
        panic!("created");
    };
    assert_eq!(created.revision, 1);
    assert_eq!(created.last_ready_at, None, "never probed: no stamp");

    let claims = store.claim_due_probes(60_000, 100).await.unwrap();
    assert_eq!(claims.len(), 1);
    assert!(store
        .record_probe(&claims[0], &ProbeOutcome::Ready)
        .await
        .unwrap());
    let stamped = endpoint(store, "a").await.unwrap().last_ready_at;
    assert!(stamped.is_some());

    // The same definition again changes nothing: the stamp stays.
    let EndpointSaved::Updated(same) = store.upsert_endpoint(&probed("a", "cache")).await.unwrap()
    else {
        panic!("updated");
    };
    assert_eq!((same.revision, same.last_ready_at), (1, stamped));

    // A new URL is a new definition: the old stamp does not vouch for it.
    let mut moved = probed("a", "cache");
    moved.url = "http://elsewhere".into();
    let EndpointSaved::Updated(changed) = store.upsert_endpoint(&moved).await.unwrap() else {
        panic!("updated");
    };
    assert_eq!(changed.revision, 2);
    assert_eq!(changed.last_ready_at, None);
    assert_eq!(changed.url, "http://elsewhere");

    assert!(store.delete_endpoint("a").await.unwrap());
    assert!(!store.delete_endpoint("a").await.unwrap());
    assert!(endpoint(store, "a").await.is_none());
}

pub async fn probes_are_claimed_once_per_interval_across_callers(h: &dyn Harness) {
    use crate::PoolSource;
    let fx = h.fresh().await;
    let store = &fx.store;
    store
        .upsert_pool(&pool("cache", "http://fb", 60_000), PoolSource::Config)
        .await
        .unwrap();
    for name in ["a", "b", "c"] {
        store.upsert_endpoint(&probed(name, "cache")).await.unwrap();
    }
    let mut always = probed("d", "cache");
    always.kind = tether_domain::EndpointKind::AlwaysReady;
    store.upsert_endpoint(&always).await.unwrap();

    // Several servers ask at once: each probed endpoint goes to exactly one of them, and the
    // always-ready one to none.
    let interval = 400;
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.claim_due_probes(interval, 100).await.unwrap() })
        })
        .collect();
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap().into_iter().map(|c| c.endpoint));
    }
    claimed.sort();
    assert_eq!(claimed, ["a", "b", "c"]);
    let first = store.now().await.unwrap();
    assert!(
        store
            .claim_due_probes(interval, 100)
            .await
            .unwrap()
            .is_empty(),
        "not due again within the interval"
    );
    wait_past(store, first + interval).await;
    assert_eq!(store.claim_due_probes(interval, 2).await.unwrap().len(), 2);
    assert_eq!(
        store.claim_due_probes(interval, 100).await.unwrap().len(),
        1
    );
}

pub async fn probe_results_stamp_only_ready_answers_for_the_current_claim(h: &dyn Harness) {
    use crate::{PoolSource, ProbeOutcome};
    let fx = h.fresh().await;
    let store = &fx.store;
    store
        .upsert_pool(&pool("cache", "http://fb", 60_000), PoolSource::Config)
        .await
        .unwrap();
    store.upsert_endpoint(&probed("a", "cache")).await.unwrap();

    let claim = store.claim_due_probes(0, 10).await.unwrap().remove(0);
    assert_eq!(claim.readiness_url, "http://a.internal/ready");
    assert_eq!(claim.pool, "cache");
    assert!(store
        .record_probe(&claim, &ProbeOutcome::Ready)
        .await
        .unwrap());
    let ready = endpoint(store, "a").await.unwrap();
    let stamp = ready.last_ready_at.expect("a ready answer stamps");
    assert_eq!(ready.last_probe_at, Some(stamp));
    assert_eq!(ready.last_error, None);

    wait_past(store, stamp).await;
    let claim = store.claim_due_probes(0, 10).await.unwrap().remove(0);
    let failed = ProbeOutcome::NotReady {
        error: "503 Service Unavailable".into(),
    };
    assert!(store.record_probe(&claim, &failed).await.unwrap());
    let after = endpoint(store, "a").await.unwrap();
    assert_eq!(after.last_ready_at, Some(stamp), "a failure never stamps");
    assert!(after.last_probe_at > Some(stamp));
    assert_eq!(after.last_error.as_deref(), Some("503 Service Unavailable"));

    // A probe whose claim was replaced records nothing, nor does one of an old definition.
    let slow = store.claim_due_probes(0, 10).await.unwrap().remove(0);
    wait_past(store, slow.claimed_at).await;
    let fresh = store.claim_due_probes(0, 10).await.unwrap().remove(0);
    assert!(!store
        .record_probe(&slow, &ProbeOutcome::Ready)
        .await
        .unwrap());
    assert_eq!(
        endpoint(store, "a").await.unwrap().last_ready_at,
        Some(stamp)
    );
    let mut moved = probed("a", "cache");
    moved.readiness_url = Some("http://a.internal/healthz".into());
    store.upsert_endpoint(&moved).await.unwrap();
    assert!(!store
        .record_probe(&fresh, &ProbeOutcome::Ready)
        .await
        .unwrap());
    assert_eq!(endpoint(store, "a").await.unwrap().last_ready_at, None);
}

pub async fn an_attempts_dispatch_is_recorded_once_while_current(h: &dyn Harness) {
    use tether_domain::{Dispatch, DispatchSource};
    let fx = h.fresh().await;
    let store = &fx.store;
    let (run_id, worker_id) = claimed_run(store, &spec_with(|r| r.max_attempts = Some(2))).await;
    let dispatch = |url: &str, source, endpoint: Option<&str>| Dispatch {
        url: Some(url.into()),
        source,
        endpoint: endpoint.map(str::to_string),
    };
    let first = BTreeMap::from([(
        "CACHE_URL".to_string(),
        dispatch("http://a", DispatchSource::Endpoint, Some("a")),
    )]);
    assert_err(
        store
            .record_dispatch(&run_id, 1, "someone-else", &first)
            .await,
        is_stale,
        "another worker's dispatch",
    );
    store
        .record_dispatch(&run_id, 1, &worker_id, &first)
        .await
        .unwrap();
    assert_err(
        store.record_dispatch(&run_id, 1, &worker_id, &first).await,
        is_stale,
        "written once",
    );
    store
        .finish_attempt(
            &run_id,
            1,
            &worker_id,
            &finish(
                AttemptOutcome::Failed {
                    error_code: ErrorCode::WorkerHeartbeatLost,
                },
                None,
            ),
        )
        .await
        .unwrap();
    assert_eq!(status(store, &run_id).await, RunStatus::Pending, "retried");
    assert_err(
        store.record_dispatch(&run_id, 1, &worker_id, &first).await,
        is_stale,
        "an ended attempt",
    );
    let claimed = store.claim_runs(&worker_id, &limits(1)).await.unwrap();
    assert_eq!(claimed[0].attempt, 2);
    let second = BTreeMap::from([(
        "CACHE_URL".to_string(),
        dispatch("http://fb", DispatchSource::Fallback, None),
    )]);
    store
        .record_dispatch(&run_id, 2, &worker_id, &second)
        .await
        .unwrap();
    let attempts = store.list_attempts(&run_id).await.unwrap();
    assert_eq!(attempts[0].endpoints, first);
    assert_eq!(attempts[1].endpoints, second);
}

// ---- faults: output exactly once, heartbeat grace, retention --------------------------------

pub async fn repeated_output_is_stored_once_and_gaps_are_refused(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (run_id, worker_id) = claimed_run(store, &spec()).await;
    store.start_attempt(&run_id, 1, &worker_id).await.unwrap();
    let first = [
        chunk_at(OutputStream::Stdout, 0, b"one\n"),
        chunk_at(OutputStream::Stderr, 0, b"err\n"),
    ];
    let append = |chunks: Vec<OutputChunk>| {
        let (run_id, worker_id) = (run_id.clone(), worker_id.clone());
        async move { store.append_output(&run_id, 1, &worker_id, &chunks).await }
    };
    let AppendOutcome::Accepted { offsets, .. } = append(first.to_vec()).await.unwrap() else {
        panic!("accepted");
    };
    assert_eq!(
        offsets,
        StreamOffsets {
            stdout: 4,
            stderr: 4
        }
    );
    // The same append again (its answer was lost): acknowledged, stored once.
    let AppendOutcome::Accepted { offsets, .. } = append(first.to_vec()).await.unwrap() else {
        panic!("accepted");
    };
    assert_eq!(
        offsets,
        StreamOffsets {
            stdout: 4,
            stderr: 4
        }
    );
    // A resend overlapping what is stored keeps only the new part.
    append(vec![chunk_at(OutputStream::Stdout, 0, b"one\ntwo\n")])
        .await
        .unwrap();
    // A gap is refused with what is expected, and nothing of it is stored.
    let gap = append(vec![
        chunk_at(OutputStream::Stdout, 8, b"three\n"),
        chunk_at(OutputStream::Stdout, 20, b"lost\n"),
    ])
    .await;
    match gap {
        Err(StoreError::OutputGap { expected }) => {
            assert_eq!(
                expected,
                StreamOffsets {
                    stdout: 8,
                    stderr: 4
                }
            )
        }
        other => panic!("expected OutputGap, got {other:?}"),
    }
    let logs: Vec<u8> = all_events(store, &run_id)
        .await
        .into_iter()
        .filter(|e| e.kind == EventKind::Log)
        .flat_map(|e| e.data.unwrap_or_default())
        .collect();
    assert_eq!(logs, b"one\nerr\ntwo\n");
    let run = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!((run.stdout_bytes, run.stderr_bytes), (8, 4));
    // Offsets are per attempt: a retry's output starts again at 0.
    let later = store
        .append_output(
            &run_id,
            1,
            &worker_id,
            &[chunk_at(OutputStream::Stdout, 8, b"three\n")],
        )
        .await
        .unwrap();
    assert!(matches!(
        later,
        AppendOutcome::Accepted {
            offsets: StreamOffsets {
                stdout: 14,
                stderr: 4
            },
            ..
        }
    ));
}

pub async fn heartbeat_grace_moves_stale_deadlines_only_forward(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let policy = ReapPolicy::default();
    let (short, worker_id) = claimed_run(store, &stale_after(1_500, 3)).await;
    store.start_attempt(&short, 1, &worker_id).await.unwrap();
    let long = create(store, &stale_after(600_000, 3)).await;
    let w2 = register(store, 1.0).await;
    store.claim_runs(&w2, &limits(1)).await.unwrap();
    let quiet = create(
        store,
        &spec_with(|r| {
            r.heartbeat_timeout_s = Some(None);
            r.timeout_s = Some(600.0);
        }),
    )
    .await;
    let w3 = register(store, 1.0).await;
    store.claim_runs(&w3, &limits(1)).await.unwrap();
    let pending = create(store, &stale_after(300, 3)).await;
    let earliest = store.next_reap_deadline(&policy).await.unwrap();
    // The earliest deadline is the short run's.
    // The short run's heartbeat goes stale (as if the store had been unreachable)...
    let first_deadline = earliest.unwrap();
    wait_past(store, first_deadline).await;
    let granted_at = store.now().await.unwrap();
    let moved = store.grant_heartbeat_grace().await.unwrap();
    // ...and every run with a heartbeat deadline gets one full window from now; the run
    // without one has nothing to move.
    assert_eq!(moved, 2);
    let next = store.next_reap_deadline(&policy).await.unwrap().unwrap();
    assert!(next >= granted_at + 1_500, "{next} < {granted_at} + 1500");
    assert!(first_deadline < next);
    let swept = store.reap_stale_runs(&quick_policy()).await.unwrap();
    assert!(
        swept.reaped.is_empty(),
        "nothing is judged inside the grace"
    );
    for id in [&short, &long, &quiet] {
        let run = store.get_run(id).await.unwrap().unwrap();
        assert_eq!(run.attempt, 1);
        assert!(run.status.is_in_flight(), "{id}: {:?}", run.status);
    }
    assert_eq!(
        store.get_run(&pending).await.unwrap().unwrap().status,
        RunStatus::Pending
    );
    // The rule is unchanged: once the moved deadline passes, the run is reaped as before.
    let reaped = reap_until_some(store, &quick_policy()).await;
    assert_eq!(reaped[0].run_id, short);
    assert_eq!(reaped[0].error_code, ErrorCode::WorkerHeartbeatLost);
}

pub async fn pruning_deletes_old_finished_runs_only(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let mut finished = Vec::new();
    for _ in 0..3 {
        let (run_id, worker_id) = claimed_run(store, &spec()).await;
        store
            .append_output(
                &run_id,
                1,
                &worker_id,
                &[chunk(OutputStream::Stdout, b"x\n")],
            )
            .await
            .unwrap();
        store
            .finish_attempt(
                &run_id,
                1,
                &worker_id,
                &finish(AttemptOutcome::Succeeded, Some(0)),
            )
            .await
            .unwrap();
        finished.push(run_id);
    }
    let (in_flight, _) = claimed_run(store, &spec()).await;
    let other_lane = {
        let mut s = spec();
        s.lane = "builds".into();
        let (run_id, worker_id) = claimed_run(store, &s).await;
        store
            .finish_attempt(
                &run_id,
                1,
                &worker_id,
                &finish(AttemptOutcome::Succeeded, Some(0)),
            )
            .await
            .unwrap();
        run_id
    };
    let pending = create(store, &spec()).await;
    let last_finish = store
        .get_run(&other_lane)
        .await
        .unwrap()
        .unwrap()
        .finished_at
        .unwrap();
    // A long retention keeps everything.
    assert_eq!(
        store
            .prune_finished_runs("default", 3_600_000, 100)
            .await
            .unwrap(),
        0
    );
    wait_past(store, last_finish + 1).await;
    // Small batches: two, then the last one, then nothing.
    assert_eq!(store.prune_finished_runs("default", 0, 2).await.unwrap(), 2);
    assert_eq!(store.prune_finished_runs("default", 0, 2).await.unwrap(), 1);
    assert_eq!(store.prune_finished_runs("default", 0, 2).await.unwrap(), 0);
    for id in &finished {
        assert!(store.get_run(id).await.unwrap().is_none(), "{id} pruned");
        assert!(store.events_after(id, 0, 100).await.unwrap().is_empty());
        assert!(store.list_attempts(id).await.unwrap().is_empty());
    }
    // In-flight and pending runs, and other lanes, are untouched.
    assert!(store.get_run(&in_flight).await.unwrap().is_some());
    assert!(!all_events(store, &in_flight).await.is_empty());
    assert!(store.get_run(&pending).await.unwrap().is_some());
    assert!(store.get_run(&other_lane).await.unwrap().is_some());
    assert_eq!(store.prune_finished_runs("builds", 0, 10).await.unwrap(), 1);
    assert!(store.get_run(&other_lane).await.unwrap().is_none());
}
