//! `tether up`, `tether server`, `tether worker`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use tether_domain::time::parse_duration_ms;
use tether_domain::{Resources, TetherConfig};
use tether_server::ServerConfig;
use tether_worker::WorkerConfig;
use tokio_util::sync::CancellationToken;

use crate::transport::{token_from, warn_clear_text_listener, warn_clear_text_token};
use crate::CliError;

fn duration(text: &str) -> Result<Duration, String> {
    parse_duration_ms(text).map(Duration::from_millis)
}

/// The name `tether up` gives its local worker; a restarted `up` hands back the runs of the
/// previous one at once instead of waiting for them to go stale.
pub const LOCAL_WORKER_NAME: &str = "tether-up-local";

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, env = "TETHER_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// `sqlite://PATH` (embedded) or `postgres://…`.
    #[arg(
        long,
        env = "TETHER_DATABASE",
        default_value = "sqlite://./.tether/tether.db"
    )]
    pub database: String,
    /// TOML file naming lanes and pools.
    #[arg(long, env = "TETHER_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Heartbeat interval handed to workers when they register.
    #[arg(long, env = "TETHER_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = duration)]
    pub heartbeat_interval: Duration,
    /// A run is stale this long after its last heartbeat (unless its lane or itself says otherwise).
    #[arg(long, env = "TETHER_STALE_AFTER", default_value = "60s", value_parser = duration)]
    pub stale_after: Duration,
    /// Cadence of `heartbeat` events on event streams.
    #[arg(long, env = "TETHER_SSE_HEARTBEAT", default_value = "15s", value_parser = duration)]
    pub sse_heartbeat: Duration,
    /// The longest gap between two reaper sweeps.
    #[arg(long, env = "TETHER_REAPER_INTERVAL", default_value = "30s", value_parser = duration)]
    pub reaper_interval: Duration,
    /// How often endpoints' readiness is probed.
    #[arg(long, env = "TETHER_PROBE_INTERVAL", default_value = "30s", value_parser = duration)]
    pub probe_interval: Duration,
    /// How long finished runs (with their events and output) are kept, in lanes that set no
    /// `retention_s`; 0 keeps them for ever.
    #[arg(long, env = "TETHER_RETENTION", default_value = "14d", value_parser = duration)]
    pub retention: Duration,
    /// Bearer token clients must present.
    #[arg(long, env = "TETHER_API_TOKEN")]
    pub api_token: Option<String>,
    /// A file holding the client token (instead of --api-token, so it stays out of `ps`).
    #[arg(long, env = "TETHER_API_TOKEN_FILE")]
    pub api_token_file: Option<std::path::PathBuf>,
    /// Bearer token workers must present.
    #[arg(long, env = "TETHER_WORKER_TOKEN")]
    pub worker_token: Option<String>,
    /// A file holding the worker token (instead of --worker-token).
    #[arg(long, env = "TETHER_WORKER_TOKEN_FILE")]
    pub worker_token_file: Option<std::path::PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs --tls-key.
    #[arg(long, env = "TETHER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "TETHER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Also trust the CA certificates in this PEM file for https:// readiness probes (the
    /// public CAs are always trusted).
    #[arg(long, env = "TETHER_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// A request's headers must arrive within this; a kept-alive connection waiting longer for
    /// its next request is closed.
    #[arg(long, env = "TETHER_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub header_read_timeout: Duration,
    /// A connection on which nothing moves for this long is closed (never less than the
    /// longest claim wait plus 10 s).
    #[arg(long, env = "TETHER_IDLE_TIMEOUT", default_value = "120s", value_parser = duration)]
    pub idle_timeout: Duration,
    /// Networks readiness probes may reach, comma-separated (e.g. `10.0.0.0/8,fd00::/8`).
    /// Default: anywhere except link-local (169.254.0.0/16, fe80::/10) and cloud-metadata
    /// addresses and names.
    #[arg(long, env = "TETHER_PROBE_NETWORKS", default_value = "", value_parser = tether_server::probe_policy::ProbeNetworks::parse_list)]
    pub probe_networks: tether_server::probe_policy::ProbeNetworks,
    /// The most connections served at once; past it, new ones wait in the listen backlog.
    #[arg(long, env = "TETHER_MAX_CONNECTIONS", default_value_t = 8192)]
    pub max_connections: usize,
}

/// `--pass-env`: the worker's own environment variables its commands receive.
fn pass_env(flag: Option<Vec<String>>) -> Vec<String> {
    match flag {
        Some(names) => names.into_iter().filter(|n| !n.is_empty()).collect(),
        None => tether_worker::DEFAULT_PASS_ENV
            .iter()
            .map(|s| s.to_string())
            .collect(),
    }
}

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// CPUs the local worker offers (default: this machine's cores).
    #[arg(long, env = "TETHER_CPUS")]
    pub cpus: Option<f64>,
    /// Memory the local worker offers, in MiB (default: this machine's memory).
    #[arg(long, env = "TETHER_MEMORY_MB")]
    pub memory_mb: Option<u64>,
    /// On Ctrl-C, cancel the runs in flight instead of keeping them for the next start (a
    /// second Ctrl-C does the same).
    #[arg(long, env = "TETHER_CANCEL_ON_EXIT")]
    pub cancel_on_exit: bool,
    /// The local worker's grace between SIGTERM and SIGKILL when a run is cancelled or times
    /// out.
    #[arg(long, env = "TETHER_KILL_GRACE", default_value = "10s", value_parser = duration)]
    pub kill_grace: Duration,
    /// Variables of this process's environment that commands receive besides the run's `env`,
    /// comma-separated (default: PATH,HOME,USER,LOGNAME,SHELL,LANG,LC_ALL,LC_CTYPE,TZ,TMPDIR,TERM).
    /// `TETHER_*` variables and tokens are never passed.
    #[arg(long, env = "TETHER_PASS_ENV", value_delimiter = ',')]
    pub pass_env: Option<Vec<String>>,
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// The server to work for.
    #[arg(long, env = "TETHER_SERVER", default_value = "http://127.0.0.1:7070")]
    pub server: String,
    /// This worker's name (default: the host name).
    #[arg(long, env = "TETHER_NAME")]
    pub name: Option<String>,
    /// CPUs offered (default: this machine's cores).
    #[arg(long, env = "TETHER_CPUS")]
    pub cpus: Option<f64>,
    /// Memory offered, in MiB (default: this machine's memory).
    #[arg(long, env = "TETHER_MEMORY_MB")]
    pub memory_mb: Option<u64>,
    /// Lanes served, comma-separated (default: every lane).
    #[arg(long, env = "TETHER_LANES", value_delimiter = ',')]
    pub lanes: Vec<String>,
    /// Bearer token for the worker scope (the server's --worker-token). Its own variable, not
    /// the client's TETHER_TOKEN: the two scopes hold different tokens.
    #[arg(long, env = "TETHER_WORKER_TOKEN")]
    pub token: Option<String>,
    /// A file holding the worker token, so it stays out of `ps`.
    #[arg(long, env = "TETHER_WORKER_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// Grace between SIGTERM and SIGKILL when a run is cancelled or times out.
    #[arg(long, env = "TETHER_KILL_GRACE", default_value = "10s", value_parser = duration)]
    pub kill_grace: Duration,
    /// On SIGTERM, let running commands finish for up to this long (the worker shows
    /// `draining` and takes nothing new) before stopping them and leaving. 0 stops them at once.
    #[arg(long, env = "TETHER_DRAIN_TIMEOUT", default_value = "0s", value_parser = duration)]
    pub drain_timeout: Duration,
    /// Also trust the CA certificates in this PEM file for an https:// server (the public
    /// CAs are always trusted).
    #[arg(long, env = "TETHER_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Variables of this worker's environment that commands receive besides the run's `env`,
    /// comma-separated (default: PATH,HOME,USER,LOGNAME,SHELL,LANG,LC_ALL,LC_CTYPE,TZ,TMPDIR,TERM).
    /// `TETHER_*` variables and the worker's token are never passed.
    #[arg(long, env = "TETHER_PASS_ENV", value_delimiter = ',')]
    pub pass_env: Option<Vec<String>>,
    /// For benchmarks only: run commands without their supervisor (the shim), forked by the
    /// worker itself. Gives up the guarantee that no process of a run outlives its attempt: a
    /// process that leaves the command's group (`setsid`) survives it.
    #[arg(long, env = "TETHER_NO_RUN_SHIM")]
    pub no_run_shim: bool,
    /// For benchmarks only: the worker forks each run's supervisor itself instead of having
    /// its run host do it (the same guarantees, more CPU per run).
    #[arg(long, env = "TETHER_NO_RUN_HOST", hide = true)]
    pub no_run_host: bool,
    /// Hold no local queue: take only what the capacity runs at once. By default, while runs
    /// are short, the worker also holds claimed runs that start the moment a slot frees
    /// (what its slots free within about 400 ms, at most 64 times its capacity; runs of a
    /// second or more get none).
    #[arg(long, env = "TETHER_NO_LOCAL_QUEUE")]
    pub no_local_queue: bool,
}

fn machine_cpus() -> f64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or(1.0)
}

fn machine_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(1024)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into())
}

fn load_config(path: Option<&std::path::Path>) -> Result<TetherConfig, CliError> {
    let Some(path) = path else {
        return Ok(TetherConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read --config {}: {e}", path.display())))?;
    tether_server::config_file::parse(&text)
        .map_err(|e| CliError::Usage(format!("--config {} is not valid: {e}", path.display())))
}

/// The PEM file of `--ca-cert`, read once at start.
pub(crate) fn read_ca_cert(path: Option<&std::path::Path>) -> Result<Option<Vec<u8>>, CliError> {
    path.map(|p| {
        std::fs::read(p)
            .map_err(|e| CliError::Usage(format!("cannot read --ca-cert {}: {e}", p.display())))
    })
    .transpose()
}

fn server_config(args: &ServerArgs) -> Result<ServerConfig, CliError> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            tether_server::tls::server_config(cert, key)
                .map_err(|e| CliError::Usage(e.to_string()))?,
        ),
        _ => None,
    };
    Ok(ServerConfig {
        tls,
        ca_cert_pem: read_ca_cert(args.ca_cert.as_deref())?,
        database: args.database.clone(),
        lanes: load_config(args.config.as_deref())?,
        heartbeat_interval: args.heartbeat_interval,
        stale_after: args.stale_after,
        sse_heartbeat: args.sse_heartbeat,
        reaper_interval: args.reaper_interval,
        probe_interval: args.probe_interval,
        retention: args.retention,
        api_token: token_from(
            args.api_token.as_deref(),
            args.api_token_file.as_deref(),
            "--api-token",
            "--api-token-file",
        )?,
        worker_token: token_from(
            args.worker_token.as_deref(),
            args.worker_token_file.as_deref(),
            "--worker-token",
            "--worker-token-file",
        )?,
        probe_networks: args.probe_networks.clone(),
        connections: tether_server::accept::ConnectionLimits {
            header_read_timeout: args.header_read_timeout,
            idle_timeout: args.idle_timeout,
            max_connections: args.max_connections,
        },
        ..ServerConfig::default()
    })
}

/// Resolves on SIGTERM or Ctrl-C.
async fn termination() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// A server that has decided to start: its config read, its address bound and allowed. Nothing
/// is created on disk before this.
struct Prepared {
    config: ServerConfig,
    listener: tokio::net::TcpListener,
}

async fn prepare_server(args: &ServerArgs) -> Result<Prepared, CliError> {
    let config = server_config(args)?;
    warn_clear_text_listener(
        args.listen,
        config.tls.is_some(),
        config.api_token.is_some() || config.worker_token.is_some(),
    );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError::Usage(format!("cannot listen on {}: {e}", args.listen)))?;
    tether_server::check_listen(&config, listener.local_addr()?)?;
    Ok(Prepared { config, listener })
}

async fn start_server(prepared: Prepared) -> Result<tether_server::RunningServer, CliError> {
    let store = tether_server::open_store(&prepared.config.database).await?;
    Ok(tether_server::start(prepared.config, store, prepared.listener).await?)
}

pub async fn server(args: ServerArgs) -> Result<u8, CliError> {
    let running = start_server(prepare_server(&args).await?).await?;
    termination().await;
    tracing::info!("shutting down");
    running.stop().await;
    Ok(0)
}

/// Holds `tether up`'s claim on its embedded database for as long as the process lives.
type UpLock = Option<nix::fcntl::Flock<std::fs::File>>;

/// Only one `tether up` may use an embedded database: the second would hand back the first's
/// local worker's runs while they still run. The lock is the kernel's (`flock`), so it goes
/// away with the process however it ends, SIGKILL included.
fn lock_embedded_database(database: &str) -> Result<UpLock, CliError> {
    let Some(path) = database
        .strip_prefix("sqlite://")
        .or_else(|| database.strip_prefix("sqlite:"))
        .map(|p| p.split('?').next().unwrap_or(p))
        .filter(|p| !p.is_empty() && *p != ":memory:")
    else {
        return Ok(None);
    };
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let lock_path = std::path::PathBuf::from(format!("{path}.up.lock"));
    if let Some(dir) = lock_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Private, as the database beside it (see the SQLite store's `open`).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(CliError::Usage(format!(
            "another `tether up` is already using {path} (lock {}); stop it first, or give this one its own --database",
            lock_path.display()
        ))),
        Err((_, e)) => Err(CliError::Usage(format!(
            "cannot lock {}: {e}",
            lock_path.display()
        ))),
    }
}

pub async fn up(args: UpArgs) -> Result<u8, CliError> {
    let prepared = prepare_server(&args.server).await?;
    let _lock = lock_embedded_database(&args.server.database)?;
    let running = start_server(prepared).await?;
    // The previous `tether up` on this database is gone: hand its local worker's runs back now
    // (retried if attempts remain) rather than after the stale window.
    let store = running.state.store.clone();
    match store.list_workers().await {
        Ok(workers) => {
            for w in workers.iter().filter(|w| w.name == LOCAL_WORKER_NAME) {
                match store.deregister_worker(&w.id).await {
                    Ok(runs) if !runs.is_empty() => {
                        tracing::info!(worker_id = %w.id, runs = runs.len(), "recovered runs of the previous local worker")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot recover the previous local worker")
                    }
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot list workers to recover"),
    }
    // Over TLS the local worker checks the server's certificate like any client: it must
    // name `localhost`; its own chain is trusted (a self-signed one included).
    let (server_url, ca_cert_pem) = match &args.server.tls_cert {
        Some(cert) => {
            let mut roots = std::fs::read(cert)?;
            if let Some(ca) = read_ca_cert(args.server.ca_cert.as_deref())? {
                roots.push(b'\n');
                roots.extend(ca);
            }
            (
                format!("https://localhost:{}", running.addr.port()),
                Some(roots),
            )
        }
        None => (format!("http://{}", running.addr), None),
    };
    let worker_config = WorkerConfig {
        server: server_url.clone(),
        ca_cert_pem,
        token: running.state.config.worker_token.clone(),
        name: LOCAL_WORKER_NAME.into(),
        capacity: Resources {
            cpus: args.cpus.unwrap_or_else(machine_cpus),
            memory_mb: args.memory_mb.unwrap_or_else(machine_memory_mb),
        },
        kill_grace: args.kill_grace,
        pass_env: pass_env(args.pass_env),
        ..WorkerConfig::default()
    };
    let stop_worker = CancellationToken::new();
    let worker = tokio::spawn(tether_worker::run_worker(
        worker_config,
        stop_worker.clone(),
    ));
    eprintln!(
        "tether is up: {}  (dashboard at /, API under /v1; Ctrl-C to stop)",
        if args.server.tls_cert.is_some() {
            format!("https://{}", running.addr)
        } else {
            format!("http://{}", running.addr)
        }
    );
    termination().await;
    let in_flight = local_runs(&running.state.store).await;
    let mut cancel = args.cancel_on_exit;
    if !in_flight.is_empty() && !cancel {
        eprintln!(
            "tether: stopping; {} run(s) in flight. Ctrl-C again within {}s to cancel them instead.",
            in_flight.len(),
            SECOND_INTERRUPT.as_secs()
        );
        cancel = tokio::time::timeout(SECOND_INTERRUPT, termination())
            .await
            .is_ok();
    }
    tracing::info!("shutting down");
    // The worker leaves first, while the server can still take its deregistration: its runs
    // are handed back (pending, or ended when no attempt is left).
    stop_worker.cancel();
    let _ = worker.await;
    report_stopped_runs(&running.state.store, &in_flight, cancel).await;
    running.stop().await;
    Ok(0)
}

/// How long `tether up` waits for a second Ctrl-C that turns "keep them" into "cancel them".
const SECOND_INTERRUPT: Duration = Duration::from_secs(3);

/// The runs `tether up`'s local worker holds now.
async fn local_runs(store: &tether_store::SharedStore) -> Vec<String> {
    match store.list_workers().await {
        Ok(workers) => workers
            .into_iter()
            .filter(|w| w.name == LOCAL_WORKER_NAME)
            .flat_map(|w| w.runs.into_iter().map(|(run_id, _)| run_id))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the runs in flight");
            Vec::new()
        }
    }
}

/// Says, run by run, what became of what Ctrl-C stopped: cancelled, kept for the next start
/// (as attempt n/m), or ended because no attempt was left.
async fn report_stopped_runs(store: &tether_store::SharedStore, runs: &[String], cancel: bool) {
    for run_id in runs {
        if cancel {
            match store.request_cancel(run_id).await {
                Ok(_) => eprintln!("tether: run {run_id} stopped and cancelled"),
                Err(e) => eprintln!("tether: run {run_id} stopped; cannot cancel it: {e}"),
            }
            continue;
        }
        match store.get_run(run_id).await {
            Ok(Some(run)) if run.status.is_terminal() => eprintln!(
                "tether: run {run_id} stopped; it had no attempt left and ended {}",
                run.status
            ),
            Ok(Some(run)) => eprintln!(
                "tether: run {run_id} stopped; it runs again when tether up starts again (attempt {}/{}); `tether cancel {run_id}` drops it",
                run.attempt + 1,
                run.spec.max_attempts + run.released_attempts
            ),
            _ => eprintln!("tether: run {run_id} stopped"),
        }
    }
}

pub async fn worker(args: WorkerArgs) -> Result<u8, CliError> {
    let token = token_from(
        args.token.as_deref(),
        args.token_file.as_deref(),
        "--token",
        "--token-file",
    )?;
    warn_clear_text_token(&args.server, token.is_some(), "this worker");
    let config = WorkerConfig {
        server: args.server,
        token,
        name: args.name.unwrap_or_else(host_name),
        capacity: Resources {
            cpus: args.cpus.unwrap_or_else(machine_cpus),
            memory_mb: args.memory_mb.unwrap_or_else(machine_memory_mb),
        },
        lanes: args.lanes.into_iter().filter(|l| !l.is_empty()).collect(),
        kill_grace: args.kill_grace,
        drain_timeout: args.drain_timeout,
        ca_cert_pem: read_ca_cert(args.ca_cert.as_deref())?,
        pass_env: pass_env(args.pass_env),
        run_shim: !args.no_run_shim,
        run_host: !args.no_run_host,
        local_queue: !args.no_local_queue,
        ..WorkerConfig::default()
    };
    let stop = CancellationToken::new();
    let mut task = tokio::spawn(tether_worker::run_worker(config, stop.clone()));
    let joined = tokio::select! {
        _ = termination() => {
            stop.cancel();
            task.await
        }
        joined = &mut task => joined,
    };
    match joined {
        Ok(result) => result?,
        Err(e) => return Err(CliError::Usage(format!("worker task failed: {e}"))),
    }
    Ok(0)
}
