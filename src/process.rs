//! The one place subprocesses are started.
//!
//! Invariant: only this module spawns processes. Every child gets its own process group, a
//! working directory, explicit extra environment (secrets go here, never on the command line),
//! and a timeout; on timeout, cancel, or when the waiting future is dropped (an abandoned or
//! cancelled stage), the whole group is killed, grandchildren included. Nothing goes through a
//! shell string.

use std::{
    ffi::OsString,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// What to run.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub cwd: Option<PathBuf>,
    /// Added to the inherited environment.
    pub env: Vec<(OsString, OsString)>,
    pub stdin: Option<Vec<u8>>,
    pub timeout: Duration,
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

    pub fn stdin(mut self, bytes: Vec<u8>) -> Self {
        self.stdin = Some(bytes);
        self
    }

    fn display(&self) -> String {
        self.program.display().to_string()
    }
}

/// A finished process.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
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

/// Runs a command to completion. A non-zero exit is [`ProcessError::Failed`] with stderr.
pub async fn run(spec: &CommandSpec, cancel: &CancellationToken) -> Result<Output, ProcessError> {
    let output = run_unchecked(spec, cancel).await?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(ProcessError::Failed {
            program: spec.display(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr)
                .trim()
                .chars()
                .take(4000)
                .collect(),
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
    let waited = tokio::select! {
        output = child.wait_with_output() => output,
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
    let output = waited.map_err(|source| ProcessError::Io { program, source })?;
    Ok(Output {
        status: output.status,
        stdout: output.stdout,
        stderr: output.stderr,
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

    #[tokio::test]
    async fn output_and_stdin_pass_through() {
        let spec = CommandSpec::new("cat", Duration::from_secs(5)).stdin(b"hello".to_vec());
        let output = run(&spec, &CancellationToken::new())
            .await
            .expect("cat runs");
        assert_eq!(output.stdout, b"hello");
    }

    #[tokio::test]
    async fn failure_carries_stderr() {
        let spec = CommandSpec::new("sh", Duration::from_secs(5))
            .arg("-c")
            .arg("echo broken >&2; exit 3");
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
        let spec = CommandSpec::new("sh", Duration::from_millis(500))
            .arg("-c")
            .arg(script);
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
            let spec = CommandSpec::new("sh", Duration::from_secs(60))
                .arg("-c")
                .arg(script);
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
