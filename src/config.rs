//! Configuration, read once at start-up from the environment (and a `.env` file when present).
//!
//! This is the only module that reads environment variables. Every variable is documented in
//! `.env.example`; a value that does not parse stops the process with a message naming the
//! variable.
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
//! | `API_TOKEN` | unset | bearer token every route but `/health` requires |
//! | `CORS_ORIGINS` | unset | comma-separated origins allowed by CORS |
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
//! | `AWO_ALLOWED_URL_SCHEMES` | `https` | comma-separated schemes a work order's repository URL may use (`https`, `ssh`, `git`, `file`) |
//! | `CLAUDE_CLI_PATH`, `GH_CLI_PATH`, `GIT_PATH` | `claude`, `gh`, `git` | the coding-agent CLI, the GitHub CLI and git |
//! | `GITHUB_TOKEN` | unset | reaches git (credential helper) and gh through the environment only |
//! | `ANTHROPIC_API_KEY` | unset | passed to the coding-agent CLI through its environment |
//! | `AGENT_WORK_ORDER_TIMEOUT` | `3600` | seconds one agent, git or gh call may take before its process group is killed |
//! | `CLAUDE_CLI_MODEL`, `CLAUDE_CLI_MAX_TURNS` | `sonnet`, unset | model and turn limit of the coding agent |
//! | `CLAUDE_CLI_SKIP_PERMISSIONS`, `CLAUDE_CLI_VERBOSE` | `true`, `true` | pass `--dangerously-skip-permissions` and `--verbose` |
//! | `AGENT_WORK_ORDER_COMMANDS_DIR` | unset | directory of command templates (`plan.md`, `implement.md`) overriding the shipped ones |
//! | `ENABLE_PROMPT_LOGGING`, `ENABLE_OUTPUT_ARTIFACTS` | `true`, `true` | keep each step's prompt, and its raw JSONL, under `outputs/{id}/` |
//! | `ARCHON_AWO_PORT` | `8888` | the extra port compose exposes the API on for the work-order stack |

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use secrecy::SecretString;

use crate::engine::RetryPolicy;

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
    /// Origins allowed by CORS; empty means no CORS headers at all.
    pub cors_origins: Vec<String>,
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

/// What agent work orders need from the deployment.
#[derive(Debug, Clone)]
pub struct AwoSettings {
    pub data_dir: PathBuf,
    pub allowed_schemes: Vec<String>,
    pub claude_cli: PathBuf,
    pub gh_cli: PathBuf,
    pub git: PathBuf,
    pub github_token: Option<SecretString>,
    pub anthropic_api_key: Option<SecretString>,
    pub timeout: Duration,
    pub model: String,
    pub max_turns: Option<u32>,
    pub skip_permissions: bool,
    pub verbose: bool,
    pub commands_dir: Option<PathBuf>,
    pub prompt_logging: bool,
    pub output_artifacts: bool,
    pub port: u16,
}

impl Default for AwoSettings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data/agent-work-orders"),
            allowed_schemes: vec!["https".to_owned()],
            claude_cli: PathBuf::from("claude"),
            gh_cli: PathBuf::from("gh"),
            git: PathBuf::from("git"),
            github_token: None,
            anthropic_api_key: None,
            timeout: Duration::from_secs(3600),
            model: "sonnet".to_owned(),
            max_turns: None,
            skip_permissions: true,
            verbose: true,
            commands_dir: None,
            prompt_logging: true,
            output_artifacts: true,
            port: 8888,
        }
    }
}

/// What the studio agents need from the deployment.
#[derive(Debug, Clone)]
pub struct StudioSettings {
    pub ffmpeg: PathBuf,
    pub ffprobe: PathBuf,
    /// Longest one ffmpeg or ffprobe call may take.
    pub media_timeout: Duration,
    /// Added to every mock provider call.
    pub mock_latency: Duration,
    /// The live providers.
    pub live: LiveSettings,
}

/// Live provider endpoints, keys, limits and prices.
#[derive(Debug, Clone)]
pub struct LiveSettings {
    pub anthropic_key: Option<SecretString>,
    pub anthropic_base_url: String,
    pub anthropic_model: String,
    pub timeout: Duration,
    pub max_retries: u32,
    /// Dollars per million tokens.
    pub text_input_price: f64,
    pub text_output_price: f64,
    pub runway_key: Option<SecretString>,
    pub runway_base_url: String,
    pub runway_model: String,
    /// Dollars per second of generated video.
    pub video_price: f64,
    pub video_poll_interval: Duration,
    /// `elevenlabs` or `openai`.
    pub speech_provider: String,
    pub elevenlabs_key: Option<SecretString>,
    pub elevenlabs_base_url: String,
    pub elevenlabs_voice: String,
    pub elevenlabs_model: String,
    pub openai_key: Option<SecretString>,
    pub openai_base_url: String,
    pub openai_tts_model: String,
    pub openai_tts_voice: String,
    /// Dollars per thousand characters spoken, and per second of music.
    pub speech_price: f64,
    pub music_price: f64,
}

impl Default for LiveSettings {
    fn default() -> Self {
        Self {
            anthropic_key: None,
            anthropic_base_url: "https://api.anthropic.com".to_owned(),
            anthropic_model: "claude-sonnet-4-5".to_owned(),
            timeout: Duration::from_secs(120),
            max_retries: 4,
            text_input_price: 3.0,
            text_output_price: 15.0,
            runway_key: None,
            runway_base_url: "https://api.dev.runwayml.com".to_owned(),
            runway_model: "gen4_turbo".to_owned(),
            video_price: 0.05,
            video_poll_interval: Duration::from_secs(5),
            speech_provider: "elevenlabs".to_owned(),
            elevenlabs_key: None,
            elevenlabs_base_url: "https://api.elevenlabs.io".to_owned(),
            elevenlabs_voice: "21m00Tcm4TlvDq8ikWAM".to_owned(),
            elevenlabs_model: "eleven_multilingual_v2".to_owned(),
            openai_key: None,
            openai_base_url: "https://api.openai.com".to_owned(),
            openai_tts_model: "gpt-4o-mini-tts".to_owned(),
            openai_tts_voice: "alloy".to_owned(),
            speech_price: 0.30,
            music_price: 0.01,
        }
    }
}

impl Default for StudioSettings {
    fn default() -> Self {
        Self {
            ffmpeg: PathBuf::from("ffmpeg"),
            ffprobe: PathBuf::from("ffprobe"),
            media_timeout: Duration::from_secs(300),
            mock_latency: Duration::ZERO,
            live: LiveSettings::default(),
        }
    }
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

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ProviderMode {
    Mock,
    Live,
}

impl ProviderMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mock => "mock",
            Self::Live => "live",
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
    /// Reads `.env` (if present, without overriding variables already set) and then the process
    /// environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        // A missing .env file is normal; a malformed one is reported by the values it leaves unset.
        let _ = dotenvy::dotenv();
        Self::from_lookup(|name| std::env::var(name).ok())
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
        let worker_concurrency = vars.parse("WORKER_CONCURRENCY", 4usize)?;
        if worker_concurrency == 0 {
            return Err(ConfigError {
                variable: "WORKER_CONCURRENCY",
                value: "0".to_owned(),
                reason: "must be at least 1".to_owned(),
            });
        }
        let worker_threads = vars.parse_positive("WORKER_THREADS", 1)? as usize;
        let lease_ttl = Duration::from_secs(vars.parse_positive("LEASE_TTL_SECS", 10)?);
        let sweep_interval = Duration::from_millis(vars.parse_positive("SWEEP_INTERVAL_MS", 5000)?);
        let poll_interval = Duration::from_millis(vars.parse_positive("POLL_INTERVAL_MS", 20)?);
        let shutdown_grace = Duration::from_secs(vars.parse("SHUTDOWN_GRACE_SECS", 30u64)?);
        let default_retry = RetryPolicy {
            max_attempts: vars.parse_positive("STAGE_MAX_ATTEMPTS", 3)? as u32,
            base_delay: Duration::from_millis(vars.parse("RETRY_BASE_MS", 1000u64)?),
            max_delay: Duration::from_millis(vars.parse("RETRY_MAX_MS", 60_000u64)?),
            timeout: Duration::from_secs(vars.parse_positive("STAGE_TIMEOUT_SECS", 3600)?),
        };
        let api_token = vars
            .string("API_TOKEN")
            .filter(|t| !t.is_empty())
            .map(SecretString::from);
        let cors_origins = vars
            .string("CORS_ORIGINS")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let run_retention =
            Duration::from_secs(vars.parse_positive("RUN_RETENTION_DAYS", 7)? * 86_400);
        let max_body_bytes = vars.parse_positive("MAX_BODY_BYTES", 1_048_576)? as usize;
        let sync_wait = Duration::from_secs(vars.parse("SYNC_WAIT_SECS", 30u64)?);
        let api_url = vars
            .string("STAGECRAFT_URL")
            .unwrap_or_else(|| "http://127.0.0.1:8000".to_owned())
            .trim_end_matches('/')
            .to_owned();
        let studio = StudioSettings {
            ffmpeg: vars
                .path("FFMPEG_PATH")
                .unwrap_or_else(|| PathBuf::from("ffmpeg")),
            ffprobe: vars
                .path("FFPROBE_PATH")
                .unwrap_or_else(|| PathBuf::from("ffprobe")),
            media_timeout: Duration::from_secs(vars.parse_positive("MEDIA_TIMEOUT_SECS", 300)?),
            mock_latency: Duration::from_millis(vars.parse("MOCK_PROVIDER_LATENCY_MS", 0u64)?),
            live: LiveSettings {
                anthropic_key: vars.string("ANTHROPIC_API_KEY").map(SecretString::from),
                anthropic_base_url: vars
                    .string("ANTHROPIC_BASE_URL")
                    .unwrap_or_else(|| "https://api.anthropic.com".to_owned())
                    .trim_end_matches('/')
                    .to_owned(),
                anthropic_model: vars
                    .string("ANTHROPIC_MODEL")
                    .unwrap_or_else(|| "claude-sonnet-4-5".to_owned()),
                timeout: Duration::from_secs(vars.parse_positive("PROVIDER_TIMEOUT_SECS", 120)?),
                max_retries: vars.parse("PROVIDER_MAX_RETRIES", 4u32)?,
                text_input_price: vars.parse("PRICE_TEXT_INPUT_PER_MTOK", 3.0f64)?,
                text_output_price: vars.parse("PRICE_TEXT_OUTPUT_PER_MTOK", 15.0f64)?,
                runway_key: vars.string("RUNWAY_API_KEY").map(SecretString::from),
                runway_base_url: vars
                    .string("RUNWAY_BASE_URL")
                    .unwrap_or_else(|| "https://api.dev.runwayml.com".to_owned())
                    .trim_end_matches('/')
                    .to_owned(),
                runway_model: vars
                    .string("RUNWAY_MODEL")
                    .unwrap_or_else(|| "gen4_turbo".to_owned()),
                video_price: vars.parse("PRICE_VIDEO_PER_SECOND", 0.05f64)?,
                video_poll_interval: Duration::from_millis(
                    vars.parse_positive("VIDEO_POLL_INTERVAL_MS", 5000)?,
                ),
                speech_provider: vars.parse_with(
                    "SPEECH_PROVIDER",
                    "elevenlabs".to_owned(),
                    |v| match v {
                        "elevenlabs" | "openai" => Ok(v.to_owned()),
                        _ => Err("expected elevenlabs or openai".to_owned()),
                    },
                )?,
                elevenlabs_key: vars.string("ELEVENLABS_API_KEY").map(SecretString::from),
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
                openai_key: vars.string("OPENAI_API_KEY").map(SecretString::from),
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
                speech_price: vars.parse("PRICE_SPEECH_PER_1K_CHARS", 0.30f64)?,
                music_price: vars.parse("PRICE_MUSIC_PER_SECOND", 0.01f64)?,
            },
        };
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
            Some(_) => Some(vars.parse_positive("CLAUDE_CLI_MAX_TURNS", 1)? as u32),
        };
        let awo = AwoSettings {
            data_dir: vars
                .path("AWO_DATA_DIR")
                .unwrap_or_else(|| data_dir.join("agent-work-orders")),
            allowed_schemes,
            claude_cli: vars
                .path("CLAUDE_CLI_PATH")
                .unwrap_or_else(|| PathBuf::from("claude")),
            gh_cli: vars
                .path("GH_CLI_PATH")
                .unwrap_or_else(|| PathBuf::from("gh")),
            git: vars
                .path("GIT_PATH")
                .unwrap_or_else(|| PathBuf::from("git")),
            github_token: vars.string("GITHUB_TOKEN").map(SecretString::from),
            anthropic_api_key: vars.string("ANTHROPIC_API_KEY").map(SecretString::from),
            timeout: Duration::from_secs(vars.parse_positive("AGENT_WORK_ORDER_TIMEOUT", 3600)?),
            model: vars
                .string("CLAUDE_CLI_MODEL")
                .unwrap_or_else(|| "sonnet".to_owned()),
            max_turns,
            skip_permissions: vars.parse_with("CLAUDE_CLI_SKIP_PERMISSIONS", true, parse_bool)?,
            verbose: vars.parse_with("CLAUDE_CLI_VERBOSE", true, parse_bool)?,
            commands_dir: vars.path("AGENT_WORK_ORDER_COMMANDS_DIR"),
            prompt_logging: vars.parse_with("ENABLE_PROMPT_LOGGING", true, parse_bool)?,
            output_artifacts: vars.parse_with("ENABLE_OUTPUT_ARTIFACTS", true, parse_bool)?,
            port: vars.parse("ARCHON_AWO_PORT", 8888u16)?,
        };
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
            cors_origins,
            run_retention,
            max_body_bytes,
            sync_wait,
            api_url,
            studio,
            awo,
        })
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

/// The `sqlite://` URL of a file path.
pub fn sqlite_url_for(path: &Path) -> String {
    format!("sqlite://{}", path.display())
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

    fn parse_positive(&self, name: &'static str, default: u64) -> Result<u64, ConfigError> {
        let value = self.parse(name, default)?;
        if value == 0 {
            return Err(ConfigError {
                variable: name,
                value: "0".to_owned(),
                reason: "must be greater than zero".to_owned(),
            });
        }
        Ok(value)
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

    #[test]
    fn production_logs_json_by_default() {
        let config = config_from(&[("ENV", "production")]).expect("parses");
        assert_eq!(config.log_format, LogFormat::Json);
        assert!(!config.debug);
    }
}
