//! Small helpers for talking to a Tether server over its API in tests.

use std::time::Duration;

use serde_json::Value;

use crate::eventually;

/// The statuses a run ends in.
pub const TERMINAL: [&str; 4] = ["succeeded", "failed", "cancelled", "timed_out"];

/// Whether a run's JSON shows it ended.
pub fn is_terminal(run: &Value) -> bool {
    TERMINAL.contains(&run["status"].as_str().unwrap_or(""))
}

/// A loopback port free right now (for a process that must be told its port up front).
pub fn free_port() -> u16 {
    let bound = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr());
    match bound {
        Ok(addr) => addr.port(),
        Err(e) => panic!("no free loopback port: {e}"),
    }
}

/// Waits until the server at `base` answers `/readyz` with success (at most 30 s).
pub async fn wait_ready(http: &reqwest::Client, base: &str) {
    eventually(
        &format!("the server at {base} to get ready"),
        Duration::from_secs(30),
        async || match http.get(format!("{base}/readyz")).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(r.status().to_string()),
            Err(e) => Err(e.to_string()),
        },
    )
    .await
}

/// `GET`: the status and the JSON body (`null` if it is not JSON).
pub async fn get_json(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = match http.get(url).send().await {
        Ok(r) => r,
        Err(e) => panic!("GET {url}: {e}"),
    };
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// `POST` JSON: the status and the JSON body (`null` if it is not JSON).
pub async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = match http.post(url).json(body).send().await {
        Ok(r) => r,
        Err(e) => panic!("POST {url}: {e}"),
    };
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Submits a run and asserts it was accepted (`202`); returns the run.
pub async fn submit_to(http: &reqwest::Client, base: &str, body: Value) -> Value {
    let (status, run) = post_json(http, &format!("{base}/v1/runs"), &body).await;
    assert_eq!(status, 202, "{run}");
    run
}

/// Reads a run, asserting it exists.
pub async fn get_run(http: &reqwest::Client, base: &str, id: &str) -> Value {
    let (status, run) = get_json(http, &format!("{base}/v1/runs/{id}")).await;
    assert_eq!(status, 200, "{run}");
    run
}

/// Polls the run until `done(run)`, failing after `within` with the run as last seen.
pub async fn wait_for_run(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    eventually(&format!("run {id}"), within, async || {
        let run = get_run(http, base, id).await;
        if done(&run) {
            Ok(run)
        } else {
            Err(run)
        }
    })
    .await
}

/// A run's id from its JSON.
pub fn id(run: &Value) -> String {
    match run["id"].as_str() {
        Some(id) => id.to_string(),
        None => panic!("no id in {run}"),
    }
}

/// Asserts an error answer's status and code, and that it says something.
pub fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}
