//! A replicated Redis with Sentinel, as real processes on loopback (Debian's `redis-server` and
//! `redis-sentinel`): one primary, its replicas, three sentinels, each stopped by a watchdog
//! shell when the test binary exits. The primary can be SIGKILLed for Sentinel to promote a
//! replica.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tempfile::TempDir;

use super::free_port;

/// The name the sentinels monitor the primary under.
pub const MASTER: &str = "stagecraft";

pub struct RedisGroup {
    dir: TempDir,
    /// The replicas' links to the first primary.
    links: LinkProxy,
    /// The data servers, the first started as the primary.
    pub ports: Vec<u16>,
    pub sentinel_ports: Vec<u16>,
    watchdogs: Vec<Child>,
}

/// Starts `command` under a shell that stops it when the test binary exits.
fn watched(command: &str, log: &Path) -> Child {
    let script = format!(
        "{command} >{log} 2>&1 & s=$!; \
         while kill -0 {test_pid} 2>/dev/null && kill -0 $s 2>/dev/null; do sleep 0.5; done; kill $s 2>/dev/null; wait $s",
        log = log.display(),
        test_pid = std::process::id(),
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sh")
}

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start on port {port} (apt-get install redis-server redis-sentinel)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `redis-cli -p port args…`, its output.
pub fn cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl RedisGroup {
    /// A primary with `replicas` replicas (each refusing writes without `min_replicas` replicas
    /// in sync, should it become the primary) and three sentinels with a quorum of two that
    /// call a primary down after one second.
    pub fn start(replicas: usize, min_replicas: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let primary = free_port();
        let mut group = Self {
            dir,
            links: LinkProxy::start(primary),
            ports: Vec::new(),
            sentinel_ports: Vec::new(),
            watchdogs: Vec::new(),
        };
        for i in 0..=replicas {
            let port = if i == 0 { primary } else { free_port() };
            let data = group.dir.path().join(format!("redis-{port}"));
            std::fs::create_dir(&data).expect("data dir");
            let replica_of = if i == 0 {
                String::new()
            } else {
                format!("--replicaof 127.0.0.1 {}", group.links.port)
            };
            let command = format!(
                "redis-server --port {port} --bind 127.0.0.1 --dir {dir} --save '' --appendonly no \
                 --maxmemory-policy noeviction --protected-mode no --daemonize no \
                 --replica-announce-ip 127.0.0.1 --repl-diskless-sync yes --repl-diskless-sync-delay 0 \
                 --min-replicas-to-write {min_replicas} --min-replicas-max-lag 10 {replica_of}",
                dir = data.display(),
            );
            group
                .watchdogs
                .push(watched(&command, &data.join("redis.log")));
            wait_listening(port, "redis-server");
            group.ports.push(port);
        }
        group.wait_replicas(primary, replicas);
        for _ in 0..3 {
            let port = free_port();
            let config = group.dir.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &config,
                format!(
                    "port {port}\nbind 127.0.0.1\ndaemonize no\nprotected-mode no\ndir {dir}\n\
                     sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {MASTER} 1000\n\
                     sentinel failover-timeout {MASTER} 3000\n\
                     sentinel parallel-syncs {MASTER} 2\n",
                    dir = group.dir.path().display(),
                ),
            )
            .expect("sentinel config");
            let log = group.dir.path().join(format!("sentinel-{port}.log"));
            group.watchdogs.push(watched(
                &format!("redis-sentinel {}", config.display()),
                &log,
            ));
            wait_listening(port, "redis-sentinel");
            group.sentinel_ports.push(port);
        }
        // Every sentinel has found the replicas and the other sentinels.
        let deadline = Instant::now() + Duration::from_secs(30);
        for &port in &group.sentinel_ports {
            loop {
                let master = cli(port, &["SENTINEL", "MASTER", MASTER]);
                let fields: Vec<&str> = master.lines().collect();
                let value = |name: &str| {
                    fields
                        .iter()
                        .position(|l| *l == name)
                        .and_then(|i| fields.get(i + 1))
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0)
                };
                if value("num-slaves") >= replicas && value("num-other-sentinels") >= 2 {
                    break;
                }
                assert!(Instant::now() < deadline, "sentinel {port}: {master}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        group
    }

    fn wait_replicas(&self, primary: u16, replicas: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let info = cli(primary, &["INFO", "replication"]);
            let online = info
                .lines()
                .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                .count();
            if online >= replicas {
                return;
            }
            assert!(Instant::now() < deadline, "replicas not in sync: {info}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `REDIS_SENTINELS` for the deployment.
    pub fn sentinels(&self) -> String {
        self.sentinel_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The port of the server the sentinels name as the primary.
    pub fn primary_port(&self) -> Option<u16> {
        self.sentinel_ports.iter().find_map(|&port| {
            let answer = cli(port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER]);
            answer.lines().nth(1)?.trim().parse().ok()
        })
    }

    /// The process id of the server on `port`.
    fn pid(port: u16) -> nix::unistd::Pid {
        let info = cli(port, &["INFO", "server"]);
        let pid: i32 = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no process_id from port {port}: {info}"));
        nix::unistd::Pid::from_raw(pid)
    }

    /// SIGKILLs the primary's server process; answers its port.
    pub fn kill9_primary(&self) -> u16 {
        let port = self.primary_port().expect("a primary");
        nix::sys::signal::kill(Self::pid(port), nix::sys::signal::Signal::SIGKILL)
            .expect("kill the primary");
        port
    }

    /// From now on nothing the first primary writes reaches its replicas, though their links
    /// stay up and their acknowledgements still reach it (a stalled network): replication
    /// lag, made long on purpose.
    pub fn stall_replication(&self) {
        self.links.stall.cancel();
    }

    /// Closes the replicas' links to the first primary, dropping what they had not delivered.
    pub fn sever_replication(&self) {
        self.links.sever.cancel();
    }

    /// Waits until the sentinels name a primary other than `old`; answers it.
    pub fn wait_promoted(&self, old: u16, timeout: Duration) -> u16 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(port) = self.primary_port().filter(|p| *p != old) {
                return port;
            }
            assert!(Instant::now() < deadline, "no replica was promoted");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RedisGroup {
    fn drop(&mut self) {
        for &port in self.ports.iter().chain(&self.sentinel_ports) {
            let _ = Command::new("redis-cli")
                .args(["-p", &port.to_string(), "shutdown", "nosave"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for mut watchdog in self.watchdogs.drain(..) {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

/// The replicas' links to the primary, through this process: forwarded both ways until
/// stalled, then only from the replicas (their acknowledgements), until severed.
struct LinkProxy {
    port: u16,
    stall: tokio_util::sync::CancellationToken,
    sever: tokio_util::sync::CancellationToken,
}

impl LinkProxy {
    fn start(primary: u16) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let (stall, sever) = (
            tokio_util::sync::CancellationToken::new(),
            tokio_util::sync::CancellationToken::new(),
        );
        let (stalled, severed) = (stall.clone(), sever.clone());
        tokio::spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = severed.cancelled() => return,
                };
                let Ok((replica, _)) = accepted else { continue };
                let Ok(upstream) = tokio::net::TcpStream::connect(("127.0.0.1", primary)).await
                else {
                    continue;
                };
                tokio::spawn(forward(replica, upstream, stalled.clone(), severed.clone()));
            }
        });
        Self { port, stall, sever }
    }
}

async fn forward(
    replica: tokio::net::TcpStream,
    primary: tokio::net::TcpStream,
    stall: tokio_util::sync::CancellationToken,
    sever: tokio_util::sync::CancellationToken,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_replica, mut to_replica) = replica.into_split();
    let (mut from_primary, mut to_primary) = primary.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut from_replica, &mut to_primary).await;
    };
    let down = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let read = tokio::select! {
                read = from_primary.read(&mut buffer) => read,
                () = stall.cancelled() => {
                    // Nothing more is read: it stays in the sockets until they are dropped.
                    std::future::pending::<()>().await;
                    return;
                }
            };
            match read {
                Ok(n) if n > 0 => {
                    if to_replica.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    };
    tokio::select! {
        () = async { tokio::join!(up, down); } => {}
        () = sever.cancelled() => {}
    }
}
