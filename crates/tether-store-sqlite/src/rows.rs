//! Reading rows back into the store's records.

use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use tether_domain::{ErrorCode, Millis, Resources, RunStatus};
use tether_store::driver::LoadedRun;
use tether_store::{
    AttemptRecord, EventBody, EventKind, EventRecord, RunRecord, StoreError, StoreResult,
    WorkerRecord,
};

use crate::db;

/// Every column of a run but its queue position.
macro_rules! run_columns {
    () => {
        "SELECT r.seq, r.id, r.status, r.attempt, r.spec, \
    r.worker_id, r.created_at, r.claimed_at, r.started_at, r.finished_at, r.last_heartbeat_at, \
    r.last_output_at, r.cancel_requested_at, r.exit_code, r.error_code, r.error_message, \
    r.stdout_bytes, r.stderr_bytes, r.last_event_seq, r.output_bytes, r.confirmed, r.stale_at, \
    r.timeout_at, r.released_attempts"
    };
}

/// A run with its queue position while pending (legacy `queued` rows count as pending), for
/// reads. Counting what is ahead scans the lane's queue, so a write transaction loads runs
/// with [`RUN_SELECT_IN_TX`] and the engine asks for a position only where it answers one.
pub(crate) const RUN_SELECT: &str = concat!(
    run_columns!(),
    ", CASE WHEN r.status IN ('pending', 'queued') THEN 1 + (SELECT COUNT(*) FROM runs p \
        WHERE p.lane = r.lane AND p.status IN ('pending', 'queued') AND p.seq < r.seq) \
    END AS queue_position FROM runs r"
);

/// A run as a write's `RETURNING` gives it back (SQLite names no table there), without its
/// queue position.
pub(crate) const RUN_RETURNING: &str = "seq, id, status, attempt, spec, worker_id, created_at, \
    claimed_at, started_at, finished_at, last_heartbeat_at, last_output_at, cancel_requested_at, \
    exit_code, error_code, error_message, stdout_bytes, stderr_bytes, last_event_seq, \
    output_bytes, confirmed, stale_at, timeout_at, released_attempts, NULL AS queue_position";

/// A run without its queue position: what a write transaction judges.
pub(crate) const RUN_SELECT_IN_TX: &str =
    concat!(run_columns!(), ", NULL AS queue_position FROM runs r");

/// Resources from a row's `cpus` and `memory_mb` columns (a negative memory reads as none).
pub(crate) fn resources(row: &SqliteRow) -> StoreResult<Resources> {
    Ok(Resources {
        cpus: row.try_get("cpus").map_err(db)?,
        memory_mb: row.try_get::<i64, _>("memory_mb").map_err(db)?.max(0) as u64,
    })
}

pub(crate) fn to_u32(value: i64, what: &str) -> StoreResult<u32> {
    u32::try_from(value).map_err(|_| StoreError::corrupt(format!("{what} out of range: {value}")))
}

fn status(text: &str) -> StoreResult<RunStatus> {
    RunStatus::parse(text).ok_or_else(|| StoreError::corrupt(format!("unknown status `{text}`")))
}

fn error_code(text: Option<String>) -> StoreResult<Option<ErrorCode>> {
    text.map(|t| {
        ErrorCode::parse(&t).ok_or_else(|| StoreError::corrupt(format!("unknown error code `{t}`")))
    })
    .transpose()
}

fn json<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| StoreError::corrupt_while(what, e))
}

pub(crate) fn decode_run(row: &SqliteRow) -> StoreResult<LoadedRun> {
    let raw_status: String = row.try_get("status").map_err(db)?;
    let spec = tether_store::decode_spec(&row.try_get::<String, _>("spec").map_err(db)?)?;
    let exit_code: Option<i64> = row.try_get("exit_code").map_err(db)?;
    let run = RunRecord {
        id: row.try_get("id").map_err(db)?,
        seq: row.try_get("seq").map_err(db)?,
        spec,
        status: status(&raw_status)?,
        attempt: to_u32(row.try_get("attempt").map_err(db)?, "attempt")?,
        released_attempts: to_u32(
            row.try_get("released_attempts").map_err(db)?,
            "released_attempts",
        )?,
        worker_id: row.try_get("worker_id").map_err(db)?,
        created_at: row.try_get("created_at").map_err(db)?,
        claimed_at: row.try_get("claimed_at").map_err(db)?,
        started_at: row.try_get("started_at").map_err(db)?,
        finished_at: row.try_get("finished_at").map_err(db)?,
        last_heartbeat_at: row.try_get("last_heartbeat_at").map_err(db)?,
        last_output_at: row.try_get("last_output_at").map_err(db)?,
        cancel_requested_at: row.try_get("cancel_requested_at").map_err(db)?,
        exit_code: exit_code.map(|c| c as i32),
        error_code: error_code(row.try_get("error_code").map_err(db)?)?,
        error_message: row.try_get("error_message").map_err(db)?,
        stdout_bytes: row.try_get("stdout_bytes").map_err(db)?,
        stderr_bytes: row.try_get("stderr_bytes").map_err(db)?,
        queue_position: row.try_get("queue_position").map_err(db)?,
        last_event_seq: row.try_get("last_event_seq").map_err(db)?,
    };
    Ok(LoadedRun {
        run,
        raw_status,
        output_bytes: row.try_get("output_bytes").map_err(db)?,
        confirmed: row.try_get("confirmed").map_err(db)?,
        stale_at: row.try_get("stale_at").map_err(db)?,
        timeout_at: row.try_get("timeout_at").map_err(db)?,
    })
}

/// Attempts with their worker's registered name (`a`: attempts, `w`: workers).
pub(crate) const ATTEMPT_SELECT: &str = "SELECT a.run_id, a.attempt, a.worker_id, \
    w.name AS worker_name, a.claimed_at, a.started_at, a.finished_at, a.status, a.error_code, \
    a.exit_code, a.error_message, a.endpoints FROM attempts a LEFT JOIN workers w ON w.id = a.worker_id";

pub(crate) fn decode_attempt(row: &SqliteRow) -> StoreResult<AttemptRecord> {
    let status_text: Option<String> = row.try_get("status").map_err(db)?;
    let exit_code: Option<i64> = row.try_get("exit_code").map_err(db)?;
    Ok(AttemptRecord {
        run_id: row.try_get("run_id").map_err(db)?,
        attempt: to_u32(row.try_get("attempt").map_err(db)?, "attempt")?,
        worker_id: row.try_get("worker_id").map_err(db)?,
        worker_name: row.try_get("worker_name").map_err(db)?,
        claimed_at: row.try_get("claimed_at").map_err(db)?,
        started_at: row.try_get("started_at").map_err(db)?,
        finished_at: row.try_get("finished_at").map_err(db)?,
        status: status_text.as_deref().map(status).transpose()?,
        error_code: error_code(row.try_get("error_code").map_err(db)?)?,
        exit_code: exit_code.map(|c| c as i32),
        error_message: row.try_get("error_message").map_err(db)?,
        endpoints: match row.try_get::<Option<String>, _>("endpoints").map_err(db)? {
            Some(text) => tether_store::decode_dispatches(&text)?,
            None => Default::default(),
        },
    })
}

pub(crate) const EVENT_SELECT: &str =
    "SELECT run_id, seq, kind, attempt, ts, body, data FROM run_events";

pub(crate) fn decode_event(row: &SqliteRow) -> StoreResult<EventRecord> {
    let kind: String = row.try_get("kind").map_err(db)?;
    let kind = EventKind::parse(&kind)
        .ok_or_else(|| StoreError::corrupt(format!("unknown event kind `{kind}`")))?;
    Ok(EventRecord {
        run_id: row.try_get("run_id").map_err(db)?,
        seq: row.try_get("seq").map_err(db)?,
        kind,
        ts: row.try_get("ts").map_err(db)?,
        attempt: to_u32(row.try_get("attempt").map_err(db)?, "attempt")?,
        body: EventBody::decode(kind, &row.try_get::<String, _>("body").map_err(db)?)?,
        data: row.try_get("data").map_err(db)?,
    })
}

pub(crate) const WORKER_SELECT: &str = "SELECT id, name, cpus, memory_mb, lanes, labels, \
    registered_at, last_heartbeat_at, draining, deregistered_at FROM workers";

/// A worker row; `runs` and `reserved` are filled in by the caller.
pub(crate) fn decode_worker(row: &SqliteRow) -> StoreResult<(WorkerRecord, Option<Millis>)> {
    let memory_mb: i64 = row.try_get("memory_mb").map_err(db)?;
    let worker = WorkerRecord {
        id: row.try_get("id").map_err(db)?,
        name: row.try_get("name").map_err(db)?,
        capacity: Resources {
            cpus: row.try_get("cpus").map_err(db)?,
            memory_mb: memory_mb.max(0) as u64,
        },
        lanes: json(
            &row.try_get::<String, _>("lanes").map_err(db)?,
            "worker lanes",
        )?,
        labels: json(
            &row.try_get::<String, _>("labels").map_err(db)?,
            "worker labels",
        )?,
        registered_at: row.try_get("registered_at").map_err(db)?,
        last_heartbeat_at: row.try_get("last_heartbeat_at").map_err(db)?,
        draining: row.try_get("draining").map_err(db)?,
        runs: Vec::new(),
        reserved: Resources {
            cpus: 0.0,
            memory_mb: 0,
        },
    };
    Ok((worker, row.try_get("deregistered_at").map_err(db)?))
}
