//! Opening the embedded database.

use sqlx::Connection;
use tether_domain::{LanePolicy, Submission, SubmitDefaults};
use tether_store::Store;
use tether_store_sqlite::SqliteStore;

#[tokio::test]
async fn open_creates_the_directory_and_keeps_data_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested").join(".tether").join("tether.db");
    let url = format!("sqlite://{}", path.display());
    let spec = Submission {
        command: vec!["true".into()],
        ..Submission::default()
    }
    .resolve(
        Some(&LanePolicy::default()),
        &SubmitDefaults::default(),
        String::new(),
    )
    .unwrap();
    let run_id = {
        let store = SqliteStore::open(&url).await.unwrap();
        store.ping().await.unwrap();
        store.create_run(&spec).await.unwrap().run.id
    };
    assert!(path.exists());
    // Migrations applied twice are a no-op, and the run is still there.
    let store = SqliteStore::open(&url).await.unwrap();
    let run = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.spec, spec);

    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn an_in_memory_store_works() {
    let store = SqliteStore::open("sqlite::memory:").await.unwrap();
    store.ping().await.unwrap();
    assert!(store.list_workers().await.unwrap().is_empty());
}
