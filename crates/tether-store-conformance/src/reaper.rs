//! The reaper: stale runs retried or ended, each once, on the store's clock.

use crate::support::*;
use crate::Harness;

/// Sweeps until something is reaped.
async fn reap_until_some(store: &SharedStore, policy: &ReapPolicy) -> Vec<tether_store::ReapedRun> {
    eventually("a sweep to reap something", PATIENCE, || async {
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
    assert_eq!(status_in(last), Some(RunStatus::Pending));
    assert_eq!(error_in(last), Some(ErrorCode::WorkerHeartbeatLost));

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
        events.last().and_then(error_in),
        Some(ErrorCode::WorkerHeartbeatLost)
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
            .filter(|e| e.kind == EventKind::Status && status_in(e) == Some(RunStatus::Pending))
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
