//! Tether's embedded store: SQLite through sqlx, in WAL mode, migrations embedded.
//!
//! Every write runs on one writer connection (a pool of one) inside `BEGIN IMMEDIATE`, so
//! writers in this process queue up instead of failing with `SQLITE_BUSY`, and a writer in
//! another process waits on the busy timeout. Reads use a separate small pool and, thanks to
//! WAL, never wait for a writer.

mod endpoints;
mod lanes;
mod rows;
// Bulk history and schema hooks for `tether bench` and tests, never for the server.
#[cfg(feature = "seed")]
mod seed;
mod write;

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde_json::json;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection, Transaction};
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

use crate::rows::{
    decode_attempt, decode_event, decode_run, decode_worker, to_u32, Loaded, ATTEMPT_SELECT,
    EVENT_SELECT, RUN_SELECT, WORKER_SELECT,
};
use crate::write::{
    end_attempt, guard, guarded, load_run, one_row, push_event, push_status, transition_error,
    Ending,
};
use tether_store::{batch_entry, status_body, BatchAdmission, Outbox};

/// Any database failure: the request may be retried. A value that would not decode is a
/// different matter (as on PostgreSQL): the data is not what this code wrote.
pub(crate) fn db(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StoreError::corrupt(e),
        _ => StoreError::unavailable(e),
    }
}

/// The store's clock. Each transaction reads it once and uses that one value throughout.
fn clock() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

fn encode<T: serde::Serialize>(value: &T, what: &str) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::corrupt_while(what, e))
}

const IN_FLIGHT: &str = "('claimed', 'running')";
const PENDING: &str = "('pending', 'queued')";
/// How many pending runs one claim looks at before giving up on finding more that fit.
const CLAIM_SCAN_LIMIT: usize = 2048;
const CLAIM_PAGE: i64 = 256;

/// The embedded store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    signals: broadcast::Sender<Signal>,
}

/// Creates the database file (and any missing directories) readable by this user alone: new
/// directories 0700, the file 0600 (an existing file is narrowed to 0600). SQLite gives its
/// `-wal` and `-shm` files the database file's mode, so they are private too.
fn make_private_file(path: &Path) -> StoreResult<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let failed = |what: &Path, e: std::io::Error| {
        StoreError::unavailable_while(format!("creating {}", what.display()), e)
    };
    if let Some(parent) = path.parent().filter(|p| *p != Path::new("")) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| failed(parent, e))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| failed(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| failed(path, e))
}

impl SqliteStore {
    /// Opens (creating if missing) the database at a URL like `sqlite://./.tether/tether.db`
    /// and applies the embedded migrations.
    pub async fn open(url: &str) -> StoreResult<SqliteStore> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(db)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        if !in_memory {
            make_private_file(options.get_filename())?;
        }
        // The one writer connection is kept for the store's life: an in-memory database dies
        // with its connection, and a file's is cheap to keep.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await
            .map_err(db)?;
        sqlx::migrate!()
            .run(&writer)
            .await
            .map_err(|e| StoreError::unavailable_while("migrating", e))?;
        // An in-memory database lives in one connection: read through the writer too.
        let reader = if in_memory {
            writer.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(options)
                .await
                .map_err(db)?
        };
        Ok(SqliteStore {
            writer,
            reader,
            signals: tether_store::signal_channel(),
        })
    }

    /// A write transaction. Dropping it without commit (an error, or a cancelled future)
    /// rolls it back before the connection is used again.
    ///
    /// Beginning runs in a task of its own: a request dropped mid-begin (a client that hung
    /// up) must not leave the single writer holding a transaction nobody owns, which sqlx
    /// can do when BEGIN is acknowledged before its `Transaction` exists. Should that ever
    /// happen anyway, the stuck connection is retired and a fresh one opened.
    async fn begin(&self) -> StoreResult<Transaction<'static, sqlx::Sqlite>> {
        let writer = self.writer.clone();
        let begun = tokio::spawn(async move {
            match writer.begin_with("BEGIN IMMEDIATE").await {
                Err(sqlx::Error::InvalidSavePointStatement) => {
                    tracing::warn!("the writer was left inside a transaction; reopening it");
                    writer.acquire().await?.close().await?;
                    writer.begin_with("BEGIN IMMEDIATE").await
                }
                other => other,
            }
        });
        begun
            .await
            .map_err(|e| StoreError::unavailable_while("beginning a transaction", e))?
            .map_err(db)
    }

    async fn commit(&self, tx: Transaction<'static, sqlx::Sqlite>, out: Outbox) -> StoreResult<()> {
        tx.commit().await.map_err(db)?;
        for signal in out.into_signals() {
            // No receivers is fine: nobody is waiting.
            let _ = self.signals.send(signal);
        }
        Ok(())
    }

    /// Accepts a run, deciding its admission first when a policy is given, in one transaction.
    async fn create(
        &self,
        spec: &RunSpec,
        policy: Option<&AdmissionPolicy>,
    ) -> StoreResult<Admission> {
        let mut tx = self.begin().await?;
        let mut out = Outbox::default();
        let admission = insert_run(&mut tx, &mut out, clock(), spec, policy).await?;
        // A refusal or a replayed key wrote nothing: dropping the transaction rolls it back.
        if matches!(&admission, Admission::Accepted(created) if created.created) {
            self.commit(tx, out).await?;
        }
        Ok(admission)
    }

    async fn read_run(&self, run_id: &str) -> StoreResult<Option<RunRecord>> {
        let mut conn = self.reader.acquire().await.map_err(db)?;
        Ok(load_run(&mut conn, run_id).await?.map(|l| l.run))
    }
}

/// Accepts a run inside the caller's transaction, deciding its admission first when a policy
/// is given, or answers the run an identical submission under the same key already made. The
/// caller commits (or, on a refusal, drops the transaction).
async fn insert_run(
    tx: &mut SqliteConnection,
    out: &mut Outbox,
    now: Millis,
    spec: &RunSpec,
    policy: Option<&AdmissionPolicy>,
) -> StoreResult<Admission> {
    if let Some(key) = &spec.idempotency_key {
        let existing =
            sqlx::query("SELECT id, request_fingerprint FROM runs WHERE idempotency_key = ?")
                .bind(key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
        if let Some(row) = existing {
            let run_id: String = row.try_get("id").map_err(db)?;
            let fingerprint: String = row.try_get("request_fingerprint").map_err(db)?;
            if fingerprint != spec.request_fingerprint {
                return Err(StoreError::IdempotencyConflict { run_id });
            }
            let run = reload(&mut *tx, &run_id).await?;
            return Ok(Admission::Accepted(Box::new(CreatedRun {
                run,
                created: false,
            })));
        }
    }
    if let Some(policy) = policy {
        if let Some(refusal) = admission_refusal(&mut *tx, now, spec, policy).await? {
            return Ok(refusal);
        }
    }
    let id = uuid::Uuid::now_v7().to_string();
    let state = RunState::new(spec.max_attempts);
    sqlx::query(
        "INSERT INTO runs (id, lane, status, attempt, max_attempts, spec, cpus, memory_mb, \
         created_at, heartbeat_timeout_ms, timeout_ms, output_limit_bytes, idempotency_key, \
         request_fingerprint) VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&id)
    .bind(&spec.lane)
    .bind(state.status.as_str())
    .bind(i64::from(state.max_attempts))
    .bind(tether_store::encode_spec(spec)?)
    .bind(spec.resources.cpus)
    .bind(spec.resources.memory_mb as i64)
    .bind(now)
    .bind(spec.heartbeat_timeout_ms)
    .bind(spec.timeout_ms)
    .bind(spec.output_limit_bytes)
    .bind(spec.idempotency_key.as_deref())
    .bind(&spec.request_fingerprint)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    let body = status_body(RunStatus::Pending, 0, None, None);
    push_status(&mut *tx, out, &id, now, body, RunStatus::Pending, 0).await?;
    out.run_pending(&spec.lane);
    let run = reload(&mut *tx, &id).await?;
    Ok(Admission::Accepted(Box::new(CreatedRun {
        run,
        created: true,
    })))
}

/// Loads a run for a worker call, or `NotFound`.
async fn must_load(conn: &mut SqliteConnection, run_id: &str) -> StoreResult<Loaded> {
    load_run(conn, run_id).await?.ok_or(StoreError::NotFound)
}

/// What an attempt has stored of each stream (zero for an attempt with no row yet).
async fn attempt_offsets(
    conn: &mut SqliteConnection,
    run_id: &str,
    attempt: u32,
) -> StoreResult<StreamOffsets> {
    let row = sqlx::query(
        "SELECT stdout_bytes, stderr_bytes FROM attempts WHERE run_id = ? AND attempt = ?",
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

async fn reload(conn: &mut SqliteConnection, run_id: &str) -> StoreResult<RunRecord> {
    Ok(must_load(conn, run_id).await?.run)
}

/// A worker that may still act: registered and not deregistered.
async fn live_worker(conn: &mut SqliteConnection, worker_id: &str) -> StoreResult<WorkerRecord> {
    let row = sqlx::query(&format!("{WORKER_SELECT} WHERE id = ?"))
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
    conn: &mut SqliteConnection,
    worker_id: &str,
) -> StoreResult<(Vec<(String, u32)>, Resources)> {
    let rows = sqlx::query(&format!(
        "SELECT id, attempt, cpus, memory_mb FROM runs \
         WHERE worker_id = ? AND status IN {IN_FLIGHT} ORDER BY seq"
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

/// Why a submission may not be accepted now, judged inside the accepting transaction.
async fn admission_refusal(
    conn: &mut SqliteConnection,
    now: Millis,
    spec: &RunSpec,
    policy: &AdmissionPolicy,
) -> StoreResult<Option<Admission>> {
    let rows = sqlx::query(&format!(
        "{WORKER_SELECT} WHERE deregistered_at IS NULL AND draining = 0 \
         AND last_heartbeat_at >= ?"
    ))
    .bind(now.saturating_sub(policy.worker_fresh_ms))
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    let mut serving = Vec::new();
    for row in &rows {
        let (worker, _) = decode_worker(row)?;
        if worker.lanes.is_empty() || worker.lanes.contains(&spec.lane) {
            serving.push(worker);
        }
    }
    let needs = spec.resources;
    if !serving.is_empty() && !serving.iter().any(|w| needs.fits_in(&w.capacity)) {
        return Ok(Some(Admission::NeverFits));
    }
    if !policy.reject_when_full {
        return Ok(None);
    }
    let mut free_cpus = 0.0;
    let mut free_memory: i64 = 0;
    for worker in &serving {
        let (_, reserved) = held_by(conn, &worker.id).await?;
        free_cpus += worker.capacity.cpus - reserved.cpus;
        free_memory += worker.capacity.memory_mb as i64 - reserved.memory_mb as i64;
    }
    // Runs admitted to the lane and not yet claimed have a claim on that room too.
    let waiting = sqlx::query(&format!(
        "SELECT COUNT(*) AS n, COALESCE(SUM(cpus), 0.0) AS cpus, \
         COALESCE(SUM(memory_mb), 0) AS memory_mb FROM runs \
         WHERE lane = ? AND status IN {PENDING} AND cancel_requested_at IS NULL"
    ))
    .bind(&spec.lane)
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    free_cpus -= waiting.try_get::<f64, _>("cpus").map_err(db)?;
    free_memory -= waiting.try_get::<i64, _>("memory_mb").map_err(db)?;
    let room = Resources {
        cpus: free_cpus,
        memory_mb: free_memory.max(0) as u64,
    };
    if free_memory < 0 || !needs.fits_in(&room) {
        return Ok(Some(Admission::LaneFull));
    }
    if let Some(max) = policy.max_concurrency {
        let in_flight: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM runs WHERE lane = ? AND status IN {IN_FLIGHT}"
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

/// Ends a run's current attempt as the reaper would, with `error_code`, if it is still the
/// attempt judged. Answers what happened, or `None` if the run had moved on.
async fn reap_one(
    conn: &mut SqliteConnection,
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
impl Store for SqliteStore {
    async fn now(&self) -> StoreResult<Millis> {
        Ok(clock())
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn create_run(&self, spec: &RunSpec) -> StoreResult<CreatedRun> {
        match self.create(spec, None).await? {
            Admission::Accepted(created) => Ok(*created),
            // Without a policy nothing is refused; kept total rather than panicking.
            Admission::LaneFull | Admission::NeverFits => Err(StoreError::corrupt(
                "a run without an admission policy was refused",
            )),
        }
    }

    async fn admit_run(&self, spec: &RunSpec, policy: &AdmissionPolicy) -> StoreResult<Admission> {
        self.create(spec, Some(policy)).await
    }

    async fn admit_runs(
        &self,
        batch: &[(RunSpec, AdmissionPolicy)],
    ) -> StoreResult<BatchAdmission> {
        let mut tx = self.begin().await?;
        let now = clock();
        let mut out = Outbox::default();
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
        let mut sql = format!("{RUN_SELECT} WHERE 1 = 1");
        if after.is_some() {
            sql.push_str(" AND r.seq < ?");
        }
        if let Some(status) = filter.status {
            if status == RunStatus::Pending {
                sql.push_str(&format!(" AND r.status IN {PENDING}"));
            } else {
                sql.push_str(" AND r.status = ?");
            }
        }
        if filter.lane.is_some() {
            sql.push_str(" AND r.lane = ?");
        }
        let prefix = filter.id_range();
        if let Some((_, end)) = &prefix {
            sql.push_str(" AND r.id >= ?");
            if end.is_some() {
                sql.push_str(" AND r.id < ?");
            }
        }
        sql.push_str(" ORDER BY r.seq DESC LIMIT ?");
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
            .fetch_all(&self.reader)
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
            "{ATTEMPT_SELECT} WHERE a.run_id = ? ORDER BY a.attempt"
        ))
        .bind(run_id)
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        rows.iter().map(decode_attempt).collect()
    }

    async fn request_cancel(&self, run_id: &str) -> StoreResult<RunRecord> {
        let mut tx = self.begin().await?;
        let now = clock();
        let mut out = Outbox::default();
        let loaded = must_load(&mut tx, run_id).await?;
        let transition = loaded
            .run
            .state()
            .apply(&Command::Cancel)
            .map_err(transition_error)?;
        // Keep the first request's stamp: the cancel deadline runs from it.
        let q = sqlx::query(concat!(
            "UPDATE runs SET cancel_requested_at = coalesce(cancel_requested_at, ?)",
            guard!()
        ))
        .bind(now);
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
        let mut tx = self.begin().await?;
        let now = clock();
        let id = uuid::Uuid::now_v7().to_string();
        sqlx::query(
            "INSERT INTO workers (id, name, cpus, memory_mb, lanes, labels, registered_at, \
             last_heartbeat_at, secret_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&worker.name)
        .bind(worker.capacity.cpus)
        .bind(worker.capacity.memory_mb as i64)
        .bind(encode(&worker.lanes, "worker lanes")?)
        .bind(encode(&worker.labels, "worker labels")?)
        .bind(now)
        .bind(now)
        .bind(&worker.secret_hash)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let record = live_worker(&mut tx, &id).await?;
        self.commit(tx, Outbox::default()).await?;
        Ok(record)
    }

    async fn worker_secret_hash(&self, worker_id: &str) -> StoreResult<Option<String>> {
        let row =
            sqlx::query("SELECT secret_hash FROM workers WHERE id = ? AND deregistered_at IS NULL")
                .bind(worker_id)
                .fetch_optional(&self.reader)
                .await
                .map_err(db)?;
        match row {
            Some(row) => row.try_get("secret_hash").map_err(db),
            None => Err(StoreError::UnknownWorker),
        }
    }

    async fn deregister_worker(&self, worker_id: &str) -> StoreResult<Vec<String>> {
        let mut tx = self.begin().await?;
        let now = clock();
        let mut out = Outbox::default();
        let row = sqlx::query("SELECT deregistered_at FROM workers WHERE id = ?")
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
        sqlx::query("UPDATE workers SET deregistered_at = ? WHERE id = ?")
            .bind(now)
            .bind(worker_id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let (held, _) = held_by(&mut tx, worker_id).await?;
        let mut handed_back = Vec::with_capacity(held.len());
        for (run_id, _) in held {
            let Some(loaded) = load_run(&mut tx, &run_id).await? else {
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
        let mut tx = self.begin().await?;
        live_worker(&mut tx, worker_id).await?;
        sqlx::query("UPDATE workers SET draining = 1 WHERE id = ? AND deregistered_at IS NULL")
            .bind(worker_id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        self.commit(tx, Outbox::default()).await
    }

    async fn lane_loads(&self) -> StoreResult<Vec<tether_store::LaneLoad>> {
        lanes::lane_loads(&self.reader).await
    }

    async fn list_workers(&self) -> StoreResult<Vec<WorkerRecord>> {
        let mut conn = self.reader.acquire().await.map_err(db)?;
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
        let mut tx = self.begin().await?;
        let now = clock();
        let mut out = Outbox::default();
        let worker = live_worker(&mut tx, worker_id).await?;
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

        // Lanes with a ceiling: how many runs each has in flight now, and its ceiling.
        let mut lane_room: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
        for (lane, max) in &limits.lane_max_concurrency {
            let n: i64 = sqlx::query_scalar(&format!(
                "SELECT COUNT(*) FROM runs WHERE lane = ? AND status IN {IN_FLIGHT}"
            ))
            .bind(lane)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
            lane_room.insert(lane.as_str(), (n.max(0) as u32, *max));
        }

        let mut sql = format!(
            "SELECT seq, id, lane, cpus, memory_mb FROM runs WHERE status IN {PENDING} \
             AND cancel_requested_at IS NULL AND seq > ?"
        );
        if !worker.lanes.is_empty() {
            let marks = vec!["?"; worker.lanes.len()].join(", ");
            sql.push_str(&format!(" AND lane IN ({marks})"));
        }
        sql.push_str(" ORDER BY seq LIMIT ?");

        let mut claimed: Vec<String> = Vec::new();
        let mut after_seq = 0_i64;
        let mut scanned = 0_usize;
        'scan: loop {
            let mut query = sqlx::query(&sql).bind(after_seq);
            for lane in &worker.lanes {
                query = query.bind(lane.as_str());
            }
            let rows = query
                .bind(CLAIM_PAGE)
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?;
            if rows.is_empty() {
                break;
            }
            scanned += rows.len();
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
                let Some(loaded) = load_run(&mut tx, &run_id).await? else {
                    continue;
                };
                let Ok(transition) = loaded.run.state().apply(&Command::Claim {
                    worker_id: worker_id.to_string(),
                }) else {
                    continue;
                };
                let attempt = transition.next.attempt;
                let q = sqlx::query(concat!(
                    "UPDATE runs SET status = ?, attempt = ?, worker_id = ?, claimed_at = ?, \
                     started_at = NULL, last_heartbeat_at = ?, confirmed = 0, \
                     stale_at = ? + heartbeat_timeout_ms, timeout_at = ? + timeout_ms",
                    guard!()
                ))
                .bind(transition.next.status.as_str())
                .bind(i64::from(attempt))
                .bind(worker_id)
                .bind(now)
                .bind(now)
                .bind(now)
                .bind(now);
                let result = guarded(q, &loaded).execute(&mut *tx).await.map_err(db)?;
                if result.rows_affected() != 1 {
                    // Someone else took it between our read and write: not ours.
                    continue;
                }
                sqlx::query(
                    "INSERT INTO attempts (run_id, attempt, worker_id, claimed_at) \
                     VALUES (?, ?, ?, ?)",
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
            if scanned >= CLAIM_SCAN_LIMIT || room_cpus <= 1e-9 || room_memory == 0 {
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
        let mut tx = self.begin().await?;
        let now = clock();
        live_worker(&mut tx, worker_id).await?;
        sqlx::query("UPDATE workers SET last_heartbeat_at = ? WHERE id = ?")
            .bind(now)
            .bind(worker_id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let mut answer = HeartbeatAnswer::default();
        for beat in beats {
            let reference = RunRef {
                run_id: beat.run_id.clone(),
                attempt: beat.attempt,
            };
            let Some(loaded) = load_run(&mut tx, &beat.run_id).await? else {
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
            let q = sqlx::query(concat!(
                "UPDATE runs SET last_heartbeat_at = ?, stale_at = ? + heartbeat_timeout_ms, \
                 confirmed = 1, reported_stdout_bytes = ?, reported_stderr_bytes = ?",
                guard!(),
                " \
                 AND worker_id = ?"
            ))
            .bind(now)
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
        let mut tx = self.begin().await?;
        let now = clock();
        let mut out = Outbox::default();
        let loaded = must_load(&mut tx, run_id).await?;
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
        let q = sqlx::query(concat!(
            "UPDATE runs SET status = ?, started_at = ?, confirmed = 1, last_heartbeat_at = ?, \
             stale_at = ? + heartbeat_timeout_ms, timeout_at = ? + timeout_ms",
            guard!()
        ))
        .bind(transition.next.status.as_str())
        .bind(now)
        .bind(now)
        .bind(now)
        .bind(now);
        one_row(guarded(q, &loaded).execute(&mut *tx).await.map_err(db)?)?;
        sqlx::query("UPDATE attempts SET started_at = ? WHERE run_id = ? AND attempt = ?")
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
        let mut tx = self.begin().await?;
        let now = clock();
        let mut out = Outbox::default();
        let loaded = must_load(&mut tx, run_id).await?;
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
            let q = sqlx::query(concat!("UPDATE runs SET stdout_bytes = stdout_bytes + ?, stderr_bytes = stderr_bytes + ?, \
                 output_bytes = output_bytes + ?, last_output_at = ?", guard!()))
            .bind(stdout)
            .bind(stderr)
            .bind(stdout + stderr)
            .bind(now);
            one_row(guarded(q, &loaded).execute(&mut *tx).await.map_err(db)?)?;
            sqlx::query(
                "UPDATE attempts SET stdout_bytes = ?, stderr_bytes = ? \
                 WHERE run_id = ? AND attempt = ?",
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
        let mut tx = self.begin().await?;
        let now = clock();
        let mut out = Outbox::default();
        let loaded = must_load(&mut tx, run_id).await?;
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
            "{EVENT_SELECT} WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?"
        ))
        .bind(run_id)
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
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
            "{EVENT_SELECT} WHERE run_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?"
        ))
        .bind(run_id)
        .bind(before_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        rows.iter().map(decode_event).collect()
    }

    fn subscribe(&self) -> broadcast::Receiver<Signal> {
        self.signals.subscribe()
    }

    async fn reap_stale_runs(&self, policy: &ReapPolicy) -> StoreResult<ReapReport> {
        let mut tx = self.begin().await?;
        let now = clock();
        let mut out = Outbox::default();
        let batch = i64::from(policy.batch.max(1));
        // One query per deadline, each served by its partial index over in-flight rows.
        // `INDEXED BY` pins the index (SQLite refuses the query rather than scan without it):
        // on a young database without statistics the planner would pick `runs_status_seq`.
        let queries = [
            (
                format!(
                    "SELECT seq, id FROM runs INDEXED BY runs_stale_at \
                     WHERE status IN {IN_FLIGHT} AND stale_at < ? ORDER BY stale_at LIMIT ?"
                ),
                now,
            ),
            (
                format!(
                    "SELECT seq, id FROM runs INDEXED BY runs_timeout_at \
                     WHERE status IN {IN_FLIGHT} AND timeout_at < ? ORDER BY timeout_at LIMIT ?"
                ),
                now.saturating_sub(policy.timeout_grace_ms),
            ),
            (
                format!(
                    "SELECT seq, id FROM runs INDEXED BY runs_cancel_requested \
                     WHERE status IN {IN_FLIGHT} AND cancel_requested_at IS NOT NULL \
                     AND coalesce(last_heartbeat_at, claimed_at) < ? LIMIT ?"
                ),
                now.saturating_sub(policy.cancel_stale_after_ms),
            ),
        ];
        let mut due: BTreeMap<i64, String> = BTreeMap::new();
        for (sql, bound) in &queries {
            let rows = sqlx::query(sql)
                .bind(*bound)
                .bind(batch)
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?;
            for row in rows {
                due.insert(
                    row.try_get("seq").map_err(db)?,
                    row.try_get("id").map_err(db)?,
                );
            }
        }
        let mut reaped = Vec::new();
        for run_id in due.into_values().take(batch as usize) {
            let Some(loaded) = load_run(&mut tx, &run_id).await? else {
                continue;
            };
            // Judged again on the row as loaded in this transaction: a run another sweep has
            // already ended is no longer in flight, and one that heartbeated is no longer due.
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
               (SELECT MIN(stale_at) FROM runs INDEXED BY runs_stale_at \
                  WHERE status IN {IN_FLIGHT}) AS stale, \
               (SELECT MIN(timeout_at) FROM runs INDEXED BY runs_timeout_at \
                  WHERE status IN {IN_FLIGHT}) AS timeout, \
               (SELECT MIN(coalesce(last_heartbeat_at, claimed_at)) \
                  FROM runs INDEXED BY runs_cancel_requested \
                  WHERE status IN {IN_FLIGHT} AND cancel_requested_at IS NOT NULL) AS cancel"
        ))
        .fetch_one(&self.reader)
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
        let mut tx = self.begin().await?;
        let now = clock();
        // Served by the partial index over in-flight rows; no status or attempt changes, so
        // no conditional write is needed: only a deadline moves, never earlier.
        let moved = sqlx::query(&format!(
            "UPDATE runs SET stale_at = MAX(stale_at, ? + heartbeat_timeout_ms) \
             WHERE status IN {IN_FLIGHT} AND stale_at IS NOT NULL \
             AND stale_at < ? + heartbeat_timeout_ms"
        ))
        .bind(now)
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
        let mut tx = self.begin().await?;
        let cutoff = clock().saturating_sub(retention_ms.max(0));
        // One selection, used by each delete in turn: inside this write transaction nothing
        // else writes, and a terminal run never changes, so all three see the same runs. The
        // run rows go last, after what refers to them.
        let selection = "SELECT id FROM runs INDEXED BY runs_finished_lane \
             WHERE lane = ? AND status IN ('succeeded', 'failed', 'cancelled', 'timed_out') \
             AND finished_at < ? ORDER BY finished_at LIMIT ?";
        let mut deleted = 0;
        for table in [
            "DELETE FROM run_events WHERE run_id IN",
            "DELETE FROM attempts WHERE run_id IN",
            "DELETE FROM runs WHERE id IN",
        ] {
            deleted = sqlx::query(&format!("{table} ({selection})"))
                .bind(lane)
                .bind(cutoff)
                .bind(i64::from(batch.max(1)))
                .execute(&mut *tx)
                .await
                .map_err(db)?
                .rows_affected();
        }
        self.commit(tx, Outbox::default()).await?;
        Ok(deleted)
    }
}
