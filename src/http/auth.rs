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

/// Routes anyone may call.
fn is_public(request: &Request) -> bool {
    request.uri().path() == "/health" || request.method() == Method::OPTIONS
}

fn reads_only(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
}

/// The middleware: lets a request through when its token allows it, with its [`Role`] in the
/// request's extensions.
pub async fn require_token(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let tokens = &state.tokens;
    if !tokens.required() || is_public(&req) {
        req.extensions_mut().insert(Role::Full);
        return next.run(req).await;
    }
    match bearer(&req).and_then(|token| tokens.role_of(token)) {
        Some(Role::ReadOnly) if !reads_only(req.method()) => ApiError::Forbidden(
            "the read-only token may only read; this request needs API_TOKEN".to_owned(),
        )
        .into_response(),
        Some(role) => {
            req.extensions_mut().insert(role);
            next.run(req).await
        }
        None => ApiError::Unauthorized.into_response(),
    }
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
