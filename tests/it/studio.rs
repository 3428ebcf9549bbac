//! The studio through its real interfaces: workflows and agents over HTTP, executed by worker
//! processes, with the mock providers writing real media with ffmpeg.

use std::{collections::BTreeMap, process::Command, time::Duration};

use serde_json::{Value, json};

use crate::support::{Backend, TestApp, stage};

const LONG: Duration = Duration::from_secs(90);

/// Every provider call of a run, from its ledger (`runs/{id}/provider_calls.jsonl`).
fn provider_calls(app: &TestApp, id: &str) -> Vec<Value> {
    let path = app
        .dir
        .path()
        .join("artifacts/runs")
        .join(id)
        .join("provider_calls.jsonl");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("ledger line"))
        .collect()
}

/// How many times each (agent, call) happened.
fn call_counts(calls: &[Value]) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    for call in calls {
        let key = (
            call["agent"].as_str().unwrap_or_default().to_owned(),
            call["call"].as_str().unwrap_or_default().to_owned(),
        );
        *counts.entry(key).or_default() += 1;
    }
    counts
}

fn agent_calls(calls: &[Value], agent: &str) -> usize {
    calls.iter().filter(|c| c["agent"] == agent).count()
}

async fn start_workflow(app: &TestApp, name: &str, body: Value) -> String {
    let (status, response) = app.post(&format!("/workflows/{name}/run"), &body).await;
    assert_eq!(status, 202, "{response}");
    response["run_id"].as_str().expect("run_id").to_owned()
}

/// ffprobe's view of a file: duration and stream types.
fn probe(path: &std::path::Path) -> (f64, Vec<String>) {
    let output = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "format=duration:stream=codec_type",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .expect("ffprobe (apt-get install ffmpeg)");
    assert!(
        output.status.success(),
        "ffprobe failed on {}",
        path.display()
    );
    let probe: Value = serde_json::from_slice(&output.stdout).expect("ffprobe json");
    let duration = probe["format"]["duration"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0.0);
    let streams = probe["streams"]
        .as_array()
        .map(|s| {
            s.iter()
                .map(|s| s["codec_type"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default();
    (duration, streams)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_production_renders_a_playable_final_cut_and_audio_only_builds_on_it() {
    let app = TestApp::started(Backend::Sqlite);
    let id = start_workflow(
        &app,
        "full_production",
        json!({
            "inputs": {"user_request": "A day in the life of a developer", "total_budget": 150.0,
                       "target_duration_secs": 8, "num_scenes": 4},
            "async": true
        }),
    )
    .await;
    let run = app.wait_status(&id, "completed", LONG).await;
    let (_, status) = app.get(&format!("/workflows/status/{id}")).await;
    assert_eq!(status["status"], "completed");
    for name in ["planning", "pilots", "evaluation", "completion", "editing"] {
        assert_eq!(stage(&run, name)["status"], "completed", "{name}");
        assert_eq!(stage(&run, name)["attempts"], 1, "{name}");
    }
    // The final cut: the planned length, pictures and sound.
    let final_video = run["result"]["final_video"].as_str().expect("final_video");
    assert_eq!(final_video, format!("runs/{id}/final/final.mp4"));
    let (duration, streams) = probe(&app.dir.path().join("artifacts").join(final_video));
    assert!((duration - 8.0).abs() < 0.3, "final cut lasts {duration} s");
    assert!(
        streams.contains(&"video".to_owned()) && streams.contains(&"audio".to_owned()),
        "{streams:?}"
    );
    // Downloaded through the API, whole and by range.
    let url = app.url(&format!("/artifacts/runs/{id}/final/final.mp4"));
    let response = reqwest::get(&url).await.expect("download");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "video/mp4");
    let bytes = response.bytes().await.expect("bytes");
    let copy = app.dir.path().join("downloaded.mp4");
    std::fs::write(&copy, &bytes).expect("write copy");
    assert!((probe(&copy).0 - 8.0).abs() < 0.3);
    let partial = reqwest::Client::new()
        .get(&url)
        .header("range", "bytes=0-99")
        .send()
        .await
        .expect("range");
    assert_eq!(partial.status(), 206);
    assert_eq!(partial.bytes().await.expect("part").len(), 100);
    // The artifacts the SPEC lists, and the metadata kept current.
    let (_, files) = app.get(&format!("/artifacts/runs/{id}")).await;
    let paths: Vec<&str> = files["artifacts"]
        .as_array()
        .expect("artifacts")
        .iter()
        .filter_map(|f| f["path"].as_str())
        .collect();
    for expected in [
        "metadata.json",
        "pilots/pilot_a/strategy.json",
        "pilots/pilot_a/evaluation.json",
        "pilots/pilot_b/scenes/scene_1.json",
        "videos/scene_1_v1.mp4",
        "videos/scene_2_v2.mp4",
        "audio/voiceover.mp3",
        "audio/music.mp3",
        "final/edit_candidates.json",
        "final/final.mp4",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {paths:?}"
        );
    }
    let metadata: Value = serde_json::from_slice(
        &std::fs::read(
            app.dir
                .path()
                .join(format!("artifacts/runs/{id}/metadata.json")),
        )
        .expect("metadata"),
    )
    .expect("metadata json");
    assert_eq!(metadata["status"], "completed");
    assert_eq!(metadata["last_completed_stage"], "editing");
    // Categories index the run's files without copying them.
    let (_, videos) = app.get("/artifacts/videos").await;
    let listed: Vec<&str> = videos["artifacts"]
        .as_array()
        .expect("videos")
        .iter()
        .filter_map(|f| f["name"].as_str())
        .filter(|n| n.starts_with(&id))
        .collect();
    assert!(
        listed.contains(&format!("{id}_final_final.mp4").as_str()),
        "{listed:?}"
    );
    use std::os::unix::fs::MetadataExt;
    let indexed = std::fs::metadata(
        app.dir
            .path()
            .join(format!("artifacts/videos/{id}_final_final.mp4")),
    )
    .expect("indexed");
    let original = std::fs::metadata(
        app.dir
            .path()
            .join(format!("artifacts/runs/{id}/final/final.mp4")),
    )
    .expect("final");
    assert_eq!(
        indexed.ino(),
        original.ino(),
        "the category entry is the same file"
    );
    // Every cost is simulated and the run's total is the sum of its provider calls.
    let calls = provider_calls(&app, &id);
    assert!(calls.iter().all(|c| c["simulated"] == true));
    let billed: f64 = calls.iter().filter_map(|c| c["cost_usd"].as_f64()).sum();
    let cost = run["cost_usd"].as_f64().expect("cost");
    assert!(
        (billed - cost).abs() < 1e-6,
        "ledger {billed} vs run {cost}"
    );
    assert!(cost > 0.0 && run["budget_usd"] == 150.0);
    assert_eq!(run["cost_simulated"], true);

    // audio_only: a voiceover and music for the same scenes, in a run of its own.
    let audio = start_workflow(
        &app,
        "audio_only",
        json!({"inputs": {"source_run_id": id}, "async": true}),
    )
    .await;
    let done = app.wait_status(&audio, "completed", LONG).await;
    let voiceover = done["result"]["voiceover"]["path"]
        .as_str()
        .expect("voiceover");
    let (seconds, streams) = probe(&app.dir.path().join("artifacts").join(voiceover));
    assert!(
        seconds > 1.0 && streams == ["audio"],
        "{seconds} {streams:?}"
    );
    let (status, refused) = app
        .post(
            "/workflows/audio_only/run",
            &json!({"inputs": {"source_run_id": "nope"}, "async": true}),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["error"]["details"]["field"], "inputs.source_run_id");
}

/// A worker killed in the middle of `completion`: the next worker redoes at most the scene that
/// was being generated, never the scenes, pilots or plans that were finished.
async fn a_kill_during_completion_redoes_no_finished_scene(backend: Backend) {
    let mut app = TestApp::new(backend)
        .with_env("MOCK_PROVIDER_LATENCY_MS", "300")
        .with_api();
    app.start_worker();
    let id = start_workflow(
        &app,
        "full_production",
        json!({
            "inputs": {"user_request": "Trains at dawn", "total_budget": 50.0, "num_pilots": 1,
                       "target_duration_secs": 12, "num_scenes": 6},
            "async": true
        }),
    )
    .await;
    app.wait_run(&id, LONG, |run| {
        stage(run, "completion")["progress"]["done"]
            .as_u64()
            .unwrap_or(0)
            >= 3
    })
    .await;
    app.workers[0].kill9();
    app.start_worker();
    let run = app.wait_status(&id, "completed", LONG).await;
    assert_eq!(stage(&run, "completion")["attempts"], 2);
    for name in ["planning", "pilots", "evaluation"] {
        assert_eq!(stage(&run, name)["attempts"], 1, "{name} ran again");
    }
    let calls = provider_calls(&app, &id);
    let counts = call_counts(&calls);
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.len() <= 1 && repeated.iter().all(|(_, n)| **n == 2),
        "only the call in flight at the kill may repeat: {repeated:?}"
    );
    for finished in [
        ("producer", "plan pilots"),
        ("video_generator", "scene 1 v1"),
        ("video_generator", "scene 2 v1"),
        ("video_generator", "scene 3 v1"),
        ("critic", "evaluate pilots"),
    ] {
        let key = (finished.0.to_owned(), finished.1.to_owned());
        assert_eq!(counts.get(&key), Some(&1), "{finished:?} was redone");
    }
    assert_eq!(
        agent_calls(&calls, "script_writer"),
        2,
        "each script was written once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_critics_threshold_and_resuming_reuses_planning_and_pilots() {
    let app = TestApp::started(Backend::Sqlite);
    let id = start_workflow(
        &app,
        "full_production",
        json!({
            "inputs": {"user_request": "Cats in space", "total_budget": 20.0, "target_duration_secs": 4,
                       "num_scenes": 2, "approval_threshold": 0.99},
            "async": true
        }),
    )
    .await;
    let failed = app.wait_status(&id, "failed", LONG).await;
    assert_eq!(failed["error"]["code"], "no_pilot_approved");
    assert_eq!(stage(&failed, "evaluation")["status"], "failed");
    let before = provider_calls(&app, &id);
    let planning_done = stage(&failed, "planning")["finished_at"].clone();
    let pilots_done = stage(&failed, "pilots")["finished_at"].clone();

    let (status, resumed) = app
        .post(
            &format!("/workflows/full_production/resume/{id}"),
            &json!({"from_stage": "evaluation", "inputs": {"approval_threshold": 0.5}}),
        )
        .await;
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["inputs"]["approval_threshold"], 0.5);
    assert_eq!(resumed["inputs"]["user_request"], "Cats in space");
    // metadata.json follows the resume at once, not only when a worker picks the run up.
    let metadata: Value = serde_json::from_slice(
        &std::fs::read(
            app.dir
                .path()
                .join(format!("artifacts/runs/{id}/metadata.json")),
        )
        .expect("metadata"),
    )
    .expect("metadata json");
    assert_ne!(metadata["status"], "failed");
    assert_eq!(metadata["inputs"]["approval_threshold"], 0.5);
    let run = app.wait_status(&id, "completed", LONG).await;
    assert_eq!(stage(&run, "planning")["finished_at"], planning_done);
    assert_eq!(stage(&run, "pilots")["finished_at"], pilots_done);
    let after = provider_calls(&app, &id);
    for agent in ["producer", "script_writer"] {
        assert_eq!(
            agent_calls(&after, agent),
            agent_calls(&before, agent),
            "{agent} ran again"
        );
    }
    // The pilots' test scenes were generated once, before the resume.
    let counts = call_counts(&after);
    for pilot in ["v1", "v2"] {
        for scene in [1, 2] {
            let key = (
                "video_generator".to_owned(),
                format!("scene {scene} {pilot}"),
            );
            assert_eq!(counts.get(&key), Some(&1), "{key:?}");
        }
    }
    assert_eq!(
        agent_calls(&after, "critic"),
        2,
        "the critic judged again with the new threshold"
    );
    // A threshold outside 0..1 is refused before anything changes.
    let (status, refused) = app
        .post(
            &format!("/workflows/full_production/resume/{id}"),
            &json!({"inputs": {"approval_threshold": 7}}),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(
        refused["error"]["details"]["field"],
        "inputs.approval_threshold"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_fails_the_run_keeping_its_steps_and_more_budget_finishes_it() {
    let app = TestApp::started(Backend::Sqlite);
    // Two pilots of two 2-second test scenes: four videos at $0.10 each cannot fit in $0.30.
    let id = start_workflow(
        &app,
        "full_production",
        json!({
            "inputs": {"user_request": "Budget test", "total_budget": 100.0, "target_duration_secs": 8,
                       "num_scenes": 4},
            "budget_usd": 0.30,
            "async": true
        }),
    )
    .await;
    let failed = app.wait_status(&id, "failed", LONG).await;
    assert_eq!(failed["error"]["code"], "budget_exceeded", "{failed:#}");
    assert_eq!(stage(&failed, "planning")["status"], "completed");
    assert_eq!(stage(&failed, "pilots")["status"], "failed");
    let spent = failed["cost_usd"].as_f64().expect("cost");
    assert!(spent <= 0.30 + 1e-9, "spent {spent} of a $0.30 budget");
    let videos_before = agent_calls(&provider_calls(&app, &id), "video_generator");
    assert!(
        videos_before >= 1,
        "some scenes were made before the budget ran out"
    );

    let (status, resumed) = app
        .post(
            &format!("/workflows/full_production/resume/{id}"),
            &json!({"budget_usd": 100.0}),
        )
        .await;
    assert_eq!(status, 200, "{resumed}");
    let run = app.wait_status(&id, "completed", LONG).await;
    assert_eq!(run["budget_usd"], 100.0);
    let calls = provider_calls(&app, &id);
    // Both pilots write "scenes 1-2"; the completion writes 3-4: three scripts in all.
    assert_eq!(agent_calls(&calls, "script_writer"), 3);
    let counts = call_counts(&calls);
    let redone: Vec<_> = counts
        .iter()
        .filter(|((agent, _), n)| **n > 1 && agent != "script_writer")
        .collect();
    assert!(
        redone.is_empty(),
        "steps finished before the budget ran out were redone: {redone:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifact_paths_that_leave_the_root_are_refused() {
    let app = TestApp::new(Backend::Sqlite).with_api();
    let root = app.dir.path().join("artifacts");
    std::fs::create_dir_all(root.join("videos")).expect("videos");
    std::fs::create_dir_all(root.join("runs/r1/final")).expect("run dir");
    std::fs::write(root.join("runs/r1/final/cut.mp4"), b"not really a video").expect("file");
    std::fs::write(app.dir.path().join("secret.txt"), b"root:x:0:0").expect("secret");
    std::os::unix::fs::symlink(
        app.dir.path().join("secret.txt"),
        root.join("videos/evil.mp4"),
    )
    .expect("symlink");
    std::os::unix::fs::symlink(app.dir.path(), root.join("runs/outside")).expect("dir symlink");
    let (status, _) = app.get("/artifacts/runs/r1/final/cut.mp4").await;
    assert_eq!(status, 200, "a plain file is served");
    for path in [
        "/artifacts/..%2Fsecret.txt",
        "/artifacts/videos/..%2F..%2Fsecret.txt",
        "/artifacts/videos/%2E%2E",
        "/artifacts/videos/.hidden",
        "/artifacts/runs/r1/..%2F..%2F..%2Fsecret.txt",
        "/artifacts/runs/r1/%2Fetc%2Fpasswd",
        "/artifacts/runs/%2E%2E/secret.txt",
        "/artifacts/runs/r1/final%5C..%5C..%5Csecret.txt",
        "/artifacts/videos/evil.mp4",
        "/artifacts/runs/outside/secret.txt",
        "/artifacts/runs/outside",
    ] {
        let response = reqwest::get(app.url(path)).await.expect("request");
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        assert!((400..500).contains(&status), "{path} answered {status}");
        assert!(!body.contains("root:x"), "{path} leaked the file");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_accepts_what_its_schema_allows_and_names_the_field_it_refuses() {
    let app = TestApp::started(Backend::Sqlite);
    // As the studio seed answers: the agents' names.
    let (_, list) = app.get("/agents").await;
    let names: Vec<String> = list["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .map(|a| a.as_str().expect("a name").to_owned())
        .collect();
    let (_, detailed) = app.get("/agents?details=true").await;
    let described: Vec<&str> = detailed["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .map(|a| a["name"].as_str().expect("name"))
        .collect();
    assert_eq!(described, names);
    assert_eq!(
        detailed["agents"][0]["schema_url"],
        "/agents/producer/schema"
    );
    assert_eq!(
        names,
        [
            "producer",
            "script_writer",
            "video_generator",
            "audio_generator",
            "critic",
            "qa_verifier",
            "editor"
        ]
    );
    let scene = json!({"scene_number": 1, "title": "Opening", "description": "A quiet street at dawn",
                       "narration": "It begins.", "duration_secs": 1.5, "visual_prompt": "dawn street"});
    let mut valid = BTreeMap::from([
        (
            "producer",
            json!({"user_request": "A developer video", "total_budget": 150.0}),
        ),
        (
            "script_writer",
            json!({"video_concept": "Trains", "target_duration": 6, "num_scenes": 3}),
        ),
        ("video_generator", json!({"scene": scene})),
        (
            "audio_generator",
            json!({"script": "Hello from the studio."}),
        ),
    ]);
    for (name, inputs) in valid.clone() {
        let (status, body) = app
            .post(&format!("/agents/{name}/run"), &json!({"inputs": inputs}))
            .await;
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(body["status"], "completed", "{name}: {body}");
        assert_eq!(body["agent"], name);
    }
    // The video the generator made feeds the agents that take files.
    let (_, runs) = app.get("/runs?kind=agent&name=video_generator").await;
    let video_run = runs["runs"][0]["run_id"]
        .as_str()
        .expect("video run")
        .to_owned();
    let video = format!("runs/{video_run}/videos/scene_1_v1.mp4");
    valid.insert(
        "qa_verifier",
        json!({"video": video, "expected_duration_secs": 1.5}),
    );
    valid.insert(
        "editor",
        json!({"clips": [{"scene": scene, "video": video}]}),
    );
    valid.insert(
        "critic",
        json!({"pilots": [{"strategy": {"pilot_id": "pilot_a", "version": 1, "concept": "c", "tone": "calm",
            "visual_style": "soft", "target_duration_secs": 3, "num_scenes": 2, "test_scenes": 1,
            "budget_usd": 5.0, "rationale": "r"}, "scenes": [scene], "videos": [], "qa": []}]}),
    );
    for name in ["qa_verifier", "editor", "critic"] {
        let (status, body) = app
            .post(
                &format!("/agents/{name}/run"),
                &json!({"inputs": valid[name]}),
            )
            .await;
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(body["status"], "completed", "{name}: {body}");
    }
    for name in &names {
        let (status, schema) = app.get(&format!("/agents/{name}/schema")).await;
        assert_eq!(status, 200);
        let required: Vec<String> = schema["inputs"]["required"]
            .as_array()
            .expect("required")
            .iter()
            .map(|f| f.as_str().expect("field").to_owned())
            .collect();
        let inputs = &valid[name.as_str()];
        for field in &required {
            assert!(
                inputs.get(field).is_some(),
                "{name}: the valid example lacks {field}"
            );
            let mut missing = inputs.clone();
            missing.as_object_mut().expect("object").remove(field);
            let (status, refused) = app
                .post(&format!("/agents/{name}/run"), &json!({"inputs": missing}))
                .await;
            assert_eq!(status, 422, "{name} without {field}: {refused}");
            assert_eq!(
                refused["error"]["details"]["field"],
                format!("inputs.{field}"),
                "{name}"
            );
        }
        let properties = schema["inputs"]["properties"]
            .as_object()
            .expect("properties");
        for (field, _) in inputs.as_object().expect("object") {
            assert!(
                properties.contains_key(field),
                "{name}: schema lacks {field}"
            );
        }
        let mut extra = inputs.clone();
        extra
            .as_object_mut()
            .expect("object")
            .insert("bogus".into(), json!(1));
        let (status, refused) = app
            .post(&format!("/agents/{name}/run"), &json!({"inputs": extra}))
            .await;
        assert_eq!(status, 422, "{name} with an unknown field: {refused}");
        assert_eq!(
            refused["error"]["details"]["field"], "inputs.bogus",
            "{name}"
        );
    }
    let (status, wrong) = app
        .post(
            "/agents/producer/run",
            &json!({"inputs": {"user_request": "x", "total_budget": "lots"}}),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(wrong["error"]["details"]["field"], "inputs.total_budget");
    let (status, _) = app.get("/agents/nobody/schema").await;
    assert_eq!(status, 404);
    let (status, live) = app
        .post(
            "/agents/producer/run",
            &json!({"inputs": valid["producer"], "provider_mode": "live"}),
        )
        .await;
    assert_eq!(status, 422, "{live}");
    assert_eq!(
        live["error"]["code"], "missing_key",
        "no ANTHROPIC_API_KEY here"
    );
}

/// `"reuse": true`: a second run with the same inputs takes every checkpoint of the first at no
/// cost and calls no provider; changing one input reruns only the stages that depend on it.
async fn a_second_run_with_the_same_inputs_reuses_every_stage_at_no_cost(backend: Backend) {
    let app = TestApp::started(backend);
    let inputs = json!({"user_request": "Reuse me", "total_budget": 40.0, "target_duration_secs": 4,
                        "num_scenes": 2, "approval_threshold": 0.5});
    let first = start_workflow(
        &app,
        "full_production",
        json!({"inputs": inputs, "async": true}),
    )
    .await;
    let first_run = app.wait_status(&first, "completed", LONG).await;
    let first_cost = first_run["cost_usd"].as_f64().expect("cost");
    assert!(first_cost > 0.0);
    assert_eq!(first_run["reused_stages"], json!([]));

    let second = start_workflow(
        &app,
        "full_production",
        json!({"inputs": inputs, "async": true, "reuse": true}),
    )
    .await;
    let run = app.wait_status(&second, "completed", LONG).await;
    assert_eq!(run["cost_usd"], 0.0, "{run:#}");
    assert_eq!(run["reuse"], true);
    assert_eq!(
        run["reused_stages"],
        json!(["planning", "pilots", "evaluation", "completion", "editing"])
    );
    assert_eq!(stage(&run, "editing")["reused_from"], first);
    assert!(
        provider_calls(&app, &second).is_empty(),
        "a reused run calls no provider"
    );
    // The reused files are this run's own names for the same bytes.
    let final_video = run["result"]["final_video"].as_str().expect("final_video");
    assert_eq!(final_video, format!("runs/{second}/final/final.mp4"));
    use std::os::unix::fs::MetadataExt;
    let root = app.dir.path().join("artifacts");
    let mine = std::fs::metadata(root.join(final_video)).expect("reused final cut");
    let theirs =
        std::fs::metadata(root.join(format!("runs/{first}/final/final.mp4"))).expect("final cut");
    assert_eq!(mine.ino(), theirs.ino());
    assert!(
        stage(&run, "pilots")["artifacts"]
            .as_array()
            .expect("artifacts")
            .iter()
            .all(|a| a
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("runs/{second}/"))))
    );

    // A new threshold: planning and pilots are reused, the critic judges again.
    let mut changed = inputs.clone();
    changed["approval_threshold"] = json!(0.4);
    let third = start_workflow(
        &app,
        "full_production",
        json!({"inputs": changed, "async": true, "reuse": true}),
    )
    .await;
    let run = app.wait_status(&third, "completed", LONG).await;
    assert_eq!(
        run["reused_stages"],
        json!(["planning", "pilots"]),
        "{:#}",
        run["stages"]
    );
    let calls = provider_calls(&app, &third);
    assert_eq!(agent_calls(&calls, "producer"), 0);
    assert_eq!(agent_calls(&calls, "critic"), 1);
    let cost = run["cost_usd"].as_f64().expect("cost");
    assert!(cost > 0.0 && cost < first_cost, "{cost} vs {first_cost}");
}

crate::conformance!(
    a_kill_during_completion_redoes_no_finished_scene,
    a_second_run_with_the_same_inputs_reuses_every_stage_at_no_cost,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ffmpeg_health_says_so_and_media_stages_fail_saying_what_to_install() {
    let mut app = TestApp::new(Backend::Sqlite)
        .with_env("FFMPEG_PATH", "/nonexistent/ffmpeg")
        .with_env("FFPROBE_PATH", "/nonexistent/ffprobe")
        .with_api();
    app.start_worker();
    let (status, health) = app.get("/health").await;
    assert_eq!(status, 200, "the store is fine: {health}");
    assert_eq!(health["ffmpeg"]["available"], false);
    assert!(
        health["ffmpeg"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("install ffmpeg")),
        "{health}"
    );
    let id = start_workflow(
        &app,
        "pilot_only",
        json!({"inputs": {"user_request": "No tools", "total_budget": 10.0, "target_duration_secs": 4,
                          "num_scenes": 2}, "async": true}),
    )
    .await;
    let run = app.wait_status(&id, "failed", LONG).await;
    assert_eq!(run["error"]["code"], "ffmpeg_missing", "{run:#}");
    assert!(
        run["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("install ffmpeg"))
    );
    assert_eq!(
        stage(&run, "planning")["status"],
        "completed",
        "text stages need no ffmpeg"
    );
    assert_eq!(
        stage(&run, "pilots")["attempts"],
        1,
        "a missing tool is not retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invoke_script_drives_agents_workflows_and_status() {
    let app = TestApp::started(Backend::Sqlite);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/invoke.sh");
    let invoke = |args: &[&str]| {
        let output = Command::new("bash")
            .arg(script)
            .args(args)
            .env("ENDPOINT", app.url(""))
            .output()
            .expect("invoke.sh");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<Value>(&output.stdout).expect("JSON out of invoke.sh")
    };
    let agent = invoke(&[
        "agent",
        "producer",
        r#"{"inputs":{"user_request":"test","total_budget":100}}"#,
    ]);
    assert_eq!(agent["status"], "completed", "{agent}");
    let started = invoke(&[
        "workflow",
        "pilot_only",
        r#"{"inputs":{"user_request":"Scripted","total_budget":10,"target_duration_secs":4,"num_scenes":2},"async":true}"#,
    ]);
    let id = started["run_id"].as_str().expect("run_id").to_owned();
    app.wait_status(&id, "completed", LONG).await;
    let status = invoke(&["status", &id]);
    assert_eq!(status["status"], "completed");
    let files = invoke(&["artifacts", &id]);
    assert!(files["artifacts"].as_array().is_some_and(|a| !a.is_empty()));
    let resumed = invoke(&[
        "resume",
        "pilot_only",
        &id,
        r#"{"from_stage":"evaluation"}"#,
    ]);
    assert_eq!(resumed["status"], "queued", "{resumed}");
    app.wait_status(&id, "completed", LONG).await;
}
