//! Test support shared by the server's and the binary's test suites: a TCP proxy that cuts
//! idle connections, the way nginx, ALB and Heroku do, so tests can prove that event streams
//! survive it (SPEC §1 problem 1). Not used by the server itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A proxy on a loopback port in front of `upstream` (`host:port`).
pub struct IdleCuttingProxy {
    /// `host:port` to connect to instead of the upstream.
    pub addr: String,
    cuts: Arc<AtomicUsize>,
}

impl IdleCuttingProxy {
    /// Starts a proxy that closes any connection with no traffic either way for `idle`.
    pub async fn start(upstream: String, idle: Duration) -> std::io::Result<IdleCuttingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let cuts = Arc::new(AtomicUsize::new(0));
        let counted = cuts.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream.clone(), idle, counted.clone()));
            }
        });
        Ok(IdleCuttingProxy { addr, cuts })
    }

    /// How many connections it has cut for idleness so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::Relaxed)
    }
}

async fn relay(client: TcpStream, upstream: String, idle: Duration, cuts: Arc<AtomicUsize>) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let mut cbuf = vec![0u8; 16 * 1024];
    let mut sbuf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = cr.read(&mut cbuf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if sw.write_all(&cbuf[..n]).await.is_err() { return },
            },
            n = sr.read(&mut sbuf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if cw.write_all(&sbuf[..n]).await.is_err() { return },
            },
            _ = tokio::time::sleep(idle) => {
                cuts.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}
