//! Endpoint readiness on PostgreSQL: the queries of pools, endpoints, probe claims and stamps,
//! and each attempt's dispatch. The transactions themselves are `tether_store`'s, written once
//! over [`EndpointDriver`], each in the store's one kind of transaction ([`PgTx`], begun and
//! committed by its [`Driver`]), stamped with the database's clock (`tether_now_ms()`, read
//! once by `begin`), so stamps from every server compare alike.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::Row;
use tether_domain::{EndpointKind, Millis};
use tether_store::{
    Driver, EndpointDriver, EndpointRecord, NewEndpoint, NewPool, Outbox, PoolRecord, PoolSource,
    ProbeClaim, StoreError, StoreResult,
};

use crate::{db, PgStore, PgTx, IN_FLIGHT};

const POOL_SELECT: &str = "SELECT name, fallback_url, freshness_ms, source, updated_at FROM pools";
const ENDPOINT_SELECT: &str = "SELECT name, pool, url, readiness_url, kind, revision, \
    created_at, updated_at, last_ready_at, last_probe_at, last_error FROM endpoints";

fn decode_pool(row: &PgRow) -> StoreResult<PoolRecord> {
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

fn decode_endpoint(row: &PgRow) -> StoreResult<EndpointRecord> {
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

fn decode_claim(row: &PgRow, claimed_at: Millis) -> StoreResult<ProbeClaim> {
    let readiness_url: Option<String> = row.try_get("readiness_url").map_err(db)?;
    Ok(ProbeClaim {
        endpoint: row.try_get("name").map_err(db)?,
        pool: row.try_get("pool").map_err(db)?,
        revision: row.try_get("revision").map_err(db)?,
        readiness_url: readiness_url.unwrap_or_default(),
        claimed_at,
    })
}

#[async_trait]
impl EndpointDriver for PgStore {
    type Tx = PgTx;

    async fn begin_endpoints(&self) -> StoreResult<(PgTx, Millis)> {
        let tx = Driver::begin(self).await?;
        let now = tx.now;
        Ok((tx, now))
    }

    async fn commit_endpoints(&self, tx: PgTx) -> StoreResult<()> {
        // Endpoint writes wake nobody: nothing is notified.
        Driver::commit(self, tx, Outbox::default()).await
    }

    async fn pool_upsert_unless_set_by_api(
        &self,
        tx: &mut Self::Tx,
        pool: &NewPool,
        source: PoolSource,
        now: Millis,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO pools (name, fallback_url, freshness_ms, source, updated_at) \
             VALUES ($1, $2, $3, $4, $5) \
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
        .execute(tx.tx.conn()?)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn pool_get(&self, tx: &mut Self::Tx, name: &str) -> StoreResult<Option<PoolRecord>> {
        sqlx::query(&format!("{POOL_SELECT} WHERE name = $1"))
            .bind(name)
            .fetch_optional(tx.tx.conn()?)
            .await
            .map_err(db)?
            .as_ref()
            .map(decode_pool)
            .transpose()
    }

    async fn pool_list(&self) -> StoreResult<Vec<PoolRecord>> {
        let rows = sqlx::query(&format!("{POOL_SELECT} ORDER BY name"))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(db)?;
        rows.iter().map(decode_pool).collect()
    }

    async fn endpoint_get_for_update(
        &self,
        tx: &mut Self::Tx,
        name: &str,
    ) -> StoreResult<Option<EndpointRecord>> {
        // Locks the row, so concurrent PUTs of one endpoint apply one after another.
        sqlx::query(&format!("{ENDPOINT_SELECT} WHERE name = $1 FOR UPDATE"))
            .bind(name)
            .fetch_optional(tx.tx.conn()?)
            .await
            .map_err(db)?
            .as_ref()
            .map(decode_endpoint)
            .transpose()
    }

    async fn endpoint_get(
        &self,
        tx: &mut Self::Tx,
        name: &str,
    ) -> StoreResult<Option<EndpointRecord>> {
        sqlx::query(&format!("{ENDPOINT_SELECT} WHERE name = $1"))
            .bind(name)
            .fetch_optional(tx.tx.conn()?)
            .await
            .map_err(db)?
            .as_ref()
            .map(decode_endpoint)
            .transpose()
    }

    async fn endpoint_insert(
        &self,
        tx: &mut Self::Tx,
        endpoint: &NewEndpoint,
        now: Millis,
    ) -> StoreResult<bool> {
        let inserted = sqlx::query(
            "INSERT INTO endpoints (name, pool, url, readiness_url, kind, revision, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 1, $6, $7) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&endpoint.name)
        .bind(&endpoint.pool)
        .bind(&endpoint.url)
        .bind(endpoint.readiness_url.as_deref())
        .bind(endpoint.kind.as_str())
        .bind(now)
        .bind(now)
        .execute(tx.tx.conn()?)
        .await
        .map_err(db)?;
        Ok(inserted.rows_affected() == 1)
    }

    async fn endpoint_redefine_if_revision(
        &self,
        tx: &mut Self::Tx,
        endpoint: &NewEndpoint,
        revision: i64,
        now: Millis,
    ) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE endpoints SET pool = $1, url = $2, readiness_url = $3, kind = $4, \
             revision = revision + 1, updated_at = $5, last_ready_at = NULL, \
             last_probe_at = NULL, last_error = NULL, probe_claimed_at = NULL \
             WHERE name = $6 AND revision = $7",
        )
        .bind(&endpoint.pool)
        .bind(&endpoint.url)
        .bind(endpoint.readiness_url.as_deref())
        .bind(endpoint.kind.as_str())
        .bind(now)
        .bind(&endpoint.name)
        .bind(revision)
        .execute(tx.tx.conn()?)
        .await
        .map_err(db)?;
        Ok(result.rows_affected() == 1)
    }

    async fn endpoint_delete(&self, tx: &mut Self::Tx, name: &str) -> StoreResult<bool> {
        let result = sqlx::query("DELETE FROM endpoints WHERE name = $1")
            .bind(name)
            .execute(tx.tx.conn()?)
            .await
            .map_err(db)?;
        Ok(result.rows_affected() == 1)
    }

    async fn endpoint_list(&self) -> StoreResult<Vec<EndpointRecord>> {
        let rows = sqlx::query(&format!("{ENDPOINT_SELECT} ORDER BY name"))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(db)?;
        rows.iter().map(decode_endpoint).collect()
    }

    async fn endpoint_claim_due_probes(
        &self,
        tx: &mut Self::Tx,
        now: Millis,
        due_at_or_before: Millis,
        limit: i64,
    ) -> StoreResult<Vec<ProbeClaim>> {
        // Rows another server is claiming right now are skipped, not waited for; the claim's
        // age is re-checked on the locked row, so a claim that just landed keeps it not due.
        let rows = sqlx::query(
            "UPDATE endpoints e SET probe_claimed_at = $1 \
             FROM (SELECT name FROM endpoints \
               WHERE kind = 'probed' AND readiness_url IS NOT NULL \
                 AND (probe_claimed_at IS NULL OR probe_claimed_at <= $2) \
               ORDER BY coalesce(probe_claimed_at, 0), name LIMIT $3 \
               FOR UPDATE SKIP LOCKED) due \
             WHERE e.name = due.name \
               AND (e.probe_claimed_at IS NULL OR e.probe_claimed_at <= $2) \
             RETURNING e.name, e.pool, e.revision, e.readiness_url",
        )
        .bind(now)
        .bind(due_at_or_before)
        .bind(limit)
        .fetch_all(tx.tx.conn()?)
        .await
        .map_err(db)?;
        rows.iter().map(|row| decode_claim(row, now)).collect()
    }

    async fn endpoint_set_probe_result_if_claimed(
        &self,
        tx: &mut Self::Tx,
        claim: &ProbeClaim,
        ready: bool,
        error: Option<&str>,
        now: Millis,
    ) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE endpoints SET last_probe_at = $1, \
             last_ready_at = CASE WHEN $2 THEN $3 ELSE last_ready_at END, last_error = $4 \
             WHERE name = $5 AND revision = $6 AND probe_claimed_at = $7",
        )
        .bind(now)
        .bind(ready)
        .bind(now)
        .bind(error)
        .bind(&claim.endpoint)
        .bind(claim.revision)
        .bind(claim.claimed_at)
        .execute(tx.tx.conn()?)
        .await
        .map_err(db)?;
        Ok(result.rows_affected() == 1)
    }

    async fn attempt_set_dispatch_if_current(
        &self,
        tx: &mut Self::Tx,
        run_id: &str,
        attempt: u32,
        worker_id: &str,
        endpoints_json: &str,
    ) -> StoreResult<bool> {
        let result = sqlx::query(&format!(
            "UPDATE attempts SET endpoints = $1::jsonb \
             WHERE run_id = $2 AND attempt = $3 AND worker_id = $4 AND endpoints IS NULL \
               AND EXISTS (SELECT 1 FROM runs WHERE id = $2 AND attempt = $3 AND worker_id = $4 \
                 AND status IN {IN_FLIGHT})"
        ))
        .bind(endpoints_json)
        .bind(run_id)
        .bind(i64::from(attempt))
        .bind(worker_id)
        .execute(tx.tx.conn()?)
        .await
        .map_err(db)?;
        Ok(result.rows_affected() == 1)
    }
}
