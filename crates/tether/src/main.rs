//! `tether`: one binary for the server, the worker, the all-in-one `up`, and the client.

mod client_cmds;
mod endpoint_cmds;
mod follow;
mod serve_cmds;
mod transport;
mod ui;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tether",
    version,
    about = "Runs commands and always knows which of them are alive."
)]
struct Cli {
    /// Server and worker log lines: `text` (for people) or `json` (one object a line, for log
    /// shippers). Colour only on a terminal, and never with NO_COLOR set.
    #[arg(long, global = true, env = "TETHER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Server, local worker and dashboard on 127.0.0.1:7070, with SQLite under ./.tether/.
    Up(serve_cmds::UpArgs),
    /// The API server alone (many can share one PostgreSQL database).
    Server(serve_cmds::ServerArgs),
    /// A worker that runs commands for a server.
    Worker(serve_cmds::WorkerArgs),
    /// Submit a command and follow its output; exits with the run's exit code.
    Run(client_cmds::RunArgs),
    /// List runs, newest first.
    Ps(client_cmds::PsArgs),
    /// Print a run's output; `-f` follows it live.
    Logs(client_cmds::LogsArgs),
    /// Print a run's events as NDJSON.
    Events(client_cmds::EventsArgs),
    /// Cancel a run.
    Cancel(client_cmds::CancelArgs),
    /// List workers with their liveness.
    Workers(client_cmds::WorkersArgs),
    /// List endpoints with their readiness, and pools with what each hands out now.
    Endpoints(endpoint_cmds::EndpointsArgs),
    /// Measure throughput, latency, memory and reaper sweep time, synthetic or with real workers.
    Bench(tether_bench::BenchArgs),
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("TETHER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_ansi(false).init(),
        LogFormat::Text => {
            // Escape codes only for a person at a terminal: a file or a journal gets plain text.
            let ansi = std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            builder.with_ansi(ansi).init()
        }
    }
}

fn main() -> ExitCode {
    // Before anything is counted, so nothing counted before the first scrape is lost.
    tether_server::metrics::install();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tether: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let log_format = cli.log_format;
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => {
                init_tracing(log_format);
                serve_cmds::up(args).await
            }
            Command::Server(args) => {
                init_tracing(log_format);
                serve_cmds::server(args).await
            }
            Command::Worker(args) => {
                init_tracing(log_format);
                serve_cmds::worker(args).await
            }
            Command::Run(args) => client_cmds::run(args).await,
            Command::Ps(args) => client_cmds::ps(args).await,
            Command::Logs(args) => client_cmds::logs(args).await,
            Command::Events(args) => client_cmds::events(args).await,
            Command::Cancel(args) => client_cmds::cancel(args).await,
            Command::Workers(args) => client_cmds::workers(args).await,
            Command::Endpoints(args) => endpoint_cmds::endpoints(args).await,
            Command::Bench(args) => Ok(tether_bench::bench(args).await?),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("tether: {e}");
            ExitCode::from(1)
        }
    }
}

/// What a command can fail with, said plainly to the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Start(#[from] tether_server::StartError),
    #[error(transparent)]
    Client(#[from] tether_api::ClientError),
    #[error(transparent)]
    Worker(#[from] tether_worker::WorkerError),
    #[error(transparent)]
    Bench(#[from] tether_bench::BenchError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
