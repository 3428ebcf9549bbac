//! The error policy, and the one error type of the HTTP edge.
//!
//! - Glue code (CLI, start-up) uses `anyhow` and reports with context.
//! - Each library-like boundary has its own `thiserror` enum: [`crate::store::StoreError`],
//!   [`crate::engine::StageError`], [`crate::artifacts::ArtifactError`],
//!   [`crate::process::ProcessError`], [`crate::config::ConfigError`].
//! - Stages classify failures where they happen (`Retryable`, `Fatal`, `Cancelled`); the engine
//!   decides what follows.
//! - At the HTTP edge everything becomes an [`ApiError`]: a stable machine `code`, a status, a
//!   message and optional details, as `{"error": {"code", "message", "details"}}`. 4xx are the
//!   client's and are not logged as errors; 5xx are logged once here and their cause is hidden
//!   from the client.
//!
//! `details` is always an object (`{}` when there is nothing more to say).
//!
//! | code | status |
//! |---|---|
//! | `malformed_json` | 400 |
//! | `unauthorized` | 401 |
//! | `forbidden` | 403 |
//! | `not_found`, `unknown_workflow`, `unknown_agent` | 404 |
//! | `conflict`, `idempotency_conflict`, `invalid_from_stage` | 409 |
//! | `payload_too_large` | 413 |
//! | `invalid_input`, `invalid_query`, `invalid_path`, `missing_key` | 422 |
//! | `overloaded` (with `Retry-After`), `unavailable` | 503 |
//! | `internal` | 500 |

use axum::{
    Json,
    extract::{FromRequest, Request},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    MalformedJson(String),
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{message}")]
    NotFound {
        code: &'static str,
        message: String,
        details: Option<Value>,
    },
    /// The run's state (or an earlier request) forbids this one.
    #[error("{message}")]
    Conflict {
        code: &'static str,
        message: String,
        details: Option<Value>,
    },
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{message}")]
    Invalid {
        code: &'static str,
        message: String,
        details: Option<Value>,
    },
    #[error("{0}")]
    Unavailable(String),
    /// A per-process limit is full (event streams, synchronous waits, the store's queue):
    /// try again after `retry_after_secs`.
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after_secs: u64,
    },
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::NotFound {
            code: "not_found",
            message: message.into(),
            details: None,
        }
    }

    pub fn invalid(message: impl Into<String>, field: Option<&str>) -> Self {
        Self::Invalid {
            code: "invalid_input",
            message: message.into(),
            details: field.map(|f| json!({"field": f})),
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotFound { code, .. } => (StatusCode::NOT_FOUND, code),
            Self::Conflict { code, .. } => (StatusCode::CONFLICT, code),
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::Invalid { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, code),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code.
    pub code: String,
    pub message: String,
    /// More about the error, such as the offending `field`; `{}` when there is nothing more.
    #[schema(value_type = Object)]
    pub details: Value,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            Self::Internal(cause) => {
                tracing::error!(error = ?cause, "request failed");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        let retry_after = match &self {
            Self::Overloaded {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            Self::Unavailable(_) => Some(1),
            _ => None,
        };
        let details = match self {
            Self::NotFound { details, .. }
            | Self::Invalid { details, .. }
            | Self::Conflict { details, .. } => details,
            _ => None,
        }
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message,
                details,
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(seconds),
            );
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(id) => Self::not_found(format!("run {id} not found")),
            StoreError::IdempotencyConflict(id) => Self::Conflict {
                code: "idempotency_conflict",
                message: format!(
                    "this Idempotency-Key was used for run {id} with a different request; use a new key"
                ),
                details: Some(json!({"run_id": id.to_string()})),
            },
            StoreError::Conflict(message) => Self::Conflict {
                code: "conflict",
                message,
                details: None,
            },
            StoreError::Busy(message) => {
                tracing::warn!(reason = %message, "store queue full; refusing new work");
                Self::Overloaded {
                    message: "the store has more work waiting than this process may queue; try again shortly".to_owned(),
                    retry_after_secs: 1,
                }
            }
            StoreError::Unavailable(_) => {
                tracing::warn!(error = %error, "store unavailable");
                Self::Unavailable("the store is unreachable; try again shortly".to_owned())
            }
            other => Self::Internal(other.into()),
        }
    }
}

/// Parses a JSON body, telling syntax errors (400) from values that do not fit (422, naming
/// the field).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::MalformedJson(format!("request body is not valid JSON: {e}")))?;
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let field = if path == "." {
            None
        } else {
            Some(path.as_str())
        };
        ApiError::invalid(error.inner().to_string(), field)
    })
}

/// A JSON request body, rejected as an [`ApiError`]. An empty body reads as `{}`.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or(usize::MAX);
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(limit)
            } else {
                ApiError::MalformedJson(rejection.body_text())
            }
        })?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        parse_json(bytes).map(JsonBody)
    }
}

/// The configured body limit, carried in request extensions so rejections can name it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        count: u32,
    }

    #[test]
    fn syntax_errors_are_malformed_and_type_errors_name_the_field() {
        assert!(matches!(
            parse_json::<Body>(b"{\"name\": "),
            Err(ApiError::MalformedJson(_))
        ));
        match parse_json::<Body>(br#"{"name": "x", "count": "three"}"#) {
            Err(ApiError::Invalid {
                details: Some(details),
                ..
            }) => assert_eq!(details["field"], "count"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse_json::<Body>(br#"{"name": "x", "count": 1} trailing"#),
            Err(ApiError::MalformedJson(_))
        ));
        assert!(parse_json::<Body>(br#"{"name": "x", "count": 1}"#).is_ok());
    }
}
