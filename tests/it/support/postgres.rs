//! A real PostgreSQL server for the tests, shared by the store crate's tests and the
//! application's (`tests/it`): `STAGECRAFT_TEST_POSTGRES_URL` when it is set (the URL of a
//! database the tests may create databases from), otherwise one `postgres` per test binary,
//! initialised in a temporary directory, on a free loopback port, run as the `postgres` user
//! when the tests run as root (PostgreSQL refuses root), and stopped by a watchdog shell when the
//! binary exits. `initdb` and `postgres` are looked for on `PATH`, then in
//! `/usr/lib/postgresql/<version>/bin`. Each deployment or case gets a fresh database, dropped
//! when its guard is.
//!
//! For failover tests: a [`PostgresPair`], a primary and its synchronous streaming standby, and
//! a [`FrontDoor`], the address clients use, which a failover points at the promoted standby.

#![allow(dead_code)]

use std::{
    any::Any,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// Certificates for the TLS tests (a file beside this one, so the store crate's tests, which
/// include this file, have it too).
#[path = "tls.rs"]
pub mod tls;
use tls::Certificates;

/// The server the cases create their databases on.
struct Server {
    /// A database to connect to for `CREATE DATABASE`.
    admin_url: String,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| match std::env::var("STAGECRAFT_TEST_POSTGRES_URL") {
        Ok(url) if !url.trim().is_empty() => Server { admin_url: url },
        _ => Server {
            admin_url: PostgresServer::start().admin_url,
        },
    })
}

/// A PostgreSQL program: on `PATH`, else of the newest version in `/usr/lib/postgresql`.
fn binary(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    let installed = || -> Option<PathBuf> {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .filter_map(|entry| {
                let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
                Some((version, entry.path().join("bin").join(name)))
            })
            .filter(|(_, candidate)| candidate.is_file())
            .collect();
        versions.sort();
        versions.pop().map(|(_, found)| found)
    };
    let found = on_path.or_else(installed).unwrap_or_else(|| {
        panic!(
            "{name} was found neither on PATH nor in /usr/lib/postgresql/*/bin: install PostgreSQL \
             (apt-get install postgresql) or set STAGECRAFT_TEST_POSTGRES_URL"
        )
    });
    // Through symlinks (/usr/local/bin/initdb → …/bin/initdb), so initdb finds its postgres.
    std::fs::canonicalize(&found).unwrap_or(found)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// Text as one word of a shell command.
fn word(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// A path as one word of a shell command.
fn quoted(path: &Path) -> String {
    word(&path.display().to_string())
}

/// A PostgreSQL program beside `initdb` (the same installation), else wherever it is found.
fn tool(name: &str) -> PathBuf {
    Some(binary("initdb").with_file_name(name))
        .filter(|beside| beside.is_file())
        .unwrap_or_else(|| binary(name))
}

/// `program`, run as the `postgres` user when the tests run as root.
fn as_postgres(program: &Path, root: bool) -> Command {
    if root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// Gives `path` to the `postgres` user (the tests run as root, which PostgreSQL refuses).
fn give_to_postgres(path: &Path) {
    let given = Command::new("chown")
        .arg("postgres:")
        .arg(path)
        .status()
        .expect("chown could not be run");
    assert!(
        given.success(),
        "{} could not be given to the postgres user (is there one?)",
        path.display()
    );
}

/// A new temporary directory, kept (a watchdog or a guard removes it), the `postgres` user's
/// when the tests run as root.
fn scratch_dir(prefix: &str, root: bool) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir")
        .keep();
    if root {
        give_to_postgres(&dir);
    }
    dir
}

/// The settings of the servers no test crashes: nothing waits for a disk.
const FAST: [&str; 4] = [
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=300",
];

fn settings(list: &[&str]) -> Vec<String> {
    list.iter().map(|setting| (*setting).to_owned()).collect()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// A new cluster in `dir/data` (owned by the `postgres` user when the tests run as root, since
/// PostgreSQL refuses to run as root).
fn init_cluster(initdb: &Path, dir: &Path, root: bool) -> std::path::PathBuf {
    let data = dir.join("data");
    let init = as_postgres(initdb, root)
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("initdb could not be run");
    assert!(
        init.status.success(),
        "initdb failed:\n{}{}",
        String::from_utf8_lossy(&init.stdout),
        String::from_utf8_lossy(&init.stderr)
    );
    data
}

/// A `postgres` of its own: a cluster in a temporary directory, on a free loopback port, that
/// a test may stop and start again (an outage); a watchdog shell stops it (and removes the
/// directory) once this test binary has exited.
pub struct PostgresServer {
    /// The `postgres` database of the server, to create databases from.
    pub admin_url: String,
    pub port: u16,
    postgres: PathBuf,
    /// Where its log and its socket are.
    dir: PathBuf,
    data: PathBuf,
    root: bool,
    /// Its `-c` settings (besides `listen_addresses`).
    settings: Vec<String>,
    /// What the watchdog removes once the test binary has exited (`dir`, or a directory
    /// holding it).
    scratch: PathBuf,
}

impl PostgresServer {
    pub fn start() -> Self {
        let root = is_root();
        let dir = scratch_dir("stagecraft-pg-", root);
        let data = init_cluster(&binary("initdb"), &dir, root);
        let server = Self::on(dir.clone(), data, dir, root, settings(&FAST));
        server.restart();
        server
    }

    /// A server that speaks only TLS on TCP (`hostnossl` connections are rejected), with a
    /// certificate for `127.0.0.1` and `localhost` signed by a CA of the test's own; and the
    /// files a client needs ([`Certificates`]).
    pub fn start_tls() -> (Self, Certificates) {
        let root = is_root();
        let dir = scratch_dir("stagecraft-pg-tls-", root);
        let data = init_cluster(&binary("initdb"), &dir, root);
        let certificates = Certificates::make(&dir);
        if root {
            // PostgreSQL reads a key only its own user may read.
            give_to_postgres(&certificates.server_key);
        }
        let hba = dir.join("pg_hba.conf");
        std::fs::write(
            &hba,
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 127.0.0.1/32 reject\n",
        )
        .expect("pg_hba.conf is written");
        let mut list = settings(&FAST);
        list.extend([
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", certificates.server_cert.display()),
            format!("ssl_key_file={}", certificates.server_key.display()),
            format!("hba_file={}", hba.display()),
        ]);
        let server = Self::on(dir.clone(), data, dir, root, list);
        server.restart();
        (server, certificates)
    }

    /// A server (not started) of the cluster in `data`, on a free port.
    fn on(
        dir: PathBuf,
        data: PathBuf,
        scratch: PathBuf,
        root: bool,
        settings: Vec<String>,
    ) -> Self {
        let port = free_port();
        Self {
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            port,
            postgres: tool("postgres"),
            dir,
            data,
            root,
            settings,
            scratch,
        }
    }

    /// Starts the server (again) on its data and port, and waits until it accepts connections.
    pub fn restart(&self) {
        let log = self.log_path();
        let settings: String = self
            .settings
            .iter()
            .map(|setting| format!(" -c {}", word(setting)))
            .collect();
        // Stopped (fast shutdown) once the test binary is gone; left with its log if it stopped
        // (or was stopped) while the tests ran.
        let script = format!(
            "{run_as}{postgres} -D {data} -p {port} -k {dir} -c listen_addresses=127.0.0.1{settings} \
             >>{log} 2>&1 & r=$!; \
             while kill -0 {pid} 2>/dev/null && kill -0 $r 2>/dev/null; do sleep 0.5; done; \
             kill -0 {pid} 2>/dev/null && exit 0; \
             kill -INT $(head -n 1 {data}/postmaster.pid 2>/dev/null) 2>/dev/null; \
             kill $r 2>/dev/null; wait $r; rm -rf {scratch}",
            run_as = if self.root {
                "runuser -u postgres -- "
            } else {
                ""
            },
            postgres = quoted(&self.postgres),
            data = quoted(&self.data),
            dir = quoted(&self.dir),
            scratch = quoted(&self.scratch),
            log = quoted(&log),
            port = self.port,
            pid = std::process::id(),
        );
        watch(&script, &self.dir, self.port, "postgres", || self.log());
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// What the server has logged (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The process id in `postmaster.pid` (the last postmaster's, should it have died).
    fn postmaster_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<i32>().ok())
    }

    fn accepts_connections(&self) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }

    /// Stops the server as an operator's restart does (a fast shutdown: open connections are
    /// closed, nothing committed is lost) and waits until its port is closed.
    pub fn stop(&self) {
        let pid = self.postmaster_pid().expect("the postmaster's pid");
        let _ = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.accepts_connections() {
            assert!(Instant::now() < deadline, "postgres did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A fast shutdown of the server if it still accepts connections (a killed one is left
    /// alone: its pid file names a dead process, whose number may be another's by now), waiting
    /// a while for it to exit. Never panics: guards call it.
    fn halt(&self) {
        if !self.accepts_connections() {
            return;
        }
        let Some(pid) = self.postmaster_pid() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // The postmaster removes its pid file last.
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.data.join("postmaster.pid").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The primary's settings: WAL for a standby, and no commit acknowledged before a standby has
/// flushed it (`*`: whichever standby is connected is the synchronous one). `fsync` stays off:
/// a SIGKILL loses nothing the kernel holds, and no test crashes the machine.
const PRIMARY: [&str; 7] = [
    "fsync=off",
    "max_connections=300",
    "wal_level=replica",
    "max_wal_senders=4",
    "max_replication_slots=4",
    "synchronous_commit=on",
    "synchronous_standby_names=*",
];

/// The standby's settings: read-only queries while it replays (as a managed standby), and, once
/// promoted, commits that wait for nobody (it has no standby of its own).
const STANDBY: [&str; 4] = [
    "fsync=off",
    "max_connections=300",
    "hot_standby=on",
    "synchronous_commit=on",
];

/// The name of the standby's replication slot on the primary.
const SLOT: &str = "stagecraft_standby";

/// A primary and its synchronous streaming standby (made by `pg_basebackup -R` from it), each a
/// [`PostgresServer`] of a directory they share. A failover test kills the primary
/// ([`Self::kill9_primary`]) and promotes the standby ([`Self::promote_standby`]): with
/// synchronous commit, the standby has every commit the primary acknowledged. Dropping the pair
/// stops what still runs and removes the directory.
pub struct PostgresPair {
    pub primary: PostgresServer,
    pub standby: PostgresServer,
    dir: PathBuf,
}

impl PostgresPair {
    /// Starts both and waits until the standby streams as the synchronous one. Blocks its
    /// thread while the clusters are made and started.
    pub async fn start() -> Self {
        let root = is_root();
        let dir = scratch_dir("stagecraft-pg-pair-", root);
        let node_dir = |name: &str| {
            let node = dir.join(name);
            std::fs::create_dir(&node).expect("a directory for a server of the pair");
            if root {
                give_to_postgres(&node);
            }
            node
        };
        let (primary_dir, standby_dir) = (node_dir("primary"), node_dir("standby"));
        let data = init_cluster(&binary("initdb"), &primary_dir, root);
        allow_replication(&data);
        let primary = PostgresServer::on(primary_dir, data, dir.clone(), root, settings(&PRIMARY));
        primary.restart();
        let data = base_backup(&primary, &standby_dir);
        let standby = PostgresServer::on(standby_dir, data, dir.clone(), root, settings(&STANDBY));
        // From here on, dropping the pair (a failed assertion) stops both and removes `dir`.
        let pair = Self {
            primary,
            standby,
            dir,
        };
        pair.standby.restart();
        pair.wait_synchronous().await;
        pair
    }

    /// Waits until the primary names a streaming standby its synchronous one: until then every
    /// commit on it waits.
    pub async fn wait_synchronous(&self) {
        let mut conn = admin(&self.primary.admin_url).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let synchronous: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_replication \
                 WHERE state = 'streaming' AND sync_state = 'sync'",
            )
            .fetch_one(&mut conn)
            .await
            .expect("pg_stat_replication is read on the primary");
            if synchronous > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the standby did not become the primary's synchronous standby:\n{}",
                self.standby.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = conn.close().await;
    }

    /// SIGKILLs the primary's postmaster and every process it started, as the crash of its
    /// machine would (nothing shuts down, no client is told), and waits until its port is
    /// closed.
    pub fn kill9_primary(&self) {
        let postmaster = self
            .primary
            .postmaster_pid()
            .expect("the primary's postmaster pid");
        // The postmaster first, so that it does not see its children die and react.
        let mut doomed = vec![postmaster];
        doomed.extend(children_of(postmaster));
        let _ = Command::new("kill")
            .arg("-9")
            .args(doomed.iter().map(ToString::to_string))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.primary.accepts_connections() {
            assert!(
                Instant::now() < deadline,
                "the primary still accepts connections after SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Promotes the standby (`pg_promote`, waiting for the end of recovery): it accepts writes
    /// once this returns.
    pub async fn promote_standby(&self) {
        let mut conn = admin(&self.standby.admin_url).await;
        let promoted: bool = sqlx::query_scalar("SELECT pg_promote(true, 60)")
            .fetch_one(&mut conn)
            .await
            .expect("pg_promote is called on the standby");
        assert!(
            promoted,
            "the standby was not promoted within 60 s:\n{}",
            self.standby.log()
        );
        let _ = conn.close().await;
    }
}

impl Drop for PostgresPair {
    fn drop(&mut self) {
        self.standby.halt();
        self.primary.halt();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Lets standbys connect for replication from loopback (initdb's `trust` lines already do;
/// this says so whatever initdb's template).
fn allow_replication(data: &Path) {
    use std::io::Write;
    let mut hba = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("pg_hba.conf"))
        .expect("the primary's pg_hba.conf opens");
    writeln!(hba, "host replication all 127.0.0.1/32 trust").expect("pg_hba.conf is written");
}

/// A copy of `primary`'s cluster in `dir/data` by `pg_basebackup`, made its streaming standby
/// (`-R`: `standby.signal` and `primary_conninfo`), on a replication slot of its own so that
/// the primary keeps the WAL it has not received.
fn base_backup(primary: &PostgresServer, dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let port = primary.port.to_string();
    let made = as_postgres(&tool("pg_basebackup"), primary.root)
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-D"])
        .arg(&data)
        .args(["-R", "-X", "stream", "-C", "-S", SLOT])
        .args(["--checkpoint=fast", "--no-sync"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("pg_basebackup could not be run");
    assert!(
        made.status.success(),
        "pg_basebackup failed:\n{}{}\nthe primary's log:\n{}",
        String::from_utf8_lossy(&made.stdout),
        String::from_utf8_lossy(&made.stderr),
        primary.log()
    );
    data
}

/// The processes whose parent is `parent` (from `/proc`).
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            let (_, after_comm) = stat.rsplit_once(')')?;
            let ppid: i32 = after_comm.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

/// The address clients use for "the database", as a managed PostgreSQL's virtual IP or DNS
/// name is: a TCP forwarder on a free loopback port to a server's port that a failover changes.
/// [`Self::point_at`] closes every connection open through it (as the old primary's going away
/// does) and sends new ones to the new port. Its tasks run on the runtime it was started on;
/// dropping it closes it and its connections.
pub struct FrontDoor {
    pub port: u16,
    target: tokio::sync::watch::Sender<u16>,
}

impl FrontDoor {
    /// Forwards to `target` (a port of 127.0.0.1) until pointed elsewhere.
    pub async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the front door binds a loopback port");
        let port = listener
            .local_addr()
            .expect("the front door's address")
            .port();
        let (sender, receiver) = tokio::sync::watch::channel(target);
        tokio::spawn(admit(listener, receiver));
        Self {
            port,
            target: sender,
        }
    }

    /// Closes every open connection and forwards new ones to `port`.
    pub fn point_at(&self, port: u16) {
        self.target.send_replace(port);
    }

    /// The port new connections are forwarded to.
    pub fn target(&self) -> u16 {
        *self.target.borrow()
    }

    /// The `postgres` database through the front door, to create databases from.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

/// Accepts connections until the front door is dropped; each is forwarded by a task of its own.
async fn admit(listener: tokio::net::TcpListener, mut target: tokio::sync::watch::Receiver<u16>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            changed = target.changed() => match changed {
                // Pointed elsewhere: the connections' tasks see it too.
                Ok(()) => continue,
                // The front door was dropped.
                Err(_) => return,
            },
        };
        if let Ok((client, _)) = accepted {
            tokio::spawn(carry(client, target.clone()));
        }
    }
}

/// Forwards one connection both ways to the current target until either side closes it or
/// the front door is pointed elsewhere (or dropped); then both sockets are closed.
async fn carry(mut client: tokio::net::TcpStream, mut target: tokio::sync::watch::Receiver<u16>) {
    let port = *target.borrow_and_update();
    let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        // Nobody listens there (a dead primary): the client sees its connection closed.
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = target.changed() => {}
    }
}

/// A connection to the admin database, once the server accepts them (it may still be starting).
async fn admin(url: &str) -> PgConnection {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match PgConnection::connect(url).await {
            Ok(conn) => return conn,
            Err(error) if Instant::now() >= deadline => {
                panic!("the test server at {url} does not answer: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The URL of database `name` on the server of `admin_url` (user, host and options kept).
pub fn database_url(admin_url: &str, name: &str) -> String {
    let (base, options) = match admin_url.split_once('?') {
        Some((base, options)) => (base, Some(options)),
        None => (admin_url, None),
    };
    let authority = base.find("://").map_or(0, |at| at + 3);
    let server = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    match options {
        Some(options) => format!("{server}/{name}?{options}"),
        None => format!("{server}/{name}"),
    }
}

/// Drops a case's database once the case is over (the server may be the environment's, and
/// a database copied from `template1` takes several megabytes).
struct DropDatabase {
    admin_url: String,
    name: String,
}

impl Drop for DropDatabase {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        // A runtime of its own: drop runs inside the case's runtime, which cannot block on it.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&url).await {
                    let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        })
        .join();
    }
}

/// A new, empty database: its URL, and what must live as long as the case.
/// A new empty database on the shared server: its URL, and a guard that drops it.
pub async fn fresh_database() -> (String, Box<dyn Any + Send>) {
    fresh_database_on(&server().admin_url).await
}

/// A new empty database on the server of `admin_url`: its URL, and a guard that drops it.
pub async fn fresh_database_on(admin_url: &str) -> (String, Box<dyn Any + Send>) {
    let name = format!("t{}", uuid_like());
    let mut conn = admin(admin_url).await;
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("the case's database is created");
    let _ = conn.close().await;
    let guard: Box<dyn Any + Send> = Box::new(DropDatabase {
        admin_url: admin_url.to_owned(),
        name: name.clone(),
    });
    (database_url(admin_url, &name), guard)
}

/// A name no other database of the server has.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}x{nanos:x}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A PgBouncer in transaction mode (`pool_mode = transaction`) in front of the shared server,
/// one per test binary: a server connection is a client's for one transaction only, and a few
/// server connections serve every client, so clients share them as behind a production pooler.
pub struct Bouncer {
    /// The pooler's port on 127.0.0.1.
    pub port: u16,
}

/// The shared server's bouncer, started on first use; stopped by a watchdog shell once this
/// test binary has exited.
pub fn bouncer() -> &'static Bouncer {
    static BOUNCER: OnceLock<Bouncer> = OnceLock::new();
    BOUNCER.get_or_init(|| Bouncer::start(&server().admin_url))
}

impl Bouncer {
    fn start(admin_url: &str) -> Self {
        let (host, port) = host_and_port(admin_url);
        let root = is_root();
        let dir = scratch_dir("stagecraft-pgbouncer-", root);
        let listen = free_port();
        let user = admin_url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
            .map_or("postgres", |(user, _)| {
                user.split(':').next().unwrap_or(user)
            });
        // Trust both ways: the test server trusts loopback, and clients name the user.
        let ini = format!(
            "[databases]\n* = host={host} port={port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
             listen_port = {listen}\nunix_socket_dir =\nauth_type = trust\nauth_file = {dir}/users.txt\n\
             pool_mode = transaction\ndefault_pool_size = 4\nmax_client_conn = 1000\n\
             ignore_startup_parameters = extra_float_digits\nlogfile = {dir}/pgbouncer.log\n",
            dir = dir.display(),
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).expect("pgbouncer.ini");
        std::fs::write(dir.join("users.txt"), format!("\"{user}\" \"\"\n")).expect("users.txt");
        let script = format!(
            "{pgbouncer} {run_as}{ini} & r=$!; \
             while kill -0 {pid} 2>/dev/null && kill -0 $r 2>/dev/null; do sleep 0.5; done; \
             kill -INT $r 2>/dev/null; wait $r; rm -rf {dir}",
            pgbouncer = quoted(&pgbouncer_binary()),
            // PgBouncer refuses to run as root; -u drops to the postgres user first.
            run_as = if root { "-u postgres " } else { "" },
            ini = quoted(&dir.join("pgbouncer.ini")),
            dir = quoted(&dir),
            pid = std::process::id(),
        );
        watch(&script, &dir, listen, "pgbouncer", || {
            std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default()
        });
        Self { port: listen }
    }

    /// `database_url` (a database of the shared server) as reached through the pooler.
    pub fn url_of(&self, database_url: &str) -> String {
        let (host, port) = host_and_port(database_url);
        database_url.replacen(
            &format!("{host}:{port}"),
            &format!("127.0.0.1:{}", self.port),
            1,
        )
    }
}

/// `pgbouncer`: on `PATH`, else where Debian installs it.
fn pgbouncer_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("pgbouncer"))
            .find(|candidate| candidate.is_file())
    });
    on_path
        .or_else(|| Some(PathBuf::from("/usr/sbin/pgbouncer")).filter(|p| p.is_file()))
        .unwrap_or_else(|| {
            panic!(
                "pgbouncer was found neither on PATH nor in /usr/sbin: apt-get install pgbouncer"
            )
        })
}

/// The host and port of a `postgres://user@host:port/db` URL.
fn host_and_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    match authority.rsplit_once(':') {
        Some((host, port)) => (host.to_owned(), port.parse().expect("a port")),
        None => (authority.to_owned(), 5432),
    }
}

/// Runs `script` (which starts a server, waits while this test binary lives, then stops it) in
/// `dir` (the server's own, which its user may enter), in a shell not waited for: the watchdog
/// outlives no test binary and stops the server itself. Returns once the server accepts
/// connections on `port`; fails with its `log` after 30 s.
fn watch(script: &str, dir: &Path, port: u16, what: &str, log: impl Fn() -> String) {
    let watchdog = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sh could not be started");
    std::mem::forget(watchdog);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start on port {port}:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
