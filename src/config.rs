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
//! | `ARTIFACT_DIR` | `./artifacts` | root of every file a stage writes |
//! | `DATA_DIR` | `./data` | where the embedded store lives |
//! | `QUEUE_BACKEND` | `sqlite` | the durable store and queue: `sqlite` or `redis` |
//! | `REDIS_URL` | `redis://127.0.0.1:6379` | the Redis server, with `QUEUE_BACKEND=redis` |
//! | `REDIS_KEY_PREFIX` | `stagecraft:` | prefix of every Redis key Stagecraft writes |
//! | `DATABASE_URL` | `sqlite://{DATA_DIR}/stagecraft.db` | the SQLite file |
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
    str::FromStr,
    time::Duration,
};

use secrecy::{ExposeSecret, SecretString};

pub use stagecraft_awo::settings::{AgentUser, AwoSettings};
pub use stagecraft_core::store::ProviderMode;
pub use stagecraft_store_sqlite::sqlite_url_for;
pub use stagecraft_studio::settings::{LiveSettings, StudioSettings};

use crate::{engine::RetryPolicy, process::BaseEnv, secrets::Scrubber};

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

/// Proxy settings, for the subprocesses that reach the network.
const NETWORK_ENV_VARIABLES: [&str; 6] = [
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
];

/// Everything the processes need to know about their deployment.
#[derive(Debug, Clone)]
pub struct Config {
    /// `development` or `production`.
    pub env: Environment,
    /// Reported by `/health`; development defaults to true.
    pub debug: bool,
    /// The `tracing` filter directive.
    pub log_level: String,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// The provider mode a run gets when it does not ask for one.
    pub provider_mode: ProviderMode,
    /// Root of all artifacts; created at start-up.
    pub artifact_dir: PathBuf,
    /// Which durable store carries runs.
    pub backend: BackendKind,
    /// The SQLite database URL.
    pub database_url: String,
    /// The Redis URL (may carry a password: never log it unredacted).
    pub redis_url: SecretString,
    /// Prefix of every Redis key.
    pub redis_prefix: String,
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
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Redis => "redis",
        }
    }
}

/// A variable that is set but does not parse.
#[derive(Debug, thiserror::Error)]
#[error("configuration variable {variable} has an invalid value {value:?}: {reason}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub value: String,
    pub reason: String,
}

impl Config {
    /// Reads the process environment, and `.env` (if present) for variables the environment
    /// does not set. `.env` is read into the configuration only, never into the environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        // A missing .env file is normal; a malformed line is reported by the value it leaves unset.
        let file: std::collections::HashMap<String, String> = dotenvy::from_path_iter(".env")
            .map(|lines| lines.filter_map(Result::ok).collect())
            .unwrap_or_default();
        Self::from_lookup(|name| std::env::var(name).ok().or_else(|| file.get(name).cloned()))
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
        .flatten()
        .map(|secret| secret.expose_secret().to_owned())
        .collect();
        values.extend(url_password(self.redis_url.expose_secret()));
        Scrubber::new(values)
    }

    /// Builds the configuration from any lookup function, so tests can pass a map.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let vars = Vars { lookup: &lookup };
        let env = vars.parse_with("ENV", Environment::Development, |v| match v {
            "development" | "dev" => Ok(Environment::Development),
            "production" | "prod" => Ok(Environment::Production),
            _ => Err("expected development or production".to_owned()),
        })?;
        let development = env == Environment::Development;
        let debug = vars.parse_with("DEBUG", development, parse_bool)?;
        let log_level = vars
            .string("LOG_LEVEL")
            .unwrap_or_else(|| "info".to_owned());
        let default_format = if development {
            LogFormat::Pretty
        } else {
            LogFormat::Json
        };
        let log_format = vars.parse_with("LOG_FORMAT", default_format, |v| match v {
            "pretty" | "text" => Ok(LogFormat::Pretty),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected pretty or json".to_owned()),
        })?;
        let provider_mode = vars.parse_with("PROVIDER_MODE", ProviderMode::Mock, |v| match v {
            "mock" => Ok(ProviderMode::Mock),
            "live" => Ok(ProviderMode::Live),
            _ => Err("expected mock or live".to_owned()),
        })?;
        let artifact_dir = vars
            .path("ARTIFACT_DIR")
            .unwrap_or_else(|| PathBuf::from("./artifacts"));
        let data_dir = vars
            .path("DATA_DIR")
            .unwrap_or_else(|| PathBuf::from("./data"));
        let backend = vars.parse_with("QUEUE_BACKEND", BackendKind::Sqlite, |v| match v {
            "sqlite" => Ok(BackendKind::Sqlite),
            "redis" => Ok(BackendKind::Redis),
            _ => Err("expected sqlite or redis".to_owned()),
        })?;
        let redis_url = vars
            .string("REDIS_URL")
            .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
        if !(redis_url.starts_with("redis://")
            || redis_url.starts_with("rediss://")
            || redis_url.starts_with("unix://"))
        {
            return Err(ConfigError {
                variable: "REDIS_URL",
                value: redact_url(&redis_url),
                reason: "expected a redis://, rediss:// or unix:// URL".to_owned(),
            });
        }
        let redis_url = SecretString::from(redis_url);
        let redis_prefix = vars
            .string("REDIS_KEY_PREFIX")
            .unwrap_or_else(|| "stagecraft:".to_owned());
        let database_url = vars
            .string("DATABASE_URL")
            .unwrap_or_else(|| sqlite_url_for(&data_dir.join("stagecraft.db")));
        if !database_url.starts_with("sqlite:") {
            return Err(ConfigError {
                variable: "DATABASE_URL",
                value: database_url,
                reason: "expected a sqlite: URL".to_owned(),
            });
        }
        let host = vars.parse("HOST", IpAddr::from([127, 0, 0, 1]))?;
        let port = vars.parse("PORT", 8000u16)?;
        let worker_concurrency = vars.parse_in("WORKER_CONCURRENCY", 4, 1, 1024)? as usize;
        let worker_threads = vars.parse_in("WORKER_THREADS", 1, 1, 256)? as usize;
        let lease_ttl = Duration::from_secs(vars.parse_in("LEASE_TTL_SECS", 10, 1, 86_400)?);
        let sweep_interval =
            Duration::from_millis(vars.parse_in("SWEEP_INTERVAL_MS", 5000, 1, 86_400_000)?);
        let poll_interval =
            Duration::from_millis(vars.parse_in("POLL_INTERVAL_MS", 20, 1, 60_000)?);
        let shutdown_grace =
            Duration::from_secs(vars.parse_in("SHUTDOWN_GRACE_SECS", 30, 0, 86_400)?);
        let default_retry = RetryPolicy {
            max_attempts: vars.parse_in("STAGE_MAX_ATTEMPTS", 3, 1, 100)? as u32,
            base_delay: Duration::from_millis(vars.parse_in(
                "RETRY_BASE_MS",
                1000,
                0,
                86_400_000,
            )?),
            max_delay: Duration::from_millis(vars.parse_in(
                "RETRY_MAX_MS",
                60_000,
                0,
                86_400_000,
            )?),
            timeout: Duration::from_secs(vars.parse_in("STAGE_TIMEOUT_SECS", 3600, 1, 604_800)?),
        };
        let api_token = vars.secret("API_TOKEN");
        let api_token_readonly = vars.secret("API_TOKEN_READONLY");
        if let (Some(full), Some(read_only)) = (&api_token, &api_token_readonly) {
            if full.expose_secret() == read_only.expose_secret() {
                return Err(ConfigError {
                    variable: "API_TOKEN_READONLY",
                    value: "***".to_owned(),
                    reason: "must differ from API_TOKEN".to_owned(),
                });
            }
        }
        if api_token_readonly.is_some() && api_token.is_none() {
            return Err(ConfigError {
                variable: "API_TOKEN_READONLY",
                value: "***".to_owned(),
                reason: "needs API_TOKEN too (the read-only token is a second, weaker token)"
                    .to_owned(),
            });
        }
        let allow_unauthenticated = vars.parse_with("ALLOW_UNAUTHENTICATED", false, parse_bool)?;
        let cors = parse_cors(vars.string("CORS_ORIGINS"))?;
        let max_event_streams = vars.parse_in("MAX_EVENT_STREAMS", 1000, 1, 100_000)? as usize;
        let max_sync_waits = vars.parse_in("MAX_SYNC_WAITS", 256, 1, 100_000)? as usize;
        let run_retention =
            Duration::from_secs(vars.parse_in("RUN_RETENTION_DAYS", 7, 1, 36_500)? * 86_400);
        let max_body_bytes =
            vars.parse_in("MAX_BODY_BYTES", 1_048_576, 1024, 64 * 1024 * 1024)? as usize;
        let sync_wait = Duration::from_secs(vars.parse_in("SYNC_WAIT_SECS", 30, 0, 3600)?);
        let base_env = vars.environment(&BASE_ENV_VARIABLES);
        let api_url = vars
            .string("STAGECRAFT_URL")
            .unwrap_or_else(|| "http://127.0.0.1:8000".to_owned())
            .trim_end_matches('/')
            .to_owned();
        let studio = studio_settings(&vars, &base_env)?;
        let mut awo = awo_settings(&vars, &data_dir, &base_env)?;
        awo.require_agent_isolation = env == Environment::Production;
        Ok(Self {
            env,
            debug,
            log_level,
            log_format,
            provider_mode,
            artifact_dir,
            backend,
            database_url,
            redis_url,
            redis_prefix,
            host,
            port,
            worker_concurrency,
            worker_threads,
            lease_ttl,
            sweep_interval,
            poll_interval,
            shutdown_grace,
            default_retry,
            api_token,
            api_token_readonly,
            allow_unauthenticated,
            cors,
            max_event_streams,
            max_sync_waits,
            base_env,
            run_retention,
            max_body_bytes,
            sync_wait,
            api_url,
            studio,
            awo,
        })
    }
}

/// The studio's media tools, mock latency and live providers.
fn studio_settings(vars: &Vars<'_>, base_env: &BaseEnv) -> Result<StudioSettings, ConfigError> {
    Ok(StudioSettings {
        base_env: base_env.clone(),
        ffmpeg: vars
            .path("FFMPEG_PATH")
            .unwrap_or_else(|| PathBuf::from("ffmpeg")),
        ffprobe: vars
            .path("FFPROBE_PATH")
            .unwrap_or_else(|| PathBuf::from("ffprobe")),
        media_timeout: Duration::from_secs(vars.parse_in("MEDIA_TIMEOUT_SECS", 300, 1, 86_400)?),
        mock_latency: Duration::from_millis(vars.parse_in(
            "MOCK_PROVIDER_LATENCY_MS",
            0,
            0,
            3_600_000,
        )?),
        live: LiveSettings {
            anthropic_key: vars.secret("ANTHROPIC_API_KEY"),
            anthropic_base_url: vars
                .string("ANTHROPIC_BASE_URL")
                .unwrap_or_else(|| "https://api.anthropic.com".to_owned())
                .trim_end_matches('/')
                .to_owned(),
            anthropic_model: vars
                .string("ANTHROPIC_MODEL")
                .unwrap_or_else(|| "claude-sonnet-4-5".to_owned()),
            timeout: Duration::from_secs(vars.parse_in("PROVIDER_TIMEOUT_SECS", 120, 1, 86_400)?),
            max_retries: vars.parse_in("PROVIDER_MAX_RETRIES", 4, 0, 20)? as u32,
            text_input_price: vars.price("PRICE_TEXT_INPUT_PER_MTOK", 3.0)?,
            text_output_price: vars.price("PRICE_TEXT_OUTPUT_PER_MTOK", 15.0)?,
            runway_key: vars.secret("RUNWAY_API_KEY"),
            runway_base_url: vars
                .string("RUNWAY_BASE_URL")
                .unwrap_or_else(|| "https://api.dev.runwayml.com".to_owned())
                .trim_end_matches('/')
                .to_owned(),
            runway_model: vars
                .string("RUNWAY_MODEL")
                .unwrap_or_else(|| "gen4_turbo".to_owned()),
            video_price: vars.price("PRICE_VIDEO_PER_SECOND", 0.05)?,
            video_poll_interval: Duration::from_millis(vars.parse_in(
                "VIDEO_POLL_INTERVAL_MS",
                5000,
                1,
                3_600_000,
            )?),
            speech_provider: vars.parse_with("SPEECH_PROVIDER", "elevenlabs".to_owned(), |v| {
                match v {
                    "elevenlabs" | "openai" => Ok(v.to_owned()),
                    _ => Err("expected elevenlabs or openai".to_owned()),
                }
            })?,
            elevenlabs_key: vars.secret("ELEVENLABS_API_KEY"),
            elevenlabs_base_url: vars
                .string("ELEVENLABS_BASE_URL")
                .unwrap_or_else(|| "https://api.elevenlabs.io".to_owned())
                .trim_end_matches('/')
                .to_owned(),
            elevenlabs_voice: vars
                .string("ELEVENLABS_VOICE_ID")
                .unwrap_or_else(|| "21m00Tcm4TlvDq8ikWAM".to_owned()),
            elevenlabs_model: vars
                .string("ELEVENLABS_MODEL")
                .unwrap_or_else(|| "eleven_multilingual_v2".to_owned()),
            openai_key: vars.secret("OPENAI_API_KEY"),
            openai_base_url: vars
                .string("OPENAI_BASE_URL")
                .unwrap_or_else(|| "https://api.openai.com".to_owned())
                .trim_end_matches('/')
                .to_owned(),
            openai_tts_model: vars
                .string("OPENAI_TTS_MODEL")
                .unwrap_or_else(|| "gpt-4o-mini-tts".to_owned()),
            openai_tts_voice: vars
                .string("OPENAI_TTS_VOICE")
                .unwrap_or_else(|| "alloy".to_owned()),
            speech_price: vars.price("PRICE_SPEECH_PER_1K_CHARS", 0.30)?,
            music_price: vars.price("PRICE_MUSIC_PER_SECOND", 0.01)?,
        },
    })
}

/// What agent work orders need: data directory, repository rules, tools, credentials, limits.
fn awo_settings(
    vars: &Vars<'_>,
    data_dir: &Path,
    base_env: &BaseEnv,
) -> Result<AwoSettings, ConfigError> {
    let allowed_schemes: Vec<String> = vars
        .string("AWO_ALLOWED_URL_SCHEMES")
        .unwrap_or_else(|| "https".to_owned())
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(bad) = allowed_schemes
        .iter()
        .find(|s| !matches!(s.as_str(), "https" | "http" | "ssh" | "git" | "file"))
    {
        return Err(ConfigError {
            variable: "AWO_ALLOWED_URL_SCHEMES",
            value: bad.clone(),
            reason: "expected a comma-separated list of https, http, ssh, git, file".to_owned(),
        });
    }
    let max_turns = match vars.string("CLAUDE_CLI_MAX_TURNS") {
        None => None,
        Some(_) => Some(vars.parse_in("CLAUDE_CLI_MAX_TURNS", 1, 1, 10_000)? as u32),
    };
    Ok(AwoSettings {
        data_dir: vars
            .path("AWO_DATA_DIR")
            .unwrap_or_else(|| data_dir.join("agent-work-orders")),
        allowed_schemes,
        allowed_hosts: vars.hosts("AWO_ALLOWED_HOSTS", true)?,
        git_hosts: vars.hosts("AWO_GIT_HOSTS", false)?,
        agent_user: agent_user(vars.string("AWO_AGENT_USER"))?,
        max_output: vars.parse_in("AWO_MAX_OUTPUT_BYTES", 16 * 1024 * 1024, 4096, 1 << 30)?
            as usize,
        max_repo_files: vars.parse_in("AWO_MAX_REPO_FILES", 250_000, 1, 5_000_000)?,
        max_repo_bytes: vars.parse_in("AWO_MAX_REPO_BYTES", 2 << 30, 1 << 20, 1 << 40)?,
        require_agent_isolation: false,
        base_env: base_env.clone(),
        network_env: vars.environment(&NETWORK_ENV_VARIABLES),
        claude_cli: vars
            .path("CLAUDE_CLI_PATH")
            .unwrap_or_else(|| PathBuf::from("claude")),
        gh_cli: vars
            .path("GH_CLI_PATH")
            .unwrap_or_else(|| PathBuf::from("gh")),
        git: vars
            .path("GIT_PATH")
            .unwrap_or_else(|| PathBuf::from("git")),
        github_token: vars.secret("GITHUB_TOKEN"),
        anthropic_api_key: vars.secret("ANTHROPIC_API_KEY"),
        timeout: Duration::from_secs(vars.parse_in(
            "AGENT_WORK_ORDER_TIMEOUT",
            3600,
            1,
            604_800,
        )?),
        model: vars
            .string("CLAUDE_CLI_MODEL")
            .unwrap_or_else(|| "sonnet".to_owned()),
        max_turns,
        skip_permissions: vars.parse_with("CLAUDE_CLI_SKIP_PERMISSIONS", true, parse_bool)?,
        verbose: vars.parse_with("CLAUDE_CLI_VERBOSE", true, |v| match parse_bool(v) {
            Ok(true) => Ok(true),
            Ok(false) => Err(
                "the coding agent's stream-json output needs --verbose; leave it true".to_owned(),
            ),
            Err(e) => Err(e),
        })?,
        commands_dir: vars.path("AGENT_WORK_ORDER_COMMANDS_DIR"),
        prompt_logging: vars.parse_with("ENABLE_PROMPT_LOGGING", true, parse_bool)?,
        output_artifacts: vars.parse_with("ENABLE_OUTPUT_ARTIFACTS", true, parse_bool)?,
        port: vars.parse("ARCHON_AWO_PORT", 8888u16)?,
    })
}

/// The user info of a URL (`user:password` in `scheme://user:password@host`), the part to hide.
fn url_password(url: &str) -> Option<String> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (user_info, _) = authority.rsplit_once('@')?;
    let password = user_info.split_once(':').map_or(user_info, |(_, p)| p);
    (!password.is_empty()).then(|| password.to_owned())
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

/// `AWO_AGENT_USER`: a user name or `uid[:gid]`. Unset, a worker running as root runs the agent
/// as `nobody` (the coding agent refuses to bypass its permission prompts as root); any other
/// worker runs it as itself.
fn agent_user(value: Option<String>) -> Result<Option<AgentUser>, ConfigError> {
    let invalid = |value: &str, reason: String| ConfigError {
        variable: "AWO_AGENT_USER",
        value: value.to_owned(),
        reason,
    };
    let Some(value) = value else {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        return Ok(nix::unistd::User::from_name("nobody")
            .ok()
            .flatten()
            .map(|user| AgentUser {
                name: "nobody".to_owned(),
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
            }));
    };
    if let Some((uid, gid)) = value
        .split_once(':')
        .map_or(Some((value.as_str(), value.as_str())), Some)
        .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)))
    {
        if uid == 0 || gid == 0 {
            return Err(invalid(
                &value,
                "must not be root or in the root group".to_owned(),
            ));
        }
        return Ok(Some(AgentUser {
            name: value.clone(),
            uid,
            gid,
        }));
    }
    match nix::unistd::User::from_name(&value) {
        Ok(Some(user)) if !user.uid.is_root() && user.gid.as_raw() != 0 => Ok(Some(AgentUser {
            name: value.clone(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        })),
        Ok(Some(_)) => Err(invalid(
            &value,
            "must not be root or in the root group".to_owned(),
        )),
        _ => Err(invalid(
            &value,
            "no such user (create it, or give a numeric uid:gid)".to_owned(),
        )),
    }
}

/// A URL with any password or user info replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

struct Vars<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Vars<'_> {
    fn string(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn path(&self, name: &str) -> Option<PathBuf> {
        self.string(name).map(PathBuf::from)
    }

    fn parse_with<T>(
        &self,
        name: &'static str,
        default: T,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        match self.string(name) {
            None => Ok(default),
            Some(value) => parse(&value.to_ascii_lowercase()).map_err(|reason| ConfigError {
                variable: name,
                value,
                reason,
            }),
        }
    }

    fn parse<T: FromStr>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.string(name) {
            None => Ok(default),
            Some(value) => value.parse().map_err(|e: T::Err| ConfigError {
                variable: name,
                reason: e.to_string(),
                value,
            }),
        }
    }

    /// A whole number within `min..=max` (the documented range of the variable).
    fn parse_in(
        &self,
        name: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        let value = self.parse(name, default)?;
        if !(min..=max).contains(&value) {
            return Err(ConfigError {
                variable: name,
                value: value.to_string(),
                reason: format!("must be between {min} and {max}"),
            });
        }
        Ok(value)
    }

    /// A price in dollars: finite, at least zero, at most a million.
    fn price(&self, name: &'static str, default: f64) -> Result<f64, ConfigError> {
        let value: f64 = self.parse(name, default)?;
        if !(value.is_finite() && (0.0..=1_000_000.0).contains(&value)) {
            return Err(ConfigError {
                variable: name,
                value: value.to_string(),
                reason: "must be a number of dollars between 0 and 1000000".to_owned(),
            });
        }
        Ok(value)
    }

    /// A secret; an empty value counts as unset.
    fn secret(&self, name: &str) -> Option<SecretString> {
        self.string(name).map(SecretString::from)
    }

    /// These variables, where set, as a subprocess environment.
    fn environment(&self, names: &[&str]) -> BaseEnv {
        BaseEnv::new(
            names
                .iter()
                .filter_map(|name| Some(((*name).to_owned(), (self.lookup)(name)?)))
                .filter(|(_, value)| !value.is_empty())
                .collect(),
        )
    }

    /// A comma-separated list of host names (lower-cased; `host:port`; with `wildcards`, also
    /// `*.domain` and `*`). Defaults to `github.com`.
    fn hosts(&self, name: &'static str, wildcards: bool) -> Result<Vec<String>, ConfigError> {
        let value = self.string(name).unwrap_or_else(|| "github.com".to_owned());
        let hosts: Vec<String> = value
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        let valid = |host: &str| {
            let host = host
                .strip_prefix("*.")
                .filter(|_| wildcards)
                .unwrap_or(host);
            (wildcards && host == "*")
                || (!host.is_empty()
                    && host.len() <= 253
                    && host.chars().all(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')
                    })
                    && !host.starts_with(['-', '.', ':']))
        };
        match hosts.iter().find(|h| !valid(h)) {
            Some(bad) => Err(ConfigError {
                variable: name,
                value: bad.clone(),
                reason: if wildcards {
                    "expected comma-separated hosts: host, host:port, *.domain or *".to_owned()
                } else {
                    "expected comma-separated hosts: host or host:port".to_owned()
                },
            }),
            None => Ok(hosts),
        }
    }
}

fn parse_bool(value: &str) -> Result<bool, String> {
    match value {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".to_owned()),
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
        assert_eq!(config.database_url, "sqlite://./data/stagecraft.db");
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
    }

    #[test]
    fn production_logs_json_by_default() {
        let config = config_from(&[("ENV", "production")]).expect("parses");
        assert_eq!(config.log_format, LogFormat::Json);
        assert!(!config.debug);
    }
}
