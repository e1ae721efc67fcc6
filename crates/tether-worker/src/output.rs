//! A command's output, from its pipes to the server: two pipe readers feed one ordered queue
//! (so the order between stdout and stderr is the order the worker read them in), one uploader
//! drains it in batches.
//!
//! The queue is bounded by bytes, not just by chunks: a command that prints faster than the
//! server takes it blocks on its own pipe, and the worker's memory stays bounded.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::control::AttemptStats;
use crate::reporter::{AppendAck, AttemptReporter, OutputChunk, OutputStream, ReportError};

/// The longest chunk: a longer line goes out in pieces.
pub const MAX_CHUNK: usize = 64 * 1024;
/// A partial line (no `\n` yet) waits at most this long before it is sent as is.
pub const PARTIAL_FLUSH: Duration = Duration::from_millis(100);
/// An upload is sent once it holds this much output...
pub const BATCH_BYTES: usize = 256 * 1024;
/// ...or this long after its first chunk was taken.
pub const BATCH_WINDOW: Duration = Duration::from_millis(100);
/// Output read but not yet uploaded, per attempt, at most.
pub const QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// Chunks queued, at most (bounds the bookkeeping of very short lines).
const QUEUE_CHUNKS: usize = 16 * 1024;
/// After the command exited, a pipe that stays silent this long is given up on: what still
/// holds it open escaped the process group.
pub const LINGER_AFTER_EXIT: Duration = Duration::from_secs(1);
const READ_SIZE: usize = 64 * 1024;
/// A pipe's buffer starts this small and doubles up to [`READ_SIZE`] as output comes: most
/// commands print little, and a 64 KiB buffer per pipe per run, freed at its end, makes the
/// allocator consolidate its heap on every run.
const FIRST_READ_SIZE: usize = 4 * 1024;

/// A chunk with its share of the queue's byte budget, returned when it is uploaded.
#[derive(Debug)]
pub struct Queued {
    chunk: OutputChunk,
    _permit: OwnedSemaphorePermit,
}

/// The sending side of an attempt's output queue; one clone per pipe.
#[derive(Debug, Clone)]
pub struct OutputQueue {
    tx: mpsc::Sender<Queued>,
    budget: Arc<Semaphore>,
}

pub fn output_queue() -> (OutputQueue, mpsc::Receiver<Queued>) {
    let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
    let budget = Arc::new(Semaphore::new(QUEUE_BYTES));
    (OutputQueue { tx, budget }, rx)
}

impl OutputQueue {
    /// Waits for room, then queues. `false`: the uploader is gone, stop reading.
    async fn push(&self, stream: OutputStream, ts_ms: i64, data: Bytes) -> bool {
        if data.is_empty() {
            return true;
        }
        let weight = data.len().min(QUEUE_BYTES) as u32;
        let Ok(permit) = self.budget.clone().acquire_many_owned(weight).await else {
            return false;
        };
        let chunk = OutputChunk {
            stream,
            ts_ms,
            data,
            offset: None,
        };
        self.tx
            .send(Queued {
                chunk,
                _permit: permit,
            })
            .await
            .is_ok()
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Reads one pipe to its end as raw bytes (never decoded: output that is not UTF-8 survives
/// exactly) and queues it line by line, each line with its `\n`. A partial line goes out after
/// [`PARTIAL_FLUSH`], at [`MAX_CHUNK`], or at the end. Once `exited` is cancelled (the command
/// is gone), a pipe silent for [`LINGER_AFTER_EXIT`] counts as ended.
pub async fn read_pipe<R>(
    mut pipe: R,
    stream: OutputStream,
    queue: OutputQueue,
    stats: Arc<AttemptStats>,
    exited: CancellationToken,
) where
    R: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(FIRST_READ_SIZE);
    // `buf[..scanned]` is known to hold no `\n`.
    let mut scanned = 0;
    let mut partial_since: Option<Instant> = None;
    let mut last_read_ms = now_ms();
    let mut exit_seen = false;
    loop {
        if buf.capacity() - buf.len() < FIRST_READ_SIZE {
            buf.reserve(buf.capacity().clamp(FIRST_READ_SIZE, READ_SIZE));
        }
        let flush_at = partial_since.map(|t| t + PARTIAL_FLUSH);
        tokio::select! {
            // Reading first: a partial line is only sent early when the pipe has nothing
            // more to give right now, never while the rest of the line is waiting in it.
            biased;
            read = pipe.read_buf(&mut buf) => match read {
                Ok(0) => break,
                Ok(n) => {
                    stats.record(stream, n);
                    last_read_ms = now_ms();
                    let mut cut_any = false;
                    loop {
                        let newline = buf[scanned..]
                            .iter()
                            .position(|b| *b == b'\n')
                            .map(|p| scanned + p + 1);
                        let cut = match newline {
                            Some(end) => end.min(MAX_CHUNK),
                            None if buf.len() >= MAX_CHUNK => MAX_CHUNK,
                            None => {
                                scanned = buf.len();
                                break;
                            }
                        };
                        let piece = buf.split_to(cut).freeze();
                        scanned = 0;
                        cut_any = true;
                        if !queue.push(stream, last_read_ms, piece).await {
                            return;
                        }
                    }
                    // The wait for a partial line starts when that line began arriving.
                    partial_since = match (buf.is_empty(), partial_since) {
                        (true, _) => None,
                        (false, Some(since)) if !cut_any => Some(since),
                        (false, _) => Some(Instant::now()),
                    };
                }
                Err(err) => {
                    tracing::debug!(stream = stream.as_str(), %err, "pipe read failed");
                    break;
                }
            },
            _ = sleep_until_maybe(flush_at), if flush_at.is_some() => {
                let piece = buf.split().freeze();
                scanned = 0;
                partial_since = None;
                if !queue.push(stream, last_read_ms, piece).await {
                    return;
                }
            }
            _ = exited.cancelled(), if !exit_seen => exit_seen = true,
            _ = tokio::time::sleep(LINGER_AFTER_EXIT), if exit_seen => {
                tracing::debug!(stream = stream.as_str(), "pipe still open after the command exited; giving up on it");
                break;
            }
        }
    }
    if !buf.is_empty() {
        queue.push(stream, last_read_ms, buf.split().freeze()).await;
    }
}

async fn sleep_until_maybe(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How the uploader stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadEnd {
    /// Every queued chunk was uploaded and the readers are done.
    Drained,
    /// The attempt is no longer current (`409`).
    Stale,
    /// The output limit was reached; the server already ended the run.
    Stop,
    /// Told to stop (`abort`).
    Aborted,
}

/// Joins adjacent chunks of one stream up to [`MAX_CHUNK`], so many short lines travel (and
/// are stored) as a few events. Only neighbours are joined: order across streams is kept.
pub fn join_neighbours(chunks: Vec<OutputChunk>) -> Vec<OutputChunk> {
    let mut out: Vec<(OutputStream, i64, BytesMut)> = Vec::new();
    for chunk in chunks {
        match out.last_mut() {
            Some((stream, _, data))
                if *stream == chunk.stream && data.len() + chunk.data.len() <= MAX_CHUNK =>
            {
                data.extend_from_slice(&chunk.data);
            }
            _ => out.push((chunk.stream, chunk.ts_ms, BytesMut::from(&chunk.data[..]))),
        }
    }
    out.into_iter()
        .map(|(stream, ts_ms, data)| OutputChunk {
            stream,
            ts_ms,
            data: data.freeze(),
            offset: None,
        })
        .collect()
}

/// Gives each chunk its offset in its stream, counting on from `next` (what the attempt has
/// handed the server so far, per stream), and moves `next` past the batch.
fn number(chunks: &mut [OutputChunk], next: &mut (i64, i64)) {
    for chunk in chunks {
        let at = match chunk.stream {
            OutputStream::Stdout => &mut next.0,
            OutputStream::Stderr => &mut next.1,
        };
        chunk.offset = Some(*at);
        *at += chunk.data.len() as i64;
    }
}

/// Uploads the queue in order, in batches of up to [`BATCH_BYTES`] or [`BATCH_WINDOW`].
/// Transient failures are retried with backoff, never dropped: the queue fills meanwhile and
/// holds the command back. Every chunk carries its offset in its stream, so a batch sent again
/// after a lost answer is stored once; a batch the server refuses as a gap (something before
/// it was never stored) is numbered again from where the server says and resent.
pub async fn upload(
    mut rx: mpsc::Receiver<Queued>,
    reporter: Arc<dyn AttemptReporter>,
    run_id: String,
    attempt: u32,
    abort: CancellationToken,
) -> UploadEnd {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    // Bytes of each stream (stdout, stderr) handed to the server so far.
    let mut next = (0_i64, 0_i64);
    loop {
        let first = tokio::select! {
            _ = abort.cancelled() => return UploadEnd::Aborted,
            next = rx.recv() => match next {
                Some(q) => q,
                None => return UploadEnd::Drained,
            },
        };
        let mut size = first.chunk.data.len();
        let mut batch = vec![first];
        let window = tokio::time::sleep(BATCH_WINDOW);
        tokio::pin!(window);
        while size < BATCH_BYTES {
            tokio::select! {
                biased;
                next = rx.recv() => match next {
                    Some(q) => {
                        size += q.chunk.data.len();
                        batch.push(q);
                    }
                    None => break,
                },
                _ = &mut window => break,
            }
        }
        let (chunks, permits): (Vec<OutputChunk>, Vec<OwnedSemaphorePermit>) =
            batch.into_iter().map(|q| (q.chunk, q._permit)).unzip();
        let mut chunks = join_neighbours(chunks);
        let batch_start = next;
        number(&mut chunks, &mut next);
        loop {
            let result = tokio::select! {
                _ = abort.cancelled() => return UploadEnd::Aborted,
                r = reporter.append(&run_id, attempt, &chunks) => r,
            };
            match result {
                Ok(ack) if ack.stop => return UploadEnd::Stop,
                Ok(AppendAck {
                    resend_from: Some(from),
                    ..
                }) => {
                    // Only a batch dropped after a refusal leaves a hole: say what is lost.
                    tracing::warn!(run_id, attempt, ?from, sent_from = ?batch_start,
                        "the server is missing output before this batch; resending from its offsets");
                    next = from;
                    number(&mut chunks, &mut next);
                    if from == batch_start {
                        // Nothing changed: a server that keeps refusing would loop for ever.
                        break;
                    }
                }
                Ok(_) => {
                    backoff.reset();
                    break;
                }
                Err(ReportError::Stale) => return UploadEnd::Stale,
                Err(ReportError::Transient(err)) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(run_id, attempt, %err, ?delay, "log upload failed; retrying");
                    tokio::select! {
                        _ = abort.cancelled() => return UploadEnd::Aborted,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(ReportError::Refused(err)) => {
                    // Sending the same batch again would be refused again; keep the rest.
                    tracing::error!(run_id, attempt, %err, bytes = size, "log upload refused; dropping this batch");
                    break;
                }
            }
        }
        // Only now is the room handed back to the readers.
        drop(permits);
    }
}
