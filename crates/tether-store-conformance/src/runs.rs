//! Runs: creation, reads, lookups by prefix, idempotency and a run's whole life.

use crate::support::*;
use crate::Harness;

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
        assert_eq!(status_in(&events[0]), Some(RunStatus::Pending));
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
    let statuses: Vec<RunStatus> = events.iter().filter_map(status_in).collect();
    assert_eq!(
        statuses,
        vec![
            RunStatus::Pending,
            RunStatus::Claimed,
            RunStatus::Running,
            RunStatus::Succeeded,
            RunStatus::Succeeded
        ]
    );
    assert_eq!(
        events[2].body,
        EventBody::Attempt {
            attempt: 1,
            worker_id: worker_id.clone()
        }
    );
    assert_eq!(stream_in(&events[4]), Some(OutputStream::Stdout));
    assert_eq!(events[4].data.as_deref(), Some(&b"hello\n"[..]));
    assert_eq!(stream_in(&events[5]), Some(OutputStream::Stderr));
    assert_eq!(status_of(&events[7]).and_then(|s| s.exit_code), Some(0));
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
