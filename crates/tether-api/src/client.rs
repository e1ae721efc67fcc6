//! The HTTP client for Tether's API (SPEC §2, §3): one method per call, typed errors.
//!
//! The worker and the CLI share it. Every call but the event streams has a whole-request
//! timeout; the long-poll claim gets one longer than the wait it asks for, and the event streams
//! get none (they are meant to stay open).

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt, TryFutureExt};
use reqwest::header::{HeaderMap, ACCEPT, RETRY_AFTER};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::wire::{
    AppendLogRequest, AppendLogResponse, BatchSubmitRequest, BatchSubmitResponse, ClaimRequest,
    ClaimResponse, ControlRequest, ControlResponse, ErrorBody, ErrorDetail, EventView,
    FinishRequest, HeartbeatRequest, HeartbeatResponse, RegisterWorkerRequest,
    RegisterWorkerResponse, ReleaseRequest, ReleaseResponse, RunList, RunView, StartRequest,
    WorkerList,
};
use crate::SubmitRequest;

/// The whole-request timeout of every ordinary call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How much longer than its `wait_ms` a claim may take before we give up on it: the server
/// holds the request for up to `wait_ms`, then needs a moment to answer.
pub const CLAIM_SLACK: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Error bodies that are not JSON are quoted in the message up to this many bytes.
const MAX_QUOTED_BODY: usize = 512;

/// What went wrong with a call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status. `code` is the `ErrorBody` code, or
    /// `http_<status>` when the body was not an `ErrorBody` (a proxy's error page, say).
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
        /// Seconds, from `Retry-After` (sent with `503`).
        retry_after: Option<u64>,
    },
    /// `409 output_gap`: a log append began past what the attempt has stored; resend from
    /// `expected`.
    #[error("output gap: the server expects stdout at {}, stderr at {}", expected.stdout, expected.stderr)]
    OutputGap { expected: crate::StreamOffsets },
    /// No answer: connection refused or reset, timeout. Worth retrying.
    #[error("cannot reach the server: {0}")]
    Transport(String),
    /// An answer we could not read.
    #[error("unreadable answer from the server: {0}")]
    Decode(String),
    /// The server address is not a usable `http://` or `https://` URL.
    #[error("invalid server URL: {0}")]
    InvalidUrl(String),
    /// The TLS handshake failed: most often the server's certificate is not signed by a CA
    /// this client trusts. Retrying will not help.
    #[error("TLS with the server failed: {0}; if its certificate comes from your own CA, give that CA with --ca-cert")]
    Tls(String),
    /// A `--ca-cert` file that holds no usable certificate.
    #[error("cannot use the CA certificate: {0}")]
    InvalidCaCert(String),
}

impl ClientError {
    /// The HTTP status of an `Api` error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            ClientError::OutputGap { .. } => Some(409),
            _ => None,
        }
    }

    /// The stable error code of an `Api` error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            ClientError::OutputGap { .. } => Some("output_gap"),
            _ => None,
        }
    }

    /// `409 stale_attempt`: the attempt named is no longer current.
    pub fn is_stale_attempt(&self) -> bool {
        self.code() == Some("stale_attempt")
    }

    /// `404 unknown_worker`: the server no longer knows this worker; register again.
    pub fn is_unknown_worker(&self) -> bool {
        self.code() == Some("unknown_worker")
    }

    /// `404 not_found`.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some("not_found")
    }

    /// `409 terminal`: the run already ended.
    pub fn is_terminal(&self) -> bool {
        self.code() == Some("terminal")
    }

    /// `401`/`403`: the token is missing or wrong; retrying will not help.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self.status(), Some(401 | 403))
    }

    /// Whether the same call may succeed later: no answer at all, the server is overloaded or
    /// its store is down (`429`, `5xx`).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Transport(_) => true,
            ClientError::Api { status, .. } => *status == 429 || *status >= 500,
            ClientError::Decode(_)
            | ClientError::InvalidUrl(_)
            | ClientError::OutputGap { .. }
            | ClientError::Tls(_)
            | ClientError::InvalidCaCert(_) => false,
        }
    }

    fn transport(err: reqwest::Error) -> ClientError {
        // reqwest's Display hides the cause (e.g. "connection refused"); name the chain.
        let mut text = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        // rustls names a certificate it refused "invalid peer certificate: …".
        if text.contains("certificate") {
            return ClientError::Tls(text);
        }
        ClientError::Transport(text)
    }
}

/// The filters of `GET /v1/runs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ListRunsQuery {
    /// A status name (`running`, ...), passed through as given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lane: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// Only runs whose id starts with this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_prefix: Option<String>,
}

/// One server-sent event of a run's event stream.
#[derive(Debug, Clone, PartialEq)]
pub struct SseItem {
    /// The SSE `event:` field: `status`, `log`, `attempt`, `end`, `heartbeat`.
    pub event: String,
    /// The SSE `id:` (the event's `seq`); `None` on `heartbeat` events, which are not stored.
    pub id: Option<i64>,
    pub view: EventView,
}

impl SseItem {
    /// The server closes the stream after this one.
    pub fn is_end(&self) -> bool {
        self.event == "end"
    }
}

/// A boxed stream, so callers can name it and keep it in a struct.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, ClientError>> + Send + 'static>>;

/// The client. Cheap to clone: clones share one connection pool.
///
/// It may be given several servers (`http://a:7070,http://b:7070`, all sharing one database):
/// calls go to one of them, and a call that cannot reach it moves the client on to the next,
/// so the caller's own retry lands on a server that answers.
#[derive(Debug, Clone)]
pub struct TetherClient {
    bases: Arc<Vec<String>>,
    current: Arc<AtomicUsize>,
    token: Option<String>,
    http: reqwest::Client,
    /// The secret of each worker this client registered, by worker id, sent with that
    /// worker's calls (`WORKER_SECRET_HEADER`).
    worker_secrets: Arc<std::sync::RwLock<std::collections::HashMap<String, String>>>,
}

/// How long an idle connection is kept for reuse.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// The header a worker call carries its worker's secret in.
pub const WORKER_SECRET_HEADER: &str = "tether-worker-secret";

impl TetherClient {
    /// `base_url` is the server's root, e.g. `http://127.0.0.1:7070` (a trailing `/` is fine).
    /// An empty token counts as none.
    pub fn new(base_url: &str, token: Option<String>) -> Result<TetherClient, ClientError> {
        TetherClient::with_ca(base_url, token, None)
    }

    /// [`TetherClient::new`], trusting for `https://` the public CAs plus the CA certificates
    /// in `ca_pem` (PEM, one or more), e.g. a private CA's.
    pub fn with_ca(
        base_url: &str,
        token: Option<String>,
        ca_pem: Option<&[u8]>,
    ) -> Result<TetherClient, ClientError> {
        let mut bases = Vec::new();
        for one in base_url.split(',').map(str::trim).filter(|b| !b.is_empty()) {
            let base = one.trim_end_matches('/').to_string();
            let url = reqwest::Url::parse(&base)
                .map_err(|e| ClientError::InvalidUrl(format!("{one}: {e}")))?;
            if url.scheme() != "http" && url.scheme() != "https" {
                return Err(ClientError::InvalidUrl(format!(
                    "{one}: only http:// and https:// are supported"
                )));
            }
            bases.push(base);
        }
        if bases.is_empty() {
            return Err(ClientError::InvalidUrl("no server URL given".into()));
        }
        // The machine's own CAs matter only for https; plain-http clients (a thousand
        // followers, say) skip reading them.
        let https = bases.iter().any(|b| b.starts_with("https://"));
        let http = http_client(ca_pem, https)?
            .connect_timeout(CONNECT_TIMEOUT)
            // Well inside the server's header-read timeout (30 s by default), which also closes
            // kept-alive connections: a connection is never reused just as the server drops it.
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build()
            .map_err(ClientError::transport)?;
        Ok(TetherClient {
            bases: Arc::new(bases),
            current: Arc::new(AtomicUsize::new(0)),
            token: token.filter(|t| !t.is_empty()),
            http,
            worker_secrets: Arc::default(),
        })
    }

    /// The server calls go to now, without a trailing `/`.
    pub fn base_url(&self) -> &str {
        let i = self.current.load(Ordering::Relaxed) % self.bases.len();
        &self.bases[i]
    }

    /// Sends a request; a call that could not reach its server moves the client to the next.
    async fn send(&self, req: RequestBuilder) -> Result<Response, ClientError> {
        let result = send(req).await;
        if matches!(result, Err(ClientError::Transport(_))) && self.bases.len() > 1 {
            self.current.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    // ---- runs ---------------------------------------------------------------------------

    /// `POST /v1/runs`.
    /// `POST /v1/runs/batch`: many runs in one transaction, all admitted or none (at most
    /// 1,000 per call).
    pub async fn submit_batch(
        &self,
        request: &BatchSubmitRequest,
    ) -> Result<BatchSubmitResponse, ClientError> {
        self.call(self.request(Method::POST, "/v1/runs/batch").json(request))
            .await
    }

    pub async fn submit(&self, request: &SubmitRequest) -> Result<RunView, ClientError> {
        let req = self.request(Method::POST, "/v1/runs").json(request);
        self.call(req).await
    }

    /// `GET /v1/runs/{id}`.
    pub async fn get_run(&self, run_id: &str) -> Result<RunView, ClientError> {
        let req = self.request(Method::GET, &format!("/v1/runs/{}", segment(run_id)));
        self.call(req).await
    }

    /// `GET /v1/runs`, newest first.
    pub async fn list_runs(&self, query: &ListRunsQuery) -> Result<RunList, ClientError> {
        let req = self.request(Method::GET, "/v1/runs").query(query);
        self.call(req).await
    }

    /// `POST /v1/runs/{id}/cancel`.
    pub async fn cancel_run(&self, run_id: &str) -> Result<RunView, ClientError> {
        let path = format!("/v1/runs/{}/cancel", segment(run_id));
        self.call(self.request(Method::POST, &path)).await
    }

    /// `GET /v1/runs/{id}/logs`: the combined raw output so far, bytes as the command wrote
    /// them.
    pub async fn logs(&self, run_id: &str) -> Result<Bytes, ClientError> {
        self.attempt_logs(run_id, None).await
    }

    /// `GET /v1/runs/{id}/logs?attempt=`: `attempt` is a number, `last` or `all`; `None` is
    /// the server's default (the last attempt).
    pub async fn attempt_logs(
        &self,
        run_id: &str,
        attempt: Option<&str>,
    ) -> Result<Bytes, ClientError> {
        let path = format!("/v1/runs/{}/logs", segment(run_id));
        let mut req = self.request(Method::GET, &path);
        if let Some(attempt) = attempt {
            req = req.query(&[("attempt", attempt)]);
        }
        let resp = self.send(req).await?;
        resp.bytes().await.map_err(ClientError::transport)
    }

    /// `GET /v1/runs/{id}/events` as SSE. `after`: resume after this `seq`. `follow: false`
    /// sends what is stored and ends. The stream ends when the server closes it (after `end`).
    pub fn events(&self, run_id: &str, after: Option<i64>, follow: bool) -> BoxStream<SseItem> {
        let req = self
            .events_request(run_id, after, follow)
            .header(ACCEPT, "text/event-stream");
        let this = self.clone();
        let stream = async move { this.send(req).await }
            .map_ok(|resp| {
                resp.bytes_stream().eventsource().map(|item| match item {
                    Ok(event) => sse_item(event),
                    Err(eventsource_stream::EventStreamError::Transport(e)) => {
                        Err(ClientError::transport(e))
                    }
                    Err(e) => Err(ClientError::Decode(e.to_string())),
                })
            })
            .try_flatten_stream();
        Box::pin(stream)
    }

    /// `GET /v1/runs/{id}/events` as NDJSON: one `EventView` per line.
    pub fn events_ndjson(
        &self,
        run_id: &str,
        after: Option<i64>,
        follow: bool,
    ) -> BoxStream<EventView> {
        let req = self
            .events_request(run_id, after, follow)
            .header(ACCEPT, "application/x-ndjson");
        let this = self.clone();
        let stream = async move { this.send(req).await }
            .map_ok(|resp| ndjson_lines(resp.bytes_stream()))
            .try_flatten_stream();
        Box::pin(stream)
    }

    fn events_request(&self, run_id: &str, after: Option<i64>, follow: bool) -> RequestBuilder {
        let path = format!("/v1/runs/{}/events", segment(run_id));
        let mut query: Vec<(&str, String)> = vec![("follow", follow.to_string())];
        if let Some(after) = after {
            query.push(("after", after.to_string()));
        }
        // No timeout: a followed stream stays open as long as the run lives.
        self.request_without_timeout(Method::GET, &path)
            .query(&query)
    }

    // ---- workers ------------------------------------------------------------------------

    /// `GET /v1/workers`.
    pub async fn list_workers(&self) -> Result<WorkerList, ClientError> {
        self.call(self.request(Method::GET, "/v1/workers")).await
    }

    /// `POST /v1/workers`.
    pub async fn register_worker(
        &self,
        request: &RegisterWorkerRequest,
    ) -> Result<RegisterWorkerResponse, ClientError> {
        let req = self.request(Method::POST, "/v1/workers").json(request);
        let registered: RegisterWorkerResponse = self.call(req).await?;
        if let Ok(mut secrets) = self.worker_secrets.write() {
            secrets.insert(
                registered.worker_id.clone(),
                registered.worker_secret.clone(),
            );
        }
        Ok(registered)
    }

    /// Adds the secret of `worker_id`, if this client registered it.
    fn as_worker(&self, req: RequestBuilder, worker_id: &str) -> RequestBuilder {
        let secret = self
            .worker_secrets
            .read()
            .ok()
            .and_then(|s| s.get(worker_id).cloned());
        match secret {
            Some(secret) => req.header(WORKER_SECRET_HEADER, secret),
            None => req,
        }
    }

    /// `DELETE /v1/workers/{id}`: the server hands the worker's in-flight runs back at once.
    pub async fn deregister_worker(&self, worker_id: &str) -> Result<(), ClientError> {
        let path = format!("/v1/workers/{}", segment(worker_id));
        self.send(self.as_worker(self.request(Method::DELETE, &path), worker_id))
            .await
            .map(drop)
    }

    /// `POST /v1/workers/{id}/claim`: long-polls for up to `request.wait_ms`.
    pub async fn claim(
        &self,
        worker_id: &str,
        request: &ClaimRequest,
    ) -> Result<ClaimResponse, ClientError> {
        let path = format!("/v1/workers/{}/claim", segment(worker_id));
        let timeout = Duration::from_millis(request.wait_ms) + CLAIM_SLACK;
        let req = self
            .request_without_timeout(Method::POST, &path)
            .timeout(timeout)
            .json(request);
        self.call(self.as_worker(req, worker_id)).await
    }

    /// `POST /v1/workers/{id}/control`: long-polls for up to `request.wait_ms` for cancels.
    pub async fn control(
        &self,
        worker_id: &str,
        request: &ControlRequest,
    ) -> Result<ControlResponse, ClientError> {
        let path = format!("/v1/workers/{}/control", segment(worker_id));
        let timeout = Duration::from_millis(request.wait_ms) + CLAIM_SLACK;
        let req = self
            .request_without_timeout(Method::POST, &path)
            .timeout(timeout)
            .json(request);
        self.call(self.as_worker(req, worker_id)).await
    }

    /// `POST /v1/workers/{id}/heartbeat`: one per interval, for the worker and all its runs.
    pub async fn heartbeat(
        &self,
        worker_id: &str,
        request: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ClientError> {
        let path = format!("/v1/workers/{}/heartbeat", segment(worker_id));
        let req = self.request(Method::POST, &path).json(request);
        self.call(self.as_worker(req, worker_id)).await
    }

    /// `POST /v1/workers/{id}/release`: hands back attempts this worker never started.
    pub async fn release_runs(
        &self,
        worker_id: &str,
        request: &ReleaseRequest,
    ) -> Result<ReleaseResponse, ClientError> {
        let path = format!("/v1/workers/{}/release", segment(worker_id));
        let req = self.request(Method::POST, &path).json(request);
        self.call(self.as_worker(req, worker_id)).await
    }

    /// `POST /v1/runs/{id}/attempts/{attempt}/start`.
    pub async fn start_attempt(
        &self,
        run_id: &str,
        attempt: u32,
        request: &StartRequest,
    ) -> Result<RunView, ClientError> {
        let path = attempt_path(run_id, attempt, "start");
        let req = self.request(Method::POST, &path).json(request);
        self.call(self.as_worker(req, &request.worker_id)).await
    }

    /// `POST /v1/runs/{id}/attempts/{attempt}/logs`.
    pub async fn append_logs(
        &self,
        run_id: &str,
        attempt: u32,
        request: &AppendLogRequest,
    ) -> Result<AppendLogResponse, ClientError> {
        let path = attempt_path(run_id, attempt, "logs");
        let req = self.request(Method::POST, &path).json(request);
        self.call(self.as_worker(req, &request.worker_id)).await
    }

    /// `POST /v1/runs/{id}/attempts/{attempt}/finish`.
    pub async fn finish_attempt(
        &self,
        run_id: &str,
        attempt: u32,
        request: &FinishRequest,
    ) -> Result<RunView, ClientError> {
        let path = attempt_path(run_id, attempt, "finish");
        let req = self.request(Method::POST, &path).json(request);
        self.call(self.as_worker(req, &request.worker_id)).await
    }

    /// `POST /v1/workers/{id}/attempts`: several starts and finishes in one call, each
    /// answered alone, and optionally a claim for the room they free.
    pub async fn report_attempts(
        &self,
        worker_id: &str,
        request: &crate::AttemptReportsRequest,
    ) -> Result<crate::AttemptReportsResponse, ClientError> {
        let path = format!("/v1/workers/{}/attempts", segment(worker_id));
        let req = self.request(Method::POST, &path).json(request);
        self.call(self.as_worker(req, worker_id)).await
    }

    // ---- endpoints (SPEC §5) --------------------------------------------------------------

    /// `GET /v1/endpoints`: every endpoint with its readiness and stamp age.
    pub async fn list_endpoints(&self) -> Result<crate::EndpointList, ClientError> {
        self.call(self.request(Method::GET, "/v1/endpoints")).await
    }

    /// `PUT /v1/endpoints/{name}`.
    pub async fn put_endpoint(
        &self,
        name: &str,
        request: &crate::PutEndpointRequest,
    ) -> Result<crate::EndpointView, ClientError> {
        let path = format!("/v1/endpoints/{}", segment(name));
        self.call(self.request(Method::PUT, &path).json(request))
            .await
    }

    /// `DELETE /v1/endpoints/{name}`.
    pub async fn delete_endpoint(&self, name: &str) -> Result<(), ClientError> {
        let path = format!("/v1/endpoints/{}", segment(name));
        self.send(self.request(Method::DELETE, &path))
            .await
            .map(drop)
    }

    /// `GET /v1/pools`.
    pub async fn list_pools(&self) -> Result<crate::PoolList, ClientError> {
        self.call(self.request(Method::GET, "/v1/pools")).await
    }

    /// `PUT /v1/pools/{pool}`.
    pub async fn put_pool(
        &self,
        pool: &str,
        request: &crate::PutPoolRequest,
    ) -> Result<crate::PoolView, ClientError> {
        let path = format!("/v1/pools/{}", segment(pool));
        self.call(self.request(Method::PUT, &path).json(request))
            .await
    }

    /// `GET /v1/pools/{pool}/dispatch`: what the pool hands out now.
    pub async fn dispatch(&self, pool: &str) -> Result<crate::DispatchView, ClientError> {
        let path = format!("/v1/pools/{}/dispatch", segment(pool));
        self.call(self.request(Method::GET, &path)).await
    }

    // ---- plumbing -----------------------------------------------------------------------

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.request_without_timeout(method, path)
            .timeout(DEFAULT_TIMEOUT)
    }

    fn request_without_timeout(&self, method: Method, path: &str) -> RequestBuilder {
        let req = self
            .http
            .request(method, format!("{}{}", self.base_url(), path));
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    async fn call<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T, ClientError> {
        let resp = self.send(req).await?;
        let body = resp.bytes().await.map_err(ClientError::transport)?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))
    }
}

/// A reqwest builder on rustls trusting the bundled Mozilla roots (webpki-roots: the public
/// CAs, offline), this machine's CA bundle when `system_roots` (see [`system_roots`]), and the
/// certificates in `ca_pem`. Shared by the client and the server's readiness probes.
pub fn http_client(
    ca_pem: Option<&[u8]>,
    system_roots: bool,
) -> Result<reqwest::ClientBuilder, ClientError> {
    let mut builder = reqwest::Client::builder().use_rustls_tls();
    if system_roots {
        for cert in self::system_roots() {
            builder = builder.add_root_certificate(cert.clone());
        }
    }
    if let Some(pem) = ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| ClientError::InvalidCaCert(e.to_string()))?;
        if certs.is_empty() {
            return Err(ClientError::InvalidCaCert(
                "no PEM certificate in it".into(),
            ));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder)
}

/// Where operating systems keep their CA bundle; `SSL_CERT_FILE` comes first, as for OpenSSL.
const SYSTEM_CA_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// This machine's trusted CAs (a private CA an operator added with `update-ca-certificates`,
/// say), read from the first CA bundle found and parsed once per process, so a process that
/// builds many clients pays for it once. Empty when there is no bundle, or when rustls
/// refuses one of its certificates (rather than failing every client).
pub fn system_roots() -> &'static [reqwest::Certificate] {
    static ROOTS: std::sync::OnceLock<Vec<reqwest::Certificate>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let from_env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
        let paths = from_env
            .into_iter()
            .chain(SYSTEM_CA_BUNDLES.iter().map(std::path::PathBuf::from));
        for path in paths {
            let Ok(pem) = std::fs::read(&path) else {
                continue;
            };
            let Ok(certs) = reqwest::Certificate::from_pem_bundle(&pem) else {
                continue;
            };
            // One trial build for the whole bundle: a certificate rustls refuses would fail
            // every client, so such a bundle is not used at all.
            let mut trial = reqwest::Client::builder()
                .use_rustls_tls()
                .tls_built_in_root_certs(false);
            for cert in &certs {
                trial = trial.add_root_certificate(cert.clone());
            }
            if !certs.is_empty() && trial.build().is_ok() {
                return certs;
            }
        }
        Vec::new()
    })
}

/// Sends and turns an error status into `ClientError::Api`.
async fn send(req: RequestBuilder) -> Result<Response, ClientError> {
    let resp = req.send().await.map_err(ClientError::transport)?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let retry_after = retry_after(resp.headers());
    // A body we cannot read still leaves the status to report.
    let body = resp.bytes().await.unwrap_or_default();
    Err(api_error(status, retry_after, &body))
}

fn api_error(status: StatusCode, retry_after: Option<u64>, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody {
            error:
                ErrorDetail {
                    expected_offsets: Some(expected),
                    ..
                },
        }) => ClientError::OutputGap { expected },
        Ok(parsed) => ClientError::Api {
            status: status.as_u16(),
            code: parsed.error.code,
            message: parsed.error.message,
            retry_after,
        },
        Err(_) => {
            let text = String::from_utf8_lossy(&body[..body.len().min(MAX_QUOTED_BODY)]);
            let text = text.trim();
            let message = if text.is_empty() {
                status.canonical_reason().unwrap_or("error").to_string()
            } else {
                text.to_string()
            };
            ClientError::Api {
                status: status.as_u16(),
                code: format!("http_{}", status.as_u16()),
                message,
                retry_after,
            }
        }
    }
}

/// `Retry-After` in whole seconds (the HTTP-date form is not used by Tether).
fn retry_after(headers: &HeaderMap) -> Option<u64> {
    headers.get(RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()
}

fn sse_item(event: eventsource_stream::Event) -> Result<SseItem, ClientError> {
    let view: EventView = serde_json::from_str(&event.data)
        .map_err(|e| ClientError::Decode(format!("event `{}`: {e}", event.event)))?;
    // The SSE parser carries the last id over to events that have none (the HTML rule), so
    // a heartbeat would look like a repeat of the event before it: trust the type instead.
    let id = if event.event == "heartbeat" {
        None
    } else {
        event.id.trim().parse().ok().or(view.seq)
    };
    Ok(SseItem {
        event: event.event,
        id,
        view,
    })
}

/// Splits a byte stream into NDJSON lines and parses each one. Blank lines are skipped.
fn ndjson_lines<S>(bytes: S) -> impl Stream<Item = Result<EventView, ClientError>> + Send
where
    S: Stream<Item = Result<Bytes, reqwest::Error>> + Send + 'static,
{
    struct State<S> {
        bytes: Pin<Box<S>>,
        buf: BytesMut,
        done: bool,
    }
    let state = State {
        bytes: Box::pin(bytes),
        buf: BytesMut::new(),
        done: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(pos) = st.buf.iter().position(|b| *b == b'\n') {
                let line = st.buf.split_to(pos + 1);
                match parse_line(&line) {
                    Some(item) => return Some((item, st)),
                    None => continue,
                }
            }
            if st.done {
                if st.buf.is_empty() {
                    return None;
                }
                let line = st.buf.split();
                match parse_line(&line) {
                    Some(item) => return Some((item, st)),
                    None => return None,
                }
            }
            match st.bytes.next().await {
                Some(Ok(chunk)) => st.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    st.done = true;
                    st.buf.clear();
                    return Some((Err(ClientError::transport(e)), st));
                }
                None => st.done = true,
            }
        }
    })
}

fn parse_line(line: &[u8]) -> Option<Result<EventView, ClientError>> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return None;
    }
    Some(serde_json::from_slice(line).map_err(|e| ClientError::Decode(e.to_string())))
}

fn attempt_path(run_id: &str, attempt: u32, call: &str) -> String {
    format!("/v1/runs/{}/attempts/{attempt}/{call}", segment(run_id))
}

/// Percent-encodes one path segment, so an id can never reach another route.
fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_keep_their_code() {
        let body = br#"{"error":{"code":"stale_attempt","message":"attempt 1 is not current"}}"#;
        let err = api_error(StatusCode::CONFLICT, None, body);
        assert!(err.is_stale_attempt());
        assert_eq!(err.status(), Some(409));
        assert!(!err.is_retryable());
    }

    #[test]
    fn bodies_that_are_not_error_json_still_give_a_code() {
        let err = api_error(
            StatusCode::BAD_GATEWAY,
            Some(3),
            b"<html>bad gateway</html>",
        );
        assert_eq!(err.code(), Some("http_502"));
        assert!(err.is_retryable());
        let ClientError::Api {
            retry_after,
            message,
            ..
        } = err
        else {
            panic!("not an api error");
        };
        assert_eq!(retry_after, Some(3));
        assert!(message.contains("bad gateway"));
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(segment("run_01H-x.y~z"), "run_01H-x.y~z");
        assert_eq!(segment("../a b"), "..%2Fa%20b");
    }

    #[test]
    fn only_http_and_https_urls_are_accepted() {
        assert!(TetherClient::new("http://127.0.0.1:7070/", None).is_ok());
        assert!(TetherClient::new("https://build.example:7070/", None).is_ok());
        assert!(matches!(
            TetherClient::new("ftp://h/", None),
            Err(ClientError::InvalidUrl(_))
        ));
        assert!(matches!(
            TetherClient::with_ca("https://h/", None, Some(b"not pem")),
            Err(ClientError::InvalidCaCert(_))
        ));
        assert!(matches!(
            TetherClient::new("not a url", None),
            Err(ClientError::InvalidUrl(_))
        ));
        let client = TetherClient::new("http://h:1/", Some(String::new())).unwrap();
        assert_eq!(client.base_url(), "http://h:1");
        assert!(client.token.is_none());
    }

    #[test]
    fn heartbeat_events_have_no_id_even_when_the_parser_carries_one() {
        let event = eventsource_stream::Event {
            event: "heartbeat".into(),
            data: r#"{"type":"heartbeat","ts":"2026-01-01T00:00:00Z"}"#.into(),
            id: "7".into(),
            retry: None,
        };
        let item = sse_item(event).unwrap();
        assert_eq!(item.id, None);
        let event = eventsource_stream::Event {
            event: "log".into(),
            data: r#"{"type":"log","seq":8,"ts":"2026-01-01T00:00:00Z","text":"hi\n"}"#.into(),
            id: "8".into(),
            retry: None,
        };
        assert_eq!(sse_item(event).unwrap().id, Some(8));
    }
}
