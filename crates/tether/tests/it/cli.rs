//! The CLI against a live `tether up`: `run` streams output and exits with the run's code,
//! `--detach`, `ps`, `logs`, `cancel`, `workers`, `events`.

use std::process::{Command, Output};
use std::time::Duration;

use crate::cluster::{fast_except, free_port, spawn, wait_ready, Proc, TETHER};
use tether_testkit::eventually_every;
use tether_testkit::IdleCuttingProxy;

async fn up() -> (tempfile::TempDir, Proc, String) {
    up_with(&[]).await
}

async fn up_with(extra: &[&str]) -> (tempfile::TempDir, Proc, String) {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["up", "--listen", &listen, "--cpus", "2"];
    args.extend(fast_except(extra));
    args.extend_from_slice(extra);
    let proc = spawn(&args, dir.path());
    let base = format!("http://{listen}");
    wait_ready(&reqwest::Client::new(), &base).await;
    (dir, proc, base)
}

fn tether(base: &str, args: &[&str]) -> Output {
    Command::new(TETHER)
        .args(args)
        .env("TETHER_SERVER", base)
        .output()
        .unwrap()
}

#[tokio::test]
async fn run_streams_output_and_exits_with_the_run_s_code() {
    let (_dir, _up, base) = up().await;
    let out = tether(
        &base,
        &[
            "run",
            "--",
            "sh",
            "-c",
            "echo one; sleep 0.3; echo two >&2; echo three",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\nthree\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("two\n"));
    let out = tether(&base, &["run", "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    let out = tether(&base, &["run", "--timeout", "300ms", "--", "sleep", "761"]);
    assert_eq!(out.status.code(), Some(124));
}

#[tokio::test]
async fn detach_ps_logs_cancel_workers_and_events() {
    let (_dir, _up, base) = up().await;
    let out = tether(&base, &["run", "--detach", "--", "echo", "detached"]);
    assert_eq!(out.status.code(), Some(0));
    let run_id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(run_id.len(), 36, "{run_id}");
    // `logs -f` follows to the end and exits with the run's code.
    let out = tether(&base, &["logs", "-f", &run_id]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "detached\n");
    let out = tether(&base, &["logs", &run_id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "detached\n");
    let out = tether(&base, &["ps"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&run_id) && table.contains("succeeded"),
        "{table}"
    );
    let out = tether(&base, &["events", &run_id]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.last().unwrap()["type"], "end");
    let out = tether(&base, &["workers"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("active"));

    let out = tether(&base, &["run", "-d", "--", "sleep", "762"]);
    let sleeper = String::from_utf8(out.stdout).unwrap().trim().to_string();
    eventually_every(
        "the sleeper listed as running",
        Duration::from_secs(10),
        Duration::from_millis(100),
        async || {
            String::from_utf8_lossy(&tether(&base, &["ps", "--status", "running"]).stdout)
                .contains(&sleeper)
        },
    )
    .await;
    let out = tether(&base, &["cancel", &sleeper]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = tether(&base, &["logs", "-f", &sleeper]);
    assert_eq!(out.status.code(), Some(130));
    // Errors are said plainly, with a non-zero exit.
    let out = tether(&base, &["cancel", "no-such-run"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not_found")
            || String::from_utf8_lossy(&out.stderr).contains("no such run")
    );
}

#[tokio::test]
async fn run_reconnects_through_a_proxy_that_cuts_it_and_prints_each_line_once() {
    // No SSE heartbeats, and a proxy that cuts connections idle for 1 s: the stream is cut in
    // each silence, and `tether run` must resume after the last event it saw.
    let (_dir, _up, base) = up_with(&["--sse-heartbeat", "1h"]).await;
    let proxy = IdleCuttingProxy::start(
        base.trim_start_matches("http://").to_string(),
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    let through = format!("http://{}", proxy.addr);
    let out = tokio::task::spawn_blocking(move || {
        tether(
            &through,
            &[
                "run",
                "--",
                "sh",
                "-c",
                "echo a; sleep 2.5; echo b; sleep 2.5; echo c; exit 4",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a\nb\nc\n", "{out:?}");
    assert_eq!(out.status.code(), Some(4));
    assert!(proxy.cuts() >= 2, "the proxy cut {} times", proxy.cuts());
}
