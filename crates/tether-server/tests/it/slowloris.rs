//! Connections are bounded (issue 10): thousands of idle or half-sent connections neither
//! delay `/healthz` nor stay open past the header-read timeout.

use std::time::{Duration, Instant};

use tether_server::accept::ConnectionLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{fast_config, TestServer};

const WANTED: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_neither_delay_healthz_nor_outlive_the_header_timeout() {
    // This process holds both ends of every connection: two descriptors each, plus slack.
    let limit = tether_server::accept::raise_open_files_limit().unwrap_or(1024) as usize;
    let count = WANTED.min(limit.saturating_sub(200) / 2);
    if count < WANTED {
        eprintln!("open-files limit {limit}: using {count} connections, not {WANTED}");
    }
    let header_timeout = Duration::from_secs(2);
    let s = TestServer::start_with(tether_server::ServerConfig {
        connections: ConnectionLimits {
            header_read_timeout: header_timeout,
            idle_timeout: Duration::from_secs(3),
            max_connections: 8 * WANTED,
        },
        ..fast_config()
    })
    .await;
    let addr = s.server.as_ref().unwrap().addr;
    let mut idle = Vec::with_capacity(count);
    for i in 0..count {
        let mut c = TcpStream::connect(addr).await.unwrap();
        // Half send nothing; half send part of a head and then stall.
        if i % 2 == 1 {
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                .await
                .unwrap();
        }
        idle.push(c);
    }
    let opened = Instant::now();

    // Fresh connections are served at once regardless.
    let mut latencies = Vec::new();
    for _ in 0..5 {
        let client = reqwest::Client::new();
        let t = Instant::now();
        let r = client.get(s.url("/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        latencies.push(t.elapsed());
    }
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    assert!(
        median < Duration::from_millis(100),
        "healthz took {latencies:?} beside {count} idle connections"
    );

    // Every idle connection is cut by the server after the header-read timeout.
    let deadline = opened + header_timeout + Duration::from_secs(20);
    for (i, c) in idle.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut buf = [0u8; 256];
        let closed = loop {
            match tokio::time::timeout(left, c.read(&mut buf)).await {
                Err(_) => break false,
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                // A 408 or similar answer before the close is fine; keep reading.
                Ok(Ok(_)) => continue,
            }
        };
        assert!(
            closed,
            "connection {i} still open {:?} after opening",
            opened.elapsed()
        );
    }
    assert!(
        opened.elapsed() >= header_timeout - Duration::from_millis(100),
        "connections were cut before the timeout"
    );
}
