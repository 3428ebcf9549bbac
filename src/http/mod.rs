//! The HTTP API: routes, state, authentication, and the OpenAPI document.
//!
//! Invariant: http never runs stages. It validates, stores and reads runs; workers execute them.

mod agents;
mod artifacts;
mod error;
mod runs;
mod work_orders;

use std::{sync::Arc, time::Instant};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
pub use error::{ApiError, ErrorBody, JsonBody};
use secrecy::ExposeSecret;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};
use utoipa_swagger_ui::SwaggerUi;

use crate::{
    artifacts::ArtifactStore, config::Config, store::SharedStore, studio::media::Media,
    workflows::Catalog,
};

/// What every handler may use.
#[derive(Clone)]
pub struct AppState {
    pub store: SharedStore,
    pub catalog: Arc<Catalog>,
    pub config: Arc<Config>,
    pub started: Instant,
    pub artifacts: ArtifactStore,
    /// The media tools, for `/health` to report on.
    pub media: Media,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Stagecraft", description = "Durable runs for long, expensive AI-agent pipelines"),
    tags(
        (name = "runs", description = "Submit, watch, cancel and resume runs of any kind"),
        (name = "workflows", description = "Multi-stage workflow runs"),
        (name = "agents", description = "The studio agents: schemas and one-agent runs"),
        (name = "artifacts", description = "Files runs produced"),
        (name = "work orders", description = "Agent work orders: a coding agent on a git branch, up to a pull request"),
        (name = "ops", description = "Health, queues and metrics")
    ),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The whole API as a router, apart from any socket, so tests and `dev` can serve it.
pub fn app(state: AppState) -> Router {
    let (router, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(root))
        .routes(routes!(queues))
        .routes(routes!(metrics))
        .routes(routes!(workers))
        .merge(runs::routes())
        .merge(agents::routes())
        .merge(artifacts::routes())
        .merge(work_orders::routes())
        .split_for_parts();
    let body_limit = state.config.max_body_bytes;
    let router = router
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(middleware::from_fn(
            move |mut req: Request, next: Next| async move {
                req.extensions_mut().insert(error::BodyLimit(body_limit));
                next.run(req).await
            },
        ))
        .layer(DefaultBodyLimit::max(body_limit));
    let router = match cors(&state.config) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.with_state(state)
}

fn cors(config: &Config) -> Option<CorsLayer> {
    if config.cors_origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = config
        .cors_origins
        .iter()
        .filter_map(|o| o.parse().ok())
        .collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                header::HeaderName::from_static("idempotency-key"),
            ]),
    )
}

/// With `API_TOKEN` set, every route but `/health` needs `Authorization: Bearer <token>`.
async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(expected) = &state.config.api_token else {
        return next.run(req).await;
    };
    if req.uri().path() == "/health" || req.method() == Method::OPTIONS {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(presented.as_bytes(), expected.expose_secret().as_bytes()) {
        next.run(req).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves the API on `listener` until `shutdown` fires, then finishes open requests.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = app(state).layer(tower_http::trace::TraceLayer::new_for_http());
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[derive(Serialize, utoipa::ToSchema)]
struct Health {
    /// `healthy`, or `unhealthy` with a reason.
    status: &'static str,
    mode: &'static str,
    debug: bool,
    version: &'static str,
    backend: &'static str,
    uptime_secs: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Whether ffmpeg (the mock media providers and the editor need it) can be run.
    ffmpeg: ToolStatus,
}

#[derive(Serialize, utoipa::ToSchema)]
struct ToolStatus {
    available: bool,
    /// Its version line, or what is wrong and how to fix it.
    detail: String,
}

/// Liveness and store reachability. Never requires a token.
#[utoipa::path(get, path = "/health", tag = "ops",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
async fn health(State(state): State<AppState>) -> Response {
    let ping = tokio::time::timeout(std::time::Duration::from_secs(2), state.store.ping()).await;
    let reason = match ping {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(format!("store unreachable: {error}")),
        Err(_) => Some("store did not answer within 2 s".to_owned()),
    };
    let status = if reason.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Health {
        status: if reason.is_none() {
            "healthy"
        } else {
            "unhealthy"
        },
        mode: state.config.provider_mode.as_str(),
        debug: state.config.debug,
        version: env!("CARGO_PKG_VERSION"),
        backend: state.store.backend_name(),
        uptime_secs: state.started.elapsed().as_secs(),
        reason,
        ffmpeg: match state.media.check().await {
            Ok(version) => ToolStatus {
                available: true,
                detail: version,
            },
            Err(problem) => ToolStatus {
                available: false,
                detail: problem,
            },
        },
    };
    (status, Json(body)).into_response()
}

/// Name, version and where to go next.
#[utoipa::path(get, path = "/", tag = "ops", responses((status = 200, body = Object)))]
async fn root() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "name": "Stagecraft",
        "version": env!("CARGO_PKG_VERSION"),
        "docs": "/docs",
        "openapi": "/openapi.json",
        "endpoints": {
            "runs": "/runs",
            "workflows": "/workflows",
            "agents": "/agents",
            "artifacts": "/artifacts",
            "agent_work_orders": "/agent-work-orders",
            "queues": "/queues",
            "workers": "/workers",
            "metrics": "/metrics",
            "health": "/health"
        }
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
struct Queues {
    queues: Vec<crate::store::QueueDepth>,
}

/// Runs by queue and status.
#[utoipa::path(get, path = "/queues", tag = "ops", responses((status = 200, body = Queues)))]
async fn queues(State(state): State<AppState>) -> Result<Json<Queues>, ApiError> {
    Ok(Json(Queues {
        queues: state.store.queue_depths().await?,
    }))
}

/// Prometheus metrics of the whole deployment: runs by queue and status, live workers, and the
/// counters and stage-duration histograms every worker flushes to the store.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, body = String, content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let counters = state.store.counters().await?;
    let depths = state.store.queue_depths().await?;
    let workers = state.store.list_workers().await?;
    let text = crate::metrics::render(&counters, &depths, &workers);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

#[derive(Serialize, utoipa::ToSchema)]
struct Workers {
    workers: Vec<crate::store::WorkerInfo>,
}

/// Live worker processes, their queues, last heartbeat and current runs.
#[utoipa::path(get, path = "/workers", tag = "ops", responses((status = 200, body = Workers)))]
async fn workers(State(state): State<AppState>) -> Result<Json<Workers>, ApiError> {
    Ok(Json(Workers {
        workers: state.store.list_workers().await?,
    }))
}
