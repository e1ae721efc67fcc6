//! What the CLI says, through the real binary (issue 14): run ids by prefix, `tether run`'s
//! messages (its id, why it waits, a failure's reason, a retry's worker, Ctrl-C), the tables of
//! `ps`, `workers` and `endpoints`, `cancel`'s promise, and the server's log formats.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tether_testkit::eventually;

use crate::cluster::{fast_except, free_port, spawn, wait_ready, Cluster, Proc, TETHER};

async fn up() -> (tempfile::TempDir, Proc, String) {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "up",
        "--listen",
        &listen,
        "--cpus",
        "2",
        "--kill-grace",
        "1s",
    ];
    args.extend(fast_except(&[]));
    let proc = spawn(&args, dir.path());
    let base = format!("http://{listen}");
    wait_ready(&reqwest::Client::new(), &base).await;
    (dir, proc, base)
}

fn tether(base: &str, args: &[&str]) -> Output {
    Command::new(TETHER)
        .args(args)
        .env("TETHER_SERVER", base)
        .env_remove("COLUMNS")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A `tether` process whose stderr is read as it comes.
struct Watched {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Watched {
    fn start(base: &str, args: &[&str]) -> Watched {
        let mut child = Command::new(TETHER)
            .args(args)
            .env("TETHER_SERVER", base)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Watched { child, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stderr holds `needle`; fails after `within`.
    async fn wait_for(&self, needle: &str, within: Duration) -> String {
        eventually(&format!("stderr to say `{needle}`"), within, async || {
            let seen = self.stderr();
            if seen.contains(needle) {
                Ok(seen)
            } else {
                Err(format!("said:\n{seen}"))
            }
        })
        .await
    }

    /// The run id from the `[tether] run ID submitted` line.
    async fn run_id(&self) -> String {
        let seen = self.wait_for(" submitted", Duration::from_secs(10)).await;
        seen.split_whitespace()
            .skip_while(|w| *w != "run")
            .nth(1)
            .unwrap()
            .to_string()
    }

    fn interrupt(&self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
    }

    async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        eventually("the process to exit", within, async || {
            match self.child.try_wait().unwrap() {
                Some(status) => Ok(status.code()),
                None => Err(format!("said:\n{}", self.stderr())),
            }
        })
        .await
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn status_of(base: &str, run: &str) -> Value {
    reqwest::get(format!("{base}/v1/runs/{run}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn wait_status(base: &str, run: &str, status: &str, within: Duration) {
    eventually(&format!("run {run} {status}"), within, async || {
        let r = status_of(base, run).await;
        if r["status"] == status {
            Ok(())
        } else {
            Err(r)
        }
    })
    .await
}

#[tokio::test]
async fn run_ids_are_taken_by_unique_prefix_and_an_ambiguous_one_is_refused() {
    let (_dir, _up, base) = up().await;
    let first = text(&tether(&base, &["run", "-d", "--", "echo", "first"]).stdout)
        .trim()
        .to_string();
    let second = text(&tether(&base, &["run", "-d", "--", "echo", "second"]).stdout)
        .trim()
        .to_string();
    // The shortest prefix that tells them apart, then one character more than it.
    let common = first
        .chars()
        .zip(second.chars())
        .take_while(|(a, b)| a == b)
        .count();
    let unique = &second[..common + 1];
    let out = tether(&base, &["logs", "-f", unique]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(text(&out.stdout), "second\n");
    let out = tether(&base, &["events", &first[..common + 1]]);
    assert!(text(&out.stdout).contains("\"end\""), "{out:?}");

    let shared = &first[..common.max(1)];
    let out = tether(&base, &["logs", shared]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("ambiguous"), "{err}");
    assert!(err.contains(&first) && err.contains(&second), "{err}");

    let out = tether(&base, &["cancel", "zzzz"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no such run"), "{out:?}");
}

#[tokio::test]
async fn a_pending_run_says_its_id_why_it_waits_and_its_queue_position() {
    // A server with no worker at all.
    let mut c = Cluster::sqlite();
    let base = c.start_server(&[]).await;
    let watched = Watched::start(&base, &["run", "--", "echo", "never"]);
    let run = watched.run_id().await;
    assert_eq!(run.len(), 36, "{run}");
    let said = watched
        .wait_for("no live worker", Duration::from_secs(10))
        .await;
    assert!(said.contains("pending at queue position 1"), "{said}");
    assert!(said.contains("lane `default`"), "{said}");
}

#[tokio::test]
async fn a_spawn_failure_prints_the_reason_the_server_holds() {
    let (_dir, _up, base) = up().await;
    let out = tether(&base, &["run", "--", "/nonexistent/bin"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("spawn_failed"), "{err}");
    assert!(err.contains("cannot run `/nonexistent/bin`"), "{err}");
    assert!(err.contains("No such file or directory"), "{err}");
}

#[tokio::test]
async fn ctrl_c_detaches_and_says_how_to_follow_or_cancel() {
    let (_dir, _up, base) = up().await;
    let mut watched = Watched::start(&base, &["run", "--", "sleep", "763"]);
    let run = watched.run_id().await;
    wait_status(&base, &run, "running", Duration::from_secs(10)).await;
    watched.interrupt();
    let said = watched
        .wait_for(&format!("tether cancel {run}"), Duration::from_secs(5))
        .await;
    assert!(said.contains(&format!("tether logs -f {run}")), "{said}");
    assert!(said.contains("keeps running"), "{said}");
    assert_eq!(watched.exit_code(Duration::from_secs(10)).await, Some(130));
    assert!(watched.stderr().contains("detached"));
    // Detaching left the run alone.
    assert_eq!(status_of(&base, &run).await["status"], "running");
    let out = tether(&base, &["cancel", &run[..30]]);
    let said = text(&out.stdout);
    assert!(
        said.contains("SIGTERM") && said.contains("SIGKILL"),
        "{said}"
    );
    wait_status(&base, &run, "cancelled", Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_second_ctrl_c_or_cancel_on_interrupt_cancels_the_run() {
    let (_dir, _up, base) = up().await;
    let mut twice = Watched::start(&base, &["run", "--", "sleep", "764"]);
    let mut once = Watched::start(
        &base,
        &["run", "--cancel-on-interrupt", "--", "sleep", "765"],
    );
    let twice_run = twice.run_id().await;
    let once_run = once.run_id().await;
    wait_status(&base, &twice_run, "running", Duration::from_secs(10)).await;
    wait_status(&base, &once_run, "running", Duration::from_secs(10)).await;

    twice.interrupt();
    twice.wait_for("Ctrl-C again", Duration::from_secs(5)).await;
    twice.interrupt();
    once.interrupt();
    for (w, run) in [(&mut twice, &twice_run), (&mut once, &once_run)] {
        w.wait_for("cancel requested", Duration::from_secs(5)).await;
        assert_eq!(w.exit_code(Duration::from_secs(15)).await, Some(130));
        assert_eq!(status_of(&base, run).await["status"], "cancelled");
    }
}

#[tokio::test]
async fn a_retried_attempt_is_marked_with_the_new_worker_s_name() {
    let mut c = Cluster::sqlite();
    let base = c.start_server(&[]).await;
    let mut w1 = Some(c.worker("builder-one", "1", &[]));
    let mut w2 = Some(c.worker("builder-two", "1", &[]));
    c.wait_workers(2).await;
    let marker = c.path().join("marker");
    let script = format!(
        "if [ -f {m} ]; then echo second; exit 0; fi; touch {m}; echo first; exec sleep 766",
        m = marker.display()
    );
    let mut watched = Watched::start(&base, &["run", "--", "sh", "-c", &script]);
    let run = watched.run_id().await;
    let running = c
        .wait_for(&run, Duration::from_secs(10), |r| r["status"] == "running")
        .await;
    let holder = running["worker_id"].as_str().unwrap().to_string();
    let holder_name = c
        .workers()
        .await
        .into_iter()
        .find(|w| w["id"] == holder.as_str())
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let other = if holder_name == "builder-one" {
        w1.take().unwrap().kill9();
        "builder-two"
    } else {
        w2.take().unwrap().kill9();
        "builder-one"
    };
    assert_eq!(watched.exit_code(Duration::from_secs(20)).await, Some(0));
    let said = watched.stderr();
    assert!(
        said.contains(&format!("attempt 2 started on worker {other}")),
        "{said}"
    );
    let _ = std::process::Command::new("pkill")
        .args(["-KILL", "-x", "-f", "sleep 766"])
        .status();
    drop((w1, w2));
}

#[tokio::test]
async fn ps_workers_and_endpoints_print_aligned_tables_a_person_can_read() {
    let (_dir, _up, base) = up().await;
    let out = tether(&base, &["run", "--", "sh", "-c", "echo out; exit 3"]);
    assert_eq!(out.status.code(), Some(3));

    let out = tether(&base, &["ps"]);
    let table = text(&out.stdout);
    assert!(!table.contains('\x1b'), "no colour off a terminal: {table}");
    let header = table.lines().next().unwrap();
    for column in [
        "ID", "STATUS", "AGE", "DURATION", "RESULT", "WORKER", "COMMAND",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let row = table.lines().nth(1).unwrap();
    assert!(row.contains("failed"), "{row}");
    assert!(row.contains("exit 3"), "{row}");
    assert!(row.contains("tether-up-local"), "{row}");
    assert!(row.ends_with("sh -c 'echo out; exit 3'"), "{row}");
    // Columns line up under their headings.
    let at = header.find("RESULT").unwrap();
    assert_eq!(&row[at..at + 6], "exit 3", "{table}");

    // Cut to the width.
    let narrow = Command::new(TETHER)
        .args(["ps"])
        .env("TETHER_SERVER", &base)
        .env("COLUMNS", "100")
        .output()
        .unwrap();
    for line in text(&narrow.stdout).lines() {
        assert!(line.chars().count() <= 100, "{line}");
    }
    assert!(text(&narrow.stdout).contains('…'));

    // Every listing has --json.
    for cmd in ["ps", "workers", "endpoints"] {
        let out = tether(&base, &[cmd, "--json"]);
        let _: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{cmd} --json: {e}: {out:?}"));
    }

    let out = tether(&base, &["workers"]);
    let table = text(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[1].contains(" s ago"), "{table}");
    let at = lines[0].find("STATE").unwrap();
    assert_eq!(&lines[1][at..at + 6], "active", "{table}");

    let out = tether(&base, &["endpoints"]);
    let said = text(&out.stdout);
    assert!(said.contains("no endpoints registered"), "{said}");
    assert!(said.contains("no pools"), "{said}");
}

#[tokio::test]
async fn ps_uses_colour_on_a_terminal_unless_no_color_is_set() {
    let (_dir, _up, base) = up().await;
    tether(&base, &["run", "--", "true"]);
    // `script` gives the command a terminal.
    let on_terminal = |no_color: Option<&str>| {
        let mut cmd = Command::new("script");
        cmd.args(["-qec", &format!("{TETHER} ps"), "/dev/null"])
            .env("TETHER_SERVER", &base)
            .env("COLUMNS", "200")
            .env_remove("NO_COLOR");
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        text(&cmd.output().unwrap().stdout)
    };
    let coloured = on_terminal(None);
    assert!(coloured.contains("\x1b[32msucceeded"), "{coloured:?}");
    let plain = on_terminal(Some("1"));
    assert!(plain.contains("succeeded"), "{plain:?}");
    assert!(!plain.contains("\x1b["), "{plain:?}");
}

#[tokio::test]
async fn server_logs_are_plain_off_a_terminal_and_json_with_log_format_json() {
    let dir = tempfile::tempdir().unwrap();
    for format in ["text", "json"] {
        let db = format!("sqlite://{}/{format}.db", dir.path().display());
        // Port 0, and its own "listening" line as the sign it is up: a port picked beforehand
        // can be taken by another test's server, which would then answer for this one.
        let child = Command::new(TETHER)
            .args(["server", "--listen", "127.0.0.1:0", "--database", &db])
            .args(["--log-format", format])
            .env("TETHER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut proc = Proc { child };
        let mut stderr = std::io::BufReader::new(proc.child.stderr.take().unwrap());
        let mut out = String::new();
        while !out.contains("tether server listening") {
            let read = std::io::BufRead::read_line(&mut stderr, &mut out).unwrap();
            assert!(
                read > 0,
                "{format}: the server ended before listening: {out}"
            );
        }
        proc.signal(Signal::SIGTERM);
        std::io::Read::read_to_string(&mut stderr, &mut out).unwrap();
        assert!(!out.is_empty(), "{format}: no log lines");
        assert!(!out.contains('\x1b'), "{format}: {out}");
        if format == "json" {
            for line in out.lines() {
                let v: Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
                assert!(v["level"].is_string(), "{line}");
            }
        }
    }
}

#[tokio::test]
async fn the_worker_token_has_its_own_variable_and_tokens_can_come_from_files() {
    let mut c = Cluster::sqlite();
    let tokens = c.path().join("worker.token");
    std::fs::write(&tokens, "w-secret\n").unwrap();
    let api = c.path().join("api.token");
    std::fs::write(&api, "a-secret\n").unwrap();
    let base = c
        .start_server(&[
            "--api-token-file",
            api.to_str().unwrap(),
            "--worker-token-file",
            tokens.to_str().unwrap(),
        ])
        .await;
    // The client's TETHER_TOKEN does not leak into the worker: it reads TETHER_WORKER_TOKEN.
    let worker = Command::new(TETHER)
        .args([
            "worker", "--server", &base, "--name", "tokened", "--cpus", "1",
        ])
        .env("TETHER_TOKEN", "a-secret")
        .env("TETHER_WORKER_TOKEN_FILE", &tokens)
        .env("TETHER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _worker = Proc { child: worker };
    let out = Command::new(TETHER)
        .args([
            "run",
            "--token-file",
            api.to_str().unwrap(),
            "--",
            "echo",
            "ok",
        ])
        .env("TETHER_SERVER", &base)
        .env("TETHER_WORKER_TOKEN", "w-secret")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(text(&out.stdout), "ok\n");
    // Both at once is refused rather than guessed.
    let out = Command::new(TETHER)
        .args(["ps", "--token", "x", "--token-file", api.to_str().unwrap()])
        .env("TETHER_SERVER", &base)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not both"), "{out:?}");
}

#[tokio::test]
async fn a_token_headed_for_another_machine_in_clear_text_is_warned_about() {
    // 192.0.2.0/24 is for documentation: nothing answers there; the warning comes first.
    let remote = Watched::start("http://192.0.2.1:9", &["ps", "--token", "t"]);
    let said = remote.wait_for("WARNING", Duration::from_secs(10)).await;
    assert!(
        said.contains("clear text") && said.contains("192.0.2.1"),
        "{said}"
    );
    let out = Command::new(TETHER)
        .args(["ps", "--server", "http://127.0.0.1:9", "--token", "t"])
        .output()
        .unwrap();
    assert!(!text(&out.stderr).contains("WARNING"), "{out:?}");
}
