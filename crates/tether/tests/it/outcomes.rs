//! Each outcome a real worker reports, for real commands (issue: runs end to end).

use std::time::Duration;

use serde_json::json;

use crate::cluster::{id, processes_running, Cluster};
use tether_testkit::eventually;

async fn cluster_with_worker() -> (Cluster, crate::cluster::Proc) {
    let mut c = Cluster::sqlite();
    c.start_server(&[]).await;
    let w = c.worker("w1", "4", &[]);
    c.wait_workers(1).await;
    (c, w)
}

#[tokio::test]
async fn success_records_exit_0_and_the_output() {
    let (c, _w) = cluster_with_worker().await;
    let run = c
        .submit(json!({"command": ["sh", "-c", "echo out; sleep 0.1; echo err >&2; sleep 0.1; echo $GREETING"], "env": {"GREETING": "hello"}}))
        .await;
    let done = c.wait_terminal(&id(&run), Duration::from_secs(10)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["exit_code"], 0);
    assert_eq!(done["attempt"], 1);
    assert_eq!(c.logs(&id(&run)).await, b"out\nerr\nhello\n");
}

#[tokio::test]
async fn exit_3_is_failed_exit_nonzero() {
    let (c, _w) = cluster_with_worker().await;
    let run = c.submit(json!({"command": ["sh", "-c", "exit 3"]})).await;
    let done = c.wait_terminal(&id(&run), Duration::from_secs(10)).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "exit_nonzero");
    assert_eq!(done["exit_code"], 3);
    assert_eq!(done["attempt"], 1, "a command's own failure is not retried");
}

#[tokio::test]
async fn a_missing_binary_is_spawn_failed() {
    let (c, _w) = cluster_with_worker().await;
    let run = c
        .submit(json!({"command": ["/no/such/binary-tether"]}))
        .await;
    let done = c.wait_terminal(&id(&run), Duration::from_secs(10)).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "spawn_failed");
    assert!(done["error_message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
}

#[tokio::test]
async fn cwd_is_honoured() {
    let (c, _w) = cluster_with_worker().await;
    let run = c.submit(json!({"command": ["pwd"], "cwd": "/tmp"})).await;
    let done = c.wait_terminal(&id(&run), Duration::from_secs(10)).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(c.logs(&id(&run)).await, b"/tmp\n");
}

#[tokio::test]
async fn timeout_ends_timed_out() {
    let (c, _w) = cluster_with_worker().await;
    let run = c
        .submit(json!({"command": ["sleep", "731"], "timeout_s": 0.5}))
        .await;
    let done = c.wait_terminal(&id(&run), Duration::from_secs(10)).await;
    assert_eq!(done["status"], "timed_out", "{done}");
    assert_eq!(done["error_code"], "timeout");
    assert_eq!(processes_running(&["sleep", "731"]), 0);
}

#[tokio::test]
async fn cancel_of_a_running_sleep_ends_cancelled_and_kills_it() {
    let (c, _w) = cluster_with_worker().await;
    let run = c.submit(json!({"command": ["sleep", "732"]})).await;
    c.wait_for(&id(&run), Duration::from_secs(10), |r| {
        r["status"] == "running"
    })
    .await;
    assert_eq!(processes_running(&["sleep", "732"]), 1);
    let r = c
        .http
        .post(format!("{}/v1/runs/{}/cancel", c.base(), id(&run)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let done = c.wait_terminal(&id(&run), Duration::from_secs(5)).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["error_code"], "cancelled");
    assert_eq!(
        processes_running(&["sleep", "732"]),
        0,
        "the process group was not killed"
    );
}

#[tokio::test]
async fn a_command_quiet_for_longer_than_the_stale_window_is_not_reaped() {
    let (c, _w) = cluster_with_worker().await;
    // Stale after 1 s; silent for 3 s, then a line.
    let run = c
        .submit(json!({"command": ["sh", "-c", "sleep 3; echo late"]}))
        .await;
    let quiet = c
        .wait_for(&id(&run), Duration::from_secs(10), |r| {
            r["liveness"]["state"] == "quiet"
        })
        .await;
    assert_eq!(quiet["status"], "running");
    let done = c.wait_terminal(&id(&run), Duration::from_secs(10)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 1);
    assert_eq!(c.logs(&id(&run)).await, b"late\n");
}

#[tokio::test]
async fn fifty_megabytes_of_output_arrive_whole() {
    let (c, _w) = cluster_with_worker().await;
    // 50 MB in 100-byte lines.
    let script = format!("yes {} | head -c 50000000", "x".repeat(99));
    let run = c.submit(json!({"command": ["sh", "-c", script]})).await;
    let done = c.wait_terminal(&id(&run), Duration::from_secs(120)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["stdout_bytes"], 50_000_000);
    let logs = c.logs(&id(&run)).await;
    assert_eq!(logs.len(), 50_000_000);
    assert!(logs.chunks(100).all(|l| l.len() == 100 && l[99] == b'\n'));
}

#[tokio::test]
async fn invalid_utf8_and_partial_lines_survive_byte_for_byte() {
    let (c, _w) = cluster_with_worker().await;
    let run = c
        .submit(json!({"command": ["sh", "-c", "printf 'ok\\n\\377\\376 raw\\nno newline'"]}))
        .await;
    let done = c.wait_terminal(&id(&run), Duration::from_secs(10)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(c.logs(&id(&run)).await, b"ok\n\xff\xfe raw\nno newline");
}

#[tokio::test]
async fn output_past_the_lane_limit_ends_failed_output_limit() {
    let mut c = Cluster::sqlite();
    let config = c.path().join("tether.toml");
    std::fs::write(&config, "[lanes.small]\noutput_limit_mb = 1\n").unwrap();
    c.start_server(&["--config", config.to_str().unwrap()])
        .await;
    let _w = c.worker("w1", "2", &[]);
    let run = c
        .submit(json!({"lane": "small", "command": ["sh", "-c", "yes line | head -c 5000000; sleep 733"]}))
        .await;
    let done = c.wait_terminal(&id(&run), Duration::from_secs(20)).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "output_limit");
    let logs = c.logs(&id(&run)).await;
    assert!(logs.len() < 1_100_000, "{}", logs.len());
    assert!(String::from_utf8_lossy(&logs).contains("output limit"));
    eventually(
        "the command to be stopped",
        Duration::from_secs(5),
        async || processes_running(&["sleep", "733"]) == 0,
    )
    .await;
}

#[tokio::test]
async fn two_hundred_runs_at_once_all_succeed_exactly_once() {
    let (c, _w) = cluster_with_worker().await; // --cpus 4
    let submits = (0..200).map(|i| {
        let http = c.http.clone();
        let base = c.base().to_string();
        tokio::spawn(async move {
            crate::cluster::submit_to(
                &http,
                &base,
                json!({"command": ["echo", format!("run {i}")]}),
            )
            .await
        })
    });
    let mut ids = Vec::new();
    for s in submits {
        ids.push(id(&s.await.unwrap()));
    }
    for run in &ids {
        let done = c.wait_terminal(run, Duration::from_secs(120)).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["attempt"], 1, "{done}");
        assert_eq!(done["attempts"].as_array().unwrap().len(), 1, "{done}");
    }
}

#[tokio::test]
async fn a_run_alive_but_silent_past_its_stall_timeout_ends_stalled() {
    let (c, _w) = cluster_with_worker().await;
    let run = c
        .submit(
            json!({"command": ["sh", "-c", "echo started; exec sleep 734"], "stall_timeout_s": 1}),
        )
        .await;
    let done = c.wait_terminal(&id(&run), Duration::from_secs(10)).await;
    assert_eq!(done["status"], "timed_out", "{done}");
    assert_eq!(done["error_code"], "stalled");
    assert_eq!(
        done["attempt"], 1,
        "a stall is the command's own outcome, not retried"
    );
    assert_eq!(c.logs(&id(&run)).await, b"started\n");
    assert_eq!(processes_running(&["sleep", "734"]), 0);
}
