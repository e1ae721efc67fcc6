//! The whole worker against a fake server over real HTTP.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tether_api::{Assignment, RunRefWire};
use tether_domain::{ErrorCode, RunStatus};
use tether_worker::{run_worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

use crate::fake::sh;
use crate::server::FakeServer;

const LIMIT: Duration = Duration::from_secs(5);

fn config(addr: SocketAddr) -> WorkerConfig {
    WorkerConfig {
        server: format!("http://{addr}"),
        name: "test-worker".into(),
        kill_grace: Duration::from_millis(500),
        claim_wait: Duration::from_millis(300),
        ..WorkerConfig::default()
    }
}

fn with_id(mut a: Assignment, id: &str) -> Assignment {
    a.run_id = id.into();
    a
}

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), tether_worker::WorkerError>>,
}

impl Running {
    fn start(config: WorkerConfig) -> Running {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_worker(config, shutdown.clone()));
        Running { shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(LIMIT, self.task)
            .await
            .expect("the worker stops in time")
            .expect("joined")
            .expect("the worker ends cleanly");
    }
}

#[tokio::test]
async fn runs_a_command_and_heartbeats_on_a_fixed_interval() {
    let server = FakeServer::default();
    let addr = server.serve("127.0.0.1:0".parse().unwrap()).await;
    server
        .world()
        .pending
        .push_back(with_id(sh("echo hi; sleep 1; echo bye"), "r1"));
    let worker = Running::start(config(addr));
    server
        .wait_for(LIMIT, "the finish", |w| !w.finishes.is_empty())
        .await;
    {
        let w = server.world();
        assert_eq!(w.registrations[0].name, "test-worker");
        assert_eq!(w.starts[0].0, "r1");
        assert_eq!(w.starts[0].1.worker_id, "w1");
        assert!(w.starts[0].1.pid.is_some());
        assert_eq!(w.output, b"hi\nbye\n");
        let (run_id, finish) = &w.finishes[0];
        assert_eq!(run_id, "r1");
        assert_eq!(finish.status, RunStatus::Succeeded);
        assert_eq!(finish.exit_code, Some(0));
        // The command was silent for a second: heartbeats went on, naming the run.
        let naming_run: Vec<Instant> = w
            .heartbeats
            .iter()
            .filter(|(_, _, hb)| hb.runs.iter().any(|r| r.run_id == "r1"))
            .map(|(_, at, _)| *at)
            .collect();
        assert!(naming_run.len() >= 4, "{} heartbeats", naming_run.len());
        for gap in naming_run.windows(2).map(|p| p[1] - p[0]) {
            assert!(
                gap < Duration::from_millis(450),
                "a heartbeat was late: {gap:?}"
            );
        }
        let beat = w
            .heartbeats
            .iter()
            .flat_map(|(_, _, hb)| hb.runs.iter())
            .find(|r| r.run_id == "r1" && r.stdout_bytes > 0)
            .expect("a heartbeat with the output counted");
        assert_eq!(beat.attempt, 1);
        assert!(beat.since_last_output_s.is_some());
    }
    worker.stop().await;
    assert_eq!(server.world().deregistered, vec!["w1".to_string()]);
}

#[tokio::test]
async fn a_cancel_in_a_heartbeat_answer_cancels_the_run() {
    let server = FakeServer::default();
    let addr = server.serve("127.0.0.1:0".parse().unwrap()).await;
    server
        .world()
        .pending
        .push_back(with_id(sh("sleep 30"), "r1"));
    let worker = Running::start(config(addr));
    server
        .wait_for(LIMIT, "the start", |w| !w.starts.is_empty())
        .await;
    server.world().to_cancel.push(RunRefWire {
        run_id: "r1".into(),
        attempt: 1,
    });
    server
        .wait_for(LIMIT, "the finish", |w| !w.finishes.is_empty())
        .await;
    let finish = server.world().finishes[0].1.clone();
    assert_eq!(finish.status, RunStatus::Cancelled);
    assert_eq!(finish.error_code, Some(ErrorCode::Cancelled));
    worker.stop().await;
}

#[tokio::test]
async fn not_owned_kills_without_a_report() {
    let server = FakeServer::default();
    let addr = server.serve("127.0.0.1:0".parse().unwrap()).await;
    server
        .world()
        .pending
        .push_back(with_id(sh("sleep 30"), "r1"));
    let worker = Running::start(config(addr));
    server
        .wait_for(LIMIT, "the start", |w| !w.starts.is_empty())
        .await;
    server.world().to_disown.push(RunRefWire {
        run_id: "r1".into(),
        attempt: 1,
    });
    // Once killed, the run drops out of the heartbeats.
    server
        .wait_for(LIMIT, "a heartbeat without the run", |w| {
            w.heartbeats.len() > 3
                && w.heartbeats
                    .last()
                    .is_some_and(|(_, _, hb)| hb.runs.is_empty())
                && w.to_disown.is_empty()
        })
        .await;
    assert!(server.world().finishes.is_empty());
    worker.stop().await;
}

#[tokio::test]
async fn shutdown_stops_the_runs_reports_nothing_and_deregisters() {
    let server = FakeServer::default();
    let addr = server.serve("127.0.0.1:0".parse().unwrap()).await;
    server
        .world()
        .pending
        .push_back(with_id(sh("sleep 30"), "r1"));
    let worker = Running::start(config(addr));
    server
        .wait_for(LIMIT, "the start", |w| !w.starts.is_empty())
        .await;
    let began = Instant::now();
    worker.stop().await;
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    let w = server.world();
    assert!(w.finishes.is_empty());
    assert_eq!(w.deregistered, vec!["w1".to_string()]);
}

#[tokio::test]
async fn a_forgotten_worker_registers_again() {
    let server = FakeServer::default();
    let addr = server.serve("127.0.0.1:0".parse().unwrap()).await;
    server
        .world()
        .pending
        .push_back(with_id(sh("sleep 30"), "r1"));
    let worker = Running::start(config(addr));
    server
        .wait_for(LIMIT, "the start", |w| !w.starts.is_empty())
        .await;
    server.world().known.clear();
    server
        .wait_for(LIMIT, "a second registration", |w| {
            w.registrations.len() == 2
        })
        .await;
    // The old run was killed without a report; the new registration takes new work.
    server
        .world()
        .pending
        .push_back(with_id(sh("echo again"), "r2"));
    server
        .wait_for(LIMIT, "the new run's finish", |w| !w.finishes.is_empty())
        .await;
    {
        let w = server.world();
        assert_eq!(w.finishes.len(), 1);
        assert_eq!(w.finishes[0].0, "r2");
        assert_eq!(w.finishes[0].1.worker_id, "w2");
    }
    worker.stop().await;
}

#[tokio::test]
async fn a_server_that_is_not_up_yet_is_waited_for() {
    // Find a free port, then leave it closed for a while.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let worker = Running::start(config(addr));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let server = FakeServer::default();
    server.serve(addr).await;
    server
        .world()
        .pending
        .push_back(with_id(sh("echo up"), "r1"));
    server
        .wait_for(LIMIT, "the finish", |w| !w.finishes.is_empty())
        .await;
    assert_eq!(server.world().output, b"up\n");
    worker.stop().await;
}

/// Runs a worker of 4 cpus against `server` until it has reported `runs` finishes, then stops it.
async fn drain_with_a_worker(server: &FakeServer, addr: SocketAddr, runs: usize) {
    let mut cfg = config(addr);
    cfg.capacity.cpus = 4.0;
    let worker = Running::start(cfg);
    server
        .wait_for(Duration::from_secs(30), "every finish", |w| {
            w.finishes.len() >= runs
        })
        .await;
    worker.stop().await;
}

/// Many short runs through one worker: every run is started and finished exactly once, in
/// calls that carry several attempts each, and the finishes' claims hand out the backlog.
async fn short_runs_are_reported_in_batches(no_batch_call: bool) {
    let server = FakeServer::default();
    let addr = server.serve("127.0.0.1:0".parse().unwrap()).await;
    const RUNS: usize = 60;
    {
        let mut w = server.world();
        w.no_batch_call = no_batch_call;
        for n in 0..RUNS {
            w.pending.push_back(with_id(sh("true"), &format!("r{n}")));
        }
    }
    drain_with_a_worker(&server, addr, RUNS).await;
    let w = server.world();
    let mut started: Vec<&str> = w.starts.iter().map(|(id, _)| id.as_str()).collect();
    let mut finished: Vec<&str> = w.finishes.iter().map(|(id, _)| id.as_str()).collect();
    started.sort();
    finished.sort();
    let mut want: Vec<String> = (0..RUNS).map(|n| format!("r{n}")).collect();
    want.sort();
    assert_eq!(started, want, "each run started once");
    assert_eq!(finished, want, "each run finished once");
    assert!(w
        .finishes
        .iter()
        .all(|(_, f)| f.status == RunStatus::Succeeded && f.exit_code == Some(0)));
    for (run_id, _) in &w.finishes {
        let start = w.starts.iter().position(|(id, _)| id == run_id);
        assert!(start.is_some(), "{run_id} finished without a start");
    }
    if no_batch_call {
        assert_eq!(w.batch_calls, 0);
    } else {
        // Fewer calls than reports: some carried several attempts.
        assert!(w.batch_calls < 2 * RUNS, "{} calls", w.batch_calls);
        assert!(w.largest_batch >= 2, "largest batch {}", w.largest_batch);
    }
}

#[tokio::test]
async fn short_runs_are_reported_in_batches_with_claims_riding_on_finishes() {
    short_runs_are_reported_in_batches(false).await;
}

#[tokio::test]
async fn a_finish_never_goes_before_the_answer_to_its_start() {
    let server = FakeServer::default();
    let addr = server.serve("127.0.0.1:0".parse().unwrap()).await;
    const RUNS: usize = 30;
    {
        let mut w = server.world();
        // A start's answer comes late: the finish of the same attempt, ready long before,
        // must wait for it even though a second call may go meanwhile.
        w.slow_starts = Some(Duration::from_millis(40));
        // Runs of different lengths, so that some end while others' starts are out.
        for n in 0..RUNS {
            let script = format!("sleep 0.0{}", n % 10);
            w.pending.push_back(with_id(sh(&script), &format!("r{n}")));
        }
    }
    drain_with_a_worker(&server, addr, RUNS).await;
    let w = server.world();
    assert_eq!(w.finishes.len(), RUNS, "each run finished once");
    assert_eq!(w.finishes_before_start, 0, "a finish came before its start");
    assert!(
        w.most_calls_at_once <= 1,
        "{} calls at once",
        w.most_calls_at_once
    );
}

#[tokio::test]
async fn a_server_without_the_batch_call_gets_single_calls() {
    short_runs_are_reported_in_batches(true).await;
}
