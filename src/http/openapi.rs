//! The OpenAPI document as the exact contract of the deployment serving it.
//!
//! utoipa generates the document from the handlers; this module then makes it describe this
//! deployment exactly, so that a request the document allows is accepted and one it refuses is
//! refused, and every answer a route can give is documented:
//!
//! - every run-starting route carries the exact input schema of what it starts: `POST /runs`
//!   takes one of the catalogue's workflows (`oneOf`, by `kind` and `name`), and the agent,
//!   workflow and resume routes are documented once per agent or workflow
//!   (`/agents/producer/run`, …), since a body's schema cannot depend on a path parameter;
//! - `provider_mode` offers `live` only where this deployment has the keys live runs need;
//! - the bearer scheme and 401 (and 403 for changes, with a read-only token) appear when a
//!   token is configured; `/health` stays open;
//! - the statuses every route may answer (400 and 413 for bodies, 409, 422, 503 with
//!   `Retry-After`) are listed with their bodies, and event streams document each event.
//!
//! Invariant: run inputs are checked against the same schemas this document embeds
//! ([`crate::schema::InputSchema`]).

use serde_json::{Map, Value, json};

use super::auth::Tokens;
use crate::{
    config::ProviderMode,
    store::RunKind,
    workflows::{Catalog, Workflow},
};

use std::sync::Arc;

use super::TenantApi;

const ERROR_BODY: &str = "#/components/schemas/ErrorBody";

/// The document of this deployment, from the one utoipa generated.
pub fn document(
    generated: &utoipa::openapi::OpenApi,
    catalog: &Catalog,
    tokens: &Tokens,
    default_mode: ProviderMode,
    tenants: &[Arc<dyn TenantApi>],
) -> Value {
    let mut doc = serde_json::to_value(generated).unwrap_or_else(|_| json!({}));
    add_input_components(&mut doc, catalog);
    specialise_submissions(&mut doc, catalog, default_mode);
    specialise_per_workflow(&mut doc, catalog, default_mode);
    constrain_shared_bodies(&mut doc);
    document_event_streams(&mut doc);
    for tenant in tenants {
        tenant.document(&mut doc, catalog, default_mode);
    }
    document_common_answers(&mut doc, tokens);
    doc
}

/// Runs `change` on the document's `paths`.
pub(crate) fn with_paths(doc: &mut Value, change: impl FnOnce(&mut Map<String, Value>)) {
    let mut paths = match doc["paths"].take() {
        Value::Object(paths) => paths,
        _ => Map::new(),
    };
    change(&mut paths);
    doc["paths"] = Value::Object(paths);
}

/// The schemas run inputs refer to, under `components.schemas`.
fn add_input_components(doc: &mut Value, catalog: &Catalog) {
    let mut added = Map::new();
    for workflow in catalog.all() {
        added.extend(workflow.input_schema().components);
    }
    if !doc["components"]["schemas"].is_object() {
        doc["components"]["schemas"] = json!({});
    }
    if let Some(schemas) = doc["components"]["schemas"].as_object_mut() {
        for (name, schema) in added {
            schemas.entry(name).or_insert(schema);
        }
    }
}

/// `provider_mode` as this workflow may be asked for it here (`live` only with its keys), and
/// whether it must be given: when the deployment's default is `live` but this workflow lacks
/// its keys, only an explicit `mock` can run.
pub(crate) fn provider_mode_field(
    workflow: &dyn Workflow,
    default_mode: ProviderMode,
) -> (Value, bool) {
    let live = workflow.check_live().is_ok();
    if default_mode == ProviderMode::Live && !live {
        return (
            json!({"type": "string", "enum": [ProviderMode::Mock.as_str()],
                   "description": "This deployment runs live by default but lacks the keys this workflow needs live: ask for `mock`."}),
            true,
        );
    }
    let mut modes = vec![json!(ProviderMode::Mock.as_str())];
    if live {
        modes.push(json!(ProviderMode::Live.as_str()));
    }
    modes.push(Value::Null);
    (
        json!({"type": ["string", "null"], "enum": modes,
               "description": "Overrides the deployment's provider mode for this run (`live` is offered where this deployment has the keys it needs)."}),
        false,
    )
}

pub(crate) fn budget_schema() -> Value {
    json!({"type": ["number", "null"], "minimum": 0, "maximum": crate::money::MAX_BUDGET_USD,
           "description": "Dollars, kept to the nearest micro-dollar. The run fails with `budget_exceeded` rather than start a stage that would exceed this."})
}

/// Whether a workflow's inputs may be left out (its schema accepts `{}`).
fn inputs_optional(workflow: &dyn Workflow) -> bool {
    workflow.input_schema().check(&mut json!({})).is_ok()
}

/// The fields every run-starting body shares, with the workflow's exact inputs.
fn run_fields(
    workflow: &dyn Workflow,
    default_mode: ProviderMode,
) -> (Map<String, Value>, Vec<Value>) {
    let mut properties = Map::new();
    properties.insert("inputs".into(), workflow.input_schema().schema);
    properties.insert("budget_usd".into(), budget_schema());
    let (mode, mode_required) = provider_mode_field(workflow, default_mode);
    properties.insert("provider_mode".into(), mode);
    properties.insert(
        "reuse".into(),
        json!({"type": "boolean", "description": "Let stages take the checkpoint of an earlier run with the same inputs, at no cost."}),
    );
    let mut required = Vec::new();
    if !inputs_optional(workflow) {
        required.push(json!("inputs"));
    }
    if mode_required {
        required.push(json!("provider_mode"));
    }
    (properties, required)
}

/// `POST /runs` takes one of the catalogue's workflows, each with its exact inputs.
fn specialise_submissions(doc: &mut Value, catalog: &Catalog, default_mode: ProviderMode) {
    let variants: Vec<Value> = catalog
        .all()
        .map(|workflow| {
            let (mut properties, mut required) = run_fields(workflow.as_ref(), default_mode);
            properties.insert("kind".into(), json!({"type": "string", "enum": [workflow.kind().as_str()]}));
            properties.insert(
                "name".into(),
                json!({"type": "string", "enum": [workflow.name()], "description": workflow.description()}),
            );
            required.extend([json!("kind"), json!("name")]);
            json!({"type": "object", "additionalProperties": false, "required": required,
                   "properties": properties, "title": format!("{} {}", workflow.kind().as_str(), workflow.name())})
        })
        .collect();
    with_paths(doc, |paths| {
        if let Some(post) = paths.get_mut("/runs").and_then(|p| p.get_mut("post")) {
            post["requestBody"]["content"]["application/json"]["schema"] =
                json!({"oneOf": variants});
        }
    });
}

/// The run's answer of a synchronous route may come before or after it finished.
fn wait_fields(properties: &mut Map<String, Value>) -> Value {
    properties.insert(
        "async".into(),
        json!({"type": "boolean", "description": "Answer at once instead of waiting for the run to finish."}),
    );
    properties.insert(
        "run_async".into(),
        json!({"type": "boolean", "description": "The same as `async` (the studio's name)."}),
    );
    // Both names at once is one field twice.
    json!({"required": ["async", "run_async"]})
}

/// One literal path per agent or workflow for routes whose body or parameters depend on it.
fn specialise_per_workflow(doc: &mut Value, catalog: &Catalog, default_mode: ProviderMode) {
    let agents: Vec<_> = catalog.of_kind(RunKind::Agent).cloned().collect();
    let workflows: Vec<_> = catalog.of_kind(RunKind::Workflow).cloned().collect();
    with_paths(doc, |paths| {
        specialise_paths(paths, &agents, &workflows, default_mode);
    });
}

fn specialise_paths(
    paths: &mut Map<String, Value>,
    agents: &[std::sync::Arc<dyn Workflow>],
    workflows: &[std::sync::Arc<dyn Workflow>],
    default_mode: ProviderMode,
) {
    if let Some(template) = paths.remove("/agents/{name}/run") {
        for agent in agents {
            let path = format!("/agents/{}/run", agent.name());
            let route = run_route(&template, agent.as_ref(), "run_agent", default_mode);
            paths.insert(path, route);
        }
    }
    if let Some(template) = paths.remove("/workflows/{name}/run") {
        for workflow in workflows {
            let path = format!("/workflows/{}/run", workflow.name());
            paths.insert(
                path,
                run_route(&template, workflow.as_ref(), "run_workflow", default_mode),
            );
        }
    }
    if let Some(template) = paths.remove("/workflows/{name}/resume/{run_id}") {
        for workflow in workflows {
            let mut item = template.clone();
            if let Some(post) = item.get_mut("post") {
                drop_parameter(post, "name");
                post["operationId"] = json!(format!("resume_workflow_{}", workflow.name()));
                let mut stages: Vec<Value> = vec![json!("auto")];
                stages.extend(workflow.stage_names().into_iter().map(Value::from));
                stages.push(Value::Null);
                post["requestBody"]["content"]["application/json"]["schema"] = resume_body(
                    json!({"type": ["string", "null"], "enum": stages,
                           "description": "`auto` (the first stage without a checkpoint) or one of the workflow's stages"}),
                    workflow.input_schema().schema,
                );
            }
            paths.insert(
                format!("/workflows/{}/resume/{{run_id}}", workflow.name()),
                item,
            );
        }
    }
    if let Some(get) = paths
        .get_mut("/agents/{name}/schema")
        .and_then(|p| p.get_mut("get"))
    {
        let names: Vec<&str> = agents.iter().map(|a| a.name()).collect();
        set_parameter_schema(get, "name", json!({"type": "string", "enum": names}));
    }
}

/// A run-starting route of one agent or workflow.
fn run_route(
    template: &Value,
    workflow: &dyn Workflow,
    operation: &str,
    default_mode: ProviderMode,
) -> Value {
    let mut item = template.clone();
    if let Some(post) = item.get_mut("post") {
        drop_parameter(post, "name");
        post["operationId"] = json!(format!("{operation}_{}", workflow.name()));
        post["summary"] = json!(format!(
            "{} {}",
            workflow.description(),
            post["summary"].as_str().unwrap_or_default()
        ));
        let (mut properties, required) = run_fields(workflow, default_mode);
        let not_both = wait_fields(&mut properties);
        post["requestBody"]["content"]["application/json"]["schema"] = json!({
            "type": "object", "additionalProperties": false, "required": required,
            "properties": properties, "not": not_both,
        });
    }
    item
}

/// The body of a resume: the stage to start from, changed inputs, a new budget.
fn resume_body(from_stage: Value, inputs: Value) -> Value {
    let mut inputs = inputs;
    // A patch: fields may be left out, and an optional field set to null is removed (a
    // required one cannot be).
    if let Some(map) = inputs.as_object_mut() {
        let required: Vec<Value> = map
            .remove("required")
            .and_then(|r| r.as_array().cloned())
            .unwrap_or_default();
        if let Some(properties) = map.get_mut("properties").and_then(Value::as_object_mut) {
            for (name, property) in properties.iter_mut() {
                if !required.contains(&json!(name)) {
                    *property = json!({"anyOf": [{"type": "null"}, property.clone()]});
                }
            }
        }
    }
    json!({
        "type": "object", "additionalProperties": false,
        "properties": {
            "from_stage": from_stage,
            "inputs": {"anyOf": [{"type": "null"}, inputs],
                       "description": "Inputs to change before resuming, merged into the run's (a field set to null is removed)"},
            "budget_usd": budget_schema(),
        }
    })
}

fn drop_parameter(operation: &mut Value, name: &str) {
    if let Some(parameters) = operation
        .get_mut("parameters")
        .and_then(Value::as_array_mut)
    {
        parameters.retain(|p| p["name"] != name);
        if parameters.is_empty() {
            if let Some(map) = operation.as_object_mut() {
                map.remove("parameters");
            }
        }
    }
}

fn set_parameter_schema(operation: &mut Value, name: &str, schema: Value) {
    if let Some(parameters) = operation
        .get_mut("parameters")
        .and_then(Value::as_array_mut)
    {
        for parameter in parameters.iter_mut().filter(|p| p["name"] == name) {
            parameter["schema"] = schema.clone();
        }
    }
}

/// Limits of the bodies and parameters every deployment shares.
fn constrain_shared_bodies(doc: &mut Value) {
    let schemas = &mut doc["components"]["schemas"];
    for name in ["ResumeRequest"] {
        if schemas[name].is_object() {
            schemas[name]["properties"]["from_stage"] = json!({"type": ["string", "null"], "minLength": 1, "maxLength": 64,
                "description": "`auto` (default: the first stage without a checkpoint) or a stage name of the run"});
            schemas[name]["properties"]["budget_usd"] = budget_schema();
        }
    }
    let idempotency = json!({"type": "string", "minLength": 1, "maxLength": 200,
        "pattern": "^[!-~]([ -~]*[!-~])?$",
        "description": "The same key (within the retention period, per route family) answers the same run; with a different body, 409 `idempotency_conflict`"});
    // An artifact path's segments, as `http::artifacts` accepts them.
    let segment = json!({"type": "string", "minLength": 1, "maxLength": 255,
        "pattern": "^[^.\\x00-\\x1f\\x7f-\\x9f/\\\\][^\\x00-\\x1f\\x7f-\\x9f/\\\\]*$"});
    with_paths(doc, |paths| {
        for (path, item) in paths.iter_mut() {
            let Some(operations) = item.as_object_mut() else {
                continue;
            };
            for operation in operations.values_mut() {
                set_parameter_schema(operation, "Idempotency-Key", idempotency.clone());
                if path.starts_with("/artifacts/") {
                    for name in ["category", "id", "run_id"] {
                        set_parameter_schema(operation, name, segment.clone());
                    }
                }
            }
        }
    });
}

/// Each event of an event stream, as a client receives it.
fn document_event_streams(doc: &mut Value) {
    let run_event = json!({
        "type": "object", "required": ["data", "event"],
        "properties": {
            "event": {"type": "string", "enum": crate::store::kernel::EventKind::ALL.map(|k| k.as_str())},
            "id": {"type": "string", "pattern": "^[0-9]+$"},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": {"$ref": "#/components/schemas/RunEvent"}},
            "retry": {"type": "integer"}
        }
    });
    with_paths(doc, |paths| {
        if let Some(get) = paths
            .get_mut("/runs/{id}/events")
            .and_then(|p| p.get_mut("get"))
        {
            get["responses"]["200"] = json!({
                "description": "the run's events, one per message, until the run has finished",
                "content": {"text/event-stream": {"schema": run_event}}
            });
        }
    });
}

fn error_answer(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": ERROR_BODY}}}})
}

fn add_answer(operation: &mut Value, status: &str, description: &str) {
    if operation["responses"].get(status).is_none() {
        operation["responses"][status] = error_answer(description);
    }
}

/// Routes that answer without the store.
fn without_store(path: &str) -> bool {
    matches!(path, "/" | "/agents" | "/workflows")
        || path.starts_with("/agents/") && path.ends_with("/schema")
}

/// The answers every route may give: authorisation, bodies, state conflicts, overload.
fn document_common_answers(doc: &mut Value, tokens: &Tokens) {
    if tokens.required() {
        doc["components"]["securitySchemes"] = json!({"bearer": {"type": "http", "scheme": "bearer",
            "description": "API_TOKEN; API_TOKEN_READONLY for GET routes only"}});
        doc["security"] = json!([{"bearer": []}]);
    }
    let read_only = tokens.has_read_only();
    let required = tokens.required();
    with_paths(doc, |paths| {
        for (path, item) in paths.iter_mut() {
            common_answers(path, item, required, read_only);
        }
    });
}

fn common_answers(path: &str, item: &mut Value, token_required: bool, read_only: bool) {
    {
        let Some(operations) = item.as_object_mut() else {
            return;
        };
        for (method, operation) in operations.iter_mut() {
            if path == "/health" {
                operation["security"] = json!([]);
                continue;
            }
            let has_body = operation.get("requestBody").is_some();
            let starts_runs = method == "post" && !path.ends_with("/cancel");
            if token_required {
                let answer = error_answer("missing or invalid bearer token (`unauthorized`)");
                operation["responses"]["401"] = answer;
            }
            if read_only && method != "get" {
                add_answer(
                    operation,
                    "403",
                    "the read-only token may only read (`forbidden`)",
                );
            }
            if has_body {
                add_answer(operation, "400", "the body is not JSON (`malformed_json`)");
                add_answer(
                    operation,
                    "413",
                    "the body is larger than MAX_BODY_BYTES (`payload_too_large`)",
                );
                add_answer(
                    operation,
                    "422",
                    "a value does not fit its schema; `details.field` names it",
                );
            }
            if starts_runs {
                add_answer(
                    operation,
                    "409",
                    "the run's state forbids this, or the Idempotency-Key was used with another body",
                );
            }
            if !without_store(path) && path != "/health" {
                let mut answer = error_answer(
                    "the store is unreachable (`unavailable`) or this process is at one of its limits (`overloaded`); try again after `Retry-After`",
                );
                answer["headers"] = json!({"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer", "minimum": 0}}});
                operation["responses"]["503"] = answer;
            }
        }
    }
}
