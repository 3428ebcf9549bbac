//! Runs of every kind (`/runs`) and the workflow routes of the studio API (`/workflows`).

use std::convert::Infallible;

use axum::{
    Extension, Json,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures::{Stream, StreamExt, stream};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{ApiError, AppState, ErrorBody, JsonBody};
pub use crate::status::RunDoc;
use crate::{
    config::ProviderMode,
    ids::RunId,
    status::ResumePreview,
    store::{Actor, FromStage, NewRun, ResumeChanges, RunError, RunKind, RunRecord, RunStatus},
};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_run))
        .routes(routes!(run_events))
        .routes(routes!(cancel_run))
        .routes(routes!(resume_run))
        .routes(routes!(resume_preview))
        .routes(routes!(list_workflows))
        .routes(routes!(run_workflow))
        .routes(routes!(workflow_status))
        .routes(routes!(resume_workflow))
}

const MAX_IDEMPOTENCY_KEY: usize = 200;
const MAX_NAME: usize = 200;
const MAX_STAGE_NAME: usize = 64;

/// `POST /runs`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRun {
    pub kind: RunKind,
    /// The workflow (or agent) name.
    pub name: String,
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub inputs: Value,
    /// The run fails with `budget_exceeded` rather than start a stage that would exceed this.
    #[schema(value_type = Option<f64>, minimum = 0, maximum = 1000000)]
    pub budget_usd: Option<crate::money::Dollars>,
    /// Overrides the deployment's provider mode for this run.
    pub provider_mode: Option<ProviderMode>,
    /// Let stages take the checkpoint of an earlier run whose stage had the same inputs and agent
    /// versions, at no cost (the status document names the stages reused).
    #[serde(default)]
    pub reuse: bool,
}

pub(crate) fn empty_object() -> Value {
    Value::Object(Default::default())
}

fn parse_run_id(text: &str) -> Result<RunId, ApiError> {
    RunId::parse(text).ok_or_else(|| ApiError::not_found(format!("run {text} not found")))
}

async fn load_run(state: &AppState, id: &str) -> Result<RunRecord, ApiError> {
    let id = parse_run_id(id)?;
    state
        .store
        .get_run(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("run {id} not found")))
}

/// The route families idempotency keys are scoped by: the same key sent to two of them names
/// two different runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Runs,
    Agents,
    Workflows,
    WorkOrders,
}

impl Family {
    fn as_str(self) -> &'static str {
        match self {
            Self::Runs => "runs",
            Self::Agents => "agents",
            Self::Workflows => "workflows",
            Self::WorkOrders => "work_orders",
        }
    }
}

/// The `Idempotency-Key` header: 1 to 200 printable ASCII characters, neither first nor last a
/// space (exactly the documented pattern).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    let printable = bytes.iter().all(|b| (b' '..=b'~').contains(b));
    let trimmed = bytes.first() != Some(&b' ') && bytes.last() != Some(&b' ');
    if bytes.is_empty() || bytes.len() > MAX_IDEMPOTENCY_KEY || !printable || !trimmed {
        return Err(ApiError::invalid(
            format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters, \
                 not starting or ending with a space"
            ),
            Some("Idempotency-Key"),
        ));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// A fingerprint of what a submission asks for (not how it waits for the answer).
fn request_hash(name: &str, inputs: &Value, request: &SubmitRun) -> String {
    use sha2::{Digest, Sha256};
    let asked = serde_json::json!({
        "kind": request.kind.as_str(),
        "name": name,
        "inputs": inputs,
        "budget_usd": request.budget_usd.map(crate::money::Dollars::micros),
        "provider_mode": request.provider_mode.map(ProviderMode::as_str),
        "reuse": request.reuse,
    });
    Sha256::digest(asked.to_string().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Validates and stores a run. Answers the record and whether it was created now (false when
/// the idempotency key was already used).
pub(crate) async fn submit(
    state: &AppState,
    mut request: SubmitRun,
    headers: &HeaderMap,
    family: Family,
) -> Result<(RunRecord, bool), ApiError> {
    let key = idempotency_key(headers)?.map(|key| format!("{}:{key}", family.as_str()));
    if request.name.len() > MAX_NAME {
        return Err(ApiError::invalid("name is too long", Some("name")));
    }
    let workflow = state
        .catalog
        .get(request.kind, &request.name)
        .ok_or_else(|| {
            let known: Vec<&str> = state
                .catalog
                .of_kind(request.kind)
                .map(|w| w.name())
                .collect();
            ApiError::NotFound {
                code: "unknown_workflow",
                message: format!("no {} named {:?}", request.kind.as_str(), request.name),
                details: Some(serde_json::json!({"known": known})),
            }
        })?;
    let mut inputs = std::mem::take(&mut request.inputs);
    workflow
        .validate(&mut inputs)
        .map_err(|e| ApiError::invalid(e.to_string(), Some(&e.field)))?;
    let provider_mode = request.provider_mode.unwrap_or(state.config.provider_mode);
    if provider_mode == ProviderMode::Live {
        if let Err((code, message)) = workflow.check_live() {
            return Err(ApiError::Invalid {
                code,
                message,
                details: Some(serde_json::json!({"field": "provider_mode"})),
            });
        }
    }
    let budget_usd = request
        .budget_usd
        .map(crate::money::Dollars::usd)
        .or_else(|| workflow.default_budget(&inputs));
    let request_hash = key
        .as_ref()
        .map(|_| request_hash(workflow.name(), &inputs, &request));
    let run = NewRun {
        id: RunId::generate(),
        kind: request.kind,
        name: workflow.name().to_owned(),
        queue: workflow.queue().to_owned(),
        inputs,
        provider_mode,
        budget_usd,
        stage_names: workflow.stage_names(),
        idempotency_key: key,
        request_hash,
        reuse: request.reuse,
    };
    Ok(state.store.insert_run(run).await?)
}

/// Submits a run of any kind. Answers once it is stored and queued (201), or with the run an
/// earlier request with the same `Idempotency-Key` created (200).
#[utoipa::path(post, path = "/runs", tag = "runs", request_body = SubmitRun,
    params(("Idempotency-Key" = Option<String>, Header, description = "the same key returns the same run")),
    responses((status = 201, body = RunDoc), (status = 200, body = RunDoc, description = "idempotent replay"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
pub(super) async fn submit_run(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<SubmitRun>,
) -> Result<Response, ApiError> {
    let (run, created) = submit(&state, request, &headers, Family::Runs).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(run_doc(&state, run))).into_response())
}

/// The status document of one run.
#[utoipa::path(get, path = "/runs/{id}", tag = "runs", params(("id" = String, Path)),
    responses((status = 200, body = RunDoc), (status = 404, body = ErrorBody)))]
async fn get_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RunDoc>, ApiError> {
    Ok(Json(run_doc(&state, load_run(&state, &id).await?)))
}

/// The whole status document of a run, each stage with the attempts its retry policy allows.
pub(crate) fn run_doc(state: &AppState, run: RunRecord) -> RunDoc {
    let workflow = state.catalog.get(run.kind, &run.name);
    let mut doc = RunDoc::full(run);
    if let (Some(workflow), Some(stages)) = (workflow, doc.stages.as_mut()) {
        for (doc, stage) in stages.iter_mut().zip(workflow.stages()) {
            let policy = stage.retry_policy().unwrap_or(state.config.default_retry);
            doc.max_attempts = Some(policy.max_attempts);
        }
    }
    doc
}

/// Server-Sent Events of a run's progress, from the start (or after `Last-Event-ID`); the stream
/// ends once the run is finished and every event has been sent. Each API process serves at most
/// `MAX_EVENT_STREAMS` streams at once (503 `overloaded` beyond).
#[utoipa::path(get, path = "/runs/{id}/events", tag = "runs", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/event-stream", body = String), (status = 404, body = ErrorBody),
              (status = 503, body = ErrorBody, description = "too many open streams (`overloaded`, with `Retry-After`)")))]
async fn run_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let run = load_run(&state, &id).await?;
    let permit = state.limits.event_stream()?;
    // A position past any real log (or not a number) replays from the start.
    let after: i64 = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .filter(|seq| (0..=i64::from(u32::MAX)).contains(seq))
        .unwrap_or(0);
    let follow = Follow {
        run_id: run.id,
        // A run finished when it was read has no event past the one it was read at.
        known_end: run.status.is_finished().then_some(run.event_seq),
        after,
        watch: state.limits.watch(run.id),
        store: state.store.clone(),
        _permit: permit,
    };
    let batches = stream::unfold(Some(follow), |follow| async move {
        let mut follow = follow?;
        let events = follow.next_events().await?;
        let items: Vec<Result<Event, Infallible>> = events
            .iter()
            .map(|e| {
                Ok(Event::default()
                    .id(e.seq.to_string())
                    .event(e.kind.as_str())
                    .json_data(e)
                    .unwrap_or_else(|_| Event::default().comment("unserializable event")))
            })
            .collect();
        Some((stream::iter(items), Some(follow)))
    });
    Ok(Sse::new(batches.flatten()).keep_alive(KeepAlive::default()))
}

/// One client following a run's events, woken by the process's run watcher.
struct Follow {
    run_id: RunId,
    /// The last event of a run that was finished when the stream began.
    known_end: Option<i64>,
    after: i64,
    watch: tokio::sync::watch::Receiver<super::limits::Watched>,
    store: crate::store::SharedStore,
    /// The stream's slot among `MAX_EVENT_STREAMS`, freed when the stream ends.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Follow {
    /// The next events after the ones sent, waiting for them; `None` once the run is finished
    /// and everything was sent.
    async fn next_events(&mut self) -> Option<Vec<crate::store::RunEvent>> {
        loop {
            let seen = *self.watch.borrow_and_update();
            let answered = match self.store.events_after(self.run_id, self.after, 500).await {
                Ok(events) => {
                    if let Some(last) = events.last() {
                        self.after = last.seq;
                        return Some(events);
                    }
                    let ended = self.known_end.is_some_and(|end| end <= self.after)
                        || (seen.finished
                            && seen.last_event.is_some_and(|last| last <= self.after));
                    if ended {
                        return None;
                    }
                    true
                }
                Err(_) => false,
            };
            // Wait for the watcher to see the run move; after a failed read, ask again soon
            // even if nothing moves (a finished run never moves again).
            tokio::select! {
                changed = self.watch.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                () = tokio::time::sleep(super::limits::WATCH_INTERVAL), if !answered => {}
            }
        }
    }
}

/// Cancels a run: a queued one at once; a running one at its worker's next heartbeat, which
/// interrupts the stage and kills its subprocesses.
#[utoipa::path(post, path = "/runs/{id}/cancel", tag = "runs", params(("id" = String, Path)),
    responses((status = 200, body = RunDoc), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn cancel_run(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<Json<RunDoc>, ApiError> {
    let id = parse_run_id(&id)?;
    let run = state.store.request_cancel(id, actor).await?;
    observe(&state, &run).await;
    Ok(Json(run_doc(&state, run)))
}

/// Tells the tenants' observers of a change the API made (cancel, resume).
pub(super) async fn observe(state: &AppState, run: &RunRecord) {
    let change = crate::module::RunChange {
        run: run.id,
        store: &state.store,
        artifacts: &state.artifacts,
    };
    state
        .tenants
        .observers
        .notify(run.kind, &run.name, &change)
        .await;
}

/// `POST /runs/{id}/resume`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    /// `auto` (default: the first stage without a checkpoint) or a stage name.
    #[serde(default)]
    pub from_stage: Option<String>,
    /// Inputs to change before resuming, merged into the run's inputs (a field set to null is
    /// removed); checked like the inputs of a new run.
    #[schema(value_type = Option<Object>)]
    pub inputs: Option<Value>,
    /// A new budget for the run (e.g. after it failed with `budget_exceeded`).
    #[schema(value_type = Option<f64>, minimum = 0, maximum = 1000000)]
    pub budget_usd: Option<crate::money::Dollars>,
}

/// A run's inputs with a resume's changes merged in (a field set to null is removed), checked
/// against its workflow's schema. Through the workflow's own route the schema said what fits
/// (422); through `/runs`, what fits depends on which run it is (409).
fn patched_inputs(
    state: &AppState,
    run: &RunRecord,
    patch: serde_json::Map<String, Value>,
    expected_name: Option<&str>,
) -> Result<Value, ApiError> {
    let mut inputs = match run.inputs.clone() {
        Value::Object(map) => map,
        _ => Default::default(),
    };
    for (key, value) in patch {
        if value.is_null() {
            inputs.remove(&key);
        } else {
            inputs.insert(key, value);
        }
    }
    let mut inputs = Value::Object(inputs);
    if let Some(workflow) = state.catalog.get(run.kind, &run.name) {
        workflow
            .validate(&mut inputs)
            .map_err(|e| match expected_name {
                Some(_) => ApiError::invalid(e.to_string(), Some(&e.field)),
                None => ApiError::Conflict {
                    code: "invalid_input",
                    message: format!("the inputs do not fit run {}'s workflow: {e}", run.id),
                    details: Some(serde_json::json!({"field": e.field})),
                },
            })?;
    }
    Ok(inputs)
}

async fn resume(
    state: &AppState,
    (id, actor): (&str, Actor),
    request: ResumeRequest,
    expected_name: Option<&str>,
) -> Result<RunRecord, ApiError> {
    let run = load_run(state, id).await?;
    if let Some(name) = expected_name {
        if run.name != name {
            return Err(ApiError::not_found(format!(
                "run {id} is not a run of {name:?}"
            )));
        }
    }
    let from = from_stage(&run, request.from_stage.as_deref())?;
    let inputs = match request.inputs {
        None => None,
        Some(Value::Object(patch)) => Some(patched_inputs(state, &run, patch, expected_name)?),
        Some(_) => {
            return Err(ApiError::invalid(
                "inputs must be a JSON object",
                Some("inputs"),
            ));
        }
    };
    let changes = ResumeChanges {
        inputs,
        budget_usd: request.budget_usd.map(crate::money::Dollars::usd),
        actor,
    };
    let run = state.store.resume(run.id, from, changes).await?;
    observe(state, &run).await;
    Ok(run)
}

/// Re-queues a failed, cancelled or completed run from a stage, keeping the checkpoints before it.
#[utoipa::path(post, path = "/runs/{id}/resume", tag = "runs", params(("id" = String, Path)), request_body = ResumeRequest,
    responses((status = 200, body = RunDoc), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
async fn resume_run(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<ResumeRequest>,
) -> Result<Json<RunDoc>, ApiError> {
    Ok(Json(run_doc(
        &state,
        resume(&state, (&id, actor), request, None).await?,
    )))
}

/// Which stage a resume starts from: `auto` (or none), or one of the run's own stages.
fn from_stage(run: &RunRecord, asked: Option<&str>) -> Result<FromStage, ApiError> {
    match asked {
        None | Some("auto") => Ok(FromStage::Auto),
        Some(stage) if stage.is_empty() || stage.chars().count() > MAX_STAGE_NAME => {
            Err(ApiError::invalid(
                format!("from_stage must be 1 to {MAX_STAGE_NAME} characters"),
                Some("from_stage"),
            ))
        }
        Some(stage) if run.stage_index(stage).is_some() => Ok(FromStage::Named(stage.to_owned())),
        // The stages are the run's own: naming another's is a conflict with this run's state.
        Some(stage) => {
            let names: Vec<&str> = run.stages.iter().map(|s| s.name.as_str()).collect();
            Err(ApiError::Conflict {
                code: "invalid_from_stage",
                message: format!("run {} has no stage {stage:?}", run.id),
                details: Some(serde_json::json!({"field": "from_stage", "stages": names})),
            })
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PreviewQuery {
    /// `auto` (default) or a stage name, as for `POST /runs/{id}/resume`.
    #[param(min_length = 1, max_length = 64)]
    from_stage: Option<String>,
}

/// What resuming a run would redo, before resuming it: the stages that run again, the memoised
/// steps kept or forgotten, what they cost last time, and the budget. Changes nothing.
#[utoipa::path(get, path = "/runs/{id}/resume-preview", tag = "runs",
    params(("id" = String, Path), PreviewQuery),
    responses((status = 200, body = ResumePreview), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
async fn resume_preview(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<PreviewQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ResumePreview>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::Invalid {
        code: "invalid_query",
        message: e.body_text(),
        details: None,
    })?;
    let run = load_run(&state, &id).await?;
    let asked = query
        .from_stage
        .as_deref()
        .map(crate::schema::without_final_line_break);
    let from = from_stage(&run, asked)?;
    let start = crate::store::resume_start(&run, &from)?;
    let kept_steps = match from {
        FromStage::Auto if run.stages[start].progress.is_some() => {
            state.store.steps(run.id, start).await?
        }
        _ => Vec::new(),
    };
    Ok(Json(ResumePreview::of(&run, start, &from, &kept_steps)))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkflowInfo {
    name: String,
    description: String,
    stages: Vec<String>,
    #[schema(value_type = Object)]
    input_schema: Value,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkflowList {
    workflows: Vec<WorkflowInfo>,
}

/// The workflows this deployment runs, with their stages.
#[utoipa::path(get, path = "/workflows", tag = "workflows", responses((status = 200, body = WorkflowList)))]
async fn list_workflows(State(state): State<AppState>) -> Json<WorkflowList> {
    let workflows = state
        .catalog
        .of_kind(RunKind::Workflow)
        .map(|w| WorkflowInfo {
            name: w.name().to_owned(),
            description: w.description().to_owned(),
            stages: w.stage_names(),
            input_schema: w.input_schema().to_document(),
        })
        .collect();
    Json(WorkflowList { workflows })
}

/// `POST /workflows/{name}/run`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowRunRequest {
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub inputs: Value,
    /// Answer at once instead of waiting for completion (`run_async` is accepted too).
    #[serde(default, rename = "async", alias = "run_async")]
    pub run_async: bool,
    #[schema(value_type = Option<f64>, minimum = 0, maximum = 1000000)]
    pub budget_usd: Option<crate::money::Dollars>,
    pub provider_mode: Option<ProviderMode>,
    /// Reuse earlier runs' checkpoints where a stage's inputs match (see `POST /runs`).
    #[serde(default)]
    pub reuse: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkflowRunResponse {
    run_id: String,
    workflow: String,
    status: RunStatus,
    #[schema(value_type = Option<Object>)]
    result: Option<Value>,
    error: Option<RunError>,
    message: Option<String>,
}

/// Starts a workflow run. Async answers at once (202); sync waits up to `SYNC_WAIT_SECS` for the
/// result and answers 200 when finished, 202 with the run id to poll otherwise.
#[utoipa::path(post, path = "/workflows/{name}/run", tag = "workflows",
    params(("name" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "the same key answers the same run")),
    request_body = WorkflowRunRequest,
    responses((status = 200, body = WorkflowRunResponse), (status = 202, body = WorkflowRunResponse),
              (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn run_workflow(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<WorkflowRunRequest>,
) -> Result<Response, ApiError> {
    let submit_request = SubmitRun {
        kind: RunKind::Workflow,
        name: name.clone(),
        inputs: request.inputs,
        budget_usd: request.budget_usd,
        provider_mode: request.provider_mode,
        reuse: request.reuse,
    };
    // The wait's slot is taken before anything is stored: a refusal leaves no run behind.
    let waiting = (!request.run_async)
        .then(|| state.limits.sync_wait())
        .transpose()?;
    let (mut run, _) = submit(&state, submit_request, &headers, Family::Workflows).await?;
    if waiting.is_some() {
        run = wait_until_finished(&state, run).await?;
    }
    let finished = run.status.is_finished();
    let message = (!finished).then(|| {
        format!(
            "Workflow started. Poll /workflows/status/{} for updates.",
            run.id
        )
    });
    let body = WorkflowRunResponse {
        run_id: run.id.to_string(),
        workflow: run.name,
        status: run.status,
        result: run.result,
        error: run.error,
        message,
    };
    let status = if finished {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(body)).into_response())
}

/// The run once it has finished, or as it is when `SYNC_WAIT_SECS` have passed. The caller
/// holds one of the process's `MAX_SYNC_WAITS` slots (taken before the run was submitted).
pub(crate) async fn wait_until_finished(
    state: &AppState,
    run: RunRecord,
) -> Result<RunRecord, ApiError> {
    if run.status.is_finished() {
        return Ok(run);
    }
    let mut watch = state.limits.watch(run.id);
    let finished = async {
        while !watch.borrow_and_update().finished {
            if watch.changed().await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(state.config.sync_wait, finished).await;
    load_run(state, &run.id.to_string()).await
}

/// The status document of a workflow run.
#[utoipa::path(get, path = "/workflows/status/{run_id}", tag = "workflows", params(("run_id" = String, Path)),
    responses((status = 200, body = RunDoc), (status = 404, body = ErrorBody)))]
async fn workflow_status(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
) -> Result<Json<RunDoc>, ApiError> {
    Ok(Json(run_doc(&state, load_run(&state, &run_id).await?)))
}

/// Resumes a workflow run from `from_stage` (default `auto`).
#[utoipa::path(post, path = "/workflows/{name}/resume/{run_id}", tag = "workflows",
    params(("name" = String, Path), ("run_id" = String, Path)), request_body = ResumeRequest,
    responses((status = 200, body = RunDoc), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
async fn resume_workflow(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path((name, run_id)): Path<(String, String)>,
    JsonBody(request): JsonBody<ResumeRequest>,
) -> Result<Json<RunDoc>, ApiError> {
    Ok(Json(run_doc(
        &state,
        resume(&state, (&run_id, actor), request, Some(&name)).await?,
    )))
}
