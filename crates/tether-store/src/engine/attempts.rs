//! The worker's calls on an attempt, each fenced by it: start, output, finish; and the batched
//! forms of start and finish, one transaction for many.

use tether_domain::machine::{AttemptOutcome, Command};
use tether_domain::time::reported_at;
use tether_domain::{ErrorCode, RunStatus};

use super::work::Committed;
use super::{claims, Answer, Ending, Work};
use super::{end_attempt, must_lock, push_status, reload, transition_error};
use crate::driver::{Driver, DriverTx, Lock, RunChange};
use crate::{
    new_output, AppendOutcome, AttemptFinish, AttemptReports, AttemptStart, ClaimLimits, EventBody,
    FinishReport, OutputChunk, OutputStream, RunRecord, StatusBody, StoreError, StoreResult,
};

pub(super) async fn start_one<D: Driver>(
    d: &D,
    run_id: &str,
    attempt: u32,
    worker_id: &str,
) -> StoreResult<RunRecord> {
    let mut work = Work::begin(d).await?;
    let answer = start_in(&mut work, run_id, attempt, worker_id, 0).await?;
    let run = answer.resolve(&mut work).await?;
    work.commit(d).await?;
    Ok(run)
}

pub(super) async fn finish_one<D: Driver>(
    d: &D,
    run_id: &str,
    attempt: u32,
    worker_id: &str,
    report: &FinishReport,
) -> StoreResult<RunRecord> {
    let mut work = Work::begin(d).await?;
    let answer = finish_in(&mut work, run_id, attempt, worker_id, report, 0).await?;
    let run = answer.resolve(&mut work).await?;
    work.commit(d).await?;
    Ok(run)
}

/// Many starts in one transaction, each judged as [`start_one`] would judge it alone.
pub(super) async fn start_many<D: Driver>(
    d: &D,
    worker_id: &str,
    items: &[AttemptStart],
) -> StoreResult<Vec<StoreResult<RunRecord>>> {
    in_one_transaction(d, worker_id, items.iter().map(Call::Start).collect()).await
}

/// Many finishes in one transaction, each judged as [`finish_one`] would judge it alone.
pub(super) async fn finish_many<D: Driver>(
    d: &D,
    worker_id: &str,
    items: &[AttemptFinish],
) -> StoreResult<Vec<StoreResult<RunRecord>>> {
    in_one_transaction(d, worker_id, items.iter().map(Call::Finish).collect()).await
}

/// One worker call's reports and its claim in one transaction: the worker's row first (the
/// lock order every writer keeps: worker, lanes, runs by `seq`), then the starts and the
/// finishes as [`in_one_transaction`] judges them, then the claim, which sees the room the
/// finishes freed. One `BEGIN`/`COMMIT` for all three where there were three.
pub(super) async fn report<D: Driver>(
    d: &D,
    worker_id: &str,
    starts: &[AttemptStart],
    finishes: &[AttemptFinish],
    claim: Option<&ClaimLimits>,
    received: std::time::Instant,
) -> StoreResult<AttemptReports> {
    let mut work = Work::begin(d).await?;
    // How long the call waited for its transaction (a connection, the writer, the worker's
    // row): its items happened that much longer before the transaction's clock.
    let waited = u64::try_from(received.elapsed().as_millis()).unwrap_or(u64::MAX);
    let worker = match claim {
        Some(_) => Some(claims::lock_worker(&mut work, worker_id).await?),
        None => None,
    };
    let calls: Vec<Call<'_>> = starts
        .iter()
        .map(Call::Start)
        .chain(finishes.iter().map(Call::Finish))
        .collect();
    let answers = calls_in(&mut work, worker_id, &calls, waited).await?;
    let answers = place_now(&mut work, answers).await?;
    let claimed = match (claim, worker) {
        (Some(limits), Some(Ok(worker))) => Some(Ok(claims::claim_in(
            &mut work, worker_id, worker, limits,
        )
        .await?)),
        (_, Some(Err(refused))) => Some(Err(refused)),
        _ => None,
    };
    let done = work.commit(d).await?;
    let mut answers = after_commit(answers, &done)?;
    let claimed = match claimed {
        Some(Ok(claims)) => Some(Ok(claims.answer(&done)?)),
        Some(Err(refused)) => Some(Err(refused)),
        None => None,
    };
    let finishes = answers.split_off(starts.len());
    Ok(AttemptReports {
        starts: answers,
        finishes,
        claimed,
    })
}

/// One worker call on one attempt, as a batch carries it.
enum Call<'a> {
    Start(&'a AttemptStart),
    Finish(&'a AttemptFinish),
}

impl Call<'_> {
    fn run_id(&self) -> &str {
        match self {
            Call::Start(r) => &r.run_id,
            Call::Finish(f) => &f.run_id,
        }
    }
}

/// The calls in order, in one transaction, with their runs locked and loaded up front in
/// one statement (in `seq` order, as every multi-run writer locks); one answer per call. The
/// writes of all the calls go out together, a statement per kind.
async fn in_one_transaction<D: Driver>(
    d: &D,
    worker_id: &str,
    calls: Vec<Call<'_>>,
) -> StoreResult<Vec<StoreResult<RunRecord>>> {
    let mut work = Work::begin(d).await?;
    let answers = calls_in(&mut work, worker_id, &calls, 0).await?;
    let answers = place_now(&mut work, answers).await?;
    let done = work.commit(d).await?;
    after_commit(answers, &done)
}

/// The calls judged in order inside the caller's transaction, their runs locked and loaded
/// up front in one statement; their answers wait for [`place_now`] and [`after_commit`].
/// `waited`: how long the call waited for the transaction, added to each item's `ago_ms`.
async fn calls_in<T: DriverTx>(
    work: &mut Work<T>,
    worker_id: &str,
    calls: &[Call<'_>],
    waited: u64,
) -> StoreResult<Vec<StoreResult<Answer>>> {
    let ids: Vec<&str> = calls.iter().map(Call::run_id).collect();
    work.load(&ids, Lock::Wait).await?;
    let mut answers = Vec::with_capacity(calls.len());
    for call in calls {
        let answer = match call {
            Call::Start(s) => {
                let ago_ms = s.ago_ms.saturating_add(waited);
                start_in(work, &s.run_id, s.attempt, worker_id, ago_ms).await
            }
            Call::Finish(f) => {
                let ago_ms = f.ago_ms.saturating_add(waited);
                finish_in(work, &f.run_id, f.attempt, worker_id, &f.report, ago_ms).await
            }
        };
        answers.push(per_item(answer)?);
    }
    Ok(answers)
}

/// Answers that need a read inside the transaction (a run back in the queue is answered with
/// its place) are all resolved now; otherwise they wait for the commit's rows, which saves the
/// store a statement.
async fn place_now<T: DriverTx>(
    work: &mut Work<T>,
    answers: Vec<StoreResult<Answer>>,
) -> StoreResult<Vec<StoreResult<Answer>>> {
    if !answers
        .iter()
        .any(|a| a.as_ref().is_ok_and(Answer::needs_place))
    {
        return Ok(answers);
    }
    let mut placed = Vec::with_capacity(answers.len());
    for answer in answers {
        placed.push(match answer {
            Ok(answer) => Ok(Answer::Now(Box::new(answer.resolve(work).await?))),
            Err(refused) => Err(refused),
        });
    }
    Ok(placed)
}

fn after_commit(
    answers: Vec<StoreResult<Answer>>,
    done: &Committed,
) -> StoreResult<Vec<StoreResult<RunRecord>>> {
    answers
        .into_iter()
        .map(|answer| match answer {
            Ok(answer) => Ok(Ok(answer.after(done)?)),
            Err(refused) => Ok(Err(refused)),
        })
        .collect()
}

/// An item's own answer: a refusal judged before anything of it was queued (an unknown run,
/// a stale attempt, a terminal run) is that item's alone; anything else (the database failed)
/// fails the whole batch, which then writes nothing.
fn per_item(result: StoreResult<Answer>) -> StoreResult<StoreResult<Answer>> {
    match result {
        Err(StoreError::NotFound | StoreError::StaleAttempt | StoreError::Terminal) | Ok(_) => {
            Ok(result)
        }
        Err(e) => Err(e),
    }
}

async fn start_in<T: DriverTx>(
    work: &mut Work<T>,
    run_id: &str,
    attempt: u32,
    worker_id: &str,
    ago_ms: u64,
) -> StoreResult<Answer> {
    let loaded = must_lock(work, run_id).await?;
    let transition = loaded
        .run
        .state()
        .apply(&Command::Start {
            attempt,
            worker_id: worker_id.to_string(),
        })
        .map_err(transition_error)?;
    if loaded.run.status == RunStatus::Running {
        // The worker retried a start whose answer it lost: already done.
        return Ok(Answer::Now(Box::new(loaded.run)));
    }
    // Never before the claim; never before the run existed, whatever a worker says.
    let floor = loaded.run.claimed_at.unwrap_or(loaded.run.created_at);
    let at = reported_at(work.now(), ago_ms, floor);
    let change = RunChange::Start {
        status: transition.next.status,
        at,
    };
    let ticket = work.write(&loaded, change).await?;
    work.stamp_attempt_started(run_id, attempt, at);
    let status = StatusBody::plain(RunStatus::Running, attempt);
    push_status(work, run_id, status)?;
    Ok(Answer::Written {
        ticket,
        to_pending: false,
    })
}

async fn finish_in<T: DriverTx>(
    work: &mut Work<T>,
    run_id: &str,
    attempt: u32,
    worker_id: &str,
    report: &FinishReport,
    ago_ms: u64,
) -> StoreResult<Answer> {
    let loaded = must_lock(work, run_id).await?;
    let transition = loaded
        .run
        .state()
        .apply(&Command::Finish {
            attempt,
            worker_id: worker_id.to_string(),
            outcome: report.outcome,
        })
        .map_err(transition_error)?;
    match transition.decision {
        Some(decision) => {
            let ending = Ending {
                exit_code: report.exit_code,
                error_message: report.error_message.as_deref(),
                ago_ms,
            };
            let ticket = end_attempt(work, &loaded, decision, ending).await?;
            Ok(Answer::Written {
                ticket,
                to_pending: decision.run_status() == RunStatus::Pending,
            })
        }
        None => Ok(Answer::Now(Box::new(loaded.run))),
    }
}

pub(super) async fn append_output<D: Driver>(
    d: &D,
    run_id: &str,
    attempt: u32,
    worker_id: &str,
    chunks: &[OutputChunk],
) -> StoreResult<AppendOutcome> {
    let mut work = Work::begin(d).await?;
    // Locked: concurrent appends count the output limit one after another.
    let loaded = must_lock(&mut work, run_id).await?;
    loaded
        .run
        .state()
        .apply(&Command::Touch {
            attempt,
            worker_id: worker_id.to_string(),
        })
        .map_err(transition_error)?;
    let stored_before = work.tx().await?.attempt_offsets(run_id, attempt).await?;
    let fresh =
        new_output(chunks, stored_before).map_err(|expected| StoreError::OutputGap { expected })?;
    let limit = loaded.run.spec.output_limit_bytes.max(0);
    let mut total = loaded.output_bytes;
    let mut offsets = stored_before;
    let mut last_seq = loaded.run.last_event_seq;
    let mut limit_reached = false;
    for (stream, data) in fresh {
        let room = usize::try_from(limit - total).unwrap_or(0);
        let (data, cut) = if data.len() > room {
            (&data[..room], true)
        } else {
            (data, false)
        };
        if !data.is_empty() {
            let body = EventBody::Log { stream };
            last_seq = work.push(run_id, attempt, body, Some(data))?;
            let n = data.len() as i64;
            total += n;
            offsets.add(stream, n);
        }
        if cut {
            limit_reached = true;
            break;
        }
    }
    let stdout = offsets.stdout - stored_before.stdout;
    let stderr = offsets.stderr - stored_before.stderr;
    if stdout + stderr > 0 {
        work.write(&loaded, RunChange::Output { stdout, stderr })
            .await?;
        work.tx()
            .await?
            .set_attempt_offsets(run_id, attempt, offsets)
            .await?;
    }
    if !limit_reached {
        work.commit(d).await?;
        return Ok(AppendOutcome::Accepted { last_seq, offsets });
    }
    // The note is not counted against the limit: it is Tether speaking, not the command.
    let note = format!("[tether] output limit of {limit} bytes reached; the run was stopped\n");
    let body = EventBody::Log {
        stream: OutputStream::Stderr,
    };
    work.push(run_id, attempt, body, Some(note.as_bytes()))?;
    let transition = loaded
        .run
        .state()
        .apply(&Command::Finish {
            attempt,
            worker_id: worker_id.to_string(),
            outcome: AttemptOutcome::Failed {
                error_code: ErrorCode::OutputLimit,
            },
        })
        .map_err(transition_error)?;
    if let Some(decision) = transition.decision {
        let message = format!("output limit of {limit} bytes reached");
        let ending = Ending {
            exit_code: None,
            error_message: Some(&message),
            ago_ms: 0,
        };
        // The output write above moved no status or attempt: the guard still holds.
        end_attempt(&mut work, &loaded, decision, ending).await?;
    }
    let run = reload(&mut work, run_id).await?;
    work.commit(d).await?;
    Ok(AppendOutcome::LimitReached { run: Box::new(run) })
}
