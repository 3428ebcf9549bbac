//! `make bench`: throughput, latency, recovery and memory of both backends, measured with real
//! `stagecraft` processes (release build) and, for Redis, a local `redis-server`. Prints one
//! Markdown table per backend. Every run writes a stage checkpoint and status changes.
//!
//! Sizes: BENCH_RUNS (SQLite drain, default 5000), BENCH_REDIS_RUNS (Redis drain, 20000),
//! BENCH_SUBMITS (HTTP submits, 10000), BENCH_LATENCY_RUNS (200), BENCH_REPEATS (3).
//! BENCH_ONLY=sqlite|redis|postgres runs one backend (postgres: BENCH_PG_RUNS, 20000, on a
//! `postgres` the bench starts as the tests do), BENCH_ONLY=redis-drain|postgres-drain only that
//! store's drains, BENCH_ONLY=drains the three stores' drains alternated on the same minutes;
//! BENCH_REDIS_STATS=1 prints Redis's per-command statistics after each Redis drain.
//! BENCH_ONLY=versus alternates this build's drains with another build's (BENCH_PEER_BIN, its
//! `stagecraft`; BENCH_VERSUS_STORE `sqlite` (default), `redis` or `postgres`): a change's cost.
//! BENCH_ONLY=streams measures only submissions beside open event streams (BENCH_STREAMS, 500;
//! BENCH_STREAM_SUBMITS, 3000) on both stores. BENCH_ONLY=list measures only the run list with
//! BENCH_LIST_RUNS (1,000,000) stored runs on SQLite, Redis and PostgreSQL (BENCH_LIST_STORES,
//! e.g. `postgres`, picks some; `engine/list.rs`). BENCH_ONLY=scale
//! measures what scaling out costs: durable acknowledgements on a replicated Redis, and a
//! studio run with artifacts in object storage (`engine/scale.rs`).
//!
//! - drain: N one-stage `noop` runs already queued, then 1 and then 2 worker processes
//!   (concurrency 16); runs/s until all are completed, and on Redis the CPU time per run of
//!   Redis and of the workers;
//! - submit: `POST /runs` from a bounded load generator (64 connections) on loopback; rate and
//!   client-side latency;
//! - start latency: time from a run's creation (store clock) to its stage's start (store clock),
//!   for an idle worker (SQLite) and at a steady 200 runs/s (Redis);
//! - checkpoint commit: p50/p99 of one fenced stage commit;
//! - recovery: SIGKILL of a worker mid-stage with the default lease (10 s) and sweep (5 s), to
//!   the stage restarting in another worker process;
//! - memory: resident set size of an idle worker, a busy worker (peak during the drain) and the
//!   API (after the submit load);
//! - peer: BullMQ (`benches/peers/bullmq`, run by Node.js) with the same protocol on the same
//!   Redis, its drain and pickup each right after Stagecraft's, the drains reported with the
//!   median of their ratios (the machine's speed changes within minutes; the ratio is what
//!   carries over) and the CPU time per job.

use std::{
    collections::BTreeMap,
    io::BufRead,
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use serde_json::json;
use stagecraft::{
    clock::SystemClock,
    config::{ProviderMode, sqlite_url_for},
    ids::{RunId, WorkerId},
    store::{
        NewRun, RunKind, RunStatus, RunStore, StageCheckpoint, StageStatus,
        postgres::PostgresStore, redis::RedisStore, sqlite::SqliteStore,
    },
};

#[path = "engine/list.rs"]
mod list;
/// The tests' PostgreSQL server: one per bench run, a fresh database per deployment.
#[path = "../tests/it/support/postgres.rs"]
mod pg_server;
#[path = "engine/scale.rs"]
mod scale;

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

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = s.rsplit_once(')')?.1.to_owned();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let user: f64 = fields.get(11)?.parse().ok()?;
            let system: f64 = fields.get(12)?.parse().ok()?;
            Some(user + system)
        })
        .unwrap_or(f64::NAN);
    // Linux reports in clock ticks of 1/100 s on every platform this runs on.
    ticks / 100.0
}

/// Redis's CPU seconds (user + system) so far, from INFO cpu.
async fn redis_cpu_seconds(server: &RedisServer) -> f64 {
    let info = redis_command(server, &["INFO", "cpu"]).await;
    info.lines()
        .filter_map(|line| line.trim().split_once(':'))
        .filter(|(name, _)| *name == "used_cpu_user" || *name == "used_cpu_sys")
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum()
}

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Sqlite,
    Redis,
    Postgres,
}

/// A local redis-server for the Redis section.
struct RedisServer {
    child: Child,
    port: u16,
    url: String,
}

impl RedisServer {
    fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// A server with extra command-line settings (`--replicaof …`), answering before this
    /// returns.
    fn start_with(dir: &Path, extra: &[&str]) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        std::fs::create_dir_all(dir).expect("redis dir");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--maxmemory-policy", "noeviction"])
            .args(extra)
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            url: format!("redis://127.0.0.1:{port}/0"),
        }
    }

    /// A replica of this server, in sync before this returns.
    fn replica(&self, dir: &Path) -> Self {
        let primary = self.port.to_string();
        let replica = Self::start_with(dir, &["--replicaof", "127.0.0.1", &primary]);
        loop {
            let info = Command::new("redis-cli")
                .args(["-p", &replica.port.to_string(), "INFO", "replication"])
                .output()
                .expect("redis-cli");
            if String::from_utf8_lossy(&info.stdout).contains("master_link_status:up") {
                return replica;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Deployment {
    _dir: tempfile::TempDir,
    /// Drops a PostgreSQL deployment's database with it.
    _database: Option<Box<dyn std::any::Any + Send>>,
    store: Arc<dyn RunStore>,
    env: Vec<(String, String)>,
    children: Vec<Child>,
    /// The `stagecraft` binary its processes run: this build's, or a peer build's.
    bin: String,
}

impl Deployment {
    async fn new(backend: Backend, redis: Option<&RedisServer>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut env = vec![
            (
                "DATA_DIR".to_owned(),
                dir.path().join("data").display().to_string(),
            ),
            (
                "ARTIFACT_DIR".to_owned(),
                dir.path().join("artifacts").display().to_string(),
            ),
            ("PORT".to_owned(), "0".to_owned()),
            ("LOG_LEVEL".to_owned(), "warn".to_owned()),
        ];
        let mut database = None;
        let store: Arc<dyn RunStore> = match backend {
            Backend::Sqlite => {
                let url = sqlite_url_for(&dir.path().join("data/stagecraft.db"));
                Arc::new(
                    SqliteStore::open(&url, Arc::new(SystemClock))
                        .await
                        .expect("store"),
                )
            }
            Backend::Redis => {
                let url = &redis.expect("redis").url;
                let prefix = format!("bench{}:", uuid::Uuid::new_v4().simple());
                env.push(("QUEUE_BACKEND".to_owned(), "redis".to_owned()));
                env.push(("REDIS_URL".to_owned(), url.clone()));
                env.push(("REDIS_KEY_PREFIX".to_owned(), prefix.clone()));
                Arc::new(
                    RedisStore::open(url, &prefix, Duration::from_secs(86_400))
                        .await
                        .expect("redis"),
                )
            }
            Backend::Postgres => {
                let (url, guard) = pg_server::fresh_database().await;
                database = Some(guard);
                env.push(("QUEUE_BACKEND".to_owned(), "postgres".to_owned()));
                env.push(("DATABASE_URL".to_owned(), url.clone()));
                Arc::new(
                    PostgresStore::open(&url, Arc::new(SystemClock))
                        .await
                        .expect("postgres"),
                )
            }
        };
        Self {
            _dir: dir,
            _database: database,
            store,
            env,
            children: Vec::new(),
            bin: BIN.to_owned(),
        }
    }

    /// Starts a process and waits for its first line (address or readiness).
    fn spawn(&mut self, args: &[&str]) -> (usize, String) {
        let mut child = Command::new(&self.bin)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn stagecraft");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("process started");
        self.children.push(child);
        (self.children.len() - 1, line)
    }

    fn pid(&self, index: usize) -> u32 {
        self.children[index].id()
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
            request_hash: None,
            reuse: false,
        };
        self.store.insert_run(run).await.expect("insert").0.id
    }

    async fn queue_noops(&self, runs: usize) {
        stream::iter(0..runs)
            .for_each_concurrent(32, |_| async {
                self.queue("noop", json!({}), &["noop"]).await;
            })
            .await;
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

/// BullMQ, measured with this bench's protocol on the same `redis-server` and alternated with
/// Stagecraft's own measures, so the machine's changing speed weighs on both alike
/// (`benches/peers/bullmq`; `make bench` installs its packages when npm is there).
struct BullMq {
    script: std::path::PathBuf,
}

impl BullMq {
    /// The peer, or why it cannot be measured here.
    fn find() -> Result<Self, String> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/bullmq");
        if !dir.join("node_modules/bullmq").is_dir() {
            return Err(format!(
                "its packages are not installed (npm install --prefix {} --no-save)",
                dir.display()
            ));
        }
        match Command::new("node").arg("--version").output() {
            Ok(output) if output.status.success() => Ok(Self {
                script: dir.join("bench.mjs"),
            }),
            _ => Err("node is not installed (apt-get install nodejs npm)".to_owned()),
        }
    }

    /// One mode of the peer's script; its answer is one JSON line.
    async fn run(&self, redis: &RedisServer, args: &[&str]) -> serde_json::Value {
        let output = tokio::process::Command::new("node")
            .arg(&self.script)
            .arg(&redis.url)
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .await
            .expect("node");
        assert!(output.status.success(), "bullmq bench {args:?} failed");
        serde_json::from_slice(&output.stdout).expect("bullmq bench answer")
    }

    /// One worker process of concurrency 16 through `jobs` queued no-op jobs: its rate, its
    /// resident memory at the end, and the CPU time per job of Redis and of the worker.
    async fn drain(&self, redis: &RedisServer, jobs: usize) -> Drained {
        let count = jobs.to_string();
        self.run(redis, &["fill", &count]).await;
        let redis_cpu_before = redis_cpu_seconds(redis).await;
        let answer = self.run(redis, &["drain", &count, "16"]).await;
        let redis_cpu = redis_cpu_seconds(redis).await - redis_cpu_before;
        Drained {
            rate: answer["rate"].as_f64().expect("rate"),
            peak_rss: answer["rss_mb"].as_f64().expect("rss"),
            cpu_per_run: Some((
                redis_cpu * 1e6 / jobs as f64,
                answer["cpu_us"].as_f64().expect("cpu") / jobs as f64,
            )),
        }
    }

    /// p50 and p99 in ms from adding a job to its processor starting, at a steady rate.
    async fn pickup(&self, redis: &RedisServer, jobs: usize, per_second: f64) -> (f64, f64) {
        let answer = self
            .run(
                redis,
                &["pickup", &jobs.to_string(), &per_second.to_string()],
            )
            .await;
        (
            answer["p50_ms"].as_f64().expect("p50"),
            answer["p99_ms"].as_f64().expect("p99"),
        )
    }
}

/// CPU time per run over several drains: Redis's and the worker processes'.
#[derive(Default)]
struct CpuPerRun {
    redis: Vec<f64>,
    workers: Vec<f64>,
}

impl CpuPerRun {
    fn add(&mut self, drained: &Drained) {
        let (redis, workers) = drained.cpu_per_run.expect("CPU per run (a Redis drain)");
        self.redis.push(redis);
        self.workers.push(workers);
    }

    /// The medians, as a table cell.
    fn cell(&mut self) -> String {
        format!(
            "{:.0} µs + {:.0} µs",
            median(&mut self.redis),
            median(&mut self.workers)
        )
    }
}

/// What one drain measured.
struct Drained {
    /// Runs per second until all were completed.
    rate: f64,
    /// Peak resident memory of the first worker while it worked, MB.
    peak_rss: f64,
    /// On Redis: CPU time per run of Redis and of the workers, µs (steadier than the rate on a
    /// shared machine).
    cpu_per_run: Option<(f64, f64)>,
}

async fn drain(
    backend: Backend,
    redis: Option<&RedisServer>,
    runs: usize,
    workers: usize,
) -> Drained {
    drain_with(BIN, backend, redis, runs, workers).await
}

/// [`drain`] with the workers of the `stagecraft` binary `bin`.
async fn drain_with(
    bin: &str,
    backend: Backend,
    redis: Option<&RedisServer>,
    runs: usize,
    workers: usize,
) -> Drained {
    let mut deployment = Deployment::new(backend, redis).await;
    deployment.bin = bin.to_owned();
    deployment.queue_noops(runs).await;
    let stats = std::env::var_os("BENCH_REDIS_STATS").is_some();
    let mut redis_cpu_before = 0.0;
    if let Some(server) = redis {
        if stats {
            redis_command(server, &["CONFIG", "RESETSTAT"]).await;
        }
        redis_cpu_before = redis_cpu_seconds(server).await;
    }
    let started = Instant::now();
    let mut first = None;
    for _ in 0..workers {
        let (index, _) =
            deployment.spawn(&["worker", "--queues", "workflows", "--concurrency", "16"]);
        first.get_or_insert(index);
    }
    let mut peak_rss: f64 = 0.0;
    // Poll the count rarely: on SQLite the count scans the runs, and the bench must not steal
    // the workers' CPU (2 cores). 50 ms is under 1% of any drain measured here.
    while deployment.count(RunStatus::Completed).await < runs as u64 {
        if let Some(index) = first {
            peak_rss = peak_rss.max(rss_mb(deployment.pid(index)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rate = runs as f64 / started.elapsed().as_secs_f64();
    let mut cpu_per_run = None;
    if let Some(server) = redis {
        if stats {
            // Where Redis spent its time: calls and microseconds per command during the drain.
            eprintln!("{}", redis_command(server, &["INFO", "commandstats"]).await);
        }
        let redis_cpu = redis_cpu_seconds(server).await - redis_cpu_before;
        let workers_cpu: f64 = (0..deployment.children.len())
            .map(|index| cpu_seconds(deployment.pid(index)))
            .sum();
        cpu_per_run = Some((
            redis_cpu * 1e6 / runs as f64,
            workers_cpu * 1e6 / runs as f64,
        ));
    }
    Drained {
        rate,
        peak_rss,
        cpu_per_run,
    }
}

/// One command on the bench's Redis, answered as text (BENCH_REDIS_STATS diagnostics).
async fn redis_command(server: &RedisServer, args: &[&str]) -> String {
    let client = redis::Client::open(server.url.as_str()).expect("redis url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    let answer: redis::Value = command.query_async(&mut connection).await.expect("command");
    match answer {
        redis::Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        redis::Value::VerbatimString { text, .. } => text,
        other => format!("{other:?}"),
    }
}

/// Submits `total` noop runs with `connections` concurrent clients; answers the rate, p50 and
/// p99 latency in ms, and the API's RSS afterwards, plus the idle worker's RSS.
async fn submit_load(
    backend: Backend,
    redis: Option<&RedisServer>,
    total: usize,
    connections: usize,
) -> (f64, f64, f64, f64) {
    submit_beside_streams(backend, redis, total, connections, 0).await
}

/// Submit rate and latency while `streams` event streams are open on runs no worker takes
/// (each stream watches a run of its own, so the API's watcher follows `streams` runs).
async fn submit_beside_streams(
    backend: Backend,
    redis: Option<&RedisServer>,
    total: usize,
    connections: usize,
    streams: usize,
) -> (f64, f64, f64, f64) {
    let mut deployment = Deployment::new(backend, redis).await;
    let (api, line) = deployment.spawn(&["serve"]);
    let base = line.trim().rsplit(' ').next().expect("url").to_owned();
    let watcher = reqwest::Client::builder()
        .pool_max_idle_per_host(streams)
        .build()
        .expect("client");
    let mut open = Vec::with_capacity(streams);
    for _ in 0..streams {
        let id = deployment.queue("noop", json!({}), &["noop"]).await;
        let response = watcher
            .get(format!("{base}/runs/{id}/events"))
            .send()
            .await
            .expect("stream");
        assert_eq!(response.status().as_u16(), 200);
        open.push(response);
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()
        .expect("client");
    let started = Instant::now();
    let latencies: Vec<f64> = stream::iter(0..total)
        .map(|_| {
            let client = client.clone();
            let url = format!("{base}/runs");
            async move {
                let sent = Instant::now();
                let response = client
                    .post(url)
                    .json(&json!({"kind": "workflow", "name": "noop"}))
                    .send()
                    .await
                    .expect("submit");
                assert_eq!(response.status().as_u16(), 201);
                sent.elapsed().as_secs_f64() * 1000.0
            }
        })
        .buffer_unordered(connections)
        .collect()
        .await;
    let rate = total as f64 / started.elapsed().as_secs_f64();
    let mut sorted = latencies;
    sorted.sort_by(f64::total_cmp);
    let api_rss = rss_mb(deployment.pid(api));
    drop(open);
    (
        rate,
        percentile(&sorted, 50.0),
        percentile(&sorted, 99.0),
        api_rss,
    )
}

/// Start latency for runs submitted at `per_second` through the API (one at a time when idle).
async fn start_latency(
    backend: Backend,
    redis: Option<&RedisServer>,
    runs: usize,
    per_second: f64,
) -> (f64, f64, f64) {
    let mut deployment = Deployment::new(backend, redis).await;
    let (_, line) = deployment.spawn(&["serve"]);
    let base = line.trim().rsplit(' ').next().expect("url").to_owned();
    let (worker, _) = deployment.spawn(&["worker", "--concurrency", "16"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle_rss = rss_mb(deployment.pid(worker));
    let client = reqwest::Client::new();
    let interval = Duration::from_secs_f64(1.0 / per_second);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut ids = Vec::new();
    for _ in 0..runs {
        ticker.tick().await;
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
    (
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        idle_rss,
    )
}

async fn checkpoint_commit(
    backend: Backend,
    redis: Option<&RedisServer>,
    samples: usize,
) -> (f64, f64) {
    let deployment = Deployment::new(backend, redis).await;
    let worker = WorkerId::for_this_process("bench");
    let queues = vec!["workflows".to_owned()];
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        deployment.queue("noop", json!({}), &["noop"]).await;
        let claimed = deployment
            .store
            .claim(&queues, &worker, Duration::from_secs(10), 1)
            .await
            .expect("claim")
            .pop()
            .expect("a run");
        deployment
            .store
            .start_stage(&claimed.lease, 0)
            .await
            .expect("start");
        let checkpoint = StageCheckpoint {
            output: json!({"ok": true}),
            artifacts: vec![],
            cost_usd: stagecraft::money::Usd::ZERO,
            run_result: Some(json!({})),
            reused_from: None,
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

async fn recovery(backend: Backend, redis: Option<&RedisServer>) -> f64 {
    let mut deployment = Deployment::new(backend, redis).await;
    let id = deployment
        .queue(
            "demo",
            json!({"sleep_ms": 120_000}),
            &["one", "two", "three"],
        )
        .await;
    let (first, _) = deployment.spawn(&["worker"]);
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
    deployment.spawn(&["worker"]);
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

fn print_table(title: &str, rows: &BTreeMap<usize, (String, String)>) {
    println!();
    println!("| {title} | result |");
    println!("|---|---|");
    for (measure, result) in rows.values() {
        println!("| {measure} | {result} |");
    }
}

/// Submissions with and without 500 open event streams, alternated, and their ratio (the
/// streams must not slow submissions more than twofold).
async fn streams_rows(
    rows: &mut BTreeMap<usize, (String, String)>,
    row: usize,
    backend: Backend,
    redis: Option<&RedisServer>,
    repeats: usize,
) {
    let submits = env_number("BENCH_STREAM_SUBMITS", 3000);
    let streams = env_number("BENCH_STREAMS", 500);
    let (mut bare, mut beside) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        bare.push(
            submit_beside_streams(backend, redis, submits, 64, 0)
                .await
                .0,
        );
        beside.push(
            submit_beside_streams(backend, redis, submits, 64, streams)
                .await
                .0,
        );
    }
    eprintln!("submits without streams {bare:.0?}, beside {streams} streams {beside:.0?} runs/s");
    let (bare, beside) = (median(&mut bare), median(&mut beside));
    rows.insert(
        row,
        (
            format!(
                "submit ({}), {submits} POSTs from 64 connections, beside {streams} open event streams",
                match backend {
                    Backend::Sqlite => "SQLite",
                    Backend::Redis => "Redis",
                    Backend::Postgres => "PostgreSQL",
                }
            ),
            format!(
                "{beside:.0} runs/s ({bare:.0} without them: {:.2}× slower)",
                bare / beside.max(f64::MIN_POSITIVE)
            ),
        ),
    );
}

/// Rows 0 and 1: the drain of `runs` queued noop runs by one and by two worker processes.
async fn drain_rows(
    rows: &mut BTreeMap<usize, (String, String)>,
    backend: Backend,
    runs: usize,
    repeats: usize,
) {
    for (row, workers) in [(0, 1), (1, 2)] {
        let mut rates = Vec::new();
        for _ in 0..repeats {
            rates.push(drain(backend, None, runs, workers).await.rate);
        }
        eprintln!("drain with {workers} worker(s): {rates:.0?} runs/s");
        rows.insert(
            row,
            (
                format!("drain, {runs} queued noop runs, {workers} worker process(es) × 16"),
                format!("{:.0} runs/s", median(&mut rates)),
            ),
        );
    }
}

async fn sqlite_section(repeats: usize) {
    let runs = env_number("BENCH_RUNS", 5000);
    let latency_runs = env_number("BENCH_LATENCY_RUNS", 200);
    let mut rows = BTreeMap::new();
    drain_rows(&mut rows, Backend::Sqlite, runs, repeats).await;
    streams_rows(&mut rows, 10, Backend::Sqlite, None, repeats).await;
    let (p50, p99, _) = start_latency(Backend::Sqlite, None, latency_runs, 20.0).await;
    rows.insert(
        2,
        (
            format!("submit → stage start, idle worker, {latency_runs} runs at 20/s"),
            format!("p50 {p50:.1} ms, p99 {p99:.1} ms"),
        ),
    );
    let (p50, p99) = checkpoint_commit(Backend::Sqlite, None, 2000).await;
    rows.insert(
        3,
        (
            "checkpoint commit (fenced transaction), 2000 commits".to_owned(),
            format!("p50 {p50:.2} ms, p99 {p99:.2} ms"),
        ),
    );
    let mut recoveries = Vec::new();
    for _ in 0..repeats {
        recoveries.push(recovery(Backend::Sqlite, None).await);
    }
    eprintln!("sqlite recovery: {recoveries:.1?} s");
    rows.insert(
        4,
        (
            "recovery: SIGKILL → stage restarts elsewhere (lease 10 s, sweep 5 s)".to_owned(),
            format!("{:.1} s", median(&mut recoveries)),
        ),
    );
    print_table(&format!("SQLite backend (medians of {repeats})"), &rows);
}

/// The PostgreSQL store: drains with one and two workers, submissions, pickup at a steady
/// rate, and recovery, on one `postgres` (`BENCH_PG_RUNS`, default 20,000 runs per drain).
async fn postgres_section(repeats: usize) {
    let runs = env_number("BENCH_PG_RUNS", 20_000);
    let submits = env_number("BENCH_SUBMITS", 10_000);
    let mut rows = BTreeMap::new();
    drain_rows(&mut rows, Backend::Postgres, runs, repeats).await;
    rows.insert(
        2,
        submit_row(Backend::Postgres, None, submits, repeats)
            .await
            .0,
    );
    let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        let (p50, p99, _) = start_latency(Backend::Postgres, None, 1000, 200.0).await;
        p50s.push(p50);
        p99s.push(p99);
    }
    rows.insert(
        3,
        (
            "submit → stage start at 200 runs/s, 1000 runs".to_owned(),
            format!(
                "p50 {:.1} ms, p99 {:.1} ms",
                median(&mut p50s),
                median(&mut p99s)
            ),
        ),
    );
    let mut recoveries = Vec::new();
    for _ in 0..repeats {
        recoveries.push(recovery(Backend::Postgres, None).await);
    }
    rows.insert(
        4,
        (
            "recovery: SIGKILL → stage restarts elsewhere (lease 10 s, sweep 5 s)".to_owned(),
            format!("{:.1} s", median(&mut recoveries)),
        ),
    );
    print_table(&format!("PostgreSQL backend (medians of {repeats})"), &rows);
}

/// Redis drains with a number of worker processes, each paired with the peer's when it is one.
struct RedisDrains<'a> {
    redis: &'a RedisServer,
    peer: &'a Result<BullMq, String>,
    runs: usize,
    workers: usize,
}

impl RedisDrains<'_> {
    /// Drains `repeats` times; puts the median rate and the CPU per run in `rows` at `row` and
    /// `row + 1`, the workers' peak memory in `busy_rss`, the pairs with the peer in `paired`.
    async fn measure(
        &self,
        repeats: usize,
        rows: &mut BTreeMap<usize, (String, String)>,
        row: usize,
        busy_rss: &mut Vec<f64>,
        paired: &mut PeerMeasures,
    ) {
        let (runs, workers) = (self.runs, self.workers);
        let mut rates = Vec::new();
        let mut cpu = CpuPerRun::default();
        for _ in 0..repeats {
            let drained = drain(Backend::Redis, Some(self.redis), runs, workers).await;
            rates.push(drained.rate);
            busy_rss.push(drained.peak_rss);
            cpu.add(&drained);
            // The peer's protocol is one worker process: paired with Stagecraft's.
            if let (Ok(peer), 1) = (self.peer, workers) {
                paired.add_drain(&drained, &peer.drain(self.redis, runs).await);
            }
        }
        eprintln!(
            "redis drain with {workers} worker(s): {rates:.0?} runs/s, CPU per run: Redis {:.0?} µs, workers {:.0?} µs",
            cpu.redis, cpu.workers
        );
        rows.insert(
            row,
            (
                format!("drain, {runs} queued noop runs, {workers} worker process(es) × 16"),
                format!("{:.0} runs/s", median(&mut rates)),
            ),
        );
        rows.insert(
            row + 1,
            (
                "CPU time per run of that drain: Redis + worker(s)".to_owned(),
                cpu.cell(),
            ),
        );
    }
}

/// `POST /runs` from 64 connections, `repeats` times: the table's row (median rate, p50 and
/// p99), and the API's resident memory after each load.
async fn submit_row(
    backend: Backend,
    redis: Option<&RedisServer>,
    submits: usize,
    repeats: usize,
) -> ((String, String), Vec<f64>) {
    let (mut rates, mut p50s, mut p99s, mut api_rss) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeats {
        let (rate, p50, p99, rss) = submit_load(backend, redis, submits, 64).await;
        rates.push(rate);
        p50s.push(p50);
        p99s.push(p99);
        api_rss.push(rss);
    }
    eprintln!("submit: {rates:.0?} runs/s, p99 {p99s:.1?} ms");
    let row = (
        format!("submit through the API, {submits} POSTs, 64 connections"),
        format!(
            "{:.0} runs/s, p50 {:.1} ms, p99 {:.1} ms",
            median(&mut rates),
            median(&mut p50s),
            median(&mut p99s)
        ),
    );
    (row, api_rss)
}

/// Pickup on Redis at a steady 200 runs/s, `repeats` times, each alternated with the peer's
/// as the drains are: the table's row, and the idle worker's median resident memory.
async fn redis_pickup_row(
    redis: &RedisServer,
    peer: &Result<BullMq, String>,
    latency_runs: usize,
    repeats: usize,
    paired: &mut PeerMeasures,
) -> ((String, String), f64) {
    let (mut p50s, mut p99s, mut idle_rss) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeats {
        let (p50, p99, rss) = start_latency(Backend::Redis, Some(redis), latency_runs, 200.0).await;
        p50s.push(p50);
        p99s.push(p99);
        idle_rss.push(rss);
        if let Ok(peer) = peer {
            let (p50, p99) = peer.pickup(redis, latency_runs, 200.0).await;
            paired.pickup_p50.push(p50);
            paired.pickup_p99.push(p99);
        }
    }
    eprintln!(
        "redis pickup p99: {p99s:.1?} ms; peer: {:.1?} ms",
        paired.pickup_p99
    );
    let row = (
        format!("submit → stage start at a steady 200 runs/s, {latency_runs} runs"),
        format!(
            "p50 {:.2} ms, p99 {:.2} ms",
            median(&mut p50s),
            median(&mut p99s)
        ),
    );
    (row, median(&mut idle_rss))
}

async fn redis_section(repeats: usize, drain_only: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(dir.path());
    let runs = env_number("BENCH_REDIS_RUNS", 20_000);
    let submits = env_number("BENCH_SUBMITS", 10_000);
    let latency_runs = env_number("BENCH_LATENCY_RUNS", 200).max(1000);
    let mut rows = BTreeMap::new();
    let mut busy_rss = Vec::new();
    let peer = BullMq::find();
    let mut paired = PeerMeasures::default();
    for (row, workers) in [(0, 1), (2, 2)] {
        let drains = RedisDrains {
            redis: &redis,
            peer: &peer,
            runs,
            workers,
        };
        drains
            .measure(repeats, &mut rows, row, &mut busy_rss, &mut paired)
            .await;
    }
    if drain_only {
        print_table(&format!("Redis drain (medians of {repeats})"), &rows);
        paired.print(&peer, runs, latency_runs);
        return;
    }
    let (submitted, mut api_rss) = submit_row(Backend::Redis, Some(&redis), submits, repeats).await;
    rows.insert(4, submitted);
    streams_rows(&mut rows, 20, Backend::Redis, Some(&redis), repeats).await;
    let (pickup, idle_rss) =
        redis_pickup_row(&redis, &peer, latency_runs, repeats, &mut paired).await;
    rows.insert(5, pickup);
    let (p50, p99) = checkpoint_commit(Backend::Redis, Some(&redis), 2000).await;
    rows.insert(
        6,
        (
            "checkpoint commit (fenced script), 2000 commits".to_owned(),
            format!("p50 {p50:.2} ms, p99 {p99:.2} ms"),
        ),
    );
    let mut recoveries = Vec::new();
    for _ in 0..repeats {
        recoveries.push(recovery(Backend::Redis, Some(&redis)).await);
    }
    eprintln!("redis recovery: {recoveries:.1?} s");
    rows.insert(
        7,
        (
            "recovery: SIGKILL → stage restarts elsewhere (lease 10 s, sweep 5 s)".to_owned(),
            format!("{:.1} s", median(&mut recoveries)),
        ),
    );
    rows.insert(
        8,
        (
            "resident memory: idle worker / busy worker (peak) / API after the submit load"
                .to_owned(),
            format!(
                "{idle_rss:.1} MB / {:.1} MB / {:.1} MB",
                median(&mut busy_rss),
                median(&mut api_rss)
            ),
        ),
    );
    print_table(&format!("Redis backend (medians of {repeats})"), &rows);
    paired.print(&peer, runs, latency_runs);
}

/// The peer's measures, each paired with Stagecraft's taken the minute before.
#[derive(Default)]
struct PeerMeasures {
    rates: Vec<f64>,
    /// Stagecraft's one-worker drain rate over the peer's, pair by pair.
    ratios: Vec<f64>,
    rss: Vec<f64>,
    cpu: CpuPerRun,
    pickup_p50: Vec<f64>,
    pickup_p99: Vec<f64>,
}

impl PeerMeasures {
    fn add_drain(&mut self, ours: &Drained, theirs: &Drained) {
        self.rates.push(theirs.rate);
        self.ratios.push(ours.rate / theirs.rate);
        self.rss.push(theirs.peak_rss);
        self.cpu.add(theirs);
    }

    /// The peer's table: its drain and the ratio of the pairs, CPU per job, pickup latency
    /// (with the full bench) and memory.
    fn print(&mut self, peer: &Result<BullMq, String>, jobs: usize, pickup_jobs: usize) {
        let peer = match peer {
            Ok(_) => "BullMQ 6.7.0",
            Err(why) => {
                println!("\nBullMQ is not measured: {why}.");
                return;
            }
        };
        eprintln!(
            "{peer} drain: {:.0?} jobs/s, CPU per job: Redis {:.0?} µs, worker {:.0?} µs",
            self.rates, self.cpu.redis, self.cpu.workers
        );
        let mut rows = BTreeMap::new();
        rows.insert(
            0,
            (
                format!("drain, {jobs} queued no-op jobs (one INCR each), 1 worker process × 16"),
                format!(
                    "{:.0} jobs/s; Stagecraft's 1 worker drains {:.2}× as fast",
                    median(&mut self.rates),
                    median(&mut self.ratios)
                ),
            ),
        );
        rows.insert(
            1,
            (
                "CPU time per job of that drain: Redis + worker".to_owned(),
                self.cpu.cell(),
            ),
        );
        if !self.pickup_p99.is_empty() {
            rows.insert(
                2,
                (
                    format!("add → processor start at a steady 200 jobs/s, {pickup_jobs} jobs"),
                    format!(
                        "p50 {:.2} ms, p99 {:.2} ms",
                        median(&mut self.pickup_p50),
                        median(&mut self.pickup_p99)
                    ),
                ),
            );
        }
        rows.insert(
            3,
            (
                "resident memory: worker at the end of the drain".to_owned(),
                format!("{:.1} MB", median(&mut self.rss)),
            ),
        );
        print_table(
            &format!("{peer}, same protocol and Redis, alternated with Stagecraft's"),
            &rows,
        );
    }
}

/// The three stores' drains alternated on the same minutes, 1 and 2 worker processes each
/// (`BENCH_ONLY=drains`): the comparison the README's store table gives.
async fn drains_section(repeats: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(dir.path());
    let stores = [
        (Backend::Sqlite, "SQLite", env_number("BENCH_RUNS", 5000)),
        (
            Backend::Redis,
            "Redis",
            env_number("BENCH_REDIS_RUNS", 20_000),
        ),
        (
            Backend::Postgres,
            "PostgreSQL",
            env_number("BENCH_PG_RUNS", 20_000),
        ),
    ];
    let mut rates: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    for _ in 0..repeats {
        for (i, (backend, _, runs)) in stores.iter().enumerate() {
            for workers in [1, 2] {
                let server = matches!(backend, Backend::Redis).then_some(&redis);
                let drained = drain(*backend, server, *runs, workers).await;
                rates.entry((i, workers)).or_default().push(drained.rate);
            }
        }
    }
    let mut rows = BTreeMap::new();
    for ((i, workers), mut found) in rates {
        let (_, name, runs) = stores[i];
        eprintln!("{name} drain with {workers} worker(s): {found:.0?} runs/s");
        rows.insert(
            i * 2 + workers - 1,
            (
                format!(
                    "{name}: drain, {runs} queued noop runs, {workers} worker process(es) × 16"
                ),
                format!("{:.0} runs/s", median(&mut found)),
            ),
        );
    }
    print_table(
        &format!("Drains of the three stores, alternated (medians of {repeats})"),
        &rows,
    );
}

/// This build's drains alternated with another build's on the same minutes
/// (`BENCH_ONLY=versus`): `BENCH_PEER_BIN` is the other build's `stagecraft`,
/// `BENCH_VERSUS_STORE` the store (`sqlite`, the default, `redis` or `postgres`). What a change
/// costs or saves, as the median of the paired ratios.
async fn versus_section(repeats: usize) {
    let Ok(peer) = std::env::var("BENCH_PEER_BIN") else {
        eprintln!("BENCH_ONLY=versus needs BENCH_PEER_BIN, the path of another build's stagecraft");
        return;
    };
    let (backend, name, runs) = match std::env::var("BENCH_VERSUS_STORE").as_deref() {
        Ok("redis") => (
            Backend::Redis,
            "Redis",
            env_number("BENCH_REDIS_RUNS", 20_000),
        ),
        Ok("postgres") => (
            Backend::Postgres,
            "PostgreSQL",
            env_number("BENCH_PG_RUNS", 20_000),
        ),
        _ => (Backend::Sqlite, "SQLite", env_number("BENCH_RUNS", 5000)),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = matches!(backend, Backend::Redis).then(|| RedisServer::start(dir.path()));
    let mut rows = BTreeMap::new();
    for workers in [1, 2] {
        let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..repeats {
            let own = drain_with(BIN, backend, redis.as_ref(), runs, workers).await;
            let peer = drain_with(&peer, backend, redis.as_ref(), runs, workers).await;
            eprintln!(
                "{name} drain, {workers} worker(s): this build {:.0}, peer {:.0} runs/s",
                own.rate, peer.rate
            );
            ratios.push(own.rate / peer.rate);
            ours.push(own.rate);
            theirs.push(peer.rate);
        }
        rows.insert(
            workers - 1,
            (
                format!(
                    "{name}: drain, {runs} queued noop runs, {workers} worker process(es) × 16"
                ),
                format!(
                    "this build {:.0} runs/s, peer {:.0} runs/s: {:.2}×",
                    median(&mut ours),
                    median(&mut theirs),
                    median(&mut ratios)
                ),
            ),
        );
    }
    print_table(
        &format!("This build against {peer}, alternated (medians of {repeats})"),
        &rows,
    );
}

#[tokio::main]
async fn main() {
    let repeats = env_number("BENCH_REPEATS", 3).max(1);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    eprintln!("stagecraft bench: {cpus} cpus, {repeats} repeats per measure");
    if only.is_empty() || only == "sqlite" {
        sqlite_section(repeats).await;
    }
    if only.is_empty() || only == "redis" {
        redis_section(repeats, false).await;
    }
    if only.is_empty() || only == "list" {
        list::section().await;
    }
    if only.is_empty() || only == "postgres" {
        postgres_section(repeats).await;
    }
    if only.is_empty() || only == "scale" {
        scale::section(repeats).await;
    }
    if only == "redis-drain" {
        redis_section(repeats, true).await;
    }
    if only == "drains" {
        drains_section(repeats).await;
    }
    if only == "versus" {
        versus_section(repeats).await;
    }
    if only == "postgres-drain" {
        let mut rows = BTreeMap::new();
        drain_rows(
            &mut rows,
            Backend::Postgres,
            env_number("BENCH_PG_RUNS", 20_000),
            repeats,
        )
        .await;
        print_table(&format!("PostgreSQL drains (medians of {repeats})"), &rows);
    }
    if only == "streams" {
        let mut rows = BTreeMap::new();
        streams_rows(&mut rows, 0, Backend::Sqlite, None, repeats).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let redis = RedisServer::start(dir.path());
        streams_rows(&mut rows, 1, Backend::Redis, Some(&redis), repeats).await;
        print_table(&format!("Event streams (medians of {repeats})"), &rows);
    }
}
