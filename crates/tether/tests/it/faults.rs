//! Faults without side effects (issue 12): no process of a run outlives its attempt, output is
//! stored exactly once when answers are lost, and a store outage is not read as worker death.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tether_testkit::ReplyDroppingProxy;

use crate::cluster::{id, processes_running, submit_to, wait_for, wait_ready, Cluster};
use tether_testkit::eventually;

use crate::pg::{PgDatabase, PrivateCluster};

fn terminal(r: &Value) -> bool {
    matches!(
        r["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled" | "timed_out")
    )
}

/// How many processes of the orphan test's command run: its three `sleep`s by their unique
/// arguments (the shell is matched by its script).
fn sleeps_running(tag: &str) -> usize {
    ["1", "2", "3"]
        .iter()
        .map(|s| processes_running(&["sleep", &format!("{tag}{s}")]))
        .sum()
}

#[tokio::test]
async fn a_sigkilled_worker_leaves_no_process_of_its_run_not_even_detached_ones() {
    let mut c = Cluster::sqlite();
    c.start_server(&[]).await;
    let w1 = c.worker("w1", "1", &[]);
    c.wait_workers(1).await;
    // A background sleep, a foreground one, and one in a session of its own (`setsid`),
    // which no process-group signal reaches. Unique durations name them in /proc.
    let tag = "61.7";
    let script = format!("setsid sleep {tag}3 & sleep {tag}1 & sleep {tag}2; wait");
    let run = c.submit(json!({"command": ["sh", "-c", script]})).await;
    c.wait_for(&id(&run), Duration::from_secs(10), |r| {
        r["status"] == "running"
    })
    .await;
    eventually(
        "three sleeps running",
        Duration::from_secs(10),
        async || sleeps_running(tag) == 3,
    )
    .await;
    // The worker, its run host (a fork of it) and the run's shim (a fork of that) share its
    // command line.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", w1.pid())).unwrap();
    let worker_argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let worker_argv: Vec<&str> = worker_argv.iter().map(String::as_str).collect();
    assert_eq!(
        processes_running(&worker_argv),
        3,
        "a worker, its run host and the run's shim"
    );
    w1.kill9();
    let killed_at = Instant::now();
    while sleeps_running(tag) > 0
        || processes_running(&["sh", "-c", &script]) > 0
        || processes_running(&worker_argv) > 0
    {
        assert!(
            killed_at.elapsed() < Duration::from_secs(1),
            "a process of the run (or the run host) outlived its worker by 1 s: {} sleeps, {} hosts",
            sleeps_running(tag),
            processes_running(&worker_argv)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The retry is the only copy running.
    let _w2 = c.worker("w2", "1", &[]);
    c.wait_for(&id(&run), Duration::from_secs(10), |r| {
        r["attempt"] == 2 && r["status"] == "running"
    })
    .await;
    eventually(
        "three sleeps running",
        Duration::from_secs(10),
        async || sleeps_running(tag) == 3,
    )
    .await;
    assert_eq!(processes_running(&["sh", "-c", &script]), 1);
    // A cancel (graceful stop of the group) takes the detached one too.
    let r = c
        .http
        .post(format!("{}/v1/runs/{}/cancel", c.base(), id(&run)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let done = c.wait_terminal(&id(&run), Duration::from_secs(20)).await;
    assert_eq!(done["status"], "cancelled");
    eventually(
        "no sleep left running",
        Duration::from_secs(2),
        async || sleeps_running(tag) == 0,
    )
    .await;
}

#[tokio::test]
async fn a_command_that_exits_takes_what_it_left_running_with_it() {
    let mut c = Cluster::sqlite();
    c.start_server(&[]).await;
    let _w = c.worker("w1", "1", &[]);
    c.wait_workers(1).await;
    let tag = "62.3";
    let script = format!("setsid sleep {tag}3 & sleep {tag}1 & echo started");
    let run = c.submit(json!({"command": ["sh", "-c", script]})).await;
    let done = c.wait_terminal(&id(&run), Duration::from_secs(20)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    eventually(
        "no sleep left running",
        Duration::from_secs(2),
        async || sleeps_running(tag) == 0,
    )
    .await;
    assert_eq!(c.logs(&id(&run)).await, b"started\n");
}

/// A command printing `n` numbered lines, a little apart, so its output takes many appends.
fn counting(n: u32) -> Value {
    json!([
        "sh",
        "-c",
        format!("i=1; while [ $i -le {n} ]; do echo line $i; i=$((i+1)); sleep 0.03; done")
    ])
}

fn counted(n: u32) -> String {
    (1..=n).map(|i| format!("line {i}\n")).collect()
}

#[tokio::test]
async fn log_appends_whose_answers_were_lost_are_stored_once_on_sqlite() {
    let mut c = Cluster::sqlite();
    let base = c.start_server(&[]).await;
    let upstream = base.trim_start_matches("http://").to_string();
    let proxy = ReplyDroppingProxy::start(upstream, "/logs", 4)
        .await
        .unwrap();
    let _w = c.worker_on(&format!("http://{}", proxy.addr), "w1", "1", &[]);
    c.wait_workers(1).await;
    let run = c.submit(json!({"command": counting(40)})).await;
    let done = c.wait_terminal(&id(&run), Duration::from_secs(30)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 1);
    assert_eq!(proxy.dropped(), 4, "answers were lost");
    assert_eq!(
        String::from_utf8_lossy(&c.logs(&id(&run)).await),
        counted(40)
    );
}

#[tokio::test]
async fn log_appends_whose_answers_were_lost_are_stored_once_across_two_servers() {
    let db = PgDatabase::create();
    let mut c = Cluster::on_database(&db.url);
    let a = c.start_server(&[]).await;
    let b = c.start_server(&[]).await;
    // Server A's answers to log appends are lost; the worker moves on to B and sends again.
    let proxy = ReplyDroppingProxy::start(a.trim_start_matches("http://").to_string(), "/logs", 3)
        .await
        .unwrap();
    let servers = format!("http://{},{b}", proxy.addr);
    let _w = c.worker_on(&servers, "w1", "1", &[]);
    c.wait_workers(1).await;
    let run = c.submit(json!({"command": counting(40)})).await;
    let done = c.wait_terminal(&id(&run), Duration::from_secs(30)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(proxy.dropped() >= 1, "an answer was lost");
    assert_eq!(
        String::from_utf8_lossy(&c.logs(&id(&run)).await),
        counted(40)
    );
    drop(c);
    drop(db);
}

#[tokio::test]
async fn postgres_down_for_three_stale_windows_is_not_worker_death() {
    let pg = PrivateCluster::start();
    let db = PgDatabase::create_on(&pg.url("postgres"));
    let mut c = Cluster::on_database(&db.url);
    // Heartbeat 200 ms, stale after 1 s: the outage below is three stale windows.
    let base = c.start_server(&[]).await;
    let _w = c.worker("w1", "2", &[]);
    c.wait_workers(1).await;
    let script = "for i in $(seq 1 30); do echo tick $i; sleep 0.2; done";
    let run = submit_to(&c.http, &base, json!({"command": ["sh", "-c", script]})).await;
    wait_for(&c.http, &base, &id(&run), Duration::from_secs(10), |r| {
        r["stdout_bytes"].as_i64() > Some(0)
    })
    .await;
    pg.stop();
    let outage = Instant::now();
    // Not ready, and a submission fails fast with 503 and Retry-After.
    let http = c.http.clone();
    let ready_url = format!("{base}/readyz");
    eventually("readyz to answer 503", Duration::from_secs(5), async || {
        http.get(&ready_url)
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 503)
    })
    .await;
    let asked = Instant::now();
    let r = c
        .http
        .post(format!("{base}/v1/runs"))
        .json(&json!({"command": ["true"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "store_unavailable");
    let down_for = Duration::from_secs(3);
    tokio::time::sleep(down_for.saturating_sub(outage.elapsed())).await;
    pg.start_again();
    wait_ready(&c.http, &base).await;
    let done = wait_for(&c.http, &base, &id(&run), Duration::from_secs(60), terminal).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 1, "{done}");
    let logs = c.logs(&id(&run)).await;
    let expected: String = (1..=30).map(|i| format!("tick {i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&logs), expected);
    drop(c);
    drop(db);
}

/// A small tmpfs the test fills, unmounted when dropped. `None` where mounting is not allowed.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk { dir })
    }

    fn fill(&self) -> std::path::PathBuf {
        let filler = self.dir.path().join("filler");
        let _ = std::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", filler.display()))
            .output();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn sqlite_on_a_full_disk_is_not_worker_death_and_not_ready() {
    let Some(disk) = SmallDisk::mount("16m") else {
        eprintln!("skipped: this machine does not allow mounting a tmpfs");
        return;
    };
    let mut c = Cluster::sqlite();
    c.database = format!("sqlite://{}/tether.db", disk.dir.path().display());
    let base = c.start_server(&[]).await;
    let _w = c.worker("w1", "2", &[]);
    c.wait_workers(1).await;
    let script = "for i in $(seq 1 30); do echo tick $i; sleep 0.2; done";
    let run = c.submit(json!({"command": ["sh", "-c", script]})).await;
    c.wait_for(&id(&run), Duration::from_secs(10), |r| {
        r["stdout_bytes"].as_i64() > Some(0)
    })
    .await;
    let filler = disk.fill();
    let full_at = Instant::now();
    let http = c.http.clone();
    let ready_url = format!("{base}/readyz");
    eventually("readyz to answer 503", Duration::from_secs(5), async || {
        http.get(&ready_url)
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 503)
    })
    .await;
    // Three stale windows of a full disk.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(full_at.elapsed())).await;
    std::fs::remove_file(&filler).unwrap();
    wait_ready(&c.http, &base).await;
    let done = c.wait_terminal(&id(&run), Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 1, "{done}");
    let expected: String = (1..=30).map(|i| format!("tick {i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&c.logs(&id(&run)).await), expected);
    drop(c);
}

#[tokio::test]
async fn finished_runs_are_pruned_after_their_retention_and_nothing_else() {
    let mut c = Cluster::sqlite();
    c.start_server(&["--retention", "2s"]).await;
    // No local queue: the run behind the long one must stay pending, not wait in the worker.
    let _w = c.worker("w1", "1", &["--no-local-queue"]);
    c.wait_workers(1).await;
    let done = c.submit(json!({"command": ["echo", "old"]})).await;
    c.wait_terminal(&id(&done), Duration::from_secs(10)).await;
    let running = c
        .submit(json!({"command": ["sh", "-c", "echo live; sleep 30"], "resources": {"cpus": 1.0, "memory_mb": 100}}))
        .await;
    c.wait_for(&id(&running), Duration::from_secs(10), |r| {
        r["status"] == "running"
    })
    .await;
    // Too big for the only worker: it stays pending.
    let pending = c
        .submit(json!({"command": ["true"], "resources": {"cpus": 1.0, "memory_mb": 100}}))
        .await;
    let http = c.http.clone();
    let url = format!("{}/v1/runs/{}", c.base(), id(&done));
    eventually(
        "the finished run to be pruned (404)",
        Duration::from_secs(10),
        async || {
            http.get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 404)
        },
    )
    .await;
    let events = c
        .http
        .get(format!("{}/v1/runs/{}/events", c.base(), id(&done)))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    assert_eq!(events.status().as_u16(), 404);
    let live = c.run(&id(&running)).await;
    assert_eq!(live["status"], "running");
    assert_eq!(c.logs(&id(&running)).await, b"live\n");
    assert_eq!(c.run(&id(&pending)).await["status"], "pending");
}

/// The submission used by the pruning measurements: `POST /v1/runs {"command": ["true"]}`.
fn true_spec() -> tether_domain::RunSpec {
    tether_api::SubmitRequest {
        command: vec!["true".into()],
        ..Default::default()
    }
    .resolve(
        Some(&tether_domain::LanePolicy::default()),
        &tether_domain::SubmitDefaults::default(),
    )
    .unwrap()
}

/// One submission every 5 ms until `stop`: when each started (from `t0`) and how long it took.
fn submit_every_5ms(
    store: tether_store::SharedStore,
    stop: Arc<std::sync::atomic::AtomicBool>,
    t0: Instant,
) -> tokio::task::JoinHandle<Vec<(Duration, Duration)>> {
    let spec = true_spec();
    tokio::spawn(async move {
        let mut took = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            store.create_run(&spec).await.unwrap();
            took.push((t - t0, t.elapsed()));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        took
    })
}

/// `n`, p50, p99, p99.9, max and how many took over 50 ms.
fn latency_summary(took: &[(Duration, Duration)]) -> String {
    let mut all: Vec<Duration> = took.iter().map(|(_, d)| *d).collect();
    all.sort();
    if all.is_empty() {
        return "no submissions".into();
    }
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    let over = all
        .iter()
        .filter(|d| **d > Duration::from_millis(50))
        .count();
    format!(
        "{} submissions: p50 {:.1?}, p99 {:.1?}, p99.9 {:.1?}, max {:.1?}, over 50 ms: {over}",
        all.len(),
        pct(0.5),
        pct(0.99),
        pct(0.999),
        all[all.len() - 1],
    )
}

/// The same figures for the pruner's batches.
fn batch_summary(batches: &[(Duration, tether_server::pruner::BatchDone)]) -> String {
    let mut took: Vec<Duration> = batches.iter().map(|(_, b)| b.took).collect();
    took.sort();
    if took.is_empty() {
        return "no batches".into();
    }
    let pct = |p: f64| took[((took.len() as f64 * p) as usize).min(took.len() - 1)];
    let sizes: Vec<u32> = batches.iter().map(|(_, b)| b.size).collect();
    format!(
        "{} batches of {}..={} runs: p50 {:.1?}, p99 {:.1?}, max {:.1?}",
        took.len(),
        sizes.iter().min().unwrap(),
        sizes.iter().max().unwrap(),
        pct(0.5),
        pct(0.99),
        took[took.len() - 1],
    )
}

/// The submissions over 20 ms, each with the batches that overlapped it: what they waited on.
fn slow_ones(
    took: &[(Duration, Duration)],
    batches: &[(Duration, tether_server::pruner::BatchDone)],
) -> String {
    let mut lines = Vec::new();
    for (at, d) in took.iter().filter(|(_, d)| *d > Duration::from_millis(20)) {
        let overlapping: Vec<String> = batches
            .iter()
            .filter(|(end, b)| *end > *at && end.saturating_sub(b.took) < *at + *d)
            .map(|(end, b)| {
                format!(
                    "batch of {} took {:.1?}, ended at +{:.1?}",
                    b.size,
                    b.took,
                    *end - *at
                )
            })
            .collect();
        lines.push(format!(
            "  at {at:.2?}: {d:.1?}; {}",
            if overlapping.is_empty() {
                "no batch".into()
            } else {
                overlapping.join("; ")
            }
        ));
    }
    lines.join("\n")
}

/// Seeds 100,000 finished runs, measures submissions alone for `baseline`, then during a
/// pruning pass by the pruner's own code (`prune_lane`), and prints both.
async fn measure_pruning(
    store: tether_store::SharedStore,
    database_url: &str,
    seed: impl std::future::Future<Output = ()>,
    baseline: Duration,
) {
    let seeded = Instant::now();
    seed.await;
    eprintln!("seeded 100,000 finished runs in {:.1?}", seeded.elapsed());
    let uptime = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average: {}", uptime.trim());

    // The baseline: the same submissions, nothing else writing.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t0 = Instant::now();
    let submitter = submit_every_5ms(store.clone(), stop.clone(), t0);
    tokio::time::sleep(baseline).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let alone = submitter.await.unwrap();
    eprintln!(
        "without a pruner, {baseline:?}: {}",
        latency_summary(&alone)
    );
    eprintln!("{}", slow_ones(&alone, &[]));

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t0 = Instant::now();
    let submitter = submit_every_5ms(store.clone(), stop.clone(), t0);
    let mut batches = Vec::new();
    let deleted = tether_server::pruner::prune_lane(
        store.as_ref(),
        "default",
        // Everything seeded finished over a minute ago; the submissions are pending.
        1,
        tether_server::pruner::budget_for(database_url),
        &tokio_util::sync::CancellationToken::new(),
        |b| batches.push((t0.elapsed(), b)),
    )
    .await
    .unwrap();
    let pass = t0.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let during = submitter.await.unwrap();
    eprintln!(
        "pruned {deleted} runs in {pass:.1?}: {}",
        batch_summary(&batches)
    );
    eprintln!("during the pass: {}", latency_summary(&during));
    eprintln!("{}", slow_ones(&during, &batches));
    let uptime = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average: {}", uptime.trim());
    assert_eq!(deleted, 100_000);
}

/// A measurement, not a check (run with `--ignored`; figures in BENCHMARKS.md): a pruning pass
/// over 100,000 finished runs on SQLite while a submission is made every 5 ms, after the same
/// submissions alone as a baseline. Prints both, the pruner's batches, and what overlapped
/// each slow submission.
#[tokio::test]
#[ignore = "a measurement: cargo nextest run -p tether --run-ignored only -E 'test(pruning_pass_measurement)' --no-capture"]
async fn pruning_pass_measurement_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/tether.db", dir.path().display());
    let store = Arc::new(tether_store_sqlite::SqliteStore::open(&url).await.unwrap());
    let seeding = store.clone();
    measure_pruning(
        store,
        &url,
        async move { seeding.seed_finished_runs(100_000).await.unwrap() },
        Duration::from_secs(15),
    )
    .await;
}

/// The same on PostgreSQL (a database of its own on the machine's server).
#[tokio::test]
#[ignore = "a measurement: cargo nextest run -p tether --run-ignored only -E 'test(pruning_pass_measurement)' --no-capture"]
async fn pruning_pass_measurement_postgres() {
    let db = PgDatabase::create();
    let store = Arc::new(tether_store_postgres::PgStore::open(&db.url).await.unwrap());
    let seeding = store.clone();
    measure_pruning(
        store,
        &db.url,
        async move { seeding.seed_finished_runs(100_000).await.unwrap() },
        Duration::from_secs(15),
    )
    .await;
    drop(db);
}
