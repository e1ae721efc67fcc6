//! A private PostgreSQL schema per test, so tests share one database without seeing each
//! other's rows.

use sqlx::{Connection, PgConnection};

/// The test database: `TETHER_TEST_DATABASE_URL`, or the local default.
pub fn database_url() -> String {
    std::env::var("TETHER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A schema named `t_<uuid>` on the test database, made by the store that opens in it
/// (`PgStore::open_in_schema(&schema.url, &schema.name)`) and dropped with everything in it
/// when this guard is dropped. Drop it after the stores and servers using it.
pub struct PgSchema {
    pub url: String,
    pub name: String,
}

impl PgSchema {
    /// A fresh name on the test database.
    #[allow(clippy::new_without_default)] // Each call is a different schema, not a default.
    pub fn new() -> PgSchema {
        PgSchema {
            url: database_url(),
            name: format!("t_{}", uuid::Uuid::now_v7().simple()),
        }
    }

    /// A plain connection of its own, outside any store (to write behind a store's back).
    pub async fn connect(&self) -> PgConnection {
        match PgConnection::connect(&self.url).await {
            Ok(conn) => conn,
            Err(e) => panic!("connect to the test database (TETHER_TEST_DATABASE_URL): {e}"),
        }
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        // Detached `psql`, not waited for: waiting would block this test's runtime while one of
        // its servers may hold a lock in the schema (a transaction it could then never finish).
        // The DROP goes through once this process's connections are gone.
        let _ = std::process::Command::new("psql")
            .args([
                &self.url,
                "-qAtc",
                &format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
}
