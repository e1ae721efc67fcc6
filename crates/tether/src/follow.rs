//! Following a run from the terminal: live output through SSE, a spinner with the queue
//! position and heartbeat age while nothing prints, and reconnection with the last seq seen, so
//! nothing is lost or printed twice when the connection drops.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use base64::Engine;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tether_api::{EventView, RunView, TetherClient};
use tether_domain::{ErrorCode, LivenessState, RunStatus};
use tokio::signal::unix::{Signal, SignalKind};

use crate::ui;
use crate::CliError;

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The exit code `tether run` and `tether logs -f` end with: the command's own, or a
/// conventional one when it has none (124 timed out, 130 cancelled, 1 otherwise).
pub fn exit_code(
    status: Option<RunStatus>,
    exit_code: Option<i32>,
    error: Option<ErrorCode>,
) -> u8 {
    match status {
        Some(RunStatus::Succeeded) => 0,
        Some(RunStatus::TimedOut) => 124,
        Some(RunStatus::Cancelled) => 130,
        Some(RunStatus::Failed) => match (exit_code, error) {
            (Some(code), Some(ErrorCode::ExitNonzero)) if (1..=255).contains(&code) => code as u8,
            (Some(code), _) if (1..=255).contains(&code) => code as u8,
            _ => 1,
        },
        _ => 1,
    }
}

fn spinner() -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// What the status line shows, with the ages it last heard and when it heard them, so the
/// ages tick every second between the server's heartbeat events (every 15 s by default).
#[derive(Debug, Default)]
struct StatusLine {
    status: Option<RunStatus>,
    queue_position: Option<i64>,
    waiting_reason: Option<String>,
    liveness: Option<LivenessState>,
    heartbeat_age_s: Option<f64>,
    idle_for_s: Option<f64>,
    heard_at: Option<Instant>,
}

impl StatusLine {
    fn hear(&mut self, view: &EventView) {
        if view.status.is_some() {
            self.status = view.status;
        }
        if self.status != Some(RunStatus::Pending) {
            self.queue_position = None;
            self.waiting_reason = None;
        }
        if view.queue_position.is_some() {
            self.queue_position = view.queue_position;
        }
        if let Some(l) = &view.liveness {
            self.liveness = Some(l.state);
            self.heartbeat_age_s = l.heartbeat_age_s;
            self.idle_for_s = l.idle_for_s;
            self.heard_at = Some(Instant::now());
        }
    }

    fn hear_run(&mut self, run: &RunView) {
        self.status = Some(run.status);
        self.queue_position = run.queue_position;
        self.waiting_reason = run.waiting_reason.clone();
        self.liveness = Some(run.liveness.state);
        self.heartbeat_age_s = run.liveness.heartbeat_age_s;
        self.idle_for_s = run.liveness.idle_for_s;
        self.heard_at = Some(Instant::now());
    }

    /// The line as of `now`: the ages heard plus the time since they were heard.
    fn describe(&self, now: Instant) -> String {
        let since = self
            .heard_at
            .map(|at| now.saturating_duration_since(at).as_secs_f64())
            .unwrap_or(0.0);
        let status = self.status.map(|s| s.as_str()).unwrap_or("submitted");
        let mut parts = vec![status.to_string()];
        if let Some(pos) = self.queue_position {
            parts.push(format!("queue position {pos}"));
        }
        if let Some(reason) = &self.waiting_reason {
            parts.push(reason.clone());
        }
        match self.liveness {
            None | Some(LivenessState::Waiting | LivenessState::Done) => {}
            Some(state) => parts.push(state.as_str().to_string()),
        }
        if self.status != Some(RunStatus::Pending) {
            if let Some(age) = self.heartbeat_age_s {
                parts.push(format!("heartbeat {}", ui::ago(age + since)));
            }
            if let Some(idle) = self.idle_for_s.map(|i| i + since) {
                if idle >= 5.0 {
                    parts.push(format!("no output for {}", ui::span(idle)));
                }
            }
        }
        parts.join(" · ")
    }
}

fn log_bytes(view: &EventView) -> Vec<u8> {
    if let Some(b64) = &view.data_b64 {
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b64) {
            return bytes;
        }
    }
    view.text.clone().unwrap_or_default().into_bytes()
}

/// Listens for Ctrl-C from now on (none is missed between two waits), replacing the default
/// of ending the process.
pub fn listen_for_interrupts() -> Result<Signal, CliError> {
    Ok(tokio::signal::unix::signal(SignalKind::interrupt())?)
}

/// What Ctrl-C does while following (`tether run`); `None` leaves Ctrl-C to end the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInterrupt {
    /// The first Ctrl-C says the run goes on and how to follow or cancel it, then detaches
    /// after [`DETACH_WINDOW`]; a second one within it cancels the run.
    Detach,
    /// The first Ctrl-C cancels the run; following goes on to its end.
    Cancel,
}

/// How long after a first Ctrl-C a second one still cancels, before `tether run` detaches.
pub const DETACH_WINDOW: Duration = Duration::from_secs(3);

/// How often a pending run is re-read for why it waits (events do not carry the reason).
const WAITING_REFRESH: Duration = Duration::from_secs(2);

/// Names of workers by id, read from `GET /v1/workers` when a new id is met.
#[derive(Debug, Default)]
struct WorkerNames(HashMap<String, String>);

impl WorkerNames {
    async fn name(&mut self, client: &TetherClient, id: &str) -> String {
        if !self.0.contains_key(id) {
            if let Ok(list) = client.list_workers().await {
                self.0
                    .extend(list.workers.into_iter().map(|w| (w.id, w.name)));
            }
        }
        self.0.get(id).cloned().unwrap_or_else(|| id.to_string())
    }
}

/// Prints a line for the person at the terminal, above the spinner.
fn say(bar: &ProgressBar, line: &str) {
    bar.suspend(|| eprintln!("[tether] {line}"));
}

/// Asks the server to cancel and says what will happen.
pub async fn request_cancel(client: &TetherClient, run_id: &str) -> Result<String, CliError> {
    match client.cancel_run(run_id).await {
        Ok(run) => Ok(cancel_outcome(&run)),
        Err(e) if e.is_terminal() => Ok(format!("run {run_id} had already ended")),
        Err(e) => Err(e.into()),
    }
}

/// What a cancel will do, said from the run the server answered with.
pub fn cancel_outcome(run: &RunView) -> String {
    match run.status {
        RunStatus::Cancelled => format!("run {} cancelled; it never started", run.id),
        status if status.is_terminal() => {
            format!("run {} had already ended {}", run.id, status.as_str())
        }
        _ => format!(
            "cancel requested for run {}; its worker learns of it at its next heartbeat, then the \
             command gets SIGTERM, and SIGKILL after the worker's kill grace (--kill-grace, 10 s \
             by default)",
            run.id
        ),
    }
}

/// Follows `run_id` until its `end` event; returns the exit code to leave with.
pub async fn follow_run(
    client: &TetherClient,
    run_id: &str,
    on_interrupt: Option<(OnInterrupt, Signal)>,
) -> Result<u8, CliError> {
    let (on_interrupt, mut sigint) = match on_interrupt {
        Some((what, signal)) => (Some(what), Some(signal)),
        None => (None, None),
    };
    let bar = spinner();
    let tty = std::io::stderr().is_terminal();
    let mut line = StatusLine::default();
    let mut names = WorkerNames::default();
    let mut after: Option<i64> = None;
    let mut backoff = Duration::from_millis(200);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut refresh = tokio::time::interval(WAITING_REFRESH);
    let mut said_waiting: Option<String> = None;
    let mut interrupts = 0u32;
    let mut detach_at: Option<tokio::time::Instant> = None;
    let mut cancel_sent = false;
    loop {
        let mut events = client.events(run_id, after, true);
        loop {
            let detach = async {
                match detach_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let interrupt = async {
                match sigint.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let item = tokio::select! {
                item = events.next() => item,
                _ = tick.tick() => {
                    bar.set_message(line.describe(Instant::now()));
                    continue;
                }
                _ = refresh.tick(), if line.status == Some(RunStatus::Pending) || line.status.is_none() => {
                    if let Ok(run) = client.get_run(run_id).await {
                        if run.status == RunStatus::Pending {
                            line.hear_run(&run);
                            if !tty && run.waiting_reason.is_some() && run.waiting_reason != said_waiting {
                                said_waiting = run.waiting_reason.clone();
                                say(&bar, &format!(
                                    "pending at queue position {}: {}",
                                    run.queue_position.unwrap_or(0),
                                    run.waiting_reason.as_deref().unwrap_or("")
                                ));
                            }
                            bar.set_message(line.describe(Instant::now()));
                        }
                    }
                    continue;
                }
                _ = interrupt => {
                    interrupts += 1;
                    let cancel_now = on_interrupt == Some(OnInterrupt::Cancel) || interrupts >= 2;
                    if cancel_now && !cancel_sent {
                        cancel_sent = true;
                        detach_at = None;
                        match request_cancel(client, run_id).await {
                            Ok(text) => say(&bar, &format!("{text}; following it to its end (Ctrl-C again leaves)")),
                            Err(e) => {
                                bar.finish_and_clear();
                                eprintln!("[tether] cannot cancel run {run_id}: {e}");
                                return Ok(130);
                            }
                        }
                    } else if cancel_sent {
                        bar.finish_and_clear();
                        eprintln!("[tether] left run {run_id}; its cancel was requested");
                        return Ok(130);
                    } else {
                        say(&bar, &format!(
                            "run {run_id} keeps running on its worker. Ctrl-C again within {} s cancels it.\n\
                             [tether]   follow it: tether logs -f {run_id}\n\
                             [tether]   cancel it: tether cancel {run_id}",
                            DETACH_WINDOW.as_secs()
                        ));
                        detach_at = Some(tokio::time::Instant::now() + DETACH_WINDOW);
                    }
                    continue;
                }
                _ = detach => {
                    bar.finish_and_clear();
                    eprintln!("[tether] detached from run {run_id}; it goes on");
                    return Ok(130);
                }
            };
            let Some(item) = item else { break };
            let item = match item {
                Ok(item) => item,
                Err(e) if e.is_retryable() => {
                    bar.set_message(format!("reconnecting: {e}"));
                    break;
                }
                Err(e) => {
                    bar.finish_and_clear();
                    return Err(e.into());
                }
            };
            backoff = Duration::from_millis(200);
            if let Some(seq) = item.id {
                after = Some(seq);
            }
            let view = &item.view;
            match item.event.as_str() {
                "log" => {
                    let bytes = log_bytes(view);
                    let result = bar.suspend(|| {
                        if view.stream.as_deref() == Some("stderr") {
                            let mut err = std::io::stderr().lock();
                            err.write_all(&bytes).and_then(|_| err.flush())
                        } else {
                            let mut out = std::io::stdout().lock();
                            out.write_all(&bytes).and_then(|_| out.flush())
                        }
                    });
                    // A closed stdout (`| head`) ends the follow quietly.
                    if result.is_err() {
                        bar.finish_and_clear();
                        return Ok(0);
                    }
                }
                "attempt" if view.attempt.unwrap_or(1) > 1 => {
                    let worker = match view.worker_id.as_deref() {
                        Some(id) => names.name(client, id).await,
                        None => "?".into(),
                    };
                    say(
                        &bar,
                        &format!(
                            "── attempt {} started on worker {worker} ──",
                            view.attempt.unwrap_or(0)
                        ),
                    );
                }
                "status" => {
                    match (view.status, view.error_code) {
                        (Some(RunStatus::Pending), Some(ErrorCode::Released)) => say(
                            &bar,
                            &format!(
                                "attempt {} was handed back by its worker before it started \
                                 (it does not count); waiting for a worker",
                                view.attempt.unwrap_or(0)
                            ),
                        ),
                        (Some(RunStatus::Pending), Some(code)) => say(
                            &bar,
                            &format!(
                                "attempt {} ended: {}; retrying",
                                view.attempt.unwrap_or(0),
                                code.as_str()
                            ),
                        ),
                        _ => {}
                    }
                    line.hear(view);
                    bar.set_message(line.describe(Instant::now()));
                }
                "heartbeat" => {
                    line.hear(view);
                    bar.set_message(line.describe(Instant::now()));
                }
                "end" => {
                    bar.finish_and_clear();
                    if view.status != Some(RunStatus::Succeeded) {
                        // The reason (`cannot run /nonexistent/bin: …`) is on the run, not
                        // on the event.
                        let reason = client
                            .get_run(run_id)
                            .await
                            .ok()
                            .and_then(|r| r.error_message)
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default();
                        eprintln!(
                            "[tether] run {run_id} ended {}{}{reason}",
                            view.status.map(|s| s.as_str()).unwrap_or("?"),
                            view.error_code
                                .map(|c| format!(" ({c})"))
                                .unwrap_or_default()
                        );
                    }
                    return Ok(exit_code(view.status, view.exit_code, view.error_code));
                }
                _ => {}
            }
        }
        // The stream ended without `end`: the connection dropped. Resume after the last seq.
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_run() {
        assert_eq!(exit_code(Some(RunStatus::Succeeded), Some(0), None), 0);
        assert_eq!(
            exit_code(
                Some(RunStatus::Failed),
                Some(3),
                Some(ErrorCode::ExitNonzero)
            ),
            3
        );
        assert_eq!(
            exit_code(Some(RunStatus::Failed), None, Some(ErrorCode::SpawnFailed)),
            1
        );
        assert_eq!(
            exit_code(Some(RunStatus::TimedOut), None, Some(ErrorCode::Timeout)),
            124
        );
        assert_eq!(
            exit_code(Some(RunStatus::Cancelled), None, Some(ErrorCode::Cancelled)),
            130
        );
    }

    #[test]
    fn ages_tick_between_heartbeats() {
        let heard = Instant::now();
        let line = StatusLine {
            status: Some(RunStatus::Running),
            liveness: Some(LivenessState::Quiet),
            heartbeat_age_s: Some(2.0),
            idle_for_s: Some(6.0),
            heard_at: Some(heard),
            ..StatusLine::default()
        };
        assert_eq!(
            line.describe(heard),
            "running · quiet · heartbeat 2.0 s ago · no output for 6.0 s"
        );
        assert_eq!(
            line.describe(heard + Duration::from_secs(3)),
            "running · quiet · heartbeat 5.0 s ago · no output for 9.0 s"
        );
    }

    #[test]
    fn a_pending_line_says_why_it_waits() {
        let line = StatusLine {
            status: Some(RunStatus::Pending),
            queue_position: Some(2),
            waiting_reason: Some("no live worker serves lane `default`".into()),
            liveness: Some(LivenessState::Waiting),
            ..StatusLine::default()
        };
        assert_eq!(
            line.describe(Instant::now()),
            "pending · queue position 2 · no live worker serves lane `default`"
        );
    }
}
