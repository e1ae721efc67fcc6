//! Worker calls about one attempt: start, log append, finish. Each names its attempt, and the
//! store refuses any attempt that is no longer current (`409 stale_attempt`).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use tether_api::{
    AppendLogRequest, AppendLogResponse, AttemptReportsRequest, AttemptReportsResponse,
    FinishRequest, ReportAnswer, RunView, StartRequest, StreamOffsets, MAX_ATTEMPT_REPORTS,
};
use tether_domain::{AttemptOutcome, ErrorCode, RunStatus};
use tether_store::{
    AppendOutcome, AttemptFinish, AttemptStart, FinishReport, OutputChunk, OutputStream, RunRecord,
    StoreError, StoreResult,
};

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath};
use crate::views::run_view;
use crate::AppState;

/// `POST /v1/runs/{id}/attempts/{attempt}/start`.
#[utoipa::path(post, path = "/v1/runs/{id}/attempts/{attempt}/start", request_body = tether_api::StartRequest,
    responses((status = 200, body = tether_api::RunView), (status = 409, body = tether_api::ErrorBody, description = "stale_attempt")))]
pub async fn start(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath((run_id, attempt)): ApiPath<(String, u32)>,
    ApiJson(request): ApiJson<StartRequest>,
) -> ApiResult<Json<RunView>> {
    state
        .worker_secrets
        .verify(&state.store, &request.worker_id, &headers)
        .await?;
    let run = state
        .store
        .start_attempt(&run_id, attempt, &request.worker_id)
        .await?;
    crate::metrics::run_started(&run);
    let now = state.store.now().await?;
    Ok(Json(run_view(&run, None, &state.config, now)))
}

/// The largest `log` event: adjacent output of one stream is joined up to this size.
const MAX_EVENT_BYTES: usize = 64 * 1024;

/// Joins adjacent chunks of the same stream, so a command printing many short lines costs a
/// few events per batch instead of one per line. Order across streams is kept: only neighbours
/// are joined, and only where the second begins where the first ends (or neither names an
/// offset).
fn coalesce(chunks: Vec<OutputChunk>) -> Vec<OutputChunk> {
    let mut out: Vec<OutputChunk> = Vec::with_capacity(chunks.len().min(64));
    for chunk in chunks {
        match out.last_mut() {
            Some(last)
                if last.stream == chunk.stream
                    && last.data.len() + chunk.data.len() <= MAX_EVENT_BYTES
                    && last.offset.map(|o| o + last.data.len() as i64) == chunk.offset =>
            {
                last.data.extend_from_slice(&chunk.data);
            }
            _ => out.push(chunk),
        }
    }
    out
}

/// `POST /v1/runs/{id}/attempts/{attempt}/logs`.
#[utoipa::path(post, path = "/v1/runs/{id}/attempts/{attempt}/logs", request_body = tether_api::AppendLogRequest,
    responses((status = 200, body = tether_api::AppendLogResponse), (status = 409, body = tether_api::ErrorBody, description = "stale_attempt, or output_gap (with expected_offsets: resend from there)")))]
pub async fn append_logs(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath((run_id, attempt)): ApiPath<(String, u32)>,
    ApiJson(request): ApiJson<AppendLogRequest>,
) -> ApiResult<Json<AppendLogResponse>> {
    state
        .worker_secrets
        .verify(&state.store, &request.worker_id, &headers)
        .await?;
    let engine = base64::engine::general_purpose::STANDARD;
    let mut chunks = Vec::with_capacity(request.chunks.len());
    for chunk in request.chunks {
        let stream = OutputStream::parse(&chunk.stream).ok_or_else(|| {
            ApiError::invalid("invalid_field", "chunks.stream: must be stdout or stderr")
        })?;
        let data = engine
            .decode(chunk.data.as_bytes())
            .map_err(|_| ApiError::invalid("invalid_field", "chunks.data: must be base64"))?;
        if chunk.offset.is_some_and(|o| o < 0) {
            return Err(ApiError::invalid(
                "invalid_field",
                "chunks.offset: must be 0 or more",
            ));
        }
        chunks.push(OutputChunk {
            stream,
            ts: chunk.ts,
            data,
            offset: chunk.offset,
        });
    }
    let chunks = coalesce(chunks);
    let outcome = state
        .store
        .append_output(&run_id, attempt, &request.worker_id, &chunks)
        .await?;
    Ok(Json(match outcome {
        AppendOutcome::Accepted { last_seq, offsets } => AppendLogResponse {
            last_seq,
            stop: false,
            offsets: StreamOffsets {
                stdout: offsets.stdout,
                stderr: offsets.stderr,
            },
        },
        AppendOutcome::LimitReached { run } => {
            crate::metrics::attempt_ended(&run, RunStatus::Failed, Some(ErrorCode::OutputLimit));
            AppendLogResponse {
                last_seq: run.last_event_seq,
                stop: true,
                offsets: StreamOffsets::default(),
            }
        }
    }))
}

/// The outcome a finish call reports, checked: only terminal statuses, with fitting codes.
fn outcome(status: RunStatus, error_code: Option<ErrorCode>) -> ApiResult<AttemptOutcome> {
    Ok(match status {
        RunStatus::Succeeded => AttemptOutcome::Succeeded,
        RunStatus::Failed => AttemptOutcome::Failed {
            error_code: error_code.unwrap_or(ErrorCode::ExitNonzero),
        },
        RunStatus::TimedOut => AttemptOutcome::TimedOut {
            error_code: error_code.unwrap_or(ErrorCode::Timeout),
        },
        RunStatus::Cancelled => AttemptOutcome::Cancelled,
        other => {
            return Err(ApiError::invalid(
                "invalid_field",
                format!("status: an attempt cannot finish as `{other}`"),
            ))
        }
    })
}

/// `POST /v1/runs/{id}/attempts/{attempt}/finish`.
#[utoipa::path(post, path = "/v1/runs/{id}/attempts/{attempt}/finish", request_body = tether_api::FinishRequest,
    responses((status = 200, body = tether_api::RunView), (status = 409, body = tether_api::ErrorBody, description = "stale_attempt")))]
pub async fn finish(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath((run_id, attempt)): ApiPath<(String, u32)>,
    ApiJson(request): ApiJson<FinishRequest>,
) -> ApiResult<Json<RunView>> {
    state
        .worker_secrets
        .verify(&state.store, &request.worker_id, &headers)
        .await?;
    let report = FinishReport {
        outcome: outcome(request.status, request.error_code)?,
        exit_code: request.exit_code,
        error_message: request.error_message.clone(),
    };
    let run = state
        .store
        .finish_attempt(&run_id, attempt, &request.worker_id, &report)
        .await?;
    count_finish(&run, &report);
    let now = state.store.now().await?;
    Ok(Json(run_view(&run, None, &state.config, now)))
}

fn count_finish(run: &RunRecord, report: &FinishReport) {
    let error_code = match report.outcome {
        AttemptOutcome::Succeeded => None,
        AttemptOutcome::Failed { error_code } | AttemptOutcome::TimedOut { error_code } => {
            Some(error_code)
        }
        AttemptOutcome::Cancelled => Some(ErrorCode::Cancelled),
    };
    crate::metrics::attempt_ended(run, report.outcome.status(), error_code);
}

/// `POST /v1/workers/{id}/attempts`: several starts and finishes in one call, then, if asked,
/// a claim for the room the finishes freed, all in one store transaction where the store can.
/// Each item is fenced as the single-attempt calls are and answered alone: a stale attempt is
/// that item's `409 stale_attempt`, and the rest still land.
#[utoipa::path(post, path = "/v1/workers/{id}/attempts", request_body = tether_api::AttemptReportsRequest,
    responses((status = 200, body = tether_api::AttemptReportsResponse, description = "one answer per item, in order; refused items carry their own error"),
        (status = 404, body = tether_api::ErrorBody, description = "unknown_worker"),
        (status = 422, body = tether_api::ErrorBody, description = "more than 1,000 items")))]
pub async fn report_attempts(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(worker_id): ApiPath<String>,
    ApiJson(request): ApiJson<AttemptReportsRequest>,
) -> ApiResult<Response> {
    // The items' `ago_ms` count from the call; its wait for the store counts from here.
    let received = std::time::Instant::now();
    state
        .worker_secrets
        .verify(&state.store, &worker_id, &headers)
        .await?;
    if request.starts.len() + request.finishes.len() > MAX_ATTEMPT_REPORTS {
        return Err(ApiError::invalid(
            "invalid_field",
            format!("at most {MAX_ATTEMPT_REPORTS} starts and finishes in one call"),
        ));
    }
    let mut store_failed = false;

    let refs: Vec<AttemptStart> = request
        .starts
        .iter()
        .map(|s| AttemptStart {
            run_id: s.run_id.clone(),
            attempt: s.attempt,
            ago_ms: s.ago_ms.unwrap_or(0),
        })
        .collect();

    // A finish that says something no attempt can end with is refused alone, like the rest.
    let mut finishes: Vec<Option<ReportAnswer>> = Vec::with_capacity(request.finishes.len());
    let mut valid: Vec<AttemptFinish> = Vec::with_capacity(request.finishes.len());
    for f in request.finishes {
        match outcome(f.status, f.error_code) {
            Ok(outcome) => {
                finishes.push(None);
                valid.push(AttemptFinish {
                    run_id: f.run_id,
                    attempt: f.attempt,
                    report: FinishReport {
                        outcome,
                        exit_code: f.exit_code,
                        error_message: f.error_message,
                    },
                    ago_ms: f.ago_ms.unwrap_or(0),
                });
            }
            Err(err) => finishes.push(Some(ReportAnswer {
                run_id: f.run_id,
                attempt: f.attempt,
                run_status: None,
                error: Some(err.refusal()),
            })),
        }
    }

    // Starts, finishes and the claim for the room they free, in one store transaction: a
    // refused item or claim is its own answer, a store failure fails the call (nothing
    // written) and the worker reports again.
    let limits = request
        .claim
        .map(|claim| super::workers::claim_limits(&state, claim.max_runs, claim.reserve))
        .transpose()?;
    if refs.is_empty() && valid.is_empty() && limits.is_none() {
        return Ok(Json(AttemptReportsResponse {
            starts: Vec::new(),
            finishes: finishes.into_iter().flatten().collect(),
            assignments: Vec::new(),
        })
        .into_response());
    }
    let waited = std::time::Instant::now();
    let reports = state
        .store
        .report_attempts(&worker_id, &refs, &valid, limits.as_ref(), received)
        .await?;

    let starts = refs
        .into_iter()
        .zip(reports.starts)
        .map(|(r, result)| {
            if let Ok(run) = &result {
                crate::metrics::run_started(run);
            }
            answer(r.run_id, r.attempt, result, &mut store_failed)
        })
        .collect();
    let mut judged = valid
        .into_iter()
        .zip(reports.finishes)
        .map(|(item, result)| {
            if let Ok(run) = &result {
                count_finish(run, &item.report);
            }
            answer(item.run_id, item.attempt, result, &mut store_failed)
        });
    let finishes = finishes
        .into_iter()
        .map(|slot| slot.or_else(|| judged.next()))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ApiError::Internal("the store answered fewer finishes than asked".into()))?;

    let mut assignments = Vec::new();
    match reports.claimed {
        Some(Ok(claimed)) => {
            crate::metrics::claim_answered(waited.elapsed(), claimed.len());
            assignments = super::workers::assignments(&state, &worker_id, claimed).await;
        }
        Some(Err(err)) => {
            store_failed |= matches!(err, StoreError::Unavailable(_));
            tracing::warn!(worker_id, %err, "the claim riding on a report failed");
        }
        None => {}
    }
    let mut response = Json(AttemptReportsResponse {
        starts,
        finishes,
        assignments,
    })
    .into_response();
    if store_failed {
        // Seen by the store-health layer, as a 503 would be.
        response.extensions_mut().insert(crate::health::StoreFailed);
    }
    Ok(response)
}

fn answer(
    run_id: String,
    attempt: u32,
    result: StoreResult<RunRecord>,
    store_failed: &mut bool,
) -> ReportAnswer {
    match result {
        Ok(run) => ReportAnswer {
            run_id,
            attempt,
            run_status: Some(run.status),
            error: None,
        },
        Err(err) => {
            *store_failed |= matches!(err, StoreError::Unavailable(_));
            ReportAnswer {
                run_id,
                attempt,
                run_status: None,
                error: Some(ApiError::from(err).refusal()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(stream: OutputStream, data: &[u8]) -> OutputChunk {
        OutputChunk {
            stream,
            ts: 0,
            data: data.to_vec(),
            offset: None,
        }
    }

    #[test]
    fn neighbours_of_one_stream_are_joined_and_order_is_kept() {
        use OutputStream::{Stderr, Stdout};
        let joined = coalesce(vec![
            chunk(Stdout, b"a\n"),
            chunk(Stdout, b"b\n"),
            chunk(Stderr, b"c\n"),
            chunk(Stdout, b"d\n"),
        ]);
        let got: Vec<(OutputStream, &[u8])> = joined
            .iter()
            .map(|c| (c.stream, c.data.as_slice()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Stdout, &b"a\nb\n"[..]),
                (Stderr, &b"c\n"[..]),
                (Stdout, &b"d\n"[..])
            ]
        );
    }

    #[test]
    fn joined_events_stay_under_the_size_cap() {
        let line = vec![b'x'; 1000];
        let joined = coalesce(
            (0..200)
                .map(|_| chunk(OutputStream::Stdout, &line))
                .collect(),
        );
        assert!(joined.iter().all(|c| c.data.len() <= MAX_EVENT_BYTES));
        assert_eq!(joined.iter().map(|c| c.data.len()).sum::<usize>(), 200_000);
    }
}
