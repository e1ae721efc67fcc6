//! Bench and test hooks: filling the store with history in bulk, and measuring it.
//!
//! Not part of the `Store` trait and never used by the server: `tether bench` uses them to put
//! a realistic number of finished runs in the table before timing the reaper, lists and
//! claims against it.

use std::collections::BTreeMap;

use tether_domain::{Resources, RunSpec, RunStatus};
use tether_store::{StoreError, StoreResult};

use crate::{clock, db, SqliteStore};
use tether_store::{EventBody, StatusBody};

/// The worker seeded attempts name; never registered.
const SEEDED_WORKER: &str = "seeded-worker";

/// The spec every seeded run carries: a no-op (`true`) in the default lane, as
/// `POST /v1/runs {"command": ["true"]}` resolves with the server's defaults.
fn seeded_spec() -> RunSpec {
    RunSpec {
        command: vec!["true".into()],
        env: BTreeMap::new(),
        cwd: None,
        lane: "default".into(),
        resources: Resources::default(),
        timeout_ms: None,
        heartbeat_timeout_ms: Some(60_000),
        stall_timeout_ms: None,
        max_attempts: 3,
        idempotency_key: None,
        labels: BTreeMap::new(),
        endpoints: BTreeMap::new(),
        secret_env: Vec::new(),
        output_limit_bytes: 64 * 1024 * 1024,
        request_fingerprint: r#"{"command":["true"]}"#.into(),
    }
}

impl SqliteStore {
    /// Writes `n` runs that already `succeeded` (one attempt each, on a worker that is not
    /// registered, exit code 0, with their final `status` and `end` events), older than
    /// anything else in the table, in one transaction: one `INSERT … SELECT` over a recursive
    /// counter per table. The rows are ordinary rows: every read of the store reads them.
    /// For benchmarks and tests of how the store behaves with a long history.
    pub async fn seed_finished_runs(&self, n: u64) -> StoreResult<()> {
        if n == 0 {
            return Ok(());
        }
        let count =
            i64::try_from(n).map_err(|_| StoreError::unavailable(format!("too many runs: {n}")))?;
        let spec = tether_store::encode_spec(&seeded_spec())?;
        let body = EventBody::Status(StatusBody {
            status: RunStatus::Succeeded,
            attempt: 1,
            error_code: None,
            exit_code: Some(0),
        })
        .to_json()
        .to_string();
        // Ids look like the store's own (UUID text): a fresh v7 prefix, then the counter.
        let uuid = uuid::Uuid::now_v7().to_string();
        let prefix = &uuid[..24];
        let mut tx = self.begin().await?;
        // Each run spans 10 ms: created, claimed +1, started +2, finished +3.
        let base = clock() - count * 10 - 60_000;
        let first_seq: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) + 1 FROM runs")
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query(
            "WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < ?1) \
             INSERT INTO runs (id, lane, status, attempt, max_attempts, spec, cpus, memory_mb, \
               created_at, claimed_at, started_at, finished_at, last_heartbeat_at, confirmed, \
               heartbeat_timeout_ms, exit_code, output_limit_bytes, last_event_seq, \
               request_fingerprint) \
             SELECT ?2 || printf('%012x', i), 'default', 'succeeded', 1, 3, ?3, 1.0, 256, \
               ?4 + i * 10, ?4 + i * 10 + 1, ?4 + i * 10 + 2, ?4 + i * 10 + 3, ?4 + i * 10 + 2, \
               1, 60000, 0, 67108864, 2, ?5 \
             FROM g",
        )
        .bind(count)
        .bind(prefix)
        .bind(&spec)
        .bind(base)
        .bind(r#"{"command":["true"]}"#)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query(
            "INSERT INTO attempts (run_id, attempt, worker_id, claimed_at, started_at, \
               finished_at, status, exit_code) \
             SELECT id, 1, ?2, claimed_at, started_at, finished_at, 'succeeded', 0 \
             FROM runs WHERE seq >= ?1 ORDER BY seq",
        )
        .bind(first_seq)
        .bind(SEEDED_WORKER)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query(
            "INSERT INTO run_events (run_id, seq, kind, attempt, ts, body) \
             SELECT id, k.seq, k.kind, 1, finished_at, ?2 \
             FROM runs, (SELECT 1 AS seq, 'status' AS kind UNION ALL SELECT 2, 'end') AS k \
             WHERE runs.seq >= ?1 ORDER BY runs.seq, k.seq",
        )
        .bind(first_seq)
        .bind(&body)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    /// The database's size in bytes (pages in use times the page size; the WAL not counted).
    pub async fn database_bytes(&self) -> StoreResult<u64> {
        let bytes: i64 = sqlx::query_scalar(
            "SELECT p.page_count * s.page_size FROM pragma_page_count() p, pragma_page_size() s",
        )
        .fetch_one(&self.reader)
        .await
        .map_err(db)?;
        Ok(bytes.max(0) as u64)
    }
}
