//! git, the coding-agent CLI and gh, as work orders run them.
//!
//! Invariant: every call goes through `process.rs` (its own process group, a timeout, killed with
//! its children on timeout or cancel) with arguments, never a shell string; repository URLs are
//! passed after `--`.
//! Invariant: credentials reach the tools only through their environment: `GITHUB_TOKEN` through
//! a credential helper that reads it from the environment, never a command line, a stored URL or
//! a log line.

use std::path::{Path, PathBuf};

use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::stream::{self, Outcome};
use crate::{
    config::AwoSettings,
    engine::StageError,
    process::{self, CommandSpec, ProcessError},
};

/// The credential helper git runs: it answers with the token from its environment.
const CREDENTIAL_HELPER: &str = "!f() { test \"$1\" = get && echo username=x-access-token && echo \"password=$GITHUB_TOKEN\"; }; f";

/// The tools of a deployment and where work orders keep their files.
#[derive(Debug, Clone)]
pub struct Tools {
    pub settings: AwoSettings,
}

/// What an agent step produced: its outcome and the raw stream.
#[derive(Debug, Clone)]
pub struct AgentRun {
    pub outcome: Outcome,
    pub raw: String,
}

impl Tools {
    pub fn new(settings: &AwoSettings) -> Self {
        Self {
            settings: settings.clone(),
        }
    }

    pub fn repository_dir(&self, id: &str) -> PathBuf {
        self.settings.data_dir.join("repositories").join(id)
    }

    pub fn output_dir(&self, id: &str) -> PathBuf {
        self.settings.data_dir.join("outputs").join(id)
    }

    pub fn log_file(&self, id: &str) -> PathBuf {
        self.settings
            .data_dir
            .join("logs")
            .join(format!("{id}.log"))
    }

    /// Creates a directory under the data dir, saying what to fix when it cannot.
    pub fn ensure_dir(&self, dir: &Path) -> Result<(), StageError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StageError::fatal(
                "data_dir_unwritable",
                format!(
                    "cannot create {}: {e}; check that AWO_DATA_DIR ({}) is writable and the disk has space",
                    dir.display(),
                    self.settings.data_dir.display()
                ),
            )
        })
    }

    /// Writes a file under the data dir (temporary name, then rename).
    pub fn write_file(&self, path: &Path, bytes: &[u8]) -> Result<(), StageError> {
        if let Some(dir) = path.parent() {
            self.ensure_dir(dir)?;
        }
        crate::artifacts::write_atomically(path, bytes).map_err(|e| {
                StageError::fatal(
                    "data_dir_unwritable",
                    format!(
                        "cannot write {}: {e}; check that AWO_DATA_DIR is writable and the disk has space",
                        path.display()
                    ),
                )
            })
    }

    /// Appends a line to the work order's log (`logs/{id}.log`); best effort.
    pub fn log(&self, id: &str, line: &str) {
        use std::io::Write;
        let path = self.log_file(id);
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            let _ = writeln!(file, "{} {line}", chrono::Utc::now().to_rfc3339());
        }
    }

    fn spec(&self, program: &Path) -> CommandSpec {
        let mut spec = CommandSpec::new(program, self.settings.timeout)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GCM_INTERACTIVE", "never");
        if let Some(token) = &self.settings.github_token {
            spec = spec
                .env("GITHUB_TOKEN", token.expose_secret())
                .env("GH_TOKEN", token.expose_secret());
        }
        spec
    }

    fn git(&self, cwd: &Path) -> CommandSpec {
        self.spec(&self.settings.git)
            .cwd(cwd)
            .env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "credential.helper")
            .env("GIT_CONFIG_VALUE_0", CREDENTIAL_HELPER)
            .env("GIT_AUTHOR_NAME", "Stagecraft")
            .env("GIT_AUTHOR_EMAIL", "stagecraft@localhost")
            .env("GIT_COMMITTER_NAME", "Stagecraft")
            .env("GIT_COMMITTER_EMAIL", "stagecraft@localhost")
    }

    /// Runs git and answers its standard output.
    pub async fn run_git(
        &self,
        cwd: &Path,
        args: &[&str],
        cancel: &CancellationToken,
    ) -> Result<String, StageError> {
        let mut spec = self.git(cwd);
        for arg in args {
            spec = spec.arg(*arg);
        }
        match process::run(&spec, cancel).await {
            Ok(output) => Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned()),
            Err(error) => Err(self.tool_error(
                "git",
                error,
                "install git (Debian: apt-get install git) or set GIT_PATH",
            )),
        }
    }

    /// Clones `url` into the work order's sandbox (through a temporary directory, so a crash
    /// never leaves a half clone under the final name) and creates its branch. A sandbox that
    /// exists already is kept.
    pub async fn clone_sandbox(
        &self,
        id: &str,
        url: &str,
        branch: &str,
        cancel: &CancellationToken,
    ) -> Result<(PathBuf, bool), StageError> {
        let target = self.repository_dir(id);
        let parent = self.settings.data_dir.join("repositories");
        self.ensure_dir(&parent)?;
        if target.join(".git").is_dir() {
            return Ok((target, false));
        }
        let partial = parent.join(format!(".{id}.partial-{}", uuid::Uuid::new_v4().simple()));
        let partial_name = partial.to_string_lossy().into_owned();
        let cloned = self
            .run_git(
                &parent,
                &["clone", "--quiet", "--", url, &partial_name],
                cancel,
            )
            .await;
        if let Err(error) = cloned {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(error);
        }
        self.run_git(&partial, &["checkout", "--quiet", "-B", branch], cancel)
            .await?;
        std::fs::rename(&partial, &target).map_err(|e| {
            StageError::fatal(
                "data_dir_unwritable",
                format!("cannot move the clone into {}: {e}", target.display()),
            )
        })?;
        Ok((target, true))
    }

    /// Runs the coding agent headless in `cwd` with `prompt` on stdin.
    pub async fn run_claude(
        &self,
        cwd: &Path,
        prompt: &str,
        cancel: &CancellationToken,
    ) -> Result<AgentRun, StageError> {
        let mut spec = self
            .spec(&self.settings.claude_cli)
            .cwd(cwd)
            .arg("--print")
            .arg("--output-format")
            .arg("stream-json")
            .arg("--model")
            .arg(&self.settings.model);
        if self.settings.verbose {
            spec = spec.arg("--verbose");
        }
        if let Some(turns) = self.settings.max_turns {
            spec = spec.arg("--max-turns").arg(turns.to_string());
        }
        if self.settings.skip_permissions {
            spec = spec.arg("--dangerously-skip-permissions");
        }
        if let Some(key) = &self.settings.anthropic_api_key {
            spec = spec.env("ANTHROPIC_API_KEY", key.expose_secret());
        }
        spec = spec.stdin(prompt.as_bytes().to_vec());
        let output = process::run_unchecked(&spec, cancel).await.map_err(|e| {
            self.tool_error(
                "claude",
                e,
                "install the coding-agent CLI (npm install -g @anthropic-ai/claude-code) or set CLAUDE_CLI_PATH",
            )
        })?;
        let raw = String::from_utf8_lossy(&output.stdout).into_owned();
        let (_, outcome) = stream::parse(&raw);
        if outcome.subtype.is_none() && !output.status.success() {
            let stderr: String = String::from_utf8_lossy(&output.stderr)
                .chars()
                .take(500)
                .collect();
            let hint = if self.settings.anthropic_api_key.is_none() {
                " (ANTHROPIC_API_KEY is not set: set it, or log the CLI in)"
            } else {
                ""
            };
            return Err(StageError::retryable(format!(
                "the coding agent exited with {} and no result{hint}: {stderr}",
                output.status
            )));
        }
        Ok(AgentRun { outcome, raw })
    }

    /// The open pull request of `branch`, if any: (number, url).
    pub async fn find_pull_request(
        &self,
        cwd: &Path,
        branch: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<(u64, String)>, StageError> {
        let spec = self
            .spec(&self.settings.gh_cli)
            .cwd(cwd)
            .arg("pr")
            .arg("list")
            .arg("--head")
            .arg(branch)
            .arg("--state")
            .arg("open")
            .arg("--json")
            .arg("number,url")
            .arg("--limit")
            .arg("1");
        let output = process::run(&spec, cancel)
            .await
            .map_err(|e| self.gh_error(e))?;
        let found: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        Ok(found.get(0).and_then(|pr| {
            Some((
                pr.get("number")?.as_u64()?,
                pr.get("url")?.as_str()?.to_owned(),
            ))
        }))
    }

    /// Opens a pull request of `branch`: (number, url).
    pub async fn create_pull_request(
        &self,
        cwd: &Path,
        branch: &str,
        title: &str,
        body_file: &Path,
        cancel: &CancellationToken,
    ) -> Result<(u64, String), StageError> {
        let spec = self
            .spec(&self.settings.gh_cli)
            .cwd(cwd)
            .arg("pr")
            .arg("create")
            .arg("--head")
            .arg(branch)
            .arg("--title")
            .arg(title)
            .arg("--body-file")
            .arg(body_file);
        let output = process::run(&spec, cancel)
            .await
            .map_err(|e| self.gh_error(e))?;
        let text = String::from_utf8_lossy(&output.stdout);
        let url = text
            .lines()
            .rev()
            .find(|l| l.starts_with("http"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let number = url
            .rsplit('/')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Ok((number, url))
    }

    fn gh_error(&self, error: ProcessError) -> StageError {
        let hint = if self.settings.github_token.is_none() {
            "install the GitHub CLI or set GH_CLI_PATH; set GITHUB_TOKEN so it can authenticate"
        } else {
            "install the GitHub CLI (https://cli.github.com) or set GH_CLI_PATH"
        };
        self.tool_error("gh", error, hint)
    }

    fn tool_error(&self, tool: &str, error: ProcessError, install: &str) -> StageError {
        match error {
            ProcessError::Spawn { program, source }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                StageError::fatal(
                    format!("{tool}_missing"),
                    format!("{program} was not found: {install}"),
                )
            }
            ProcessError::Cancelled { .. } => StageError::Cancelled,
            ProcessError::TimedOut { program, timeout } => StageError::retryable(format!(
                "{program} ran longer than AGENT_WORK_ORDER_TIMEOUT ({} s) and was killed with its children",
                timeout.as_secs()
            )),
            ProcessError::Failed {
                program,
                stderr,
                status,
            } => {
                let mut message: String = stderr.chars().take(800).collect();
                if let Some(token) = &self.settings.github_token {
                    message = message.replace(token.expose_secret(), "***");
                }
                let hint = if self.settings.github_token.is_none()
                    && (message.contains("Authentication")
                        || message.contains("could not read Username"))
                {
                    " (GITHUB_TOKEN is not set)"
                } else {
                    ""
                };
                StageError::retryable(format!("{program} failed ({status}){hint}: {message}"))
            }
            other => StageError::retryable(other.to_string()),
        }
    }
}

/// A stream-json transcript the built-in mock agent writes, so logs look as they would live.
pub fn mock_stream(session: &str, step: &str, summary: &str) -> String {
    [
        json!({"type": "system", "subtype": "init", "session_id": session, "model": "mock-agent"}),
        json!({"type": "assistant", "session_id": session,
               "message": {"content": [{"type": "text", "text": format!("Working on the {step} step.")}]}}),
        json!({"type": "result", "subtype": "success", "is_error": false, "num_turns": 1,
               "total_cost_usd": 0.0, "duration_ms": 1, "result": summary, "session_id": session}),
    ]
    .iter()
    .map(Value::to_string)
    .collect::<Vec<_>>()
    .join("\n")
        + "\n"
}
