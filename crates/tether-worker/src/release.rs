//! Handing back attempts this worker holds but never started (`POST /v1/workers/{id}/release`):
//! the runs of its local queue when it stops, and any that waited there longer than
//! [`crate::slots::MAX_QUEUE_WAIT`]. The server puts them back in line and their attempts do
//! not count against `max_attempts`, so stopping a worker costs its queued runs nothing and a
//! run never waits here while another worker could start it.
//!
//! Attempts that come due together (a local queue that stalled, a worker stopping) go back in
//! one call: each asker waits for its own answer.

use std::time::Duration;

use tether_api::{ReleaseRequest, RunRefWire, TetherClient, MAX_RELEASED_RUNS};
use tokio::sync::{mpsc, oneshot};

/// How long one call may take: a worker stopping must not wait long for a server that is
/// away (its runs are then handed back by deregistering, or by the reaper, as before).
const PATIENCE: Duration = Duration::from_secs(5);

type Ask = (RunRefWire, oneshot::Sender<bool>);

/// Where attempts are handed back; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Releaser {
    asks: mpsc::UnboundedSender<Ask>,
}

impl Releaser {
    /// A releaser and the loop that sends its calls (run it as a task for the session).
    pub(crate) fn new(
        client: TetherClient,
        worker_id: String,
    ) -> (Releaser, impl std::future::Future<Output = ()>) {
        let (asks, inbox) = mpsc::unbounded_channel();
        (Releaser { asks }, release_loop(client, worker_id, inbox))
    }

    /// Hands back `attempt` of `run_id`, which this worker never started. `true` once the
    /// server took it back; `false` if it did not (the attempt is no longer this worker's to
    /// give, or the server could not be asked), and it is still held.
    pub(crate) async fn release(&self, run_id: &str, attempt: u32) -> bool {
        let (tx, rx) = oneshot::channel();
        let run = RunRefWire {
            run_id: run_id.to_string(),
            attempt,
        };
        if self.asks.send((run, tx)).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

/// Sends what is asked, as many as are waiting in one call, until every [`Releaser`] is gone.
async fn release_loop(
    client: TetherClient,
    worker_id: String,
    mut inbox: mpsc::UnboundedReceiver<Ask>,
) {
    // A server from before this call answers `no_route`: asked once, never again (its
    // runs go back as ended attempts when this worker stops, as they did with it).
    let mut unsupported = false;
    while let Some(first) = inbox.recv().await {
        if unsupported {
            let _ = first.1.send(false);
            continue;
        }
        let mut asks = vec![first];
        while asks.len() < MAX_RELEASED_RUNS {
            match inbox.try_recv() {
                Ok(ask) => asks.push(ask),
                Err(_) => break,
            }
        }
        let request = ReleaseRequest {
            runs: asks.iter().map(|(run, _)| run.clone()).collect(),
        };
        let released: std::collections::HashSet<(String, u32)> =
            match tokio::time::timeout(PATIENCE, client.release_runs(&worker_id, &request)).await {
                Ok(Ok(answer)) => answer
                    .released
                    .into_iter()
                    .map(|r| (r.run_id, r.attempt))
                    .collect(),
                Ok(Err(err)) if err.code() == Some("no_route") => {
                    tracing::info!(
                        "the server cannot take back runs this worker never started (it \
                         predates POST /v1/workers/{{id}}/release); they go back as ended \
                         attempts"
                    );
                    unsupported = true;
                    Default::default()
                }
                Ok(Err(err)) => {
                    tracing::warn!(%err, runs = asks.len(), "cannot hand back unstarted runs");
                    Default::default()
                }
                Err(_) => {
                    tracing::warn!(runs = asks.len(), "handing back unstarted runs timed out");
                    Default::default()
                }
            };
        if !released.is_empty() {
            tracing::debug!(runs = released.len(), "handed back unstarted runs");
        }
        for (run, answer) in asks {
            let _ = answer.send(released.contains(&(run.run_id, run.attempt)));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use axum::http::StatusCode;
    use axum::Json;

    use super::*;

    /// A server that answers every call as one from before `/release` would.
    async fn old_server(calls: Arc<AtomicUsize>) -> String {
        let app = axum::Router::new().fallback(move || {
            calls.fetch_add(1, Ordering::Relaxed);
            async {
                (
                    StatusCode::NOT_FOUND,
                    Json(serde_json::json!({"error": {"code": "no_route", "message": "no route"}})),
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_server_without_release_is_asked_once() {
        let calls = Arc::new(AtomicUsize::new(0));
        let base = old_server(calls.clone()).await;
        let client = TetherClient::new(&base, None).unwrap();
        let (releaser, release_loop) = Releaser::new(client, "w".into());
        tokio::spawn(release_loop);
        assert!(!releaser.release("run-1", 1).await);
        assert!(!releaser.release("run-2", 1).await);
        assert!(!releaser.release("run-1", 1).await);
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }
}
