//! Claims: each run to one worker, in order, within capacity and lane limits.

use crate::support::*;
use crate::Harness;
use tether_domain::admission::MAX_RESERVE_FACTOR;

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

/// A run of `cpus` and a little memory.
fn needing_cpus(cpus: f64) -> RunSpec {
    spec_with(|r| {
        r.resources = Some(Resources {
            cpus,
            memory_mb: 256,
        })
    })
}

/// A reserve lets a worker hold runs waiting in it beyond its capacity (its local queue), at
/// most [`MAX_RESERVE_FACTOR`] times its capacity, never a run it could not run alone, and
/// never past a lane's ceiling.
pub async fn a_reserve_holds_runs_beyond_capacity_within_bounds(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let factor = MAX_RESERVE_FACTOR as usize;
    let big = create(store, &needing_cpus(2.0)).await;
    for _ in 0..factor + 4 {
        create(store, &spec()).await;
    }
    let worker_id = register(store, 1.0).await;
    let reserve = |cpus: f64| ClaimLimits {
        reserve: Resources {
            cpus,
            memory_mb: 1 << 20,
        },
        ..limits(10 * factor as u32)
    };
    let first = store.claim_runs(&worker_id, &reserve(1.0)).await.unwrap();
    assert_eq!(first.len(), 2, "1 cpu of capacity and 1 of reserve");
    assert!(
        first.iter().all(|c| c.run.id != big),
        "2 cpus never run on 1"
    );
    // Asking for more than the factor times the capacity reaches only that far.
    let more = store
        .claim_runs(&worker_id, &reserve(10.0 * factor as f64))
        .await
        .unwrap();
    assert_eq!(more.len(), factor - 1, "{} held in all", factor + 1);
    assert!(store
        .claim_runs(&worker_id, &reserve(10.0 * factor as f64))
        .await
        .unwrap()
        .is_empty());
    // Without a reserve, a worker holding more than its capacity has no room at all.
    assert!(store
        .claim_runs(&worker_id, &limits(20))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(status(store, &big).await, RunStatus::Pending);

    // A lane's ceiling counts runs held in reserve like any other in flight.
    let lane_worker = register(store, 8.0).await;
    let capped = ClaimLimits {
        lane_max_concurrency: BTreeMap::from([("default".to_string(), factor as u32 + 3)]),
        ..reserve(8.0)
    };
    let taken = store.claim_runs(&lane_worker, &capped).await.unwrap();
    assert_eq!(
        taken.len(),
        2,
        "{} held by the first worker, 2 more reach the ceiling",
        factor + 1
    );
}

pub async fn a_run_too_big_is_skipped_without_blocking_smaller_ones(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let big = create(store, &needing_cpus(4.0)).await;
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
        ..ClaimLimits::default()
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
