//! What the dashboard reads: log pages from the tail, list filters, attempt worker names, lane
//! refusals, and the embedded files themselves. Log paging runs on both stores.

use base64::Engine;
use serde_json::{json, Value};

use crate::harness::{assert_error, fast_config, pg_server, TestServer};

/// The run under test does not heartbeat while its output is written; a long stale window keeps
/// a loaded machine from reaping it mid-test.
fn unhurried_config() -> tether_server::ServerConfig {
    tether_server::ServerConfig {
        stale_after: std::time::Duration::from_secs(120),
        ..fast_config()
    }
}

/// A running run with `n` log events of `size` bytes, alternating stdout and stderr (so none
/// are joined): returns the run id.
async fn run_with_output(s: &TestServer, n: usize, size: usize) -> String {
    let worker = s.register(1.0).await;
    let run = s.submit(json!({"command": ["build"]})).await;
    let run_id = run["id"].as_str().unwrap().to_string();
    assert_eq!(s.claim(&worker, 1).await.len(), 1);
    let (status, body) = s
        .post(
            &format!("/v1/runs/{run_id}/attempts/1/start"),
            json!({ "worker_id": worker }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let engine = base64::engine::general_purpose::STANDARD;
    for i in 0..n {
        let stream = if i % 2 == 0 { "stdout" } else { "stderr" };
        let mut line = format!("{stream} line {i:05} ").into_bytes();
        line.resize(size - 1, b'.');
        line.push(b'\n');
        let (status, body) = s
            .post(
                &format!("/v1/runs/{run_id}/attempts/1/logs"),
                json!({"worker_id": worker, "chunks": [{"stream": stream, "ts": 0, "data": engine.encode(&line)}]}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    run_id
}

/// Reading pages back from the tail yields the whole log once, in order, streams intact.
async fn pages_cover_the_log_exactly_once(s: &TestServer) {
    let run_id = run_with_output(s, 60, 1000).await;
    let whole = s
        .http
        .get(s.url(&format!("/v1/runs/{run_id}/logs")))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(whole.len(), 60_000);
    let (status, tail) = s
        .get(&format!("/v1/runs/{run_id}/output?max_bytes=10000"))
        .await;
    assert_eq!(status, 200, "{tail}");
    let run = s.run(&run_id).await;
    let (_, events) = s
        .get(&format!("/v1/runs/{run_id}/output?max_bytes=4194304"))
        .await;
    let newest = events["events"].as_array().unwrap().last().unwrap()["seq"].clone();
    assert_eq!(
        tail["through_seq"], newest,
        "the tail covers up to the newest event"
    );
    assert_eq!(
        tail["events"].as_array().unwrap().len(),
        10,
        "about 10 000 bytes"
    );
    assert_eq!(run["stdout_bytes"], 30_000);

    let mut pages: Vec<Vec<Value>> = vec![tail["events"].as_array().unwrap().clone()];
    let mut before = tail["earlier_before"].as_i64();
    while let Some(b) = before {
        let (status, page) = s
            .get(&format!(
                "/v1/runs/{run_id}/output?before={b}&max_bytes=10000"
            ))
            .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["through_seq"], json!(b - 1));
        pages.push(page["events"].as_array().unwrap().clone());
        before = page["earlier_before"].as_i64();
    }
    pages.reverse();
    let events: Vec<Value> = pages.into_iter().flatten().collect();
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in order, none twice: {seqs:?}"
    );
    let joined: String = events.iter().map(|e| e["text"].as_str().unwrap()).collect();
    assert_eq!(
        joined.as_bytes(),
        &whole[..],
        "the pages are the log, byte for byte"
    );
    for e in &events {
        let text = e["text"].as_str().unwrap();
        assert!(text.starts_with(e["stream"].as_str().unwrap()), "{e}");
        assert_eq!(e["type"], "log");
    }

    let (status, body) = s
        .get(&format!("/v1/runs/{run_id}/output?max_bytes=0"))
        .await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = s.get(&format!("/v1/runs/{run_id}/output?before=0")).await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = s.get("/v1/runs/no-such-run/output").await;
    assert_error(status, &body, 404, "not_found");
}

#[tokio::test]
async fn output_pages_cover_the_log_exactly_once_on_sqlite() {
    let s = TestServer::start_with(unhurried_config()).await;
    pages_cover_the_log_exactly_once(&s).await;
}

#[tokio::test]
async fn output_pages_cover_the_log_exactly_once_on_postgres() {
    let (s, _schema) = pg_server(unhurried_config()).await;
    pages_cover_the_log_exactly_once(&s).await;
}

#[tokio::test]
async fn the_list_filters_by_label_and_searches_commands_and_ids() {
    let s = TestServer::start().await;
    let mut infra = Vec::new();
    for i in 0..3 {
        let run = s
            .submit(
                json!({"command": ["make", format!("target-{i}")], "labels": {"team": "infra"}}),
            )
            .await;
        infra.push(run["id"].as_str().unwrap().to_string());
    }
    let web = s
        .submit(json!({"command": ["Deploy.sh", "--prod"], "labels": {"team": "web"}}))
        .await;
    let web_id = web["id"].as_str().unwrap().to_string();
    s.submit(json!({"command": ["true"]})).await;

    let ids = |page: &Value| -> Vec<String> {
        page["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, page) = s.get("/v1/runs?label=team=infra").await;
    assert_eq!(status, 200, "{page}");
    let mut newest_first = infra.clone();
    newest_first.reverse();
    assert_eq!(ids(&page), newest_first);
    let (_, page) = s.get("/v1/runs?label=team").await;
    assert_eq!(ids(&page).len(), 4, "a bare key matches any value");
    let (_, page) = s.get("/v1/runs?q=deploy").await;
    assert_eq!(
        ids(&page),
        vec![web_id.clone()],
        "command, case-insensitive"
    );
    let (_, page) = s.get(&format!("/v1/runs?q={}", &infra[1][..30])).await;
    assert_eq!(ids(&page), vec![infra[1].clone()], "id prefix");
    let (_, page) = s.get("/v1/runs?q=target&label=team=web").await;
    assert!(ids(&page).is_empty());

    // Paging through filtered answers finds every match once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/runs?label=team=infra&limit=1&cursor={c}"),
            None => "/v1/runs?label=team=infra&limit=1".to_string(),
        };
        let (status, page) = s.get(&path).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, newest_first);
}

#[tokio::test]
async fn attempts_name_their_worker_and_lanes_count_refusals() {
    let s = TestServer::start().await;
    let worker = s.register(1.0).await;
    let run = s.submit(json!({"command": ["true"]})).await;
    let run_id = run["id"].as_str().unwrap();
    assert_eq!(s.claim(&worker, 1).await.len(), 1);
    let run = s.run(run_id).await;
    assert_eq!(run["attempts"][0]["worker_name"], "test", "{run}");
    assert_eq!(run["attempts"][0]["worker_id"], json!(worker));
    let (status, body) = s
        .post(
            "/v1/runs",
            json!({"command": ["true"], "resources": {"cpus": 64, "memory_mb": 1}}),
        )
        .await;
    assert_error(status, &body, 422, "never_fits");
    let (_, lanes) = s.get("/v1/lanes").await;
    let default = lanes["lanes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "default")
        .unwrap()
        .clone();
    // One process may hold several test servers: at least this refusal is counted.
    assert!(default["refused"].as_u64() >= Some(1), "{default}");
}

#[tokio::test]
async fn the_dashboard_is_served_from_the_binary_under_a_strict_policy() {
    let s = TestServer::start().await;
    for (path, content_type, marker) in [
        ("/", "text/html", "/ui/app.js"),
        ("/ui/app.js", "text/javascript", "Last-Event-ID"),
        ("/ui/app.css", "text/css", ".badge"),
    ] {
        let r = s.http.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        let headers = r.headers().clone();
        assert!(headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with(content_type));
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
        let body = r.text().await.unwrap();
        assert!(body.contains(marker), "{path}");
        // Nothing is loaded from elsewhere.
        assert!(
            !body.contains("https://") && !body.contains("http://"),
            "{path}"
        );
    }
    let (_, doc) = s.get("/openapi.json").await;
    assert!(doc["paths"]["/v1/runs/{id}/output"].is_object());
    assert!(doc["components"]["schemas"]["OutputPage"].is_object());
    let params: Vec<&str> = doc["paths"]["/v1/runs"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for name in ["status", "lane", "limit", "cursor", "label", "q"] {
        assert!(
            params.contains(&name),
            "{name} missing from GET /v1/runs: {params:?}"
        );
    }
}

#[tokio::test]
async fn filtered_lists_stay_bounded_in_bytes_and_list_each_match_once() {
    let s = TestServer::start().await;
    // 20 runs, each as large as the caps allow, all matching the filter.
    let label = "l".repeat(15 * 1024);
    let value = "v".repeat(120 * 1024);
    let arg = "a".repeat(120 * 1024);
    for i in 0..20 {
        s.submit(json!({"command": ["true", arg], "env": {"V": value}, "labels": {"i": i.to_string(), "l": label}}))
            .await;
    }
    s.submit(json!({"command": ["true"]})).await;
    let (runs, pages) = s.list_pages("label=i&limit=50").await;
    let mut seen = std::collections::BTreeSet::new();
    for run in &runs {
        assert!(run["labels"]["i"].is_string(), "only matches");
        assert!(
            seen.insert(run["id"].as_str().unwrap().to_string()),
            "listed twice"
        );
    }
    assert_eq!(seen.len(), 20, "every match listed exactly once");
    assert!(pages > 1, "the byte budget split the list");
}
