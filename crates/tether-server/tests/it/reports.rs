//! `POST /v1/workers/{id}/attempts` (issue 15): many starts and finishes in one call, each
//! fenced and answered alone, and a claim riding on the finishes; on both stores.

use std::time::Duration;

use serde_json::{json, Value};
use tether_server::ServerConfig;

use crate::harness::{assert_error, fast_config, pg_server, PgSchema, TestServer};

fn config() -> ServerConfig {
    ServerConfig {
        // Long enough that the worker stays fresh (and claimable) however slow the machine.
        heartbeat_interval: Duration::from_secs(10),
        stale_after: Duration::from_secs(60),
        ..fast_config()
    }
}

async fn server(postgres: bool) -> (TestServer, Option<PgSchema>) {
    if !postgres {
        return (TestServer::start_with(config()).await, None);
    }
    let (s, schema) = pg_server(config()).await;
    (s, Some(schema))
}

fn refs(assignments: &[Value]) -> Vec<(String, u64)> {
    assignments
        .iter()
        .map(|a| {
            (
                a["run_id"].as_str().unwrap().to_string(),
                a["attempt"].as_u64().unwrap(),
            )
        })
        .collect()
}

async fn event_kinds(s: &TestServer, run_id: &str) -> Vec<String> {
    let events = s.state().store.events_after(run_id, 0, 100).await.unwrap();
    events
        .iter()
        .map(|e| {
            serde_json::to_value(e.kind)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

async fn a_stale_item_is_refused_alone(postgres: bool) {
    let (s, _guard) = server(postgres).await;
    let worker = s.register(8.0).await;
    for _ in 0..3 {
        s.submit(json!({"command": ["true"]})).await;
    }
    let claimed = refs(&s.claim(&worker, 3).await);
    assert_eq!(claimed.len(), 3);
    let (a, b, c) = (&claimed[0], &claimed[1], &claimed[2]);
    // `c` is ended by the single call first: its attempt is no longer current.
    let (status, body) = s
        .post(
            &format!("/v1/runs/{}/attempts/{}/finish", c.0, c.1),
            json!({"worker_id": worker, "status": "succeeded", "exit_code": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Two more runs wait, for the claim riding on the finishes.
    let d = s.submit(json!({"command": ["true"]})).await;
    let e = s.submit(json!({"command": ["true"]})).await;

    let path = format!("/v1/workers/{worker}/attempts");
    let (status, body) = s
        .post(
            &path,
            json!({
                "starts": [
                    {"run_id": a.0, "attempt": a.1, "pid": 10},
                    {"run_id": c.0, "attempt": c.1, "pid": 12},
                    {"run_id": b.0, "attempt": b.1, "pid": 11},
                ],
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let starts = body["starts"].as_array().unwrap();
    assert_eq!(starts.len(), 3);
    assert_eq!(starts[0]["run_id"], a.0.as_str());
    assert_eq!(starts[0]["run_status"], "running", "{body}");
    assert_eq!(starts[1]["run_id"], c.0.as_str());
    assert_eq!(starts[1]["error"]["status"], 409, "{body}");
    assert_eq!(starts[1]["error"]["code"], "stale_attempt", "{body}");
    assert_eq!(starts[2]["run_status"], "running", "{body}");
    assert_eq!(body["assignments"], json!([]), "no claim, no assignments");

    let (status, body) = s
        .post(
            &path,
            json!({
                "finishes": [
                    {"run_id": a.0, "attempt": a.1, "status": "succeeded", "exit_code": 0},
                    {"run_id": c.0, "attempt": c.1, "status": "failed", "exit_code": 1},
                    {"run_id": b.0, "attempt": b.1, "status": "running"},
                    {"run_id": b.0, "attempt": b.1 + 1, "status": "failed", "exit_code": 2},
                ],
                "claim": {"max_runs": 1},
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let finishes = body["finishes"].as_array().unwrap();
    assert_eq!(finishes.len(), 4);
    assert_eq!(finishes[0]["run_status"], "succeeded", "{body}");
    assert_eq!(finishes[1]["error"]["code"], "stale_attempt", "{body}");
    // No attempt ends as `running`: that item alone is refused, as the single call would be.
    assert_eq!(finishes[2]["error"]["status"], 422, "{body}");
    assert_eq!(finishes[2]["error"]["code"], "invalid_field", "{body}");
    assert_eq!(finishes[3]["error"]["code"], "stale_attempt", "{body}");
    // The claim took the oldest waiting run, and only as many as asked.
    let assigned = refs(body["assignments"].as_array().unwrap());
    assert_eq!(assigned, vec![(d["id"].as_str().unwrap().to_string(), 1)]);

    // What landed, landed once; what was refused changed nothing.
    assert_eq!(s.run(&a.0).await["status"], "succeeded");
    assert_eq!(s.run(&c.0).await["status"], "succeeded");
    let run_b = s.run(&b.0).await;
    assert_eq!(run_b["status"], "running", "{run_b}");
    assert_eq!(run_b["attempt"], 1);
    assert_eq!(s.run(e["id"].as_str().unwrap()).await["status"], "pending");
    assert_eq!(
        event_kinds(&s, &a.0).await,
        ["status", "status", "attempt", "status", "status", "end"]
    );

    // `b` finishes alone through the batch, and its start repeated is a no-op.
    let (status, body) = s
        .post(
            &path,
            json!({
                "starts": [{"run_id": b.0, "attempt": b.1}],
                "finishes": [{"run_id": b.0, "attempt": b.1, "status": "failed", "exit_code": 3}],
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["starts"][0]["run_status"], "running", "{body}");
    assert_eq!(body["finishes"][0]["run_status"], "failed", "{body}");
    let run_b = s.run(&b.0).await;
    assert_eq!(run_b["exit_code"], 3, "{run_b}");
}

#[tokio::test]
async fn a_stale_item_among_fresh_ones_is_refused_alone_sqlite() {
    a_stale_item_is_refused_alone(false).await;
}

#[tokio::test]
async fn a_stale_item_among_fresh_ones_is_refused_alone_postgres() {
    a_stale_item_is_refused_alone(true).await;
}

#[tokio::test]
async fn a_report_is_bounded_and_belongs_to_its_worker() {
    let s = TestServer::start_with(config()).await;
    let worker = s.register(1.0).await;
    let path = format!("/v1/workers/{worker}/attempts");
    let starts: Vec<Value> = (0..1001)
        .map(|i| json!({"run_id": format!("r{i}"), "attempt": 1}))
        .collect();
    let (status, body) = s.post(&path, json!({ "starts": starts })).await;
    assert_error(status, &body, 422, "invalid_field");

    // Without the worker's secret: refused whole.
    let r = s
        .http
        .post(s.url(&path))
        .json(&json!({"starts": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    let (status, body) = s
        .post(
            "/v1/workers/nobody/attempts",
            json!({"finishes": [{"run_id": "x", "attempt": 1, "status": "succeeded"}]}),
        )
        .await;
    assert_error(status, &body, 404, "unknown_worker");

    // An unknown run is that item's `404 not_found`.
    let (status, body) = s
        .post(
            &path,
            json!({"finishes": [{"run_id": "nope", "attempt": 1, "status": "succeeded"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["finishes"][0]["error"]["status"], 404, "{body}");
}
