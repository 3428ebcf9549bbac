//! The console (`/ui`) in a real headless Chromium against a real `stagecraft dev`: runs appear
//! and advance without a reload, the final cut plays, a resume from a stage previews what it
//! redoes and then redoes only that, cancel stops a running run, and with tokens nothing but
//! the login form renders and the read-only token changes nothing. Screenshots of the main
//! pages are saved in `target/console-screenshots/`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Backend, TestApp, browser::Browser};

const LONG: Duration = Duration::from_secs(240);

async fn submit_studio_run(app: &TestApp) -> String {
    let (status, body) = app
        .post(
            "/workflows/full_production/run",
            &json!({
                "inputs": {"user_request": "A day in the life of a lighthouse keeper",
                           "total_budget": 150.0, "target_duration_secs": 8, "num_scenes": 3},
                "async": true
            }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    body["run_id"].as_str().expect("run id").to_owned()
}

fn selector_of_status(stage: &str, status: &str) -> String {
    format!("return !!document.querySelector(\"tr[data-stage='{stage}'][data-status='{status}']\")")
}

const RUN_COMPLETED: &str =
    "return !!document.querySelector(\".run-head h1 [data-status='completed']\")";

/// The stages that started after the run's last resume.
fn started_after_resume(events: &[Value]) -> Vec<String> {
    let resumed = events
        .iter()
        .rposition(|e| e["kind"] == "run_resumed")
        .expect("a run_resumed event");
    events[resumed..]
        .iter()
        .filter(|e| e["kind"] == "stage_started")
        .filter_map(|e| e["stage"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_studio_run_is_followed_played_and_resumed_from_editing() {
    let mut app = TestApp::new(Backend::Sqlite).with_env("MOCK_PROVIDER_LATENCY_MS", "200");
    app.start_dev();
    let browser = Browser::start().await;
    browser.goto(&app.url("/")).await;
    assert!(
        browser.url().await.ends_with("/ui"),
        "a browser asking for / is sent to the console"
    );
    browser.wait_for("#runs", Duration::from_secs(15)).await;
    browser.eval("window.sameList = true;", json!([])).await;

    // The list shows a new run without a reload.
    let id = submit_studio_run(&app).await;
    let row = format!("tr[data-run='{id}']");
    browser.wait_for(&row, Duration::from_secs(15)).await;
    assert_eq!(
        browser.eval("return window.sameList;", json!([])).await,
        json!(true)
    );
    browser.screenshot("runs-list").await;

    // Its page follows the stages live, without a reload.
    browser.click(&format!("{row} a")).await;
    browser.wait_for("#stages", Duration::from_secs(15)).await;
    browser.eval("window.samePage = true;", json!([])).await;
    browser
        .wait_until(
            "planning completes",
            &selector_of_status("planning", "completed"),
            LONG,
        )
        .await;
    browser
        .wait_until(
            "a later stage runs",
            "return !!document.querySelector(\"tr[data-status='running']:not([data-stage='planning'])\")",
            LONG,
        )
        .await;
    browser
        .wait_until(
            "the live event log and the timeline fill",
            "return document.querySelectorAll('#events tbody tr').length > 3 \
             && !!document.querySelector(\"tr[data-stage='planning'] .bar.done\")",
            Duration::from_secs(20),
        )
        .await;
    browser.screenshot("run-live").await;
    browser
        .wait_until("the run completes", RUN_COMPLETED, LONG)
        .await;
    assert_eq!(
        browser.eval("return window.samePage;", json!([])).await,
        json!(true),
        "the run page was never reloaded"
    );

    final_cut_plays_in_place(&browser).await;
    browser.screenshot("run-completed").await;
    resume_from_editing_redoes_only_editing(&browser, &app, &id).await;

    // Queues and workers: the queue's throughput, the live worker.
    browser.goto(&app.url("/ui/queues")).await;
    browser
        .wait_for("tr[data-queue='workflows']", Duration::from_secs(15))
        .await;
    browser
        .wait_for("#workers table", Duration::from_secs(15))
        .await;
    browser.screenshot("queues").await;
}

/// The final cut plays in place (its metadata comes through HTTP ranges).
async fn final_cut_plays_in_place(browser: &Browser) {
    let video = "document.querySelector(\"video[data-artifact$='final/final.mp4']\")";
    browser
        .wait_until(
            "the final cut's metadata loads",
            &format!("const v = {video}; return !!v && v.readyState >= 1 && v.duration > 0;"),
            Duration::from_secs(60),
        )
        .await;
    let duration = browser
        .eval(&format!("return {video}.duration;"), json!([]))
        .await
        .as_f64()
        .expect("duration");
    assert!(duration > 1.0, "the final cut lasts {duration} s");
}

/// Resume from editing: first what it redoes and costs, then only that is redone.
async fn resume_from_editing_redoes_only_editing(browser: &Browser, app: &TestApp, id: &str) {
    browser
        .eval(
            "document.getElementById('resume-from').value = 'editing';",
            json!([]),
        )
        .await;
    browser.click("#resume-preview-button").await;
    browser
        .wait_for("#redo-stages", Duration::from_secs(15))
        .await;
    assert_eq!(browser.text_of("#redo-stages").await, "editing");
    let estimate = browser.text_of("#resume-estimate").await;
    assert!(
        estimate.starts_with('$'),
        "an estimate in dollars: {estimate:?}"
    );
    browser.screenshot("resume-preview").await;
    browser.click("#resume-confirm").await;
    browser
        .wait_until(
            "the resumed run starts again",
            "return !document.querySelector(\".run-head h1 [data-status='completed']\")",
            Duration::from_secs(30),
        )
        .await;
    browser
        .wait_until("the resumed run completes", RUN_COMPLETED, LONG)
        .await;
    let events = app.events(id).await;
    assert_eq!(started_after_resume(&events), ["editing"]);
    let resumed = events
        .iter()
        .rfind(|e| e["kind"] == "run_resumed")
        .expect("resumed");
    assert_eq!(
        resumed["data"]["actor"],
        json!({"role": "anonymous", "via": "console"})
    );
}

/// A demo run whose first stage works for a minute.
async fn submit_slow_demo(app: &TestApp) -> String {
    app.submit_demo(json!({"sleep_ms": 60_000})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_from_the_console_stops_a_running_run() {
    cancel_from_the_console(Backend::Sqlite).await;
}

/// The console on the PostgreSQL store: the run list shows the run, its page follows it live
/// (the lease and the worker's heartbeat), and Cancel stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_follows_and_cancels_a_run_on_postgres() {
    cancel_from_the_console(Backend::Postgres).await;
}

async fn cancel_from_the_console(backend: Backend) {
    let mut app = TestApp::new(backend);
    app.start_dev();
    let id = submit_slow_demo(&app).await;
    app.wait_executing(&id, "one", Duration::from_secs(30))
        .await;
    let browser = Browser::start().await;
    browser.goto(&app.url("/ui")).await;
    browser
        .wait_until(
            "the run list shows the run",
            &format!("return !!document.querySelector(\"a[href='/ui/runs/{id}']\");"),
            Duration::from_secs(30),
        )
        .await;
    browser.goto(&app.url(&format!("/ui/runs/{id}"))).await;
    browser
        .wait_until(
            "stage one shows as running",
            &selector_of_status("one", "running"),
            Duration::from_secs(30),
        )
        .await;
    browser
        .wait_until(
            "the worker's heartbeat and the lease's expiry show",
            "const row = document.querySelector(\"tr[data-stage='one']\"); \
             return !!row && row.innerText.includes('heartbeat') && row.innerText.includes('lease expires in');",
            Duration::from_secs(30),
        )
        .await;
    cancel_in_the_console(&browser).await;
    let run = app.run(&id).await;
    assert_eq!(run["status"], "cancelled");
}

/// Clicks the run page's Cancel and waits until the page shows the run cancelled.
async fn cancel_in_the_console(browser: &Browser) {
    browser.click("#cancel").await;
    browser
        .wait_until(
            "the run shows as cancelled",
            "return !!document.querySelector(\".run-head h1 [data-status='cancelled']\")",
            Duration::from_secs(30),
        )
        .await;
}

const FULL: &str = "console-full-token-8f2c1e";
const READ_ONLY: &str = "console-read-token-4b7d09";

/// What `fetch` answers from inside the page: its status.
async fn page_fetch(browser: &Browser, path: &str, method: &str, headers: Value) -> u16 {
    browser
        .eval_async(
            "const [path, method, headers, done] = arguments; \
             fetch(path, {method, headers, credentials: 'same-origin'}).then(r => done(r.status), e => done(String(e)));",
            json!([path, method, headers]),
        )
        .await
        .as_u64()
        .unwrap_or_default() as u16
}

async fn sign_in(browser: &Browser, token: &str) {
    browser.fill("#token", token).await;
    browser.click("button[type='submit']").await;
}

/// Without a session: the login form and nothing else, on every console page.
async fn only_the_login_form_without_a_session(browser: &Browser, app: &TestApp, id: &str) {
    for page in ["/ui", &format!("/ui/runs/{id}"), "/ui/queues"] {
        browser.goto(&app.url(page)).await;
        browser
            .wait_for("form.login", Duration::from_secs(10))
            .await;
        assert!(browser.url().await.contains("/ui/login"), "{page}");
        assert!(
            !browser.exists("#app").await,
            "{page} rendered without a token"
        );
        assert!(!browser.text_of("body").await.contains(id));
    }
    browser.screenshot("login").await;
    assert_eq!(
        page_fetch(browser, "/ui/session", "GET", json!({})).await,
        401
    );
    assert_eq!(page_fetch(browser, "/runs", "GET", json!({})).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_only_the_login_form_renders_and_read_only_changes_nothing() {
    let mut app = TestApp::new(Backend::Sqlite)
        .with_env("API_TOKEN", FULL)
        .with_env("API_TOKEN_READONLY", READ_ONLY)
        .with_bearer(FULL);
    app.start_dev();
    let id = submit_slow_demo(&app).await;
    app.wait_executing(&id, "one", Duration::from_secs(30))
        .await;
    let browser = Browser::start().await;

    only_the_login_form_without_a_session(&browser, &app, &id).await;

    // A wrong token answers the form again.
    sign_in(&browser, "not-the-token").await;
    browser
        .wait_for("form.login .error", Duration::from_secs(10))
        .await;

    // The read-only token sees the run and can change nothing.
    browser
        .goto(&app.url(&format!("/ui/login?next=/ui/runs/{id}")))
        .await;
    sign_in(&browser, READ_ONLY).await;
    browser
        .wait_for("#read-only", Duration::from_secs(15))
        .await;
    assert!(browser.url().await.ends_with(&format!("/ui/runs/{id}")));
    assert!(!browser.exists("#cancel").await);
    assert!(!browser.text_of("body").await.contains(READ_ONLY));
    browser.screenshot("run-read-only").await;
    let csrf = browser
        .eval_async(
            "const done = arguments[0]; fetch('/ui/session').then(r => r.json()).then(s => done(s.csrf));",
            json!([]),
        )
        .await;
    let cancel = format!("/runs/{id}/cancel");
    assert_eq!(
        page_fetch(&browser, &cancel, "POST", json!({"X-CSRF-Token": csrf})).await,
        403
    );
    assert_eq!(app.run(&id).await["status"], "running");

    // Signed out, then in with the full token: a change needs the CSRF header too.
    browser.click("#who button").await;
    browser
        .wait_for("form.login", Duration::from_secs(10))
        .await;
    browser
        .goto(&app.url(&format!("/ui/login?next=/ui/runs/{id}")))
        .await;
    sign_in(&browser, FULL).await;
    browser.wait_for("#cancel", Duration::from_secs(15)).await;
    assert_eq!(page_fetch(&browser, &cancel, "POST", json!({})).await, 403);
    assert_eq!(app.run(&id).await["status"], "running");
    cancel_in_the_console(&browser).await;
    let events = app.events(&id).await;
    let asked = events
        .iter()
        .find(|e| e["kind"] == "cancel_requested")
        .expect("cancel requested");
    assert_eq!(
        asked["data"]["actor"],
        json!({"role": "operator", "via": "console"})
    );
}

/// Signs in with the full token through the login form; answers the `Set-Cookie` header.
async fn signed_in_over_http(http: &reqwest::Client, app: &TestApp) -> String {
    let login = http
        .post(app.url("/ui/login"))
        .form(&[("token", FULL), ("next", "https://elsewhere.example/")])
        .send()
        .await
        .expect("login");
    assert_eq!(login.status(), 303);
    assert_eq!(login.headers()["location"], "/ui", "never sent off-site");
    let cookie = login.headers()["set-cookie"]
        .to_str()
        .expect("cookie")
        .to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    cookie
}

/// From another site's page, even with the session cookie and its CSRF header, a change is
/// refused, and so is a login; a bearer token is never another site's.
async fn changes_from_elsewhere_are_refused(
    http: &reqwest::Client,
    app: &TestApp,
    id: &str,
    (session, csrf): (&str, &str),
) {
    for (name, value) in [
        ("sec-fetch-site", "cross-site"),
        ("origin", "http://elsewhere.example"),
    ] {
        let forged = http
            .post(app.url(&format!("/runs/{id}/cancel")))
            .header("cookie", session)
            .header("x-csrf-token", csrf)
            .header(name, value)
            .send()
            .await
            .expect("cancel");
        assert_eq!(forged.status(), 403, "{name}: {value}");
    }
    let elsewhere_login = http
        .post(app.url("/ui/login"))
        .header("sec-fetch-site", "cross-site")
        .form(&[("token", FULL)])
        .send()
        .await
        .expect("login");
    assert_eq!(
        elsewhere_login.status(),
        403,
        "no login planted from elsewhere"
    );
    // A bearer token is never another site's: a client with it may call from anywhere.
    let with_bearer = http
        .get(app.url(&format!("/runs/{id}")))
        .bearer_auth(FULL)
        .header("origin", "http://elsewhere.example")
        .send()
        .await
        .expect("get");
    assert_eq!(with_bearer.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cookie_stands_for_the_token_and_changes_need_csrf_and_this_site() {
    let mut app = TestApp::new(Backend::Sqlite)
        .with_env("API_TOKEN", FULL)
        .with_bearer(FULL);
    app.start_api();
    let id = app.submit_demo(json!({})).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let cookie = signed_in_over_http(&http, &app).await;
    let session = cookie.split(';').next().expect("pair").to_owned();
    let get = |path: &str| http.get(app.url(path)).header("cookie", &session).send();
    assert_eq!(get("/runs").await.expect("runs").status(), 200);
    let body: Value = get("/ui/session")
        .await
        .expect("session")
        .json()
        .await
        .expect("json");
    assert_eq!(body["role"], "full");
    let csrf = body["csrf"].as_str().expect("csrf").to_owned();
    let cancel = |csrf: Option<&str>| {
        let mut request = http
            .post(app.url(&format!("/runs/{id}/cancel")))
            .header("cookie", &session);
        if let Some(csrf) = csrf {
            request = request.header("x-csrf-token", csrf);
        }
        request.send()
    };
    assert_eq!(cancel(None).await.expect("cancel").status(), 403);
    assert_eq!(cancel(Some("0000")).await.expect("cancel").status(), 403);
    changes_from_elsewhere_are_refused(&http, &app, &id, (&session, &csrf)).await;
    let status = cancel(Some(&csrf)).await.expect("cancel").status();
    assert!(status == 200 || status == 409, "{status}");
    // The assets and the login page need no token; the console's pages send browsers there.
    let anonymous = |path: &str| http.get(app.url(path)).header("accept", "text/html").send();
    assert_eq!(
        anonymous("/ui/assets/console.js")
            .await
            .expect("js")
            .status(),
        200
    );
    assert_eq!(anonymous("/ui/login").await.expect("login").status(), 200);
    let redirected = anonymous("/ui/queues").await.expect("queues");
    assert_eq!(redirected.status(), 303);
    assert_eq!(
        redirected.headers()["location"],
        "/ui/login?next=/ui/queues"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_another_sites_page_cannot_change_runs() {
    let app = TestApp::new(Backend::Sqlite).with_api();
    let id = app.submit_demo(json!({"sleep_ms": 60_000})).await;
    let http = reqwest::Client::new();
    let forged = http
        .post(app.url(&format!("/runs/{id}/cancel")))
        .header("sec-fetch-site", "cross-site")
        .header("origin", "http://elsewhere.example")
        .send()
        .await
        .expect("cancel");
    assert_eq!(forged.status(), 403);
    let forged_bulk = http
        .post(app.url("/runs/bulk"))
        .header("origin", "http://elsewhere.example")
        .body(r#"{"action":"cancel","dry_run":false}"#)
        .send()
        .await
        .expect("bulk");
    assert_eq!(forged_bulk.status(), 403);
    assert_eq!(app.run(&id).await["status"], "queued");
    // The console's own page (same origin) and tools that send no origin (curl) may.
    let own = http
        .post(app.url(&format!("/runs/{id}/cancel")))
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .expect("cancel");
    assert_eq!(own.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_order_shows_its_steps_commit_pull_request_and_agent_output() {
    let (app, url) = crate::work_orders::setup(TestApp::new(Backend::Sqlite));
    let mut app = app;
    app.start_dev();
    let id = crate::work_orders::create(
        &app,
        json!({"repository_url": url, "sandbox_type": "git_branch",
               "workflow_type": "agent_workflow_plan", "user_request": "Add a greeting"}),
    )
    .await;
    let browser = Browser::start().await;
    browser.goto(&app.url(&format!("/ui/runs/{id}"))).await;
    browser
        .wait_until(
            "the stepper reaches the pull request",
            "return !!document.querySelector(\"#work-order-steps li[data-step='pull_request'] [data-status='completed']\")",
            LONG,
        )
        .await;
    let steps = browser
        .eval(
            "return [...document.querySelectorAll('#work-order-steps li')].map(li => li.dataset.step).join(' ');",
            json!([]),
        )
        .await;
    assert_eq!(
        steps, "sandbox plan implement commit push pull_request",
        "the work order's steps, in order"
    );
    browser
        .wait_until(
            "the commit and the pull request show",
            "const c = document.getElementById('work-order-commit'); \
             const p = document.getElementById('work-order-pr'); \
             return !!c && /^[0-9a-f]{7,}/.test(c.innerText) && !!p && p.innerText.includes('pull-requests');",
            Duration::from_secs(30),
        )
        .await;
    browser
        .wait_until(
            "the agent's output shows",
            "const t = document.getElementById('work-order-log'); return !!t && t.innerText.includes('[plan]');",
            Duration::from_secs(30),
        )
        .await;
    browser.screenshot("work-order").await;
}
