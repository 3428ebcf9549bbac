//! What only the PostgreSQL store has to show: the API and workers riding out a restart of the
//! database (a server of the test's own), losing no accepted run; and a failover to a
//! synchronous standby, under load, losing nothing acknowledged; and the processes behind
//! PgBouncer in transaction mode.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::support::{
    Backend, TestApp,
    postgres::{
        FrontDoor, PostgresPair, PostgresServer, bouncer, fresh_database, fresh_database_on,
    },
    stage,
};

/// Waits until `/health` answers `status`; fails after `within`.
async fn health_becomes(app: &TestApp, status: u16, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (answered, body) = app.get("/health").await;
        if answered == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/health stayed {answered}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fails unless every process of `app` is still running.
pub(crate) fn assert_all_running(app: &mut TestApp, when: &str) {
    for proc in app.workers.iter_mut().chain(app.api.iter_mut()) {
        assert!(
            proc.child.try_wait().expect("try_wait").is_none(),
            "{} exited {when}: {}",
            proc.name,
            proc.log_text()
        );
    }
}

/// The database stops (a fast shutdown, as a restart or a failover does) while runs are under
/// way: `/health` and submissions answer 503, every process keeps running, and once the
/// database is back every run accepted before completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_workers_ride_out_a_database_restart_and_lose_no_accepted_run() {
    let server = PostgresServer::start();
    let (url, _database) = fresh_database_on(&server.admin_url).await;
    let mut app = TestApp::new(Backend::Postgres)
        .with_env("DATABASE_URL", &url)
        .with_api();
    app.start_worker();
    app.start_worker();
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(app.submit_demo(json!({"sleep_ms": 600, "steps": 2})).await);
    }
    app.wait_run(&ids[0], Duration::from_secs(30), |r| {
        stage(r, "one")["status"] == "completed"
    })
    .await;

    server.stop();
    let body = health_becomes(&app, 503, Duration::from_secs(20)).await;
    assert_eq!(body["status"], "unhealthy");
    let (status, body) = app
        .post("/runs", &json!({"kind": "workflow", "name": "demo"}))
        .await;
    assert_eq!(status, 503, "a submit while the database is down: {body}");
    assert_eq!(body["error"]["code"], "unavailable");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_all_running(&mut app, "while the database was down");

    server.restart();
    health_becomes(&app, 200, Duration::from_secs(30)).await;
    for id in &ids {
        app.wait_status(id, "completed", Duration::from_secs(90))
            .await;
    }
    let id = app.submit_demo(json!({})).await;
    app.wait_status(&id, "completed", Duration::from_secs(30))
        .await;
    assert_all_running(&mut app, "after the restart");
}

/// Runs the failover test submits, one every [`SUBMIT_EVERY`] (a steady stream the workers keep
/// up with, so the primary dies with runs queued, running and completed).
const FAILOVER_RUNS: usize = 120;
const SUBMIT_EVERY: Duration = Duration::from_millis(50);

/// Answers to submissions other than 200 and 201, counted by status (0: no answer at all).
type Refusals = Arc<Mutex<BTreeMap<u16, usize>>>;

/// A primary with a synchronous standby, reached through a front door (the address a managed
/// PostgreSQL moves on failover); the API and two workers as processes; runs submitted through
/// the API in a steady stream while the workers drain them. A third of the way in, the primary
/// is SIGKILLed, the standby promoted and the front door pointed at it, while submissions go on
/// (each retried with its idempotency key until accepted, as a client would). No commit was
/// acknowledged before the standby had it, so: every run the API accepted completes, each stage
/// exactly once; every stage execution's claim and start (acknowledged, or the stage would not
/// have run) is in the new primary's event log, and no attempt number ran twice; fencing tokens
/// only rise; no event sequence number is given twice; no process exits; and submissions are
/// refused only as unavailable (503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_synchronous_standby_loses_nothing_acknowledged() {
    let pair = PostgresPair::start().await;
    let door = FrontDoor::start(pair.primary.port).await;
    let (url, _database) = fresh_database_on(&door.admin_url()).await;
    let mut app = TestApp::new(Backend::Postgres)
        .with_env("DATABASE_URL", &url)
        .with_api();
    app.start_worker();
    app.start_worker();
    let (accepted, refusals): (Arc<AtomicUsize>, Refusals) = Default::default();
    let submitter = tokio::spawn(submit_all(
        app.http.clone(),
        app.url("/runs"),
        accepted.clone(),
        refusals.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while accepted.load(Ordering::SeqCst) < FAILOVER_RUNS / 3 {
        assert!(
            !submitter.is_finished() && Instant::now() < deadline,
            "the submissions stopped before the failover"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = accepted.load(Ordering::SeqCst);
    tokio::task::block_in_place(|| pair.kill9_primary());
    pair.promote_standby().await;
    door.point_at(pair.standby.port);
    let ids = submitter
        .await
        .expect("every submission is accepted in the end");

    let runs = settle(&app, &ids).await;
    assert_all_running(&mut app, "through the failover");
    let loss = measure(&app, &ids, &runs).await;
    let refusals = refusals.lock().expect("the refusals").clone();
    eprintln!(
        "failover after {before} of {FAILOVER_RUNS} accepted submissions; refused: {refusals:?}; {loss:?}"
    );
    assert_eq!(loss, Loss::default());
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        distinct.len(),
        ids.len(),
        "two submissions answered one run"
    );
    assert!(
        refusals.keys().all(|status| *status == 503),
        "submissions were refused other than as unavailable: {refusals:?}"
    );
}

/// Submits the failover test's demo runs, paced, up to eight at a time; answers the accepted
/// ids in submission order.
async fn submit_all(
    http: reqwest::Client,
    url: String,
    accepted: Arc<AtomicUsize>,
    refusals: Refusals,
) -> Vec<String> {
    use futures::StreamExt;
    let start = tokio::time::Instant::now();
    futures::stream::iter(0..FAILOVER_RUNS)
        .map(move |i| {
            let (http, url, accepted, refusals) = (
                http.clone(),
                url.clone(),
                accepted.clone(),
                refusals.clone(),
            );
            async move {
                tokio::time::sleep_until(start + SUBMIT_EVERY * i as u32).await;
                submit_until_accepted(&http, &url, i, &accepted, &refusals).await
            }
        })
        .buffered(8)
        .collect()
        .await
}

/// Submits demo run `i` with its idempotency key until the API answers 200 or 201 (a retry of
/// a submission the store committed but could not acknowledge answers the same run); answers
/// its id.
async fn submit_until_accepted(
    http: &reqwest::Client,
    url: &str,
    i: usize,
    accepted: &AtomicUsize,
    refusals: &Mutex<BTreeMap<u16, usize>>,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = http
            .post(url)
            .header("idempotency-key", format!("pg-failover-{i}"))
            .json(&json!({"kind": "workflow", "name": "demo", "inputs": {"sleep_ms": 30}}))
            .send()
            .await;
        let status = answer
            .as_ref()
            .map_or(0, |response| response.status().as_u16());
        if let (Ok(response), 200 | 201) = (answer, status) {
            let body: Value = response
                .json()
                .await
                .expect("a submission's answer is JSON");
            accepted.fetch_add(1, Ordering::SeqCst);
            return body["run_id"].as_str().expect("run_id").to_owned();
        }
        *refusals
            .lock()
            .expect("the refusals")
            .entry(status)
            .or_default() += 1;
        assert!(
            Instant::now() < deadline,
            "submission {i} was never accepted (last answer {status})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads every accepted run until each has completed or is gone (404), or two minutes have
/// passed; answers the last document of each run the API still has.
async fn settle(app: &TestApp, ids: &[String]) -> BTreeMap<String, Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut runs: BTreeMap<String, Value> = BTreeMap::new();
    let mut gone: HashSet<&String> = HashSet::new();
    loop {
        for id in ids {
            if gone.contains(id) || runs.get(id).is_some_and(|run| run["status"] == "completed") {
                continue;
            }
            match app.get(&format!("/runs/{id}")).await {
                (200, run) => {
                    runs.insert(id.clone(), run);
                }
                (404, _) => {
                    gone.insert(id);
                }
                // Unavailable for a moment: asked again.
                _ => {}
            }
        }
        let completed = runs
            .values()
            .filter(|run| run["status"] == "completed")
            .count();
        if completed + gone.len() == ids.len() || Instant::now() > deadline {
            return runs;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What a failover lost; all empty when nothing acknowledged was.
#[derive(Debug, Default, PartialEq, Eq)]
struct Loss {
    /// Accepted runs the API no longer has.
    lost_runs: Vec<String>,
    /// Accepted runs that did not complete.
    unfinished: Vec<String>,
    /// Stage executions under an attempt number an earlier execution of the stage had: a start
    /// acknowledged to a worker, then lost.
    repeated_attempts: usize,
    /// Stage executions under a fencing token lower than an earlier execution's, or a stage
    /// executed twice under one token: a token granted twice.
    fence_not_rising: usize,
    /// Stage executions whose claim (a `run_started` event with their fence) is not in the log.
    lost_claims: usize,
    /// Stage executions whose start (a `stage_started` event with their attempt) is not in the
    /// log.
    lost_starts: usize,
    /// Stages of completed runs without exactly one `stage_completed` event.
    not_completed_once: usize,
    /// Event sequence numbers given to more than one event.
    reused_event_seqs: usize,
}

/// What the failover cost, from the runs, their ledgers and their event logs.
async fn measure(app: &TestApp, ids: &[String], runs: &BTreeMap<String, Value>) -> Loss {
    let mut loss = Loss::default();
    let mut seqs = HashSet::new();
    for id in ids {
        let ledger = app.ledger(id);
        check_ledger(&ledger, &mut loss);
        match runs.get(id) {
            None => loss.lost_runs.push(id.clone()),
            Some(run) if run["status"] != "completed" => loss.unfinished.push(id.clone()),
            // Only a finished run's event stream ends.
            Some(_) => {
                let events = app.events(id).await;
                check_events(&events, &mut seqs, &mut loss);
                check_acknowledged(&ledger, &events, &mut loss);
            }
        }
    }
    loss
}

/// The stage executions of a run's ledger: `stage {name} attempt {n} fence {token}` lines, as
/// (name, attempt, fence).
fn executions(ledger: &[String]) -> Vec<(&str, i64, i64)> {
    ledger
        .iter()
        .filter_map(|line| {
            let words: Vec<&str> = line.split(' ').collect();
            let ["stage", name, "attempt", attempt, "fence", fence] = words[..] else {
                return None;
            };
            Some((
                name,
                attempt.parse().expect("an attempt number"),
                fence.parse().expect("a fencing token"),
            ))
        })
        .collect()
}

/// No attempt number executed twice; fencing tokens rise from execution to execution.
fn check_ledger(ledger: &[String], loss: &mut Loss) {
    let (mut attempts, mut leases, mut highest) = (HashSet::new(), HashSet::new(), 0_i64);
    for (name, attempt, fence) in executions(ledger) {
        if !attempts.insert((name, attempt)) {
            loss.repeated_attempts += 1;
        }
        if fence < highest || !leases.insert((name, fence)) {
            loss.fence_not_rising += 1;
        }
        highest = highest.max(fence);
    }
}

/// Each stage completed exactly once; no sequence number seen before (in any run's log).
fn check_events(events: &[Value], seqs: &mut HashSet<i64>, loss: &mut Loss) {
    let mut completed: BTreeMap<String, usize> = ["one", "two", "three"]
        .into_iter()
        .map(|name| (name.to_owned(), 0))
        .collect();
    for event in events {
        let seq = event["seq"].as_i64().expect("an event's sequence number");
        if !seqs.insert(seq) {
            loss.reused_event_seqs += 1;
        }
        if event["kind"] == "stage_completed" {
            let name = event["stage"]
                .as_str()
                .expect("the stage a stage_completed names");
            *completed.entry(name.to_owned()).or_default() += 1;
        }
    }
    loss.not_completed_once += completed.values().filter(|n| **n != 1).count();
}

/// A stage executes only after its run's claim and its own start were acknowledged to the
/// worker, each in a transaction with its event: both events must be in the log.
fn check_acknowledged(ledger: &[String], events: &[Value], loss: &mut Loss) {
    let mut fences: HashSet<i64> = HashSet::new();
    let mut starts: HashSet<(String, i64)> = HashSet::new();
    for event in events {
        let (stage, data) = (event["stage"].as_str(), &event["data"]);
        match (event["kind"].as_str(), stage) {
            (Some("run_started"), _) => fences.extend(data["fence"].as_i64()),
            (Some("stage_started"), Some(name)) => {
                starts.extend(data["attempt"].as_i64().map(|n| (name.to_owned(), n)));
            }
            _ => {}
        }
    }
    for (name, attempt, fence) in executions(ledger) {
        if !fences.contains(&fence) {
            loss.lost_claims += 1;
        }
        if !starts.contains(&(name.to_owned(), attempt)) {
            loss.lost_starts += 1;
        }
    }
}

/// The processes configured for PgBouncer in transaction mode (`DATABASE_POOL_MODE=transaction`)
/// with no direct URL: `stagecraft migrate` refuses, naming `DATABASE_DIRECT_URL`, and migrates
/// with it; then the API and two workers (idle ones polling: no `LISTEN` through the pooler)
/// run every submitted run to completion through the pooler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_and_workers_run_behind_a_transaction_mode_pooler() {
    let (url, _database) = fresh_database().await;
    let mut app = TestApp::new(Backend::Postgres)
        .with_env("DATABASE_URL", &bouncer().url_of(&url))
        .with_env("DATABASE_POOL_MODE", "transaction");
    let refused = app.command(&["migrate"]).output().expect("migrate runs");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(said.contains("DATABASE_DIRECT_URL"), "{said}");
    let migrated = app
        .command(&["migrate"])
        .env("DATABASE_DIRECT_URL", &url)
        .output()
        .expect("migrate runs");
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    app.start_api();
    app.start_worker();
    app.start_worker();
    let (status, health) = app.get("/health").await;
    assert_eq!(
        (status, health["backend"].as_str()),
        (200, Some("postgres"))
    );
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(app.submit_demo(json!({"sleep_ms": 20 * (i % 3)})).await);
    }
    for id in &ids {
        app.wait_status(id, "completed", Duration::from_secs(60))
            .await;
    }
    assert_all_running(&mut app, "after the runs");
}
