//! The core's store conformance suite, on one `redis-server` for the whole test binary (on a
//! free loopback port, stopped when the binary exits), with a key prefix of its own per case.

use std::{
    process::{Command, Stdio},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use stagecraft_core::testing::Fixture;
use stagecraft_store_redis::RedisStore;

/// The server's URL. A watchdog shell stops the server when this test binary exits.
fn server() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let script = format!(
            "redis-server --port {port} --bind 127.0.0.1 --dir {dir} --save '' --appendonly no \
             --maxmemory-policy noeviction --daemonize no --logfile {dir}/redis.log & r=$!; \
             while kill -0 {pid} 2>/dev/null && kill -0 $r 2>/dev/null; do sleep 0.5; done; \
             kill $r 2>/dev/null; wait $r; rm -rf {dir}",
            dir = dir.display(),
            pid = std::process::id(),
        );
        // Not waited for: the watchdog outlives no test binary, and stops the server itself.
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server could not be started: install it (apt-get install redis-server)");
        std::mem::forget(watchdog);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        format!("redis://127.0.0.1:{port}/0")
    })
}

async fn open() -> Fixture {
    let prefix = format!("conformance-{}", uuid_like());
    let store = RedisStore::open(server(), &prefix, Duration::from_secs(7 * 86_400))
        .await
        .expect("the store opens");
    Fixture {
        store: Arc::new(store),
        guard: Box::new(()),
    }
}

/// A prefix no other case of this binary uses.
fn uuid_like() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    )
}

stagecraft_core::store_conformance!(open);
