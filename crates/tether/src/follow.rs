//! Following a run from the terminal: live output through SSE, a spinner with the queue
//! position and heartbeat age while nothing prints, and reconnection with the last seq seen, so
//! nothing is lost or printed twice when the connection drops.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use base64::Engine;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tether_api::{EventView, TetherClient};
use tether_domain::{ErrorCode, LivenessState, RunStatus};

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

fn describe(view: &EventView) -> String {
    let status = view.status.map(|s| s.as_str()).unwrap_or("?");
    let mut parts = vec![status.to_string()];
    if let Some(pos) = view.queue_position {
        parts.push(format!("queue position {pos}"));
    }
    if let Some(l) = &view.liveness {
        match l.state {
            LivenessState::Waiting | LivenessState::Done => {}
            state => parts.push(format!("{state:?}").to_lowercase()),
        }
        if let Some(age) = l.heartbeat_age_s {
            parts.push(format!("heartbeat {age:.0}s ago"));
        }
        if let Some(idle) = l.idle_for_s {
            if idle >= 5.0 {
                parts.push(format!("no output for {idle:.0}s"));
            }
        }
    }
    parts.join(" · ")
}

fn log_bytes(view: &EventView) -> Vec<u8> {
    if let Some(b64) = &view.data_b64 {
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b64) {
            return bytes;
        }
    }
    view.text.clone().unwrap_or_default().into_bytes()
}

/// Follows `run_id` until its `end` event; returns the exit code to leave with.
pub async fn follow_run(client: &TetherClient, run_id: &str) -> Result<u8, CliError> {
    let bar = spinner();
    let mut after: Option<i64> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut events = client.events(run_id, after, true);
        while let Some(item) = events.next().await {
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
                    bar.suspend(|| {
                        eprintln!(
                            "[tether] attempt {} started on worker {}",
                            view.attempt.unwrap_or(0),
                            view.worker_id.as_deref().unwrap_or("?")
                        )
                    });
                }
                "status" => {
                    if view.status == Some(RunStatus::Pending) && view.error_code.is_some() {
                        bar.suspend(|| {
                            eprintln!(
                                "[tether] attempt {} ended: {}; retrying",
                                view.attempt.unwrap_or(0),
                                view.error_code.map(|c| c.as_str()).unwrap_or("?")
                            )
                        });
                    }
                    bar.set_message(describe(view));
                }
                "heartbeat" => bar.set_message(describe(view)),
                "end" => {
                    bar.finish_and_clear();
                    if view.status != Some(RunStatus::Succeeded) {
                        eprintln!(
                            "[tether] run {run_id} ended {}{}",
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
}
