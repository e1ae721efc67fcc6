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
//! The shim is not a program of its own: it is a forked process that never execs. Usually
//! it is one of the run host's (`crate::run_host`), kept between runs: it takes each run's
//! lifeline as its stdin and starts the command with `posix_spawn` (which shares memory
//! until the exec, copying nothing) as the leader of a process group of its own. Without a
//! host, the worker's own child between fork and exec (`pre_exec`) is the shim, for one run:
//! it leads the run's group, and exits with the command's status. Exec'ing a shim binary
//! cost 1.2–1.4 ms of CPU per run (loading and relocating 23 MB), and a second `fork` of the
//! worker's copy about 1 ms.
//! Linux only (`/proc`, `prctl`, `pidfd_open`), and glibc's: the shim runs in a forked copy
//! of a multithreaded process, where only async-signal-safe calls are safe in general; it
//! takes no lock another thread may have held (no stdio, no logging, no environment), and
//! the one it does take, the allocator's, glibc's `fork` leaves usable in the child.

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::libc;
use nix::spawn::{posix_spawn, PosixSpawnAttr, PosixSpawnFileActions};
use nix::sys::signal::{kill, signal, SigHandler, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Whether this build can run commands under a shim (see the module's notes).
pub const SUPPORTED: bool = cfg!(all(target_os = "linux", target_env = "gnu"));

/// The worker's ends of its shims' lifelines, by process group. Held apart from the `Child`
/// (tokio closes a child's stdin when it is waited on).
static LIFELINES: Mutex<BTreeMap<u32, OwnedFd>> = Mutex::new(BTreeMap::new());

fn lifelines() -> MutexGuard<'static, BTreeMap<u32, OwnedFd>> {
    crate::lock(&LIFELINES)
}

/// Holds the lifeline of the shim leading group `pgid` until [`cut_lifeline`], or until the
/// returned guard is dropped (a supervision that ends any other way still stops its run).
pub fn hold_lifeline(pgid: u32, lifeline: OwnedFd) -> LifelineGuard {
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

/// Leaves the way the command did (`raw`, its wait status): with its exit code, or killed by
/// its signal.
fn exit_like(raw: i32) -> ! {
    if libc::WIFEXITED(raw) {
        leave(libc::WEXITSTATUS(raw));
    }
    if libc::WIFSIGNALED(raw) {
        let sig = libc::WTERMSIG(raw);
        // SAFETY: restoring the default disposition of one signal in a single-threaded
        // process about to end; no handler is installed.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::kill(libc::getpid(), sig);
        }
        leave(128 + sig);
    }
    leave(1)
}

/// Ends the shim with `code`. `_exit`, not `exit`: the forked copy must not run the worker's
/// exit handlers or flush its buffers.
fn leave(code: i32) -> ! {
    // SAFETY: `_exit` is async-signal-safe and never returns.
    unsafe { libc::_exit(code) }
}

/// A command made ready, in the worker, for its shim to start: the program found and every
/// string converted before the fork, so that the shim's side allocates as little as it can.
#[derive(Debug)]
pub struct Launch {
    pub(crate) path: CString,
    pub(crate) argv: Vec<CString>,
    pub(crate) envp: Vec<CString>,
}

impl Launch {
    /// `program` is searched like `execvp` would search it (the run's `PATH`, else the
    /// worker's; a relative path is taken from `cwd`, where the command runs). The errors read
    /// like exec's.
    pub fn new(
        program: &str,
        args: &[String],
        env: &[(OsString, OsString)],
        cwd: Option<&Path>,
    ) -> std::io::Result<Launch> {
        let path_var = env
            .iter()
            .find(|(name, _)| name == "PATH")
            .map(|(_, value)| value.clone());
        let path = find_program(program, cwd, path_var.as_deref())?;
        let c = |bytes: &[u8]| {
            CString::new(bytes).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a NUL byte in the command",
                )
            })
        };
        let argv = std::iter::once(program)
            .chain(args.iter().map(String::as_str))
            .map(|a| c(a.as_bytes()))
            .collect::<std::io::Result<Vec<_>>>()?;
        let envp = env
            .iter()
            .map(|(name, value)| c(&[name.as_bytes(), b"=", value.as_bytes()].concat()))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Launch {
            path: c(path.as_os_str().as_bytes())?,
            argv,
            envp,
        })
    }

    /// The shim's part of the worker's child, called by `pre_exec` between fork and exec:
    /// starts the command (stdin from `/dev/null`, never the lifeline) and stays behind as its
    /// shim, never returning. An error returned (the command could not start) fails the
    /// worker's spawn with it, as an exec failure would.
    ///
    /// # Safety
    ///
    /// Only between fork and exec of a child whose stdin is the lifeline, which leads the
    /// run's process group and is in the run's directory (std applies `process_group` and
    /// `current_dir` before `pre_exec` closures run).
    pub unsafe fn split_off(&self) -> std::io::Result<()> {
        let command = self.start_command(false)?;
        supervise(command)
    }

    /// Starts the command as a child of this process, made a child subreaper first; with
    /// `own_group`, as the leader of a process group of its own (a shim that outlives its
    /// runs keeps each run's signals to that run), else in the shim's group.
    pub(crate) fn start_command(&self, own_group: bool) -> std::io::Result<Pid> {
        // Before the command starts, so every descendant of it is re-parented here, never to
        // init. Without it detached processes could escape; the lifeline and the group still
        // hold everything else.
        let _ = nix::sys::prctl::set_child_subreaper(true);
        let null = nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        let mut actions = PosixSpawnFileActions::init()?;
        actions.add_dup2(null.as_raw_fd(), 0)?;
        // The command starts with default dispositions and no blocked signal, however its
        // shim came to be (a host or a worker may ignore or block some).
        let mut attr = PosixSpawnAttr::init()?;
        let mut defaults = nix::sys::signal::SigSet::empty();
        for sig in [
            Signal::SIGPIPE,
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
            Signal::SIGCHLD,
        ] {
            defaults.add(sig);
        }
        attr.set_sigdefault(&defaults)?;
        attr.set_sigmask(&nix::sys::signal::SigSet::empty())?;
        let mut flags = nix::spawn::PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF
            | nix::spawn::PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK;
        if own_group {
            attr.set_pgroup(Pid::from_raw(0))?;
            flags |= nix::spawn::PosixSpawnFlags::POSIX_SPAWN_SETPGROUP;
        }
        attr.set_flags(flags)?;
        let command = posix_spawn(
            self.path.as_c_str(),
            &actions,
            &attr,
            &self.argv,
            &self.envp,
        )?;
        drop(null);
        Ok(command)
    }
}

/// Where `program` is, searched like `execvp` does (`path`, else this process's `PATH`, when
/// it has no `/`). A relative result stays relative: the command starts in `cwd`.
fn find_program(
    program: &str,
    cwd: Option<&Path>,
    path: Option<&std::ffi::OsStr>,
) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let in_cwd = |p: &Path| match cwd {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    };
    let runnable = |candidate: &Path| {
        std::fs::metadata(in_cwd(candidate))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    // The OS's own errors, so the reason reads as the kernel would give it ("No such file or
    // directory"), the same as when the worker spawns the command itself.
    let error = |errno: Errno| std::io::Error::from_raw_os_error(errno as i32);
    if program.is_empty() {
        return Err(error(Errno::ENOENT));
    }
    if program.contains('/') {
        let file = PathBuf::from(program);
        return if runnable(&file) {
            Ok(file)
        } else if in_cwd(&file).exists() {
            Err(error(Errno::EACCES))
        } else {
            Err(error(Errno::ENOENT))
        };
    }
    let search = path
        .map(OsString::from)
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&search)
        .map(|dir| {
            if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            }
            .join(program)
        })
        .find(|candidate| runnable(candidate))
        .ok_or_else(|| error(Errno::ENOENT))
}

/// The shim: waits for the command or the lifeline's end, whichever comes first.
pub(crate) fn supervise(command: Pid) -> ! {
    // What the worker held open is not the shim's: its sockets, other runs' lifelines (whose
    // shims must see EOF when the worker dies), and the pipe through which std tells the worker
    // the exec succeeded (held here, it would block the worker's spawn until this shim ends).
    close_from(3);
    ignore_group_signals();
    match watch(command) {
        RunEnd::Exited(raw) => exit_like(raw),
        RunEnd::LifelineCut => leave(128 + Signal::SIGKILL as i32),
    }
}

/// Closes every descriptor from `first` on.
pub(crate) fn close_from(first: u32) {
    // SAFETY: raw system calls on this process's own descriptors.
    let closed = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0_u32) };
    if closed != 0 {
        for fd in first..4096 {
            // SAFETY: as above; closing a descriptor that is not open is harmless.
            unsafe { libc::close(fd as i32) };
        }
    }
}

/// A shim's signal dispositions: the group's SIGTERM, SIGINT and SIGHUP are for the command,
/// the shim stays to clean up after it; the worker's own SIGCHLD handler (its runtime's) is
/// not the shim's.
pub(crate) fn ignore_group_signals() {
    // SAFETY: setting dispositions installs no handler code.
    unsafe {
        for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            let _ = signal(sig, SigHandler::SigIgn);
        }
        let _ = signal(Signal::SIGCHLD, SigHandler::SigDfl);
    }
}

/// A pidfd for `pid` (readable once it ended), or -1 where the kernel has none (before 5.3).
pub(crate) fn pidfd_open(pid: i32) -> i32 {
    // SAFETY: a raw system call; the descriptor it returns is this process's own.
    unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0_u32) as i32 }
}

/// Waits until `fd` is readable or the process behind `pidfd` ended: whether each is. Without
/// a pidfd (-1) it looks again every `fallback` ms, answering `(false, true)` each time, so
/// the caller checks the process itself. `None` on a poll error other than an interruption.
pub(crate) fn wait_either(fd: i32, pidfd: i32, fallback: i32) -> Option<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: pidfd,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let (count, timeout) = if pidfd >= 0 { (2, -1) } else { (1, fallback) };
    // SAFETY: `fds` outlives the call and holds `count` entries.
    if unsafe { libc::poll(fds.as_mut_ptr(), count, timeout) } < 0 {
        return (Errno::last() == Errno::EINTR).then_some((false, false));
    }
    Some((fds[0].revents != 0, pidfd < 0 || fds[1].revents != 0))
}

/// How a run ended, as its shim saw it.
pub(crate) enum RunEnd {
    /// The command ended with this raw wait status; what it left behind is dead.
    Exited(i32),
    /// The lifeline (stdin) ended first: the command and everything it started are dead.
    LifelineCut,
}

/// Waits for `command` or the end of the lifeline on stdin, whichever comes first, then
/// kills every descendant left (a subreaper's: the command's too, however they detached).
pub(crate) fn watch(command: Pid) -> RunEnd {
    let pidfd = pidfd_open(command.as_raw());
    let end = loop {
        // Without a pidfd, look at the command every 20 ms instead.
        let Some((lifeline, ended)) = wait_either(0, pidfd, 20) else {
            break RunEnd::Exited(1 << 8);
        };
        if ended {
            let flags = if pidfd < 0 { libc::WNOHANG } else { 0 };
            let mut raw = 0;
            // SAFETY: a raw system call on our own child.
            let reaped = unsafe { libc::waitpid(command.as_raw(), &mut raw, flags) };
            if reaped == command.as_raw() && (libc::WIFEXITED(raw) || libc::WIFSIGNALED(raw)) {
                // The command is done: what it left running goes with it.
                break RunEnd::Exited(raw);
            }
            if reaped < 0 && Errno::last() != Errno::EINTR {
                break RunEnd::Exited(1 << 8);
            }
        }
        if lifeline && lifeline_ended() {
            break RunEnd::LifelineCut;
        }
    };
    if pidfd >= 0 {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(pidfd) };
    }
    kill_descendants();
    reap_ready();
    end
}

/// Reads what the lifeline has; whether it ended (EOF or an error: the worker is gone or wants
/// the run stopped). Nobody writes to it, but what arrives is read and ignored.
fn lifeline_ended() -> bool {
    let mut buf = [0u8; 64];
    match nix::unistd::read(std::io::stdin(), &mut buf) {
        Ok(0) => true,
        Ok(_) | Err(Errno::EINTR | Errno::EAGAIN) => false,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

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
