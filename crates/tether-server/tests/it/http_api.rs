//! Every client endpoint, every status code, and bad input that changes nothing.

use serde_json::{json, Value};

use crate::harness::{assert_error, fast_config, TestServer};

async fn count_runs(s: &TestServer) -> usize {
    let (_, body) = s.get("/v1/runs?limit=500").await;
    body["runs"].as_array().unwrap().len()
}

#[tokio::test]
async fn create_answers_202_with_the_run_and_its_defaults() {
    let s = TestServer::start().await;
    let run = s.submit(json!({"command": ["echo", "hi"]})).await;
    assert_eq!(run["status"], "pending");
    assert_eq!(run["attempt"], 0);
    assert_eq!(run["max_attempts"], 3);
    assert_eq!(run["lane"], "default");
    assert_eq!(run["heartbeat_timeout_s"], 1.0);
    assert_eq!(run["resources"], json!({"cpus": 1.0, "memory_mb": 256}));
    assert_eq!(run["queue_position"], 1);
    assert_eq!(run["liveness"]["state"], "waiting");
    let got = s.run(run["id"].as_str().unwrap()).await;
    assert_eq!(got["id"], run["id"]);
    assert_eq!(got["attempts"], json!([]));
}

#[tokio::test]
async fn bad_input_gets_a_stable_code_and_changes_nothing() {
    let s = TestServer::start().await;
    // 400: not JSON at all.
    let r = s
        .http
        .post(s.url("/v1/runs"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert_error(status, &r.json().await.unwrap(), 400, "malformed_json");
    // 415: not sent as JSON.
    let r = s
        .http
        .post(s.url("/v1/runs"))
        .body("{}")
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert_error(
        status,
        &r.json().await.unwrap(),
        415,
        "unsupported_media_type",
    );
    // 422: invalid fields.
    let cases: Vec<(Value, &str)> = vec![
        (json!({"command": []}), "invalid_field"),
        (json!({"command": [""]}), "invalid_field"),
        (json!({}), "invalid_field"),
        (json!({"command": "echo hi"}), "invalid_field"),
        (json!({"command": ["x"], "bogus": 1}), "invalid_field"),
        (json!({"command": ["x"], "lane": "nope"}), "unknown_lane"),
        (json!({"command": ["x"], "timeout_s": -1}), "invalid_field"),
        (
            json!({"command": ["x"], "max_attempts": 0}),
            "invalid_field",
        ),
        (
            json!({"command": ["x"], "heartbeat_timeout_s": null}),
            "invalid_field",
        ),
        (
            json!({"command": ["x"], "resources": {"cpus": 0}}),
            "invalid_field",
        ),
        (
            json!({"command": ["x"], "env": {"A=B": "c"}}),
            "invalid_field",
        ),
    ];
    for (body, code) in cases {
        let (status, answer) = s.post("/v1/runs", body.clone()).await;
        assert_eq!(status, 422, "{body} -> {answer}");
        assert_eq!(answer["error"]["code"], code, "{body} -> {answer}");
    }
    // 413: a body past the limit.
    let huge = "x".repeat(tether_server::BODY_LIMIT_BYTES + 10);
    let (status, answer) = s.post("/v1/runs", json!({"command": [huge]})).await;
    assert_error(status, &answer, 413, "body_too_large");
    assert_eq!(count_runs(&s).await, 0, "bad input created a run");
}

#[tokio::test]
async fn unknown_runs_and_routes_are_404() {
    let s = TestServer::start().await;
    let (status, body) = s.get("/v1/runs/nope").await;
    assert_error(status, &body, 404, "not_found");
    let (status, body) = s.post("/v1/runs/nope/cancel", json!({})).await;
    assert_error(status, &body, 404, "not_found");
    let (status, body) = s.get("/v1/runs/nope/logs").await;
    assert_error(status, &body, 404, "not_found");
    let (status, body) = s.get("/v1/runs/nope/events").await;
    assert_error(status, &body, 404, "not_found");
    let (status, body) = s.get("/v1/nothing-here").await;
    assert_error(status, &body, 404, "no_route");
}

#[tokio::test]
async fn idempotency_keys_return_the_same_run_or_409() {
    let s = TestServer::start().await;
    let body = json!({"command": ["echo", "once"], "idempotency_key": "k-1"});
    let first = s.submit(body.clone()).await;
    let second = s.submit(body).await;
    assert_eq!(first["id"], second["id"]);
    let (status, answer) = s
        .post(
            "/v1/runs",
            json!({"command": ["echo", "other"], "idempotency_key": "k-1"}),
        )
        .await;
    assert_error(status, &answer, 409, "idempotency_conflict");
    assert_eq!(count_runs(&s).await, 1);
}

#[tokio::test]
async fn cancel_of_pending_is_immediate_then_409_terminal() {
    let s = TestServer::start().await;
    let run = s.submit(json!({"command": ["sleep", "10"]})).await;
    let id = run["id"].as_str().unwrap();
    let (status, body) = s.post(&format!("/v1/runs/{id}/cancel"), json!({})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "cancelled");
    assert_eq!(body["error_code"], "cancelled");
    let (status, body) = s.post(&format!("/v1/runs/{id}/cancel"), json!({})).await;
    assert_error(status, &body, 409, "terminal");
    // A cancelled run never starts.
    let worker = s.register(4.0).await;
    assert!(s.claim(&worker, 4).await.is_empty());
}

#[tokio::test]
async fn list_pages_newest_first_with_filters() {
    let s = TestServer::start().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let lane_run = s.submit(json!({"command": ["echo", i.to_string()]})).await;
        ids.push(lane_run["id"].as_str().unwrap().to_string());
    }
    let (_, cancelled) = s
        .post(&format!("/v1/runs/{}/cancel", ids[0]), json!({}))
        .await;
    assert_eq!(cancelled["status"], "cancelled");
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/runs?limit=3&cursor={c}"),
            None => "/v1/runs?limit=3".to_string(),
        };
        let (status, page) = s.get(&path).await;
        assert_eq!(status, 200, "{page}");
        for run in page["runs"].as_array().unwrap() {
            seen.push(run["id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    let (_, page) = s.get("/v1/runs?status=cancelled").await;
    assert_eq!(page["runs"].as_array().unwrap().len(), 1);
    let (_, page) = s.get("/v1/runs?status=pending&lane=default").await;
    assert_eq!(page["runs"].as_array().unwrap().len(), 6);
    let (status, body) = s.get("/v1/runs?status=bogus").await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = s.get("/v1/runs?limit=0").await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = s.get("/v1/runs?limit=abc").await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = s.get("/v1/runs?cursor=zzz").await;
    assert_error(status, &body, 422, "invalid_cursor");
}

#[tokio::test]
async fn tokens_guard_each_scope() {
    let mut config = fast_config();
    config.api_token = Some("client-secret".into());
    config.worker_token = Some("worker-secret".into());
    let s = TestServer::start_with(config).await;
    let (status, body) = s.get("/v1/runs").await;
    assert_error(status, &body, 401, "unauthorized");
    let r = s
        .http
        .get(s.url("/v1/runs"))
        .bearer_auth("worker-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        401,
        "a worker token is not a client token"
    );
    let r = s
        .http
        .get(s.url("/v1/runs"))
        .bearer_auth("client-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let register = json!({"name": "w", "capacity": {"cpus": 1, "memory_mb": 64}});
    let r = s
        .http
        .post(s.url("/v1/workers"))
        .bearer_auth("client-secret")
        .json(&register)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        401,
        "a client token is not a worker token"
    );
    let r = s
        .http
        .post(s.url("/v1/workers"))
        .bearer_auth("worker-secret")
        .json(&register)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    // Health stays open for probes.
    let (status, _) = s.get("/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn listening_beyond_loopback_needs_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let store = tether_server::open_store(&format!("sqlite://{}/t.db", dir.path().display()))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let result = tether_server::start(fast_config(), store, listener).await;
    assert!(matches!(
        result,
        Err(tether_server::StartError::TokensRequired(_))
    ));
}

#[tokio::test]
async fn operations_endpoints_answer() {
    let s = TestServer::start().await;
    let (status, body) = s.get("/healthz").await;
    assert_eq!((status, body["ok"].clone()), (200, json!(true)));
    let (status, body) = s.get("/readyz").await;
    assert_eq!((status, body["ready"].clone()), (200, json!(true)));
    let (status, doc) = s.get("/openapi.json").await;
    assert_eq!(status, 200);
    for path in [
        "/v1/runs",
        "/v1/runs/{id}",
        "/v1/runs/{id}/events",
        "/v1/runs/{id}/logs",
        "/v1/lanes",
        "/v1/workers/{id}/heartbeat",
        "/v1/runs/{id}/attempts/{attempt}/finish",
        "/v1/endpoints/{name}",
        "/v1/pools/{pool}/dispatch",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    let r = s.http.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = s.http.get(s.url("/")).send().await.unwrap();
    assert!(r.text().await.unwrap().contains("Tether"));
}
