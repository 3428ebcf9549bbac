//! A real PostgreSQL server for the tests, shared by the store crate's tests and the
//! application's (`tests/it`): `STAGECRAFT_TEST_POSTGRES_URL` when it is set (the URL of a
//! database the tests may create databases from), otherwise one `postgres` per test binary,
//! initialised in a temporary directory, on a free loopback port, run as the `postgres` user
//! when the tests run as root (PostgreSQL refuses root), and stopped by a watchdog shell when the
//! binary exits. `initdb` and `postgres` are looked for on `PATH`, then in
//! `/usr/lib/postgresql/<version>/bin`. Each deployment or case gets a fresh database, dropped
//! when its guard is.

#![allow(dead_code)]

use std::{
    any::Any,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use sqlx::{AssertSqlSafe, Connection, PgConnection};

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

/// A path as one word of a shell command.
fn quoted(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
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
    let mut init = if root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(initdb);
        command
    } else {
        Command::new(initdb)
    };
    let init = init
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
    dir: PathBuf,
    data: PathBuf,
    root: bool,
}

impl PostgresServer {
    pub fn start() -> Self {
        let initdb = binary("initdb");
        let postgres = Some(initdb.with_file_name("postgres"))
            .filter(|beside| beside.is_file())
            .unwrap_or_else(|| binary("postgres"));
        let root = is_root();
        let dir = tempfile::Builder::new()
            .prefix("stagecraft-pg-")
            .tempdir()
            .expect("tempdir")
            .keep();
        if root {
            let given = Command::new("chown")
                .arg("postgres:")
                .arg(&dir)
                .status()
                .expect("chown could not be run");
            assert!(
                given.success(),
                "the temporary directory could not be given to the postgres user (is there one?)"
            );
        }
        let data = init_cluster(&initdb, &dir, root);
        let port = free_port();
        let server = Self {
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            port,
            postgres,
            dir,
            data,
            root,
        };
        server.restart();
        server
    }

    /// Starts the server (again) on its data and port, and waits until it accepts connections.
    pub fn restart(&self) {
        let log = self.dir.join("postgres.log");
        // Stopped (fast shutdown) once the test binary is gone; left with its log if it stopped
        // (or was stopped) while the tests ran.
        let script = format!(
            "{run_as}{postgres} -D {data} -p {port} -k {dir} -c listen_addresses=127.0.0.1 \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 \
             >>{log} 2>&1 & r=$!; \
             while kill -0 {pid} 2>/dev/null && kill -0 $r 2>/dev/null; do sleep 0.5; done; \
             kill -0 {pid} 2>/dev/null && exit 0; \
             kill -INT $(head -n 1 {data}/postmaster.pid 2>/dev/null) 2>/dev/null; \
             kill $r 2>/dev/null; wait $r; rm -rf {dir}",
            run_as = if self.root {
                "runuser -u postgres -- "
            } else {
                ""
            },
            postgres = quoted(&self.postgres),
            data = quoted(&self.data),
            dir = quoted(&self.dir),
            log = quoted(&log),
            port = self.port,
            pid = std::process::id(),
        );
        // Not waited for: the watchdog outlives no test binary, and stops the server itself.
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh could not be started");
        std::mem::forget(watchdog);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "postgres did not start on port {}:\n{}",
                self.port,
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server as an operator's restart does (a fast shutdown: open connections are
    /// closed, nothing committed is lost) and waits until its port is closed.
    pub fn stop(&self) {
        let pid = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<i32>().ok())
            .expect("the postmaster's pid");
        let _ = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "postgres did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
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
