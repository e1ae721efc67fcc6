//! TCP proxies that inject the network faults tests need: one that cuts idle connections, the
//! way nginx, ALB and Heroku do (event streams must survive it, SPEC §1 problem 1), and one
//! that throws answers away after the server committed (retries must not do work twice).

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

/// A proxy that forwards requests whole but, for the first `drops` requests whose first bytes
/// contain `marker` (e.g. `/logs`), throws the server's answer away and closes the client's
/// connection: the call was done, yet its caller never learns so, as when a server dies right
/// after committing. The caller's retry shows whether the work is done twice.
pub struct ReplyDroppingProxy {
    /// `host:port` to connect to instead of the upstream.
    pub addr: String,
    dropped: Arc<AtomicUsize>,
}

impl ReplyDroppingProxy {
    pub async fn start(
        upstream: String,
        marker: &'static str,
        drops: usize,
    ) -> std::io::Result<ReplyDroppingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let dropped = Arc::new(AtomicUsize::new(0));
        let counted = dropped.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay_dropping(
                    client,
                    upstream.clone(),
                    marker,
                    drops,
                    counted.clone(),
                ));
            }
        });
        Ok(ReplyDroppingProxy { addr, dropped })
    }

    /// How many answers it has thrown away so far.
    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }
}

async fn relay_dropping(
    client: TcpStream,
    upstream: String,
    marker: &'static str,
    drops: usize,
    dropped: Arc<AtomicUsize>,
) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let mut cbuf = vec![0u8; 64 * 1024];
    let mut sbuf = vec![0u8; 64 * 1024];
    // The answer to the request in flight is to be thrown away.
    let mut swallow = false;
    loop {
        tokio::select! {
            n = cr.read(&mut cbuf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let head = &cbuf[..n.min(512)];
                    let starts_request = head.starts_with(b"POST ") || head.starts_with(b"GET ")
                        || head.starts_with(b"PUT ") || head.starts_with(b"DELETE ");
                    if starts_request
                        && head.windows(marker.len()).any(|w| w == marker.as_bytes())
                        && dropped
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| {
                                (d < drops).then_some(d + 1)
                            })
                            .is_ok()
                    {
                        swallow = true;
                    }
                    if sw.write_all(&cbuf[..n]).await.is_err() { return }
                }
            },
            n = sr.read(&mut sbuf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if swallow {
                        // The server answered, so it did the work: cut the caller off.
                        return;
                    }
                    if cw.write_all(&sbuf[..n]).await.is_err() { return }
                }
            },
        }
    }
}
