//! The console's run list with many stored runs (BENCH_LIST_RUNS, default 1,000,000) on both
//! stores: the time `GET /runs` takes on loopback (the API's answer of a 50-run page, JSON
//! included) for pages filtered by status, kind, name and time range, alone and with a status,
//! and the input search; and a run's page (its status document and its event stream).
//! `BENCH_ONLY=list`.
//!
//! The runs are stored through the store itself: names and kinds in a fixed mix, one in twenty
//! cancelled and one in a hundred failed (claimed and failed with an error code), created over
//! the minutes the load takes, so a time range is a slice of them.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use futures::{StreamExt, stream};
use serde_json::json;
use stagecraft::{
    config::ProviderMode,
    ids::{RunId, WorkerId},
    store::{Actor, NewRun, RunError, RunKind, RunStore},
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

/// Claims the runs of the `doomed` queue and fails them with an error code.
async fn fail_doomed(store: &Arc<dyn RunStore>, doomed: usize) {
    let worker = WorkerId::from("bench-list".to_owned());
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
                let error = RunError {
                    code: "budget_exceeded".to_owned(),
                    message: "the bench's failure".to_owned(),
                };
                store.fail_run(&c.lease, error).await.expect("fail");
            })
            .await;
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
    let loaded = load(&deployment.store, total).await;
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
    eprintln!("run list with {total} stored runs");
    let mut rows: BTreeMap<String, Vec<String>> = BTreeMap::new();
    measure(Backend::Sqlite, None, total, &mut rows).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(dir.path());
    measure(Backend::Redis, Some(&redis), total, &mut rows).await;
    let table: BTreeMap<usize, (String, String)> = rows
        .into_iter()
        .enumerate()
        .map(|(i, (label, cells))| (i, (label, cells.join(" · "))))
        .collect();
    print_table(
        &format!("GET /runs, 50 per page, {total} runs stored: p50 / p95, SQLite · Redis"),
        &table,
    );
}
