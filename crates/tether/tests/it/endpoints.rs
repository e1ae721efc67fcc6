//! Endpoint dispatch end to end (SPEC §5): a real readiness endpoint, a `tether server` probing
//! it, `tether worker` processes running `echo $CACHE_URL`.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tether_testkit::eventually;
use tether_testkit::http::get_json;

use crate::cluster::{id, Cluster, TETHER};

const FALLBACK: &str = "http://fallback.example";
const NODE: &str = "http://cache-node.internal:8080";

/// A readiness endpoint answering every request with the status the test sets.
async fn readiness() -> (String, Arc<AtomicU16>) {
    let status = Arc::new(AtomicU16::new(200));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ready", listener.local_addr().unwrap());
    let answer = status.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let code = answer.load(Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = conn.read(&mut buf).await;
                let reply =
                    format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                let _ = conn.write_all(reply.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    (url, status)
}

async fn start(c: &mut Cluster) -> String {
    let config = c.path().join("tether.toml");
    std::fs::write(
        &config,
        format!("[pools.cache]\nfallback_url = \"{FALLBACK}\"\nfreshness_s = 1\n"),
    )
    .unwrap();
    let config = config.display().to_string();
    c.start_server(&["--config", &config, "--probe-interval", "200ms"])
        .await
}

async fn until_source(c: &Cluster, want: &str) {
    let url = format!("{}/v1/pools/cache/dispatch", c.base());
    eventually(
        &format!("dispatch from {want}"),
        Duration::from_secs(5),
        async || {
            let (_, d) = get_json(&c.http, &url).await;
            if d["source"] == want {
                Ok(())
            } else {
                Err(d)
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_run_prints_the_dispatched_url_and_a_retry_after_the_endpoint_fails_prints_the_fallback()
{
    let (ready_url, status) = readiness().await;
    let mut c = Cluster::sqlite();
    let base = start(&mut c).await;
    let r = c
        .http
        .put(format!("{base}/v1/endpoints/node-1"))
        .json(&json!({"pool": "cache", "url": NODE, "readiness_url": ready_url}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    until_source(&c, "endpoint").await;

    let worker = c.worker("w1", "2", &[]);
    c.wait_workers(1).await;

    // `tether run --endpoint` prints what the command was handed.
    let out = tokio::process::Command::new(TETHER)
        .args([
            "run",
            "--server",
            &base,
            "--endpoint",
            "CACHE_URL=cache",
            "--",
            "sh",
            "-c",
            "echo $CACHE_URL",
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(NODE),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // An attempt that got the endpoint waits; one that got the fallback ends.
    let run = c
        .submit(json!({
            "command": ["sh", "-c",
                format!("echo \"url=$CACHE_URL\"; [ \"$CACHE_URL\" = {FALLBACK} ] || sleep 60")],
            "endpoints": {"CACHE_URL": "cache"},
            "max_attempts": 2
        }))
        .await;
    let run_id = id(&run);
    c.wait_for(&run_id, Duration::from_secs(10), |r| {
        r["stdout_bytes"].as_i64() > Some(0)
    })
    .await;

    // The endpoint goes unready; dispatch falls back; the worker leaves and its run is
    // retried on another, which is handed the fallback.
    status.store(503, Ordering::SeqCst);
    until_source(&c, "fallback").await;
    worker.stop(Duration::from_secs(10));
    let _second = c.worker("w2", "2", &[]);
    let done = c
        .wait_for(&run_id, Duration::from_secs(20), |r| {
            r["status"] == "succeeded"
        })
        .await;
    assert_eq!(done["attempt"], 2);
    let logs = String::from_utf8_lossy(&c.logs_of(&run_id, "all").await).into_owned();
    assert!(logs.contains(&format!("url={NODE}")), "{logs}");
    assert!(logs.contains(&format!("url={FALLBACK}")), "{logs}");
    let attempts = done["attempts"].as_array().unwrap();
    assert_eq!(
        attempts[0]["endpoints"]["CACHE_URL"],
        json!({"url": NODE, "source": "endpoint", "endpoint": "node-1"})
    );
    assert_eq!(
        attempts[1]["endpoints"]["CACHE_URL"],
        json!({"url": FALLBACK, "source": "fallback", "endpoint": null})
    );

    // `tether endpoints` shows the endpoint unready, with its probe error.
    let out = tokio::process::Command::new(TETHER)
        .args(["endpoints", "--server", &base])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    let row = table
        .lines()
        .find(|l| l.starts_with("node-1"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains(" no ") && row.contains("503"), "{table}");
    assert!(table.contains(FALLBACK), "{table}");
}
