//! The operator console (`/ui`): pages and assets compiled into the binary, served by every
//! API process.
//!
//! Invariant: the console knows runs, not tenants, and reads and changes them only through the
//! public API: its pages are one shell whose script calls the same routes (and the same
//! authorisation) as any client. What is specific to a tenant (the work-order stepper) is a
//! script the tenant hands over through [`crate::http::TenantApi::console_script`].
//!
//! Access: with `API_TOKEN` set, a browser without the session cookie is sent to the login
//! page, which sets the cookie (the token, `HttpOnly`, `SameSite=Strict`); the API accepts it
//! in place of the bearer header, and a change also needs the CSRF header the page reads from
//! `/ui/session` (see [`crate::http::auth`]).

use axum::{
    Form, Json, Router,
    extract::{Path, Query, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::http::{
    AppState,
    auth::{self, Role},
};

/// The run list, the console's home.
pub const HOME: &str = "/ui";
/// The login page, reachable without a token.
pub const LOGIN: &str = "/ui/login";
/// Clears the session cookie, whoever asks.
pub const LOGOUT: &str = "/ui/logout";
/// What the console's script asks about its caller (JSON: a 401 without a session, never the
/// login page).
pub const SESSION: &str = "/ui/session";
/// The console's static files, reachable without a token (they hold no data).
pub const ASSETS: &str = "/ui/assets/";

const STYLE: &str = include_str!("assets/console.css");
const SCRIPT: &str = include_str!("assets/console.js");
const LOGIN_STYLE: &str = include_str!("assets/login.css");

/// The console's routes (not part of the OpenAPI document: they answer HTML).
pub fn routes(state: &AppState) -> Router<AppState> {
    let tenant_scripts: String = state
        .tenants
        .apis
        .iter()
        .filter_map(|api| api.console_script())
        .collect::<Vec<_>>()
        .join("\n");
    let assets = Assets::new(tenant_scripts);
    Router::new()
        .route(HOME, get(page))
        .route("/ui/", get(|| async { Redirect::permanent(HOME) }))
        .route("/ui/runs/{id}", get(page))
        .route("/ui/queues", get(page))
        .route(LOGIN, get(login_page).post(login))
        .route(LOGOUT, axum::routing::post(logout))
        .route(SESSION, get(session))
        .route(
            "/ui/assets/{name}",
            get(move |path, headers| asset(assets.clone(), path, headers)),
        )
}

/// The embedded files, each with the digest that names its version.
#[derive(Clone)]
struct Assets {
    files: std::sync::Arc<[(&'static str, &'static str, String, String)]>,
}

impl Assets {
    fn new(tenant_scripts: String) -> Self {
        let files = [
            ("console.css", "text/css; charset=utf-8", STYLE.to_owned()),
            (
                "console.js",
                "text/javascript; charset=utf-8",
                SCRIPT.to_owned(),
            ),
            (
                "login.css",
                "text/css; charset=utf-8",
                LOGIN_STYLE.to_owned(),
            ),
            (
                "tenants.js",
                "text/javascript; charset=utf-8",
                tenant_scripts,
            ),
        ]
        .into_iter()
        .map(|(name, kind, body)| {
            let tag = format!("\"{}\"", &hex(&Sha256::digest(body.as_bytes()))[..16]);
            (name, kind, body, tag)
        })
        .collect::<Vec<_>>();
        Self {
            files: files.into(),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn asset(assets: Assets, Path(name): Path<String>, headers: HeaderMap) -> Response {
    let Some((_, kind, body, tag)) = assets.files.iter().find(|(n, ..)| *n == name) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let cached = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == tag);
    let mut response = if cached {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        body.clone().into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(tag) = HeaderValue::from_str(tag) {
        headers.insert(header::ETAG, tag);
    }
    secure(response)
}

/// The headers every console answer carries: its own scripts only, no framing, no referrer to
/// other sites.
fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; media-src 'self'; style-src 'self'; \
             script-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Text made safe to place in HTML.
fn escape(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '&' => "&amp;".to_owned(),
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '"' => "&quot;".to_owned(),
            '\'' => "&#39;".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

/// Every page of the console: one shell; its script renders the page the path names from the
/// API's answers.
async fn page() -> Response {
    let html = format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Stagecraft</title>
<link rel="stylesheet" href="/ui/assets/console.css">
</head>
<body>
<header class="top">
  <a class="brand" href="{HOME}">Stagecraft</a>
  <nav><a href="{HOME}" data-nav="runs">Runs</a><a href="/ui/queues" data-nav="queues">Queues &amp; workers</a><a href="/docs">API</a></nav>
  <span id="who"></span>
</header>
<main id="app" aria-live="polite"><p class="muted">Loading…</p></main>
<script src="/ui/assets/tenants.js"></script>
<script src="/ui/assets/console.js"></script>
</body>
</html>
"#
    );
    secure(
        (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            [(header::CACHE_CONTROL, "no-store")],
            html,
        )
            .into_response(),
    )
}

#[derive(Debug, Default, Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

/// Where to go after logging in: a console page, never another site.
fn next_page(next: Option<&str>) -> &str {
    next.filter(|n| {
        (n == &HOME || n.starts_with("/ui/"))
            && !n.starts_with(LOGIN)
            && !n.contains("//")
            && !n.contains('\\')
            && n.chars().all(|c| c.is_ascii_graphic())
    })
    .unwrap_or(HOME)
}

fn login_html(next: &str, error: Option<&str>) -> String {
    let error = error
        .map(|e| format!(r#"<p class="error" role="alert">{}</p>"#, escape(e)))
        .unwrap_or_default();
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Stagecraft · sign in</title>
<link rel="stylesheet" href="/ui/assets/login.css">
</head>
<body>
<form class="login" method="post" action="{LOGIN}">
  <h1>Stagecraft</h1>
  <p>This deployment needs its API token (or its read-only token).</p>
  {error}
  <label for="token">Token</label>
  <input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
  <input type="hidden" name="next" value="{next}">
  <button type="submit">Sign in</button>
</form>
</body>
</html>
"#,
        next = escape(next),
    )
}

fn html(status: StatusCode, body: String) -> Response {
    secure(
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            [(header::CACHE_CONTROL, "no-store")],
            body,
        )
            .into_response(),
    )
}

async fn login_page(State(state): State<AppState>, Query(query): Query<LoginQuery>) -> Response {
    if !state.tokens.required() {
        return Redirect::to(HOME).into_response();
    }
    html(
        StatusCode::OK,
        login_html(next_page(query.next.as_deref()), None),
    )
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

/// Most bytes of a token the login form takes.
const MAX_TOKEN: usize = 4096;

/// How long a browser keeps its session (then it asks for the token again).
const SESSION_SECS: u64 = 12 * 3600;

/// One login checked at a time per process, and a failed one holds the turn for a while: a
/// guesser gets a few tries a second however many connections it opens.
static LOGIN_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Checks the token and keeps it in the session cookie. A wrong one answers the form again,
/// after a pause that makes guessing slow.
async fn login(State(state): State<AppState>, Form(form): Form<LoginForm>) -> Response {
    let next = next_page(form.next.as_deref()).to_owned();
    let token = form.token.trim();
    let _turn = LOGIN_TURN.lock().await;
    let valid = token.len() <= MAX_TOKEN
        && token.bytes().all(|b| b.is_ascii_graphic())
        && state.tokens.role_of(token).is_some();
    if !valid {
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        return html(
            StatusCode::UNAUTHORIZED,
            login_html(&next, Some("That token is not valid for this deployment.")),
        );
    }
    let cookie = format!(
        "{}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_SECS}{}",
        auth::SESSION_COOKIE,
        auth::session_value(token),
        if state.config.console_secure_cookie {
            "; Secure"
        } else {
            ""
        }
    );
    let mut response = Redirect::to(&next).into_response();
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    secure(response)
}

async fn logout() -> Response {
    let mut response = Redirect::to(LOGIN).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "stagecraft_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    secure(response)
}

/// What the console's script needs to know about its caller.
#[derive(Debug, Serialize)]
struct Session {
    /// `full` or `read_only`.
    role: &'static str,
    /// Whether the deployment has tokens (so the console offers to sign out).
    token_required: bool,
    /// The CSRF header's value for changes made with the session cookie.
    csrf: Option<String>,
}

async fn session(State(state): State<AppState>, request: Request) -> Response {
    let role = request
        .extensions()
        .get::<Role>()
        .copied()
        .unwrap_or(Role::Full);
    let csrf = auth::session(&request).map(|token| auth::csrf_token(&token));
    let body = Session {
        role: match role {
            Role::Full => "full",
            Role::ReadOnly => "read_only",
        },
        token_required: state.tokens.required(),
        csrf,
    };
    let mut response = Json(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A browser without a valid session, sent to the login page (and back afterwards).
pub fn to_login(request: &Request) -> Response {
    let path = request.uri().path();
    let next = next_page(Some(path));
    let target = format!("{LOGIN}?next={}", encode(next));
    secure(Redirect::to(&target).into_response())
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_sends_back_only_to_console_pages() {
        for (asked, expected) in [
            (None, HOME),
            (Some("/ui/runs/abc"), "/ui/runs/abc"),
            (Some("/ui"), "/ui"),
            (Some("https://evil.example/ui"), HOME),
            (Some("//evil.example/ui/x"), HOME),
            (Some("/ui//evil.example"), HOME),
            (Some("/ui/\\evil"), HOME),
            (Some("/ui/login"), HOME),
            (Some("/runs"), HOME),
            (Some("/ui/a b"), HOME),
        ] {
            assert_eq!(next_page(asked), expected, "{asked:?}");
        }
    }

    #[test]
    fn the_login_page_escapes_what_it_shows() {
        let page = login_html("/ui", Some("<script>x</script>"));
        assert!(!page.contains("<script>x"));
        assert!(page.contains("&lt;script&gt;"));
    }
}
