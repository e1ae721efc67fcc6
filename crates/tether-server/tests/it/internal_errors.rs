//! A store failure answers a stable code and a generic message: the store's own text (SQL,
//! relation names, decode errors) goes to the log, never to the client.

use serde_json::{json, Value};

use crate::harness::{assert_error, fast_config, pg_server, PgSchema};

/// Runs `sql` in the test's schema, as an operator (or a fault) would behind the server's back.
async fn psql(schema: &PgSchema, sql: &str) {
    let status = tokio::process::Command::new("psql")
        .args([
            &schema.url,
            "-qAtc",
            &format!("SET search_path TO {}; {sql}", schema.name),
        ])
        .stdin(std::process::Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success(), "psql: {sql}");
}

/// Nothing of what the store said, or of where it keeps things, is in the answer.
fn assert_says_nothing_internal(body: &Value, schema: &PgSchema) {
    let text = body.to_string().to_lowercase();
    for leak in [
        "relation",
        "does not exist",
        "select",
        "sqlx",
        "database",
        "version",
        "pools",
        "runs\\\"",
        schema.name.as_str(),
    ] {
        assert!(!text.contains(leak), "`{leak}` leaked: {body}");
    }
}

#[tokio::test]
async fn a_failing_store_answers_its_code_and_no_sql() {
    let (server, schema) = pg_server(fast_config()).await;
    let run = server.submit(json!({"command": ["true"]})).await;
    let id = run["id"].as_str().unwrap();

    // A stored spec this code cannot read: 500, said generically.
    psql(&schema, "UPDATE runs SET spec = '{\"version\": 99}'").await;
    let (status, body) = server.get(&format!("/v1/runs/{id}")).await;
    assert_error(status, &body, 500, "internal");
    assert_eq!(body["error"]["message"], "internal error");
    assert_says_nothing_internal(&body, &schema);

    // A table gone: 503 store_unavailable, and the SQL error stays in the log.
    psql(&schema, "DROP TABLE runs CASCADE").await;
    let (status, body) = server.get(&format!("/v1/runs/{id}")).await;
    assert_error(status, &body, 503, "store_unavailable");
    assert_says_nothing_internal(&body, &schema);
}

#[tokio::test]
async fn a_store_failure_inside_a_batch_is_generic_and_marks_the_store_unhealthy() {
    let (server, schema) = pg_server(fast_config()).await;
    let (status, _) = server.get("/readyz").await;
    assert_eq!(status, 200);

    // Resolving an entry's endpoints reads the pools: that read fails for entry 1.
    psql(&schema, "DROP TABLE pools CASCADE").await;
    let (status, body) = server
        .post(
            "/v1/runs/batch",
            json!({"runs": [
                {"command": ["true"]},
                {"command": ["true"], "endpoints": {"LLM_URL": "llm"}},
            ]}),
        )
        .await;
    assert_error(status, &body, 503, "store_unavailable");
    assert_eq!(body["error"]["index"], 1, "{body}");
    assert_says_nothing_internal(&body, &schema);

    // The store still answers a ping, but this server just failed to use it.
    let (status, body) = server.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable");
    assert_says_nothing_internal(&body, &schema);
}
