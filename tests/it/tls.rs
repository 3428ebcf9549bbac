//! Stores that require TLS, as managed offerings do: a PostgreSQL that rejects connections
//! without it and a Redis that speaks nothing else, each with a certificate signed by a CA the
//! test makes. The processes check the certificate and run runs; trusting another CA stops
//! them at once, saying why.

use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::Connection;

use crate::{
    postgres::assert_all_running,
    support::{
        Backend, RedisServer, TestApp,
        postgres::{PostgresServer, fresh_database_on},
        tls::Certificates,
    },
};

/// PostgreSQL over TLS, as managed offerings require it: a server that rejects connections
/// without TLS. Processes whose URL checks the server's certificate against the CA that signed
/// it and its name (`sslmode=verify-full`) run a run to completion, every connection
/// encrypted. A URL that trusts another CA, or asks for no TLS, stops `stagecraft migrate` at
/// once (not after the minute a server that is still starting is waited for), saying why and
/// never the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_processes_reach_a_database_that_requires_tls_and_check_its_certificate() {
    let (server, certificates) = PostgresServer::start_tls();
    let (url, _database) = fresh_database_on(&server.admin_url).await;
    let secret = "tls-secret-0123456789";
    let app = TestApp::new(Backend::Postgres);
    for (query, says) in [
        (
            format!(
                "sslmode=verify-full&sslrootcert={}",
                certificates.other_ca.display()
            ),
            "certificate",
        ),
        ("sslmode=disable".to_owned(), "no encryption"),
    ] {
        let started = Instant::now();
        let refused = tokio::task::block_in_place(|| {
            app.command(&["migrate"])
                .env("DATABASE_URL", format!("{url}?{query}&password={secret}"))
                .output()
                .expect("migrate runs")
        });
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{query}: {said}");
        assert!(said.contains(says), "{query}: {said}");
        assert!(!said.contains(secret), "{query}: {said}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{query}: refused only after {:?}",
            started.elapsed()
        );
    }

    let verified = format!(
        "{url}?sslmode=verify-full&sslrootcert={}",
        certificates.ca.display()
    );
    let mut app = app.with_env("DATABASE_URL", &verified).with_api();
    app.start_worker();
    let id = app.submit_demo(json!({"steps": 2})).await;
    app.wait_status(&id, "completed", Duration::from_secs(30))
        .await;
    let database = url.rsplit('/').next().expect("a database name").to_owned();
    let mut admin = sqlx::PgConnection::connect(&server.admin_url)
        .await
        .expect("the admin connection");
    let (encrypted, plain): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
         FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = $1",
    )
    .bind(&database)
    .fetch_one(&mut admin)
    .await
    .expect("the connections are counted");
    assert!(
        encrypted >= 2,
        "{encrypted} encrypted connections (API and worker)"
    );
    assert_eq!(plain, 0);
    assert_all_running(&mut app, "after the run");
}

/// A Redis that speaks only TLS (`rediss://`), its certificate signed by a CA of the test's own,
/// which the processes trust through `SSL_CERT_FILE`: the API and a worker run a run to
/// completion. Trusting another CA instead stops `stagecraft migrate` at once (not after the
/// minute a server that is still starting is waited for), saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_processes_reach_a_redis_that_requires_tls_and_check_its_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certificates = Certificates::make(dir.path());
    let server = RedisServer::start_tls(dir.path(), &certificates);
    let app = TestApp::new(Backend::Redis).with_env("REDIS_URL", &server.url);
    let started = Instant::now();
    let refused = tokio::task::block_in_place(|| {
        app.command(&["migrate"])
            .env("SSL_CERT_FILE", &certificates.other_ca)
            .output()
            .expect("migrate runs")
    });
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(said.contains("certificate"), "{said}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refused only after {:?}",
        started.elapsed()
    );

    let ca = certificates.ca.display().to_string();
    let mut app = app.with_env("SSL_CERT_FILE", &ca).with_api();
    app.start_worker();
    let (status, health) = app.get("/health").await;
    assert_eq!((status, health["backend"].as_str()), (200, Some("redis")));
    let id = app.submit_demo(json!({"steps": 2})).await;
    app.wait_status(&id, "completed", Duration::from_secs(30))
        .await;
}
