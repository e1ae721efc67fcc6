//! Signals across servers: each commit that earns signals sends them with `pg_notify` inside its
//! transaction (PostgreSQL delivers a NOTIFY only when, and only if, the transaction commits),
//! and every store holds one `LISTEN` connection that rebroadcasts what other servers sent into
//! its local channel.
//!
//! One notification per transaction, compact JSON: `{"s": schema, "o": origin, "all": [...]}`
//! with one entry per signal: `{"k": "p", "lane"}` for a run pending, `{"k": "e", "run",
//! "seq"}` for new events, `{"k": "f", "lane", "w"}` for room freed, `{"k": "c", "run", "a",
//! "w"}` for a cancel asked, `{"k": "h", "w"}` for a worker's heartbeat. A run's creation event is left out (see `wanted_elsewhere`). The channel is shared by
//! the whole database, so `s` keeps stores in other schemas apart, and `o` (one per store
//! instance) lets a store skip its own notifications: it already broadcast them right after its
//! commit, without a round trip.
//!
//! Peers: a notification is only worth sending when another server listens on the same schema,
//! so each store notifies only while it knows of one ([`Peers`]). A store announces itself with
//! `{"k": "hi"}` once its `LISTEN` is active (at start and after every reconnect), and every
//! [`ANNOUNCE_EVERY`] with `{"k": "here"}`; every store that hears a `hi` answers `here`. Any
//! notification from another server of the schema counts as hearing from it, and a peer heard
//! within [`PEER_TTL`] is present. A store also notifies throughout its first
//! [`STARTUP_GRACE`], before any answer can have come. When a store learns of a peer it had
//! not heard from, it catches up (below), as the peer may have committed unannounced while it
//! believed itself alone. What a lost or unsent notification delays, the receivers' own
//! re-reads still find (a claim re-checks every second, a follower on each heartbeat).
//!
//! Reconnects: notifications sent while the listening connection is down are lost. After any
//! gap (a lost connection, a failed reconnect, a payload too big to send) the listener, once
//! `LISTEN` is active again, re-reads the store and broadcasts a `RunPending` for every lane with
//! pending runs, a `RunEvents` at the latest seq for every run that is not terminal or ended
//! recently, a `RoomFreed` for every live worker (with an empty lane: which lane freed room is
//! not known, and each worker's claim wakes on its own id) and a `CancelRequested` for every
//! in-flight run with a cancel asked (each up to the channel's capacity; past it, slow
//! receivers see `Lagged`, which they treat the same way: re-read). Receivers re-read on any signal, so these duplicates are
//! harmless, and nothing a receiver waits for is missed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::postgres::{PgListener, PgPool};
use sqlx::Row;
use tether_store::Signal;
use tokio::sync::broadcast;

/// The one channel every Tether server on a database listens on.
pub const CHANNEL: &str = "tether_signals";

/// PostgreSQL refuses payloads of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7900;

/// The longest wait between attempts to reconnect the listener.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How often a store says it is here.
pub(crate) const ANNOUNCE_EVERY: Duration = Duration::from_secs(20);
/// How long a peer counts as present after it was last heard: three announcements.
const PEER_TTL: Duration = Duration::from_secs(60);
/// How long a new store notifies whether or not it has heard of a peer yet.
const STARTUP_GRACE: Duration = Duration::from_secs(5);

/// Whether other servers listen on this store's schema, as far as this store has heard.
#[derive(Debug)]
pub(crate) struct Peers {
    started: Instant,
    /// The start-up grace was ended early (tests).
    grace_over: std::sync::atomic::AtomicBool,
    /// Milliseconds from `started` to the last time a peer was heard, plus one; 0: never.
    last_heard: AtomicU64,
}

impl Peers {
    pub(crate) fn new() -> Peers {
        Peers {
            started: Instant::now(),
            grace_over: std::sync::atomic::AtomicBool::new(false),
            last_heard: AtomicU64::new(0),
        }
    }

    /// Ends the start-up grace now: from here on the store notifies only peers it heard.
    pub(crate) fn end_grace(&self) {
        self.grace_over.store(true, Ordering::Release);
    }

    /// Whether this store's commits should notify: a peer may be listening.
    pub(crate) fn present(&self) -> bool {
        let in_grace =
            self.started.elapsed() < STARTUP_GRACE && !self.grace_over.load(Ordering::Acquire);
        in_grace || self.heard_lately()
    }

    /// Whether a peer was heard within [`PEER_TTL`].
    fn heard_lately(&self) -> bool {
        match self.last_heard.load(Ordering::Acquire) {
            0 => false,
            heard => {
                self.started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(heard - 1))
                    < PEER_TTL
            }
        }
    }

    /// A peer was heard now. Whether it was not present before (a peer this store must catch
    /// up with).
    fn heard(&self) -> bool {
        let new = !self.heard_lately();
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last_heard.store(now_ms + 1, Ordering::Release);
        new
    }
}

/// A store's announcement: `hi` asks every peer to answer with `here`.
pub(crate) fn announcement(schema: &str, origin: &str, hello: bool) -> String {
    let kind = if hello { "hi" } else { "here" };
    json!({ "s": schema, "o": origin, "k": kind }).to_string()
}

/// Sends an announcement on `conn`.
pub(crate) async fn announce<'c, E>(
    conn: E,
    schema: &str,
    origin: &str,
    hello: bool,
) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(announcement(schema, origin, hello))
        .execute(conn)
        .await
        .map(|_| ())
}

/// Whether another server may need `signal`. A run's first event (its creation) is not sent:
/// no one can follow a run before the commit that made it hands out its id, and a follower
/// replays stored events before it listens.
pub(crate) fn wanted_elsewhere(signal: &Signal) -> bool {
    !matches!(signal, Signal::RunEvents { seq: 1, .. })
}

/// One signal inside a payload.
fn entry(signal: &Signal) -> serde_json::Value {
    match signal {
        Signal::RunPending { lane } => json!({ "k": "p", "lane": lane }),
        Signal::RunEvents { run_id, seq } => json!({ "k": "e", "run": run_id, "seq": seq }),
        Signal::RoomFreed { lane, worker_id } => json!({ "k": "f", "lane": lane, "w": worker_id }),
        Signal::CancelRequested {
            run_id,
            attempt,
            worker_id,
        } => json!({ "k": "c", "run": run_id, "a": attempt, "w": worker_id }),
        Signal::WorkerBeat { worker_id } => json!({ "k": "h", "w": worker_id }),
    }
}

/// The one notification payload for a transaction's `signals`, or a bare wake-up when it
/// would be too big to send.
pub(crate) fn encode(schema: &str, origin: &str, signals: &[Signal]) -> String {
    let all: Vec<_> = signals.iter().map(entry).collect();
    let text = json!({ "s": schema, "o": origin, "all": all }).to_string();
    if text.len() <= MAX_PAYLOAD {
        text
    } else {
        json!({ "s": schema, "o": origin, "k": "w" }).to_string()
    }
}

/// What a notification asks of this store.
#[derive(Debug, PartialEq)]
enum Decoded {
    /// Not for this store (another schema, or this store's own).
    Ignore,
    Signals(Vec<Signal>),
    /// Something changed that the payload could not name: re-read.
    CatchUp,
    /// A peer announced itself; `hello`: it asks to be answered.
    Peer {
        hello: bool,
    },
}

fn decode(schema: &str, origin: &str, payload: &str) -> Decoded {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(payload) else {
        return Decoded::Ignore;
    };
    if value["s"].as_str() != Some(schema) || value["o"].as_str() == Some(origin) {
        return Decoded::Ignore;
    }
    match value["k"].as_str() {
        Some("hi") => return Decoded::Peer { hello: true },
        Some("here") => return Decoded::Peer { hello: false },
        _ => {}
    }
    let entries = match value["all"].as_array() {
        Some(all) => all.iter().map(decode_entry).collect(),
        // One signal per payload, as an older server sends it.
        None => decode_entry(&value).map(|signal| vec![signal]),
    };
    match entries {
        Some(signals) => Decoded::Signals(signals),
        None => Decoded::CatchUp,
    }
}

fn decode_entry(value: &serde_json::Value) -> Option<Signal> {
    let text = |key: &str| value[key].as_str().map(str::to_string);
    Some(match value["k"].as_str()? {
        "p" => Signal::RunPending {
            lane: text("lane")?,
        },
        "e" => Signal::RunEvents {
            run_id: text("run")?,
            seq: value["seq"].as_i64()?,
        },
        "f" => Signal::RoomFreed {
            lane: text("lane")?,
            worker_id: text("w")?,
        },
        "c" => Signal::CancelRequested {
            run_id: text("run")?,
            attempt: u32::try_from(value["a"].as_u64()?).ok()?,
            worker_id: text("w")?,
        },
        "h" => Signal::WorkerBeat {
            worker_id: text("w")?,
        },
        _ => return None,
    })
}

/// The listener task of one store. `pool` is its own (one connection, `search_path` set), so
/// listening never takes a connection from the store's requests.
pub(crate) struct Listener {
    pub pool: PgPool,
    pub schema: String,
    pub origin: String,
    pub signals: broadcast::Sender<Signal>,
    pub peers: Arc<Peers>,
}

impl Listener {
    /// Runs until the store is dropped (the task is aborted) or its pool is closed. Survives the
    /// database going away and coming back.
    pub async fn run(self, first: PgListener) {
        let mut listener = Some(first);
        let mut backoff = Duration::from_millis(100);
        // When the stream was last known to be whole; a gap since then is caught up.
        let mut whole_since = Instant::now();
        // Only the first connection has no gap behind it: every later one catches up.
        let mut gap = false;
        loop {
            let mut current = match listener.take() {
                Some(l) => l,
                None => match self.connect().await {
                    Ok(l) => l,
                    Err(e) => {
                        if matches!(e, sqlx::Error::PoolClosed) {
                            return;
                        }
                        tracing::warn!(error = %e, "signal listener: reconnect failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                },
            };
            if gap {
                match self.catch_up(&mut current, whole_since).await {
                    Ok(()) => {
                        tracing::info!("signal listener: reconnected and caught up");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "signal listener: catch-up failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
            backoff = Duration::from_millis(100);
            // Listening now: peers that hear this answer, and know to notify this store.
            if let Err(e) = announce(&mut current, &self.schema, &self.origin, true).await {
                tracing::warn!(error = %e, "signal listener: cannot announce this server");
            }
            loop {
                match current.try_recv().await {
                    Ok(Some(notification)) => {
                        whole_since = Instant::now();
                        let decoded = decode(&self.schema, &self.origin, notification.payload());
                        if decoded != Decoded::Ignore && self.peers.heard() {
                            // A peer this store had not heard from: it may have committed
                            // unannounced while it believed itself alone.
                            if let Err(e) = self.catch_up(&mut current, whole_since).await {
                                tracing::warn!(error = %e, "signal listener: catch-up failed");
                                gap = true;
                                break;
                            }
                        }
                        match decoded {
                            Decoded::Ignore => {}
                            Decoded::Peer { hello } => {
                                if hello {
                                    let answered =
                                        announce(&mut current, &self.schema, &self.origin, false)
                                            .await;
                                    if let Err(e) = answered {
                                        tracing::warn!(error = %e,
                                            "signal listener: cannot answer a new server");
                                    }
                                }
                            }
                            Decoded::Signals(signals) => {
                                for signal in signals {
                                    // No receivers is fine: nobody is waiting.
                                    let _ = self.signals.send(signal);
                                }
                            }
                            Decoded::CatchUp => {
                                if let Err(e) = self.catch_up(&mut current, whole_since).await {
                                    tracing::warn!(error = %e, "signal listener: catch-up failed");
                                    gap = true;
                                    break;
                                }
                            }
                        }
                    }
                    // The connection was lost (and re-established, LISTEN included): whatever
                    // was sent in between is gone, so catch up.
                    Ok(None) => {
                        if let Err(e) = self.catch_up(&mut current, whole_since).await {
                            tracing::warn!(error = %e, "signal listener: catch-up failed");
                            gap = true;
                            break;
                        }
                        whole_since = Instant::now();
                    }
                    Err(sqlx::Error::PoolClosed) => return,
                    Err(e) => {
                        // Drop this listener and build a new one: a fresh connection, LISTEN,
                        // then catch up.
                        tracing::warn!(error = %e, "signal listener: connection failed");
                        gap = true;
                        break;
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<PgListener, sqlx::Error> {
        connect(&self.pool).await
    }

    /// Broadcasts wake-ups for everything a lost notification could have been about.
    async fn catch_up(
        &self,
        listener: &mut PgListener,
        whole_since: Instant,
    ) -> Result<(), sqlx::Error> {
        // Runs that ended during the gap (plus a margin for clock and commit delays).
        let gap_ms = i64::try_from(whole_since.elapsed().as_millis()).unwrap_or(i64::MAX);
        let window_ms = gap_ms.saturating_add(60_000);
        let lanes = sqlx::query(
            "SELECT DISTINCT lane FROM runs WHERE status IN ('pending', 'queued') LIMIT $1",
        )
        .bind(tether_store::SIGNAL_CAPACITY as i64)
        .fetch_all(&mut *listener)
        .await?;
        let runs = sqlx::query(
            "SELECT id, last_event_seq FROM runs \
             WHERE status IN ('pending', 'queued', 'claimed', 'running') \
                OR finished_at >= tether_now_ms() - $1 \
             ORDER BY seq DESC LIMIT $2",
        )
        .bind(window_ms)
        .bind(tether_store::SIGNAL_CAPACITY as i64)
        .fetch_all(&mut *listener)
        .await?;
        for row in &runs {
            let _ = self.signals.send(Signal::RunEvents {
                run_id: row.try_get("id")?,
                seq: row.try_get("last_event_seq")?,
            });
        }
        // A claim long-poll waits for a worker's own room or a capped lane's: a `RoomFreed`
        // naming each live worker wakes every claim, whichever lane freed room. The lane is
        // unknown here and left empty (no lane has that name).
        let workers = sqlx::query(
            "SELECT id FROM workers WHERE deregistered_at IS NULL \
             ORDER BY last_heartbeat_at DESC LIMIT $1",
        )
        .bind(tether_store::SIGNAL_CAPACITY as i64)
        .fetch_all(&mut *listener)
        .await?;
        // A cancel asked during the gap: its holder's control long-poll is waiting for it.
        // Served by the `runs_in_flight_cancel` partial index.
        let cancels = sqlx::query(
            "SELECT id, attempt, worker_id FROM runs \
             WHERE status IN ('claimed', 'running') AND cancel_requested_at IS NOT NULL \
               AND worker_id IS NOT NULL \
             LIMIT $1",
        )
        .bind(tether_store::SIGNAL_CAPACITY as i64)
        .fetch_all(&mut *listener)
        .await?;
        for row in &lanes {
            let _ = self.signals.send(Signal::RunPending {
                lane: row.try_get("lane")?,
            });
        }
        for row in &workers {
            let _ = self.signals.send(Signal::RoomFreed {
                lane: String::new(),
                worker_id: row.try_get("id")?,
            });
        }
        for row in &cancels {
            let Ok(attempt) = u32::try_from(row.try_get::<i64, _>("attempt")?) else {
                continue;
            };
            let _ = self.signals.send(Signal::CancelRequested {
                run_id: row.try_get("id")?,
                attempt,
                worker_id: row.try_get("worker_id")?,
            });
        }
        Ok(())
    }
}

/// A listener on [`CHANNEL`] over a connection from `pool`.
pub(crate) async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_present_once_heard_and_a_new_store_notifies_at_first() {
        let peers = Peers::new();
        assert!(peers.present(), "during the start-up grace");
        peers.end_grace();
        assert!(!peers.present(), "alone: nothing to notify");
        assert!(peers.heard(), "a peer not heard before");
        assert!(peers.present());
        assert!(!peers.heard(), "heard again within the TTL: not new");
        // Heard long ago: gone, and new again when heard.
        let old = Peers {
            started: Instant::now() - PEER_TTL - Duration::from_secs(5),
            grace_over: std::sync::atomic::AtomicBool::new(false),
            last_heard: AtomicU64::new(1),
        };
        assert!(!old.present());
        assert!(old.heard());
        assert!(old.present());
    }

    #[test]
    fn announcements_are_told_apart_from_signals() {
        let hi = announcement("s1", "a", true);
        let here = announcement("s1", "a", false);
        assert_eq!(decode("s1", "b", &hi), Decoded::Peer { hello: true });
        assert_eq!(decode("s1", "b", &here), Decoded::Peer { hello: false });
        assert_eq!(decode("s1", "a", &hi), Decoded::Ignore, "our own");
        assert_eq!(decode("s2", "b", &hi), Decoded::Ignore, "another schema");
    }

    #[test]
    fn payloads_round_trip_and_foreign_ones_are_ignored() {
        let signals = vec![
            Signal::RunEvents {
                run_id: "r1".into(),
                seq: 7,
            },
            Signal::RunPending { lane: "x".into() },
            Signal::RoomFreed {
                lane: "l".into(),
                worker_id: "w".into(),
            },
            Signal::CancelRequested {
                run_id: "r".into(),
                attempt: 3,
                worker_id: "w".into(),
            },
        ];
        let payload = encode("s1", "a", &signals);
        assert_eq!(decode("s1", "b", &payload), Decoded::Signals(signals));
        assert_eq!(decode("s1", "a", &payload), Decoded::Ignore, "our own");
        assert_eq!(
            decode("s2", "b", &payload),
            Decoded::Ignore,
            "another schema"
        );
        let older = r#"{"s":"s1","o":"a","k":"p","lane":"x"}"#;
        assert_eq!(
            decode("s1", "b", older),
            Decoded::Signals(vec![Signal::RunPending { lane: "x".into() }]),
            "one signal per payload, as older servers send"
        );
        let huge = [Signal::RunPending {
            lane: "x".repeat(10_000),
        }];
        let payload = encode("s1", "a", &huge);
        assert!(payload.len() < MAX_PAYLOAD);
        assert_eq!(decode("s1", "b", &payload), Decoded::CatchUp);
        assert!(!wanted_elsewhere(&Signal::RunEvents {
            run_id: "new".into(),
            seq: 1
        }));
    }
}
