//! Streams through a proxy that cuts idle connections (as nginx, ALB, Heroku do), followers by
//! the thousand, and a cut mid-run resumed with Last-Event-ID.

use std::time::Duration;

use base64::Engine;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{json, Value};
use tether_testkit::{eventually, IdleCuttingProxy};
use tokio::time::Instant;

use crate::harness::{fast_config, TestServer};

/// Follows a run's SSE stream at `base`; returns the events and whether `end` arrived.
async fn follow(
    base: String,
    run: String,
    within: Duration,
) -> (Vec<(String, Option<i64>, Value)>, bool) {
    let response = reqwest::Client::new()
        .get(format!("http://{base}/v1/runs/{run}/events"))
        .send()
        .await
        .unwrap();
    let mut events = response.bytes_stream().eventsource();
    let mut got = Vec::new();
    let deadline = Instant::now() + within;
    while let Ok(Some(Ok(e))) = tokio::time::timeout_at(deadline, events.next()).await {
        let data: Value = serde_json::from_str(&e.data).unwrap();
        let seq = data.get("seq").and_then(|s| s.as_i64());
        let end = e.event == "end";
        got.push((e.event, seq, data));
        if end {
            return (got, true);
        }
    }
    (got, false)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Worker calls for one run, driven by the test.
struct Driver<'a> {
    s: &'a TestServer,
    worker: String,
    run: String,
}

impl<'a> Driver<'a> {
    async fn claim(s: &'a TestServer, run: &str) -> Driver<'a> {
        let worker = s.register(1.0).await;
        let a = s.claim(&worker, 1).await;
        assert_eq!(a[0]["run_id"], run);
        Driver {
            s,
            worker,
            run: run.to_string(),
        }
    }
    async fn call(&self, what: &str, body: Value) {
        let (status, answer) = self
            .s
            .post(&format!("/v1/runs/{}/attempts/1/{what}", self.run), body)
            .await;
        assert_eq!(status, 200, "{what}: {answer}");
    }
    async fn start(&self) {
        self.call("start", json!({"worker_id": self.worker})).await;
    }
    async fn line(&self, text: &str) {
        self.call(
            "logs",
            json!({"worker_id": self.worker, "chunks": [{"stream": "stdout", "ts": 0, "data": b64(text.as_bytes())}]}),
        )
        .await;
    }
    async fn finish(&self) {
        self.call(
            "finish",
            json!({"worker_id": self.worker, "status": "succeeded", "exit_code": 0}),
        )
        .await;
    }
}

fn proxy_config(sse_heartbeat: Duration) -> tether_server::ServerConfig {
    let mut config = fast_config();
    config.sse_heartbeat = sse_heartbeat;
    // These runs are driven by hand: keep them from going stale while the test waits.
    config.stale_after = Duration::from_secs(120);
    config
}

const QUIET: Duration = Duration::from_secs(10);
const PROXY_IDLE: Duration = Duration::from_secs(2);

/// The three quiet phases of SPEC §1 problem 1, each held for 10 s behind a proxy that cuts
/// connections idle for 2 s. Returns, per phase, (stream ended with `end`, proxy cuts).
async fn three_quiet_phases(sse_heartbeat: Duration) -> Vec<(bool, usize)> {
    // The phases run side by side, each on its own server and its own proxy.
    let phases =
        ["pending", "claimed_before_first_line", "silent_mid_run"].map(|phase| async move {
            let s = &TestServer::start_with(proxy_config(sse_heartbeat)).await;
            let upstream = s.base.trim_start_matches("http://").to_string();
            let proxy = IdleCuttingProxy::start(upstream, PROXY_IDLE).await.unwrap();
            let run = s.submit(json!({"command": ["x"]})).await["id"]
                .as_str()
                .unwrap()
                .to_string();
            let follower = tokio::spawn(follow(proxy.addr.clone(), run.clone(), QUIET * 2));
            match phase {
                "pending" => {
                    tokio::time::sleep(QUIET).await;
                    let d = Driver::claim(s, &run).await;
                    d.start().await;
                    d.line("hello\n").await;
                    d.finish().await;
                }
                "claimed_before_first_line" => {
                    let d = Driver::claim(s, &run).await;
                    d.start().await;
                    tokio::time::sleep(QUIET).await;
                    d.line("first line at last\n").await;
                    d.finish().await;
                }
                _ => {
                    let d = Driver::claim(s, &run).await;
                    d.start().await;
                    d.line("before\n").await;
                    tokio::time::sleep(QUIET).await;
                    d.line("after\n").await;
                    d.finish().await;
                }
            }
            let (events, ended) = follower.await.unwrap();
            if ended {
                let beats = events.iter().filter(|(k, _, _)| k == "heartbeat").count();
                assert!(beats >= 10, "{phase}: only {beats} heartbeats in 10 s");
            }
            (ended, proxy.cuts())
        });
    futures::future::join_all(phases).await
}

#[tokio::test]
async fn heartbeats_keep_every_quiet_phase_alive_through_an_idle_cutting_proxy() {
    let results = three_quiet_phases(Duration::from_millis(500)).await;
    assert_eq!(results, vec![(true, 0), (true, 0), (true, 0)]);
}

#[tokio::test]
async fn without_heartbeats_the_same_proxy_cuts_every_quiet_phase() {
    // The control: proves the proxy cuts, so the test above can fail.
    let results = three_quiet_phases(Duration::from_secs(3600)).await;
    for (ended, cuts) in results {
        assert!(!ended);
        assert!(cuts >= 1);
    }
}

#[tokio::test]
async fn a_stream_cut_mid_run_resumes_with_last_event_id_exactly() {
    let s = TestServer::start_with(proxy_config(Duration::from_millis(300))).await;
    let run = s.submit(json!({"command": ["x"]})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let d = Driver::claim(&s, &run).await;
    d.start().await;
    for i in 0..10 {
        d.line(&format!("early {i}\n")).await;
    }
    // Follow live, and cut the connection after 8 stored events while the run goes on.
    let response = s
        .http
        .get(s.url(&format!("/v1/runs/{run}/events")))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream().eventsource();
    let mut seen: Vec<(i64, String, Value)> = Vec::new();
    while seen.len() < 8 {
        let e = stream.next().await.unwrap().unwrap();
        if e.event != "heartbeat" {
            seen.push((
                e.id.parse().unwrap(),
                e.event,
                serde_json::from_str(&e.data).unwrap(),
            ));
        }
    }
    drop(stream);
    for i in 0..10 {
        d.line(&format!("late {i}\n")).await;
    }
    d.finish().await;
    let last = seen.last().unwrap().0;
    let resumed = s
        .http
        .get(s.url(&format!("/v1/runs/{run}/events")))
        .header("Last-Event-ID", last.to_string())
        .send()
        .await
        .unwrap();
    let mut stream = resumed.bytes_stream().eventsource();
    while let Some(Ok(e)) = stream.next().await {
        if e.event != "heartbeat" {
            seen.push((
                e.id.parse().unwrap(),
                e.event,
                serde_json::from_str(&e.data).unwrap(),
            ));
        }
    }
    let seqs: Vec<i64> = seen.iter().map(|(s, _, _)| *s).collect();
    let total = s.run(&run).await;
    let expected_count = 4 + 20 + 2; // status×3 + attempt, 20 logs, status + end
    assert_eq!(
        seqs,
        (1..=expected_count).collect::<Vec<i64>>(),
        "nothing lost, nothing repeated"
    );
    assert_eq!(seen.last().unwrap().1, "end");
    let text: String = seen
        .iter()
        .filter(|(_, k, _)| k == "log")
        .map(|(_, _, d)| d["text"].as_str().unwrap().to_string())
        .collect();
    assert!(text.starts_with("early 0\n") && text.ends_with("late 9\n"));
    assert_eq!(total["status"], "succeeded");
}

#[tokio::test]
async fn a_thousand_followers_of_one_busy_run_all_get_every_event_in_order() {
    let s = TestServer::start_with(proxy_config(Duration::from_secs(2))).await;
    let run = s.submit(json!({"command": ["x"]})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let base = s.base.trim_start_matches("http://").to_string();
    let followers: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(follow(base.clone(), run.clone(), Duration::from_secs(120))))
        .collect();
    // Every follower connected before the run gets busy.
    eventually(
        "1000 followers connected",
        Duration::from_secs(60),
        async || {
            let connected = s.state().hub.follower_count();
            if connected >= 1000 {
                Ok(())
            } else {
                Err(format!("only {connected} connected"))
            }
        },
    )
    .await;
    let d = Driver::claim(&s, &run).await;
    d.start().await;
    for i in 0..100 {
        d.line(&format!("line {i}\n")).await;
    }
    d.finish().await;
    let expected: Vec<i64> = (1..=106).collect();
    for f in followers {
        let (events, ended) = f.await.unwrap();
        assert!(ended);
        let seqs: Vec<i64> = events.iter().filter_map(|(_, seq, _)| *seq).collect();
        assert_eq!(seqs, expected);
    }
    eventually(
        "followers freed after end",
        Duration::from_secs(5),
        async || s.state().hub.follower_count() == 0,
    )
    .await;
}
