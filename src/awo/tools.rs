//! git, the coding-agent CLI and gh, as work orders run them.
//!
//! Invariant: every call goes through `process.rs` (its own process group, a timeout, killed with
//! its children on timeout or cancel, an environment that starts empty) with arguments, never a
//! shell string; repository URLs are passed after `--`.
//! Invariant: `GITHUB_TOKEN` reaches only the git and gh calls that talk to a forge host
//! (`AWO_GIT_HOSTS`) over https: git gets it through a credential helper configured for exactly
//! those `https://host` URLs, gh through its environment, and no other call sees it. The
//! Anthropic key reaches the coding agent only. Nothing of either is ever on a command line.
//! Invariant: nothing that carries a token reads the sandbox's own git configuration, which the
//! coding agent may have written: the branch is fetched from the sandbox into a clean bare
//! repository of the worker's, and pushed from there; gh names the repository with `--repo`.
//! Invariant: when the worker runs as root, the coding agent and every git call inside the
//! sandbox run as `AWO_AGENT_USER` (never root), so neither the agent nor a configuration it
//! wrote can act with more rights than the agent has.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use secrecy::SecretString;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{
    stream::{self, Outcome},
    url::RepoUrl,
};
use crate::{
    config::AwoSettings,
    engine::StageError,
    process::{self, CommandSpec, ProcessError},
    secrets::Scrubber,
};

/// The credential helper git runs for forge hosts: it answers with the token from its
/// environment. Git runs it through a shell of its own; no value of ours is in its text.
const CREDENTIAL_HELPER: &str = "!f() { test \"$1\" = get && echo username=x-access-token && echo \"password=$GITHUB_TOKEN\"; }; f";

/// The tools of a deployment and where work orders keep their files.
#[derive(Debug, Clone)]
pub struct Tools {
    pub settings: AwoSettings,
    /// Hides every secret of the deployment in what is kept of the tools' output.
    pub scrubber: Scrubber,
}

/// What an agent step produced: its outcome and the raw (bounded, scrubbed) stream.
#[derive(Debug, Clone)]
pub struct AgentRun {
    pub outcome: Outcome,
    pub raw: String,
}

/// Who runs a command: the worker itself, or the agent's user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runner {
    Worker,
    Agent,
}

impl Tools {
    pub fn new(settings: &AwoSettings, scrubber: Scrubber) -> Self {
        Self {
            settings: settings.clone(),
            scrubber,
        }
    }

    pub fn repository_dir(&self, id: &str) -> PathBuf {
        self.settings.data_dir.join("repositories").join(id)
    }

    pub fn output_dir(&self, id: &str) -> PathBuf {
        self.settings.data_dir.join("outputs").join(id)
    }

    /// The coding agent's home directory for one work order (its settings and caches).
    fn home_dir(&self, id: &str) -> PathBuf {
        self.settings.data_dir.join("homes").join(id)
    }

    pub fn log_file(&self, id: &str) -> PathBuf {
        self.settings
            .data_dir
            .join("logs")
            .join(format!("{id}.log"))
    }

    /// The user and group sandbox work runs as: `AWO_AGENT_USER` when the worker is root.
    fn agent_ids(&self) -> Option<(u32, u32)> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        self.settings.agent_user.as_ref().map(|u| (u.uid, u.gid))
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

    /// Writes a file under the data dir (temporary name, then rename), scrubbed of secrets.
    pub fn write_file(&self, path: &Path, text: &str) -> Result<(), StageError> {
        if let Some(dir) = path.parent() {
            self.ensure_dir(dir)?;
        }
        let text = self.scrubber.scrub(text);
        crate::artifacts::write_atomically(path, text.as_bytes()).map_err(|e| {
            StageError::fatal(
                "data_dir_unwritable",
                format!(
                    "cannot write {}: {e}; check that AWO_DATA_DIR is writable and the disk has space",
                    path.display()
                ),
            )
        })
    }

    /// Appends a line to the work order's log (`logs/{id}.log`), scrubbed; best effort.
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
            let line = self.scrubber.scrub(line);
            let _ = writeln!(file, "{} {line}", chrono::Utc::now().to_rfc3339());
        }
    }

    /// Hands a directory tree to the agent's user (when the worker is root); symlinks are not
    /// followed.
    pub fn give_to_agent(&self, dir: &Path) -> Result<(), StageError> {
        let Some((uid, gid)) = self.agent_ids() else {
            return Ok(());
        };
        let mut pending = vec![dir.to_path_buf()];
        while let Some(path) = pending.pop() {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).map_err(|e| {
                StageError::fatal(
                    "data_dir_unwritable",
                    format!("cannot hand {} to AWO_AGENT_USER: {e}", path.display()),
                )
            })?;
            let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
            if is_dir {
                if let Ok(entries) = std::fs::read_dir(&path) {
                    pending.extend(entries.flatten().map(|e| e.path()));
                }
            }
        }
        Ok(())
    }

    /// A command with the base environment, bounded output and the deployment's scrubber.
    fn command(&self, program: &Path, runner: Runner) -> CommandSpec {
        let mut spec = CommandSpec::new(program, self.settings.timeout)
            .base_env(&self.settings.base_env)
            .base_env(&self.settings.network_env)
            .max_output(self.settings.max_output)
            .scrubbed_with(&self.scrubber);
        if runner == Runner::Agent {
            spec = spec.run_as(self.agent_ids());
        }
        spec
    }

    /// git, hardened: no system or global configuration, no hooks, no fsmonitor, no redirects,
    /// only the allowed transports, and credentials only for `remote` when it is an https URL
    /// of a forge host (pinned to `pinned` addresses when its host came through a wildcard).
    fn git(
        &self,
        cwd: &Path,
        runner: Runner,
        remote: Option<(&RepoUrl, &[IpAddr])>,
        local_fetch: bool,
    ) -> CommandSpec {
        let mut config: Vec<(String, String)> = vec![
            ("core.hooksPath".into(), "/dev/null".into()),
            ("core.fsmonitor".into(), "false".into()),
            ("core.askPass".into(), String::new()),
            ("credential.helper".into(), String::new()),
            ("http.followRedirects".into(), "false".into()),
            ("safe.directory".into(), "*".into()),
            ("protocol.allow".into(), "never".into()),
            ("commit.gpgSign".into(), "false".into()),
        ];
        for scheme in &self.settings.allowed_schemes {
            config.push((format!("protocol.{scheme}.allow"), "always".into()));
        }
        if local_fetch {
            config.push(("protocol.file.allow".into(), "always".into()));
        }
        let mut spec = self
            .command(&self.settings.git, runner)
            .cwd(cwd)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", self.global_git_config())
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GCM_INTERACTIVE", "never")
            .env("GIT_AUTHOR_NAME", "Stagecraft")
            .env("GIT_AUTHOR_EMAIL", "stagecraft@localhost")
            .env("GIT_COMMITTER_NAME", "Stagecraft")
            .env("GIT_COMMITTER_EMAIL", "stagecraft@localhost");
        if let Some((url, pinned)) = remote {
            let host = url.host.clone().unwrap_or_default();
            let port = url.effective_port();
            for ip in pinned {
                config.push(("http.curloptResolve".into(), format!("{host}:{port}:{ip}")));
            }
            if let Some(token) = self.token_for(url) {
                for forge in &self.settings.git_hosts {
                    config.push((
                        format!("credential.https://{forge}.helper"),
                        CREDENTIAL_HELPER.into(),
                    ));
                }
                spec = spec.secret_env("GITHUB_TOKEN", token);
            }
        }
        spec = spec.env("GIT_CONFIG_COUNT", config.len().to_string());
        for (i, (key, value)) in config.into_iter().enumerate() {
            spec = spec
                .env(format!("GIT_CONFIG_KEY_{i}"), key)
                .env(format!("GIT_CONFIG_VALUE_{i}"), value);
        }
        spec
    }

    /// git's global configuration for work orders: only `safe.directory = *`, so the worker's
    /// git may read sandboxes the agent's user owns (even in the processes git starts itself,
    /// which do not inherit configuration given through the environment). Written once; falls
    /// back to none at all when it cannot be.
    fn global_git_config(&self) -> PathBuf {
        let path = self.settings.data_dir.join("git").join("config");
        if !path.is_file() {
            let written = self
                .ensure_dir(path.parent().unwrap_or(&self.settings.data_dir))
                .is_ok()
                && crate::artifacts::write_atomically(&path, b"[safe]\n\tdirectory = *\n").is_ok();
            if !written {
                return PathBuf::from("/dev/null");
            }
        }
        path
    }

    /// The token, when `url` is an https URL of a forge host (`AWO_GIT_HOSTS`).
    fn token_for(&self, url: &RepoUrl) -> Option<&SecretString> {
        let token = self.settings.github_token.as_ref()?;
        let host = url.host.as_deref()?;
        let with_port = format!("{host}:{}", url.effective_port());
        let forge = self
            .settings
            .git_hosts
            .iter()
            .any(|h| *h == host || *h == with_port);
        (url.scheme == "https" && forge).then_some(token)
    }

    async fn run(
        &self,
        tool: &str,
        spec: &CommandSpec,
        cancel: &CancellationToken,
    ) -> Result<String, StageError> {
        match process::run(spec, cancel).await {
            Ok(output) => Ok(output.stdout.trim().to_owned()),
            Err(error) => Err(self.tool_error(tool, error)),
        }
    }

    /// Runs git inside the sandbox, as the agent's user and without any credential.
    pub async fn run_git(
        &self,
        cwd: &Path,
        args: &[&str],
        cancel: &CancellationToken,
    ) -> Result<String, StageError> {
        let mut spec = self.git(cwd, Runner::Agent, None, false);
        for arg in args {
            spec = spec.arg(*arg);
        }
        self.run("git", &spec, cancel).await
    }

    /// Runs git inside the sandbox as `run_git` does, with `stdin`.
    pub async fn run_git_with_stdin(
        &self,
        cwd: &Path,
        args: &[&str],
        stdin: Vec<u8>,
        cancel: &CancellationToken,
    ) -> Result<String, StageError> {
        let mut spec = self.git(cwd, Runner::Agent, None, false).stdin(stdin);
        for arg in args {
            spec = spec.arg(*arg);
        }
        self.run("git", &spec, cancel).await
    }

    /// Clones `url` into the work order's sandbox (through a temporary directory, so a crash
    /// never leaves a half clone under the final name), creates its branch, and hands it to the
    /// agent's user. A sandbox that exists already is kept.
    pub async fn clone_sandbox(
        &self,
        id: &str,
        url: &RepoUrl,
        branch: &str,
        cancel: &CancellationToken,
    ) -> Result<(PathBuf, bool), StageError> {
        let target = self.repository_dir(id);
        let parent = self.settings.data_dir.join("repositories");
        self.ensure_dir(&parent)?;
        if target.join(".git").is_dir() {
            return Ok((target, false));
        }
        let pinned = super::url::resolve_public(url)
            .await
            .map_err(|e| StageError::fatal("repository_host_refused", e.0))?;
        let partial = parent.join(format!(".{id}.partial-{}", uuid::Uuid::new_v4().simple()));
        let partial_name = partial.to_string_lossy().into_owned();
        let spec = self
            .git(&parent, Runner::Worker, Some((url, &pinned)), false)
            .arg("clone")
            .arg("--quiet")
            .arg("--")
            .arg(&url.url)
            .arg(&partial_name);
        if let Err(error) = self.run("git", &spec, cancel).await {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(error);
        }
        self.give_to_agent(&partial)?;
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

    /// Pushes `branch` of the sandbox to `url`: fetched into a clean bare repository of the
    /// worker's (the sandbox's configuration, which the agent could write, is never read by a
    /// process that carries the token), and pushed from there. Answers the pushed commit.
    pub async fn push(
        &self,
        sandbox: &Path,
        url: &RepoUrl,
        branch: &str,
        cancel: &CancellationToken,
    ) -> Result<String, StageError> {
        let clean = ScratchDir::create(
            &self.settings.data_dir.join("push"),
            &format!("push-{}", uuid::Uuid::new_v4().simple()),
        )?;
        let bare = clean.0.as_path();
        let refspec = format!("+refs/heads/{branch}:refs/heads/{branch}");
        let init = self
            .git(bare, Runner::Worker, None, false)
            .arg("init")
            .arg("--quiet")
            .arg("--bare");
        self.run("git", &init, cancel).await?;
        let sandbox_path = sandbox.to_string_lossy().into_owned();
        let fetch = self
            .git(bare, Runner::Worker, None, true)
            .arg("fetch")
            .arg("--quiet")
            .arg("--no-tags")
            .arg("--")
            .arg(&sandbox_path)
            .arg(&refspec);
        self.run("git", &fetch, cancel).await?;
        let pinned = super::url::resolve_public(url)
            .await
            .map_err(|e| StageError::fatal("repository_host_refused", e.0))?;
        let target = format!("refs/heads/{branch}:refs/heads/{branch}");
        let push = self
            .git(bare, Runner::Worker, Some((url, &pinned)), false)
            .arg("push")
            .arg("--quiet")
            .arg("--")
            .arg(&url.url)
            .arg(&target);
        self.run("git", &push, cancel).await?;
        let head = self
            .git(bare, Runner::Worker, None, false)
            .arg("rev-parse")
            .arg(format!("refs/heads/{branch}"));
        self.run("git", &head, cancel).await
    }

    /// Runs the coding agent headless in `cwd` with `prompt` on stdin, as the agent's user, with
    /// a home of its own and the Anthropic key as its only secret.
    pub async fn run_claude(
        &self,
        id: &str,
        cwd: &Path,
        prompt: &str,
        cancel: &CancellationToken,
    ) -> Result<AgentRun, StageError> {
        let as_root = match self.agent_ids() {
            Some(_) => false,
            None => nix::unistd::geteuid().is_root(),
        };
        if as_root && self.settings.skip_permissions {
            return Err(StageError::fatal(
                "agent_runs_as_root",
                "the coding agent would run as root with its permission prompts bypassed, which it refuses: \
                 set AWO_AGENT_USER to an unprivileged user (or create the user nobody), or run the worker \
                 as a non-root user",
            ));
        }
        let home = self.home_dir(id);
        self.ensure_dir(&home)?;
        self.give_to_agent(&home)?;
        let mut spec = self
            .command(&self.settings.claude_cli, Runner::Agent)
            .env("HOME", &home)
            .env("DISABLE_AUTOUPDATER", "1")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .cwd(cwd)
            .arg("--print")
            .arg("--output-format")
            .arg("stream-json")
            .arg("--model")
            .arg(&self.settings.model)
            // The CLI answers stream-json in print mode only with --verbose.
            .arg("--verbose");
        if let Some(turns) = self.settings.max_turns {
            spec = spec.arg("--max-turns").arg(turns.to_string());
        }
        if self.settings.skip_permissions {
            spec = spec.arg("--dangerously-skip-permissions");
        }
        if let Some(key) = &self.settings.anthropic_api_key {
            spec = spec.secret_env("ANTHROPIC_API_KEY", key);
        }
        spec = spec.stdin(prompt.as_bytes().to_vec());
        let output = process::run_unchecked(&spec, cancel)
            .await
            .map_err(|e| self.tool_error("claude", e))?;
        let (_, outcome) = stream::parse(&output.stdout);
        if outcome.subtype.is_none() && !output.status.success() {
            let stderr: String = output.stderr.trim().chars().take(800).collect();
            return Err(self.classify_agent_failure(
                &format!(
                    "the coding agent exited with {} and no result",
                    output.status
                ),
                &stderr,
            ));
        }
        if outcome.is_error {
            let subtype = outcome.subtype.clone().unwrap_or_default();
            let result = outcome.result.clone().unwrap_or_default();
            let message = format!(
                "the coding agent failed ({subtype}) after {} turns: {result}",
                outcome.turns.unwrap_or(0)
            );
            if subtype == "error_max_turns" {
                return Err(StageError::fatal(
                    "agent_max_turns",
                    format!("{message} (raise CLAUDE_CLI_MAX_TURNS)"),
                ));
            }
            return Err(self.classify_agent_failure(&message, &result));
        }
        Ok(AgentRun {
            outcome,
            raw: output.stdout,
        })
    }

    /// What a failed agent call means: rate limits, overload and network trouble are worth
    /// another attempt; a missing login or key, a refused flag or anything else is permanent.
    fn classify_agent_failure(&self, message: &str, detail: &str) -> StageError {
        let text = detail.to_ascii_lowercase();
        let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
        let full = if detail.is_empty() || message.contains(detail) {
            message.to_owned()
        } else {
            format!("{message}: {detail}")
        };
        if has(&[
            "not logged in",
            "/login",
            "invalid api key",
            "authentication",
            "unauthorized",
            "401",
            "oauth token",
        ]) {
            let hint = if self.settings.anthropic_api_key.is_none() {
                " (ANTHROPIC_API_KEY is not set: set it, or log the CLI in as AWO_AGENT_USER)"
            } else {
                " (check ANTHROPIC_API_KEY)"
            };
            return StageError::fatal("agent_not_authenticated", format!("{full}{hint}"));
        }
        if has(&["root/sudo", "as root"]) {
            return StageError::fatal(
                "agent_runs_as_root",
                format!("{full} (set AWO_AGENT_USER to an unprivileged user)"),
            );
        }
        if has(&[
            "unknown option",
            "unknown argument",
            "error: option",
            "invalid value",
            "usage:",
        ]) {
            return StageError::fatal(
                "agent_usage",
                format!(
                    "{full} (the CLI refused its flags: check CLAUDE_CLI_* settings and the CLI version)"
                ),
            );
        }
        if has(&[
            "rate limit",
            "rate_limit",
            "429",
            "overloaded",
            "529",
            "too many requests",
            "econnreset",
            "etimedout",
            "connection error",
            "network error",
            "socket hang up",
        ]) {
            return StageError::retryable(full);
        }
        StageError::fatal("agent_failed", full)
    }

    /// gh with the base environment and, for a forge repository over https, the token and
    /// host; run in a directory of the worker's, never in the sandbox.
    fn gh(&self, url: &RepoUrl) -> CommandSpec {
        let config = self.settings.data_dir.join("gh");
        let mut spec = self
            .command(&self.settings.gh_cli, Runner::Worker)
            .cwd(&self.settings.data_dir)
            .env("GH_CONFIG_DIR", &config)
            .env("GH_PROMPT_DISABLED", "1")
            .env("GH_NO_UPDATE_NOTIFIER", "1")
            .env("NO_COLOR", "1");
        if let Some(host) = &url.host {
            spec = spec.env("GH_HOST", host);
        }
        if let Some(token) = self.token_for(url) {
            spec = spec.secret_env("GH_TOKEN", token);
        }
        spec
    }

    /// `--repo HOST/OWNER/REPO` of a forge URL, when it has that shape.
    fn gh_repo(url: &RepoUrl) -> Option<String> {
        let host = url.host.as_deref()?;
        let (owner, repo) = url.owner_and_repo()?;
        Some(format!("{host}/{owner}/{repo}"))
    }

    /// The open pull request of `branch`, if any: (number, url).
    pub async fn find_pull_request(
        &self,
        url: &RepoUrl,
        branch: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<(u64, String)>, StageError> {
        let mut spec = self.gh(url).arg("pr").arg("list");
        if let Some(repo) = Self::gh_repo(url) {
            spec = spec.arg("--repo").arg(repo);
        }
        let spec = spec
            .arg("--head")
            .arg(branch)
            .arg("--state")
            .arg("open")
            .arg("--json")
            .arg("number,url")
            .arg("--limit")
            .arg("1");
        let output = self.run("gh", &spec, cancel).await?;
        let found: Value = serde_json::from_str(&output).unwrap_or(Value::Null);
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
        url: &RepoUrl,
        branch: &str,
        title: &str,
        body_file: &Path,
        cancel: &CancellationToken,
    ) -> Result<(u64, String), StageError> {
        let mut spec = self.gh(url).arg("pr").arg("create");
        if let Some(repo) = Self::gh_repo(url) {
            spec = spec.arg("--repo").arg(repo);
        }
        let spec = spec
            .arg("--head")
            .arg(branch)
            .arg("--title")
            .arg(title)
            .arg("--body-file")
            .arg(body_file);
        let text = self.run("gh", &spec, cancel).await?;
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

    fn install_hint(&self, tool: &str) -> &'static str {
        match tool {
            "git" => "install git (Debian: apt-get install git) or set GIT_PATH",
            "claude" => {
                "install the coding-agent CLI (npm install -g @anthropic-ai/claude-code) or set CLAUDE_CLI_PATH"
            }
            _ if self.settings.github_token.is_none() => {
                "install the GitHub CLI or set GH_CLI_PATH; set GITHUB_TOKEN so it can authenticate"
            }
            _ => "install the GitHub CLI (https://cli.github.com) or set GH_CLI_PATH",
        }
    }

    fn tool_error(&self, tool: &str, error: ProcessError) -> StageError {
        match error {
            ProcessError::Spawn { program, source }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                StageError::fatal(
                    format!("{tool}_missing"),
                    format!("{program} was not found: {}", self.install_hint(tool)),
                )
            }
            ProcessError::Spawn { program, source } => StageError::fatal(
                format!("{tool}_unusable"),
                format!("{program} could not be started: {source}"),
            ),
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
                let message: String = stderr.chars().take(800).collect();
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
            ProcessError::Io { program, source } => {
                StageError::retryable(format!("{program}: {source}"))
            }
        }
    }
}

/// A directory of the worker's alone (mode 0700), deleted when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create(parent: &Path, name: &str) -> Result<Self, StageError> {
        use std::os::unix::fs::DirBuilderExt;
        let path = parent.join(name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .map_err(|e| {
                StageError::fatal(
                    "data_dir_unwritable",
                    format!("cannot create {}: {e}; check AWO_DATA_DIR", path.display()),
                )
            })?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::awo::url::UrlPolicy;

    fn tools(data: &Path) -> Tools {
        let path = std::env::var("PATH").unwrap_or_default();
        let settings = AwoSettings {
            data_dir: data.to_path_buf(),
            allowed_schemes: vec!["https".into(), "http".into()],
            allowed_hosts: vec!["github.com".into(), "evil.example".into()],
            git_hosts: vec!["github.com".into()],
            github_token: Some(SecretString::from("ghp_scopedTOKEN0123456789".to_owned())),
            base_env: std::sync::Arc::new(vec![("PATH".into(), path)]),
            ..AwoSettings::default()
        };
        Tools::new(&settings, Scrubber::default())
    }

    /// What `git credential fill` answers for a host and protocol, with the configuration a
    /// call for `url` gets.
    async fn filled(tools: &Tools, url: &str, protocol: &str, host: &str) -> Option<String> {
        let policy = UrlPolicy::new(
            &tools.settings.allowed_schemes,
            &tools.settings.allowed_hosts,
        );
        let parsed = policy.check(url).expect("allowed");
        let request = format!("protocol={protocol}\nhost={host}\npath=o/r\n\n");
        let spec = tools
            .git(
                &tools.settings.data_dir,
                Runner::Worker,
                Some((&parsed, &[])),
                false,
            )
            .arg("credential")
            .arg("fill")
            .stdin(request.into_bytes());
        let output = process::run_unchecked(&spec, &CancellationToken::new())
            .await
            .expect("git runs");
        output
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("password="))
            .map(str::to_owned)
    }

    #[tokio::test]
    async fn git_offers_the_token_only_to_forge_hosts_over_https() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tools = tools(dir.path());
        // A forge URL over https: its host gets the token (scrubbed in what is kept).
        assert_eq!(
            filled(&tools, "https://github.com/o/r", "https", "github.com")
                .await
                .as_deref(),
            Some("***")
        );
        // The same call asked for another host, or over http: nothing.
        assert_eq!(
            filled(&tools, "https://github.com/o/r", "https", "evil.example").await,
            None
        );
        assert_eq!(
            filled(&tools, "https://github.com/o/r", "http", "github.com").await,
            None
        );
        // A repository elsewhere, or a forge over http: the call carries no token at all.
        for url in ["https://evil.example/o/r", "http://github.com/o/r"] {
            let policy = UrlPolicy::new(
                &tools.settings.allowed_schemes,
                &tools.settings.allowed_hosts,
            );
            let parsed = policy.check(url).expect("allowed");
            let spec = tools.git(dir.path(), Runner::Worker, Some((&parsed, &[])), false);
            assert!(
                !spec.env.iter().any(|(k, _)| k == "GITHUB_TOKEN"),
                "{url} got the token"
            );
            assert_eq!(
                filled(&tools, url, "https", "github.com").await,
                None,
                "{url}"
            );
        }
    }
}
