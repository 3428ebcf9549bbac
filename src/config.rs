//! Configuration, read once at start-up from the environment (and a `.env` file when present).
//!
//! This is the only module that reads environment variables. Every variable is documented in
//! `.env.example`; a value that does not parse, or that is out of its documented range, stops
//! the process with a message naming the variable. A `.env` file is read into the configuration
//! only: its values never enter the process environment, so no subprocess inherits them.
//! Subprocesses start from an empty environment plus [`Config::base_env`] (`PATH`, `HOME`,
//! locale, time zone and TLS settings: nothing secret) and what their one tool needs.
//!
//! | Variable | Default | Meaning |
//! |---|---|---|
//! | `ENV` | `development` | `development` or `production` (production logs JSON) |
//! | `DEBUG` | `true` in development | reported by `/health` |
//! | `LOG_LEVEL` | `info` | a `tracing` filter such as `info` or `stagecraft=debug` |
//! | `LOG_FORMAT` | `pretty` in development, `json` in production | `pretty` or `json` |
//! | `PROVIDER_MODE` | `mock` | default provider mode of new runs |
//! | `ARTIFACT_DIR` | `./artifacts` | root of every file a stage writes; with `ARTIFACT_STORE_URL`, only the local scratch root of tools' workspaces |
//! | `ARTIFACT_STORE_URL` | unset (the local directory `ARTIFACT_DIR`) | `s3://bucket/prefix`: artifacts in S3-compatible object storage, shared by every host |
//! | `AWS_ENDPOINT_URL`, `AWS_REGION` | unset (AWS), `us-east-1` | the S3-compatible server and its region, with `ARTIFACT_STORE_URL` |
//! | `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` | unset | the bucket's credentials (unset: the instance's role) |
//! | `AWS_ALLOW_HTTP` | `false` | permits a plain-HTTP `AWS_ENDPOINT_URL` (a server on a private network) |
//! | `DATA_DIR` | `./data` | where the embedded store lives |
//! | `QUEUE_BACKEND` | `sqlite`, or `postgres` when `DATABASE_URL` is a `postgres://` URL | the durable store and queue: `sqlite`, `redis` or `postgres` |
//! | `REDIS_URL` | `redis://127.0.0.1:6379` | the Redis server, with `QUEUE_BACKEND=redis`; `rediss://` for TLS (the certificate checked against the system's CAs, or those of `SSL_CERT_FILE`, and its name) |
//! | `REDIS_KEY_PREFIX` | `stagecraft:` | prefix of every Redis key Stagecraft writes |
//! | `REDIS_SENTINELS`, `REDIS_SENTINEL_MASTER` | unset, `stagecraft` | comma-separated `host:port` of the sentinels that name the primary (then `REDIS_URL` gives only its password and database), and the name they monitor it under |
//! | `REDIS_DURABLE_ACKS` | `0` | replicas that must have every state change before it is acknowledged (`WAIT`); cover every replica Sentinel may promote |
//! | `REDIS_ACK_TIMEOUT_MS` | `2000` | how long a change waits for those replicas before it is answered as failed (503) |
//! | `DATABASE_URL` | `sqlite://{DATA_DIR}/stagecraft.db` | the SQLite file, or the PostgreSQL database (`postgres://user:password@host:5432/db`; its password is never logged); TLS with `?sslmode=verify-full&sslrootcert=/path/ca.pem` (and `sslcert`, `sslkey` for a client certificate); any other query parameter is refused |
//! | `DATABASE_POOL_MODE` | `session` | `transaction` when `DATABASE_URL` is a pooler in transaction mode (PgBouncer's `pool_mode = transaction`): statements unprepared, each in a transaction, no `LISTEN` through it |
//! | `DATABASE_DIRECT_URL` | unset | with `DATABASE_POOL_MODE=transaction`: the database itself, for migrations and idle workers' `LISTEN` (unset: workers poll, and `stagecraft migrate` needs it) |
//! | `PGPASSWORD` | unset | PostgreSQL's password when the URLs name none (read by the driver, scrubbed from everything stored or served); the driver reads libpq's other `PG*` variables too (`PGSSLMODE`, `PGSSLROOTCERT`, …) |
//! | `HOST`, `PORT` | `127.0.0.1`, `8000` | where `serve` and `dev` listen (`PORT=0`: any free port) |
//! | `WORKER_CONCURRENCY` | `4` | runs one worker process executes at once |
//! | `WORKER_THREADS` | `1` | threads of a worker process's async runtime (`1`: one thread runs every run's stages, which wait on I/O) |
//! | `LEASE_TTL_SECS` | `10` | how long a lease lives without a heartbeat |
//! | `SWEEP_INTERVAL_MS` | `5000` | how often expired leases are swept |
//! | `POLL_INTERVAL_MS` | `20` | how long an idle worker waits before asking the store again |
//! | `SHUTDOWN_GRACE_SECS` | `30` | how long a stopping worker lets its current stage run |
//! | `STAGE_MAX_ATTEMPTS`, `RETRY_BASE_MS`, `RETRY_MAX_MS`, `STAGE_TIMEOUT_SECS` | `3`, `1000`, `60000`, `3600` | default retry policy of a stage |
//! | `API_TOKEN` | unset | bearer token every route but `/health` requires (an empty value counts as unset) |
//! | `API_TOKEN_READONLY` | unset | a second bearer token that may use `GET` routes only |
//! | `ALLOW_UNAUTHENTICATED` | `false` | lets `serve`/`dev` start without `API_TOKEN` in production or on a non-loopback address |
//! | `CONSOLE_SECURE_COOKIE` | `true` in production | marks the console's session cookie `Secure` (sent over HTTPS only) |
//! | `CORS_ORIGINS` | unset | comma-separated origins allowed by CORS; `*` allows any origin (without credentials) |
//! | `MAX_EVENT_STREAMS`, `MAX_SYNC_WAITS` | `1000`, `256` | open event streams and synchronous waits one API process serves at once |
//! | `RUN_RETENTION_DAYS` | `7` | finished runs are deleted this long after they finish |
//! | `MAX_BODY_BYTES` | `1048576` | largest request body accepted |
//! | `SYNC_WAIT_SECS` | `30` | how long a synchronous submit waits before answering 202 |
//! | `STAGECRAFT_URL` | `http://127.0.0.1:8000` | the API the client commands talk to |
//! | `FFMPEG_PATH`, `FFPROBE_PATH` | `ffmpeg`, `ffprobe` | the media tools of the mock providers and the editor |
//! | `MEDIA_TIMEOUT_SECS` | `300` | longest one ffmpeg or ffprobe call may take |
//! | `MOCK_PROVIDER_LATENCY_MS` | `0` | how long each mock provider call waits, to rehearse live timing |
//! | `ANTHROPIC_BASE_URL`, `ANTHROPIC_MODEL` | `https://api.anthropic.com`, `claude-sonnet-4-5` | the live text provider of the studio agents |
//! | `PROVIDER_TIMEOUT_SECS`, `PROVIDER_MAX_RETRIES` | `120`, `4` | per live provider request; retries of 429 and 5xx answers |
//! | `PRICE_TEXT_INPUT_PER_MTOK`, `PRICE_TEXT_OUTPUT_PER_MTOK` | `3.0`, `15.0` | dollars per million input and output tokens of the text model |
//! | `RUNWAY_API_KEY`, `RUNWAY_BASE_URL`, `RUNWAY_MODEL` | unset, `https://api.dev.runwayml.com`, `gen4_turbo` | the live video provider |
//! | `PRICE_VIDEO_PER_SECOND`, `VIDEO_POLL_INTERVAL_MS` | `0.05`, `5000` | dollars per second of generated video; how often a video task is polled |
//! | `SPEECH_PROVIDER` | `elevenlabs` | the live speech provider: `elevenlabs` or `openai` |
//! | `ELEVENLABS_API_KEY`, `ELEVENLABS_BASE_URL`, `ELEVENLABS_VOICE_ID`, `ELEVENLABS_MODEL` | unset, `https://api.elevenlabs.io`, `21m00Tcm4TlvDq8ikWAM`, `eleven_multilingual_v2` | speech, and music (ElevenLabs is the music provider) |
//! | `OPENAI_API_KEY`, `OPENAI_BASE_URL`, `OPENAI_TTS_MODEL`, `OPENAI_TTS_VOICE` | unset, `https://api.openai.com`, `gpt-4o-mini-tts`, `alloy` | speech with `SPEECH_PROVIDER=openai` |
//! | `PRICE_SPEECH_PER_1K_CHARS`, `PRICE_MUSIC_PER_SECOND` | `0.30`, `0.01` | dollars per thousand characters spoken; per second of music |
//! | `AWO_DATA_DIR` | `./data/agent-work-orders` | work orders' sandboxes (`repositories/`), agent output (`outputs/`) and logs (`logs/`) |
//! | `AWO_ALLOWED_URL_SCHEMES` | `https` | comma-separated schemes a work order's repository URL may use (`https`, `http`, `ssh`, `git`, `file`) |
//! | `AWO_ALLOWED_HOSTS` | `github.com` | comma-separated hosts a repository URL may name: `host`, `host:port`, `*.domain` or `*`; a host matched only by a wildcard must not resolve to a loopback, private, link-local or metadata address |
//! | `AWO_GIT_HOSTS` | `github.com` | comma-separated forge hosts `GITHUB_TOKEN` is offered to (over https only) |
//! | `AWO_AGENT_USER` | `nobody` when the worker runs as root, else unset | the user (name or `uid[:gid]`) the coding agent runs as |
//! | `AWO_MAX_OUTPUT_BYTES` | `16777216` | bytes of one agent, git or gh call's output kept (first and last halves) |
//! | `AWO_MAX_REPO_FILES`, `AWO_MAX_REPO_BYTES` | `250000`, `2147483648` | files and bytes a repository's checkout may have; checked before anything is written |
//! | `CLAUDE_CLI_PATH`, `GH_CLI_PATH`, `GIT_PATH` | `claude`, `gh`, `git` | the coding-agent CLI, the GitHub CLI and git |
//! | `GITHUB_TOKEN` | unset | reaches git (credential helper) and gh through the environment only |
//! | `ANTHROPIC_API_KEY` | unset | the live text provider's key; passed to the coding-agent CLI through its environment |
//! | `AGENT_WORK_ORDER_TIMEOUT` | `3600` | seconds one agent, git or gh call may take before its process group is killed |
//! | `CLAUDE_CLI_MODEL`, `CLAUDE_CLI_MAX_TURNS` | `sonnet`, unset | model and turn limit of the coding agent |
//! | `CLAUDE_CLI_SKIP_PERMISSIONS`, `CLAUDE_CLI_VERBOSE` | `true`, `true` | pass `--dangerously-skip-permissions` (never as root: see `AWO_AGENT_USER`); `--verbose` is always passed (stream-json needs it), so `false` is refused |
//! | `AGENT_WORK_ORDER_COMMANDS_DIR` | unset | directory of command templates (`plan.md`, `implement.md`) overriding the shipped ones |
//! | `ENABLE_PROMPT_LOGGING`, `ENABLE_OUTPUT_ARTIFACTS` | `true`, `true` | keep each step's prompt, and its raw JSONL, under `outputs/{id}/` |
//! | `ARCHON_AWO_PORT` | `8888` | the extra port compose exposes the API on for the work-order stack |

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use secrecy::{ExposeSecret, SecretString};
pub use stagecraft_core::settings::ConfigError;
use stagecraft_core::settings::{Vars, process_env};

pub use stagecraft_awo::settings::{AgentUser, AwoSettings};
pub use stagecraft_core::store::ProviderMode;
pub use stagecraft_store_sqlite::sqlite_url_for;
pub use stagecraft_studio::settings::{LiveSettings, SpeechProvider, StudioSettings};

use crate::{
    artifacts::ObjectSettings,
    engine::RetryPolicy,
    process::BaseEnv,
    secrets::Scrubber,
    store::{postgres::PoolMode, redis::SentinelOptions},
};

/// Variables of this process's environment every subprocess may see.
const BASE_ENV_VARIABLES: [&str; 9] = [
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// Everything the processes need to know about their deployment.
#[derive(Debug, Clone)]
pub struct Config {
    /// `development` or `production`.
    pub env: Environment,
    /// Reported by `/health`; development defaults to true.
    pub debug: bool,
    /// Whether the console's session cookie is `Secure` (HTTPS only).
    pub console_secure_cookie: bool,
    /// The `tracing` filter directive.
    pub log_level: String,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// The provider mode a run gets when it does not ask for one.
    pub provider_mode: ProviderMode,
    /// Root of all artifacts, or with `artifact_objects` the scratch root; created at start-up.
    pub artifact_dir: PathBuf,
    /// The bucket artifacts are kept in, when they are not local (`ARTIFACT_STORE_URL`).
    pub artifact_objects: Option<ObjectSettings>,
    /// Which durable store carries runs.
    pub backend: BackendKind,
    /// The SQLite or PostgreSQL database URL (may carry a password: never log it unredacted).
    pub database_url: SecretString,
    /// How `database_url` reaches PostgreSQL: directly (or a session-mode pooler) or through a
    /// transaction-mode pooler.
    pub database_pool_mode: PoolMode,
    /// PostgreSQL itself, past a transaction-mode pooler (may carry a password).
    pub database_direct_url: Option<SecretString>,
    /// `PGPASSWORD`, which PostgreSQL's driver reads when a URL names no password: scrubbed.
    pub database_password_env: Option<SecretString>,
    /// The Redis URL (may carry a password: never log it unredacted).
    pub redis_url: SecretString,
    /// Prefix of every Redis key.
    pub redis_prefix: String,
    /// The sentinels that name the Redis primary, when it is found that way.
    pub redis_sentinel: Option<SentinelOptions>,
    /// Replicas that must have a change before it is acknowledged.
    pub redis_durable_acks: u32,
    /// How long a change waits for them.
    pub redis_ack_timeout: Duration,
    /// Listen address of the HTTP API.
    pub host: IpAddr,
    /// Listen port of the HTTP API; 0 picks a free one.
    pub port: u16,
    /// How many runs one worker process executes at once.
    pub worker_concurrency: usize,
    /// Threads of a worker process's async runtime.
    pub worker_threads: usize,
    /// Lease lifetime without a heartbeat; recovery after a crash takes at most this plus one sweep.
    pub lease_ttl: Duration,
    /// Interval of the expired-lease sweeper.
    pub sweep_interval: Duration,
    /// How long an idle worker waits before asking the store again (it is also woken at once by
    /// submissions made in the same process).
    pub poll_interval: Duration,
    /// How long a stopping worker lets a running stage continue before abandoning it.
    pub shutdown_grace: Duration,
    /// Retry policy of stages that do not declare their own.
    pub default_retry: RetryPolicy,
    /// Bearer token required on every route but `/health`, when set.
    pub api_token: Option<SecretString>,
    /// A bearer token that may use `GET` routes only.
    pub api_token_readonly: Option<SecretString>,
    /// Lets the API start without `API_TOKEN` where it would otherwise refuse (production, or a
    /// non-loopback address).
    pub allow_unauthenticated: bool,
    /// Origins allowed by CORS.
    pub cors: Cors,
    /// Open event streams one API process serves at once; more are refused with 503.
    pub max_event_streams: usize,
    /// Synchronous submits (waiting for a run to finish) one API process holds at once.
    pub max_sync_waits: usize,
    /// What every subprocess may see of this process's environment: nothing secret.
    pub base_env: BaseEnv,
    /// How long finished runs are kept.
    pub run_retention: Duration,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// How long a synchronous submit waits for completion before answering 202.
    pub sync_wait: Duration,
    /// Base URL of the API for the client commands.
    pub api_url: String,
    /// Media tools and mock provider behaviour of the studio agents.
    pub studio: StudioSettings,
    /// Agent work orders: data directory, tools, credentials, limits.
    pub awo: AwoSettings,
}

/// Which origins CORS allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cors {
    /// No CORS headers at all.
    Off,
    /// Any origin (`CORS_ORIGINS=*`), never with credentials.
    Any,
    /// These origins.
    Origins(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Development,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Development => "development",
            Self::Production => "production",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Sqlite,
    Redis,
    Postgres,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Redis => "redis",
            Self::Postgres => "postgres",
        }
    }
}

impl Config {
    /// Reads the process environment, and `.env` (if present) for variables the environment
    /// does not set. `.env` is read into the configuration only, never into the environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        // A missing .env file is normal; a malformed line is reported by the value it leaves unset.
        let file: std::collections::HashMap<String, String> = dotenvy::from_path_iter(".env")
            .map(|lines| lines.filter_map(Result::ok).collect())
            .unwrap_or_default();
        Self::from_lookup(|name| process_env(name).or_else(|| file.get(name).cloned()))
    }

    /// Refuses to serve the API open to anyone: in production or on a non-loopback address, an
    /// `API_TOKEN` is required unless `ALLOW_UNAUTHENTICATED=true` says otherwise.
    pub fn check_api_exposure(&self) -> Result<(), ConfigError> {
        let exposed = self.env == Environment::Production || !self.host.is_loopback();
        if !exposed || self.api_token.is_some() || self.allow_unauthenticated {
            return Ok(());
        }
        Err(ConfigError {
            variable: "API_TOKEN",
            value: String::new(),
            reason: format!(
                "the API would serve {} without authentication (ENV={}); set API_TOKEN, or set \
                 ALLOW_UNAUTHENTICATED=true to serve it open on purpose",
                self.host,
                self.env.as_str()
            ),
        })
    }

    /// Whether the API runs open where a token is expected (`ALLOW_UNAUTHENTICATED` used).
    pub fn serves_unauthenticated_on_purpose(&self) -> bool {
        let exposed = self.env == Environment::Production || !self.host.is_loopback();
        exposed && self.api_token.is_none() && self.allow_unauthenticated
    }

    /// A scrubber that knows every secret of this deployment.
    pub fn scrubber(&self) -> Scrubber {
        let live = &self.studio.live;
        let mut values: Vec<String> = [
            &self.api_token,
            &self.api_token_readonly,
            &live.anthropic_key,
            &live.runway_key,
            &live.elevenlabs_key,
            &live.openai_key,
            &self.awo.github_token,
            &self.awo.anthropic_api_key,
        ]
        .into_iter()
        .chain(
            self.artifact_objects
                .iter()
                .flat_map(|o| [&o.secret_access_key, &o.session_token]),
        )
        .flatten()
        .map(|secret| secret.expose_secret().to_owned())
        .collect();
        let urls = [&self.redis_url, &self.database_url]
            .into_iter()
            .chain(&self.database_direct_url);
        values.extend(urls.flat_map(|url| url_secrets(url.expose_secret())));
        values.extend(
            self.database_password_env
                .iter()
                .map(|secret| secret.expose_secret().to_owned()),
        );
        Scrubber::new(values)
    }

    /// Builds the configuration from any lookup function, so tests can pass a map. Each
    /// variable's default is written once, where it is read (the tenants read their own).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let vars = Vars::new(&lookup);
        let env = vars.parse_with("ENV", Environment::Development, |v| match v {
            "development" | "dev" => Ok(Environment::Development),
            "production" | "prod" => Ok(Environment::Production),
            _ => Err("expected development or production".to_owned()),
        })?;
        let development = env == Environment::Development;
        let log_format = vars.parse_with(
            "LOG_FORMAT",
            if development {
                LogFormat::Pretty
            } else {
                LogFormat::Json
            },
            |v| match v {
                "pretty" | "text" => Ok(LogFormat::Pretty),
                "json" => Ok(LogFormat::Json),
                _ => Err("expected pretty or json".to_owned()),
            },
        )?;
        let provider_mode = vars.parse_with("PROVIDER_MODE", ProviderMode::Mock, |v| {
            ProviderMode::parse(v).ok_or_else(|| "expected mock or live".to_owned())
        })?;
        let data_dir = vars.path_or("DATA_DIR", "./data");
        let store = StoreSettings::from_vars(&vars, &data_dir)?;
        let (api_token, api_token_readonly) = tokens(&vars)?;
        let base_env = vars.environment(&BASE_ENV_VARIABLES);
        let studio = StudioSettings::from_vars(&vars, &base_env)?;
        let mut awo = AwoSettings::from_vars(&vars, &data_dir, &base_env)?;
        awo.require_agent_isolation = env == Environment::Production;
        Ok(Self {
            env,
            debug: vars.flag("DEBUG", development)?,
            log_level: vars.text("LOG_LEVEL", "info"),
            log_format,
            provider_mode,
            artifact_dir: vars.path_or("ARTIFACT_DIR", "./artifacts"),
            artifact_objects: artifact_objects(&vars)?,
            backend: store.backend,
            database_url: SecretString::from(store.database_url),
            database_pool_mode: store.pool_mode,
            database_direct_url: store.direct_url.map(SecretString::from),
            database_password_env: store.password_env,
            redis_url: store.redis_url,
            redis_prefix: store.redis_prefix,
            redis_sentinel: store.sentinel,
            redis_durable_acks: store.durable_acks,
            redis_ack_timeout: store.ack_timeout,
            host: vars.parse("HOST", IpAddr::from([127, 0, 0, 1]))?,
            port: vars.parse("PORT", 8000u16)?,
            worker_concurrency: vars.parse_in("WORKER_CONCURRENCY", 4, 1, 1024)? as usize,
            worker_threads: vars.parse_in("WORKER_THREADS", 1, 1, 256)? as usize,
            lease_ttl: vars.secs("LEASE_TTL_SECS", 10, 1, 86_400)?,
            sweep_interval: vars.millis("SWEEP_INTERVAL_MS", 5000, 1, 86_400_000)?,
            poll_interval: vars.millis("POLL_INTERVAL_MS", 20, 1, 60_000)?,
            shutdown_grace: vars.secs("SHUTDOWN_GRACE_SECS", 30, 0, 86_400)?,
            default_retry: RetryPolicy {
                max_attempts: vars.parse_in("STAGE_MAX_ATTEMPTS", 3, 1, 100)? as u32,
                base_delay: vars.millis("RETRY_BASE_MS", 1000, 0, 86_400_000)?,
                max_delay: vars.millis("RETRY_MAX_MS", 60_000, 0, 86_400_000)?,
                timeout: vars.secs("STAGE_TIMEOUT_SECS", 3600, 1, 604_800)?,
            },
            api_token,
            api_token_readonly,
            allow_unauthenticated: vars.flag("ALLOW_UNAUTHENTICATED", false)?,
            console_secure_cookie: vars.flag("CONSOLE_SECURE_COOKIE", !development)?,
            cors: parse_cors(vars.string("CORS_ORIGINS"))?,
            max_event_streams: vars.parse_in("MAX_EVENT_STREAMS", 1000, 1, 100_000)? as usize,
            max_sync_waits: vars.parse_in("MAX_SYNC_WAITS", 256, 1, 100_000)? as usize,
            base_env,
            run_retention: vars.secs("RUN_RETENTION_DAYS", 7, 1, 36_500)? * 86_400,
            max_body_bytes: vars.parse_in("MAX_BODY_BYTES", 1 << 20, 1024, 64 << 20)? as usize,
            sync_wait: vars.secs("SYNC_WAIT_SECS", 30, 0, 3600)?,
            api_url: vars.base_url("STAGECRAFT_URL", "http://127.0.0.1:8000"),
            studio,
            awo,
        })
    }
}

/// Where runs are stored.
struct StoreSettings {
    backend: BackendKind,
    database_url: String,
    pool_mode: PoolMode,
    direct_url: Option<String>,
    password_env: Option<SecretString>,
    redis_url: SecretString,
    redis_prefix: String,
    sentinel: Option<SentinelOptions>,
    durable_acks: u32,
    ack_timeout: Duration,
}

impl StoreSettings {
    fn from_vars(vars: &Vars<'_>, data_dir: &Path) -> Result<Self, ConfigError> {
        let given_url = vars.string("DATABASE_URL");
        let postgres_url = given_url.as_deref().is_some_and(is_postgres_url);
        // Unset, the store follows DATABASE_URL's scheme.
        let inferred = if postgres_url {
            BackendKind::Postgres
        } else {
            BackendKind::Sqlite
        };
        let backend = vars.parse_with("QUEUE_BACKEND", inferred, |v| match v {
            "sqlite" => Ok(BackendKind::Sqlite),
            "redis" => Ok(BackendKind::Redis),
            "postgres" | "postgresql" => Ok(BackendKind::Postgres),
            _ => Err("expected sqlite, redis or postgres".to_owned()),
        })?;
        let redis_url = vars.text("REDIS_URL", "redis://127.0.0.1:6379");
        if !["redis://", "rediss://", "unix://"]
            .iter()
            .any(|scheme| redis_url.starts_with(scheme))
        {
            return Err(ConfigError {
                variable: "REDIS_URL",
                value: redact_url(&redis_url),
                reason: "expected a redis://, rediss:// or unix:// URL".to_owned(),
            });
        }
        let database_url = database_url(backend, given_url, data_dir)?;
        let (pool_mode, direct_url) = pooler(vars, backend)?;
        Ok(Self {
            backend,
            database_url,
            pool_mode,
            direct_url,
            password_env: vars.string("PGPASSWORD").map(SecretString::from),
            redis_url: SecretString::from(redis_url),
            redis_prefix: vars.text("REDIS_KEY_PREFIX", "stagecraft:"),
            sentinel: sentinels(vars)?,
            durable_acks: vars.parse_in("REDIS_DURABLE_ACKS", 0, 0, 64)? as u32,
            ack_timeout: vars.millis("REDIS_ACK_TIMEOUT_MS", 2000, 1, 60_000)?,
        })
    }
}

fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `DATABASE_URL` as the store needs it: a `sqlite:` URL (by default the file in `DATA_DIR`)
/// for SQLite, a `postgres://` URL for PostgreSQL; a URL of the other kind is a contradiction.
fn database_url(
    backend: BackendKind,
    given: Option<String>,
    data_dir: &Path,
) -> Result<String, ConfigError> {
    let refuse = |value: &str, reason: String| ConfigError {
        variable: "DATABASE_URL",
        value: redact_url(value),
        reason,
    };
    match (backend, given) {
        (BackendKind::Postgres, Some(url)) if is_postgres_url(&url) => {
            check_postgres_url("DATABASE_URL", &url)?;
            Ok(url)
        }
        (BackendKind::Postgres, given) => Err(refuse(
            given.as_deref().unwrap_or_default(),
            "QUEUE_BACKEND=postgres needs DATABASE_URL=postgres://user:password@host:5432/database"
                .to_owned(),
        )),
        (backend, Some(url)) if is_postgres_url(&url) => Err(refuse(
            &url,
            format!(
                "a PostgreSQL URL with QUEUE_BACKEND={}: set QUEUE_BACKEND=postgres (or leave it \
                 unset), or give a sqlite: URL",
                backend.as_str()
            ),
        )),
        (_, Some(url)) if !url.starts_with("sqlite:") => Err(refuse(
            &url,
            "expected a sqlite: or postgres:// URL".to_owned(),
        )),
        (_, Some(url)) => Ok(url),
        (_, None) => Ok(sqlite_url_for(&data_dir.join("stagecraft.db"))),
    }
}

/// `DATABASE_POOL_MODE` and `DATABASE_DIRECT_URL`: how PostgreSQL is reached. Either set for
/// another store, or a direct URL without a transaction-mode pooler, is a contradiction.
fn pooler(
    vars: &Vars<'_>,
    backend: BackendKind,
) -> Result<(PoolMode, Option<String>), ConfigError> {
    let mode = vars.parse_with("DATABASE_POOL_MODE", PoolMode::Session, |v| match v {
        "session" => Ok(PoolMode::Session),
        "transaction" => Ok(PoolMode::Transaction),
        _ => Err("expected session or transaction".to_owned()),
    })?;
    let direct = vars.string("DATABASE_DIRECT_URL");
    let refuse = |variable: &'static str, value: String, reason: &str| ConfigError {
        variable,
        value,
        reason: reason.to_owned(),
    };
    if mode == PoolMode::Transaction && backend != BackendKind::Postgres {
        return Err(refuse(
            "DATABASE_POOL_MODE",
            "transaction".to_owned(),
            "a pool mode is a PostgreSQL setting: set QUEUE_BACKEND=postgres, or unset it",
        ));
    }
    match direct {
        Some(url) if !is_postgres_url(&url) => Err(refuse(
            "DATABASE_DIRECT_URL",
            redact_url(&url),
            "expected a postgres:// URL",
        )),
        Some(url) if mode != PoolMode::Transaction => Err(refuse(
            "DATABASE_DIRECT_URL",
            redact_url(&url),
            "used only with DATABASE_POOL_MODE=transaction (DATABASE_URL is direct otherwise)",
        )),
        Some(url) => {
            check_postgres_url("DATABASE_DIRECT_URL", &url)?;
            Ok((mode, Some(url)))
        }
        None => Ok((mode, None)),
    }
}

/// `REDIS_SENTINELS` (each `host:port`) and `REDIS_SENTINEL_MASTER`.
fn sentinels(vars: &Vars<'_>) -> Result<Option<SentinelOptions>, ConfigError> {
    let Some(list) = vars.string("REDIS_SENTINELS") else {
        return Ok(None);
    };
    let sentinels: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let valid = |s: &String| {
        s.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty()
                && !host.contains(['/', '@', ' '])
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        })
    };
    if sentinels.is_empty() || !sentinels.iter().all(valid) {
        return Err(ConfigError {
            variable: "REDIS_SENTINELS",
            value: list,
            reason: "expected a comma-separated list of host:port".to_owned(),
        });
    }
    Ok(Some(SentinelOptions {
        sentinels,
        master: vars.text("REDIS_SENTINEL_MASTER", "stagecraft"),
    }))
}

/// `ARTIFACT_STORE_URL` and the standard `AWS_*` variables of the bucket it names.
fn artifact_objects(vars: &Vars<'_>) -> Result<Option<ObjectSettings>, ConfigError> {
    let Some(url) = vars.string("ARTIFACT_STORE_URL") else {
        return Ok(None);
    };
    let Some((bucket, prefix)) = ObjectSettings::parse_url(&url) else {
        return Err(ConfigError {
            variable: "ARTIFACT_STORE_URL",
            value: url,
            reason: "expected s3://bucket or s3://bucket/prefix (a bucket name of 3 to 63 \
                     lowercase letters, digits, dots and dashes; a prefix of safe path segments); \
                     leave it unset to keep artifacts in ARTIFACT_DIR"
                .to_owned(),
        });
    };
    let endpoint = vars.string("AWS_ENDPOINT_URL");
    if let Some(endpoint) = &endpoint
        && !(endpoint.starts_with("https://") || endpoint.starts_with("http://"))
    {
        return Err(ConfigError {
            variable: "AWS_ENDPOINT_URL",
            value: endpoint.clone(),
            reason: "expected an http:// or https:// URL".to_owned(),
        });
    }
    Ok(Some(ObjectSettings {
        bucket,
        prefix,
        endpoint,
        region: vars.string("AWS_REGION"),
        access_key_id: vars.string("AWS_ACCESS_KEY_ID"),
        secret_access_key: vars.secret("AWS_SECRET_ACCESS_KEY"),
        session_token: vars.secret("AWS_SESSION_TOKEN"),
        allow_http: vars.flag("AWS_ALLOW_HTTP", false)?,
    }))
}

/// `API_TOKEN` and `API_TOKEN_READONLY`: the read-only token is a second, weaker token, so it
/// needs the full one and must differ from it.
fn tokens(vars: &Vars<'_>) -> Result<(Option<SecretString>, Option<SecretString>), ConfigError> {
    let api_token = vars.secret("API_TOKEN");
    let read_only = vars.secret("API_TOKEN_READONLY");
    let refused = |reason: &str| ConfigError {
        variable: "API_TOKEN_READONLY",
        value: "***".to_owned(),
        reason: reason.to_owned(),
    };
    match (&api_token, &read_only) {
        (Some(full), Some(weak)) if full.expose_secret() == weak.expose_secret() => {
            Err(refused("must differ from API_TOKEN"))
        }
        (None, Some(_)) => Err(refused(
            "needs API_TOKEN too (the read-only token is a second, weaker token)",
        )),
        _ => Ok((api_token, read_only)),
    }
}

/// The secrets a URL carries, read as the stores' drivers read it (the WHATWG URL parser, as
/// sqlx and redis-rs use) and as written: the password of its user info
/// (`scheme://user:password@host`), and the value of any query parameter that names one
/// (`?password=…`, which PostgreSQL's driver reads; `?pass=…`, Redis's over a socket). A URL
/// that does not parse has everything between its scheme and its last `@` taken as secret.
fn url_secrets(url: &str) -> Vec<String> {
    let mut found = Vec::new();
    match reqwest::Url::parse(url) {
        Ok(parsed) => {
            if let Some(password) = parsed.password() {
                found.push(password.to_owned());
                found.push(percent_decoded(password));
            }
            found.extend(
                parsed
                    .query_pairs()
                    .filter(|(key, _)| names_a_secret(key))
                    .map(|(_, value)| value.into_owned()),
            );
            // As written, too (the driver decodes it; a text may quote it).
            found.extend(
                parsed
                    .query()
                    .into_iter()
                    .flat_map(|query| query.split('&'))
                    .filter_map(|pair| pair.split_once('='))
                    .filter(|(key, _)| names_a_secret(&percent_decoded(key)))
                    .map(|(_, value)| value.to_owned()),
            );
        }
        Err(_) => found.extend(
            url.split_once("://")
                .and_then(|(_, rest)| rest.rsplit_once('@'))
                .map(|(user_info, _)| user_info.to_owned()),
        ),
    }
    found.retain(|secret| !secret.is_empty());
    found
}

/// Whether a URL's query parameter holds a secret (`password`, `sslpassword`, `pass`, …).
fn names_a_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("pass") || key.contains("pwd") || key.contains("secret") || key.contains("token")
}

/// `%XX` escapes decoded (as a URL's user info is); anything not valid UTF-8 replaced.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let escaped = (bytes[at] == b'%')
            .then(|| text.get(at + 1..at + 3))
            .flatten()
            .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                at += 3;
            }
            None => {
                decoded.push(bytes[at]);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// The query parameters a PostgreSQL URL may carry: the driver's own (TLS, and where and as
/// whom to connect). Any other is refused by name: the driver would ignore it (a misspelt
/// `sslmode` connecting without TLS unnoticed) and log its value.
const POSTGRES_URL_PARAMETERS: [&str; 18] = [
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
    "statement-cache-capacity",
];

/// The values of `sslmode`, as libpq names them.
const SSL_MODES: [&str; 6] = [
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

/// Refuses a PostgreSQL URL whose query the driver would not read as written: an unknown
/// parameter, an `sslmode` it does not know, or a certificate or key file that cannot be read.
/// The refusal shows the URL without its query (a misspelt parameter may hold a secret).
fn check_postgres_url(variable: &'static str, url: &str) -> Result<(), ConfigError> {
    let refuse = |reason: String| ConfigError {
        variable,
        value: without_query(&redact_url(url)),
        reason,
    };
    let parsed =
        reqwest::Url::parse(url).map_err(|error| refuse(format!("not a valid URL: {error}")))?;
    for (key, value) in parsed.query_pairs() {
        if !POSTGRES_URL_PARAMETERS.contains(&&*key) {
            let named = if key.len() <= 40
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_[]".contains(c))
            {
                format!("`{key}`")
            } else {
                "a parameter".to_owned()
            };
            return Err(refuse(format!(
                "unknown: {named} (known: {})",
                POSTGRES_URL_PARAMETERS.join(", ")
            )));
        }
        if matches!(&*key, "sslmode" | "ssl-mode") && !SSL_MODES.contains(&&*value) {
            return Err(refuse(format!(
                "unknown sslmode (expected {})",
                SSL_MODES.join(", ")
            )));
        }
        let names_a_file = matches!(
            &*key,
            "sslrootcert"
                | "ssl-root-cert"
                | "ssl-ca"
                | "sslcert"
                | "ssl-cert"
                | "sslkey"
                | "ssl-key"
        );
        // A PEM text in place of a path is read as it is.
        if names_a_file && !value.trim_start().starts_with("-----BEGIN") {
            if let Err(error) = std::fs::File::open(&*value) {
                return Err(refuse(format!("{key} {value} cannot be read: {error}")));
            }
        }
    }
    Ok(())
}

/// A URL without its query and fragment.
fn without_query(url: &str) -> String {
    url.split(['?', '#']).next().unwrap_or_default().to_owned()
}

/// `CORS_ORIGINS`: unset means none, `*` any origin, else a list of origins that must parse.
fn parse_cors(value: Option<String>) -> Result<Cors, ConfigError> {
    let Some(value) = value else {
        return Ok(Cors::Off);
    };
    let origins: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if origins.iter().any(|o| o == "*") {
        return if origins.len() == 1 {
            Ok(Cors::Any)
        } else {
            Err(ConfigError {
                variable: "CORS_ORIGINS",
                value,
                reason: "`*` allows any origin and cannot be combined with others".to_owned(),
            })
        };
    }
    if let Some(bad) = origins.iter().find(|o| {
        !(o.starts_with("http://") || o.starts_with("https://"))
            || axum::http::HeaderValue::from_str(o).is_err()
    }) {
        return Err(ConfigError {
            variable: "CORS_ORIGINS",
            value: bad.clone(),
            reason: "expected `*` or comma-separated origins such as https://app.example.com"
                .to_owned(),
        });
    }
    Ok(if origins.is_empty() {
        Cors::Off
    } else {
        Cors::Origins(origins)
    })
}

/// A URL for messages and logs: its user info replaced by `***`, and the value of any query
/// parameter that names a secret too. It is read as the drivers read it; a URL that does not
/// parse shows only its scheme and what follows its last `@`, without a query.
pub fn redact_url(url: &str) -> String {
    let fallback = || match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!(
                "{}://***@{}",
                &url[..scheme_end],
                without_query(&url[at + 1..])
            )
        }
        _ => without_query(url),
    };
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return fallback();
    };
    let had_user = !parsed.username().is_empty() || parsed.password().is_some();
    let query: Vec<String> = parsed
        .query_pairs()
        .map(|(key, value)| match names_a_secret(&key) {
            true => format!("{key}=***"),
            false => format!("{key}={value}"),
        })
        .collect();
    let fragment = parsed.fragment().map(str::to_owned);
    parsed.set_query(None);
    parsed.set_fragment(None);
    if had_user && (parsed.set_password(None).is_err() || parsed.set_username("").is_err()) {
        return fallback();
    }
    let mut shown = parsed.to_string();
    if had_user {
        shown = shown.replacen("://", "://***@", 1);
    }
    if !query.is_empty() {
        shown = format!("{shown}?{}", query.join("&"));
    }
    match fragment {
        Some(fragment) => format!("{shown}#{fragment}"),
        None => shown,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config_from(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn the_agent_user_is_never_root_and_production_isolates_the_agent() {
        for value in ["0", "0:0", "1000:0", "root"] {
            let error = config_from(&[("AWO_AGENT_USER", value)]).expect_err(value);
            assert_eq!(error.variable, "AWO_AGENT_USER", "{value}");
        }
        let config = config_from(&[("AWO_AGENT_USER", "10002:10003")]).expect("numeric");
        let user = config.awo.agent_user.expect("a user");
        assert_eq!((user.uid, user.gid), (10002, 10003));
        assert!(!config.awo.require_agent_isolation);
        let config = config_from(&[("ENV", "production"), ("API_TOKEN", "a-long-enough-token")])
            .expect("production");
        assert!(config.awo.require_agent_isolation);
        assert!(config_from(&[("AWO_MAX_REPO_FILES", "0")]).is_err());
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = config_from(&[]).expect("defaults parse");
        assert_eq!(config.port, 8000);
        assert_eq!(config.lease_ttl, Duration::from_secs(10));
        assert_eq!(config.sweep_interval, Duration::from_secs(5));
        assert_eq!(config.provider_mode, ProviderMode::Mock);
        assert_eq!(config.backend, BackendKind::Sqlite);
        assert!(config.api_token.is_none());
        assert_eq!(
            config.database_url.expose_secret(),
            "sqlite://./data/stagecraft.db"
        );
        assert_eq!(config.worker_concurrency, 4);
        assert_eq!(config.worker_threads, 1);
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let error = config_from(&[("LEASE_TTL_SECS", "ten")]).expect_err("must fail");
        assert_eq!(error.variable, "LEASE_TTL_SECS");
        assert!(error.to_string().contains("LEASE_TTL_SECS"));
        let error = config_from(&[("PROVIDER_MODE", "real")]).expect_err("must fail");
        assert_eq!(error.variable, "PROVIDER_MODE");
        let error = config_from(&[("WORKER_CONCURRENCY", "0")]).expect_err("must fail");
        assert_eq!(error.variable, "WORKER_CONCURRENCY");
        let error = config_from(&[("WORKER_THREADS", "0")]).expect_err("must fail");
        assert_eq!(error.variable, "WORKER_THREADS");
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        assert_eq!(
            redact_url("redis://:hunter2@cache:6379/0"),
            "redis://***@cache:6379/0"
        );
        assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
        let error =
            config_from(&[("REDIS_URL", "http://user:hunter2@cache")]).expect_err("must fail");
        assert!(!error.to_string().contains("hunter2"));
        assert_eq!(
            redact_url("postgres://db/x?sslmode=require&password=hunter2&sslpassword=k"),
            "postgres://db/x?sslmode=require&password=***&sslpassword=***"
        );
        // An unescaped `?` or `@` in the password: hidden whole.
        assert_eq!(
            redact_url("postgres://u:hun?ter@2@db/x"),
            "postgres://***@db/x"
        );
    }

    #[test]
    fn a_postgres_url_carries_only_what_the_driver_reads_and_its_secrets_are_scrubbed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----").expect("a CA file");
        let tls = format!(
            "postgres://app@db:5432/app?sslmode=verify-full&sslrootcert={}",
            ca.display()
        );
        config_from(&[("DATABASE_URL", &tls)]).expect("TLS settings are known");
        let missing = dir.path().join("missing.pem");
        for (url, named) in [
            ("postgres://app@db/app?sslmod=require".to_owned(), "sslmod"),
            (
                "postgres://app@db/app?sslmode=required".to_owned(),
                "sslmode",
            ),
            (
                "postgres://app@db/app?sslpassword=k-0123456789".to_owned(),
                "sslpassword",
            ),
            ("postgres://app@db/app?pwd=k-0123456789".to_owned(), "pwd"),
            (
                "postgres://app@db/app?password%3Dk-0123456789".to_owned(),
                "a parameter",
            ),
            (
                format!("postgres://app@db/app?sslrootcert={}", missing.display()),
                "cannot be read",
            ),
        ] {
            let error = config_from(&[("DATABASE_URL", &url)]).expect_err(&url);
            assert_eq!(error.variable, "DATABASE_URL");
            assert!(error.reason.contains(named), "{error}");
            assert!(!error.to_string().contains("k-0123456789"), "{error}");
        }
        let direct = config_from(&[
            ("DATABASE_URL", "postgres://app:p@bouncer/app"),
            ("DATABASE_POOL_MODE", "transaction"),
            (
                "DATABASE_DIRECT_URL",
                "postgres://app@db/app?ssl_mode=require",
            ),
        ])
        .expect_err("an unknown parameter");
        assert_eq!(direct.variable, "DATABASE_DIRECT_URL");

        let config = config_from(&[
            (
                "DATABASE_URL",
                "postgres://app:p%40ss+0123456789@db/app?password=q%40-0123456789",
            ),
            ("PGPASSWORD", "env-0123456789"),
        ])
        .expect("parses");
        let scrubbed = config
            .scrubber()
            .scrub("p%40ss+0123456789 p@ss+0123456789 q@-0123456789 env-0123456789")
            .into_owned();
        assert_eq!(scrubbed, "*** *** *** ***");
        let no_password = config_from(&[("DATABASE_URL", "postgres://stagecraft@db/stagecraft")])
            .expect("parses");
        assert_eq!(no_password.scrubber().scrub("stagecraft"), "stagecraft");
    }

    /// URLs are read as the drivers read them (the WHATWG parser): where the user info ends,
    /// which query parameter holds a password, how it is decoded.
    #[test]
    fn secrets_in_urls_are_found_where_the_drivers_find_them() {
        for (url, secret, shown) in [
            (
                "postgres://app@db/app?password=s3cr@t-value-123",
                "s3cr@t-value-123",
                "postgres://***@db/app?password=***",
            ),
            (
                "postgres://app@db/app?pass%77ord=hunter2-long",
                "hunter2-long",
                "postgres://***@db/app?password=***",
            ),
            (
                "postgres://u:a+b%21longpass@db/x?application_name=a@b",
                "a+b!longpass",
                "postgres://***@db/x?application_name=a@b",
            ),
            (
                "unix:///run/redis.sock?db=0&pass=hunter2-long",
                "hunter2-long",
                "unix:///run/redis.sock?db=0&pass=***",
            ),
        ] {
            assert!(
                url_secrets(url).iter().any(|found| found == secret),
                "{url}: {:?}",
                url_secrets(url)
            );
            assert_eq!(redact_url(url), shown);
        }
    }

    /// Every variable of the module's table (what `from_lookup` reads) is in `.env.example`.
    #[test]
    fn every_variable_is_documented_in_the_example_file() {
        let example = include_str!("../.env.example");
        let table = include_str!("config.rs");
        let mut checked = 0;
        for row in table.lines().filter(|l| l.starts_with("//! | `")) {
            let first_cell = row.split('|').nth(1).unwrap_or_default();
            for name in first_cell.split('`').skip(1).step_by(2) {
                assert!(
                    example.contains(&format!("{name}=")),
                    "{name} is not in .env.example"
                );
                checked += 1;
            }
        }
        assert!(checked > 50, "only {checked} variables found in the table");
    }

    #[test]
    fn cors_star_means_any_origin_and_exposure_needs_a_token() {
        assert_eq!(
            config_from(&[("CORS_ORIGINS", "*")]).expect("parses").cors,
            Cors::Any
        );
        assert!(config_from(&[("CORS_ORIGINS", "*, https://a.example")]).is_err());
        let open = config_from(&[("HOST", "0.0.0.0")]).expect("parses");
        assert_eq!(
            open.check_api_exposure().expect_err("refused").variable,
            "API_TOKEN"
        );
        let empty_token =
            config_from(&[("ENV", "production"), ("API_TOKEN", " ")]).expect("parses");
        assert!(empty_token.check_api_exposure().is_err());
        let allowed =
            config_from(&[("HOST", "0.0.0.0"), ("ALLOW_UNAUTHENTICATED", "true")]).expect("parses");
        assert!(allowed.check_api_exposure().is_ok());
        assert!(allowed.serves_unauthenticated_on_purpose());
        let local = config_from(&[]).expect("parses");
        assert!(local.check_api_exposure().is_ok());
    }

    #[test]
    fn the_scrubber_knows_every_secret_including_the_redis_password() {
        let config = config_from(&[
            ("API_TOKEN", "tok-0123456789"),
            ("REDIS_URL", "redis://:pass-0123456789@cache:6379/0"),
            ("RUNWAY_API_KEY", "rw-0123456789"),
        ])
        .expect("parses");
        let scrubbed = config
            .scrubber()
            .scrub("tok-0123456789 pass-0123456789 rw-0123456789")
            .into_owned();
        assert_eq!(scrubbed, "*** *** ***");
        let with_bucket = config_from(&[
            ("ARTIFACT_STORE_URL", "s3://media/stagecraft"),
            ("AWS_SECRET_ACCESS_KEY", "aws-secret-0123456789"),
            ("AWS_SESSION_TOKEN", "aws-session-0123456789"),
        ])
        .expect("parses");
        assert_eq!(
            with_bucket
                .scrubber()
                .scrub("aws-secret-0123456789 aws-session-0123456789"),
            "*** ***"
        );
    }

    #[test]
    fn the_store_follows_the_database_url_and_contradictions_stop_start_up() {
        let url = "postgres://stagecraft:pg-secret-0123@db:5432/stagecraft";
        let inferred = config_from(&[("DATABASE_URL", url)]).expect("parses");
        assert_eq!(inferred.backend, BackendKind::Postgres);
        assert_eq!(inferred.scrubber().scrub("pg-secret-0123"), "***");
        let named =
            config_from(&[("QUEUE_BACKEND", "postgres"), ("DATABASE_URL", url)]).expect("parses");
        assert_eq!(named.backend.as_str(), "postgres");
        assert_eq!(
            config_from(&[]).expect("parses").backend,
            BackendKind::Sqlite
        );
        for pairs in [
            vec![("QUEUE_BACKEND", "postgres")],
            vec![
                ("QUEUE_BACKEND", "postgres"),
                ("DATABASE_URL", "sqlite://x.db"),
            ],
            vec![("QUEUE_BACKEND", "sqlite"), ("DATABASE_URL", url)],
            vec![("QUEUE_BACKEND", "redis"), ("DATABASE_URL", url)],
            vec![("DATABASE_URL", "mysql://db/x")],
        ] {
            let error = config_from(&pairs).expect_err("a contradiction");
            assert_eq!(error.variable, "DATABASE_URL", "{pairs:?}");
            assert!(!error.value.contains("pg-secret"), "{error}");
        }
    }

    #[test]
    fn object_storage_and_sentinel_settings_are_checked() {
        let config = config_from(&[
            ("ARTIFACT_STORE_URL", "s3://media-bucket/prod/stagecraft/"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
            ("AWS_ALLOW_HTTP", "true"),
            ("REDIS_SENTINELS", "10.0.0.1:26379, sentinel-b:26379"),
            ("REDIS_DURABLE_ACKS", "1"),
        ])
        .expect("parses");
        let objects = config.artifact_objects.expect("objects");
        assert_eq!(
            (objects.bucket.as_str(), objects.prefix.as_str()),
            ("media-bucket", "prod/stagecraft")
        );
        assert!(objects.allow_http);
        let sentinel = config.redis_sentinel.expect("sentinel");
        assert_eq!(sentinel.sentinels, ["10.0.0.1:26379", "sentinel-b:26379"]);
        assert_eq!(sentinel.master, "stagecraft");
        assert_eq!(config.redis_durable_acks, 1);
        for (variable, value) in [
            ("ARTIFACT_STORE_URL", "/srv/artifacts"),
            ("ARTIFACT_STORE_URL", "s3://Bad_Bucket"),
            ("ARTIFACT_STORE_URL", "s3://bucket/../x"),
            ("AWS_ENDPOINT_URL", "minio:9000"),
            ("REDIS_SENTINELS", "sentinel-a"),
            ("REDIS_SENTINELS", "a:0"),
            ("REDIS_DURABLE_ACKS", "-1"),
        ] {
            let mut pairs = vec![("ARTIFACT_STORE_URL", "s3://media")];
            pairs.retain(|(k, _)| *k != variable);
            pairs.push((variable, value));
            let error = config_from(&pairs).expect_err(value);
            assert_eq!(error.variable, variable, "{value}");
        }
    }

    #[test]
    fn production_logs_json_by_default() {
        let config = config_from(&[("ENV", "production")]).expect("parses");
        assert_eq!(config.log_format, LogFormat::Json);
        assert!(!config.debug);
    }
}
