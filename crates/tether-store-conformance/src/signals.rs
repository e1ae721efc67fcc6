//! Cancellation and the signals a commit publishes.

use crate::support::*;
use crate::Harness;

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
    assert_eq!(status_in(&events[1]), Some(RunStatus::Cancelled));
    assert_eq!(error_in(&events[1]), Some(ErrorCode::Cancelled));

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
