//! The `stagecraft` command: process roles (`serve`, `worker`, `dev`, `migrate`) and client
//! commands that talk to the API (`submit`, `status`, `runs`, `cancel`, `resume`, `watch`).

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    artifacts::ArtifactStore,
    client::Client,
    clock::SystemClock,
    config::{BackendKind, Config, redact_url},
    engine::{Engine, EngineSettings},
    http::{self, AppState},
    ids::WorkerId,
    metrics::Metrics,
    module::{Modules, Observers},
    queue::{self, ClaimSettings},
    shutdown,
    store::{
        SharedStore,
        postgres::{PostgresOptions, PostgresStore},
        redis::{RedisOptions, RedisStore},
        sqlite::SqliteStore,
    },
    telemetry, watch,
    workflows::Catalog,
};

#[derive(Debug, Parser)]
#[command(
    name = "stagecraft",
    version,
    about = "Durable runs for long, expensive AI-agent pipelines"
)]
pub struct Cli {
    /// API base URL for the client commands (default: STAGECRAFT_URL, else http://127.0.0.1:8000).
    #[arg(long, global = true)]
    pub api_url: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API.
    Serve,
    /// Execute runs from the queues.
    Worker {
        /// Comma-separated queues to take runs from (default: every queue of the deployment).
        #[arg(long, value_delimiter = ',')]
        queues: Vec<String>,
        /// Runs executed at once (default: WORKER_CONCURRENCY).
        #[arg(long)]
        concurrency: Option<usize>,
        /// Threads of the process's async runtime (default: WORKER_THREADS).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// The API and workers in one process: the local one-command mode.
    Dev {
        /// Runs executed at once (default: WORKER_CONCURRENCY).
        #[arg(long)]
        concurrency: Option<usize>,
    },
    /// Create or update the store's schema, then exit.
    Migrate,
    /// Submit a run.
    Submit {
        /// Workflow (or agent) name.
        name: String,
        /// agent, workflow or work_order.
        #[arg(long, default_value = "workflow")]
        kind: String,
        /// Inputs as a JSON object.
        #[arg(long, default_value = "{}")]
        inputs: String,
        #[arg(long)]
        budget_usd: Option<f64>,
        /// mock or live.
        #[arg(long)]
        provider_mode: Option<String>,
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait until the run finishes and print its final status.
        #[arg(long)]
        wait: bool,
        /// Follow the run live (as `watch` does) and exit with its outcome.
        #[arg(long, conflicts_with = "wait")]
        follow: bool,
        /// With --follow: print the run's events as JSON lines.
        #[arg(long, requires = "follow")]
        json: bool,
    },
    /// Follow a run live until it finishes: exits 0 when it completed, 1 when it failed, 2 when
    /// it was cancelled, 130 when detached with Ctrl-C, 3 on an error.
    Watch {
        run_id: String,
        /// Print the run's events as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Print a run's status document.
    Status { run_id: String },
    /// Ask the API's `/health`; exits non-zero unless it is healthy (for container health checks).
    Health,
    /// List runs, newest first.
    Runs {
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Cancel a run.
    Cancel { run_id: String },
    /// Look into the store directly (no API needed): queues, workers, runs, one run, dead runs.
    Inspect {
        #[command(subcommand)]
        what: crate::ops::Inspect,
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Re-queue a failed run from its first unfinished stage (directly in the store).
    Retry { run_id: String },
    /// Live providers: which are configured, and whether they answer.
    Providers {
        #[command(subcommand)]
        what: Providers,
    },
    /// Re-queue a finished run from a stage.
    Resume {
        run_id: String,
        /// `auto` or a stage name.
        #[arg(long, default_value = "auto")]
        from_stage: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum Providers {
    /// Report each live provider: key set or not, and whether its API answers with that key.
    Check,
}

/// Entry point of the binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::from_env()?;
    let runtime = match &cli.command {
        // A worker's stages wait on I/O (providers, subprocesses, the store), so one thread
        // serves its whole concurrency, and runs reach every core through more processes; on
        // one thread a run's futures never hop between threads or wake each other across them.
        Command::Worker { threads, .. } => match threads.unwrap_or(config.worker_threads).max(1) {
            1 => tokio::runtime::Builder::new_current_thread(),
            threads => {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                builder.worker_threads(threads);
                builder
            }
        },
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()
    .context("starting the async runtime")?;
    runtime.block_on(run(cli, config))
}

async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve => {
            telemetry::init(&config);
            serve_role(config, Role::Api).await
        }
        Command::Worker {
            queues,
            concurrency,
            threads: _,
        } => {
            telemetry::init(&config);
            let concurrency = concurrency.unwrap_or(config.worker_concurrency).max(1);
            serve_role(
                config,
                Role::Worker {
                    queues,
                    concurrency,
                },
            )
            .await
        }
        Command::Dev { concurrency } => {
            telemetry::init(&config);
            let concurrency = concurrency.unwrap_or(config.worker_concurrency).max(1);
            serve_role(config, Role::Dev { concurrency }).await
        }
        Command::Migrate => {
            telemetry::init(&config);
            open_store(&config).await?;
            println!("schema is up to date");
            Ok(())
        }
        Command::Inspect { what, json } => {
            let store = open_store(&config).await?;
            crate::ops::inspect(store.as_ref(), what, json).await
        }
        Command::Retry { run_id } => {
            let store = open_store(&config).await?;
            crate::ops::retry(store.as_ref(), &run_id).await
        }
        Command::Providers {
            what: Providers::Check,
        } => {
            let report = crate::studio::live::check(&config.studio.live).await;
            for line in &report {
                println!("{line}");
            }
            Ok(())
        }
        client_command => {
            let client = Client::new(
                cli.api_url.unwrap_or_else(|| config.api_url.clone()),
                config.api_token.clone(),
            );
            run_client(&client, client_command).await
        }
    }
}

enum Role {
    Api,
    Worker {
        queues: Vec<String>,
        concurrency: usize,
    },
    Dev {
        concurrency: usize,
    },
}

async fn open_store(config: &Config) -> anyhow::Result<SharedStore> {
    match config.backend {
        BackendKind::Sqlite => {
            let url = config.database_url.expose_secret();
            let store = SqliteStore::open(url, Arc::new(SystemClock))
                .await
                .with_context(|| format!("opening the store at {}", redact_url(url)))?;
            Ok(Arc::new(store))
        }
        BackendKind::Redis => {
            let url = config.redis_url.expose_secret();
            let options = RedisOptions {
                url: url.to_owned(),
                sentinel: config.redis_sentinel.clone(),
                durable_acks: config.redis_durable_acks,
                ack_timeout: config.redis_ack_timeout,
            };
            let opened = retry_while_starting("Redis", &redact_url(url), || {
                RedisStore::connect(&options, &config.redis_prefix, config.run_retention)
            })
            .await?;
            Ok(Arc::new(opened))
        }
        BackendKind::Postgres => {
            let options = PostgresOptions {
                url: config.database_url.expose_secret().to_owned(),
                mode: config.database_pool_mode,
                direct_url: config
                    .database_direct_url
                    .as_ref()
                    .map(|url| url.expose_secret().to_owned()),
            };
            let shown = redact_url(&options.url);
            let opened = retry_while_starting("PostgreSQL", &shown, || {
                PostgresStore::connect(&options, Arc::new(SystemClock))
            })
            .await?;
            Ok(Arc::new(opened))
        }
    }
}

/// Opens a store whose server may still be starting (compose, a restart): tries again with
/// growing delays for a minute, then fails naming the server (`shown`, without credentials).
async fn retry_while_starting<S, F>(
    what: &str,
    shown: &str,
    mut open: impl FnMut() -> F,
) -> anyhow::Result<S>
where
    F: std::future::Future<Output = Result<S, crate::store::StoreError>>,
{
    let mut delay = Duration::from_millis(200);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match open().await {
            Ok(store) => return Ok(store),
            // Only a server that cannot be reached (or is starting) is waited for: a refusal
            // (credentials, a schema to migrate) is final.
            Err(error @ crate::store::StoreError::Unavailable(_))
                if std::time::Instant::now() < deadline =>
            {
                tracing::warn!(error = %error, server = %shown, "{what} not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(error) => return Err(anyhow::anyhow!("connecting to {what} at {shown}: {error}")),
        }
    }
}

/// What a role must hold before it starts: an API is never served open where anyone could
/// reach it (unless asked for, loudly), and a process that runs stages is non-dumpable.
fn guard_role(config: &Config, role: &Role) -> anyhow::Result<()> {
    if matches!(role, Role::Api | Role::Dev { .. }) {
        config.check_api_exposure()?;
        if config.serves_unauthenticated_on_purpose() {
            tracing::warn!(
                host = %config.host,
                env = config.env.as_str(),
                "ALLOW_UNAUTHENTICATED=true: the API serves every request without a token; \
                 anyone who can reach {} can submit, cancel and read runs",
                config.host
            );
        }
    }
    if !matches!(role, Role::Api) {
        // Stages run subprocesses (the coding agent among them) as this user: keep them from
        // reading this process's memory and environment through /proc or a debugger.
        if let Err(error) = nix::sys::prctl::set_dumpable(false) {
            tracing::warn!(error = %error, "could not make the process non-dumpable");
        }
    }
    Ok(())
}

/// Binds the API's address and says where it listens.
async fn bind_api(config: &Config, backend: &str) -> anyhow::Result<TcpListener> {
    let address = std::net::SocketAddr::new(config.host, config.port);
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("binding {address}"))?;
    let bound = listener.local_addr()?;
    // Printed, not logged: scripts and tests read the address from here.
    announce(&format!("stagecraft: listening on http://{bound}"));
    info!(address = %bound, backend, "API listening");
    Ok(listener)
}

/// What every role of a process shares.
struct Process {
    config: Arc<Config>,
    store: SharedStore,
    artifacts: ArtifactStore,
    modules: Modules,
    catalog: Arc<Catalog>,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
}

/// The artifact store the configuration names: object storage, or the local directory.
fn open_artifacts(config: &Config) -> anyhow::Result<ArtifactStore> {
    match &config.artifact_objects {
        Some(objects) => ArtifactStore::open_objects(objects, &config.artifact_dir)
            .context("opening the artifact store (ARTIFACT_STORE_URL)"),
        None => ArtifactStore::open(&config.artifact_dir).context("opening the artifact directory"),
    }
}

async fn serve_role(config: Config, role: Role) -> anyhow::Result<()> {
    guard_role(&config, &role)?;
    let shutdown = shutdown::on_signal().context("installing signal handlers")?;
    let modules = crate::modules::modules(&config);
    let mut process = Process {
        store: open_store(&config).await?,
        artifacts: open_artifacts(&config)?,
        catalog: Arc::new(crate::modules::catalog(&modules)),
        modules,
        config: Arc::new(config),
        tasks: tokio::task::JoinSet::new(),
    };
    let sweeper_stop = CancellationToken::new();
    process.spawn_sweeper(sweeper_stop.clone());
    if matches!(role, Role::Api | Role::Dev { .. }) {
        process.spawn_api(shutdown.clone()).await?;
    }
    let workers = match role {
        Role::Api => None,
        Role::Worker {
            queues,
            concurrency,
        } => Some((queues, concurrency, "worker")),
        Role::Dev { concurrency } => Some((Vec::new(), concurrency, "dev")),
    };
    if let Some((queues, concurrency, role_name)) = workers {
        process.spawn_workers(queues, concurrency, role_name, shutdown.clone())?;
    }
    // Wait for the roles to end (they end after the shutdown signal); the first error wins.
    let mut outcome = Ok(());
    while let Some(joined) = process.tasks.join_next().await {
        let result = joined.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(error) = result {
            tracing::error!(error = ?error, "a role failed; stopping the process");
            shutdown.cancel();
            if outcome.is_ok() {
                outcome = Err(error);
            }
        }
        if shutdown.is_cancelled() {
            sweeper_stop.cancel();
        }
    }
    info!("stopped");
    outcome
}

impl Process {
    /// Expired leases, old runs and the tenants' housekeeping, in every role.
    fn spawn_sweeper(&mut self, stop: CancellationToken) {
        let store = self.store.clone();
        let (interval, retention) = (self.config.sweep_interval, self.config.run_retention);
        let (artifacts, modules) = (Some(self.artifacts.clone()), self.modules.clone());
        self.tasks.spawn(async move {
            queue::run_sweeper(store, interval, retention, artifacts, modules, stop).await;
            Ok(())
        });
    }

    /// The HTTP API, with the tenants' routes, tool checks and observers.
    async fn spawn_api(&mut self, stop: CancellationToken) -> anyhow::Result<()> {
        let state = AppState::new(
            self.store.clone(),
            self.catalog.clone(),
            self.config.clone(),
            self.artifacts.clone(),
            http::Tenants::of(&self.modules, crate::modules::apis()).await,
        );
        let listener = bind_api(&self.config, self.store.backend_name()).await?;
        self.tasks.spawn(async move {
            http::serve(listener, state, stop)
                .await
                .context("serving HTTP")
        });
        Ok(())
    }

    /// Workers on `queues`, `concurrency` runs at once.
    fn spawn_workers(
        &mut self,
        queues: Vec<String>,
        concurrency: usize,
        role_name: &str,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        let known = self.catalog.queues();
        let queues = if queues.is_empty() {
            crate::modules::default_queues()
        } else {
            queues
        };
        if let Some(queue) = queues.iter().find(|q| !known.contains(&q.as_str())) {
            anyhow::bail!("unknown queue {queue:?}; queues are {}", known.join(", "));
        }
        for module in self.modules.iter() {
            for warning in module.worker_warnings(&queues) {
                tracing::warn!("{warning}");
            }
        }
        let config = &self.config;
        let engine = Arc::new(Engine {
            store: self.store.clone(),
            catalog: self.catalog.clone(),
            artifacts: self.artifacts.clone(),
            settings: EngineSettings {
                lease_ttl: config.lease_ttl,
                default_retry: config.default_retry,
            },
            worker: WorkerId::for_this_process(role_name),
            metrics: Arc::new(Metrics::default()),
            observers: Observers::of(&self.modules),
            stopping: CancellationToken::new(),
            abandon: CancellationToken::new(),
            running: Default::default(),
            scrubber: config.scrubber(),
        });
        let settings = ClaimSettings {
            queues,
            lease_ttl: config.lease_ttl,
            poll_interval: config.poll_interval,
        };
        let grace = config.shutdown_grace;
        self.tasks.spawn(async move {
            queue::run_workers(engine, settings, concurrency, stop, grace).await
        });
        Ok(())
    }
}

pub use crate::announce;

async fn run_client(client: &Client, command: Command) -> anyhow::Result<()> {
    let printed = match command {
        Command::Submit {
            name,
            kind,
            inputs,
            budget_usd,
            provider_mode,
            idempotency_key,
            wait,
            follow,
            json,
        } => {
            let body = submission(&kind, &name, &inputs, budget_usd, provider_mode)?;
            let headers: Vec<(&str, String)> = idempotency_key
                .map(|k| ("idempotency-key", k))
                .into_iter()
                .collect();
            let (_, run) = client
                .call(reqwest::Method::POST, "/runs", Some(&body), &headers)
                .await?;
            let id = run["run_id"].as_str().unwrap_or_default().to_owned();
            if follow {
                exit_after_watching(client, &id, json).await;
            }
            if wait {
                wait_for(client, &id).await?
            } else {
                run
            }
        }
        Command::Watch { run_id, json } => {
            watch::check_run_id(&run_id)?;
            exit_after_watching(client, &run_id, json).await
        }
        Command::Status { run_id } => client.get(&format!("/runs/{run_id}")).await?,
        Command::Health => client.get("/health").await?,
        Command::Runs {
            kind,
            status,
            name,
            limit,
            cursor,
        } => {
            let mut query = vec![format!("limit={limit}")];
            for (key, value) in [
                ("kind", kind),
                ("status", status),
                ("name", name),
                ("cursor", cursor),
            ] {
                if let Some(value) = value {
                    query.push(format!("{key}={}", urlencode(&value)));
                }
            }
            client.get(&format!("/runs?{}", query.join("&"))).await?
        }
        Command::Cancel { run_id } => {
            client
                .post(&format!("/runs/{run_id}/cancel"), &json!({}))
                .await?
        }
        Command::Resume { run_id, from_stage } => {
            client
                .post(
                    &format!("/runs/{run_id}/resume"),
                    &json!({"from_stage": from_stage}),
                )
                .await?
        }
        other => anyhow::bail!("not a client command: {other:?}"),
    };
    println!("{}", serde_json::to_string_pretty(&printed)?);
    Ok(())
}

/// The body of `POST /runs` for `stagecraft submit`.
fn submission(
    kind: &str,
    name: &str,
    inputs: &str,
    budget_usd: Option<f64>,
    provider_mode: Option<String>,
) -> anyhow::Result<Value> {
    let inputs: Value = serde_json::from_str(inputs).context("--inputs is not valid JSON")?;
    let mut body = json!({"kind": kind, "name": name, "inputs": inputs});
    if let Some(budget) = budget_usd {
        body["budget_usd"] = json!(budget);
    }
    if let Some(mode) = provider_mode {
        body["provider_mode"] = json!(mode);
    }
    Ok(body)
}

/// Follows the run, then ends the process with the status that says how the run ended.
async fn exit_after_watching(client: &Client, run_id: &str, json: bool) -> ! {
    let code = match watch::watch(client, run_id, watch::Mode::pick(json)).await {
        Ok(end) => end.exit_code(),
        Err(error) => {
            eprintln!("error: {error:#}");
            watch::ERROR_EXIT
        }
    };
    let _ = std::io::Write::flush(&mut std::io::stdout());
    std::process::exit(code)
}

async fn wait_for(client: &Client, run_id: &str) -> anyhow::Result<Value> {
    loop {
        let run = client.get(&format!("/runs/{run_id}")).await?;
        if matches!(
            run["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            return Ok(run);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn urlencode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
