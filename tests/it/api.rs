//! The HTTP API and the CLI, through real processes.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Backend, TestApp, stage};

const WAIT: Duration = Duration::from_secs(30);

async fn a_submitted_run_completes_with_the_status_document_of_the_spec(backend: Backend) {
    let app = TestApp::started(backend);
    let (status, health) = app.get("/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["mode"], "mock");
    assert_eq!(health["backend"], backend.name());

    let id = app
        .submit_demo(json!({"sleep_ms": 30, "steps": 2, "cost_usd": 0.25}))
        .await;
    let run = app.wait_status(&id, "completed", WAIT).await;
    for field in [
        "run_id",
        "kind",
        "name",
        "status",
        "inputs",
        "provider_mode",
        "current_stage",
        "last_completed_stage",
        "stages",
        "cost_usd",
        "budget_usd",
        "result",
        "error",
        "created_at",
        "updated_at",
        "worker",
        "artifacts_url",
    ] {
        assert!(
            run.get(field).is_some(),
            "status document lacks {field}: {run:#}"
        );
    }
    assert_eq!(run["kind"], "workflow");
    assert_eq!(run["name"], "demo");
    assert_eq!(run["provider_mode"], "mock");
    assert_eq!(run["last_completed_stage"], "three");
    assert_eq!(run["artifacts_url"], format!("/artifacts/runs/{id}"));
    assert!((run["cost_usd"].as_f64().expect("cost") - 0.75).abs() < 1e-9);
    let names: Vec<&str> = run["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| s["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["one", "two", "three"]);
    for name in names {
        let stage = stage(&run, name);
        assert_eq!(stage["status"], "completed");
        assert_eq!(stage["attempts"], 1);
        assert!(stage["started_at"].is_string() && stage["finished_at"].is_string());
        assert_eq!(stage["progress"], json!({"done": 2, "total": 2}));
        let artifacts = stage["artifacts"].as_array().expect("artifacts");
        assert_eq!(artifacts.len(), 3, "two steps and an output: {artifacts:?}");
        for artifact in artifacts {
            let path = app
                .dir
                .path()
                .join("artifacts")
                .join(artifact.as_str().expect("path"));
            assert!(path.is_file(), "{} is missing", path.display());
        }
    }
    assert_eq!(run["result"]["stages"].as_array().expect("result").len(), 3);
    assert!(run["worker"].as_str().expect("worker").contains(":worker-"));

    let (status, list) = app
        .get("/runs?kind=workflow&status=completed&name=demo")
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["total"], 1);
    assert_eq!(list["runs"][0]["run_id"], id.as_str());
}

async fn events_stream_the_run_and_end_when_it_finishes(backend: Backend) {
    let app = TestApp::started(backend);
    let id = app.submit_demo(json!({"sleep_ms": 20, "steps": 2})).await;
    let events = tokio::time::timeout(WAIT, app.events(&id))
        .await
        .expect("stream ends");
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds.first(), Some(&"run_queued"));
    assert_eq!(kinds.last(), Some(&"run_completed"));
    assert_eq!(kinds.iter().filter(|k| **k == "stage_completed").count(), 3);
    assert_eq!(kinds.iter().filter(|k| **k == "step_completed").count(), 6);
    let seqs: Vec<i64> = events
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "events out of order: {seqs:?}"
    );
}

async fn bad_input_is_refused_with_a_json_error_and_nothing_is_stored(backend: Backend) {
    let app = TestApp::new(backend)
        .with_env("MAX_BODY_BYTES", "2048")
        .with_api();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "malformed JSON",
            "{\"kind\": ".to_owned(),
            400,
            "malformed_json",
        ),
        ("not an object", "[1, 2]".to_owned(), 422, "invalid_input"),
        (
            "wrong type",
            json!({"kind": "workflow", "name": 7}).to_string(),
            422,
            "invalid_input",
        ),
        (
            "unknown kind",
            json!({"kind": "batch", "name": "demo"}).to_string(),
            422,
            "invalid_input",
        ),
        (
            "missing name",
            json!({"kind": "workflow"}).to_string(),
            422,
            "invalid_input",
        ),
        (
            "unknown field",
            json!({"kind": "workflow", "name": "demo", "extra": 1}).to_string(),
            422,
            "invalid_input",
        ),
        (
            "unknown workflow",
            json!({"kind": "workflow", "name": "nope"}).to_string(),
            404,
            "unknown_workflow",
        ),
        (
            "wrong input type",
            json!({"kind": "workflow", "name": "demo", "inputs": {"sleep_ms": "slow"}}).to_string(),
            422,
            "invalid_input",
        ),
        (
            "unknown input",
            json!({"kind": "workflow", "name": "demo", "inputs": {"speed": 1}}).to_string(),
            422,
            "invalid_input",
        ),
        (
            "unknown stage in input",
            json!({"kind": "workflow", "name": "demo", "inputs": {"fatal": "four"}}).to_string(),
            422,
            "invalid_input",
        ),
        (
            "inputs not an object",
            json!({"kind": "workflow", "name": "demo", "inputs": [1]}).to_string(),
            422,
            "invalid_input",
        ),
        (
            "negative budget",
            json!({"kind": "workflow", "name": "demo", "budget_usd": -1}).to_string(),
            422,
            "invalid_input",
        ),
        (
            "oversize body",
            json!({"kind": "workflow", "name": "demo", "inputs": {"pad": "x".repeat(4096)}})
                .to_string(),
            413,
            "payload_too_large",
        ),
    ];
    for (what, body, expected_status, expected_code) in cases {
        let (status, error) = app.post_raw("/runs", body, &[]).await;
        assert_eq!(status, expected_status, "{what}: {error}");
        assert_eq!(error["error"]["code"], expected_code, "{what}: {error}");
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {error}"
        );
    }
    let (_, error) = app
        .post_raw(
            "/runs",
            json!({"kind": "workflow", "name": "demo", "inputs": {"sleep_ms": "slow"}}).to_string(),
            &[],
        )
        .await;
    assert_eq!(error["error"]["details"]["field"], "inputs.sleep_ms");

    let missing = "01939a4e-0000-7000-8000-000000000000";
    for path in [
        format!("/runs/{missing}"),
        "/runs/not-a-uuid".to_owned(),
        format!("/workflows/status/{missing}"),
    ] {
        let (status, error) = app.get(&path).await;
        assert_eq!(status, 404, "{path}: {error}");
        assert_eq!(error["error"]["code"], "not_found");
    }
    let (status, _) = app
        .post(&format!("/runs/{missing}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 404);
    let (status, error) = app.get("/runs?status=sleeping").await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (422, Some("invalid_query"))
    );

    let (_, list) = app.get("/runs").await;
    assert_eq!(
        list["total"], 0,
        "a refused request stored something: {list}"
    );
}

async fn resume_refuses_unknown_stages_and_running_runs(backend: Backend) {
    let app = TestApp::started(backend);
    let id = app.submit_demo(json!({"sleep_ms": 10})).await;
    app.wait_status(&id, "completed", WAIT).await;
    let (status, error) = app
        .post(
            &format!("/runs/{id}/resume"),
            &json!({"from_stage": "four"}),
        )
        .await;
    // The stages are the run's: naming one it does not have conflicts with its state.
    assert_eq!(status, 409, "{error}");
    assert_eq!(error["error"]["code"], "invalid_from_stage");
    assert_eq!(
        error["error"]["details"]["stages"],
        json!(["one", "two", "three"])
    );
    let (status, error) = app
        .post(&format!("/runs/{id}/resume"), &json!({"from_stage": 3}))
        .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (422, Some("invalid_input"))
    );
    let (status, error) = app.post(&format!("/runs/{id}/resume"), &json!({})).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (409, Some("conflict")),
        "all stages done: {error}"
    );

    let running = app.submit_demo(json!({"sleep_ms": 3000})).await;
    app.wait_status(&running, "running", WAIT).await;
    let (status, error) = app
        .post(
            &format!("/runs/{running}/resume"),
            &json!({"from_stage": "auto"}),
        )
        .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (409, Some("conflict"))
    );
    app.post(&format!("/runs/{running}/cancel"), &json!({}))
        .await;
    app.wait_status(&running, "cancelled", WAIT).await;
    let run = app.run(&id).await;
    assert_eq!(
        run["status"], "completed",
        "a refused resume changed the run"
    );
}

async fn an_idempotency_key_returns_the_same_run(backend: Backend) {
    let app = TestApp::new(backend).with_api();
    let body = json!({"kind": "workflow", "name": "demo", "inputs": {}}).to_string();
    let (first_status, first) = app
        .post_raw("/runs", body.clone(), &[("idempotency-key", "order-42")])
        .await;
    let (second_status, second) = app
        .post_raw("/runs", body.clone(), &[("idempotency-key", "order-42")])
        .await;
    let (_, other) = app
        .post_raw("/runs", body, &[("idempotency-key", "order-43")])
        .await;
    assert_eq!((first_status, second_status), (201, 200));
    assert_eq!(first["run_id"], second["run_id"]);
    assert_ne!(first["run_id"], other["run_id"]);
    // A burst of the same key at once (a double click, a client's retries): one run, and every
    // answer names it, whether its request stored it or found it not yet committed.
    let body = json!({"kind": "workflow", "name": "demo", "inputs": {}}).to_string();
    let answers = futures::future::join_all(
        (0..32).map(|_| app.post_raw("/runs", body.clone(), &[("idempotency-key", "burst-1")])),
    )
    .await;
    let created = answers.iter().filter(|(status, _)| *status == 201).count();
    assert_eq!(created, 1, "{answers:?}");
    for (status, answer) in &answers {
        assert!(matches!(status, 200 | 201), "{status}: {answer}");
        assert_eq!(answer["run_id"], answers[0].1["run_id"], "{answer}");
    }
    let (_, list) = app.get("/runs").await;
    assert_eq!(list["total"], 3);
}

async fn a_configured_token_guards_every_route_but_health(backend: Backend) {
    let app = TestApp::new(backend)
        .with_env("API_TOKEN", "s3cret-token")
        .with_api();
    let (status, _) = app.get("/health").await;
    assert_eq!(status, 200);
    for token in [None, Some("wrong"), Some("s3cret-tokenX")] {
        let mut request = app.http.get(app.url("/runs"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("GET");
        assert_eq!(response.status().as_u16(), 401, "token {token:?}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let response = app
        .http
        .get(app.url("/runs"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status().as_u16(), 200);
    let response = app
        .http
        .post(app.url("/runs"))
        .json(&json!({"kind": "workflow", "name": "demo"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status().as_u16(), 401);
    let log = app.api.as_ref().expect("api").log_text();
    assert!(!log.contains("s3cret-token"), "the token reached the log");
}

async fn the_openapi_document_and_docs_are_served_offline(backend: Backend) {
    let app = TestApp::new(backend).with_api();
    let (status, openapi) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    for path in [
        "/runs",
        "/runs/{id}",
        "/runs/{id}/events",
        "/runs/{id}/cancel",
        "/runs/{id}/resume",
        "/health",
        "/workflows",
        "/workflows/demo/run",
        "/workflows/full_production/run",
        "/agents/producer/run",
        "/workflows/status/{run_id}",
        "/queues",
        "/metrics",
    ] {
        assert!(
            openapi["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    // Every reference resolves, and types of the same Rust name keep schemas of their own.
    let schemas = &openapi["components"]["schemas"];
    let text = openapi.to_string();
    for reference in text.split("\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap_or_default();
        assert!(
            schemas.get(name).is_some(),
            "{name} is referenced but not defined"
        );
    }
    assert!(
        schemas["ArtifactEntry"]["properties"].get("url").is_some(),
        "{}",
        schemas["ArtifactEntry"]
    );
    assert!(
        schemas["Entry"]["properties"].get("text").is_some(),
        "{}",
        schemas["Entry"]
    );
    let response = app.http.get(app.url("/docs/")).send().await.expect("docs");
    assert_eq!(response.status().as_u16(), 200);
    let html = response.text().await.expect("html");
    assert!(html.contains("swagger"), "not the Swagger UI");
    assert!(
        !html.contains("https://"),
        "docs page loads something from the internet"
    );
    let (status, root) = app.get("/").await;
    assert_eq!(status, 200);
    assert_eq!(root["docs"], "/docs");
}

async fn workflow_routes_run_sync_and_async(backend: Backend) {
    let app = TestApp::started(backend);
    let (status, listed) = app.get("/workflows").await;
    assert_eq!(status, 200);
    let stages_of = |name: &str| {
        listed["workflows"]
            .as_array()
            .and_then(|all| all.iter().find(|w| w["name"] == name))
            .map(|w| w["stages"].clone())
            .unwrap_or_else(|| panic!("{name} is not listed: {listed}"))
    };
    assert_eq!(stages_of("demo"), json!(["one", "two", "three"]));
    assert_eq!(
        stages_of("full_production"),
        json!(["planning", "pilots", "evaluation", "completion", "editing"])
    );
    assert_eq!(
        stages_of("pilot_only"),
        json!(["planning", "pilots", "evaluation"])
    );
    assert_eq!(stages_of("audio_only"), json!(["audio"]));

    let (status, sync) = app
        .post("/workflows/demo/run", &json!({"inputs": {"sleep_ms": 10}}))
        .await;
    assert_eq!(status, 200, "{sync}");
    assert_eq!(sync["status"], "completed");
    assert_eq!(sync["workflow"], "demo");
    assert_eq!(sync["result"]["stages"].as_array().map(Vec::len), Some(3));

    for flag in ["async", "run_async"] {
        let (status, started) = app
            .post(
                "/workflows/demo/run",
                &json!({"inputs": {"sleep_ms": 10}, flag: true}),
            )
            .await;
        assert_eq!(status, 202, "{started}");
        assert!(matches!(
            started["status"].as_str(),
            Some("queued" | "running")
        ));
        let id = started["run_id"].as_str().expect("id");
        let (status, doc) = app.get(&format!("/workflows/status/{id}")).await;
        assert_eq!(status, 200);
        assert_eq!(doc["run_id"], id);
        app.wait_status(id, "completed", WAIT).await;
        let (status, resumed) = app
            .post(
                &format!("/workflows/demo/resume/{id}"),
                &json!({"from_stage": "three"}),
            )
            .await;
        assert_eq!(status, 200, "{resumed}");
        app.wait_status(id, "completed", WAIT).await;
    }
}

async fn the_cli_submits_waits_lists_and_resumes(backend: Backend) {
    let app = TestApp::started(backend);
    let cli = |args: &[&str]| {
        let output = app
            .command(args)
            .env("STAGECRAFT_URL", &app.base_url)
            .output()
            .expect("cli runs");
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<Value>(&output.stdout).expect("cli prints JSON")
    };
    let run = cli(&[
        "submit",
        "demo",
        "--inputs",
        r#"{"sleep_ms": 10}"#,
        "--wait",
    ]);
    assert_eq!(run["status"], "completed");
    let id = run["run_id"].as_str().expect("id").to_owned();
    assert_eq!(cli(&["status", &id])["run_id"], id.as_str());
    assert_eq!(cli(&["runs", "--status", "completed"])["total"], 1);
    let resumed = cli(&["resume", &id, "--from-stage", "two"]);
    assert!(
        matches!(
            resumed["status"].as_str(),
            Some("queued" | "running" | "completed")
        ),
        "{resumed}"
    );
    app.wait_status(&id, "completed", WAIT).await;

    let output = app
        .command(&["status", "nope"])
        .env("STAGECRAFT_URL", &app.base_url)
        .output()
        .expect("cli runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not_found"));
}

async fn operators_see_queues_workers_dead_runs_and_metrics(backend: Backend) {
    let app = TestApp::started(backend);
    let id = app.submit_demo(json!({"fail": {"two": 3}})).await;
    app.wait_status(&id, "failed", WAIT).await;
    let run_cli = |args: &[&str]| {
        let output = app.command(args).output().expect("cli runs");
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let dead: Value = serde_json::from_str(&run_cli(&["inspect", "dead", "--json"])).expect("json");
    assert_eq!(dead["total"], 1);
    assert_eq!(dead["runs"][0]["run_id"], id.as_str());
    assert_eq!(dead["runs"][0]["error"]["code"], "attempts_exhausted");
    let queues: Value =
        serde_json::from_str(&run_cli(&["inspect", "queues", "--json"])).expect("json");
    assert_eq!(
        queues["queues"],
        json!([{"queue": "workflows", "status": "failed", "count": 1}])
    );
    let table = run_cli(&["inspect", "run", &id]);
    assert!(
        table.contains("attempts_exhausted") && table.contains("retry_scheduled"),
        "{table}"
    );
    assert!(run_cli(&["inspect", "runs", "--status", "failed"]).contains(&id));

    // Workers report themselves every 2 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let workers: Value =
            serde_json::from_str(&run_cli(&["inspect", "workers", "--json"])).expect("json");
        if workers["workers"].as_array().is_some_and(|w| w.len() == 1) {
            assert!(
                workers["workers"][0]["id"]
                    .as_str()
                    .is_some_and(|id| id.contains(":worker-"))
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no worker listed: {workers}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, workers) = app.get("/workers").await;
    assert_eq!(status, 200);
    assert_eq!(
        workers["workers"][0]["queues"],
        json!(["agents", "workflows", "work_orders"])
    );

    let retried: Value = serde_json::from_str(&run_cli(&["retry", &id])).expect("json");
    assert!(
        matches!(
            retried["status"].as_str(),
            Some("queued" | "running" | "completed")
        ),
        "{retried}"
    );
    app.wait_status(&id, "completed", WAIT).await;

    // Counters flushed by the worker reach /metrics on the API process.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = app
            .http
            .get(app.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let flushed = text.contains("stagecraft_stage_retries_total 2")
            && text.contains("stagecraft_runs_finished_total{outcome=\"completed\"} 1");
        if flushed {
            assert!(
                text.contains("stagecraft_runs{queue=\"workflows\",status=\"completed\"} 1"),
                "{text}"
            );
            assert!(text.contains("stagecraft_workers_live 1"), "{text}");
            assert!(
                text.contains("stagecraft_stage_duration_seconds_count{stage=\"two\"} 4"),
                "{text}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics not flushed: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn a_bad_configuration_value_stops_start_up_naming_the_variable() {
    let app = TestApp::new(Backend::Sqlite).with_env("LEASE_TTL_SECS", "soon");
    let output = app.command(&["serve"]).output().expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("LEASE_TTL_SECS"), "{stderr}");
}

crate::conformance!(
    a_submitted_run_completes_with_the_status_document_of_the_spec,
    events_stream_the_run_and_end_when_it_finishes,
    bad_input_is_refused_with_a_json_error_and_nothing_is_stored,
    resume_refuses_unknown_stages_and_running_runs,
    an_idempotency_key_returns_the_same_run,
    a_configured_token_guards_every_route_but_health,
    the_openapi_document_and_docs_are_served_offline,
    workflow_routes_run_sync_and_async,
    the_cli_submits_waits_lists_and_resumes,
    operators_see_queues_workers_dead_runs_and_metrics,
    the_run_list_filters_searches_and_acts_in_bulk,
);

/// Run ids of a run list answer, in order.
fn listed(body: &Value) -> Vec<String> {
    body["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| r["run_id"].as_str().expect("id").to_owned())
        .collect()
}

async fn the_run_list_filters_searches_and_acts_in_bulk(backend: Backend) {
    let app = TestApp::new(backend).with_api();
    let lighthouse = app.submit_demo(json!({"cost_usd": 0.31337})).await;
    // Run ids carry their creation time to the millisecond: a boundary strictly between.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let before_second = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let harbour = app.submit_demo(json!({"cost_usd": 0.4242})).await;
    let fatal = app.submit_demo(json!({"fatal": "one"})).await;
    // No worker yet: all three wait.
    let (status, body) = app.get("/runs?q=31337").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(listed(&body), [lighthouse.as_str()]);
    let (_, body) = app
        .get(&format!(
            "/runs?created_after={}",
            urlencode(&before_second)
        ))
        .await;
    assert_eq!(listed(&body), [fatal.as_str(), harbour.as_str()]);
    let (_, body) = app
        .get(&format!(
            "/runs?created_before={}&status=queued",
            urlencode(&before_second)
        ))
        .await;
    assert_eq!(listed(&body), [lighthouse.as_str()]);
    let (_, body) = app.get("/runs?queue=workflows&limit=2").await;
    assert_eq!(listed(&body), [fatal.as_str(), harbour.as_str()]);
    let cursor = body["next_cursor"].as_str().expect("cursor").to_owned();
    let (_, body) = app
        .get(&format!("/runs?queue=workflows&limit=2&cursor={cursor}"))
        .await;
    assert_eq!(listed(&body), [lighthouse.as_str()]);
    for bad in [
        "q=ab",
        "created_after=yesterday",
        "min_cost_usd=-1",
        "queue=",
    ] {
        let (status, body) = app.get(&format!("/runs?{bad}")).await;
        assert_eq!(status, 422, "{bad}: {body}");
    }
    bulk_cancel_counts_first_then_names_its_actor(&app, &harbour).await;
    let mut app = app;
    app.start_worker();
    app.wait_status(&fatal, "failed", Duration::from_secs(30))
        .await;
    app.wait_status(&lighthouse, "completed", Duration::from_secs(30))
        .await;
    let (_, costly) = app.get("/runs?min_cost_usd=0.9&max_cost_usd=1").await;
    assert_eq!(
        listed(&costly),
        [lighthouse.as_str()],
        "three stages at $0.31337"
    );
    a_failed_run_is_found_grouped_previewed_and_retried(&app, &fatal, &lighthouse).await;
    finished_runs_make_the_queues_history(&app).await;
}

/// Bulk: a dry run counts, changes nothing; then the change, named in the run's events.
async fn bulk_cancel_counts_first_then_names_its_actor(app: &TestApp, harbour: &str) {
    // `max_runs` is a JSON Schema integer: 1.0 is one.
    let cancel = json!({"action": "cancel", "filter": {"q": "4242"}, "max_runs": 1.0});
    let (status, dry) = app.post("/runs/bulk", &cancel).await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(
        (dry["dry_run"].as_bool(), dry["changed"].as_u64()),
        (Some(true), Some(1))
    );
    assert_eq!(app.run(harbour).await["status"], "queued");
    let mut real = cancel.clone();
    real["dry_run"] = json!(false);
    let (_, done) = app.post("/runs/bulk", &real).await;
    assert_eq!(done["changed"], 1, "{done}");
    assert_eq!(app.run(harbour).await["status"], "cancelled");
    let events = app.events(harbour).await;
    let cancelled = events
        .iter()
        .find(|e| e["kind"] == "run_cancelled")
        .expect("event");
    assert_eq!(
        cancelled["data"]["actor"],
        json!({"role": "anonymous", "via": "api"})
    );
}

/// The failed run: found by error code, grouped, previewed and retried.
async fn a_failed_run_is_found_grouped_previewed_and_retried(
    app: &TestApp,
    fatal: &str,
    lighthouse: &str,
) {
    let (_, failed) = app.get("/runs?status=failed").await;
    let code = failed["runs"][0]["error"]["code"]
        .as_str()
        .expect("code")
        .to_owned();
    let (_, by_code) = app.get(&format!("/runs?error_code={code}")).await;
    assert_eq!(listed(&by_code), [fatal]);
    let (_, groups) = app.get("/failures").await;
    assert_eq!(groups["groups"][0]["code"], code.as_str(), "{groups}");
    assert_eq!(groups["groups"][0]["latest_run_id"], fatal);
    let (status, preview) = app.get(&format!("/runs/{fatal}/resume-preview")).await;
    assert_eq!(status, 200, "{preview}");
    assert_eq!(preview["from_stage"], "one");
    let redo: Vec<&str> = preview["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .filter(|s| s["redo"] == true)
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(redo, ["one", "two", "three"]);
    let (status, _) = app
        .get(&format!(
            "/runs/{lighthouse}/resume-preview?from_stage=three"
        ))
        .await;
    assert_eq!(status, 200);
    let (status, _) = app
        .get(&format!(
            "/runs/{lighthouse}/resume-preview?from_stage=nope"
        ))
        .await;
    assert_eq!(status, 409);
    let retry = json!({"action": "retry", "filter": {"status": "failed"}, "dry_run": false});
    let (_, done) = app.post("/runs/bulk", &retry).await;
    assert_eq!(done["changed"], 1, "{done}");
    app.wait_status(fatal, "failed", Duration::from_secs(30))
        .await;
}

/// Throughput per queue, kept in the store; the oldest waiting run per queue.
async fn finished_runs_make_the_queues_history(app: &TestApp) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, history) = app.get("/queues/history?window=day").await;
        let finished: u64 = history["minutes"]
            .as_array()
            .expect("minutes")
            .iter()
            .map(|m| m["completed"].as_u64().unwrap_or(0) + m["failed"].as_u64().unwrap_or(0))
            .sum();
        if finished >= 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "history: {history}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (status, _) = app.get("/queues/history?window=week").await;
    assert_eq!(status, 422);
    let (_, queues) = app.get("/queues").await;
    assert!(queues["waiting"].is_array(), "{queues}");
}

fn urlencode(text: &str) -> String {
    text.replace('+', "%2B").replace(':', "%3A")
}
