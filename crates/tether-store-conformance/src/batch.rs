//! Batched worker calls (`start_attempts`, `finish_attempts`): each item judged as its single
//! call would judge it, answers in order, one per item.

use tether_store::{AttemptFinish, AttemptStart, RunRecord, StoreResult};

use crate::support::*;
use crate::Harness;

fn spec_of(max_attempts: u32) -> RunSpec {
    spec_with(|r| r.max_attempts = Some(max_attempts))
}

/// `n` runs claimed by one new worker: `(worker_id, run_ids)`, each at attempt 1.
async fn claimed(store: &SharedStore, n: usize, max_attempts: u32) -> (String, Vec<String>) {
    let mut runs = Vec::new();
    for _ in 0..n {
        let created = store
            .create_run(&spec_of(max_attempts))
            .await
            .expect("create");
        runs.push(created.run.id);
    }
    let worker = store
        .register_worker(&NewWorker {
            name: "batch-worker".into(),
            secret_hash: None,
            capacity: Resources {
                cpus: 64.0,
                memory_mb: 64 * 1024,
            },
            lanes: Vec::new(),
            labels: BTreeMap::new(),
        })
        .await
        .expect("register")
        .id;
    let got = store
        .claim_runs(
            &worker,
            &ClaimLimits {
                max_runs: n as u32,
                ..ClaimLimits::default()
            },
        )
        .await
        .expect("claim");
    assert_eq!(got.len(), n, "every run is claimed");
    (worker, runs)
}

fn item(run_id: &str, attempt: u32) -> AttemptStart {
    AttemptStart {
        run_id: run_id.to_string(),
        attempt,
        ago_ms: 0,
    }
}

fn done(run_id: &str, attempt: u32, outcome: AttemptOutcome, code: i32) -> AttemptFinish {
    AttemptFinish {
        run_id: run_id.to_string(),
        attempt,
        report: FinishReport {
            outcome,
            exit_code: Some(code),
            error_message: None,
        },
        ago_ms: 0,
    }
}

fn status_of(answer: &StoreResult<RunRecord>) -> Option<RunStatus> {
    answer.as_ref().ok().map(|r| r.status)
}

fn is_stale(answer: &StoreResult<RunRecord>) -> bool {
    matches!(answer, Err(StoreError::StaleAttempt))
}

fn is_running(event: &EventRecord) -> bool {
    status_in(event) == Some(RunStatus::Running)
}

fn is_not_found(answer: &StoreResult<RunRecord>) -> bool {
    matches!(answer, Err(StoreError::NotFound))
}

pub async fn batched_starts_judge_each_item_and_answer_in_order(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (worker, runs) = claimed(store, 3, 1).await;
    let answers = store
        .start_attempts(
            &worker,
            &[
                item(&runs[0], 1),
                item(&runs[1], 2), // not the current attempt
                item("no-such-run", 1),
                item(&runs[2], 1),
                item(&runs[0], 1), // a repeat: already running, answered as such
            ],
        )
        .await
        .expect("start_attempts");
    assert_eq!(answers.len(), 5, "one answer per item");
    assert_eq!(status_of(&answers[0]), Some(RunStatus::Running));
    assert!(is_stale(&answers[1]), "a stale item: {:?}", answers[1]);
    assert!(
        is_not_found(&answers[2]),
        "an unknown run: {:?}",
        answers[2]
    );
    assert_eq!(status_of(&answers[3]), Some(RunStatus::Running));
    assert_eq!(status_of(&answers[4]), Some(RunStatus::Running));
    assert_eq!(
        answers[0].as_ref().ok().map(|r| r.id.as_str()),
        Some(&*runs[0])
    );
    assert_eq!(
        answers[3].as_ref().ok().map(|r| r.id.as_str()),
        Some(&*runs[2])
    );
    // The stale item wrote nothing: its run is still claimed, with no `running` event.
    let untouched = store.get_run(&runs[1]).await.unwrap().unwrap();
    assert_eq!(untouched.status, RunStatus::Claimed);
    let events = store.events_after(&runs[1], 0, 100).await.unwrap();
    assert!(events.iter().all(|e| !is_running(e)));
    // The started runs each got exactly one `running` event.
    let events = store.events_after(&runs[0], 0, 100).await.unwrap();
    let running = events
        .iter()
        .filter(|e| e.kind == EventKind::Status && is_running(e))
        .count();
    assert_eq!(running, 1);
}

pub async fn batched_finishes_judge_each_item_and_answer_in_order(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (worker, runs) = claimed(store, 3, 1).await;
    let answers = store
        .finish_attempts(
            &worker,
            &[
                done(&runs[0], 1, AttemptOutcome::Succeeded, 0),
                done(&runs[1], 7, AttemptOutcome::Succeeded, 0), // stale
                done("no-such-run", 1, AttemptOutcome::Succeeded, 0),
                done(
                    &runs[2],
                    1,
                    AttemptOutcome::Failed {
                        error_code: ErrorCode::ExitNonzero,
                    },
                    3,
                ),
                done(&runs[0], 1, AttemptOutcome::Succeeded, 0), // already terminal
            ],
        )
        .await
        .expect("finish_attempts");
    assert_eq!(answers.len(), 5, "one answer per item");
    assert_eq!(status_of(&answers[0]), Some(RunStatus::Succeeded));
    assert!(is_stale(&answers[1]), "a stale item: {:?}", answers[1]);
    assert!(
        is_not_found(&answers[2]),
        "an unknown run: {:?}",
        answers[2]
    );
    let failed = answers[3].as_ref().expect("the failed run");
    assert_eq!(failed.status, RunStatus::Failed);
    assert_eq!(failed.exit_code, Some(3));
    assert!(
        matches!(
            answers[4],
            Err(StoreError::Terminal | StoreError::StaleAttempt)
        ),
        "a second finish of a finished run changes nothing: {:?}",
        answers[4]
    );
    // Exactly one `end` event per finished run; the stale one is still in flight.
    for run_id in [&runs[0], &runs[2]] {
        let events = store.events_after(run_id, 0, 100).await.unwrap();
        let ends = events.iter().filter(|e| e.kind == EventKind::End).count();
        assert_eq!(ends, 1, "one end event for {run_id}");
    }
    let stale = store.get_run(&runs[1]).await.unwrap().unwrap();
    assert_eq!(stale.status, RunStatus::Claimed);
    assert_eq!(
        store.list_workers().await.unwrap()[0].runs,
        vec![(runs[1].clone(), 1)],
        "the worker holds only the run whose finish was stale"
    );
}

pub async fn batched_finishes_retry_or_end_as_single_finishes_do(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (worker, runs) = claimed(store, 2, 2).await;
    let lost = AttemptOutcome::Failed {
        error_code: ErrorCode::WorkerHeartbeatLost,
    };
    let answers = store
        .finish_attempts(
            &worker,
            &[
                done(&runs[0], 1, lost, 0),
                done(&runs[1], 1, AttemptOutcome::Cancelled, 0),
            ],
        )
        .await
        .expect("finish_attempts");
    let single = |i: usize| answers[i].as_ref().expect("an answer").status;
    // A retryable failure with attempts left goes back to pending, as finish_attempt does.
    assert_eq!(single(0), RunStatus::Pending);
    assert_eq!(single(1), RunStatus::Cancelled);
    let attempts = store.list_attempts(&runs[0]).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status, Some(RunStatus::Failed));
}

/// A start and a retryable failure of the same attempt in one call: the run goes back to
/// `pending` as two calls would leave it, and the attempt keeps its start and its end.
pub async fn a_start_and_a_retried_finish_in_one_call_leave_what_two_calls_would(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (worker, runs) = claimed(store, 1, 2).await;
    // A failure that retries (a command's own exit never does).
    let failed = AttemptOutcome::Failed {
        error_code: ErrorCode::WorkerHeartbeatLost,
    };
    let reports = store
        .report_attempts(
            &worker,
            &[item(&runs[0], 1)],
            &[done(&runs[0], 1, failed, 1)],
            None,
            Instant::now(),
        )
        .await
        .expect("report_attempts");
    assert_eq!(status_of(&reports.starts[0]), Some(RunStatus::Pending));
    assert_eq!(status_of(&reports.finishes[0]), Some(RunStatus::Pending));
    let run = store.get_run(&runs[0]).await.unwrap().unwrap();
    assert_eq!((run.status, run.attempt), (RunStatus::Pending, 1));
    assert_eq!((run.started_at, run.worker_id), (None, None));
    let attempts = store.list_attempts(&runs[0]).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert!(attempts[0].started_at.is_some(), "{:?}", attempts[0]);
    assert!(attempts[0].finished_at.is_some());
    assert_eq!(attempts[0].status, Some(RunStatus::Failed));
    use EventKind::{Attempt, Status};
    use RunStatus::{Claimed, Pending, Running};
    assert_eq!(
        history(store, &runs[0]).await,
        [
            (1, Status, Some(Pending)),
            (2, Status, Some(Claimed)),
            (3, Attempt, None),
            (4, Status, Some(Running)),
            (5, Status, Some(Pending)),
        ]
    );
    // The next attempt goes as any retry does.
    let again = store.claim_runs(&worker, &limits(1)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2);
}

/// The events of `run_id` as (seq, kind, status): what a follower would read.
async fn history(store: &SharedStore, run_id: &str) -> Vec<(i64, EventKind, Option<RunStatus>)> {
    all_events(store, run_id)
        .await
        .iter()
        .map(|e| (e.seq, e.kind, status_in(e)))
        .collect()
}

pub async fn a_report_starts_finishes_and_claims_the_room_freed_in_one_call(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    // Room for two runs; four wait.
    let mut runs = Vec::new();
    for _ in 0..4 {
        runs.push(create(store, &spec()).await);
    }
    let worker = register(store, 2.0).await;
    let first = store.claim_runs(&worker, &limits(0)).await.unwrap();
    let first: Vec<&str> = first.iter().map(|c| c.run.id.as_str()).collect();
    assert_eq!(first, [runs[0].as_str(), runs[1].as_str()]);

    let reports = store
        .report_attempts(
            &worker,
            &[item(&runs[0], 1), item(&runs[1], 1), item(&runs[2], 1)],
            &[
                // Started and finished in the same call: the finish is judged after the start.
                done(&runs[0], 1, AttemptOutcome::Succeeded, 0),
                done(
                    &runs[1],
                    1,
                    AttemptOutcome::Failed {
                        error_code: ErrorCode::ExitNonzero,
                    },
                    3,
                ),
            ],
            Some(&limits(0)),
            Instant::now(),
        )
        .await
        .expect("report_attempts");
    assert_eq!(reports.starts.len(), 3, "one answer per start");
    // A start and its finish in one call are one write: both answer the run as the call
    // left it.
    assert_eq!(status_of(&reports.starts[0]), Some(RunStatus::Succeeded));
    assert_eq!(status_of(&reports.starts[1]), Some(RunStatus::Failed));
    assert!(
        is_stale(&reports.starts[2]),
        "a run this worker was never handed: {:?}",
        reports.starts[2]
    );
    assert_eq!(reports.finishes.len(), 2, "one answer per finish");
    assert_eq!(status_of(&reports.finishes[0]), Some(RunStatus::Succeeded));
    let failed = reports.finishes[1].as_ref().expect("the failed run");
    assert_eq!(
        (failed.status, failed.exit_code),
        (RunStatus::Failed, Some(3))
    );
    // The claim sees the room the finishes freed, in the same call.
    let claimed = reports
        .claimed
        .expect("a claim was asked")
        .expect("the claim");
    let claimed: Vec<(&str, u32, RunStatus)> = claimed
        .iter()
        .map(|c| (c.run.id.as_str(), c.attempt, c.run.status))
        .collect();
    assert_eq!(
        claimed,
        [
            (runs[2].as_str(), 1, RunStatus::Claimed),
            (runs[3].as_str(), 1, RunStatus::Claimed)
        ]
    );

    // Every event once, in order, seq rising by one; the answers name the last of them.
    use EventKind::{Attempt, End, Status};
    use RunStatus::{Claimed, Failed, Pending, Running, Succeeded};
    let ended = |last: RunStatus| {
        vec![
            (1, Status, Some(Pending)),
            (2, Status, Some(Claimed)),
            (3, Attempt, None),
            (4, Status, Some(Running)),
            (5, Status, Some(last)),
            (6, End, Some(last)),
        ]
    };
    assert_eq!(history(store, &runs[0]).await, ended(Succeeded));
    assert_eq!(history(store, &runs[1]).await, ended(Failed));
    for run_id in &runs[2..] {
        assert_eq!(
            history(store, run_id).await,
            [
                (1, Status, Some(Pending)),
                (2, Status, Some(Claimed)),
                (3, Attempt, None)
            ]
        );
    }
    for (run_id, last_seq) in [(&runs[0], 6), (&runs[1], 6), (&runs[2], 3)] {
        let run = store.get_run(run_id).await.unwrap().unwrap();
        assert_eq!(run.last_event_seq, last_seq, "{run_id}");
    }
    assert_eq!(
        reports.finishes[0].as_ref().map(|r| r.last_event_seq).ok(),
        Some(6)
    );
    let attempts = store.list_attempts(&runs[0]).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert!(attempts[0].started_at.is_some());
    assert_eq!(attempts[0].status, Some(RunStatus::Succeeded));
    // The run shows its start as a start alone would have written it.
    let ran = store.get_run(&runs[0]).await.unwrap().unwrap();
    assert!(
        ran.started_at.is_some() && ran.finished_at.is_some(),
        "{ran:?}"
    );
    assert!(ran.started_at <= ran.finished_at);
    assert_eq!(ran.worker_id, None);
    assert_eq!(
        store.list_workers().await.unwrap()[0].runs,
        vec![(runs[2].clone(), 1), (runs[3].clone(), 1)],
        "the worker holds what the call handed it"
    );
}

/// A worker says how long before its call a process started or ended (a duration on its own
/// clock): the stamps are placed that long before the store's time at the call, so a run's
/// times are when it ran, not when a call went; never before the claim, and an end never
/// before its start.
pub async fn reported_times_place_starts_and_ends_when_they_happened(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (worker, runs) = claimed(store, 3, 3).await;
    let claimed_at = store.get_run(&runs[0]).await.unwrap().unwrap().claimed_at;
    let claimed_at = claimed_at.expect("a claimed run has its claim's stamp");
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let ago = |item: AttemptStart, ago_ms: u64| AttemptStart { ago_ms, ..item };
    let ended = |item: AttemptFinish, ago_ms: u64| AttemptFinish { ago_ms, ..item };
    let succeeded = AttemptOutcome::Succeeded;
    store
        .report_attempts(
            &worker,
            &[
                // Started 300 ms and ended 100 ms before the call: one write, both stamps.
                ago(item(&runs[0], 1), 300),
                // "Started" before it was claimed: the claim is the earliest it could have.
                ago(item(&runs[1], 1), 3_600_000),
                item(&runs[2], 1),
            ],
            &[ended(done(&runs[0], 1, succeeded, 0), 100)],
            None,
            Instant::now(),
        )
        .await
        .expect("report_attempts");
    store
        .report_attempts(
            &worker,
            &[],
            &[
                done(&runs[1], 1, succeeded, 0),
                // "Ended" before it started: the start is the earliest it could have.
                ended(done(&runs[2], 1, succeeded, 0), 3_600_000),
            ],
            None,
            Instant::now(),
        )
        .await
        .expect("report_attempts");
    let mut read = Vec::new();
    for id in &runs {
        read.push(store.get_run(id).await.unwrap().unwrap());
    }
    let (a, b, c) = (&read[0], &read[1], &read[2]);
    let (a_start, a_end) = (a.started_at.unwrap(), a.finished_at.unwrap());
    assert_eq!(
        a_end - a_start,
        200,
        "both measured on one clock, in one call"
    );
    assert!(
        a_start >= claimed_at + 100,
        "{a_start} vs claim {claimed_at}"
    );
    assert_eq!(b.started_at, b.claimed_at, "never before the claim");
    assert!(b.finished_at.unwrap() >= b.started_at.unwrap() + 400);
    assert_eq!(c.finished_at, c.started_at, "never before the start");
    // The attempt rows say the same.
    for r in [a, b, c] {
        let attempts = store.list_attempts(&r.id).await.unwrap();
        assert_eq!(
            (attempts[0].started_at, attempts[0].finished_at),
            (r.started_at, r.finished_at),
            "{:?}",
            attempts[0]
        );
    }
}

pub async fn a_report_s_refused_claim_leaves_its_items_standing(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (worker, runs) = claimed(store, 1, 1).await;
    store.set_worker_draining(&worker).await.unwrap();
    // A draining worker is handed nothing, but what it reports lands.
    let reports = store
        .report_attempts(
            &worker,
            &[item(&runs[0], 1)],
            &[done(&runs[0], 1, AttemptOutcome::Succeeded, 0)],
            Some(&limits(0)),
            Instant::now(),
        )
        .await
        .expect("report_attempts");
    assert_eq!(status_of(&reports.finishes[0]), Some(RunStatus::Succeeded));
    assert!(matches!(reports.claimed, Some(Ok(ref c)) if c.is_empty()));
    // An unknown worker's claim is refused alone; its items are judged (and refused) alone.
    let reports = store
        .report_attempts(
            "no-such-worker",
            &[item(&runs[0], 1)],
            &[],
            Some(&limits(0)),
            Instant::now(),
        )
        .await
        .expect("report_attempts");
    assert!(is_stale(&reports.starts[0]) || is_terminal_answer(&reports.starts[0]));
    assert!(matches!(
        reports.claimed,
        Some(Err(StoreError::UnknownWorker))
    ));
    assert_eq!(status(store, &runs[0]).await, RunStatus::Succeeded);
}

fn is_terminal_answer(answer: &StoreResult<RunRecord>) -> bool {
    matches!(answer, Err(StoreError::Terminal))
}

pub async fn a_call_s_wait_for_its_transaction_counts_into_its_stamps(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let (worker, runs) = claimed(store, 1, 3).await;
    let claimed_at = store.get_run(&runs[0]).await.unwrap().unwrap().claimed_at;
    let claimed_at = claimed_at.expect("a claimed run has its claim's stamp");
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Reported as it happened (`ago_ms` 0), by a call that arrived 400 ms before its
    // transaction: the start is placed when the call arrived, not when it got its turn.
    let received = Instant::now() - Duration::from_millis(400);
    store
        .report_attempts(&worker, &[item(&runs[0], 1)], &[], None, received)
        .await
        .expect("report_attempts");
    let now = store.now().await.unwrap();
    let started = store.get_run(&runs[0]).await.unwrap().unwrap().started_at;
    let started = started.expect("started");
    assert!(started <= now - 350, "{started} vs now {now}");
    assert!(
        started >= claimed_at + 100,
        "{started} vs claim {claimed_at}"
    );
}
