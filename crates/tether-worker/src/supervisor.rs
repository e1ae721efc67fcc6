//! Supervision of one attempt: spawn the command in its own process group, report its start,
//! stream its output, enforce its timeouts, obey the worker's orders, and report how it ended.
//!
//! Nothing here speaks HTTP: reports go through an [`AttemptReporter`].

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use std::os::fd::OwnedFd;
use tether_api::Assignment;
use tether_domain::{ErrorCode, RunStatus};
use tokio::io::AsyncRead;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::backoff::Backoff;
use crate::control::{AttemptStats, Directive};
use crate::group::{signal_group, signal_name};
use crate::output::{output_queue, read_pipe, upload, UploadEnd};
use crate::reporter::{AttemptReporter, Finish, OutputStream, ReportError};
use crate::run_host::{HostSpawnError, RunHost};

/// How long `start` and `finish` keep retrying a server that cannot be reached.
const REPORT_PATIENCE: Duration = Duration::from_secs(30);
/// After the command exits, how long its pipes get to reach their end on their own before the
/// rest of its process group is killed.
const EXIT_SETTLE: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorOptions {
    /// Between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Names of the worker's own environment variables a command receives (besides the run's
    /// `env`); see `command_env`.
    pub pass_env: Arc<[String]>,
    /// Run each command under a shim (`crate::shim`), so that no process of it
    /// outlives its attempt. Off only for benchmarks; ignored where unsupported.
    pub run_shim: bool,
    /// Under a shim: one the run host (`crate::run_host`) keeps, so the worker never forks.
    /// Off, the worker forks each shim itself.
    pub run_host: bool,
}

impl Default for SupervisorOptions {
    fn default() -> Self {
        SupervisorOptions {
            kill_grace: Duration::from_secs(10),
            pass_env: DEFAULT_PASS_ENV.iter().map(|s| s.to_string()).collect(),
            run_shim: true,
            run_host: true,
        }
    }
}

/// What a command receives of the worker's environment unless the worker is told otherwise:
/// enough to find programs, a home, a locale and a time zone; no credentials.
pub const DEFAULT_PASS_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
    "TERM",
];

/// A command's whole environment: the worker's variables named in `pass_env`, then the run's
/// `env` over them. Nothing else of the worker's is passed: not its token, and no `TETHER_*`
/// variable even when listed, since those configure Tether itself and may carry credentials.
pub fn command_env(
    pass_env: &[String],
    run_env: &std::collections::BTreeMap<String, String>,
) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    let mut env: Vec<(std::ffi::OsString, std::ffi::OsString)> = pass_env
        .iter()
        .filter(|name| !name.starts_with("TETHER_") && !run_env.contains_key(*name))
        .filter_map(|name| std::env::var_os(name).map(|v| (name.into(), v)))
        .collect();
    env.extend(run_env.iter().map(|(k, v)| (k.into(), v.into())));
    env
}

/// Why an attempt ended without a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreported {
    /// The server said the attempt is no longer current.
    Stale,
    /// The output limit was reached; the server ended the run itself.
    OutputLimit,
    /// The server said this worker no longer owns the run.
    NotOwned,
    /// The worker is shutting down; the server gets the run back when the worker deregisters.
    Shutdown,
    /// The worker is shutting down and never started the command: it hands the attempt back
    /// uncounted (`POST /v1/workers/{id}/release`).
    NeverStarted,
    /// The start could not be confirmed; the process was killed.
    StartNotConfirmed,
}

/// How supervision of an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptEnd {
    /// Finished and the server took the report.
    Reported(Finish),
    /// Finished, but the report was not taken (stale, refused, or the server stayed out of
    /// reach).
    NotAccepted(Finish),
    /// Stopped without a report.
    Unreported(Unreported),
}

/// Why the process is being stopped (or stopped by itself).
#[derive(Debug)]
enum Ending {
    Exited(std::io::Result<ExitStatus>),
    TimedOut(Duration),
    Stalled(Duration),
    Cancel,
    Shutdown,
    Abandon,
    Upload(UploadEnd),
}

/// Runs `assignment` to its end. Returns once the process group is gone and everything that
/// should be reported is.
pub async fn supervise(
    assignment: Assignment,
    reporter: Arc<dyn AttemptReporter>,
    stats: Arc<AttemptStats>,
    directives: watch::Receiver<Directive>,
    options: SupervisorOptions,
) -> AttemptEnd {
    let mut orders = Orders::new(directives);
    let run_id = assignment.run_id.clone();
    let attempt = assignment.attempt;
    if orders.current() >= Directive::Shutdown {
        let why = match orders.current() {
            Directive::Shutdown => Unreported::NeverStarted,
            other => unreported_for(other),
        };
        return AttemptEnd::Unreported(why);
    }
    if orders.current() == Directive::Cancel {
        // Cancelled while it waited for a slot: it never starts.
        tracing::info!(run_id, attempt, "cancelled before it started");
        let finish = Finish {
            status: RunStatus::Cancelled,
            error_code: Some(ErrorCode::Cancelled),
            exit_code: None,
            error_message: Some("cancelled on request before it started".into()),
        };
        return report_unstarted(&*reporter, &stats, &run_id, attempt, finish, &mut orders).await;
    }
    let mut child = match spawn(&assignment, &options).await {
        Ok(child) => child,
        Err(message) => {
            tracing::info!(run_id, attempt, %message, "spawn failed");
            let finish = Finish {
                status: RunStatus::Failed,
                error_code: Some(ErrorCode::SpawnFailed),
                exit_code: None,
                error_message: Some(message),
            };
            return report_unstarted(&*reporter, &stats, &run_id, attempt, finish, &mut orders)
                .await;
        }
    };
    let pgid = child.pid;
    // A shim's lifeline, held for as long as this supervision lasts.
    let _lifeline = child
        .lifeline
        .take()
        .map(|lifeline| crate::shim::hold_lifeline(pgid, lifeline));
    let started = Instant::from_std(child.started);
    // Per run, so below info: a busy worker starts hundreds a second.
    tracing::debug!(run_id, attempt, pid = pgid, command = ?assignment.command, "started");

    let (queue, rx) = output_queue();
    let exited = CancellationToken::new();
    let mut readers = JoinSet::new();
    if let Some(stdout) = child.stdout.take() {
        readers.spawn(read_pipe(
            stdout,
            OutputStream::Stdout,
            queue.clone(),
            stats.clone(),
            exited.clone(),
        ));
    }
    if let Some(stderr) = child.stderr.take() {
        readers.spawn(read_pipe(
            stderr,
            OutputStream::Stderr,
            queue.clone(),
            stats.clone(),
            exited.clone(),
        ));
    }
    // Only the readers may hold senders: the uploader drains once both are done.
    drop(queue);

    // The start is reported while the command runs. A command that ends before its start is
    // answered, having printed nothing, has its finish queued right behind the start: a
    // batching reporter sends both in one call, and never the finish before the start.
    let mut start_orders = Orders::new(orders.rx.clone());
    let start = start_with_retry(
        &*reporter,
        &run_id,
        attempt,
        pgid,
        child.started,
        &mut start_orders,
    );
    tokio::pin!(start);
    let answered: Option<Result<(), Unreported>> = tokio::select! {
        biased;
        result = &mut start => Some(result),
        _ = child.wait() => None,
    };
    let start_answer = match answered {
        Some(result) => result,
        None => {
            exited.cancel();
            let _ = tokio::time::timeout(EXIT_SETTLE, wait_all(&mut readers)).await;
            signal_group(pgid, Signal::SIGKILL);
            if orders.until_dropped(wait_all(&mut readers)).await.is_none() {
                return AttemptEnd::Unreported(unreported_for(orders.current()));
            }
            let silent =
                stats.bytes(OutputStream::Stdout) == 0 && stats.bytes(OutputStream::Stderr) == 0;
            if silent {
                let finish = finish_for_exit(child.wait().await);
                let ended = child.ended_at();
                let (started, end) = tokio::join!(
                    start,
                    report_finish(
                        &*reporter,
                        &stats,
                        &run_id,
                        attempt,
                        finish,
                        ended,
                        &mut orders
                    )
                );
                return match started {
                    // Refused: so was the finish, as it came after.
                    Err(why) => AttemptEnd::Unreported(why),
                    Ok(()) => end,
                };
            }
            // Output goes up only once the start is confirmed: go the usual way.
            start.await
        }
    };
    if let Err(why) = start_answer {
        kill_run(&mut child, pgid).await;
        let _ = child.wait().await;
        return AttemptEnd::Unreported(why);
    }

    let abort_upload = CancellationToken::new();
    let mut uploader = AbortOnDropHandle::new(tokio::spawn(upload(
        rx,
        reporter.clone(),
        run_id.clone(),
        attempt,
        abort_upload.clone(),
    )));
    let mut upload_end: Option<UploadEnd> = None;

    let timeout_at = assignment
        .timeout_ms
        .map(|ms| started + Duration::from_millis(ms));
    let stall = assignment.stall_timeout_ms.map(Duration::from_millis);

    let ending = loop {
        match orders.current() {
            Directive::Run => {}
            Directive::Cancel => break Ending::Cancel,
            Directive::Shutdown => break Ending::Shutdown,
            Directive::Abandon => break Ending::Abandon,
        }
        let stall_at = stall.map(|s| last_progress(&stats, started) + s);
        tokio::select! {
            status = child.wait() => break Ending::Exited(status),
            _ = sleep_until_maybe(timeout_at) => {
                break Ending::TimedOut(Duration::from_millis(assignment.timeout_ms.unwrap_or(0)));
            }
            _ = sleep_until_maybe(stall_at) => {
                // Output may have come in since the deadline was computed: look again.
                if let Some(s) = stall {
                    if last_progress(&stats, started) + s <= Instant::now() {
                        break Ending::Stalled(s);
                    }
                }
            }
            _ = orders.changed() => {}
            end = &mut uploader, if upload_end.is_none() => {
                match end.unwrap_or(UploadEnd::Aborted) {
                    // Both pipes closed while the command runs on: fine, keep waiting.
                    UploadEnd::Drained => upload_end = Some(UploadEnd::Drained),
                    other => break Ending::Upload(other),
                }
            }
        }
    };

    let finish = match ending {
        Ending::Abandon => {
            return stop_unreported(&mut child, pgid, Unreported::NotOwned, &abort_upload).await
        }
        Ending::Upload(UploadEnd::Stale) => {
            return stop_unreported(&mut child, pgid, Unreported::Stale, &abort_upload).await
        }
        Ending::Upload(UploadEnd::Stop) => {
            return stop_unreported(&mut child, pgid, Unreported::OutputLimit, &abort_upload).await
        }
        Ending::Upload(UploadEnd::Drained | UploadEnd::Aborted) => {
            // The uploader only aborts when told to, and we have not told it.
            return stop_unreported(&mut child, pgid, Unreported::Stale, &abort_upload).await;
        }
        Ending::Shutdown => {
            terminate(&mut child, pgid, options.kill_grace, &mut orders).await;
            abort_upload.cancel();
            return AttemptEnd::Unreported(Unreported::Shutdown);
        }
        Ending::Cancel => {
            tracing::info!(run_id, attempt, "cancelling");
            terminate(&mut child, pgid, options.kill_grace, &mut orders).await;
            Finish {
                status: RunStatus::Cancelled,
                error_code: Some(ErrorCode::Cancelled),
                exit_code: None,
                error_message: Some("cancelled on request".into()),
            }
        }
        Ending::TimedOut(limit) => {
            tracing::info!(run_id, attempt, ?limit, "timed out");
            terminate(&mut child, pgid, options.kill_grace, &mut orders).await;
            Finish {
                status: RunStatus::TimedOut,
                error_code: Some(ErrorCode::Timeout),
                exit_code: None,
                error_message: Some(format!("ran past its timeout of {}", seconds(limit))),
            }
        }
        Ending::Stalled(limit) => {
            tracing::info!(run_id, attempt, ?limit, "stalled");
            terminate(&mut child, pgid, options.kill_grace, &mut orders).await;
            Finish {
                status: RunStatus::TimedOut,
                error_code: Some(ErrorCode::Stalled),
                exit_code: None,
                error_message: Some(format!("printed nothing for {}", seconds(limit))),
            }
        }
        Ending::Exited(status) => finish_for_exit(status),
    };

    // The command is gone. Let its pipes reach their end on their own for a moment, then kill
    // what is left of its group: a stray grandchild holding a pipe must not hang the attempt.
    exited.cancel();
    let _ = tokio::time::timeout(EXIT_SETTLE, wait_all(&mut readers)).await;
    signal_group(pgid, Signal::SIGKILL);
    if orders.until_dropped(wait_all(&mut readers)).await.is_none() {
        abort_upload.cancel();
        return AttemptEnd::Unreported(unreported_for(orders.current()));
    }
    // The readers are done, so the queue is closed: the uploader ends once it is empty.
    let end = match upload_end {
        Some(end) => end,
        None => match orders.until_dropped(&mut uploader).await {
            Some(end) => end.unwrap_or(UploadEnd::Aborted),
            None => {
                abort_upload.cancel();
                return AttemptEnd::Unreported(unreported_for(orders.current()));
            }
        },
    };
    match end {
        UploadEnd::Drained => {}
        UploadEnd::Stale | UploadEnd::Aborted => {
            return AttemptEnd::Unreported(Unreported::Stale);
        }
        UploadEnd::Stop => return AttemptEnd::Unreported(Unreported::OutputLimit),
    }
    if finish.status == RunStatus::Succeeded {
        tracing::debug!(run_id, attempt, "finished");
    } else {
        tracing::info!(run_id, attempt, status = %finish.status, error_code = ?finish.error_code, exit_code = ?finish.exit_code, "finished");
    }
    let ended = child.ended_at();
    report_finish(
        &*reporter,
        &stats,
        &run_id,
        attempt,
        finish,
        ended,
        &mut orders,
    )
    .await
}

async fn spawn(assignment: &Assignment, options: &SupervisorOptions) -> Result<RunProcess, String> {
    let Some((program, args)) = assignment.command.split_first() else {
        return Err("the command is empty".into());
    };
    let env = command_env(&options.pass_env, &assignment.env);
    let shim = options.run_shim && crate::shim::SUPPORTED;
    let launch = if shim {
        let cwd = assignment.cwd.as_deref().map(std::path::Path::new);
        let launch = crate::shim::Launch::new(program, args, &env, cwd)
            .map_err(|err| format!("cannot run `{program}`: {err}"))?;
        Some(launch)
    } else {
        None
    };
    let cwd = assignment.cwd.as_deref().map(std::path::Path::new);
    if let Some(launch) = launch
        .as_ref()
        .filter(|l| options.run_host && RunHost::fits(l, cwd))
    {
        match spawn_hosted(launch, cwd).await {
            Ok(process) => return Ok(process),
            Err(HostSpawnError::Command(err)) => {
                return Err(format!("cannot run `{program}`: {err}"))
            }
            // The worker starts it itself, as without a host.
            Err(HostSpawnError::Host(err)) => {
                tracing::warn!(%err, "the run host cannot start a run; the worker forks it");
            }
        }
    }
    let mut command = Command::new(program);
    if launch.is_none() {
        // Under a shim the arguments and environment travel in `launch`; std's own copies
        // would be built for an exec that never happens.
        command.args(args).env_clear().envs(env);
    }
    command
        // Under a shim, stdin is its lifeline (the command itself gets `/dev/null`).
        .stdin(if shim { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so one signal reaches everything it starts.
        .process_group(0)
        // Under a shim, dropping the child closes the lifeline instead: the shim then takes
        // everything down, not just itself.
        .kill_on_drop(!shim);
    if let Some(cwd) = &assignment.cwd {
        command.current_dir(cwd);
    }
    #[cfg(target_os = "linux")]
    if let Some(launch) = launch {
        // The child starts the command and stays as its shim: see `shim`.
        // SAFETY: the closure runs in the child between fork and exec, after its stdio,
        // process group and directory are set, which is what `split_off` requires.
        unsafe {
            command.pre_exec(move || launch.split_off());
        }
    } else {
        // Without a shim: if this worker dies without cleaning up (SIGKILL, OOM), the command
        // dies with it instead of running on beside the retry the server will start. (It
        // reaches the direct child, which is the group leader.)
        // SAFETY: the closure runs in the child between fork and exec and only makes one
        // async-signal-safe system call.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
    }
    let mut child = command
        .spawn()
        .map_err(|err| format!("cannot run `{program}`: {err}"))?;
    let pid = child
        .id()
        .ok_or_else(|| format!("cannot run `{program}`: it ended before it started"))?;
    Ok(RunProcess {
        pid,
        // `spawn` returns once the exec succeeded (or, under a shim, once the shim is forked).
        started: std::time::Instant::now(),
        ended: None,
        stdout: child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn AsyncRead + Unpin + Send>),
        stderr: child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn AsyncRead + Unpin + Send>),
        lifeline: child.stdin.take().and_then(|s| s.into_owned_fd().ok()),
        waiter: Waiter::Child(child),
    })
}

/// Has the run host start the command under a shim, with pipes made here.
async fn spawn_hosted(
    launch: &crate::shim::Launch,
    cwd: Option<&std::path::Path>,
) -> Result<RunProcess, HostSpawnError> {
    let host = RunHost::shared().map_err(HostSpawnError::Host)?;
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| HostSpawnError::Host(e.into()))
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (life_r, life_w) = pipe()?;
    let reader = |fd| {
        tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
            .map(|r| Box::new(r) as Box<dyn AsyncRead + Unpin + Send>)
            .map_err(HostSpawnError::Host)
    };
    let stdout = reader(out_r)?;
    let stderr = reader(err_r)?;
    let run = host.spawn(launch, cwd, [out_w, err_w, life_r]).await?;
    Ok(RunProcess {
        pid: run.pid,
        started: run.started,
        ended: None,
        stdout: Some(stdout),
        stderr: Some(stderr),
        lifeline: Some(life_w),
        waiter: Waiter::Host {
            exit: Some(run.exit),
            status: None,
        },
    })
}

/// A started command as supervision sees it: its shim (or, without one, the command itself),
/// which leads the run's process group.
struct RunProcess {
    pid: u32,
    /// When the command started: its `started_at`.
    started: std::time::Instant,
    /// When it was seen to end (its shim reaped): its `finished_at`.
    ended: Option<std::time::Instant>,
    stdout: Option<Box<dyn AsyncRead + Unpin + Send>>,
    stderr: Option<Box<dyn AsyncRead + Unpin + Send>>,
    /// The worker's end of a shim's lifeline.
    lifeline: Option<OwnedFd>,
    waiter: Waiter,
}

/// Where its exit status comes from.
enum Waiter {
    /// The worker's own child.
    Child(Child),
    /// The run host's child: its status comes over the host's socket.
    Host {
        exit: Option<
            tokio::sync::oneshot::Receiver<std::io::Result<(ExitStatus, std::time::Instant)>>,
        >,
        status: Option<Result<ExitStatus, String>>,
    },
}

impl RunProcess {
    /// When it was seen to end: its `finished_at` (now, if that is not known).
    fn ended_at(&self) -> std::time::Instant {
        self.ended.unwrap_or_else(std::time::Instant::now)
    }

    /// Waits for it to end; at once, and with the same answer, once it has. Cancel-safe.
    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match &mut self.waiter {
            Waiter::Child(child) => {
                let status = child.wait().await;
                self.ended.get_or_insert_with(std::time::Instant::now);
                status
            }
            Waiter::Host { exit, status } => {
                if let Some(rx) = exit.as_mut() {
                    let got = rx
                        .await
                        .unwrap_or_else(|_| Err(std::io::Error::other("the run host is gone")));
                    *exit = None;
                    let ended = got
                        .as_ref()
                        .map_or_else(|_| std::time::Instant::now(), |g| g.1);
                    self.ended.get_or_insert(ended);
                    *status = Some(got.map(|g| g.0).map_err(|e| e.to_string()));
                }
                match status {
                    Some(Ok(s)) => Ok(*s),
                    Some(Err(e)) => Err(std::io::Error::other(e.clone())),
                    None => Err(std::io::Error::other("the run host is gone")),
                }
            }
        }
    }
}

fn finish_for_exit(status: std::io::Result<ExitStatus>) -> Finish {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(0), _) => Finish {
                status: RunStatus::Succeeded,
                error_code: None,
                exit_code: Some(0),
                error_message: None,
            },
            (Some(code), _) => Finish {
                status: RunStatus::Failed,
                error_code: Some(ErrorCode::ExitNonzero),
                exit_code: Some(code),
                error_message: Some(format!("exited with code {code}")),
            },
            (None, Some(signal)) => Finish {
                status: RunStatus::Failed,
                error_code: Some(ErrorCode::ExitNonzero),
                // The shell's convention, so scripts read it the same way.
                exit_code: Some(128 + signal),
                error_message: Some(format!("killed by {}", signal_name(signal))),
            },
            (None, None) => Finish {
                status: RunStatus::Failed,
                error_code: Some(ErrorCode::ExitNonzero),
                exit_code: None,
                error_message: Some(format!("ended with {status}")),
            },
        },
        Err(err) => Finish {
            status: RunStatus::Failed,
            error_code: Some(ErrorCode::ExitNonzero),
            exit_code: None,
            error_message: Some(format!("lost track of the process: {err}")),
        },
    }
}

/// SIGTERM to the group, then SIGKILL once the grace period is over (or at once if the
/// attempt is abandoned meanwhile). Returns once the command has been reaped.
async fn terminate(child: &mut RunProcess, pgid: u32, grace: Duration, orders: &mut Orders) {
    signal_group(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        if orders.current() == Directive::Abandon {
            break;
        }
        tokio::select! {
            _ = child.wait() => break,
            _ = tokio::time::sleep_until(deadline) => break,
            _ = orders.changed() => {}
        }
    }
    // Whatever of the run survived SIGTERM (or ignored it) goes now.
    kill_run(child, pgid).await;
    let _ = child.wait().await;
}

/// How long a shim gets to kill the run's processes once its lifeline is closed.
const SHIM_SWEEP: Duration = Duration::from_secs(1);

/// Kills every process of the run. Under a shim, closing its lifeline has it kill every
/// descendant, those that left the process group included; then SIGKILL to the group takes
/// whatever is left (everything, without a shim).
async fn kill_run(child: &mut RunProcess, pgid: u32) {
    if crate::shim::cut_lifeline(pgid) {
        let _ = tokio::time::timeout(SHIM_SWEEP, child.wait()).await;
    }
    signal_group(pgid, Signal::SIGKILL);
}

/// SIGKILL the group at once and report nothing more.
async fn stop_unreported(
    child: &mut RunProcess,
    pgid: u32,
    why: Unreported,
    abort_upload: &CancellationToken,
) -> AttemptEnd {
    abort_upload.cancel();
    kill_run(child, pgid).await;
    let _ = child.wait().await;
    AttemptEnd::Unreported(why)
}

async fn start_with_retry(
    reporter: &dyn AttemptReporter,
    run_id: &str,
    attempt: u32,
    pid: u32,
    at: std::time::Instant,
    orders: &mut Orders,
) -> Result<(), Unreported> {
    let deadline = Instant::now() + REPORT_PATIENCE;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let result = match orders
            .until_dropped(reporter.start(run_id, attempt, pid, at))
            .await
        {
            Some(result) => result,
            None => return Err(unreported_for(orders.current())),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(ReportError::Stale) => {
                tracing::info!(run_id, attempt, "start refused: the attempt is not current");
                return Err(Unreported::Stale);
            }
            Err(ReportError::Refused(err)) => {
                tracing::error!(run_id, attempt, %err, "start refused");
                return Err(Unreported::StartNotConfirmed);
            }
            Err(ReportError::Transient(err)) => {
                let delay = backoff.next_delay();
                if Instant::now() + delay > deadline {
                    tracing::error!(run_id, attempt, %err, "cannot report the start; giving up");
                    return Err(Unreported::StartNotConfirmed);
                }
                tracing::warn!(run_id, attempt, %err, "cannot report the start; retrying");
                if orders
                    .until_dropped(tokio::time::sleep(delay))
                    .await
                    .is_none()
                {
                    return Err(unreported_for(orders.current()));
                }
            }
        }
    }
}

/// The end of an attempt whose command never ran (cancelled first, or it could not start),
/// dated now.
async fn report_unstarted(
    reporter: &dyn AttemptReporter,
    stats: &AttemptStats,
    run_id: &str,
    attempt: u32,
    finish: Finish,
    orders: &mut Orders,
) -> AttemptEnd {
    let now = std::time::Instant::now();
    report_finish(reporter, stats, run_id, attempt, finish, now, orders).await
}

async fn report_finish(
    reporter: &dyn AttemptReporter,
    stats: &AttemptStats,
    run_id: &str,
    attempt: u32,
    finish: Finish,
    at: std::time::Instant,
    orders: &mut Orders,
) -> AttemptEnd {
    stats.mark_finishing();
    let deadline = Instant::now() + REPORT_PATIENCE;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match reporter.finish(run_id, attempt, &finish, at).await {
            Ok(()) => return AttemptEnd::Reported(finish),
            Err(ReportError::Stale) => {
                tracing::info!(
                    run_id,
                    attempt,
                    "finish refused: the attempt is not current"
                );
                return AttemptEnd::NotAccepted(finish);
            }
            Err(ReportError::Refused(err)) => {
                tracing::error!(run_id, attempt, %err, "finish refused");
                return AttemptEnd::NotAccepted(finish);
            }
            Err(ReportError::Transient(err)) => {
                let delay = backoff.next_delay();
                if Instant::now() + delay > deadline {
                    tracing::error!(run_id, attempt, %err, "cannot report the finish; giving up");
                    return AttemptEnd::NotAccepted(finish);
                }
                tracing::warn!(run_id, attempt, %err, "cannot report the finish; retrying");
                // A worker shutting down does not wait out a server that is away.
                if orders
                    .until_dropped(tokio::time::sleep(delay))
                    .await
                    .is_none()
                {
                    return AttemptEnd::NotAccepted(finish);
                }
            }
        }
    }
}

/// When the command last showed progress: its last output, else its start.
fn last_progress(stats: &AttemptStats, started: Instant) -> Instant {
    match stats.last_output() {
        Some(t) => Instant::from_std(t).max(started),
        None => started,
    }
}

async fn wait_all(readers: &mut JoinSet<()>) {
    while readers.join_next().await.is_some() {}
}

async fn sleep_until_maybe(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn unreported_for(directive: Directive) -> Unreported {
    match directive {
        Directive::Abandon => Unreported::NotOwned,
        _ => Unreported::Shutdown,
    }
}

fn seconds(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

/// The worker's orders to this attempt, watched while it runs.
struct Orders {
    rx: watch::Receiver<Directive>,
    /// The worker dropped its side: no more orders will come.
    closed: bool,
}

impl Orders {
    fn new(rx: watch::Receiver<Directive>) -> Orders {
        Orders { rx, closed: false }
    }

    fn current(&self) -> Directive {
        *self.rx.borrow()
    }

    /// Resolves when the order changes; never, once the worker's side is gone.
    async fn changed(&mut self) {
        if self.closed || self.rx.changed().await.is_err() {
            self.closed = true;
            std::future::pending::<()>().await;
        }
    }

    /// Runs `fut` unless the worker drops the attempt (shutdown or abandon) first.
    async fn until_dropped<F: std::future::Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            if self.current() >= Directive::Shutdown {
                return None;
            }
            tokio::select! {
                out = &mut fut => return Some(out),
                _ = self.changed() => {}
            }
        }
    }
}
