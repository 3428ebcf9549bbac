//! The one place subprocesses are started.
//!
//! Invariant: only this module spawns processes. Every child gets its own process group, a
//! working directory, a timeout and an environment that starts empty: it sees only what its
//! [`CommandSpec`] lists (the deployment's base variables such as `PATH` and `HOME`, plus what
//! that one tool needs; secrets go here, never on the command line). On timeout, cancel, or when
//! the waiting future is dropped (an abandoned or cancelled stage), the whole group is killed,
//! grandchildren included. Nothing goes through a shell string.
//! Invariant: what is kept of a child's output is bounded (the first and last halves of
//! [`CommandSpec::max_output`] bytes per stream) and scrubbed of the secrets it was given and
//! of well-known token shapes before anyone reads it.

use std::{
    collections::VecDeque,
    ffi::OsString,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    sync::Arc,
    time::Duration,
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::secrets::Scrubber;

/// Variables every child may get, read once at start-up (`config`): `PATH`, `HOME`, locale and
/// time zone. Nothing secret belongs here.
pub type BaseEnv = Arc<Vec<(String, String)>>;

/// Bytes of each output stream kept by default.
pub const DEFAULT_MAX_OUTPUT: usize = 4 * 1024 * 1024;

/// What to run.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub cwd: Option<PathBuf>,
    /// The child's whole environment (it inherits nothing).
    pub env: Vec<(OsString, OsString)>,
    pub stdin: Option<Vec<u8>>,
    pub timeout: Duration,
    /// Bytes of stdout and of stderr kept (first and last halves); the middle is dropped.
    pub max_output: usize,
    /// Run the child as this user and group (`uid`, `gid`), from a root parent.
    pub run_as: Option<(u32, u32)>,
    /// Hides the secrets given to the child in what is kept of its output.
    scrubber: Scrubber,
}

impl CommandSpec {
    pub fn new(program: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            cwd: None,
            env: Vec::new(),
            stdin: None,
            timeout,
            max_output: DEFAULT_MAX_OUTPUT,
            run_as: None,
            scrubber: Scrubber::default(),
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Adds the deployment's base variables (`PATH`, `HOME`, locale, time zone).
    pub fn base_env(mut self, base: &BaseEnv) -> Self {
        self.env
            .extend(base.iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Adds a secret variable: the child gets it, and its value is hidden in the output kept.
    pub fn secret_env(mut self, key: impl Into<OsString>, value: &SecretString) -> Self {
        self.scrubber = self.scrubber.with([value.expose_secret()]);
        self.env.push((key.into(), value.expose_secret().into()));
        self
    }

    /// Hides these secrets too in the output kept (besides those given with `secret_env`).
    pub fn scrubbed_with(mut self, scrubber: &Scrubber) -> Self {
        self.scrubber = scrubber.clone();
        self
    }

    pub fn stdin(mut self, bytes: Vec<u8>) -> Self {
        self.stdin = Some(bytes);
        self
    }

    pub fn max_output(mut self, bytes: usize) -> Self {
        self.max_output = bytes.max(2);
        self
    }

    pub fn run_as(mut self, user: Option<(u32, u32)>) -> Self {
        self.run_as = user;
        self
    }

    fn display(&self) -> String {
        self.program.display().to_string()
    }
}

/// A finished process. Its output is bounded and scrubbed (see the module invariants).
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{program} could not be started: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} timed out after {} s and was killed with its process group", timeout.as_secs_f64())]
    TimedOut { program: String, timeout: Duration },
    #[error("{program} was cancelled and killed with its process group")]
    Cancelled { program: String },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("{program}: {source}")]
    Io {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// Kills the process group when dropped, unless disarmed after the child was reaped.
struct GroupGuard {
    pgid: Option<Pid>,
}

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Bytes either edge of dropped output may move to avoid splitting a secret (longer than any
/// credential's shape the scrubber knows).
const SEAM: usize = 512;

/// The first half and the last half of a stream's bytes, whatever its length.
struct Capture {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    half: usize,
    dropped: u64,
}

impl Capture {
    fn new(limit: usize) -> Self {
        Self {
            head: Vec::new(),
            tail: VecDeque::new(),
            half: limit / 2,
            dropped: 0,
        }
    }

    fn push(&mut self, mut chunk: &[u8]) {
        let room = self.half.saturating_sub(self.head.len());
        let (first, rest) = chunk.split_at(room.min(chunk.len()));
        self.head.extend_from_slice(first);
        chunk = rest;
        self.tail.extend(chunk.iter().copied());
        let excess = self.tail.len().saturating_sub(self.half);
        if excess > 0 {
            self.tail.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        let mut bytes = self.head;
        if self.dropped == 0 {
            bytes.extend(self.tail);
            return bytes;
        }
        // A secret cut in two at either edge of the gap would no longer be recognised by the
        // scrubber: each edge moves to a whitespace within `SEAM` bytes, or drops `SEAM` bytes.
        let is_space = |b: &u8| b.is_ascii_whitespace();
        let head_end = bytes.len().saturating_sub(SEAM);
        let keep = bytes[head_end..]
            .iter()
            .rposition(is_space)
            .map_or(head_end, |i| head_end + i + 1);
        let cut_head = bytes.len() - keep;
        bytes.truncate(keep);
        let tail: Vec<u8> = self.tail.into();
        let skip = tail
            .iter()
            .take(SEAM)
            .position(is_space)
            .unwrap_or(SEAM.min(tail.len()));
        let dropped = self.dropped + (cut_head + skip) as u64;
        bytes.extend_from_slice(
            format!("\n[... {dropped} bytes of output dropped ...]\n").as_bytes(),
        );
        bytes.extend_from_slice(&tail[skip..]);
        bytes
    }
}

/// Reads `reader` to its end into `kept`.
async fn pump(reader: Option<impl AsyncRead + Unpin>, kept: &mut Capture) -> std::io::Result<()> {
    let Some(mut reader) = reader else {
        return Ok(());
    };
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = reader.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        kept.push(&buffer[..read]);
    }
}

/// How long the output of a child that exited is still read: what it left running (even a
/// process that left its group) may hold its pipes open, and is not waited for longer.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Runs a command to completion. A non-zero exit is [`ProcessError::Failed`] with stderr.
pub async fn run(spec: &CommandSpec, cancel: &CancellationToken) -> Result<Output, ProcessError> {
    let output = run_unchecked(spec, cancel).await?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(ProcessError::Failed {
            program: spec.display(),
            status: output.status,
            stderr: output.stderr.trim().chars().take(4000).collect(),
        })
    }
}

/// Runs a command to completion, whatever its exit status.
pub async fn run_unchecked(
    spec: &CommandSpec,
    cancel: &CancellationToken,
) -> Result<Output, ProcessError> {
    let program = spec.display();
    let mut command = tokio::process::Command::new(&spec.program);
    command
        .args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &spec.cwd {
        command.current_dir(dir);
    }
    if let Some((uid, gid)) = spec.run_as {
        command.uid(uid).gid(gid);
    }
    let mut child = command.spawn().map_err(|source| ProcessError::Spawn {
        program: program.clone(),
        source,
    })?;
    let mut guard = GroupGuard {
        pgid: child.id().map(|id| Pid::from_raw(id as i32)),
    };
    if let (Some(bytes), Some(mut stdin)) = (spec.stdin.clone(), child.stdin.take()) {
        tokio::spawn(async move {
            let _ = stdin.write_all(&bytes).await;
        });
    }
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let (mut kept_out, mut kept_err) =
        (Capture::new(spec.max_output), Capture::new(spec.max_output));
    let finished = async {
        let streams = async {
            let (out, err) = tokio::join!(pump(stdout, &mut kept_out), pump(stderr, &mut kept_err));
            out.and(err)
        };
        tokio::pin!(streams);
        let mut read = None;
        let status = loop {
            tokio::select! {
                done = &mut streams, if read.is_none() => read = Some(done),
                status = child.wait() => break status?,
            }
        };
        if read.is_none() {
            read = tokio::time::timeout(OUTPUT_GRACE, &mut streams).await.ok();
        }
        // Output still held open after the grace is cut where it stands.
        read.unwrap_or(Ok(()))?;
        Ok::<_, std::io::Error>(status)
    };
    let waited = tokio::select! {
        waited = finished => waited,
        () = tokio::time::sleep(spec.timeout) => {
            guard.kill();
            return Err(ProcessError::TimedOut { program, timeout: spec.timeout });
        }
        () = cancel.cancelled() => {
            guard.kill();
            return Err(ProcessError::Cancelled { program });
        }
    };
    // The leader exited; kill whatever it left running in its group.
    guard.kill();
    let status = waited.map_err(|source| ProcessError::Io { program, source })?;
    Ok(Output {
        status,
        stdout: spec.scrubber.scrub_bytes(&kept_out.into_bytes()),
        stderr: spec.scrubber.scrub_bytes(&kept_err.into_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn pid_alive(pid: i32) -> bool {
        // Signal 0 checks existence; a zombie reaped by init disappears quickly.
        nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.split_whitespace().nth(2) == Some("Z"))
                .unwrap_or(true)
    }

    fn sh(script: &str, timeout: Duration) -> CommandSpec {
        CommandSpec::new("sh", timeout)
            .env("PATH", "/usr/bin:/bin")
            .arg("-c")
            .arg(script)
    }

    #[tokio::test]
    async fn output_and_stdin_pass_through() {
        let spec = CommandSpec::new("cat", Duration::from_secs(5)).stdin(b"hello".to_vec());
        let output = run(&spec, &CancellationToken::new())
            .await
            .expect("cat runs");
        assert_eq!(output.stdout, "hello");
    }

    #[tokio::test]
    async fn a_child_sees_only_the_variables_it_is_given() {
        // This test process has PATH, HOME and more; the child must see none of them.
        let token = SecretString::from("tok-0123456789-secret".to_owned());
        let spec = CommandSpec::new("/usr/bin/env", Duration::from_secs(5))
            .env("LANG", "C.UTF-8")
            .secret_env("GITHUB_TOKEN", &token);
        let output = run(&spec, &CancellationToken::new())
            .await
            .expect("env runs");
        let mut lines: Vec<&str> = output.stdout.lines().collect();
        lines.sort_unstable();
        // The secret reached the child, and is hidden in what was kept of its output.
        assert_eq!(lines, ["GITHUB_TOKEN=***", "LANG=C.UTF-8"]);
    }

    #[tokio::test]
    async fn output_is_bounded_to_its_first_and_last_bytes() {
        let spec = sh(
            "i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done; echo ghp_abcdefgh12345678",
            Duration::from_secs(20),
        )
        .max_output(400);
        let output = run(&spec, &CancellationToken::new())
            .await
            .expect("sh runs");
        assert!(
            output.stdout.starts_with("line-0\nline-1\n"),
            "{}",
            output.stdout
        );
        assert!(output.stdout.contains("bytes of output dropped"));
        assert!(
            output.stdout.ends_with("line-1999\n***\n"),
            "{}",
            output.stdout
        );
        assert!(output.stdout.len() < 500);
    }

    #[tokio::test]
    async fn a_process_that_left_the_group_cannot_hold_the_call_open() {
        // The grandchild leaves the process group (so it is not killed with it) and keeps the
        // pipes open; the call still ends shortly after the child, with what it printed.
        let spec = sh(
            "setsid sleep 60 & echo $!; echo done",
            Duration::from_secs(50),
        );
        let started = Instant::now();
        let output = run(&spec, &CancellationToken::new())
            .await
            .expect("sh runs");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let mut lines = output.stdout.lines();
        let escaped: i32 = lines.next().and_then(|l| l.parse().ok()).expect("pid");
        assert_eq!(lines.next(), Some("done"));
        let _ = nix::sys::signal::kill(Pid::from_raw(escaped), Signal::SIGKILL);
    }

    #[test]
    fn a_secret_across_the_cut_is_not_kept_in_halves() {
        // A token-shaped word straddles the end of the kept head, another the start of the tail.
        let mut capture = Capture::new(2000);
        let mut text = "a ".repeat(490);
        text.push_str("ghp_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA ");
        text.push_str(&"b ".repeat(3000));
        text.push_str("ghp_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB");
        text.push_str(&" c".repeat(490));
        capture.push(text.as_bytes());
        let kept = String::from_utf8(capture.into_bytes()).expect("utf-8");
        assert!(kept.contains("bytes of output dropped"), "{kept}");
        for piece in ["AAAA", "BBBB"] {
            assert!(
                !kept.contains(piece) || kept.contains(&format!("ghp_{}", piece.repeat(8))),
                "{kept}"
            );
        }
        assert!(kept.starts_with("a a "), "{kept}");
        assert!(kept.ends_with(" c c"), "{kept}");
    }

    #[tokio::test]
    async fn failure_carries_stderr() {
        let spec = sh("echo broken >&2; exit 3", Duration::from_secs(5));
        match run(&spec, &CancellationToken::new()).await {
            Err(ProcessError::Failed { stderr, .. }) => assert_eq!(stderr, "broken"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("grandchild.pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let spec = sh(&script, Duration::from_millis(500));
        let started = Instant::now();
        let result = run(&spec, &CancellationToken::new()).await;
        assert!(
            matches!(result, Err(ProcessError::TimedOut { .. })),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("pid")
            .trim()
            .parse()
            .expect("number");
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!pid_alive(pid), "grandchild {pid} survived the timeout");
    }

    #[tokio::test]
    async fn cancel_and_drop_kill_the_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        for by_drop in [false, true] {
            let pidfile = dir.path().join(format!("gc-{by_drop}.pid"));
            let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
            let spec = sh(&script, Duration::from_secs(60));
            let cancel = CancellationToken::new();
            let mut running = Box::pin(run(&spec, &cancel));
            let deadline = Instant::now() + Duration::from_secs(5);
            while !pidfile.exists() && Instant::now() < deadline {
                tokio::select! {
                    _ = &mut running => panic!("finished early"),
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
            if by_drop {
                drop(running);
            } else {
                cancel.cancel();
                assert!(matches!(running.await, Err(ProcessError::Cancelled { .. })));
            }
            let pid: i32 = std::fs::read_to_string(&pidfile)
                .expect("pid")
                .trim()
                .parse()
                .expect("number");
            let deadline = Instant::now() + Duration::from_secs(5);
            while pid_alive(pid) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(!pid_alive(pid), "grandchild survived (by_drop = {by_drop})");
        }
    }
}
