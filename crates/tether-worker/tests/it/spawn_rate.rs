//! How fast supervision alone can run `true`, 8 at a time, beside the OS's own `xargs -P8`:
//! the ceiling of the real path without a server (reports answered at once, in memory).
//! A measurement, not a check: `cargo test --release -p tether-worker --test it -- --ignored
//! --nocapture spawn_rate` (BENCHMARKS.md quotes it).

use std::sync::Arc;
use std::time::Instant;

use tether_worker::{supervise, AttemptControl, AttemptEnd, AttemptStats, SupervisorOptions};
use tokio::sync::Semaphore;

use crate::fake::{assignment, options, FakeReporter};

const RUNS: usize = 3000;
const AT_ONCE: usize = 8;

async fn supervised(options: SupervisorOptions) -> f64 {
    let slots = Arc::new(Semaphore::new(AT_ONCE));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let options = options.clone();
        tasks.push(tokio::spawn(async move {
            let (control, rx) = AttemptControl::new();
            let end = supervise(
                assignment(&["true"]),
                FakeReporter::new(),
                Arc::new(AttemptStats::new()),
                rx,
                options,
            )
            .await;
            drop((control, permit));
            matches!(end, AttemptEnd::Reported(_))
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap(), "a run did not end reported");
    }
    RUNS as f64 / started.elapsed().as_secs_f64()
}

fn xargs_true() -> f64 {
    let started = Instant::now();
    // `true` ignores its argument: one process per line, as the peer harness's baseline.
    let status = std::process::Command::new("sh")
        .args(["-c", &format!("seq {RUNS} | xargs -P {AT_ONCE} -n 1 true")])
        .status()
        .unwrap();
    assert!(status.success());
    RUNS as f64 / started.elapsed().as_secs_f64()
}

#[test]
#[ignore = "a measurement; run it in release on a quiet machine"]
fn spawn_rate_of_supervision_alone() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for round in 1..=2 {
        let x = xargs_true();
        let host = rt.block_on(supervised(options()));
        let fork = rt.block_on(supervised(SupervisorOptions {
            run_host: false,
            ..options()
        }));
        let bare = rt.block_on(supervised(SupervisorOptions {
            run_shim: false,
            ..options()
        }));
        println!(
            "round {round}: xargs -P{AT_ONCE} true {x:.0}/s; supervise: shim via run host {host:.0}/s ({:.0} %), shim forked by the worker {fork:.0}/s ({:.0} %), no shim {bare:.0}/s ({:.0} %)",
            100.0 * host / x,
            100.0 * fork / x,
            100.0 * bare / x
        );
    }
}
