//! The shared conformance suite, each case in its own schema.

use std::sync::Arc;

use async_trait::async_trait;
use tether_store_conformance::{Fixture, Harness};
use tether_store_postgres::PgStore;

use tether_testkit::PgSchema;

struct PgHarness;

#[async_trait]
impl Harness for PgHarness {
    async fn fresh(&self) -> Fixture {
        let schema = PgSchema::new();
        let store = PgStore::open_in_schema(&schema.url, &schema.name)
            .await
            .expect("open the store");
        Fixture {
            store: Arc::new(store),
            guard: Box::new(schema),
        }
    }

    async fn write_status_text(&self, fixture: &Fixture, run_id: &str, status: &str) {
        let schema = fixture
            .guard
            .downcast_ref::<PgSchema>()
            .expect("the fixture's guard is ours");
        let mut conn = schema.connect().await;
        sqlx::query(&format!(
            "UPDATE \"{}\".runs SET status = $1 WHERE id = $2",
            schema.name
        ))
        .bind(status)
        .bind(run_id)
        .execute(&mut conn)
        .await
        .expect("rewrite the status");
    }
}

tether_store_conformance::store_conformance_tests!(PgHarness);
