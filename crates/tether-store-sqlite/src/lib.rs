//! Tether's embedded store: SQLite through sqlx, in WAL mode, migrations embedded.
//!
//! Every write runs on one writer connection (a pool of one) inside `BEGIN IMMEDIATE`, so
//! writers in this process queue up instead of failing with `SQLITE_BUSY`, and a writer in
//! another process waits on the busy timeout. Reads use a separate small pool and, thanks to
//! WAL, never wait for a writer.
//!
//! The store is a [`tether_store::Driver`] (`driver.rs`: one method per query); its
//! transactions are written once in `tether-store`'s engine. What is SQLite's own: the single
//! writer, `BEGIN IMMEDIATE`, the process clock read once per transaction, `INDEXED BY`.

mod driver;
mod endpoints;
mod lanes;
mod rows;
// Bulk history and schema hooks for `tether bench` and tests, never for the server.
#[cfg(feature = "seed")]
mod seed;

pub use driver::SqliteTx;

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Transaction;
use tether_domain::Millis;
use tether_store::{Outbox, Signal, StoreError, StoreResult};
use tokio::sync::broadcast;

/// Any database failure: the request may be retried. A value that would not decode is a
/// different matter: the data is not what this code wrote.
pub(crate) fn db(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StoreError::corrupt(e),
        _ => StoreError::unavailable(e),
    }
}

/// The store's clock. Each transaction reads it once and uses that one value throughout.
fn clock() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

fn encode<T: serde::Serialize>(value: &T, what: &str) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::corrupt_while(what, e))
}

const IN_FLIGHT: &str = "('claimed', 'running')";
const PENDING: &str = "('pending', 'queued')";

/// The embedded store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    signals: broadcast::Sender<Signal>,
}

/// Creates the database file (and any missing directories) readable by this user alone: new
/// directories 0700, the file 0600 (an existing file is narrowed to 0600). SQLite gives its
/// `-wal` and `-shm` files the database file's mode, so they are private too.
fn make_private_file(path: &Path) -> StoreResult<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let failed = |what: &Path, e: std::io::Error| {
        StoreError::unavailable_while(format!("creating {}", what.display()), e)
    };
    if let Some(parent) = path.parent().filter(|p| *p != Path::new("")) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| failed(parent, e))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| failed(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| failed(path, e))
}

impl SqliteStore {
    /// Opens (creating if missing) the database at a URL like `sqlite://./.tether/tether.db`
    /// and applies the embedded migrations.
    pub async fn open(url: &str) -> StoreResult<SqliteStore> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(db)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        if !in_memory {
            make_private_file(options.get_filename())?;
        }
        // The one writer connection is kept for the store's life: an in-memory database dies
        // with its connection, and a file's is cheap to keep.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await
            .map_err(db)?;
        sqlx::migrate!()
            .run(&writer)
            .await
            .map_err(|e| StoreError::unavailable_while("migrating", e))?;
        // An in-memory database lives in one connection: read through the writer too.
        let reader = if in_memory {
            writer.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(options)
                .await
                .map_err(db)?
        };
        Ok(SqliteStore {
            writer,
            reader,
            signals: tether_store::signal_channel(),
        })
    }

    /// A write transaction. Dropping it without commit (an error, or a cancelled future)
    /// rolls it back before the connection is used again.
    ///
    /// Beginning runs in a task of its own: a request dropped mid-begin (a client that hung
    /// up) must not leave the single writer holding a transaction nobody owns, which sqlx
    /// can do when BEGIN is acknowledged before its `Transaction` exists. Should that ever
    /// happen anyway, the stuck connection is retired and a fresh one opened.
    pub(crate) async fn begin(&self) -> StoreResult<Transaction<'static, sqlx::Sqlite>> {
        let writer = self.writer.clone();
        let begun = tokio::spawn(async move {
            match writer.begin_with("BEGIN IMMEDIATE").await {
                Err(sqlx::Error::InvalidSavePointStatement) => {
                    tracing::warn!("the writer was left inside a transaction; reopening it");
                    writer.acquire().await?.close().await?;
                    writer.begin_with("BEGIN IMMEDIATE").await
                }
                other => other,
            }
        });
        begun
            .await
            .map_err(|e| StoreError::unavailable_while("beginning a transaction", e))?
            .map_err(db)
    }

    pub(crate) async fn commit(
        &self,
        tx: Transaction<'static, sqlx::Sqlite>,
        out: Outbox,
    ) -> StoreResult<()> {
        tx.commit().await.map_err(db)?;
        for signal in out.into_signals() {
            // No receivers is fine: nobody is waiting.
            let _ = self.signals.send(signal);
        }
        Ok(())
    }
}
