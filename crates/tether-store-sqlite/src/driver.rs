//! The SQLite store's primitives: one method per query, named by intent. The decisions live in
//! `tether-store`'s engine. Locks are no-ops here: every write transaction is `BEGIN
//! IMMEDIATE` on the one writer, so it is alone.

use std::collections::BTreeMap;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteArguments, SqliteQueryResult};
use sqlx::{Row, Sqlite, SqliteConnection, Transaction};
use tether_domain::{Millis, Resources, RunSpec, RunStatus};
use tether_store::driver::{
    AttemptEnd, EarliestDeadlines, EventRange, KeyedRun, LoadedRun, Lock, PendingRun, RunChange,
    Waiting,
};
use tether_store::{
    AttemptRecord, Driver, DriverTx, EventBody, EventRecord, LaneLoad, NewWorker, Outbox,
    ReapPolicy, RunFilter, RunRecord, Signal, StoreResult, StreamOffsets, WorkerRecord,
};
use tokio::sync::broadcast;

use crate::rows::{
    decode_attempt, decode_event, decode_run, decode_worker, resources, to_u32, ATTEMPT_SELECT,
    EVENT_SELECT, RUN_SELECT, RUN_SELECT_IN_TX, WORKER_SELECT,
};
use crate::{clock, db, encode, lanes, SqliteStore, IN_FLIGHT, PENDING};

/// A write transaction on the writer, with the clock read once for all of it.
pub struct SqliteTx {
    pub(crate) tx: Transaction<'static, Sqlite>,
    pub(crate) now: Millis,
}

type Query<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>;

/// The guard every status-changing `UPDATE runs` ends with: the write lands only if the run
/// still has the status and attempt it was judged on, even against another process writing the
/// same file.
const GUARD: &str = " WHERE id = ? AND status = ? AND attempt = ?";

fn guarded<'q>(query: Query<'q>, loaded: &'q LoadedRun) -> Query<'q> {
    query
        .bind(loaded.run.id.as_str())
        .bind(loaded.raw_status.as_str())
        .bind(i64::from(loaded.run.attempt))
}

fn one_row(result: SqliteQueryResult) -> bool {
    result.rows_affected() == 1
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

    async fn read_lane_loads(&self) -> StoreResult<Vec<LaneLoad>> {
        lanes::lane_loads(&self.reader).await
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

    async fn load_run(&mut self, run_id: &str, _lock: Lock) -> StoreResult<Option<LoadedRun>> {
        load_run(&mut self.tx, RUN_SELECT_IN_TX, run_id).await
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

    async fn lock_runs(&mut self, _run_ids: &[&str]) -> StoreResult<()> {
        Ok(())
    }

    async fn write_run(&mut self, loaded: &LoadedRun, change: RunChange<'_>) -> StoreResult<bool> {
        let now = self.now;
        let result = match change {
            RunChange::Claim {
                status,
                attempt,
                worker_id,
            } => {
                let sql = format!(
                    "UPDATE runs SET status = ?, attempt = ?, worker_id = ?, claimed_at = ?, \
                     started_at = NULL, last_heartbeat_at = ?, confirmed = 0, \
                     stale_at = ? + heartbeat_timeout_ms, timeout_at = ? + timeout_ms{GUARD}"
                );
                let q = sqlx::query(&sql)
                    .bind(status.as_str())
                    .bind(i64::from(attempt))
                    .bind(worker_id)
                    .bind(now)
                    .bind(now)
                    .bind(now)
                    .bind(now);
                guarded(q, loaded).execute(&mut *self.tx).await
            }
            RunChange::Start { status } => {
                let sql = format!(
                    "UPDATE runs SET status = ?, started_at = ?, confirmed = 1, \
                     last_heartbeat_at = ?, stale_at = ? + heartbeat_timeout_ms, \
                     timeout_at = ? + timeout_ms{GUARD}"
                );
                let q = sqlx::query(&sql)
                    .bind(status.as_str())
                    .bind(now)
                    .bind(now)
                    .bind(now)
                    .bind(now);
                guarded(q, loaded).execute(&mut *self.tx).await
            }
            RunChange::Heartbeat {
                worker_id,
                stdout_bytes,
                stderr_bytes,
            } => {
                let sql = format!(
                    "UPDATE runs SET last_heartbeat_at = ?, stale_at = ? + heartbeat_timeout_ms, \
                     confirmed = 1, reported_stdout_bytes = ?, reported_stderr_bytes = ?\
                     {GUARD} AND worker_id = ?"
                );
                let q = sqlx::query(&sql)
                    .bind(now)
                    .bind(now)
                    .bind(stdout_bytes)
                    .bind(stderr_bytes);
                guarded(q, loaded)
                    .bind(worker_id)
                    .execute(&mut *self.tx)
                    .await
            }
            RunChange::Output { stdout, stderr } => {
                let sql = format!(
                    "UPDATE runs SET stdout_bytes = stdout_bytes + ?, \
                     stderr_bytes = stderr_bytes + ?, output_bytes = output_bytes + ?, \
                     last_output_at = ?{GUARD}"
                );
                let q = sqlx::query(&sql)
                    .bind(stdout)
                    .bind(stderr)
                    .bind(stdout + stderr)
                    .bind(now);
                guarded(q, loaded).execute(&mut *self.tx).await
            }
            RunChange::BackToPending => {
                let sql = format!(
                    "UPDATE runs SET status = 'pending', worker_id = NULL, claimed_at = NULL, \
                     started_at = NULL, last_heartbeat_at = NULL, confirmed = 0, \
                     stale_at = NULL, timeout_at = NULL, exit_code = NULL, error_code = NULL, \
                     error_message = NULL{GUARD}"
                );
                guarded(sqlx::query(&sql), loaded)
                    .execute(&mut *self.tx)
                    .await
            }
            RunChange::Finish {
                status,
                exit_code,
                error_code,
                error_message,
            } => {
                let sql = format!(
                    "UPDATE runs SET status = ?, worker_id = NULL, finished_at = ?, \
                     stale_at = NULL, timeout_at = NULL, exit_code = ?, error_code = ?, \
                     error_message = ?{GUARD}"
                );
                let q = sqlx::query(&sql)
                    .bind(status.as_str())
                    .bind(now)
                    .bind(exit_code)
                    .bind(error_code.map(|c| c.as_str()))
                    .bind(error_message);
                guarded(q, loaded).execute(&mut *self.tx).await
            }
            RunChange::CancelAsked => {
                let sql = format!(
                    "UPDATE runs SET cancel_requested_at = coalesce(cancel_requested_at, ?)\
                     {GUARD}"
                );
                let q = sqlx::query(&sql).bind(now);
                guarded(q, loaded).execute(&mut *self.tx).await
            }
        };
        Ok(one_row(result.map_err(db)?))
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
    ) -> StoreResult<bool> {
        // The single writer has already looked the key up in this transaction: no one else
        // can take it meanwhile.
        sqlx::query(
            "INSERT INTO runs (id, lane, status, attempt, max_attempts, spec, cpus, memory_mb, \
             created_at, heartbeat_timeout_ms, timeout_ms, output_limit_bytes, idempotency_key, \
             request_fingerprint) VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
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
        .execute(&mut *self.tx)
        .await
        .map_err(db)?;
        Ok(true)
    }

    async fn push_event(
        &mut self,
        run_id: &str,
        attempt: u32,
        body: &EventBody,
        data: Option<&[u8]>,
    ) -> StoreResult<i64> {
        let seq: i64 = sqlx::query_scalar(
            "UPDATE runs SET last_event_seq = last_event_seq + 1 WHERE id = ? \
             RETURNING last_event_seq",
        )
        .bind(run_id)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db)?;
        sqlx::query(
            "INSERT INTO run_events (run_id, seq, kind, attempt, ts, body, data) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(run_id)
        .bind(seq)
        .bind(body.kind().as_str())
        .bind(i64::from(attempt))
        .bind(self.now)
        .bind(body.to_json().to_string())
        .bind(data)
        .execute(&mut *self.tx)
        .await
        .map_err(db)?;
        Ok(seq)
    }

    async fn insert_attempt(
        &mut self,
        run_id: &str,
        attempt: u32,
        worker_id: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO attempts (run_id, attempt, worker_id, claimed_at) VALUES (?, ?, ?, ?)",
        )
        .bind(run_id)
        .bind(i64::from(attempt))
        .bind(worker_id)
        .bind(self.now)
        .execute(&mut *self.tx)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn stamp_attempt_started(&mut self, run_id: &str, attempt: u32) -> StoreResult<()> {
        sqlx::query("UPDATE attempts SET started_at = ? WHERE run_id = ? AND attempt = ?")
            .bind(self.now)
            .bind(run_id)
            .bind(i64::from(attempt))
            .execute(&mut *self.tx)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn close_attempt(
        &mut self,
        run_id: &str,
        attempt: u32,
        end: AttemptEnd<'_>,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE attempts SET finished_at = ?, status = ?, error_code = ?, exit_code = ?, \
             error_message = ? WHERE run_id = ? AND attempt = ? AND status IS NULL",
        )
        .bind(self.now)
        .bind(end.status.as_str())
        .bind(end.error_code.map(|c| c.as_str()))
        .bind(end.exit_code)
        .bind(end.error_message)
        .bind(run_id)
        .bind(i64::from(attempt))
        .execute(&mut *self.tx)
        .await
        .map_err(db)?;
        Ok(())
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
