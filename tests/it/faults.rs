//! Store faults corrupt nothing: one operation's failure (a run that does not exist, a stale
//! fence, a key of the wrong type) never fails the operations sharing its transaction or batch.

use std::time::Duration;

use futures::{StreamExt, stream};
use serde_json::json;
use stagecraft::{
    ids::{RunId, WorkerId},
    store::{RunFilter, RunStatus, StageCheckpoint, StoreError},
};

use crate::support::{Backend, TestApp, noop_run};

/// Cancels of runs that do not exist, interleaved with submits and worker commits in one
/// process: every submit and every commit succeeds, every cancel answers not found.
async fn unknown_cancels_fail_alone_in_the_store(backend: Backend) {
    let app = TestApp::new(backend).with_api();
    let store = app.store().await;
    let worker = WorkerId::from("fault-test".to_owned());
    let queues = ["workflows".to_owned()];
    let mut leases = Vec::new();
    for _ in 0..200 {
        store.insert_run(noop_run()).await.expect("insert");
    }
    while leases.len() < 200 {
        let claimed = store
            .claim(&queues, &worker, Duration::from_secs(300), 32)
            .await
            .expect("claim");
        assert!(!claimed.is_empty(), "nothing left to claim");
        for c in claimed {
            store.start_stage(&c.lease, 0).await.expect("start");
            leases.push(c.lease);
        }
    }
    enum Op {
        Cancel,
        Submit,
        Commit(stagecraft::store::Lease),
    }
    let mut ops: Vec<Op> = Vec::new();
    for i in 0..1500 {
        ops.push(Op::Cancel);
        ops.push(Op::Submit);
        if i % 7 == 0 {
            if let Some(lease) = leases.pop() {
                ops.push(Op::Commit(lease));
            }
        }
    }
    let commits = ops.iter().filter(|o| matches!(o, Op::Commit(_))).count();
    let outcomes: Vec<(&'static str, bool)> = stream::iter(ops)
        .map(|op| {
            let store = store.clone();
            async move {
                match op {
                    Op::Cancel => {
                        let answer = store
                            .request_cancel(RunId::generate(), stagecraft::store::Actor::default())
                            .await;
                        ("cancel", matches!(answer, Err(StoreError::NotFound(_))))
                    }
                    Op::Submit => ("submit", store.insert_run(noop_run()).await.is_ok()),
                    Op::Commit(lease) => {
                        let checkpoint = StageCheckpoint {
                            output: json!({}),
                            artifacts: Vec::new(),
                            cost_usd: stagecraft::money::Usd::ZERO,
                            run_result: Some(json!({})),
                            reused_from: None,
                        };
                        (
                            "commit",
                            store.commit_stage(&lease, 0, checkpoint).await.is_ok(),
                        )
                    }
                }
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    for kind in ["cancel", "submit", "commit"] {
        let failed = outcomes.iter().filter(|(k, ok)| *k == kind && !ok).count();
        assert_eq!(failed, 0, "{failed} {kind}s failed");
    }
    let completed = store
        .list_runs(&RunFilter {
            status: Some(RunStatus::Completed),
            limit: 1,
            ..RunFilter::default()
        })
        .await
        .expect("list")
        .total;
    assert_eq!(completed, commits as u64, "a worker commit was lost");
    let queued = store
        .list_runs(&RunFilter {
            status: Some(RunStatus::Queued),
            limit: 1,
            ..RunFilter::default()
        })
        .await
        .expect("list")
        .total;
    assert_eq!(queued, 1500, "a submit was lost");
}

/// The same through the API: unknown cancels answer 404 and every submit 201.
async fn unknown_cancels_never_fail_submits_through_the_api(backend: Backend) {
    let app = TestApp::new(backend).with_api();
    let app = &app;
    let statuses: Vec<(bool, u16)> = stream::iter(0..3000)
        .map(|i| async move {
            if i % 2 == 0 {
                let (status, _) = app
                    .post(&format!("/runs/{}/cancel", RunId::generate()), &json!({}))
                    .await;
                (true, status)
            } else {
                let (status, _) = app
                    .post(
                        "/runs",
                        &json!({"kind": "workflow", "name": "noop", "inputs": {}}),
                    )
                    .await;
                (false, status)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let cancels: Vec<u16> = statuses
        .iter()
        .filter(|(c, _)| *c)
        .map(|(_, s)| *s)
        .collect();
    let submits: Vec<u16> = statuses
        .iter()
        .filter(|(c, _)| !*c)
        .map(|(_, s)| *s)
        .collect();
    assert!(cancels.iter().all(|s| *s == 404), "cancels: {cancels:?}");
    assert!(submits.iter().all(|s| *s == 201), "submits: {submits:?}");
}

crate::conformance!(
    unknown_cancels_fail_alone_in_the_store,
    unknown_cancels_never_fail_submits_through_the_api,
);

/// A key of the wrong type planted under one run fails that run's operation alone: the others
/// sent in the same call are written with all their indexes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_the_wrong_type_fails_only_its_own_operation_in_a_batch() {
    use ::redis::AsyncCommands;
    let app = TestApp::new(Backend::Redis);
    let store = app.store().await;
    let client = ::redis::Client::open(app.env["REDIS_URL"].as_str()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let prefix = app.env["REDIS_KEY_PREFIX"].clone();
    for round in 0..10 {
        let runs: Vec<_> = (0..40).map(|_| noop_run()).collect();
        let poisoned = runs[17].id;
        let _: () = conn
            .set(format!("{prefix}run:{poisoned}:events"), "not a list")
            .await
            .expect("plant");
        let answers =
            futures::future::join_all(runs.iter().map(|run| store.insert_run(run.clone()))).await;
        for (run, answer) in runs.iter().zip(&answers) {
            if run.id == poisoned {
                assert!(
                    answer.is_err(),
                    "round {round}: the poisoned insert succeeded"
                );
            } else {
                assert!(answer.is_ok(), "round {round}: {answer:?}");
            }
        }
    }
    // Every healthy run is listed, counted and claimable.
    let total = store
        .list_runs(&RunFilter {
            status: Some(RunStatus::Queued),
            limit: 1,
            ..RunFilter::default()
        })
        .await
        .expect("list")
        .total;
    assert!(total >= 390, "queued runs indexed: {total}");
    let depths = store.queue_depths().await.expect("depths");
    let queued: u64 = depths
        .iter()
        .filter(|d| d.status == RunStatus::Queued)
        .map(|d| d.count)
        .sum();
    assert_eq!(queued, total, "{depths:?}");
    let worker = WorkerId::from("wrongtype".to_owned());
    let mut claimed = 0;
    loop {
        let batch = store
            .claim(
                &["workflows".to_owned()],
                &worker,
                Duration::from_secs(60),
                32,
            )
            .await
            .expect("a claim never fails because of one bad run");
        if batch.is_empty() {
            break;
        }
        claimed += batch.len();
    }
    assert_eq!(claimed as u64, 390, "every healthy run was claimed once");
}
