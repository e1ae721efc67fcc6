//! Tether's server: the HTTP API (SPEC §2, §3), the event streams, and the background services
//! that keep runs honest (the reaper). It owns no state of its own beyond caches and channels:
//! every fact lives in the store, so any number of servers can share one database.

pub mod accept;
pub mod admission;
pub mod auth;
pub mod config;
pub mod config_file;
pub mod dispatch;
pub mod error;
pub mod events;
mod extract;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod probe_policy;
pub mod pruner;
pub mod reaper;
pub mod reconciler;
mod routes;
#[doc(hidden)]
pub mod tls;
pub mod views;
pub mod waiting;

use std::net::SocketAddr;
use std::sync::Arc;

use tether_store::SharedStore;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::ServerConfig;
pub use error::ApiError;

/// The largest request body accepted (log appends are the largest the worker sends).
pub const BODY_LIMIT_BYTES: usize = 4 * 1024 * 1024;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: SharedStore,
    pub config: Arc<ServerConfig>,
    pub hub: events::EventHub,
    pub shutdown: CancellationToken,
    /// Recent store failures: readiness, and the heartbeat grace the reaper owes.
    pub health: health::StoreHealth,
    pub worker_secrets: Arc<auth::WorkerSecrets>,
    /// `GET /v1/lanes`'s shared reads of what the lanes hold.
    pub lane_reads: Arc<admission::LaneReads>,
    /// Claims waiting on this server, which a submission may hand its runs to.
    pub waiting_claims: Arc<waiting::WaitingClaims>,
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the store at {url}: {source}")]
    Store {
        url: String,
        source: tether_store::StoreError,
    },
    #[error("unsupported database URL `{0}`: use sqlite://PATH or postgres://…")]
    UnsupportedDatabase(String),
    #[error("listening on {0}, which is not loopback, requires --api-token and --worker-token")]
    TokensRequired(SocketAddr),
    #[error("cannot serve: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid pool in the config file: {0}")]
    InvalidPool(String),
}

/// Opens the store a database URL names, applying its migrations.
pub async fn open_store(url: &str) -> Result<SharedStore, StartError> {
    let to_start_error = |source| StartError::Store {
        url: url.to_string(),
        source,
    };
    if url.starts_with("sqlite:") {
        let store = tether_store_sqlite::SqliteStore::open(url)
            .await
            .map_err(to_start_error)?;
        Ok(Arc::new(store))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let store = tether_store_postgres::PgStore::open(url)
            .await
            .map_err(to_start_error)?;
        Ok(Arc::new(store))
    } else {
        Err(StartError::UnsupportedDatabase(url.to_string()))
    }
}

/// A server that is serving: its address, and the handle to stop it.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// Stops taking requests, stops the background services, and waits for both.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Whether `config` may serve on `addr`: beyond loopback, both tokens are required. Callers
/// check this before opening (and so creating) a store.
pub fn check_listen(config: &ServerConfig, addr: SocketAddr) -> Result<(), StartError> {
    if !addr.ip().is_loopback() && (config.api_token.is_none() || config.worker_token.is_none()) {
        return Err(StartError::TokensRequired(addr));
    }
    Ok(())
}

/// Starts serving on `listener` with `store`, and starts the background services.
pub async fn start(
    config: ServerConfig,
    store: SharedStore,
    listener: TcpListener,
) -> Result<RunningServer, StartError> {
    // Normally installed by the binary already; a no-op then.
    metrics::install();
    let addr = listener.local_addr()?;
    check_listen(&config, addr)?;
    upsert_config_pools(&config, &store).await?;
    let shutdown = CancellationToken::new();
    let hub = events::EventHub::start(store.clone(), shutdown.clone());
    let state = AppState {
        store: store.clone(),
        config: Arc::new(config),
        hub,
        shutdown: shutdown.clone(),
        health: health::StoreHealth::default(),
        worker_secrets: Arc::default(),
        lane_reads: Arc::default(),
        waiting_claims: Arc::default(),
    };
    let app = routes::router(state.clone());
    let open_files = accept::raise_open_files_limit();
    let mut limits = state.config.connections;
    // A claim long-poll reads and writes nothing while it waits, an event stream only its
    // heartbeat frames: never cut either as idle.
    limits.idle_timeout = limits
        .idle_timeout
        .max(state.config.max_claim_wait + std::time::Duration::from_secs(10))
        .max(state.config.sse_heartbeat * 3);
    tracing::debug!(?limits, ?open_files, "connection limits");
    let tls = state
        .config
        .tls
        .clone()
        .map(tokio_rustls::TlsAcceptor::from);
    let server = tokio::spawn(accept::serve(listener, app, limits, tls, shutdown.clone()));
    let reaper = tokio::spawn(reaper::run_reaper(state.clone()));
    let reconciler = tokio::spawn(reconciler::run_reconciler(state.clone()));
    let pruner = tokio::spawn(pruner::run_pruner(state.clone()));
    let metrics_upkeep = tokio::spawn(metrics::run_upkeep(shutdown.clone()));
    let scheme = if state.config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(%addr, scheme, "tether server listening");
    Ok(RunningServer {
        addr,
        state,
        shutdown,
        tasks: vec![server, reaper, reconciler, pruner, metrics_upkeep],
    })
}

/// Writes the config file's pools to the store, so every server sharing it sees them; a pool
/// set through the API is left as the API set it.
async fn upsert_config_pools(config: &ServerConfig, store: &SharedStore) -> Result<(), StartError> {
    for (name, pool) in &config.lanes.pools {
        let new =
            routes::endpoints::new_pool(name, pool.fallback_url.clone(), Some(pool.freshness_s))
                .map_err(|e| StartError::InvalidPool(format!("{name}: {e}")))?;
        store
            .upsert_pool(&new, tether_store::PoolSource::Config)
            .await
            .map_err(|source| StartError::Store {
                url: config.database.clone(),
                source,
            })?;
    }
    Ok(())
}
