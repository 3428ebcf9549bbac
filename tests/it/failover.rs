//! Redis failover under load: a primary, two replicas and three sentinels as real processes;
//! 500 runs submitted through the API while two workers drain them; the replicas a second
//! behind, the primary SIGKILLed mid-drain and a replica promoted by Sentinel, a worker
//! SIGKILLed during the failover. With durable acknowledgements every run the
//! API accepted completes exactly once and no acknowledged stage start or checkpoint is lost;
//! without them the loss is measured (`make chaos`).

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::support::{Backend, TestApp, sentinel::RedisGroup};

const RUNS: usize = 500;

/// What a failover cost.
#[derive(Debug, Default)]
#[allow(dead_code, reason = "every field is reported through Debug")]
struct Loss {
    /// Runs the API accepted (2xx) that the store no longer has.
    lost_runs: usize,
    /// Accepted runs that did not complete.
    unfinished: usize,
    /// Stage attempts that started twice under the same number: a start acknowledged to a
    /// worker, then lost.
    repeated_attempts: usize,
    /// Stages with more than one `stage_completed` event.
    completed_twice: usize,
    /// Stage executions under a fencing token lower than an earlier execution's, or a stage
    /// executed twice under one token: a token granted twice.
    fence_not_rising: usize,
    /// Submissions answered 503 (retried with the same idempotency key).
    refused_submissions: usize,
}

/// Submits `RUNS` demo runs, 16 at a time, each retried with its idempotency key until the API
/// accepts it (a client's way through a failover); answers the accepted ids in order.
async fn submit_all(
    app: &TestApp,
    accepted: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
) -> Vec<String> {
    let http = app.http.clone();
    let url = app.url("/runs");
    let submissions = futures::stream::iter(0..RUNS).map(|i| {
        let (http, url, accepted, refused) =
            (http.clone(), url.clone(), accepted.clone(), refused.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let answer = http
                    .post(&url)
                    .header("idempotency-key", format!("failover-{i}"))
                    .json(&json!({"kind": "workflow", "name": "demo", "inputs": {"sleep_ms": 30}}))
                    .send()
                    .await;
                if let Ok(response) = answer {
                    if response.status().is_success() {
                        let body: Value = response.json().await.expect("json");
                        accepted.fetch_add(1, Ordering::SeqCst);
                        return body["run_id"].as_str().expect("run_id").to_owned();
                    }
                    refused.fetch_add(1, Ordering::SeqCst);
                }
                assert!(Instant::now() < deadline, "submission {i} never accepted");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    use futures::StreamExt;
    submissions.buffered(16).collect().await
}

/// The failover scenario with `durable_acks` replicas awaited per change.
async fn failover_under_load(durable_acks: u32) -> Loss {
    let group = RedisGroup::start(2, 1);
    let mut app = TestApp::new(Backend::Redis)
        .with_env("REDIS_URL", "redis://127.0.0.1/0")
        .with_env("REDIS_SENTINELS", &group.sentinels())
        .with_env("REDIS_SENTINEL_MASTER", crate::support::sentinel::MASTER)
        .with_env("REDIS_DURABLE_ACKS", &durable_acks.to_string())
        .with_env("WORKER_CONCURRENCY", "8")
        .with_api();
    app.start_worker();
    app.start_worker();
    let (accepted, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let killer = {
        let accepted = accepted.clone();
        let group = &group;
        async move {
            while accepted.load(Ordering::SeqCst) < RUNS / 3 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // The replicas fall a second behind (a stalled network), then the primary dies,
            // what it had not delivered with it, and one of them is promoted.
            group.stall_replication();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let old = group.kill9_primary();
            group.sever_replication();
            group.wait_promoted(old, Duration::from_secs(30))
        }
    };
    let (ids, promoted) = tokio::join!(submit_all(&app, accepted, refused.clone()), killer);
    assert!(!group.ports.is_empty() && promoted != 0);

    // A worker dies as well, while the deployment is still finding its new primary.
    app.workers[0].kill9();
    app.start_worker();

    // Drain: until every accepted run has completed, or is gone (lost with the old primary).
    let runs = settle(&app, &ids).await;
    for proc in app.workers.iter_mut().skip(1).chain(app.api.iter_mut()) {
        assert!(
            proc.child.try_wait().expect("try_wait").is_none(),
            "{} exited: {}",
            proc.name,
            proc.log_text()
        );
    }

    let loss = measure(&app, &ids, &runs, refused.load(Ordering::SeqCst)).await;
    eprintln!("failover with REDIS_DURABLE_ACKS={durable_acks}: {loss:?}");
    loss
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_durable_acks_a_primary_killed_mid_drain_loses_no_acknowledged_work() {
    let loss = failover_under_load(1).await;
    assert_eq!(loss.lost_runs, 0, "{loss:?}");
    assert_eq!(loss.unfinished, 0, "{loss:?}");
    assert_eq!(loss.repeated_attempts, 0, "{loss:?}");
    assert_eq!(loss.completed_twice, 0, "{loss:?}");
    assert_eq!(loss.fence_not_rising, 0, "{loss:?}");
}

/// The loss window without durable acknowledgements, measured (`make chaos`): nothing is
/// asserted but that no process exits and that fencing holds (no token is granted twice, no
/// stage completes twice) even when acknowledged writes are lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: make chaos"]
async fn without_durable_acks_the_loss_of_a_failover_is_measured() {
    let mut total = Loss::default();
    for _ in 0..3 {
        let loss = failover_under_load(0).await;
        assert_eq!(loss.completed_twice, 0, "{loss:?}");
        assert_eq!(loss.fence_not_rising, 0, "{loss:?}");
        total.lost_runs += loss.lost_runs;
        total.unfinished += loss.unfinished;
        total.repeated_attempts += loss.repeated_attempts;
    }
    eprintln!("three failovers without durable acks: {total:?}");
}

/// Reads every accepted run until each has completed or is gone (or two minutes passed).
async fn settle(app: &TestApp, ids: &[String]) -> BTreeMap<String, Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut runs: BTreeMap<String, Value> = BTreeMap::new();
    loop {
        let mut settled = 0;
        for id in ids {
            if runs.get(id).is_some_and(|r| r["status"] == "completed") {
                settled += 1;
                continue;
            }
            let (status, run) = app.get(&format!("/runs/{id}")).await;
            if status == 200 {
                settled += usize::from(run["status"] == "completed");
                runs.insert(id.clone(), run);
            } else {
                settled += usize::from(status == 404);
                runs.remove(id);
            }
        }
        if settled == ids.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    runs
}

/// What the failover cost, from the runs, their ledgers and their events.
async fn measure(
    app: &TestApp,
    ids: &[String],
    runs: &BTreeMap<String, Value>,
    refused: usize,
) -> Loss {
    let mut loss = Loss {
        refused_submissions: refused,
        ..Loss::default()
    };
    for id in ids {
        match runs.get(id) {
            None => loss.lost_runs += 1,
            Some(run) if run["status"] != "completed" => loss.unfinished += 1,
            Some(_) => {}
        }
        let (mut starts, mut leases, mut highest) = (HashSet::new(), HashSet::new(), 0);
        let ledger = app.ledger(id);
        for line in &ledger {
            // `stage {name} attempt {n} fence {token}`
            let words: Vec<&str> = line.split(' ').collect();
            let ["stage", name, "attempt", attempt, "fence", fence] = words[..] else {
                continue;
            };
            if !starts.insert((name, attempt)) {
                loss.repeated_attempts += 1;
            }
            let fence: i64 = fence.parse().expect("fence");
            if fence < highest || !leases.insert((name, fence)) {
                loss.fence_not_rising += 1;
            }
            highest = highest.max(fence);
        }
        if runs.contains_key(id) {
            let mut completed: BTreeMap<String, usize> = BTreeMap::new();
            let events = app.events(id).await;
            for event in events {
                if event["kind"] == "stage_completed" {
                    *completed
                        .entry(event["stage"].as_str().unwrap_or_default().to_owned())
                        .or_default() += 1;
                }
            }
            loss.completed_twice += completed.values().filter(|n| **n > 1).count();
        }
    }
    loss
}
