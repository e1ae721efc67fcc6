//! What the supervisor tells the server about one attempt, behind a small trait so that
//! supervision can be tested without a server.

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use tether_api::{
    AppendLogRequest, ClientError, FinishRequest, LogChunkWire, StartRequest, TetherClient,
};
use tether_domain::{ErrorCode, RunStatus};

/// Which pipe a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

impl OutputStream {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }
}

/// One piece of output as read: a line (with its `\n`), or a partial line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub stream: OutputStream,
    /// Milliseconds since the epoch, by this worker's clock, when it was read.
    pub ts_ms: i64,
    pub data: Bytes,
    /// Where in its stream (of this attempt) it begins, in bytes; set by the uploader, so a
    /// batch sent again after a lost answer is recognised and stored once.
    pub offset: Option<i64>,
}

/// How an attempt ended, as `finish` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub status: RunStatus,
    pub error_code: Option<ErrorCode>,
    pub exit_code: Option<i32>,
    pub error_message: Option<String>,
}

/// The server's answer to a log upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendAck {
    /// The output limit was reached and the server already ended the run.
    pub stop: bool,
    /// Nothing was stored: the batch began past what the server has of the attempt's
    /// output (`409 output_gap`). Send it again from these offsets (stdout, stderr).
    pub resend_from: Option<(i64, i64)>,
}

/// Why a report was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// The attempt is no longer ours (`409 stale_attempt`, or the run or worker is unknown):
    /// stop it and report nothing more.
    #[error("the attempt is no longer current")]
    Stale,
    /// The server could not be reached or could not take it now; the same report may succeed
    /// later.
    #[error("transient: {0}")]
    Transient(String),
    /// Refused for another reason; sending it again would be refused again.
    #[error("refused: {0}")]
    Refused(String),
}

/// Reports one attempt's life to whoever tracks it (the server, or a fake in tests).
#[async_trait]
pub trait AttemptReporter: Send + Sync + 'static {
    /// The process started, with this pid.
    async fn start(&self, run_id: &str, attempt: u32, pid: u32) -> Result<(), ReportError>;
    /// Output, in the order it was read.
    async fn append(
        &self,
        run_id: &str,
        attempt: u32,
        chunks: &[OutputChunk],
    ) -> Result<AppendAck, ReportError>;
    /// The attempt ended.
    async fn finish(&self, run_id: &str, attempt: u32, finish: &Finish) -> Result<(), ReportError>;
}

/// Reports over HTTP, as one registered worker.
#[derive(Debug, Clone)]
pub struct HttpReporter {
    client: TetherClient,
    worker_id: String,
}

impl HttpReporter {
    pub fn new(client: TetherClient, worker_id: String) -> HttpReporter {
        HttpReporter { client, worker_id }
    }
}

/// Sorts a client error into what the supervisor can act on.
pub fn classify(err: ClientError) -> ReportError {
    if err.is_retryable() {
        return ReportError::Transient(err.to_string());
    }
    // 404: the run or this worker is unknown to the server, so the attempt is not ours either.
    if matches!(err.status(), Some(409 | 404)) {
        return ReportError::Stale;
    }
    ReportError::Refused(err.to_string())
}

#[async_trait]
impl AttemptReporter for HttpReporter {
    async fn start(&self, run_id: &str, attempt: u32, pid: u32) -> Result<(), ReportError> {
        let request = StartRequest {
            worker_id: self.worker_id.clone(),
            pid: Some(pid),
        };
        self.client
            .start_attempt(run_id, attempt, &request)
            .await
            .map(drop)
            .map_err(classify)
    }

    async fn append(
        &self,
        run_id: &str,
        attempt: u32,
        chunks: &[OutputChunk],
    ) -> Result<AppendAck, ReportError> {
        let engine = base64::engine::general_purpose::STANDARD;
        let request = AppendLogRequest {
            worker_id: self.worker_id.clone(),
            chunks: chunks
                .iter()
                .map(|c| LogChunkWire {
                    stream: c.stream.as_str().to_string(),
                    ts: c.ts_ms,
                    data: engine.encode(&c.data),
                    offset: c.offset,
                })
                .collect(),
        };
        match self.client.append_logs(run_id, attempt, &request).await {
            Ok(resp) => Ok(AppendAck {
                stop: resp.stop,
                resend_from: None,
            }),
            Err(ClientError::OutputGap { expected }) => Ok(AppendAck {
                stop: false,
                resend_from: Some((expected.stdout, expected.stderr)),
            }),
            Err(err) => Err(classify(err)),
        }
    }

    async fn finish(&self, run_id: &str, attempt: u32, finish: &Finish) -> Result<(), ReportError> {
        let request = FinishRequest {
            worker_id: self.worker_id.clone(),
            status: finish.status,
            error_code: finish.error_code,
            exit_code: finish.exit_code,
            error_message: finish.error_message.clone(),
        };
        self.client
            .finish_attempt(run_id, attempt, &request)
            .await
            .map(drop)
            .map_err(classify)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, code: &str) -> ClientError {
        ClientError::Api {
            status,
            code: code.into(),
            message: "m".into(),
            retry_after: None,
        }
    }

    #[test]
    fn client_errors_sort_into_what_the_supervisor_does() {
        assert_eq!(classify(api(409, "stale_attempt")), ReportError::Stale);
        assert_eq!(classify(api(404, "unknown_worker")), ReportError::Stale);
        assert!(matches!(
            classify(api(503, "store_unavailable")),
            ReportError::Transient(_)
        ));
        assert!(matches!(
            classify(ClientError::Transport("refused".into())),
            ReportError::Transient(_)
        ));
        assert!(matches!(
            classify(api(400, "invalid_field")),
            ReportError::Refused(_)
        ));
    }
}
