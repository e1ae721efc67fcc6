//! The worker protocol over HTTP: register, claim, start, logs, finish, heartbeat, each fenced
//! by the attempt; and the reaper behind it.

use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use crate::harness::{assert_error, TestServer};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn claim_one(s: &TestServer, worker: &str) -> (String, u64) {
    let assignments = s.claim(worker, 1).await;
    assert_eq!(assignments.len(), 1);
    (
        assignments[0]["run_id"].as_str().unwrap().to_string(),
        assignments[0]["attempt"].as_u64().unwrap(),
    )
}

fn attempt_path(run: &str, attempt: u64, call: &str) -> String {
    format!("/v1/runs/{run}/attempts/{attempt}/{call}")
}

#[tokio::test]
async fn a_run_goes_through_its_whole_life() {
    let s = TestServer::start().await;
    let submitted = s
        .submit(json!({"command": ["echo", "hi"], "env": {"A": "1"}}))
        .await;
    let worker = s.register(2.0).await;
    let assignments = s.claim(&worker, 4).await;
    assert_eq!(assignments.len(), 1);
    let a = &assignments[0];
    assert_eq!(a["run_id"], submitted["id"]);
    assert_eq!(a["attempt"], 1);
    assert_eq!(a["command"], json!(["echo", "hi"]));
    assert_eq!(a["env"]["A"], "1");
    let run = a["run_id"].as_str().unwrap();
    let claimed = s.run(run).await;
    assert_eq!(claimed["status"], "claimed");
    assert!(
        claimed["last_heartbeat_at"].is_string(),
        "a claim stamps the heartbeat"
    );
    let (status, body) = s
        .post(
            &attempt_path(run, 1, "start"),
            json!({"worker_id": worker, "pid": 42}),
        )
        .await;
    assert_eq!(
        (status, body["status"].clone()),
        (200, json!("running")),
        "{body}"
    );
    let (status, body) = s
        .post(
            &attempt_path(run, 1, "logs"),
            json!({"worker_id": worker, "chunks": [
                {"stream": "stdout", "ts": 1, "data": b64(b"hi\n")},
                {"stream": "stderr", "ts": 2, "data": b64(b"\xff\xfe raw\n")}
            ]}),
        )
        .await;
    assert_eq!(
        (status, body["stop"].clone()),
        (200, json!(false)),
        "{body}"
    );
    let (status, body) = s
        .post(
            &attempt_path(run, 1, "finish"),
            json!({"worker_id": worker, "status": "succeeded", "exit_code": 0}),
        )
        .await;
    assert_eq!(
        (status, body["status"].clone()),
        (200, json!("succeeded")),
        "{body}"
    );
    let done = s.run(run).await;
    assert_eq!(done["exit_code"], 0);
    assert_eq!(done["liveness"]["state"], "done");
    assert_eq!(done["attempts"][0]["status"], "succeeded");
    assert_eq!(done["attempts"][0]["worker_id"], json!(worker));
    let logs = s
        .http
        .get(s.url(&format!("/v1/runs/{run}/logs")))
        .send()
        .await
        .unwrap();
    assert!(logs.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(logs.bytes().await.unwrap().as_ref(), b"hi\n\xff\xfe raw\n");
}

#[tokio::test]
async fn every_worker_call_for_an_old_attempt_is_409_and_writes_nothing() {
    let s = TestServer::start().await;
    s.submit(json!({"command": ["sleep", "1"], "heartbeat_timeout_s": 0.3}))
        .await;
    let zombie = s.register(1.0).await;
    let (run, attempt) = claim_one(&s, &zombie).await;
    let (status, _) = s
        .post(
            &attempt_path(&run, attempt, "start"),
            json!({"worker_id": zombie}),
        )
        .await;
    assert_eq!(status, 200);
    // The zombie goes silent; the reaper retries the run; another worker takes attempt 2.
    s.wait_for(&run, Duration::from_secs(5), |r| r["status"] == "pending")
        .await;
    let fresh = s.register(1.0).await;
    let (run2, attempt2) = claim_one(&s, &fresh).await;
    assert_eq!((run2.as_str(), attempt2), (run.as_str(), 2));
    let before = s.run(&run).await;
    for (call, body) in [
        ("start", json!({"worker_id": zombie})),
        (
            "logs",
            json!({"worker_id": zombie, "chunks": [{"stream": "stdout", "ts": 1, "data": b64(b"late\n")}]}),
        ),
        (
            "finish",
            json!({"worker_id": zombie, "status": "succeeded", "exit_code": 0}),
        ),
    ] {
        let (status, answer) = s.post(&attempt_path(&run, 1, call), body).await;
        assert_error(status, &answer, 409, "stale_attempt");
    }
    // The current attempt, named by the wrong worker, is fenced too.
    let (status, answer) = s
        .post(
            &attempt_path(&run, 2, "finish"),
            json!({"worker_id": zombie, "status": "failed"}),
        )
        .await;
    assert_error(status, &answer, 409, "stale_attempt");
    // The zombie's heartbeat is told the run is not its own.
    let (status, answer) = s
        .post(
            &format!("/v1/workers/{zombie}/heartbeat"),
            json!({"runs": [{"run_id": run, "attempt": 1}]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer["not_owned"], json!([{"run_id": run, "attempt": 1}]));
    let after = s.run(&run).await;
    assert_eq!(before["status"], after["status"]);
    assert_eq!(after["attempt"], 2);
    assert_eq!(after["stdout_bytes"], 0);
    assert_eq!(after["attempts"][0]["error_code"], "worker_heartbeat_lost");
}

#[tokio::test]
async fn heartbeats_keep_a_quiet_run_alive_and_carry_cancels() {
    let s = TestServer::start().await;
    let run = s
        .submit(json!({"command": ["sleep", "100"], "heartbeat_timeout_s": 0.5}))
        .await;
    let id = run["id"].as_str().unwrap().to_string();
    let worker = s.register(1.0).await;
    let (_, attempt) = claim_one(&s, &worker).await;
    s.post(
        &attempt_path(&id, attempt, "start"),
        json!({"worker_id": worker}),
    )
    .await;
    let beat =
        json!({"runs": [{"run_id": id, "attempt": attempt, "stdout_bytes": 0, "stderr_bytes": 0}]});
    // Heartbeat for three stale windows, printing nothing: never reaped, and shown quiet.
    let until = tokio::time::Instant::now() + Duration::from_millis(1_500);
    while tokio::time::Instant::now() < until {
        let (status, answer) = s
            .post(&format!("/v1/workers/{worker}/heartbeat"), beat.clone())
            .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["cancel"], json!([]));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let alive = s.run(&id).await;
    assert_eq!(alive["status"], "running");
    assert_eq!(alive["liveness"]["state"], "quiet");
    let (status, body) = s.post(&format!("/v1/runs/{id}/cancel"), json!({})).await;
    assert_eq!((status, body["status"].clone()), (202, json!("running")));
    let (_, answer) = s
        .post(&format!("/v1/workers/{worker}/heartbeat"), beat)
        .await;
    assert_eq!(
        answer["cancel"],
        json!([{"run_id": id, "attempt": attempt}])
    );
    let (status, body) = s
        .post(
            &attempt_path(&id, attempt, "finish"),
            json!({"worker_id": worker, "status": "cancelled"}),
        )
        .await;
    assert_eq!((status, body["status"].clone()), (200, json!("cancelled")));
}

#[tokio::test]
async fn unknown_workers_are_404_and_bad_worker_input_is_422() {
    let s = TestServer::start().await;
    let (status, body) = s
        .post("/v1/workers/nope/heartbeat", json!({"runs": []}))
        .await;
    assert_error(status, &body, 404, "unknown_worker");
    let (status, body) = s
        .post("/v1/workers/nope/claim", json!({"wait_ms": 0}))
        .await;
    assert_error(status, &body, 404, "unknown_worker");
    let (status, body) = s
        .post(
            "/v1/workers",
            json!({"name": "", "capacity": {"cpus": 1, "memory_mb": 1}}),
        )
        .await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = s
        .post(
            "/v1/workers",
            json!({"name": "w", "capacity": {"cpus": -1, "memory_mb": 1}}),
        )
        .await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = s
        .post(
            "/v1/workers",
            json!({"name": "w", "capacity": {"cpus": 1, "memory_mb": 1}, "lanes": ["nope"]}),
        )
        .await;
    assert_error(status, &body, 422, "unknown_lane");
    let worker = s.register(1.0).await;
    s.submit(json!({"command": ["true"]})).await;
    let (run, attempt) = claim_one(&s, &worker).await;
    let (status, body) = s
        .post(
            &attempt_path(&run, attempt, "logs"),
            json!({"worker_id": worker, "chunks": [{"stream": "stdin", "ts": 0, "data": ""}]}),
        )
        .await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = s
        .post(
            &attempt_path(&run, attempt, "logs"),
            json!({"worker_id": worker, "chunks": [{"stream": "stdout", "ts": 0, "data": "%%%"}]}),
        )
        .await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = s
        .post(
            &attempt_path(&run, attempt, "finish"),
            json!({"worker_id": worker, "status": "running"}),
        )
        .await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = s
        .post(
            &format!("/v1/runs/{run}/attempts/one/start"),
            json!({"worker_id": worker}),
        )
        .await;
    assert_error(status, &body, 422, "invalid_field");
    assert_eq!(
        s.run(&run).await["status"],
        "claimed",
        "bad input changed the run"
    );
    // Only the worker itself may deregister: its secret is required.
    let url = s.url(&format!("/v1/workers/{worker}"));
    let r = s.http.delete(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = s
        .as_worker(s.http.delete(&url), &worker)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    // Deregistering hands the run back at once.
    assert_eq!(s.run(&run).await["status"], "pending");
}

/// `POST /v1/workers/{id}/release`: only the worker itself, at most 1,000 runs, bad input
/// refused with a stable code and nothing changed; a run it never started goes back
/// uncounted, and anything else is answered as not released.
#[tokio::test]
async fn a_worker_hands_back_runs_it_never_started() {
    let s = TestServer::start().await;
    let (status, body) = s
        .post("/v1/workers/nope/release", json!({"runs": []}))
        .await;
    assert_error(status, &body, 404, "unknown_worker");
    let worker = s.register(2.0).await;
    let held = s
        .submit(json!({"command": ["true"], "max_attempts": 1}))
        .await;
    let started = s.submit(json!({"command": ["true"]})).await;
    let (held, started) = (
        held["id"].as_str().unwrap().to_string(),
        started["id"].as_str().unwrap().to_string(),
    );
    assert_eq!(s.claim(&worker, 2).await.len(), 2);
    let (status, _) = s
        .post(
            &attempt_path(&started, 1, "start"),
            json!({"worker_id": worker}),
        )
        .await;
    assert_eq!(status, 200);
    let path = format!("/v1/workers/{worker}/release");

    let too_many: Vec<Value> = (0..=tether_api::MAX_RELEASED_RUNS)
        .map(|_| json!({"run_id": held, "attempt": 1}))
        .collect();
    let (status, body) = s.post(&path, json!({ "runs": too_many })).await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = s.post(&path, json!({"runs": [{"run_id": held}]})).await;
    assert_error(status, &body, 422, "invalid_field");
    let (status, body) = s.post(&path, json!({"runs": [], "extra": 1})).await;
    assert_error(status, &body, 422, "invalid_field");
    let r = s
        .http
        .post(s.url(&path))
        .json(&json!({"runs": [{"run_id": held, "attempt": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403, "another's word is refused");
    assert_eq!(
        s.run(&held).await["status"],
        "claimed",
        "bad input changed it"
    );

    let refs = json!({"runs": [
        {"run_id": held, "attempt": 1},
        {"run_id": started, "attempt": 1},
        {"run_id": "nope", "attempt": 1},
    ]});
    let (status, body) = s.post(&path, refs).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["released"], json!([{"run_id": held, "attempt": 1}]));
    let run = s.run(&held).await;
    assert_eq!(run["status"], "pending", "{run}");
    assert_eq!(run["released_attempts"], 1, "{run}");
    assert_eq!(run["attempts"][0]["error_code"], "released", "{run}");
    assert_eq!(s.run(&started).await["status"], "running");
    // Allowed one attempt, it is handed out again.
    let again = s.claim(&worker, 1).await;
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0]["run_id"].as_str(), again[0]["attempt"].as_u64()),
        (Some(held.as_str()), Some(2))
    );
}

#[tokio::test]
async fn a_claim_long_polls_until_a_run_is_submitted() {
    let s = TestServer::start().await;
    let worker = s.register(1.0).await;
    let waiting = s.open_claim(&worker, json!({"max_runs": 1, "wait_ms": 4000}));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A worker that stopped heartbeating gets nothing, even with a claim open: beat first.
    let (status, _) = s
        .post(
            &format!("/v1/workers/{worker}/heartbeat"),
            json!({"runs": []}),
        )
        .await;
    assert_eq!(status, 200);
    let submitted_at = tokio::time::Instant::now();
    let run = s.submit(json!({"command": ["true"]})).await;
    let (body, _) = waiting.await.unwrap();
    assert_eq!(body["assignments"][0]["run_id"], run["id"]);
    // Woken by the submission, not by a poll interval.
    assert!(
        submitted_at.elapsed() < Duration::from_millis(500),
        "{:?}",
        submitted_at.elapsed()
    );
}

#[tokio::test]
async fn workers_are_listed_with_their_liveness() {
    let s = TestServer::start().await;
    let worker = s.register(2.0).await;
    s.submit(json!({"command": ["true"]})).await;
    let (run, attempt) = claim_one(&s, &worker).await;
    let (status, list) = s.get("/v1/workers").await;
    assert_eq!(status, 200);
    let w = &list["workers"][0];
    assert_eq!(w["id"], json!(worker));
    assert_eq!(w["state"], "active");
    assert_eq!(w["runs"], json!([{"run_id": run, "attempt": attempt}]));
    assert_eq!(w["reserved"]["cpus"], 1.0);
    // Silent past one interval: suspect; past the stale window: lost.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut states = Vec::new();
    loop {
        let (_, list) = s.get("/v1/workers").await;
        let state = list["workers"][0]["state"].as_str().unwrap().to_string();
        if states.last() != Some(&state) {
            states.push(state.clone());
        }
        if state == "lost" || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(states, vec!["active", "suspect", "lost"]);
}

#[tokio::test]
async fn logs_of_a_retried_run_are_the_last_attempt_unless_asked() {
    let s = TestServer::start().await;
    s.submit(json!({"command": ["true"], "heartbeat_timeout_s": 0.3}))
        .await;
    let lost = s.register(1.0).await;
    let (run, _) = claim_one(&s, &lost).await;
    let log = |worker: &str, attempt: u64, text: &str| {
        (
            attempt_path(&run, attempt, "logs"),
            json!({"worker_id": worker, "chunks": [{"stream": "stdout", "ts": 1, "data": b64(text.as_bytes())}]}),
        )
    };
    s.post(&attempt_path(&run, 1, "start"), json!({"worker_id": lost}))
        .await;
    let (path, body) = log(&lost, 1, "first 1\nfirst 2 (cut");
    assert_eq!(s.post(&path, body).await.0, 200);
    // The worker goes silent; the run is retried on another.
    s.wait_for(&run, Duration::from_secs(5), |r| r["status"] == "pending")
        .await;
    let fresh = s.register(1.0).await;
    claim_one(&s, &fresh).await;
    s.post(&attempt_path(&run, 2, "start"), json!({"worker_id": fresh}))
        .await;
    let (path, body) = log(&fresh, 2, "second 1\n");
    assert_eq!(s.post(&path, body).await.0, 200);
    s.post(
        &attempt_path(&run, 2, "finish"),
        json!({"worker_id": fresh, "status": "succeeded", "exit_code": 0}),
    )
    .await;
    let logs = |query: &str| {
        let url = s.url(&format!("/v1/runs/{run}/logs{query}"));
        let http = s.http.clone();
        async move {
            let r = http.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(logs("").await, (200, "second 1\n".to_string()));
    assert_eq!(logs("?attempt=last").await, (200, "second 1\n".to_string()));
    assert_eq!(logs("?attempt=2").await, (200, "second 1\n".to_string()));
    assert_eq!(
        logs("?attempt=1").await,
        (200, "first 1\nfirst 2 (cut".to_string())
    );
    assert_eq!(
        logs("?attempt=all").await,
        (
            200,
            "==> [tether] attempt 1/3 <==\nfirst 1\nfirst 2 (cut\n==> [tether] attempt 2/3 <==\nsecond 1\n"
                .to_string()
        )
    );
    assert_eq!(logs("?attempt=7").await, (200, String::new()));
    for bad in ["0", "x", "-1"] {
        let (status, body) = s.get(&format!("/v1/runs/{run}/logs?attempt={bad}")).await;
        assert_error(status, &body, 422, "invalid_field");
    }
}

/// A worker whose heartbeat went stale is handed nothing, and a claim it holds open meanwhile
/// must not wait for the server's periodic re-check (1 s) once a heartbeat makes it fresh
/// again: the heartbeat itself wakes the claim.
#[tokio::test]
async fn a_heartbeat_wakes_the_claim_its_worker_held_open_while_stale() {
    let s = TestServer::start().await;
    let worker = s.register(1.0).await;
    s.submit(json!({"command": ["true"]})).await;
    // Silent past one interval and a half: suspect, so claims take nothing.
    tether_testkit::eventually(
        "the worker to turn suspect",
        Duration::from_secs(3),
        async || {
            let (_, list) = s.get("/v1/workers").await;
            list["workers"][0]["state"] == "suspect"
        },
    )
    .await;
    let claim_path = format!("/v1/workers/{worker}/claim");
    let beat_path = format!("/v1/workers/{worker}/heartbeat");
    let beat_sent = std::sync::Mutex::new(None);
    let ((status, answer), _) = tokio::join!(
        s.post(&claim_path, json!({"max_runs": 1, "wait_ms": 5000})),
        async {
            // Lets the claim find nothing and wait first; if the beat lands before the claim
            // looks, the claim takes the run at once and the test passes the same way.
            tokio::time::sleep(Duration::from_millis(150)).await;
            *beat_sent.lock().unwrap() = Some(tokio::time::Instant::now());
            let (status, _) = s.post(&beat_path, json!({"runs": []})).await;
            assert_eq!(status, 200);
        }
    );
    let answered = tokio::time::Instant::now();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["assignments"].as_array().map(Vec::len), Some(1));
    let waited = answered - beat_sent.lock().unwrap().expect("the heartbeat was sent");
    assert!(
        waited < Duration::from_millis(600),
        "the claim answered {waited:?} after the heartbeat: a timer, not the heartbeat"
    );
}

#[tokio::test]
async fn a_submission_is_handed_to_a_claim_waiting_on_this_server() {
    let s = TestServer::start().await;
    let worker = s.register(1.0).await;
    let (status, _) = s
        .post(
            &format!("/v1/workers/{worker}/heartbeat"),
            json!({"runs": []}),
        )
        .await;
    assert_eq!(status, 200);
    let waiting = s.open_claim(&worker, json!({"max_runs": 4, "wait_ms": 10_000}));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.state().waiting_claims.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the claim never waited"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let run = s.submit(json!({"command": ["true"]})).await;
    // Claimed in the submission's own transaction: the answer says so.
    assert_eq!(run["status"], "claimed", "{run}");
    assert_eq!(run["attempt"], 1);
    assert_eq!(run["worker_id"], worker.as_str());
    let (body, _) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting claim is answered at once")
        .unwrap();
    let assignments = body["assignments"].as_array().unwrap();
    assert_eq!(assignments.len(), 1, "{body}");
    assert_eq!(assignments[0]["run_id"], run["id"]);
    assert_eq!(assignments[0]["attempt"], 1);
    assert!(s.state().waiting_claims.is_empty());
    // The run's history is a claim's: pending, then claimed with attempt 1, once.
    let id = run["id"].as_str().unwrap();
    let view = s.run(id).await;
    assert_eq!(view["status"], "claimed");
    let attempts = view["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{view}");
    assert_eq!(attempts[0]["worker_id"], worker.as_str());

    // With no claim waiting, a submission waits as before.
    let queued = s.submit(json!({"command": ["true"]})).await;
    assert_eq!(queued["status"], "pending");
}
