//! TLS between machines, with a CA made here (rcgen): a server on TLS with a worker and the
//! CLI talking to it, an https readiness endpoint probed and dispatched, and a client that does
//! not trust the CA refused with a clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use serde_json::json;

use crate::cluster::{fast_except, free_port, Proc, TETHER};
use tether_testkit::eventually;
use tether_testkit::http::{get_json, wait_ready};

/// The files of a test CA and of a server certificate it signed for `localhost`/`127.0.0.1`.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// A CA nobody used: trusting it is not trusting the server.
    other_ca: PathBuf,
}

fn self_signed_ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert, key)
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let (ca, ca_key) = self_signed_ca("tether test CA");
    let (other, _) = self_signed_ca("some other CA");
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "tether server");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    Pki {
        ca: write("ca.pem", ca.pem()),
        cert: write("server.pem", cert.pem()),
        key: write("server.key", key.serialize_pem()),
        other_ca: write("other-ca.pem", other.pem()),
        _dir: dir,
    }
}

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A `tether server` on TLS; returns its `https://127.0.0.1:PORT`.
async fn tls_server(pki: &Pki, dir: &Path, extra: &[&str]) -> (Proc, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let db = format!("sqlite://{}/tether.db", dir.display());
    let mut args = vec![
        "server",
        "--listen",
        &listen,
        "--database",
        &db,
        "--tls-cert",
        arg(&pki.cert),
        "--tls-key",
        arg(&pki.key),
    ];
    args.extend(fast_except(extra));
    args.extend_from_slice(extra);
    let child = Command::new(TETHER)
        .args(&args)
        .env("TETHER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let proc = Proc { child };
    let base = format!("https://{listen}");
    let http = trusting(&pki.ca);
    wait_ready(&http, &base).await;
    (proc, base)
}

fn trusting(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap()
}

fn tether(base: &str, args: &[&str]) -> std::process::Output {
    Command::new(TETHER)
        .args(args)
        .env("TETHER_SERVER", base)
        .env_remove("TETHER_CA_CERT")
        .env_remove("SSL_CERT_FILE")
        .output()
        .unwrap()
}

fn worker(base: &str, ca: &Path, name: &str) -> Proc {
    let child = Command::new(TETHER)
        .args(["worker", "--server", base, "--name", name, "--cpus", "1"])
        .args(["--ca-cert", arg(ca)])
        .env("TETHER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Proc { child }
}

#[tokio::test]
async fn a_worker_and_the_cli_work_through_a_server_on_tls() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (_server, base) = tls_server(&pki, dir.path(), &[]).await;
    // Clients that connect and never start a handshake hold up nobody else.
    let addr = base.trim_start_matches("https://").to_string();
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let _worker = worker(&base, &pki.ca, "tls-worker");
    let out = tether(
        &base,
        &["run", "--ca-cert", arg(&pki.ca), "--", "echo", "over tls"],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "over tls\n");
    let out = tether(&base, &["workers", "--ca-cert", arg(&pki.ca)]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("tls-worker"),
        "{out:?}"
    );
    drop(silent);
    // Plain HTTP to the TLS port gets nowhere.
    let plain = base.replace("https://", "http://");
    let out = tether(&plain, &["ps"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[tokio::test]
async fn the_machine_s_own_ca_bundle_is_trusted_without_ca_cert() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (_server, base) = tls_server(&pki, dir.path(), &[]).await;
    // The machine's bundle, as an operator who ran update-ca-certificates has it; SSL_CERT_FILE
    // points there as it does for OpenSSL.
    let out = Command::new(TETHER)
        .args(["ps"])
        .env("TETHER_SERVER", &base)
        .env_remove("TETHER_CA_CERT")
        .env("SSL_CERT_FILE", &pki.ca)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[tokio::test]
async fn a_client_or_worker_that_does_not_trust_the_ca_is_refused_with_a_clear_error() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (_server, base) = tls_server(&pki, dir.path(), &[]).await;
    for ca in [None, Some(&pki.other_ca)] {
        let mut args = vec!["ps"];
        if let Some(ca) = ca {
            args.extend(["--ca-cert", arg(ca)]);
        }
        let out = tether(&base, &args);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("TLS"), "{err}");
        assert!(err.contains("certificate"), "{err}");
        assert!(err.contains("--ca-cert"), "{err}");
    }
    // A worker gives up at once rather than retrying forever.
    let mut w = worker(&base, &pki.other_ca, "untrusting");
    let status = eventually(
        "the worker to give up",
        Duration::from_secs(20),
        async || w.child.try_wait().unwrap(),
    )
    .await;
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut w.child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("TLS") && err.contains("certificate"), "{err}");
}

#[tokio::test]
async fn an_https_readiness_endpoint_is_probed_and_dispatched() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    // The server probes its own /healthz over https, trusting the test CA.
    let (_server, base) = tls_server(
        &pki,
        dir.path(),
        &["--probe-interval", "200ms", "--ca-cert", arg(&pki.ca)],
    )
    .await;
    let http = trusting(&pki.ca);
    let ready = format!("{base}/healthz").replace("127.0.0.1", "localhost");
    let r = http
        .put(format!("{base}/v1/pools/cache"))
        .json(&json!({"freshness_s": 5}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
    let r = http
        .put(format!("{base}/v1/endpoints/cache-1"))
        .json(&json!({"pool": "cache", "url": "https://cache-1.internal", "readiness_url": ready}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
    let d = eventually("dispatch to cache-1", Duration::from_secs(10), async || {
        let (_, d) = get_json(&http, &format!("{base}/v1/pools/cache/dispatch")).await;
        if d["endpoint"] == "cache-1" {
            Ok(d)
        } else {
            Err(d)
        }
    })
    .await;
    assert_eq!(d["url"], "https://cache-1.internal");
    let _worker = worker(&base, &pki.ca, "tls-worker");
    let out = tether(
        &base,
        &[
            "run",
            "--ca-cert",
            arg(&pki.ca),
            "--endpoint",
            "CACHE_URL=cache",
            "--",
            "sh",
            "-c",
            "echo $CACHE_URL",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "https://cache-1.internal\n"
    );
}
