//! Restarting `tether up` loses no accepted run: pending runs run after the restart, finished
//! runs keep their logs and outcome, and runs the dead process's local worker held are retried.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::cluster::{free_port, get_run, id, spawn, submit_to, wait_for, wait_ready, Proc, FAST};
use tether_testkit::eventually;

fn up(dir: &Path, listen: &str) -> Proc {
    let mut args = vec![
        "up",
        "--listen",
        listen,
        "--cpus",
        "1",
        "--memory-mb",
        "4096",
    ];
    args.extend_from_slice(FAST);
    spawn(&args, dir)
}

fn terminal(r: &serde_json::Value) -> bool {
    ["succeeded", "failed", "cancelled", "timed_out"].contains(&r["status"].as_str().unwrap_or(""))
}

#[tokio::test]
async fn restarting_tether_up_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");

    // First life: one run finishes, one hangs on the only cpu, one waits behind it.
    let first = up(dir.path(), &listen);
    wait_ready(&http, &base).await;
    assert!(
        dir.path().join(".tether/tether.db").exists(),
        "SQLite lives under ./.tether/"
    );
    let finished = submit_to(&http, &base, json!({"command": ["echo", "kept"]})).await;
    let done = wait_for(
        &http,
        &base,
        &id(&finished),
        Duration::from_secs(10),
        terminal,
    )
    .await;
    assert_eq!(done["status"], "succeeded");
    let marker = dir.path().join("marker");
    let script = format!(
        "if [ -f {m} ]; then echo second; exit 0; fi; touch {m}; exec sleep 751",
        m = marker.display()
    );
    let held = submit_to(&http, &base, json!({"command": ["sh", "-c", script]})).await;
    wait_for(&http, &base, &id(&held), Duration::from_secs(10), |r| {
        r["status"] == "running"
    })
    .await;
    let waiting = submit_to(&http, &base, json!({"command": ["echo", "after restart"]})).await;
    // Waiting: in line, or in the local worker's local queue (`claimed`, never started).
    let status = get_run(&http, &base, &id(&waiting)).await["status"].clone();
    assert!(status == "pending" || status == "claimed", "{status}");

    // Crash: SIGKILL, no chance to clean up.
    first.kill9();
    let _ = std::process::Command::new("pkill")
        .args(["-KILL", "-x", "-f", "sleep 751"])
        .status();

    // Second life on the same ./.tether.
    let second = up(dir.path(), &listen);
    wait_ready(&http, &base).await;
    let held_done = wait_for(&http, &base, &id(&held), Duration::from_secs(15), terminal).await;
    assert_eq!(held_done["status"], "succeeded", "{held_done}");
    assert_eq!(held_done["attempt"], 2, "{held_done}");
    assert_eq!(
        held_done["attempts"][0]["error_code"],
        "worker_heartbeat_lost"
    );
    let waiting_done = wait_for(
        &http,
        &base,
        &id(&waiting),
        Duration::from_secs(15),
        terminal,
    )
    .await;
    assert_eq!(waiting_done["status"], "succeeded");
    let kept = get_run(&http, &base, &id(&finished)).await;
    assert_eq!(kept["status"], "succeeded");
    let logs = http
        .get(format!("{base}/v1/runs/{}/logs", id(&finished)))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(logs.as_ref(), b"kept\n");

    // A clean stop with a run still pending: it runs after the next start.
    let blocker = submit_to(&http, &base, json!({"command": ["sleep", "752"]})).await;
    wait_for(&http, &base, &id(&blocker), Duration::from_secs(10), |r| {
        r["status"] == "running"
    })
    .await;
    let pending = submit_to(&http, &base, json!({"command": ["echo", "still here"]})).await;
    assert_eq!(second.stop(Duration::from_secs(15)), Some(0));
    let third = up(dir.path(), &listen);
    wait_ready(&http, &base).await;
    let cancel = http
        .post(format!("{base}/v1/runs/{}/cancel", id(&blocker)))
        .send()
        .await
        .unwrap();
    assert!(cancel.status().is_success() || cancel.status().as_u16() == 409);
    let pending_done = wait_for(
        &http,
        &base,
        &id(&pending),
        Duration::from_secs(15),
        terminal,
    )
    .await;
    assert_eq!(pending_done["status"], "succeeded", "{pending_done}");
    drop(third);
}

#[tokio::test]
async fn a_second_tether_up_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let listen = format!("127.0.0.1:{}", free_port());
    let _first = up(dir.path(), &listen);
    wait_ready(&http, &format!("http://{listen}")).await;
    let other = format!("127.0.0.1:{}", free_port());
    let out = std::process::Command::new(crate::cluster::TETHER)
        .args(["up", "--listen", &other])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another `tether up` is already using"),
        "{out:?}"
    );
    // The first goes on serving.
    let run = submit_to(
        &http,
        &format!("http://{listen}"),
        json!({"command": ["true"]}),
    )
    .await;
    let done = wait_for(
        &http,
        &format!("http://{listen}"),
        &id(&run),
        Duration::from_secs(10),
        terminal,
    )
    .await;
    assert_eq!(done["status"], "succeeded");
}

/// `tether up` with its stderr captured, stopped with SIGINT (Ctrl-C) `times` times; returns
/// what it said.
async fn interrupt_up(mut proc: Proc, times: usize) -> String {
    use nix::sys::signal::Signal;
    for _ in 0..times {
        proc.signal(Signal::SIGINT);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eventually("tether up to stop", Duration::from_secs(20), async || {
        proc.child.try_wait().unwrap().is_some()
    })
    .await;
    let mut said = String::new();
    if let Some(mut err) = proc.child.stderr.take() {
        use std::io::Read;
        let _ = err.read_to_string(&mut said);
    }
    said
}

fn up_with_stderr(dir: &Path, listen: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "up",
        "--listen",
        listen,
        "--cpus",
        "1",
        "--memory-mb",
        "4096",
    ];
    args.extend_from_slice(FAST);
    args.extend_from_slice(extra);
    let child = std::process::Command::new(crate::cluster::TETHER)
        .args(&args)
        .current_dir(dir)
        .env("TETHER_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    Proc { child }
}

#[tokio::test]
async fn ctrl_c_says_which_runs_it_stopped_and_a_second_one_cancels_them() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    let first = up_with_stderr(dir.path(), &listen, &[]);
    wait_ready(&http, &base).await;
    let run = submit_to(&http, &base, json!({"command": ["sleep", "753"]})).await;
    wait_for(&http, &base, &id(&run), Duration::from_secs(10), |r| {
        r["status"] == "running"
    })
    .await;
    let said = interrupt_up(first, 1).await;
    assert!(
        said.contains(&format!(
            "run {} stopped; it runs again when tether up starts again (attempt 2/3)",
            id(&run)
        )),
        "{said}"
    );
    // The next start runs it again, as attempt 2; a double Ctrl-C cancels it.
    let second = up_with_stderr(dir.path(), &listen, &[]);
    wait_ready(&http, &base).await;
    wait_for(&http, &base, &id(&run), Duration::from_secs(10), |r| {
        r["status"] == "running" && r["attempt"] == 2
    })
    .await;
    let said = interrupt_up(second, 2).await;
    assert!(
        said.contains(&format!("run {} stopped and cancelled", id(&run))),
        "{said}"
    );
    let third = up(dir.path(), &listen);
    wait_ready(&http, &base).await;
    let r = get_run(&http, &base, &id(&run)).await;
    assert_eq!(r["status"], "cancelled", "{r}");
    drop(third);
}
