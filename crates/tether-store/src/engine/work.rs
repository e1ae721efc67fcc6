//! One write transaction as the engine drives it. The engine judges each run in memory and
//! queues what it decided; the queue goes to the store a statement per kind of write, not a
//! statement per run:
//! - runs are loaded many at a time (`load`), and kept: a run this transaction locked or wrote
//!   is answered from memory, and a write's `RETURNING` row replaces the reload that used to
//!   follow it;
//! - guarded run writes, and the attempt rows that go with them, wait until something must
//!   see them (a read of other rows, a second decision about the same run, the commit); a
//!   claim's reads do not wait for them ([`Work::tx_unsent`]) but take off what they free;
//! - events are numbered here, under the run's lock, from the `last_event_seq` the load read,
//!   and written at commit; the run's `last_event_seq` goes with its write;
//! - what is queued goes out as one [`Flush`] (one statement on PostgreSQL, its `NOTIFY`
//!   included at commit), and a caller that can wait for the commit reads its written runs
//!   from [`Committed`].
//!
//! A queued write whose guard does not hold when it is sent means a run changed under this
//! transaction's lock, which the locks rule out: the whole transaction is then refused
//! (`Unavailable`, nothing written), never half applied.

use std::collections::{HashMap, HashSet};

use crate::driver::{
    AttemptClose, AttemptEnd, Driver, DriverTx, Flush, LoadedRun, Lock, NewAttempt, NewEvent,
    RunChange, RunWrite,
};
use crate::{EventBody, Outbox, RunRecord, StoreError, StoreResult};

/// A queued write's place among those answered: [`Work::written`] gives the run as its write
/// left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ticket(usize);

/// A run as this transaction last saw it.
struct Seen {
    run: LoadedRun,
    /// Read under a row lock, or written (which locks): nobody else can change it before this
    /// transaction ends, so it is answered from memory.
    locked: bool,
    /// The highest event `seq` numbered for the run so far in this transaction.
    last_seq: i64,
    /// A write for it waits in the queue.
    queued: bool,
    /// That write is a start, and `run` shows it as started: the run is answered from memory,
    /// and a finish folds into the start's write instead of sending it first.
    starting: bool,
}

impl Seen {
    /// Whether its queued write must land before the run is read: unless it is a start,
    /// which `run` already shows.
    fn must_land(&self) -> bool {
        self.queued && !self.starting
    }

    /// The run with the events numbered so far.
    fn current(&self) -> LoadedRun {
        let mut run = self.run.clone();
        run.run.last_event_seq = self.last_seq;
        run
    }
}

struct Queued {
    write: RunWrite,
    ticket: Ticket,
}

pub(super) struct Work<T> {
    tx: T,
    /// The signals the transaction earns, sent once it commits.
    pub(super) out: Outbox,
    runs: HashMap<String, Seen>,
    /// Runs looked up under a lock and not found.
    absent: HashSet<String>,
    writes: Vec<Queued>,
    new_attempts: Vec<NewAttempt>,
    started_attempts: Vec<(String, u32, tether_domain::Millis)>,
    closed_attempts: Vec<AttemptClose>,
    events: Vec<NewEvent>,
    written: Vec<Option<LoadedRun>>,
}

impl<T: DriverTx> Work<T> {
    pub(super) async fn begin<D: Driver<Tx = T>>(d: &D) -> StoreResult<Work<T>> {
        Ok(Work {
            tx: d.begin().await?,
            out: Outbox::default(),
            runs: HashMap::new(),
            absent: HashSet::new(),
            writes: Vec::new(),
            new_attempts: Vec::new(),
            started_attempts: Vec::new(),
            closed_attempts: Vec::new(),
            events: Vec::new(),
            written: Vec::new(),
        })
    }

    /// The store's clock, read once when the transaction began.
    pub(super) fn now(&self) -> tether_domain::Millis {
        self.tx.now()
    }

    /// The store's own primitives, for reads and immediate writes, once every queued run
    /// write has landed (so what they read is what this transaction decided).
    pub(super) async fn tx(&mut self) -> StoreResult<&mut T> {
        self.settle().await?;
        Ok(&mut self.tx)
    }

    /// The store's primitives without sending the queued writes first: for reads whose
    /// caller corrects what they say by [`Work::leaving_flight`] (a claim's room and lane
    /// counts), so the writes can go out with the commit instead of a statement of their own.
    pub(super) fn tx_unsent(&mut self) -> &mut T {
        &mut self.tx
    }

    /// Runs that queued, not yet sent, writes take out of flight (a finish, a retry): each
    /// one's id, lane and what it reserves. A read of the store still counts them in flight.
    pub(super) fn leaving_flight(&self) -> Vec<(&str, &str, tether_domain::Resources)> {
        self.writes
            .iter()
            .filter(|q| {
                matches!(
                    q.write.change,
                    RunChange::Finish { .. }
                        | RunChange::Ran { .. }
                        | RunChange::BackToPending
                        | RunChange::Release
                )
            })
            .filter_map(|q| self.runs.get(&q.write.run_id))
            .filter(|seen| seen.run.run.status.is_in_flight())
            .map(|seen| {
                let run = &seen.run.run;
                (run.id.as_str(), run.spec.lane.as_str(), run.spec.resources)
            })
            .collect()
    }

    /// Loads these runs in one statement where they are not already known, locked as `lock`
    /// says. Each is then answered by [`Work::run`].
    pub(super) async fn load(&mut self, run_ids: &[&str], lock: Lock) -> StoreResult<()> {
        if run_ids
            .iter()
            .any(|id| self.runs.get(*id).is_some_and(Seen::must_land))
        {
            self.settle().await?;
        }
        let mut asked = HashSet::with_capacity(run_ids.len());
        let mut wanted: Vec<&str> = Vec::with_capacity(run_ids.len());
        for id in run_ids {
            let known = self.runs.get(*id).is_some_and(|s| s.locked) || self.absent.contains(*id);
            if !known && asked.insert(*id) {
                wanted.push(id);
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let found = self.tx.load_runs(&wanted, lock).await?;
        for run in found {
            self.remember(run, lock != Lock::None);
        }
        if lock == Lock::Wait {
            // Under `Skip` a run left out may only be someone else's for now.
            for id in wanted {
                if !self.runs.contains_key(id) {
                    self.absent.insert(id.to_string());
                }
            }
        }
        Ok(())
    }

    /// A run as this transaction sees it (its events numbered so far included), loading it if
    /// it is not known.
    pub(super) async fn run(&mut self, run_id: &str, lock: Lock) -> StoreResult<Option<LoadedRun>> {
        self.load(&[run_id], lock).await?;
        Ok(self.runs.get(run_id).map(Seen::current))
    }

    /// A run this transaction holds (loaded under a lock, or written), from memory; `None`
    /// when it does not hold it (a run [`Lock::Skip`] left out, say).
    pub(super) async fn locked(&mut self, run_id: &str) -> StoreResult<Option<LoadedRun>> {
        if self.runs.get(run_id).is_some_and(Seen::must_land) {
            self.settle().await?;
        }
        Ok(self
            .runs
            .get(run_id)
            .filter(|s| s.locked)
            .map(Seen::current))
    }

    fn remember(&mut self, run: LoadedRun, locked: bool) {
        let id = run.run.id.clone();
        let stored = run.run.last_event_seq;
        let last_seq = self
            .runs
            .get(&id)
            .map_or(stored, |seen| seen.last_seq.max(stored));
        self.absent.remove(&id);
        self.runs.insert(
            id,
            Seen {
                run,
                locked,
                last_seq,
                queued: false,
                starting: false,
            },
        );
    }

    /// Queues `change`, guarded by the run as `loaded` says it was judged. The end of a run
    /// whose start is queued in this transaction folds into the start's write (one write, the
    /// start's guard, the start's ticket): a worker reports both in one call when the command
    /// ended before its start was sent.
    pub(super) async fn write(
        &mut self,
        loaded: &LoadedRun,
        change: RunChange,
    ) -> StoreResult<Ticket> {
        if let Some(ticket) = self.fold_into_start(&loaded.run.id, &change) {
            return Ok(ticket);
        }
        if self.runs.get(&loaded.run.id).is_some_and(|s| s.queued) {
            // One write per run per statement: the earlier one lands first.
            self.settle().await?;
        }
        let seen = self
            .runs
            .get_mut(&loaded.run.id)
            .ok_or_else(|| StoreError::corrupt("a write for a run this transaction never read"))?;
        seen.queued = true;
        if let RunChange::Start { status, at } = &change {
            // Shown as the start leaves it (as the store's `Start` writes it), so the run's
            // next judgment in this transaction needs no round trip.
            seen.starting = true;
            let now = self.tx.now();
            // Its guard too: a later write that cannot fold goes after the start has landed.
            seen.run.raw_status = status.as_str().to_string();
            let run = &mut seen.run.run;
            run.status = *status;
            run.started_at = Some(*at);
            run.last_heartbeat_at = Some(now);
        }
        let ticket = Ticket(self.written.len());
        self.written.push(None);
        self.writes.push(Queued {
            write: RunWrite {
                run_id: loaded.run.id.clone(),
                status: loaded.raw_status.clone(),
                attempt: loaded.run.attempt,
                change,
                // Set when it is sent: events numbered after this call count too.
                last_event_seq: 0,
            },
            ticket,
        });
        Ok(ticket)
    }

    /// The queued start of `run_id` takes `change` too, when `change` ends the attempt it
    /// started: a finish makes it [`RunChange::Ran`], a retry [`RunChange::BackToPending`].
    fn fold_into_start(&mut self, run_id: &str, change: &RunChange) -> Option<Ticket> {
        if !self.runs.get(run_id).is_some_and(|s| s.starting) {
            return None;
        }
        let queued = self
            .writes
            .iter_mut()
            .rev()
            .find(|q| q.write.run_id == run_id)?;
        let RunChange::Start { at: started_at, .. } = queued.write.change else {
            return None;
        };
        let folded = match change {
            RunChange::Finish {
                status,
                exit_code,
                error_code,
                error_message,
                at,
            } => RunChange::Ran {
                status: *status,
                exit_code: *exit_code,
                error_code: *error_code,
                error_message: error_message.clone(),
                started_at,
                at: *at,
            },
            RunChange::BackToPending => RunChange::BackToPending,
            _ => return None,
        };
        queued.write.change = folded;
        if let Some(seen) = self.runs.get_mut(run_id) {
            seen.starting = false;
        }
        Some(queued.ticket)
    }

    /// A run a read of this transaction locked and answered whole (a claim's page), known
    /// from here on as if loaded under [`Lock::Wait`].
    pub(super) fn adopt(&mut self, run: LoadedRun) {
        if !self.runs.get(&run.run.id).is_some_and(|s| s.locked) {
            self.remember(run, true);
        }
    }

    /// A run inserted by this transaction, known from here on.
    pub(super) fn inserted(&mut self, run: LoadedRun) {
        self.remember(run, true);
    }

    /// Appends an event with the run's next `seq` (the run is locked by this transaction),
    /// and notes it for the signals.
    pub(super) fn push(
        &mut self,
        run_id: &str,
        attempt: u32,
        body: EventBody,
        data: Option<&[u8]>,
    ) -> StoreResult<i64> {
        let seen = self
            .runs
            .get_mut(run_id)
            .ok_or_else(|| StoreError::corrupt("an event for a run this transaction never read"))?;
        seen.last_seq += 1;
        let seq = seen.last_seq;
        self.events.push(NewEvent {
            run_id: run_id.to_string(),
            seq,
            attempt,
            body,
            data: data.map(<[u8]>::to_vec),
        });
        self.out.events_written(run_id, seq);
        Ok(seq)
    }

    pub(super) fn insert_attempt(&mut self, run_id: &str, attempt: u32, worker_id: &str) {
        self.new_attempts.push(NewAttempt {
            run_id: run_id.to_string(),
            attempt,
            worker_id: worker_id.to_string(),
        });
    }

    pub(super) fn stamp_attempt_started(
        &mut self,
        run_id: &str,
        attempt: u32,
        at: tether_domain::Millis,
    ) {
        self.started_attempts
            .push((run_id.to_string(), attempt, at));
    }

    /// Closes the attempt's row; a start stamp queued for it goes with the close (one row is
    /// never written twice in one flush).
    pub(super) fn close_attempt(
        &mut self,
        run_id: &str,
        attempt: u32,
        end: AttemptEnd,
        at: tether_domain::Millis,
    ) {
        let started = self
            .started_attempts
            .iter()
            .position(|(id, n, _)| id == run_id && *n == attempt)
            .map(|i| self.started_attempts.remove(i).2);
        self.closed_attempts.push(AttemptClose {
            run_id: run_id.to_string(),
            attempt,
            end,
            at,
            started,
        });
    }

    /// Sends the queued run writes (with their runs' event seqs) and the attempt rows that go
    /// with them.
    async fn settle(&mut self) -> StoreResult<()> {
        self.flush(false).await
    }

    /// Sends everything queued in one [`Flush`]; at `last` (the commit) the events too, the
    /// seqs of runs that took events without a write, and the signals for the store to carry.
    async fn flush(&mut self, last: bool) -> StoreResult<()> {
        let queued = std::mem::take(&mut self.writes);
        let mut writes = Vec::with_capacity(queued.len());
        let mut tickets = HashMap::with_capacity(queued.len());
        for Queued { mut write, ticket } in queued {
            if let Some(seen) = self.runs.get(&write.run_id) {
                write.last_event_seq = seen.last_seq;
            }
            tickets.insert(write.run_id.clone(), ticket);
            writes.push(write);
        }
        let new_attempts = std::mem::take(&mut self.new_attempts);
        let started_attempts = std::mem::take(&mut self.started_attempts);
        let closed_attempts = std::mem::take(&mut self.closed_attempts);
        let (event_seqs, events, signals) = if last {
            // Runs that took events without a write of their own (a new run's first event,
            // say); a run written here carries its seq in its write.
            let seqs: Vec<(String, i64)> = self
                .runs
                .iter()
                .filter(|(id, seen)| {
                    seen.last_seq > seen.run.run.last_event_seq && !tickets.contains_key(*id)
                })
                .map(|(id, seen)| (id.clone(), seen.last_seq))
                .collect();
            let events = std::mem::take(&mut self.events);
            (seqs, events, self.out.clone().into_signals())
        } else {
            (Vec::new(), Vec::new(), Vec::new())
        };
        let batch = Flush {
            writes: &writes,
            new_attempts: &new_attempts,
            started_attempts: &started_attempts,
            closed_attempts: &closed_attempts,
            event_seqs: &event_seqs,
            events: &events,
            signals: &signals,
        };
        if batch.is_empty() {
            return Ok(());
        }
        let rows = self.tx.flush(batch).await?;
        if rows.len() != writes.len() {
            return Err(StoreError::unavailable(
                "a run changed under this transaction's lock; nothing was written",
            ));
        }
        for row in rows {
            if let Some(Ticket(i)) = tickets.get(&row.run.id) {
                self.written[*i] = Some(row.clone());
            }
            self.remember(row, true);
        }
        Ok(())
    }

    /// The run as the queued write `ticket` left it, once written.
    pub(super) async fn written(&mut self, ticket: Ticket) -> StoreResult<RunRecord> {
        self.settle().await?;
        self.written
            .get(ticket.0)
            .and_then(|row| row.as_ref())
            .map(|row| row.run.clone())
            .ok_or_else(|| StoreError::corrupt("a queued write was never answered"))
    }

    /// Writes everything still queued, the events with it, and commits. Answers the runs as
    /// the queued writes left them, for tickets not yet answered (so a caller that waits for
    /// the commit to read them saves the store a statement).
    pub(super) async fn commit<D: Driver<Tx = T>>(mut self, d: &D) -> StoreResult<Committed> {
        self.flush(true).await?;
        d.commit(self.tx, self.out).await?;
        Ok(Committed(self.written))
    }
}

/// The runs a committed transaction's writes left, by [`Ticket`].
pub(super) struct Committed(Vec<Option<LoadedRun>>);

impl Committed {
    pub(super) fn written(&self, ticket: Ticket) -> StoreResult<RunRecord> {
        self.0
            .get(ticket.0)
            .and_then(|row| row.as_ref())
            .map(|row| row.run.clone())
            .ok_or_else(|| StoreError::corrupt("a queued write was never answered"))
    }
}
