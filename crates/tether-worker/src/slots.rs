//! The worker's slots and its local queue.
//!
//! The server hands a worker runs up to its capacity plus a *reserve*: runs that wait here,
//! claimed, to start the moment a slot frees, so a slot never waits a round trip to the
//! server for its next run. [`Slots`] is where they wait: each attempt takes a
//! [`SlotPermit`] for what it reserves before it spawns, first come first served, and gives it
//! back the moment its command is over, before its finish is even reported.
//!
//! The reserve follows the runs: it is what the slots are expected to free within
//! [`RESERVE_HORIZON`], judged from how long recent runs held their slot. Runs of a few
//! milliseconds get a reserve of many times the capacity (a call to the server carrying
//! hundreds of finishes takes tens of milliseconds, and the slots must not run dry
//! meanwhile); runs of a second or more get none, so a run never waits here long while
//! another worker could have started it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_domain::admission::MAX_RESERVE_FACTOR;
use tether_domain::Resources;
use tokio::sync::oneshot;

/// How long, by the recent runs' pace, a run may expect to wait in the local queue. The
/// queue must outlast two calls to the server (the one in flight, and the next, which brings
/// its refill): on this project's 2-core machine a call carrying a few hundred starts and
/// finishes takes 20–150 ms while the runs keep the cores busy, and a horizon of 50 or 150 ms
/// left slots idle at every slow call (BENCHMARKS.md).
pub const RESERVE_HORIZON: Duration = Duration::from_millis(400);

/// Runs at least this long get no reserve: a round trip is nothing beside them, and a run
/// waiting here could be running on another worker.
const LONG_RUN: Duration = Duration::from_secs(1);

/// A run that has waited this long in the local queue is handed back to the server
/// (`crate::release`): the pace it was taken at no longer holds, and another worker may be
/// idle. Two and a half times [`RESERVE_HORIZON`] (1 s), so a queue sized by the pace never
/// reaches it.
pub const MAX_QUEUE_WAIT: Duration =
    Duration::from_millis(RESERVE_HORIZON.as_millis() as u64 * 5 / 2);

/// An idle worker forgets the pace after this long: the next runs may be nothing like the last.
const IDLE_FORGET: Duration = Duration::from_secs(1);

/// While runs hold slots, none freeing for this long means the runs are no longer those the
/// pace was learned from. Far above any gap between frees in a busy drain (doubting the pace
/// there starves the local queue of a worker that keeps up), far below a long run.
const STALL: Duration = Duration::from_millis(400);

/// How much each new run's slot time moves the average (an exponential moving average).
const PACE_WEIGHT: f64 = 0.1;

/// What a worker runs at once, and the attempts waiting for room.
#[derive(Debug, Clone)]
pub struct Slots {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    capacity: Resources,
    /// Capacity not held by a permit. Signed, as a permit's needs may exceed what is left.
    free_cpus: f64,
    free_memory_mb: i64,
    waiting: VecDeque<Waiter>,
    /// Average time a permit was held, in seconds; `None` before any run ended.
    pace_s: Option<f64>,
    /// When a permit was last given back.
    last_release: Option<Instant>,
    /// When a slot last freed, or the idle slots last got a run: since then, while any run
    /// holds a slot, none has freed.
    last_progress: Option<Instant>,
    /// Local queue on or off.
    reserve: bool,
}

#[derive(Debug)]
struct Waiter {
    needs: Resources,
    tx: oneshot::Sender<SlotPermit>,
}

/// Room in the slots for one attempt's command, given back when dropped.
#[derive(Debug)]
pub struct SlotPermit {
    slots: Option<Arc<Mutex<Inner>>>,
    needs: Resources,
    since: Instant,
}

impl Slots {
    /// Slots for `capacity`; `reserve` off asks the server for nothing beyond it.
    pub fn new(capacity: Resources, reserve: bool) -> Slots {
        Slots {
            inner: Arc::new(Mutex::new(Inner {
                capacity,
                free_cpus: capacity.cpus,
                free_memory_mb: capacity.memory_mb as i64,
                waiting: VecDeque::new(),
                pace_s: None,
                last_release: None,
                last_progress: None,
                reserve,
            })),
        }
    }

    /// Room for `needs`, once every attempt that asked before it has its own. The place in
    /// line is taken when this is called, not when the future is first polled, so attempts
    /// start in the order they were handed out. Cancel-safe: a permit handed to a waiter
    /// that went away goes back at once.
    pub fn acquire(
        &self,
        needs: Resources,
    ) -> impl std::future::Future<Output = SlotPermit> + Send + 'static {
        let place = match self.try_acquire(needs) {
            Some(permit) => Ok(permit),
            None => {
                let mut inner = crate::lock(&self.inner);
                // Room may have freed since: then the line moves on at once.
                let (tx, rx) = oneshot::channel();
                inner.waiting.push_back(Waiter { needs, tx });
                let slots = self.inner.clone();
                inner.hand_out(&slots);
                Err(rx)
            }
        };
        async move {
            match place {
                Ok(permit) => permit,
                Err(rx) => match rx.await {
                    Ok(permit) => permit,
                    // The slots are gone with the worker: nothing will start.
                    Err(_) => std::future::pending().await,
                },
            }
        }
    }

    /// Room for `needs` now, if nobody waits and it fits.
    pub fn try_acquire(&self, needs: Resources) -> Option<SlotPermit> {
        let mut inner = crate::lock(&self.inner);
        if inner.waiting.is_empty() && inner.fits(&needs) {
            inner.take(&needs);
            return Some(self.permit(needs));
        }
        None
    }

    /// Forgets the recent runs' pace, so the worker asks for no reserve until a run ends:
    /// for when runs waited in the local queue far longer than the pace promised.
    pub fn forget_pace(&self) {
        crate::lock(&self.inner).pace_s = None;
    }

    /// How many attempts wait for room.
    pub fn waiting(&self) -> usize {
        crate::lock(&self.inner).waiting.len()
    }

    /// What the worker asks the server to hand it beyond its capacity now: what its slots
    /// free within [`RESERVE_HORIZON`] at the recent runs' pace, at most
    /// [`MAX_RESERVE_FACTOR`] times the capacity.
    ///
    /// The pace is only believed while runs keep ending at it. While runs hold slots and none
    /// has freed for [`STALL`] (runs much longer than the last ones), the time since bounds
    /// the pace instead; a worker idle for [`IDLE_FORGET`] forgets it. So a burst of long runs
    /// after short ones is not hoarded here, while slots that only wait for the next call's
    /// runs keep their reserve.
    pub fn reserve(&self) -> Resources {
        self.reserve_at(Instant::now())
    }

    fn reserve_at(&self, now: Instant) -> Resources {
        let inner = crate::lock(&self.inner);
        let since = |t: Instant| now.saturating_duration_since(t);
        let pace_s = match (inner.pace_s, inner.last_release, inner.last_progress) {
            (Some(pace_s), Some(_), Some(progress)) if inner.busy() && since(progress) >= STALL => {
                let per_slot = since(progress).as_secs_f64() * inner.capacity.cpus.max(1.0);
                Some(pace_s.max(per_slot))
            }
            (Some(pace_s), Some(last), _) if since(last) < IDLE_FORGET => Some(pace_s),
            _ => None,
        };
        let share = match (inner.reserve, pace_s) {
            (true, Some(pace_s)) if pace_s > 0.0 && pace_s < LONG_RUN.as_secs_f64() => {
                (RESERVE_HORIZON.as_secs_f64() / pace_s).min(f64::from(MAX_RESERVE_FACTOR))
            }
            _ => 0.0,
        };
        Resources {
            cpus: inner.capacity.cpus * share,
            memory_mb: (inner.capacity.memory_mb as f64 * share) as u64,
        }
    }

    fn permit(&self, needs: Resources) -> SlotPermit {
        SlotPermit {
            slots: Some(self.inner.clone()),
            needs,
            since: Instant::now(),
        }
    }
}

impl Inner {
    fn fits(&self, needs: &Resources) -> bool {
        // A run bigger than the whole capacity still runs, alone, rather than never.
        let idle = self.free_cpus >= self.capacity.cpus - 1e-9
            && self.free_memory_mb >= self.capacity.memory_mb as i64;
        idle || (needs.cpus <= self.free_cpus + 1e-9
            && needs.memory_mb as i64 <= self.free_memory_mb)
    }

    /// Whether any run holds a slot.
    fn busy(&self) -> bool {
        self.free_cpus < self.capacity.cpus - 1e-9
            || self.free_memory_mb < self.capacity.memory_mb as i64
    }

    fn take(&mut self, needs: &Resources) {
        if !self.busy() {
            self.last_progress = Some(Instant::now());
        }
        self.free_cpus -= needs.cpus;
        self.free_memory_mb -= needs.memory_mb as i64;
    }

    fn give_back(&mut self, needs: &Resources) {
        self.free_cpus += needs.cpus;
        self.free_memory_mb += needs.memory_mb as i64;
    }

    /// Hands the room left to the waiters at the head of the line, in order.
    fn hand_out(&mut self, slots: &Arc<Mutex<Inner>>) {
        while let Some(head) = self.waiting.front() {
            if head.tx.is_closed() {
                self.waiting.pop_front();
                continue;
            }
            if !self.fits(&head.needs) {
                return;
            }
            let Some(waiter) = self.waiting.pop_front() else {
                return;
            };
            self.take(&waiter.needs);
            let permit = SlotPermit {
                slots: Some(slots.clone()),
                needs: waiter.needs,
                since: Instant::now(),
            };
            if let Err(mut permit) = waiter.tx.send(permit) {
                // Gone meanwhile: its room stays here (and its drop must not lock again).
                permit.slots = None;
                self.give_back(&waiter.needs);
            }
        }
    }
}

impl SlotPermit {
    /// The command is over: its room goes to the next attempt waiting, now.
    pub fn release(mut self) {
        self.give_back();
    }

    fn give_back(&mut self) {
        let Some(slots) = self.slots.take() else {
            return;
        };
        let held_s = self.since.elapsed().as_secs_f64();
        let mut inner = crate::lock(&slots);
        inner.pace_s = Some(match inner.pace_s {
            Some(pace) => pace + PACE_WEIGHT * (held_s - pace),
            None => held_s,
        });
        let now = Instant::now();
        inner.last_release = Some(now);
        inner.last_progress = Some(now);
        inner.give_back(&self.needs);
        inner.hand_out(&slots);
    }
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        self.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run's needs: `cpus`, and a little memory.
    fn cpus(cpus: f64) -> Resources {
        Resources { cpus, memory_mb: 1 }
    }

    /// A worker of `cpus` with memory to spare.
    fn worker(cpus: f64) -> Resources {
        Resources {
            cpus,
            memory_mb: 1 << 20,
        }
    }

    #[tokio::test]
    async fn attempts_wait_their_turn_and_start_the_moment_room_frees() {
        let slots = Slots::new(worker(2.0), true);
        let a = slots.acquire(cpus(1.0)).await;
        let b = slots.acquire(cpus(1.0)).await;
        let third = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire(cpus(1.0)).await }
        });
        let fourth = tokio::spawn({
            let slots = slots.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                slots.acquire(cpus(1.0)).await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(slots.waiting(), 2);
        assert!(!third.is_finished());
        a.release();
        let c = tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .unwrap()
            .unwrap();
        assert!(!fourth.is_finished(), "first come, first served");
        drop(b);
        let d = tokio::time::timeout(Duration::from_secs(5), fourth)
            .await
            .unwrap()
            .unwrap();
        drop((c, d));
        assert_eq!(slots.waiting(), 0);
        // Everything is back: two fit at once again.
        let _e = slots.acquire(cpus(1.0)).await;
        let _f = slots.acquire(cpus(1.0)).await;
    }

    #[tokio::test]
    async fn a_place_in_line_is_taken_when_asked_not_when_first_polled() {
        let slots = Slots::new(worker(1.0), true);
        let a = slots.acquire(cpus(1.0)).await;
        let first = slots.acquire(cpus(1.0));
        let second = slots.acquire(cpus(1.0));
        assert_eq!(slots.waiting(), 2);
        // Polled in the opposite order: the first asked still goes first.
        let second = tokio::spawn(second);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let first = tokio::spawn(first);
        drop(a);
        let b = tokio::time::timeout(Duration::from_secs(5), first)
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!second.is_finished(), "first asked, first served");
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_forgotten_pace_asks_for_no_reserve_until_a_run_ends() {
        let slots = Slots::new(worker(8.0), true);
        {
            let mut inner = crate::lock(&slots.inner);
            inner.pace_s = Some(0.01);
            inner.last_release = Some(Instant::now());
        }
        assert!(slots.reserve().cpus > 0.0);
        slots.forget_pace();
        assert_eq!(slots.reserve().cpus, 0.0);
        // A run ends: the pace is what it took, and the reserve follows it.
        let permit = slots.try_acquire(cpus(1.0)).unwrap();
        permit.release();
        assert!(slots.reserve().cpus > 0.0);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_loses_nothing() {
        let slots = Slots::new(worker(1.0), true);
        let a = slots.acquire(cpus(1.0)).await;
        let gone = tokio::time::timeout(Duration::from_millis(20), slots.acquire(cpus(1.0))).await;
        assert!(gone.is_err());
        drop(a);
        let _b = tokio::time::timeout(Duration::from_secs(5), slots.acquire(cpus(1.0)))
            .await
            .expect("the room of a waiter that left is not lost");
    }

    #[tokio::test]
    async fn a_run_bigger_than_the_capacity_runs_alone() {
        let slots = Slots::new(worker(2.0), true);
        let big = slots.acquire(cpus(4.0)).await;
        let small = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire(cpus(1.0)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!small.is_finished());
        drop(big);
        tokio::time::timeout(Duration::from_secs(5), small)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn the_reserve_follows_the_pace_of_the_runs() {
        let slots = Slots::new(worker(8.0), true);
        // Asked the moment the last slot freed.
        let at = Instant::now();
        assert_eq!(slots.reserve_at(at).cpus, 0.0, "no pace yet, no reserve");
        let set_pace = |s: f64| {
            let mut inner = crate::lock(&slots.inner);
            inner.pace_s = Some(s);
            inner.last_release = Some(at);
            inner.last_progress = Some(at);
        };
        let most = 8.0 * f64::from(MAX_RESERVE_FACTOR);
        set_pace(0.001);
        assert_eq!(
            slots.reserve_at(at).cpus,
            most,
            "very short runs: the most there is"
        );
        set_pace(0.025);
        assert_eq!(slots.reserve_at(at).cpus, 128.0, "400 ms of runs of 25 ms");
        set_pace(0.1);
        assert_eq!(slots.reserve_at(at).cpus, 32.0);
        set_pace(0.5);
        assert_eq!(slots.reserve_at(at).cpus, 6.4);
        set_pace(1.0);
        assert_eq!(slots.reserve_at(at).cpus, 0.0, "runs of a second: none");
        let off = Slots::new(worker(8.0), false);
        crate::lock(&off.inner).pace_s = Some(0.005);
        crate::lock(&off.inner).last_release = Some(at);
        assert_eq!(off.reserve_at(at).cpus, 0.0);
    }

    #[tokio::test]
    async fn a_pace_nobody_keeps_up_is_not_believed() {
        let slots = Slots::new(worker(8.0), true);
        let at = Instant::now();
        let ago = |ms: u64| at.checked_sub(Duration::from_millis(ms));
        {
            let mut inner = crate::lock(&slots.inner);
            inner.pace_s = Some(0.005);
            inner.last_release = ago(100);
            inner.last_progress = ago(100);
        }
        // Idle a moment, waiting for the next call's runs: the reserve stands.
        assert_eq!(
            slots.reserve_at(at).cpus,
            8.0 * f64::from(MAX_RESERVE_FACTOR)
        );
        // Idle for long: forgotten.
        crate::lock(&slots.inner).last_release = ago(1_500);
        assert_eq!(slots.reserve_at(at).cpus, 0.0);
        // Runs hold slots and none has freed for a second: runs are long now.
        crate::lock(&slots.inner).last_release = ago(100);
        let _running = slots.acquire(cpus(1.0)).await;
        crate::lock(&slots.inner).last_progress = ago(1_000);
        assert_eq!(
            slots.reserve_at(at).cpus,
            0.0,
            "a stale pace hoards nothing"
        );
    }
}
