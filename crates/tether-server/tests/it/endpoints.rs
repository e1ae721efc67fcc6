//! Endpoint readiness and dispatch (SPEC §5) against real readiness endpoints: a tiny HTTP
//! server on loopback whose `/ready` answer each test flips, and the server's own reconciler
//! probing it.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::{json, Value};
use tether_domain::{PoolConfig, TetherConfig};
use tether_server::ServerConfig;
use tokio::time::Instant;

use tether_testkit::http::get_json;
use tether_testkit::{eventually, PgSchema};

use crate::harness::{assert_error, fast_config, TestServer};

const FALLBACK: &str = "http://fallback.example";

/// A readiness endpoint whose `/ready` answer the test sets. `/hang` never answers.
struct Readiness {
    base: String,
    status: Arc<AtomicU16>,
    /// `/ready` requests answered so far.
    probes: Arc<AtomicUsize>,
    /// The next this-many `/ready` requests answer 503 whatever `status` says.
    fail_next: Arc<AtomicU32>,
    /// When each request arrived, by path.
    arrivals: Arc<Mutex<Vec<(&'static str, Instant)>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct ReadyState {
    status: Arc<AtomicU16>,
    probes: Arc<AtomicUsize>,
    fail_next: Arc<AtomicU32>,
    arrivals: Arc<Mutex<Vec<(&'static str, Instant)>>>,
}

async fn ready(State(s): State<ReadyState>) -> StatusCode {
    s.probes.fetch_add(1, Ordering::SeqCst);
    s.arrivals.lock().unwrap().push(("/ready", Instant::now()));
    let failing = s
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    StatusCode::from_u16(s.status.load(Ordering::SeqCst)).unwrap()
}

impl Readiness {
    async fn start() -> Readiness {
        let state = ReadyState {
            status: Arc::new(AtomicU16::new(200)),
            probes: Arc::new(AtomicUsize::new(0)),
            fail_next: Arc::new(AtomicU32::new(0)),
            arrivals: Arc::new(Mutex::new(Vec::new())),
        };
        let app = axum::Router::new()
            .route("/ready", get(ready))
            .route(
                "/hang",
                get(|State(s): State<ReadyState>| async move {
                    s.arrivals.lock().unwrap().push(("/hang", Instant::now()));
                    std::future::pending::<()>().await;
                    StatusCode::OK
                }),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Readiness {
            base,
            status: state.status,
            probes: state.probes,
            fail_next: state.fail_next,
            arrivals: state.arrivals,
            task,
        }
    }

    fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }
}

impl Drop for Readiness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Probes every 200 ms; pool `cache` counts stamps for 1 s and falls back to [`FALLBACK`].
fn config(probe_ms: u64) -> ServerConfig {
    let mut lanes = TetherConfig::default();
    lanes.pools.insert(
        "cache".into(),
        PoolConfig {
            fallback_url: Some(FALLBACK.into()),
            freshness_s: 1.0,
        },
    );
    ServerConfig {
        lanes,
        probe_interval: Duration::from_millis(probe_ms),
        ..fast_config()
    }
}

async fn put(s: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let r = s.http.put(s.url(path)).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn register_probed(s: &TestServer, name: &str, url: &str, readiness_url: &str) {
    let (status, body) = put(
        s,
        &format!("/v1/endpoints/{name}"),
        json!({"pool": "cache", "url": url, "readiness_url": readiness_url, "kind": "probed"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["ready"], false, "not ready before its first probe");
}

async fn dispatch(s: &TestServer) -> Value {
    let (status, body) = s.get("/v1/pools/cache/dispatch").await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn endpoint(s: &TestServer, name: &str) -> Value {
    let (status, body) = s.get("/v1/endpoints").await;
    assert_eq!(status, 200, "{body}");
    body["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("endpoint {name} listed: {body}"))
}

/// Polls dispatch until its `source` is `want`; answers how long that took.
async fn until_source(s: &TestServer, want: &str, within: Duration) -> Duration {
    let started = Instant::now();
    eventually(&format!("dispatch from {want}"), within, async || {
        let d = dispatch(s).await;
        if d["source"] == want {
            Ok(started.elapsed())
        } else {
            Err(d)
        }
    })
    .await
}

#[tokio::test]
async fn dispatch_goes_endpoint_then_fallback_then_endpoint_as_readiness_flips() {
    let node = Readiness::start().await;
    let s = TestServer::start_with(config(200)).await;
    register_probed(&s, "node-1", "http://node-1.internal", &node.url("/ready")).await;

    until_source(&s, "endpoint", Duration::from_secs(3)).await;
    let d = dispatch(&s).await;
    assert_eq!(
        d,
        json!({"url": "http://node-1.internal", "source": "endpoint", "endpoint": "node-1"})
    );
    let e = endpoint(&s, "node-1").await;
    assert_eq!(e["ready"], true, "{e}");
    assert!(e["stamp_age_s"].as_f64().unwrap() < 1.0, "{e}");
    assert!(e["last_error"].is_null(), "{e}");

    // A sustained failure flips it once the last stamp passes the freshness window (1 s):
    // no sooner than about a window less an interval, no later than a window plus an interval
    // (with slack for a loaded machine).
    node.set(503);
    let flipped = until_source(&s, "fallback", Duration::from_secs(4)).await;
    assert!(
        flipped >= Duration::from_millis(600),
        "flipped after {flipped:?}: before the stamp could have aged past the window"
    );
    assert!(flipped <= Duration::from_millis(2_500), "{flipped:?}");
    let d = dispatch(&s).await;
    assert_eq!(
        d,
        json!({"url": FALLBACK, "source": "fallback", "endpoint": null})
    );
    let e = endpoint(&s, "node-1").await;
    assert_eq!(e["ready"], false, "{e}");
    assert!(e["stamp_age_s"].as_f64().unwrap() > 1.0, "{e}");
    assert!(
        e["last_error"].as_str().unwrap().contains("503"),
        "the probe error is shown: {e}"
    );

    // Healed by itself at the next probe.
    node.set(200);
    let healed = until_source(&s, "endpoint", Duration::from_secs(3)).await;
    assert!(healed <= Duration::from_millis(1_500), "{healed:?}");
    assert!(endpoint(&s, "node-1").await["last_error"].is_null());
}

#[tokio::test]
async fn a_single_failed_probe_between_two_ready_ones_does_not_flip_dispatch() {
    let node = Readiness::start().await;
    let s = TestServer::start_with(config(200)).await;
    register_probed(&s, "node-1", "http://node-1.internal", &node.url("/ready")).await;
    until_source(&s, "endpoint", Duration::from_secs(3)).await;

    node.fail_next.store(1, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_millis(1_500);
    let mut saw_the_miss = false;
    while Instant::now() < deadline {
        let d = dispatch(&s).await;
        assert_eq!(d["source"], "endpoint", "one missed probe flipped it: {d}");
        saw_the_miss |= node.fail_next.load(Ordering::SeqCst) == 0;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_the_miss, "the 503 was served to a probe");
}

#[tokio::test]
async fn a_never_probed_endpoint_dispatches_to_the_fallback() {
    // Probes an hour apart. Whether or not the reconciler's first sweep happens to see the
    // endpoint, the node is not ready, so no stamp is ever written: a never-stamped endpoint
    // is stale, and dispatch must not trust it.
    let node = Readiness::start().await;
    node.status.store(503, Ordering::SeqCst);
    let s = TestServer::start_with(config(3_600_000)).await;
    register_probed(&s, "node-1", "http://node-1.internal", &node.url("/ready")).await;
    let d = dispatch(&s).await;
    assert_eq!(
        d,
        json!({"url": FALLBACK, "source": "fallback", "endpoint": null})
    );
    let e = endpoint(&s, "node-1").await;
    assert_eq!(
        (&e["ready"], &e["last_ready_at"], &e["stamp_age_s"]),
        (&json!(false), &Value::Null, &Value::Null),
        "{e}"
    );
    assert!(
        node.probes.load(Ordering::SeqCst) <= 1,
        "probed more than once in an hour"
    );
}

#[tokio::test]
async fn an_always_ready_endpoint_is_served_without_stamps() {
    let s = TestServer::start_with(config(3_600_000)).await;
    let (status, body) = put(
        &s,
        "/v1/endpoints/static",
        json!({"pool": "cache", "url": "http://static.internal", "kind": "always_ready"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["ready"], true, "{body}");
    assert!(body["last_ready_at"].is_null());
    assert_eq!(
        dispatch(&s).await,
        json!({"url": "http://static.internal", "source": "endpoint", "endpoint": "static"})
    );
}

#[tokio::test]
async fn a_hanging_readiness_url_does_not_delay_other_endpoints_stamps() {
    // Probes every 2 s with a 1 s timeout. `a-hang` sorts (and is claimed) first: were probes
    // sequential, `b-ok` would be probed only after that timeout, a second later.
    let node = Readiness::start().await;
    let s = TestServer::start_with(config(2_000)).await;
    register_probed(&s, "a-hang", "http://a.internal", &node.url("/hang")).await;
    register_probed(&s, "b-ok", "http://b.internal", &node.url("/ready")).await;

    // A round that probed both: the ready probe went out alongside the hanging one.
    let gap = eventually(
        "a round that probed both",
        Duration::from_secs(9),
        async || {
            let arrivals = node.arrivals.lock().unwrap().clone();
            let gap = arrivals
                .iter()
                .filter(|(path, _)| *path == "/hang")
                .filter_map(|(_, hang)| {
                    arrivals
                        .iter()
                        .filter(|(path, at)| *path == "/ready" && *at >= *hang)
                        .map(|(_, at)| *at - *hang)
                        .min()
                })
                .min();
            gap.filter(|g| *g < Duration::from_millis(900))
                .ok_or_else(|| format!("{arrivals:?}"))
        },
    )
    .await;
    assert!(
        gap < Duration::from_millis(300),
        "b-ok probed {gap:?} after a-hang"
    );
    // The probe's answer is recorded a moment after the request arrived.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let ok = endpoint(&s, "b-ok").await;
        if ok["ready"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "{ok}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(dispatch(&s).await["endpoint"], "b-ok");
    // The hanging probe ends at its timeout, recorded as an error.
    let hang = eventually(
        "the hanging probe's error",
        Duration::from_secs(3),
        async || {
            let hang = endpoint(&s, "a-hang").await;
            if hang["last_error"].is_string() {
                Ok(hang)
            } else {
                Err(hang)
            }
        },
    )
    .await;
    assert!(
        hang["last_error"]
            .as_str()
            .unwrap()
            .contains("no readiness answer"),
        "{hang}"
    );
    assert_eq!(hang["ready"], false);
}

#[tokio::test]
async fn ready_endpoints_share_the_load() {
    let s = TestServer::start_with(config(3_600_000)).await;
    for name in ["x", "y"] {
        let (status, body) = put(
            &s,
            &format!("/v1/endpoints/{name}"),
            json!({"pool": "cache", "url": format!("http://{name}.internal"), "kind": "always_ready"}),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..10 {
        *seen
            .entry(dispatch(&s).await["endpoint"].as_str().unwrap().into())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.values().all(|n| *n >= 3), "{seen:?}");
}

#[tokio::test]
async fn endpoint_and_pool_calls_validate_and_answer_stable_codes() {
    let s = TestServer::start_with(config(3_600_000)).await;
    let (status, body) = put(
        &s,
        "/v1/endpoints/e1",
        json!({"pool": "nope", "url": "http://e1", "readiness_url": "http://e1/ready"}),
    )
    .await;
    assert_error(status, &body, 422, "unknown_pool");
    let (status, body) = put(
        &s,
        "/v1/endpoints/e1",
        json!({"pool": "cache", "url": "http://e1"}),
    )
    .await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = put(
        &s,
        "/v1/endpoints/e1",
        json!({"pool": "cache", "url": "not a url", "kind": "always_ready"}),
    )
    .await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = put(
        &s,
        "/v1/endpoints/e1",
        json!({"pool": "cache", "url": "http://e1", "kind": "sometimes"}),
    )
    .await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = put(
        &s,
        "/v1/endpoints/bad%20name",
        json!({"pool": "cache", "url": "http://e1", "kind": "always_ready"}),
    )
    .await;
    assert_error(status, &body, 422, "invalid_field");

    let r = s
        .http
        .delete(s.url("/v1/endpoints/missing"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert_error(status, &r.json().await.unwrap(), 404, "not_found");
    let (status, body) = s.get("/v1/pools/missing/dispatch").await;
    assert_error(status, &body, 404, "not_found");

    // A pool set through the API; with nothing ready and no fallback there is nothing to hand
    // out.
    let (status, body) = put(&s, "/v1/pools/bare", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["freshness_s"], &body["source"]),
        (&json!(120.0), &json!("api"))
    );
    let (status, body) = s.get("/v1/pools/bare/dispatch").await;
    assert_error(status, &body, 503, "no_ready_endpoint");
    let (status, body) = put(&s, "/v1/pools/bare", json!({"freshness_s": 0})).await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = s.get("/v1/pools").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = body["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["bare", "cache"]);

    // Registered, replaced, removed.
    let body = json!({"pool": "cache", "url": "http://e1", "kind": "always_ready"});
    assert_eq!(put(&s, "/v1/endpoints/e1", body.clone()).await.0, 201);
    assert_eq!(put(&s, "/v1/endpoints/e1", body).await.0, 200);
    let r = s
        .http
        .delete(s.url("/v1/endpoints/e1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let (_, body) = s.get("/v1/endpoints").await;
    assert_eq!(body["endpoints"], json!([]));

    // Runs naming a pool that does not exist are refused at the door.
    let (status, body) = s
        .post(
            "/v1/runs",
            json!({"command": ["true"], "endpoints": {"CACHE_URL": "nope"}}),
        )
        .await;
    assert_error(status, &body, 422, "unknown_pool");
}

#[tokio::test]
async fn a_claim_hands_the_dispatched_url_and_the_attempt_records_it() {
    let s = TestServer::start_with(config(3_600_000)).await;
    let (status, body) = put(
        &s,
        "/v1/endpoints/static",
        json!({"pool": "cache", "url": "http://static.internal", "kind": "always_ready"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let run = s
        .submit(json!({
            "command": ["true"],
            "env": {"OTHER": "1"},
            "endpoints": {"CACHE_URL": "cache"}
        }))
        .await;
    assert_eq!(run["endpoints"], json!({"CACHE_URL": "cache"}));
    let worker = s.register(1.0).await;
    let assignments = s.claim(&worker, 1).await;
    assert_eq!(
        assignments[0]["env"],
        json!({"OTHER": "1", "CACHE_URL": "http://static.internal"})
    );
    let run = s.run(run["id"].as_str().unwrap()).await;
    assert_eq!(
        run["attempts"][0]["endpoints"],
        json!({"CACHE_URL": {"url": "http://static.internal", "source": "endpoint", "endpoint": "static"}})
    );
}

#[tokio::test]
async fn metrics_show_each_endpoints_readiness_and_stamp_age() {
    let node = Readiness::start().await;
    let s = TestServer::start_with(config(200)).await;
    register_probed(&s, "metered", "http://m.internal", &node.url("/ready")).await;
    until_source(&s, "endpoint", Duration::from_secs(3)).await;
    let text = s
        .http
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("tether_endpoint_ready{endpoint=\"metered\",pool=\"cache\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("tether_endpoint_stamp_age_seconds{endpoint=\"metered\",pool=\"cache\"}"),
        "{text}"
    );
}

/// Two servers on one PostgreSQL schema: stamps from either count for both, and the endpoint
/// is probed about once per interval between them, not once per server.
#[tokio::test]
async fn servers_sharing_postgres_share_the_probing() {
    let schema = PgSchema::new();
    let node = Readiness::start().await;
    let mut servers = Vec::new();
    for _ in 0..2 {
        let store = tether_store_postgres::PgStore::open_in_schema(&schema.url, &schema.name)
            .await
            .expect("the test database (TETHER_TEST_DATABASE_URL) is reachable");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = tether_server::start(config(200), Arc::new(store), listener)
            .await
            .unwrap();
        servers.push(server);
    }
    let base = |i: usize| format!("http://{}", servers[i].addr);
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{}/v1/endpoints/shared", base(0)))
        .json(&json!({"pool": "cache", "url": "http://shared.internal", "readiness_url": node.url("/ready")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    eventually(
        "the other server to dispatch to the endpoint",
        Duration::from_secs(5),
        async || {
            let (_, d) = get_json(&http, &format!("{}/v1/pools/cache/dispatch", base(1))).await;
            if d["source"] == "endpoint" {
                Ok(())
            } else {
                Err(d)
            }
        },
    )
    .await;
    let before = node.probes.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let probes = node.probes.load(Ordering::SeqCst) - before;
    // One server alone probes 10 times in 2 s at 200 ms; two unshared would probe 20.
    assert!(
        (5..=14).contains(&probes),
        "{probes} probes in 2 s from two servers"
    );
    for server in servers {
        server.stop().await;
    }
}

/// Probes go where an operator allows (issue 10): metadata addresses are refused at the door,
/// a name resolving outside `--probe-networks` is never contacted, and `last_error` names the
/// kind of failure only.
#[tokio::test]
async fn probes_never_reach_metadata_or_networks_the_operator_did_not_allow() {
    let s = TestServer::start_with(config(100)).await;
    for readiness in [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/ready",
        "http://metadata.google.internal/computeMetadata/v1/",
    ] {
        let (status, body) = put(
            &s,
            "/v1/endpoints/meta",
            json!({"pool": "cache", "url": "http://x.internal", "readiness_url": readiness, "kind": "probed"}),
        )
        .await;
        assert_error(status, &body, 422, "invalid_field");
    }

    // Only 10.0.0.0/8 allowed: a loopback literal is refused at the door, and a name that
    // resolves to loopback is never contacted.
    let node = Readiness::start().await;
    let s = TestServer::start_with(ServerConfig {
        probe_networks: tether_server::probe_policy::ProbeNetworks::parse_list("10.0.0.0/8")
            .unwrap(),
        ..config(100)
    })
    .await;
    let (status, body) = put(
        &s,
        "/v1/endpoints/literal",
        json!({"pool": "cache", "url": "http://x.internal", "readiness_url": node.url("/ready"), "kind": "probed"}),
    )
    .await;
    assert_error(status, &body, 422, "invalid_field");
    let by_name = node.url("/ready").replace("127.0.0.1", "localhost");
    register_probed(&s, "by-name", "http://x.internal", &by_name).await;
    let e = eventually("an error on by-name", Duration::from_secs(5), async || {
        let e = endpoint(&s, "by-name").await;
        if e["last_error"].is_string() {
            Ok(e)
        } else {
            Err(e)
        }
    })
    .await;
    assert_eq!(e["last_error"], "unreachable", "{e}");
    assert_eq!(e["ready"], false);
    assert_eq!(
        node.probes.load(Ordering::SeqCst),
        0,
        "the endpoint was contacted"
    );
}

#[tokio::test]
async fn last_error_says_the_status_and_nothing_of_the_answer() {
    let node = Readiness::start().await;
    node.set(503);
    let s = TestServer::start_with(config(100)).await;
    register_probed(&s, "n", "http://n.internal", &node.url("/ready")).await;
    let e = eventually("an error on n", Duration::from_secs(5), async || {
        let e = endpoint(&s, "n").await;
        if e["last_error"].is_string() {
            Ok(e)
        } else {
            Err(e)
        }
    })
    .await;
    assert_eq!(e["last_error"], "HTTP 503", "{e}");
}
