//! The endpoint transactions, written once over [`EndpointDriver`]: what each one reads, decides
//! and writes, in which order, and what it answers. A store supplies only the queries (its SQL,
//! its locks, its row decoding), each named for what it does, as River's `riverdriver` does.

use std::collections::BTreeMap;

use async_trait::async_trait;
use tether_domain::{Dispatch, Millis};

use super::{
    EndpointRecord, EndpointSaved, EndpointStore, NewEndpoint, NewPool, PoolRecord, PoolSource,
    ProbeClaim, ProbeOutcome,
};
use crate::{StoreError, StoreResult};

/// The queries the endpoint transactions are made of. Each method is one statement (or one
/// read), run in the transaction it is handed; none decides anything the next one depends on.
#[async_trait]
pub trait EndpointDriver: Send + Sync {
    /// A write transaction. Dropped without [`EndpointDriver::commit_endpoints`], it rolls back.
    type Tx: Send;

    /// Begins a write transaction and reads the store's clock once for all of it.
    async fn begin_endpoints(&self) -> StoreResult<(Self::Tx, Millis)>;

    async fn commit_endpoints(&self, tx: Self::Tx) -> StoreResult<()>;

    /// Inserts or updates the pool, stamped `now`. The conditional write: an update from
    /// `PoolSource::Config` lands only on a pool whose source is `config`.
    async fn pool_upsert_unless_set_by_api(
        &self,
        tx: &mut Self::Tx,
        pool: &NewPool,
        source: PoolSource,
        now: Millis,
    ) -> StoreResult<()>;

    async fn pool_get(&self, tx: &mut Self::Tx, name: &str) -> StoreResult<Option<PoolRecord>>;

    /// Every pool, by name, outside any transaction.
    async fn pool_list(&self) -> StoreResult<Vec<PoolRecord>>;

    /// The endpoint, locked until the transaction ends where the store has row locks, so
    /// concurrent registrations of one name apply one after another.
    async fn endpoint_get_for_update(
        &self,
        tx: &mut Self::Tx,
        name: &str,
    ) -> StoreResult<Option<EndpointRecord>>;

    async fn endpoint_get(
        &self,
        tx: &mut Self::Tx,
        name: &str,
    ) -> StoreResult<Option<EndpointRecord>>;

    /// Inserts the endpoint at revision 1, stamped `now`; `false` if one of that name exists.
    async fn endpoint_insert(
        &self,
        tx: &mut Self::Tx,
        endpoint: &NewEndpoint,
        now: Millis,
    ) -> StoreResult<bool>;

    /// Writes the endpoint's new definition, bumps its revision and clears its readiness
    /// stamps and probe claim, only if its revision is still `revision`; answers whether it
    /// did.
    async fn endpoint_redefine_if_revision(
        &self,
        tx: &mut Self::Tx,
        endpoint: &NewEndpoint,
        revision: i64,
        now: Millis,
    ) -> StoreResult<bool>;

    /// Deletes the endpoint; `false` if there was none.
    async fn endpoint_delete(&self, tx: &mut Self::Tx, name: &str) -> StoreResult<bool>;

    /// Every endpoint, by name, outside any transaction.
    async fn endpoint_list(&self) -> StoreResult<Vec<EndpointRecord>>;

    /// Stamps `probe_claimed_at = now` on up to `limit` `probed` endpoints with a readiness
    /// URL whose last claim is absent or at most `due_at_or_before`, least recently claimed
    /// first, and answers them as claims taken at `now`. Rows another transaction is claiming
    /// are skipped, not waited for, where the store can tell.
    async fn endpoint_claim_due_probes(
        &self,
        tx: &mut Self::Tx,
        now: Millis,
        due_at_or_before: Millis,
        limit: i64,
    ) -> StoreResult<Vec<ProbeClaim>>;

    /// Stamps `last_probe_at = now`, `last_ready_at = now` when `ready`, and `last_error`,
    /// only if the endpoint's revision and probe claim are still the claim's; answers whether
    /// it did.
    async fn endpoint_set_probe_result_if_claimed(
        &self,
        tx: &mut Self::Tx,
        claim: &ProbeClaim,
        ready: bool,
        error: Option<&str>,
        now: Millis,
    ) -> StoreResult<bool>;

    /// Sets the attempt's `endpoints` (JSON text) if it has none yet, the attempt is the run's
    /// current one, held by `worker_id` and in flight; answers whether it did.
    async fn attempt_set_dispatch_if_current(
        &self,
        tx: &mut Self::Tx,
        run_id: &str,
        attempt: u32,
        worker_id: &str,
        endpoints_json: &str,
    ) -> StoreResult<bool>;
}

#[async_trait]
impl<D: EndpointDriver> EndpointStore for D {
    async fn upsert_pool(&self, pool: &NewPool, source: PoolSource) -> StoreResult<PoolRecord> {
        let (mut tx, now) = self.begin_endpoints().await?;
        self.pool_upsert_unless_set_by_api(&mut tx, pool, source, now)
            .await?;
        let record = self
            .pool_get(&mut tx, &pool.name)
            .await?
            .ok_or_else(|| StoreError::unavailable("the pool vanished as it was written"))?;
        self.commit_endpoints(tx).await?;
        Ok(record)
    }

    async fn list_pools(&self) -> StoreResult<Vec<PoolRecord>> {
        self.pool_list().await
    }

    async fn upsert_endpoint(&self, endpoint: &NewEndpoint) -> StoreResult<EndpointSaved> {
        let (mut tx, now) = self.begin_endpoints().await?;
        if self.pool_get(&mut tx, &endpoint.pool).await?.is_none() {
            return Ok(EndpointSaved::UnknownPool);
        }
        let created = match self
            .endpoint_get_for_update(&mut tx, &endpoint.name)
            .await?
        {
            None => {
                if !self.endpoint_insert(&mut tx, endpoint, now).await? {
                    // Another server registered it between our read and our insert.
                    return Err(StoreError::unavailable(
                        "the endpoint was registered concurrently; retry",
                    ));
                }
                true
            }
            // The same definition: its stamp still vouches for it.
            Some(old) if old.is_defined_as(endpoint) => false,
            Some(old) => {
                // A new definition: the old stamp vouched for something else, and a probe
                // claimed for it must not land. Conditional on the revision read.
                if !self
                    .endpoint_redefine_if_revision(&mut tx, endpoint, old.revision, now)
                    .await?
                {
                    return Err(StoreError::unavailable(
                        "the endpoint changed underneath; retry",
                    ));
                }
                false
            }
        };
        let record = self
            .endpoint_get(&mut tx, &endpoint.name)
            .await?
            .ok_or_else(|| StoreError::unavailable("the endpoint vanished as it was written"))?;
        self.commit_endpoints(tx).await?;
        Ok(if created {
            EndpointSaved::Created(record)
        } else {
            EndpointSaved::Updated(record)
        })
    }

    async fn delete_endpoint(&self, name: &str) -> StoreResult<bool> {
        let (mut tx, _) = self.begin_endpoints().await?;
        let deleted = self.endpoint_delete(&mut tx, name).await?;
        self.commit_endpoints(tx).await?;
        Ok(deleted)
    }

    async fn list_endpoints(&self) -> StoreResult<Vec<EndpointRecord>> {
        self.endpoint_list().await
    }

    async fn claim_due_probes(
        &self,
        due_after_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<ProbeClaim>> {
        let (mut tx, now) = self.begin_endpoints().await?;
        // One conditional write claims every due endpoint: a claim younger than the interval,
        // by whichever server, makes an endpoint not due, so each is claimed once per interval.
        let mut claims = self
            .endpoint_claim_due_probes(
                &mut tx,
                now,
                now.saturating_sub(due_after_ms),
                i64::from(limit.max(1)),
            )
            .await?;
        self.commit_endpoints(tx).await?;
        claims.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        Ok(claims)
    }

    async fn record_probe(&self, claim: &ProbeClaim, outcome: &ProbeOutcome) -> StoreResult<bool> {
        let (mut tx, now) = self.begin_endpoints().await?;
        let (ready, error) = match outcome {
            ProbeOutcome::Ready => (true, None),
            ProbeOutcome::NotReady { error } => (false, Some(error.as_str())),
        };
        // Fenced by the claim: a slow probe whose claim another has since replaced, or of a
        // definition since changed, records nothing.
        let landed = self
            .endpoint_set_probe_result_if_claimed(&mut tx, claim, ready, error, now)
            .await?;
        self.commit_endpoints(tx).await?;
        Ok(landed)
    }

    async fn record_dispatch(
        &self,
        run_id: &str,
        attempt: u32,
        worker_id: &str,
        endpoints: &BTreeMap<String, Dispatch>,
    ) -> StoreResult<()> {
        let json = serde_json::to_string(endpoints)
            .map_err(|e| StoreError::corrupt_while("attempt endpoints", e))?;
        let (mut tx, _) = self.begin_endpoints().await?;
        // Written once, and only for the run's current attempt while its worker holds it.
        if !self
            .attempt_set_dispatch_if_current(&mut tx, run_id, attempt, worker_id, &json)
            .await?
        {
            return Err(StoreError::StaleAttempt);
        }
        self.commit_endpoints(tx).await
    }
}

#[cfg(test)]
mod tests {
    //! The decisions, against a scripted driver: what each answer is, and that nothing is
    //! committed when a transaction refuses. (What the queries do is the conformance suite's.)

    use std::sync::Mutex;

    use tether_domain::EndpointKind;

    use super::*;

    /// Answers each query as scripted and notes what was asked.
    #[derive(Default)]
    struct Scripted {
        pool: Option<PoolRecord>,
        endpoint: Option<EndpointRecord>,
        inserted: bool,
        redefined: bool,
        dispatch_current: bool,
        calls: Mutex<Vec<&'static str>>,
    }

    impl Scripted {
        fn note(&self, call: &'static str) {
            self.calls.lock().unwrap().push(call);
        }

        fn calls(&self) -> Vec<&'static str> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl EndpointDriver for Scripted {
        type Tx = ();

        async fn begin_endpoints(&self) -> StoreResult<((), Millis)> {
            self.note("begin");
            Ok(((), 1_000))
        }
        async fn commit_endpoints(&self, _: ()) -> StoreResult<()> {
            self.note("commit");
            Ok(())
        }
        async fn pool_upsert_unless_set_by_api(
            &self,
            _: &mut (),
            _: &NewPool,
            _: PoolSource,
            _: Millis,
        ) -> StoreResult<()> {
            self.note("pool_upsert");
            Ok(())
        }
        async fn pool_get(&self, _: &mut (), _: &str) -> StoreResult<Option<PoolRecord>> {
            Ok(self.pool.clone())
        }
        async fn pool_list(&self) -> StoreResult<Vec<PoolRecord>> {
            Ok(self.pool.clone().into_iter().collect())
        }
        async fn endpoint_get_for_update(
            &self,
            _: &mut (),
            _: &str,
        ) -> StoreResult<Option<EndpointRecord>> {
            Ok(self.endpoint.clone())
        }
        async fn endpoint_get(&self, _: &mut (), _: &str) -> StoreResult<Option<EndpointRecord>> {
            Ok(self.endpoint.clone())
        }
        async fn endpoint_insert(
            &self,
            _: &mut (),
            _: &NewEndpoint,
            _: Millis,
        ) -> StoreResult<bool> {
            self.note("insert");
            Ok(self.inserted)
        }
        async fn endpoint_redefine_if_revision(
            &self,
            _: &mut (),
            _: &NewEndpoint,
            _: i64,
            _: Millis,
        ) -> StoreResult<bool> {
            self.note("redefine");
            Ok(self.redefined)
        }
        async fn endpoint_delete(&self, _: &mut (), _: &str) -> StoreResult<bool> {
            Ok(true)
        }
        async fn endpoint_list(&self) -> StoreResult<Vec<EndpointRecord>> {
            Ok(Vec::new())
        }
        async fn endpoint_claim_due_probes(
            &self,
            _: &mut (),
            _: Millis,
            _: Millis,
            _: i64,
        ) -> StoreResult<Vec<ProbeClaim>> {
            Ok(Vec::new())
        }
        async fn endpoint_set_probe_result_if_claimed(
            &self,
            _: &mut (),
            _: &ProbeClaim,
            _: bool,
            _: Option<&str>,
            _: Millis,
        ) -> StoreResult<bool> {
            Ok(true)
        }
        async fn attempt_set_dispatch_if_current(
            &self,
            _: &mut (),
            _: &str,
            _: u32,
            _: &str,
            _: &str,
        ) -> StoreResult<bool> {
            self.note("set_dispatch");
            Ok(self.dispatch_current)
        }
    }

    fn pool() -> PoolRecord {
        PoolRecord {
            name: "p".into(),
            fallback_url: None,
            freshness_ms: 1_000,
            source: PoolSource::Api,
            updated_at: 0,
        }
    }

    fn new_endpoint() -> NewEndpoint {
        NewEndpoint {
            name: "e".into(),
            pool: "p".into(),
            url: "http://e".into(),
            readiness_url: Some("http://e/ready".into()),
            kind: EndpointKind::Probed,
        }
    }

    fn stored(new: &NewEndpoint) -> EndpointRecord {
        EndpointRecord {
            name: new.name.clone(),
            pool: new.pool.clone(),
            url: new.url.clone(),
            readiness_url: new.readiness_url.clone(),
            kind: new.kind,
            revision: 1,
            created_at: 0,
            updated_at: 0,
            last_ready_at: None,
            last_probe_at: None,
            last_error: None,
        }
    }

    #[tokio::test]
    async fn an_endpoint_of_an_unknown_pool_writes_nothing() {
        let driver = Scripted::default();
        let saved = driver.upsert_endpoint(&new_endpoint()).await.unwrap();
        assert_eq!(saved, EndpointSaved::UnknownPool);
        assert_eq!(driver.calls(), ["begin"]);
    }

    #[tokio::test]
    async fn losing_a_registration_race_is_retryable_and_commits_nothing() {
        let driver = Scripted {
            pool: Some(pool()),
            inserted: false,
            ..Scripted::default()
        };
        let refused = driver.upsert_endpoint(&new_endpoint()).await;
        assert!(matches!(refused, Err(StoreError::Unavailable(_))));
        assert_eq!(driver.calls(), ["begin", "insert"]);
    }

    #[tokio::test]
    async fn the_same_definition_is_not_rewritten_and_a_new_one_is_fenced_by_revision() {
        let same = Scripted {
            pool: Some(pool()),
            endpoint: Some(stored(&new_endpoint())),
            ..Scripted::default()
        };
        let saved = same.upsert_endpoint(&new_endpoint()).await.unwrap();
        assert!(matches!(saved, EndpointSaved::Updated(_)));
        assert_eq!(same.calls(), ["begin", "commit"]);

        let mut moved = new_endpoint();
        moved.url = "http://elsewhere".into();
        let raced = Scripted {
            pool: Some(pool()),
            endpoint: Some(stored(&new_endpoint())),
            redefined: false,
            ..Scripted::default()
        };
        assert!(matches!(
            raced.upsert_endpoint(&moved).await,
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(raced.calls(), ["begin", "redefine"]);
    }

    #[tokio::test]
    async fn a_dispatch_for_an_attempt_no_longer_current_is_stale_and_not_committed() {
        let driver = Scripted::default();
        let refused = driver.record_dispatch("r", 1, "w", &BTreeMap::new()).await;
        assert!(matches!(refused, Err(StoreError::StaleAttempt)));
        assert_eq!(driver.calls(), ["begin", "set_dispatch"]);
    }
}
