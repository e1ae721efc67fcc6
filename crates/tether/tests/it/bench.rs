//! `tether bench --real` end to end (issue 15): a server child process and real `tether worker`
//! processes spawned by the binary itself, running `true`, with a report of the expected shape.
//! And the synthetic path through the binary: batch submission and the batched report call.

use std::process::Command;

use serde_json::Value;

use crate::cluster::TETHER;
use crate::pg::PgDatabase;

fn real_bench(database: Option<&str>) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "bench",
        "--real",
        "--runs",
        "20",
        "--cpus",
        "2",
        "--workers",
        "2",
        "--paced",
        "3",
        "--backlog",
        "30",
        "--followers",
        "20",
        "--sse-heartbeat",
        "1s",
        "--json",
    ];
    if let Some(url) = database {
        args.extend(["--database", url]);
    }
    let out = Command::new(TETHER)
        .args(&args)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {out:?}"));
    // Heartbeats on time are a timing figure on a loaded machine: reported, and only then is
    // the exit status required to be 0.
    let followers = &report["followers"];
    if followers["on_time"] == followers["followers"] {
        assert_eq!(out.status.code(), Some(0), "{report:#}\n{out:?}");
    }
    report
}

fn number(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

fn assert_real_report(report: &Value) {
    assert_eq!(report["command"], serde_json::json!(["true"]), "{report:#}");
    let drain = &report["drain"];
    assert_eq!(drain["runs"], 20, "{report:#}");
    assert_eq!(
        drain["succeeded_once"], 20,
        "every run succeeded exactly once"
    );
    assert!(number(&drain["runs_per_s"]) > 0.0, "{report:#}");
    let gaps = &drain["refill_gap_ms"];
    // Two slots per worker: every start past a worker's first two is a refill. (The first
    // worker to register may drain all 20 before the second asks.)
    let per_worker = drain["runs_per_worker"].as_object().unwrap();
    let ran: u64 = per_worker.values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(ran, 20, "{report:#}");
    let refills = 20 - 2 * per_worker.len();
    assert_eq!(number(&gaps["count"]), refills as f64, "{report:#}");
    for p in ["p50", "p99", "max"] {
        assert!(number(&gaps[p]) >= 0.0, "{p}: {report:#}");
    }
    assert!(number(&gaps["p50"]) <= number(&gaps["p99"]));
    assert!(number(&gaps["p99"]) <= number(&gaps["max"]));

    let idle = &report["idle"];
    assert_eq!(idle["succeeded_once"], 3, "{report:#}");
    assert_eq!(idle["submit_to_start_ms"]["count"], 3, "{report:#}");

    let backlog = &report["backlog"];
    assert_eq!(backlog["succeeded_once"], 30, "{report:#}");
    assert!(number(&backlog["server_peak_rss_kib"]) > 0.0, "{report:#}");
    assert!(number(&backlog["worker_peak_hwm_kib"]) > 0.0, "{report:#}");

    let followers = &report["followers"];
    assert_eq!(followers["connected"], 20, "{report:#}");
    assert_eq!(followers["ended"], 20, "{report:#}");
    assert!(number(&followers["server_connected"]["rss_kib"]) > 0.0);
    assert!(number(&followers["heartbeat_gap_ms"]["count"]) > 0.0);
}

#[test]
fn a_tiny_real_bench_on_sqlite_runs_every_run_exactly_once() {
    let report = real_bench(None);
    assert_eq!(report["store"], "sqlite");
    assert_real_report(&report);
}

#[test]
fn a_tiny_real_bench_on_postgres_runs_every_run_exactly_once() {
    let db = PgDatabase::create();
    let report = real_bench(Some(&db.url));
    assert_eq!(report["store"], "postgres");
    assert_real_report(&report);
}

#[test]
fn a_tiny_synthetic_bench_speaks_the_batched_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(TETHER)
        .args([
            "bench",
            "--runs",
            "200",
            "--submit-batch",
            "50",
            "--log-every",
            "10",
            "--seed-finished",
            "0",
            "--paced",
            "3",
            "--json",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {out:?}"));
    assert_eq!(out.status.code(), Some(0), "{report:#}\n{out:?}");
    assert_eq!(report["protocol"], "batched", "{report:#}");
    let t = &report["throughput"];
    assert_eq!(t["succeeded_once"], 200, "every run succeeded exactly once");
    assert_eq!(t["runs_ended"], 200, "{report:#}");
    assert!(number(&t["runs_per_s"]) > 0.0, "{report:#}");
    let calls = &t["calls_ms"];
    // Four batches of 50, starts and finishes in report calls, a line for 1 run in 10.
    assert_eq!(calls["submit"]["count"], 4, "{report:#}");
    assert!(number(&calls["attempts"]["count"]) > 0.0, "{report:#}");
    assert!(calls.get("start").is_none() && calls.get("finish").is_none());
    assert_eq!(calls["logs"]["count"], 20, "{report:#}");
    // pending, claimed, attempt, running, succeeded, end; and the 20 lines.
    assert_eq!(t["events_written"], 200 * 6 + 20, "{report:#}");
    assert!(number(&t["http_calls_per_run"]) < 1.0, "{report:#}");
    let paced = &report["paced"];
    assert_eq!(paced["succeeded_once"], 3, "{report:#}");
}
