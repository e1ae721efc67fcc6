//! Retention: pruning deletes only old finished runs.

use crate::support::*;
use crate::Harness;

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
