//! A store outage is not worker death: heartbeats the server could not record are not held
//! against the worker, readiness says the truth meanwhile, and calls fail fast. PostgreSQL is
//! cut off by a proxy in front of it that the test controls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tether_store_postgres::PgStore;
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::harness::{fast_config, TestServer};

/// A TCP proxy the test can cut (every connection closed, new ones refused) and restore.
struct CuttableProxy {
    addr: String,
    cut: watch::Sender<bool>,
}

impl CuttableProxy {
    async fn start(upstream: String) -> CuttableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (cut, watching) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut cut = watching.clone();
                if *cut.borrow() {
                    continue; // dropped: refused
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        CuttableProxy { addr, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

/// `host:port` of a `postgres://user@host:port/db` URL, and the URL with it replaced.
fn through(url: &str, proxy: &str) -> (String, String) {
    let after_scheme = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = after_scheme.split('/').next().unwrap_or("");
    let host_port = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    let host_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:5432")
    };
    let proxied = url.replacen(
        authority,
        &authority.replacen(
            authority.rsplit_once('@').map_or(authority, |(_, h)| h),
            proxy,
            1,
        ),
        1,
    );
    (host_port, proxied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_lost_to_a_store_outage_are_not_held_against_the_worker() {
    let url = tether_testkit::database_url();
    let (upstream, _) = through(&url, "unused");
    let proxy = CuttableProxy::start(upstream).await;
    let (_, proxied) = through(&url, &proxy.addr);
    let schema = format!("tether_outage_{}", std::process::id());
    let store = Arc::new(PgStore::open_in_schema(&proxied, &schema).await.unwrap());
    let s = TestServer::start_on(fast_config(), store.clone()).await;

    let run = s
        .submit(json!({"command": ["x"], "heartbeat_timeout_s": 2}))
        .await;
    let run_id = run["id"].as_str().unwrap().to_string();
    let worker = s.register(1.0).await;
    assert_eq!(s.claim(&worker, 1).await.len(), 1);
    let attempt = |call: &str| format!("/v1/runs/{run_id}/attempts/1/{call}");
    let (status, _) = s
        .post(&attempt("start"), json!({"worker_id": worker}))
        .await;
    assert_eq!(status, 200);
    let beat = json!({"runs": [{"run_id": run_id, "attempt": 1}]});
    let heartbeat = format!("/v1/workers/{worker}/heartbeat");

    // The store goes away for one and a half of the run's stale windows (3 s); the worker
    // keeps heartbeating, and is told 503.
    proxy.set_cut(true);
    let outage = Instant::now();
    let asked = Instant::now();
    let (status, body) = s.post("/v1/runs", json!({"command": ["true"]})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    let (status, _) = s.get("/readyz").await;
    assert_eq!(status, 503);
    while outage.elapsed() < Duration::from_secs(3) {
        let (status, _) = s.post(&heartbeat, beat.clone()).await;
        assert_ne!(
            status, 200,
            "a heartbeat cannot be recorded while the store is cut off"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    proxy.set_cut(false);
    // The store answers again. The reaper sweeps at once, but the run gets a full window
    // from now: silent for a second more, it is still on attempt 1 and still its worker's.
    let back = Instant::now();
    tether_testkit::eventually(
        "the store to come back",
        Duration::from_secs(10),
        async || {
            let (status, body) = s.get(&format!("/v1/runs/{run_id}")).await;
            if status == 200 {
                Ok(())
            } else {
                Err(body)
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(back.elapsed())).await;
    let now: Value = s.run(&run_id).await;
    assert_eq!(now["status"], "running", "{now}");
    assert_eq!(now["attempt"], 1, "{now}");
    let (status, answer) = s.post(&heartbeat, beat.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["not_owned"], json!([]));
    let (status, _) = s
        .post(
            &attempt("finish"),
            json!({"worker_id": worker, "status": "succeeded", "exit_code": 0}),
        )
        .await;
    assert_eq!(status, 200);
    let done = s.run(&run_id).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["attempts"].as_array().unwrap().len(), 1);
    drop(s);
    let _ = store.drop_schema().await;
}
