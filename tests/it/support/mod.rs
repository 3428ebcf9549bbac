//! The test harness: real `stagecraft` processes on a temporary SQLite file and artifact
//! directory, the API on a free loopback port, and helpers to drive them over HTTP.

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::{Value, json};
use tempfile::TempDir;

pub mod browser;
pub mod postgres;
pub use postgres::tls;
pub mod s3;
pub mod sentinel;

/// Which store a deployment under test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Redis,
    Postgres,
}

impl Backend {
    /// The name `/health` reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Redis => "redis",
            Self::Postgres => "postgres",
        }
    }
}

/// One `redis-server` per test binary, on a free loopback port, in a temporary directory. A
/// watchdog shell stops it when the test binary exits.
pub struct SharedRedis {
    pub url: String,
    _dir: TempDir,
}

pub fn shared_redis() -> &'static SharedRedis {
    static REDIS: std::sync::OnceLock<SharedRedis> = std::sync::OnceLock::new();
    REDIS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = RedisServer::start(dir.path(), false);
        let url = server.url.clone();
        std::mem::forget(server);
        SharedRedis { url, _dir: dir }
    })
}

/// A `redis-server` process of a test's own (for outage tests), on a free port.
pub struct RedisServer {
    pub port: u16,
    pub url: String,
    dir: PathBuf,
    aof: bool,
    child: Option<Child>,
    /// The server's certificate, key and CA when it speaks only TLS.
    tls: Option<[PathBuf; 3]>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl RedisServer {
    pub fn start(dir: &Path, aof: bool) -> Self {
        let port = free_port();
        let mut server = Self {
            port,
            url: format!("redis://127.0.0.1:{port}/0"),
            dir: dir.to_owned(),
            aof,
            child: None,
            tls: None,
        };
        server.restart();
        server
    }

    /// A server that speaks only TLS (`rediss://`), with the certificate of `certificates`
    /// (clients are not asked for one).
    pub fn start_tls(dir: &Path, certificates: &tls::Certificates) -> Self {
        let port = free_port();
        let mut server = Self {
            port,
            url: format!("rediss://127.0.0.1:{port}/0"),
            dir: dir.to_owned(),
            aof: false,
            child: None,
            tls: Some([
                certificates.server_cert.clone(),
                certificates.server_key.clone(),
                certificates.ca.clone(),
            ]),
        };
        server.restart();
        server
    }

    /// How the server listens: its plain port, or TLS alone on it.
    fn listen_flags(&self) -> String {
        match &self.tls {
            None => format!("--port {}", self.port),
            Some([cert, key, ca]) => format!(
                "--port 0 --tls-port {} --tls-cert-file {} --tls-key-file {} \
                 --tls-ca-cert-file {} --tls-auth-clients no",
                self.port,
                cert.display(),
                key.display(),
                ca.display()
            ),
        }
    }

    /// Starts the server (again, on the same port and data directory) and waits until it answers.
    pub fn restart(&mut self) {
        let appendonly = if self.aof { "yes" } else { "no" };
        let script = format!(
            "redis-server {listen} --bind 127.0.0.1 --dir {dir} --save '' --appendonly {appendonly} \
             --appendfsync everysec --maxmemory-policy noeviction --protected-mode yes --daemonize no \
             --logfile {dir}/redis.log & r=$!; \
             while kill -0 {test_pid} 2>/dev/null && kill -0 $r 2>/dev/null; do sleep 0.5; done; kill $r 2>/dev/null; wait $r",
            listen = self.listen_flags(),
            dir = self.dir.display(),
            test_pid = std::process::id(),
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server could not be started: install it (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server the way an orchestrator does (SIGTERM: it writes its AOF and exits).
    pub fn stop(&mut self) {
        let mut shutdown = Command::new("redis-cli");
        shutdown.args(["-p", &self.port.to_string()]);
        if let Some([_, _, ca]) = &self.tls {
            shutdown.arg("--tls").arg("--cacert").arg(ca);
        }
        let _ = shutdown.arg("shutdown").output();
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The environment every test process gets; short leases and sweeps so recovery takes seconds.
fn base_env(dir: &Path) -> BTreeMap<String, String> {
    [
        ("DATA_DIR", dir.join("data").display().to_string()),
        ("ARTIFACT_DIR", dir.join("artifacts").display().to_string()),
        ("HOST", "127.0.0.1".to_owned()),
        ("PORT", "0".to_owned()),
        ("ENV", "development".to_owned()),
        ("LOG_FORMAT", "json".to_owned()),
        ("LOG_LEVEL", "info".to_owned()),
        ("LEASE_TTL_SECS", "2".to_owned()),
        ("SWEEP_INTERVAL_MS", "200".to_owned()),
        ("POLL_INTERVAL_MS", "10".to_owned()),
        ("RETRY_BASE_MS", "100".to_owned()),
        ("RETRY_MAX_MS", "400".to_owned()),
        ("STAGE_MAX_ATTEMPTS", "3".to_owned()),
        ("SHUTDOWN_GRACE_SECS", "10".to_owned()),
        ("SYNC_WAIT_SECS", "10".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// One deployment under test: a directory, its environment, and the processes started in it.
pub struct TestApp {
    pub backend: Backend,
    pub dir: TempDir,
    pub env: BTreeMap<String, String>,
    pub api: Option<Proc>,
    pub workers: Vec<Proc>,
    pub base_url: String,
    pub http: reqwest::Client,
    counter: usize,
    /// Each process gets an `ARTIFACT_DIR` of its own, as on separate hosts.
    host_per_process: bool,
    /// Drops the deployment's PostgreSQL database with it.
    _database: Option<Box<dyn std::any::Any + Send>>,
}

/// A running process; SIGKILLed on drop if still alive.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, signal: Signal) {
        let _ = kill(self.pid(), signal);
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

pub const BIN: &str = env!("CARGO_BIN_EXE_stagecraft");

impl TestApp {
    /// A deployment with no process started yet. On Redis it gets a key prefix of its own in
    /// the binary's shared server.
    pub fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut env = base_env(dir.path());
        let mut database = None;
        match backend {
            Backend::Sqlite => {}
            Backend::Redis => {
                env.insert("QUEUE_BACKEND".into(), "redis".into());
                env.insert("REDIS_URL".into(), shared_redis().url.clone());
                env.insert(
                    "REDIS_KEY_PREFIX".into(),
                    format!("t{}:", uuid::Uuid::new_v4().simple()),
                );
            }
            Backend::Postgres => {
                // A database of its own on the binary's shared server (tests run on a
                // multi-threaded runtime, which may block here).
                let (url, guard) = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(postgres::fresh_database())
                });
                env.insert("QUEUE_BACKEND".into(), "postgres".into());
                env.insert("DATABASE_URL".into(), url);
                database = Some(guard);
            }
        }
        Self {
            backend,
            dir,
            env,
            api: None,
            workers: Vec::new(),
            base_url: String::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            counter: 0,
            host_per_process: false,
            _database: database,
        }
    }

    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.set_env(key, value);
        self
    }

    /// Changes a variable for the processes started from now on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.insert(key.to_owned(), value.to_owned());
    }

    /// Artifacts in a bucket of its own on the binary's S3-compatible server; every process
    /// started from now on also gets a local directory of its own (`ARTIFACT_DIR`, only its
    /// scratch root then), as processes on different hosts would.
    pub fn with_object_storage(mut self) -> Self {
        let server = s3::shared_s3();
        let bucket = server.bucket();
        for (key, value) in server.env(&bucket, "stagecraft") {
            self.set_env(key, &value);
        }
        self.host_per_process = true;
        self
    }

    /// The API alone (`serve`).
    pub fn with_api(mut self) -> Self {
        self.start_api();
        self
    }

    /// The API and one worker process.
    pub fn started(backend: Backend) -> Self {
        let mut app = Self::new(backend).with_api();
        app.start_worker();
        app
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command.args(args).env_clear().current_dir(self.dir.path());
        for key in ["PATH", "HOME"] {
            if let Ok(value) = std::env::var(key) {
                command.env(key, value);
            }
        }
        command.envs(&self.env);
        command
    }

    fn spawn(&mut self, name: &str, args: &[&str]) -> (Proc, std::sync::mpsc::Receiver<String>) {
        self.counter += 1;
        if self.host_per_process {
            let own = self.dir.path().join(format!("host-{}", self.counter));
            self.set_env("ARTIFACT_DIR", &own.display().to_string());
        }
        let log = self.dir.path().join(format!("{}-{name}.log", self.counter));
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn stagecraft");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut first = true;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if first {
                    let _ = tx.send(line);
                    first = false;
                }
            }
        });
        let proc = Proc {
            child,
            log,
            name: name.to_owned(),
        };
        (proc, rx)
    }

    /// `stagecraft dev`: the API and its workers in one process, as a newcomer runs it.
    pub fn start_dev(&mut self) {
        self.start_listening("dev", &["dev"]);
    }

    /// Sends `Authorization: Bearer {token}` with every request of the helpers.
    pub fn with_bearer(mut self, token: &str) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("header"),
        );
        self.http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .default_headers(headers)
            .build()
            .expect("client");
        self
    }

    /// Starts (or restarts) the API and waits until it answers.
    pub fn start_api(&mut self) {
        self.start_listening("api", &["serve"]);
    }

    fn start_listening(&mut self, name: &str, args: &[&str]) {
        let (proc, first_line) = self.spawn(name, args);
        let line = first_line
            .recv_timeout(Duration::from_secs(20))
            .ok()
            .unwrap_or_else(|| panic!("API printed no address; log:\n{}", proc.log_text()));
        self.base_url = line
            .split("listening on ")
            .nth(1)
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        self.api = Some(proc);
    }

    /// Starts one more worker process with extra arguments.
    pub fn start_worker_with(&mut self, args: &[&str]) -> usize {
        let mut all = vec!["worker"];
        all.extend_from_slice(args);
        let (proc, first_line) = self.spawn("worker", &all);
        let line = first_line.recv_timeout(Duration::from_secs(20)).ok();
        assert!(
            line.as_deref()
                .is_some_and(|l| l.contains("worker") && l.contains("started")),
            "worker did not start ({line:?}): {}",
            proc.log_text()
        );
        self.workers.push(proc);
        self.workers.len() - 1
    }

    pub fn start_worker(&mut self) -> usize {
        self.start_worker_with(&[])
    }

    /// The deployment's run store, opened as its processes open it (SQLite needs `migrate` or
    /// a started process first).
    pub async fn store(&self) -> stagecraft::store::SharedStore {
        use std::sync::Arc;
        match self.backend {
            Backend::Sqlite => {
                let path = Path::new(&self.env["DATA_DIR"]).join("stagecraft.db");
                let url = stagecraft::config::sqlite_url_for(&path);
                Arc::new(
                    stagecraft::store::sqlite::SqliteStore::open(
                        &url,
                        Arc::new(stagecraft::clock::SystemClock),
                    )
                    .await
                    .expect("sqlite store"),
                )
            }
            Backend::Redis => Arc::new(
                stagecraft::store::redis::RedisStore::open(
                    &self.env["REDIS_URL"],
                    &self.env["REDIS_KEY_PREFIX"],
                    Duration::from_secs(3600),
                )
                .await
                .expect("redis store"),
            ),
            Backend::Postgres => Arc::new(
                stagecraft::store::postgres::PostgresStore::open(
                    &self.env["DATABASE_URL"],
                    Arc::new(stagecraft::clock::SystemClock),
                )
                .await
                .expect("postgres store"),
            ),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.http.get(self.url(path)).send().await.expect("GET");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("POST");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut request = self
            .http
            .post(self.url(path))
            .body(body)
            .header("content-type", "application/json");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.expect("POST");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Submits a demo run and answers its id.
    pub async fn submit_demo(&self, inputs: Value) -> String {
        let (status, body) = self
            .post(
                "/runs",
                &json!({"kind": "workflow", "name": "demo", "inputs": inputs}),
            )
            .await;
        assert_eq!(status, 201, "submit failed: {body}");
        body["run_id"].as_str().expect("run_id").to_owned()
    }

    pub async fn run(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/runs/{id}")).await;
        assert_eq!(status, 200, "GET run {id}: {body}");
        body
    }

    /// Polls the run until `done` holds, or panics after `timeout` with the last document.
    pub async fn wait_run(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let run = self.run(id).await;
            if done(&run) {
                return run;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for run {id}: {run:#}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until a demo run's stage code has begun (its ledger line is written). A stage's
    /// status says `running` from the claim on, a moment before the worker executes it.
    pub async fn wait_executing(&self, id: &str, stage: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let marker = format!("stage {stage} ");
        while Self::count(&self.ledger(id), &marker) == 0 {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for stage {stage} of run {id} to execute"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Value {
        self.wait_run(id, timeout, |r| r["status"] == status).await
    }

    /// The work ledger of a demo run: one line per stage execution and per executed step.
    pub fn ledger(&self, id: &str) -> Vec<String> {
        let path = self
            .dir
            .path()
            .join("artifacts/runs")
            .join(id)
            .join("executions.log");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn count(ledger: &[String], prefix: &str) -> usize {
        ledger
            .iter()
            .filter(|line| line.starts_with(prefix))
            .count()
    }

    pub async fn events(&self, id: &str) -> Vec<Value> {
        let text = self
            .http
            .get(self.url(&format!("/runs/{id}/events")))
            .send()
            .await
            .expect("events")
            .text()
            .await
            .expect("events body");
        text.lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .filter_map(|data| serde_json::from_str(data).ok())
            .collect()
    }
}

/// Generates one test per backend from `async fn name(backend: Backend)` functions: the
/// conformance suite every store must pass.
#[macro_export]
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Sqlite).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Redis).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Postgres).await
                }
            )*
        }
    };
}

/// The stage named `name` of a status document.
pub fn stage<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["stages"]
        .as_array()
        .and_then(|stages| stages.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no stage {name} in {run:#}"))
}

/// A one-stage `noop` run on the `workflows` queue, to insert into a store directly.
pub fn noop_run() -> stagecraft::store::NewRun {
    use stagecraft::{
        config::ProviderMode,
        ids::RunId,
        store::{NewRun, RunKind},
    };
    NewRun {
        id: RunId::generate(),
        kind: RunKind::Workflow,
        name: "noop".to_owned(),
        queue: "workflows".to_owned(),
        inputs: json!({}),
        provider_mode: ProviderMode::Mock,
        budget_usd: None,
        stage_names: vec!["noop".to_owned()],
        idempotency_key: None,
        request_hash: None,
        reuse: false,
    }
}

/// A TCP proxy on a free loopback port in front of `target`, which can be cut: every open
/// connection is closed and new ones are refused, as when a network link between one process
/// and its store goes down.
pub struct TcpProxy {
    pub port: u16,
    cut: tokio_util::sync::CancellationToken,
}

impl TcpProxy {
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy bind");
        let port = listener.local_addr().expect("proxy addr").port();
        let cut = tokio_util::sync::CancellationToken::new();
        let stop = cut.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = stop.cancelled() => return,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
        });
        Self { port, cut }
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.cut.cancel();
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut.cancel();
    }
}
