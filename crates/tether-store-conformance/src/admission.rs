//! Admission: batches written whole, reject lanes, and the lane loads admission reads.

use crate::support::*;
use crate::Harness;

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
    let ids = |runs: &[tether_store::CreatedRun]| {
        runs.iter().map(|c| c.run.id.clone()).collect::<Vec<_>>()
    };
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

fn hand_off<'a>(worker_id: &'a str, limits: &'a ClaimLimits) -> HandOff<'a> {
    HandOff { worker_id, limits }
}

/// Waits for a `RunPending` of `lane` on `signals` for a short while: `true` if one came.
async fn pending_signalled(signals: &mut tokio::sync::broadcast::Receiver<Signal>) -> bool {
    tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            match signals.recv().await {
                Ok(Signal::RunPending { .. }) => return,
                Ok(_) => continue,
                Err(_) => std::future::pending::<()>().await,
            }
        }
    })
    .await
    .is_ok()
}

pub async fn a_submission_hands_its_run_to_a_waiting_worker(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let worker_id = register(store, 2.0).await;
    let limits = limits(4);
    let mut signals = store.subscribe();
    let (admission, claimed) = store
        .admit_run_and_claim(&spec(), &queue_policy(), &hand_off(&worker_id, &limits))
        .await
        .unwrap();
    let Admission::Accepted(created) = admission else {
        panic!("a queue lane admits it");
    };
    assert!(created.created);
    assert_eq!(claimed.len(), 1);
    let run_id = created.run.id.clone();
    assert_eq!(claimed[0].run.id, run_id);
    assert_eq!(claimed[0].attempt, 1);
    // The answer shows it as the transaction left it.
    assert_eq!(created.run.status, RunStatus::Claimed);
    assert_eq!(created.run.worker_id.as_deref(), Some(worker_id.as_str()));
    assert_eq!(created.run.queue_position, None);
    let stored = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Claimed);
    assert_eq!(stored.attempt, 1);
    // Its history as if submitted and then claimed: queued, claimed, attempt 1.
    let events = all_events(store, &run_id).await;
    assert_eq!(
        kinds(&events),
        vec![EventKind::Status, EventKind::Status, EventKind::Attempt]
    );
    assert_eq!(status_in(&events[0]), Some(RunStatus::Pending));
    assert_eq!(status_in(&events[1]), Some(RunStatus::Claimed));
    let attempts = store.list_attempts(&run_id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].worker_id, worker_id);
    // Taken: no other claim is woken for it.
    assert!(!pending_signalled(&mut signals).await);
    // It runs to its end as any claimed run does.
    store.start_attempt(&run_id, 1, &worker_id).await.unwrap();
    store
        .finish_attempt(
            &run_id,
            1,
            &worker_id,
            &finish(AttemptOutcome::Succeeded, Some(0)),
        )
        .await
        .unwrap();
    assert_eq!(status(store, &run_id).await, RunStatus::Succeeded);
}

pub async fn a_hand_off_takes_what_the_worker_would_claim(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    // An older run waits: the worker's one slot goes to it, first in first out, and the new
    // run stays pending, signalled.
    let older = create(store, &spec()).await;
    let worker_id = register(store, 1.0).await;
    let one = limits(1);
    let mut signals = store.subscribe();
    let (admission, claimed) = store
        .admit_run_and_claim(&spec(), &queue_policy(), &hand_off(&worker_id, &one))
        .await
        .unwrap();
    let Admission::Accepted(created) = admission else {
        panic!("a queue lane admits it");
    };
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].run.id, older);
    assert_eq!(created.run.status, RunStatus::Pending);
    assert_eq!(status(store, &created.run.id).await, RunStatus::Pending);
    assert!(
        pending_signalled(&mut signals).await,
        "the new run still waits"
    );

    // A full worker takes nothing; a worker of other lanes neither; a worker that is gone
    // neither, and the submission stands all the same.
    let (_, none) = store
        .admit_run_and_claim(&spec(), &queue_policy(), &hand_off(&worker_id, &one))
        .await
        .unwrap();
    assert!(none.is_empty(), "its one cpu is held");
    let elsewhere = store
        .register_worker(&worker(4.0, &["other"]))
        .await
        .unwrap()
        .id;
    let (_, none) = store
        .admit_run_and_claim(&spec(), &queue_policy(), &hand_off(&elsewhere, &one))
        .await
        .unwrap();
    assert!(none.is_empty(), "it does not serve the default lane");
    let (admission, none) = store
        .admit_run_and_claim(&spec(), &queue_policy(), &hand_off("no-such-worker", &one))
        .await
        .unwrap();
    assert!(none.is_empty());
    let Admission::Accepted(stands) = admission else {
        panic!("the submission stands without its worker");
    };
    assert_eq!(status(store, &stands.run.id).await, RunStatus::Pending);

    // The door still judges with every live worker: a run too big for the waiting worker
    // queues for a bigger one; one too big for all is refused, hand-off or not.
    let big = register(store, 6.0).await;
    let needs = |cpus: f64| {
        spec_with(|r| {
            r.resources = Some(Resources {
                cpus,
                memory_mb: 256,
            })
        })
    };
    let (admission, none) = store
        .admit_run_and_claim(&needs(4.0), &queue_policy(), &hand_off(&worker_id, &one))
        .await
        .unwrap();
    assert!(none.is_empty());
    assert!(
        matches!(admission, Admission::Accepted(c) if c.created),
        "{big} fits it"
    );
    let (admission, none) = store
        .admit_run_and_claim(&needs(64.0), &queue_policy(), &hand_off(&worker_id, &one))
        .await
        .unwrap();
    assert!(none.is_empty());
    assert!(matches!(admission, Admission::NeverFits));

    // A replayed key creates nothing and claims nothing, even with room.
    let roomy = register(store, 8.0).await;
    let keyed_spec = keyed("once", "true");
    store.create_run(&keyed_spec).await.unwrap();
    let (admission, none) = store
        .admit_run_and_claim(&keyed_spec, &queue_policy(), &hand_off(&roomy, &one))
        .await
        .unwrap();
    assert!(matches!(admission, Admission::Accepted(c) if !c.created));
    assert!(none.is_empty());
}

pub async fn a_batch_hands_what_fits_to_a_waiting_worker(h: &dyn Harness) {
    let fx = h.fresh().await;
    let store = &fx.store;
    let worker_id = register(store, 2.0).await;
    let limits = limits(8);
    let batch: Vec<_> = (0..3)
        .map(|i| (keyed(&format!("b{i}"), "true"), queue_policy()))
        .collect();
    let mut signals = store.subscribe();
    let (admission, claimed) = store
        .admit_runs_and_claim(&batch, &hand_off(&worker_id, &limits))
        .await
        .unwrap();
    let BatchAdmission::Accepted(runs) = admission else {
        panic!("a queue lane admits the batch");
    };
    // Two cpus: the first two, in order; the third waits and is signalled.
    assert_eq!(claimed.len(), 2);
    assert_eq!(claimed[0].run.id, runs[0].run.id);
    assert_eq!(claimed[1].run.id, runs[1].run.id);
    let statuses: Vec<RunStatus> = runs.iter().map(|c| c.run.status).collect();
    assert_eq!(
        statuses,
        [RunStatus::Claimed, RunStatus::Claimed, RunStatus::Pending]
    );
    assert_eq!(status(store, &runs[2].run.id).await, RunStatus::Pending);
    assert!(pending_signalled(&mut signals).await);

    // A batch refused whole claims nothing and writes nothing.
    let free = register(store, 4.0).await;
    let taken = store.create_run(&keyed("taken", "true")).await.unwrap();
    let refused = vec![
        (keyed("c0", "true"), queue_policy()),
        (keyed("taken", "false"), queue_policy()),
    ];
    let (admission, none) = store
        .admit_runs_and_claim(&refused, &hand_off(&free, &limits))
        .await
        .unwrap();
    assert!(matches!(
        admission,
        BatchAdmission::Refused { index: 1, .. }
    ));
    assert!(none.is_empty());
    assert_eq!(status(store, &taken.run.id).await, RunStatus::Pending);
    let page = store.list_runs(&RunFilter::default()).await.unwrap();
    assert_eq!(page.runs.len(), 4, "the refused batch wrote nothing");
}
