//! The agent work-order routes (`/agent-work-orders`): create, list, status, step history and
//! the coding agent's parsed output. Work orders are runs of kind `work_order` on the
//! `work_orders` queue; workers started with `--queues work_orders` execute them.

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::http::{
    ApiError, AppState, ErrorBody, JsonBody, TenantApi,
    openapi::{budget_schema, provider_mode_field, with_paths},
    runs::{Family, SubmitRun, submit},
};
use crate::{
    awo::{
        stream::{self, Entry},
        url::redact,
        workflows::{SandboxType, WorkflowType, branch_of},
    },
    config::ProviderMode,
    ids::RunId,
    store::{RunError, RunFilter, RunKind, RunRecord, RunStatus, StageStatus},
    workflows::Catalog,
};

/// The work orders' routes.
pub struct WorkOrdersApi;

#[derive(utoipa::OpenApi)]
#[openapi(
    tags((name = "work orders", description = "Agent work orders: a coding agent on a git branch, up to a pull request")),
    // The log stream carries these (documented per message by `document`).
    components(schemas(LogEntry))
)]
struct WorkOrdersDoc;

impl TenantApi for WorkOrdersApi {
    fn routes(&self) -> OpenApiRouter<AppState> {
        OpenApiRouter::with_openapi(<WorkOrdersDoc as utoipa::OpenApi>::openapi())
            .routes(routes!(create_work_order, list_work_orders))
            .routes(routes!(get_work_order))
            .routes(routes!(work_order_steps))
            .routes(routes!(work_order_logs))
    }

    fn console_script(&self) -> Option<&'static str> {
        Some(include_str!("work_orders.js"))
    }

    fn document(&self, doc: &mut Value, catalog: &Catalog, default_mode: ProviderMode) {
        constrain_create(doc, catalog, default_mode);
        let log_entry = json!({
            "type": "object", "required": ["data", "event"],
            "properties": {
                "event": {"type": "string", "enum": ["entry"]},
                "data": {"type": "string", "contentMediaType": "application/json",
                         "contentSchema": {"$ref": "#/components/schemas/LogEntry"}},
                "id": {"type": "string"},
                "retry": {"type": "integer"}
            }
        });
        with_paths(doc, |paths| {
            if let Some(get) = paths
                .get_mut("/agent-work-orders/{id}/logs")
                .and_then(|p| p.get_mut("get"))
            {
                get["responses"]["200"]["content"]["text/event-stream"] =
                    json!({"schema": log_entry});
            }
        });
    }
}

/// `CreateWorkOrder` as this deployment checks it: its URL rule, the request's limits, and
/// whether `provider_mode` must be given.
fn constrain_create(doc: &mut Value, catalog: &Catalog, default_mode: ProviderMode) {
    let Some(order) = catalog.of_kind(RunKind::WorkOrder).next() else {
        return;
    };
    let inputs = order.input_schema().schema;
    let schema = &mut doc["components"]["schemas"]["CreateWorkOrder"];
    if !schema["properties"].is_object() {
        return;
    }
    let create = &mut schema["properties"];
    create["repository_url"] = inputs["properties"]["repository_url"].clone();
    create["user_request"] = inputs["properties"]["user_request"].clone();
    create["budget_usd"] = budget_schema();
    let (mode, mode_required) = provider_mode_field(order.as_ref(), default_mode);
    create["provider_mode"] = mode;
    if mode_required {
        if let Some(required) = schema["required"].as_array_mut() {
            required.push(json!("provider_mode"));
        } else {
            schema["required"] = json!(["provider_mode"]);
        }
    }
}

/// `POST /agent-work-orders`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWorkOrder {
    pub repository_url: String,
    pub sandbox_type: SandboxType,
    pub workflow_type: WorkflowType,
    pub user_request: String,
    /// `mock` (the built-in agent and mock pull-request hosting) or `live` (the real CLIs).
    pub provider_mode: Option<ProviderMode>,
    #[schema(value_type = Option<f64>, minimum = 0, maximum = 1000000)]
    pub budget_usd: Option<crate::money::Dollars>,
}

/// A work order's status.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkOrderDoc {
    agent_work_order_id: String,
    status: RunStatus,
    workflow_type: String,
    repository_url: String,
    sandbox_type: String,
    user_request: String,
    branch_name: String,
    provider_mode: ProviderMode,
    current_step: Option<String>,
    last_completed_step: Option<String>,
    #[schema(value_type = Option<Object>)]
    pull_request: Option<Value>,
    commit: Option<String>,
    error: Option<RunError>,
    #[schema(value_type = f64)]
    cost_usd: crate::money::Usd,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    steps_url: String,
    logs_url: String,
}

impl WorkOrderDoc {
    fn new(run: &RunRecord) -> Self {
        let input = |field: &str| {
            run.inputs
                .get(field)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let output = |stage: &str| {
            run.stages
                .iter()
                .find(|s| s.name == stage && s.status == StageStatus::Completed)
                .and_then(|s| s.output.clone())
        };
        let id = run.id.to_string();
        Self {
            agent_work_order_id: id.clone(),
            status: run.status,
            workflow_type: run.name.clone(),
            repository_url: redact(&input("repository_url")),
            sandbox_type: input("sandbox_type"),
            user_request: input("user_request"),
            branch_name: branch_of(&id),
            provider_mode: run.provider_mode,
            current_step: run.current_stage.clone(),
            last_completed_step: run.last_completed_stage().map(str::to_owned),
            pull_request: output("pull_request"),
            commit: output("commit")
                .and_then(|c| c.get("commit").and_then(Value::as_str).map(str::to_owned)),
            error: run.error.clone(),
            cost_usd: run.cost_usd,
            created_at: run.created_at,
            updated_at: run.updated_at,
            finished_at: run.finished_at,
            steps_url: format!("/agent-work-orders/{id}/steps"),
            logs_url: format!("/agent-work-orders/{id}/logs"),
        }
    }
}

/// Creates a work order: validates the repository URL and request, stores the run and queues it.
#[utoipa::path(post, path = "/agent-work-orders", tag = "work orders", request_body = CreateWorkOrder,
    params(("Idempotency-Key" = Option<String>, Header, description = "the same key answers the same work order")),
    responses((status = 201, body = WorkOrderDoc), (status = 200, body = WorkOrderDoc, description = "idempotent replay"),
              (status = 422, body = ErrorBody)))]
async fn create_work_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<CreateWorkOrder>,
) -> Result<Response, ApiError> {
    let inputs = json!({
        "repository_url": request.repository_url,
        "sandbox_type": request.sandbox_type,
        "workflow_type": request.workflow_type,
        "user_request": request.user_request,
    });
    let submit_request = SubmitRun {
        kind: RunKind::WorkOrder,
        name: request.workflow_type.as_str().to_owned(),
        inputs,
        budget_usd: request.budget_usd,
        provider_mode: request.provider_mode,
        reuse: false,
    };
    let (run, created) = submit(&state, submit_request, &headers, Family::WorkOrders).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(WorkOrderDoc::new(&run))).into_response())
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkOrderList {
    agent_work_orders: Vec<WorkOrderDoc>,
    total: u64,
}

/// The newest work orders (up to 100).
#[utoipa::path(get, path = "/agent-work-orders", tag = "work orders", responses((status = 200, body = WorkOrderList)))]
async fn list_work_orders(State(state): State<AppState>) -> Result<Json<WorkOrderList>, ApiError> {
    let filter = RunFilter {
        kind: Some(RunKind::WorkOrder),
        limit: 100,
        ..RunFilter::default()
    };
    let crate::store::RunPage { runs, total, .. } = state.store.list_runs(&filter).await?;
    Ok(Json(WorkOrderList {
        agent_work_orders: runs.iter().map(WorkOrderDoc::new).collect(),
        total,
    }))
}

async fn load(state: &AppState, id: &str) -> Result<RunRecord, ApiError> {
    let missing = || ApiError::not_found(format!("work order {id} not found"));
    let id = RunId::parse(id).ok_or_else(missing)?;
    match state.store.get_run(id).await? {
        Some(run) if run.kind == RunKind::WorkOrder => Ok(run),
        _ => Err(missing()),
    }
}

/// A work order's status.
#[utoipa::path(get, path = "/agent-work-orders/{id}", tag = "work orders", params(("id" = String, Path)),
    responses((status = 200, body = WorkOrderDoc), (status = 404, body = ErrorBody)))]
async fn get_work_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<WorkOrderDoc>, ApiError> {
    Ok(Json(WorkOrderDoc::new(&load(&state, &id).await?)))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StepDoc {
    step: String,
    status: StageStatus,
    attempts: u32,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    /// The coding agent's session, turns and cost (agent steps only).
    session_id: Option<String>,
    turns: Option<u64>,
    #[schema(value_type = f64)]
    cost_usd: crate::money::Usd,
    error: Option<RunError>,
    #[schema(value_type = Option<Object>)]
    output: Option<Value>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StepHistory {
    agent_work_order_id: String,
    steps: Vec<StepDoc>,
}

/// The step history: each stage with its status, timing, agent session, turns, cost and error.
#[utoipa::path(get, path = "/agent-work-orders/{id}/steps", tag = "work orders", params(("id" = String, Path)),
    responses((status = 200, body = StepHistory), (status = 404, body = ErrorBody)))]
async fn work_order_steps(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<StepHistory>, ApiError> {
    let run = load(&state, &id).await?;
    let steps = run
        .stages
        .iter()
        .map(|stage| {
            let field = |name: &str| stage.output.as_ref().and_then(|o| o.get(name).cloned());
            StepDoc {
                step: stage.name.clone(),
                status: stage.status,
                attempts: stage.attempts,
                started_at: stage.started_at,
                finished_at: stage.finished_at,
                session_id: field("session_id").and_then(|v| v.as_str().map(str::to_owned)),
                turns: field("turns").and_then(|v| v.as_u64()),
                cost_usd: stage.cost_usd,
                error: stage.error.clone(),
                output: stage.output.clone(),
            }
        })
        .collect();
    Ok(Json(StepHistory {
        agent_work_order_id: run.id.to_string(),
        steps,
    }))
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LogEntry {
    step: String,
    #[serde(flatten)]
    entry: Entry,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkOrderLogs {
    agent_work_order_id: String,
    /// The coding agent's output, parsed, step by step.
    entries: Vec<LogEntry>,
    /// The work order's own log lines (`logs/{id}.log`).
    log: Vec<String>,
}

/// Most agent entries one answer carries (the latest ones), and most log lines.
const MAX_ENTRIES: usize = 2000;
const MAX_LOG_LINES: usize = 2000;

/// The agent entries of a work order's steps, in step order, read from its raw JSONL (each
/// file is bounded when it is written): the last [`MAX_ENTRIES`], and how many there are in all.
fn agent_entries(data: &std::path::Path, id: &str, steps: &[String]) -> (Vec<LogEntry>, usize) {
    let mut entries = Vec::new();
    for step in steps {
        let path = data.join("outputs").join(id).join(format!("{step}.jsonl"));
        if let Ok(raw) = std::fs::read_to_string(path) {
            let (parsed, _) = stream::parse(&raw);
            entries.extend(parsed.into_iter().map(|entry| LogEntry {
                step: step.clone(),
                entry,
            }));
        }
    }
    let total = entries.len();
    entries.drain(..total.saturating_sub(MAX_ENTRIES));
    (entries, total)
}

/// One client following a work order's agent output, woken by the process's run watcher
/// (agent output is written when a step ends, which the run's events announce).
struct LogFollow {
    /// Entries sent so far, counted from the first the work order ever had.
    sent: usize,
    watch: tokio::sync::watch::Receiver<crate::http::limits::Watched>,
    data: std::path::PathBuf,
    id: String,
    steps: Vec<String>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl LogFollow {
    async fn next_entries(&mut self) -> Option<Vec<LogEntry>> {
        loop {
            let finished = self.watch.borrow_and_update().finished;
            let (data, id, steps) = (self.data.clone(), self.id.clone(), self.steps.clone());
            let (entries, total) =
                tokio::task::spawn_blocking(move || agent_entries(&data, &id, &steps))
                    .await
                    .unwrap_or_default();
            if total > self.sent {
                // `entries` are the last ones of `total`: send those not sent yet.
                let first_kept = total - entries.len();
                let skip = self.sent.saturating_sub(first_kept);
                self.sent = total;
                return Some(entries.into_iter().skip(skip).collect());
            }
            if finished || self.watch.changed().await.is_err() {
                return None;
            }
        }
    }
}

/// The coding agent's parsed output per step, and the work order's log. With
/// `Accept: text/event-stream` the entries are streamed as Server-Sent Events (event `entry`) as
/// each agent step's output is written, until the work order finishes.
#[utoipa::path(get, path = "/agent-work-orders/{id}/logs", tag = "work orders", params(("id" = String, Path)),
    responses((status = 200, body = WorkOrderLogs), (status = 404, body = ErrorBody)))]
async fn work_order_logs(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let run = load(&state, &id).await?;
    let id = run.id.to_string();
    let data = state.config.awo.data_dir.clone();
    let steps: Vec<String> = run.stages.iter().map(|s| s.name.clone()).collect();
    let wants_stream = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if wants_stream {
        let permit = state.limits.event_stream()?;
        let follow = LogFollow {
            sent: 0,
            watch: state.limits.watch(run.id),
            data,
            id,
            steps,
            _permit: permit,
        };
        let events = futures::stream::unfold(Some(follow), |follow| async move {
            let mut follow = follow?;
            let fresh = follow.next_entries().await?;
            let events: Vec<Result<Event, std::convert::Infallible>> = fresh
                .iter()
                .map(|e| {
                    Ok(Event::default()
                        .event("entry")
                        .json_data(e)
                        .unwrap_or_else(|_| Event::default().comment("unserializable entry")))
                })
                .collect();
            Some((futures::stream::iter(events), Some(follow)))
        });
        use futures::StreamExt;
        return Ok(Sse::new(events.flatten())
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let (entries, log) = tokio::task::spawn_blocking(move || {
        let (entries, _) = agent_entries(&data, &id, &steps);
        let log: Vec<String> = std::fs::read_to_string(data.join("logs").join(format!("{id}.log")))
            .map(|text| {
                let lines: Vec<&str> = text.lines().collect();
                let skip = lines.len().saturating_sub(MAX_LOG_LINES);
                lines[skip..].iter().map(|l| (*l).to_owned()).collect()
            })
            .unwrap_or_default();
        (entries, log)
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("reading logs: {e}")))?;
    Ok(Json(WorkOrderLogs {
        agent_work_order_id: run.id.to_string(),
        entries,
        log,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::limits::Watched;

    fn lines(prefix: &str, count: usize) -> String {
        (0..count).map(|i| format!("{prefix}-{i}\n")).collect()
    }

    #[tokio::test]
    async fn a_log_stream_keeps_sending_past_the_entries_one_answer_holds() {
        let data = tempfile::tempdir().expect("tempdir");
        let outputs = data.path().join("outputs").join("wo");
        std::fs::create_dir_all(&outputs).expect("outputs");
        std::fs::write(outputs.join("plan.jsonl"), lines("plan", MAX_ENTRIES + 500)).expect("plan");
        let (tell, watch) = tokio::sync::watch::channel(Watched {
            last_event: Some(1),
            finished: false,
        });
        let permit = std::sync::Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .expect("permit");
        let mut follow = LogFollow {
            sent: 0,
            watch,
            data: data.path().to_path_buf(),
            id: "wo".into(),
            steps: vec!["plan".into(), "implement".into()],
            _permit: permit,
        };
        // The first answer holds the latest MAX_ENTRIES.
        let first = follow.next_entries().await.expect("entries");
        assert_eq!(first.len(), MAX_ENTRIES);
        assert_eq!(first[0].entry.text, "plan-500");
        // More output later: exactly the new entries follow.
        std::fs::write(outputs.join("implement.jsonl"), lines("implement", 3)).expect("implement");
        let _ = tell.send(Watched {
            last_event: Some(2),
            finished: true,
        });
        let next = follow.next_entries().await.expect("more entries");
        let texts: Vec<&str> = next.iter().map(|e| e.entry.text.as_str()).collect();
        assert_eq!(texts, ["implement-0", "implement-1", "implement-2"]);
        assert!(
            follow.next_entries().await.is_none(),
            "the stream ends once finished"
        );
    }
}
