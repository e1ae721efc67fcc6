//! Tether's shared store: PostgreSQL through sqlx, for many servers on one database.
//!
//! The same promises as the SQLite store (the shared conformance suite holds both to them),
//! kept with PostgreSQL's tools instead of one writer connection:
//! - every transaction reads the database's clock once (`tether_now_ms()`) and stamps with that
//!   value; no process clock is ever used, so skewed servers judge alike;
//! - writers lock the run row (`SELECT … FOR UPDATE`) before judging it, and every status
//!   change is still a conditional write on the status and attempt it was judged on;
//! - claims take pending rows with `FOR UPDATE SKIP LOCKED`, so many servers hand each run to
//!   exactly one worker without waiting on each other, and a worker's capacity check is
//!   serialized on its `workers` row; lane ceilings and admissions on a per-lane advisory lock;
//! - one reaper sweep at a time across servers (`pg_try_advisory_xact_lock`);
//! - signals cross servers by `NOTIFY` (see [`signals`]).
//!
//! The store is a [`tether_store::Driver`] (`driver.rs`: one method per query); its
//! transactions are written once in `tether-store`'s engine.
//!
//! Row locks are always taken in the same order (worker, then lane locks, then runs by `seq`;
//! the reaper and claims never wait on a run row), so these transactions cannot deadlock.

mod driver;
mod endpoints;
mod lanes;
mod rows;
// Bulk history and schema hooks for `tether bench` and tests, never for the server.
#[cfg(feature = "seed")]
mod seed;
pub mod signals;

pub use driver::PgTx;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection, Postgres, Row};
use tether_domain::Millis;
use tether_store::{Outbox, ReapPolicy, Signal, StoreError, StoreResult};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

/// Any database failure: the request may be retried. A value that would not decode is a
/// different matter: the data is not what this code wrote; and a value the database refuses as
/// data (SQLSTATE class 22) is the caller's, which retrying will not mend.
pub(crate) fn db(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StoreError::corrupt(e),
        sqlx::Error::Database(ref d) if d.code().is_some_and(|c| c.starts_with("22")) => {
            StoreError::InvalidInput(d.message().to_string())
        }
        _ => StoreError::unavailable(e),
    }
}

fn encode<T: serde::Serialize>(value: &T, what: &str) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::corrupt_while(what, e))
}

const IN_FLIGHT: &str = "('claimed', 'running')";
const PENDING: &str = "('pending', 'queued')";
/// The first key of the advisory lock one reaper sweep holds (the second: the schema's hash,
/// so stores in other schemas of the same database sweep independently).
pub const REAPER_LOCK: i32 = 0x7465_7472; // "tetr"
/// The first key of a lane's advisory lock (the second: the hash of schema and lane).
const LANE_LOCK: i32 = 0x7465_746c; // "tetl"
/// Connections per store; the listener has one more of its own.
const POOL_SIZE: u32 = 10;
/// How long `ping` waits for the database.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// A pooled connection idle longer than this is pinged before it is handed out.
const PING_IDLE_AFTER: Duration = Duration::from_secs(1);
/// How long a request waits for a connection before the store answers `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// The reaper's selection: in-flight runs past a deadline, oldest first. `$1`: now; `$2`: now
/// less the timeout grace; `$3`: now less the cancel deadline; `$4`: the batch. Each branch is
/// served by a partial index over in-flight rows (`runs_in_flight_stale_at`,
/// `runs_in_flight_timeout_at`, `runs_in_flight_cancel`), so finished runs cost nothing.
pub const REAP_QUERY: &str = "SELECT seq, id FROM ( \
    (SELECT seq, id FROM runs WHERE status IN ('claimed', 'running') AND stale_at < $1 \
        ORDER BY stale_at LIMIT $4) \
    UNION \
    (SELECT seq, id FROM runs WHERE status IN ('claimed', 'running') AND timeout_at < $2 \
        ORDER BY timeout_at LIMIT $4) \
    UNION \
    (SELECT seq, id FROM runs WHERE status IN ('claimed', 'running') \
        AND cancel_requested_at IS NOT NULL AND coalesce(last_heartbeat_at, claimed_at) < $3 \
        ORDER BY coalesce(last_heartbeat_at, claimed_at) LIMIT $4) \
    ) AS due ORDER BY seq LIMIT $4";

/// The shared store. Cheap to clone; the clones share one pool and one listener.
#[derive(Debug, Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    listener_pool: PgPool,
    signals: broadcast::Sender<Signal>,
    /// The schema this store works in (`current_schema()`), named in its notifications.
    schema: Arc<str>,
    /// This store instance, named in its notifications so it can skip its own.
    origin: Arc<str>,
    /// Whether another server listens on this schema: commits notify only then.
    peers: Arc<signals::Peers>,
    listener: JoinHandle<()>,
    announcer: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The listener and the announcer hold no reference to the store; they end with it.
        self.listener.abort();
        self.announcer.abort();
    }
}

/// Is `name` a plain identifier we can quote safely?
fn valid_schema(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

impl PgStore {
    /// Opens the database at a URL like `postgres://user@host/db` (a
    /// `?options=-csearch_path%3D<schema>` parameter is honoured) and applies the embedded
    /// migrations. sqlx's migrator holds a PostgreSQL advisory lock while it runs, so servers
    /// starting at once apply them one after another.
    pub async fn open(url: &str) -> StoreResult<PgStore> {
        Self::connect(url, None).await
    }

    /// Like [`PgStore::open`], in `schema` (lowercase letters, digits, `_`), which is created if
    /// missing; every connection's `search_path` is set to it. Several stores, or test cases,
    /// can share one database this way.
    pub async fn open_in_schema(url: &str, schema: &str) -> StoreResult<PgStore> {
        if !valid_schema(schema) {
            return Err(StoreError::unavailable(format!(
                "invalid schema name `{schema}`: use lowercase letters, digits and `_`"
            )));
        }
        Self::connect(url, Some(schema)).await
    }

    async fn connect(url: &str, schema: Option<&str>) -> StoreResult<PgStore> {
        let mut options = PgConnectOptions::from_str(url).map_err(db)?;
        if options.get_application_name().is_none() {
            // Names the store's sessions in `pg_stat_activity`.
            let name = match schema {
                Some(schema) => format!("tether:{schema}"),
                None => "tether".to_string(),
            };
            options = options.application_name(&name);
        }
        if let Some(schema) = schema {
            create_schema(&options, schema).await?;
        }
        let pool = pool_options(schema, POOL_SIZE)
            .connect_with(options.clone())
            .await
            .map_err(db)?;
        sqlx::migrate!()
            .run(&pool)
            .await
            .map_err(|e| StoreError::unavailable_while("migrating", e))?;
        let current: Option<String> = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await
            .map_err(db)?;
        let current = current
            .ok_or_else(|| StoreError::unavailable("no schema on the search_path to work in"))?;
        // Its own pool of one, never idled out: the listening connection lives as long as the
        // store, and the pool reconnects it when it dies.
        let listener_pool = pool_options(schema, 1)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_with(options)
            .await
            .map_err(db)?;
        let first = signals::connect(&listener_pool).await.map_err(db)?;
        let senders = tether_store::signal_channel();
        let origin = uuid::Uuid::now_v7().simple().to_string();
        let peers = Arc::new(signals::Peers::new());
        let listener = tokio::spawn(
            signals::Listener {
                pool: listener_pool.clone(),
                schema: current.clone(),
                origin: origin.clone(),
                signals: senders.clone(),
                peers: peers.clone(),
            }
            .run(first),
        );
        let announcer = tokio::spawn(announce_now_and_then(
            pool.clone(),
            current.clone(),
            origin.clone(),
        ));
        Ok(PgStore {
            inner: Arc::new(Inner {
                pool,
                listener_pool,
                signals: senders,
                schema: current.into(),
                origin: origin.into(),
                peers,
                listener,
                announcer,
            }),
        })
    }

    /// The schema this store works in.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// The store's pool, for tests and tools that need to look underneath.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Closes the store's connections (the listener's too); every call fails afterwards.
    pub async fn close(&self) {
        self.inner.listener.abort();
        self.inner.listener_pool.close().await;
        self.inner.pool.close().await;
    }

    /// `EXPLAIN (FORMAT JSON)` of the reaper's selection ([`REAP_QUERY`]) as it would run
    /// now with `policy`: the plan, as JSON text.
    pub async fn explain_reap_query(&self, policy: &ReapPolicy) -> StoreResult<String> {
        let mut conn = self.inner.pool.acquire().await.map_err(db)?;
        let now = clock(&mut conn).await?;
        let rows = sqlx::query(&format!("EXPLAIN (FORMAT JSON) {REAP_QUERY}"))
            .bind(now)
            .bind(now.saturating_sub(policy.timeout_grace_ms))
            .bind(now.saturating_sub(policy.cancel_stale_after_ms))
            .bind(i64::from(policy.batch.max(1)))
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
        let mut plan = String::new();
        for row in rows {
            // EXPLAIN's one column is `json`, read as text.
            let text: String = row.try_get_unchecked(0).map_err(db)?;
            plan.push_str(&text);
        }
        Ok(plan)
    }

    /// A write transaction and the database's clock, read once for all of it, in one round
    /// trip (`BEGIN; SELECT tether_now_ms()`, where sqlx's `begin` would take one of its own).
    /// Dropping it without commit (an error, or a cancelled future) rolls it back.
    pub(crate) async fn begin(&self) -> StoreResult<(TxConn, Millis)> {
        let mut tries = 0;
        loop {
            tries += 1;
            let conn = self.inner.pool.acquire().await.map_err(db)?;
            // Owned before anything is sent: a request dropped mid-`BEGIN` still rolls back.
            let mut tx = TxConn { conn: Some(conn) };
            match begin_with_clock(tx.conn()?).await {
                Ok(now) => return Ok((tx, now)),
                // A pooled connection the database or the network closed while it sat idle
                // (the pool does not ping recently used ones): nothing was done on it, so
                // another one is asked for.
                Err(e) if tries < 3 && is_connection_lost(&e) => tx.discard(),
                Err(e) => return Err(db(e)),
            }
        }
    }

    /// Commits, with the transaction's signals sent as notifications inside it (so other
    /// servers hear them only if it commits; `notified`: they went with its last statement
    /// already) and broadcast here right after.
    pub(crate) async fn commit(
        &self,
        mut tx: TxConn,
        out: Outbox,
        notified: bool,
    ) -> StoreResult<()> {
        let signals = out.into_signals();
        let remote: Vec<Signal> = signals
            .iter()
            .filter(|s| signals::wanted_elsewhere(s))
            .cloned()
            .collect();
        if !remote.is_empty() && !notified && self.inner.peers.present() {
            // One notification per transaction: each NOTIFY is queued and delivered to every
            // listening server, so fewer of them cost every commit and every listener less.
            let payload = signals::encode(&self.inner.schema, &self.inner.origin, &remote);
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(signals::CHANNEL)
                .bind(&payload)
                .execute(tx.conn()?)
                .await
                .map_err(db)?;
        }
        tx.commit().await?;
        for signal in signals {
            // No receivers is fine: nobody is waiting.
            let _ = self.inner.signals.send(signal);
        }
        Ok(())
    }
}

/// A pooled connection inside a transaction [`PgStore::begin`] opened. Dropped without
/// [`TxConn::commit`] it rolls back, in a task of its own (as sqlx's `Transaction` queues its
/// `ROLLBACK`), so the connection goes back to the pool outside any transaction.
pub(crate) struct TxConn {
    conn: Option<PoolConnection<Postgres>>,
}

impl TxConn {
    pub(crate) fn conn(&mut self) -> StoreResult<&mut PgConnection> {
        self.conn
            .as_deref_mut()
            .ok_or_else(|| StoreError::unavailable("the transaction has ended"))
    }

    pub(crate) async fn commit(mut self) -> StoreResult<()> {
        let result = self.conn()?.execute("COMMIT").await.map(|_| ());
        if result.is_ok() {
            // Committed: nothing to roll back; the connection goes back to the pool.
            self.conn.take();
        }
        result.map_err(db)
    }

    /// Closes the connection instead of returning it to the pool.
    fn discard(mut self) {
        if let Some(mut conn) = self.conn.take() {
            conn.close_on_drop();
        }
    }
}

impl Drop for TxConn {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    // sqlx reads whatever a cancelled statement left unread before this.
                    if conn.execute("ROLLBACK").await.is_err() {
                        conn.close_on_drop();
                    }
                });
            }
            // No runtime to roll back on: closing the connection ends the transaction.
            Err(_) => conn.close_on_drop(),
        }
    }
}

/// Says every [`signals::ANNOUNCE_EVERY`] that this store is here, so its peers keep
/// notifying it (the listener says `hi` itself whenever it starts listening).
async fn announce_now_and_then(pool: PgPool, schema: String, origin: String) {
    let mut every = tokio::time::interval(signals::ANNOUNCE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: the listener's `hi` covers the start.
    every.tick().await;
    loop {
        every.tick().await;
        if let Err(e) = signals::announce(&pool, &schema, &origin, false).await {
            if matches!(e, sqlx::Error::PoolClosed) {
                return;
            }
            tracing::debug!(error = %e, "cannot announce this server; trying again later");
        }
    }
}

/// `BEGIN` and the database's clock in one round trip (the simple protocol takes both).
async fn begin_with_clock(conn: &mut PgConnection) -> Result<Millis, sqlx::Error> {
    let rows = conn
        .fetch_all(sqlx::raw_sql("BEGIN; SELECT tether_now_ms()"))
        .await?;
    match rows.first() {
        Some(row) => row.try_get::<i64, _>(0),
        None => Err(sqlx::Error::RowNotFound),
    }
}

/// Whether a failure says the connection itself is gone (closed, reset, broken pipe).
fn is_connection_lost(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Io(_) | sqlx::Error::Protocol(_))
        || matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| c.starts_with("57P")))
}

fn pool_options(schema: Option<&str>, size: u32) -> PgPoolOptions {
    // sqlx pings every connection it hands out, a round trip before each transaction; it also
    // pings each one as it comes back, so only one that has sat idle a while is pinged again.
    let options = PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_IDLE_AFTER {
                    conn.ping().await?;
                }
                Ok(true)
            })
        });
    match schema {
        None => options,
        Some(schema) => {
            // `valid_schema` admits no quote, so this is safe to splice.
            let set = format!("SET search_path TO \"{schema}\"");
            options.after_connect(move |conn, _meta| {
                let set = set.clone();
                Box::pin(async move {
                    conn.execute(set.as_str()).await?;
                    Ok(())
                })
            })
        }
    }
}

/// Creates `schema` if missing. Two servers doing it at once can both miss it and one then
/// fails on the catalog's unique index: that one tries again and finds it.
async fn create_schema(options: &PgConnectOptions, schema: &str) -> StoreResult<()> {
    let mut conn = PgConnection::connect_with(options).await.map_err(db)?;
    let mut tries = 0;
    let result = loop {
        tries += 1;
        match conn
            .execute(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"").as_str())
            .await
        {
            Ok(_) => break Ok(()),
            Err(sqlx::Error::Database(e))
                if tries < 5 && matches!(e.code().as_deref(), Some("23505") | Some("42P06")) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => break Err(db(e)),
        }
    };
    let _ = conn.close().await;
    result
}

/// The database's clock, in milliseconds since the epoch.
async fn clock(conn: &mut PgConnection) -> StoreResult<Millis> {
    sqlx::query_scalar("SELECT tether_now_ms()")
        .fetch_one(&mut *conn)
        .await
        .map_err(db)
}

/// Serializes, until the transaction ends, everything that decides a lane's room: admissions
/// to it and claims under its ceiling.
async fn lane_lock(conn: &mut PgConnection, lane: &str) -> StoreResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(current_schema() || '/' || $2))")
        .bind(LANE_LOCK)
        .bind(lane)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}
