//! What each lane holds, counted from the runs themselves.

use sqlx::{Row, SqlitePool};
use tether_store::{LaneLoad, StoreResult};

use crate::db;
use crate::rows::resources;

pub(crate) async fn lane_loads(pool: &SqlitePool) -> StoreResult<Vec<LaneLoad>> {
    let rows = sqlx::query(
        "SELECT lane, \
                SUM(status IN ('pending', 'queued')) AS pending, \
                SUM(status IN ('claimed', 'running')) AS in_flight, \
                SUM(status = 'running') AS running, \
                MIN(CASE WHEN status IN ('pending', 'queued') THEN created_at END) AS oldest_pending_at, \
                COALESCE(SUM(CASE WHEN status IN ('claimed', 'running') THEN cpus END), 0.0) AS cpus, \
                COALESCE(SUM(CASE WHEN status IN ('claimed', 'running') THEN memory_mb END), 0) AS memory_mb \
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
