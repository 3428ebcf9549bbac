//! Redis at scale and under trouble: a large backlog, Redis outages and restarts, and chaos with
//! workers killed at random.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use serde_json::{Value, json};
use stagecraft::store::{RunFilter, RunStatus, RunStore, redis::RedisStore};

use crate::support::{Backend, RedisServer, TestApp, noop_run, stage};

async fn completed(store: &RedisStore) -> u64 {
    store
        .queue_depths()
        .await
        .expect("depths")
        .iter()
        .filter(|d| d.status == RunStatus::Completed)
        .map(|d| d.count)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_fifty_thousand_runs_drains_without_a_worker_exiting() {
    const RUNS: usize = 50_000;
    let mut app = TestApp::new(Backend::Redis);
    let store = Arc::new(open_store(&app).await);
    // Queue the backlog while no worker runs, as after an outage of the workers.
    stream::iter(0..RUNS)
        .for_each_concurrent(64, |_| {
            let store = store.clone();
            async move {
                store.insert_run(noop_run()).await.expect("insert");
            }
        })
        .await;
    app.env.insert("LOG_LEVEL".into(), "warn".into());
    app.start_worker_with(&["--concurrency", "16"]);
    app.start_worker_with(&["--concurrency", "16"]);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done = completed(&store).await;
        if done == RUNS as u64 {
            break;
        }
        for worker in &mut app.workers {
            assert!(
                worker.child.try_wait().expect("wait").is_none(),
                "a worker exited: {}",
                worker.log_text()
            );
        }
        assert!(Instant::now() < deadline, "only {done} of {RUNS} completed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for worker in &mut app.workers {
        assert!(
            worker.child.try_wait().expect("wait").is_none(),
            "a worker exited"
        );
    }
    // Workers share script calls among concurrent runs and write the indexes once per call:
    // every count, status set and lease entry must still be exact.
    let depths: Vec<_> = store
        .queue_depths()
        .await
        .expect("depths")
        .into_iter()
        .map(|d| (d.queue, d.status, d.count))
        .collect();
    assert_eq!(
        depths,
        vec![("workflows".to_owned(), RunStatus::Completed, RUNS as u64)]
    );
    for (status, expected) in [
        (RunStatus::Completed, RUNS as u64),
        (RunStatus::Queued, 0),
        (RunStatus::Running, 0),
    ] {
        let filter = RunFilter {
            status: Some(status),
            limit: 1,
            ..RunFilter::default()
        };
        let total = store.list_runs(&filter).await.expect("list").total;
        assert_eq!(total, expected, "runs listed as {status:?}");
    }
    let client = redis::Client::open(app.env["REDIS_URL"].as_str()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let prefix = &app.env["REDIS_KEY_PREFIX"];
    for key in ["leases", "queue:workflows:due"] {
        let left: u64 = redis::cmd("ZCARD")
            .arg(format!("{prefix}{key}"))
            .query_async(&mut conn)
            .await
            .expect("zcard");
        assert_eq!(left, 0, "entries left in {key}");
    }
    let finished: u64 = redis::cmd("ZCARD")
        .arg(format!("{prefix}finished"))
        .query_async(&mut conn)
        .await
        .expect("zcard");
    assert_eq!(finished, RUNS as u64);
}

/// A store handle on the app's Redis, under the app's key prefix.
async fn open_store(app: &TestApp) -> RedisStore {
    RedisStore::open(
        &app.env["REDIS_URL"],
        &app.env["REDIS_KEY_PREFIX"],
        Duration::from_secs(3600),
    )
    .await
    .expect("redis")
}

/// A deployment on a Redis server of its own, with AOF on as compose runs it.
fn app_with_own_redis() -> (TestApp, RedisServer) {
    let app = TestApp::new(Backend::Redis);
    let dir = app.dir.path().join("redis");
    std::fs::create_dir_all(&dir).expect("redis dir");
    let redis = RedisServer::start(&dir, true);
    (app.with_env("REDIS_URL", &redis.url.clone()), redis)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_workers_ride_out_a_redis_outage_and_lose_no_accepted_run() {
    let (app, mut redis) = app_with_own_redis();
    let mut app = app.with_api();
    app.start_worker();
    app.start_worker();
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(app.submit_demo(json!({"sleep_ms": 600, "steps": 2})).await);
    }
    // Some runs are under way when Redis goes down.
    app.wait_run(&ids[0], Duration::from_secs(30), |r| {
        stage(r, "one")["status"] == "completed"
    })
    .await;
    redis.stop();
    let down_at = Instant::now();

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let response = app
            .http
            .get(app.url("/health"))
            .send()
            .await
            .expect("API answers while Redis is down");
        if response.status().as_u16() == 503 {
            let body: Value = response.json().await.expect("json");
            assert_eq!(body["status"], "unhealthy");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/health never reported the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = app
        .post("/runs", &json!({"kind": "workflow", "name": "demo"}))
        .await;
    assert_eq!(status, 503, "a submit during the outage: {body}");
    assert_eq!(body["error"]["code"], "unavailable");

    // Down for a minute; every process keeps running and keeps trying.
    while down_at.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for worker in &mut app.workers {
        assert!(
            worker.child.try_wait().expect("wait").is_none(),
            "a worker exited: {}",
            worker.log_text()
        );
    }
    assert!(
        app.api
            .as_mut()
            .expect("api")
            .child
            .try_wait()
            .expect("wait")
            .is_none(),
        "the API exited"
    );

    redis.restart();
    let (status, _) = app.get("/health").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut healthy = status == 200;
    while !healthy {
        assert!(Instant::now() < deadline, "/health did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
        healthy = app.get("/health").await.0 == 200;
    }
    // Every run accepted before the outage is still there and completes.
    for id in &ids {
        app.wait_status(id, "completed", Duration::from_secs(90))
            .await;
    }
    let id = app.submit_demo(json!({})).await;
    app.wait_status(&id, "completed", Duration::from_secs(30))
        .await;
    for worker in &mut app.workers {
        assert!(
            worker.child.try_wait().expect("wait").is_none(),
            "a worker exited after the outage"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_random_worker_kills_and_a_redis_restart_lose_nothing() {
    const RUNS: usize = 200;
    let (app, mut redis) = app_with_own_redis();
    let mut app = app
        .with_env("WORKER_CONCURRENCY", "4")
        .with_env("LOG_LEVEL", "warn")
        .with_api();
    for _ in 0..3 {
        app.start_worker();
    }
    let mut ids = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        ids.push(app.submit_demo(json!({"sleep_ms": 500})).await);
    }
    let started = Instant::now();
    let mut kills = 0;
    let mut restarted_redis = false;
    let mut next_kill = Instant::now() + Duration::from_millis(1000);
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut random = move |below: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below
    };
    loop {
        let (_, list) = app.get("/runs?status=completed&limit=1").await;
        let done = list["total"].as_u64().unwrap_or(0);
        if done == RUNS as u64 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "only {done} of {RUNS} runs completed"
        );
        if Instant::now() >= next_kill {
            let victim = (random(3)) as usize;
            let live: Vec<usize> = (0..app.workers.len())
                .filter(|i| app.workers[*i].child.try_wait().ok().flatten().is_none())
                .collect();
            let index = live[victim % live.len()];
            app.workers[index].kill9();
            kills += 1;
            app.start_worker();
            next_kill = Instant::now() + Duration::from_millis(1000 + random(2000));
        }
        if !restarted_redis && done >= RUNS as u64 / 2 {
            redis.stop();
            tokio::time::sleep(Duration::from_millis(500)).await;
            redis.restart();
            restarted_redis = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(restarted_redis);

    // Every stage has exactly one committed checkpoint; every repeated execution of a stage
    // followed an interruption (a lease recovered after a kill or the Redis restart).
    let mut executions_per_stage: BTreeMap<usize, usize> = BTreeMap::new();
    let mut repeats = 0;
    for id in &ids {
        let run = app.run(id).await;
        assert_eq!(run["status"], "completed");
        let events = app.events(id).await;
        for name in ["one", "two", "three"] {
            assert_eq!(stage(&run, name)["status"], "completed");
            let commits = events
                .iter()
                .filter(|e| e["kind"] == "stage_completed" && e["stage"] == name)
                .count();
            assert_eq!(
                commits, 1,
                "run {id} stage {name} committed {commits} times"
            );
            let executions = TestApp::count(&app.ledger(id), &format!("stage {name} "));
            *executions_per_stage.entry(executions).or_default() += 1;
            repeats += executions - 1;
        }
        let recoveries = events
            .iter()
            .filter(|e| e["kind"] == "lease_recovered")
            .count();
        let stage_starts = events
            .iter()
            .filter(|e| e["kind"] == "stage_started")
            .count();
        assert!(
            stage_starts <= 3 + recoveries,
            "run {id}: {stage_starts} stage starts with only {recoveries} recoveries"
        );
    }
    eprintln!(
        "chaos: {RUNS} runs, {kills} worker kills, 1 Redis restart, {repeats} repeated stage executions, \
         executions per stage: {executions_per_stage:?}, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A Redis that lost the store's function library (restarted without its data files, or
/// `FUNCTION FLUSH`) gets it back on the next call, which then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_the_function_library_gets_it_back() {
    // A server of its own: other tests' stores would load the library again meanwhile.
    let (app, _redis) = app_with_own_redis();
    let store = open_store(&app).await;
    let client = redis::Client::open(app.env["REDIS_URL"].as_str()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let libraries = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let listed: redis::Value = redis::cmd("FUNCTION")
                .arg("LIST")
                .arg("LIBRARYNAME")
                .arg("stagecraft_*")
                .query_async(&mut conn)
                .await
                .expect("function list");
            texts(&listed).join(" ")
        }
    };
    assert!(libraries(&mut conn).await.contains("stagecraft_"));
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .expect("flush");
    assert!(!libraries(&mut conn).await.contains("stagecraft_"));

    let (run, _) = store
        .insert_run(noop_run())
        .await
        .expect("insert after flush");
    assert_eq!(
        store.get_run(run.id).await.expect("get").expect("run").id,
        run.id
    );
    assert!(libraries(&mut conn).await.contains("stagecraft_"));
}

/// Every text inside a Redis answer, depth first.
fn texts(value: &redis::Value) -> Vec<String> {
    match value {
        redis::Value::BulkString(bytes) => vec![String::from_utf8_lossy(bytes).into_owned()],
        redis::Value::SimpleString(text) => vec![text.clone()],
        redis::Value::Array(items) | redis::Value::Set(items) => {
            items.iter().flat_map(texts).collect()
        }
        redis::Value::Map(pairs) => pairs
            .iter()
            .flat_map(|(k, v)| texts(k).into_iter().chain(texts(v)))
            .collect(),
        _ => Vec::new(),
    }
}
