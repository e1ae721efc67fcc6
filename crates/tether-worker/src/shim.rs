//! The per-run supervisor ("shim"): a small process between the worker and each command, so
//! that no process of a run outlives its attempt, whatever the command does.
//!
//! The worker's own signals reach a command's process group, and `PR_SET_PDEATHSIG` reaches
//! only a direct child; neither reaches a grandchild that left the group (`setsid`, a
//! double fork) or one re-parented after its parent died. The shim closes those holes:
//! - it is a child subreaper (`PR_SET_CHILD_SUBREAPER`), so every descendant of the command,
//!   however it detaches, is re-parented to the shim rather than to init, and stays findable
//!   as a descendant in `/proc`;
//! - its stdin is a pipe whose other end only the worker holds (the *lifeline*). When the
//!   worker dies, by SIGKILL included, the kernel closes that end; the shim reads EOF and kills
//!   every descendant. The worker closes it on purpose to stop a run (graceful stop, fenced
//!   `not_owned`) for the same effect;
//! - when the command itself exits, the shim kills what it left behind, then exits with the
//!   command's status (re-raising its signal), so the worker sees the command's own outcome.
//!
//! The shim is the `tether` binary re-executed (`tether __run-shim -- COMMAND…`); a worker
//! embedded in another program runs commands directly, with the process group and
//! `PR_SET_PDEATHSIG` alone. Linux only (`/proc`, `prctl`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, signal, SigHandler, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::process::ChildStdin;

/// The argument that makes `tether` act as a shim.
pub const SHIM_ARG: &str = "__run-shim";

static SHIM_PROGRAM: OnceLock<PathBuf> = OnceLock::new();

/// Runs every command this process's workers start under `program SHIM_ARG -- COMMAND…`.
/// Set once, by the binary that can act as the shim.
pub fn use_shim(program: PathBuf) {
    let _ = SHIM_PROGRAM.set(program);
}

/// The shim program, when one was set.
pub fn shim_program() -> Option<&'static PathBuf> {
    SHIM_PROGRAM.get()
}

/// The worker's ends of its shims' lifelines, by process group. Held apart from the `Child`
/// (tokio closes a child's stdin when it is waited on).
static LIFELINES: Mutex<BTreeMap<u32, ChildStdin>> = Mutex::new(BTreeMap::new());

fn lifelines() -> MutexGuard<'static, BTreeMap<u32, ChildStdin>> {
    LIFELINES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Holds the lifeline of the shim leading group `pgid` until [`cut_lifeline`], or until the
/// returned guard is dropped (a supervision that ends any other way still stops its run).
pub fn hold_lifeline(pgid: u32, lifeline: ChildStdin) -> LifelineGuard {
    lifelines().insert(pgid, lifeline);
    LifelineGuard { pgid }
}

/// Closes the lifeline: the shim kills every process of the run. `false` if there was none.
pub fn cut_lifeline(pgid: u32) -> bool {
    lifelines().remove(&pgid).is_some()
}

/// Cuts its lifeline when dropped.
#[derive(Debug)]
pub struct LifelineGuard {
    pgid: u32,
}

impl Drop for LifelineGuard {
    fn drop(&mut self) {
        cut_lifeline(self.pgid);
    }
}

/// Whether `program` names a file this process could execute, searched like `execvp` does
/// (`path`, else this process's `PATH`, when it has no `/`; a relative path with one is taken
/// from `cwd`, where the command will run). The error reads like exec's.
pub fn check_runnable(
    program: &str,
    cwd: Option<&std::path::Path>,
    path: Option<&str>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |candidate: &std::path::Path| {
        std::fs::metadata(candidate)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    // The OS's own errors, so the reason reads as the kernel would give it ("No such file or
    // directory"), the same as when the worker spawns the command itself.
    let not_found = || std::io::Error::from_raw_os_error(nix::errno::Errno::ENOENT as i32);
    if program.contains('/') {
        let file = match cwd {
            Some(dir) => dir.join(program),
            None => std::path::PathBuf::from(program),
        };
        return if runnable(&file) {
            Ok(())
        } else if file.exists() {
            Err(std::io::Error::from_raw_os_error(
                nix::errno::Errno::EACCES as i32,
            ))
        } else {
            Err(not_found())
        };
    }
    let search = path
        .map(str::to_string)
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    search
        .split(':')
        .map(|dir| std::path::Path::new(if dir.is_empty() { "." } else { dir }).join(program))
        .any(|candidate| runnable(&candidate))
        .then_some(())
        .ok_or_else(not_found)
}

/// Every live (not zombie) process whose parent chain leads to `root`, from `/proc`.
fn live_descendants(root: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut parent_of: Vec<(i32, i32)> = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses: split at the last `)`.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let Some(ppid) = fields.next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if state != "Z" && state != "X" {
            parent_of.push((pid, ppid));
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parent_of
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// Kills every descendant until none is left (a process may fork while we look), reaping
/// what we can on the way.
fn kill_descendants() {
    let me = std::process::id() as i32;
    for _ in 0..200 {
        // A subreaper without a child has no descendant at all (an orphan would have been
        // re-parented to it): the usual case, known without reading all of `/proc`, which
        // costs more than running a short command.
        if !children_remain() {
            return;
        }
        let left = live_descendants(me);
        if left.is_empty() {
            return;
        }
        for pid in left {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        reap_ready();
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reaps every child that has already ended; whether any child (running or stopped) is left.
fn children_remain() -> bool {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return true,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => return false,
            // Unknown: assume there are, and look.
            Err(_) => return true,
        }
    }
}

/// Reaps every child that has already ended.
fn reap_ready() {
    while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

/// Leaves the way the command did: with its exit code, or killed by its signal.
fn exit_like(status: WaitStatus) -> ! {
    match status {
        WaitStatus::Exited(_, code) => std::process::exit(code),
        WaitStatus::Signaled(_, sig, _) => {
            // SAFETY: restoring the default disposition of one signal in a single-threaded
            // moment of a process about to end; no handler is installed.
            unsafe {
                let _ = signal(sig, SigHandler::SigDfl);
            }
            let _ = kill(Pid::from_raw(std::process::id() as i32), sig);
            std::process::exit(128 + sig as i32)
        }
        _ => std::process::exit(1),
    }
}

/// The shim's `main`: runs `command`, and never lets a process of it outlive the run. Never
/// returns.
pub fn run_shim(command: &[OsString]) -> ! {
    let Some((program, args)) = command.split_first() else {
        eprintln!("[tether] the run's command is empty");
        std::process::exit(127);
    };
    // Before the command starts, so nothing it spawns can slip past.
    if let Err(err) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!("[tether] cannot become a subreaper ({err}); detached processes may escape");
    }
    // Same process group as the shim (the worker made the shim its leader), so the worker's
    // SIGTERM reaches the command directly.
    let child = match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(err) => {
            eprintln!("[tether] cannot run `{}`: {err}", program.to_string_lossy());
            std::process::exit(127);
        }
    };
    let child_pid = Pid::from_raw(child.id() as i32);
    // The group's SIGTERM/SIGINT/SIGHUP are for the command: the shim stays to clean up after
    // it. Set only now, so the command did not inherit them ignored.
    // SAFETY: ignoring signals installs no handler code.
    unsafe {
        for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            let _ = signal(sig, SigHandler::SigIgn);
        }
    }
    // The lifeline: EOF (or an error) means the worker is gone or wants the run stopped.
    std::thread::spawn(|| {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        kill_descendants();
        std::process::exit(128 + Signal::SIGKILL as i32);
    });
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(status @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _)))
                if pid == child_pid =>
            {
                // The command is done: what it left running goes with it.
                kill_descendants();
                reap_ready();
                exit_like(status);
            }
            // An orphan re-parented to us, reaped.
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => std::process::exit(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_are_found_through_the_parent_chain() {
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30; wait"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while live_descendants(pid).len() < 2 {
            assert!(std::time::Instant::now() < deadline, "sleeps never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        let me = std::process::id() as i32;
        let mine = live_descendants(me);
        assert!(mine.contains(&pid));
        for p in live_descendants(pid) {
            assert!(mine.contains(&p));
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
