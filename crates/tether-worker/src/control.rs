//! What the worker shares with each attempt it supervises: orders going in (cancel, give up,
//! shut down) and counters coming out (bytes and the time of the last output, for heartbeats).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::reporter::OutputStream;
use crate::slots::SlotPermit;

/// An order to an attempt. Later orders only ever raise it: `Run < Cancel < Shutdown < Abandon`,
/// so a worker shutting down cannot be talked back into a graceful cancel, and an attempt we
/// no longer own is never reported on again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Directive {
    /// Keep going.
    Run,
    /// The server asked to cancel: SIGTERM, SIGKILL after the grace period, finish `cancelled`.
    Cancel,
    /// The worker is stopping: SIGTERM, SIGKILL after the grace period, report nothing (the
    /// server hands the run back when the worker deregisters).
    Shutdown,
    /// Not ours any more: SIGKILL at once, report nothing.
    Abandon,
}

/// The worker's side of an attempt's orders.
#[derive(Debug, Clone)]
pub struct AttemptControl {
    tx: watch::Sender<Directive>,
}

impl AttemptControl {
    /// A control and the receiver the supervisor watches.
    pub fn new() -> (AttemptControl, watch::Receiver<Directive>) {
        let (tx, rx) = watch::channel(Directive::Run);
        (AttemptControl { tx }, rx)
    }

    /// Raises the order to `directive` unless a stronger one was already given.
    pub fn order(&self, directive: Directive) {
        self.tx.send_if_modified(|current| {
            if directive > *current {
                *current = directive;
                true
            } else {
                false
            }
        });
    }

    pub fn cancel(&self) {
        self.order(Directive::Cancel);
    }

    pub fn shut_down(&self) {
        self.order(Directive::Shutdown);
    }

    pub fn abandon(&self) {
        self.order(Directive::Abandon);
    }

    pub fn current(&self) -> Directive {
        *self.tx.borrow()
    }
}

/// Output counters of one attempt, written by its pipe readers and read by the heartbeat.
#[derive(Debug)]
pub struct AttemptStats {
    origin: Instant,
    stdout_bytes: AtomicI64,
    stderr_bytes: AtomicI64,
    /// Milliseconds from `origin` to the last output, plus one; zero: nothing printed yet.
    last_output: AtomicU64,
    /// The command is over and its finish is being reported.
    finishing: AtomicBool,
    /// The attempt's room in the worker's slots, given back the moment its command is over.
    slot: Mutex<Option<SlotPermit>>,
}

impl Default for AttemptStats {
    fn default() -> Self {
        AttemptStats::new()
    }
}

impl AttemptStats {
    pub fn new() -> AttemptStats {
        AttemptStats {
            origin: Instant::now(),
            stdout_bytes: AtomicI64::new(0),
            stderr_bytes: AtomicI64::new(0),
            last_output: AtomicU64::new(0),
            finishing: AtomicBool::new(false),
            slot: Mutex::new(None),
        }
    }

    /// Keeps the attempt's room in the worker's slots until its command is over.
    pub fn hold_slot(&self, permit: SlotPermit) {
        *crate::lock(&self.slot) = Some(permit);
    }

    /// The command is over and its finish is on its way: from here a heartbeat answering
    /// `not_owned` most likely saw the finish land first, which is no news.
    pub fn mark_finishing(&self) {
        self.finishing.store(true, Ordering::Relaxed);
        // Its slot goes to the next run now, not once the finish is answered.
        let permit = crate::lock(&self.slot).take();
        if let Some(permit) = permit {
            permit.release();
        }
    }

    pub fn is_finishing(&self) -> bool {
        self.finishing.load(Ordering::Relaxed)
    }

    /// `n` bytes were just read from `stream`.
    pub fn record(&self, stream: OutputStream, n: usize) {
        let counter = match stream {
            OutputStream::Stdout => &self.stdout_bytes,
            OutputStream::Stderr => &self.stderr_bytes,
        };
        counter.fetch_add(n as i64, Ordering::Relaxed);
        let stamp = self.origin.elapsed().as_millis() as u64 + 1;
        self.last_output.fetch_max(stamp, Ordering::Relaxed);
    }

    pub fn bytes(&self, stream: OutputStream) -> i64 {
        match stream {
            OutputStream::Stdout => self.stdout_bytes.load(Ordering::Relaxed),
            OutputStream::Stderr => self.stderr_bytes.load(Ordering::Relaxed),
        }
    }

    /// When the attempt last printed anything; `None` before its first output.
    pub fn last_output(&self) -> Option<Instant> {
        match self.last_output.load(Ordering::Relaxed) {
            0 => None,
            stamp => Some(self.origin + Duration::from_millis(stamp - 1)),
        }
    }

    /// When these counters started: the stall clock's start before any output.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    pub fn since_last_output(&self) -> Option<Duration> {
        self.last_output().map(|t| t.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_only_rise() {
        let (control, rx) = AttemptControl::new();
        control.shut_down();
        control.cancel();
        assert_eq!(*rx.borrow(), Directive::Shutdown);
        control.abandon();
        assert_eq!(control.current(), Directive::Abandon);
    }

    #[test]
    fn stats_count_bytes_per_stream() {
        let stats = AttemptStats::new();
        assert!(stats.last_output().is_none());
        stats.record(OutputStream::Stdout, 5);
        stats.record(OutputStream::Stderr, 2);
        stats.record(OutputStream::Stdout, 1);
        assert_eq!(stats.bytes(OutputStream::Stdout), 6);
        assert_eq!(stats.bytes(OutputStream::Stderr), 2);
        assert!(stats
            .since_last_output()
            .is_some_and(|d| d < Duration::from_secs(1)));
    }
}
