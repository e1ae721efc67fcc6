//! Following a run's events (SPEC §2 "Events"): stored events are replayed from the store after
//! the client's last seq, then new ones are read as the store signals them, so there is no gap
//! and no duplicate at the seam. Heartbeat events (never stored, no `id:`) keep quiet streams
//! alive through proxies in every phase. A stream is pulled by the client's socket: nothing is
//! buffered for a slow client, and a client that goes away drops its stream (and its task) at
//! once.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{stream, Stream, StreamExt};
use serde::Deserialize;
use tether_store::{EventKind, EventRecord, RunRecord, SharedStore, Signal};
use tokio::sync::{broadcast::error::RecvError, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery};
use crate::views::{event_view, heartbeat_view};
use crate::AppState;

/// Events read from the store per page.
const PAGE: u32 = 500;

type Watchers = Arc<Mutex<HashMap<String, watch::Sender<i64>>>>;

/// Fans the store's signals out to the followers of each run: a follower wakes only for its
/// own run, and a burst of events coalesces into one wake-up.
#[derive(Clone)]
pub struct EventHub {
    watchers: Watchers,
    followers: Arc<AtomicI64>,
}

impl EventHub {
    /// Starts the task that routes the store's signals until `shutdown`.
    pub fn start(store: SharedStore, shutdown: CancellationToken) -> EventHub {
        let hub = EventHub {
            watchers: Arc::default(),
            followers: Arc::default(),
        };
        let watchers = hub.watchers.clone();
        let mut signals = store.subscribe();
        tokio::spawn(async move {
            loop {
                let signal = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    s = signals.recv() => s,
                };
                let Ok(map) = watchers.lock() else { return };
                match signal {
                    Ok(Signal::RunEvents { run_id, seq }) => {
                        if let Some(tx) = map.get(&run_id) {
                            tx.send_replace(seq);
                        }
                    }
                    Ok(_) => {}
                    // Signals were lost: wake everyone; they re-read the store.
                    Err(RecvError::Lagged(_)) => {
                        for tx in map.values() {
                            tx.send_modify(|_| {});
                        }
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        hub
    }

    fn watch(&self, run_id: &str) -> RunWatch {
        let receiver = match self.watchers.lock() {
            Ok(mut map) => map
                .entry(run_id.to_string())
                .or_insert_with(|| watch::channel(0).0)
                .subscribe(),
            // A poisoned map cannot route wake-ups; the follower still polls on heartbeats.
            Err(_) => watch::channel(0).1,
        };
        self.followers.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("tether_event_followers").increment(1.0);
        RunWatch {
            run_id: run_id.to_string(),
            receiver,
            hub: self.clone(),
        }
    }

    /// Streams open right now.
    pub fn follower_count(&self) -> i64 {
        self.followers.load(Ordering::Relaxed)
    }
}

/// One follower's subscription; dropping it forgets the run once nobody follows it.
struct RunWatch {
    run_id: String,
    receiver: watch::Receiver<i64>,
    hub: EventHub,
}

impl Drop for RunWatch {
    fn drop(&mut self) {
        self.hub.followers.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("tether_event_followers").decrement(1.0);
        if let Ok(mut map) = self.hub.watchers.lock() {
            // This receiver is still counted: it is dropped after this body runs.
            if map
                .get(&self.run_id)
                .is_some_and(|tx| tx.receiver_count() <= 1)
            {
                map.remove(&self.run_id);
            }
        }
    }
}

/// What a follower sends next.
enum Frame {
    Stored(EventRecord),
    Heartbeat(Box<RunRecord>, i64),
}

struct Follower {
    state: AppState,
    run_id: String,
    after: i64,
    follow: bool,
    watch: RunWatch,
    next_heartbeat: Instant,
    done: bool,
}

impl Follower {
    async fn heartbeat(&mut self) -> Option<Vec<Frame>> {
        self.next_heartbeat = Instant::now() + self.state.config.sse_heartbeat;
        let run = self.state.store.get_run(&self.run_id).await.ok()??;
        let now = self.state.store.now().await.ok()?;
        Some(vec![Frame::Heartbeat(Box::new(run), now)])
    }

    /// The next frames to send, or `None` when the stream is over.
    async fn next_frames(&mut self) -> Option<Vec<Frame>> {
        loop {
            if self.done {
                return None;
            }
            if self.follow && Instant::now() >= self.next_heartbeat {
                return self.heartbeat().await;
            }
            // Mark the current signal seen before reading, so one that lands during the read
            // wakes the next wait instead of being lost.
            self.watch.receiver.borrow_and_update();
            let events = match self
                .state
                .store
                .events_after(&self.run_id, self.after, PAGE)
                .await
            {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(error = %e, run_id = %self.run_id, "event read failed");
                    if !self.follow {
                        return None;
                    }
                    Vec::new()
                }
            };
            if !events.is_empty() {
                let mut frames = Vec::with_capacity(events.len());
                for event in events {
                    self.after = event.seq;
                    let end = event.kind == EventKind::End;
                    frames.push(Frame::Stored(event));
                    if end {
                        self.done = true;
                        break;
                    }
                }
                return Some(frames);
            }
            if !self.follow {
                return None;
            }
            tokio::select! {
                _ = self.state.shutdown.cancelled() => return None,
                _ = tokio::time::sleep_until(self.next_heartbeat) => {}
                changed = self.watch.receiver.changed() => {
                    if changed.is_err() {
                        // The hub is gone (shutting down): keep going on heartbeats alone.
                        tokio::time::sleep_until(self.next_heartbeat).await;
                    }
                }
            }
        }
    }

    fn into_stream(self) -> impl Stream<Item = Frame> + Send {
        stream::unfold(self, |mut follower| async move {
            let frames = follower.next_frames().await?;
            Some((stream::iter(frames), follower))
        })
        .flatten()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    after: Option<i64>,
    follow: Option<bool>,
}

fn wants_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/x-ndjson"))
}

fn last_event_id(headers: &HeaderMap) -> ApiResult<Option<i64>> {
    match headers.get("last-event-id") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|seq| *seq >= 0)
            .map(Some)
            .ok_or_else(|| {
                ApiError::invalid("invalid_field", "Last-Event-ID: must be an event seq")
            }),
    }
}

fn frame_json(frame: &Frame, state: &AppState) -> String {
    let view = match frame {
        Frame::Stored(e) => event_view(e),
        Frame::Heartbeat(run, now) => heartbeat_view(run, &state.config, *now),
    };
    serde_json::to_string(&view).unwrap_or_else(|_| "{}".into())
}

/// `GET /v1/runs/{id}/events`: SSE, or NDJSON with `Accept: application/x-ndjson`.
#[utoipa::path(get, path = "/v1/runs/{id}/events",
    params(("after" = Option<i64>, Query, description = "resume after this seq (or the Last-Event-ID header)"),
           ("follow" = Option<bool>, Query, description = "keep following (default: SSE yes, NDJSON no)")),
    responses((status = 200, description = "text/event-stream, or application/x-ndjson with that Accept header", body = tether_api::EventView),
              (status = 404, body = tether_api::ErrorBody)))]
pub async fn run_events(
    State(state): State<AppState>,
    ApiPath(run_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<EventsQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if state.store.get_run(&run_id).await?.is_none() {
        return Err(ApiError::RunNotFound);
    }
    let ndjson = wants_ndjson(&headers);
    let after = match (last_event_id(&headers)?, query.after) {
        (Some(seq), _) => seq,
        (None, Some(seq)) if seq >= 0 => seq,
        (None, Some(_)) => {
            return Err(ApiError::invalid(
                "invalid_field",
                "after: must be an event seq",
            ))
        }
        (None, None) => 0,
    };
    let follow = query.follow.unwrap_or(!ndjson);
    metrics::counter!(crate::metrics::SSE_CONNECTIONS,
        "format" => if ndjson { "ndjson" } else { "sse" })
    .increment(1);
    let follower = Follower {
        watch: state.hub.watch(&run_id),
        state: state.clone(),
        run_id,
        after,
        follow,
        // The first heartbeat goes out at once, so a follower sees status and queue position
        // before anything else happens.
        next_heartbeat: Instant::now(),
        done: false,
    };
    let frames = follower.into_stream();
    let mut response = if ndjson {
        let lines = frames.map(move |frame| {
            let mut line = frame_json(&frame, &state);
            line.push('\n');
            Ok::<_, Infallible>(Bytes::from(line))
        });
        (
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            axum::body::Body::from_stream(lines),
        )
            .into_response()
    } else {
        let events = frames.map(move |frame| {
            let data = frame_json(&frame, &state);
            let event = match &frame {
                Frame::Stored(e) => Event::default()
                    .id(e.seq.to_string())
                    .event(e.kind.as_str())
                    .data(data),
                Frame::Heartbeat(..) => Event::default().event("heartbeat").data(data),
            };
            Ok::<_, Infallible>(event)
        });
        Sse::new(events).into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}
