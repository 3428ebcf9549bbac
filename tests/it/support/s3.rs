//! A real S3-compatible server for the tests: `s3s-fs` (installed by `make test-deps` into
//! `target/tools/bin`, or found on `PATH`), one per test binary, on a free loopback port, storing
//! objects in a temporary directory. A watchdog shell stops it when the test binary exits. Each
//! deployment gets a bucket of its own.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tempfile::TempDir;

pub const ACCESS_KEY: &str = "stagecraft-test";
pub const SECRET_KEY: &str = "stagecraft-test-secret-key";

pub struct S3Server {
    pub endpoint: String,
    root: TempDir,
    /// Ends with the test binary (it watches the binary's pid).
    _watchdog: std::process::Child,
}

fn binary() -> PathBuf {
    let installed = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/s3s-fs");
    if installed.is_file() {
        return installed;
    }
    PathBuf::from("s3s-fs")
}

pub fn shared_s3() -> &'static S3Server {
    static SERVER: std::sync::OnceLock<S3Server> = std::sync::OnceLock::new();
    SERVER.get_or_init(|| {
        let root = tempfile::tempdir().expect("tempdir");
        let port = super::free_port();
        let script = format!(
            "\"$0\" --host 127.0.0.1 --port {port} --access-key {ACCESS_KEY} --secret-key {SECRET_KEY} {root} \
             >{root}/../s3s-{port}.log 2>&1 & s=$!; \
             while kill -0 {test_pid} 2>/dev/null && kill -0 $s 2>/dev/null; do sleep 0.5; done; kill $s 2>/dev/null; wait $s",
            root = root.path().display(),
            test_pid = std::process::id(),
        );
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(binary())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not start on port {port}: run `make test-deps` (it installs it into target/tools/bin)"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            root,
            _watchdog: watchdog,
        }
    })
}

impl S3Server {
    /// A new empty bucket (a directory of the server's root, which is how `s3s-fs` keeps them).
    pub fn bucket(&self) -> String {
        let name = format!("b{}", uuid::Uuid::new_v4().simple());
        std::fs::create_dir(self.root.path().join(&name)).expect("bucket");
        name
    }

    /// The variables that point a deployment at `bucket` under `prefix`.
    pub fn env(&self, bucket: &str, prefix: &str) -> Vec<(&'static str, String)> {
        vec![
            ("ARTIFACT_STORE_URL", format!("s3://{bucket}/{prefix}")),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_owned()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
        ]
    }

    /// The same, as the library takes it.
    pub fn settings(&self, bucket: &str, prefix: &str) -> stagecraft::artifacts::ObjectSettings {
        stagecraft::artifacts::ObjectSettings {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".to_owned()),
            access_key_id: Some(ACCESS_KEY.to_owned()),
            secret_access_key: Some(SECRET_KEY.to_owned().into()),
            session_token: None,
            allow_http: true,
        }
    }
}
