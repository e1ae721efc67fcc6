//! Many servers and workers as separate processes on one PostgreSQL database: nothing done
//! twice, nothing stranded when a server or a worker dies, and PostgreSQL restarting mid-run.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster::{id, submit_to, wait_for, wait_ready, Cluster};
use tether_testkit::eventually;

use crate::pg::{PgDatabase, PrivateCluster};

fn terminal(r: &Value) -> bool {
    ["succeeded", "failed", "cancelled", "timed_out"].contains(&r["status"].as_str().unwrap_or(""))
}

#[tokio::test]
async fn two_servers_three_workers_five_hundred_runs_each_once() {
    let db = PgDatabase::create();
    let mut c = Cluster::on_database(&db.url);
    let a = c.start_server(&[]).await;
    let b = c.start_server(&[]).await;
    let _w1 = c.worker_on(&a, "w1", "4", &[]);
    let _w2 = c.worker_on(&b, "w2", "4", &[]);
    let _w3 = c.worker_on(&a, "w3", "4", &[]);
    c.wait_workers(3).await;
    let started = Instant::now();
    let mut ids = Vec::new();
    for batch in 0..10 {
        let submits: Vec<_> = (0..50)
            .map(|i| {
                let http = c.http.clone();
                let base = if i % 2 == 0 { a.clone() } else { b.clone() };
                tokio::spawn(async move {
                    submit_to(
                        &http,
                        &base,
                        json!({"command": ["echo", format!("{batch}-{i}")]}),
                    )
                    .await
                })
            })
            .collect();
        for s in submits {
            ids.push(id(&s.await.unwrap()));
        }
    }
    for run in &ids {
        let done = wait_for(&c.http, &b, run, Duration::from_secs(120), terminal).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        // Ran once: an attempt handed back unstarted (it waited past a worker's local
        // queue's limit) is the only other kind there may be.
        let released = done["released_attempts"].as_u64().unwrap();
        assert_eq!(done["attempt"].as_u64(), Some(1 + released), "{done}");
        let ran: Vec<&serde_json::Value> = done["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["error_code"] != "released")
            .collect();
        assert_eq!(ran.len(), 1, "{done}");
    }
    eprintln!(
        "500 runs through 2 servers and 3 workers in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_server_sigkilled_mid_way_strands_nothing() {
    let db = PgDatabase::create();
    let mut c = Cluster::on_database(&db.url);
    let a = c.start_server(&[]).await;
    let b = c.start_server(&[]).await;
    // Each worker knows both servers and moves to the other when one stops answering.
    let both = format!("{a},{b}");
    let _w1 = c.worker_on(&both, "w1", "2", &[]);
    let _w2 = c.worker_on(&format!("{b},{a}"), "w2", "2", &[]);
    c.wait_workers(2).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let base = if i % 2 == 0 { &a } else { &b };
        let run = submit_to(
            &c.http,
            base,
            json!({"command": ["sh", "-c", "sleep 0.2; echo ok"]}),
        )
        .await;
        ids.push(id(&run));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, server_a) = c.servers.remove(0);
    server_a.kill9();
    for run in &ids {
        let done = wait_for(&c.http, &b, run, Duration::from_secs(60), terminal).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
}

#[tokio::test]
async fn a_sigkilled_worker_is_retried_exactly_once_with_both_servers_sweeping() {
    let db = PgDatabase::create();
    let mut c = Cluster::on_database(&db.url);
    let a = c.start_server(&["--reaper-interval", "200ms"]).await;
    let b = c.start_server(&["--reaper-interval", "200ms"]).await;
    let w1 = c.worker_on(&a, "w1", "1", &[]);
    c.wait_workers(1).await;
    let marker = c.path().join("marker");
    let script = format!(
        "if [ -f {m} ]; then echo retry; exit 0; fi; touch {m}; exec sleep 771",
        m = marker.display()
    );
    let run = submit_to(&c.http, &a, json!({"command": ["sh", "-c", script]})).await;
    wait_for(&c.http, &a, &id(&run), Duration::from_secs(10), |r| {
        r["status"] == "running"
    })
    .await;
    let _w2 = c.worker_on(&b, "w2", "1", &[]);
    w1.kill9();
    let done = wait_for(&c.http, &b, &id(&run), Duration::from_secs(10), terminal).await;
    let _ = std::process::Command::new("pkill")
        .args(["-KILL", "-x", "-f", "sleep 771"])
        .status();
    assert_eq!(done["status"], "succeeded", "{done}");
    let attempts = done["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{done}");
    assert_eq!(attempts[0]["error_code"], "worker_heartbeat_lost");
}

#[tokio::test]
async fn postgres_restarting_mid_run_loses_nothing() {
    let pg = PrivateCluster::start();
    let db = PgDatabase::create_on(&pg.url("postgres"));
    let mut c = Cluster::on_database(&db.url);
    let base = c.start_server(&["--stale-after", "30s"]).await;
    let _w = c.worker("w1", "2", &[]);
    c.wait_workers(1).await;
    let script = "for i in 1 2 3 4 5 6 7 8; do echo tick $i; sleep 0.5; done";
    let run = submit_to(&c.http, &base, json!({"command": ["sh", "-c", script]})).await;
    wait_for(&c.http, &base, &id(&run), Duration::from_secs(10), |r| {
        r["stdout_bytes"].as_i64() > Some(0)
    })
    .await;
    pg.stop();
    // Not ready while the database is unreachable.
    let http = c.http.clone();
    let ready_url = format!("{base}/readyz");
    eventually(
        "readyz to answer 503",
        Duration::from_secs(10),
        async || {
            http.get(&ready_url)
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 503)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    pg.start_again();
    wait_ready(&c.http, &base).await;
    let done = wait_for(&c.http, &base, &id(&run), Duration::from_secs(60), terminal).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 1, "{done}");
    let logs = c.logs(&id(&run)).await;
    let expected: String = (1..=8).map(|i| format!("tick {i}\n")).collect();
    assert_eq!(
        String::from_utf8_lossy(&logs),
        expected,
        "output lost or doubled across the restart"
    );
    // A run submitted after the restart runs too.
    let after = submit_to(&c.http, &base, json!({"command": ["echo", "after"]})).await;
    let done = wait_for(
        &c.http,
        &base,
        &id(&after),
        Duration::from_secs(20),
        terminal,
    )
    .await;
    assert_eq!(done["status"], "succeeded");
    drop(c);
    drop(db);
}
