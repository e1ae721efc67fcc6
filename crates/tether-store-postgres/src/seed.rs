//! Bench and test hooks: filling the store with history in bulk, measuring it, and dropping a
//! schema made for one bench.
//!
//! Not part of the `Store` trait and never used by the server: `tether bench` uses them to put
//! a realistic number of finished runs in the table before timing the reaper, lists and
//! claims against it.

use std::collections::BTreeMap;

use tether_domain::{Resources, RunSpec, RunStatus};
use tether_store::{StoreError, StoreResult};

use crate::{db, PgStore};
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

impl PgStore {
    /// Ends this store's start-up grace (during which it notifies whether or not it has heard
    /// of another server), so a test sees at once what a lone server sends.
    pub fn end_startup_grace(&self) {
        self.inner.peers.end_grace();
    }

    /// Stops listening for (and announcing to) other servers, for a tool that only sets a
    /// schema up beside the servers it measures: it is then no peer of theirs, and they notify
    /// only one another, as they would without it. Its own commits still notify.
    pub async fn stop_listening(&self) {
        self.inner.listener.abort();
        self.inner.announcer.abort();
        self.inner.listener_pool.close().await;
    }

    /// Writes `n` runs that already `succeeded` (one attempt each, on a worker that is not
    /// registered, exit code 0, with their final `status` and `end` events), older than
    /// anything else in the table, in one transaction: one `INSERT … SELECT … FROM
    /// generate_series` per table, then `ANALYZE` (as autovacuum would soon after such a
    /// load). The rows are ordinary rows: every read of the store reads them. For benchmarks
    /// and tests of how the store behaves with a long history.
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
        let mut tx = self.pool().begin().await.map_err(db)?;
        let first_seq: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) + 1 FROM runs")
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        // Each run spans 10 ms: created, claimed +1, started +2, finished +3.
        sqlx::query(
            "INSERT INTO runs (id, lane, status, attempt, max_attempts, spec, cpus, memory_mb, \
               created_at, claimed_at, started_at, finished_at, last_heartbeat_at, confirmed, \
               heartbeat_timeout_ms, exit_code, output_limit_bytes, last_event_seq, \
               request_fingerprint) \
             SELECT $2 || lpad(to_hex(g), 12, '0'), 'default', 'succeeded', 1, 3, $3::jsonb, \
               1.0, 256, b.t + g * 10, b.t + g * 10 + 1, b.t + g * 10 + 2, b.t + g * 10 + 3, \
               b.t + g * 10 + 2, TRUE, 60000, 0, 67108864, 2, $4 \
             FROM (SELECT tether_now_ms() - $1 * 10 - 60000 AS t) AS b, \
               generate_series(1::bigint, $1) AS g \
             ORDER BY g",
        )
        .bind(count)
        .bind(prefix)
        .bind(&spec)
        .bind(r#"{"command":["true"]}"#)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query(
            "INSERT INTO attempts (run_id, attempt, worker_id, claimed_at, started_at, \
               finished_at, status, exit_code) \
             SELECT id, 1, $2, claimed_at, started_at, finished_at, 'succeeded', 0 \
             FROM runs WHERE seq >= $1 ORDER BY seq",
        )
        .bind(first_seq)
        .bind(SEEDED_WORKER)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query(
            "INSERT INTO run_events (run_id, seq, kind, attempt, ts, body) \
             SELECT r.id, k.seq, k.kind, 1, r.finished_at, $2::jsonb \
             FROM runs r, (VALUES (1::bigint, 'status'), (2::bigint, 'end')) AS k (seq, kind) \
             WHERE r.seq >= $1 ORDER BY r.seq, k.seq",
        )
        .bind(first_seq)
        .bind(&body)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        sqlx::query("ANALYZE runs, attempts, run_events")
            .execute(self.pool())
            .await
            .map_err(db)?;
        Ok(())
    }

    /// The size in bytes of the store's tables in its schema, with their indexes and TOAST.
    pub async fn database_bytes(&self) -> StoreResult<u64> {
        let bytes: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::bigint \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relkind = 'r'",
        )
        .fetch_one(self.pool())
        .await
        .map_err(db)?;
        Ok(bytes.max(0) as u64)
    }

    /// Drops this store's schema with everything in it, then closes the store. For a store
    /// opened with [`PgStore::open_in_schema`] for one bench or test; every call fails
    /// afterwards. Refuses the `public` schema.
    pub async fn drop_schema(&self) -> StoreResult<()> {
        let schema = self.schema().to_string();
        if schema == "public" {
            return Err(StoreError::unavailable(
                "refusing to drop the public schema",
            ));
        }
        let mut conn = self.pool().acquire().await.map_err(db)?;
        sqlx::query("SET lock_timeout = '10s'")
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        // `schema()` is `current_schema()`; quoting it as an identifier is safe for any name.
        let quoted = schema.replace('"', "\"\"");
        sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{quoted}\" CASCADE"))
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        drop(conn);
        self.close().await;
        Ok(())
    }
}
