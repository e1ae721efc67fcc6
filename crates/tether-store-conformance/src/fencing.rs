//! Fencing: old attempts, other workers and terminal runs change nothing.

use crate::support::*;
use crate::Harness;

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
