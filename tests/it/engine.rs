//! The stage engine's policies: retries, permanent failures, budgets, cancel and resume.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::support::{Backend, TestApp, noop_run, stage};

const WAIT: Duration = Duration::from_secs(30);

fn time(value: &serde_json::Value) -> DateTime<Utc> {
    value
        .as_str()
        .expect("timestamp")
        .parse()
        .expect("RFC 3339")
}

async fn transient_failures_are_retried_after_growing_backoff_then_succeed(backend: Backend) {
    let app = TestApp::started(backend);
    let id = app.submit_demo(json!({"fail": {"two": 2}})).await;
    let run = app.wait_status(&id, "completed", WAIT).await;
    assert_eq!(stage(&run, "one")["attempts"], 1);
    assert_eq!(stage(&run, "two")["attempts"], 3);
    assert_eq!(stage(&run, "three")["attempts"], 1);
    let ledger = app.ledger(&id);
    assert_eq!(TestApp::count(&ledger, "stage one "), 1);
    assert_eq!(TestApp::count(&ledger, "stage two "), 3);

    let events = app.events(&id).await;
    let retries: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "retry_scheduled")
        .collect();
    assert_eq!(retries.len(), 2);
    // Full jitter under ceilings of 100 ms then 200 ms (RETRY_BASE_MS=100, doubling).
    for (retry, ceiling) in retries.iter().zip([100, 200]) {
        let delay = retry["data"]["delay_ms"].as_u64().expect("delay");
        assert!(delay <= ceiling, "delay {delay} over ceiling {ceiling}");
        assert_eq!(retry["data"]["error"]["code"], "stage_error");
    }
    // Each retry started no sooner than its scheduled delay.
    let starts: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "stage_started" && e["stage"] == "two")
        .collect();
    for (retry, next) in retries.iter().zip(starts.iter().skip(1)) {
        let waited = time(&next["at"]) - time(&retry["at"]);
        assert!(
            waited.num_milliseconds() >= retry["data"]["delay_ms"].as_i64().expect("delay") - 1
        );
    }
}

async fn a_permanent_failure_fails_the_run_at_once_keeping_its_checkpoints(backend: Backend) {
    let app = TestApp::started(backend);
    let id = app.submit_demo(json!({"fatal": "two"})).await;
    let run = app.wait_status(&id, "failed", WAIT).await;
    assert_eq!(run["error"]["code"], "planned_failure");
    assert_eq!(stage(&run, "one")["status"], "completed");
    assert_eq!(stage(&run, "two")["status"], "failed");
    assert_eq!(stage(&run, "two")["attempts"], 1);
    assert_eq!(stage(&run, "three")["status"], "pending");
    assert_eq!(run["last_completed_stage"], "one");
    let (_, failed) = app.get("/runs?status=failed").await;
    assert_eq!(failed["total"], 1);
}

async fn exhausted_attempts_fail_the_run_and_a_resume_completes_it(backend: Backend) {
    let app = TestApp::started(backend);
    let id = app
        .submit_demo(json!({"fail": {"two": 3}, "steps": 2}))
        .await;
    let run = app.wait_status(&id, "failed", WAIT).await;
    assert_eq!(run["error"]["code"], "attempts_exhausted");
    assert_eq!(stage(&run, "two")["attempts"], 3);
    assert_eq!(stage(&run, "one")["status"], "completed");

    let (status, resumed) = app
        .post(
            &format!("/runs/{id}/resume"),
            &json!({"from_stage": "auto"}),
        )
        .await;
    assert_eq!(status, 200, "{resumed}");
    // Queued by the resume; a worker may have taken it before the answer was read back.
    assert!(
        matches!(
            resumed["status"].as_str(),
            Some("queued" | "running" | "completed")
        ),
        "{resumed}"
    );
    let run = app.wait_status(&id, "completed", WAIT).await;
    assert_eq!(
        stage(&run, "two")["attempts"],
        1,
        "a resume starts a fresh series of attempts"
    );
    let ledger = app.ledger(&id);
    assert_eq!(
        TestApp::count(&ledger, "stage one "),
        1,
        "the checkpoint of stage one was kept"
    );
    assert_eq!(TestApp::count(&ledger, "stage two "), 4);
}

async fn resuming_from_a_named_stage_reruns_it_and_what_follows_only(backend: Backend) {
    let app = TestApp::started(backend);
    let id = app.submit_demo(json!({"steps": 2})).await;
    let first = app.wait_status(&id, "completed", WAIT).await;
    let (status, _) = app
        .post(&format!("/runs/{id}/resume"), &json!({"from_stage": "two"}))
        .await;
    assert_eq!(status, 200);
    let run = app.wait_status(&id, "completed", WAIT).await;
    assert_eq!(
        stage(&run, "one")["finished_at"],
        stage(&first, "one")["finished_at"],
        "stage one was redone"
    );
    let ledger = app.ledger(&id);
    assert_eq!(TestApp::count(&ledger, "stage one "), 1);
    assert_eq!(TestApp::count(&ledger, "stage two "), 2);
    assert_eq!(
        TestApp::count(&ledger, "step two/step-0"),
        2,
        "a named resume redoes the stage's steps"
    );
    assert_eq!(TestApp::count(&ledger, "stage three "), 2);
}

async fn a_resume_after_cancel_keeps_the_steps_that_finished(backend: Backend) {
    let app = TestApp::started(backend);
    let id = app.submit_demo(json!({"steps": 4, "sleep_ms": 2000})).await;
    app.wait_run(&id, WAIT, |r| {
        stage(r, "one")["progress"]["done"].as_u64().unwrap_or(0) >= 2
    })
    .await;
    app.post(&format!("/runs/{id}/cancel"), &json!({})).await;
    let cancelled = app.wait_status(&id, "cancelled", WAIT).await;
    let done = stage(&cancelled, "one")["progress"]["done"]
        .as_u64()
        .expect("done");
    let (status, _) = app
        .post(
            &format!("/runs/{id}/resume"),
            &json!({"from_stage": "auto"}),
        )
        .await;
    assert_eq!(status, 200);
    let run = app.wait_status(&id, "completed", WAIT).await;
    let ledger = app.ledger(&id);
    for step in 0..done {
        assert_eq!(
            ledger
                .iter()
                .filter(|l| **l == format!("step one/step-{step}"))
                .count(),
            1,
            "step {step} redone: {ledger:#?}"
        );
    }
    assert_eq!(
        stage(&run, "one")["progress"],
        json!({"done": 4, "total": 4})
    );
    assert_eq!(
        stage(&run, "one")["artifacts"].as_array().map(Vec::len),
        Some(5)
    );
}

async fn a_budget_stops_the_run_before_a_stage_that_would_exceed_it(backend: Backend) {
    let app = TestApp::started(backend);
    let (status, body) = app
        .post("/runs", &json!({"kind": "workflow", "name": "demo", "inputs": {"cost_usd": 2.0}, "budget_usd": 5.0}))
        .await;
    assert_eq!(status, 201);
    let id = body["run_id"].as_str().expect("id");
    let run = app.wait_status(id, "failed", WAIT).await;
    assert_eq!(run["error"]["code"], "budget_exceeded");
    assert_eq!(stage(&run, "three")["status"], "failed");
    assert_eq!(
        stage(&run, "three")["attempts"],
        0,
        "the stage never started"
    );
    assert!((run["cost_usd"].as_f64().expect("cost") - 4.0).abs() < 1e-9);
    assert_eq!(TestApp::count(&app.ledger(id), "stage three "), 0);
}

async fn cancel_interrupts_a_running_stage_and_stops_a_queued_run(backend: Backend) {
    let app = TestApp::started(backend);
    let id = app.submit_demo(json!({"sleep_ms": 20000})).await;
    app.wait_run(&id, WAIT, |r| stage(r, "one")["status"] == "running")
        .await;
    let (status, body) = app.post(&format!("/runs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let started = std::time::Instant::now();
    let run = app.wait_status(&id, "cancelled", WAIT).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        started.elapsed()
    );
    assert_eq!(stage(&run, "one")["status"], "cancelled");
    assert_eq!(stage(&run, "two")["status"], "pending");
    let (status, error) = app.post(&format!("/runs/{id}/cancel"), &json!({})).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (409, Some("conflict"))
    );

    // A queued run (no worker for its queue) is cancelled at once.
    let queued_app = TestApp::new(backend).with_api();
    let queued = queued_app.submit_demo(json!({})).await;
    let (status, body) = queued_app
        .post(&format!("/runs/{queued}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "cancelled");
    // And a cancelled run can be resumed.
    let (status, body) = app.post(&format!("/runs/{id}/resume"), &json!({})).await;
    assert_eq!(status, 200);
    assert!(
        matches!(body["status"].as_str(), Some("queued" | "running")),
        "{body}"
    );
    app.post(&format!("/runs/{id}/cancel"), &json!({})).await;
}

/// A run of a workflow this worker does not know (submitted to a newer version, say) fails at
/// once, its stages untouched: no attempt counted, nothing started.
async fn a_run_of_a_workflow_the_worker_does_not_know_fails_without_starting_a_stage(
    backend: Backend,
) {
    use stagecraft::store::{NewRun, RunStatus, StageStatus};
    let mut app = TestApp::new(backend);
    std::fs::create_dir_all(&app.env["DATA_DIR"]).expect("data dir");
    let store = app.store().await;
    let (run, _) = store
        .insert_run(NewRun {
            name: "retired".to_owned(),
            stage_names: vec!["draft".to_owned(), "polish".to_owned()],
            ..noop_run()
        })
        .await
        .expect("insert");
    app.start_worker();
    let deadline = std::time::Instant::now() + WAIT;
    let failed = loop {
        let current = store.get_run(run.id).await.expect("get").expect("run");
        if current.status == RunStatus::Failed {
            break current;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {:?}",
            current.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        failed.error.as_ref().map(|e| e.code.as_str()),
        Some("unknown_workflow")
    );
    for stage in &failed.stages {
        assert_eq!(stage.status, StageStatus::Pending, "{}", stage.name);
        assert_eq!(stage.attempts, 0, "{}", stage.name);
        assert_eq!(stage.started_at, None, "{}", stage.name);
    }
    assert_eq!(failed.current_stage, None);
}

/// Runs due in several queues are claimed oldest first across the queues, whichever queue
/// holds them, and a claim of one queue takes only that queue's runs.
async fn a_claim_takes_the_oldest_due_runs_across_queues(backend: Backend) {
    use stagecraft::{ids::WorkerId, store::NewRun};
    let app = TestApp::new(backend);
    std::fs::create_dir_all(&app.env["DATA_DIR"]).expect("data dir");
    let store = app.store().await;
    let mut inserted = Vec::new();
    for queue in ["agents", "workflows", "workflows", "agents", "workflows"] {
        let (run, _) = store
            .insert_run(NewRun {
                queue: queue.to_owned(),
                ..noop_run()
            })
            .await
            .expect("insert");
        inserted.push(run.id);
        // Distinct due times (the stores keep milliseconds).
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let worker = WorkerId::from("w-1".to_owned());
    let ttl = Duration::from_secs(30);
    let all = ["workflows", "agents", "work_orders"].map(String::from);
    let claim = |queues: Vec<String>, max| {
        let store = store.clone();
        let worker = worker.clone();
        async move {
            let claimed = store
                .claim(&queues, &worker, ttl, max)
                .await
                .expect("claim");
            claimed.iter().map(|c| c.lease.run_id).collect::<Vec<_>>()
        }
    };
    assert_eq!(claim(all.to_vec(), 3).await, inserted[..3]);
    assert_eq!(claim(vec!["agents".to_owned()], 5).await, [inserted[3]]);
    assert_eq!(claim(all.to_vec(), 5).await, [inserted[4]]);
}

/// Listing by status pages newest first with the total, for running runs too (on Redis they
/// are the lease index rather than a status set), with and without a name filter.
async fn runs_listed_by_status_page_newest_first(backend: Backend) {
    use stagecraft::{
        ids::WorkerId,
        store::{RunFilter, RunStatus},
    };
    let app = TestApp::new(backend);
    std::fs::create_dir_all(&app.env["DATA_DIR"]).expect("data dir");
    let store = app.store().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(store.insert_run(noop_run()).await.expect("insert").0.id);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let worker = WorkerId::from("w-1".to_owned());
    let claimed = store
        .claim(
            &["workflows".to_owned()],
            &worker,
            Duration::from_secs(30),
            3,
        )
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 3);
    let list = |status, name: Option<&str>, before, limit| {
        let store = store.clone();
        let filter = RunFilter {
            status: Some(status),
            name: name.map(str::to_owned),
            before,
            limit,
            ..RunFilter::default()
        };
        async move {
            let stagecraft::store::RunPage { runs, total, .. } =
                store.list_runs(&filter).await.expect("list");
            (runs.iter().map(|r| r.id).collect::<Vec<_>>(), total)
        }
    };
    assert_eq!(
        list(RunStatus::Running, None, None, 2).await,
        (vec![ids[2], ids[1]], 3)
    );
    assert_eq!(
        list(RunStatus::Running, None, Some(ids[1]), 2).await,
        (vec![ids[0]], 3)
    );
    assert_eq!(
        list(RunStatus::Queued, None, None, 10).await,
        (vec![ids[4], ids[3]], 2)
    );
    assert_eq!(
        list(RunStatus::Running, Some("noop"), Some(ids[2]), 10).await,
        (vec![ids[1], ids[0]], 3)
    );
    assert_eq!(
        list(RunStatus::Running, Some("other"), None, 10).await,
        (vec![], 0)
    );
    assert_eq!(
        list(RunStatus::Completed, None, None, 10).await,
        (vec![], 0)
    );
}

/// The record `insert_run` answers is the one the store reads back, and a second insert with
/// the same idempotency key answers the first run.
async fn an_inserted_run_reads_back_as_it_was_answered(backend: Backend) {
    use stagecraft::store::NewRun;
    let app = TestApp::new(backend);
    std::fs::create_dir_all(&app.env["DATA_DIR"]).expect("data dir");
    let store = app.store().await;
    let new = || NewRun {
        inputs: json!({"topic": "tides", "ratio": 0.25, "tags": ["a", "b"], "n": 3}),
        budget_usd: Some(stagecraft::money::Usd::from_micros(2_500_000)),
        stage_names: vec!["draft".to_owned(), "polish".to_owned()],
        idempotency_key: Some(format!("key-{}", uuid::Uuid::new_v4())),
        reuse: true,
        ..noop_run()
    };
    let first = new();
    let key = first.idempotency_key.clone();
    let (answered, created) = store.insert_run(first).await.expect("insert");
    assert!(created);
    let read = store.get_run(answered.id).await.expect("get").expect("run");
    // Every field, compared through its debug form (records are not comparable themselves).
    let fields = |run: &stagecraft::store::RunRecord| format!("{run:#?}");
    assert_eq!(fields(&answered), fields(&read));
    let (again, created) = store
        .insert_run(NewRun {
            idempotency_key: key,
            ..new()
        })
        .await
        .expect("insert again");
    assert!(!created);
    assert_eq!(fields(&again), fields(&read));
}

crate::conformance!(
    an_inserted_run_reads_back_as_it_was_answered,
    runs_listed_by_status_page_newest_first,
    a_claim_takes_the_oldest_due_runs_across_queues,
    transient_failures_are_retried_after_growing_backoff_then_succeed,
    a_permanent_failure_fails_the_run_at_once_keeping_its_checkpoints,
    exhausted_attempts_fail_the_run_and_a_resume_completes_it,
    resuming_from_a_named_stage_reruns_it_and_what_follows_only,
    a_budget_stops_the_run_before_a_stage_that_would_exceed_it,
    cancel_interrupts_a_running_stage_and_stops_a_queued_run,
    a_resume_after_cancel_keeps_the_steps_that_finished,
    a_run_of_a_workflow_the_worker_does_not_know_fails_without_starting_a_stage,
);
