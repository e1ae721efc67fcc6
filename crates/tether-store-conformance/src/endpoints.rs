//! Endpoints and pools (SPEC §5): registration, probes claimed once, dispatch recorded once.

use crate::support::*;
use crate::Harness;

fn pool(name: &str, fallback: &str, freshness_ms: i64) -> tether_store::NewPool {
    tether_store::NewPool {
        name: name.into(),
        fallback_url: Some(fallback.into()),
        freshness_ms,
    }
}

fn probed(name: &str, pool: &str) -> tether_store::NewEndpoint {
    tether_store::NewEndpoint {
        name: name.into(),
        pool: pool.into(),
        url: format!("http://{name}.internal"),
        readiness_url: Some(format!("http://{name}.internal/ready")),
        kind: tether_domain::EndpointKind::Probed,
    }
}

async fn endpoint(store: &SharedStore, name: &str) -> Option<tether_store::EndpointRecord> {
    store
        .list_endpoints()
        .await
        .expect("list_endpoints")
        .into_iter()
        .find(|e| e.name == name)
}

pub async fn pools_from_config_never_override_pools_set_through_the_api(h: &dyn Harness) {
    use tether_store::PoolSource;
    let fx = h.fresh().await;
    let store = &fx.store;
    let p = store
        .upsert_pool(&pool("cache", "http://a", 1_000), PoolSource::Config)
        .await
        .unwrap();
    assert_eq!((p.source, p.freshness_ms), (PoolSource::Config, 1_000));
    // Another server's config: config over config lands.
    let p = store
        .upsert_pool(&pool("cache", "http://b", 2_000), PoolSource::Config)
        .await
        .unwrap();
    assert_eq!(p.fallback_url.as_deref(), Some("http://b"));
    let p = store
        .upsert_pool(&pool("cache", "http://api", 3_000), PoolSource::Api)
        .await
        .unwrap();
    assert_eq!((p.source, p.freshness_ms), (PoolSource::Api, 3_000));
    // A server restarting with its config file leaves the API's settings alone.
    let p = store
        .upsert_pool(&pool("cache", "http://c", 4_000), PoolSource::Config)
        .await
        .unwrap();
    assert_eq!(p.fallback_url.as_deref(), Some("http://api"));
    assert_eq!(p.freshness_ms, 3_000);
    store
        .upsert_pool(&pool("other", "http://o", 5_000), PoolSource::Config)
        .await
        .unwrap();
    let names: Vec<String> = store
        .list_pools()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["cache", "other"]);
}

pub async fn endpoints_register_replace_and_delete(h: &dyn Harness) {
    use tether_store::{EndpointSaved, PoolSource, ProbeOutcome};
    let fx = h.fresh().await;
    let store = &fx.store;
    assert_eq!(
        store.upsert_endpoint(&probed("a", "nope")).await.unwrap(),
        EndpointSaved::UnknownPool
    );
    assert!(store.list_endpoints().await.unwrap().is_empty());
    store
        .upsert_pool(&pool("cache", "http://fb", 60_000), PoolSource::Config)
        .await
        .unwrap();
    let EndpointSaved::Created(created) =
        store.upsert_endpoint(&probed("a", "cache")).await.unwrap()
    else {
        panic!("created");
    };
    assert_eq!(created.revision, 1);
    assert_eq!(created.last_ready_at, None, "never probed: no stamp");

    let claims = store.claim_due_probes(60_000, 100).await.unwrap();
    assert_eq!(claims.len(), 1);
    assert!(store
        .record_probe(&claims[0], &ProbeOutcome::Ready)
        .await
        .unwrap());
    let stamped = endpoint(store, "a").await.unwrap().last_ready_at;
    assert!(stamped.is_some());

    // The same definition again changes nothing: the stamp stays.
    let EndpointSaved::Updated(same) = store.upsert_endpoint(&probed("a", "cache")).await.unwrap()
    else {
        panic!("updated");
    };
    assert_eq!((same.revision, same.last_ready_at), (1, stamped));

    // A new URL is a new definition: the old stamp does not vouch for it.
    let mut moved = probed("a", "cache");
    moved.url = "http://elsewhere".into();
    let EndpointSaved::Updated(changed) = store.upsert_endpoint(&moved).await.unwrap() else {
        panic!("updated");
    };
    assert_eq!(changed.revision, 2);
    assert_eq!(changed.last_ready_at, None);
    assert_eq!(changed.url, "http://elsewhere");

    assert!(store.delete_endpoint("a").await.unwrap());
    assert!(!store.delete_endpoint("a").await.unwrap());
    assert!(endpoint(store, "a").await.is_none());
}

pub async fn probes_are_claimed_once_per_interval_across_callers(h: &dyn Harness) {
    use tether_store::PoolSource;
    let fx = h.fresh().await;
    let store = &fx.store;
    store
        .upsert_pool(&pool("cache", "http://fb", 60_000), PoolSource::Config)
        .await
        .unwrap();
    for name in ["a", "b", "c"] {
        store.upsert_endpoint(&probed(name, "cache")).await.unwrap();
    }
    let mut always = probed("d", "cache");
    always.kind = tether_domain::EndpointKind::AlwaysReady;
    store.upsert_endpoint(&always).await.unwrap();

    // Several servers ask at once: each probed endpoint goes to exactly one of them, and the
    // always-ready one to none.
    let interval = 400;
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.claim_due_probes(interval, 100).await.unwrap() })
        })
        .collect();
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap().into_iter().map(|c| c.endpoint));
    }
    claimed.sort();
    assert_eq!(claimed, ["a", "b", "c"]);
    let first = store.now().await.unwrap();
    assert!(
        store
            .claim_due_probes(interval, 100)
            .await
            .unwrap()
            .is_empty(),
        "not due again within the interval"
    );
    wait_past(store, first + interval).await;
    assert_eq!(store.claim_due_probes(interval, 2).await.unwrap().len(), 2);
    assert_eq!(
        store.claim_due_probes(interval, 100).await.unwrap().len(),
        1
    );
}

pub async fn probe_results_stamp_only_ready_answers_for_the_current_claim(h: &dyn Harness) {
    use tether_store::{PoolSource, ProbeOutcome};
    let fx = h.fresh().await;
    let store = &fx.store;
    store
        .upsert_pool(&pool("cache", "http://fb", 60_000), PoolSource::Config)
        .await
        .unwrap();
    store.upsert_endpoint(&probed("a", "cache")).await.unwrap();

    let claim = store.claim_due_probes(0, 10).await.unwrap().remove(0);
    assert_eq!(claim.readiness_url, "http://a.internal/ready");
    assert_eq!(claim.pool, "cache");
    assert!(store
        .record_probe(&claim, &ProbeOutcome::Ready)
        .await
        .unwrap());
    let ready = endpoint(store, "a").await.unwrap();
    let stamp = ready.last_ready_at.expect("a ready answer stamps");
    assert_eq!(ready.last_probe_at, Some(stamp));
    assert_eq!(ready.last_error, None);

    wait_past(store, stamp).await;
    let claim = store.claim_due_probes(0, 10).await.unwrap().remove(0);
    let failed = ProbeOutcome::NotReady {
        error: "503 Service Unavailable".into(),
    };
    assert!(store.record_probe(&claim, &failed).await.unwrap());
    let after = endpoint(store, "a").await.unwrap();
    assert_eq!(after.last_ready_at, Some(stamp), "a failure never stamps");
    assert!(after.last_probe_at > Some(stamp));
    assert_eq!(after.last_error.as_deref(), Some("503 Service Unavailable"));

    // A probe whose claim was replaced records nothing, nor does one of an old definition.
    let slow = store.claim_due_probes(0, 10).await.unwrap().remove(0);
    wait_past(store, slow.claimed_at).await;
    let fresh = store.claim_due_probes(0, 10).await.unwrap().remove(0);
    assert!(!store
        .record_probe(&slow, &ProbeOutcome::Ready)
        .await
        .unwrap());
    assert_eq!(
        endpoint(store, "a").await.unwrap().last_ready_at,
        Some(stamp)
    );
    let mut moved = probed("a", "cache");
    moved.readiness_url = Some("http://a.internal/healthz".into());
    store.upsert_endpoint(&moved).await.unwrap();
    assert!(!store
        .record_probe(&fresh, &ProbeOutcome::Ready)
        .await
        .unwrap());
    assert_eq!(endpoint(store, "a").await.unwrap().last_ready_at, None);
}

pub async fn an_attempts_dispatch_is_recorded_once_while_current(h: &dyn Harness) {
    use tether_domain::{Dispatch, DispatchSource};
    let fx = h.fresh().await;
    let store = &fx.store;
    let (run_id, worker_id) = claimed_run(store, &spec_with(|r| r.max_attempts = Some(2))).await;
    let dispatch = |url: &str, source, endpoint: Option<&str>| Dispatch {
        url: Some(url.into()),
        source,
        endpoint: endpoint.map(str::to_string),
    };
    let first = BTreeMap::from([(
        "CACHE_URL".to_string(),
        dispatch("http://a", DispatchSource::Endpoint, Some("a")),
    )]);
    assert_err(
        store
            .record_dispatch(&run_id, 1, "someone-else", &first)
            .await,
        is_stale,
        "another worker's dispatch",
    );
    store
        .record_dispatch(&run_id, 1, &worker_id, &first)
        .await
        .unwrap();
    assert_err(
        store.record_dispatch(&run_id, 1, &worker_id, &first).await,
        is_stale,
        "written once",
    );
    store
        .finish_attempt(
            &run_id,
            1,
            &worker_id,
            &finish(
                AttemptOutcome::Failed {
                    error_code: ErrorCode::WorkerHeartbeatLost,
                },
                None,
            ),
        )
        .await
        .unwrap();
    assert_eq!(status(store, &run_id).await, RunStatus::Pending, "retried");
    assert_err(
        store.record_dispatch(&run_id, 1, &worker_id, &first).await,
        is_stale,
        "an ended attempt",
    );
    let claimed = store.claim_runs(&worker_id, &limits(1)).await.unwrap();
    assert_eq!(claimed[0].attempt, 2);
    let second = BTreeMap::from([(
        "CACHE_URL".to_string(),
        dispatch("http://fb", DispatchSource::Fallback, None),
    )]);
    store
        .record_dispatch(&run_id, 2, &worker_id, &second)
        .await
        .unwrap();
    let attempts = store.list_attempts(&run_id).await.unwrap();
    assert_eq!(attempts[0].endpoints, first);
    assert_eq!(attempts[1].endpoints, second);
}
