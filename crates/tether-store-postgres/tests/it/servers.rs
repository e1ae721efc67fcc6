//! What only the shared store promises: many servers (many `PgStore`s, each its own pool) on
//! one database, the database's clock, one sweep at a time, signals across servers, and a
//! reaper query that stays cheap however many finished runs there are.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sqlx::Row;
use tether_domain::{LanePolicy, Resources, RunSpec, RunStatus, Submission, SubmitDefaults};
use tether_store::{
    ClaimLimits, EventKind, NewWorker, ReapPolicy, RunBeat, RunFilter, Signal, Store, StoreError,
};
use tether_store_postgres::{PgStore, REAPER_LOCK, REAP_QUERY};

use tether_testkit::PgSchema;

fn spec_with(change: impl FnOnce(&mut Submission)) -> RunSpec {
    let mut request = Submission {
        command: vec!["true".into()],
        ..Submission::default()
    };
    change(&mut request);
    let fingerprint = format!("{request:?}");
    request
        .resolve(
            Some(&LanePolicy::default()),
            &SubmitDefaults::default(),
            fingerprint,
        )
        .expect("a valid submission")
}

fn worker(cpus: f64) -> NewWorker {
    NewWorker {
        name: "w".into(),
        capacity: Resources {
            cpus,
            memory_mb: 1024 * 1024,
        },
        lanes: Vec::new(),
        labels: BTreeMap::new(),
        secret_hash: None,
    }
}

fn limits(max_runs: u32) -> ClaimLimits {
    ClaimLimits {
        max_runs,
        lane_max_concurrency: BTreeMap::new(),
        ..ClaimLimits::default()
    }
}

async fn open(schema: &PgSchema) -> PgStore {
    PgStore::open_in_schema(&schema.url, &schema.name)
        .await
        .expect("open the store")
}

/// Waits up to `within` for a signal matching `wanted`.
async fn expect_signal(
    signals: &mut tokio::sync::broadcast::Receiver<Signal>,
    within: Duration,
    wanted: impl Fn(&Signal) -> bool,
) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, signals.recv()).await {
            Ok(Ok(signal)) if wanted(&signal) => return true,
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(_)) | Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_servers_migrating_one_schema_at_once_all_succeed() {
    let schema = PgSchema::new();
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let (url, name) = (schema.url.clone(), schema.name.clone());
            tokio::spawn(async move { PgStore::open_in_schema(&url, &name).await })
        })
        .collect();
    let mut stores = Vec::new();
    for open in opens {
        stores.push(open.await.unwrap().expect("every server opens"));
    }
    let applied: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\"._sqlx_migrations WHERE success",
        schema.name
    ))
    .fetch_one(stores[0].pool())
    .await
    .unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count() as i64;
    assert_eq!(applied, files, "each migration applied exactly once");
    for store in &stores {
        store.ping().await.unwrap();
        assert_eq!(store.schema(), schema.name);
    }
    let run = stores[1].create_run(&spec_with(|_| {})).await.unwrap().run;
    let seen = stores[3].get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(seen, run, "one schema, seen the same from every server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_hand_each_of_200_runs_to_exactly_one_of_10_workers() {
    let schema = PgSchema::new();
    let servers = [open(&schema).await, open(&schema).await];
    let mut ids = BTreeSet::new();
    for i in 0..200 {
        let run = servers[i % 2].create_run(&spec_with(|_| {})).await.unwrap();
        ids.insert(run.run.id);
    }
    let mut workers = Vec::new();
    for i in 0..10 {
        workers.push(
            servers[i % 2]
                .register_worker(&worker(1000.0))
                .await
                .unwrap()
                .id,
        );
    }
    let tasks: Vec<_> = workers
        .iter()
        .enumerate()
        .map(|(i, worker_id)| {
            let store = servers[i % 2].clone();
            let worker_id = worker_id.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let claimed = store.claim_runs(&worker_id, &limits(7)).await.unwrap();
                    if claimed.is_empty() {
                        // Rows another claim holds are skipped: stop only when none is left.
                        let pending = store
                            .list_runs(&RunFilter {
                                status: Some(RunStatus::Pending),
                                limit: 1,
                                ..RunFilter::default()
                            })
                            .await
                            .unwrap();
                        if pending.runs.is_empty() {
                            return (worker_id, mine);
                        }
                        tokio::task::yield_now().await;
                    }
                    for c in claimed {
                        assert_eq!(c.attempt, 1);
                        assert_eq!(c.run.worker_id.as_deref(), Some(worker_id.as_str()));
                        mine.push(c.run.id);
                    }
                }
            })
        })
        .collect();
    let mut holder: BTreeMap<String, String> = BTreeMap::new();
    let mut busy_workers = 0;
    for task in tasks {
        let (worker_id, mine) = task.await.unwrap();
        busy_workers += usize::from(!mine.is_empty());
        for run_id in mine {
            if let Some(other) = holder.insert(run_id.clone(), worker_id.clone()) {
                panic!("run {run_id} went to two workers: {other} and {worker_id}");
            }
        }
    }
    assert_eq!(holder.keys().cloned().collect::<BTreeSet<_>>(), ids);
    assert!(busy_workers > 1, "the claims ran side by side");
    let rows = sqlx::query(
        "SELECT run_id, count(*) AS n, min(worker_id) AS w FROM attempts GROUP BY run_id",
    )
    .fetch_all(servers[0].pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 200);
    for row in rows {
        let run_id: String = row.get("run_id");
        assert_eq!(row.get::<i64, _>("n"), 1, "one attempt for {run_id}");
        assert_eq!(row.get::<String, _>("w"), holder[&run_id]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_submitted_on_one_server_wakes_a_subscriber_on_another() {
    let schema = PgSchema::new();
    let a = open(&schema).await;
    let b = open(&schema).await;
    let other_schema = PgSchema::new();
    let stranger = open(&other_schema).await;
    let mut on_b = b.subscribe();
    let mut on_stranger = stranger.subscribe();

    let run = a
        .create_run(&spec_with(|r| r.lane = Some("builds".into())))
        .await
        .unwrap()
        .run;
    let pending = Signal::RunPending {
        lane: "builds".into(),
    };
    assert!(
        expect_signal(&mut on_b, Duration::from_secs(1), |s| *s == pending).await,
        "server B hears of a run submitted on A within a second"
    );

    // Events reach followers on B as they are written on A, and name committed data.
    let worker_id = a.register_worker(&worker(1.0)).await.unwrap().id;
    a.claim_runs(&worker_id, &limits(1)).await.unwrap();
    let started = a.start_attempt(&run.id, 1, &worker_id).await.unwrap();
    let wanted = Signal::RunEvents {
        run_id: run.id.clone(),
        seq: started.last_event_seq,
    };
    assert!(expect_signal(&mut on_b, Duration::from_secs(1), |s| *s == wanted).await);
    let events = b.events_after(&run.id, 0, 100).await.unwrap();
    assert_eq!(events.last().map(|e| e.seq), Some(started.last_event_seq));

    // A store on another schema of the same database hears nothing of it.
    assert!(
        !expect_signal(&mut on_stranger, Duration::from_millis(300), |_| true).await,
        "signals stay within their schema"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_sweeping_at_once_retry_each_stale_run_once() {
    let schema = PgSchema::new();
    let servers = [open(&schema).await, open(&schema).await];
    let stale = spec_with(|r| {
        r.heartbeat_timeout_s = Some(Some(0.2));
        r.max_attempts = Some(3);
    });
    let mut ids = BTreeSet::new();
    for _ in 0..20 {
        ids.insert(servers[0].create_run(&stale).await.unwrap().run.id);
    }
    let worker_id = servers[1].register_worker(&worker(100.0)).await.unwrap().id;
    assert_eq!(
        servers[1]
            .claim_runs(&worker_id, &limits(50))
            .await
            .unwrap()
            .len(),
        20
    );
    let beats: Vec<RunBeat> = ids
        .iter()
        .map(|id| RunBeat {
            run_id: id.clone(),
            attempt: 1,
            stdout_bytes: 0,
            stderr_bytes: 0,
            since_last_output_s: None,
        })
        .collect();
    servers[0].heartbeat(&worker_id, &beats).await.unwrap();
    let deadline = servers[0].now().await.unwrap() + 250;
    while servers[1].now().await.unwrap() <= deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let policy = ReapPolicy {
        timeout_grace_ms: 0,
        ..ReapPolicy::default()
    };
    let mut reaped = Vec::new();
    let mut swept = 0;
    for _round in 0..3 {
        let sweeps: Vec<_> = (0..8)
            .map(|i| {
                let store = servers[i % 2].clone();
                tokio::spawn(async move { store.reap_stale_runs(&policy).await.unwrap() })
            })
            .collect();
        for sweep in sweeps {
            let report = sweep.await.unwrap();
            swept += usize::from(report.swept);
            if !report.swept {
                assert!(report.reaped.is_empty(), "a skipped sweep changes nothing");
            }
            reaped.extend(report.reaped);
        }
    }
    assert!(swept >= 1);
    let reaped_ids: BTreeSet<String> = reaped.iter().map(|r| r.run_id.clone()).collect();
    assert_eq!(
        reaped.len(),
        20,
        "each stale run reaped by exactly one sweep"
    );
    assert_eq!(reaped_ids, ids);
    for id in &ids {
        let run = servers[0].get_run(id).await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Pending, "retried");
        assert_eq!(servers[1].list_attempts(id).await.unwrap().len(), 1);
        let retries = servers[1]
            .events_after(id, 0, 100)
            .await
            .unwrap()
            .iter()
            .filter(|e| {
                e.kind == EventKind::Status
                    && e.body.status().map(|s| s.status) == Some(RunStatus::Pending)
            })
            .count();
        assert_eq!(retries, 2, "created, then retried once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_one_server_sweeps_the_others_skip_the_sweep() {
    let schema = PgSchema::new();
    let store = open(&schema).await;
    let policy = ReapPolicy::default();
    assert!(store.reap_stale_runs(&policy).await.unwrap().swept);

    // Another server mid-sweep: it holds the sweep's lock for its transaction.
    let mut other = schema.connect().await;
    sqlx::query(&format!("SET search_path TO \"{}\"", schema.name))
        .execute(&mut other)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    let got: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext(current_schema()))")
            .bind(REAPER_LOCK)
            .fetch_one(&mut other)
            .await
            .unwrap();
    assert!(got);
    let report = store.reap_stale_runs(&policy).await.unwrap();
    assert!(!report.swept, "the sweep is left to the server holding it");
    assert!(report.reaped.is_empty());

    // A store in another schema sweeps regardless: the lock is per schema.
    let elsewhere = PgSchema::new();
    assert!(
        open(&elsewhere)
            .await
            .reap_stale_runs(&policy)
            .await
            .unwrap()
            .swept
    );

    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    assert!(store.reap_stale_runs(&policy).await.unwrap().swept);
}

/// Every plan node of an `EXPLAIN (FORMAT JSON)` answer: (node type, relation, index).
fn plan_nodes(plan: &serde_json::Value, out: &mut Vec<(String, String, String)>) {
    let text = |key: &str| plan[key].as_str().unwrap_or_default().to_string();
    out.push((text("Node Type"), text("Relation Name"), text("Index Name")));
    if let Some(children) = plan["Plans"].as_array() {
        for child in children {
            plan_nodes(child, out);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_query_uses_partial_indexes_over_100k_finished_runs() {
    let schema = PgSchema::new();
    let store = open(&schema).await;
    // A few runs in flight, so the partial indexes are not empty.
    let worker_id = store.register_worker(&worker(10.0)).await.unwrap().id;
    for _ in 0..5 {
        store.create_run(&spec_with(|_| {})).await.unwrap();
    }
    assert_eq!(
        store
            .claim_runs(&worker_id, &limits(5))
            .await
            .unwrap()
            .len(),
        5
    );
    let spec = tether_store::encode_spec(&spec_with(|_| {})).unwrap();
    let inserted = sqlx::query(
        "INSERT INTO runs (id, lane, status, attempt, max_attempts, spec, cpus, memory_mb, \
         created_at, finished_at, heartbeat_timeout_ms, output_limit_bytes, request_fingerprint, \
         exit_code, last_event_seq) \
         SELECT 'old-' || n, 'default', 'succeeded', 1, 3, $1::jsonb, 1.0, 256, \
                tether_now_ms() - 86400000, tether_now_ms() - 86000000, 60000, 1048576, '{}', \
                0, 4 \
         FROM generate_series(1, 100000) AS n",
    )
    .bind(&spec)
    .execute(store.pool())
    .await
    .unwrap();
    assert_eq!(inserted.rows_affected(), 100_000);
    sqlx::query("ANALYZE runs")
        .execute(store.pool())
        .await
        .unwrap();

    let plan_text = store
        .explain_reap_query(&ReapPolicy::default())
        .await
        .unwrap();
    let plan: serde_json::Value = serde_json::from_str(&plan_text).unwrap();
    let mut nodes = Vec::new();
    plan_nodes(&plan[0]["Plan"], &mut nodes);
    let partial = [
        "runs_in_flight_stale_at",
        "runs_in_flight_timeout_at",
        "runs_in_flight_cancel",
    ];
    for (node, relation, _) in &nodes {
        assert!(
            !(node == "Seq Scan" && relation == "runs"),
            "no sequential scan of runs: {plan_text}"
        );
    }
    let index_scans: Vec<&(String, String, String)> = nodes
        .iter()
        .filter(|(node, _, index)| {
            ["Index Scan", "Index Only Scan", "Bitmap Index Scan"].contains(&node.as_str())
                && partial.contains(&index.as_str())
        })
        .collect();
    assert!(
        !index_scans.is_empty(),
        "the selection is served by a partial index: {plan_text}"
    );
    eprintln!("reaper plan nodes: {nodes:?}");
    assert!(plan_text.contains("runs_in_flight_"));
    assert!(REAP_QUERY.contains("status IN ('claimed', 'running')"));

    // And it still finds what is due among them.
    assert!(store
        .reap_stale_runs(&ReapPolicy::default())
        .await
        .unwrap()
        .reaped
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn now_is_the_database_clock() {
    let schema = PgSchema::new();
    let store = open(&schema).await;
    let before: f64 = sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let now = store.now().await.unwrap();
    let after: f64 = sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let (before, after) = ((before * 1000.0) as i64, (after * 1000.0).ceil() as i64);
    assert!(
        before <= now && now <= after,
        "{before} <= {now} <= {after}: now() is the database's"
    );
    // Stamps come from the same clock.
    let run = store.create_run(&spec_with(|_| {})).await.unwrap().run;
    let later = store.now().await.unwrap();
    assert!(now <= run.created_at && run.created_at <= later);
    let stamped: i64 = sqlx::query_scalar("SELECT ts FROM run_events WHERE run_id = $1")
        .bind(&run.id)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(stamped, run.created_at, "one clock reading per transaction");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connections_come_back_and_so_does_the_listener() {
    let schema = PgSchema::new();
    let a = open(&schema).await;
    let b = open(&schema).await;
    let mut on_b = b.subscribe();
    a.create_run(&spec_with(|r| r.lane = Some("waiting".into())))
        .await
        .unwrap();
    let waiting = Signal::RunPending {
        lane: "waiting".into(),
    };
    // The submission's own notification, so what follows can only come from the reconnect.
    assert!(expect_signal(&mut on_b, Duration::from_secs(2), |s| *s == waiting).await);

    // Every session of both servers dies, as in a database restart.
    let mut admin = schema.connect().await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(format!("tether:{}", schema.name))
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(
        killed.len() >= 2,
        "the stores' sessions, listeners included"
    );

    // B's listener reconnects by itself and wakes its receivers to re-read what they may
    // have missed.
    let catch_up = Signal::RunPending {
        lane: "waiting".into(),
    };
    assert!(
        expect_signal(&mut on_b, Duration::from_secs(10), |s| *s == catch_up).await,
        "a reconnect wakes receivers"
    );
    // Requests work again (the pool replaces dead connections), without panics: at worst a
    // request that raced the loss answers `Unavailable`.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match a.ping().await {
            Ok(()) => break,
            Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("the store did not come back: {e}"),
        }
    }
    a.create_run(&spec_with(|r| r.lane = Some("after".into())))
        .await
        .unwrap();
    let after = Signal::RunPending {
        lane: "after".into(),
    };
    assert!(
        expect_signal(&mut on_b, Duration::from_secs(2), |s| *s == after).await,
        "signals cross servers again"
    );
}

/// Signals sent while a listener is down are lost; its catch-up wakes whatever waits on them:
/// every live worker's claim (`RoomFreed`) and the control poll of a run whose cancel was
/// asked (`CancelRequested`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_gap_the_listener_wakes_claims_and_cancels() {
    let schema = PgSchema::new();
    let a = open(&schema).await;
    let b = open(&schema).await;
    let mut on_b = b.subscribe();
    let w = a.register_worker(&worker(4.0)).await.unwrap();
    let run = a.create_run(&spec_with(|_| {})).await.unwrap().run;
    let claimed = a.claim_runs(&w.id, &limits(1)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    a.request_cancel(&run.id).await.unwrap();
    let cancel = Signal::CancelRequested {
        run_id: run.id.clone(),
        attempt: claimed[0].attempt,
        worker_id: w.id.clone(),
    };
    // The cancel's own notification, so what follows can only come from the catch-up: no
    // attempt ends and nothing is asked after this.
    assert!(expect_signal(&mut on_b, Duration::from_secs(2), |s| *s == cancel).await);

    let mut admin = schema.connect().await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(format!("tether:{}", schema.name))
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(
        killed.len() >= 2,
        "the stores' sessions, listeners included"
    );

    // Sent in this order by the catch-up: room for every live worker, then the cancels.
    assert!(
        expect_signal(&mut on_b, Duration::from_secs(10), |s| matches!(
            s,
            Signal::RoomFreed { worker_id, .. } if *worker_id == w.id
        ))
        .await,
        "a reconnect wakes the worker's claim"
    );
    assert!(
        expect_signal(&mut on_b, Duration::from_secs(2), |s| *s == cancel).await,
        "a reconnect repeats the cancel to its holder's control poll"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_its_database_answers_unavailable() {
    let schema = PgSchema::new();
    let store = open(&schema).await;
    store.close().await;
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(store.now().await, Err(StoreError::Unavailable(_))));
    assert!(matches!(
        store.create_run(&spec_with(|_| {})).await,
        Err(StoreError::Unavailable(_))
    ));
    // Nobody listens on a port of 1: opening fails the same way, never panics.
    let refused = PgStore::open("postgres://postgres@127.0.0.1:1/test?connect_timeout=1").await;
    assert!(matches!(refused, Err(StoreError::Unavailable(_))));
    assert!(matches!(
        PgStore::open_in_schema(&schema.url, "Bad-Name").await,
        Err(StoreError::Unavailable(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_submitted_at_once_on_two_servers_makes_one_run() {
    let schema = PgSchema::new();
    let servers = [open(&schema).await, open(&schema).await];
    let keyed = spec_with(|r| r.idempotency_key = Some("deploy-7".into()));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = servers[i % 2].clone();
            let keyed = keyed.clone();
            tokio::spawn(async move { store.create_run(&keyed).await.unwrap() })
        })
        .collect();
    let mut created = 0;
    let mut ids = BTreeSet::new();
    for task in tasks {
        let answer = task.await.unwrap();
        created += usize::from(answer.created);
        ids.insert(answer.run.id);
    }
    assert_eq!(created, 1, "one submission made the run");
    assert_eq!(ids.len(), 1, "every other one got the same run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reject_lane_admits_only_what_fits_across_servers() {
    use tether_store::{Admission, AdmissionPolicy};
    let schema = PgSchema::new();
    let servers = [open(&schema).await, open(&schema).await];
    servers[0].register_worker(&worker(4.0)).await.unwrap();
    let policy = AdmissionPolicy {
        reject_when_full: true,
        max_concurrency: None,
        worker_fresh_ms: 60_000,
    };
    let spec = spec_with(|_| {});
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let store = servers[i % 2].clone();
            let spec = spec.clone();
            tokio::spawn(async move { store.admit_run(&spec, &policy).await.unwrap() })
        })
        .collect();
    let (mut accepted, mut full) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Admission::Accepted(_) => accepted += 1,
            Admission::LaneFull => full += 1,
            Admission::NeverFits => panic!("a 1-cpu run fits a 4-cpu worker"),
        }
    }
    assert_eq!(
        (accepted, full),
        (4, 8),
        "room for four, decided one at a time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_path_in_the_url_picks_the_schema() {
    let schema = PgSchema::new();
    let first = open(&schema).await;
    let run = first.create_run(&spec_with(|_| {})).await.unwrap().run;
    let join = if schema.url.contains('?') { '&' } else { '?' };
    let url = format!(
        "{}{join}options=-csearch_path%3D{}",
        schema.url, schema.name
    );
    let by_url = PgStore::open(&url).await.unwrap();
    assert_eq!(by_url.schema(), schema.name);
    assert_eq!(by_url.get_run(&run.id).await.unwrap(), Some(run));
}

/// Text PostgreSQL cannot hold (a NUL) is the caller's mistake: `InvalidInput`, never
/// `Unavailable`, so the API answers 422 rather than 503 with Retry-After.
#[tokio::test]
async fn a_value_postgres_refuses_as_data_is_invalid_input_not_an_outage() {
    let schema = PgSchema::new();
    let store = PgStore::open_in_schema(&schema.url, &schema.name)
        .await
        .unwrap();
    let err = store
        .register_worker(&NewWorker {
            name: "w\0".into(),
            capacity: Resources::default(),
            lanes: Vec::new(),
            labels: BTreeMap::new(),
            secret_hash: None,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidInput(_)), "{err:?}");
    assert!(store.list_workers().await.unwrap().is_empty());
}

/// The payloads on the signal channel for `schema`, heard by the test's own connection
/// within `within`.
async fn heard_on_the_channel(
    ear: &mut sqlx::postgres::PgListener,
    schema: &str,
    within: Duration,
    wanted: impl Fn(&str) -> bool,
) -> bool {
    let deadline = Instant::now() + within;
    let tag = format!("\"s\":\"{schema}\"");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ear.recv()).await {
            Ok(Ok(n)) if n.payload().contains(&tag) && wanted(n.payload()) => return true,
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_server_notifies_nothing_until_another_appears() {
    let schema = PgSchema::new();
    let a = open(&schema).await;
    a.end_startup_grace();
    let mut ear = sqlx::postgres::PgListener::connect(&schema.url)
        .await
        .unwrap();
    ear.listen(tether_store_postgres::signals::CHANNEL)
        .await
        .unwrap();
    let signals = |payload: &str| payload.contains("\"all\"");

    // Alone: a commit that earns signals sends no notification.
    a.create_run(&spec_with(|r| r.lane = Some("alone".into())))
        .await
        .unwrap();
    assert!(
        !heard_on_the_channel(&mut ear, &schema.name, Duration::from_millis(500), signals).await,
        "a lone server notifies nobody"
    );

    // A second server says hi; the first answers, and notifies from then on.
    let b = open(&schema).await;
    assert!(
        heard_on_the_channel(&mut ear, &schema.name, Duration::from_secs(5), |p| p
            .contains("\"k\":\"here\""))
        .await,
        "the first server answers the second's hello"
    );
    a.create_run(&spec_with(|r| r.lane = Some("together".into())))
        .await
        .unwrap();
    assert!(
        heard_on_the_channel(&mut ear, &schema.name, Duration::from_secs(2), |p| {
            signals(p) && p.contains("\"lane\":\"together\"")
        })
        .await,
        "with a peer listening, commits notify"
    );
    // And the second, past its own grace, notifies the first, which it has heard.
    b.end_startup_grace();
    let mut on_a = a.subscribe();
    b.create_run(&spec_with(|r| r.lane = Some("from-b".into())))
        .await
        .unwrap();
    let pending = Signal::RunPending {
        lane: "from-b".into(),
    };
    assert!(expect_signal(&mut on_a, Duration::from_secs(2), |s| *s == pending).await);
}
