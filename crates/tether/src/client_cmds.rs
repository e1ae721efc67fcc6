//! Client commands: `run`, `ps`, `logs`, `events`, `cancel`, `workers`.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use clap::Args;
use futures::StreamExt;
use tether_api::client::ListRunsQuery;
use tether_api::{BatchSubmitRequest, RunView, SubmitRequest, TetherClient};
use tether_domain::time::parse_duration_ms;
use tether_domain::{ErrorCode, LivenessState, Resources, RunStatus, WorkerState};

use crate::follow::{follow_run, listen_for_interrupts, request_cancel, OnInterrupt};
use crate::transport;
use crate::ui::{self, shell_quote, Cell, Colour, Table};
use crate::CliError;

/// Prints an API answer as pretty JSON (`--json`).
pub(crate) fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
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
    /// Bearer token for the client scope (the server's --api-token). Workers read theirs
    /// from TETHER_WORKER_TOKEN, so one shell can hold both.
    #[arg(long, env = "TETHER_TOKEN", global = true)]
    pub token: Option<String>,
    /// A file holding the client token, so it stays out of `ps` and shell history.
    #[arg(long, env = "TETHER_TOKEN_FILE", global = true)]
    pub token_file: Option<std::path::PathBuf>,
    /// Also trust the CA certificates in this PEM file for an https:// server (the public
    /// CAs are always trusted).
    #[arg(long, env = "TETHER_CA_CERT", global = true)]
    pub ca_cert: Option<std::path::PathBuf>,
}

impl ClientArgs {
    pub(crate) fn client(&self) -> Result<TetherClient, CliError> {
        let token = transport::token_from(
            self.token.as_deref(),
            self.token_file.as_deref(),
            "--token",
            "--token-file",
        )?;
        transport::warn_clear_text_token(&self.server, token.is_some(), "this command");
        let ca = crate::serve_cmds::read_ca_cert(self.ca_cert.as_deref())?;
        Ok(TetherClient::with_ca(&self.server, token, ca.as_deref())?)
    }
}

/// A run id as typed: whole, or a unique prefix of one (`tether logs 019ac1f2`), as git and
/// docker take them. An ambiguous prefix is refused with the runs it matches.
pub(crate) async fn resolve_run_id(client: &TetherClient, typed: &str) -> Result<String, CliError> {
    const SHOWN: u32 = 5;
    let typed = typed.trim();
    if typed.is_empty() {
        return Err(CliError::Usage("a run id is empty".into()));
    }
    let page = client
        .list_runs(&ListRunsQuery {
            id_prefix: Some(typed.to_string()),
            limit: Some(SHOWN + 1),
            ..ListRunsQuery::default()
        })
        .await?;
    match page.runs.as_slice() {
        [] => Err(CliError::Usage(format!(
            "no such run: no run id starts with `{typed}`"
        ))),
        [one] => Ok(one.id.clone()),
        many => {
            // The whole id of one run is never ambiguous, even if it prefixes another's.
            if let Some(exact) = many.iter().find(|r| r.id == typed) {
                return Ok(exact.id.clone());
            }
            let mut text = format!(
                "`{typed}` is ambiguous: it starts {} runs; type more of the id:",
                if many.len() as u32 > SHOWN {
                    format!("more than {SHOWN}")
                } else {
                    many.len().to_string()
                }
            );
            for run in many.iter().take(SHOWN as usize) {
                text.push_str(&format!(
                    "\n  {}  {:<10}  {}",
                    run.id,
                    run.status.as_str(),
                    shell_quote(&run.command)
                ));
            }
            Err(CliError::Usage(text))
        }
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
    /// Cancel the run on the first Ctrl-C (without it, Ctrl-C detaches and a second one
    /// within 3 s cancels).
    #[arg(long)]
    pub cancel_on_interrupt: bool,
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
    // Listening before the run exists, so no Ctrl-C is missed once it does.
    let sigint = if args.detach {
        None
    } else {
        Some(listen_for_interrupts()?)
    };
    let run = client.submit(&request).await?;
    if args.detach {
        println!("{}", run.id);
        return Ok(0);
    }
    eprintln!(
        "[tether] run {} submitted to lane {}; Ctrl-C {}",
        run.id,
        run.lane,
        if args.cancel_on_interrupt {
            "cancels it"
        } else {
            "detaches (it goes on), twice cancels"
        }
    );
    let on_interrupt = Some(if args.cancel_on_interrupt {
        OnInterrupt::Cancel
    } else {
        OnInterrupt::Detach
    });
    follow_run(&client, &run.id, on_interrupt.zip(sigint)).await
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
    /// Only runs in this status: pending, claimed, running, succeeded, failed, timed_out,
    /// cancelled.
    #[arg(long)]
    pub status: Option<String>,
    /// Only runs in this lane.
    #[arg(long)]
    pub lane: Option<String>,
    /// How many runs to show, newest first (1 to 500).
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Print the JSON answer instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn status_colour(status: RunStatus) -> Colour {
    match status {
        RunStatus::Succeeded => Colour::Green,
        RunStatus::Failed | RunStatus::TimedOut => Colour::Red,
        RunStatus::Cancelled => Colour::Yellow,
        RunStatus::Running | RunStatus::Claimed => Colour::Blue,
        RunStatus::Pending => Colour::Dim,
    }
}

fn liveness_colour(state: LivenessState) -> Colour {
    match state {
        LivenessState::Alive => Colour::Green,
        LivenessState::Quiet => Colour::Plain,
        LivenessState::Suspect => Colour::Yellow,
        LivenessState::Lost => Colour::Red,
        LivenessState::Waiting | LivenessState::Done => Colour::Dim,
    }
}

/// `exit 3`, `spawn_failed`, `timeout`, or `-` while there is none.
fn result_cell(run: &RunView) -> String {
    match (run.exit_code, run.error_code) {
        (Some(code), None | Some(ErrorCode::ExitNonzero)) => format!("exit {code}"),
        (_, Some(error)) => error.as_str().to_string(),
        (None, None) => "-".into(),
    }
}

/// Worker names by id; a worker that has left shows the start of its id.
async fn worker_names(client: &TetherClient) -> HashMap<String, String> {
    client
        .list_workers()
        .await
        .map(|l| l.workers.into_iter().map(|w| (w.id, w.name)).collect())
        .unwrap_or_default()
}

/// The worker of each finished run's last attempt (a list does not carry attempts, and a run
/// lets go of its worker when it ends), read a few runs at a time.
async fn last_workers(client: &TetherClient, runs: &[RunView]) -> HashMap<String, String> {
    futures::stream::iter(
        runs.iter()
            .filter(|r| r.worker_id.is_none() && r.attempt > 0)
            .map(|r| client.get_run(&r.id)),
    )
    .buffer_unordered(8)
    .filter_map(|run| async move {
        let run = run.ok()?;
        let last = run.attempts?.pop()?;
        Some((run.id, last.worker_id))
    })
    .collect()
    .await
}

fn worker_cell(names: &HashMap<String, String>, id: Option<&str>) -> String {
    match id {
        None => "-".into(),
        Some(id) => names
            .get(id)
            .cloned()
            .unwrap_or_else(|| id.chars().take(8).collect()),
    }
}

pub async fn ps(args: PsArgs) -> Result<u8, CliError> {
    let client = args.client.client()?;
    let page = client
        .list_runs(&ListRunsQuery {
            status: args.status,
            lane: args.lane,
            limit: Some(args.limit),
            ..ListRunsQuery::default()
        })
        .await?;
    if args.json {
        print_json(&page);
        return Ok(0);
    }
    let names = worker_names(&client).await;
    let last_workers = last_workers(&client, &page.runs).await;
    let now = ui::now_s();
    let mut table = Table::new(&[
        "ID",
        "STATUS",
        "LIVENESS",
        ">AGE",
        ">DURATION",
        "RESULT",
        "ATTEMPT",
        "WORKER",
        "LANE",
        "COMMAND",
    ]);
    for run in &page.runs {
        let age = ui::epoch_s(&run.created_at)
            .map(|t| ui::span(now - t))
            .unwrap_or_else(|| "-".into());
        let duration = run
            .started_at
            .as_deref()
            .and_then(|start| match run.finished_at.as_deref() {
                Some(end) => ui::between(start, end),
                None => ui::epoch_s(start).map(|t| now - t),
            })
            .map(ui::span)
            .unwrap_or_else(|| "-".into());
        let result = result_cell(run);
        let result_colour = if run.status == RunStatus::Succeeded || result == "-" {
            Colour::Plain
        } else {
            Colour::Red
        };
        table.row(vec![
            Cell::new(run.id.clone()),
            Cell::coloured(run.status.as_str(), status_colour(run.status)),
            Cell::coloured(
                run.liveness.state.as_str(),
                liveness_colour(run.liveness.state),
            ),
            Cell::new(age),
            Cell::new(duration),
            Cell::coloured(result, result_colour),
            // Released attempts did not count: the budget is what the run may reach.
            Cell::new(format!(
                "{}/{}",
                run.attempt,
                run.max_attempts + run.released_attempts
            )),
            Cell::new(worker_cell(
                &names,
                run.worker_id
                    .as_deref()
                    .or_else(|| last_workers.get(&run.id).map(String::as_str)),
            )),
            Cell::new(run.lane.clone()),
            Cell::new(shell_quote(&run.command)),
        ]);
    }
    table.print();
    if page.next_cursor.is_some() {
        eprintln!("(newest {} shown; --limit shows more)", page.runs.len());
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
    /// Which attempt's output: a number, `last` (the default) or `all` (every attempt, each
    /// after a separator line). Not with `--follow`, which shows every attempt as it comes.
    #[arg(long, conflicts_with = "follow")]
    pub attempt: Option<String>,
    /// The run's id, or a unique prefix of it.
    pub id: String,
}

pub async fn logs(args: LogsArgs) -> Result<u8, CliError> {
    let client = args.client.client()?;
    let id = resolve_run_id(&client, &args.id).await?;
    if args.follow {
        return follow_run(&client, &id, None).await;
    }
    let bytes = client.attempt_logs(&id, args.attempt.as_deref()).await?;
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
    /// The run's id, or a unique prefix of it.
    pub id: String,
}

pub async fn events(args: EventsArgs) -> Result<u8, CliError> {
    let client = args.client.client()?;
    let id = resolve_run_id(&client, &args.id).await?;
    let mut events = client.events_ndjson(&id, args.after, args.follow);
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
    /// The run's id, or a unique prefix of it.
    pub id: String,
}

pub async fn cancel(args: CancelArgs) -> Result<u8, CliError> {
    let client = args.client.client()?;
    let id = resolve_run_id(&client, &args.id).await?;
    println!("{}", request_cancel(&client, &id).await?);
    Ok(0)
}

#[derive(Debug, Clone, Args)]
pub struct WorkersArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print the JSON answer instead of a table.
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
    if list.workers.is_empty() {
        println!("no workers registered");
        return Ok(0);
    }
    let mut table = Table::new(&[
        "ID",
        "NAME",
        "STATE",
        ">HEARTBEAT",
        ">CPUS",
        ">MEMORY MB",
        ">RUNS",
        "LANES",
    ]);
    for w in &list.workers {
        let colour = match w.state {
            WorkerState::Active => Colour::Green,
            WorkerState::Draining | WorkerState::Suspect => Colour::Yellow,
            WorkerState::Lost => Colour::Red,
        };
        table.row(vec![
            Cell::new(w.id.clone()),
            Cell::new(w.name.clone()),
            Cell::coloured(w.state.as_str(), colour),
            Cell::new(ui::ago(w.heartbeat_age_s)),
            Cell::new(format!("{}/{}", w.reserved.cpus, w.capacity.cpus)),
            Cell::new(format!("{}/{}", w.reserved.memory_mb, w.capacity.memory_mb)),
            Cell::new(w.runs.len().to_string()),
            Cell::new(if w.lanes.is_empty() {
                "every lane".to_string()
            } else {
                w.lanes.join(",")
            }),
        ]);
    }
    table.print();
    Ok(0)
}
