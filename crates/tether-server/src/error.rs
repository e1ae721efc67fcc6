//! Every error the API can answer, and the one place each maps to an HTTP status and a stable
//! `code`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tether_api::{ErrorBody, ErrorDetail};
use tether_store::{BoxError, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    MalformedJson(String),
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("the request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// Tokens are off and the request named a host (or origin) that is not loopback: the
    /// mark of a DNS-rebinding page.
    #[error("this server serves loopback only: Host and Origin must name localhost or a loopback address")]
    ForbiddenHost,
    /// A worker call without the named worker's secret: one worker acting as another.
    #[error("this call does not carry the secret of the worker it names")]
    NotThisWorker,
    #[error("that method is not allowed on this path")]
    MethodNotAllowed,
    #[error("the request URI is too long")]
    UriTooLong,
    #[error("the request headers are too large")]
    HeadersTooLarge,
    #[error("no such run")]
    RunNotFound,
    #[error("no such route")]
    RouteNotFound,
    #[error("no such worker, or it has deregistered: register again")]
    UnknownWorker,
    #[error("that attempt is no longer current: the run was retried, ended or reassigned")]
    StaleAttempt,
    #[error("the run is already terminal")]
    Terminal,
    #[error("idempotency key already used by a different submission (run {run_id})")]
    IdempotencyConflict { run_id: String },
    #[error("lane `{lane}` has no room for this run now; retry after {retry_after_s} s")]
    ResourcesExhausted { lane: String, retry_after_s: u64 },
    #[error("no live worker serving lane `{lane}` could ever hold this run ({needs})")]
    NeverFits { lane: String, needs: String },
    /// An endpoint or pool that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A pool with nothing to hand out: no ready endpoint and no fallback.
    #[error("{0}")]
    NoReadyEndpoint(String),
    #[error("this append begins past what the attempt has stored (stdout {}, stderr {}): resend from there", expected.stdout, expected.stderr)]
    OutputGap { expected: tether_api::StreamOffsets },
    /// The store failed. The client gets the code and this generic sentence; the store's own
    /// text (SQL, addresses, driver errors) is the source, for the log only.
    #[error("the store is unavailable; retry shortly")]
    StoreUnavailable(#[source] StoreError),
    /// A bug or unreadable data: the cause is logged, never answered.
    #[error("internal error")]
    Internal(#[source] BoxError),
    /// An error about one entry of a batch submission: its status and code, its index.
    #[error("runs[{index}]: {error}")]
    InBatch { index: usize, error: Box<ApiError> },
}

impl ApiError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::Invalid {
            code,
            message: message.into(),
        }
    }

    /// An internal error, keeping `cause` for the log.
    pub fn internal(cause: impl Into<BoxError>) -> ApiError {
        ApiError::Internal(cause.into())
    }

    /// Did this answer fail for want of the store (also as one entry of a batch)? Such answers
    /// mark the store's health.
    pub fn is_store_failure(&self) -> bool {
        match self {
            ApiError::StoreUnavailable(_) => true,
            ApiError::InBatch { error, .. } => error.is_store_failure(),
            _ => false,
        }
    }

    /// This error, said of entry `index` of a batch.
    pub fn in_batch(self, index: usize) -> ApiError {
        ApiError::InBatch {
            index,
            error: Box::new(self),
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InBatch { error, .. } => error.status_and_code(),
            ApiError::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            ApiError::Invalid { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, code),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::ForbiddenHost => (StatusCode::FORBIDDEN, "forbidden_host"),
            ApiError::NotThisWorker => (StatusCode::FORBIDDEN, "not_this_worker"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::UriTooLong => (StatusCode::URI_TOO_LONG, "uri_too_long"),
            ApiError::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
            ),
            ApiError::RunNotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::RouteNotFound => (StatusCode::NOT_FOUND, "no_route"),
            ApiError::UnknownWorker => (StatusCode::NOT_FOUND, "unknown_worker"),
            ApiError::StaleAttempt => (StatusCode::CONFLICT, "stale_attempt"),
            ApiError::Terminal => (StatusCode::CONFLICT, "terminal"),
            ApiError::IdempotencyConflict { .. } => (StatusCode::CONFLICT, "idempotency_conflict"),
            ApiError::ResourcesExhausted { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "resources_exhausted")
            }
            ApiError::NeverFits { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "never_fits"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::NoReadyEndpoint(_) => (StatusCode::SERVICE_UNAVAILABLE, "no_ready_endpoint"),
            ApiError::OutputGap { .. } => (StatusCode::CONFLICT, "output_gap"),
            ApiError::StoreUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl ApiError {
    /// This error as the answer to one item of a worker's batch
    /// (`POST /v1/workers/{id}/attempts`): the status and code the single call would answer.
    pub fn refusal(&self) -> tether_api::ReportRefusal {
        let (status, code) = self.status_and_code();
        if matches!(self, ApiError::StaleAttempt) {
            metrics::counter!(crate::metrics::STALE_ATTEMPT_REFUSALS).increment(1);
        }
        tether_api::ReportRefusal {
            status: status.as_u16(),
            code: code.to_string(),
            message: self.to_string(),
        }
    }
}

impl From<tether_domain::ValidationError> for ApiError {
    fn from(e: tether_domain::ValidationError) -> ApiError {
        ApiError::invalid(e.code, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound => ApiError::RunNotFound,
            StoreError::UnknownWorker => ApiError::UnknownWorker,
            StoreError::StaleAttempt => ApiError::StaleAttempt,
            StoreError::Terminal => ApiError::Terminal,
            StoreError::IdempotencyConflict { run_id } => ApiError::IdempotencyConflict { run_id },
            StoreError::InvalidCursor => ApiError::invalid(
                "invalid_cursor",
                "the cursor is not one this server gave out",
            ),
            StoreError::OutputGap { expected } => ApiError::OutputGap {
                expected: tether_api::StreamOffsets {
                    stdout: expected.stdout,
                    stderr: expected.stderr,
                },
            },
            StoreError::InvalidInput(m) => ApiError::invalid("invalid_field", m),
            e @ StoreError::Unavailable(_) => ApiError::StoreUnavailable(e),
            e @ StoreError::Corrupt(_) => ApiError::Internal(Box::new(e)),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if matches!(self, ApiError::StaleAttempt) {
            metrics::counter!(crate::metrics::STALE_ATTEMPT_REFUSALS).increment(1);
        }
        let (retry_after, index) = match &self {
            ApiError::ResourcesExhausted { retry_after_s, .. } => (*retry_after_s, None),
            ApiError::InBatch { index, error } => match error.as_ref() {
                ApiError::ResourcesExhausted { retry_after_s, .. } => {
                    (*retry_after_s, Some(*index))
                }
                _ => (1, Some(*index)),
            },
            _ => (1, None),
        };
        // The whole chain goes to the log; the body below carries only this error's own
        // (generic, for server errors) message.
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(code, error = %source_chain(&self), "request failed");
        } else if status.is_server_error() {
            tracing::warn!(code, error = %source_chain(&self), "request failed");
        }
        let expected_offsets = match &self {
            ApiError::OutputGap { expected } => Some(*expected),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message: self.to_string(),
                index,
                expected_offsets,
            },
        };
        let mut response = (status, Json(body)).into_response();
        if self.is_store_failure() {
            // Seen by the store-health layer: this server could not reach its store.
            response.extensions_mut().insert(crate::health::StoreFailed);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// `error` and every source under it, as one line for the log: `a: b: c`. A source whose text
/// its parent already printed (errors that show their source in their own message) is not
/// printed twice.
pub fn source_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut next = error.source();
    while let Some(source) = next {
        let text = source.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        next = source.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_generic_and_the_log_line_has_the_whole_chain() {
        let driver = std::io::Error::other("relation \"runs\" does not exist");
        let error = ApiError::from(StoreError::unavailable_while("loading a run", driver));
        assert_eq!(error.to_string(), "the store is unavailable; retry shortly");
        let line = source_chain(&error);
        assert!(line.starts_with("the store is unavailable; retry shortly: "));
        assert!(line.contains("loading a run"), "{line}");
        // Printed once, though two errors of the chain show it.
        assert_eq!(line.matches("does not exist").count(), 1, "{line}");
    }

    #[test]
    fn a_store_failure_in_a_batch_is_still_a_store_failure() {
        let error = ApiError::from(StoreError::unavailable("down")).in_batch(3);
        assert!(error.is_store_failure());
        assert!(!ApiError::RunNotFound.in_batch(0).is_store_failure());
    }
}
