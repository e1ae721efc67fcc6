//! What each lane holds, counted from the runs themselves.

use sqlx::{PgPool, Row};
use tether_store::{LaneLoad, StoreResult};

use crate::db;
use crate::rows::resources;

pub(crate) async fn lane_loads(pool: &PgPool) -> StoreResult<Vec<LaneLoad>> {
    let rows = sqlx::query(
        "SELECT lane, \
                count(*) FILTER (WHERE status IN ('pending', 'queued')) AS pending, \
                count(*) FILTER (WHERE status IN ('claimed', 'running')) AS in_flight, \
                count(*) FILTER (WHERE status = 'running') AS running, \
                min(created_at) FILTER (WHERE status IN ('pending', 'queued')) AS oldest_pending_at, \
                coalesce(sum(cpus) FILTER (WHERE status IN ('claimed', 'running')), 0)::float8 AS cpus, \
                coalesce(sum(memory_mb) FILTER (WHERE status IN ('claimed', 'running')), 0)::bigint AS memory_mb \
         FROM runs WHERE status IN ('pending', 'queued', 'claimed', 'running') \
         GROUP BY lane ORDER BY lane",
    )
    .fetch_all(pool)
    .await
    .map_err(db)?;
    rows.iter()
        .map(|row| {
            Ok(LaneLoad {
                lane: row.try_get("lane").map_err(db)?,
                pending: row.try_get("pending").map_err(db)?,
                in_flight: row.try_get("in_flight").map_err(db)?,
                running: row.try_get("running").map_err(db)?,
                oldest_pending_at: row.try_get("oldest_pending_at").map_err(db)?,
                reserved: resources(row)?,
            })
        })
        .collect()
}
