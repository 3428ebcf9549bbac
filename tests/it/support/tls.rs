//! Certificates for the TLS tests, made with `openssl`: a CA of the test's own, a server
//! certificate it signed for `127.0.0.1` and `localhost`, and a second CA that signed nothing.
//! Shared by the application's tests and the PostgreSQL store's (through `postgres.rs`).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The files of a TLS test: a CA (`ca`), the server's certificate it signed and its key, and a
/// second CA that signed nothing (`other_ca`: a client that trusts only it refuses the server).
pub struct Certificates {
    pub ca: PathBuf,
    pub other_ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Certificates {
    /// Makes them in `dir` (P-256 keys, valid for two days); the server's key is readable by
    /// its owner alone.
    pub fn make(dir: &Path) -> Self {
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdin(Stdio::null())
                .output()
                .expect("openssl could not be run (apt-get install openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let subject = format!("/CN=stagecraft test {ca}");
            let (key_file, cert_file) = (format!("{ca}.key"), format!("{ca}.pem"));
            let args = ["-keyout", &key_file, "-out", &cert_file, "-days", "2"];
            openssl(&[&["req", "-x509"], &key[..], &args, &["-subj", &subject]].concat());
        }
        let request = [
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ];
        openssl(&[&["req", "-new"], &key[..], &request].concat());
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("the extensions are written");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        let server_key = dir.join("server.key");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&server_key, std::fs::Permissions::from_mode(0o600))
            .expect("the key is made private");
        Self {
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other-ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key,
        }
    }
}
