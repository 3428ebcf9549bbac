//! Who may call the API: the bearer tokens of the deployment.
//!
//! With `API_TOKEN` set, every route but `/health` needs `Authorization: Bearer <token>` (the
//! scheme is case-insensitive). `API_TOKEN_READONLY` is a second token that may use `GET` and
//! `HEAD` only; with it, a change answers 403. Tokens are compared as SHA-256 digests in
//! constant time, so neither their bytes nor their length leak through timing.

use axum::{
    extract::{Request, State},
    http::{Method, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};
use crate::store::{Actor, ActorChannel, ActorRole};

/// What a caller is allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every route.
    Full,
    /// Reading routes only.
    ReadOnly,
}

/// The tokens of a deployment, as digests.
#[derive(Clone, Default)]
pub struct Tokens {
    full: Option<[u8; 32]>,
    read_only: Option<[u8; 32]>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("full", &self.full.is_some())
            .field("read_only", &self.read_only.is_some())
            .finish()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Equal digests, compared without an early exit.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Tokens {
    pub fn new(full: Option<&SecretString>, read_only: Option<&SecretString>) -> Self {
        Self {
            full: full.map(|t| digest(t.expose_secret().as_bytes())),
            read_only: read_only.map(|t| digest(t.expose_secret().as_bytes())),
        }
    }

    /// Whether the API requires a token at all.
    pub fn required(&self) -> bool {
        self.full.is_some()
    }

    /// Whether a read-only token exists.
    pub fn has_read_only(&self) -> bool {
        self.read_only.is_some()
    }

    /// The role a presented token grants, if any. Both digests are always compared.
    pub fn role_of(&self, presented: &str) -> Option<Role> {
        let presented = digest(presented.as_bytes());
        let full = self.full.as_ref().is_some_and(|d| same(d, &presented));
        let read_only = self.read_only.as_ref().is_some_and(|d| same(d, &presented));
        match (full, read_only) {
            (true, _) => Some(Role::Full),
            (false, true) => Some(Role::ReadOnly),
            _ => None,
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme in any case).
pub fn bearer(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let (scheme, token) = value.split_once(char::is_whitespace)?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

/// The cookie the console's login sets: the token itself, `HttpOnly` and `SameSite=Strict`,
/// accepted in place of the bearer header (so every API process accepts it, with no session
/// state); a change made with it also needs the [`CSRF_HEADER`].
pub const SESSION_COOKIE: &str = "stagecraft_session";

/// The header a change authorised by the session cookie carries: [`csrf_token`] of the token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The CSRF token that goes with a session's token: a digest only the holder of the token (or
/// a page the console served to it) knows.
pub fn csrf_token(token: &str) -> String {
    let digest = Sha256::digest(format!("stagecraft-csrf:{token}").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The session cookie's value for a token: the token in hexadecimal, so any token fits a
/// cookie.
pub fn session_value(token: &str) -> String {
    token.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The token of the session cookie, if the request has one (the last one sent: a cookie
/// planted by another host comes first only with a longer path).
pub fn session(request: &Request) -> Option<String> {
    let value = request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim())
        .next_back()?;
    if value.is_empty() || value.len() % 2 != 0 || value.len() > 2 * 4096 {
        return None;
    }
    let bytes = (0..value.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(value.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// Routes anyone may call: health, and the console's login and logout (which only set or clear
/// the cookie) and assets. CORS preflights are answered before this check, by the CORS layer.
fn is_public(request: &Request) -> bool {
    let path = request.uri().path();
    path == "/health"
        || path == crate::console::LOGIN
        || path == crate::console::LOGOUT
        || path.starts_with(crate::console::ASSETS)
}

fn reads_only(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
}

/// Whether a request is a browser finding its way to the console (a page, not the API).
fn is_navigation(request: &Request) -> bool {
    let path = request.uri().path();
    reads_only(request.method())
        && path != crate::console::SESSION
        && (path == crate::console::HOME
            || path.starts_with("/ui/")
            || (path == "/" && accepts_html(request)))
}

/// Whether the client prefers HTML (a browser) to JSON.
pub fn accepts_html(request: &Request) -> bool {
    request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"))
}

/// Through what an anonymous caller (a deployment without tokens) came: the console's
/// requests say so in a header, which is only a label (it grants nothing).
fn channel_of(request: &Request) -> ActorChannel {
    let console = request
        .headers()
        .get("x-stagecraft-client")
        .is_some_and(|v| v.as_bytes() == b"console");
    if console || request.uri().path().starts_with(crate::console::HOME) {
        ActorChannel::Console
    } else {
        ActorChannel::Api
    }
}

/// Whether a browser sent this request from another site: its `Sec-Fetch-Site` says so, or
/// (from a browser without it) its `Origin` names another host than the one it asks, or is
/// opaque. An origin CORS allows
/// (`CORS_ORIGINS`) is not another site.
fn cross_site(request: &Request, cors: &crate::config::Cors) -> bool {
    let header_text = |name: header::HeaderName| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let origin = header_text(header::ORIGIN);
    let allowed = origin.is_some_and(|origin| match cors {
        crate::config::Cors::Off => false,
        crate::config::Cors::Any => true,
        crate::config::Cors::Origins(list) => list.iter().any(|o| o == origin),
    });
    if allowed {
        return false;
    }
    // Browsers that send `Sec-Fetch-Site` say where the request comes from; `Origin` is the
    // word of older ones (and is "null" under a strict referrer policy).
    match header_text(header::HeaderName::from_static("sec-fetch-site")) {
        Some("cross-site" | "same-site") => return true,
        Some(_) => return false,
        None => {}
    }
    match origin {
        None => false,
        Some(origin) => {
            let host = header_text(header::HOST).unwrap_or_default();
            let origin_host = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            origin_host != Some(host)
        }
    }
}

/// The middleware: lets a request through when its token (bearer header, or the console's
/// session cookie with its CSRF header for changes) allows it, with its [`Role`] and
/// [`Actor`] in the request's extensions.
pub async fn require_token(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    match admit(&state, &req) {
        Ok((role, actor)) => {
            req.extensions_mut().insert(role);
            req.extensions_mut().insert(actor);
            next.run(req).await
        }
        Err(refusal) => *refusal,
    }
}

/// Who the request is from, or the answer that refuses it.
fn admit(state: &AppState, req: &Request) -> Result<(Role, Actor), Box<Response>> {
    let tokens = &state.tokens;
    let changes = !reads_only(req.method());
    // A change from another site's page: refused unless it carries a bearer token, which that
    // site cannot have (without tokens, or with the session cookie, the browser would lend it
    // the caller's authority).
    if changes && bearer(req).is_none() && cross_site(req, &state.config.cors) {
        return Err(Box::new(
            ApiError::Forbidden(
                "a change from another site's page needs a bearer token".to_owned(),
            )
            .into_response(),
        ));
    }
    if !tokens.required() || is_public(req) {
        let actor = Actor {
            role: ActorRole::Anonymous,
            via: channel_of(req),
        };
        return Ok((Role::Full, actor));
    }
    let presented = match (bearer(req), session(req)) {
        (Some(token), _) => Some((token.to_owned(), ActorChannel::Api)),
        (None, Some(token)) => Some((token, ActorChannel::Console)),
        (None, None) => None,
    };
    let Some((token, via)) = presented else {
        return Err(Box::new(refuse_anonymous(req)));
    };
    let role = match tokens.role_of(&token) {
        Some(role) => role,
        None => return Err(Box::new(refuse_anonymous(req))),
    };
    if changes && role == Role::ReadOnly {
        return Err(Box::new(
            ApiError::Forbidden(
                "the read-only token may only read; this request needs API_TOKEN".to_owned(),
            )
            .into_response(),
        ));
    }
    if changes && via == ActorChannel::Console && !csrf_matches(req, &token) {
        return Err(Box::new(
            ApiError::Forbidden(format!(
                "a change made with the console's session needs its {CSRF_HEADER} header"
            ))
            .into_response(),
        ));
    }
    let role_name = match role {
        Role::Full => ActorRole::Operator,
        Role::ReadOnly => ActorRole::ReadOnly,
    };
    Ok((
        role,
        Actor {
            role: role_name,
            via,
        },
    ))
}

/// A request without a valid token: a browser finding the console is sent to its login page.
fn refuse_anonymous(req: &Request) -> Response {
    if is_navigation(req) {
        crate::console::to_login(req)
    } else {
        ApiError::Unauthorized.into_response()
    }
}

/// Whether the request's CSRF header is the one that goes with `token`.
fn csrf_matches(req: &Request, token: &str) -> bool {
    req.headers()
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|sent| {
            same(
                &digest(sent.as_bytes()),
                &digest(csrf_token(token).as_bytes()),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_grant_their_role_and_nothing_else() {
        let full = SecretString::from("full-token-123".to_owned());
        let read = SecretString::from("read-token-456".to_owned());
        let tokens = Tokens::new(Some(&full), Some(&read));
        assert_eq!(tokens.role_of("full-token-123"), Some(Role::Full));
        assert_eq!(tokens.role_of("read-token-456"), Some(Role::ReadOnly));
        for wrong in ["", "full-token-12", "full-token-1234", "FULL-TOKEN-123"] {
            assert_eq!(tokens.role_of(wrong), None, "{wrong:?}");
        }
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for (header, expected) in [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER   abc ", Some("abc")),
            ("Basic abc", None),
            ("Bearer", None),
            ("Bearerabc", None),
        ] {
            let request = Request::builder()
                .header(header::AUTHORIZATION, header)
                .body(axum::body::Body::empty())
                .expect("request");
            assert_eq!(bearer(&request), expected, "{header:?}");
        }
    }
}
