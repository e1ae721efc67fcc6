//! Closed to strangers (issue 10), end to end: commands get a clean environment under a
//! token-protected `tether up`, and `up`'s files are private and made only once it starts.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::cluster::{fast_except, free_port, Proc, TETHER};
use tether_testkit::eventually;

const API_TOKEN: &str = "client-token-3f9a";
const WORKER_TOKEN: &str = "worker-token-7c21";

fn up_with_tokens(dir: &std::path::Path, listen: &str) -> Proc {
    let mut args = vec!["up", "--listen", listen, "--cpus", "2"];
    args.extend(fast_except(&[]));
    let child = Command::new(TETHER)
        .args(&args)
        .current_dir(dir)
        .env("TETHER_LOG", "warn")
        .env("TETHER_API_TOKEN", API_TOKEN)
        .env("TETHER_WORKER_TOKEN", WORKER_TOKEN)
        .env("TETHER_TOKEN", WORKER_TOKEN)
        .env("UNLISTED_SECRET", "s3cr3t-value")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Proc { child }
}

async fn authed(http: &reqwest::Client, r: reqwest::RequestBuilder) -> (u16, Value) {
    let _ = http;
    let r = r.bearer_auth(API_TOKEN).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn commands_under_token_protected_up_see_no_tokens_and_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let _up = up_with_tokens(dir.path(), &listen);
    let base = format!("http://{listen}");
    let http = reqwest::Client::new();
    crate::cluster::wait_ready(&http, &base).await;

    let (status, run) = authed(
        &http,
        http.post(format!("{base}/v1/runs")).json(&json!({
            "command": ["sh", "-c", "env"],
            "env": {"MINE": "kept", "API_KEY": "run-secret"},
            "secret_env": ["API_KEY"],
        })),
    )
    .await;
    assert_eq!(status, 202, "{run}");
    assert_eq!(run["env"]["API_KEY"], "***");
    let id = run["id"].as_str().unwrap().to_string();
    eventually("the run to succeed", Duration::from_secs(30), async || {
        let (_, run) = authed(&http, http.get(format!("{base}/v1/runs/{id}"))).await;
        if run["status"] == "succeeded" {
            Ok(())
        } else {
            Err(run)
        }
    })
    .await;
    let logs = http
        .get(format!("{base}/v1/runs/{id}/logs"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!logs.contains("TETHER_"), "{logs}");
    assert!(
        !logs.contains(API_TOKEN) && !logs.contains(WORKER_TOKEN),
        "{logs}"
    );
    assert!(!logs.contains("s3cr3t-value"), "{logs}");
    assert!(logs.lines().any(|l| l.starts_with("PATH=")), "{logs}");
    assert!(
        logs.contains("MINE=kept") && logs.contains("API_KEY=run-secret"),
        "{logs}"
    );

    let tether_dir = dir.path().join(".tether");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&tether_dir), 0o700, ".tether");
    for entry in std::fs::read_dir(&tether_dir).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
}

#[tokio::test]
async fn a_server_that_refuses_to_start_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("0.0.0.0:{}", free_port());
    let out = Command::new(TETHER)
        .args(["up", "--listen", &listen])
        .current_dir(dir.path())
        .env_remove("TETHER_API_TOKEN")
        .env_remove("TETHER_WORKER_TOKEN")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--api-token"),
        "{out:?}"
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "files were created by a server that did not start"
    );
}
