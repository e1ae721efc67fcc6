//! `/metrics` of a real `tether server` process, scraped for the first time only after runs of
//! every outcome, refusals and a reap: what happened before the first scrape is all there.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cluster::{id, Cluster};
use tether_testkit::eventually;

/// One sample of the text exposition: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The exposition: samples, and which names have `# HELP` and `# TYPE`.
#[derive(Debug, Default)]
struct Exposition {
    samples: Vec<Sample>,
    help: BTreeMap<String, String>,
    types: BTreeMap<String, String>,
}

/// A small parser of the Prometheus text format (0.0.4): comments, names, quoted label values
/// with `\\`, `\"` and `\n` escapes, float values (`+Inf`, `NaN`).
fn parse(text: &str) -> Exposition {
    let mut out = Exposition::default();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.help.insert(name.to_string(), help.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("a TYPE line names a type");
            out.types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).expect("a sample has a value");
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if rest.starts_with('{') {
            let mut chars = rest[1..].char_indices();
            let mut key = String::new();
            let mut end = 0;
            while let Some((i, c)) = chars.next() {
                match c {
                    '}' => {
                        end = i + 2;
                        break;
                    }
                    ',' | ' ' => {}
                    '=' => {
                        assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                        let mut value = String::new();
                        loop {
                            match chars.next().expect("a closed label value").1 {
                                '\\' => match chars.next().expect("an escape").1 {
                                    'n' => value.push('\n'),
                                    other => value.push(other),
                                },
                                '"' => break,
                                other => value.push(other),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    other => key.push(other),
                }
            }
            rest = &rest[end..];
        }
        let value_text = rest.split_whitespace().next().expect("a value");
        let value = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other.parse().unwrap_or_else(|_| panic!("a number: {line}")),
        };
        out.samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

impl Exposition {
    /// The value of the one sample named `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(
            matching.len() <= 1,
            "{name}{labels:?} matches several series: {matching:?}"
        );
        matching.first().map(|s| s.value)
    }

    fn expect(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?}"))
    }
}

#[tokio::test]
async fn the_first_scrape_shows_every_outcome_refusal_and_reap() {
    let mut c = Cluster::sqlite();
    let config = c.path().join("tether.toml");
    std::fs::write(
        &config,
        "[lanes.gate]\non_full = \"reject\"\nmax_concurrency = 1\n\n[lanes.doomed]\nmax_attempts = 2\n",
    )
    .unwrap();
    c.start_server(&["--config", config.to_str().unwrap()])
        .await;
    let _main = c.worker("main", "4", &["--lanes", "default,gate"]);
    let doomed = c.worker("doomed", "1", &["--lanes", "doomed"]);
    c.wait_workers(2).await;

    // Every outcome in the default lane.
    let ok = c.submit(json!({"command": ["true"]})).await;
    let bad = c.submit(json!({"command": ["sh", "-c", "exit 3"]})).await;
    let slow = c
        .submit(json!({"command": ["sleep", "741"], "timeout_s": 0.5}))
        .await;
    let cancelled = c.submit(json!({"command": ["sleep", "742"]})).await;
    c.wait_for(&id(&cancelled), Duration::from_secs(20), |r| {
        r["status"] == "running"
    })
    .await;
    let r = c
        .http
        .post(format!("{}/v1/runs/{}/cancel", c.base(), id(&cancelled)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    for (run, status) in [
        (&ok, "succeeded"),
        (&bad, "failed"),
        (&slow, "timed_out"),
        (&cancelled, "cancelled"),
    ] {
        let done = c.wait_terminal(&id(run), Duration::from_secs(20)).await;
        assert_eq!(done["status"], status, "{done}");
    }

    // Refusals: a full reject lane, and a run no live worker could ever hold.
    let holder = c
        .submit(json!({"lane": "gate", "command": ["sleep", "743"]}))
        .await;
    c.wait_for(&id(&holder), Duration::from_secs(20), |r| {
        r["status"] == "running"
    })
    .await;
    let full = c
        .http
        .post(format!("{}/v1/runs", c.base()))
        .json(&json!({"lane": "gate", "command": ["true"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(full.status().as_u16(), 503);
    let huge = c
        .http
        .post(format!("{}/v1/runs", c.base()))
        .json(&json!({"command": ["true"], "resources": {"cpus": 64, "memory_mb": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status().as_u16(), 422);

    // A reap: the only worker of its lane dies while the run runs; it is retried and waits.
    let orphan = c
        .submit(json!({"lane": "doomed", "command": ["sleep", "744"]}))
        .await;
    c.wait_for(&id(&orphan), Duration::from_secs(20), |r| {
        r["status"] == "running"
    })
    .await;
    doomed.kill9();
    let retried = c
        .wait_for(&id(&orphan), Duration::from_secs(20), |r| {
            r["status"] == "pending" && r["attempt"] == 1
        })
        .await;
    assert_eq!(
        retried["attempts"][0]["error_code"],
        "worker_heartbeat_lost"
    );

    // A fenced write: an attempt that is not current, from a worker with its own secret (a
    // call naming another worker's id would be refused before the store, 403).
    let fencer: Value = c
        .http
        .post(format!("{}/v1/workers", c.base()))
        .json(&json!({"name": "fencer", "capacity": {"cpus": 1, "memory_mb": 64}, "lanes": ["doomed"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stale = c
        .http
        .post(format!(
            "{}/v1/runs/{}/attempts/7/finish",
            c.base(),
            id(&holder)
        ))
        .header(
            tether_api::WORKER_SECRET_HEADER,
            fencer["worker_secret"].as_str().unwrap(),
        )
        .json(&json!({"worker_id": fencer["worker_id"], "status": "succeeded"}))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status().as_u16(), 409);
    // The fencer leaves at once, so the worker gauges below count only the test's two.
    let left = c
        .http
        .delete(format!(
            "{}/v1/workers/{}",
            c.base(),
            fencer["worker_id"].as_str().unwrap()
        ))
        .header(
            tether_api::WORKER_SECRET_HEADER,
            fencer["worker_secret"].as_str().unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(left.status().as_u16(), 204);
    // One event stream, read to its end.
    let events = c
        .http
        .get(format!("{}/v1/runs/{}/events", c.base(), id(&ok)))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status().as_u16(), 200);
    let body = events.text().await.unwrap();
    assert!(body.contains("event: end"), "{body}");
    // Wait until the dead worker is judged lost (stale after 1 s).
    eventually(
        "the worker to read as lost",
        Duration::from_secs(20),
        async || c.workers().await.iter().any(|w| w["state"] == "lost"),
    )
    .await;

    // The first scrape.
    let text = c.metrics().await;
    let m = parse(&text);

    // Every series is described.
    for name in m.types.keys() {
        assert!(
            m.help.get(name).is_some_and(|h| !h.is_empty()),
            "{name} has no # HELP"
        );
    }
    // No run id in any label.
    for run in [&ok, &bad, &slow, &cancelled, &holder, &orphan] {
        assert!(!text.contains(&id(run)), "a run id leaked into a label");
    }

    // Counters.
    let created = |lane| m.expect("tether_runs_created_total", &[("lane", lane)]);
    assert_eq!(created("default"), 4.0);
    assert_eq!(created("gate"), 1.0);
    assert_eq!(created("doomed"), 1.0);
    let refused = "tether_runs_refused_total";
    assert_eq!(
        m.expect(refused, &[("lane", "gate"), ("reason", "full")]),
        1.0
    );
    assert_eq!(
        m.expect(refused, &[("lane", "default"), ("reason", "never_fits")]),
        1.0
    );
    let finished = |lane, status, code| {
        m.expect(
            "tether_attempts_finished_total",
            &[("lane", lane), ("status", status), ("error_code", code)],
        )
    };
    assert_eq!(finished("default", "succeeded", "none"), 1.0);
    assert_eq!(finished("default", "failed", "exit_nonzero"), 1.0);
    assert_eq!(finished("default", "timed_out", "timeout"), 1.0);
    assert_eq!(finished("default", "cancelled", "cancelled"), 1.0);
    assert_eq!(
        finished("doomed", "timed_out", "worker_heartbeat_lost"),
        1.0
    );
    assert_eq!(
        m.expect(
            "tether_runs_reaped_total",
            &[("reason", "worker_heartbeat_lost")]
        ),
        1.0
    );
    assert_eq!(m.expect("tether_retries_total", &[("lane", "doomed")]), 1.0);
    assert_eq!(m.expect("tether_stale_attempt_refusals_total", &[]), 1.0);
    assert_eq!(
        m.expect("tether_sse_connections_total", &[("format", "sse")]),
        1.0
    );
    assert!(m.expect("tether_runs_claimed_total", &[]) >= 6.0);

    // Histograms.
    assert_eq!(m.types["tether_run_duration_seconds"], "histogram");
    let durations = |status| {
        m.expect(
            "tether_run_duration_seconds_count",
            &[("lane", "default"), ("status", status)],
        )
    };
    for status in ["succeeded", "failed", "timed_out", "cancelled"] {
        assert_eq!(durations(status), 1.0, "{status}");
    }
    // Buckets reach hours.
    assert!(m
        .value(
            "tether_run_duration_seconds_bucket",
            &[("lane", "default"), ("status", "succeeded"), ("le", "3600")]
        )
        .is_some());
    assert_eq!(
        m.expect("tether_queue_wait_seconds_count", &[("lane", "default")]),
        4.0
    );
    // Claims may take several runs at once; each worker took at least one.
    assert!(
        m.expect(
            "tether_claim_wait_seconds_count",
            &[("outcome", "assigned")]
        ) >= 2.0
    );
    let http = |route, method, class| {
        m.value(
            "tether_http_request_duration_seconds_count",
            &[("route", route), ("method", method), ("status", class)],
        )
    };
    assert_eq!(http("/v1/runs", "POST", "2xx"), Some(6.0));
    assert_eq!(http("/v1/runs", "POST", "5xx"), Some(1.0), "the 503");
    assert_eq!(http("/v1/runs", "POST", "4xx"), Some(1.0), "the 422");
    assert!(http("/v1/runs/{id}", "GET", "2xx").is_some_and(|n| n >= 1.0));
    assert_eq!(
        http("/v1/runs/{id}/attempts/{attempt}/finish", "POST", "4xx"),
        Some(1.0)
    );

    // Gauges read from the store at the scrape.
    let runs = |lane, status| m.expect("tether_runs", &[("lane", lane), ("status", status)]);
    assert_eq!(runs("doomed", "pending"), 1.0);
    assert_eq!(runs("gate", "running"), 1.0);
    assert_eq!(runs("default", "pending"), 0.0);
    assert_eq!(runs("default", "running"), 0.0);
    assert_eq!(runs("default", "claimed"), 0.0);
    let oldest = |lane| m.expect("tether_oldest_pending_age_seconds", &[("lane", lane)]);
    assert!(oldest("doomed") > 0.0);
    assert_eq!(oldest("default"), 0.0);
    let workers = |state| m.expect("tether_workers", &[("state", state)]);
    assert_eq!(workers("active"), 1.0);
    assert_eq!(workers("lost"), 1.0);
    assert_eq!(workers("suspect"), 0.0);
    assert_eq!(workers("draining"), 0.0);
    let oldest_beat = m.expect("tether_worker_oldest_heartbeat_age_seconds", &[]);
    assert!(
        (0.0..1.0).contains(&oldest_beat),
        "the live worker heartbeats every 200 ms: {oldest_beat}"
    );
    assert_eq!(m.expect("tether_event_followers", &[]), 0.0);
}
