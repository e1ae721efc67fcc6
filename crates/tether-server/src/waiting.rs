//! The claims waiting on this server for work, so a submission can hand its runs straight to
//! one of them: claimed in the submission's own transaction
//! ([`Store::admit_run_and_claim`](tether_store::Store::admit_run_and_claim)) and answered
//! to the waiting worker at once, instead of a commit, a signal, then a second transaction.
//! On an idle system that is most of what stands between a submission and its start.
//!
//! Invariant: a waiting claim is taken by at most one submission, and whatever a submission
//! claims for it reaches it or goes back. [`TakenClaim`] always answers (an empty answer
//! when it claimed nothing, or when dropped unanswered), and a claim that leaves after being
//! taken waits for that answer. Runs claimed for a claim that is gone (its worker hung up)
//! are handed back uncounted (`Store::release_runs`).
//!
//! Claims waiting on other servers are reached as before, by the store's signals.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tether_store::{ClaimLimits, ClaimedRun, HandOff, RunRef, SharedStore};
use tokio::sync::oneshot;

/// How many workers' lanes are remembered; past it the memory starts over (a worker whose
/// lanes are unknown is offered runs of every lane, and its claim takes what it serves).
const MAX_KNOWN_WORKERS: usize = 10_000;

/// The claims waiting on this server, oldest first.
#[derive(Debug, Default)]
pub struct WaitingClaims {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    queue: VecDeque<Entry>,
    /// Each worker's lanes, as registered here (empty: every lane).
    lanes: HashMap<String, Vec<String>>,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    worker_id: String,
    limits: ClaimLimits,
    answer: oneshot::Sender<Vec<ClaimedRun>>,
}

impl WaitingClaims {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The data stays consistent under every operation here: a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers the lanes a worker registered with.
    pub fn know_lanes(&self, worker_id: &str, lanes: &[String]) {
        let mut inner = self.lock();
        if inner.lanes.len() >= MAX_KNOWN_WORKERS {
            inner.lanes.clear();
        }
        inner.lanes.insert(worker_id.to_string(), lanes.to_vec());
    }

    /// Puts `worker_id`'s claim in line. It stays there until a submission takes it, or the
    /// returned [`Waiting`] leaves (or is dropped).
    pub fn enter(self: &Arc<Self>, worker_id: &str, limits: &ClaimLimits) -> Waiting {
        let (answer, rx) = oneshot::channel();
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        inner.queue.push_back(Entry {
            id,
            worker_id: worker_id.to_string(),
            limits: limits.clone(),
            answer,
        });
        Waiting {
            claims: self.clone(),
            id,
            rx,
        }
    }

    /// The oldest waiting claim whose worker may serve one of `lanes`, taken out of line.
    pub fn take_for<'a>(
        &self,
        lanes: impl IntoIterator<Item = &'a str> + Clone,
    ) -> Option<TakenClaim> {
        let mut inner = self.lock();
        let serves = |entry: &Entry| match inner.lanes.get(&entry.worker_id) {
            Some(served) if !served.is_empty() => lanes
                .clone()
                .into_iter()
                .any(|lane| served.iter().any(|s| s == lane)),
            _ => true,
        };
        let at = inner
            .queue
            .iter()
            .position(|e| !e.answer.is_closed() && serves(e))?;
        let entry = inner.queue.remove(at)?;
        Some(TakenClaim {
            worker_id: entry.worker_id,
            limits: entry.limits,
            answer: Some(entry.answer),
        })
    }

    fn leave(&self, id: u64) -> bool {
        let mut inner = self.lock();
        match inner.queue.iter().position(|e| e.id == id) {
            Some(at) => {
                inner.queue.remove(at);
                true
            }
            None => false,
        }
    }

    /// How many claims wait now.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A claim in line. Dropped, it leaves the line.
#[derive(Debug)]
pub struct Waiting {
    claims: Arc<WaitingClaims>,
    id: u64,
    rx: oneshot::Receiver<Vec<ClaimedRun>>,
}

impl Waiting {
    /// What a submission handed it (maybe nothing: it claimed nothing that fits). Cancel-safe;
    /// once it has answered, the claim is out of line.
    pub async fn handed(&mut self) -> Vec<ClaimedRun> {
        (&mut self.rx).await.unwrap_or_default()
    }

    /// Leaves the line: nothing if no submission had taken it, else what the submission
    /// that took it hands it, once it has.
    pub async fn leave(mut self) -> Vec<ClaimedRun> {
        if self.claims.leave(self.id) {
            return Vec::new();
        }
        (&mut self.rx).await.unwrap_or_default()
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.claims.leave(self.id);
    }
}

/// A waiting claim a submission took: it claims in the submission's transaction, then
/// answers with [`TakenClaim::deliver`].
#[derive(Debug)]
pub struct TakenClaim {
    worker_id: String,
    limits: ClaimLimits,
    answer: Option<oneshot::Sender<Vec<ClaimedRun>>>,
}

impl TakenClaim {
    pub fn hand_off(&self) -> HandOff<'_> {
        HandOff {
            worker_id: &self.worker_id,
            limits: &self.limits,
        }
    }

    /// Answers the waiting claim with what was claimed for it. If it is gone, the runs go
    /// back to pending, uncounted, for the next claim.
    pub async fn deliver(mut self, store: &SharedStore, claimed: Vec<ClaimedRun>) {
        let Some(answer) = self.answer.take() else {
            return;
        };
        let count = claimed.len();
        let Err(claimed) = answer.send(claimed) else {
            crate::metrics::runs_handed_off(count);
            return;
        };
        if claimed.is_empty() {
            return;
        }
        let refs: Vec<RunRef> = claimed
            .iter()
            .map(|c| RunRef {
                run_id: c.run.id.clone(),
                attempt: c.attempt,
            })
            .collect();
        match store.release_runs(&self.worker_id, &refs).await {
            Ok(_) => tracing::debug!(worker_id = %self.worker_id, runs = refs.len(),
                "the claim left before its runs reached it; handed back"),
            // The worker's heartbeat does not name them: the reaper takes them back.
            Err(e) => tracing::warn!(worker_id = %self.worker_id, error = %e,
                "could not hand back runs claimed for a claim that left"),
        }
    }
}

impl Drop for TakenClaim {
    fn drop(&mut self) {
        // Not delivered (the submission failed): the claim goes on waiting.
        if let Some(answer) = self.answer.take() {
            let _ = answer.send(Vec::new());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_claim_serving_the_lane_is_taken_once() {
        let claims = Arc::new(WaitingClaims::default());
        claims.know_lanes("gpu-only", &["gpu".to_string()]);
        let _gpu = claims.enter("gpu-only", &ClaimLimits::default());
        let _first = claims.enter("w1", &ClaimLimits::default());
        let _second = claims.enter("w2", &ClaimLimits::default());
        let taken = claims.take_for(["default"]).unwrap();
        assert_eq!(taken.hand_off().worker_id, "w1");
        let taken = claims.take_for(["default"]).unwrap();
        assert_eq!(taken.hand_off().worker_id, "w2");
        assert!(claims.take_for(["default"]).is_none());
        assert_eq!(
            claims.take_for(["gpu"]).unwrap().hand_off().worker_id,
            "gpu-only"
        );
    }

    #[tokio::test]
    async fn a_claim_that_leaves_untaken_gets_nothing_and_is_out_of_line() {
        let claims = Arc::new(WaitingClaims::default());
        let waiting = claims.enter("w1", &ClaimLimits::default());
        assert!(waiting.leave().await.is_empty());
        assert!(claims.take_for(["default"]).is_none());
        // Dropped is the same as left.
        drop(claims.enter("w1", &ClaimLimits::default()));
        assert!(claims.is_empty());
    }

    #[tokio::test]
    async fn runs_claimed_for_a_claim_that_left_go_back_uncounted() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store: SharedStore =
            Arc::new(tether_store_sqlite::SqliteStore::open(&url).await.unwrap());
        let worker = store
            .register_worker(&tether_store::NewWorker {
                secret_hash: None,
                name: "w".into(),
                capacity: tether_domain::Resources {
                    cpus: 1.0,
                    memory_mb: 1024,
                },
                lanes: Vec::new(),
                labels: Default::default(),
            })
            .await
            .unwrap();
        let claims = Arc::new(WaitingClaims::default());
        let waiting = claims.enter(&worker.id, &ClaimLimits::default());
        let taken = claims.take_for(["default"]).unwrap();
        // The worker hung up while the submission claimed for it.
        drop(waiting);
        let spec = tether_domain::Submission {
            command: vec!["true".into()],
            ..Default::default()
        }
        .resolve(
            Some(&tether_domain::LanePolicy::default()),
            &tether_domain::SubmitDefaults::default(),
            "fingerprint".into(),
        )
        .unwrap();
        let policy = tether_store::AdmissionPolicy {
            reject_when_full: false,
            max_concurrency: None,
            worker_fresh_ms: 60_000,
        };
        let (_, claimed) = store
            .admit_run_and_claim(&spec, &policy, &taken.hand_off())
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        let run_id = claimed[0].run.id.clone();
        taken.deliver(&store, claimed).await;
        let run = store.get_run(&run_id).await.unwrap().unwrap();
        assert_eq!(run.status, tether_domain::RunStatus::Pending);
        assert_eq!(
            run.released_attempts, 1,
            "the attempt it never got does not count"
        );
    }

    #[tokio::test]
    async fn a_taken_claim_always_gets_an_answer() {
        let claims = Arc::new(WaitingClaims::default());
        let mut waiting = claims.enter("w1", &ClaimLimits::default());
        let taken = claims.take_for(["default"]).unwrap();
        // The submission failed: dropped unanswered, the claim hears "nothing" and goes on.
        drop(taken);
        assert!(waiting.handed().await.is_empty());

        // Leaving after being taken waits for the taker's answer.
        let waiting = claims.enter("w1", &ClaimLimits::default());
        let taken = claims.take_for(["default"]).unwrap();
        let leave = tokio::spawn(waiting.leave());
        tokio::task::yield_now().await;
        assert!(!leave.is_finished());
        drop(taken);
        assert!(leave.await.unwrap().is_empty());
    }
}
