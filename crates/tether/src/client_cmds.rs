//! Client commands: `run`, `ps`, `logs`, `events`, `cancel`, `workers`.

use std::collections::BTreeMap;
use std::io::Write;

use clap::Args;
use futures::StreamExt;
use tether_api::client::ListRunsQuery;
use tether_api::{BatchSubmitRequest, SubmitRequest, TetherClient};
use tether_domain::time::parse_duration_ms;
use tether_domain::Resources;

use crate::follow::follow_run;
use crate::CliError;

/// Prints an API answer as pretty JSON (`--json`).
pub(crate) fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// A state's name as the API writes it (`quiet`, `draining`, …).
fn wire_name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The server's URL.
    #[arg(
        long,
        env = "TETHER_SERVER",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub server: String,
    /// Bearer token for the client scope.
    #[arg(long, env = "TETHER_TOKEN", global = true)]
    pub token: Option<String>,
}

impl ClientArgs {
    pub(crate) fn client(&self) -> Result<TetherClient, CliError> {
        Ok(TetherClient::new(&self.server, self.token.clone())?)
    }
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{text}` is not KEY=VALUE"))
}

fn seconds(text: &str) -> Result<f64, String> {
    parse_duration_ms(text).map(|ms| ms as f64 / 1000.0)
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The lane to run in.
    #[arg(long)]
    pub lane: Option<String>,
    /// Print the run's id and return instead of following it.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Environment for the command, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = key_value)]
    pub env: Vec<(String, String)>,
    /// Labels, KEY=VALUE (repeatable).
    #[arg(long = "label", short = 'l', value_parser = key_value)]
    pub labels: Vec<(String, String)>,
    /// Working directory on the worker.
    #[arg(long)]
    pub cwd: Option<String>,
    /// End the run `timed_out` after this long (e.g. 30s, 10m).
    #[arg(long, value_parser = seconds)]
    pub timeout: Option<f64>,
    /// End the run `timed_out`/`stalled` after this long without output.
    #[arg(long, value_parser = seconds)]
    pub stall_timeout: Option<f64>,
    /// Attempts allowed when a worker is lost.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// CPUs the run reserves.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Memory the run reserves, MiB.
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Makes resubmitting the same command safe.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Hand the command a pool's dispatched URL, VAR=POOL (repeatable): resolved when a worker
    /// claims the run, to a ready endpoint or the pool's fallback.
    #[arg(long = "endpoint", value_parser = key_value)]
    pub endpoints: Vec<(String, String)>,
    /// Read one command per line from standard input (each runs as `sh -c LINE`; blank lines
    /// are skipped) and submit them in batches of up to 1,000, each batch admitted whole or
    /// not at all. Needs --detach; prints one run id per line, in order. With
    /// --idempotency-key K, line N gets the key `K:N`.
    #[arg(long, requires = "detach", conflicts_with = "command")]
    pub stdin: bool,
    /// The command and its arguments.
    #[arg(last = true, required_unless_present = "stdin")]
    pub command: Vec<String>,
}

/// Submissions per `POST /v1/runs/batch` (the server's limit).
const BATCH: usize = 1_000;

pub async fn run(args: RunArgs) -> Result<u8, CliError> {
    let client = args.client.client()?;
    let resources = match (args.cpus, args.memory_mb) {
        (None, None) => None,
        (cpus, memory_mb) => Some(Resources {
            cpus: cpus.unwrap_or(1.0),
            memory_mb: memory_mb.unwrap_or(256),
        }),
    };
    let request = SubmitRequest {
        command: args.command,
        env: args.env.into_iter().collect::<BTreeMap<_, _>>(),
        cwd: args.cwd,
        lane: args.lane,
        resources,
        timeout_s: args.timeout,
        stall_timeout_s: args.stall_timeout,
        max_attempts: args.max_attempts,
        idempotency_key: args.idempotency_key,
        labels: args.labels.into_iter().collect(),
        endpoints: args.endpoints.into_iter().collect(),
        ..SubmitRequest::default()
    };
    if args.stdin {
        return submit_lines(&client, &request).await;
    }
    let run = client.submit(&request).await?;
    if args.detach {
        println!("{}", run.id);
        return Ok(0);
    }
    follow_run(&client, &run.id).await
}

/// `tether run --detach --stdin`: every line of standard input as `sh -c LINE`, with the rest
/// of `template`, submitted in batches.
async fn submit_lines(client: &TetherClient, template: &SubmitRequest) -> Result<u8, CliError> {
    use std::io::BufRead;
    let mut requests = Vec::new();
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.map_err(|e| CliError::Usage(format!("reading standard input: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        requests.push(SubmitRequest {
            command: vec!["sh".into(), "-c".into(), line],
            idempotency_key: template
                .idempotency_key
                .as_ref()
                .map(|key| format!("{key}:{}", n + 1)),
            ..template.clone()
        });
    }
    for chunk in requests.chunks(BATCH) {
        let answer = client
            .submit_batch(&BatchSubmitRequest {
                runs: chunk.to_vec(),
            })
            .await?;
        for run in answer.runs {
            println!("{}", run.id);
        }
    }
    Ok(0)
}

#[derive(Debug, Clone, Args)]
pub struct PsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub status: Option<String>,
    #[arg(long)]
    pub lane: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Print the JSON answer instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn ps(args: PsArgs) -> Result<u8, CliError> {
    let client = args.client.client()?;
    let page = client
        .list_runs(&ListRunsQuery {
            status: args.status,
            lane: args.lane,
            limit: Some(args.limit),
            cursor: None,
        })
        .await?;
    if args.json {
        print_json(&page);
        return Ok(0);
    }
    println!(
        "{:<36}  {:<10}  {:<8}  {:<7}  {:<10}  COMMAND",
        "ID", "STATUS", "LIVENESS", "ATTEMPT", "LANE"
    );
    for run in page.runs {
        let liveness = wire_name(&run.liveness.state);
        println!(
            "{:<36}  {:<10}  {:<8}  {:<7}  {:<10}  {}",
            run.id,
            run.status.as_str(),
            liveness,
            format!("{}/{}", run.attempt, run.max_attempts),
            run.lane,
            run.command.join(" ")
        );
    }
    Ok(0)
}

#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Follow live output until the run ends, then exit with its exit code.
    #[arg(long, short = 'f')]
    pub follow: bool,
    pub id: String,
}

pub async fn logs(args: LogsArgs) -> Result<u8, CliError> {
    let client = args.client.client()?;
    if args.follow {
        return follow_run(&client, &args.id).await;
    }
    let bytes = client.logs(&args.id).await?;
    let mut out = std::io::stdout().lock();
    out.write_all(&bytes)?;
    out.flush()?;
    Ok(0)
}

#[derive(Debug, Clone, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Keep following until the run ends.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Start after this event seq.
    #[arg(long)]
    pub after: Option<i64>,
    pub id: String,
}

pub async fn events(args: EventsArgs) -> Result<u8, CliError> {
    let client = args.client.client()?;
    let mut events = client.events_ndjson(&args.id, args.after, args.follow);
    let mut out = std::io::stdout().lock();
    while let Some(event) = events.next().await {
        let event = event?;
        let line = serde_json::to_string(&event).unwrap_or_default();
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
    Ok(0)
}

#[derive(Debug, Clone, Args)]
pub struct CancelArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub id: String,
}

pub async fn cancel(args: CancelArgs) -> Result<u8, CliError> {
    let client = args.client.client()?;
    let run = client.cancel_run(&args.id).await?;
    println!("{} {}", run.id, run.status.as_str());
    Ok(0)
}

#[derive(Debug, Clone, Args)]
pub struct WorkersArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub json: bool,
}

pub async fn workers(args: WorkersArgs) -> Result<u8, CliError> {
    let client = args.client.client()?;
    let list = client.list_workers().await?;
    if args.json {
        print_json(&list);
        return Ok(0);
    }
    println!(
        "{:<36}  {:<20}  {:<8}  {:>9}  {:>13}  RUNS",
        "ID", "NAME", "STATE", "HEARTBEAT", "CPUS"
    );
    for w in list.workers {
        let state = wire_name(&w.state);
        println!(
            "{:<36}  {:<20}  {:<8}  {:>8.1}s  {:>13}  {}",
            w.id,
            w.name,
            state,
            w.heartbeat_age_s,
            format!("{}/{}", w.reserved.cpus, w.capacity.cpus),
            w.runs.len()
        );
    }
    Ok(0)
}
