//! Guarantees about processes: crashes, frozen workers, shutdown, and the API dying.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;

use crate::support::{Backend, TestApp, stage};

const WAIT: Duration = Duration::from_secs(60);

async fn a_killed_worker_run_resumes_elsewhere_from_its_last_checkpoint_and_step(backend: Backend) {
    let mut app = TestApp::started(backend);
    let id = app.submit_demo(json!({"steps": 5, "sleep_ms": 2500})).await;
    // Stage two has committed at least two of its five steps.
    let before = app
        .wait_run(&id, WAIT, |r| {
            stage(r, "two")["progress"]["done"].as_u64().unwrap_or(0) >= 2
        })
        .await;
    let done_before = stage(&before, "two")["progress"]["done"]
        .as_u64()
        .expect("done");
    app.workers[0].kill9();
    let killed_at = Instant::now();
    app.start_worker();
    let run = app.wait_status(&id, "completed", WAIT).await;
    let recovery = killed_at.elapsed();

    let ledger = app.ledger(&id);
    assert_eq!(
        TestApp::count(&ledger, "stage one "),
        1,
        "stage one ran again: {ledger:#?}"
    );
    assert_eq!(
        TestApp::count(&ledger, "stage two "),
        2,
        "stage two ran other than twice: {ledger:#?}"
    );
    assert_eq!(TestApp::count(&ledger, "stage three "), 1);
    for step in 0..5 {
        let runs = TestApp::count(&ledger, &format!("step two/step-{step}"));
        if (step as u64) < done_before {
            assert_eq!(runs, 1, "finished step {step} was redone: {ledger:#?}");
        } else {
            assert!(runs <= 2, "step {step} ran {runs} times");
        }
    }
    let repeated: usize = (0..5)
        .map(|s| TestApp::count(&ledger, &format!("step two/step-{s}")).saturating_sub(1))
        .sum();
    assert!(
        repeated <= 1,
        "more than the one interrupted step was redone: {ledger:#?}"
    );
    assert_eq!(stage(&run, "one")["attempts"], 1);
    assert_eq!(stage(&run, "two")["attempts"], 2);
    let events = app.events(&id).await;
    assert!(
        events.iter().any(|e| e["kind"] == "lease_recovered"),
        "{events:#?}"
    );
    assert!(
        recovery < Duration::from_secs(20),
        "recovery took {recovery:?}: {events:#?}"
    );
}

async fn a_frozen_worker_that_lost_its_lease_cannot_commit_when_it_wakes(backend: Backend) {
    let mut app = TestApp::started(backend);
    let id = app.submit_demo(json!({"steps": 2, "sleep_ms": 3000})).await;
    app.wait_run(&id, WAIT, |r| stage(r, "two")["status"] == "running")
        .await;
    app.workers[0].signal(Signal::SIGSTOP);
    app.start_worker();
    let finished = app.wait_status(&id, "completed", WAIT).await;
    let ledger_after_finish = app.ledger(&id);

    app.workers[0].signal(Signal::SIGCONT);
    // Let the zombie finish its step (up to 1.5 s of sleep) and try to commit and heartbeat.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !app.workers[0].log_text().contains("lease lost") {
        assert!(
            Instant::now() < deadline,
            "the zombie never noticed: {}",
            app.workers[0].log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = app.run(&id).await;
    assert_eq!(after, finished, "the zombie changed the run");
    assert_eq!(after["status"], "completed");
    // Whatever the zombie did after waking left no stage execution behind it.
    let ledger = app.ledger(&id);
    assert_eq!(
        TestApp::count(&ledger, "stage "),
        TestApp::count(&ledger_after_finish, "stage ")
    );
    let (_, metrics) = (
        0,
        app.http
            .get(app.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text"),
    );
    assert!(metrics.contains("stagecraft_runs{queue=\"workflows\",status=\"completed\"} 1"));
}

async fn sigterm_lets_the_stage_finish_releases_the_run_and_exits_zero(backend: Backend) {
    let mut app = TestApp::started(backend);
    let id = app.submit_demo(json!({"sleep_ms": 1500})).await;
    app.wait_executing(&id, "one", WAIT).await;
    app.workers[0].signal(Signal::SIGTERM);
    let status = app.workers[0]
        .wait_exit(Duration::from_secs(12))
        .expect("worker exits within the grace period");
    assert!(status.success(), "exit status {status:?}");
    let run = app.run(&id).await;
    assert_eq!(run["status"], "queued", "the run was not released: {run:#}");
    assert_eq!(
        stage(&run, "one")["status"],
        "completed",
        "the running stage was not allowed to finish"
    );
    assert_eq!(stage(&run, "two")["status"], "pending");
    app.start_worker();
    app.wait_status(&id, "completed", WAIT).await;
    assert_eq!(TestApp::count(&app.ledger(&id), "stage one "), 1);
}

/// A worker stopped at any moment around a claim (before it, while the store answers it, or
/// once the stage runs) leaves no run leased to it: every run is queued or done when it exits.
async fn a_worker_stopped_around_a_claim_leaves_no_run_behind(backend: Backend) {
    let mut app = TestApp::new(backend).with_api();
    for round in 0..8 {
        let index = app.start_worker();
        let id = app.submit_demo(json!({"sleep_ms": 50})).await;
        // Stop after a growing delay, so that rounds fall on different moments of the claim.
        tokio::time::sleep(Duration::from_millis(2 * round)).await;
        app.workers[index].signal(Signal::SIGTERM);
        let status = app.workers[index]
            .wait_exit(Duration::from_secs(12))
            .expect("worker exits");
        assert!(status.success(), "exit status {status:?}");
        let run = app.run(&id).await;
        assert!(
            matches!(run["status"].as_str(), Some("queued" | "completed")),
            "round {round}: the run was left {}: {run:#}",
            run["status"]
        );
    }
}

async fn past_the_grace_period_the_stage_is_abandoned_and_rerun_elsewhere(backend: Backend) {
    let mut app = TestApp::new(backend)
        .with_env("SHUTDOWN_GRACE_SECS", "1")
        .with_api();
    app.start_worker();
    let id = app.submit_demo(json!({"sleep_ms": 8000})).await;
    app.wait_executing(&id, "one", WAIT).await;
    let stopped = Instant::now();
    app.workers[0].signal(Signal::SIGTERM);
    let status = app.workers[0].wait_exit(Duration::from_secs(10));
    let status =
        status.unwrap_or_else(|| panic!("worker did not exit: {}", app.workers[0].log_text()));
    assert!(status.success());
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "took {:?}",
        stopped.elapsed()
    );
    let run = app.run(&id).await;
    assert_eq!(run["status"], "queued");
    assert_eq!(stage(&run, "one")["status"], "pending");
    // The next worker takes it at once (no lease to wait for) and runs the stage again.
    app.env.insert("SHUTDOWN_GRACE_SECS".into(), "30".into());
    app.start_worker();
    app.wait_run(&id, WAIT, |r| stage(r, "one")["attempts"] == 2)
        .await;
    app.post(&format!("/runs/{id}/cancel"), &json!({})).await;
    app.wait_status(&id, "cancelled", WAIT).await;
}

async fn an_accepted_run_survives_the_api_dying_right_after_answering(backend: Backend) {
    let mut app = TestApp::new(backend).with_api();
    let id = app.submit_demo(json!({"steps": 1})).await;
    app.api.as_mut().expect("api").kill9();
    app.start_worker();
    app.start_api();
    let run = app.wait_status(&id, "completed", WAIT).await;
    assert_eq!(run["run_id"], id.as_str());
}

/// A worker never executes more stages at once than its concurrency, although a slot frees
/// before its run's last checkpoint is committed (so the next claim travels with the commit),
/// and it does use every slot.
async fn a_worker_runs_no_more_stages_at_once_than_its_concurrency(backend: Backend) {
    let mut app = TestApp::new(backend).with_api();
    app.start_worker_with(&["--concurrency", "2"]);
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(app.submit_demo(json!({"sleep_ms": 300})).await);
    }
    // Each stage execution as [started, completed] in store milliseconds.
    let mut spans = Vec::new();
    for id in &ids {
        app.wait_status(id, "completed", WAIT).await;
        let events = app.events(id).await;
        let at = |kind: &str, stage: &str| {
            events
                .iter()
                .find(|e| e["kind"] == kind && e["stage"] == stage)
                .and_then(|e| e["at"].as_str())
                .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
                .map(|t| t.timestamp_millis())
                .unwrap_or_else(|| panic!("run {id}: no {kind} of {stage}"))
        };
        for stage in ["one", "two", "three"] {
            spans.push((at("stage_started", stage), at("stage_completed", stage)));
        }
    }
    // A stage's span ends with its commit, which may overlap the next run's start by the
    // commit's round trip: count a stage as executing until 150 ms before its commit (each
    // stage sleeps 300 ms, so a third stage at once would overlap by far more).
    let most = spans
        .iter()
        .map(|&(start, _)| {
            spans
                .iter()
                .filter(|&&(s, e)| s <= start && start < e - 150)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert_eq!(most, 2, "stages executing at once: {spans:?}");
}

async fn two_workers_share_one_store_without_running_anything_twice(backend: Backend) {
    let mut app = TestApp::started(backend);
    app.start_worker_with(&["--concurrency", "3"]);
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(app.submit_demo(json!({"sleep_ms": 10})).await);
    }
    for id in &ids {
        app.wait_status(id, "completed", WAIT).await;
    }
    let mut workers = std::collections::BTreeSet::new();
    for id in &ids {
        let ledger = app.ledger(id);
        assert_eq!(TestApp::count(&ledger, "stage "), 3, "run {id}: {ledger:?}");
        workers.insert(
            app.run(id).await["worker"]
                .as_str()
                .expect("worker")
                .to_owned(),
        );
    }
    assert_eq!(workers.len(), 2, "both workers took runs: {workers:?}");
}

/// A worker whose link to Redis is cut in the middle of a long stage stops that stage before
/// its lease expires: when another worker takes the run over, the two executions of the stage
/// never overlap (the first one's ticks all come before the second one starts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_its_store_stops_before_its_lease_expires() {
    let mut app = TestApp::new(Backend::Redis).with_api();
    let direct = app.env["REDIS_URL"].clone();
    let address: std::net::SocketAddr = direct
        .trim_start_matches("redis://")
        .trim_end_matches("/0")
        .parse()
        .expect("redis address");
    let proxy = crate::support::TcpProxy::start(address).await;
    app.env.insert(
        "REDIS_URL".into(),
        format!("redis://127.0.0.1:{}/0", proxy.port),
    );
    app.start_worker();
    app.env.insert("REDIS_URL".into(), direct);
    let id = app.submit_demo(json!({"sleep_ms": 6000})).await;
    app.wait_executing(&id, "one", WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    app.start_worker();
    app.wait_status(&id, "completed", WAIT).await;
    let ledger = app.ledger(&id);
    let second_start = ledger
        .iter()
        .position(|line| line.starts_with("stage one attempt 2"))
        .unwrap_or_else(|| panic!("stage one ran once only: {ledger:#?}"));
    let late_ticks = ledger[second_start..]
        .iter()
        .filter(|line| *line == "tick one 1")
        .count();
    assert_eq!(
        late_ticks, 0,
        "the cut-off worker kept running stage one after it was taken over: {ledger:#?}"
    );
    assert!(
        ledger[..second_start]
            .iter()
            .any(|line| line == "tick one 1"),
        "the first execution never ran: {ledger:#?}"
    );
    assert!(
        app.workers[0]
            .log_text()
            .contains("stopping the run before it expires"),
        "{}",
        app.workers[0].log_text()
    );
}

crate::conformance!(
    a_worker_stopped_around_a_claim_leaves_no_run_behind,
    a_worker_runs_no_more_stages_at_once_than_its_concurrency,
    a_killed_worker_run_resumes_elsewhere_from_its_last_checkpoint_and_step,
    a_frozen_worker_that_lost_its_lease_cannot_commit_when_it_wakes,
    sigterm_lets_the_stage_finish_releases_the_run_and_exits_zero,
    past_the_grace_period_the_stage_is_abandoned_and_rerun_elsewhere,
    an_accepted_run_survives_the_api_dying_right_after_answering,
    two_workers_share_one_store_without_running_anything_twice,
);
