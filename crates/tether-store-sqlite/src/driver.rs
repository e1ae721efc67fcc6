//! The SQLite store's primitives: one method per query, named by intent. The decisions live in
//! `tether-store`'s engine. Locks are no-ops here: every write transaction is `BEGIN
//! IMMEDIATE` on the one writer, so it is alone.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde_json::{json, Value};
use sqlx::sqlite::SqliteQueryResult;
use sqlx::{Row, Sqlite, SqliteConnection, Transaction};
use tether_domain::{Millis, Resources, RunSpec, RunStatus};
use tether_store::driver::{
    by_kind, AttemptClose, ChangeKind, EarliestDeadlines, EventRange, Flush, KeyedRun, LoadedRun,
    Lock, NewAttempt, NewEvent, PendingRun, RunChange, RunWrite, Waiting,
};
use tether_store::{
    AttemptRecord, Driver, DriverTx, EventRecord, LaneFlight, LaneQueue, NewWorker, Outbox,
    ReapPolicy, RunFilter, RunRecord, Signal, StoreResult, StreamOffsets, WorkerRecord,
};
use tokio::sync::broadcast;

use crate::rows::{
    decode_attempt, decode_event, decode_run, decode_worker, resources, to_u32, ATTEMPT_SELECT,
    EVENT_SELECT, RUN_RETURNING, RUN_SELECT, RUN_SELECT_IN_TX, WORKER_SELECT,
};
use crate::{clock, db, encode, lanes, SqliteStore, IN_FLIGHT, PENDING};

/// A write transaction on the writer, with the clock read once for all of it.
pub struct SqliteTx {
    pub(crate) tx: Transaction<'static, Sqlite>,
    pub(crate) now: Millis,
}

/// Set-based writes gathered into one round trip to SQLite's thread: statements separated by
/// `;`. Their parameters are all anonymous (`?`), bound in the order they appear across the
/// statements (a numbered one would leave gaps that sqlx binds wrongly), so each statement
/// names the clock once, in its row source, and reads its rows from a JSON parameter. Only
/// the run writes return rows.
#[derive(Default)]
struct Statements {
    sql: Vec<String>,
    binds: Vec<Bind>,
}

/// A parameter of [`Statements`], in order.
enum Bind {
    Now,
    Rows(String),
}

impl Statements {
    /// A statement whose parameters are `?` (the clock) then `?` (its rows), in that order.
    fn push(&mut self, sql: String, rows: String) {
        self.sql.push(sql);
        self.binds.push(Bind::Now);
        self.binds.push(Bind::Rows(rows));
    }

    /// One statement per kind of change (see [`write_sql`]).
    fn write_runs(&mut self, writes: &[RunWrite]) {
        for (kind, group) in by_kind(writes) {
            let rows: Vec<Value> = group
                .iter()
                .map(|w| {
                    let [p1, p2, p3, p4, p5, p6] = change_values(&w.change);
                    json!([
                        w.run_id,
                        w.status,
                        w.attempt,
                        w.last_event_seq,
                        p1,
                        p2,
                        p3,
                        p4,
                        p5,
                        p6
                    ])
                })
                .collect();
            self.push(write_sql(kind), Value::Array(rows).to_string());
        }
    }

    fn set_last_event_seqs(&mut self, seqs: &[(String, i64)]) -> StoreResult<()> {
        self.sql.push(
            "UPDATE runs AS r SET last_event_seq = v.seq FROM \
             (SELECT value ->> 0 AS id, value ->> 1 AS seq FROM json_each(?)) AS v \
             WHERE r.id = v.id"
                .into(),
        );
        self.binds.push(Bind::Rows(encode(&seqs, "event seqs")?));
        Ok(())
    }

    fn insert_events(&mut self, events: &[NewEvent]) {
        // Output bytes travel as hex inside the JSON, `unhex`ed into the blob.
        let rows: Vec<Value> = events
            .iter()
            .map(|e| {
                json!([
                    e.run_id,
                    e.seq,
                    e.body.kind().as_str(),
                    e.attempt,
                    e.body.to_json().to_string(),
                    e.data.as_deref().map(hex),
                ])
            })
            .collect();
        self.push(
            "INSERT INTO run_events (run_id, seq, kind, attempt, ts, body, data) \
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, ?, value ->> 4, \
             unhex(value ->> 5) FROM json_each(?)"
                .into(),
            Value::Array(rows).to_string(),
        );
    }

    fn insert_attempts(&mut self, attempts: &[NewAttempt]) {
        let rows: Vec<Value> = attempts
            .iter()
            .map(|a| json!([a.run_id, a.attempt, a.worker_id]))
            .collect();
        self.push(
            "INSERT INTO attempts (run_id, attempt, worker_id, claimed_at) \
             SELECT value ->> 0, value ->> 1, value ->> 2, ? FROM json_each(?)"
                .into(),
            Value::Array(rows).to_string(),
        );
    }

    fn stamp_attempts_started(&mut self, attempts: &[(String, u32, Millis)]) -> StoreResult<()> {
        self.push(
            "UPDATE attempts AS a SET started_at = v.at FROM \
             (SELECT ? AS now, value ->> 0 AS run_id, value ->> 1 AS attempt, \
             value ->> 2 AS at FROM json_each(?)) AS v \
             WHERE a.run_id = v.run_id AND a.attempt = v.attempt"
                .into(),
            encode(&attempts, "attempts")?,
        );
        Ok(())
    }

    fn close_attempts(&mut self, ends: &[AttemptClose]) {
        let rows: Vec<Value> = ends
            .iter()
            .map(|c| {
                json!([
                    c.run_id,
                    c.attempt,
                    c.end.status.as_str(),
                    c.end.error_code.map(|e| e.as_str()),
                    c.end.exit_code,
                    c.end.error_message,
                    c.started,
                    c.at,
                ])
            })
            .collect();
        self.push(
            "UPDATE attempts AS a SET finished_at = v.at, status = v.status, \
             error_code = v.error_code, exit_code = v.exit_code, error_message = v.message, \
             started_at = coalesce(v.started, a.started_at) \
             FROM (SELECT ? AS now, value ->> 0 AS run_id, value ->> 1 AS attempt, \
             value ->> 2 AS status, value ->> 3 AS error_code, value ->> 4 AS exit_code, \
             value ->> 5 AS message, value ->> 6 AS started, value ->> 7 AS at \
             FROM json_each(?)) AS v \
             WHERE a.run_id = v.run_id AND a.attempt = v.attempt AND a.status IS NULL"
                .into(),
            Value::Array(rows).to_string(),
        );
    }

    /// Runs them all in one round trip; answers the runs the run writes returned.
    async fn send(self, tx: &mut SqliteTx) -> StoreResult<Vec<LoadedRun>> {
        if self.sql.is_empty() {
            return Ok(Vec::new());
        }
        let sql = self.sql.join("; ");
        let mut query = sqlx::query(&sql);
        for bind in self.binds {
            query = match bind {
                Bind::Now => query.bind(tx.now),
                Bind::Rows(rows) => query.bind(rows),
            };
        }
        let rows = query.fetch_all(&mut *tx.tx).await.map_err(db)?;
        rows.iter().map(decode_run).collect()
    }
}

/// What going back to `pending` clears: everything the next claim stamps afresh.
macro_rules! back_to_pending {
    () => {
        "status = 'pending', worker_id = NULL, claimed_at = NULL, started_at = NULL, \
         last_heartbeat_at = NULL, confirmed = 0, stale_at = NULL, timeout_at = NULL, \
         exit_code = NULL, error_code = NULL, error_message = NULL"
    };
}

/// The `UPDATE` of one kind of change, for any number of runs: two parameters, the
/// transaction's `now` and the runs as a JSON array of `[id, status, attempt, last_event_seq,
/// p1..p6]` ([`change_values`]). Each row lands only if the run still has the status and
/// attempt it was judged on (the guard), even against another process writing the same file;
/// the rows written come back, so nothing is read again.
fn write_sql(kind: ChangeKind) -> String {
    let (set, also) = match kind {
        ChangeKind::Claim => (
            "status = v.p1, attempt = v.p2, worker_id = v.p3, claimed_at = v.now, \
             started_at = NULL, last_heartbeat_at = v.now, confirmed = 0, \
             stale_at = v.now + r.heartbeat_timeout_ms, timeout_at = v.now + r.timeout_ms",
            "",
        ),
        ChangeKind::Start => (
            "status = v.p1, started_at = v.p5, confirmed = 1, last_heartbeat_at = v.now, \
             stale_at = v.now + r.heartbeat_timeout_ms, timeout_at = v.now + r.timeout_ms",
            "",
        ),
        ChangeKind::Heartbeat => (
            "last_heartbeat_at = v.now, stale_at = v.now + r.heartbeat_timeout_ms, confirmed = 1, \
             reported_stdout_bytes = v.p2, reported_stderr_bytes = v.p3",
            " AND r.worker_id = v.p1",
        ),
        ChangeKind::Output => (
            "stdout_bytes = r.stdout_bytes + v.p1, stderr_bytes = r.stderr_bytes + v.p2, \
             output_bytes = r.output_bytes + v.p1 + v.p2, last_output_at = v.now",
            "",
        ),
        ChangeKind::BackToPending => (back_to_pending!(), ""),
        ChangeKind::Release => (
            concat!(
                back_to_pending!(),
                ", released_attempts = r.released_attempts + 1"
            ),
            "",
        ),
        ChangeKind::Finish => (
            "status = v.p1, worker_id = NULL, finished_at = v.p6, stale_at = NULL, \
             timeout_at = NULL, exit_code = v.p2, error_code = v.p3, error_message = v.p4",
            "",
        ),
        ChangeKind::Ran => (
            "status = v.p1, worker_id = NULL, started_at = v.p5, confirmed = 1, \
             last_heartbeat_at = v.now, finished_at = v.p6, stale_at = NULL, \
             timeout_at = NULL, exit_code = v.p2, error_code = v.p3, error_message = v.p4",
            "",
        ),
        ChangeKind::CancelAsked => (
            "cancel_requested_at = coalesce(r.cancel_requested_at, v.now)",
            "",
        ),
    };
    format!(
        "UPDATE runs AS r SET {set}, last_event_seq = v.seq FROM \
         (SELECT ? AS now, value ->> 0 AS id, value ->> 1 AS status, value ->> 2 AS attempt, \
         value ->> 3 AS seq, value ->> 4 AS p1, value ->> 5 AS p2, value ->> 6 AS p3, \
         value ->> 7 AS p4, value ->> 8 AS p5, value ->> 9 AS p6 FROM json_each(?)) AS v \
         WHERE r.id = v.id AND r.status = v.status AND r.attempt = v.attempt{also} \
         RETURNING {RUN_RETURNING}"
    )
}

/// What a change writes beyond its kind, as [`write_sql`] reads it: `p1..p4` by kind, `p5`
/// and `p6` the `started_at` and `finished_at` it stamps.
fn change_values(change: &RunChange) -> [Value; 6] {
    let [p1, p2, p3, p4] = match change {
        RunChange::Claim {
            status,
            attempt,
            worker_id,
        } => [
            json!(status.as_str()),
            json!(attempt),
            json!(worker_id),
            Value::Null,
        ],
        RunChange::Start { status, .. } => [
            json!(status.as_str()),
            Value::Null,
            Value::Null,
            Value::Null,
        ],
        RunChange::Heartbeat {
            worker_id,
            stdout_bytes,
            stderr_bytes,
        } => [
            json!(worker_id),
            json!(stdout_bytes),
            json!(stderr_bytes),
            Value::Null,
        ],
        RunChange::Output { stdout, stderr } => {
            [json!(stdout), json!(stderr), Value::Null, Value::Null]
        }
        RunChange::Finish {
            status,
            exit_code,
            error_code,
            error_message,
            ..
        }
        | RunChange::Ran {
            status,
            exit_code,
            error_code,
            error_message,
            ..
        } => [
            json!(status.as_str()),
            json!(exit_code),
            json!(error_code.map(|c| c.as_str())),
            json!(error_message),
        ],
        RunChange::BackToPending | RunChange::Release | RunChange::CancelAsked => {
            [Value::Null, Value::Null, Value::Null, Value::Null]
        }
    };
    let (started, finished) = change.stamps();
    [p1, p2, p3, p4, json!(started), json!(finished)]
}

fn one_row(result: SqliteQueryResult) -> bool {
    result.rows_affected() == 1
}

/// Lowercase hex, for bytes that travel inside JSON text.
fn hex(data: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(data.len() * 2);
    for byte in data {
        text.push(DIGITS[usize::from(byte >> 4)] as char);
        text.push(DIGITS[usize::from(byte & 0xf)] as char);
    }
    text
}

/// A run by id, read with `select` ([`RUN_SELECT`] or [`RUN_SELECT_IN_TX`]).
async fn load_run(
    conn: &mut SqliteConnection,
    select: &str,
    run_id: &str,
) -> StoreResult<Option<LoadedRun>> {
    let row = sqlx::query(&format!("{select} WHERE r.id = ?"))
        .bind(run_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
    row.as_ref().map(decode_run).transpose()
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
    let mut reserved = Resources::NONE;
    for row in rows {
        runs.push((
            row.try_get::<String, _>("id").map_err(db)?,
            to_u32(row.try_get("attempt").map_err(db)?, "attempt")?,
        ));
        let needs = resources(&row)?;
        reserved.cpus += needs.cpus;
        reserved.memory_mb += needs.memory_mb;
    }
    Ok((runs, reserved))
}

#[async_trait]
impl Driver for SqliteStore {
    type Tx = SqliteTx;

    async fn begin(&self) -> StoreResult<SqliteTx> {
        let tx = SqliteStore::begin(self).await?;
        Ok(SqliteTx { tx, now: clock() })
    }

    async fn commit(&self, tx: SqliteTx, out: Outbox) -> StoreResult<()> {
        SqliteStore::commit(self, tx.tx, out).await
    }

    async fn clock(&self) -> StoreResult<Millis> {
        Ok(clock())
    }

    async fn ping_database(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(db)?;
        Ok(())
    }

    fn signals(&self) -> broadcast::Receiver<Signal> {
        self.signals.subscribe()
    }

    async fn read_run(&self, run_id: &str) -> StoreResult<Option<RunRecord>> {
        let mut conn = self.reader.acquire().await.map_err(db)?;
        Ok(load_run(&mut conn, RUN_SELECT, run_id)
            .await?
            .map(|l| l.run))
    }

    async fn read_runs(
        &self,
        filter: &RunFilter,
        before_seq: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<RunRecord>> {
        let mut sql = format!("{RUN_SELECT} WHERE 1 = 1");
        if before_seq.is_some() {
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
        if let Some(seq) = before_seq {
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
        let rows = query
            .bind(limit)
            .fetch_all(&self.reader)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|row| decode_run(row).map(|l| l.run))
            .collect()
    }

    async fn read_attempts(&self, run_id: &str) -> StoreResult<Vec<AttemptRecord>> {
        let rows = sqlx::query(&format!(
            "{ATTEMPT_SELECT} WHERE a.run_id = ? ORDER BY a.attempt"
        ))
        .bind(run_id)
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        rows.iter().map(decode_attempt).collect()
    }

    async fn read_secret_hash(&self, worker_id: &str) -> StoreResult<Option<Option<String>>> {
        let row =
            sqlx::query("SELECT secret_hash FROM workers WHERE id = ? AND deregistered_at IS NULL")
                .bind(worker_id)
                .fetch_optional(&self.reader)
                .await
                .map_err(db)?;
        row.map(|row| row.try_get("secret_hash").map_err(db))
            .transpose()
    }

    async fn read_live_workers(&self) -> StoreResult<Vec<WorkerRecord>> {
        let rows = sqlx::query(&format!(
            "{WORKER_SELECT} WHERE deregistered_at IS NULL ORDER BY registered_at, id"
        ))
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| decode_worker(row).map(|(w, _)| w))
            .collect()
    }

    async fn read_held_by(&self, worker_id: &str) -> StoreResult<(Vec<(String, u32)>, Resources)> {
        let mut conn = self.reader.acquire().await.map_err(db)?;
        held_by(&mut conn, worker_id).await
    }

    async fn read_lane_queues(&self) -> StoreResult<Vec<LaneQueue>> {
        lanes::queues(&self.reader).await
    }

    async fn read_lane_flights(&self) -> StoreResult<Vec<LaneFlight>> {
        lanes::flights(&self.reader).await
    }

    async fn read_events(
        &self,
        run_id: &str,
        range: EventRange,
        limit: i64,
    ) -> StoreResult<Vec<EventRecord>> {
        // Both served by the primary key (run_id, seq); `Before` reads it backwards.
        let (sql, seq) = match range {
            EventRange::After(seq) => ("seq > ? ORDER BY seq", seq),
            EventRange::Before(seq) => ("seq < ? ORDER BY seq DESC", seq),
        };
        let rows = sqlx::query(&format!(
            "{EVENT_SELECT} WHERE run_id = ? AND {sql} LIMIT ?"
        ))
        .bind(run_id)
        .bind(seq)
        .bind(limit)
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        rows.iter().map(decode_event).collect()
    }

    async fn read_earliest_deadlines(&self) -> StoreResult<EarliestDeadlines> {
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
        Ok(EarliestDeadlines {
            stale_at: row.try_get("stale").map_err(db)?,
            timeout_at: row.try_get("timeout").map_err(db)?,
            cancel_base: row.try_get("cancel").map_err(db)?,
        })
    }

    async fn prune_finished(&self, lane: &str, retention_ms: i64, batch: i64) -> StoreResult<u64> {
        let mut tx = SqliteStore::begin(self).await?;
        let cutoff = clock().saturating_sub(retention_ms);
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
                .bind(batch)
                .execute(&mut *tx)
                .await
                .map_err(db)?
                .rows_affected();
        }
        SqliteStore::commit(self, tx, Outbox::default()).await?;
        Ok(deleted)
    }
}

#[async_trait]
impl DriverTx for SqliteTx {
    fn now(&self) -> Millis {
        self.now
    }

    async fn load_runs(&mut self, run_ids: &[&str], _lock: Lock) -> StoreResult<Vec<LoadedRun>> {
        if run_ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(&format!(
            "{RUN_SELECT_IN_TX} WHERE r.id IN (SELECT value FROM json_each(?)) ORDER BY r.seq"
        ))
        .bind(encode(&run_ids, "run ids")?)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db)?;
        rows.iter().map(decode_run).collect()
    }

    async fn queue_position(&mut self, lane: &str, seq: i64) -> StoreResult<i64> {
        let ahead: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM runs WHERE lane = ? AND status IN {PENDING} AND seq < ?"
        ))
        .bind(lane)
        .bind(seq)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db)?;
        Ok(ahead + 1)
    }

    async fn flush(&mut self, batch: Flush<'_>) -> StoreResult<Vec<LoadedRun>> {
        let mut statements = Statements::default();
        statements.write_runs(batch.writes);
        if !batch.new_attempts.is_empty() {
            statements.insert_attempts(batch.new_attempts);
        }
        if !batch.started_attempts.is_empty() {
            statements.stamp_attempts_started(batch.started_attempts)?;
        }
        if !batch.closed_attempts.is_empty() {
            statements.close_attempts(batch.closed_attempts);
        }
        if !batch.event_seqs.is_empty() {
            statements.set_last_event_seqs(batch.event_seqs)?;
        }
        if !batch.events.is_empty() {
            statements.insert_events(batch.events);
        }
        statements.send(self).await
    }

    async fn find_by_key(&mut self, key: &str) -> StoreResult<Option<KeyedRun>> {
        let row = sqlx::query("SELECT id, request_fingerprint FROM runs WHERE idempotency_key = ?")
            .bind(key)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(db)?;
        row.map(|row| {
            Ok(KeyedRun {
                run_id: row.try_get("id").map_err(db)?,
                request_fingerprint: row.try_get("request_fingerprint").map_err(db)?,
            })
        })
        .transpose()
    }

    async fn insert_run(
        &mut self,
        id: &str,
        spec: &RunSpec,
        status: RunStatus,
        _place: bool,
    ) -> StoreResult<Option<LoadedRun>> {
        // The single writer has already looked the key up in this transaction: no one else
        // can take it meanwhile.
        let row = sqlx::query(&format!(
            "INSERT INTO runs (id, lane, status, attempt, max_attempts, spec, cpus, memory_mb, \
             created_at, heartbeat_timeout_ms, timeout_ms, output_limit_bytes, idempotency_key, \
             request_fingerprint) VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             RETURNING {RUN_RETURNING}"
        ))
        .bind(id)
        .bind(&spec.lane)
        .bind(status.as_str())
        .bind(i64::from(spec.max_attempts))
        .bind(tether_store::encode_spec(spec)?)
        .bind(spec.resources.cpus)
        .bind(spec.resources.memory_mb as i64)
        .bind(self.now)
        .bind(spec.heartbeat_timeout_ms)
        .bind(spec.timeout_ms)
        .bind(spec.output_limit_bytes)
        .bind(spec.idempotency_key.as_deref())
        .bind(&spec.request_fingerprint)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db)?;
        decode_run(&row).map(Some)
    }

    async fn attempt_offsets(&mut self, run_id: &str, attempt: u32) -> StoreResult<StreamOffsets> {
        let row = sqlx::query(
            "SELECT stdout_bytes, stderr_bytes FROM attempts WHERE run_id = ? AND attempt = ?",
        )
        .bind(run_id)
        .bind(i64::from(attempt))
        .fetch_optional(&mut *self.tx)
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

    async fn set_attempt_offsets(
        &mut self,
        run_id: &str,
        attempt: u32,
        offsets: StreamOffsets,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE attempts SET stdout_bytes = ?, stderr_bytes = ? \
             WHERE run_id = ? AND attempt = ?",
        )
        .bind(offsets.stdout)
        .bind(offsets.stderr)
        .bind(run_id)
        .bind(i64::from(attempt))
        .execute(&mut *self.tx)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn insert_worker(&mut self, id: &str, worker: &NewWorker) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO workers (id, name, cpus, memory_mb, lanes, labels, registered_at, \
             last_heartbeat_at, secret_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(&worker.name)
        .bind(worker.capacity.cpus)
        .bind(worker.capacity.memory_mb as i64)
        .bind(encode(&worker.lanes, "worker lanes")?)
        .bind(encode(&worker.labels, "worker labels")?)
        .bind(self.now)
        .bind(self.now)
        .bind(&worker.secret_hash)
        .execute(&mut *self.tx)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn lock_worker(
        &mut self,
        worker_id: &str,
    ) -> StoreResult<Option<(WorkerRecord, Option<Millis>)>> {
        let row = sqlx::query(&format!("{WORKER_SELECT} WHERE id = ?"))
            .bind(worker_id)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(db)?;
        row.as_ref().map(decode_worker).transpose()
    }

    async fn stamp_worker(&mut self, worker_id: &str) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE workers SET last_heartbeat_at = ? WHERE id = ? AND deregistered_at IS NULL",
        )
        .bind(self.now)
        .bind(worker_id)
        .execute(&mut *self.tx)
        .await
        .map_err(db)?;
        Ok(one_row(result))
    }

    async fn mark_worker_gone(&mut self, worker_id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE workers SET deregistered_at = ? WHERE id = ?")
            .bind(self.now)
            .bind(worker_id)
            .execute(&mut *self.tx)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn mark_worker_draining(&mut self, worker_id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE workers SET draining = 1 WHERE id = ? AND deregistered_at IS NULL")
            .bind(worker_id)
            .execute(&mut *self.tx)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn held_by(&mut self, worker_id: &str) -> StoreResult<(Vec<(String, u32)>, Resources)> {
        held_by(&mut self.tx, worker_id).await
    }

    async fn workers_serving(
        &mut self,
        lane: &str,
        fresh_since: Millis,
    ) -> StoreResult<Vec<(String, Resources)>> {
        let rows = sqlx::query(&format!(
            "{WORKER_SELECT} WHERE deregistered_at IS NULL AND draining = 0 \
             AND last_heartbeat_at >= ?"
        ))
        .bind(fresh_since)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db)?;
        let mut serving = Vec::new();
        for row in &rows {
            // Lanes are stored as JSON text: matched here rather than in SQL.
            let (worker, _) = decode_worker(row)?;
            if worker.lanes.is_empty() || worker.lanes.iter().any(|l| l == lane) {
                serving.push((worker.id, worker.capacity));
            }
        }
        Ok(serving)
    }

    async fn reserved_by(&mut self, worker_ids: &[String]) -> StoreResult<Resources> {
        let row = sqlx::query(&format!(
            "SELECT COALESCE(SUM(cpus), 0.0) AS cpus, COALESCE(SUM(memory_mb), 0) AS memory_mb \
             FROM runs WHERE status IN {IN_FLIGHT} \
             AND worker_id IN (SELECT value FROM json_each(?))"
        ))
        .bind(encode(&worker_ids, "worker ids")?)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db)?;
        resources(&row)
    }

    async fn lock_lane(&mut self, _lane: &str) -> StoreResult<()> {
        Ok(())
    }

    async fn lane_in_flight(&mut self, lane: &str) -> StoreResult<i64> {
        sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM runs WHERE lane = ? AND status IN {IN_FLIGHT}"
        ))
        .bind(lane)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db)
    }

    async fn lane_waiting(&mut self, lane: &str) -> StoreResult<Waiting> {
        let row = sqlx::query(&format!(
            "SELECT COUNT(*) AS n, COALESCE(SUM(cpus), 0.0) AS cpus, \
             COALESCE(SUM(memory_mb), 0) AS memory_mb FROM runs \
             WHERE lane = ? AND status IN {PENDING} AND cancel_requested_at IS NULL"
        ))
        .bind(lane)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db)?;
        Ok(Waiting {
            count: row.try_get("n").map_err(db)?,
            needs: resources(&row)?,
        })
    }

    async fn pending_page(
        &mut self,
        after_seq: i64,
        lanes: &[String],
        limit: i64,
    ) -> StoreResult<Vec<PendingRun>> {
        let mut sql = format!(
            "SELECT seq, id, lane, cpus, memory_mb FROM runs WHERE status IN {PENDING} \
             AND cancel_requested_at IS NULL AND seq > ?"
        );
        if !lanes.is_empty() {
            let marks = vec!["?"; lanes.len()].join(", ");
            sql.push_str(&format!(" AND lane IN ({marks})"));
        }
        sql.push_str(" ORDER BY seq LIMIT ?");
        let mut query = sqlx::query(&sql).bind(after_seq);
        for lane in lanes {
            query = query.bind(lane.as_str());
        }
        let rows = query
            .bind(limit)
            .fetch_all(&mut *self.tx)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|row| {
                Ok(PendingRun {
                    seq: row.try_get("seq").map_err(db)?,
                    id: row.try_get("id").map_err(db)?,
                    lane: row.try_get("lane").map_err(db)?,
                    needs: resources(row)?,
                    loaded: None,
                })
            })
            .collect()
    }

    async fn try_lock_sweep(&mut self) -> StoreResult<bool> {
        Ok(true)
    }

    async fn reap_candidates(&mut self, policy: &ReapPolicy) -> StoreResult<Vec<String>> {
        let now = self.now;
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
                .fetch_all(&mut *self.tx)
                .await
                .map_err(db)?;
            for row in rows {
                due.insert(
                    row.try_get("seq").map_err(db)?,
                    row.try_get("id").map_err(db)?,
                );
            }
        }
        Ok(due.into_values().take(batch as usize).collect())
    }

    async fn extend_stale_deadlines(&mut self) -> StoreResult<u64> {
        // Served by the partial index over in-flight rows; only a deadline moves, never
        // earlier, so no conditional write is needed.
        let moved = sqlx::query(&format!(
            "UPDATE runs SET stale_at = MAX(stale_at, ? + heartbeat_timeout_ms) \
             WHERE status IN {IN_FLIGHT} AND stale_at IS NOT NULL \
             AND stale_at < ? + heartbeat_timeout_ms"
        ))
        .bind(self.now)
        .bind(self.now)
        .execute(&mut *self.tx)
        .await
        .map_err(db)?
        .rows_affected();
        Ok(moved)
    }
}
