//! Lanes and capacity (SPEC §4): refuse at the door atomically with an honest Retry-After,
//! queue first in first out with visible reasons, and release reservations on every ending.

use std::time::Duration;

use serde_json::{json, Value};
use tether_server::ServerConfig;

use crate::harness::{assert_error, fast_config, pg_store, PgSchema, TestServer};

fn lanes(toml_text: &str) -> ServerConfig {
    ServerConfig {
        lanes: tether_server::config_file::parse(toml_text).unwrap(),
        ..fast_config()
    }
}

const STRICT: &str = "[lanes.strict]\non_full = \"reject\"\n";

/// Registers a worker and keeps it heartbeating (it holds no runs) until the test ends.
async fn live_worker(s: &TestServer, cpus: f64) -> String {
    let worker = s.register(cpus).await;
    let http = s.http.clone();
    let url = s.url(&format!("/v1/workers/{worker}/heartbeat"));
    let secret = s.secrets.lock().unwrap()[&worker].clone();
    tokio::spawn(async move {
        loop {
            let _ = http
                .post(&url)
                .header(tether_api::WORKER_SECRET_HEADER, &secret)
                .json(&json!({"runs": []}))
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    worker
}

/// Fires `n` submissions at once at `bases` (round-robin); returns (status, Retry-After, body).
async fn submit_all(
    http: &reqwest::Client,
    bases: &[String],
    n: usize,
    body: Value,
) -> Vec<(u16, Option<u64>, Value)> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let http = http.clone();
            let url = format!("{}/v1/runs", bases[i % bases.len()]);
            let body = body.clone();
            tokio::spawn(async move {
                let r = http.post(url).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                let retry_after = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().parse::<u64>().expect("whole seconds"));
                (status, retry_after, r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn assert_five_of_fifty(answers: &[(u16, Option<u64>, Value)]) {
    let accepted = answers.iter().filter(|(s, _, _)| *s == 202).count();
    let refused: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 503).collect();
    assert_eq!((accepted, refused.len()), (5, 45), "{answers:?}");
    for (_, retry_after, body) in refused {
        assert_eq!(body["error"]["code"], "resources_exhausted");
        assert!(retry_after.is_some_and(|s| s >= 1), "{retry_after:?}");
    }
}

#[tokio::test]
async fn fifty_at_once_into_room_for_five_admits_exactly_five_on_sqlite() {
    let s = TestServer::start_with(lanes(STRICT)).await;
    live_worker(&s, 5.0).await;
    let answers = submit_all(
        &s.http,
        std::slice::from_ref(&s.base),
        50,
        json!({"command": ["true"], "lane": "strict"}),
    )
    .await;
    assert_five_of_fifty(&answers);
    let (_, page) = s.get("/v1/runs?lane=strict").await;
    assert_eq!(
        page["runs"].as_array().unwrap().len(),
        5,
        "a refusal wrote a run"
    );
}

/// Two servers on one fresh PostgreSQL schema.
struct PgPair {
    a: TestServer,
    b: TestServer,
    /// Last, so the servers go before their schema.
    _schema: PgSchema,
}

async fn pg_pair(config: ServerConfig) -> PgPair {
    let schema = PgSchema::new();
    let a = TestServer::start_on(config.clone(), pg_store(&schema).await).await;
    let b = TestServer::start_on(config, pg_store(&schema).await).await;
    PgPair {
        a,
        b,
        _schema: schema,
    }
}

#[tokio::test]
async fn fifty_at_once_over_two_servers_admits_exactly_five_on_postgres() {
    let pair = pg_pair(lanes(STRICT)).await;
    live_worker(&pair.a, 5.0).await;
    let bases = [pair.a.base.clone(), pair.b.base.clone()];
    let answers = submit_all(
        &pair.a.http,
        &bases,
        50,
        json!({"command": ["true"], "lane": "strict"}),
    )
    .await;
    assert_five_of_fifty(&answers);
    let (_, page) = pair.b.get("/v1/runs?lane=strict").await;
    assert_eq!(page["runs"].as_array().unwrap().len(), 5);
}

#[tokio::test]
async fn a_run_bigger_than_every_worker_is_422_never_fits() {
    let s = TestServer::start_with(lanes(STRICT)).await;
    live_worker(&s, 4.0).await;
    let (status, body) = s
        .post("/v1/runs", json!({"command": ["true"], "lane": "strict", "resources": {"cpus": 8, "memory_mb": 256}}))
        .await;
    assert_error(status, &body, 422, "never_fits");
    let (_, page) = s.get("/v1/runs").await;
    assert_eq!(page["runs"], json!([]));
}

#[tokio::test]
async fn with_no_live_worker_a_reject_lane_answers_503() {
    let s = TestServer::start_with(lanes(STRICT)).await;
    let (status, body) = s
        .post("/v1/runs", json!({"command": ["true"], "lane": "strict"}))
        .await;
    assert_error(status, &body, 503, "resources_exhausted");
    // A worker that registered and went silent is not live either.
    s.register(8.0).await;
    tokio::time::sleep(Duration::from_millis(400)).await; // 1.5 heartbeat intervals of 200 ms
    let (status, body) = s
        .post("/v1/runs", json!({"command": ["true"], "lane": "strict"}))
        .await;
    assert_error(status, &body, 503, "resources_exhausted");
}

#[tokio::test]
async fn retry_after_is_derived_from_what_is_running() {
    let s = TestServer::start_with(lanes(STRICT)).await;
    let worker = live_worker(&s, 1.0).await;
    for (timeout_s, low, high) in [(30, 25, 31), (8, 4, 9)] {
        let run = s
            .submit(json!({"command": ["sleep", "99"], "lane": "strict", "timeout_s": timeout_s}))
            .await;
        let a = s.claim(&worker, 1).await;
        assert_eq!(a[0]["run_id"], run["id"]);
        let r = s
            .http
            .post(s.url("/v1/runs"))
            .json(&json!({"command": ["true"], "lane": "strict"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 503);
        let retry: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (low..=high).contains(&retry),
            "timeout {timeout_s}s gave Retry-After {retry}"
        );
        let id = run["id"].as_str().unwrap();
        let (status, _) = s
            .post(
                &format!("/v1/runs/{id}/attempts/1/finish"),
                json!({"worker_id": worker, "status": "succeeded", "exit_code": 0}),
            )
            .await;
        assert_eq!(status, 200);
    }
}

#[tokio::test]
async fn a_queue_lane_drains_in_submission_order_and_says_why_runs_wait() {
    let s = TestServer::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let submitted = s.submit(json!({"command": ["echo", i.to_string()]})).await;
        assert_eq!(submitted["queue_position"], i + 1);
        let run = s.run(submitted["id"].as_str().unwrap()).await;
        assert!(
            run["waiting_reason"]
                .as_str()
                .unwrap()
                .contains("no live worker"),
            "{run}"
        );
        ids.push(run["id"].as_str().unwrap().to_string());
    }
    let worker = live_worker(&s, 1.0).await;
    let mut order = Vec::new();
    for _ in 0..5 {
        let a = s.claim(&worker, 5).await;
        assert_eq!(a.len(), 1, "a 1-cpu worker takes one 1-cpu run at a time");
        let id = a[0]["run_id"].as_str().unwrap().to_string();
        // The rest wait for room, and say so.
        let (_, page) = s.get("/v1/runs?status=pending").await;
        for waiting in page["runs"].as_array().unwrap() {
            assert!(
                waiting["waiting_reason"]
                    .as_str()
                    .unwrap()
                    .contains("free up"),
                "{waiting}"
            );
        }
        let (status, _) = s
            .post(
                &format!("/v1/runs/{id}/attempts/1/finish"),
                json!({"worker_id": worker, "status": "succeeded", "exit_code": 0}),
            )
            .await;
        assert_eq!(status, 200);
        order.push(id);
    }
    assert_eq!(order, ids);
}

#[tokio::test]
async fn a_reaped_run_releases_its_reservation_and_the_next_starts() {
    let s = TestServer::start().await;
    let worker = live_worker(&s, 1.0).await;
    let first = s
        .submit(json!({"command": ["sleep", "99"], "max_attempts": 1, "heartbeat_timeout_s": 0.3}))
        .await;
    let second = s.submit(json!({"command": ["true"]})).await;
    let a = s.claim(&worker, 2).await;
    assert_eq!(a.len(), 1);
    assert_eq!(a[0]["run_id"], first["id"]);
    let (_, lanes) = s.get("/v1/lanes").await;
    let default = &lanes["lanes"][0];
    assert_eq!(
        (default["in_flight"].clone(), default["pending"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(default["reserved"]["cpus"], 1.0);
    assert_eq!(default["capacity"]["cpus"], 1.0);
    // The worker heartbeats for itself but not for the run: the run goes stale and is reaped.
    let id = first["id"].as_str().unwrap();
    s.wait_for(id, Duration::from_secs(5), |r| r["status"] == "timed_out")
        .await;
    let a = s.claim(&worker, 2).await;
    assert_eq!(a.len(), 1);
    assert_eq!(
        a[0]["run_id"], second["id"],
        "the reaped run's room went to the next run"
    );
}

#[tokio::test]
async fn lanes_are_listed_with_policy_and_load() {
    let s = TestServer::start_with(lanes(
        "[lanes.builds]\non_full = \"reject\"\nmax_concurrency = 8\ntimeout_s = 3600\n",
    ))
    .await;
    live_worker(&s, 4.0).await;
    let (status, body) = s.get("/v1/lanes").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = body["lanes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "builds"]);
    let builds = &body["lanes"][1];
    assert_eq!(builds["on_full"], "reject");
    assert_eq!(builds["max_concurrency"], 8);
    assert_eq!(builds["live_workers"], 1);
    assert_eq!(builds["capacity"]["cpus"], 4.0);
}

/// `GET /v1/lanes` reads the store at most once per interval for however many ask, yet every
/// answer shows what was written before it was asked: polled hard, between submissions, and
/// by many at once.
#[tokio::test]
async fn lanes_polled_hard_still_show_every_earlier_write() {
    let s = TestServer::start().await;
    for n in 1..=4 {
        s.submit(json!({"command": ["true"]})).await;
        let answers = futures::future::join_all((0..8).map(|_| s.get("/v1/lanes"))).await;
        for (status, body) in answers {
            assert_eq!(status, 200);
            assert_eq!(body["lanes"][0]["pending"], json!(n), "{body}");
        }
    }
}
