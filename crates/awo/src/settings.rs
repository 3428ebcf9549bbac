//! What agent work orders need from the deployment: their section of the variables, read here.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use secrecy::SecretString;
use stagecraft_core::{
    process::BaseEnv,
    settings::{ConfigError, Vars, parse_bool, unset},
};

/// What agent work orders need from the deployment.
#[derive(Debug, Clone)]
pub struct AwoSettings {
    pub data_dir: PathBuf,
    pub allowed_schemes: Vec<String>,
    /// Hosts a repository URL may name (`host`, `host:port`, `*.domain`, `*`).
    pub allowed_hosts: Vec<String>,
    /// Forge hosts `GITHUB_TOKEN` is offered to, over https only.
    pub git_hosts: Vec<String>,
    /// The user and group the coding agent runs as, when not the worker's own.
    pub agent_user: Option<AgentUser>,
    /// Bytes of one tool call's output kept.
    pub max_output: usize,
    /// Files and bytes a repository's checkout may have (checked before it is written).
    pub max_repo_files: u64,
    pub max_repo_bytes: u64,
    /// Live agents must run as a user other than the worker's (set in production).
    pub require_agent_isolation: bool,
    /// The base environment of every subprocess.
    pub base_env: BaseEnv,
    /// Proxy settings, for the tools that reach the network (git, gh, the coding agent).
    pub network_env: BaseEnv,
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

/// A user a subprocess runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUser {
    /// As configured, for messages.
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl AwoSettings {
    /// The work orders' section of the deployment's variables, each default written here only.
    /// Their data lives under `data_dir` unless `AWO_DATA_DIR` says otherwise.
    pub fn from_vars(
        vars: &Vars<'_>,
        data_dir: &Path,
        base_env: &BaseEnv,
    ) -> Result<Self, ConfigError> {
        let max_turns = match vars.string("CLAUDE_CLI_MAX_TURNS") {
            None => None,
            Some(_) => Some(vars.parse_in("CLAUDE_CLI_MAX_TURNS", 1, 1, 10_000)? as u32),
        };
        let verbose = vars.parse_with("CLAUDE_CLI_VERBOSE", true, |v| match parse_bool(v) {
            Ok(true) => Ok(true),
            Ok(false) => Err(
                "the coding agent's stream-json output needs --verbose; leave it true".to_owned(),
            ),
            Err(e) => Err(e),
        })?;
        Ok(Self {
            data_dir: vars
                .path("AWO_DATA_DIR")
                .unwrap_or_else(|| data_dir.join("agent-work-orders")),
            allowed_schemes: allowed_schemes(vars)?,
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
            claude_cli: vars.path_or("CLAUDE_CLI_PATH", "claude"),
            gh_cli: vars.path_or("GH_CLI_PATH", "gh"),
            git: vars.path_or("GIT_PATH", "git"),
            github_token: vars.secret("GITHUB_TOKEN"),
            anthropic_api_key: vars.secret("ANTHROPIC_API_KEY"),
            timeout: vars.secs("AGENT_WORK_ORDER_TIMEOUT", 3600, 1, 604_800)?,
            model: vars.text("CLAUDE_CLI_MODEL", "sonnet"),
            max_turns,
            skip_permissions: vars.flag("CLAUDE_CLI_SKIP_PERMISSIONS", true)?,
            verbose,
            commands_dir: vars.path("AGENT_WORK_ORDER_COMMANDS_DIR"),
            prompt_logging: vars.flag("ENABLE_PROMPT_LOGGING", true)?,
            output_artifacts: vars.flag("ENABLE_OUTPUT_ARTIFACTS", true)?,
            port: vars.parse("ARCHON_AWO_PORT", 8888u16)?,
        })
    }
}

/// Every setting at its default, data under `./data` (tests, tools).
impl Default for AwoSettings {
    fn default() -> Self {
        Self::from_vars(&Vars::new(&unset), Path::new("./data"), &BaseEnv::default())
            .unwrap_or_else(|error| unreachable!("the defaults are valid: {error}"))
    }
}

/// Proxy settings, for the subprocesses that reach the network.
const NETWORK_ENV_VARIABLES: [&str; 6] = [
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
];

/// `AWO_ALLOWED_URL_SCHEMES`: the schemes a repository URL may use.
fn allowed_schemes(vars: &Vars<'_>) -> Result<Vec<String>, ConfigError> {
    let allowed: Vec<String> = vars
        .text("AWO_ALLOWED_URL_SCHEMES", "https")
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    match allowed
        .iter()
        .find(|s| !matches!(s.as_str(), "https" | "http" | "ssh" | "git" | "file"))
    {
        Some(bad) => Err(ConfigError {
            variable: "AWO_ALLOWED_URL_SCHEMES",
            value: bad.clone(),
            reason: "expected a comma-separated list of https, http, ssh, git, file".to_owned(),
        }),
        None => Ok(allowed),
    }
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
