//! What scaling out costs (`BENCH_ONLY=scale`):
//!
//! - the Redis drain (BENCH_REDIS_RUNS queued `noop` runs, one worker process × 16) on a
//!   primary with one replica, with `REDIS_DURABLE_ACKS=1` (every change waits for the replica:
//!   `WAIT 1`) beside the same drain without it, alternated, and the median of their ratios;
//! - a studio `full_production` (mock providers, four scenes) from submission to completion
//!   through the API and one worker, with artifacts in S3-compatible object storage (`s3s-fs`
//!   on loopback, installed by `make test-deps`) beside a local directory, alternated.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;
use stagecraft::store::RunStatus;

use super::{Backend, Deployment, RedisServer, env_number, median, print_table};

/// A process stopped with the bench.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn wait_listening(port: u16) {
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs/s of one worker through `runs` queued noop runs, with `durable_acks` replicas awaited.
async fn drain(redis: &RedisServer, runs: usize, durable_acks: u32) -> f64 {
    let mut deployment = Deployment::new(Backend::Redis, Some(redis)).await;
    deployment
        .env
        .push(("REDIS_DURABLE_ACKS".to_owned(), durable_acks.to_string()));
    deployment.queue_noops(runs).await;
    let started = Instant::now();
    deployment.spawn(&["worker", "--queues", "workflows", "--concurrency", "16"]);
    while deployment.count(RunStatus::Completed).await < runs as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    runs as f64 / started.elapsed().as_secs_f64()
}

/// The S3-compatible test server, when installed.
fn s3_server(dir: &Path) -> Option<(Server, String)> {
    let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/s3s-fs");
    if !binary.is_file() {
        eprintln!(
            "s3s-fs is not installed (make test-deps): the studio is measured on local files only"
        );
        return None;
    }
    let port = free_port();
    let root = dir.join("s3");
    std::fs::create_dir_all(root.join("bench")).expect("bucket");
    let child = Command::new(binary)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", "bench", "--secret-key", "bench-secret-key"])
        .arg(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("s3s-fs");
    wait_listening(port);
    Some((Server(child), format!("http://127.0.0.1:{port}")))
}

/// Seconds from submitting a `full_production` to its completion, API and one worker started
/// first; artifacts in the bucket when `endpoint` is given.
async fn studio_run(redis: &RedisServer, endpoint: Option<&str>) -> f64 {
    let mut deployment = Deployment::new(Backend::Redis, Some(redis)).await;
    if let Some(endpoint) = endpoint {
        let prefix = format!("s3://bench/{}", uuid::Uuid::new_v4().simple());
        for (key, value) in [
            ("ARTIFACT_STORE_URL", prefix.as_str()),
            ("AWS_ENDPOINT_URL", endpoint),
            ("AWS_ACCESS_KEY_ID", "bench"),
            ("AWS_SECRET_ACCESS_KEY", "bench-secret-key"),
            ("AWS_ALLOW_HTTP", "true"),
        ] {
            deployment.env.push((key.to_owned(), value.to_owned()));
        }
    }
    let (_, line) = deployment.spawn(&["serve"]);
    let base = line.trim().rsplit(' ').next().expect("url").to_owned();
    deployment.spawn(&["worker", "--queues", "workflows"]);
    let client = reqwest::Client::new();
    let started = Instant::now();
    let answer: serde_json::Value = client
        .post(format!("{base}/workflows/full_production/run"))
        .json(
            &json!({"inputs": {"user_request": "Bench at dawn", "total_budget": 50.0,
                                  "num_pilots": 1, "target_duration_secs": 8, "num_scenes": 4},
                      "async": true}),
        )
        .send()
        .await
        .expect("submit")
        .json()
        .await
        .expect("json");
    let id = answer["run_id"].as_str().expect("run_id").to_owned();
    loop {
        let run: serde_json::Value = client
            .get(format!("{base}/runs/{id}"))
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("json");
        match run["status"].as_str() {
            Some("completed") => break,
            Some("failed" | "cancelled") => panic!("studio run ended {run}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    started.elapsed().as_secs_f64()
}

pub async fn section(repeats: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(dir.path());
    let _replica = redis.replica(&dir.path().join("replica"));
    let runs = env_number("BENCH_REDIS_RUNS", 20_000);
    let (mut plain, mut durable, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeats {
        let without = drain(&redis, runs, 0).await;
        let with = drain(&redis, runs, 1).await;
        eprintln!("drain: {without:.0} runs/s plain, {with:.0} runs/s with REDIS_DURABLE_ACKS=1");
        ratios.push(with / without);
        plain.push(without);
        durable.push(with);
    }
    let mut rows = BTreeMap::new();
    rows.insert(
        0,
        (
            format!("Redis drain, {runs} noop runs, 1 worker × 16, primary + 1 replica"),
            format!("{:.0} runs/s", median(&mut plain)),
        ),
    );
    rows.insert(
        1,
        (
            "the same with REDIS_DURABLE_ACKS=1 (WAIT 1 after every change)".to_owned(),
            format!(
                "{:.0} runs/s, {:.2}× the plain drain (median of ratios)",
                median(&mut durable),
                median(&mut ratios)
            ),
        ),
    );
    let s3 = s3_server(dir.path());
    let (mut local, mut objects, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeats {
        let on_disk = studio_run(&redis, None).await;
        local.push(on_disk);
        if let Some((_, endpoint)) = &s3 {
            let in_bucket = studio_run(&redis, Some(endpoint)).await;
            eprintln!("studio run: {on_disk:.2} s local, {in_bucket:.2} s in object storage");
            objects.push(in_bucket);
            ratios.push(in_bucket / on_disk);
        }
    }
    rows.insert(
        2,
        (
            "studio full_production (4 scenes, mock providers), artifacts in a local directory"
                .to_owned(),
            format!("{:.2} s", median(&mut local)),
        ),
    );
    if !objects.is_empty() {
        rows.insert(
            3,
            (
                "the same with artifacts in S3-compatible object storage (s3s-fs, loopback)"
                    .to_owned(),
                format!(
                    "{:.2} s, {:.2}× the local run (median of ratios)",
                    median(&mut objects),
                    median(&mut ratios)
                ),
            ),
        );
    }
    print_table(&format!("Scaling out (medians of {repeats})"), &rows);
}
