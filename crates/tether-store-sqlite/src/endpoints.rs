//! Endpoint readiness on SQLite: pools, endpoints, probe claims and stamps, and each attempt's
//! dispatch. Every write is one `BEGIN IMMEDIATE` transaction on the writer with the clock read
//! once, like the rest of the store.

use std::collections::BTreeMap;

use async_trait::async_trait;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use tether_domain::{Dispatch, EndpointKind};
use tether_store::{
    EndpointRecord, EndpointSaved, EndpointStore, NewEndpoint, NewPool, PoolRecord, PoolSource,
    ProbeClaim, ProbeOutcome, StoreError, StoreResult,
};

use crate::{clock, db, encode, SqliteStore, IN_FLIGHT};

const POOL_SELECT: &str = "SELECT name, fallback_url, freshness_ms, source, updated_at FROM pools";
const ENDPOINT_SELECT: &str = "SELECT name, pool, url, readiness_url, kind, revision, \
    created_at, updated_at, last_ready_at, last_probe_at, last_error FROM endpoints";

fn decode_pool(row: &SqliteRow) -> StoreResult<PoolRecord> {
    let source: String = row.try_get("source").map_err(db)?;
    Ok(PoolRecord {
        name: row.try_get("name").map_err(db)?,
        fallback_url: row.try_get("fallback_url").map_err(db)?,
        freshness_ms: row.try_get("freshness_ms").map_err(db)?,
        source: PoolSource::parse(&source)
            .ok_or_else(|| StoreError::corrupt(format!("unknown pool source `{source}`")))?,
        updated_at: row.try_get("updated_at").map_err(db)?,
    })
}

fn decode_endpoint(row: &SqliteRow) -> StoreResult<EndpointRecord> {
    let kind: String = row.try_get("kind").map_err(db)?;
    Ok(EndpointRecord {
        name: row.try_get("name").map_err(db)?,
        pool: row.try_get("pool").map_err(db)?,
        url: row.try_get("url").map_err(db)?,
        readiness_url: row.try_get("readiness_url").map_err(db)?,
        kind: EndpointKind::parse(&kind)
            .ok_or_else(|| StoreError::corrupt(format!("unknown endpoint kind `{kind}`")))?,
        revision: row.try_get("revision").map_err(db)?,
        created_at: row.try_get("created_at").map_err(db)?,
        updated_at: row.try_get("updated_at").map_err(db)?,
        last_ready_at: row.try_get("last_ready_at").map_err(db)?,
        last_probe_at: row.try_get("last_probe_at").map_err(db)?,
        last_error: row.try_get("last_error").map_err(db)?,
    })
}

#[async_trait]
impl EndpointStore for SqliteStore {
    async fn upsert_pool(&self, pool: &NewPool, source: PoolSource) -> StoreResult<PoolRecord> {
        let mut tx = self.begin().await?;
        let now = clock();
        // The conditional write: a config upsert lands only on a pool the API never set.
        sqlx::query(
            "INSERT INTO pools (name, fallback_url, freshness_ms, source, updated_at) \
             VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET fallback_url = excluded.fallback_url, \
               freshness_ms = excluded.freshness_ms, source = excluded.source, \
               updated_at = excluded.updated_at \
             WHERE pools.source = 'config' OR excluded.source = 'api'",
        )
        .bind(&pool.name)
        .bind(pool.fallback_url.as_deref())
        .bind(pool.freshness_ms)
        .bind(source.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let row = sqlx::query(&format!("{POOL_SELECT} WHERE name = ?"))
            .bind(&pool.name)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        let record = decode_pool(&row)?;
        tx.commit().await.map_err(db)?;
        Ok(record)
    }

    async fn list_pools(&self) -> StoreResult<Vec<PoolRecord>> {
        let rows = sqlx::query(&format!("{POOL_SELECT} ORDER BY name"))
            .fetch_all(&self.reader)
            .await
            .map_err(db)?;
        rows.iter().map(decode_pool).collect()
    }

    async fn upsert_endpoint(&self, endpoint: &NewEndpoint) -> StoreResult<EndpointSaved> {
        let mut tx = self.begin().await?;
        let now = clock();
        let pool_exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM pools WHERE name = ?")
            .bind(&endpoint.pool)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        if pool_exists.is_none() {
            return Ok(EndpointSaved::UnknownPool);
        }
        let existing = sqlx::query(&format!("{ENDPOINT_SELECT} WHERE name = ?"))
            .bind(&endpoint.name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?
            .as_ref()
            .map(decode_endpoint)
            .transpose()?;
        let created = match &existing {
            None => {
                sqlx::query(
                    "INSERT INTO endpoints (name, pool, url, readiness_url, kind, revision, \
                     created_at, updated_at) VALUES (?, ?, ?, ?, ?, 1, ?, ?)",
                )
                .bind(&endpoint.name)
                .bind(&endpoint.pool)
                .bind(&endpoint.url)
                .bind(endpoint.readiness_url.as_deref())
                .bind(endpoint.kind.as_str())
                .bind(now)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                true
            }
            Some(old) if old.is_defined_as(endpoint) => false,
            Some(old) => {
                // A new definition: the old stamp vouched for something else, and a probe
                // claimed for it must not land. Conditional on the revision read.
                let result = sqlx::query(
                    "UPDATE endpoints SET pool = ?, url = ?, readiness_url = ?, kind = ?, \
                     revision = revision + 1, updated_at = ?, last_ready_at = NULL, \
                     last_probe_at = NULL, last_error = NULL, probe_claimed_at = NULL \
                     WHERE name = ? AND revision = ?",
                )
                .bind(&endpoint.pool)
                .bind(&endpoint.url)
                .bind(endpoint.readiness_url.as_deref())
                .bind(endpoint.kind.as_str())
                .bind(now)
                .bind(&endpoint.name)
                .bind(old.revision)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                if result.rows_affected() != 1 {
                    return Err(StoreError::unavailable(
                        "the endpoint changed underneath; retry",
                    ));
                }
                false
            }
        };
        let row = sqlx::query(&format!("{ENDPOINT_SELECT} WHERE name = ?"))
            .bind(&endpoint.name)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        let record = decode_endpoint(&row)?;
        tx.commit().await.map_err(db)?;
        Ok(if created {
            EndpointSaved::Created(record)
        } else {
            EndpointSaved::Updated(record)
        })
    }

    async fn delete_endpoint(&self, name: &str) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let result = sqlx::query("DELETE FROM endpoints WHERE name = ?")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(result.rows_affected() == 1)
    }

    async fn list_endpoints(&self) -> StoreResult<Vec<EndpointRecord>> {
        let rows = sqlx::query(&format!("{ENDPOINT_SELECT} ORDER BY name"))
            .fetch_all(&self.reader)
            .await
            .map_err(db)?;
        rows.iter().map(decode_endpoint).collect()
    }

    async fn claim_due_probes(
        &self,
        due_after_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<ProbeClaim>> {
        let mut tx = self.begin().await?;
        let now = clock();
        // One conditional write claims every due endpoint: a claim younger than the interval
        // (this server's or another process's on the same file) makes it not due.
        let rows = sqlx::query(
            "UPDATE endpoints SET probe_claimed_at = ? \
             WHERE name IN (SELECT name FROM endpoints \
               WHERE kind = 'probed' AND readiness_url IS NOT NULL \
                 AND (probe_claimed_at IS NULL OR probe_claimed_at <= ?) \
               ORDER BY coalesce(probe_claimed_at, 0), name LIMIT ?) \
             RETURNING name, pool, revision, readiness_url",
        )
        .bind(now)
        .bind(now.saturating_sub(due_after_ms))
        .bind(i64::from(limit.max(1)))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let mut claims = Vec::with_capacity(rows.len());
        for row in &rows {
            let readiness_url: Option<String> = row.try_get("readiness_url").map_err(db)?;
            claims.push(ProbeClaim {
                endpoint: row.try_get("name").map_err(db)?,
                pool: row.try_get("pool").map_err(db)?,
                revision: row.try_get("revision").map_err(db)?,
                readiness_url: readiness_url.unwrap_or_default(),
                claimed_at: now,
            });
        }
        tx.commit().await.map_err(db)?;
        claims.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        Ok(claims)
    }

    async fn record_probe(&self, claim: &ProbeClaim, outcome: &ProbeOutcome) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let now = clock();
        let (ready, error) = match outcome {
            ProbeOutcome::Ready => (true, None),
            ProbeOutcome::NotReady { error } => (false, Some(error.as_str())),
        };
        // Fenced by the claim: a slow probe whose claim another has since replaced, or of a
        // definition since changed, records nothing.
        let result = sqlx::query(
            "UPDATE endpoints SET last_probe_at = ?, \
             last_ready_at = CASE WHEN ? THEN ? ELSE last_ready_at END, last_error = ? \
             WHERE name = ? AND revision = ? AND probe_claimed_at = ?",
        )
        .bind(now)
        .bind(ready)
        .bind(now)
        .bind(error)
        .bind(&claim.endpoint)
        .bind(claim.revision)
        .bind(claim.claimed_at)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(result.rows_affected() == 1)
    }

    async fn record_dispatch(
        &self,
        run_id: &str,
        attempt: u32,
        worker_id: &str,
        endpoints: &BTreeMap<String, Dispatch>,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        // Written once, and only for the run's current attempt while its worker holds it.
        let result = sqlx::query(&format!(
            "UPDATE attempts SET endpoints = ? \
             WHERE run_id = ? AND attempt = ? AND worker_id = ? AND endpoints IS NULL \
               AND EXISTS (SELECT 1 FROM runs WHERE id = ? AND attempt = ? AND worker_id = ? \
                 AND status IN {IN_FLIGHT})"
        ))
        .bind(encode(endpoints, "attempt endpoints")?)
        .bind(run_id)
        .bind(i64::from(attempt))
        .bind(worker_id)
        .bind(run_id)
        .bind(i64::from(attempt))
        .bind(worker_id)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if result.rows_affected() != 1 {
            return Err(StoreError::StaleAttempt);
        }
        tx.commit().await.map_err(db)?;
        Ok(())
    }
}
