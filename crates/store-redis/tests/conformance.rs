//! The core's store conformance suite, and what only this store does, on one `redis-server` for
//! the whole test binary (on a free loopback port, stopped when the binary exits), with a key
//! prefix of its own per case.

use std::{
    process::{Command, Stdio},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use stagecraft_core::{
    ids::{RunId, WorkerId},
    money::Usd,
    store::{NewRun, RunStatus, RunStore, SharedStore, StageOutcome, StageStatus},
    testing::{Fixture, workflow_run},
};
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

/// A one-stage run on `queue` (each part of a test its own, so earlier runs stay out of its claims).
fn noop_run(queue: &str) -> NewRun {
    workflow_run("noop", queue, &["noop"])
}

// The claim starts a run's first open stage itself (one round trip less per run), unseen by the
// engine: the cases below pin down what that must never change.

const TTL: Duration = Duration::from_secs(30);

fn worker() -> WorkerId {
    WorkerId::from("w-1".to_owned())
}

fn kinds(events: &[stagecraft_core::store::RunEvent]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

/// A fresh store with one run inserted on its own queue: the store, the run and its queue.
async fn one_run(budget: Option<Usd>) -> (SharedStore, RunId, [String; 1]) {
    let store: SharedStore = open().await.store;
    let queues = ["only".to_owned()];
    let run = NewRun {
        budget_usd: budget,
        ..noop_run(&queues[0])
    };
    let id = store.insert_run(run).await.expect("insert").0.id;
    (store, id, queues)
}

/// Starting the stage the claim started answers its attempt without another write, and only to
/// the lease holder; a second start is a new attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_starts_the_first_open_stage_exactly_once() {
    let (store, id, queues) = one_run(None).await;
    let claimed = store
        .claim(&queues, &worker(), TTL, 4)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    assert!(!claimed[0].recovered);
    assert_eq!(claimed[0].run.stages[0].status, StageStatus::Running);
    assert_eq!(claimed[0].run.stages[0].attempts, 1);
    assert_eq!(claimed[0].run.current_stage.as_deref(), Some("noop"));
    let lease = claimed[0].lease.clone();
    // A stranger's lease (same run and fence, another worker) is not answered from memory.
    let stranger = stagecraft_core::store::Lease {
        worker: WorkerId::from("w-2".to_owned()),
        ..lease.clone()
    };
    assert!(store.start_stage(&stranger, 0).await.is_err());
    assert_eq!(store.start_stage(&lease, 0).await.expect("start"), 1);
    let events = store.events_after(id, 0, 100).await.expect("events");
    assert_eq!(
        kinds(&events),
        ["run_queued", "run_started", "stage_started"]
    );
    assert_eq!(store.start_stage(&lease, 0).await.expect("start"), 2);
}

/// Given back unrun, the claim's attempt is taken back; abandoned after it ran, it counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_given_back_unrun_has_its_attempt_taken_back() {
    let (store, id, queues) = one_run(None).await;
    let claimed = store
        .claim(&queues, &worker(), TTL, 4)
        .await
        .expect("claim");
    let give_back = StageOutcome::Abandoned;
    store
        .end_attempt(&claimed[0].lease, 0, give_back)
        .await
        .expect("give back");
    let run = store.get_run(id).await.expect("get").expect("run");
    assert_eq!(run.status, RunStatus::Queued);
    assert_eq!(run.stages[0].status, StageStatus::Pending);
    assert_eq!(run.stages[0].attempts, 0);
    assert_eq!(run.stages[0].started_at, None);
    let claimed = store
        .claim(&queues, &worker(), TTL, 4)
        .await
        .expect("claim");
    assert_eq!(claimed[0].run.stages[0].attempts, 1);
    assert!(claimed[0].lease.fence.0 > 1);
    let lease = &claimed[0].lease;
    assert_eq!(store.start_stage(lease, 0).await.expect("start"), 1);
    let abandon = StageOutcome::Abandoned;
    store.end_attempt(lease, 0, abandon).await.expect("abandon");
    let run = store.get_run(id).await.expect("get").expect("run");
    assert_eq!(run.stages[0].attempts, 1);
}

/// A run whose lease expired mid-stage is recovered, and its next attempt counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_claim_is_recovered_with_its_next_attempt() {
    let (store, id, queues) = one_run(None).await;
    let short = Duration::from_millis(50);
    store
        .claim(&queues, &worker(), short, 4)
        .await
        .expect("claim");
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(store.sweep_expired_leases().await.expect("sweep"), [id]);
    let claimed = store
        .claim(&queues, &worker(), TTL, 4)
        .await
        .expect("claim");
    assert!(claimed[0].recovered);
    let lease = &claimed[0].lease;
    assert_eq!(store.start_stage(lease, 0).await.expect("start"), 2);
}

/// A run with a budget is checked by the worker before its stage starts: no start in the claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_with_a_budget_is_claimed_without_a_start() {
    let budget = Some(Usd::from_micros(1_000_000));
    let (store, id, queues) = one_run(budget).await;
    let claimed = store
        .claim(&queues, &worker(), TTL, 4)
        .await
        .expect("claim");
    assert_eq!(claimed[0].run.stages[0].status, StageStatus::Pending);
    assert_eq!(claimed[0].run.budget_usd, budget);
    let lease = &claimed[0].lease;
    assert_eq!(store.start_stage(lease, 0).await.expect("start"), 1);
    let events = store.events_after(id, 0, 100).await.expect("events");
    assert_eq!(
        kinds(&events),
        ["run_queued", "run_started", "stage_started"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_stored_before_the_listing_indexes_are_indexed_when_the_store_opens() {
    let prefix = format!("backfill-{}", uuid_like());
    let open = || RedisStore::open(server(), &prefix, Duration::from_secs(86_400));
    let store = open().await.expect("open");
    let mut ids = Vec::new();
    for name in ["alpha", "beta", "alpha"] {
        let (run, _) = store
            .insert_run(workflow_run(name, "q", &["only"]))
            .await
            .expect("insert");
        ids.push(run.id);
    }
    // As a deployment from before the indexes: without them and without the marker.
    let client = redis::Client::open(server()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}by:*"))
        .query_async(&mut conn)
        .await
        .expect("keys");
    assert!(
        keys.len() >= 4,
        "kind, two names, queue and the marker: {keys:?}"
    );
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .expect("del");
    drop(store);
    let store = open().await.expect("reopen");
    let page = store
        .list_runs(&stagecraft_core::store::RunFilter {
            name: Some("alpha".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(
        page.runs.iter().map(|r| r.id).collect::<Vec<_>>(),
        [ids[2], ids[0]]
    );
    assert_eq!(page.total, 2);
}
