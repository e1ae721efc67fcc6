//! Servers and workers as separate `tether` processes on loopback, with small intervals.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tether_testkit::eventually;
pub use tether_testkit::http::{
    free_port, get_run, id, submit_to, wait_for_run as wait_for, wait_ready,
};
use tether_testkit::http::{get_json, is_terminal};

pub const TETHER: &str = env!("CARGO_BIN_EXE_tether");

/// The intervals every test cluster runs with: heartbeat 200 ms, stale after 1 s.
pub const FAST: &[&str] = &[
    "--heartbeat-interval",
    "200ms",
    "--stale-after",
    "1s",
    "--sse-heartbeat",
    "500ms",
    "--reaper-interval",
    "2s",
];

/// The FAST flags, less those `extra` sets itself (a flag may be given once).
pub fn fast_except<'a>(extra: &[&str]) -> Vec<&'a str> {
    FAST.chunks(2)
        .filter(|pair| !extra.contains(&pair[0]))
        .flatten()
        .copied()
        .collect()
}

/// A child process killed (SIGKILL) when dropped, so a failing test leaves nothing running.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, signal: Signal) {
        let _ = kill(self.pid(), signal);
    }

    /// SIGTERM, then wait for the exit (SIGKILL after `within`).
    pub fn stop(mut self, within: Duration) -> Option<i32> {
        self.signal(Signal::SIGTERM);
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn(args: &[&str], cwd: &Path) -> Proc {
    let log = std::env::var("TETHER_TEST_LOG").unwrap_or_else(|_| "warn".into());
    let child = Command::new(TETHER)
        .args(args)
        .current_dir(cwd)
        .env("TETHER_LOG", log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Proc { child }
}

/// A test's database and server processes.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub database: String,
    pub http: reqwest::Client,
    pub servers: Vec<(String, Proc)>,
}

impl Cluster {
    /// A cluster on a fresh SQLite file, with no server yet.
    pub fn sqlite() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let database = format!("sqlite://{}/tether.db", dir.path().display());
        Cluster {
            dir,
            database,
            http: reqwest::Client::new(),
            servers: Vec::new(),
        }
    }

    /// A cluster on an existing database (a PostgreSQL URL), with no server yet.
    pub fn on_database(url: &str) -> Cluster {
        Cluster {
            dir: tempfile::tempdir().unwrap(),
            database: url.to_string(),
            http: reqwest::Client::new(),
            servers: Vec::new(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Starts a `tether server` and waits until it answers. Returns its base URL.
    pub async fn start_server(&mut self, extra: &[&str]) -> String {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["server", "--listen", &listen, "--database", &self.database];
        args.extend(fast_except(extra));
        args.extend_from_slice(extra);
        let proc = spawn(&args, self.dir.path());
        let base = format!("http://{listen}");
        wait_ready(&self.http, &base).await;
        self.servers.push((base.clone(), proc));
        base
    }

    pub fn base(&self) -> &str {
        &self.servers[0].0
    }

    pub fn worker(&self, name: &str, cpus: &str, extra: &[&str]) -> Proc {
        self.worker_on(self.base(), name, cpus, extra)
    }

    pub fn worker_on(&self, base: &str, name: &str, cpus: &str, extra: &[&str]) -> Proc {
        let mut args = vec![
            "worker",
            "--server",
            base,
            "--name",
            name,
            "--cpus",
            cpus,
            "--memory-mb",
            "8192",
            "--kill-grace",
            "1s",
        ];
        args.extend_from_slice(extra);
        spawn(&args, self.dir.path())
    }

    pub async fn submit(&self, body: Value) -> Value {
        submit_to(&self.http, self.base(), body).await
    }

    /// The server's `/metrics`, as text.
    pub async fn metrics(&self) -> String {
        let scrape = self
            .http
            .get(format!("{}/metrics", self.base()))
            .send()
            .await
            .unwrap();
        assert_eq!(scrape.status().as_u16(), 200);
        scrape.text().await.unwrap()
    }

    pub async fn run(&self, id: &str) -> Value {
        get_run(&self.http, self.base(), id).await
    }

    pub async fn logs(&self, id: &str) -> Vec<u8> {
        self.logs_of(id, "last").await
    }

    /// `/logs?attempt=` (a number, `last` or `all`).
    pub async fn logs_of(&self, id: &str, attempt: &str) -> Vec<u8> {
        self.http
            .get(format!(
                "{}/v1/runs/{id}/logs?attempt={attempt}",
                self.base()
            ))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec()
    }

    /// Polls until `done(run)`, failing after `within`.
    pub async fn wait_for(
        &self,
        id: &str,
        within: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_for(&self.http, self.base(), id, within, done).await
    }

    pub async fn wait_terminal(&self, id: &str, within: Duration) -> Value {
        self.wait_for(id, within, is_terminal).await
    }

    pub async fn workers(&self) -> Vec<Value> {
        let (status, body) = get_json(&self.http, &format!("{}/v1/workers", self.base())).await;
        assert_eq!(status, 200, "{body}");
        body["workers"].as_array().unwrap().clone()
    }

    /// Waits until `n` workers are registered and active.
    pub async fn wait_workers(&self, n: usize) {
        eventually(
            &format!("{n} active workers"),
            Duration::from_secs(20),
            async || {
                let workers = self.workers().await;
                let active = workers.iter().filter(|w| w["state"] == "active").count();
                if active >= n {
                    Ok(())
                } else {
                    Err(Value::Array(workers))
                }
            },
        )
        .await;
    }
}

/// How many processes run with exactly this argv (read from /proc).
pub fn processes_running(argv: &[&str]) -> usize {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0u8])).collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
        .count()
}
