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
use crate::{settings::AgentUser, settings::AwoSettings};
use stagecraft_core::{
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
        stagecraft_core::artifacts::write_atomically(path, text.as_bytes()).map_err(|e| {
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

    /// Hands a tree the worker just created (a fresh clone) to the agent's user, when the worker
    /// is root. Children go before their directory, so every directory is still the worker's
    /// (and unchangeable by any agent) while it is read; symlinks are not followed.
    pub async fn give_tree_to_agent(&self, root: &Path) -> Result<(), StageError> {
        let Some((uid, gid)) = self.agent_ids() else {
            return Ok(());
        };
        let root = root.to_path_buf();
        let handed = tokio::task::spawn_blocking(move || chown_tree(&root, uid, gid)).await;
        match handed {
            Ok(Ok(())) => Ok(()),
            Ok(Err((path, e))) => Err(StageError::fatal(
                "data_dir_unwritable",
                format!("cannot hand {} to AWO_AGENT_USER: {e}", path.display()),
            )),
            Err(e) => Err(StageError::retryable(format!(
                "handing a clone over failed: {e}"
            ))),
        }
    }

    /// Hands one directory of the worker's (not its contents) to the agent's user.
    fn give_dir_to_agent(&self, dir: &Path) -> Result<(), StageError> {
        let Some((uid, gid)) = self.agent_ids() else {
            return Ok(());
        };
        std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).map_err(|e| {
            StageError::fatal(
                "data_dir_unwritable",
                format!("cannot hand {} to AWO_AGENT_USER: {e}", dir.display()),
            )
        })
    }

    /// Writes `text` to `path` inside a sandbox with the agent's rights: as its user (through
    /// `mkdir` and `tee`) when the worker is root, so no symlink the agent planted can make the
    /// worker write anywhere else; directly otherwise (the agent is then the worker's user).
    pub async fn sandbox_write(
        &self,
        sandbox: &Path,
        path: &Path,
        text: &str,
        cancel: &CancellationToken,
    ) -> Result<(), StageError> {
        let failed =
            |e: String| StageError::retryable(format!("cannot write {}: {e}", path.display()));
        if self.agent_ids().is_none() {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| failed(e.to_string()))?;
            }
            return std::fs::write(path, text).map_err(|e| failed(e.to_string()));
        }
        if let Some(parent) = path.parent() {
            let mkdir = self
                .command(Path::new("mkdir"), Runner::Agent)
                .cwd(sandbox)
                .arg("-p")
                .arg("--")
                .arg(parent);
            self.run("mkdir", &mkdir, cancel).await?;
        }
        let tee = self
            .command(Path::new("tee"), Runner::Agent)
            .cwd(sandbox)
            .arg("--")
            .arg(path)
            .max_output(4096)
            .stdin(text.as_bytes().to_vec());
        self.run("tee", &tee, cancel).await.map(drop)
    }

    /// Reads up to `limit` bytes of `path` inside a sandbox with the agent's rights (see
    /// [`Tools::sandbox_write`]); `None` when it cannot be read.
    pub async fn sandbox_read(
        &self,
        sandbox: &Path,
        path: &Path,
        limit: usize,
        cancel: &CancellationToken,
    ) -> Option<String> {
        if self.agent_ids().is_none() {
            use std::io::Read;
            let mut text = String::new();
            let file = std::fs::File::open(path).ok()?;
            file.take(limit as u64).read_to_string(&mut text).ok()?;
            return Some(text);
        }
        let head = self
            .command(Path::new("head"), Runner::Agent)
            .cwd(sandbox)
            .arg("-c")
            .arg(limit.to_string())
            .arg("--")
            .arg(path)
            .max_output(limit.saturating_mul(2));
        process::run(&head, cancel).await.ok().map(|o| o.stdout)
    }

    /// Whether the coding agent may run live here, and as whom. It never runs as root; in
    /// production (`require_agent_isolation`) it never runs as the worker's own user either, who
    /// holds the deployment's secrets (the worker's environment, the data directory's git and gh
    /// configuration) that the agent could then read or change.
    fn agent_isolation(&self) -> Result<Option<(u32, u32)>, StageError> {
        agent_isolation(&self.settings)
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
            if !pinned.is_empty() {
                // A proxy would resolve the name again, past the check: go direct to the address.
                for key in ["NO_PROXY", "no_proxy"] {
                    let listed = self
                        .settings
                        .network_env
                        .iter()
                        .find(|(k, _)| k == key)
                        .map(|(_, v)| format!("{v},"))
                        .unwrap_or_default();
                    spec = spec.env(key, format!("{listed}{host}"));
                }
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
                && stagecraft_core::artifacts::write_atomically(
                    &path,
                    b"[safe]\n\tdirectory = *\n",
                )
                .is_ok();
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
        // No checkout yet: its size is checked first. No hard links into a local source, whose
        // files would otherwise be handed to the agent's user with the clone.
        let spec = self
            .git(&parent, Runner::Worker, Some((url, &pinned)), false)
            .arg("clone")
            .arg("--quiet")
            .arg("--no-checkout")
            .arg("--no-hardlinks")
            .arg("--")
            .arg(&url.url)
            .arg(&partial_name);
        let prepared = async {
            self.run("git", &spec, cancel).await?;
            self.check_checkout_size(&partial, cancel).await?;
            self.give_tree_to_agent(&partial).await?;
            self.run_git(&partial, &["checkout", "--quiet", "-B", branch], cancel)
                .await
        };
        if let Err(error) = prepared.await {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(error);
        }
        std::fs::rename(&partial, &target).map_err(|e| {
            StageError::fatal(
                "data_dir_unwritable",
                format!("cannot move the clone into {}: {e}", target.display()),
            )
        })?;
        Ok((target, true))
    }

    /// Refuses a clone whose checkout would exceed `AWO_MAX_REPO_FILES` or `AWO_MAX_REPO_BYTES`
    /// (a repository can compress a huge tree into a small pack), before it is written.
    async fn check_checkout_size(
        &self,
        clone: &Path,
        cancel: &CancellationToken,
    ) -> Result<(), StageError> {
        let sizes = self
            .git(clone, Runner::Worker, None, false)
            .arg("ls-tree")
            .arg("-r")
            .arg("--format=%(objectsize)")
            .arg("HEAD")
            .max_output(64 * 1024 * 1024);
        let listing = match process::run(&sizes, cancel).await {
            Ok(output) => output.stdout,
            // An empty repository has no HEAD yet: nothing to check out.
            Err(ProcessError::Failed { stderr, .. })
                if stderr.contains("Not a valid object name") =>
            {
                return Ok(());
            }
            Err(error) => return Err(self.tool_error("git", error)),
        };
        let (files, bytes) = listing.lines().fold((0u64, 0u64), |(files, bytes), line| {
            (
                files + 1,
                bytes.saturating_add(line.trim().parse().unwrap_or(0)),
            )
        });
        let limits = &self.settings;
        if files > limits.max_repo_files
            || bytes > limits.max_repo_bytes
            || listing.contains("bytes of output dropped")
        {
            return Err(StageError::fatal(
                "repository_too_large",
                format!(
                    "the repository's checkout has {files} files and {bytes} bytes; this deployment \
                     allows {} files and {} bytes (AWO_MAX_REPO_FILES, AWO_MAX_REPO_BYTES)",
                    limits.max_repo_files, limits.max_repo_bytes
                ),
            ));
        }
        Ok(())
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
        self.agent_isolation()?;
        let home = self.home_dir(id);
        self.ensure_dir(&home)?;
        self.give_dir_to_agent(&home)?;
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
        // Only with `--repo` naming the repository: gh never guesses it from a directory.
        if let Some(token) = self.token_for(url).filter(|_| Self::gh_repo(url).is_some()) {
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

/// Hands `root` and everything under it to `uid:gid`, children before their directory, without
/// following symlinks. Answers the path that could not be handed over.
fn chown_tree(root: &Path, uid: u32, gid: u32) -> Result<(), (PathBuf, std::io::Error)> {
    let mut pending = vec![(root.to_path_buf(), false)];
    while let Some((path, listed)) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| (path.clone(), e))?;
        if meta.is_dir() && !listed {
            pending.push((path.clone(), true));
            for entry in std::fs::read_dir(&path).map_err(|e| (path.clone(), e))? {
                let entry = entry.map_err(|e| (path.clone(), e))?;
                pending.push((entry.path(), false));
            }
        } else {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).map_err(|e| (path, e))?;
        }
    }
    Ok(())
}

/// Who a live coding agent runs as in this process (`None`: the worker's own user), or why it
/// may not run here (checked by every agent step, and told at a worker's start).
pub fn agent_isolation(settings: &AwoSettings) -> Result<Option<(u32, u32)>, StageError> {
    isolation(
        nix::unistd::geteuid().is_root(),
        settings.agent_user.as_ref(),
        settings.require_agent_isolation,
    )
}

/// Who the coding agent runs as (`None`: the worker's own user), or why it may not run: never
/// as root, and, when `isolated` is required, never as the worker's user.
fn isolation(
    worker_is_root: bool,
    agent_user: Option<&AgentUser>,
    isolated: bool,
) -> Result<Option<(u32, u32)>, StageError> {
    match (worker_is_root, agent_user) {
        (true, Some(user)) => Ok(Some((user.uid, user.gid))),
        (true, None) => Err(StageError::fatal(
            "agent_runs_as_root",
            "the coding agent would run as root: set AWO_AGENT_USER to an unprivileged user \
             (or create the user nobody)",
        )),
        (false, _) if isolated => Err(StageError::fatal(
            "agent_shares_worker_user",
            "the coding agent would run as the worker's own user, who holds the deployment's \
             secrets it could then read: run the work-order worker as root with AWO_AGENT_USER \
             set to a dedicated unprivileged user (as the work-order image does)",
        )),
        (false, _) => Ok(None),
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
    use stagecraft_core::settings::{Vars, process_env};

    use super::*;
    use crate::url::UrlPolicy;

    fn tools(data: &Path) -> Tools {
        let base_env = Vars::new(&process_env).environment(&["PATH"]);
        let settings = AwoSettings {
            data_dir: data.to_path_buf(),
            allowed_schemes: vec!["https".into(), "http".into()],
            allowed_hosts: vec!["github.com".into(), "evil.example".into()],
            git_hosts: vec!["github.com".into()],
            github_token: Some(SecretString::from("ghp_scopedTOKEN0123456789".to_owned())),
            base_env,
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

    #[test]
    fn the_agent_never_runs_as_root_nor_as_the_worker_in_production() {
        let user = AgentUser {
            name: "agent".into(),
            uid: 10002,
            gid: 10002,
        };
        assert_eq!(
            isolation(true, Some(&user), true).expect("isolated"),
            Some((10002, 10002))
        );
        let code = |r: Result<Option<(u32, u32)>, StageError>| match r {
            Err(StageError::Fatal { code, .. }) => code,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(code(isolation(true, None, false)), "agent_runs_as_root");
        assert_eq!(
            code(isolation(false, Some(&user), true)),
            "agent_shares_worker_user"
        );
        assert_eq!(
            code(isolation(false, None, true)),
            "agent_shares_worker_user"
        );
        assert_eq!(isolation(false, None, false).expect("development"), None);
    }

    /// The worker's identity tests need: root, with `nobody` to hand things to.
    fn as_root_with_nobody() -> Option<AgentUser> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let nobody = nix::unistd::User::from_name("nobody").ok()??;
        Some(AgentUser {
            name: "nobody".into(),
            uid: nobody.uid.as_raw(),
            gid: nobody.gid.as_raw(),
        })
    }

    #[test]
    fn a_handed_over_tree_is_the_agents_and_nothing_outside_it() {
        use std::os::unix::fs::MetadataExt;
        let Some(user) = as_root_with_nobody() else {
            eprintln!("skipped: needs root and the user nobody");
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "root's").expect("outside");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b")).expect("tree");
        std::fs::write(tree.join("a/b/file"), "x").expect("file");
        std::os::unix::fs::symlink(&outside, tree.join("a/link")).expect("link");
        chown_tree(&tree, user.uid, user.gid).expect("handed over");
        for path in ["", "a", "a/b", "a/b/file"] {
            let meta = std::fs::symlink_metadata(tree.join(path)).expect("meta");
            assert_eq!((meta.uid(), meta.gid()), (user.uid, user.gid), "{path}");
        }
        assert_eq!(std::fs::metadata(&outside).expect("outside").uid(), 0);
    }

    #[tokio::test]
    async fn sandbox_writes_have_the_agents_rights_only() {
        use std::os::unix::fs::MetadataExt;
        let Some(user) = as_root_with_nobody() else {
            eprintln!("skipped: needs root and the user nobody");
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let mut tools = tools(dir.path());
        tools.settings.agent_user = Some(user.clone());
        let sandbox = dir.path().join("sandbox");
        std::fs::create_dir_all(&sandbox).expect("sandbox");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("reachable");
        std::os::unix::fs::lchown(&sandbox, Some(user.uid), Some(user.gid)).expect("handed");
        let cancel = CancellationToken::new();
        // A plain write lands, owned by the agent's user, and reads back.
        let plan = sandbox.join("docs/plan.md");
        tools
            .sandbox_write(&sandbox, &plan, "the plan\n", &cancel)
            .await
            .expect("written");
        assert_eq!(std::fs::metadata(&plan).expect("plan").uid(), user.uid);
        assert_eq!(
            tools
                .sandbox_read(&sandbox, &plan, 4, &cancel)
                .await
                .as_deref(),
            Some("the ")
        );
        // A symlink the agent planted towards a file of root's: the write is refused, the file
        // unchanged, and it cannot be read through the sandbox either.
        let secret = dir.path().join("root-only");
        std::fs::write(&secret, "secret").expect("secret");
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("private");
        let link = sandbox.join("NOTES.md");
        std::os::unix::fs::symlink(&secret, &link).expect("link");
        assert!(
            tools
                .sandbox_write(&sandbox, &link, "overwritten", &cancel)
                .await
                .is_err()
        );
        assert_eq!(std::fs::read_to_string(&secret).expect("secret"), "secret");
        assert_eq!(
            tools.sandbox_read(&sandbox, &link, 100, &cancel).await,
            None
        );
    }
}
