//! The agent routes of the studio API (`/agents`): list, schemas, and one-agent runs that go
//! through the queue like any other run (the API never executes an agent itself).

use axum::{
    Json,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::http::{
    ApiError, AppState, ErrorBody, JsonBody, TenantApi,
    runs::{Family, SubmitRun, submit, wait_until_finished},
};
use crate::{
    config::ProviderMode,
    store::{RunError, RunKind, RunStatus},
    studio::agents,
};

/// The studio's routes.
pub struct StudioApi;

#[derive(utoipa::OpenApi)]
#[openapi(tags((name = "agents", description = "The studio agents: schemas and one-agent runs")))]
struct StudioDoc;

impl TenantApi for StudioApi {
    fn routes(&self) -> OpenApiRouter<AppState> {
        OpenApiRouter::with_openapi(<StudioDoc as utoipa::OpenApi>::openapi())
            .routes(routes!(list_agents))
            .routes(routes!(agent_schema))
            .routes(routes!(run_agent))
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AgentInfo {
    name: &'static str,
    description: &'static str,
    version: u32,
    schema_url: String,
    run_url: String,
}

/// The agents, by name (as the studio's clients read them), or described.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum AgentList {
    Names { agents: Vec<&'static str> },
    Details { agents: Vec<AgentInfo> },
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AgentListQuery {
    /// Describe each agent (description, version, schema and run URLs) instead of naming it.
    #[serde(default)]
    details: bool,
}

/// The studio agents: `{"agents": ["producer", …]}`, or with `?details=true` a description of
/// each.
#[utoipa::path(get, path = "/agents", tag = "agents", params(AgentListQuery),
    responses((status = 200, body = AgentList), (status = 422, body = ErrorBody)))]
async fn list_agents(
    query: Result<Query<AgentListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AgentList>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::Invalid {
        code: "invalid_query",
        message: e.body_text(),
        details: Some(serde_json::json!({"field": "details"})),
    })?;
    if !query.details {
        return Ok(Json(AgentList::Names {
            agents: agents::AGENTS.iter().map(|a| a.name()).collect(),
        }));
    }
    Ok(Json(AgentList::Details {
        agents: agents::AGENTS
            .iter()
            .map(|a| AgentInfo {
                name: a.name(),
                description: a.description(),
                version: a.version(),
                schema_url: format!("/agents/{}/schema", a.name()),
                run_url: format!("/agents/{}/run", a.name()),
            })
            .collect(),
    }))
}

fn unknown_agent(name: &str) -> ApiError {
    ApiError::NotFound {
        code: "unknown_agent",
        message: format!("no agent named {name:?}"),
        details: Some(serde_json::json!({
            "known": agents::AGENTS.iter().map(|a| a.name()).collect::<Vec<_>>()
        })),
    }
}

/// The input and output JSON Schemas of an agent; `$ref`s point into `components.schemas` of
/// the same document.
#[utoipa::path(get, path = "/agents/{name}/schema", tag = "agents", params(("name" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
async fn agent_schema(Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    agents::agent(&name)
        .map(|a| a.document())
        .map(Json)
        .ok_or_else(|| unknown_agent(&name))
}

/// `POST /agents/{name}/run`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentRunRequest {
    #[serde(default = "crate::http::runs::empty_object")]
    #[schema(value_type = Object)]
    pub inputs: Value,
    /// Answer at once with the run id instead of waiting (`run_async` is accepted too).
    #[serde(default, rename = "async", alias = "run_async")]
    pub run_async: bool,
    #[schema(value_type = Option<f64>, minimum = 0, maximum = 1000000)]
    pub budget_usd: Option<crate::money::Dollars>,
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
    #[schema(value_type = Option<Object>)]
    result: Option<Value>,
    error: Option<RunError>,
    #[schema(value_type = f64)]
    cost_usd: crate::money::Usd,
    message: Option<String>,
}

/// Runs one agent through the queue: a worker serving the `agents` queue executes it. Waits up
/// to `SYNC_WAIT_SECS` and answers 200 with the result once finished, or 202 with the run id to
/// poll (`GET /runs/{id}`).
#[utoipa::path(post, path = "/agents/{name}/run", tag = "agents",
    params(("name" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "the same key answers the same run")),
    request_body = AgentRunRequest,
    responses((status = 200, body = AgentRunResponse), (status = 202, body = AgentRunResponse),
              (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn run_agent(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<AgentRunRequest>,
) -> Result<Response, ApiError> {
    if agents::agent(&name).is_none() {
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
    let (mut run, _) = submit(&state, submit_request, &headers, Family::Agents).await?;
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
