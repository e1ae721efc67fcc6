//! The run host: one small process per worker that keeps the shims every run starts under,
//! so the worker itself never forks.
//!
//! Forking the worker is what a run cost most: a copy of a multithreaded process's page
//! tables, TLB shootdowns on every core it runs on, then copy-on-write faults in the worker
//! for as long as the shim lives (about 60 % of the worker's CPU per `true` run). The host is
//! forked once, on the first spawn, and then does nothing but hand out work: a single thread
//! with a small, quiet working set. Its shims are kept between runs: a shim runs one command
//! at a time and then waits for the next, which saves each run a fork and an exit (about
//! 0.2 ms of CPU, a seventh of a `true` run's cost; see BENCHMARKS.md).
//!
//! The worker talks to the host over a `SOCK_SEQPACKET` socket pair, one message per request or
//! answer, the run's pipes passed with `SCM_RIGHTS`:
//! - worker → host: `spawn` (a request id, the [`Launch`], the run's directory, and three
//!   descriptors: stdout's and stderr's write ends and the lifeline's read end). The host
//!   passes it on to a waiting shim over that shim's own socket (forking one if none waits);
//! - shim → worker, on the host's socket, which the shims share: `spawned` (the id, the
//!   command's pid, which leads the run's process group, and when its exec returned) or
//!   `failed` (the id, an errno); then `exited` (the id, the command's raw wait status, and
//!   when it was seen), once the command ended and everything it left was killed. A shim
//!   sends `exited` after `spawned`, and its stdio is back on `/dev/null` first, so the
//!   worker's pipes have ended;
//! - shim → host: `I` once the run is reported: it waits again;
//! - host → worker: `failed` for a request it could not hand out, and `exited` (the shim's
//!   own status) for the run of a shim that died during it (killed from outside).
//!
//! A run's shim is as it was when forked per run (see `shim`): a child subreaper, the run's
//! lifeline on its stdin, killing every descendant when the command ends or the lifeline
//! does. The command leads a process group of its own, so the worker's signals to that group
//! reach the run and never the shim's next one.
//!
//! When the worker dies, by SIGKILL included, the kernel closes its ends: every running shim
//! reads EOF on its lifeline and kills its run, the host reads EOF on its socket and lets its
//! shims go (a waiting one ends at once, a running one after its run), and exits once they
//! have. When the host dies (the worker watches it with a pidfd: the shims hold its socket
//! open), the worker fails what it was waiting for (`lost track of the process`), and the
//! supervisions that end drop their lifelines, so the shims still kill their runs and end;
//! the next spawn starts a new host.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use tokio::sync::oneshot;

use crate::lock;
use crate::shim::Launch;

/// The largest request: a command whose arguments and environment need more is spawned by
/// the worker itself (the socket's buffer bounds one message).
const MAX_REQUEST: usize = 128 * 1024;
/// Answers are small and fixed: a tag, a request id or pid, a pid or status, and (`spawned`)
/// when the command started, on the monotonic clock.
const ANSWER_LEN: usize = 1 + 8 + 4 + 8;

const SPAWN: u8 = 1;
const SPAWNED: u8 = 1;
const FAILED: u8 = 2;
const EXITED: u8 = 3;

/// A run the host's shim started: the command's pid (the leader of the run's process group),
/// when it started, and its status once it ended.
#[derive(Debug)]
pub struct HostedRun {
    pub pid: u32,
    /// Stamped by the shim as its command's exec returned, so the run's `started_at` is not
    /// pushed back by the hops that carry the answer here.
    pub started: Instant,
    /// Its status, and when its end was seen (the run's `finished_at`, likewise).
    pub exit: oneshot::Receiver<std::io::Result<(ExitStatus, Instant)>>,
}

type SpawnAnswer = Result<HostedRun, HostSpawnError>;

/// Why the host did not start a run.
#[derive(Debug, thiserror::Error)]
pub enum HostSpawnError {
    /// The command could not start (as exec would have failed).
    #[error("{0}")]
    Command(std::io::Error),
    /// The host could not be reached or started: the worker may start the run itself.
    #[error("{0}")]
    Host(std::io::Error),
}

/// The worker's end of a live host.
#[derive(Debug)]
pub struct RunHost {
    socket: OwnedFd,
    host_pid: i32,
    next_id: AtomicU64,
    state: Mutex<Waiting>,
}

#[derive(Debug, Default)]
struct Waiting {
    /// The host is gone: nothing more will be answered.
    closed: bool,
    spawns: HashMap<u64, oneshot::Sender<SpawnAnswer>>,
    /// By request id: a shim runs many commands, one after another.
    exits: HashMap<u64, oneshot::Sender<std::io::Result<(ExitStatus, Instant)>>>,
}

static HOST: Mutex<Option<Arc<RunHost>>> = Mutex::new(None);

fn lost() -> std::io::Error {
    std::io::Error::other("the run host is gone")
}

impl RunHost {
    /// This process's host, started on first use, and again if the last one died.
    pub fn shared() -> std::io::Result<Arc<RunHost>> {
        let mut host = lock(&HOST);
        if let Some(live) = host.as_ref().filter(|h| !lock(&h.state).closed) {
            return Ok(live.clone());
        }
        let started = Arc::new(RunHost::start()?);
        let reader = started.clone();
        std::thread::Builder::new()
            .name("tether-run-host".into())
            .spawn(move || reader.read_answers())?;
        *host = Some(started.clone());
        Ok(started)
    }

    fn start() -> std::io::Result<RunHost> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        // SAFETY: the child only runs `host_main`, which never returns and keeps to what is
        // safe in the forked copy of a multithreaded process (see its notes).
        match unsafe { libc::fork() } {
            -1 => Err(std::io::Error::last_os_error()),
            0 => {
                drop(ours);
                host_main(theirs)
            }
            pid => {
                drop(theirs);
                Ok(RunHost {
                    socket: ours,
                    host_pid: pid,
                    next_id: AtomicU64::new(1),
                    state: Mutex::new(Waiting::default()),
                })
            }
        }
    }

    /// Whether a request for `launch` fits in one message.
    pub fn fits(launch: &Launch, cwd: Option<&Path>) -> bool {
        encoded_len(launch, cwd) <= MAX_REQUEST
    }

    /// Has the host start `launch` under a shim in `cwd`, with these ends as its stdout,
    /// stderr and lifeline (closed here once sent).
    pub async fn spawn(
        &self,
        launch: &Launch,
        cwd: Option<&Path>,
        fds: [OwnedFd; 3],
    ) -> Result<HostedRun, HostSpawnError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut state = lock(&self.state);
            if state.closed {
                return Err(HostSpawnError::Host(lost()));
            }
            state.spawns.insert(id, tx);
        }
        let request = encode(id, launch, cwd);
        let raw = [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()];
        let sent = loop {
            let cmsg = [ControlMessage::ScmRights(&raw)];
            match sendmsg::<()>(
                self.socket.as_raw_fd(),
                &[IoSlice::new(&request)],
                &cmsg,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => break Ok(()),
                Err(Errno::EINTR) => {}
                // The host is behind: let it catch up without holding this thread.
                Err(Errno::EAGAIN) => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
                Err(e) => break Err(std::io::Error::from(e)),
            }
        };
        // The host holds its own copies now (or never will).
        drop(fds);
        if let Err(err) = sent {
            lock(&self.state).spawns.remove(&id);
            return Err(HostSpawnError::Host(err));
        }
        rx.await
            .unwrap_or_else(|_| Err(HostSpawnError::Host(lost())))
    }

    /// The reader thread: routes every answer to whoever waits for it, until the host is gone.
    fn read_answers(&self) {
        // The host's end: its shims share its socket and outlive it by a run, so the socket's
        // end comes too late to tell.
        let pidfd = crate::shim::pidfd_open(self.host_pid);
        let mut buf = [0u8; ANSWER_LEN];
        // Without a pidfd, the host is looked at every second instead.
        while let Some((answered, ended)) =
            crate::shim::wait_either(self.socket.as_raw_fd(), pidfd, 1000)
        {
            if answered {
                let got = {
                    let mut iov = [IoSliceMut::new(&mut buf)];
                    recvmsg::<()>(
                        self.socket.as_raw_fd(),
                        &mut iov,
                        None,
                        MsgFlags::MSG_DONTWAIT,
                    )
                    .map(|m| m.bytes)
                };
                match got {
                    Err(Errno::EINTR | Errno::EAGAIN) => {}
                    Ok(ANSWER_LEN) => self.answer(&buf),
                    // EOF, an error, or a message we cannot read: the host is of no more use.
                    _ => break,
                }
                // What the host said before it ended is read before its end is looked at.
                continue;
            }
            let host_ended = ended
                && (pidfd >= 0 || {
                    // SAFETY: a raw system call on our own child.
                    let reaped = unsafe {
                        libc::waitpid(self.host_pid, std::ptr::null_mut(), libc::WNOHANG)
                    };
                    reaped == self.host_pid
                });
            if host_ended {
                break;
            }
        }
        if pidfd >= 0 {
            // SAFETY: our own descriptor, closed once.
            unsafe { libc::close(pidfd) };
        }
        let mut state = lock(&self.state);
        state.closed = true;
        for (_, tx) in state.spawns.drain() {
            let _ = tx.send(Err(HostSpawnError::Host(lost())));
        }
        for (_, tx) in state.exits.drain() {
            let _ = tx.send(Err(lost()));
        }
        drop(state);
        // Reap it, whether it exited or is about to.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.host_pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.host_pid), None);
    }

    fn answer(&self, buf: &[u8; ANSWER_LEN]) {
        let (tag, a, b, at) = decode_answer(buf);
        let mut state = lock(&self.state);
        match tag {
            SPAWNED => {
                let pid = b as u32;
                let (tx, rx) = oneshot::channel();
                // Registered before the next answer is read, so its `exited` finds it.
                state.exits.insert(a, tx);
                if let Some(waiter) = state.spawns.remove(&a) {
                    let run = HostedRun {
                        pid,
                        started: instant_of(at),
                        exit: rx,
                    };
                    if waiter.send(Ok(run)).is_err() {
                        // Nobody waits for this run any more; its lifeline is closed, so the
                        // shim is ending it. Only its status is left to drop.
                        state.exits.remove(&a);
                    }
                }
            }
            FAILED => {
                if let Some(waiter) = state.spawns.remove(&a) {
                    let _ = waiter.send(Err(HostSpawnError::Command(
                        std::io::Error::from_raw_os_error(b),
                    )));
                }
            }
            EXITED => {
                if let Some(waiter) = state.exits.remove(&a) {
                    let _ = waiter.send(Ok((ExitStatus::from_raw(b), instant_of(at))));
                } else if let Some(waiter) = state.spawns.remove(&a) {
                    // Its shim was killed before the command was known to start: it is not
                    // started again (it may have run).
                    let _ = waiter.send(Err(HostSpawnError::Command(std::io::Error::other(
                        "its shim was killed before the command was known to start",
                    ))));
                }
            }
            _ => {}
        }
    }
}

fn encoded_len(launch: &Launch, cwd: Option<&Path>) -> usize {
    let strings = launch.argv.iter().chain(&launch.envp).chain([&launch.path]);
    1 + 8
        + 8
        + 4
        + cwd.map_or(0, |c| c.as_os_str().len())
        + strings.map(|s| 4 + s.as_bytes().len()).sum::<usize>()
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn encode(id: u64, launch: &Launch, cwd: Option<&Path>) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(launch, cwd));
    out.push(SPAWN);
    out.extend_from_slice(&id.to_le_bytes());
    put(&mut out, launch.path.as_bytes());
    put(&mut out, cwd.map_or(&[][..], |c| c.as_os_str().as_bytes()));
    out.extend_from_slice(&(launch.argv.len() as u32).to_le_bytes());
    for a in &launch.argv {
        put(&mut out, a.as_bytes());
    }
    out.extend_from_slice(&(launch.envp.len() as u32).to_le_bytes());
    for e in &launch.envp {
        put(&mut out, e.as_bytes());
    }
    out
}

/// A spawn request as the host reads it.
struct Request {
    id: u64,
    launch: Launch,
    cwd: Option<CString>,
}

fn decode(msg: &[u8]) -> Option<Request> {
    let mut r = Reader { msg, at: 0 };
    if r.take(1)? != [SPAWN] {
        return None;
    }
    let id = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
    let path = r.string()?;
    let cwd = r.string()?;
    let argv = r.strings()?;
    let envp = r.strings()?;
    (r.at == msg.len()).then_some(())?;
    Some(Request {
        id,
        launch: Launch { path, argv, envp },
        cwd: (!cwd.as_bytes().is_empty()).then_some(cwd),
    })
}

/// Reads a request's fields in order; `None` past its end.
struct Reader<'a> {
    msg: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let part = self.msg.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(part)
    }

    fn count(&mut self) -> Option<usize> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize)
    }

    fn string(&mut self) -> Option<CString> {
        let len = self.count()?;
        CString::new(self.take(len)?).ok()
    }

    fn strings(&mut self) -> Option<Vec<CString>> {
        let count = self.count()?;
        // Each takes at least its length: a count beyond what is left is a bad message.
        (count <= self.msg.len() / 4).then_some(())?;
        (0..count).map(|_| self.string()).collect()
    }
}

fn encode_answer(tag: u8, a: u64, b: i32, at: u64) -> [u8; ANSWER_LEN] {
    let mut out = [0u8; ANSWER_LEN];
    out[0] = tag;
    out[1..9].copy_from_slice(&a.to_le_bytes());
    out[9..13].copy_from_slice(&b.to_le_bytes());
    out[13..21].copy_from_slice(&at.to_le_bytes());
    out
}

fn decode_answer(buf: &[u8; ANSWER_LEN]) -> (u8, u64, i32, u64) {
    let mut a = [0u8; 8];
    a.copy_from_slice(&buf[1..9]);
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[9..13]);
    let mut at = [0u8; 8];
    at.copy_from_slice(&buf[13..21]);
    (
        buf[0],
        u64::from_le_bytes(a),
        i32::from_le_bytes(b),
        u64::from_le_bytes(at),
    )
}

/// The monotonic clock in nanoseconds (`Instant`'s clock on Linux), read with one system
/// call, so a forked shim may read it.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` is async-signal-safe and writes only `ts`.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The `Instant` of a [`monotonic_ns`] reading taken by another process: now, less how long
/// ago the reading was. A reading that cannot be made sense of is taken as now.
fn instant_of(at_ns: u64) -> Instant {
    let now = Instant::now();
    let ago = Duration::from_nanos(monotonic_ns().saturating_sub(at_ns));
    if at_ns == 0 {
        return now;
    }
    now.checked_sub(ago).unwrap_or(now)
}

/// The host's side of the socket, always at this descriptor (in its shims too).
const SOCKET_FD: RawFd = 3;
/// A shim's end of its own socket to the host.
const CONTROL_FD: RawFd = 4;
/// A shim's descriptor of the directory it was started in, to return to after each run.
const HOME_FD: RawFd = 5;
/// The most shims kept waiting for a run; one that comes back beyond it is let go.
const MAX_IDLE_SHIMS: usize = 64;
/// What a shim says on its socket to the host once its run is over and reported.
const IDLE: u8 = b'I';

/// The host: forked from the worker, it never returns. It runs in the copy of a multithreaded
/// process, so it takes no lock another thread may have held (no stdio, no logging, no
/// environment); glibc's `fork` leaves the allocator usable, as for the shim.
fn host_main(socket: OwnedFd) -> ! {
    // SAFETY: raw system calls on this process's own descriptors and signal state, in a
    // process with one thread.
    unsafe {
        // Its own group: a terminal's ^C is for the worker, which stops its runs itself; the
        // host ends when the worker does.
        libc::setpgid(0, 0);
        // What `ps` and `top` call it (its command line stays the worker's).
        libc::prctl(libc::PR_SET_NAME, c"tether-host".as_ptr());
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            libc::signal(sig, libc::SIG_IGN);
        }
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        if socket.as_raw_fd() != SOCKET_FD {
            libc::dup3(socket.as_raw_fd(), SOCKET_FD, libc::O_CLOEXEC);
        }
        std::mem::forget(socket);
        // Nothing of the worker's stdio either: a pipe a parent reads the worker's logs from
        // must end when the worker does, not when its host does.
        null_stdio();
        // Nothing else of the worker's: its sockets, and the lifelines of runs that are not
        // the host's to hold.
        crate::shim::close_from(4);
    }
    let mut worker_gone = false;
    let mut shims: Vec<Shim> = Vec::new();
    let mut msg = vec![0u8; MAX_REQUEST];
    loop {
        if worker_gone && shims.is_empty() {
            // SAFETY: `_exit` is async-signal-safe and never returns.
            unsafe { libc::_exit(0) }
        }
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(2 * shims.len() + 1);
        fds.push(libc::pollfd {
            fd: if worker_gone { -1 } else { SOCKET_FD },
            events: libc::POLLIN,
            revents: 0,
        });
        for shim in &shims {
            fds.push(libc::pollfd {
                fd: shim.pidfd,
                events: libc::POLLIN,
                revents: 0,
            });
            fds.push(libc::pollfd {
                fd: shim.control,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let timeout = if shims.iter().any(|s| s.pidfd < 0) {
            20
        } else {
            -1
        };
        // SAFETY: `fds` outlives the call and holds `fds.len()` entries.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        for (i, shim) in shims.iter_mut().enumerate() {
            if fds[2 + 2 * i].revents != 0 {
                shim.read_idle();
            }
            // Only a shim that may have ended is looked at: one system call per end, not one
            // per shim per request.
            shim.may_have_ended |= shim.pidfd < 0 || fds[1 + 2 * i].revents != 0;
        }
        reap_shims(&mut shims);
        if fds[0].revents != 0 && !worker_gone {
            worker_gone = !serve_request(&mut msg, &mut shims);
            if worker_gone {
                // Waiting shims end at once; busy ones once their run is over (their lifeline
                // ended with the worker).
                for shim in &mut shims {
                    shim.let_go();
                }
            }
        }
        let idle = shims.iter().filter(|s| s.is_idle()).count();
        if idle > MAX_IDLE_SHIMS {
            if let Some(extra) = shims.iter_mut().find(|s| s.is_idle()) {
                extra.let_go();
            }
        }
    }
}

/// Points stdin, stdout and stderr at `/dev/null`.
fn null_stdio() {
    // SAFETY: raw system calls on this process's own descriptors.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
    }
}

/// A shim the host started: it runs one command at a time, and waits for the next.
struct Shim {
    pid: i32,
    /// Readable once it ended (-1 without pidfds: polled instead).
    pidfd: RawFd,
    /// The host's end of the shim's socket (-1 once let go).
    control: RawFd,
    /// The request it runs now.
    running: Option<u64>,
    /// Its pidfd was readable (or it has none): worth a `waitpid`.
    may_have_ended: bool,
}

impl Shim {
    fn is_idle(&self) -> bool {
        self.running.is_none() && self.control >= 0
    }

    /// Reads what the shim said: it is waiting again. An end or an error is left to its exit.
    fn read_idle(&mut self) {
        if self.control < 0 {
            return;
        }
        let mut byte = [0u8; 1];
        // SAFETY: reads into our own buffer from our own descriptor.
        let n = unsafe {
            libc::recv(
                self.control,
                byte.as_mut_ptr().cast(),
                1,
                libc::MSG_DONTWAIT,
            )
        };
        if n == 1 && byte[0] == IDLE {
            self.running = None;
        } else if n == 0 {
            self.let_go();
        }
    }

    /// Closes its socket: waiting, it ends; running, it ends after its run.
    fn let_go(&mut self) {
        if self.control >= 0 {
            // SAFETY: our own descriptor, closed once.
            unsafe { libc::close(self.control) };
            self.control = -1;
        }
    }

    /// Hands it a request (the message as the worker sent it, and the run's three ends).
    fn hand(&mut self, id: u64, msg: &[u8], fds: &[OwnedFd; 3]) -> bool {
        let raw = [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let sent = loop {
            match sendmsg::<()>(
                self.control,
                &[IoSlice::new(msg)],
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => break true,
                Err(Errno::EINTR) => {}
                Err(_) => break false,
            }
        };
        if sent {
            self.running = Some(id);
        } else {
            self.let_go();
        }
        sent
    }
}

/// Reads one request and hands it to a waiting shim (or a new one); `false` once the worker
/// is gone.
fn serve_request(msg: &mut [u8], shims: &mut Vec<Shim>) -> bool {
    let (len, fds) = match receive(SOCKET_FD, msg, MsgFlags::MSG_DONTWAIT) {
        Ok(got) => got,
        Err(Errno::EINTR | Errno::EAGAIN) => return true,
        Err(_) => return false,
    };
    if len == 0 {
        return false;
    }
    let Some(request) = decode(&msg[..len]) else {
        return true;
    };
    let Ok(fds) = <[OwnedFd; 3]>::try_from(fds) else {
        return send_answer(&encode_answer(FAILED, request.id, Errno::EBADF as i32, 0));
    };
    // The shim answers for itself once its command started (or could not), so the host never
    // waits for a spawn and several shims start their commands at once.
    for shim in shims.iter_mut().filter(|s| s.is_idle()) {
        if shim.hand(request.id, &msg[..len], &fds) {
            return true;
        }
    }
    match fork_shim() {
        Ok(mut shim) => {
            let handed = shim.hand(request.id, &msg[..len], &fds);
            shims.push(shim);
            if handed {
                return true;
            }
            send_answer(&encode_answer(FAILED, request.id, Errno::EPIPE as i32, 0))
        }
        Err(errno) => send_answer(&encode_answer(FAILED, request.id, errno as i32, 0)),
    }
}

fn send_answer(answer: &[u8]) -> bool {
    loop {
        match sendmsg::<()>(
            SOCKET_FD,
            &[IoSlice::new(answer)],
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return true,
            Err(Errno::EINTR) => {}
            Err(_) => return false,
        }
    }
}

/// Reaps every shim that ended. One that ended during a run (killed: it reports its runs'
/// ends itself) has that run's end reported here, with its own status.
fn reap_shims(shims: &mut Vec<Shim>) {
    shims.retain_mut(|shim| {
        if !shim.may_have_ended {
            return true;
        }
        shim.may_have_ended = false;
        let mut status = 0;
        // SAFETY: a raw system call on our own child.
        let reaped = unsafe { libc::waitpid(shim.pid, &mut status, libc::WNOHANG) };
        if reaped == 0 || (reaped < 0 && Errno::last() == Errno::EINTR) {
            return true;
        }
        if shim.pidfd >= 0 {
            // SAFETY: our own descriptor, closed once.
            unsafe { libc::close(shim.pidfd) };
        }
        shim.let_go();
        if let (Some(id), true) = (shim.running, reaped == shim.pid) {
            // The worker may be gone; the shim is reaped all the same.
            send_answer(&encode_answer(EXITED, id, status, monotonic_ns()));
        }
        false
    });
}

/// Forks a shim, which waits on its own socket for runs.
fn fork_shim() -> Result<Shim, Errno> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    // SAFETY: the host has one thread; the child only runs `shim_main`, which never returns.
    match unsafe { libc::fork() } {
        -1 => Err(Errno::last()),
        0 => {
            drop(ours);
            shim_main(theirs)
        }
        pid => {
            drop(theirs);
            let pidfd = crate::shim::pidfd_open(pid);
            let control = ours.as_raw_fd();
            std::mem::forget(ours);
            Ok(Shim {
                pid,
                pidfd,
                control,
                running: None,
                may_have_ended: false,
            })
        }
    }
}

/// A shim: runs one command at a time, each as the leader of its own process group with the
/// run's pipes as stdout and stderr and its lifeline as stdin (see `shim`), answers the worker
/// itself (`spawned` or `failed`, then `exited`), puts stdio back on `/dev/null`, and tells
/// the host it waits again. It ends when the host lets it go (its socket ends) or is gone.
/// Kept between runs, it saves each run a fork and an exit.
fn shim_main(control: OwnedFd) -> ! {
    // SAFETY: raw system calls on this process's own descriptors and state; it has one thread.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"tether-shim".as_ptr());
        // Its runs' orphans are re-parented here, never to init.
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        libc::dup3(control.as_raw_fd(), CONTROL_FD, libc::O_CLOEXEC);
        std::mem::forget(control);
        let home = libc::open(
            c".".as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if home >= 0 && home != HOME_FD {
            libc::dup3(home, HOME_FD, libc::O_CLOEXEC);
        }
    }
    // The worker's socket (3), this shim's (4) and its home (5); nothing of other shims.
    crate::shim::close_from(6);
    crate::shim::ignore_group_signals();
    let mut msg = vec![0u8; MAX_REQUEST];
    loop {
        let Some((len, fds)) = next_run(&mut msg) else {
            // SAFETY: `_exit` is async-signal-safe and never returns.
            unsafe { libc::_exit(0) }
        };
        if let Some(request) = decode(&msg[..len]) {
            run_one(&request, fds);
        }
        null_stdio();
        // Back where it started, or done: the next run must not start in this one's directory.
        // SAFETY: raw system calls on our own descriptor.
        if unsafe { libc::fchdir(HOME_FD) } != 0 {
            // SAFETY: as above.
            unsafe { libc::_exit(0) }
        }
        let idle = [IDLE];
        // SAFETY: sends from our own buffer on our own descriptor.
        let told = unsafe { libc::send(CONTROL_FD, idle.as_ptr().cast(), 1, libc::MSG_NOSIGNAL) };
        if told != 1 {
            // SAFETY: as above.
            unsafe { libc::_exit(0) }
        }
    }
}

/// The next request on the shim's socket, with the run's three ends; `None` once the host is
/// gone or lets it go.
fn next_run(msg: &mut [u8]) -> Option<(usize, [OwnedFd; 3])> {
    loop {
        match receive(CONTROL_FD, msg, MsgFlags::empty()) {
            Ok((0, _)) => return None,
            Ok((len, fds)) => {
                if let Ok(fds) = <[OwnedFd; 3]>::try_from(fds) {
                    return Some((len, fds));
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => return None,
        }
    }
}

/// One message from `socket` into `msg`, with the descriptors it carries (close-on-exec).
fn receive(socket: RawFd, msg: &mut [u8], flags: MsgFlags) -> nix::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; 3]);
    let mut iov = [IoSliceMut::new(msg)];
    let m = recvmsg::<()>(
        socket,
        &mut iov,
        Some(&mut space),
        flags | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for c in m.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: descriptors just received are ours alone.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok((m.bytes, fds))
}

/// Runs one request to its end and reports it to the worker.
fn run_one(request: &Request, fds: [OwnedFd; 3]) {
    let [stdout, stderr, lifeline] = &fds;
    // SAFETY: raw system calls on descriptors this process owns.
    let setup = unsafe {
        libc::dup2(lifeline.as_raw_fd(), 0) >= 0
            && libc::dup2(stdout.as_raw_fd(), 1) >= 0
            && libc::dup2(stderr.as_raw_fd(), 2) >= 0
            && request
                .cwd
                .as_ref()
                .is_none_or(|dir| libc::chdir(dir.as_ptr()) == 0)
    };
    let started = if setup {
        request
            .launch
            .start_command(true)
            .map_err(|err| Errno::from_raw(err.raw_os_error().unwrap_or(libc::EIO)))
    } else {
        Err(Errno::last())
    };
    // The copies in 0, 1 and 2 are the ones the run holds.
    drop(fds);
    let command = match started {
        Ok(command) => command,
        Err(errno) => {
            send_answer(&encode_answer(FAILED, request.id, errno as i32, 0));
            return;
        }
    };
    let at = monotonic_ns();
    send_answer(&encode_answer(SPAWNED, request.id, command.as_raw(), at));
    let status = match crate::shim::watch(command) {
        crate::shim::RunEnd::Exited(raw) => raw,
        // As a shim that ends with its run reports it: exit code 137.
        crate::shim::RunEnd::LifelineCut => (128 + libc::SIGKILL) << 8,
    };
    // Stdio back on /dev/null first: the worker reads its pipes to their end.
    null_stdio();
    send_answer(&encode_answer(EXITED, request.id, status, monotonic_ns()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_monotonic_reading_maps_back_to_its_instant() {
        let before = Instant::now();
        let reading = monotonic_ns();
        std::thread::sleep(Duration::from_millis(5));
        let at = instant_of(reading);
        // The same clock as `Instant`: the reading lands where it was taken, not when read.
        assert!(at >= before, "{at:?} before {before:?}");
        assert!(at.elapsed() >= Duration::from_millis(5));
        // Unreadable: taken as now.
        assert!(instant_of(0).elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_request_reads_back_as_written() {
        let env = vec![("A".into(), "1".into())];
        let launch = Launch::new("sh", &["-c".into(), "true".into()], &env, None).unwrap();
        let msg = encode(7, &launch, Some(Path::new("/tmp")));
        assert_eq!(msg.len(), encoded_len(&launch, Some(Path::new("/tmp"))));
        let back = decode(&msg).unwrap();
        assert_eq!(back.id, 7);
        assert_eq!(back.launch.path, launch.path);
        assert_eq!(back.launch.argv, launch.argv);
        assert_eq!(back.launch.envp, launch.envp);
        assert_eq!(back.cwd.as_deref(), Some(c"/tmp"));
        assert!(decode(&msg[..msg.len() - 1]).is_none());
    }
}
