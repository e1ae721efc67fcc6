//! A fresh schema per case, dropped when its guard is.

use sqlx::{Connection, PgConnection};

pub fn database_url() -> String {
    std::env::var("TETHER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A schema named `t_<uuid>`, dropped with everything in it when this is dropped.
pub struct TestSchema {
    pub url: String,
    pub name: String,
}

impl TestSchema {
    pub fn new() -> TestSchema {
        TestSchema {
            url: database_url(),
            name: format!("t_{}", uuid::Uuid::now_v7().simple()),
        }
    }

    /// A plain connection of its own, outside any store.
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .expect("connect to the test database")
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // Drop cannot await: clean up on a thread of its own with a runtime of its own, and
        // wait for it, so nothing is left behind when the case ends (even by a panic).
        let url = self.url.clone();
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name);
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup");
            runtime.block_on(async move {
                let mut conn = PgConnection::connect(&url).await?;
                // A store's sessions may still be closing; don't wait on their locks forever.
                sqlx::query("SET lock_timeout = '10s'")
                    .execute(&mut conn)
                    .await?;
                sqlx::query(&sql).execute(&mut conn).await?;
                conn.close().await
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("dropping test schema {}: {e}", self.name),
            Err(_) => eprintln!("dropping test schema {}: the cleanup panicked", self.name),
        }
    }
}
