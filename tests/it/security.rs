//! Safe to expose: closed by default, tokens and their roles, CORS, bounded long-lived
//! requests, a cheap `/health`, exact idempotency keys, and inputs bounded by their schemas.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Backend, TestApp};

const WAIT: Duration = Duration::from_secs(30);

/// Runs `stagecraft serve` in the deployment's environment (plus `extra`) and answers whether
/// it is still serving after a moment, or else its exit status and log.
fn serve_outcome(app: &TestApp, extra: &[(&str, &str)]) -> Result<(), (bool, String)> {
    let log = app
        .dir
        .path()
        .join(format!("serve-{}.log", uuid::Uuid::new_v4()));
    let mut command = app.command(&["serve"]);
    command.envs(extra.iter().copied());
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("serve");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err((status.success(), text));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_to_start_open_where_anyone_could_reach_it() {
    let app = TestApp::new(Backend::Sqlite);
    for refused in [
        vec![("HOST", "0.0.0.0")],
        vec![("ENV", "production")],
        vec![("HOST", "0.0.0.0"), ("API_TOKEN", "")],
    ] {
        let (success, log) = serve_outcome(&app, &refused).expect_err("must refuse");
        assert!(!success, "{refused:?}");
        assert!(log.contains("API_TOKEN"), "{refused:?}: {log}");
        assert!(log.contains("ALLOW_UNAUTHENTICATED"), "{refused:?}: {log}");
    }
    // Asked for explicitly, it starts, saying so loudly.
    serve_outcome(
        &app,
        &[("HOST", "0.0.0.0"), ("ALLOW_UNAUTHENTICATED", "true")],
    )
    .expect("starts when asked to");
    serve_outcome(&app, &[("ENV", "production"), ("API_TOKEN", "a-token")])
        .expect("starts with a token");
    // A worker serves no HTTP and needs no token.
    let mut worker = app.command(&["worker"]);
    worker.envs([("ENV", "production"), ("HOST", "0.0.0.0")]);
    let mut child = worker
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("worker");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        matches!(child.try_wait(), Ok(None)),
        "the worker refused to start"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_setting_stops_start_up_naming_its_variable() {
    let app = TestApp::new(Backend::Sqlite);
    for (variable, value) in [
        ("RUN_RETENTION_DAYS", "99999999999999"),
        ("SYNC_WAIT_SECS", "18446744073709551615"),
        ("WORKER_CONCURRENCY", "100000000"),
        ("PRICE_VIDEO_PER_SECOND", "NaN"),
        ("CORS_ORIGINS", "*,https://a.example"),
        ("AWO_ALLOWED_HOSTS", "bad host"),
        ("AWO_AGENT_USER", "no-such-user-here"),
        ("CLAUDE_CLI_VERBOSE", "false"),
        ("API_TOKEN_READONLY", "only-the-weak-one"),
    ] {
        let (success, log) = serve_outcome(&app, &[(variable, value)]).expect_err("must refuse");
        assert!(!success, "{variable}={value}");
        assert!(log.contains(variable), "{variable}={value}: {log}");
        assert!(!log.contains("panicked"), "{variable}={value}: {log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_grant_their_roles_and_cors_star_means_any_origin() {
    let app = TestApp::new(Backend::Sqlite)
        .with_env("API_TOKEN", "full-token-0123456789")
        .with_env("API_TOKEN_READONLY", "read-token-0123456789")
        .with_env("CORS_ORIGINS", "*")
        .with_api();
    let send = |method: reqwest::Method, path: &str, authorization: Option<&str>| {
        let mut request = app.http.request(method, app.url(path));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        request
    };
    let submit = json!({"kind": "workflow", "name": "noop", "inputs": {}});
    for (authorization, read, write) in [
        (None, 401, 401),
        (Some("Bearer wrong"), 401, 401),
        (Some("Bearer read-token-0123456789"), 200, 403),
        (Some("bearer read-token-0123456789"), 200, 403),
        (Some("Bearer full-token-0123456789"), 200, 201),
        (Some("BEARER   full-token-0123456789"), 200, 201),
        (Some("Basic full-token-0123456789"), 401, 401),
    ] {
        let got = send(reqwest::Method::GET, "/runs", authorization)
            .send()
            .await
            .expect("GET");
        assert_eq!(got.status().as_u16(), read, "{authorization:?}");
        let posted = send(reqwest::Method::POST, "/runs", authorization)
            .json(&submit)
            .send()
            .await
            .expect("POST");
        assert_eq!(posted.status().as_u16(), write, "{authorization:?}");
        if write == 403 {
            let body: Value = posted.json().await.expect("json");
            assert_eq!(body["error"]["code"], "forbidden");
        }
    }
    // The document says so: the bearer scheme, 401 and 403 where they apply, /health open.
    let document: Value = send(
        reqwest::Method::GET,
        "/openapi.json",
        Some("Bearer read-token-0123456789"),
    )
    .send()
    .await
    .expect("openapi")
    .json()
    .await
    .expect("json");
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert!(document["paths"]["/runs"]["post"]["responses"]["403"].is_object());
    assert!(document["paths"]["/runs"]["get"]["responses"]["401"].is_object());
    assert_eq!(document["paths"]["/health"]["get"]["security"], json!([]));
    let preflight = send(reqwest::Method::OPTIONS, "/runs", None)
        .header("origin", "https://console.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("preflight");
    assert_eq!(
        preflight
            .headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("*")
    );
    assert!(
        preflight
            .headers()
            .get("access-control-allow-credentials")
            .is_none()
    );
    let (status, _) = app.get("/health").await;
    assert_eq!(status, 200, "/health needs no token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_and_synchronous_waits_are_capped_per_process() {
    let mut app = TestApp::new(Backend::Sqlite)
        .with_env("MAX_EVENT_STREAMS", "2")
        .with_env("MAX_SYNC_WAITS", "1")
        .with_env("SYNC_WAIT_SECS", "20")
        .with_api();
    let id = app.submit_demo(json!({})).await;
    // Two streams of a run no worker takes stay open; a third is refused at once.
    let mut open = Vec::new();
    for _ in 0..2 {
        let response = app
            .http
            .get(app.url(&format!("/runs/{id}/events")))
            .send()
            .await
            .expect("stream");
        assert_eq!(response.status().as_u16(), 200);
        open.push(response);
    }
    let refused = app
        .http
        .get(app.url(&format!("/runs/{id}/events")))
        .send()
        .await
        .expect("stream");
    assert_eq!(refused.status().as_u16(), 503);
    assert!(refused.headers().get("retry-after").is_some());
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["code"], "overloaded");
    // One synchronous submit waits; a second is refused before anything is stored.
    let (_, before) = app.get("/runs?limit=1").await;
    let waiting = {
        let http = app.http.clone();
        let url = app.url("/workflows/noop/run");
        tokio::spawn(async move { http.post(url).json(&json!({"inputs": {}})).send().await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, refused) = app
        .post("/workflows/noop/run", &json!({"inputs": {}}))
        .await;
    assert_eq!(status, 503, "{refused}");
    assert_eq!(refused["error"]["code"], "overloaded");
    let (_, after) = app.get("/runs?limit=1").await;
    assert_eq!(
        after["total"].as_u64(),
        before["total"].as_u64().map(|n| n + 1),
        "only the waiting submit stored a run"
    );
    // A worker finishes the runs: the streams end with the run, and the wait answers.
    app.start_worker();
    for stream in open {
        let text = tokio::time::timeout(WAIT, stream.text())
            .await
            .expect("the stream ends with its run")
            .expect("body");
        assert!(text.contains("event: run_completed"), "{text}");
    }
    let answered = waiting.await.expect("joined").expect("answer");
    assert_eq!(answered.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_never_starts_a_process() {
    let app = TestApp::new(Backend::Sqlite);
    let counter = app.dir.path().join("ffmpeg.calls");
    let standin = app.dir.path().join("ffmpeg");
    let real = which("ffmpeg");
    std::fs::write(
        &standin,
        format!(
            "#!/bin/sh\necho call >> '{}'\nexec '{}' \"$@\"\n",
            counter.display(),
            real
        ),
    )
    .expect("stand-in");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&standin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let app = app
        .with_env("FFMPEG_PATH", standin.to_str().expect("path"))
        .with_api();
    let started = Instant::now();
    for _ in 0..300 {
        let (status, health) = app.get("/health").await;
        assert_eq!(status, 200);
        assert_eq!(health["ffmpeg"]["available"], true, "{health}");
    }
    let calls = std::fs::read_to_string(&counter)
        .unwrap_or_default()
        .lines()
        .count();
    assert!(calls <= 1, "/health ran ffmpeg {calls} times");
    assert!(started.elapsed() < Duration::from_secs(20));
}

fn which(program: &str) -> String {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|p| p.is_file())
        })
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| panic!("{program} not found (apt-get install ffmpeg)"))
}

async fn idempotency_keys_are_scoped_kept_and_exact(backend: Backend) {
    let app = TestApp::new(backend).with_api();
    let key = [("Idempotency-Key", "order-42")];
    let body = json!({"kind": "workflow", "name": "demo", "inputs": {"sleep_ms": 5}});
    let (status, first) = app.post_raw("/runs", body.to_string(), &key).await;
    assert_eq!(status, 201, "{first}");
    let (status, again) = app.post_raw("/runs", body.to_string(), &key).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["run_id"], first["run_id"]);
    // The same key with another request is refused, naming the run it holds.
    let other = json!({"kind": "workflow", "name": "demo", "inputs": {"sleep_ms": 6}});
    let (status, conflict) = app.post_raw("/runs", other.to_string(), &key).await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["error"]["code"], "idempotency_conflict");
    assert_eq!(conflict["error"]["details"]["run_id"], first["run_id"]);
    // Another route family does not share the key.
    let (status, workflow) = app
        .post_raw(
            "/workflows/demo/run",
            json!({"inputs": {"sleep_ms": 5}, "async": true}).to_string(),
            &key,
        )
        .await;
    assert_eq!(status, 202, "{workflow}");
    assert_ne!(workflow["run_id"], first["run_id"]);
    // Waiting or not does not change what was asked for.
    let (status, replay) = app
        .post_raw(
            "/workflows/demo/run",
            json!({"inputs": {"sleep_ms": 5}, "run_async": true}).to_string(),
            &key,
        )
        .await;
    assert_eq!(status, 202, "{replay}");
    assert_eq!(replay["run_id"], workflow["run_id"]);
    for bad in ["", "tab\there", &"k".repeat(201)] {
        let (status, refused) = app
            .post_raw("/runs", body.to_string(), &[("Idempotency-Key", bad)])
            .await;
        assert!(
            status == 422 || status == 400,
            "{bad:?}: {status} {refused}"
        );
    }
}

crate::conformance!(idempotency_keys_are_scoped_kept_and_exact);

/// A valid input of every agent (files they read are not needed to be accepted).
fn valid_inputs(agent: &str) -> Value {
    let scene = json!({"scene_number": 1, "title": "Opening", "description": "A quiet street",
                       "narration": "It begins.", "duration_secs": 1.5, "visual_prompt": "dawn"});
    let strategy = json!({"pilot_id": "pilot_a", "version": 1, "concept": "c", "tone": "calm",
        "visual_style": "soft", "target_duration_secs": 3, "num_scenes": 2, "test_scenes": 1,
        "budget_usd": 5.0, "rationale": "r"});
    let clip = json!({"scene_number": 1, "version": 1, "path": "runs/x/videos/a.mp4",
                      "duration_secs": 1.5, "provider": "p", "cost_usd": 0.1, "simulated": true});
    let qa = json!({"path": "runs/x/videos/a.mp4", "passed": true, "duration_secs": 1.5,
                    "width": 320, "height": 180, "has_video": true, "has_audio": false,
                    "issues": ["none"]});
    match agent {
        "producer" => json!({"user_request": "A video", "total_budget": 10.0, "num_pilots": 2,
                             "target_duration_secs": 20, "num_scenes": 2}),
        "script_writer" => json!({"video_concept": "Trains", "target_duration": 6, "num_scenes": 3,
                                  "tone": "calm", "visual_style": "soft"}),
        "video_generator" => json!({"scene": scene, "version": 1}),
        "audio_generator" => json!({"script": "Hello.", "kind": "music", "duration_secs": 3}),
        "critic" => {
            json!({"pilots": [{"strategy": strategy, "scenes": [scene], "videos": [clip], "qa": [qa]}],
                           "approval_threshold": 0.5, "user_request": "A video"})
        }
        "qa_verifier" => json!({"video": "runs/x/videos/a.mp4", "expected_duration_secs": 1.5}),
        "editor" => json!({"clips": [{"scene": scene, "video": "runs/x/videos/a.mp4"}],
                           "voiceover": "runs/x/audio/v.mp3", "music": "runs/x/audio/m.mp3"}),
        other => panic!("no example for {other}"),
    }
}

/// The schema a `$ref` names, in an agent's schema document.
fn resolve<'a>(document: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.rsplit('/').next().expect("name");
            &document["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// Every value just over a limit of `schema`, with the path of the field it breaks.
fn over_the_limits(
    document: &Value,
    schema: &Value,
    value: &Value,
    path: &str,
    out: &mut Vec<(String, Value)>,
) {
    let schema = resolve(document, schema);
    if let Some(options) = schema["oneOf"].as_array().or(schema["anyOf"].as_array()) {
        for option in options.iter().filter(|o| o["type"] != "null") {
            over_the_limits(document, option, value, path, out);
        }
        return;
    }
    if let Some(max) = schema["maxLength"].as_u64() {
        out.push((path.to_owned(), json!("x".repeat(max as usize + 1))));
    }
    if let Some(max) = schema["maximum"].as_f64() {
        out.push((path.to_owned(), json!(max + 1.0)));
    }
    if let Some(min) = schema["minimum"].as_f64() {
        out.push((path.to_owned(), json!(min - 1.0)));
    }
    if let (Some(max), Some(items)) = (schema["maxItems"].as_u64(), value.as_array()) {
        if let Some(first) = items.first() {
            out.push((
                path.to_owned(),
                Value::Array(vec![first.clone(); max as usize + 1]),
            ));
        }
    }
    if let (Some(items), Some(first)) = (value.as_array(), value.as_array().and_then(|a| a.first()))
    {
        let _ = items;
        let item_schema = &schema["items"];
        let mut inner = Vec::new();
        over_the_limits(
            document,
            item_schema,
            first,
            &format!("{path}.0"),
            &mut inner,
        );
        for (field, broken) in inner {
            let mut copy = value.clone();
            copy[0] = broken;
            out.push((field, copy));
        }
    }
    if let (Some(properties), Some(fields)) = (schema["properties"].as_object(), value.as_object())
    {
        for (name, field) in fields {
            if let Some(property) = properties.get(name) {
                let mut inner = Vec::new();
                over_the_limits(
                    document,
                    property,
                    field,
                    &format!("{path}.{name}"),
                    &mut inner,
                );
                for (broken_path, broken) in inner {
                    let mut copy = value.clone();
                    copy[name] = broken;
                    out.push((broken_path, copy));
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_over_any_limit_of_every_agent_is_refused_and_nothing_is_stored() {
    let app = TestApp::new(Backend::Sqlite).with_api();
    let (_, agents) = app.get("/agents").await;
    let mut tried = 0;
    for agent in agents["agents"].as_array().expect("agents") {
        let agent = agent.as_str().expect("name");
        let (_, document) = app.get(&format!("/agents/{agent}/schema")).await;
        let valid = valid_inputs(agent);
        let mut broken = Vec::new();
        over_the_limits(
            &document,
            &document["inputs"],
            &valid,
            "inputs",
            &mut broken,
        );
        assert!(!broken.is_empty(), "{agent} has no limits");
        for (field, inputs) in broken {
            let (status, refused) = app
                .post(
                    &format!("/agents/{agent}/run"),
                    &json!({"inputs": inputs, "async": true}),
                )
                .await;
            assert_eq!(status, 422, "{agent} {field}: {refused}");
            let named = refused["error"]["details"]["field"]
                .as_str()
                .unwrap_or_default();
            assert!(
                field.starts_with(named),
                "{agent}: broke {field}, refused {named}"
            );
            tried += 1;
        }
        // The valid example itself is accepted.
        let (status, accepted) = app
            .post(
                &format!("/agents/{agent}/run"),
                &json!({"inputs": valid, "async": true}),
            )
            .await;
        assert_eq!(status, 202, "{agent}: {accepted}");
    }
    assert!(tried > 60, "only {tried} limits tried");
    // A meaningless repeat (the same pilot twice) is refused too.
    let mut twice = valid_inputs("critic");
    let pilot = twice["pilots"][0].clone();
    twice["pilots"] = json!([pilot.clone(), pilot]);
    let (status, refused) = app
        .post(
            "/agents/critic/run",
            &json!({"inputs": twice, "async": true}),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["error"]["details"]["field"], "inputs.pilots");
    let (_, runs) = app.get("/runs?limit=1").await;
    assert_eq!(runs["total"], 7, "only the valid examples were stored");
}

/// ffmpeg gets the base environment and nothing secret of the deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_tools_see_nothing_secret() {
    let app = TestApp::new(Backend::Sqlite);
    let dumps = app.dir.path().join("ffmpeg-env");
    std::fs::create_dir_all(&dumps).expect("dumps");
    let standin = app.dir.path().join("ffmpeg");
    std::fs::write(
        &standin,
        format!(
            "#!/bin/sh\nenv > '{}/'$$\nexec '{}' \"$@\"\n",
            dumps.display(),
            which("ffmpeg")
        ),
    )
    .expect("stand-in");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&standin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let secrets = [
        ("API_TOKEN", "api-token-SECRET-0123"),
        ("OPENAI_API_KEY", "sk-proj-SECRETSECRET0123"),
        ("ELEVENLABS_API_KEY", "eleven-SECRET-0123"),
        ("RUNWAY_API_KEY", "runway-SECRET-0123"),
        ("ANTHROPIC_API_KEY", "sk-ant-SECRETSECRET0123"),
        ("GITHUB_TOKEN", "ghp_SECRETSECRET0123456"),
    ];
    let mut app = app.with_env("FFMPEG_PATH", standin.to_str().expect("path"));
    for (name, value) in secrets {
        app = app.with_env(name, value);
    }
    let mut app = app.with_api();
    app.start_worker();
    let scene = json!({"scene_number": 1, "title": "T", "description": "A street",
                       "narration": "n", "duration_secs": 1.0, "visual_prompt": "p"});
    let response = app
        .http
        .post(app.url("/agents/video_generator/run"))
        .bearer_auth("api-token-SECRET-0123")
        .json(&json!({"inputs": {"scene": scene}}))
        .send()
        .await
        .expect("run");
    assert_eq!(response.status().as_u16(), 200);
    let mut seen = 0;
    for dump in std::fs::read_dir(&dumps).expect("dumps").flatten() {
        let env = std::fs::read_to_string(dump.path()).expect("dump");
        assert!(env.contains("PATH="), "{env}");
        for (name, value) in secrets {
            assert!(!env.contains(value), "ffmpeg saw {name}: {env}");
        }
        assert!(
            !env.contains("DATA_DIR"),
            "ffmpeg saw the deployment's settings: {env}"
        );
        seen += 1;
    }
    assert!(seen >= 2, "ffmpeg ran {seen} times");
}
