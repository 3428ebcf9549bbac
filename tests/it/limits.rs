//! The largest input each agent accepts, run by a real worker: it completes, and the worker's
//! peak resident memory stays under 200 MB. Slow (minutes of media), so it runs with
//! `make limits` rather than in `make test`; it prints one line per agent for the README.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Backend, TestApp};

const WAIT: Duration = Duration::from_secs(900);
const LIMIT_KB: u64 = 200 * 1024;

/// The peak resident memory of a process so far (`VmHWM`), in kB.
fn peak_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn text(n: usize) -> String {
    "word ".repeat(n / 5 + 1).chars().take(n).collect()
}

fn scene(number: u32, duration: f64) -> Value {
    json!({"scene_number": number, "title": text(200), "description": text(4000),
           "narration": text(4000), "duration_secs": duration, "visual_prompt": text(4000)})
}

/// Runs one agent on a fresh worker and answers the worker's peak memory in kB.
async fn run_alone(app: &mut TestApp, agent: &str, inputs: Value) -> (Value, u64) {
    let index = app.start_worker_with(&["--queues", "agents"]);
    let pid = app.workers[index].child.id();
    let body = json!({"inputs": inputs, "async": true});
    let bytes = body.to_string().len();
    let (status, submitted) = app.post(&format!("/agents/{agent}/run"), &body).await;
    assert_eq!(status, 202, "{agent} ({bytes} bytes): {submitted}");
    let id = submitted["run_id"].as_str().expect("run id").to_owned();
    let run = app
        .wait_run(&id, WAIT, |r| {
            matches!(r["status"].as_str(), Some("completed" | "failed"))
        })
        .await;
    assert_eq!(run["status"], "completed", "{agent}: {run:#}");
    let peak = peak_kb(pid);
    app.workers[index].kill9();
    println!(
        "limits: {agent:<16} body {:>8} bytes  worker peak {:>6.1} MB",
        bytes,
        peak as f64 / 1024.0
    );
    (run, peak)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes of media: make limits"]
async fn the_largest_input_of_every_agent_runs_in_under_200_mb() {
    let mut app = TestApp::new(Backend::Sqlite)
        .with_env("MAX_BODY_BYTES", "1048576")
        .with_env("MEDIA_TIMEOUT_SECS", "1800")
        .with_api();
    let mut peaks = Vec::new();
    let producer = json!({"user_request": text(2000), "total_budget": 1_000_000, "num_pilots": 4,
                          "target_duration_secs": 600, "num_scenes": 20});
    peaks.push((
        "producer",
        run_alone(&mut app, "producer", producer).await.1,
    ));
    let writer = json!({"video_concept": text(2000), "target_duration": 3600, "num_scenes": 50,
                        "tone": text(200), "visual_style": text(200)});
    peaks.push((
        "script_writer",
        run_alone(&mut app, "script_writer", writer).await.1,
    ));
    let (video, peak) = run_alone(
        &mut app,
        "video_generator",
        json!({"scene": scene(1, 60.0), "version": 99}),
    )
    .await;
    peaks.push(("video_generator", peak));
    let video_path = video["result"]["path"].as_str().expect("video").to_owned();
    let (voiceover, peak) = run_alone(
        &mut app,
        "audio_generator",
        json!({"script": text(20_000), "kind": "voiceover"}),
    )
    .await;
    peaks.push(("audio_generator (voiceover)", peak));
    let (music, peak) = run_alone(
        &mut app,
        "audio_generator",
        json!({"script": text(20_000), "kind": "music", "duration_secs": 600}),
    )
    .await;
    peaks.push(("audio_generator (music)", peak));
    peaks.push((
        "qa_verifier",
        run_alone(
            &mut app,
            "qa_verifier",
            json!({"video": video_path, "expected_duration_secs": 3600}),
        )
        .await
        .1,
    ));
    // The critic's largest input is bounded by the body limit before its schema's counts.
    let strategy = json!({"pilot_id": "p".repeat(64), "version": 99, "concept": text(4000),
        "tone": text(200), "visual_style": text(200), "target_duration_secs": 3600, "num_scenes": 50,
        "test_scenes": 50, "budget_usd": 1_000_000, "rationale": text(4000)});
    let clip = json!({"scene_number": 999, "version": 99, "path": video_path, "duration_secs": 60,
                      "provider": text(200), "cost_usd": 1000, "simulated": true});
    let mut scenes = 50;
    let pilots = loop {
        let pilots: Vec<Value> = (0..4)
            .map(|_| {
                json!({"strategy": strategy, "scenes": (1..=scenes).map(|n| scene(n, 60.0)).collect::<Vec<_>>(),
                       "videos": vec![clip.clone(); 50], "qa": []})
            })
            .collect();
        if json!({"inputs": {"pilots": pilots}}).to_string().len() < 1_000_000 || scenes == 1 {
            break pilots;
        }
        scenes -= 1;
    };
    peaks.push((
        "critic",
        run_alone(
            &mut app,
            "critic",
            json!({"pilots": pilots, "approval_threshold": 0}),
        )
        .await
        .1,
    ));
    let clips: Vec<Value> = (1..=50)
        .map(|n| json!({"scene": scene(n, 60.0), "video": video_path}))
        .collect();
    let editor = json!({"clips": clips,
        "voiceover": voiceover["result"]["path"], "music": music["result"]["path"]});
    peaks.push(("editor", run_alone(&mut app, "editor", editor).await.1));
    for (agent, peak) in peaks {
        assert!(
            peak > 0 && peak < LIMIT_KB,
            "{agent}: the worker peaked at {peak} kB"
        );
    }
}
