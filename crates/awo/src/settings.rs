//! What agent work orders need from the deployment (read by the application's configuration).

use std::{path::PathBuf, time::Duration};

use secrecy::SecretString;
use stagecraft_core::process::BaseEnv;

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

impl Default for AwoSettings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data/agent-work-orders"),
            allowed_schemes: vec!["https".to_owned()],
            allowed_hosts: vec!["github.com".to_owned()],
            git_hosts: vec!["github.com".to_owned()],
            agent_user: None,
            max_output: 16 * 1024 * 1024,
            max_repo_files: 250_000,
            max_repo_bytes: 2 << 30,
            require_agent_isolation: false,
            base_env: BaseEnv::default(),
            network_env: BaseEnv::default(),
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
