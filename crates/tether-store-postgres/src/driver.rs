//! The PostgreSQL store's primitives: one method per query, named by intent. The decisions live
//! in `tether-store`'s engine. What is PostgreSQL's own: row locks (`FOR UPDATE`, `SKIP
//! LOCKED` for claims and the reaper), advisory locks for lanes and the sweep, the database's
//! clock, and `NOTIFY` at commit (in `lib.rs`).

use async_trait::async_trait;
use sqlx::{PgConnection, Row};
use tether_domain::{Millis, Resources, RunSpec, RunStatus};
use tether_store::driver::{
    by_kind, ChangeKind, EarliestDeadlines, EventRange, Flush, HeldRuns, KeyedRun, LoadedRun, Lock,
    PendingRun, RunChange, RunWrite, Waiting,
};
use tether_store::{
    AttemptRecord, Driver, DriverTx, EventRecord, LaneFlight, LaneQueue, NewWorker, Outbox,
    ReapPolicy, RunFilter, RunRecord, Signal, StoreError, StoreResult, StreamOffsets, WorkerRecord,
};
use tokio::sync::broadcast;
use tokio::time::timeout;

use crate::rows::{
    decode_attempt, decode_event, decode_run, decode_worker, resources, to_u32, ATTEMPT_SELECT,
    EVENT_SELECT, RUN_RETURNING, RUN_RETURNING_PLACED, RUN_SELECT, RUN_SELECT_IN_TX, WORKER_SELECT,
};
use crate::{
    clock, db, encode, lane_lock, lanes, signals, PgStore, TxConn, IN_FLIGHT, PENDING,
    PING_TIMEOUT, REAPER_LOCK, REAP_QUERY,
};

/// A write transaction with the database's clock read once for all of it.
pub struct PgTx {
    pub(crate) tx: TxConn,
    pub(crate) now: Millis,
    /// Where its notification names the store (schema, origin).
    pub(crate) schema: std::sync::Arc<str>,
    pub(crate) origin: std::sync::Arc<str>,
    /// Its signals went out with its last flush: the commit sends no `pg_notify` of its own.
    pub(crate) notified: bool,
    /// Another server may listen: its signals are sent as notifications.
    pub(crate) peers: bool,
}

/// What going back to `pending` clears: everything the next claim stamps afresh.
macro_rules! back_to_pending {
    () => {
        "status = 'pending', worker_id = NULL, claimed_at = NULL, started_at = NULL, \
         last_heartbeat_at = NULL, confirmed = FALSE, stale_at = NULL, timeout_at = NULL, \
         exit_code = NULL, error_code = NULL, error_message = NULL"
    };
}

/// The `UPDATE` of one kind of change, for any number of runs: `$1` is the transaction's
/// `now`, `$first..` the columns of [`WriteColumns`], one array each. Each row lands only if
/// the run still has the status and attempt it was judged on (the guard), even against
/// another server writing the same database (writers also lock the row first, so the guard
/// confirms what the lock already ensured); the rows written come back, so nothing is read
/// again.
fn write_sql(kind: ChangeKind, first: usize) -> String {
    let (set, also) = match kind {
        ChangeKind::Claim => (
            "status = v.new_status, attempt = v.n1, worker_id = v.worker, claimed_at = $1, \
             started_at = NULL, last_heartbeat_at = $1, confirmed = FALSE, \
             stale_at = $1 + r.heartbeat_timeout_ms, timeout_at = $1 + r.timeout_ms",
            "",
        ),
        ChangeKind::Start => (
            "status = v.new_status, started_at = v.n1, confirmed = TRUE, last_heartbeat_at = $1, \
             stale_at = $1 + r.heartbeat_timeout_ms, timeout_at = $1 + r.timeout_ms",
            "",
        ),
        ChangeKind::Heartbeat => (
            "last_heartbeat_at = $1, stale_at = $1 + r.heartbeat_timeout_ms, confirmed = TRUE, \
             reported_stdout_bytes = v.n1, reported_stderr_bytes = v.n2",
            " AND r.worker_id = v.worker",
        ),
        ChangeKind::Output => (
            "stdout_bytes = r.stdout_bytes + v.n1, stderr_bytes = r.stderr_bytes + v.n2, \
             output_bytes = r.output_bytes + v.n1 + v.n2, last_output_at = $1",
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
            "status = v.new_status, worker_id = NULL, finished_at = v.n2, stale_at = NULL, \
             timeout_at = NULL, exit_code = v.exit, error_code = v.code, \
             error_message = v.message",
            "",
        ),
        ChangeKind::Ran => (
            "status = v.new_status, worker_id = NULL, started_at = v.n1, confirmed = TRUE, \
             last_heartbeat_at = $1, finished_at = v.n2, stale_at = NULL, timeout_at = NULL, \
             exit_code = v.exit, error_code = v.code, error_message = v.message",
            "",
        ),
        ChangeKind::CancelAsked => (
            "cancel_requested_at = coalesce(r.cancel_requested_at, $1)",
            "",
        ),
    };
    let p: Vec<String> = (first..first + 11).map(|n| format!("${n}")).collect();
    format!(
        "UPDATE runs AS r SET {set}, last_event_seq = v.seq \
         FROM UNNEST({}::text[], {}::text[], {}::bigint[], {}::bigint[], {}::text[], \
         {}::bigint[], {}::bigint[], {}::text[], {}::int[], {}::text[], {}::text[]) \
         AS v(id, status, attempt, seq, new_status, n1, n2, worker, exit, code, message) \
         WHERE r.id = v.id AND r.status = v.status AND r.attempt = v.attempt{also} \
         RETURNING {RUN_RETURNING}",
        p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10]
    )
}

/// The columns [`write_sql`] reads, one entry per run: the guard, the event seq, and what each
/// kind of change writes (`n1`, `n2`: attempt, byte counts, or `started_at` and
/// `finished_at`).
#[derive(Default)]
pub(crate) struct WriteColumns<'a> {
    id: Vec<&'a str>,
    status: Vec<&'a str>,
    attempt: Vec<i64>,
    seq: Vec<i64>,
    new_status: Vec<Option<&'static str>>,
    n1: Vec<Option<i64>>,
    n2: Vec<Option<i64>>,
    worker: Vec<Option<&'a str>>,
    exit: Vec<Option<i32>>,
    code: Vec<Option<&'static str>>,
    message: Vec<Option<&'a str>>,
}

impl<'a> WriteColumns<'a> {
    pub(crate) fn push(&mut self, write: &'a RunWrite) {
        self.id.push(&write.run_id);
        self.status.push(&write.status);
        self.attempt.push(i64::from(write.attempt));
        self.seq.push(write.last_event_seq);
        let (mut new_status, mut n1, mut n2, mut worker) = (None, None, None, None);
        let (mut exit, mut code, mut message) = (None, None, None);
        match &write.change {
            RunChange::Claim {
                status,
                attempt,
                worker_id,
            } => {
                new_status = Some(status.as_str());
                n1 = Some(i64::from(*attempt));
                worker = Some(worker_id.as_str());
            }
            RunChange::Start { status, .. } => {
                new_status = Some(status.as_str());
                (n1, n2) = write.change.stamps();
            }
            RunChange::Heartbeat {
                worker_id,
                stdout_bytes,
                stderr_bytes,
            } => {
                worker = Some(worker_id.as_str());
                n1 = Some(*stdout_bytes);
                n2 = Some(*stderr_bytes);
            }
            RunChange::Output { stdout, stderr } => {
                n1 = Some(*stdout);
                n2 = Some(*stderr);
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
            } => {
                new_status = Some(status.as_str());
                exit = *exit_code;
                code = error_code.map(|c| c.as_str());
                message = error_message.as_deref();
                (n1, n2) = write.change.stamps();
            }
            RunChange::BackToPending | RunChange::Release | RunChange::CancelAsked => {}
        }
        self.new_status.push(new_status);
        self.n1.push(n1);
        self.n2.push(n2);
        self.worker.push(worker);
        self.exit.push(exit);
        self.code.push(code);
        self.message.push(message);
    }
}

/// A [`Flush`] as one statement: each part a data-modifying `WITH` entry (PostgreSQL runs them
/// all, against one snapshot; no two name the same row), the run writes' rows as its answer,
/// and the signals' `pg_notify` with it when given (delivered only if the transaction
/// commits). Where the parts went out one statement each, a worker's call waited on each.
async fn flush_in_one(
    conn: &mut PgConnection,
    now: Millis,
    batch: &Flush<'_>,
    notify: Option<(&str, &str)>,
) -> StoreResult<Vec<LoadedRun>> {
    // In one order of kinds, so a call's mix of changes is one statement text (one prepared
    // statement per connection), whatever order they were decided in.
    let mut groups = by_kind(batch.writes);
    groups.sort_by_key(|(kind, _)| *kind);
    let mut n = 1; // `$1` is now
    let mut next = |count: usize| {
        let first = n + 1;
        n += count;
        first
    };
    let mut with: Vec<String> = Vec::new();
    let mut written: Vec<String> = Vec::new();
    for (i, (kind, _)) in groups.iter().enumerate() {
        with.push(format!("w{i} AS ({})", write_sql(*kind, next(11))));
        written.push(format!("SELECT * FROM w{i}"));
    }
    if !batch.new_attempts.is_empty() {
        let p = next(3);
        with.push(format!(
            "ia AS (INSERT INTO attempts (run_id, attempt, worker_id, claimed_at) \
             SELECT v.run_id, v.attempt, v.worker_id, $1 \
             FROM UNNEST(${p}::text[], ${}::bigint[], ${}::text[]) AS v(run_id, attempt, worker_id))",
            p + 1,
            p + 2
        ));
    }
    if !batch.started_attempts.is_empty() {
        let p = next(3);
        with.push(format!(
            "sa AS (UPDATE attempts AS a SET started_at = v.at \
             FROM UNNEST(${p}::text[], ${}::bigint[], ${}::bigint[]) AS v(run_id, attempt, at) \
             WHERE a.run_id = v.run_id AND a.attempt = v.attempt)",
            p + 1,
            p + 2
        ));
    }
    if !batch.closed_attempts.is_empty() {
        let p = next(8);
        with.push(format!(
            "ca AS (UPDATE attempts AS a SET finished_at = v.at, status = v.status, \
             error_code = v.code, exit_code = v.exit, error_message = v.message, \
             started_at = coalesce(v.started, a.started_at) \
             FROM UNNEST(${p}::text[], ${}::bigint[], ${}::text[], ${}::text[], ${}::int[], \
             ${}::text[], ${}::bigint[], ${}::bigint[]) \
             AS v(run_id, attempt, status, code, exit, message, started, at) \
             WHERE a.run_id = v.run_id AND a.attempt = v.attempt AND a.status IS NULL)",
            p + 1,
            p + 2,
            p + 3,
            p + 4,
            p + 5,
            p + 6,
            p + 7
        ));
    }
    if !batch.event_seqs.is_empty() {
        let p = next(2);
        with.push(format!(
            "es AS (UPDATE runs AS r SET last_event_seq = v.seq \
             FROM UNNEST(${p}::text[], ${}::bigint[]) AS v(id, seq) WHERE r.id = v.id)",
            p + 1
        ));
    }
    if !batch.events.is_empty() {
        let p = next(6);
        with.push(format!(
            "ev AS (INSERT INTO run_events (run_id, seq, kind, attempt, ts, body, data) \
             SELECT v.run_id, v.seq, v.kind, v.attempt, $1, v.body::jsonb, v.data \
             FROM UNNEST(${p}::text[], ${}::bigint[], ${}::text[], ${}::bigint[], ${}::text[], \
             ${}::bytea[]) AS v(run_id, seq, kind, attempt, body, data))",
            p + 1,
            p + 2,
            p + 3,
            p + 4,
            p + 5
        ));
    }
    let notice = notify.map(|_| {
        let p = next(2);
        format!("(SELECT pg_notify(${p}, ${}))", p + 1)
    });
    // A `WITH` entry that only reads runs only if the answer reads it: the notification is in
    // the answer, on a side of the join that is always read.
    let answer = match (written.is_empty(), &notice) {
        (true, None) => "SELECT 1".to_string(),
        (true, Some(notice)) => format!("SELECT {notice}"),
        (false, None) => written.join(" UNION ALL "),
        (false, Some(notice)) => format!(
            "SELECT w.* FROM ({}) AS w RIGHT JOIN {notice} AS n(sent) ON TRUE",
            written.join(" UNION ALL ")
        ),
    };
    let sql = if with.is_empty() {
        answer
    } else {
        format!("WITH {} {answer}", with.join(", "))
    };

    let mut query = sqlx::query(&sql).bind(now);
    for (_, group) in &groups {
        let mut cols = WriteColumns::default();
        for write in group {
            cols.push(write);
        }
        query = query
            .bind(cols.id)
            .bind(cols.status)
            .bind(cols.attempt)
            .bind(cols.seq)
            .bind(cols.new_status)
            .bind(cols.n1)
            .bind(cols.n2)
            .bind(cols.worker)
            .bind(cols.exit)
            .bind(cols.code)
            .bind(cols.message);
    }
    if !batch.new_attempts.is_empty() {
        let a = batch.new_attempts;
        query = query
            .bind(a.iter().map(|a| a.run_id.as_str()).collect::<Vec<_>>())
            .bind(a.iter().map(|a| i64::from(a.attempt)).collect::<Vec<_>>())
            .bind(a.iter().map(|a| a.worker_id.as_str()).collect::<Vec<_>>());
    }
    if !batch.started_attempts.is_empty() {
        let a = batch.started_attempts;
        query = query
            .bind(a.iter().map(|(id, _, _)| id.as_str()).collect::<Vec<_>>())
            .bind(a.iter().map(|(_, n, _)| i64::from(*n)).collect::<Vec<_>>())
            .bind(a.iter().map(|(_, _, at)| *at).collect::<Vec<_>>());
    }
    if !batch.closed_attempts.is_empty() {
        let c = batch.closed_attempts;
        query = query
            .bind(c.iter().map(|c| c.run_id.as_str()).collect::<Vec<_>>())
            .bind(c.iter().map(|c| i64::from(c.attempt)).collect::<Vec<_>>())
            .bind(c.iter().map(|c| c.end.status.as_str()).collect::<Vec<_>>())
            .bind(
                c.iter()
                    .map(|c| c.end.error_code.map(|e| e.as_str()))
                    .collect::<Vec<_>>(),
            )
            .bind(c.iter().map(|c| c.end.exit_code).collect::<Vec<_>>())
            .bind(
                c.iter()
                    .map(|c| c.end.error_message.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(c.iter().map(|c| c.started).collect::<Vec<_>>())
            .bind(c.iter().map(|c| c.at).collect::<Vec<_>>());
    }
    if !batch.event_seqs.is_empty() {
        let e = batch.event_seqs;
        query = query
            .bind(e.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>())
            .bind(e.iter().map(|(_, seq)| *seq).collect::<Vec<_>>());
    }
    if !batch.events.is_empty() {
        let e = batch.events;
        query = query
            .bind(e.iter().map(|e| e.run_id.as_str()).collect::<Vec<_>>())
            .bind(e.iter().map(|e| e.seq).collect::<Vec<_>>())
            .bind(e.iter().map(|e| e.body.kind().as_str()).collect::<Vec<_>>())
            .bind(e.iter().map(|e| i64::from(e.attempt)).collect::<Vec<_>>())
            .bind(
                e.iter()
                    .map(|e| e.body.to_json().to_string())
                    .collect::<Vec<_>>(),
            )
            .bind(e.iter().map(|e| e.data.as_deref()).collect::<Vec<_>>());
    }
    if let Some((channel, payload)) = notify {
        query = query.bind(channel).bind(payload);
    }
    let rows = query.fetch_all(&mut *conn).await.map_err(db)?;
    if written.is_empty() {
        return Ok(Vec::new());
    }
    let mut runs = Vec::with_capacity(rows.len());
    for row in &rows {
        // The join's own row when nothing was written.
        if row
            .try_get::<Option<String>, _>("id")
            .map_err(db)?
            .is_some()
        {
            runs.push(decode_run(row)?);
        }
    }
    Ok(runs)
}

fn lock_suffix(lock: Lock) -> &'static str {
    match lock {
        Lock::None => "",
        Lock::Wait => " FOR UPDATE OF r",
        Lock::Skip => " FOR UPDATE OF r SKIP LOCKED",
    }
}

/// A run by id, read with `select` ([`RUN_SELECT`] or [`RUN_SELECT_IN_TX`]).
async fn load_run(
    conn: &mut PgConnection,
    select: &str,
    run_id: &str,
    lock: Lock,
) -> StoreResult<Option<LoadedRun>> {
    let suffix = lock_suffix(lock);
    let row = sqlx::query(&format!("{select} WHERE r.id = $1{suffix}"))
        .bind(run_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
    row.as_ref().map(decode_run).transpose()
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
impl Driver for PgStore {
    type Tx = PgTx;

    async fn begin(&self) -> StoreResult<PgTx> {
        let (tx, now) = PgStore::begin(self).await?;
        Ok(PgTx {
            tx,
            now,
            schema: self.inner.schema.clone(),
            origin: self.inner.origin.clone(),
            notified: false,
            peers: self.inner.peers.present(),
        })
    }

    async fn commit(&self, tx: PgTx, out: Outbox) -> StoreResult<()> {
        PgStore::commit(self, tx.tx, out, tx.notified).await
    }

    async fn clock(&self) -> StoreResult<Millis> {
        let mut conn = self.pool().acquire().await.map_err(db)?;
        clock(&mut conn).await
    }

    async fn ping_database(&self) -> StoreResult<()> {
        // Readiness probes want a quick answer, not the pool's full acquire timeout.
        let probe = sqlx::query("SELECT 1").execute(self.pool());
        match timeout(PING_TIMEOUT, probe).await {
            Ok(result) => result.map(|_| ()).map_err(db),
            Err(_) => Err(StoreError::unavailable("the database did not answer")),
        }
    }

    fn signals(&self) -> broadcast::Receiver<Signal> {
        self.inner.signals.subscribe()
    }

    async fn read_run(&self, run_id: &str) -> StoreResult<Option<RunRecord>> {
        let mut conn = self.pool().acquire().await.map_err(db)?;
        Ok(load_run(&mut conn, RUN_SELECT, run_id, Lock::None)
            .await?
            .map(|l| l.run))
    }

    async fn read_runs(
        &self,
        filter: &RunFilter,
        before_seq: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<RunRecord>> {
        let mut sql = format!("{RUN_SELECT} WHERE TRUE");
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if before_seq.is_some() {
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
        let rows = query.bind(limit).fetch_all(self.pool()).await.map_err(db)?;
        rows.iter()
            .map(|row| decode_run(row).map(|l| l.run))
            .collect()
    }

    async fn read_attempts(&self, run_id: &str) -> StoreResult<Vec<AttemptRecord>> {
        let rows = sqlx::query(&format!(
            "{ATTEMPT_SELECT} WHERE a.run_id = $1 ORDER BY a.attempt"
        ))
        .bind(run_id)
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        rows.iter().map(decode_attempt).collect()
    }

    async fn read_secret_hash(&self, worker_id: &str) -> StoreResult<Option<Option<String>>> {
        let row = sqlx::query(
            "SELECT secret_hash FROM workers WHERE id = $1 AND deregistered_at IS NULL",
        )
        .bind(worker_id)
        .fetch_optional(self.pool())
        .await
        .map_err(db)?;
        row.map(|row| row.try_get("secret_hash").map_err(db))
            .transpose()
    }

    async fn read_live_workers(&self) -> StoreResult<Vec<WorkerRecord>> {
        let rows = sqlx::query(&format!(
            "{WORKER_SELECT} WHERE deregistered_at IS NULL ORDER BY registered_at, id"
        ))
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| decode_worker(row).map(|(w, _)| w))
            .collect()
    }

    async fn read_held_by(&self, worker_id: &str) -> StoreResult<(Vec<(String, u32)>, Resources)> {
        let mut conn = self.pool().acquire().await.map_err(db)?;
        held_by(&mut conn, worker_id).await
    }

    async fn read_lane_queues(&self) -> StoreResult<Vec<LaneQueue>> {
        lanes::queues(self.pool()).await
    }

    async fn read_lane_flights(&self) -> StoreResult<Vec<LaneFlight>> {
        lanes::flights(self.pool()).await
    }

    async fn read_events(
        &self,
        run_id: &str,
        range: EventRange,
        limit: i64,
    ) -> StoreResult<Vec<EventRecord>> {
        // Both served by the primary key (run_id, seq); `Before` reads it backwards.
        let (sql, seq) = match range {
            EventRange::After(seq) => ("seq > $2 ORDER BY seq", seq),
            EventRange::Before(seq) => ("seq < $2 ORDER BY seq DESC", seq),
        };
        let rows = sqlx::query(&format!(
            "{EVENT_SELECT} WHERE run_id = $1 AND {sql} LIMIT $3"
        ))
        .bind(run_id)
        .bind(seq)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        rows.iter().map(decode_event).collect()
    }

    async fn read_earliest_deadlines(&self) -> StoreResult<EarliestDeadlines> {
        let row = sqlx::query(&format!(
            "SELECT \
               (SELECT min(stale_at) FROM runs WHERE status IN {IN_FLIGHT}) AS stale, \
               (SELECT min(timeout_at) FROM runs WHERE status IN {IN_FLIGHT}) AS timeout, \
               (SELECT min(coalesce(last_heartbeat_at, claimed_at)) FROM runs \
                  WHERE status IN {IN_FLIGHT} AND cancel_requested_at IS NOT NULL) AS cancel"
        ))
        .fetch_one(self.pool())
        .await
        .map_err(db)?;
        Ok(EarliestDeadlines {
            stale_at: row.try_get("stale").map_err(db)?,
            timeout_at: row.try_get("timeout").map_err(db)?,
            cancel_base: row.try_get("cancel").map_err(db)?,
        })
    }

    async fn prune_finished(&self, lane: &str, retention_ms: i64, batch: i64) -> StoreResult<u64> {
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
        .bind(retention_ms)
        .bind(batch)
        .execute(self.pool())
        .await
        .map_err(db)?;
        Ok(deleted.rows_affected())
    }
}

#[async_trait]
impl DriverTx for PgTx {
    fn now(&self) -> Millis {
        self.now
    }

    async fn load_runs(&mut self, run_ids: &[&str], lock: Lock) -> StoreResult<Vec<LoadedRun>> {
        if run_ids.is_empty() {
            return Ok(Vec::new());
        }
        // At once, in seq order (the order every multi-run writer uses), so two writers
        // naming the same runs cannot deadlock.
        let rows = sqlx::query(&format!(
            "{RUN_SELECT_IN_TX} WHERE r.id = ANY($1) ORDER BY r.seq{}",
            lock_suffix(lock)
        ))
        .bind(run_ids)
        .fetch_all(self.tx.conn()?)
        .await
        .map_err(db)?;
        rows.iter().map(decode_run).collect()
    }

    async fn queue_position(&mut self, lane: &str, seq: i64) -> StoreResult<i64> {
        let ahead: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM runs WHERE lane = $1 AND status IN {PENDING} AND seq < $2"
        ))
        .bind(lane)
        .bind(seq)
        .fetch_one(self.tx.conn()?)
        .await
        .map_err(db)?;
        Ok(ahead + 1)
    }

    async fn flush(&mut self, batch: Flush<'_>) -> StoreResult<Vec<LoadedRun>> {
        let remote: Vec<Signal> = batch
            .signals
            .iter()
            .filter(|s| signals::wanted_elsewhere(s))
            .cloned()
            .collect();
        let payload = (self.peers && !remote.is_empty())
            .then(|| signals::encode(&self.schema, &self.origin, &remote));
        let notify = payload.as_deref().map(|p| (signals::CHANNEL, p));
        let runs = flush_in_one(self.tx.conn()?, self.now, &batch, notify).await?;
        self.notified |= notify.is_some();
        Ok(runs)
    }

    async fn find_by_key(&mut self, key: &str) -> StoreResult<Option<KeyedRun>> {
        let row =
            sqlx::query("SELECT id, request_fingerprint FROM runs WHERE idempotency_key = $1")
                .bind(key)
                .fetch_optional(self.tx.conn()?)
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
        place: bool,
    ) -> StoreResult<Option<LoadedRun>> {
        // The statement's snapshot is taken before its own row, so the count is what is ahead.
        let returning = if place {
            RUN_RETURNING_PLACED
        } else {
            RUN_RETURNING
        };
        // A queue lane's submissions do not wait for each other at the door: a key reused by
        // two at once is settled by the unique index here.
        let row = sqlx::query(&format!(
            "INSERT INTO runs AS r (id, lane, status, attempt, max_attempts, spec, cpus, \
             memory_mb, created_at, heartbeat_timeout_ms, timeout_ms, output_limit_bytes, \
             idempotency_key, request_fingerprint) \
             VALUES ($1, $2, $3, 0, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING {returning}"
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
        .fetch_optional(self.tx.conn()?)
        .await
        .map_err(db)?;
        row.as_ref().map(decode_run).transpose()
    }

    async fn attempt_offsets(&mut self, run_id: &str, attempt: u32) -> StoreResult<StreamOffsets> {
        let row = sqlx::query(
            "SELECT stdout_bytes, stderr_bytes FROM attempts WHERE run_id = $1 AND attempt = $2",
        )
        .bind(run_id)
        .bind(i64::from(attempt))
        .fetch_optional(self.tx.conn()?)
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
            "UPDATE attempts SET stdout_bytes = $1, stderr_bytes = $2 \
             WHERE run_id = $3 AND attempt = $4",
        )
        .bind(offsets.stdout)
        .bind(offsets.stderr)
        .bind(run_id)
        .bind(i64::from(attempt))
        .execute(self.tx.conn()?)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn insert_worker(&mut self, id: &str, worker: &NewWorker) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO workers (id, name, cpus, memory_mb, lanes, labels, registered_at, \
             last_heartbeat_at, secret_hash) VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $7, $8)",
        )
        .bind(id)
        .bind(&worker.name)
        .bind(worker.capacity.cpus)
        .bind(worker.capacity.memory_mb as i64)
        .bind(&worker.lanes)
        .bind(encode(&worker.labels, "worker labels")?)
        .bind(self.now)
        .bind(&worker.secret_hash)
        .execute(self.tx.conn()?)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn lock_worker(
        &mut self,
        worker_id: &str,
    ) -> StoreResult<Option<(WorkerRecord, Option<Millis>)>> {
        let row = sqlx::query(&format!("{WORKER_SELECT} WHERE id = $1 FOR UPDATE"))
            .bind(worker_id)
            .fetch_optional(self.tx.conn()?)
            .await
            .map_err(db)?;
        row.as_ref().map(decode_worker).transpose()
    }

    async fn stamp_worker(&mut self, worker_id: &str) -> StoreResult<bool> {
        let stamped = sqlx::query(
            "UPDATE workers SET last_heartbeat_at = $1 WHERE id = $2 \
             AND deregistered_at IS NULL RETURNING id",
        )
        .bind(self.now)
        .bind(worker_id)
        .fetch_optional(self.tx.conn()?)
        .await
        .map_err(db)?;
        Ok(stamped.is_some())
    }

    async fn mark_worker_gone(&mut self, worker_id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE workers SET deregistered_at = $1 WHERE id = $2")
            .bind(self.now)
            .bind(worker_id)
            .execute(self.tx.conn()?)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn mark_worker_draining(&mut self, worker_id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE workers SET draining = TRUE WHERE id = $1 AND deregistered_at IS NULL")
            .bind(worker_id)
            .execute(self.tx.conn()?)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn held_by(&mut self, worker_id: &str) -> StoreResult<(Vec<(String, u32)>, Resources)> {
        held_by(self.tx.conn()?, worker_id).await
    }

    async fn workers_serving(
        &mut self,
        lane: &str,
        fresh_since: Millis,
    ) -> StoreResult<Vec<(String, Resources)>> {
        let rows = sqlx::query(
            "SELECT id, cpus, memory_mb FROM workers WHERE deregistered_at IS NULL \
             AND NOT draining AND last_heartbeat_at >= $1 \
             AND (cardinality(lanes) = 0 OR $2 = ANY(lanes))",
        )
        .bind(fresh_since)
        .bind(lane)
        .fetch_all(self.tx.conn()?)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| Ok((row.try_get("id").map_err(db)?, resources(row)?)))
            .collect()
    }

    async fn reserved_by(&mut self, worker_ids: &[String]) -> StoreResult<Resources> {
        let row = sqlx::query(&format!(
            "SELECT coalesce(sum(cpus), 0)::float8 AS cpus, \
                    coalesce(sum(memory_mb), 0)::bigint AS memory_mb \
             FROM runs WHERE status IN {IN_FLIGHT} AND worker_id = ANY($1)"
        ))
        .bind(worker_ids)
        .fetch_one(self.tx.conn()?)
        .await
        .map_err(db)?;
        resources(&row)
    }

    async fn lock_lane(&mut self, lane: &str) -> StoreResult<()> {
        lane_lock(self.tx.conn()?, lane).await
    }

    async fn lane_in_flight(&mut self, lane: &str) -> StoreResult<i64> {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM runs WHERE lane = $1 AND status IN {IN_FLIGHT}"
        ))
        .bind(lane)
        .fetch_one(self.tx.conn()?)
        .await
        .map_err(db)
    }

    async fn lane_waiting(&mut self, lane: &str) -> StoreResult<Waiting> {
        let row = sqlx::query(&format!(
            "SELECT count(*) AS n, coalesce(sum(cpus), 0)::float8 AS cpus, \
                    coalesce(sum(memory_mb), 0)::bigint AS memory_mb \
             FROM runs WHERE lane = $1 AND status IN {PENDING} AND cancel_requested_at IS NULL"
        ))
        .bind(lane)
        .fetch_one(self.tx.conn()?)
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
        // Oldest first; rows another claim is taking right now are skipped, not waited on, so
        // concurrent claims on many servers each get different runs.
        // The page is chosen and locked first (`tether_claim_page`, which keeps the planner on
        // the pending index), then read whole (the claim judges it without loading it again),
        // the columns built for the page's rows only. The outer read locks again (they are
        // ours already, so it waits on nobody) to read each row's latest version, not the
        // statement's snapshot.
        let sql = format!(
            "{RUN_SELECT_IN_TX} WHERE r.seq = ANY(ARRAY(SELECT tether_claim_page($1, $2, $3))) \
             ORDER BY r.seq FOR UPDATE OF r"
        );
        let query = sqlx::query(&sql).bind(after_seq).bind(lanes).bind(limit);
        let rows = query.fetch_all(self.tx.conn()?).await.map_err(db)?;
        rows.iter()
            .map(|row| {
                let loaded = decode_run(row)?;
                Ok(PendingRun {
                    seq: loaded.run.seq,
                    id: loaded.run.id.clone(),
                    lane: loaded.run.spec.lane.clone(),
                    needs: loaded.run.spec.resources,
                    loaded: Some(loaded),
                })
            })
            .collect()
    }

    async fn held_and_pending_page(
        &mut self,
        worker_id: &str,
        after_seq: i64,
        lanes: &[String],
        limit: i64,
    ) -> StoreResult<(HeldRuns, Vec<PendingRun>)> {
        // One row at least (the held runs, aggregated), with the page's runs beside it; the
        // page as `pending_page` reads it. The held runs' lists ride on the first row alone:
        // repeated on every row they made a page of 256 beside 500 held runs megabytes to
        // sort (on disk) and to send.
        let sql = format!(
            "WITH held AS (SELECT coalesce(array_agg(id ORDER BY seq), '{{}}') AS ids, \
               coalesce(array_agg(attempt ORDER BY seq), '{{}}') AS attempts, \
               coalesce(sum(cpus), 0)::float8 AS cpus, \
               coalesce(sum(memory_mb), 0)::bigint AS memory_mb \
               FROM runs WHERE worker_id = $1 AND status IN {IN_FLIGHT}), \
             page AS ({RUN_SELECT_IN_TX} \
               WHERE r.seq = ANY(ARRAY(SELECT tether_claim_page($2, $3, $4))) FOR UPDATE OF r) \
             SELECT CASE WHEN first THEN held.ids END AS held_ids, \
               CASE WHEN first THEN held.attempts END AS held_attempts, \
               held.cpus AS held_cpus, held.memory_mb AS held_memory_mb, page.* \
             FROM held LEFT JOIN page ON TRUE, \
               LATERAL (SELECT page.seq IS NOT DISTINCT FROM (SELECT min(seq) FROM page) AS first) f \
             ORDER BY page.seq"
        );
        let rows = sqlx::query(&sql)
            .bind(worker_id)
            .bind(after_seq)
            .bind(lanes)
            .bind(limit)
            .fetch_all(self.tx.conn()?)
            .await
            .map_err(db)?;
        let Some(first) = rows.first() else {
            return Err(StoreError::corrupt(
                "the held runs' aggregate returned no row",
            ));
        };
        let ids: Vec<String> = first.try_get("held_ids").map_err(db)?;
        let attempts: Vec<i64> = first.try_get("held_attempts").map_err(db)?;
        let held_runs = ids
            .into_iter()
            .zip(attempts)
            .map(|(id, attempt)| Ok((id, to_u32(attempt, "attempt")?)))
            .collect::<StoreResult<Vec<_>>>()?;
        let reserved = Resources {
            cpus: first.try_get("held_cpus").map_err(db)?,
            memory_mb: first
                .try_get::<i64, _>("held_memory_mb")
                .map_err(db)?
                .max(0) as u64,
        };
        let mut page = Vec::with_capacity(rows.len());
        for row in &rows {
            // The held row alone, when the page is empty.
            if row.try_get::<Option<i64>, _>("seq").map_err(db)?.is_none() {
                continue;
            }
            let loaded = decode_run(row)?;
            page.push(PendingRun {
                seq: loaded.run.seq,
                id: loaded.run.id.clone(),
                lane: loaded.run.spec.lane.clone(),
                needs: loaded.run.spec.resources,
                loaded: Some(loaded),
            });
        }
        Ok(((held_runs, reserved), page))
    }

    async fn try_lock_sweep(&mut self) -> StoreResult<bool> {
        // Held until this transaction ends; stores in other schemas sweep independently.
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext(current_schema()))")
            .bind(REAPER_LOCK)
            .fetch_one(self.tx.conn()?)
            .await
            .map_err(db)
    }

    async fn reap_candidates(&mut self, policy: &ReapPolicy) -> StoreResult<Vec<String>> {
        let now = self.now;
        let rows = sqlx::query(REAP_QUERY)
            .bind(now)
            .bind(now.saturating_sub(policy.timeout_grace_ms))
            .bind(now.saturating_sub(policy.cancel_stale_after_ms))
            .bind(i64::from(policy.batch.max(1)))
            .fetch_all(self.tx.conn()?)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|row| row.try_get("id").map_err(db))
            .collect()
    }

    async fn extend_stale_deadlines(&mut self) -> StoreResult<u64> {
        // Only a deadline moves, never earlier; status and attempt are untouched, so this
        // needs no conditional write and cannot race a transition into a wrong state.
        let moved = sqlx::query(&format!(
            "UPDATE runs SET stale_at = $1 + heartbeat_timeout_ms \
             WHERE status IN {IN_FLIGHT} AND stale_at IS NOT NULL \
             AND stale_at < $1 + heartbeat_timeout_ms"
        ))
        .bind(self.now)
        .execute(self.tx.conn()?)
        .await
        .map_err(db)?
        .rows_affected();
        Ok(moved)
    }
}
