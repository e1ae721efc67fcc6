//! Event streams: replay then follow without a gap or a duplicate, resume with Last-Event-ID,
//! heartbeats while nothing happens, NDJSON, and followers freed when they leave.

use std::time::Duration;

use base64::Engine;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::harness::TestServer;

/// What `collect_sse` needs: a client and the server's address.
#[derive(Clone)]
struct Sse {
    http: reqwest::Client,
    base: String,
}

impl Sse {
    fn of(s: &TestServer) -> Sse {
        Sse {
            http: s.http.clone(),
            base: s.base.clone(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }
}

#[derive(Debug, Clone)]
struct Received {
    event: String,
    id: Option<i64>,
    data: Value,
}

/// Opens an SSE stream and collects events until `stop` says so, the stream ends, or `within`.
async fn collect_sse(
    s: &Sse,
    path: &str,
    last_event_id: Option<i64>,
    within: Duration,
    stop: impl Fn(&Received) -> bool,
) -> Vec<Received> {
    let mut request = s.http.get(s.url(path));
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id.to_string());
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["cache-control"], "no-cache");
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let mut events = response.bytes_stream().eventsource();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(Ok(e))) = tokio::time::timeout_at(deadline, events.next()).await {
        let r = Received {
            event: e.event.clone(),
            id: e.id.parse().ok(),
            data: serde_json::from_str(&e.data).unwrap(),
        };
        let done = stop(&r);
        got.push(r);
        if done {
            break;
        }
    }
    got
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Drives one run through claim, start, `lines` log appends and a successful finish.
async fn drive_run(s: &TestServer, run: &str, lines: usize) {
    let worker = s.register(1.0).await;
    let a = s.claim(&worker, 1).await;
    assert_eq!(a[0]["run_id"], run);
    let path = |call: &str| format!("/v1/runs/{run}/attempts/1/{call}");
    s.post(&path("start"), json!({"worker_id": worker})).await;
    for i in 0..lines {
        let (status, _) = s
            .post(
                &path("logs"),
                json!({"worker_id": worker, "chunks": [{"stream": "stdout", "ts": 0, "data": b64(format!("line {i}\n").as_bytes())}]}),
            )
            .await;
        assert_eq!(status, 200);
    }
    let (status, _) = s
        .post(
            &path("finish"),
            json!({"worker_id": worker, "status": "succeeded", "exit_code": 0}),
        )
        .await;
    assert_eq!(status, 200);
}

fn stored(events: &[Received]) -> Vec<(i64, String)> {
    // A heartbeat is not stored; the id it shows is the stream's last one (SSE ids are sticky),
    // and one arrives mid-run whenever the run outlasts the heartbeat interval.
    events
        .iter()
        .filter(|e| e.event != "heartbeat")
        .filter_map(|e| e.id.map(|id| (id, e.event.clone())))
        .collect()
}

#[tokio::test]
async fn a_follower_sees_every_event_in_order_then_end() {
    let s = TestServer::start().await;
    let run = s.submit(json!({"command": ["echo"]})).await;
    let id = run["id"].as_str().unwrap().to_string();
    let follow = {
        let path = format!("/v1/runs/{id}/events");
        let sse = Sse::of(&s);
        tokio::spawn(async move {
            collect_sse(&sse, &path, None, Duration::from_secs(10), |e| {
                e.event == "end"
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    drive_run(&s, &id, 5).await;
    let events = follow.await.unwrap();
    let kinds: Vec<String> = stored(&events).into_iter().map(|(_, k)| k).collect();
    assert_eq!(
        kinds,
        [
            "status", "status", "attempt", "status", "log", "log", "log", "log", "log", "status",
            "end"
        ]
    );
    let seqs: Vec<i64> = stored(&events).into_iter().map(|(s, _)| s).collect();
    assert_eq!(seqs, (1..=11).collect::<Vec<i64>>(), "seq rises by one");
    assert_eq!(events.last().unwrap().data["status"], "succeeded");
    // The first frame is a heartbeat: status and queue position before anything happens.
    assert_eq!(events[0].event, "heartbeat");
    assert_eq!(events[0].data["status"], "pending");
    assert_eq!(events[0].data["queue_position"], 1);
    assert!(events[0].id.is_none());
}

#[tokio::test]
async fn last_event_id_resumes_with_nothing_lost_or_repeated() {
    let s = TestServer::start().await;
    let run = s.submit(json!({"command": ["echo"]})).await;
    let id = run["id"].as_str().unwrap().to_string();
    drive_run(&s, &id, 20).await;
    let path = format!("/v1/runs/{id}/events");
    let full = stored(
        &collect_sse(&Sse::of(&s), &path, None, Duration::from_secs(5), |e| {
            e.event == "end"
        })
        .await,
    );
    // Cut after the 7th stored event, resume from there by header, then by ?after=.
    let first = collect_sse(&Sse::of(&s), &path, None, Duration::from_secs(5), |e| {
        e.id == Some(7)
    })
    .await;
    let rest = collect_sse(&Sse::of(&s), &path, Some(7), Duration::from_secs(5), |e| {
        e.event == "end"
    })
    .await;
    let mut joined = stored(&first);
    joined.extend(stored(&rest));
    assert_eq!(joined, full);
    let by_query = collect_sse(
        &Sse::of(&s),
        &format!("{path}?after=7"),
        None,
        Duration::from_secs(5),
        |e| e.event == "end",
    )
    .await;
    assert_eq!(stored(&by_query), stored(&rest));
}

#[tokio::test]
async fn heartbeats_flow_while_a_run_waits() {
    let s = TestServer::start().await; // --sse-heartbeat 300ms
    let run = s.submit(json!({"command": ["echo"]})).await;
    let id = run["id"].as_str().unwrap();
    let events = collect_sse(
        &Sse::of(&s),
        &format!("/v1/runs/{id}/events"),
        None,
        Duration::from_millis(1_000),
        |_| false,
    )
    .await;
    let beats: Vec<&Received> = events.iter().filter(|e| e.event == "heartbeat").collect();
    assert!(beats.len() >= 3, "{events:?}");
    for b in beats {
        assert_eq!(b.data["status"], "pending");
        assert_eq!(b.data["liveness"]["state"], "waiting");
        // Not stored, so no seq (an SSE parser repeats the last id it saw; the wire has none).
        assert!(b.data.get("seq").is_none());
    }
}

#[tokio::test]
async fn ndjson_gives_the_same_events_and_closes_when_not_following() {
    let s = TestServer::start().await;
    let run = s.submit(json!({"command": ["echo"]})).await;
    let id = run["id"].as_str().unwrap().to_string();
    drive_run(&s, &id, 2).await;
    let body = s
        .http
        .get(s.url(&format!("/v1/runs/{id}/events")))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["status", "status", "attempt", "status", "log", "log", "status", "end"]
    );
    assert_eq!(lines[4]["text"], "line 0\n");
    assert_eq!(lines[4]["seq"], 5);
}

#[tokio::test]
async fn a_follower_that_leaves_is_freed() {
    let s = TestServer::start().await;
    let run = s.submit(json!({"command": ["echo"]})).await;
    let id = run["id"].as_str().unwrap();
    let hub = s.state().hub.clone();
    let response = s
        .http
        .get(s.url(&format!("/v1/runs/{id}/events")))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let _first = body.next().await;
    assert_eq!(hub.follower_count(), 1);
    drop(body);
    // Gone within one heartbeat interval (300 ms here).
    tether_testkit::eventually(
        "the follower freed",
        Duration::from_millis(600),
        async || hub.follower_count() == 0,
    )
    .await;
}

#[tokio::test]
async fn a_reconnect_after_end_is_closed_at_once() {
    let s = TestServer::start().await;
    let run = s.submit(json!({"command": ["echo"]})).await;
    let id = run["id"].as_str().unwrap().to_string();
    drive_run(&s, &id, 2).await;
    let path = format!("/v1/runs/{id}/events");
    let events = collect_sse(&Sse::of(&s), &path, None, Duration::from_secs(5), |e| {
        e.event == "end"
    })
    .await;
    let end_id = events.last().and_then(|e| e.id).unwrap();
    // What an EventSource does after the server closed: reconnect with the end's id.
    let started = std::time::Instant::now();
    let response = tokio::time::timeout(
        Duration::from_secs(1),
        s.http
            .get(s.url(&path))
            .header("Last-Event-ID", end_id.to_string())
            .send(),
    )
    .await
    .expect("answered within 1 s")
    .unwrap();
    assert_eq!(response.status().as_u16(), 204);
    let body = tokio::time::timeout(Duration::from_secs(1), response.bytes())
        .await
        .expect("closed within 1 s")
        .unwrap();
    assert!(body.is_empty());
    assert!(started.elapsed() < Duration::from_secs(1));
    // The same by `?after=`.
    let (status, _) = s.get(&format!("{path}?after={end_id}")).await;
    assert_eq!(status, 204);
    // NDJSON, even when asked to follow, replays `end` and closes.
    let body = tokio::time::timeout(
        Duration::from_secs(1),
        s.http
            .get(s.url(&format!("{path}?after={end_id}&follow=true")))
            .header("accept", "application/x-ndjson")
            .send()
            .await
            .unwrap()
            .text(),
    )
    .await
    .expect("closed within 1 s")
    .unwrap();
    let kinds: Vec<String> = body
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .filter(|k| k != "heartbeat")
        .collect();
    assert_eq!(kinds, ["end"]);
}
