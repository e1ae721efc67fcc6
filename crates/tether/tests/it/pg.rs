//! PostgreSQL for end-to-end tests: a fresh database per test on the machine's server, and a
//! private cluster (its own data directory and port) for the test that restarts PostgreSQL, so
//! no other test sees the restart.

use std::path::PathBuf;
use std::process::Command;

pub fn admin_url() -> String {
    tether_testkit::database_url()
}

fn psql(url: &str, sql: &str) {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Replaces the database name in a `postgres://…/name[?…]` URL.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let root = base.rsplit_once('/').map(|(r, _)| r).unwrap_or(base);
    format!("{root}/{name}{query}")
}

/// A database made for one test and dropped after it.
pub struct PgDatabase {
    pub url: String,
    admin: String,
    name: String,
}

impl PgDatabase {
    pub fn create() -> PgDatabase {
        PgDatabase::create_on(&admin_url())
    }

    pub fn create_on(admin: &str) -> PgDatabase {
        let name = format!("tether_it_{}", uuid::Uuid::now_v7().simple());
        psql(admin, &format!("CREATE DATABASE {name}"));
        PgDatabase {
            url: with_database(admin, &name),
            admin: admin.to_string(),
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                &self.admin,
                "-qAtc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}

/// A PostgreSQL cluster of the test's own, run as the `postgres` user.
pub struct PrivateCluster {
    dir: tempfile::TempDir,
    pub port: u16,
}

fn as_postgres(args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .output()
        .expect("runuser runs")
}

fn pg_bin(name: &str) -> String {
    let versions = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .collect::<Vec<PathBuf>>()
        })
        .unwrap_or_default();
    versions
        .iter()
        .map(|v| v.join("bin").join(name))
        .find(|p| p.exists())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| name.to_string())
}

impl PrivateCluster {
    pub fn start() -> PrivateCluster {
        let dir = tempfile::tempdir().unwrap();
        let port = crate::cluster::free_port();
        let status = Command::new("chown")
            .args(["postgres:postgres", dir.path().to_str().unwrap()])
            .status()
            .unwrap();
        assert!(status.success());
        let data = dir.path().join("data");
        let out = as_postgres(&[
            &pg_bin("initdb"),
            "-D",
            data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
        ]);
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = PrivateCluster { dir, port };
        cluster.pg_ctl("start");
        cluster
    }

    fn pg_ctl(&self, action: &str) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("postgres.log");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let mut args = vec![
            pg_bin("pg_ctl"),
            "-D".into(),
            data.display().to_string(),
            "-w".into(),
        ];
        if action == "stop" {
            args.extend(["-m".into(), "fast".into()]);
        } else {
            args.extend(["-o".into(), options, "-l".into(), log.display().to_string()]);
        }
        args.push(action.into());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = as_postgres(&argv);
        assert!(
            out.status.success(),
            "pg_ctl {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn stop(&self) {
        self.pg_ctl("stop");
    }

    pub fn start_again(&self) {
        self.pg_ctl("start");
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = as_postgres(&[
            &pg_bin("pg_ctl"),
            "-D",
            data.to_str().unwrap(),
            "-m",
            "immediate",
            "stop",
        ]);
    }
}
