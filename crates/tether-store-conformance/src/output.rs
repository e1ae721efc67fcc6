//! Output: limits, exact bytes, exactly-once appends and reading a log from its tail.

use crate::support::*;
use crate::Harness;

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
    assert_eq!(stream_in(logs[2]), Some(OutputStream::Stderr));
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
