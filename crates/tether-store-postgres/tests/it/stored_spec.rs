//! A run stored before the stored spec had a version still reads back whole.

use tether_domain::{LanePolicy, Submission, SubmitDefaults};
use tether_store::Store;
use tether_store_postgres::PgStore;

use tether_testkit::PgSchema;

/// A spec exactly as this store wrote it before `version` (and before `secret_env`).
const UNVERSIONED: &str = r#"{"command":["sh","-c","echo hi"],"env":{"A":"1"},"cwd":null,"lane":"default","resources":{"cpus":0.5,"memory_mb":128},"timeout_ms":5000,"heartbeat_timeout_ms":60000,"stall_timeout_ms":null,"max_attempts":3,"idempotency_key":null,"labels":{"team":"a"},"endpoints":{},"output_limit_bytes":67108864,"request_fingerprint":"{}"}"#;

#[tokio::test]
async fn a_row_written_before_the_spec_version_reads_back() {
    let schema = PgSchema::new();
    let store = PgStore::open_in_schema(&schema.url, &schema.name)
        .await
        .unwrap();
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
    let run_id = store.create_run(&spec).await.unwrap().run.id;

    let mut conn = schema.connect().await;
    sqlx::query(&format!(
        "UPDATE \"{}\".runs SET spec = $1::jsonb WHERE id = $2",
        schema.name
    ))
    .bind(UNVERSIONED)
    .bind(&run_id)
    .execute(&mut conn)
    .await
    .unwrap();

    let run = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.spec.command, ["sh", "-c", "echo hi"]);
    assert_eq!(run.spec.resources.cpus, 0.5);
    assert_eq!(run.spec.timeout_ms, Some(5000));
    assert_eq!(run.spec.labels["team"], "a");
    assert!(run.spec.secret_env.is_empty());
}
