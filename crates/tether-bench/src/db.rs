//! The store under test: a fresh SQLite file or a schema of its own on PostgreSQL, and how it
//! is cleaned up.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tether_store::{SharedStore, StoreError};
use tether_store_postgres::PgStore;
use tether_store_sqlite::SqliteStore;

use crate::{store_error, BenchError};

pub(crate) enum BenchDb {
    Sqlite {
        store: Arc<SqliteStore>,
        url: String,
        /// The default database's directory, removed when this is dropped.
        _dir: Option<tempfile::TempDir>,
    },
    Postgres {
        store: Arc<PgStore>,
        url: String,
    },
}

impl BenchDb {
    pub(crate) async fn open(database: Option<&str>) -> Result<BenchDb, BenchError> {
        match database {
            None => {
                let dir = tempfile::tempdir()?;
                let url = format!("sqlite://{}", dir.path().join("bench.db").display());
                let store = SqliteStore::open(&url)
                    .await
                    .map_err(store_error("cannot open the SQLite store"))?;
                Ok(BenchDb::Sqlite {
                    store: Arc::new(store),
                    url,
                    _dir: Some(dir),
                })
            }
            Some(url) if url.starts_with("sqlite:") => {
                let store = SqliteStore::open(url)
                    .await
                    .map_err(store_error("cannot open the SQLite store"))?;
                Ok(BenchDb::Sqlite {
                    store: Arc::new(store),
                    url: url.to_string(),
                    _dir: None,
                })
            }
            Some(url) if url.starts_with("postgres:") || url.starts_with("postgresql:") => {
                let stamp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_micros())
                    .unwrap_or(0);
                let schema = format!("tether_bench_{}_{stamp}", std::process::id());
                let store = PgStore::open_in_schema(url, &schema)
                    .await
                    .map_err(store_error("cannot open the PostgreSQL store"))?;
                // The bench's own store sets up and measures; listening, it would be a second
                // server to the one under test, which then notifies where it alone would not.
                store.stop_listening().await;
                Ok(BenchDb::Postgres {
                    store: Arc::new(store),
                    url: url.to_string(),
                })
            }
            Some(url) => Err(BenchError::Usage(format!(
                "unsupported --database `{url}`: use sqlite://PATH or postgres://…"
            ))),
        }
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            BenchDb::Sqlite { .. } => "sqlite",
            BenchDb::Postgres { .. } => "postgres",
        }
    }

    pub(crate) fn label(&self) -> String {
        match self {
            BenchDb::Sqlite { url, .. } => url.clone(),
            BenchDb::Postgres { url, store } => {
                format!("{} (schema {})", redact(url), store.schema())
            }
        }
    }

    /// The `--database` a `tether server` child process is given: the same file, or the same
    /// database with the bench's schema as its `search_path`.
    pub(crate) fn server_url(&self) -> String {
        match self {
            BenchDb::Sqlite { url, .. } => url.clone(),
            BenchDb::Postgres { url, store } => {
                let joiner = if url.contains('?') { '&' } else { '?' };
                format!("{url}{joiner}options=-csearch_path%3D{}", store.schema())
            }
        }
    }

    pub(crate) fn shared(&self) -> SharedStore {
        match self {
            BenchDb::Sqlite { store, .. } => store.clone(),
            BenchDb::Postgres { store, .. } => store.clone(),
        }
    }

    pub(crate) async fn seed(&self, n: u64) -> Result<(), StoreError> {
        match self {
            BenchDb::Sqlite { store, .. } => store.seed_finished_runs(n).await,
            BenchDb::Postgres { store, .. } => store.seed_finished_runs(n).await,
        }
    }

    pub(crate) async fn bytes(&self) -> Result<u64, StoreError> {
        match self {
            BenchDb::Sqlite { store, .. } => store.database_bytes().await,
            BenchDb::Postgres { store, .. } => store.database_bytes().await,
        }
    }

    /// Drops the bench's PostgreSQL schema; the default SQLite directory goes with `self`.
    pub(crate) async fn cleanup(self) {
        if let BenchDb::Postgres { store, .. } = &self {
            if let Err(e) = store.drop_schema().await {
                eprintln!(
                    "tether bench: could not drop schema {}: {e}",
                    store.schema()
                );
            }
        }
    }
}

/// A URL without the password of its user info.
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1/test"),
            "postgres://postgres@127.0.0.1/test"
        );
        assert_eq!(redact("sqlite:///tmp/a.db"), "sqlite:///tmp/a.db");
    }
}
