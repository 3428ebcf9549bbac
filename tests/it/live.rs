//! Live text providers against a local wiremock server that speaks the Anthropic Messages API:
//! retries on 429 and 5xx, permanent 4xx, schema repair, real costs, keys kept secret.

use std::time::Duration;

use serde_json::{Value, json};
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{header, method, path},
};

use crate::support::{Backend, TestApp};

const KEY: &str = "sk-ant-STAGECRAFTTESTKEY42";

fn pilot(id: &str, version: u32) -> Value {
    json!({"pilot_id": id, "version": version, "concept": "A calm take", "tone": "calm",
           "visual_style": "soft light", "target_duration_secs": 60, "num_scenes": 6, "test_scenes": 2,
           "budget_usd": 75.0, "rationale": "Tests the calm version."})
}

/// An Anthropic Messages answer whose text is `text`, with the given token usage.
fn message(text: &str, input_tokens: u64, output_tokens: u64) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}
    }))
}

fn valid_plan() -> String {
    json!({"pilots": [pilot("pilot_a", 1), pilot("pilot_b", 2)], "total_budget": 150.0}).to_string()
}

fn anthropic() -> wiremock::MockBuilder {
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(header("x-api-key", KEY))
        .and(header("anthropic-version", "2023-06-01"))
}

async fn app_against(server: &MockServer) -> TestApp {
    let mut app = TestApp::new(Backend::Sqlite)
        .with_env("ANTHROPIC_API_KEY", KEY)
        .with_env("ANTHROPIC_BASE_URL", &server.uri())
        .with_env("PROVIDER_MAX_RETRIES", "3")
        .with_api();
    app.start_worker();
    app
}

async fn run_producer(app: &TestApp) -> Value {
    let (status, body) = app
        .post(
            "/agents/producer/run",
            &json!({"inputs": {"user_request": "A developer video", "total_budget": 150.0}, "provider_mode": "live"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

fn ledger(app: &TestApp, id: &str) -> Vec<Value> {
    std::fs::read_to_string(
        app.dir
            .path()
            .join(format!("artifacts/runs/{id}/provider_calls.jsonl")),
    )
    .unwrap_or_default()
    .lines()
    .map(|l| serde_json::from_str(l).expect("ledger line"))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_then_success_costs_what_the_usage_says() {
    let server = MockServer::start().await;
    anthropic()
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    anthropic()
        .respond_with(message(&valid_plan(), 1200, 800))
        .expect(1)
        .mount(&server)
        .await;
    let app = app_against(&server).await;
    let started = std::time::Instant::now();
    let body = run_producer(&app).await;
    assert_eq!(body["status"], "completed", "{body}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the retry-after was honoured"
    );
    assert_eq!(body["result"]["pilots"][1]["pilot_id"], "pilot_b");
    // 1,200 input tokens at $3/M and 800 output tokens at $15/M.
    let expected = 1200.0 * 3.0 / 1e6 + 800.0 * 15.0 / 1e6;
    assert!(
        (body["cost_usd"].as_f64().expect("cost") - expected).abs() < 1e-9,
        "{body}"
    );
    let id = body["run_id"].as_str().expect("id");
    let calls = ledger(&app, id);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["simulated"], false);
    let (_, run) = app.get(&format!("/runs/{id}")).await;
    assert_eq!(run["cost_simulated"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_500s_then_success_completes_and_a_400_fails_at_once() {
    let server = MockServer::start().await;
    anthropic()
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(2)
        .expect(2)
        .mount(&server)
        .await;
    anthropic()
        .respond_with(message(&valid_plan(), 100, 100))
        .mount(&server)
        .await;
    let app = app_against(&server).await;
    assert_eq!(run_producer(&app).await["status"], "completed");

    let server = MockServer::start().await;
    anthropic()
        .respond_with(
            ResponseTemplate::new(400).set_body_json(json!({"type": "error",
            "error": {"type": "invalid_request_error", "message": "max_tokens: too large"}})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let app = app_against(&server).await;
    let body = run_producer(&app).await;
    assert_eq!(body["status"], "failed", "{body}");
    assert_eq!(body["error"]["code"], "provider_rejected");
    let (_, run) = app
        .get(&format!("/runs/{}", body["run_id"].as_str().expect("id")))
        .await;
    assert_eq!(
        run["stages"][0]["attempts"], 1,
        "a permanent error is not retried"
    );
    assert!(!run.to_string().contains(KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_model_json_is_repaired_once_then_fails_cleanly() {
    let server = MockServer::start().await;
    anthropic()
        .respond_with(message("Here you go: {\"pilots\": \"oops\"}", 50, 50))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    anthropic()
        .respond_with(message(&valid_plan(), 50, 50))
        .mount(&server)
        .await;
    let app = app_against(&server).await;
    let body = run_producer(&app).await;
    assert_eq!(body["status"], "completed", "{body}");
    let calls = ledger(&app, body["run_id"].as_str().expect("id"));
    assert!(
        calls[0]["call"]
            .as_str()
            .is_some_and(|c| c.contains("repaired")),
        "{calls:?}"
    );
    assert_eq!(server.received_requests().await.map(|r| r.len()), Some(2));

    let server = MockServer::start().await;
    anthropic()
        .respond_with(message("not json at all", 50, 50))
        .expect(2)
        .mount(&server)
        .await;
    let app = app_against(&server).await;
    let body = run_producer(&app).await;
    assert_eq!(body["status"], "failed", "{body}");
    assert_eq!(body["error"]["code"], "invalid_model_output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_runs_without_a_key_or_a_provider_are_refused_at_submission_and_keys_stay_secret() {
    let app = TestApp::new(Backend::Sqlite).with_api();
    let (status, refused) = app
        .post(
            "/agents/producer/run",
            &json!({"inputs": {"user_request": "x", "total_budget": 1.0}, "provider_mode": "live"}),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["error"]["code"], "missing_key");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("ANTHROPIC_API_KEY"))
    );
    let (status, refused) = app
        .post(
            "/workflows/full_production/run",
            &json!({"inputs": {"user_request": "x", "total_budget": 1.0}, "provider_mode": "live", "async": true}),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["error"]["code"], "missing_key");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("ANTHROPIC_API_KEY"))
    );
    let (_, runs) = app.get("/runs").await;
    assert_eq!(runs["total"], 0, "nothing was stored");

    let server = MockServer::start().await;
    anthropic()
        .respond_with(message(&valid_plan(), 10, 10))
        .mount(&server)
        .await;
    let app = app_against(&server).await;
    let body = run_producer(&app).await;
    assert_eq!(body["status"], "completed");
    let id = body["run_id"].as_str().expect("id");
    let everything = [
        std::fs::read_to_string(
            app.dir
                .path()
                .join(format!("artifacts/runs/{id}/provider_calls.jsonl")),
        )
        .unwrap_or_default(),
        app.events(id)
            .await
            .iter()
            .map(Value::to_string)
            .collect::<String>(),
        app.api.as_ref().map(|p| p.log_text()).unwrap_or_default(),
        app.workers[0].log_text(),
        body.to_string(),
    ]
    .concat();
    assert!(!everything.contains(KEY), "the key leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_check_reports_what_is_configured_and_reachable() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/models"))
        .and(header("x-api-key", KEY))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"data": []})))
        .mount(&server)
        .await;
    let check = |key: Option<&str>| {
        let mut command = std::process::Command::new(crate::support::BIN);
        command
            .args(["providers", "check"])
            .env("ANTHROPIC_BASE_URL", server.uri())
            .env_remove("ANTHROPIC_API_KEY")
            .current_dir(std::env::temp_dir());
        if let Some(key) = key {
            command.env("ANTHROPIC_API_KEY", key);
        }
        let output = command.output().expect("providers check");
        assert!(output.status.success());
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let report = check(Some(KEY));
    assert!(
        report.contains("anthropic (text") && report.contains("configured, reachable"),
        "{report}"
    );
    assert!(!report.contains(KEY));
    let report = check(Some("sk-ant-wrong"));
    assert!(
        report.contains("configured, answered 404") || report.contains("refused"),
        "{report}"
    );
    let report = check(None);
    assert!(
        report.contains("not configured (set ANTHROPIC_API_KEY)"),
        "{report}"
    );
}

const RUNWAY_KEY: &str = "key_RUNWAYTESTSECRET77";

fn clip(dir: &std::path::Path) -> Vec<u8> {
    let path = dir.join("clip.mp4");
    let status = std::process::Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "color=c=red:s=320x180:d=2:r=10",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-f",
            "mp4",
        ])
        .arg(&path)
        .status()
        .expect("ffmpeg");
    assert!(status.success());
    std::fs::read(path).expect("clip")
}

fn task(status: &str, server: &MockServer) -> ResponseTemplate {
    let mut body = json!({"id": "task-1", "status": status});
    if status == "SUCCEEDED" {
        body["output"] = json!([format!("{}/files/clip.mp4", server.uri())]);
    }
    if status == "FAILED" {
        body["failure"] = json!("The prompt was flagged by content moderation");
        body["failureCode"] = json!("SAFETY.INPUT.TEXT");
    }
    ResponseTemplate::new(200).set_body_json(body)
}

async fn runway(server: &MockServer, running: u64, last: &str, dir: &std::path::Path) {
    Mock::given(method("POST"))
        .and(path("/v1/text_to_video"))
        .and(header(
            "authorization",
            format!("Bearer {RUNWAY_KEY}").as_str(),
        ))
        .and(header("x-runway-version", "2024-11-06"))
        .and(wiremock::matchers::header_exists("idempotency-key"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "task-1"})))
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/tasks/task-1"))
        .respond_with(task("RUNNING", server))
        .up_to_n_times(running)
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/tasks/task-1"))
        .respond_with(task(last, server))
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path("/files/clip.mp4"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_bytes(clip(dir))
                .insert_header("content-type", "video/mp4"),
        )
        .mount(server)
        .await;
}

async fn video_app(server: &MockServer, poll_ms: &str) -> TestApp {
    TestApp::new(Backend::Sqlite)
        .with_env("RUNWAY_API_KEY", RUNWAY_KEY)
        .with_env("RUNWAY_BASE_URL", &server.uri())
        .with_env("VIDEO_POLL_INTERVAL_MS", poll_ms)
        .with_api()
}

fn video_request(run_async: bool) -> Value {
    json!({"inputs": {"scene": {"scene_number": 1, "title": "Opening", "description": "A red morning",
                                "narration": "It begins.", "duration_secs": 2.0, "visual_prompt": "red sky"}},
           "provider_mode": "live", "async": run_async})
}

async fn creations(server: &MockServer) -> usize {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| r.method == wiremock::http::Method::POST)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_task_is_polled_until_done_downloaded_and_billed_and_an_upstream_failure_fails_the_run()
 {
    let server = MockServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    runway(&server, 2, "SUCCEEDED", dir.path()).await;
    let mut app = video_app(&server, "50").await;
    app.start_worker();
    let (status, body) = app
        .post("/agents/video_generator/run", &video_request(false))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "completed", "{body}");
    assert_eq!(body["result"]["simulated"], false);
    assert_eq!(body["cost_usd"], 0.1, "2 s at $0.05/s");
    let file = app
        .dir
        .path()
        .join("artifacts")
        .join(body["result"]["path"].as_str().expect("path"));
    assert_eq!(std::fs::read(&file).expect("downloaded"), clip(dir.path()));
    assert_eq!(creations(&server).await, 1);
    assert!(!body.to_string().contains(RUNWAY_KEY));

    let server = MockServer::start().await;
    runway(&server, 1, "FAILED", dir.path()).await;
    let mut app = video_app(&server, "50").await;
    app.start_worker();
    let (_, body) = app
        .post("/agents/video_generator/run", &video_request(false))
        .await;
    assert_eq!(body["status"], "failed", "{body}");
    assert_eq!(body["error"]["code"], "provider_task_failed");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("content moderation")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_polling_resumes_the_same_upstream_task() {
    let server = MockServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    runway(&server, 12, "SUCCEEDED", dir.path()).await;
    let mut app = video_app(&server, "200").await;
    app.start_worker();
    let (status, body) = app
        .post("/agents/video_generator/run", &video_request(true))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["run_id"].as_str().expect("id").to_owned();
    // Wait until the task exists upstream and is being polled, then kill the worker.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while server
        .received_requests()
        .await
        .map(|r| r.len())
        .unwrap_or(0)
        < 3
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the task was never polled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.workers[0].kill9();
    app.start_worker();
    let run = app
        .wait_status(&id, "completed", Duration::from_secs(60))
        .await;
    assert_eq!(run["stages"][0]["attempts"], 2, "{run:#}");
    assert_eq!(creations(&server).await, 1, "a second task was paid for");
    let calls = ledger(&app, &id);
    assert_eq!(calls.len(), 1, "the task was billed once: {calls:?}");
}

const ELEVEN_KEY: &str = "el_ELEVENTESTSECRET99";
const OPENAI_KEY: &str = "sk-OPENAITESTSECRET11";

fn mp3(dir: &std::path::Path, seconds: u32) -> Vec<u8> {
    let path = dir.join(format!("tone-{seconds}.mp3"));
    let status = std::process::Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
        ])
        .arg(format!("sine=frequency=440:duration={seconds}"))
        .args(["-c:a", "libmp3lame", "-f", "mp3"])
        .arg(&path)
        .status()
        .expect("ffmpeg");
    assert!(status.success());
    std::fs::read(path).expect("mp3")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speech_and_music_come_from_elevenlabs_or_openai_and_cost_what_they_say() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/text-to-speech/voice-1"))
        .and(header("xi-api-key", ELEVEN_KEY))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_bytes(mp3(dir.path(), 2))
                .insert_header("content-type", "audio/mpeg"),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/music"))
        .and(header("xi-api-key", ELEVEN_KEY))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_bytes(mp3(dir.path(), 3))
                .insert_header("content-type", "audio/mpeg"),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/audio/speech"))
        .and(header(
            "authorization",
            format!("Bearer {OPENAI_KEY}").as_str(),
        ))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_bytes(mp3(dir.path(), 1))
                .insert_header("content-type", "audio/mpeg"),
        )
        .expect(1)
        .mount(&server)
        .await;
    let script = "Hello from the studio, this is the voiceover.";
    let mut app = TestApp::new(Backend::Sqlite)
        .with_env("ELEVENLABS_API_KEY", ELEVEN_KEY)
        .with_env("ELEVENLABS_BASE_URL", &server.uri())
        .with_env("ELEVENLABS_VOICE_ID", "voice-1")
        .with_api();
    app.start_worker();
    let (_, voice) = app
        .post(
            "/agents/audio_generator/run",
            &json!({"inputs": {"script": script}, "provider_mode": "live"}),
        )
        .await;
    assert_eq!(voice["status"], "completed", "{voice}");
    let expected = (script.chars().count() as f64 * 0.30 / 1000.0 * 10_000.0).round() / 10_000.0;
    assert_eq!(voice["cost_usd"], expected, "{voice}");
    assert!(
        voice["result"]["provider"]
            .as_str()
            .is_some_and(|p| p.starts_with("elevenlabs/"))
    );
    assert!((voice["result"]["duration_secs"].as_f64().expect("duration") - 2.0).abs() < 0.2);
    let (_, music) = app
        .post(
            "/agents/audio_generator/run",
            &json!({"inputs": {"script": "calm piano", "kind": "music", "duration_secs": 3.0}, "provider_mode": "live"}),
        )
        .await;
    assert_eq!(music["status"], "completed", "{music}");
    assert_eq!(music["cost_usd"], 0.03, "3 s at $0.01/s");
    assert_eq!(music["result"]["simulated"], false);

    let mut app = TestApp::new(Backend::Sqlite)
        .with_env("SPEECH_PROVIDER", "openai")
        .with_env("OPENAI_API_KEY", OPENAI_KEY)
        .with_env("OPENAI_BASE_URL", &server.uri())
        .with_api();
    app.start_worker();
    let (_, voice) = app
        .post(
            "/agents/audio_generator/run",
            &json!({"inputs": {"script": "Short."}, "provider_mode": "live"}),
        )
        .await;
    assert_eq!(voice["status"], "completed", "{voice}");
    assert!(
        voice["result"]["provider"]
            .as_str()
            .is_some_and(|p| p.starts_with("openai/")),
        "{voice}"
    );
    for body in [voice.to_string(), music.to_string()] {
        assert!(!body.contains(ELEVEN_KEY) && !body.contains(OPENAI_KEY));
    }
}

/// A text model that answers each agent's request with a fitting JSON object, built from the
/// request's own input: the pilots asked for, the scene numbers asked for, one evaluation per
/// pilot.
struct StudioModel;

impl wiremock::Respond for StudioModel {
    fn respond(&self, request: &wiremock::Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).expect("request json");
        let system = body["system"].as_str().unwrap_or_default();
        let content = body["messages"][0]["content"].as_str().unwrap_or_default();
        let input: Value =
            serde_json::from_str(content.trim_start_matches("Input:\n")).expect("input json");
        let answer = if system.contains("the producer agent") {
            let n = input["num_pilots"].as_u64().unwrap_or(2) as u32;
            json!({"pilots": (1..=n).map(|k| {
                let mut p = pilot(&format!("pilot_{}", (b'a' + k as u8 - 1) as char), k);
                p["target_duration_secs"] = input["target_duration_secs"].clone();
                p["num_scenes"] = input["num_scenes"].clone();
                p
            }).collect::<Vec<_>>(), "total_budget": input["total_budget"]})
        } else if system.contains("the script_writer agent") {
            let each = input["target_duration"].as_f64().unwrap_or(8.0)
                / input["num_scenes"].as_f64().unwrap_or(4.0);
            let numbers: Vec<u64> = input["scene_numbers"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default();
            json!({"scenes": numbers.iter().map(|n| json!({"scene_number": n, "title": format!("Scene {n}"),
                "description": "A developer at work", "narration": format!("Part {n}."), "duration_secs": each,
                "visual_prompt": "a developer at a desk"})).collect::<Vec<_>>()})
        } else {
            let ids: Vec<String> = input["pilots"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p["strategy"]["pilot_id"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            json!({"evaluations": ids.iter().enumerate().map(|(i, id)| json!({"pilot_id": id, "score": 0.9 - i as f64 * 0.1,
                "approved": true, "strengths": ["clear"], "weaknesses": [], "notes": "good"})).collect::<Vec<_>>(),
                "approved_pilot": ids.first(), "threshold": 0.6})
        };
        message(&answer.to_string(), 1000, 500)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_production_runs_live_against_every_provider_and_its_cost_is_the_sum_of_their_bills()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let server = MockServer::start().await;
    anthropic().respond_with(StudioModel).mount(&server).await;
    runway(&server, 1, "SUCCEEDED", dir.path()).await;
    for (route, seconds) in [("/v1/text-to-speech/voice-1", 4), ("/v1/music", 8)] {
        Mock::given(method("POST"))
            .and(path(route))
            .and(header("xi-api-key", ELEVEN_KEY))
            .respond_with(ResponseTemplate::new(200).set_body_bytes(mp3(dir.path(), seconds)))
            .mount(&server)
            .await;
    }
    let mut app = TestApp::new(Backend::Sqlite)
        .with_env("ANTHROPIC_API_KEY", KEY)
        .with_env("ANTHROPIC_BASE_URL", &server.uri())
        .with_env("RUNWAY_API_KEY", RUNWAY_KEY)
        .with_env("RUNWAY_BASE_URL", &server.uri())
        .with_env("VIDEO_POLL_INTERVAL_MS", "50")
        .with_env("ELEVENLABS_API_KEY", ELEVEN_KEY)
        .with_env("ELEVENLABS_BASE_URL", &server.uri())
        .with_env("ELEVENLABS_VOICE_ID", "voice-1")
        .with_api();
    app.start_worker();
    let (status, started) = app
        .post(
            "/workflows/full_production/run",
            &json!({"inputs": {"user_request": "A developer's day", "total_budget": 100.0, "num_pilots": 2,
                               "target_duration_secs": 8, "num_scenes": 4},
                    "provider_mode": "live", "async": true}),
        )
        .await;
    assert_eq!(status, 202, "{started}");
    let id = started["run_id"].as_str().expect("id").to_owned();
    let run = app
        .wait_status(&id, "completed", Duration::from_secs(90))
        .await;
    assert_eq!(run["cost_simulated"], false);
    let calls = ledger(&app, &id);
    assert!(calls.iter().all(|c| c["simulated"] == false), "{calls:?}");
    let billed: f64 = calls.iter().filter_map(|c| c["cost_usd"].as_f64()).sum();
    let cost = run["cost_usd"].as_f64().expect("cost");
    assert!(
        (billed - cost).abs() < 1e-6,
        "ledger {billed} vs run {cost}"
    );
    // 2 pilots × 2 test scenes + 2 completion scenes = 6 videos of 2 s at $0.05/s.
    let videos: f64 = calls
        .iter()
        .filter(|c| c["agent"] == "video_generator")
        .filter_map(|c| c["cost_usd"].as_f64())
        .sum();
    assert!((videos - 0.6).abs() < 1e-9, "{videos}");
    // Each text call used 1,000 input and 500 output tokens.
    let text: Vec<&Value> = calls
        .iter()
        .filter(|c| {
            c["provider"]
                .as_str()
                .is_some_and(|p| p.starts_with("anthropic/"))
        })
        .collect();
    for call in &text {
        let cost = call["cost_usd"].as_f64().expect("cost");
        assert!(
            (cost - (1000.0 * 3.0 / 1e6 + 500.0 * 15.0 / 1e6)).abs() < 1e-9,
            "{call}"
        );
    }
    let final_video = app
        .dir
        .path()
        .join("artifacts")
        .join(run["result"]["final_video"].as_str().expect("final"));
    assert!(final_video.is_file());
    let everything = std::fs::read_to_string(
        app.dir
            .path()
            .join(format!("artifacts/runs/{id}/provider_calls.jsonl")),
    )
    .unwrap_or_default()
        + &app.workers[0].log_text()
        + &run.to_string();
    for key in [KEY, RUNWAY_KEY, ELEVEN_KEY] {
        assert!(!everything.contains(key));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_default_without_keys_is_documented_as_mock_only_and_answered_so() {
    let app = TestApp::new(Backend::Sqlite)
        .with_env("PROVIDER_MODE", "live")
        .with_api();
    let (status, openapi) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    let body = &openapi["paths"]["/agents/producer/run"]["post"]["requestBody"]["content"]["application/json"]
        ["schema"];
    assert_eq!(
        body["properties"]["provider_mode"]["enum"],
        json!(["mock"]),
        "{body}"
    );
    assert!(
        body["required"]
            .as_array()
            .is_some_and(|r| r.contains(&json!("provider_mode"))),
        "{body}"
    );
    // As documented: without provider_mode the request is refused, with mock it runs.
    let inputs = json!({"user_request": "x", "total_budget": 1.0});
    let (status, refused) = app
        .post("/agents/producer/run", &json!({"inputs": inputs}))
        .await;
    assert_eq!(status, 422, "{refused}");
    let (status, ran) = app
        .post(
            "/agents/producer/run",
            &json!({"inputs": inputs, "provider_mode": "mock", "async": true}),
        )
        .await;
    assert_eq!(status, 202, "{ran}");
}
