//! The HTTP API: routes, state, authentication, and the OpenAPI document.
//!
//! Invariant: http never runs stages. It validates, stores and reads runs; workers execute them.

mod artifacts;
pub mod auth;
mod error;
pub mod limits;
mod list;
pub mod openapi;
pub(crate) mod runs;

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
pub use error::{ApiError, ErrorBody, JsonBody};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};
use utoipa_swagger_ui::SwaggerUi;

use crate::{
    artifacts::ArtifactStore,
    config::{Config, Cors},
    health::{ToolCheck, ToolStatus},
    module::{Modules, Observers},
    store::SharedStore,
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
    /// What the tenants plugged in: their tool checks and the observers of their runs.
    pub tenants: Tenants,
    /// The deployment's bearer tokens.
    pub tokens: auth::Tokens,
    /// Per-process caps on long-lived requests, and the shared watchers of runs.
    pub limits: limits::Limits,
}

impl AppState {
    /// The state of an API process for this configuration.
    pub fn new(
        store: SharedStore,
        catalog: Arc<Catalog>,
        config: Arc<Config>,
        artifacts: ArtifactStore,
        tenants: Tenants,
    ) -> Self {
        Self {
            tokens: auth::Tokens::new(
                config.api_token.as_ref(),
                config.api_token_readonly.as_ref(),
            ),
            limits: limits::Limits::new(&config, store.clone()),
            store,
            catalog,
            config,
            started: Instant::now(),
            artifacts,
            tenants,
        }
    }
}

/// A tenant's part of the HTTP API.
pub trait TenantApi: Send + Sync {
    /// Its routes, with their OpenAPI paths, tags and component schemas.
    fn routes(&self) -> OpenApiRouter<AppState>;

    /// Adds what the derived OpenAPI document cannot say (this deployment's limits, event
    /// stream payloads) to the document served at `/openapi.json`.
    fn document(
        &self,
        _doc: &mut serde_json::Value,
        _catalog: &Catalog,
        _default_mode: crate::store::ProviderMode,
    ) {
    }

    /// A script the console loads to show what is specific to this tenant's runs (see
    /// `console.js`: `Stagecraft.panels.register`). It reads the public API only.
    fn console_script(&self) -> Option<&'static str> {
        None
    }
}

/// What the HTTP core takes from the tenants, without naming one.
#[derive(Clone)]
pub struct Tenants {
    /// Their routes and OpenAPI additions.
    pub apis: Arc<[Arc<dyn TenantApi>]>,
    /// Tools for `/health`, by name: probed at start and refreshed at most once a minute.
    pub tools: Arc<[(&'static str, ToolCheck)]>,
    /// Told of the changes the API makes to runs (cancel, resume).
    pub observers: Observers,
}

impl Tenants {
    /// Starts the tenants' tool checks and gathers their observers, beside their APIs.
    pub async fn of(modules: &Modules, apis: Arc<[Arc<dyn TenantApi>]>) -> Self {
        let mut tools = Vec::new();
        for module in modules.iter() {
            tools.extend(module.tool_checks().await);
        }
        Self {
            apis,
            tools: tools.into(),
            observers: Observers::of(modules),
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Stagecraft", description = "Durable runs for long, expensive AI-agent pipelines"),
    tags(
        (name = "runs", description = "Submit, watch, cancel and resume runs of any kind"),
        (name = "workflows", description = "Multi-stage workflow runs"),
        (name = "artifacts", description = "Files runs produced"),
        (name = "ops", description = "Health, queues and metrics")
    ),
    // Event streams carry these (documented per event by `openapi::document`).
    components(schemas(crate::store::RunEvent, ToolStatus, crate::store::Actor))
)]
struct ApiDoc;

/// The whole API as a router, apart from any socket, so tests and `dev` can serve it.
pub fn app(state: AppState) -> Router {
    let mut api = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(root))
        .routes(routes!(queues))
        .routes(routes!(queue_history))
        .routes(routes!(metrics))
        .routes(routes!(workers))
        .merge(list::routes())
        .merge(runs::routes())
        .merge(artifacts::routes());
    for tenant in state.tenants.apis.iter() {
        api = api.merge(tenant.routes());
    }
    let (router, openapi) = api.split_for_parts();
    let body_limit = state.config.max_body_bytes;
    let router = router
        .merge(SwaggerUi::new("/docs").external_url_unchecked(
            "/openapi.json",
            openapi::document(
                &openapi,
                &state.catalog,
                &state.tokens,
                state.config.provider_mode,
                &state.tenants.apis,
            ),
        ))
        .merge(crate::console::routes(&state))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(middleware::from_fn(
            move |mut req: Request, next: Next| async move {
                req.extensions_mut().insert(error::BodyLimit(body_limit));
                next.run(req).await
            },
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        // A handler that panics answers 500 like any internal error instead of dropping the
        // connection; the panic is logged once.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                ApiError::Internal(anyhow::anyhow!("a request handler panicked")).into_response()
            },
        ));
    let router = match cors(&state.config) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.with_state(state)
}

fn cors(config: &Config) -> Option<CorsLayer> {
    let origins = match &config.cors {
        Cors::Off => return None,
        Cors::Any => AllowOrigin::any(),
        Cors::Origins(origins) => AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| o.parse::<HeaderValue>().ok())
                .collect::<Vec<_>>(),
        ),
    };
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                header::HeaderName::from_static("idempotency-key"),
                header::HeaderName::from_static("last-event-id"),
            ]),
    )
}

/// Serves the API on `listener` until `shutdown` fires, then finishes open requests.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let app = app(state).layer(tower_http::trace::TraceLayer::new_for_http());
    // Answers go out as they are written (an event stream writes in small pieces, which
    // Nagle's algorithm would hold for the client's delayed acknowledgement, ~40 ms).
    let listener = listener.tap_io(|connection| {
        if let Err(error) = connection.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY could not be set on a connection");
        }
    });
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
    /// Why the process is unhealthy (absent when healthy).
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Each tool the tenants need (the studio's `ffmpeg`), by name: whether it can be run, as
    /// last probed (at start-up, then at most once a minute).
    #[serde(flatten)]
    #[schema(additional_properties)]
    tools: BTreeMap<&'static str, ToolStatus>,
}

/// Liveness and store reachability. Never requires a token, and never starts a process.
#[utoipa::path(get, path = "/health", tag = "ops", security(()),
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
        tools: state
            .tenants
            .tools
            .iter()
            .map(|(name, check)| (*name, check.status()))
            .collect(),
    };
    (status, Json(body)).into_response()
}

/// Name, version and where to go next. A browser (`Accept: text/html`) is sent to the console.
#[utoipa::path(get, path = "/", tag = "ops", responses((status = 200, body = Object),
    (status = 303, description = "a browser, sent to the console at `/ui`")))]
async fn root(headers: axum::http::HeaderMap) -> Response {
    let browser = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if browser {
        return axum::response::Redirect::to(crate::console::HOME).into_response();
    }
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
            "health": "/health",
            "console": crate::console::HOME
        }
    }))
    .into_response()
}

#[derive(Serialize, utoipa::ToSchema)]
struct Queues {
    queues: Vec<crate::store::QueueDepth>,
    /// The longest-waiting due run of each queue that has one.
    waiting: Vec<crate::store::QueueWait>,
}

/// Runs by queue and status.
#[utoipa::path(get, path = "/queues", tag = "ops", responses((status = 200, body = Queues)))]
async fn queues(State(state): State<AppState>) -> Result<Json<Queues>, ApiError> {
    Ok(Json(Queues {
        queues: state.store.queue_depths().await?,
        waiting: state.store.oldest_waiting().await?,
    }))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct HistoryQuery {
    /// `hour` (default) or `day`: how far back.
    #[param(value_type = Option<Window>)]
    window: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum Window {
    Hour,
    Day,
}

#[derive(Serialize, utoipa::ToSchema)]
struct QueueHistory {
    window: Window,
    since: chrono::DateTime<chrono::Utc>,
    /// Runs finished per queue and minute, oldest first; minutes without any are left out.
    minutes: Vec<crate::store::Throughput>,
}

/// Throughput per queue over the last hour or day: runs finished per minute, by outcome, kept in
/// the store (a day and an hour of minutes).
#[utoipa::path(get, path = "/queues/history", tag = "ops", params(HistoryQuery),
    responses((status = 200, body = QueueHistory), (status = 422, body = ErrorBody)))]
async fn queue_history(
    State(state): State<AppState>,
    query: Result<axum::extract::Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<QueueHistory>, ApiError> {
    let axum::extract::Query(query) = query.map_err(|e| ApiError::Invalid {
        code: "invalid_query",
        message: e.body_text(),
        details: None,
    })?;
    let (window, span) = match query.window.as_deref() {
        None | Some("hour") => (Window::Hour, chrono::Duration::hours(1)),
        Some("day") => (Window::Day, chrono::Duration::days(1)),
        Some(other) => {
            return Err(ApiError::Invalid {
                code: "invalid_query",
                message: format!("unknown window {other:?}; expected hour or day"),
                details: Some(serde_json::json!({"field": "window"})),
            });
        }
    };
    let since = chrono::Utc::now() - span;
    Ok(Json(QueueHistory {
        window,
        since,
        minutes: state.store.throughput(since).await?,
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
