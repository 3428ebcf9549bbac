//! `make bench`: throughput, latency and recovery of the embedded (SQLite) backend, measured
//! with real worker processes. Prints a Markdown table of medians and percentiles.
//!
//! Sections (sizes can be changed with BENCH_RUNS, BENCH_LATENCY_RUNS, BENCH_REPEATS):
//! - drain: N one-stage `noop` runs already queued, then 1 and then 2 worker processes; runs/s
//!   until all are completed (claim, lease, checkpoint and status writes included);
//! - start latency: an idle worker, runs submitted through the HTTP API one at a time; time from
//!   the run's creation to its stage's start, p50/p99;
//! - checkpoint commit: p50/p99 of one stage checkpoint commit (fenced transaction) on the file;
//! - recovery: SIGKILL of a worker mid-stage with the default lease (10 s) and sweep (5 s), to the
//!   stage restarting in another worker process.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::json;
use stagecraft::{
    clock::SystemClock,
    config::{ProviderMode, sqlite_url_for},
    ids::{RunId, WorkerId},
    store::{
        NewRun, RunKind, RunStatus, RunStore, StageCheckpoint, StageStatus, sqlite::SqliteStore,
    },
};

const BIN: &str = env!("CARGO_BIN_EXE_stagecraft");

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    percentile(values, 50.0)
}

struct Deployment {
    dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    children: Vec<Child>,
}

impl Deployment {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = sqlite_url_for(&dir.path().join("data/stagecraft.db"));
        let store = Arc::new(
            SqliteStore::open(&url, Arc::new(SystemClock))
                .await
                .expect("store"),
        );
        Self {
            dir,
            store,
            children: Vec::new(),
        }
    }

    fn spawn(&mut self, args: &[&str], env: &[(&str, &str)]) -> usize {
        let dir = self.dir.path();
        let child = Command::new(BIN)
            .args(args)
            .env("DATA_DIR", dir.join("data"))
            .env("ARTIFACT_DIR", dir.join("artifacts"))
            .env("PORT", "0")
            .env("LOG_LEVEL", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn stagecraft");
        self.children.push(child);
        self.children.len() - 1
    }

    fn kill(&mut self, index: usize) {
        let _ = self.children[index].kill();
        let _ = self.children[index].wait();
    }

    async fn queue(&self, name: &str, inputs: serde_json::Value, stages: &[&str]) -> RunId {
        let run = NewRun {
            id: RunId::generate(),
            kind: RunKind::Workflow,
            name: name.to_owned(),
            queue: "workflows".to_owned(),
            inputs,
            provider_mode: ProviderMode::Mock,
            budget_usd: None,
            stage_names: stages.iter().map(|s| s.to_string()).collect(),
            idempotency_key: None,
        };
        self.store.insert_run(run).await.expect("insert").0.id
    }

    async fn count(&self, status: RunStatus) -> u64 {
        self.store
            .queue_depths()
            .await
            .expect("depths")
            .iter()
            .filter(|d| d.status == status)
            .map(|d| d.count)
            .sum()
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn drain(runs: usize, workers: usize) -> f64 {
    let mut deployment = Deployment::new().await;
    for _ in 0..runs {
        deployment.queue("noop", json!({}), &["noop"]).await;
    }
    let started = Instant::now();
    for _ in 0..workers {
        deployment.spawn(
            &["worker", "--queues", "workflows", "--concurrency", "16"],
            &[],
        );
    }
    while deployment.count(RunStatus::Completed).await < runs as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    runs as f64 / started.elapsed().as_secs_f64()
}

async fn start_latency(runs: usize) -> (f64, f64) {
    let mut deployment = Deployment::new().await;
    let api = deployment.spawn(&["serve"], &[]);
    deployment.spawn(&["worker"], &[]);
    let stdout = deployment.children[api].stdout.take().expect("stdout");
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("address");
        line
    })
    .await
    .expect("join");
    let base = line.trim().rsplit(' ').next().expect("url").to_owned();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..runs {
        let response: serde_json::Value = client
            .post(format!("{base}/runs"))
            .json(&json!({"kind": "workflow", "name": "noop"}))
            .send()
            .await
            .expect("submit")
            .json()
            .await
            .expect("json");
        ids.push(RunId::parse(response["run_id"].as_str().expect("id")).expect("uuid"));
        // An idle worker between submissions: what a lone submission sees.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while deployment.count(RunStatus::Completed).await < runs as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut latencies = Vec::new();
    for id in ids {
        let run = deployment
            .store
            .get_run(id)
            .await
            .expect("get")
            .expect("run");
        let started = run.stages[0].started_at.expect("started");
        latencies.push((started - run.created_at).num_microseconds().unwrap_or(0) as f64 / 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    (percentile(&latencies, 50.0), percentile(&latencies, 99.0))
}

async fn checkpoint_commit(samples: usize) -> (f64, f64) {
    let deployment = Deployment::new().await;
    let worker = WorkerId::for_this_process("bench");
    let queues = vec!["workflows".to_owned()];
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        deployment.queue("noop", json!({}), &["noop"]).await;
        let claimed = deployment
            .store
            .claim(&queues, &worker, Duration::from_secs(10))
            .await
            .expect("claim")
            .expect("a run");
        deployment
            .store
            .start_stage(&claimed.lease, 0)
            .await
            .expect("start");
        let checkpoint = StageCheckpoint {
            output: json!({"ok": true}),
            artifacts: vec![],
            cost_usd: 0.0,
            run_result: Some(json!({})),
        };
        let started = Instant::now();
        deployment
            .store
            .commit_stage(&claimed.lease, 0, checkpoint)
            .await
            .expect("commit");
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    (percentile(&latencies, 50.0), percentile(&latencies, 99.0))
}

async fn recovery() -> f64 {
    let mut deployment = Deployment::new().await;
    let id = deployment
        .queue(
            "demo",
            json!({"sleep_ms": 120_000}),
            &["one", "two", "three"],
        )
        .await;
    let first = deployment.spawn(&["worker"], &[]);
    loop {
        let run = deployment
            .store
            .get_run(id)
            .await
            .expect("get")
            .expect("run");
        if run.stages[0].status == StageStatus::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    deployment.kill(first);
    let killed = Instant::now();
    deployment.spawn(&["worker"], &[]);
    loop {
        let run = deployment
            .store
            .get_run(id)
            .await
            .expect("get")
            .expect("run");
        if run.stages[0].attempts >= 2 {
            return killed.elapsed().as_secs_f64();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn git_describe(dir: &Path) -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(dir)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() {
    let runs = env_number("BENCH_RUNS", 5000);
    let latency_runs = env_number("BENCH_LATENCY_RUNS", 200);
    let repeats = env_number("BENCH_REPEATS", 3).max(1);
    let mut table: BTreeMap<usize, (String, String)> = BTreeMap::new();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    eprintln!(
        "stagecraft bench, commit {}, {cpus} cpus, {repeats} repeats",
        git_describe(Path::new(env!("CARGO_MANIFEST_DIR")))
    );

    for (row, workers) in [(0, 1), (1, 2)] {
        let mut rates = Vec::new();
        for _ in 0..repeats {
            rates.push(drain(runs, workers).await);
        }
        let rate = median(&mut rates);
        eprintln!("drain with {workers} worker(s): {rates:.0?} runs/s");
        table.insert(
            row,
            (
                format!("drain, {runs} queued noop runs, {workers} worker process(es) × 16"),
                format!("{rate:.0} runs/s (median of {repeats})"),
            ),
        );
    }
    let (p50, p99) = start_latency(latency_runs).await;
    table.insert(
        2,
        (
            format!("submit → stage start, idle worker, {latency_runs} runs"),
            format!("p50 {p50:.1} ms, p99 {p99:.1} ms"),
        ),
    );
    let (p50, p99) = checkpoint_commit(2000).await;
    table.insert(
        3,
        (
            "checkpoint commit (fenced transaction), 2000 commits".to_owned(),
            format!("p50 {p50:.2} ms, p99 {p99:.2} ms"),
        ),
    );
    let mut recoveries = Vec::new();
    for _ in 0..repeats {
        recoveries.push(recovery().await);
    }
    let recovered = median(&mut recoveries);
    eprintln!("recovery: {recoveries:.1?} s");
    table.insert(
        4,
        (
            "recovery: SIGKILL → stage restarts elsewhere (lease 10 s, sweep 5 s)".to_owned(),
            format!("{recovered:.1} s (median of {repeats})"),
        ),
    );

    println!("| SQLite backend | result |");
    println!("|---|---|");
    for (measure, result) in table.values() {
        println!("| {measure} | {result} |");
    }
}
