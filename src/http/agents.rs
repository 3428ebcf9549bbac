//! The agent routes of the studio API (`/agents`): list, schemas, and one-agent runs that go
//! through the queue like any other run (the API never executes an agent itself).

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    ApiError, AppState, ErrorBody, JsonBody,
    runs::{SubmitRun, submit, wait_until_finished},
};
use crate::{
    config::ProviderMode,
    store::{RunError, RunKind, RunStatus},
    studio::agents,
};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_agents))
        .routes(routes!(agent_schema))
        .routes(routes!(run_agent))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AgentInfo {
    name: &'static str,
    description: &'static str,
    version: u32,
    schema_url: String,
    run_url: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AgentList {
    agents: Vec<AgentInfo>,
}

/// The studio agents.
#[utoipa::path(get, path = "/agents", tag = "agents", responses((status = 200, body = AgentList)))]
async fn list_agents() -> Json<AgentList> {
    Json(AgentList {
        agents: agents::AGENTS
            .iter()
            .map(|a| AgentInfo {
                name: a.name,
                description: a.description,
                version: a.version,
                schema_url: format!("/agents/{}/schema", a.name),
                run_url: format!("/agents/{}/run", a.name),
            })
            .collect(),
    })
}

fn unknown_agent(name: &str) -> ApiError {
    ApiError::NotFound {
        code: "unknown_agent",
        message: format!("no agent named {name:?}"),
        details: Some(serde_json::json!({
            "known": agents::AGENTS.iter().map(|a| a.name).collect::<Vec<_>>()
        })),
    }
}

/// The input and output JSON Schemas of an agent; `$ref`s point into `components.schemas` of
/// the same document.
#[utoipa::path(get, path = "/agents/{name}/schema", tag = "agents", params(("name" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
async fn agent_schema(Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    agents::schema(&name)
        .map(Json)
        .ok_or_else(|| unknown_agent(&name))
}

/// `POST /agents/{name}/run`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentRunRequest {
    #[schema(value_type = Object)]
    pub inputs: Value,
    /// Answer at once with the run id instead of waiting (`run_async` is accepted too).
    #[serde(default, rename = "async", alias = "run_async")]
    pub run_async: bool,
    pub budget_usd: Option<f64>,
    pub provider_mode: Option<ProviderMode>,
    /// Reuse the result of an earlier run of this agent with the same inputs, at no cost.
    #[serde(default)]
    pub reuse: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AgentRunResponse {
    run_id: String,
    agent: String,
    status: RunStatus,
    #[schema(value_type = Object)]
    result: Option<Value>,
    error: Option<RunError>,
    cost_usd: f64,
    message: Option<String>,
}

/// Runs one agent through the queue: a worker serving the `agents` queue executes it. Waits up
/// to `SYNC_WAIT_SECS` and answers 200 with the result once finished, or 202 with the run id to
/// poll (`GET /runs/{id}`).
#[utoipa::path(post, path = "/agents/{name}/run", tag = "agents", params(("name" = String, Path)),
    request_body = AgentRunRequest,
    responses((status = 200, body = AgentRunResponse), (status = 202, body = AgentRunResponse),
              (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn run_agent(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<AgentRunRequest>,
) -> Result<Response, ApiError> {
    if agents::spec(&name).is_none() {
        return Err(unknown_agent(&name));
    }
    let submit_request = SubmitRun {
        kind: RunKind::Agent,
        name,
        inputs: request.inputs,
        budget_usd: request.budget_usd,
        provider_mode: request.provider_mode,
        reuse: request.reuse,
    };
    // The wait's slot is taken before anything is stored: a refusal leaves no run behind.
    let waiting = (!request.run_async)
        .then(|| state.limits.sync_wait())
        .transpose()?;
    let (mut run, _) = submit(&state, submit_request, &headers).await?;
    if waiting.is_some() {
        run = wait_until_finished(&state, run).await?;
    }
    let finished = run.status.is_finished();
    let body = AgentRunResponse {
        run_id: run.id.to_string(),
        agent: run.name,
        status: run.status,
        result: run.result,
        error: run.error,
        cost_usd: run.cost_usd,
        message: (!finished)
            .then(|| format!("Agent run queued. Poll /runs/{} for its result.", run.id)),
    };
    let status = if finished {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(body)).into_response())
}
