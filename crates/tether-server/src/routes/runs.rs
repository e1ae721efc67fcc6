//! Client calls on runs: submit, read, list, cancel, logs.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream;
use serde::Deserialize;
use tether_api::{BatchSubmitResponse, RunList, RunView, SubmitRequest};
use tether_domain::{RunSpec, RunStatus};
use tether_store::{
    Admission, AdmissionPolicy, BatchAdmission, BatchRefusal, CreatedRun, EventKind, RunFilter,
    RunRecord,
};

use crate::admission::{admission_policy, retry_after, Capacity};

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::views::run_view;
use crate::AppState;

/// `POST /v1/runs`.
#[utoipa::path(post, path = "/v1/runs", request_body = SubmitRequest,
    responses((status = 202, body = RunView), (status = 400, body = tether_api::ErrorBody),
              (status = 422, body = tether_api::ErrorBody), (status = 409, body = tether_api::ErrorBody),
              (status = 503, body = tether_api::ErrorBody, description = "the lane rejects when full and has no room now; see Retry-After")))]
pub async fn create_run(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<SubmitRequest>,
) -> ApiResult<(StatusCode, Json<RunView>)> {
    let (spec, policy) = resolve_submission(&state, request).await?;
    // Admit-or-refuse is decided in the store, in the transaction that accepts the run; with
    // a claim waiting here, that transaction also claims for it.
    let taken = state.waiting_claims.take_for([spec.lane.as_str()]);
    let (admission, claimed) = match &taken {
        Some(taken) => {
            state
                .store
                .admit_run_and_claim(&spec, &policy, &taken.hand_off())
                .await?
        }
        None => (state.store.admit_run(&spec, &policy).await?, Vec::new()),
    };
    if let Some(taken) = taken {
        taken.deliver(&state.store, claimed).await;
    }
    let created = match admission {
        Admission::Accepted(created) => created,
        Admission::LaneFull => return Err(lane_full(&state, spec.lane).await),
        Admission::NeverFits => return Err(never_fits(&spec)),
    };
    count_created(&created);
    // A new run's liveness is judged at its own creation stamp; one resubmitted under its key
    // needs the store's clock.
    let now = if created.created {
        created.run.created_at
    } else {
        state.store.now().await?
    };
    // No `waiting_reason` here: reading every worker and lane on each submission would cost
    // the hot path more than the answer is worth; `GET /v1/runs/{id}` says why a run waits.
    Ok((
        StatusCode::ACCEPTED,
        Json(run_view(&created.run, None, &state.config, now)),
    ))
}

/// The most submissions one batch may hold.
pub const MAX_BATCH: usize = 1_000;

/// The body of a batch as read: entries are decoded one by one, so a bad one is named by its
/// index.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatch {
    runs: Vec<serde_json::Value>,
}

/// `POST /v1/runs/batch`: many submissions in one transaction. Each is validated and admitted
/// as `POST /v1/runs` would (idempotency keys included); all are accepted or none, and a
/// refusal names the entry (`error.index`) and, for a full `reject` lane, the lane.
#[utoipa::path(post, path = "/v1/runs/batch", request_body = tether_api::BatchSubmitRequest,
    responses((status = 202, body = tether_api::BatchSubmitResponse),
              (status = 400, body = tether_api::ErrorBody), (status = 409, body = tether_api::ErrorBody),
              (status = 422, body = tether_api::ErrorBody, description = "an entry is invalid; `error.index` names it"),
              (status = 503, body = tether_api::ErrorBody, description = "a reject lane has no room for the whole batch; see Retry-After")))]
pub async fn create_runs(
    State(state): State<AppState>,
    ApiJson(batch): ApiJson<RawBatch>,
) -> ApiResult<(StatusCode, Json<BatchSubmitResponse>)> {
    if batch.runs.is_empty() || batch.runs.len() > MAX_BATCH {
        return Err(ApiError::invalid(
            "invalid_field",
            format!("runs: must hold 1 to {MAX_BATCH} submissions"),
        ));
    }
    let mut entries = Vec::with_capacity(batch.runs.len());
    for (index, raw) in batch.runs.into_iter().enumerate() {
        let entry = async {
            let request: SubmitRequest = serde_json::from_value(raw)
                .map_err(|e| ApiError::invalid("invalid_field", e.to_string()))?;
            resolve_submission(&state, request).await
        };
        entries.push(entry.await.map_err(|e| e.in_batch(index))?);
    }
    let taken = state
        .waiting_claims
        .take_for(entries.iter().map(|(spec, _)| spec.lane.as_str()));
    let (admission, claimed) = match &taken {
        Some(taken) => {
            state
                .store
                .admit_runs_and_claim(&entries, &taken.hand_off())
                .await?
        }
        None => (state.store.admit_runs(&entries).await?, Vec::new()),
    };
    if let Some(taken) = taken {
        taken.deliver(&state.store, claimed).await;
    }
    let created = match admission {
        BatchAdmission::Accepted(created) => created,
        BatchAdmission::Refused { index, refusal } => {
            let error = match refusal {
                BatchRefusal::LaneFull { lane } => lane_full(&state, lane).await,
                BatchRefusal::NeverFits => never_fits(&entries[index].0),
                BatchRefusal::IdempotencyConflict { run_id } => {
                    ApiError::IdempotencyConflict { run_id }
                }
            };
            return Err(error.in_batch(index));
        }
    };
    let now = state.store.now().await?;
    let runs = created
        .iter()
        .map(|c| {
            count_created(c);
            run_view(&c.run, None, &state.config, now)
        })
        .collect();
    Ok((StatusCode::ACCEPTED, Json(BatchSubmitResponse { runs })))
}

/// A submission with its lane's and the server's defaults resolved and its endpoints checked,
/// and the policy its lane admits it under.
async fn resolve_submission(
    state: &AppState,
    request: SubmitRequest,
) -> ApiResult<(RunSpec, AdmissionPolicy)> {
    let lane_name = request
        .lane
        .as_deref()
        .unwrap_or(tether_domain::config::DEFAULT_LANE);
    let lane = state.config.lanes.lane(lane_name);
    let spec = request.resolve(lane.as_ref(), &state.config.submit_defaults())?;
    crate::dispatch::check_run_endpoints(state, &spec.endpoints).await?;
    let policy = admission_policy(state, &lane.unwrap_or_default());
    Ok((spec, policy))
}

fn count_created(created: &CreatedRun) {
    if created.created {
        metrics::counter!(crate::metrics::RUNS_CREATED, "lane" => created.run.spec.lane.clone())
            .increment(1);
    }
}

/// A `reject` lane without room: `503` with a `Retry-After` from what the lane runs (or the
/// store's own error, should reading that fail).
async fn lane_full(state: &AppState, lane: String) -> ApiError {
    crate::metrics::run_refused(&lane, "full");
    match retry_after(state, &lane).await {
        Ok(retry_after_s) => ApiError::ResourcesExhausted {
            retry_after_s,
            lane,
        },
        Err(e) => e.into(),
    }
}

fn never_fits(spec: &RunSpec) -> ApiError {
    crate::metrics::run_refused(&spec.lane, "never_fits");
    ApiError::NeverFits {
        needs: format!(
            "it needs {} cpus and {} MB",
            spec.resources.cpus, spec.resources.memory_mb
        ),
        lane: spec.lane.clone(),
    }
}

/// Why a pending run waits, read fresh (lists read capacity once for the whole page).
async fn waiting_reason(state: &AppState, run: &RunRecord) -> ApiResult<Option<String>> {
    if run.status != RunStatus::Pending {
        return Ok(None);
    }
    let capacity = Capacity::read(state).await?;
    Ok(capacity.waiting_reason(run, state.config.lanes.lane(&run.spec.lane).as_ref()))
}

/// `GET /v1/runs/{id}`: the run with its attempt history.
#[utoipa::path(get, path = "/v1/runs/{id}",
    responses((status = 200, body = RunView), (status = 404, body = tether_api::ErrorBody)))]
pub async fn get_run(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<RunView>> {
    let run = state
        .store
        .get_run(&id)
        .await?
        .ok_or(ApiError::RunNotFound)?;
    let attempts = state.store.list_attempts(&id).await?;
    let now = state.store.now().await?;
    let mut view = run_view(&run, Some(&attempts), &state.config, now);
    view.waiting_reason = waiting_reason(&state, &run).await?;
    Ok(Json(view))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only runs with this status (`pending` includes legacy `queued`).
    status: Option<String>,
    /// Only runs of this lane.
    lane: Option<String>,
    /// 1 to 500; default 50.
    limit: Option<u32>,
    /// A previous page's `next_cursor`.
    cursor: Option<String>,
    /// `key=value`: runs with that label; `key`: runs with that label set.
    label: Option<String>,
    /// Runs whose id starts with this, or whose command contains it (case-insensitive).
    q: Option<String>,
    /// Runs whose id starts with this (how the CLI takes a run-id prefix).
    id_prefix: Option<String>,
}

/// The characters a run id is made of; a prefix with any other cannot match one.
fn is_id_prefix(text: &str) -> bool {
    text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// How many runs one answer reads at most while filtering by label or search: a rare match
/// in a long history costs several short pages, never one unbounded request.
const SEARCH_SCAN: usize = 5_000;
/// Runs read from the store per round while filtering.
const SEARCH_READ_CHUNK: u32 = 500;

/// The `label` and `q` filters, applied to runs the store has already narrowed.
struct RunMatch {
    label: Option<(String, Option<String>)>,
    q: Option<String>,
}

impl RunMatch {
    fn from_query(query: &ListQuery) -> Option<RunMatch> {
        let label =
            query
                .label
                .as_deref()
                .filter(|l| !l.is_empty())
                .map(|l| match l.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (l.to_string(), None),
                });
        let q = query
            .q
            .as_deref()
            .map(str::trim)
            .filter(|q| !q.is_empty())
            .map(str::to_lowercase);
        (label.is_some() || q.is_some()).then_some(RunMatch { label, q })
    }

    fn matches(&self, run: &RunRecord) -> bool {
        let label_ok = self.label.as_ref().is_none_or(|(key, value)| {
            run.spec
                .labels
                .get(key)
                .is_some_and(|v| value.as_ref().is_none_or(|want| v == want))
        });
        let q_ok = self.q.as_ref().is_none_or(|q| {
            run.id.to_lowercase().starts_with(q.as_str())
                || run
                    .spec
                    .command
                    .join(" ")
                    .to_lowercase()
                    .contains(q.as_str())
        });
        label_ok && q_ok
    }
}

/// `GET /v1/runs?status=&lane=&label=&q=&id_prefix=&limit=&cursor=`: newest first. With `label` or `q`, a
/// page may hold fewer than `limit` runs and still carry a `next_cursor`: the server reads at
/// most a few thousand runs per answer.
#[utoipa::path(get, path = "/v1/runs", params(ListQuery),
    responses((status = 200, body = RunList), (status = 422, body = tether_api::ErrorBody)))]
pub async fn list_runs(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Json<RunList>> {
    let status = match query.status.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            ApiError::invalid(
                "invalid_field",
                format!("status: `{s}` is not a run status"),
            )
        })?),
        None => None,
    };
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid(
            "invalid_field",
            "limit: must be 1 to 500",
        ));
    }
    let id_prefix = query.id_prefix.clone().filter(|p| !p.is_empty());
    if let Some(prefix) = &id_prefix {
        if !is_id_prefix(prefix) {
            return Err(ApiError::invalid(
                "invalid_field",
                "id_prefix: must be up to 64 letters, digits, `-` or `_`",
            ));
        }
    }
    let filter = RunFilter {
        status,
        lane: query.lane.clone().filter(|l| !l.is_empty()),
        limit,
        cursor: query.cursor.clone().filter(|c| !c.is_empty()),
        id_prefix,
    };
    let matcher = RunMatch::from_query(&query);
    let (records, next_cursor) = read_bounded_page(&state, filter, matcher.as_ref()).await?;
    let now = state.store.now().await?;
    let capacity = if records.iter().any(|r| r.status == RunStatus::Pending) {
        Some(Capacity::read(&state).await?)
    } else {
        None
    };
    let runs = records
        .iter()
        .map(|r| {
            let mut view = run_view(r, None, &state.config, now);
            view.waiting_reason = capacity
                .as_ref()
                .and_then(|c| c.waiting_reason(r, state.config.lanes.lane(&r.spec.lane).as_ref()));
            view
        })
        .collect();
    Ok(Json(RunList { runs, next_cursor }))
}

/// Runs read from the store per round while filling a list page: bounds what one page holds
/// in memory before the byte budget is checked.
const LIST_READ_CHUNK: u32 = 50;
/// The most a list page carries, roughly, in bytes of run specs; past it the page ends early
/// and its cursor resumes where it stopped. At least one run is always returned.
pub(crate) const LIST_BYTE_BUDGET: usize = 2 * 1024 * 1024;

/// What a run adds to a list answer, roughly: its variable-size fields plus a fixed share.
fn approx_view_bytes(run: &RunRecord) -> usize {
    let spec = &run.spec;
    let map = |m: &std::collections::BTreeMap<String, String>| {
        m.iter().map(|(k, v)| k.len() + v.len() + 6).sum::<usize>()
    };
    1024 + spec.command.iter().map(|a| a.len() + 3).sum::<usize>()
        + map(&spec.env)
        + map(&spec.labels)
        + map(&spec.endpoints)
        + run.error_message.as_ref().map_or(0, String::len)
}

/// Up to `filter.limit` runs, newest first, read in chunks and cut at `LIST_BYTE_BUDGET`, with
/// the cursor of what follows. With a `matcher` (label, search) only matching runs are kept,
/// and at most [`SEARCH_SCAN`] runs are read: the page may come back short, with a cursor.
async fn read_bounded_page(
    state: &AppState,
    mut filter: RunFilter,
    matcher: Option<&RunMatch>,
) -> ApiResult<(Vec<RunRecord>, Option<String>)> {
    let wanted = filter.limit as usize;
    let mut runs: Vec<RunRecord> = Vec::new();
    let mut bytes = 0usize;
    let mut scanned = 0usize;
    // The seq of the last run read and judged: a cursor here resumes just after it.
    let mut consumed: Option<i64> = None;
    loop {
        filter.limit = match matcher {
            None => LIST_READ_CHUNK.min((wanted - runs.len()) as u32),
            // Most of what a filter reads is not kept: read wider.
            Some(_) => SEARCH_READ_CHUNK,
        };
        let page = state.store.list_runs(&filter).await?;
        for run in page.runs {
            let seq = run.seq;
            if matcher.is_none_or(|m| m.matches(&run)) {
                let size = approx_view_bytes(&run);
                if !runs.is_empty() && bytes + size > LIST_BYTE_BUDGET {
                    return Ok((runs, consumed.map(|s| s.to_string())));
                }
                bytes += size;
                runs.push(run);
            }
            consumed = Some(seq);
            scanned += 1;
            if matcher.is_some() && (runs.len() == wanted || scanned >= SEARCH_SCAN) {
                return Ok((runs, Some(seq.to_string())));
            }
        }
        match page.next_cursor {
            Some(cursor) if runs.len() < wanted => filter.cursor = Some(cursor),
            Some(cursor) => return Ok((runs, Some(cursor))),
            None => return Ok((runs, None)),
        }
    }
}

/// `POST /v1/runs/{id}/cancel`: immediate for a pending run; delivered to the worker at its
/// next heartbeat otherwise.
#[utoipa::path(post, path = "/v1/runs/{id}/cancel",
    responses((status = 202, body = RunView), (status = 404, body = tether_api::ErrorBody),
              (status = 409, body = tether_api::ErrorBody)))]
pub async fn cancel_run(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<RunView>)> {
    let run = state.store.request_cancel(&id).await?;
    let now = state.store.now().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(run_view(&run, None, &state.config, now)),
    ))
}

/// Log events read from the store per page while streaming `/logs`.
const LOG_PAGE: u32 = 256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// An attempt number, or `all`; the current (last) attempt when absent.
    attempt: Option<String>,
}

/// Which attempts' output `/logs` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttemptSelection {
    One(u32),
    /// Every attempt, each introduced by a separator line.
    All,
}

impl AttemptSelection {
    fn parse(raw: Option<&str>, current: u32) -> ApiResult<AttemptSelection> {
        match raw {
            None | Some("last") => Ok(AttemptSelection::One(current)),
            Some("all") => Ok(AttemptSelection::All),
            Some(n) => n
                .parse::<u32>()
                .ok()
                .filter(|n| *n >= 1)
                .map(AttemptSelection::One)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "invalid_field",
                        "attempt: must be an attempt number (1, 2, ...), `last` or `all`",
                    )
                }),
        }
    }
}

/// The line that opens an attempt's output under `?attempt=all`. It starts on a line of its
/// own even when the previous attempt's output did not end with a newline.
fn attempt_separator(attempt: u32, max_attempts: u32, after_partial_line: bool) -> Vec<u8> {
    let lead = if after_partial_line { "\n" } else { "" };
    format!("{lead}==> [tether] attempt {attempt}/{max_attempts} <==\n").into_bytes()
}

/// `GET /v1/runs/{id}/logs`: one attempt's output, byte for byte (the current attempt unless
/// `?attempt=N`; `?attempt=all`: every attempt, each after a separator line), streamed page by
/// page so a large log never sits in memory whole.
#[utoipa::path(get, path = "/v1/runs/{id}/logs",
    params(("attempt" = Option<String>, Query, description = "an attempt number, `last` (the default) or `all` (every attempt, each after a `==> [tether] attempt N/M <==` line)")),
    responses((status = 200, description = "the output so far, byte for byte", content_type = "text/plain"),
              (status = 404, body = tether_api::ErrorBody), (status = 422, body = tether_api::ErrorBody)))]
pub async fn run_logs(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<LogsQuery>,
) -> ApiResult<Response> {
    let run = state
        .store
        .get_run(&id)
        .await?
        .ok_or(ApiError::RunNotFound)?;
    let selection = AttemptSelection::parse(query.attempt.as_deref(), run.attempt)?;
    // Released attempts did not count: the budget is what the run may reach.
    let max_attempts = run.spec.max_attempts + run.released_attempts;
    let store = state.store.clone();
    // (the seq to read after, the attempt whose output was last written, whether it ended
    // mid-line)
    let start = Some((0i64, 0u32, false));
    let pages = stream::unfold(start, move |cursor| {
        let store = store.clone();
        let id = id.clone();
        async move {
            let (after, mut last_attempt, mut partial) = cursor?;
            match store.events_after(&id, after, LOG_PAGE).await {
                Ok(events) if events.is_empty() => None,
                Ok(events) => {
                    let next = events.last().map_or(after, |e| e.seq);
                    let mut bytes = Vec::new();
                    for e in events {
                        let wanted = match selection {
                            AttemptSelection::One(n) => e.attempt == n,
                            AttemptSelection::All => e.attempt >= 1,
                        };
                        // Under `all`, an attempt's `attempt` event opens its section, so an
                        // attempt that printed nothing still shows.
                        let opens = e.kind == EventKind::Attempt;
                        if !wanted || !(e.kind == EventKind::Log || opens) {
                            continue;
                        }
                        if selection == AttemptSelection::All && e.attempt != last_attempt {
                            bytes.extend(attempt_separator(e.attempt, max_attempts, partial));
                            last_attempt = e.attempt;
                        }
                        if let Some(data) = e.data {
                            if let Some(last) = data.last() {
                                partial = *last != b'\n';
                            }
                            bytes.extend(data);
                        }
                    }
                    Some((
                        Ok::<_, std::io::Error>(bytes),
                        Some((next, last_attempt, partial)),
                    ))
                }
                Err(e) => Some((Err(std::io::Error::other(e)), None)),
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(pages),
    )
        .into_response())
}
