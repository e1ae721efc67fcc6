//! A server on a free loopback port over a fresh SQLite file, and a raw HTTP client.

use std::time::Duration;

use serde_json::{json, Value};
use tether_server::{RunningServer, ServerConfig};
pub use tether_testkit::http::assert_error;
pub use tether_testkit::PgSchema;

pub struct TestServer {
    pub server: Option<RunningServer>,
    pub base: String,
    pub http: reqwest::Client,
    /// Each registered worker's secret, by id: `post` sends it with that worker's calls.
    pub secrets: std::sync::Mutex<std::collections::HashMap<String, String>>,
    _dir: tempfile::TempDir,
}

pub fn fast_config() -> ServerConfig {
    ServerConfig {
        heartbeat_interval: Duration::from_millis(200),
        stale_after: Duration::from_secs(1),
        sse_heartbeat: Duration::from_millis(300),
        reaper_interval: Duration::from_secs(5),
        max_claim_wait: Duration::from_secs(5),
        ..ServerConfig::default()
    }
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(fast_config()).await
    }

    pub async fn start_with(mut config: ServerConfig) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        config.database = format!("sqlite://{}/tether.db", dir.path().display());
        let store = tether_server::open_store(&config.database).await.unwrap();
        TestServer::serve(config, store, dir).await
    }

    /// A server over a store the test opened itself (e.g. PostgreSQL in a fresh schema).
    pub async fn start_on(config: ServerConfig, store: tether_store::SharedStore) -> TestServer {
        TestServer::serve(config, store, tempfile::tempdir().unwrap()).await
    }

    async fn serve(
        config: ServerConfig,
        store: tether_store::SharedStore,
        dir: tempfile::TempDir,
    ) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = tether_server::start(config, store, listener).await.unwrap();
        TestServer {
            base: format!("http://{}", server.addr),
            server: Some(server),
            http: reqwest::Client::new(),
            secrets: Default::default(),
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn state(&self) -> &tether_server::AppState {
        &self.server.as_ref().unwrap().state
    }

    /// The worker a worker call names: in its path, or as `worker_id` in its body.
    fn named_worker(path: &str, body: &Value) -> Option<String> {
        body["worker_id"].as_str().map(str::to_string).or_else(|| {
            path.strip_prefix("/v1/workers/")
                .map(|rest| rest.split('/').next().unwrap_or(rest).to_string())
        })
    }

    /// Adds the secret of the worker a call names, if this harness saw it register.
    pub fn as_worker(
        &self,
        req: reqwest::RequestBuilder,
        worker_id: &str,
    ) -> reqwest::RequestBuilder {
        match self.secrets.lock().unwrap().get(worker_id) {
            Some(secret) => req.header(tether_api::WORKER_SECRET_HEADER, secret),
            None => req,
        }
    }

    /// POSTs JSON, returns status and body. A worker call carries its worker's secret.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let mut req = self.http.post(self.url(path)).json(&body);
        if let Some(worker) = Self::named_worker(path, &body) {
            req = self.as_worker(req, &worker);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let answer = r.json().await.unwrap_or(Value::Null);
        if path == "/v1/workers" && status == 201 {
            if let (Some(id), Some(secret)) = (
                answer["worker_id"].as_str(),
                answer["worker_secret"].as_str(),
            ) {
                self.secrets
                    .lock()
                    .unwrap()
                    .insert(id.to_string(), secret.to_string());
            }
        }
        (status, answer)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn submit(&self, body: Value) -> Value {
        let (status, run) = self.post("/v1/runs", body).await;
        assert_eq!(status, 202, "{run}");
        run
    }

    pub async fn register(&self, cpus: f64) -> String {
        let (status, body) = self
            .post(
                "/v1/workers",
                json!({"name": "test", "capacity": {"cpus": cpus, "memory_mb": 4096}}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["worker_id"].as_str().unwrap().to_string()
    }

    /// Opens a claim long-poll with `body` (`max_runs`, `wait_ms`) in a task of its own: the
    /// answer's body, and how long it took.
    pub fn open_claim(
        &self,
        worker: &str,
        body: Value,
    ) -> tokio::task::JoinHandle<(Value, std::time::Duration)> {
        let request = self
            .as_worker(
                self.http
                    .post(self.url(&format!("/v1/workers/{worker}/claim"))),
                worker,
            )
            .json(&body);
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let answer: Value = request.send().await.unwrap().json().await.unwrap();
            (answer, started.elapsed())
        })
    }

    /// Claims without waiting.
    pub async fn claim(&self, worker: &str, max_runs: u32) -> Vec<Value> {
        let (status, body) = self
            .post(
                &format!("/v1/workers/{worker}/claim"),
                json!({"max_runs": max_runs, "wait_ms": 0}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["assignments"].as_array().unwrap().clone()
    }

    pub async fn run(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/runs/{id}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Every page of `GET /v1/runs?{query}` (cursor by cursor), each asserted under 3 MiB: the
    /// runs in order, and how many pages they came in.
    pub async fn list_pages(&self, query: &str) -> (Vec<Value>, usize) {
        let mut runs = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/runs?{query}&cursor={c}"),
                None => format!("/v1/runs?{query}"),
            };
            let r = self.http.get(self.url(&path)).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let bytes = r.bytes().await.unwrap();
            assert!(
                bytes.len() < 3 * 1024 * 1024,
                "a page of {} bytes",
                bytes.len()
            );
            let page: Value = serde_json::from_slice(&bytes).unwrap();
            runs.extend(page["runs"].as_array().unwrap().iter().cloned());
            pages += 1;
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return (runs, pages),
            }
        }
    }

    /// Polls the run until `done` says so, or fails after `within`.
    pub async fn wait_for(
        &self,
        id: &str,
        within: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        tether_testkit::http::wait_for_run(&self.http, &self.base, id, within, done).await
    }
}

/// A server on a fresh PostgreSQL schema, with the guard that drops it (keep it until the
/// server is gone).
pub async fn pg_server(config: tether_server::ServerConfig) -> (TestServer, PgSchema) {
    let schema = PgSchema::new();
    let server = TestServer::start_on(config, pg_store(&schema).await).await;
    (server, schema)
}

/// A PostgreSQL store in `schema` (another server's view of the same database).
pub async fn pg_store(schema: &PgSchema) -> tether_store::SharedStore {
    let store = tether_store_postgres::PgStore::open_in_schema(&schema.url, &schema.name)
        .await
        .unwrap();
    std::sync::Arc::new(store)
}
