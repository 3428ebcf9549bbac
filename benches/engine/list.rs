//! The console's run list with many stored runs (BENCH_LIST_RUNS, default 1,000,000) on the
//! three stores: the time `GET /runs` takes on loopback (the API's answer of a 50-run page, JSON
//! included) for pages filtered by status, kind, name and time range, alone and with a status,
//! and the input search; and a run's page (its status document and its event stream).
//! `BENCH_ONLY=list`; BENCH_LIST_STORES (default `sqlite,redis,postgres`) picks the stores.
//!
//! The runs are stored through the store itself on SQLite and Redis: names and kinds in a fixed
//! mix, one in twenty cancelled and one in a hundred failed (claimed and failed with an error
//! code), created over the minutes the load takes, so a time range is a slice of them. On
//! PostgreSQL the same runs (same mix, same fates, the same rows, stages and events the store
//! writes for them, the events' data from the store's kernel) are written straight into its
//! tables in batches, one run per millisecond, then vacuumed and analysed as autovacuum would.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use futures::{StreamExt, stream};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use stagecraft::{
    config::ProviderMode,
    ids::{FenceToken, RunId, WorkerId},
    store::{
        Actor, NewRun, RunError, RunKind, RunStatus, RunStore, StageStatus, kernel, postgres,
        to_datetime,
    },
};

use super::{Backend, Deployment, RedisServer, env_number, percentile, print_table};

/// Names and kinds of the stored runs, with their share (out of 20).
const MIX: [(&str, RunKind, usize); 5] = [
    ("full_production", RunKind::Workflow, 8),
    ("demo", RunKind::Workflow, 5),
    ("pilot_only", RunKind::Workflow, 3),
    ("producer", RunKind::Agent, 3),
    ("agent_workflow_plan", RunKind::WorkOrder, 1),
];

fn kind_and_name(i: usize) -> (RunKind, &'static str) {
    let mut slot = i % 20;
    for (name, kind, share) in MIX {
        if slot < share {
            return (kind, name);
        }
        slot -= share;
    }
    (RunKind::Workflow, "demo")
}

/// What the load left to query: the time slice in the middle of it.
struct Loaded {
    window: (DateTime<Utc>, DateTime<Utc>),
}

/// Stores `total` runs, then cancels one in twenty and fails one in a hundred.
async fn load(store: &Arc<dyn RunStore>, total: usize) -> Loaded {
    let started = std::time::Instant::now();
    let marks: std::sync::Mutex<BTreeMap<usize, DateTime<Utc>>> = Default::default();
    let doomed: std::sync::Mutex<Vec<RunId>> = Default::default();
    let cancel: std::sync::Mutex<Vec<RunId>> = Default::default();
    stream::iter(0..total)
        .for_each_concurrent(64, |i| {
            let (marks, doomed, cancel) = (&marks, &doomed, &cancel);
            async move {
                if i == total * 45 / 100 || i == total * 55 / 100 {
                    if let Ok(mut marks) = marks.lock() {
                        marks.insert(i, Utc::now());
                    }
                }
                let (kind, name) = kind_and_name(i);
                // Spread over every name: one in a hundred fails, one in twenty is cancelled.
                // (By blocks of twenty consecutive runs, which hold every name.)
                let doomed_run = (i / 20) % 100 == 7;
                let queue = if doomed_run { "doomed" } else { "workflows" };
                let run = NewRun {
                    id: RunId::generate(),
                    kind,
                    name: name.to_owned(),
                    queue: queue.to_owned(),
                    inputs: json!({"topic": format!("topic {} of the bench", i % 5000), "n": i}),
                    provider_mode: ProviderMode::Mock,
                    budget_usd: None,
                    stage_names: vec!["only".to_owned()],
                    idempotency_key: None,
                    request_hash: None,
                    reuse: false,
                };
                let id = store.insert_run(run).await.expect("insert").0.id;
                if (i / 20) % 20 == 3 {
                    if let Ok(mut cancel) = cancel.lock() {
                        cancel.push(id);
                    }
                } else if doomed_run {
                    if let Ok(mut doomed) = doomed.lock() {
                        doomed.push(id);
                    }
                }
            }
        })
        .await;
    eprintln!(
        "  inserted {total} runs in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let cancel = cancel.into_inner().unwrap_or_default();
    stream::iter(cancel)
        .for_each_concurrent(64, |id| async move {
            store
                .request_cancel(id, Actor::default())
                .await
                .expect("cancel");
        })
        .await;
    fail_doomed(store, doomed.into_inner().unwrap_or_default().len()).await;
    eprintln!(
        "  stored {total} runs in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let marks = marks.into_inner().unwrap_or_default();
    let mut times = marks.values().copied();
    let from = times.next().unwrap_or_else(Utc::now);
    let to = times.next().unwrap_or_else(Utc::now);
    Loaded { window: (from, to) }
}

/// The worker that claims and fails the doomed runs.
const FAILING_WORKER: &str = "bench-list";

/// The error the doomed runs fail with.
fn doom() -> RunError {
    RunError {
        code: "budget_exceeded".to_owned(),
        message: "the bench's failure".to_owned(),
    }
}

/// Claims the runs of the `doomed` queue and fails them with an error code.
async fn fail_doomed(store: &Arc<dyn RunStore>, doomed: usize) {
    let worker = WorkerId::from(FAILING_WORKER.to_owned());
    let mut failed = 0;
    while failed < doomed {
        let claimed = store
            .claim(
                &["doomed".to_owned()],
                &worker,
                Duration::from_secs(300),
                200,
            )
            .await
            .expect("claim");
        if claimed.is_empty() {
            break;
        }
        failed += claimed.len();
        stream::iter(claimed)
            .for_each_concurrent(64, |c| async move {
                store.fail_run(&c.lease, doom()).await.expect("fail");
            })
            .await;
    }
}

/// Runs per batch of the PostgreSQL load (one statement per table and batch).
const PG_BATCH: usize = 10_000;

/// An event as the store writes it: its kind and its data's text (never on a stage here, so its
/// `stage` column is NULL).
fn event_text(event: &kernel::Event) -> (String, String) {
    assert!(!event.on_stage, "the load writes only run events");
    (event.kind.as_str().to_owned(), event.data.to_string())
}

/// What the runs' fates write, as text, the same for every run of a fate: computed once with
/// the store's kernel, so the rows are what the store itself would have written.
struct Fates {
    queued: String,
    cancelled: String,
    failed: String,
    /// The failed runs' `error` column.
    error: String,
    queued_workflows: (String, String),
    queued_doomed: (String, String),
    cancel: (String, String),
    started: (String, String),
    fail: (String, String),
}

impl Fates {
    fn new() -> Self {
        let error = doom();
        let (failed, fail) = kernel::run_failed(&error);
        let kernel::Cancel::Now {
            run: cancelled,
            event: cancel,
        } = kernel::cancel(RunId::generate(), RunStatus::Queued, Actor::default())
            .expect("a queued run can be cancelled")
        else {
            panic!("a queued run is cancelled at once");
        };
        Self {
            queued: RunStatus::Queued.as_str().to_owned(),
            cancelled: cancelled.as_str().to_owned(),
            failed: failed.as_str().to_owned(),
            error: serde_json::to_string(&error).expect("error json"),
            queued_workflows: event_text(&kernel::queued("workflows")),
            queued_doomed: event_text(&kernel::queued("doomed")),
            cancel: event_text(&cancel),
            // The doomed runs' one claim: their fence goes from 0 to 1.
            started: event_text(&kernel::run_started(FAILING_WORKER, FenceToken(1))),
            fail: event_text(&fail),
        }
    }
}

/// A run id of a run created at `ms`: a UUIDv7 (48 bits of milliseconds, version 7, random
/// bits, the RFC 4122 variant), as `RunId::generate` makes at that time.
fn run_id_at(ms: i64) -> String {
    let mut bytes = *uuid::Uuid::new_v4().as_bytes();
    let millis = u64::try_from(ms).unwrap_or(0).to_be_bytes();
    bytes[..6].copy_from_slice(&millis[2..]);
    bytes[6] = 0x70 | (bytes[6] & 0x0F);
    uuid::Uuid::from_bytes(bytes).to_string()
}

/// One batch of runs, column by column, and their events.
#[derive(Default)]
struct PgBatch {
    ids: Vec<String>,
    kinds: Vec<String>,
    names: Vec<String>,
    queues: Vec<String>,
    inputs: Vec<String>,
    search: Vec<String>,
    statuses: Vec<String>,
    errors: Vec<Option<String>>,
    fences: Vec<i64>,
    workers: Vec<Option<String>>,
    cancel_requested: Vec<bool>,
    created: Vec<i64>,
    updated: Vec<i64>,
    finished: Vec<Option<i64>>,
    event_runs: Vec<String>,
    event_at: Vec<i64>,
    event_kinds: Vec<String>,
    event_data: Vec<String>,
}

impl PgBatch {
    fn event(&mut self, run: &str, at: i64, (kind, data): &(String, String)) {
        self.event_runs.push(run.to_owned());
        self.event_at.push(at);
        self.event_kinds.push(kind.clone());
        self.event_data.push(data.clone());
    }

    /// Run `i` of the load, created at `created`, its fate (if any) decided at `end`: what
    /// `load` makes of run `i` through the store.
    fn push(&mut self, fates: &Fates, i: usize, created: i64, end: i64) {
        let id = run_id_at(created);
        let (kind, name) = kind_and_name(i);
        let doomed_run = (i / 20) % 100 == 7;
        let cancelled_run = (i / 20) % 20 == 3;
        let queue = if doomed_run { "doomed" } else { "workflows" };
        let inputs = json!({"topic": format!("topic {} of the bench", i % 5000), "n": i});
        self.kinds.push(kind.as_str().to_owned());
        self.names.push(name.to_owned());
        self.queues.push(queue.to_owned());
        self.search.push(postgres::search_text(&inputs));
        self.inputs.push(inputs.to_string());
        self.created.push(created);
        let queued = if doomed_run {
            &fates.queued_doomed
        } else {
            &fates.queued_workflows
        };
        self.event(&id, created, queued);
        if cancelled_run {
            self.statuses.push(fates.cancelled.clone());
            self.errors.push(None);
            self.fences.push(0);
            self.workers.push(None);
            self.cancel_requested.push(true);
            self.updated.push(end);
            self.finished.push(Some(end));
            self.event(&id, end, &fates.cancel);
        } else if doomed_run {
            self.statuses.push(fates.failed.clone());
            self.errors.push(Some(fates.error.clone()));
            self.fences.push(1);
            self.workers.push(Some(FAILING_WORKER.to_owned()));
            self.cancel_requested.push(false);
            self.updated.push(end);
            self.finished.push(Some(end));
            self.event(&id, end, &fates.started);
            self.event(&id, end, &fates.fail);
        } else {
            self.statuses.push(fates.queued.clone());
            self.errors.push(None);
            self.fences.push(0);
            self.workers.push(None);
            self.cancel_requested.push(false);
            self.updated.push(created);
            self.finished.push(None);
        }
        self.ids.push(id);
    }

    /// Writes the batch: its runs (as `insert_run_now` and the fates' writes leave them), their
    /// one pending stage each, and their events in order.
    async fn write(self, conn: &mut PgConnection) {
        sqlx::query(
            "WITH r AS (SELECT * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], \
             $6::text[], $7::text[], $8::text[], $9::text[], $10::int8[], $11::text[], $12::bool[], \
             $13::int8[], $14::int8[], $15::int8[]) \
             AS r (id, kind, name, queue, inputs, search_text, status, error, fence, worker, \
             cancel_requested, created_at, updated_at, finished_at)), \
             searchable AS (INSERT INTO run_search (run_id, search_text) \
             SELECT r.id, r.search_text FROM r) \
             INSERT INTO runs (id, kind, name, queue, inputs, status, provider_mode, \
             error, available_at, fence, worker, cancel_requested, created_at, updated_at, finished_at) \
             SELECT r.id, r.kind, r.name, r.queue, r.inputs, r.status, $1, \
             r.error, r.created_at, r.fence, r.worker, r.cancel_requested, r.created_at, \
             r.updated_at, r.finished_at FROM r",
        )
        .bind(ProviderMode::Mock.as_str())
        .bind(self.ids.clone())
        .bind(self.kinds)
        .bind(self.names)
        .bind(self.queues)
        .bind(self.inputs)
        .bind(self.search)
        .bind(self.statuses)
        .bind(self.errors)
        .bind(self.fences)
        .bind(self.workers)
        .bind(self.cancel_requested)
        .bind(self.created)
        .bind(self.updated)
        .bind(self.finished)
        .execute(&mut *conn)
        .await
        .expect("insert runs");
        sqlx::query(
            "INSERT INTO stages (run_id, idx, name, status) \
             SELECT s.run_id, 0, $1, $2 FROM UNNEST($3::text[]) AS s (run_id)",
        )
        .bind("only")
        .bind(StageStatus::Pending.as_str())
        .bind(self.ids)
        .execute(&mut *conn)
        .await
        .expect("insert stages");
        // In the order of the arrays: each run's events get growing sequence numbers.
        sqlx::query(
            "INSERT INTO events (run_id, at, kind, data) \
             SELECT e.run_id, e.at, e.kind, e.data \
             FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[]) WITH ORDINALITY \
             AS e (run_id, at, kind, data, n) ORDER BY e.n",
        )
        .bind(self.event_runs)
        .bind(self.event_at)
        .bind(self.event_kinds)
        .bind(self.event_data)
        .execute(&mut *conn)
        .await
        .expect("insert events");
    }
}

/// Writes `total` runs into the PostgreSQL store's tables at `url`, as `load` stores them
/// through the store on the other backends, one run per millisecond up to now; then vacuums
/// and analyses the tables (as autovacuum soon would), so the planner knows them and counts
/// can be index-only.
async fn load_postgres(url: &str, total: usize) -> Loaded {
    let started = std::time::Instant::now();
    let mut conn = PgConnection::connect(url).await.expect("postgres");
    // The rows are consistent by construction: as a superuser (the bench's own server), the
    // foreign keys' per-row checks are skipped; otherwise they run.
    let unchecked = sqlx::query("SET session_replication_role = replica")
        .execute(&mut conn)
        .await
        .is_ok();
    let fates = Fates::new();
    let end = Utc::now().timestamp_millis();
    let first = end - i64::try_from(total).expect("BENCH_LIST_RUNS fits");
    let mut next = 0;
    while next < total {
        let upto = (next + PG_BATCH).min(total);
        let mut batch = PgBatch::default();
        for i in next..upto {
            batch.push(&fates, i, first + i as i64, end);
        }
        batch.write(&mut conn).await;
        next = upto;
    }
    eprintln!(
        "  inserted {total} runs in {:.0} s (foreign-key checks {})",
        started.elapsed().as_secs_f64(),
        if unchecked { "skipped" } else { "on" }
    );
    sqlx::raw_sql("VACUUM (ANALYZE) runs, run_search, stages, events")
        .execute(&mut conn)
        .await
        .expect("vacuum");
    let _ = conn.close().await;
    eprintln!(
        "  stored {total} runs in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let at = |share: usize| to_datetime(first + (total * share / 100) as i64);
    Loaded {
        window: (at(45), at(55)),
    }
}

/// p50 and p95 (ms) of `samples` requests of one page.
async fn timed(http: &reqwest::Client, url: &str, samples: usize) -> (f64, f64, u64) {
    let mut times = Vec::with_capacity(samples);
    let mut total = 0;
    for _ in 0..samples {
        let started = std::time::Instant::now();
        let response = http.get(url).send().await.expect("GET /runs");
        assert!(
            response.status().is_success(),
            "{url}: {}",
            response.status()
        );
        let body: serde_json::Value = response.json().await.expect("json");
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        total = body["total"].as_u64().unwrap_or_default();
    }
    times.sort_by(f64::total_cmp);
    (percentile(&times, 50.0), percentile(&times, 95.0), total)
}

/// The pages measured, by label, as query strings.
fn pages(loaded: &Loaded) -> Vec<(&'static str, String)> {
    let window = format!(
        "created_after={}&created_before={}",
        loaded.window.0.to_rfc3339().replace('+', "%2B"),
        loaded.window.1.to_rfc3339().replace('+', "%2B"),
    );
    vec![
        ("newest, no filter", String::new()),
        ("status=failed", "status=failed".to_owned()),
        ("status=cancelled", "status=cancelled".to_owned()),
        ("kind=agent", "kind=agent".to_owned()),
        ("name=pilot_only", "name=pilot_only".to_owned()),
        ("time range (10%)", window.clone()),
        (
            "status=cancelled, kind=agent",
            "status=cancelled&kind=agent".to_owned(),
        ),
        (
            "status=failed, name=demo",
            "status=failed&name=demo".to_owned(),
        ),
        (
            "status=cancelled, time range",
            format!("status=cancelled&{window}"),
        ),
        ("input search", "q=topic%204242%20of".to_owned()),
    ]
}

async fn measure(
    backend: Backend,
    redis: Option<&RedisServer>,
    total: usize,
    rows: &mut BTreeMap<String, Vec<String>>,
) {
    let mut deployment = Deployment::new(backend, redis).await;
    let loaded = match backend {
        Backend::Postgres => {
            let url = deployment
                .env
                .iter()
                .find(|(name, _)| name == "DATABASE_URL")
                .map(|(_, url)| url.clone())
                .expect("the deployment's DATABASE_URL");
            load_postgres(&url, total).await
        }
        Backend::Sqlite | Backend::Redis => load(&deployment.store, total).await,
    };
    let (_, line) = deployment.spawn(&["serve"]);
    let base = line.trim().rsplit(' ').next().expect("url").to_owned();
    let http = reqwest::Client::new();
    run_page(&http, &base, rows).await;
    for (label, query) in pages(&loaded) {
        let url = format!("{base}/runs?limit=50&{query}");
        // One request warms the page cache; the samples follow.
        timed(&http, &url, 1).await;
        let (p50, p95, matched) = timed(&http, &url, 40).await;
        rows.entry(label.to_owned())
            .or_default()
            .push(format!("{p50:.1} / {p95:.1} ms ({matched} matched)"));
    }
}

/// A run's page among the million: its status document and its (finished) event stream, as
/// the console's run page reads them.
async fn run_page(http: &reqwest::Client, base: &str, rows: &mut BTreeMap<String, Vec<String>>) {
    let page: serde_json::Value = http
        .get(format!("{base}/runs?status=cancelled&limit=1"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let id = page["runs"][0]["run_id"]
        .as_str()
        .expect("a cancelled run")
        .to_owned();
    for (label, path) in [
        ("a run: GET /runs/{id}", format!("{base}/runs/{id}")),
        (
            "a run: GET /runs/{id}/events (finished)",
            format!("{base}/runs/{id}/events"),
        ),
    ] {
        let mut times = Vec::with_capacity(40);
        for _ in 0..41 {
            let started = std::time::Instant::now();
            let response = http.get(&path).send().await.expect("GET");
            assert!(
                response.status().is_success(),
                "{path}: {}",
                response.status()
            );
            response.bytes().await.expect("body");
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        times.remove(0);
        times.sort_by(f64::total_cmp);
        rows.entry(label.to_owned()).or_default().push(format!(
            "{:.1} / {:.1} ms",
            percentile(&times, 50.0),
            percentile(&times, 95.0)
        ));
    }
}

pub async fn section() {
    let total = env_number("BENCH_LIST_RUNS", 1_000_000);
    let wanted =
        std::env::var("BENCH_LIST_STORES").unwrap_or_else(|_| "sqlite,redis,postgres".to_owned());
    let wanted: Vec<&str> = wanted.split(',').map(str::trim).collect();
    eprintln!("run list with {total} stored runs");
    let mut rows: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut measured = Vec::new();
    if wanted.contains(&"sqlite") {
        eprintln!(" SQLite");
        measure(Backend::Sqlite, None, total, &mut rows).await;
        measured.push("SQLite");
    }
    if wanted.contains(&"redis") {
        eprintln!(" Redis");
        let dir = tempfile::tempdir().expect("tempdir");
        let redis = RedisServer::start(dir.path());
        measure(Backend::Redis, Some(&redis), total, &mut rows).await;
        measured.push("Redis");
    }
    if wanted.contains(&"postgres") {
        eprintln!(" PostgreSQL");
        measure(Backend::Postgres, None, total, &mut rows).await;
        measured.push("PostgreSQL");
    }
    let table: BTreeMap<usize, (String, String)> = rows
        .into_iter()
        .enumerate()
        .map(|(i, (label, cells))| (i, (label, cells.join(" · "))))
        .collect();
    print_table(
        &format!(
            "GET /runs, 50 per page, {total} runs stored: p50 / p95, {}",
            measured.join(" · ")
        ),
        &table,
    );
}
