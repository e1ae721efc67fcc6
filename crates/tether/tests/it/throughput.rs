//! No timer on the hot path (issue 15): a slot that frees while work waits is refilled at once,
//! and a cancel reaches its command in about a second (issue 12), with real processes.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use tether_testkit::eventually_every;
use tether_testkit::http::{get_json, post_json};

use crate::cluster::{fast_except, free_port, id, spawn, wait_ready, Cluster, TETHER};
use crate::pg::PgDatabase;

fn stamp_ms(value: &Value) -> i64 {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("no stamp: {value}"));
    let t = humantime::parse_rfc3339(text).unwrap();
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// The newest 500 runs.
async fn newest_runs(c: &Cluster) -> Vec<Value> {
    let (status, page) = get_json(&c.http, &format!("{}/v1/runs?limit=500", c.base())).await;
    assert_eq!(status, 200, "{page}");
    page["runs"].as_array().unwrap().clone()
}

/// Every run of the (single) worker, once all `n` have ended.
async fn wait_all_ended(c: &Cluster, n: usize, within: Duration) -> Vec<Value> {
    eventually_every(
        &format!("{n} runs to end"),
        within,
        Duration::from_millis(100),
        async || {
            let runs = newest_runs(c).await;
            let ended = runs.iter().filter(|r| !r["finished_at"].is_null()).count();
            if runs.len() == n && ended == n {
                Ok(runs)
            } else {
                Err(format!("{ended} of {n} runs ended"))
            }
        },
    )
    .await
}

/// For each start past the first `slots`, the time since the slot it took was freed: the
/// earliest end not yet followed by a start. Runs in `runs` all ran on one worker.
fn refill_gaps(runs: &[Value], slots: usize) -> Vec<i64> {
    let mut spans: Vec<(i64, i64)> = runs
        .iter()
        .map(|r| (stamp_ms(&r["started_at"]), stamp_ms(&r["finished_at"])))
        .collect();
    spans.sort();
    let mut ends = BinaryHeap::new();
    let mut gaps = Vec::new();
    for (start, end) in spans {
        if ends.len() == slots {
            let Reverse(freed) = ends.pop().unwrap();
            gaps.push(start - freed);
        }
        ends.push(Reverse(end));
    }
    gaps
}

async fn refill_is_immediate(mut c: Cluster) {
    c.start_server(&[]).await;
    for _ in 0..200 {
        c.submit(json!({"command": ["true"]})).await;
    }
    let _w = c.worker("w1", "2", &[]);
    let runs = wait_all_ended(&c, 200, Duration::from_secs(120)).await;
    for run in &runs {
        assert_eq!(run["status"], "succeeded", "{run}");
    }
    let mut gaps = refill_gaps(&runs, 2);
    gaps.sort();
    assert_eq!(gaps.len(), 198);
    let worst = *gaps.last().unwrap();
    eprintln!(
        "refill gaps (ms): p50 {} p99 {} max {worst}",
        gaps[gaps.len() / 2],
        gaps[gaps.len() * 99 / 100]
    );
    // A timer-driven refill (a 1 s re-check) leaves gaps spread up to a second, most of them
    // hundreds of milliseconds; a freed slot refilled by the finish that freed it waits one
    // round trip and a spawn. Measured in a debug build on this 2-core box: at load 4-9 alone,
    // max 47-88 ms on SQLite and 85-283 ms on PostgreSQL; inside the whole suite (`.ci/run`),
    // PostgreSQL p50 59 ms, max 360 ms. Every gap under 600 ms with a median under 150 ms
    // holds with room there and still fails any timer of a second.
    let median = gaps[gaps.len() / 2];
    assert!(median < 150, "the median refill took {median} ms: {gaps:?}");
    assert!(worst < 600, "a freed slot waited {worst} ms: {gaps:?}");
}

#[tokio::test]
async fn a_freed_slot_is_refilled_at_once_sqlite() {
    refill_is_immediate(Cluster::sqlite()).await;
}

#[tokio::test]
async fn a_freed_slot_is_refilled_at_once_postgres() {
    let db = PgDatabase::create();
    refill_is_immediate(Cluster::on_database(&db.url)).await;
}

#[tokio::test]
async fn tether_up_drains_100_queued_echo_runs_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["up", "--listen", &listen, "--cpus", "2"];
    args.extend(fast_except(&[]));
    let _up = spawn(&args, dir.path());
    let base = format!("http://{listen}");
    let http = reqwest::Client::new();
    wait_ready(&http, &base).await;
    // Submitted as a user would: one command per line, in one batch.
    let lines: String = (0..100).map(|n| format!("echo {n}\n")).collect();
    let mut child = std::process::Command::new(TETHER)
        .args(["run", "--detach", "--stdin"])
        .env("TETHER_SERVER", &base)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(lines.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let ids: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(ids.len(), 100, "one id per line");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut first_created = i64::MAX;
    let mut last_finished = 0;
    for (n, run_id) in ids.iter().enumerate() {
        let run = crate::cluster::wait_for(
            &http,
            &base,
            run_id,
            deadline - tokio::time::Instant::now(),
            |r| !r["finished_at"].is_null(),
        )
        .await;
        assert_eq!(run["status"], "succeeded", "{run}");
        first_created = first_created.min(stamp_ms(&run["created_at"]));
        last_finished = last_finished.max(stamp_ms(&run["finished_at"]));
        let logs = http
            .get(format!("{base}/v1/runs/{run_id}/logs"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(logs, format!("{n}\n"), "output exactly once");
    }
    let span = last_finished - first_created;
    eprintln!("100 echo runs: first submitted to last ended in {span} ms");
    // The target is 2 s on an idle machine; the bound here leaves room for a loaded CI box
    // while still failing a timer-paced drain (about 43 s before).
    assert!(span < 8_000, "100 runs took {span} ms");
}

/// `tether cancel` of a running command, with a 10 s heartbeat interval: the command gets
/// SIGTERM within 1.5 s, because the cancel travels on the worker's open control poll.
#[tokio::test]
async fn a_cancel_reaches_the_command_within_a_second() {
    let mut c = Cluster::sqlite();
    c.start_server(&["--heartbeat-interval", "10s", "--stale-after", "40s"])
        .await;
    let _w = c.worker("w1", "2", &[]);
    c.wait_workers(1).await;
    let marker = c.path().join("got-term");
    let script = format!(
        "trap 'touch {}; exit 0' TERM; sleep 60 & wait",
        marker.display()
    );
    let run = c.submit(json!({"command": ["sh", "-c", script]})).await;
    let run_id = id(&run);
    c.wait_for(&run_id, Duration::from_secs(20), |r| {
        r["status"] == "running"
    })
    .await;
    // Let the control poll that was answered by the claim settle into its wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    let out = std::process::Command::new(TETHER)
        .args(["cancel", &run_id])
        .env("TETHER_SERVER", c.base())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    while !marker.exists() {
        assert!(
            asked.elapsed() < Duration::from_millis(1_500),
            "no SIGTERM within 1.5 s of the cancel"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "SIGTERM {} ms after tether cancel",
        asked.elapsed().as_millis()
    );
    let done = c.wait_terminal(&run_id, Duration::from_secs(10)).await;
    assert_eq!(done["status"], "cancelled", "{done}");
}

/// 120 runs through a 1-cpu worker started with `worker_args`; each command takes a lock
/// directory and fails if it is taken, so every run succeeding means none ran beside another.
/// Answers the most runs the server saw the worker hold at once.
async fn one_cpu_worker_drains(worker_args: &[&str]) -> usize {
    let mut c = Cluster::sqlite();
    c.start_server(&[]).await;
    let lock = c.path().join("lock");
    let script = "mkdir \"$LOCK\" || exit 7; sleep 0.01; rmdir \"$LOCK\"";
    let n = 120;
    for _ in 0..n {
        c.submit(json!({
            "command": ["sh", "-c", script],
            "env": {"LOCK": lock.display().to_string()},
        }))
        .await;
    }
    let _w = c.worker("w1", "1", worker_args);
    // What the worker holds, as the server sees it, until every run has ended.
    let mut most_held = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let runs = loop {
        for w in c.workers().await {
            most_held = most_held.max(w["runs"].as_array().map_or(0, Vec::len));
        }
        let runs = newest_runs(&c).await;
        if runs.iter().all(|r| !r["finished_at"].is_null()) {
            break runs;
        }
        assert!(
            Instant::now() < deadline,
            "{n} runs did not end within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(runs.len(), n);
    for run in &runs {
        assert_eq!(run["status"], "succeeded", "two ran at once: {run}");
        // Once: handed back unstarted (past the local queue's limit) is the only retry.
        let released = run["released_attempts"].as_u64().unwrap();
        assert_eq!(run["attempt"].as_u64(), Some(1 + released), "{run}");
    }
    most_held
}

/// The local queue: with short runs a 1-cpu worker also holds claimed runs that wait in it
/// to start the moment its slot frees, yet never runs two at once.
#[tokio::test]
async fn a_one_cpu_worker_holds_a_run_in_reserve_yet_runs_one_at_a_time() {
    let most_held = one_cpu_worker_drains(&[]).await;
    // One running, the rest waiting: at most the factor times the capacity in reserve.
    let bound = 1 + tether_domain::admission::MAX_RESERVE_FACTOR as usize;
    assert!(
        (2..=bound).contains(&most_held),
        "held {most_held} at most: none in reserve, or past the reserve's bound"
    );
}

/// `--no-local-queue`: the worker holds only what it runs.
#[tokio::test]
async fn without_a_local_queue_a_worker_holds_only_what_it_runs() {
    assert_eq!(one_cpu_worker_drains(&["--no-local-queue"]).await, 1);
}

/// A run waiting in a worker's local queue that is cancelled ends `cancelled` without ever
/// starting: its command never runs, and the run ahead of it is not disturbed.
#[tokio::test]
async fn a_run_cancelled_in_the_local_queue_never_starts() {
    let mut c = Cluster::sqlite();
    c.start_server(&[]).await;
    let _w = c.worker("w1", "1", &[]);
    c.wait_workers(1).await;
    // Short runs first, so the worker holds a reserve while the long one starts; then the
    // long one, and the one that waits behind it in the worker: one batch, in this order.
    let marker = c.path().join("ran");
    let mut runs: Vec<Value> = (0..20).map(|_| json!({"command": ["true"]})).collect();
    runs.push(json!({"command": ["sleep", "2"]}));
    runs.push(json!({"command": ["touch", marker.display().to_string()]}));
    let batch = format!("{}/v1/runs/batch", c.base());
    let (status, answer) = post_json(&c.http, &batch, &json!({ "runs": runs })).await;
    assert_eq!(status, 202, "{answer}");
    let ids: Vec<String> = answer["runs"].as_array().unwrap().iter().map(id).collect();
    let (ahead, queued) = (&ids[20], &ids[21]);
    c.wait_for(ahead, Duration::from_secs(20), |r| r["status"] == "running")
        .await;
    let held = c
        .wait_for(queued, Duration::from_secs(20), |r| {
            r["status"] != "pending"
        })
        .await;
    assert_eq!(held["status"], "claimed", "held in reserve: {held}");
    let answer = c
        .http
        .post(format!("{}/v1/runs/{queued}/cancel", c.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    let done = c.wait_terminal(queued, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["error_code"], "cancelled", "{done}");
    assert!(done["started_at"].is_null(), "it never started: {done}");
    let first = c.wait_terminal(ahead, Duration::from_secs(20)).await;
    assert_eq!(first["status"], "succeeded", "{first}");
    assert!(!marker.exists(), "the cancelled command ran");
}

/// Queues 20 short runs, then a `sleep` of `long_s`, then `n` runs allowed one attempt each
/// that touch a marker, in one batch to a 1-cpu worker; waits until the sleep runs and the
/// markers' runs are held, `claimed`, in its local queue. Answers the sleep's id and theirs.
async fn local_queue_behind_a_long_run(
    c: &Cluster,
    long_s: &str,
    n: usize,
) -> (String, Vec<String>) {
    let mut runs: Vec<Value> = (0..20).map(|_| json!({"command": ["true"]})).collect();
    runs.push(json!({"command": ["sleep", long_s]}));
    for i in 0..n {
        let marker = c.path().join(format!("ran-{i}"));
        runs.push(json!({
            "command": ["sh", "-c", "echo x >> \"$MARK\""],
            "env": {"MARK": marker.display().to_string()},
            "max_attempts": 1,
        }));
    }
    let batch = format!("{}/v1/runs/batch", c.base());
    let (status, answer) = post_json(&c.http, &batch, &json!({ "runs": runs })).await;
    assert_eq!(status, 202, "{answer}");
    let ids: Vec<String> = answer["runs"].as_array().unwrap().iter().map(id).collect();
    let long = ids[20].clone();
    c.wait_for(&long, Duration::from_secs(20), |r| r["status"] == "running")
        .await;
    let queued = ids[21..].to_vec();
    for run in &queued {
        let held = c
            .wait_for(run, Duration::from_secs(20), |r| r["status"] != "pending")
            .await;
        assert_eq!(held["status"], "claimed", "held in the local queue: {held}");
    }
    (long, queued)
}

/// Each marker was written exactly once.
fn ran_once(c: &Cluster, n: usize) {
    for i in 0..n {
        let marker = c.path().join(format!("ran-{i}"));
        let text = std::fs::read_to_string(&marker).unwrap_or_default();
        assert_eq!(text, "x\n", "run {i} ran {} times", text.lines().count());
    }
}

/// A worker stopped with runs in its local queue hands them back uncounted: pending again at
/// once (not after the stale window), and a run allowed one attempt still runs, once, on the
/// next worker.
#[tokio::test]
async fn a_stopped_worker_hands_back_its_local_queue_uncounted() {
    a_stopped_worker_hands_back_its_local_queue(Cluster::sqlite()).await;
}

/// The same on PostgreSQL.
#[tokio::test]
async fn a_stopped_worker_hands_back_its_local_queue_uncounted_on_postgres() {
    let db = PgDatabase::create();
    a_stopped_worker_hands_back_its_local_queue(Cluster::on_database(&db.url)).await;
}

async fn a_stopped_worker_hands_back_its_local_queue(mut c: Cluster) {
    c.start_server(&[]).await;
    let w1 = c.worker("w1", "1", &[]);
    c.wait_workers(1).await;
    let (long, queued) = local_queue_behind_a_long_run(&c, "30", 3).await;
    assert_eq!(w1.stop(Duration::from_secs(10)), Some(0));
    for run in &queued {
        let back = c.run(run).await;
        assert_eq!(back["status"], "pending", "handed back at once: {back}");
        assert_eq!(back["attempt"], 1, "{back}");
        assert_eq!(back["released_attempts"], 1, "{back}");
        assert!(back["worker_id"].is_null(), "{back}");
    }
    // The running one was stopped: handed back as an attempt that counted.
    let stopped = c.run(&long).await;
    assert_eq!(stopped["status"], "pending", "{stopped}");
    assert_eq!(stopped["released_attempts"], 0, "{stopped}");

    // Room for the long run, ahead of them in line again, and for them.
    let _w2 = c.worker("w2", "4", &[]);
    for run in &queued {
        let done = c.wait_terminal(run, Duration::from_secs(20)).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["attempt"], 2, "{done}");
        assert_eq!(done["max_attempts"], 1, "{done}");
        let first = &done["attempts"][0];
        assert_eq!(first["status"], "claimed", "{done}");
        assert_eq!(first["error_code"], "released", "{done}");
    }
    ran_once(&c, queued.len());
}

/// `tether logs -f` of a run handed back unstarted says so, and follows it to its end on the
/// next worker.
#[tokio::test]
async fn following_a_run_handed_back_says_it_did_not_count() {
    let mut c = Cluster::sqlite();
    c.start_server(&[]).await;
    let w1 = c.worker("w1", "1", &[]);
    c.wait_workers(1).await;
    let (_, queued) = local_queue_behind_a_long_run(&c, "30", 1).await;
    let follower = std::process::Command::new(TETHER)
        .args(["logs", "-f", &queued[0]])
        .env("TETHER_SERVER", c.base())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Stopped with the run in its local queue: handed back.
    assert_eq!(w1.stop(Duration::from_secs(10)), Some(0));
    let _w2 = c.worker("w2", "4", &[]);
    let out = tokio::task::spawn_blocking(move || follower.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("attempt 1 was handed back by its worker before it started"),
        "{stderr}"
    );
    assert!(!stderr.contains("retrying"), "{stderr}");
}

/// A run that waits in a busy worker's local queue past its limit goes back to the server,
/// and an idle worker runs it while the run ahead of it still runs.
#[tokio::test]
async fn a_run_held_too_long_in_a_local_queue_goes_to_an_idle_worker() {
    let mut c = Cluster::sqlite();
    c.start_server(&[]).await;
    let _w1 = c.worker("w1", "1", &[]);
    c.wait_workers(1).await;
    let (long, queued) = local_queue_behind_a_long_run(&c, "30", 2).await;
    let _w2 = c.worker("w2", "1", &[]);
    c.wait_workers(2).await;
    for run in &queued {
        let done = c.wait_terminal(run, Duration::from_secs(20)).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["released_attempts"], 1, "{done}");
        let attempts = done["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "{done}");
        assert_eq!(attempts[0]["worker_name"], "w1", "{done}");
        assert_eq!(attempts[0]["error_code"], "released", "{done}");
        assert_eq!(attempts[1]["worker_name"], "w2", "{done}");
    }
    assert_eq!(
        c.run(&long).await["status"],
        "running",
        "the long run still runs"
    );
    ran_once(&c, queued.len());
}

/// A run submitted while an idle worker's claim waits is claimed in the submission's own
/// transaction (its answer says `claimed`), then runs once.
async fn an_idle_worker_is_handed_the_run_at_its_submission(mut c: Cluster) {
    c.start_server(&[]).await;
    let _w = c.worker("w1", "2", &[]);
    c.wait_workers(1).await;
    // The worker's claim is waiting once it has registered and asked; until then a
    // submission simply queues. Each try's run is checked below all the same.
    let mut ids = Vec::new();
    let handed = eventually_every(
        "a submission handed to the waiting claim",
        Duration::from_secs(20),
        Duration::from_millis(50),
        async || {
            let run = c.submit(json!({"command": ["true"]})).await;
            ids.push(id(&run));
            if run["status"] == "claimed" {
                Ok(run)
            } else {
                Err(format!("answered {}", run["status"]))
            }
        },
    )
    .await;
    assert_eq!(handed["attempt"], 1, "{handed}");
    // Counted as handed off.
    let metrics = c.metrics().await;
    let handed_off: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tether_runs_handed_off_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no tether_runs_handed_off_total in {metrics}"));
    assert!(handed_off >= 1.0, "{handed_off}");
    for id in &ids {
        let run = c.wait_terminal(id, Duration::from_secs(30)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["attempt"], 1, "ran once: {run}");
    }
}

#[tokio::test]
async fn an_idle_worker_is_handed_the_run_at_its_submission_sqlite() {
    an_idle_worker_is_handed_the_run_at_its_submission(Cluster::sqlite()).await;
}

#[tokio::test]
async fn an_idle_worker_is_handed_the_run_at_its_submission_postgres() {
    let db = PgDatabase::create();
    an_idle_worker_is_handed_the_run_at_its_submission(Cluster::on_database(&db.url)).await;
}
