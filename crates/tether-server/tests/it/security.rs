//! Closed to strangers (issue 10): loopback-only without tokens, bounded inputs, numbers that
//! fit their stored type, NUL refused on both stores, secrets redacted, lists bounded in bytes.

use serde_json::{json, Value};

use crate::harness::{assert_error, fast_config, pg_server, pg_store, PgSchema, TestServer};

async fn send(
    s: &TestServer,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = s.http.request(method, s.url(path));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_rebound_page_cannot_submit_without_tokens() {
    let s = TestServer::start().await;
    let body = json!({"command": ["sh", "-c", "id > proof.txt"]});
    let (status, answer) = send(
        &s,
        reqwest::Method::POST,
        "/v1/runs",
        &[("host", "attacker.example:7070")],
        Some(body.clone()),
    )
    .await;
    assert_error(status, &answer, 403, "forbidden_host");
    // The right Host from a foreign page's Origin is refused as well.
    let (status, answer) = send(
        &s,
        reqwest::Method::POST,
        "/v1/runs",
        &[("origin", "http://attacker.example")],
        Some(body.clone()),
    )
    .await;
    assert_error(status, &answer, 403, "forbidden_host");
    // Worker calls are guarded the same way.
    let (status, answer) = send(
        &s,
        reqwest::Method::POST,
        "/v1/workers",
        &[("host", "attacker.example")],
        Some(json!({"name": "w", "capacity": {"cpus": 1, "memory_mb": 1}})),
    )
    .await;
    assert_error(status, &answer, 403, "forbidden_host");
    let (_, list) = s.get("/v1/runs").await;
    assert_eq!(list["runs"], json!([]), "nothing was created");
    // Loopback names are served.
    for host in ["localhost:1", "127.0.0.1", "[::1]:7070"] {
        let (status, _) = send(
            &s,
            reqwest::Method::GET,
            "/v1/runs",
            &[("host", host)],
            None,
        )
        .await;
        assert_eq!(status, 200, "{host}");
    }
}

#[tokio::test]
async fn bearer_is_case_insensitive_and_tokens_still_bind_any_host() {
    let s = TestServer::start_with(tether_server::ServerConfig {
        api_token: Some("client-secret".into()),
        worker_token: Some("worker-secret".into()),
        ..fast_config()
    })
    .await;
    let (status, _) = send(
        &s,
        reqwest::Method::GET,
        "/v1/runs",
        &[
            ("authorization", "bearer client-secret"),
            ("host", "tether.example"),
        ],
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, answer) = send(
        &s,
        reqwest::Method::GET,
        "/v1/runs",
        &[("authorization", "bearer worker-secret")],
        None,
    )
    .await;
    assert_error(status, &answer, 401, "unauthorized");
}

#[tokio::test]
async fn numbers_that_would_wrap_are_refused_at_the_door() {
    let s = TestServer::start().await;
    let (status, body) = s
        .post(
            "/v1/runs",
            json!({"command": ["true"], "resources": {"cpus": 1, "memory_mb": 9223372036854775808u64}}),
        )
        .await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = s
        .post(
            "/v1/workers",
            json!({"name": "w", "capacity": {"cpus": 1, "memory_mb": u64::MAX}}),
        )
        .await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = s
        .post(
            "/v1/workers",
            json!({"name": "w", "capacity": {"cpus": 1e308, "memory_mb": 1024}}),
        )
        .await;
    assert_error(status, &body, 422, "invalid_field");
    let (_, workers) = s.get("/v1/workers").await;
    assert_eq!(workers["workers"], json!([]));
    // The largest memory that fits is kept exactly.
    let run = s
        .submit(json!({"command": ["true"], "resources": {"cpus": 1, "memory_mb": i64::MAX}}))
        .await;
    assert_eq!(run["resources"]["memory_mb"], json!(i64::MAX));
}

#[tokio::test]
async fn a_wrong_method_is_405_json() {
    let s = TestServer::start().await;
    let (status, body) = send(&s, reqwest::Method::PATCH, "/v1/runs", &[], None).await;
    assert_error(status, &body, 405, "method_not_allowed");
}

#[tokio::test]
async fn secret_env_values_never_appear_in_views() {
    let s = TestServer::start().await;
    let run = s
        .submit(json!({"command": ["true"], "env": {"TOKEN": "hunter2", "PLAIN": "p"}, "secret_env": ["TOKEN"]}))
        .await;
    assert_eq!(run["env"], json!({"TOKEN": "***", "PLAIN": "p"}));
    let id = run["id"].as_str().unwrap();
    assert_eq!(s.run(id).await["env"]["TOKEN"], "***");
    let (_, list) = s.get("/v1/runs").await;
    assert!(!list.to_string().contains("hunter2"), "{list}");
    // The command still gets the value.
    let worker = s.register(1.0).await;
    let claimed = s.claim(&worker, 1).await;
    assert_eq!(claimed[0]["env"]["TOKEN"], "hunter2");
}

#[tokio::test]
async fn big_inputs_are_refused_and_lists_stay_bounded_in_bytes() {
    let s = TestServer::start().await;
    let huge = "x".repeat(4 * 1024 * 1024 - 1024);
    let (status, body) = s
        .post(
            "/v1/runs",
            json!({"command": ["true"], "labels": {"big": huge}}),
        )
        .await;
    assert_error(status, &body, 422, "invalid_field");
    // 20 runs, each as large as the caps allow.
    let label = "l".repeat(15 * 1024);
    let value = "v".repeat(120 * 1024);
    let arg = "a".repeat(120 * 1024);
    for i in 0..20 {
        s.submit(json!({"command": ["true", arg], "env": {"V": value}, "labels": {"i": i.to_string(), "l": label}}))
            .await;
    }
    let (runs, pages) = s.list_pages("limit=50").await;
    let mut seen = std::collections::BTreeSet::new();
    for run in &runs {
        assert!(
            seen.insert(run["id"].as_str().unwrap().to_string()),
            "listed twice"
        );
    }
    assert_eq!(seen.len(), 20, "every run listed exactly once");
    assert!(pages > 1, "the byte budget split the list");
}

/// Every place a NUL can enter answers `422 invalid_field` and writes nothing.
async fn nul_is_refused(s: &TestServer) {
    let cases: Vec<(&str, Value)> = vec![
        (
            "/v1/runs",
            json!({"command": ["true"], "labels": {"a": "b\u{0}"}}),
        ),
        (
            "/v1/runs",
            json!({"command": ["true"], "idempotency_key": "k\u{0}"}),
        ),
        (
            "/v1/runs",
            json!({"command": ["true"], "lane": "de\u{0}fault"}),
        ),
        (
            "/v1/workers",
            json!({"name": "w\u{0}", "capacity": {"cpus": 1, "memory_mb": 64}}),
        ),
        (
            "/v1/workers",
            json!({"name": "w", "capacity": {"cpus": 1, "memory_mb": 64}, "labels": {"k": "\u{0}"}}),
        ),
    ];
    for (path, body) in cases {
        let (status, answer) = s.post(path, body.clone()).await;
        assert_error(status, &answer, 422, "invalid_field");
        let _ = body;
    }
    let r = s
        .http
        .put(s.url("/v1/pools/p"))
        .json(&json!({"fallback_url": "http://x/\u{0}"}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert_error(status, &r.json().await.unwrap(), 422, "invalid_field");
    for path in ["/v1/runs/a%00b", "/v1/runs?lane=a%00", "/v1/runs/x%00/logs"] {
        let (status, answer) = s.get(path).await;
        assert_error(status, &answer, 422, "invalid_field");
    }
    // A finish whose message holds NUL.
    let run = s.submit(json!({"command": ["true"]})).await;
    let id = run["id"].as_str().unwrap();
    let worker = s.register(1.0).await;
    assert_eq!(s.claim(&worker, 1).await.len(), 1);
    let (status, answer) = s
        .post(
            &format!("/v1/runs/{id}/attempts/1/finish"),
            json!({"worker_id": worker, "status": "failed", "error_message": "bad\u{0}"}),
        )
        .await;
    assert_error(status, &answer, 422, "invalid_field");
    assert_eq!(s.run(id).await["status"], "claimed", "nothing was written");
    let (_, list) = s.get("/v1/runs").await;
    assert_eq!(list["runs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn nul_is_invalid_field_on_sqlite() {
    nul_is_refused(&TestServer::start().await).await;
}

#[tokio::test]
async fn nul_is_invalid_field_on_postgres() {
    let (s, _schema) = pg_server(fast_config()).await;
    nul_is_refused(&s).await;
}

#[tokio::test]
async fn long_uris_and_large_heads_are_json_errors() {
    let s = TestServer::start().await;
    let long = format!("/v1/runs?lane={}", "a".repeat(10 * 1024));
    let (status, body) = s.get(&long).await;
    assert_error(status, &body, 414, "uri_too_long");
    let big = "h".repeat(40 * 1024);
    let (status, body) = send(
        &s,
        reqwest::Method::GET,
        "/v1/runs",
        &[("x-big", &big)],
        None,
    )
    .await;
    assert_error(status, &body, 431, "headers_too_large");
    let many: Vec<(String, String)> = (0..150).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (status, body) = send(&s, reqwest::Method::GET, "/healthz", &many, None).await;
    assert_error(status, &body, 431, "headers_too_large");
}

/// A worker is its secret: naming another worker's id, in a path or a body, is refused.
#[tokio::test]
async fn a_forged_worker_id_is_403_and_changes_nothing() {
    let s = TestServer::start().await;
    let a = s.register(1.0).await;
    let b = s.register(1.0).await;
    let run = s.submit(json!({"command": ["true"]})).await;
    let id = run["id"].as_str().unwrap();
    assert_eq!(s.claim(&a, 1).await.len(), 1);
    let b_secret = s.secrets.lock().unwrap()[&b].clone();
    let forged = |r: reqwest::RequestBuilder| r.header(tether_api::WORKER_SECRET_HEADER, &b_secret);
    // B, with its own secret, acting as A.
    for (path, body) in [
        (
            format!("/v1/runs/{id}/attempts/1/start"),
            json!({"worker_id": a}),
        ),
        (
            format!("/v1/runs/{id}/attempts/1/finish"),
            json!({"worker_id": a, "status": "failed", "exit_code": 1}),
        ),
        (format!("/v1/workers/{a}/heartbeat"), json!({"runs": []})),
        (format!("/v1/workers/{a}/claim"), json!({"wait_ms": 0})),
    ] {
        let r = forged(s.http.post(s.url(&path)).json(&body))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_error(status, &r.json().await.unwrap(), 403, "not_this_worker");
    }
    // No secret at all.
    let r = s
        .http
        .post(s.url(&format!("/v1/runs/{id}/attempts/1/start")))
        .json(&json!({"worker_id": a}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = forged(s.http.delete(s.url(&format!("/v1/workers/{a}"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let run = s.run(id).await;
    assert_eq!(run["status"], "claimed", "{run}");
    assert_eq!(run["worker_id"], json!(a));
    // A itself is served.
    let (status, _) = s
        .post(
            &format!("/v1/runs/{id}/attempts/1/start"),
            json!({"worker_id": a}),
        )
        .await;
    assert_eq!(status, 200);
}

/// The secret is checked against the shared store, so any server verifies it.
#[tokio::test]
async fn a_worker_secret_verifies_on_every_server_sharing_postgres() {
    let schema = PgSchema::new();
    let one = TestServer::start_on(fast_config(), pg_store(&schema).await).await;
    let two = TestServer::start_on(fast_config(), pg_store(&schema).await).await;
    let worker = one.register(1.0).await;
    let secret = one.secrets.lock().unwrap()[&worker].clone();
    two.secrets.lock().unwrap().insert(worker.clone(), secret);
    let (status, body) = two
        .post(
            &format!("/v1/workers/{worker}/heartbeat"),
            json!({"runs": []}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    two.secrets
        .lock()
        .unwrap()
        .insert(worker.clone(), "wrong".into());
    let (status, body) = two
        .post(
            &format!("/v1/workers/{worker}/heartbeat"),
            json!({"runs": []}),
        )
        .await;
    assert_error(status, &body, 403, "not_this_worker");
}
