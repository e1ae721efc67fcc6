//! The shared conformance suite, each case on its own temp-file database.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::Connection;
use tether_store_conformance::{Fixture, Harness};
use tether_store_sqlite::SqliteStore;

/// Keeps the database's directory alive for the case, and says where the file is.
struct TempDatabase {
    _dir: tempfile::TempDir,
    url: String,
}

struct SqliteHarness;

#[async_trait]
impl Harness for SqliteHarness {
    async fn fresh(&self) -> Fixture {
        let dir = tempfile::tempdir().expect("a temp dir");
        let url = format!("sqlite://{}", dir.path().join("tether.db").display());
        let store = SqliteStore::open(&url).await.expect("open the store");
        Fixture {
            store: Arc::new(store),
            guard: Box::new(TempDatabase { _dir: dir, url }),
        }
    }

    async fn write_status_text(&self, fixture: &Fixture, run_id: &str, status: &str) {
        let db = fixture
            .guard
            .downcast_ref::<TempDatabase>()
            .expect("the fixture's guard is ours");
        let mut conn = sqlx::SqliteConnection::connect(&db.url)
            .await
            .expect("a second connection");
        sqlx::query("UPDATE runs SET status = ? WHERE id = ?")
            .bind(status)
            .bind(run_id)
            .execute(&mut conn)
            .await
            .expect("rewrite the status");
        conn.close().await.expect("close");
    }
}

tether_store_conformance::store_conformance_tests!(SqliteHarness);
