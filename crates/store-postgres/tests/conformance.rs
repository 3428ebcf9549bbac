//! The core's store conformance suite, and what only this store does (concurrent claimers and
//! submissions across processes, wake-ups by notification), each case in a fresh database.
//!
//! The server is `STAGECRAFT_TEST_POSTGRES_URL` when it is set (the URL of a database the
//! tests may create databases from). Each case's database is dropped after it. Otherwise one
//! `postgres` serves the whole test binary: initialised in a temporary directory, on a free
//! loopback port, run as the `postgres` user when the tests run as root (PostgreSQL refuses
//! root), and stopped by a watchdog shell when the binary exits. `initdb` and `postgres` are
//! looked for on `PATH`, then in `/usr/lib/postgresql/<version>/bin`.

use std::{
    any::Any,
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use stagecraft_core::{
    clock::{ManualClock, SystemClock},
    ids::{RunId, WorkerId},
    store::{NewRun, RunError, RunStore, SharedStore, StageOutcome, StoreError},
    testing::{Fixture, workflow_run},
};
use stagecraft_store_postgres::{PoolMode, PostgresOptions, PostgresStore};

#[path = "../../../tests/it/support/postgres.rs"]
mod server;

use server::{database_url, free_port, fresh_database};

async fn open() -> Fixture {
    let (url, guard) = fresh_database().await;
    let store = PostgresStore::open(&url, Arc::new(SystemClock))
        .await
        .expect("the store opens");
    Fixture {
        store: Arc::new(store),
        guard,
    }
}

stagecraft_core::store_conformance!(open);

/// A store on `url` (a database of the shared server) through the shared PgBouncer in
/// transaction mode, with `direct` as its direct URL.
async fn pooled(url: &str, direct: Option<&str>) -> SharedStore {
    let options = PostgresOptions {
        url: server::bouncer().url_of(url),
        mode: PoolMode::Transaction,
        direct_url: direct.map(str::to_owned),
    };
    let store = PostgresStore::connect(&options, Arc::new(SystemClock))
        .await
        .expect("the store opens through the pooler");
    Arc::new(store)
}

/// The whole suite again through PgBouncer in transaction mode, migrated and woken up
/// through the direct URL.
mod through_a_transaction_pooler {
    use super::*;

    async fn open() -> Fixture {
        let (url, guard) = fresh_database().await;
        Fixture {
            store: pooled(&url, Some(&url)).await,
            guard,
        }
    }

    stagecraft_core::store_conformance!(open);
}

/// Without a direct URL a store behind a transaction-mode pooler cannot migrate: it refuses
/// to start on a schema that lacks a migration, naming the setting that fixes it; once the
/// schema is migrated, it works, and its idle workers poll (no `LISTEN` through the pooler).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_direct_url_a_pooled_store_needs_a_migrated_schema_and_polls() {
    let (url, _guard) = fresh_database().await;
    let options = PostgresOptions {
        url: server::bouncer().url_of(&url),
        mode: PoolMode::Transaction,
        direct_url: None,
    };
    match PostgresStore::connect(&options, Arc::new(SystemClock)).await {
        Err(StoreError::Migrate(message)) => {
            assert!(message.contains("DATABASE_DIRECT_URL"), "{message}");
        }
        other => panic!("expected a migration error, got {:?}", other.map(|_| ())),
    }
    let direct = PostgresStore::open(&url, Arc::new(SystemClock))
        .await
        .expect("migrated directly");
    let store = pooled(&url, None).await;
    let queues = vec!["polled".to_owned()];
    // Nothing due: the wait is the whole poll.
    let started = Instant::now();
    store
        .wait_for_work(&queues, Duration::from_millis(300))
        .await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    let id = direct
        .insert_run(noop_run("polled"))
        .await
        .expect("insert")
        .0
        .id;
    // Due: the wait returns at once, and the run is claimed through the pooler.
    let started = Instant::now();
    store.wait_for_work(&queues, Duration::from_secs(30)).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let worker = WorkerId::from("pooled".to_owned());
    let claimed = store.claim(&queues, &worker, TTL, 4).await.expect("claim");
    assert_eq!(
        claimed.iter().map(|c| c.run.id).collect::<Vec<_>>(),
        vec![id]
    );
    // A migration applied with other contents, or one this version does not know (a newer
    // schema), is refused as sqlx's migrator refuses it.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("a direct connection");
    for (tamper, says) in [
        (
            "UPDATE _sqlx_migrations SET checksum = '\\x00' \
             WHERE version = (SELECT MIN(version) FROM _sqlx_migrations)",
            "other contents",
        ),
        (
            "UPDATE _sqlx_migrations SET version = 99999999999999 \
             WHERE version = (SELECT MAX(version) FROM _sqlx_migrations)",
            "does not know",
        ),
    ] {
        sqlx::raw_sql(tamper)
            .execute(&mut conn)
            .await
            .expect("tampered");
        match PostgresStore::connect(&options, Arc::new(SystemClock)).await {
            Err(StoreError::Migrate(message)) => assert!(message.contains(says), "{message}"),
            other => panic!("expected a migration error, got {:?}", other.map(|_| ())),
        }
    }
}

const TTL: Duration = Duration::from_secs(30);

/// Two stores on one fresh database, as two processes would have.
async fn two_stores() -> (SharedStore, SharedStore, Box<dyn Any + Send>) {
    let (url, guard) = fresh_database().await;
    let one = PostgresStore::open(&url, Arc::new(SystemClock))
        .await
        .expect("the store opens");
    let other = PostgresStore::open(&url, Arc::new(SystemClock))
        .await
        .expect("the store opens again");
    (Arc::new(one), Arc::new(other), guard)
}

fn noop_run(queue: &str) -> NewRun {
    workflow_run("noop", queue, &["only"])
}

#[test]
fn a_case_database_keeps_the_server_user_and_options() {
    assert_eq!(
        database_url("postgres://u:p@h:5432/admin?sslmode=disable", "t1"),
        "postgres://u:p@h:5432/t1?sslmode=disable"
    );
    assert_eq!(database_url("postgres://h", "t1"), "postgres://h/t1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_in_two_processes_take_each_run_once() {
    let (one, other, _guard) = two_stores().await;
    claimers_take_each_run_once(one, other).await;
}

/// Behind PgBouncer in transaction mode (four server connections for every client), where
/// named statements of different clients would collide and a statement's parse and bind could
/// reach different server connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_through_a_transaction_pooler_take_each_run_once() {
    let (url, guard) = fresh_database().await;
    let one = pooled(&url, Some(&url)).await;
    let other = pooled(&url, None).await;
    claimers_take_each_run_once(one, other).await;
    drop(guard);
}

/// Eight claimers, half on each store, take 40 runs: each exactly once.
async fn claimers_take_each_run_once(one: SharedStore, other: SharedStore) {
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(one.insert_run(noop_run("race")).await.expect("insert").0.id);
    }
    let claimers: Vec<_> = (0..8)
        .map(|i| {
            let store = if i % 2 == 0 {
                one.clone()
            } else {
                other.clone()
            };
            tokio::spawn(async move {
                let queues = ["race".to_owned()];
                let worker = WorkerId::from(format!("w-{i}"));
                let mut mine = Vec::new();
                loop {
                    let claimed = store.claim(&queues, &worker, TTL, 3).await.expect("claim");
                    if claimed.is_empty() {
                        return mine;
                    }
                    mine.extend(claimed.into_iter().map(|c| (c.run.id, c.lease.fence)));
                }
            })
        })
        .collect();
    let mut taken = Vec::new();
    for claimer in claimers {
        taken.extend(claimer.await.expect("claimer"));
    }
    let mut claimed: Vec<RunId> = taken.iter().map(|(id, _)| *id).collect();
    claimed.sort();
    ids.sort();
    assert_eq!(claimed, ids, "every run claimed, none twice");
    assert!(taken.iter().all(|(_, fence)| fence.0 == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_with_one_idempotency_key_make_one_run() {
    let (one, other, _guard) = two_stores().await;
    let submissions: Vec<_> = (0..8)
        .map(|i| {
            let store = if i % 2 == 0 {
                one.clone()
            } else {
                other.clone()
            };
            let run = NewRun {
                idempotency_key: Some("runs:race".into()),
                request_hash: Some("h".into()),
                ..noop_run("keys")
            };
            tokio::spawn(async move { store.insert_run(run).await })
        })
        .collect();
    let mut created = 0;
    let mut ids = BTreeSet::new();
    for submission in submissions {
        let (run, new) = submission.await.expect("task").expect("insert");
        created += usize::from(new);
        ids.insert(run.id);
    }
    assert_eq!((created, ids.len()), (1, 1), "one run, answered to all");
    let conflict = one
        .insert_run(NewRun {
            idempotency_key: Some("runs:race".into()),
            request_hash: Some("other".into()),
            ..noop_run("keys")
        })
        .await;
    assert!(
        matches!(conflict, Err(StoreError::IdempotencyConflict(_))),
        "{conflict:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_queued_by_another_process_wakes_an_idle_worker() {
    let (waiting, submitting, _guard) = two_stores().await;
    let queues = vec!["wake".to_owned()];
    // The first wait sets up LISTEN; nothing is due, so it waits out its poll.
    waiting.wait_for_work(&queues, Duration::from_secs(1)).await;
    let wait = {
        let (waiting, queues) = (waiting.clone(), queues.clone());
        tokio::spawn(async move {
            waiting
                .wait_for_work(&queues, Duration::from_secs(60))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!wait.is_finished(), "nothing is due yet");
    submitting
        .insert_run(noop_run("elsewhere"))
        .await
        .expect("insert");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !wait.is_finished(),
        "a run of another queue does not wake it"
    );
    submitting
        .insert_run(noop_run("wake"))
        .await
        .expect("insert");
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .expect("woken by the notification, long before the poll ends")
        .expect("the wait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_waits_only_until_a_retry_is_due() {
    let fixture = open().await;
    let store = fixture.store.clone();
    let queues = vec!["retry".to_owned()];
    let worker = WorkerId::from("w".to_owned());
    store.insert_run(noop_run("retry")).await.expect("insert");
    let claimed = store.claim(&queues, &worker, TTL, 1).await.expect("claim");
    let lease = claimed[0].lease.clone();
    store.start_stage(&lease, 0).await.expect("start");
    let retry = StageOutcome::Retry {
        error: RunError {
            code: "flaky".into(),
            message: "flaky happened".into(),
        },
        delay: Duration::from_millis(700),
    };
    store.end_attempt(&lease, 0, retry).await.expect("retry");
    let started = Instant::now();
    store.wait_for_work(&queues, Duration::from_secs(60)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "waited {waited:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let again = store.claim(&queues, &worker, TTL, 1).await.expect("claim");
        if !again.is_empty() {
            assert!(again[0].lease.fence > lease.fence);
            break;
        }
        assert!(Instant::now() < deadline, "the retry is due after the wait");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expire_by_the_stores_clock_and_their_holders_are_fenced_out() {
    let (url, _guard) = fresh_database().await;
    let clock = ManualClock::starting_now();
    let store = PostgresStore::open(&url, Arc::new(clock.clone()))
        .await
        .expect("open");
    store.insert_run(noop_run("clock")).await.expect("insert");
    let queues = ["clock".to_owned()];
    let ttl = Duration::from_secs(10);
    let first = store
        .claim(&queues, &WorkerId::from("a".to_owned()), ttl, 1)
        .await
        .expect("claim");
    let lease = first[0].lease.clone();
    store.start_stage(&lease, 0).await.expect("start");
    // Within the lease nothing is swept, and a heartbeat extends it.
    clock.advance(Duration::from_secs(9));
    assert!(
        store
            .sweep_expired_leases()
            .await
            .expect("sweep")
            .is_empty()
    );
    store.heartbeat(&lease, ttl).await.expect("heartbeat");
    clock.advance(Duration::from_secs(9));
    assert!(
        store
            .sweep_expired_leases()
            .await
            .expect("sweep")
            .is_empty()
    );
    // Past it, the run is re-queued and taken by another worker with a larger fence.
    clock.advance(Duration::from_secs(2));
    assert_eq!(
        store.sweep_expired_leases().await.expect("sweep"),
        vec![lease.run_id]
    );
    let second = store
        .claim(&queues, &WorkerId::from("b".to_owned()), ttl, 1)
        .await
        .expect("claim");
    assert!(second[0].lease.fence > lease.fence);
    assert!(second[0].recovered);
    let refused = store.heartbeat(&lease, ttl).await;
    assert!(
        matches!(refused, Err(StoreError::FenceRejected { .. })),
        "{refused:?}"
    );
    let refused = store.end_attempt(&lease, 0, StageOutcome::Abandoned).await;
    assert!(
        matches!(refused, Err(StoreError::FenceRejected { .. })),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_connect_is_unavailable() {
    // A port nothing listens on.
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    match PostgresStore::open(&url, Arc::new(SystemClock)).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {:?}", other.map(|_| ())),
    }
}

/// A claimed run whose row cannot be read (here an unknown kind) costs the others in its batch
/// nothing: they are answered, and it is left to its lease's expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_answers_the_runs_it_can_read_beside_a_corrupt_one() {
    let (url, _guard) = fresh_database().await;
    let store = PostgresStore::open(&url, Arc::new(SystemClock))
        .await
        .expect("the store opens");
    let good = store
        .insert_run(noop_run("mixed"))
        .await
        .expect("insert")
        .0
        .id;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("a direct connection");
    sqlx::raw_sql(
        "INSERT INTO runs (id, kind, name, queue, inputs, status, provider_mode, available_at, \
         created_at, updated_at) VALUES ('not-a-run-id', 'bogus', 'noop', 'mixed', '{}', 'queued', \
         'mock', 0, 0, 0)",
    )
    .execute(&mut conn)
    .await
    .expect("a corrupt run");
    let worker = WorkerId::from("w".to_owned());
    let claimed = store
        .claim(&["mixed".to_owned()], &worker, TTL, 4)
        .await
        .expect("the claim is answered");
    assert_eq!(
        claimed.iter().map(|c| c.run.id).collect::<Vec<_>>(),
        vec![good]
    );
}
