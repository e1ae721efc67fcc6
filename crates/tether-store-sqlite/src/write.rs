//! What every write transaction shares: loading a run, conditional writes, events, and ending
//! an attempt as the status machine decided.

use sqlx::query::Query;
use sqlx::sqlite::SqliteArguments;
use sqlx::{Sqlite, SqliteConnection};
use tether_domain::machine::{Decision, TransitionError};
use tether_domain::{Millis, RunStatus};
use tether_store::{status_body, EventKind, Outbox, StoreError, StoreResult};

use crate::db;
use crate::rows::{decode_run, Loaded, RUN_SELECT};

pub(crate) async fn load_run(
    conn: &mut SqliteConnection,
    run_id: &str,
) -> StoreResult<Option<Loaded>> {
    let row = sqlx::query(&format!("{RUN_SELECT} WHERE r.id = ?"))
        .bind(run_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
    row.as_ref().map(decode_run).transpose()
}

pub(crate) fn transition_error(e: TransitionError) -> StoreError {
    match e {
        TransitionError::Terminal => StoreError::Terminal,
        // Not pending / cancel requested only arise on claims, which skip such runs; any other
        // refusal names an attempt that is not current.
        TransitionError::StaleAttempt
        | TransitionError::NotPending
        | TransitionError::CancelRequested => StoreError::StaleAttempt,
    }
}

/// The guard every status-changing `UPDATE runs` ends with; see [`guarded`].
macro_rules! guard {
    () => {
        " WHERE id = ? AND status = ? AND attempt = ?"
    };
}
pub(crate) use guard;

/// Binds [`guard!`]: the write lands only if the run still has the status and attempt it was
/// judged on. This is the invariant that keeps terminal runs terminal and fences zombie
/// attempts even against another process writing the same file: a judgement made on a state
/// that has since changed writes nothing.
pub(crate) fn guarded<'q>(
    query: Query<'q, Sqlite, SqliteArguments<'q>>,
    loaded: &'q Loaded,
) -> Query<'q, Sqlite, SqliteArguments<'q>> {
    query
        .bind(loaded.run.id.as_str())
        .bind(loaded.raw_status.as_str())
        .bind(i64::from(loaded.run.attempt))
}

/// Fails with `StaleAttempt` when a guarded write found the run changed underneath it.
pub(crate) fn one_row(result: sqlx::sqlite::SqliteQueryResult) -> StoreResult<()> {
    if result.rows_affected() == 1 {
        Ok(())
    } else {
        Err(StoreError::StaleAttempt)
    }
}

/// Appends one event to a run, taking the next `seq`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn push_event(
    conn: &mut SqliteConnection,
    out: &mut Outbox,
    run_id: &str,
    kind: EventKind,
    attempt: u32,
    now: Millis,
    body: serde_json::Value,
    data: Option<&[u8]>,
) -> StoreResult<i64> {
    let seq: i64 = sqlx::query_scalar(
        "UPDATE runs SET last_event_seq = last_event_seq + 1 WHERE id = ? RETURNING last_event_seq",
    )
    .bind(run_id)
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    sqlx::query(
        "INSERT INTO run_events (run_id, seq, kind, attempt, ts, body, data) \
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(run_id)
    .bind(seq)
    .bind(kind.as_str())
    .bind(i64::from(attempt))
    .bind(now)
    .bind(body.to_string())
    .bind(data)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    out.events_written(run_id, seq);
    Ok(seq)
}

/// Writes a `status` event, and an `end` event after it when the status is terminal.
pub(crate) async fn push_status(
    conn: &mut SqliteConnection,
    out: &mut Outbox,
    run_id: &str,
    now: Millis,
    body: serde_json::Value,
    status: RunStatus,
    attempt: u32,
) -> StoreResult<i64> {
    let mut seq = push_event(
        conn,
        out,
        run_id,
        EventKind::Status,
        attempt,
        now,
        body.clone(),
        None,
    )
    .await?;
    if status.is_terminal() {
        seq = push_event(conn, out, run_id, EventKind::End, attempt, now, body, None).await?;
    }
    Ok(seq)
}

/// How an attempt's end is described beyond the decision.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ending<'a> {
    pub exit_code: Option<i32>,
    pub error_message: Option<&'a str>,
}

/// Writes what the status machine decided when the current attempt ended (or, for a pending
/// run being cancelled, when the run ended without one): the attempt's record, the run going
/// back to `pending` for a retry or to its terminal status, and the events — one transaction.
pub(crate) async fn end_attempt(
    conn: &mut SqliteConnection,
    out: &mut Outbox,
    now: Millis,
    loaded: &Loaded,
    decision: Decision,
    ending: Ending<'_>,
) -> StoreResult<()> {
    let run = &loaded.run;
    let (ended, error_code) = decision.attempt_result();
    let error_code_text = error_code.map(|c| c.as_str());
    match decision {
        Decision::Retry { .. } => {
            // The next claim stamps these afresh; the run's own error fields describe only its
            // final outcome, the attempt keeps this one.
            let q = sqlx::query(concat!(
                "UPDATE runs SET status = 'pending', worker_id = NULL, claimed_at = NULL, \
                 started_at = NULL, last_heartbeat_at = NULL, confirmed = 0, stale_at = NULL, \
                 timeout_at = NULL, exit_code = NULL, error_code = NULL, error_message = NULL",
                guard!()
            ));
            one_row(guarded(q, loaded).execute(&mut *conn).await.map_err(db)?)?;
            out.run_pending(&run.spec.lane);
        }
        Decision::Terminal { status, .. } => {
            let q = sqlx::query(concat!(
                "UPDATE runs SET status = ?, worker_id = NULL, finished_at = ?, stale_at = NULL, \
                 timeout_at = NULL, exit_code = ?, error_code = ?, error_message = ?",
                guard!()
            ))
            .bind(status.as_str())
            .bind(now)
            .bind(ending.exit_code)
            .bind(error_code_text)
            .bind(ending.error_message);
            one_row(guarded(q, loaded).execute(&mut *conn).await.map_err(db)?)?;
        }
    }
    if let (true, Some(worker_id)) = (run.status.is_in_flight(), &run.worker_id) {
        out.room_freed(&run.spec.lane, worker_id);
    }
    if run.status.is_in_flight() {
        sqlx::query(
            "UPDATE attempts SET finished_at = ?, status = ?, error_code = ?, exit_code = ?, \
             error_message = ? WHERE run_id = ? AND attempt = ? AND status IS NULL",
        )
        .bind(now)
        .bind(ended.as_str())
        .bind(error_code_text)
        .bind(ending.exit_code)
        .bind(ending.error_message)
        .bind(run.id.as_str())
        .bind(i64::from(run.attempt))
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    let after = decision.run_status();
    let body = status_body(after, run.attempt, error_code, ending.exit_code);
    push_status(conn, out, &run.id, now, body, after, run.attempt).await?;
    Ok(())
}
