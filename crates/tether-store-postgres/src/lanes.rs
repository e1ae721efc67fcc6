//! What each lane holds, counted from the runs themselves: the queues over an index of the
//! queued runs alone, the runs in flight over the few in flight.

use sqlx::{PgPool, Row};
use tether_store::{LaneFlight, LaneQueue, StoreResult};

use crate::db;
use crate::rows::resources;

pub(crate) async fn queues(pool: &PgPool) -> StoreResult<Vec<LaneQueue>> {
    let queued = sqlx::query(
        "SELECT lane, count(*) AS pending, min(created_at) AS oldest_pending_at \
         FROM runs WHERE status IN ('pending', 'queued') GROUP BY lane",
    )
    .fetch_all(pool)
    .await
    .map_err(db)?;
    queued
        .iter()
        .map(|row| {
            Ok(LaneQueue {
                lane: row.try_get("lane").map_err(db)?,
                pending: row.try_get("pending").map_err(db)?,
                oldest_pending_at: row.try_get("oldest_pending_at").map_err(db)?,
            })
        })
        .collect()
}

pub(crate) async fn flights(pool: &PgPool) -> StoreResult<Vec<LaneFlight>> {
    let flying = sqlx::query(
        "SELECT lane, count(*) AS in_flight, \
                count(*) FILTER (WHERE status = 'running') AS running, \
                coalesce(sum(cpus), 0)::float8 AS cpus, \
                coalesce(sum(memory_mb), 0)::bigint AS memory_mb \
         FROM runs WHERE status IN ('claimed', 'running') GROUP BY lane",
    )
    .fetch_all(pool)
    .await
    .map_err(db)?;
    flying
        .iter()
        .map(|row| {
            Ok(LaneFlight {
                lane: row.try_get("lane").map_err(db)?,
                in_flight: row.try_get("in_flight").map_err(db)?,
                running: row.try_get("running").map_err(db)?,
                reserved: resources(row)?,
            })
        })
        .collect()
}
