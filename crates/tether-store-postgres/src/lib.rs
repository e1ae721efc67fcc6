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
//! Row locks are always taken in the same order (worker, then lane locks, then runs by `seq`;
//! the reaper and claims never wait on a run row), so these transactions cannot deadlock.

mod endpoints;
mod lanes;
mod rows;
mod seed;
pub mod signals;
mod write;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection, Postgres, Row, Transaction};
use tether_domain::machine::{AttemptOutcome, Command, RunState};
use tether_domain::Freshness;
use tether_domain::{ErrorCode, Millis, Resources, RunSpec, RunStatus};
use tether_store::{
    Admission, AdmissionPolicy, AppendOutcome, AttemptRecord, ClaimLimits, ClaimedRun, CreatedRun,
    EventKind, EventRecord, FinishReport, HeartbeatAnswer, NewWorker, OutputChunk, ReapPolicy,
    ReapReport, ReapedRun, RunBeat, RunFilter, RunPage, RunRecord, RunRef, Signal, Store,
    StoreError, StoreResult, StreamOffsets, WorkerRecord,
};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::rows::{
    decode_attempt, decode_event, decode_run, decode_worker, to_u32, Loaded, ATTEMPT_SELECT,
    EVENT_SELECT, RUN_SELECT, WORKER_SELECT,
};
use crate::write::{
    end_attempt, guarded, guarded_update, load_run, one_row, push_event, push_status,
    transition_error, Ending, Lock,
};
use tether_store::{batch_entry, status_body, BatchAdmission, Outbox};

/// Any database failure: the request may be retried. A value that would not decode is a
/// different matter: the data is not what this code wrote; and a value the database refuses as
/// data (SQLSTATE class 22) is the caller's, which retrying will not mend.
pub(crate) fn db(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StoreError::Corrupt(e.to_string())
        }
        sqlx::Error::Database(ref d) if d.code().is_some_and(|c| c.starts_with("22")) => {
            StoreError::InvalidInput(d.message().to_string())
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}

fn encode<T: serde::Serialize>(value: &T, what: &str) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

const IN_FLIGHT: &str = "('claimed', 'running')";
const PENDING: &str = "('pending', 'queued')";
/// How many pending runs one claim looks at before giving up on finding more that fit.
const CLAIM_SCAN_LIMIT: usize = 2048;
const CLAIM_PAGE: i64 = 256;
/// The first key of the advisory lock one reaper sweep holds (the second: the schema's hash,
/// so stores in other schemas of the same database sweep independently).
pub const REAPER_LOCK: i32 = 0x7465_7472; // "tetr"
/// The first key of a lane's advisory lock (the second: the hash of schema and lane).
const LANE_LOCK: i32 = 0x7465_746c; // "tetl"
/// Connections per store; the listener has one more of its own.
const POOL_SIZE: u32 = 10;
/// How long `ping` waits for the database.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
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
    schema: String,
    /// This store instance, named in its notifications so it can skip its own.
    origin: String,
    listener: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The listener holds no reference to the store; it ends with it.
        self.listener.abort();
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
            return Err(StoreError::Unavailable(format!(
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
            .map_err(|e| StoreError::Unavailable(format!("migrating: {e}")))?;
        let current: Option<String> = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await
            .map_err(db)?;
        let current = current.ok_or_else(|| {
            StoreError::Unavailable("no schema on the search_path to work in".into())
        })?;
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
        let listener = tokio::spawn(
            signals::Listener {
                pool: listener_pool.clone(),
                schema: current.clone(),
                origin: origin.clone(),
                signals: senders.clone(),
            }
            .run(first),
        );
        Ok(PgStore {
            inner: Arc::new(Inner {
                pool,
                listener_pool,
                signals: senders,
                schema: current,
                origin,
                listener,
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

    /// A write transaction and the database's clock, read once for all of it. Dropping the
    /// transaction without commit (an error, or a cancelled future) rolls it back.
    async fn begin(&self) -> StoreResult<(Transaction<'static, Postgres>, Millis)> {
        // In a task of its own, so a request dropped mid-begin cannot strand an open
        // transaction on a pooled connection (its `Transaction`, once built, rolls back on drop).
        let pool = self.inner.pool.clone();
        let mut tx = tokio::spawn(async move { pool.begin().await })
            .await
            .map_err(|e| StoreError::Unavailable(format!("beginning a transaction: {e}")))?
            .map_err(db)?;
        let now = clock(&mut tx).await?;
        Ok((tx, now))
    }

    /// Commits, with the transaction's signals sent as notifications inside it (so other
    /// servers hear them only if it commits) and broadcast here right after.
    async fn commit(&self, mut tx: Transaction<'static, Postgres>, out: Outbox) -> StoreResult<()> {
        let signals = out.into_signals();
        let remote: Vec<Signal> = signals
            .iter()
            .filter(|s| signals::wanted_elsewhere(s))
            .cloned()
            .collect();
        if !remote.is_empty() {
            // One notification per transaction: each NOTIFY is queued and delivered to every
            // listening server, so fewer of them cost every commit and every listener less.
            let payload = signals::encode(&self.inner.schema, &self.inner.origin, &remote);
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(signals::CHANNEL)
                .bind(&payload)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        for signal in signals {
            // No receivers is fine: nobody is waiting.
            let _ = self.inner.signals.send(signal);
        }
        Ok(())
    }

    async fn read_run(&self, run_id: &str) -> StoreResult<Option<RunRecord>> {
        let mut conn = self.inner.pool.acquire().await.map_err(db)?;
        Ok(load_run(&mut conn, run_id, Lock::None)
            .await?
            .map(|l| l.run))
    }

    /// Accepts a run (after `admission`, if given, lets it in), or answers the run an
    /// identical submission under the same idempotency key already made.
    async fn create_in(
        &self,
        spec: &RunSpec,
        admission: Option<&AdmissionPolicy>,
    ) -> StoreResult<Admission> {
        let (mut tx, now) = self.begin().await?;
        let mut out = Outbox::default();
        if admission.is_some_and(|p| p.reject_when_full) {
            lane_lock(&mut tx, &spec.lane).await?;
        }
        let decided = insert_run(&mut tx, &mut out, now, spec, admission).await?;
        // A refusal or a replayed key wrote nothing: dropping the transaction rolls it back.
        if matches!(&decided, Admission::Accepted(created) if created.created) {
            self.commit(tx, out).await?;
        }
        Ok(decided)
    }
}

/// Accepts a run inside the caller's transaction (after `admission`, if given, lets it in), or
/// answers the run an identical submission under the same idempotency key already made. The
/// caller holds the lane's lock when the lane is a `reject` one: admissions to it are decided
/// one at a time, so the room one sees is the room it gets (SPEC §1.2); a queue lane reserves
/// nothing at the door, so its submissions need not wait for each other (a reused key is
/// settled by the unique index below). The caller commits, or drops the transaction.
async fn insert_run(
    tx: &mut PgConnection,
    out: &mut Outbox,
    now: Millis,
    spec: &RunSpec,
    admission: Option<&AdmissionPolicy>,
) -> StoreResult<Admission> {
    if let Some(existing) = find_by_key(&mut *tx, spec).await? {
        return Ok(Admission::Accepted(Box::new(CreatedRun {
            run: existing,
            created: false,
        })));
    }
    if let Some(policy) = admission {
        if let Some(refusal) = admit(&mut *tx, now, spec, policy).await? {
            return Ok(refusal);
        }
    }
    let id = uuid::Uuid::now_v7().to_string();
    let state = RunState::new(spec.max_attempts);
    let inserted = sqlx::query(
        "INSERT INTO runs (id, lane, status, attempt, max_attempts, spec, cpus, memory_mb, \
         created_at, heartbeat_timeout_ms, timeout_ms, output_limit_bytes, idempotency_key, \
         request_fingerprint) \
         VALUES ($1, $2, $3, 0, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12, $13) \
         ON CONFLICT (idempotency_key) DO NOTHING RETURNING seq",
    )
    .bind(&id)
    .bind(&spec.lane)
    .bind(state.status.as_str())
    .bind(i64::from(state.max_attempts))
    .bind(encode(spec, "run spec")?)
    .bind(spec.resources.cpus)
    .bind(spec.resources.memory_mb as i64)
    .bind(now)
    .bind(spec.heartbeat_timeout_ms)
    .bind(spec.timeout_ms)
    .bind(spec.output_limit_bytes)
    .bind(spec.idempotency_key.as_deref())
    .bind(&spec.request_fingerprint)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    if inserted.is_none() {
        // A concurrent submission with the same key committed first: answer as if it had
        // come before us.
        return match find_by_key(&mut *tx, spec).await? {
            Some(run) => Ok(Admission::Accepted(Box::new(CreatedRun {
                run,
                created: false,
            }))),
            None => Err(StoreError::Unavailable(
                "idempotency key conflict vanished; retry".into(),
            )),
        };
    }
    let body = status_body(RunStatus::Pending, 0, None, None);
    push_status(&mut *tx, out, &id, now, body, RunStatus::Pending, 0).await?;
    out.run_pending(&spec.lane);
    let run = reload(&mut *tx, &id).await?;
    Ok(Admission::Accepted(Box::new(CreatedRun {
        run,
        created: true,
    })))
}

fn pool_options(schema: Option<&str>, size: u32) -> PgPoolOptions {
    let options = PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(ACQUIRE_TIMEOUT);
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

/// The run an earlier submission with this spec's idempotency key made, if it is the same
/// submission; `IdempotencyConflict` if it is not.
async fn find_by_key(conn: &mut PgConnection, spec: &RunSpec) -> StoreResult<Option<RunRecord>> {
    let Some(key) = &spec.idempotency_key else {
        return Ok(None);
    };
    let existing =
        sqlx::query("SELECT id, request_fingerprint FROM runs WHERE idempotency_key = $1")
            .bind(key)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?;
    let Some(row) = existing else {
        return Ok(None);
    };
    let run_id: String = row.try_get("id").map_err(db)?;
    let fingerprint: String = row.try_get("request_fingerprint").map_err(db)?;
    if fingerprint != spec.request_fingerprint {
        return Err(StoreError::IdempotencyConflict { run_id });
    }
    Ok(Some(reload(conn, &run_id).await?))
}

/// Decides a lane's admission of `spec` (under the lane's lock): `None` lets it in.
async fn admit(
    conn: &mut PgConnection,
    now: Millis,
    spec: &RunSpec,
    policy: &AdmissionPolicy,
) -> StoreResult<Option<Admission>> {
    let workers = sqlx::query(
        "SELECT id, cpus, memory_mb FROM workers WHERE deregistered_at IS NULL \
         AND NOT draining AND last_heartbeat_at >= $1 \
         AND (cardinality(lanes) = 0 OR $2 = ANY(lanes))",
    )
    .bind(now.saturating_sub(policy.worker_fresh_ms))
    .bind(&spec.lane)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    let mut ids = Vec::with_capacity(workers.len());
    let mut total = Resources {
        cpus: 0.0,
        memory_mb: 0,
    };
    let mut could_ever_fit = false;
    for row in &workers {
        let capacity = Resources {
            cpus: row.try_get("cpus").map_err(db)?,
            memory_mb: row.try_get::<i64, _>("memory_mb").map_err(db)?.max(0) as u64,
        };
        could_ever_fit |= spec.resources.fits_in(&capacity);
        total.cpus += capacity.cpus;
        total.memory_mb += capacity.memory_mb;
        ids.push(row.try_get::<String, _>("id").map_err(db)?);
    }
    if !workers.is_empty() && !could_ever_fit {
        return Ok(Some(Admission::NeverFits));
    }
    if !policy.reject_when_full {
        return Ok(None);
    }
    // What the serving workers' in-flight runs hold, per worker as the SQLite store counts it.
    let held = sqlx::query(&format!(
        "SELECT coalesce(sum(cpus), 0)::float8 AS cpus, \
                coalesce(sum(memory_mb), 0)::bigint AS memory_mb \
         FROM runs WHERE status IN {IN_FLIGHT} AND worker_id = ANY($1)"
    ))
    .bind(&ids)
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    // Runs admitted to the lane and not yet claimed have a claim on that room too.
    let waiting = sqlx::query(&format!(
        "SELECT count(*) AS n, coalesce(sum(cpus), 0)::float8 AS cpus, \
                coalesce(sum(memory_mb), 0)::bigint AS memory_mb \
         FROM runs WHERE lane = $1 AND status IN {PENDING} AND cancel_requested_at IS NULL"
    ))
    .bind(&spec.lane)
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    let free_cpus = total.cpus
        - held.try_get::<f64, _>("cpus").map_err(db)?
        - waiting.try_get::<f64, _>("cpus").map_err(db)?;
    let free_memory = total.memory_mb as i64
        - held.try_get::<i64, _>("memory_mb").map_err(db)?
        - waiting.try_get::<i64, _>("memory_mb").map_err(db)?;
    let room = Resources {
        cpus: free_cpus,
        memory_mb: free_memory.max(0) as u64,
    };
    if free_memory < 0 || !spec.resources.fits_in(&room) {
        return Ok(Some(Admission::LaneFull));
    }
    if let Some(max) = policy.max_concurrency {
        let in_flight: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM runs WHERE lane = $1 AND status IN {IN_FLIGHT}"
        ))
        .bind(&spec.lane)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        let waiting_n: i64 = waiting.try_get("n").map_err(db)?;
        if in_flight + waiting_n >= i64::from(max) {
            return Ok(Some(Admission::LaneFull));
        }
    }
    Ok(None)
}

/// Locks and loads a run for a worker call, or `NotFound`.
async fn must_lock(conn: &mut PgConnection, run_id: &str) -> StoreResult<Loaded> {
    load_run(conn, run_id, Lock::Wait)
        .await?
        .ok_or(StoreError::NotFound)
}

/// What an attempt has stored of each stream (zero for an attempt with no row yet).
async fn attempt_offsets(
    conn: &mut PgConnection,
    run_id: &str,
    attempt: u32,
) -> StoreResult<StreamOffsets> {
    let row = sqlx::query(
        "SELECT stdout_bytes, stderr_bytes FROM attempts WHERE run_id = $1 AND attempt = $2",
    )
    .bind(run_id)
    .bind(i64::from(attempt))
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    Ok(match row {
        Some(row) => StreamOffsets {
            stdout: row.try_get("stdout_bytes").map_err(db)?,
            stderr: row.try_get("stderr_bytes").map_err(db)?,
        },
        None => StreamOffsets::default(),
    })
}

async fn reload(conn: &mut PgConnection, run_id: &str) -> StoreResult<RunRecord> {
    load_run(conn, run_id, Lock::None)
        .await?
        .map(|l| l.run)
        .ok_or(StoreError::NotFound)
}

/// A worker that may still act (registered and not deregistered), its row locked: the claims
/// and heartbeats of one worker go one at a time, so its capacity check sees what it holds.
async fn lock_live_worker(conn: &mut PgConnection, worker_id: &str) -> StoreResult<WorkerRecord> {
    let row = sqlx::query(&format!("{WORKER_SELECT} WHERE id = $1 FOR UPDATE"))
        .bind(worker_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
    match row.as_ref().map(decode_worker).transpose()? {
        Some((worker, None)) => Ok(worker),
        _ => Err(StoreError::UnknownWorker),
    }
}

/// The in-flight runs a worker holds, with their attempts, and what they reserve.
async fn held_by(
    conn: &mut PgConnection,
    worker_id: &str,
) -> StoreResult<(Vec<(String, u32)>, Resources)> {
    let rows = sqlx::query(&format!(
        "SELECT id, attempt, cpus, memory_mb FROM runs \
         WHERE worker_id = $1 AND status IN {IN_FLIGHT} ORDER BY seq"
    ))
    .bind(worker_id)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    let mut runs = Vec::with_capacity(rows.len());
    let mut reserved = Resources {
        cpus: 0.0,
        memory_mb: 0,
    };
    for row in rows {
        runs.push((
            row.try_get::<String, _>("id").map_err(db)?,
            to_u32(row.try_get("attempt").map_err(db)?, "attempt")?,
        ));
        reserved.cpus += row.try_get::<f64, _>("cpus").map_err(db)?;
        reserved.memory_mb += row.try_get::<i64, _>("memory_mb").map_err(db)?.max(0) as u64;
    }
    Ok((runs, reserved))
}

/// Ends a run's current attempt as the reaper would, with `error_code`, if it is still the
/// attempt judged. Answers what happened, or `None` if the run had moved on.
async fn reap_one(
    conn: &mut PgConnection,
    out: &mut Outbox,
    now: Millis,
    loaded: &Loaded,
    error_code: ErrorCode,
) -> StoreResult<Option<ReapedRun>> {
    let run = &loaded.run;
    let transition = match run.state().apply(&Command::Reap {
        attempt: run.attempt,
        error_code,
    }) {
        Ok(t) => t,
        Err(_) => return Ok(None),
    };
    let Some(decision) = transition.decision else {
        return Ok(None);
    };
    match end_attempt(conn, out, now, loaded, decision, Ending::default()).await {
        Ok(()) => Ok(Some(ReapedRun {
            run_id: run.id.clone(),
            attempt: run.attempt,
            error_code: decision.attempt_result().1.unwrap_or(error_code),
            status_after: decision.run_status(),
        })),
        // Lost a race with another writer: it is theirs now.
        Err(StoreError::StaleAttempt) => Ok(None),
        Err(e) => Err(e),
    }
}

#[async_trait]
impl Store for PgStore {
    async fn now(&self) -> StoreResult<Millis> {
        let mut conn = self.inner.pool.acquire().await.map_err(db)?;
        clock(&mut conn).await
    }

    async fn ping(&self) -> StoreResult<()> {
        // Readiness probes want a quick answer, not the pool's full acquire timeout.
        let probe = sqlx::query("SELECT 1").execute(&self.inner.pool);
        match tokio::time::timeout(PING_TIMEOUT, probe).await {
            Ok(result) => result.map(|_| ()).map_err(db),
            Err(_) => Err(StoreError::Unavailable(
                "the database did not answer".into(),
            )),
        }
    }

    async fn create_run(&self, spec: &RunSpec) -> StoreResult<CreatedRun> {
        match self.create_in(spec, None).await? {
            Admission::Accepted(created) => Ok(*created),
            // Without an admission policy nothing is refused.
            Admission::LaneFull | Admission::NeverFits => Err(StoreError::Unavailable(
                "a run was refused without an admission policy".into(),
            )),
        }
    }

    async fn admit_run(&self, spec: &RunSpec, policy: &AdmissionPolicy) -> StoreResult<Admission> {
        self.create_in(spec, Some(policy)).await
    }

    async fn admit_runs(
        &self,
        batch: &[(RunSpec, AdmissionPolicy)],
    ) -> StoreResult<BatchAdmission> {
        let (mut tx, now) = self.begin().await?;
        let mut out = Outbox::default();
        // Every `reject` lane of the batch locked up front, in one order, so two batches
        // naming the same lanes cannot deadlock.
        let lanes: std::collections::BTreeSet<&str> = batch
            .iter()
            .filter(|(_, policy)| policy.reject_when_full)
            .map(|(spec, _)| spec.lane.as_str())
            .collect();
        for lane in lanes {
            lane_lock(&mut tx, lane).await?;
        }
        let mut runs = Vec::with_capacity(batch.len());
        for (index, (spec, policy)) in batch.iter().enumerate() {
            let decided = insert_run(&mut tx, &mut out, now, spec, Some(policy)).await;
            match batch_entry(&spec.lane, decided)? {
                Ok(created) => runs.push(created),
                // Dropping the transaction un-writes the entries before this one.
                Err(refusal) => return Ok(BatchAdmission::Refused { index, refusal }),
            }
        }
        self.commit(tx, out).await?;
        Ok(BatchAdmission::Accepted(runs))
    }

    async fn get_run(&self, run_id: &str) -> StoreResult<Option<RunRecord>> {
        self.read_run(run_id).await
    }

    async fn list_runs(&self, filter: &RunFilter) -> StoreResult<RunPage> {
        let limit = match filter.limit {
            0 => 50,
            n => n.min(500),
        };
        let after = filter
            .cursor
            .as_deref()
            .map(tether_store::parse_cursor)
            .transpose()?;
        let mut sql = format!("{RUN_SELECT} WHERE TRUE");
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if after.is_some() {
            sql.push_str(&format!(" AND r.seq < {}", next()));
        }
        if let Some(status) = filter.status {
            if status == RunStatus::Pending {
                sql.push_str(&format!(" AND r.status IN {PENDING}"));
            } else {
                sql.push_str(&format!(" AND r.status = {}", next()));
            }
        }
        if filter.lane.is_some() {
            sql.push_str(&format!(" AND r.lane = {}", next()));
        }
        let prefix = filter.id_range();
        if let Some((_, end)) = &prefix {
            // Byte order, as on SQLite: a locale collation may skip the `-` in an id.
            sql.push_str(&format!(" AND r.id COLLATE \"C\" >= {}", next()));
            if end.is_some() {
                sql.push_str(&format!(" AND r.id COLLATE \"C\" < {}", next()));
            }
        }
        sql.push_str(&format!(" ORDER BY r.seq DESC LIMIT {}", next()));
        let mut query = sqlx::query(&sql);
        if let Some(seq) = after {
            query = query.bind(seq);
        }
        if let Some(status) = filter.status.filter(|s| *s != RunStatus::Pending) {
            query = query.bind(status.as_str());
        }
        if let Some(lane) = &filter.lane {
            query = query.bind(lane.as_str());
        }
        if let Some((start, end)) = prefix {
            query = query.bind(start);
            if let Some(end) = end {
                query = query.bind(end);
            }
        }
        // One more than asked, to know whether another page follows.
        let rows = query
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(db)?;
        let mut runs = rows
            .iter()
            .map(|row| decode_run(row).map(|l| l.run))
            .collect::<StoreResult<Vec<_>>>()?;
        let next_cursor = if runs.len() > limit as usize {
            runs.truncate(limit as usize);
            runs.last().map(|r| r.seq.to_string())
        } else {
            None
        };
        Ok(RunPage { runs, next_cursor })
    }

    async fn list_attempts(&self, run_id: &str) -> StoreResult<Vec<AttemptRecord>> {
        let rows = sqlx::query(&format!(
            "{ATTEMPT_SELECT} WHERE a.run_id = $1 ORDER BY a.attempt"
        ))
        .bind(run_id)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(db)?;
        rows.iter().map(decode_attempt).collect()
    }

    async fn request_cancel(&self, run_id: &str) -> StoreResult<RunRecord> {
        let (mut tx, now) = self.begin().await?;
        let mut out = Outbox::default();
        let loaded = must_lock(&mut tx, run_id).await?;
        let transition = loaded
            .run
            .state()
            .apply(&Command::Cancel)
            .map_err(transition_error)?;
        // Keep the first request's stamp: the cancel deadline runs from it.
        let sql = guarded_update("cancel_requested_at = coalesce(cancel_requested_at, $1)", 1);
        let q = sqlx::query(&sql).bind(now);
        one_row(guarded(q, &loaded).execute(&mut *tx).await.map_err(db)?)?;
        match (transition.decision, &loaded.run.worker_id) {
            (Some(decision), _) => {
                end_attempt(&mut tx, &mut out, now, &loaded, decision, Ending::default()).await?
            }
            // In flight: its worker's control poll hears of it now, its heartbeat later.
            (None, Some(worker_id)) => {
                out.cancel_requested(run_id, loaded.run.attempt, worker_id);
            }
            (None, None) => {}
        }
        let run = reload(&mut tx, run_id).await?;
        self.commit(tx, out).await?;
        Ok(run)
    }

    async fn register_worker(&self, worker: &NewWorker) -> StoreResult<WorkerRecord> {
        let (mut tx, now) = self.begin().await?;
        let id = uuid::Uuid::now_v7().to_string();
        sqlx::query(
            "INSERT INTO workers (id, name, cpus, memory_mb, lanes, labels, registered_at, \
             last_heartbeat_at, secret_hash) VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $7, $8)",
        )
        .bind(&id)
        .bind(&worker.name)
        .bind(worker.capacity.cpus)
        .bind(worker.capacity.memory_mb as i64)
        .bind(&worker.lanes)
        .bind(encode(&worker.labels, "worker labels")?)
        .bind(now)
        .bind(&worker.secret_hash)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let record = lock_live_worker(&mut tx, &id).await?;
        self.commit(tx, Outbox::default()).await?;
        Ok(record)
    }

    async fn deregister_worker(&self, worker_id: &str) -> StoreResult<Vec<String>> {
        let (mut tx, now) = self.begin().await?;
        let mut out = Outbox::default();
        let row = sqlx::query("SELECT deregistered_at FROM workers WHERE id = $1 FOR UPDATE")
            .bind(worker_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        let Some(row) = row else {
            return Err(StoreError::UnknownWorker);
        };
        if row
            .try_get::<Option<Millis>, _>("deregistered_at")
            .map_err(db)?
            .is_some()
        {
            // Already gone, and its runs already handed back.
            return Ok(Vec::new());
        }
        sqlx::query("UPDATE workers SET deregistered_at = $1 WHERE id = $2")
            .bind(now)
            .bind(worker_id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let (held, _) = held_by(&mut tx, worker_id).await?;
        let mut handed_back = Vec::with_capacity(held.len());
        // `held` is in seq order: the order every multi-run writer locks in.
        for (run_id, _) in held {
            let Some(loaded) = load_run(&mut tx, &run_id, Lock::Wait).await? else {
                continue;
            };
            if reap_one(
                &mut tx,
                &mut out,
                now,
                &loaded,
                ErrorCode::WorkerHeartbeatLost,
            )
            .await?
            .is_some()
            {
                handed_back.push(run_id);
            }
        }
        self.commit(tx, out).await?;
        Ok(handed_back)
    }

    async fn set_worker_draining(&self, worker_id: &str) -> StoreResult<()> {
        let (mut tx, _now) = self.begin().await?;
        lock_live_worker(&mut tx, worker_id).await?;
        sqlx::query("UPDATE workers SET draining = TRUE WHERE id = $1 AND deregistered_at IS NULL")
            .bind(worker_id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        self.commit(tx, Outbox::default()).await
    }

    async fn lane_loads(&self) -> StoreResult<Vec<tether_store::LaneLoad>> {
        lanes::lane_loads(self.pool()).await
    }

    async fn worker_secret_hash(&self, worker_id: &str) -> StoreResult<Option<String>> {
        let row = sqlx::query(
            "SELECT secret_hash FROM workers WHERE id = $1 AND deregistered_at IS NULL",
        )
        .bind(worker_id)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(db)?;
        match row {
            Some(row) => row.try_get("secret_hash").map_err(db),
            None => Err(StoreError::UnknownWorker),
        }
    }

    async fn list_workers(&self) -> StoreResult<Vec<WorkerRecord>> {
        let mut conn = self.inner.pool.acquire().await.map_err(db)?;
        let rows = sqlx::query(&format!(
            "{WORKER_SELECT} WHERE deregistered_at IS NULL ORDER BY registered_at, id"
        ))
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
        let mut workers = Vec::with_capacity(rows.len());
        for row in &rows {
            let (mut worker, _) = decode_worker(row)?;
            let (runs, reserved) = held_by(&mut conn, &worker.id).await?;
            worker.runs = runs;
            worker.reserved = reserved;
            workers.push(worker);
        }
        Ok(workers)
    }

    async fn claim_runs(
        &self,
        worker_id: &str,
        limits: &ClaimLimits,
    ) -> StoreResult<Vec<ClaimedRun>> {
        let (mut tx, now) = self.begin().await?;
        let mut out = Outbox::default();
        // The worker's row lock serializes its claims: the room computed below stays true.
        let worker = lock_live_worker(&mut tx, worker_id).await?;
        // A draining worker finishes what it holds and takes nothing new.
        if worker.draining {
            return Ok(Vec::new());
        }
        if limits.worker_fresh_ms > 0
            && !Freshness::new(limits.worker_fresh_ms).is_fresh(Some(worker.last_heartbeat_at), now)
        {
            return Ok(Vec::new());
        }
        let (_, reserved) = held_by(&mut tx, worker_id).await?;
        let mut room_cpus = worker.capacity.cpus - reserved.cpus;
        let mut room_memory = worker.capacity.memory_mb.saturating_sub(reserved.memory_mb);

        // Lanes with a ceiling: how many runs each has in flight now, and its ceiling. The
        // lane locks (taken in name order, like every lane lock) make the count hold across
        // servers until this claim commits.
        let mut lane_room: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
        for (lane, max) in &limits.lane_max_concurrency {
            if !worker.lanes.is_empty() && !worker.lanes.contains(lane) {
                continue;
            }
            lane_lock(&mut tx, lane).await?;
            let n: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM runs WHERE lane = $1 AND status IN {IN_FLIGHT}"
            ))
            .bind(lane)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
            lane_room.insert(lane.as_str(), (n.max(0) as u32, *max));
        }

        // Oldest first; rows another claim is taking right now are skipped, not waited on, so
        // concurrent claims on many servers each get different runs.
        let mut sql = format!(
            "SELECT seq, id, lane, cpus, memory_mb FROM runs WHERE status IN {PENDING} \
             AND cancel_requested_at IS NULL AND seq > $1"
        );
        if !worker.lanes.is_empty() {
            sql.push_str(" AND lane = ANY($3)");
        }
        sql.push_str(" ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED");

        let mut claimed: Vec<String> = Vec::new();
        let mut after_seq = 0_i64;
        let mut scanned = 0_usize;
        'scan: loop {
            let page = if limits.max_runs > 0 {
                (i64::from(limits.max_runs) - claimed.len() as i64).clamp(1, CLAIM_PAGE)
            } else {
                CLAIM_PAGE
            };
            let mut query = sqlx::query(&sql).bind(after_seq).bind(page);
            if !worker.lanes.is_empty() {
                query = query.bind(&worker.lanes);
            }
            let rows = query.fetch_all(&mut *tx).await.map_err(db)?;
            scanned += rows.len();
            let last_page = (rows.len() as i64) < page;
            for row in &rows {
                if limits.max_runs > 0 && claimed.len() >= limits.max_runs as usize {
                    break 'scan;
                }
                after_seq = row.try_get("seq").map_err(db)?;
                let lane: String = row.try_get("lane").map_err(db)?;
                let needs = Resources {
                    cpus: row.try_get("cpus").map_err(db)?,
                    memory_mb: row.try_get::<i64, _>("memory_mb").map_err(db)?.max(0) as u64,
                };
                if let Some((n, max)) = lane_room.get(lane.as_str()) {
                    if n >= max {
                        continue;
                    }
                }
                let room = Resources {
                    cpus: room_cpus,
                    memory_mb: room_memory,
                };
                // A run too big for what is left is skipped; smaller ones behind it still go.
                if !needs.fits_in(&room) {
                    continue;
                }
                let run_id: String = row.try_get("id").map_err(db)?;
                // Already locked by this transaction (the scan above).
                let Some(loaded) = load_run(&mut tx, &run_id, Lock::None).await? else {
                    continue;
                };
                let Ok(transition) = loaded.run.state().apply(&Command::Claim {
                    worker_id: worker_id.to_string(),
                }) else {
                    continue;
                };
                let attempt = transition.next.attempt;
                let sql = guarded_update(
                    "status = $1, attempt = $2, worker_id = $3, claimed_at = $4, \
                     started_at = NULL, last_heartbeat_at = $4, confirmed = FALSE, \
                     stale_at = $4 + heartbeat_timeout_ms, timeout_at = $4 + timeout_ms",
                    4,
                );
                let q = sqlx::query(&sql)
                    .bind(transition.next.status.as_str())
                    .bind(i64::from(attempt))
                    .bind(worker_id)
                    .bind(now);
                let result = guarded(q, &loaded).execute(&mut *tx).await.map_err(db)?;
                if result.rows_affected() != 1 {
                    // Someone else took it between our read and write: not ours.
                    continue;
                }
                sqlx::query(
                    "INSERT INTO attempts (run_id, attempt, worker_id, claimed_at) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(&run_id)
                .bind(i64::from(attempt))
                .bind(worker_id)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                let body = status_body(RunStatus::Claimed, attempt, None, None);
                push_status(
                    &mut tx,
                    &mut out,
                    &run_id,
                    now,
                    body,
                    RunStatus::Claimed,
                    attempt,
                )
                .await?;
                push_event(
                    &mut tx,
                    &mut out,
                    &run_id,
                    EventKind::Attempt,
                    attempt,
                    now,
                    json!({ "attempt": attempt, "worker_id": worker_id }),
                    None,
                )
                .await?;
                room_cpus -= needs.cpus;
                room_memory = room_memory.saturating_sub(needs.memory_mb);
                if let Some((n, _)) = lane_room.get_mut(lane.as_str()) {
                    *n += 1;
                }
                claimed.push(run_id);
            }
            if last_page
                || scanned >= CLAIM_SCAN_LIMIT
                || room_cpus <= 1e-9
                || room_memory == 0
                || (limits.max_runs > 0 && claimed.len() >= limits.max_runs as usize)
            {
                break;
            }
        }
        let mut runs = Vec::with_capacity(claimed.len());
        for run_id in &claimed {
            let run = reload(&mut tx, run_id).await?;
            runs.push(ClaimedRun {
                attempt: run.attempt,
                run,
            });
        }
        self.commit(tx, out).await?;
        Ok(runs)
    }

    async fn heartbeat(&self, worker_id: &str, beats: &[RunBeat]) -> StoreResult<HeartbeatAnswer> {
        let (mut tx, now) = self.begin().await?;
        let stamped = sqlx::query(
            "UPDATE workers SET last_heartbeat_at = $1 WHERE id = $2 \
             AND deregistered_at IS NULL RETURNING id",
        )
        .bind(now)
        .bind(worker_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        if stamped.is_none() {
            return Err(StoreError::UnknownWorker);
        }
        // Lock the named runs at once, in seq order (the order every multi-run writer uses).
        let ids: Vec<&str> = beats.iter().map(|b| b.run_id.as_str()).collect();
        if !ids.is_empty() {
            sqlx::query("SELECT id FROM runs WHERE id = ANY($1) ORDER BY seq FOR UPDATE")
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?;
        }
        let mut answer = HeartbeatAnswer::default();
        for beat in beats {
            let reference = RunRef {
                run_id: beat.run_id.clone(),
                attempt: beat.attempt,
            };
            let Some(loaded) = load_run(&mut tx, &beat.run_id, Lock::None).await? else {
                answer.not_owned.push(reference);
                continue;
            };
            let touch = Command::Touch {
                attempt: beat.attempt,
                worker_id: worker_id.to_string(),
            };
            if loaded.run.state().apply(&touch).is_err() {
                answer.not_owned.push(reference);
                continue;
            }
            let sql = guarded_update(
                "last_heartbeat_at = $1, stale_at = $1 + heartbeat_timeout_ms, \
                 confirmed = TRUE, reported_stdout_bytes = $2, reported_stderr_bytes = $3",
                3,
            );
            let sql = format!("{sql} AND worker_id = $7");
            let q = sqlx::query(&sql)
                .bind(now)
                .bind(beat.stdout_bytes)
                .bind(beat.stderr_bytes);
            let result = guarded(q, &loaded)
                .bind(worker_id)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            if result.rows_affected() != 1 {
                answer.not_owned.push(reference);
            } else if loaded.run.cancel_requested_at.is_some() {
                answer.cancel.push(reference);
            }
        }
        self.commit(tx, Outbox::default()).await?;
        Ok(answer)
    }

    async fn start_attempt(
        &self,
        run_id: &str,
        attempt: u32,
        worker_id: &str,
    ) -> StoreResult<RunRecord> {
        let (mut tx, now) = self.begin().await?;
        let mut out = Outbox::default();
        let loaded = must_lock(&mut tx, run_id).await?;
        let transition = loaded
            .run
            .state()
            .apply(&Command::Start {
                attempt,
                worker_id: worker_id.to_string(),
            })
            .map_err(transition_error)?;
        if loaded.run.status == RunStatus::Running {
            // The worker retried a start whose answer it lost: already done.
            return Ok(loaded.run);
        }
        // A start is a sign of life, like a heartbeat; the timeout runs from here.
        let sql = guarded_update(
            "status = $1, started_at = $2, confirmed = TRUE, last_heartbeat_at = $2, \
             stale_at = $2 + heartbeat_timeout_ms, timeout_at = $2 + timeout_ms",
            2,
        );
        let q = sqlx::query(&sql)
            .bind(transition.next.status.as_str())
            .bind(now);
        one_row(guarded(q, &loaded).execute(&mut *tx).await.map_err(db)?)?;
        sqlx::query("UPDATE attempts SET started_at = $1 WHERE run_id = $2 AND attempt = $3")
            .bind(now)
            .bind(run_id)
            .bind(i64::from(attempt))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let body = status_body(RunStatus::Running, attempt, None, None);
        push_status(
            &mut tx,
            &mut out,
            run_id,
            now,
            body,
            RunStatus::Running,
            attempt,
        )
        .await?;
        let run = reload(&mut tx, run_id).await?;
        self.commit(tx, out).await?;
        Ok(run)
    }

    async fn append_output(
        &self,
        run_id: &str,
        attempt: u32,
        worker_id: &str,
        chunks: &[OutputChunk],
    ) -> StoreResult<AppendOutcome> {
        let (mut tx, now) = self.begin().await?;
        let mut out = Outbox::default();
        // Locked: concurrent appends count the output limit one after another.
        let loaded = must_lock(&mut tx, run_id).await?;
        loaded
            .run
            .state()
            .apply(&Command::Touch {
                attempt,
                worker_id: worker_id.to_string(),
            })
            .map_err(transition_error)?;
        let mut offsets = attempt_offsets(&mut tx, run_id, attempt).await?;
        let fresh = tether_store::new_output(chunks, offsets)
            .map_err(|expected| StoreError::OutputGap { expected })?;
        let limit = loaded.run.spec.output_limit_bytes.max(0);
        let mut total = loaded.output_bytes;
        let stored_before = offsets;
        let mut last_seq = loaded.run.last_event_seq;
        let mut limit_reached = false;
        for (stream, data) in fresh {
            let room = usize::try_from(limit - total).unwrap_or(0);
            let (data, cut) = if data.len() > room {
                (&data[..room], true)
            } else {
                (data, false)
            };
            if !data.is_empty() {
                last_seq = push_event(
                    &mut tx,
                    &mut out,
                    run_id,
                    EventKind::Log,
                    attempt,
                    now,
                    json!({ "stream": stream.as_str() }),
                    Some(data),
                )
                .await?;
                let n = data.len() as i64;
                total += n;
                offsets.add(stream, n);
            }
            if cut {
                limit_reached = true;
                break;
            }
        }
        let stdout = offsets.stdout - stored_before.stdout;
        let stderr = offsets.stderr - stored_before.stderr;
        if stdout + stderr > 0 {
            let sql = guarded_update(
                "stdout_bytes = stdout_bytes + $1, stderr_bytes = stderr_bytes + $2, \
                 output_bytes = output_bytes + $3, last_output_at = $4",
                4,
            );
            let q = sqlx::query(&sql)
                .bind(stdout)
                .bind(stderr)
                .bind(stdout + stderr)
                .bind(now);
            one_row(guarded(q, &loaded).execute(&mut *tx).await.map_err(db)?)?;
            sqlx::query(
                "UPDATE attempts SET stdout_bytes = $1, stderr_bytes = $2 \
                 WHERE run_id = $3 AND attempt = $4",
            )
            .bind(offsets.stdout)
            .bind(offsets.stderr)
            .bind(run_id)
            .bind(i64::from(attempt))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        if !limit_reached {
            self.commit(tx, out).await?;
            return Ok(AppendOutcome::Accepted { last_seq, offsets });
        }
        // The note is not counted against the limit: it is Tether speaking, not the command.
        let note = format!("[tether] output limit of {limit} bytes reached; the run was stopped\n");
        push_event(
            &mut tx,
            &mut out,
            run_id,
            EventKind::Log,
            attempt,
            now,
            json!({ "stream": "stderr" }),
            Some(note.as_bytes()),
        )
        .await?;
        let transition = loaded
            .run
            .state()
            .apply(&Command::Finish {
                attempt,
                worker_id: worker_id.to_string(),
                outcome: AttemptOutcome::Failed {
                    error_code: ErrorCode::OutputLimit,
                },
            })
            .map_err(transition_error)?;
        if let Some(decision) = transition.decision {
            let message = format!("output limit of {limit} bytes reached");
            let ending = Ending {
                exit_code: None,
                error_message: Some(&message),
            };
            end_attempt(&mut tx, &mut out, now, &loaded, decision, ending).await?;
        }
        let run = reload(&mut tx, run_id).await?;
        self.commit(tx, out).await?;
        Ok(AppendOutcome::LimitReached { run: Box::new(run) })
    }

    async fn finish_attempt(
        &self,
        run_id: &str,
        attempt: u32,
        worker_id: &str,
        report: &FinishReport,
    ) -> StoreResult<RunRecord> {
        let (mut tx, now) = self.begin().await?;
        let mut out = Outbox::default();
        let loaded = must_lock(&mut tx, run_id).await?;
        let transition = loaded
            .run
            .state()
            .apply(&Command::Finish {
                attempt,
                worker_id: worker_id.to_string(),
                outcome: report.outcome,
            })
            .map_err(transition_error)?;
        if let Some(decision) = transition.decision {
            let ending = Ending {
                exit_code: report.exit_code,
                error_message: report.error_message.as_deref(),
            };
            end_attempt(&mut tx, &mut out, now, &loaded, decision, ending).await?;
        }
        let run = reload(&mut tx, run_id).await?;
        self.commit(tx, out).await?;
        Ok(run)
    }

    async fn events_after(
        &self,
        run_id: &str,
        after_seq: i64,
        limit: u32,
    ) -> StoreResult<Vec<EventRecord>> {
        let limit = match limit {
            0 => 1000,
            n => n.min(10_000),
        };
        let rows = sqlx::query(&format!(
            "{EVENT_SELECT} WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        ))
        .bind(run_id)
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(db)?;
        rows.iter().map(decode_event).collect()
    }

    async fn events_before(
        &self,
        run_id: &str,
        before_seq: i64,
        limit: u32,
    ) -> StoreResult<Vec<EventRecord>> {
        let limit = match limit {
            0 => 1000,
            n => n.min(10_000),
        };
        // Served by the primary key (run_id, seq), read backwards.
        let rows = sqlx::query(&format!(
            "{EVENT_SELECT} WHERE run_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
        ))
        .bind(run_id)
        .bind(before_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(db)?;
        rows.iter().map(decode_event).collect()
    }

    fn subscribe(&self) -> broadcast::Receiver<Signal> {
        self.inner.signals.subscribe()
    }

    async fn reap_stale_runs(&self, policy: &ReapPolicy) -> StoreResult<ReapReport> {
        let (mut tx, now) = self.begin().await?;
        // One sweep at a time across every server on this schema: the lock is held until this
        // transaction ends. A server that finds it taken leaves the sweep to the holder.
        let got: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext(current_schema()))")
                .bind(REAPER_LOCK)
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
        if !got {
            return Ok(ReapReport {
                reaped: Vec::new(),
                swept: false,
            });
        }
        let mut out = Outbox::default();
        let batch = i64::from(policy.batch.max(1));
        let rows = sqlx::query(REAP_QUERY)
            .bind(now)
            .bind(now.saturating_sub(policy.timeout_grace_ms))
            .bind(now.saturating_sub(policy.cancel_stale_after_ms))
            .bind(batch)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
        let mut reaped = Vec::new();
        // In seq order, the order every multi-run writer locks in.
        for row in rows {
            let run_id: String = row.try_get("id").map_err(db)?;
            // A run a worker call is writing right now is skipped, not waited on: that call
            // is a sign of life, and the next sweep judges the run afresh.
            let Some(loaded) = load_run(&mut tx, &run_id, Lock::Skip).await? else {
                continue;
            };
            // Judged again on the row as locked: a run another sweep has already ended is no
            // longer in flight, and one that heartbeated is no longer due.
            let deadlines = tether_store::ReapDeadlines {
                stale_at: loaded.stale_at,
                timeout_at: loaded.timeout_at,
                confirmed: loaded.confirmed,
            };
            let Some(code) = tether_store::reap_reason(&loaded.run, deadlines, now, policy) else {
                continue;
            };
            if let Some(r) = reap_one(&mut tx, &mut out, now, &loaded, code).await? {
                reaped.push(r);
            }
        }
        self.commit(tx, out).await?;
        Ok(ReapReport {
            reaped,
            swept: true,
        })
    }

    async fn next_reap_deadline(&self, policy: &ReapPolicy) -> StoreResult<Option<Millis>> {
        let row = sqlx::query(&format!(
            "SELECT \
               (SELECT min(stale_at) FROM runs WHERE status IN {IN_FLIGHT}) AS stale, \
               (SELECT min(timeout_at) FROM runs WHERE status IN {IN_FLIGHT}) AS timeout, \
               (SELECT min(coalesce(last_heartbeat_at, claimed_at)) FROM runs \
                  WHERE status IN {IN_FLIGHT} AND cancel_requested_at IS NOT NULL) AS cancel"
        ))
        .fetch_one(&self.inner.pool)
        .await
        .map_err(db)?;
        let stale: Option<Millis> = row.try_get("stale").map_err(db)?;
        let timeout: Option<Millis> = row.try_get("timeout").map_err(db)?;
        let cancel: Option<Millis> = row.try_get("cancel").map_err(db)?;
        Ok([
            stale,
            timeout.map(|t| t.saturating_add(policy.timeout_grace_ms)),
            cancel.map(|c| c.saturating_add(policy.cancel_stale_after_ms)),
        ]
        .into_iter()
        .flatten()
        .min())
    }

    async fn grant_heartbeat_grace(&self) -> StoreResult<u64> {
        let (mut tx, now) = self.begin().await?;
        // Only a deadline moves, never earlier; status and attempt are untouched, so this
        // needs no conditional write and cannot race a transition into a wrong state.
        let moved = sqlx::query(&format!(
            "UPDATE runs SET stale_at = $1 + heartbeat_timeout_ms \
             WHERE status IN {IN_FLIGHT} AND stale_at IS NOT NULL \
             AND stale_at < $1 + heartbeat_timeout_ms"
        ))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        self.commit(tx, Outbox::default()).await?;
        Ok(moved)
    }

    async fn prune_finished_runs(
        &self,
        lane: &str,
        retention_ms: i64,
        batch: u32,
    ) -> StoreResult<u64> {
        // One statement, so no transaction stays open between round trips: a pass never
        // holds locks while its caller waits (a paused or cancelled pruner leaves nothing
        // locked). SKIP LOCKED: a row someone else holds is left for the next pass, so pruning
        // never waits on (or blocks) anyone for long. Terminal is final, so nobody else
        // writes these rows; the children go first within the statement, so the foreign keys
        // hold when it ends. The cutoff is by the database's clock, like every stamp.
        // `synchronous_commit` off for this statement's transaction alone (an InitPlan, run
        // once): a prune lost to a crash is pruned again, so its commit need not wait for the
        // disk, and a pass adds no fsync of its own for every submission to queue behind.
        let deleted = sqlx::query(
            "WITH doomed AS ( \
                 SELECT id FROM runs \
                 WHERE lane = $1 AND status IN ('succeeded', 'failed', 'cancelled', 'timed_out') \
                 AND finished_at < tether_now_ms() - $2 \
                 AND (SELECT set_config('synchronous_commit', 'off', true)) = 'off' \
                 ORDER BY finished_at LIMIT $3 FOR UPDATE SKIP LOCKED), \
             events AS (DELETE FROM run_events WHERE run_id IN (SELECT id FROM doomed)), \
             tries AS (DELETE FROM attempts WHERE run_id IN (SELECT id FROM doomed)) \
             DELETE FROM runs WHERE id IN (SELECT id FROM doomed)",
        )
        .bind(lane)
        .bind(retention_ms.max(0))
        .bind(i64::from(batch.max(1)))
        .execute(self.pool())
        .await
        .map_err(db)?;
        Ok(deleted.rows_affected())
    }
}
