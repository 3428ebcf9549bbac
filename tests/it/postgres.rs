//! What only the PostgreSQL store has to show: the API and workers riding out a restart of the
//! database (a server of the test's own), losing no accepted run.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{
    Backend, TestApp,
    postgres::{PostgresServer, fresh_database_on},
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

fn assert_all_running(app: &mut TestApp, when: &str) {
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
