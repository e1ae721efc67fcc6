//! One attempt, supervised with real processes against the fake reporter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg};
use nix::unistd::Pid;
use tether_domain::{ErrorCode, RunStatus};
use tether_worker::{
    supervise, AttemptControl, AttemptEnd, AttemptStats, Finish, OutputStream, Unreported,
};

use crate::fake::{assignment, options, run, sh, spawned, Behaviour, FakeReporter};

const LIMIT: Duration = Duration::from_secs(5);

fn reported(end: &AttemptEnd) -> &Finish {
    match end {
        AttemptEnd::Reported(finish) => finish,
        other => panic!("expected a reported finish, got {other:?}"),
    }
}

/// Whether nothing of the group is left running. Killed grandchildren are reaped by init, not
/// by us, so they may stay zombies for a moment: poll, and count zombies as gone.
fn group_gone(pgid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if killpg(Pid::from_raw(pgid as i32), None) == Err(Errno::ESRCH) || only_zombies(pgid) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn only_zombies(pgid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    for entry in entries.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the `(comm)` field: state, ppid, pgrp.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(2) == Some(&pgid.to_string().as_str()) && fields.first() != Some(&"Z") {
            return false;
        }
    }
    true
}

#[tokio::test]
async fn a_command_that_succeeds_reports_its_output_and_exit_code() {
    let fake = FakeReporter::new();
    let end = run(assignment(&["echo", "hi"]), fake.clone(), LIMIT).await;
    let finish = reported(&end);
    assert_eq!(finish.status, RunStatus::Succeeded);
    assert_eq!(finish.exit_code, Some(0));
    assert_eq!(finish.error_code, None);
    assert!(fake.pid().is_some(), "start was reported");
    assert_eq!(fake.output(OutputStream::Stdout), b"hi\n");
    assert_eq!(fake.finishes().len(), 1);
}

#[tokio::test]
async fn a_nonzero_exit_fails_with_its_code() {
    let fake = FakeReporter::new();
    let end = run(sh("exit 3"), fake.clone(), LIMIT).await;
    let finish = reported(&end);
    assert_eq!(finish.status, RunStatus::Failed);
    assert_eq!(finish.error_code, Some(ErrorCode::ExitNonzero));
    assert_eq!(finish.exit_code, Some(3));
}

#[tokio::test]
async fn a_signal_we_did_not_send_is_named() {
    let fake = FakeReporter::new();
    let end = run(sh("kill -SEGV $$"), fake.clone(), LIMIT).await;
    let finish = reported(&end);
    assert_eq!(finish.status, RunStatus::Failed);
    assert_eq!(finish.error_code, Some(ErrorCode::ExitNonzero));
    assert_eq!(finish.exit_code, Some(128 + 11));
    assert!(
        finish
            .error_message
            .as_deref()
            .unwrap_or("")
            .contains("SIGSEGV"),
        "{finish:?}"
    );
}

#[tokio::test]
async fn a_missing_binary_is_a_spawn_failure_without_a_start() {
    let fake = FakeReporter::new();
    let end = run(assignment(&["/no/such/binary-tether"]), fake.clone(), LIMIT).await;
    let finish = reported(&end);
    assert_eq!(finish.status, RunStatus::Failed);
    assert_eq!(finish.error_code, Some(ErrorCode::SpawnFailed));
    let message = finish.error_message.clone().unwrap_or_default();
    assert!(message.contains("No such file"), "{message}");
    assert!(
        fake.pid().is_none(),
        "no start for a process that never ran"
    );
}

#[tokio::test]
async fn env_and_cwd_reach_the_command() {
    let fake = FakeReporter::new();
    let mut a = sh("echo \"$TETHER_TEST_VALUE\"; pwd");
    a.env
        .insert("TETHER_TEST_VALUE".into(), "from-the-run".into());
    a.cwd = Some("/tmp".into());
    let end = run(a, fake.clone(), LIMIT).await;
    assert_eq!(reported(&end).status, RunStatus::Succeeded);
    assert_eq!(fake.output(OutputStream::Stdout), b"from-the-run\n/tmp\n");
}

#[tokio::test]
async fn a_command_past_its_timeout_is_timed_out() {
    let fake = FakeReporter::new();
    let mut a = assignment(&["sleep", "30"]);
    a.timeout_ms = Some(300);
    let began = Instant::now();
    let end = run(a, fake.clone(), LIMIT).await;
    let finish = reported(&end);
    assert_eq!(finish.status, RunStatus::TimedOut);
    assert_eq!(finish.error_code, Some(ErrorCode::Timeout));
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
    let pid = fake.pid().expect("started");
    assert!(group_gone(pid));
}

#[tokio::test]
async fn a_command_that_ignores_sigterm_is_killed_after_the_grace() {
    let fake = FakeReporter::new();
    let mut a = sh("trap '' TERM; sleep 30 & wait; sleep 30");
    a.timeout_ms = Some(200);
    let began = Instant::now();
    let end = run(a, fake.clone(), LIMIT).await;
    assert_eq!(reported(&end).error_code, Some(ErrorCode::Timeout));
    // 200 ms timeout + 500 ms grace, then SIGKILL.
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    assert!(group_gone(fake.pid().expect("started")));
}

#[tokio::test]
async fn a_silent_command_stalls() {
    let fake = FakeReporter::new();
    let mut a = sh("echo one; sleep 30");
    a.stall_timeout_ms = Some(300);
    let end = run(a, fake.clone(), LIMIT).await;
    let finish = reported(&end);
    assert_eq!(finish.status, RunStatus::TimedOut);
    assert_eq!(finish.error_code, Some(ErrorCode::Stalled));
    assert_eq!(fake.output(OutputStream::Stdout), b"one\n");
}

#[tokio::test]
async fn output_keeps_a_command_from_stalling() {
    let fake = FakeReporter::new();
    let mut a = sh("for i in 1 2 3 4 5 6; do echo $i; sleep 0.1; done");
    a.stall_timeout_ms = Some(400);
    let end = run(a, fake.clone(), LIMIT).await;
    assert_eq!(reported(&end).status, RunStatus::Succeeded);
}

#[tokio::test]
async fn cancel_stops_the_whole_process_group() {
    let fake = FakeReporter::new();
    let (control, task) = spawned(sh("sleep 30 & sleep 30"), fake.clone(), options());
    let pid = fake.wait_for_pid(LIMIT).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    control.cancel();
    let end = tokio::time::timeout(LIMIT, task)
        .await
        .expect("ended")
        .expect("joined");
    let finish = reported(&end);
    assert_eq!(finish.status, RunStatus::Cancelled);
    assert_eq!(finish.error_code, Some(ErrorCode::Cancelled));
    assert_eq!(kill(Pid::from_raw(pid as i32), None), Err(Errno::ESRCH));
    assert!(group_gone(pid));
}

#[tokio::test]
async fn not_owned_kills_at_once_and_reports_nothing() {
    let fake = FakeReporter::new();
    let (control, task) = spawned(
        sh("trap '' TERM; echo up; sleep 30"),
        fake.clone(),
        options(),
    );
    let pid = fake.wait_for_pid(LIMIT).await;
    control.abandon();
    let end = tokio::time::timeout(Duration::from_millis(400), task)
        .await
        .expect("abandon does not wait out the grace")
        .expect("joined");
    assert_eq!(end, AttemptEnd::Unreported(Unreported::NotOwned));
    assert!(fake.finishes().is_empty());
    assert!(group_gone(pid));
}

#[tokio::test]
async fn shutdown_terminates_and_reports_nothing() {
    let fake = FakeReporter::new();
    let (control, task) = spawned(assignment(&["sleep", "30"]), fake.clone(), options());
    let pid = fake.wait_for_pid(LIMIT).await;
    control.shut_down();
    let end = tokio::time::timeout(LIMIT, task)
        .await
        .expect("ended")
        .expect("joined");
    assert_eq!(end, AttemptEnd::Unreported(Unreported::Shutdown));
    assert!(fake.finishes().is_empty());
    assert!(group_gone(pid));
}

#[tokio::test]
async fn a_stale_start_kills_the_process_and_reports_nothing() {
    let fake = FakeReporter::with(Behaviour {
        start_stale: true,
        ..Behaviour::default()
    });
    let end = run(assignment(&["sleep", "30"]), fake.clone(), LIMIT).await;
    assert_eq!(end, AttemptEnd::Unreported(Unreported::Stale));
    assert!(fake.finishes().is_empty());
    assert!(group_gone(fake.pid().expect("start was tried")));
}

#[tokio::test]
async fn the_output_limit_stops_the_command_without_a_finish() {
    let fake = FakeReporter::with(Behaviour {
        stop_after_bytes: Some(1000),
        ..Behaviour::default()
    });
    let end = run(sh("while true; do echo flood; done"), fake.clone(), LIMIT).await;
    assert_eq!(end, AttemptEnd::Unreported(Unreported::OutputLimit));
    assert!(fake.finishes().is_empty());
    assert!(group_gone(fake.pid().expect("started")));
}

#[tokio::test]
async fn a_late_line_after_a_silence_arrives() {
    let fake = FakeReporter::new();
    let end = run(sh("sleep 1; echo late"), fake.clone(), LIMIT).await;
    assert_eq!(reported(&end).status, RunStatus::Succeeded);
    assert_eq!(fake.output(OutputStream::Stdout), b"late\n");
}

#[tokio::test]
async fn fifty_megabytes_arrive_complete() {
    let fake = FakeReporter::new();
    let end = run(
        sh("head -c 50000000 /dev/zero | tr '\\0' 'x'"),
        fake.clone(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(reported(&end).status, RunStatus::Succeeded);
    let out = fake.output(OutputStream::Stdout);
    assert_eq!(out.len(), 50_000_000);
    assert!(out.iter().all(|b| *b == b'x'));
    assert!(fake.chunks().iter().all(|c| c.data.len() <= 64 * 1024));
}

#[tokio::test]
async fn many_lines_arrive_complete_and_in_order() {
    let fake = FakeReporter::new();
    // 200,000 numbered lines of 100 bytes: 20 MB.
    let end = run(
        sh("awk 'BEGIN { for (i = 0; i < 200000; i++) printf \"%09d%090d\\n\", i, 0 }'"),
        fake.clone(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(reported(&end).status, RunStatus::Succeeded);
    // Neighbouring lines travel joined; every line arrives whole and in order.
    let chunks = fake.chunks();
    assert!(chunks.len() < 200_000, "short lines were not joined");
    let all: Vec<u8> = chunks.iter().flat_map(|c| c.data.to_vec()).collect();
    let lines: Vec<&[u8]> = all.split_inclusive(|b| *b == b'\n').collect();
    assert_eq!(lines.len(), 200_000);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line.len(), 100, "line {i}");
        assert_eq!(&line[..9], format!("{i:09}").as_bytes(), "line {i}");
    }
}

#[tokio::test]
async fn a_slow_server_holds_a_fast_command_back_without_losing_output() {
    let fake = FakeReporter::with(Behaviour {
        append_delay: Some(Duration::from_millis(20)),
        transient_append_failures: 3,
        ..Behaviour::default()
    });
    let end = run(
        sh("head -c 8000000 /dev/zero | tr '\\0' 'y'"),
        fake.clone(),
        LIMIT,
    )
    .await;
    assert_eq!(reported(&end).status, RunStatus::Succeeded);
    assert_eq!(fake.output(OutputStream::Stdout).len(), 8_000_000);
}

#[tokio::test]
async fn bytes_that_are_not_utf8_arrive_exactly() {
    let fake = FakeReporter::new();
    let end = run(sh("printf '\\377\\376abc\\n'"), fake.clone(), LIMIT).await;
    assert_eq!(reported(&end).status, RunStatus::Succeeded);
    assert_eq!(fake.output(OutputStream::Stdout), b"\xff\xfeabc\n");
}

#[tokio::test]
async fn a_partial_line_arrives_without_a_newline() {
    let fake = FakeReporter::new();
    let end = run(sh("printf 'no newline'"), fake.clone(), LIMIT).await;
    assert_eq!(reported(&end).status, RunStatus::Succeeded);
    assert_eq!(fake.output(OutputStream::Stdout), b"no newline");
}

#[tokio::test]
async fn a_partial_line_is_sent_while_the_command_still_runs() {
    let fake = FakeReporter::new();
    let (control, task) = spawned(sh("printf 'progress: '; sleep 30"), fake.clone(), options());
    tether_testkit::eventually("the partial line", Duration::from_secs(2), async || {
        fake.output(OutputStream::Stdout) == b"progress: "
    })
    .await;
    control.cancel();
    let end = tokio::time::timeout(LIMIT, task)
        .await
        .expect("ended")
        .expect("joined");
    assert_eq!(reported(&end).status, RunStatus::Cancelled);
}

#[tokio::test]
async fn lines_are_split_and_the_order_between_streams_is_kept() {
    let fake = FakeReporter::new();
    let end = run(
        sh("echo a; sleep 0.05; echo b >&2; sleep 0.05; echo c; echo d"),
        fake.clone(),
        LIMIT,
    )
    .await;
    assert_eq!(reported(&end).status, RunStatus::Succeeded);
    // Neighbours of one stream may travel joined: compare the runs of each stream.
    let mut seen: Vec<(OutputStream, Vec<u8>)> = Vec::new();
    for c in fake.chunks() {
        match seen.last_mut() {
            Some((stream, data)) if *stream == c.stream => data.extend_from_slice(&c.data),
            _ => seen.push((c.stream, c.data.to_vec())),
        }
    }
    assert_eq!(
        seen,
        vec![
            (OutputStream::Stdout, b"a\n".to_vec()),
            (OutputStream::Stderr, b"b\n".to_vec()),
            (OutputStream::Stdout, b"c\nd\n".to_vec()),
        ]
    );
    let chunks = fake.chunks();
    assert!(chunks.windows(2).all(|w| w[0].ts_ms <= w[1].ts_ms));
    assert!(
        chunks[0].ts_ms > 1_600_000_000_000,
        "wall-clock milliseconds"
    );
}

#[tokio::test]
async fn a_grandchild_holding_the_pipe_does_not_hang_the_attempt() {
    let fake = FakeReporter::new();
    let began = Instant::now();
    let end = run(sh("sleep 100 & echo done"), fake.clone(), LIMIT).await;
    assert_eq!(reported(&end).status, RunStatus::Succeeded);
    assert_eq!(fake.output(OutputStream::Stdout), b"done\n");
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
    assert!(group_gone(fake.pid().expect("started")));
}

fn calls(fake: &FakeReporter) -> Vec<&'static str> {
    fake.record.lock().unwrap().calls.clone()
}

#[tokio::test]
async fn a_silent_command_that_ends_before_its_start_is_answered_is_finished_behind_it() {
    let fake = FakeReporter::with(Behaviour {
        start_delay: Some(Duration::from_millis(500)),
        ..Behaviour::default()
    });
    let end = run(assignment(&["true"]), fake.clone(), LIMIT).await;
    let AttemptEnd::Reported(finish) = end else {
        panic!("{end:?}");
    };
    assert_eq!(finish.status, RunStatus::Succeeded);
    assert_eq!(finish.exit_code, Some(0));
    // The finish was handed over while the start still waited for its answer (a batching
    // reporter sends both in one call, the start first).
    assert_eq!(calls(&fake), ["start", "finish", "started"]);
}

#[tokio::test]
async fn output_waits_for_the_start_even_when_the_command_ended_first() {
    let fake = FakeReporter::with(Behaviour {
        start_delay: Some(Duration::from_millis(300)),
        ..Behaviour::default()
    });
    let end = run(sh("echo hi"), fake.clone(), LIMIT).await;
    assert!(matches!(end, AttemptEnd::Reported(_)), "{end:?}");
    assert_eq!(fake.output(OutputStream::Stdout), b"hi\n");
    assert_eq!(calls(&fake), ["start", "started", "append", "finish"]);
}

#[tokio::test]
async fn a_stale_start_of_a_command_that_ended_first_reports_nothing_more() {
    let fake = FakeReporter::with(Behaviour {
        start_stale: true,
        start_delay: Some(Duration::from_millis(300)),
        ..Behaviour::default()
    });
    let end = run(assignment(&["true"]), fake.clone(), LIMIT).await;
    assert_eq!(end, AttemptEnd::Unreported(Unreported::Stale));
}

/// The processes whose command line is exactly `argv`, zombies left out.
fn running(argv: &[&str]) -> usize {
    let wanted: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == wanted))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("stat")).is_ok_and(|s| {
                !s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
        })
        .count()
}

fn none_running(argv: &[&str]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while running(argv) > 0 {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[tokio::test]
async fn what_a_command_left_behind_dies_with_it_even_in_a_session_of_its_own() {
    let tag = format!("{}.25", 7000 + std::process::id() % 1000);
    let fake = FakeReporter::new();
    let script = format!("setsid sleep {tag} & sleep {tag} & echo started");
    let end = run(sh(&script), fake.clone(), LIMIT).await;
    assert_eq!(reported(&end).status, RunStatus::Succeeded);
    assert_eq!(fake.output(OutputStream::Stdout), b"started\n");
    assert!(none_running(&["sleep", &tag]), "a sleep outlived its run");
}

#[tokio::test]
async fn a_stopped_run_takes_its_detached_processes_with_it() {
    let tag = format!("{}.5", 8000 + std::process::id() % 1000);
    let fake = FakeReporter::new();
    let script = format!("setsid sleep {tag} & echo up; sleep {tag}");
    let (control, task) = spawned(sh(&script), fake.clone(), options());
    let deadline = Instant::now() + LIMIT;
    while running(&["sleep", &tag]) < 2 {
        assert!(Instant::now() < deadline, "the sleeps never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    control.abandon();
    let end = tokio::time::timeout(LIMIT, task)
        .await
        .expect("ended")
        .expect("joined");
    assert_eq!(end, AttemptEnd::Unreported(Unreported::NotOwned));
    assert!(none_running(&["sleep", &tag]), "a sleep outlived its run");
}

#[tokio::test]
async fn without_the_shim_a_command_runs_and_its_group_is_cancelled() {
    let no_shim = tether_worker::SupervisorOptions {
        run_shim: false,
        ..options()
    };
    let fake = FakeReporter::new();
    let (control, task) = spawned(sh("echo up; sleep 30 & sleep 30"), fake.clone(), no_shim);
    let pid = fake.wait_for_pid(LIMIT).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    control.cancel();
    let end = tokio::time::timeout(LIMIT, task)
        .await
        .expect("ended")
        .expect("joined");
    assert_eq!(reported(&end).status, RunStatus::Cancelled);
    assert_eq!(fake.output(OutputStream::Stdout), b"up\n");
    assert!(group_gone(pid));
}

/// The parent of process `pid`, from `/proc`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test]
async fn the_worker_never_forks_a_run_its_run_host_does() {
    // The command prints its shim's parent.
    let script = "read -r line < /proc/$PPID/stat; set -- ${line##*) }; echo $2";
    let me = std::process::id().to_string();

    let hosted = FakeReporter::new();
    let end = run(sh(script), hosted.clone(), LIMIT).await;
    assert_eq!(reported(&end).status, RunStatus::Succeeded);
    let host = String::from_utf8(hosted.output(OutputStream::Stdout)).unwrap();
    assert_ne!(host.trim(), me, "the shim is the worker's own child");
    assert_eq!(
        parent_of(host.trim().parse().unwrap()),
        Some(std::process::id())
    );

    let forked = FakeReporter::new();
    let (control, rx) = AttemptControl::new();
    let no_host = tether_worker::SupervisorOptions {
        run_host: false,
        ..options()
    };
    let end = supervise(
        sh(script),
        forked.clone(),
        Arc::new(AttemptStats::new()),
        rx,
        no_host,
    )
    .await;
    drop(control);
    assert_eq!(reported(&end).status, RunStatus::Succeeded);
    assert_eq!(
        String::from_utf8(forked.output(OutputStream::Stdout))
            .unwrap()
            .trim(),
        me
    );
}

#[tokio::test]
async fn a_run_host_that_dies_fails_its_runs_and_the_next_run_gets_a_new_one() {
    let fake = FakeReporter::new();
    let (control, task) = spawned(sh("echo up; sleep 30"), fake.clone(), options());
    // The reported pid leads the run's group; its parent is the shim, the shim's the host.
    let group = fake.wait_for_pid(LIMIT).await;
    let shim = parent_of(group).expect("the command has a parent");
    let host = parent_of(shim).expect("the shim has a parent");
    assert_ne!(host, std::process::id());
    assert_eq!(parent_of(host), Some(std::process::id()));
    kill(
        Pid::from_raw(host as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let end = tokio::time::timeout(LIMIT, task)
        .await
        .expect("ended")
        .expect("joined");
    drop(control);
    let finish = reported(&end);
    assert_eq!(finish.status, RunStatus::Failed);
    assert!(
        finish
            .error_message
            .as_deref()
            .is_some_and(|m| m.contains("run host")),
        "{finish:?}"
    );
    assert!(group_gone(group), "the run outlived its host");

    let next = FakeReporter::new();
    let end = run(assignment(&["echo", "again"]), next.clone(), LIMIT).await;
    assert_eq!(reported(&end).status, RunStatus::Succeeded);
    assert_eq!(next.output(OutputStream::Stdout), b"again\n");
}

#[tokio::test]
async fn a_kept_shim_starts_each_run_afresh() {
    // The first run works in /tmp and leaves a process behind; its end kills it.
    let first = FakeReporter::new();
    let mut there = sh("echo $PPID; pwd; sleep 30.7321 & echo left");
    there.cwd = Some("/tmp".into());
    let end = run(there, first.clone(), LIMIT).await;
    assert_eq!(reported(&end).status, RunStatus::Succeeded);
    let out = String::from_utf8(first.output(OutputStream::Stdout)).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[1], "/tmp", "{out}");
    assert!(
        none_running(&["sleep", "30.7321"]),
        "what the first run left behind outlived it"
    );

    // The next run gets the same shim, back in the worker's directory.
    let second = FakeReporter::new();
    let end = run(sh("echo $PPID; pwd"), second.clone(), LIMIT).await;
    assert_eq!(reported(&end).status, RunStatus::Succeeded);
    let again = String::from_utf8(second.output(OutputStream::Stdout)).unwrap();
    let again: Vec<&str> = again.lines().collect();
    assert_eq!(again[0], lines[0], "a shim kept for the next run");
    let here = std::env::current_dir().unwrap();
    assert_eq!(
        again[1],
        here.to_str().unwrap(),
        "not the first run's directory"
    );
}
