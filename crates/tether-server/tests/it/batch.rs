//! `POST /v1/runs/batch` (issue 15): many runs in one transaction, refused whole with the index
//! of the bad entry, replayed by key, all or nothing in a `reject` lane; on both stores.

use std::time::Duration;

use serde_json::{json, Value};
use tether_server::ServerConfig;

use crate::harness::{assert_error, fast_config, pg_server, PgSchema, TestServer};

fn config() -> ServerConfig {
    ServerConfig {
        lanes: tether_server::config_file::parse("[lanes.strict]\non_full = \"reject\"\n").unwrap(),
        ..fast_config()
    }
}

/// A SQLite server, or one on a fresh PostgreSQL schema (dropped by the guard).
async fn server(postgres: bool) -> (TestServer, Option<PgSchema>) {
    if !postgres {
        return (TestServer::start_with(config()).await, None);
    }
    let (s, schema) = pg_server(config()).await;
    (s, Some(schema))
}

async fn count_runs(s: &TestServer) -> usize {
    let (_, body) = s.get("/v1/runs?limit=500").await;
    body["runs"].as_array().unwrap().len()
}

fn ids(body: &Value) -> Vec<String> {
    body["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

async fn batch_is_one_transaction(postgres: bool) {
    let (s, _guard) = server(postgres).await;
    let runs: Vec<Value> = (0..3)
        .map(|i| json!({"command": ["echo", i.to_string()], "idempotency_key": format!("k{i}")}))
        .collect();
    let (status, first) = s.post("/v1/runs/batch", json!({ "runs": runs })).await;
    assert_eq!(status, 202, "{first}");
    let first_ids = ids(&first);
    assert_eq!(first_ids.len(), 3);
    for (i, run) in first["runs"].as_array().unwrap().iter().enumerate() {
        assert_eq!(run["status"], "pending");
        assert_eq!(run["command"], json!(["echo", i.to_string()]), "in order");
    }
    // The same batch again: the same runs.
    let (status, again) = s.post("/v1/runs/batch", json!({ "runs": runs })).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(ids(&again), first_ids);
    assert_eq!(count_runs(&s).await, 3);

    // Bad input anywhere is refused whole, naming the entry.
    let bad = json!({"runs": [{"command": ["true"]}, {"command": ["true"]}, {"command": []}]});
    let (status, body) = s.post("/v1/runs/batch", bad).await;
    assert_error(status, &body, 422, "invalid_field");
    assert_eq!(body["error"]["index"], 2, "{body}");
    let typo = json!({"runs": [{"command": ["true"]}, {"command": ["true"], "bogus": 1}]});
    let (status, body) = s.post("/v1/runs/batch", typo).await;
    assert_error(status, &body, 422, "invalid_field");
    assert_eq!(body["error"]["index"], 1, "{body}");
    let lane = json!({"runs": [{"command": ["true"], "lane": "nope"}]});
    let (status, body) = s.post("/v1/runs/batch", lane).await;
    assert_error(status, &body, 422, "unknown_lane");
    assert_eq!(body["error"]["index"], 0);
    let conflict =
        json!({"runs": [{"command": ["true"]}, {"command": ["false"], "idempotency_key": "k1"}]});
    let (status, body) = s.post("/v1/runs/batch", conflict).await;
    assert_error(status, &body, 409, "idempotency_conflict");
    assert_eq!(body["error"]["index"], 1);
    let (status, body) = s.post("/v1/runs/batch", json!({"runs": []})).await;
    assert_error(status, &body, 422, "invalid_field");
    assert_eq!(count_runs(&s).await, 3, "no refused batch wrote anything");

    // A reject lane: room for two, so a batch of three is refused whole, naming the lane.
    let worker = s.register(2.0).await;
    let beat = s.url(&format!("/v1/workers/{worker}/heartbeat"));
    let http = s.http.clone();
    let beating = tokio::spawn(async move {
        loop {
            let _ = http.post(&beat).json(&json!({"runs": []})).send().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let strict =
        |n: usize| json!({"runs": vec![json!({"command": ["true"], "lane": "strict"}); n]});
    let r = s
        .http
        .post(s.url("/v1/runs/batch"))
        .json(&strict(3))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_error(503, &body, 503, "resources_exhausted");
    assert_eq!(body["error"]["index"], 2);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`strict`"),
        "{body}"
    );
    assert_eq!(count_runs(&s).await, 3);
    let (status, body) = s.post("/v1/runs/batch", strict(2)).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(count_runs(&s).await, 5);
    beating.abort();
}

#[tokio::test]
async fn a_batch_is_one_transaction_sqlite() {
    batch_is_one_transaction(false).await;
}

#[tokio::test]
async fn a_batch_is_one_transaction_postgres() {
    batch_is_one_transaction(true).await;
}
