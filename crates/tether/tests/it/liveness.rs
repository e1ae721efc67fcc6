//! Liveness end to end: workers SIGKILLed, SIGSTOPped and stopped gracefully mid-run, with a
//! heartbeat of 200 ms and runs stale after 1 s.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::cluster::{id, processes_running, Cluster, Proc};
use tether_testkit::{eventually, eventually_every};

/// A command that sleeps (as `sleep <tag>`) on its first attempt and succeeds at once on the
/// next, told apart by a marker file.
fn first_attempt_hangs(c: &Cluster, tag: u32) -> Value {
    let marker = c.path().join(format!("marker-{tag}"));
    let script = format!(
        "if [ -f {m} ]; then echo retry; exit 0; fi; touch {m}; exec sleep {tag}",
        m = marker.display()
    );
    json!(["sh", "-c", script])
}

/// Kills stray `sleep <tag>` processes a SIGKILLed worker left behind.
fn reap_orphans(tag: u32) {
    let _ = std::process::Command::new("pkill")
        .args(["-KILL", "-x", "-f", &format!("sleep {tag}")])
        .status();
}

async fn holder_of(c: &Cluster, run: &str) -> String {
    let r = c
        .wait_for(run, Duration::from_secs(10), |r| r["status"] == "running")
        .await;
    r["worker_id"].as_str().unwrap().to_string()
}

async fn worker_name(c: &Cluster, worker_id: &str) -> String {
    c.workers()
        .await
        .into_iter()
        .find(|w| w["id"] == worker_id)
        .map(|w| w["name"].as_str().unwrap().to_string())
        .unwrap()
}

#[tokio::test]
async fn a_sigkilled_worker_s_run_is_retried_on_another_within_the_window() {
    let mut c = Cluster::sqlite();
    c.start_server(&[]).await;
    let mut workers = [
        ("w1", Some(c.worker("w1", "1", &[]))),
        ("w2", Some(c.worker("w2", "1", &[]))),
    ];
    c.wait_workers(2).await;
    let run = c
        .submit(json!({"command": first_attempt_hangs(&c, 741)}))
        .await;
    let holder = worker_name(&c, &holder_of(&c, &id(&run)).await).await;
    let victim = workers
        .iter_mut()
        .find(|(n, _)| *n == holder)
        .unwrap()
        .1
        .take()
        .unwrap();
    victim.kill9();
    let killed_at = Instant::now();
    // The dead worker's command dies with it: it does not run on beside the retry.
    while processes_running(&["sleep", "741"]) > 0 {
        assert!(
            killed_at.elapsed() < Duration::from_secs(1),
            "orphaned command still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.wait_for(&id(&run), Duration::from_secs(5), |r| r["attempt"] == 2)
        .await;
    let detected = killed_at.elapsed();
    // Stale after 1 s; detected within that window plus one second.
    assert!(
        detected < Duration::from_secs(2),
        "retried after {detected:?}"
    );
    let done = c.wait_terminal(&id(&run), Duration::from_secs(10)).await;
    reap_orphans(741);
    assert_eq!(done["status"], "succeeded", "{done}");
    let attempts = done["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["status"], "timed_out");
    assert_eq!(attempts[0]["error_code"], "worker_heartbeat_lost");
    assert_eq!(attempts[1]["status"], "succeeded");
    assert_ne!(attempts[0]["worker_id"], attempts[1]["worker_id"]);
    assert_eq!(c.logs(&id(&run)).await, b"retry\n");
}

#[tokio::test]
async fn with_one_attempt_a_lost_worker_ends_the_run_timed_out() {
    let mut c = Cluster::sqlite();
    c.start_server(&[]).await;
    let w = c.worker("w1", "1", &[]);
    c.wait_workers(1).await;
    let run = c
        .submit(json!({"command": ["sleep", "742"], "max_attempts": 1}))
        .await;
    holder_of(&c, &id(&run)).await;
    w.kill9();
    let done = c.wait_terminal(&id(&run), Duration::from_secs(5)).await;
    reap_orphans(742);
    assert_eq!(done["status"], "timed_out", "{done}");
    assert_eq!(done["error_code"], "worker_heartbeat_lost");
    assert_eq!(done["attempt"], 1);
}

#[tokio::test]
async fn a_run_silent_for_ten_stale_windows_is_never_reaped_and_shows_quiet() {
    let mut c = Cluster::sqlite();
    c.start_server(&[]).await;
    let _w = c.worker("w1", "1", &[]);
    c.wait_workers(1).await;
    let run = c
        .submit(json!({"command": ["sh", "-c", "sleep 10; echo finally"]}))
        .await;
    let mut states = std::collections::BTreeSet::new();
    let done = eventually_every(
        "the run to end",
        Duration::from_secs(20),
        Duration::from_millis(100),
        async || {
            let r = c.run(&id(&run)).await;
            states.insert(r["liveness"]["state"].as_str().unwrap().to_string());
            if r["status"] == "succeeded" || r["status"] == "failed" || r["status"] == "timed_out" {
                Ok(r)
            } else {
                Err(r)
            }
        },
    )
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 1);
    assert!(states.contains("quiet"), "{states:?}");
    assert!(!states.contains("lost"), "{states:?}");
}

#[tokio::test]
async fn a_stopped_then_resumed_worker_is_not_believed() {
    let mut c = Cluster::sqlite();
    c.start_server(&[]).await;
    let w1 = c.worker("w1", "1", &[]);
    c.wait_workers(1).await;
    // Attempt 1 prints "zombie" after 3 s and succeeds; attempt 2 fails with 7 at once.
    let marker = c.path().join("zombie-marker");
    let script = format!(
        "if [ -f {m} ]; then echo retry; exit 7; fi; touch {m}; sleep 3; echo zombie; exit 0",
        m = marker.display()
    );
    let run = c.submit(json!({"command": ["sh", "-c", script]})).await;
    holder_of(&c, &id(&run)).await;
    w1.signal(Signal::SIGSTOP);
    let _w2 = c.worker("w2", "1", &[]);
    let done = c.wait_terminal(&id(&run), Duration::from_secs(10)).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["exit_code"], 7);
    // The zombie wakes after its command finished and reports it; nothing it says is believed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    w1.signal(Signal::SIGCONT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = c.run(&id(&run)).await;
    assert_eq!(after["status"], "failed");
    assert_eq!(after["exit_code"], 7);
    assert_eq!(
        after["attempt"], done["attempt"],
        "the zombie moved the run"
    );
    assert_eq!(
        after["attempts"], done["attempts"],
        "the zombie rewrote history"
    );
    let attempts = after["attempts"].as_array().unwrap();
    assert_eq!(attempts[0]["error_code"], "worker_heartbeat_lost");
    assert_eq!(attempts.last().unwrap()["exit_code"], 7);
    assert_eq!(
        c.logs(&id(&run)).await,
        b"retry\n",
        "the zombie's output was appended"
    );
    drop(w1);
}

#[tokio::test]
async fn without_a_heartbeat_timeout_a_dead_worker_s_run_lasts_until_its_timeout() {
    let mut c = Cluster::sqlite();
    c.start_server(&[]).await;
    let w = c.worker("w1", "1", &[]);
    c.wait_workers(1).await;
    let run = c
        .submit(json!({"command": ["sleep", "743"], "heartbeat_timeout_s": null, "timeout_s": 4}))
        .await;
    holder_of(&c, &id(&run)).await;
    w.kill9();
    let killed_at = Instant::now();
    // Three stale windows later it is still running: never reaped for a missing heartbeat.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = c.run(&id(&run)).await;
    assert_eq!(r["status"], "running", "{r}");
    assert_eq!(r["liveness"]["state"], "suspect");
    let done = c.wait_terminal(&id(&run), Duration::from_secs(10)).await;
    reap_orphans(743);
    assert_eq!(done["status"], "timed_out", "{done}");
    assert_eq!(done["error_code"], "timeout");
    assert!(killed_at.elapsed() >= Duration::from_secs(3));
}

#[tokio::test]
async fn a_cancel_requested_before_the_worker_died_ends_cancelled() {
    let mut c = Cluster::sqlite();
    c.start_server(&[]).await;
    let w = c.worker("w1", "1", &[]);
    c.wait_workers(1).await;
    let run = c.submit(json!({"command": ["sleep", "744"]})).await;
    holder_of(&c, &id(&run)).await;
    // Frozen first, so the cancel cannot reach it; then it dies.
    w.signal(Signal::SIGSTOP);
    let r = c
        .http
        .post(format!("{}/v1/runs/{}/cancel", c.base(), id(&run)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    w.kill9();
    let done = c.wait_terminal(&id(&run), Duration::from_secs(5)).await;
    reap_orphans(744);
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["error_code"], "cancelled");
    assert_eq!(done["attempt"], 1, "a cancelled run is not retried");
}

#[tokio::test]
async fn two_servers_on_one_database_retry_a_dead_worker_s_run_exactly_once() {
    let mut c = Cluster::sqlite();
    let a = c.start_server(&["--reaper-interval", "200ms"]).await;
    let b = c.start_server(&["--reaper-interval", "200ms"]).await;
    let w1 = c.worker_on(&a, "w1", "1", &[]);
    c.wait_workers(1).await;
    let run = c
        .submit(json!({"command": first_attempt_hangs(&c, 745)}))
        .await;
    holder_of(&c, &id(&run)).await;
    let _w2 = c.worker_on(&b, "w2", "1", &[]);
    w1.kill9();
    let done = c.wait_terminal(&id(&run), Duration::from_secs(10)).await;
    reap_orphans(745);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"].as_array().unwrap().len(), 2, "{done}");
    // Every status change of the run, as events: one retry, not two.
    let body = c
        .http
        .get(format!("{b}/v1/runs/{}/events", id(&run)))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let retries = body
        .lines()
        .filter(|l| l.contains("\"worker_heartbeat_lost\"") && l.contains("\"status\":\"pending\""))
        .count();
    assert_eq!(retries, 1, "{body}");
}

#[tokio::test]
async fn a_worker_stopped_gracefully_hands_its_runs_back_at_once() {
    let mut c = Cluster::sqlite();
    c.start_server(&["--stale-after", "30s"]).await;
    let w1: Proc = c.worker("w1", "1", &[]);
    c.wait_workers(1).await;
    let run = c
        .submit(json!({"command": first_attempt_hangs(&c, 746)}))
        .await;
    holder_of(&c, &id(&run)).await;
    let stopped_at = Instant::now();
    assert_eq!(w1.stop(Duration::from_secs(10)), Some(0));
    let back = c
        .wait_for(&id(&run), Duration::from_secs(5), |r| {
            r["status"] == "pending"
        })
        .await;
    // Far sooner than the 30 s stale window.
    assert!(stopped_at.elapsed() < Duration::from_secs(5));
    assert_eq!(back["attempts"][0]["status"], "timed_out");
    assert_eq!(
        processes_running(&["sleep", "746"]),
        0,
        "its process was left running"
    );
    let _w2 = c.worker("w2", "1", &[]);
    let done = c.wait_terminal(&id(&run), Duration::from_secs(10)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
}

#[tokio::test]
async fn a_draining_worker_finishes_its_run_takes_nothing_new_then_leaves() {
    let mut c = Cluster::sqlite();
    c.start_server(&[]).await;
    let w1 = c.worker("w1", "2", &["--drain-timeout", "20s"]);
    c.wait_workers(1).await;
    let run = c
        .submit(json!({"command": ["sh", "-c", "sleep 2; echo drained"]}))
        .await;
    holder_of(&c, &id(&run)).await;
    w1.signal(Signal::SIGTERM);
    // Shown draining within a heartbeat or two.
    eventually(
        "the worker shown draining",
        Duration::from_secs(3),
        async || {
            let workers = c.workers().await;
            if workers.first().is_some_and(|w| w["state"] == "draining") {
                Ok(())
            } else {
                Err(Value::Array(workers))
            }
        },
    )
    .await;
    // It takes nothing new.
    let waiting = c.submit(json!({"command": ["echo", "later"]})).await;
    // Its run finishes normally, then it leaves.
    let done = c.wait_terminal(&id(&run), Duration::from_secs(10)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(c.logs(&id(&run)).await, b"drained\n");
    assert_eq!(w1.stop(Duration::from_secs(10)), Some(0));
    assert!(c.workers().await.is_empty(), "a drained worker deregisters");
    assert_eq!(c.run(&id(&waiting)).await["status"], "pending");
}
