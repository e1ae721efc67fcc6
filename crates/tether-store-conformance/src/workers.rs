//! Workers: registration, secrets, heartbeats, listings and deregistration.

use crate::support::*;
use crate::Harness;

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

/// Attempts a worker never started go back uncounted: pending again (or cancelled, when a
/// cancel was asked), the attempt recorded `claimed` with `released`, and a run allowed one
/// attempt may still be claimed. A started attempt, another worker's, or an old attempt is
/// left as it is.
pub async fn a_released_attempt_goes_back_uncounted(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let one = |r: &mut Submission| r.max_attempts = Some(1);
    let held = create(store, &spec_with(one)).await;
    let started = create(store, &spec_with(one)).await;
    let cancelled = create(store, &spec_with(one)).await;
    let worker_id = register(store, 3.0).await;
    let other = register(store, 3.0).await;
    assert_eq!(
        store
            .claim_runs(&worker_id, &limits(3))
            .await
            .unwrap()
            .len(),
        3
    );
    store.start_attempt(&started, 1, &worker_id).await.unwrap();
    store.request_cancel(&cancelled).await.unwrap();
    let events_before = all_events(store, &held).await.len();

    // Another worker's word, and an attempt that is not current, change nothing.
    let not_current = [
        RunRef {
            run_id: held.clone(),
            attempt: 2,
        },
        RunRef {
            run_id: "no-such-run".into(),
            attempt: 1,
        },
    ];
    assert!(store
        .release_runs(&worker_id, &not_current)
        .await
        .unwrap()
        .is_empty());
    let refs = |ids: &[&String]| -> Vec<RunRef> {
        ids.iter()
            .map(|id| RunRef {
                run_id: (*id).clone(),
                attempt: 1,
            })
            .collect()
    };
    assert!(store
        .release_runs(&other, &refs(&[&held]))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(status(store, &held).await, RunStatus::Claimed);

    let released = store
        .release_runs(&worker_id, &refs(&[&held, &started, &cancelled]))
        .await
        .unwrap();
    assert!(released.iter().all(|r| r.attempt == 1));
    let released: BTreeSet<String> = released.into_iter().map(|r| r.id).collect();
    assert_eq!(released, BTreeSet::from([held.clone(), cancelled.clone()]));

    let run = store.get_run(&held).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Pending);
    assert_eq!((run.attempt, run.released_attempts), (1, 1));
    assert_eq!(run.worker_id, None);
    assert_eq!(run.claimed_at, None);
    assert_eq!(run.queue_position, Some(1), "first in line again");
    let attempts = store.list_attempts(&held).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status, Some(RunStatus::Claimed));
    assert_eq!(attempts[0].error_code, Some(ErrorCode::Released));
    assert!(attempts[0].finished_at.is_some());
    let events = all_events(store, &held).await;
    let last = events.last().and_then(status_of).expect("a status event");
    assert_eq!(
        (last.status, last.attempt, last.error_code),
        (RunStatus::Pending, 1, Some(ErrorCode::Released))
    );
    assert_eq!(events.len(), events_before + 1);

    assert_eq!(status(store, &started).await, RunStatus::Running);
    let run = store.get_run(&cancelled).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Cancelled);
    assert_eq!(run.released_attempts, 0);

    // Allowed one attempt, it is claimed again, as attempt 2, and may still succeed.
    let again = store.claim_runs(&other, &limits(3)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].run.id.as_str(), again[0].attempt),
        (held.as_str(), 2)
    );
    store.start_attempt(&held, 2, &other).await.unwrap();
    let done = store
        .finish_attempt(
            &held,
            2,
            &other,
            &finish(AttemptOutcome::Succeeded, Some(0)),
        )
        .await
        .unwrap();
    assert_eq!(done.status, RunStatus::Succeeded);
    // The old holder's word about attempt 1 is fenced.
    assert!(store
        .release_runs(&worker_id, &refs(&[&held]))
        .await
        .unwrap()
        .is_empty());
    assert_err(
        store.release_runs("no-such-worker", &refs(&[&held])).await,
        is_unknown_worker,
        "release by an unknown worker",
    );
}
