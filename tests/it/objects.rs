//! Artifacts in S3-compatible object storage (a real `s3s-fs` server on loopback): the store's
//! operations alike on disk and in a bucket, and a studio run whose API and workers share
//! nothing but Redis and the bucket, surviving a worker killed mid-stage.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde_json::{Value, json};
use stagecraft::{
    artifacts::{ArtifactStore, Entry, clean_gone_runs},
    ids::RunId,
    store::SharedStore,
};

use crate::support::{Backend, TestApp, s3::shared_s3, stage};

const LONG: Duration = Duration::from_secs(120);

fn file(name: &str, size: u64) -> Entry {
    Entry {
        name: name.to_owned(),
        size: Some(size),
    }
}

fn dir(name: &str) -> Entry {
    Entry {
        name: name.to_owned(),
        size: None,
    }
}

fn clip(id: RunId) -> String {
    format!("runs/{id}/videos/scene_1_v1.mp4")
}

/// Every operation the engine, the studio and the API use, with the same answers: `kept` is a
/// stored run, `gone` one that is not.
async fn exercise(artifacts: &ArtifactStore, store: &SharedStore) {
    let kept = RunId::generate();
    store
        .insert_run(stagecraft::store::NewRun {
            id: kept,
            ..crate::support::noop_run()
        })
        .await
        .expect("insert");
    let gone = RunId::generate();
    files(artifacts, kept, gone).await;
    listings(artifacts, kept).await;
    workspace(artifacts, kept).await;
    retention(artifacts, store, kept, gone).await;
}

/// Writes, reads, copies, ledgers and versioned documents; unsafe paths refused.
async fn files(artifacts: &ArtifactStore, kept: RunId, gone: RunId) {
    // Writes are complete files; reads answer them; missing files are None, not errors.
    for id in [kept, gone] {
        artifacts
            .write(&clip(id), b"video bytes".to_vec())
            .await
            .expect("write");
        assert_eq!(
            artifacts.index("videos", &clip(id)).await.expect("index"),
            format!("videos/{id}_scene_1_v1.mp4")
        );
    }
    assert!(artifacts.is_file(&clip(kept)).await.expect("is_file"));
    assert!(!artifacts.is_file("runs/none/x").await.expect("is_file"));
    assert_eq!(
        artifacts.read_to_string("runs/none/x").await.expect("read"),
        None
    );
    for bad in ["../x", "runs//x", "/etc/passwd", "runs/./x", "a\\b"] {
        assert!(artifacts.write(bad, Vec::new()).await.is_err(), "{bad}");
        assert!(artifacts.is_file(bad).await.is_err(), "{bad}");
    }

    // A copy is a file of its own; ledgers append; versioned documents never go back.
    let copied = format!("runs/{kept}/final/final.mp4");
    artifacts.copy(&clip(kept), &copied).await.expect("copy");
    let ledger = format!("runs/{kept}/provider_calls.jsonl");
    for line in ["one", "two", "three"] {
        artifacts.append_line(&ledger, line).await.expect("append");
    }
    assert_eq!(
        artifacts.read_to_string(&ledger).await.expect("read"),
        Some("one\ntwo\nthree\n".to_owned())
    );
    let version_of = |b: &[u8]| std::str::from_utf8(b).ok()?.parse().ok();
    let doc = format!("runs/{kept}/metadata.json");
    assert!(
        artifacts
            .write_newer(&doc, b"5".to_vec(), 5, version_of)
            .await
            .expect("newer")
    );
    assert!(
        !artifacts
            .write_newer(&doc, b"4".to_vec(), 4, version_of)
            .await
            .expect("older")
    );
    assert_eq!(
        artifacts
            .read_to_string(&doc)
            .await
            .expect("read")
            .as_deref(),
        Some("5")
    );
}

/// Listings: directories and files, sorted; a run's files recursively.
async fn listings(artifacts: &ArtifactStore, kept: RunId) {
    assert_eq!(
        artifacts.list("").await.expect("list"),
        Some(vec![dir("runs"), dir("videos")])
    );
    assert_eq!(artifacts.list("scripts").await.expect("list"), None);
    assert_eq!(
        artifacts
            .list_files(&format!("runs/{kept}"))
            .await
            .expect("files"),
        Some(vec![
            ("final/final.mp4".to_owned(), 11),
            ("metadata.json".to_owned(), 1),
            ("provider_calls.jsonl".to_owned(), 14),
            ("videos/scene_1_v1.mp4".to_owned(), 11),
        ])
    );
}

/// Tools read inputs and publish outputs through a workspace on this host's disk.
async fn workspace(artifacts: &ArtifactStore, kept: RunId) {
    let copied = format!("runs/{kept}/final/final.mp4");
    let workspace = artifacts.workspace().expect("workspace");
    let input = workspace
        .input(&copied)
        .await
        .expect("input")
        .expect("exists");
    assert_eq!(std::fs::read(&input).expect("read input"), b"video bytes");
    assert_eq!(workspace.input("runs/none/x").await.expect("input"), None);
    let output = workspace
        .output(&format!("runs/{kept}/audio/music.mp3"))
        .expect("output");
    std::fs::write(&output, b"music").expect("write output");
    workspace
        .publish(&format!("runs/{kept}/audio/music.mp3"))
        .await
        .expect("publish");
    drop(workspace);
    assert!(
        artifacts
            .is_file(&format!("runs/{kept}/audio/music.mp3"))
            .await
            .expect("published")
    );
}

/// Retention: a run that is gone loses its directory, the studio its category entries.
async fn retention(artifacts: &ArtifactStore, store: &SharedStore, kept: RunId, gone: RunId) {
    assert_eq!(clean_gone_runs(store, artifacts).await, [gone.to_string()]);
    assert!(!artifacts.is_file(&clip(gone)).await.expect("is_file"));
    assert!(artifacts.is_file(&clip(kept)).await.expect("is_file"));
    assert_eq!(
        stagecraft::studio::clean_categories(artifacts, &[gone.to_string()]).await,
        1
    );
    assert_eq!(
        artifacts.list("videos").await.expect("list"),
        Some(vec![file(&format!("{kept}_scene_1_v1.mp4"), 11)])
    );
}

async fn sqlite_store(dir: &std::path::Path) -> SharedStore {
    let url = stagecraft::config::sqlite_url_for(&dir.join("s.db"));
    Arc::new(
        stagecraft::store::sqlite::SqliteStore::open(
            &url,
            Arc::new(stagecraft::clock::SystemClock),
        )
        .await
        .expect("store"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_artifact_store_answers_alike_on_disk_and_in_object_storage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = sqlite_store(dir.path()).await;
    let local = ArtifactStore::open(dir.path().join("artifacts")).expect("local");
    exercise(&local, &store).await;

    let server = shared_s3();
    let bucket = server.bucket();
    let objects = ArtifactStore::open_objects(
        &server.settings(&bucket, "prod/stagecraft"),
        dir.path().join("scratch-root"),
    )
    .expect("objects");
    exercise(&objects, &store).await;
    assert_eq!(objects.describe(), format!("s3://{bucket}/prod/stagecraft"));
    // Nothing stays on this host: the workspace was deleted with its downloads and outputs.
    let scratch = dir.path().join("scratch-root/scratch");
    assert_eq!(std::fs::read_dir(&scratch).expect("scratch").count(), 0);
}

/// Every provider call of a run, from its ledger as the API serves it.
async fn provider_calls(app: &TestApp, id: &str) -> Vec<Value> {
    let response = app
        .http
        .get(app.url(&format!("/artifacts/runs/{id}/provider_calls.jsonl")))
        .send()
        .await
        .expect("ledger");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("text");
    text.lines()
        .map(|line| serde_json::from_str(line).expect("ledger line"))
        .collect()
}

async fn start_workflow(app: &TestApp, body: Value) -> String {
    let (status, response) = app.post("/workflows/full_production/run", &body).await;
    assert_eq!(status, 202, "{response}");
    response["run_id"].as_str().expect("run_id").to_owned()
}

/// The worker process running `run`, by the pid in its worker id (`host:pid:role-…`).
fn running_worker(app: &TestApp, run: &Value) -> usize {
    let worker = run["worker"].as_str().unwrap_or_default();
    let pid = worker.split(':').nth(1).unwrap_or_default();
    app.workers
        .iter()
        .position(|w| w.pid().to_string() == pid)
        .unwrap_or_else(|| panic!("no worker process {worker:?}"))
}

/// The API and two workers share only Redis and a bucket (each has its own empty local
/// directory): a whole `full_production` runs, the worker running it is killed during
/// `completion` and replaced, nothing finished is redone, and the API serves the final cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_studio_run_spans_hosts_through_object_storage() {
    let mut app = TestApp::new(Backend::Redis)
        .with_env("MOCK_PROVIDER_LATENCY_MS", "300")
        .with_object_storage()
        .with_api();
    app.start_worker();
    app.start_worker();
    let inputs = json!({"user_request": "Trains at dawn", "total_budget": 50.0, "num_pilots": 1,
                        "target_duration_secs": 12, "num_scenes": 6});
    let id = start_workflow(&app, json!({"inputs": inputs, "async": true})).await;
    let run = app
        .wait_run(&id, LONG, |run| {
            stage(run, "completion")["progress"]["done"]
                .as_u64()
                .unwrap_or(0)
                >= 3
        })
        .await;
    let victim = running_worker(&app, &run);
    app.workers[victim].kill9();
    app.start_worker();
    let run = app.wait_status(&id, "completed", LONG).await;
    assert_eq!(stage(&run, "completion")["attempts"], 2, "{run:#}");
    for name in ["planning", "pilots", "evaluation"] {
        assert_eq!(stage(&run, name)["attempts"], 1, "{name} ran again");
    }
    let mut counts = BTreeMap::new();
    for call in provider_calls(&app, &id).await {
        *counts
            .entry((call["agent"].to_string(), call["call"].to_string()))
            .or_insert(0) += 1;
    }
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.len() <= 1 && repeated.iter().all(|(_, n)| **n == 2),
        "only the call in flight at the kill may repeat: {repeated:?}"
    );

    // The final cut, made on one host from scenes made on others, served by the API.
    let bytes = served_final_cut(&app, &id).await;

    // No host kept a file: every process's own directory holds no run.
    for entry in std::fs::read_dir(app.dir.path()).expect("dir").flatten() {
        if entry.file_name().to_string_lossy().starts_with("host-") {
            assert!(!entry.path().join("runs").exists(), "{:?}", entry.path());
        }
    }

    // Reuse copies on the server side: a second run with the same inputs pays nothing.
    let second = start_workflow(
        &app,
        json!({"inputs": inputs, "async": true, "reuse": true}),
    )
    .await;
    let reused = app.wait_status(&second, "completed", LONG).await;
    assert_eq!(reused["cost_usd"], 0.0, "{reused:#}");
    let copy = app
        .http
        .get(app.url(&format!("/artifacts/runs/{second}/final/final.mp4")))
        .send()
        .await
        .expect("reused final cut");
    assert_eq!(copy.status(), 200);
    assert_eq!(copy.bytes().await.expect("bytes"), bytes);
}

/// The final cut of `id` as the API serves it (checked playable, with ranges and conditional
/// requests answered).
async fn served_final_cut(app: &TestApp, id: &str) -> bytes::Bytes {
    let final_url = app.url(&format!("/artifacts/runs/{id}/final/final.mp4"));
    let whole = app.http.get(&final_url).send().await.expect("final cut");
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.headers()["content-type"], "video/mp4");
    let etag = whole.headers()["etag"].clone();
    let bytes = whole.bytes().await.expect("bytes");
    let local = app.dir.path().join("final.mp4");
    std::fs::write(&local, &bytes).expect("write");
    let probed = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "format=duration",
            "-of",
            "csv=p=0",
        ])
        .arg(&local)
        .output()
        .expect("ffprobe");
    let duration: f64 = String::from_utf8_lossy(&probed.stdout)
        .trim()
        .parse()
        .expect("a playable final cut");
    assert!(duration > 10.0, "{duration}");
    let part = app
        .http
        .get(&final_url)
        .header("range", "bytes=100-199")
        .send()
        .await
        .expect("range");
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 100-199/{}", bytes.len())
    );
    assert_eq!(part.bytes().await.expect("part"), bytes.slice(100..200));
    let unchanged = app
        .http
        .get(&final_url)
        .header("if-none-match", etag)
        .send()
        .await
        .expect("conditional");
    assert_eq!(unchanged.status(), 304);
    let outside = app
        .http
        .get(&final_url)
        .header("range", format!("bytes={}-", bytes.len() + 10))
        .send()
        .await
        .expect("outside");
    assert_eq!(outside.status(), 416);

    bytes
}
