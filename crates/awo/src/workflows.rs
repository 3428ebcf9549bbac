//! The work-order workflows: `agent_workflow_plan` (sandbox → plan → implement → commit → push →
//! pull_request) and `plan_only` (sandbox → plan), every stage checkpointed.
//!
//! Each stage is safe to run again after a crash: the sandbox is kept once cloned, an agent
//! step's checkpoint means it never runs again, `commit` recognises its own commit, `push`
//! pushes the same commit again, and `pull_request` finds the open pull request of the branch
//! before opening one.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use super::{
    stream,
    tools::{Tools, mock_stream},
    url::{RepoUrl, UrlPolicy},
};
use stagecraft_core::{
    engine::{RetryPolicy, Stage, StageContext, StageError, StageOutput},
    money::Usd,
    schema::InputSchema,
    store::ProviderMode,
    store::RunKind,
    workflows::{InputError, Workflow, parse_inputs},
};

/// The queue of work orders; `worker --queues work_orders` serves them.
pub const WORK_ORDERS_QUEUE: &str = "work_orders";

const PLAN_TEMPLATE: &str = include_str!("commands/plan.md");
const IMPLEMENT_TEMPLATE: &str = include_str!("commands/implement.md");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxType {
    GitBranch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowType {
    AgentWorkflowPlan,
    PlanOnly,
}

impl WorkflowType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AgentWorkflowPlan => "agent_workflow_plan",
            Self::PlanOnly => "plan_only",
        }
    }
}

/// Longest `user_request` accepted, in characters.
pub const MAX_REQUEST_CHARS: usize = 20_000;

/// What a work order is asked to do (`POST /agent-work-orders`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkOrderInputs {
    /// The repository to work on: a scheme of `AWO_ALLOWED_URL_SCHEMES`, a host of
    /// `AWO_ALLOWED_HOSTS`, no credentials (the schema's `pattern` is the exact rule).
    #[schema(min_length = 1, max_length = 2048)]
    pub repository_url: String,
    pub sandbox_type: SandboxType,
    pub workflow_type: WorkflowType,
    /// What the coding agent should do.
    #[schema(min_length = 1, max_length = 20000)]
    pub user_request: String,
}

/// Parses and checks a work order's inputs; answers them with the repository URL checked.
pub fn check_inputs(
    inputs: &Value,
    policy: &UrlPolicy,
) -> Result<(WorkOrderInputs, RepoUrl), InputError> {
    let parsed: WorkOrderInputs = parse_inputs(inputs)?;
    let url = policy
        .check(&parsed.repository_url)
        .map_err(|e| InputError {
            field: "inputs.repository_url".to_owned(),
            message: e.0,
        })?;
    let length = parsed.user_request.chars().count();
    if !(1..=MAX_REQUEST_CHARS).contains(&length) {
        return Err(InputError {
            field: "inputs.user_request".to_owned(),
            message: format!("must be 1 to {MAX_REQUEST_CHARS} characters"),
        });
    }
    Ok((parsed, url))
}

/// The commit and pull-request title: the request's first line without control characters,
/// at most 72 characters (it is a command-line argument of gh).
fn title_of(request: &str) -> String {
    let title: String = request
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(72)
        .collect();
    match title.trim() {
        "" => "Work order".to_owned(),
        title => title.to_owned(),
    }
}

/// The branch a work order works on.
pub fn branch_of(id: &str) -> String {
    format!("wo-{id}")
}

fn plan_file(branch: &str) -> String {
    format!("plans/{branch}.md")
}

/// What every work-order stage shares.
#[derive(Debug)]
pub struct WorkOrders {
    pub tools: Tools,
    pub policy: UrlPolicy,
}

impl WorkOrders {
    fn inputs(&self, ctx: &StageContext) -> Result<(WorkOrderInputs, RepoUrl), StageError> {
        check_inputs(&ctx.inputs, &self.policy)
            .map_err(|e| StageError::fatal("invalid_input", e.to_string()))
    }

    fn sandbox(&self, ctx: &StageContext) -> Result<PathBuf, StageError> {
        let dir = self.tools.repository_dir(&ctx.run_id.to_string());
        if dir.join(".git").is_dir() {
            Ok(dir)
        } else {
            Err(StageError::fatal(
                "sandbox_missing",
                format!(
                    "the sandbox {} is gone; resume from the sandbox stage",
                    dir.display()
                ),
            ))
        }
    }

    /// The command template of a step: `AGENT_WORK_ORDER_COMMANDS_DIR/{step}.md` when set,
    /// else the one shipped with Stagecraft.
    fn template(&self, step: &str, shipped: &str) -> Result<String, StageError> {
        match &self.tools.settings.commands_dir {
            Some(dir) => std::fs::read_to_string(dir.join(format!("{step}.md"))).map_err(|e| {
                StageError::fatal(
                    "template_missing",
                    format!(
                        "cannot read {}: {e} (AGENT_WORK_ORDER_COMMANDS_DIR)",
                        dir.join(format!("{step}.md")).display()
                    ),
                )
            }),
            None => Ok(shipped.to_owned()),
        }
    }
}

fn render(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = template.to_owned();
    for (name, value) in values {
        out = out.replace(&format!("{{{{{name}}}}}"), value);
    }
    out
}

fn output<T: Serialize>(value: &T, cost_usd: Usd) -> Result<StageOutput, StageError> {
    Ok(StageOutput {
        output: serde_json::to_value(value)
            .map_err(|e| StageError::fatal("invalid_output", e.to_string()))?,
        cost_usd,
    })
}

/// Git and gh calls are retried a few times, quickly; agent steps follow the default policy.
fn tool_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        base_delay: std::time::Duration::from_secs(1),
        max_delay: std::time::Duration::from_secs(20),
        timeout: std::time::Duration::from_secs(4 * 3600),
    }
}

struct Sandbox(Arc<WorkOrders>);
struct AgentStep {
    orders: Arc<WorkOrders>,
    step: &'static str,
}
struct Commit(Arc<WorkOrders>);
struct Push(Arc<WorkOrders>);
struct PullRequest(Arc<WorkOrders>);

#[async_trait]
impl Stage for Sandbox {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn retry_policy(&self) -> Option<RetryPolicy> {
        Some(tool_retry())
    }

    async fn run(&self, ctx: &mut StageContext) -> Result<StageOutput, StageError> {
        let (_, url) = self.0.inputs(ctx)?;
        let id = ctx.run_id.to_string();
        let branch = branch_of(&id);
        let tools = &self.0.tools;
        let (dir, cloned) = tools.clone_sandbox(&id, &url, &branch, &ctx.cancel).await?;
        let base = tools
            .run_git(&dir, &["rev-parse", "HEAD"], &ctx.cancel)
            .await?;
        tools.log(
            &id,
            &format!(
                "sandbox: {} at {base} on {branch} (cloned now: {cloned})",
                dir.display()
            ),
        );
        output(
            &json!({"path": dir, "branch": branch, "base_commit": base, "sandbox_type": "git_branch"}),
            Usd::ZERO,
        )
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct AgentStepOutput {
    step: String,
    session_id: Option<String>,
    turns: Option<u32>,
    cost_usd: Usd,
    result: Option<String>,
    subtype: Option<String>,
    malformed_lines: u32,
    plan_file: String,
    mock: bool,
}

impl AgentStep {
    /// The step's prompt: its command template with the work order's values.
    fn prompt(
        &self,
        inputs: &WorkOrderInputs,
        id: &str,
        branch: &str,
        plan: &str,
    ) -> Result<String, StageError> {
        let shipped = if self.step == "plan" {
            PLAN_TEMPLATE
        } else {
            IMPLEMENT_TEMPLATE
        };
        Ok(render(
            &self.orders.template(self.step, shipped)?,
            &[
                ("user_request", &inputs.user_request),
                ("branch", branch),
                ("plan_file", plan),
                ("work_order_id", id),
                ("repository_url", &inputs.repository_url),
            ],
        ))
    }
}

#[async_trait]
impl Stage for AgentStep {
    fn name(&self) -> &'static str {
        self.step
    }

    async fn run(&self, ctx: &mut StageContext) -> Result<StageOutput, StageError> {
        let orders = &self.orders;
        let tools = &orders.tools;
        let (inputs, _) = orders.inputs(ctx)?;
        let dir = orders.sandbox(ctx)?;
        let id = ctx.run_id.to_string();
        let branch = branch_of(&id);
        let plan = plan_file(&branch);
        let prompt = self.prompt(&inputs, &id, &branch, &plan)?;
        let outputs = tools.output_dir(&id);
        tools.ensure_dir(&outputs)?;
        if tools.settings.prompt_logging {
            tools.write_file(&outputs.join(format!("{}.prompt.md", self.step)), &prompt)?;
        }
        tools.log(
            &id,
            &format!("{}: agent started (attempt {})", self.step, ctx.attempt),
        );
        let mock = ctx.provider_mode == ProviderMode::Mock;
        let jsonl = outputs.join(format!("{}.jsonl", self.step));
        let raw = if mock {
            mock_agent(
                tools,
                self.step,
                &dir,
                &plan,
                &inputs.user_request,
                &ctx.cancel,
            )
            .await?
        } else {
            match tools.run_claude(&id, &dir, &prompt, &ctx.cancel).await {
                Ok(run) => run.raw,
                Err(error) => {
                    tools.log(&id, &format!("{}: agent failed: {error}", self.step));
                    return Err(error);
                }
            }
        };
        // The raw stream is kept for the logs route whatever ENABLE_OUTPUT_ARTIFACTS says about
        // keeping it afterwards: the route reads it. It is bounded and scrubbed of secrets.
        tools.write_file(&jsonl, &raw)?;
        let (_, outcome) = stream::parse(&raw);
        tools.log(
            &id,
            &format!(
                "{}: agent finished: {} turns, ${}, {}",
                self.step,
                outcome.turns.unwrap_or(0),
                outcome.cost_usd,
                outcome.subtype.as_deref().unwrap_or("no result")
            ),
        );
        let plan_path = dir.join(&plan);
        if self.step == "plan" && std::fs::symlink_metadata(&plan_path).is_err() {
            // The agent answered without writing the plan file: keep its answer as the plan,
            // written with the agent's rights (the sandbox is the agent's).
            let answer = tools
                .scrubber
                .scrub(outcome.result.as_deref().unwrap_or_default());
            tools
                .sandbox_write(&dir, &plan_path, &answer, &ctx.cancel)
                .await?;
        }
        let cost = outcome.cost_usd;
        output(
            &AgentStepOutput {
                step: self.step.to_owned(),
                session_id: outcome.session_id,
                turns: outcome.turns,
                cost_usd: cost,
                result: outcome.result,
                subtype: outcome.subtype,
                malformed_lines: outcome.malformed_lines,
                plan_file: plan,
                mock,
            },
            cost,
        )
    }
}

/// The built-in mock agent: writes the plan, or a small change, and a stream-json transcript.
/// It touches the sandbox with the agent's rights, as the real agent would.
async fn mock_agent(
    tools: &Tools,
    step: &str,
    dir: &std::path::Path,
    plan: &str,
    request: &str,
    cancel: &CancellationToken,
) -> Result<String, StageError> {
    let first_line: String = request
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(120)
        .collect();
    let session = format!("mock-{}", uuid::Uuid::new_v4());
    let summary = if step == "plan" {
        let text = format!(
            "# Plan\n\n## Goal\n\n{first_line}\n\n## Steps\n\n1. Record the request in NOTES.md.\n2. Commit, push and open a pull request.\n"
        );
        tools
            .sandbox_write(dir, &dir.join(plan), &text, cancel)
            .await?;
        format!("Plan written to {plan}.")
    } else {
        let notes = dir.join("NOTES.md");
        let mut text = tools
            .sandbox_read(dir, &notes, 1 << 20, cancel)
            .await
            .unwrap_or_default();
        text.push_str(&format!("- {first_line}\n"));
        tools.sandbox_write(dir, &notes, &text, cancel).await?;
        "Recorded the request in NOTES.md.".to_owned()
    };
    Ok(mock_stream(&session, step, &summary))
}

#[async_trait]
impl Stage for Commit {
    fn name(&self) -> &'static str {
        "commit"
    }

    fn retry_policy(&self) -> Option<RetryPolicy> {
        Some(tool_retry())
    }

    async fn run(&self, ctx: &mut StageContext) -> Result<StageOutput, StageError> {
        let tools = &self.0.tools;
        let (inputs, _) = self.0.inputs(ctx)?;
        let dir = self.0.sandbox(ctx)?;
        let id = ctx.run_id.to_string();
        let base = ctx
            .previous
            .get("sandbox")
            .and_then(|s| s.get("base_commit"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        tools.run_git(&dir, &["add", "--all"], &ctx.cancel).await?;
        let pending = tools
            .run_git(&dir, &["status", "--porcelain"], &ctx.cancel)
            .await?;
        if pending.is_empty() {
            let head = tools
                .run_git(&dir, &["rev-parse", "HEAD"], &ctx.cancel)
                .await?;
            if head != base {
                // Committed before a crash: the commit is ours.
                return output(
                    &json!({"commit": head, "already_committed": true}),
                    Usd::ZERO,
                );
            }
            return Err(StageError::fatal(
                "nothing_to_commit",
                "the coding agent changed nothing in the repository",
            ));
        }
        let title = title_of(&inputs.user_request);
        let message = format!("{title}\n\nWork order {id}.\n");
        // The message goes through stdin: git runs as the agent's user, which may not read the
        // worker's files.
        tools.write_file(&tools.output_dir(&id).join("commit_message.txt"), &message)?;
        tools
            .run_git_with_stdin(
                &dir,
                &["commit", "--quiet", "--no-verify", "-F", "-"],
                message.into_bytes(),
                &ctx.cancel,
            )
            .await?;
        let head = tools
            .run_git(&dir, &["rev-parse", "HEAD"], &ctx.cancel)
            .await?;
        tools.log(&id, &format!("commit: {head}"));
        output(
            &json!({"commit": head, "already_committed": false}),
            Usd::ZERO,
        )
    }
}

#[async_trait]
impl Stage for Push {
    fn name(&self) -> &'static str {
        "push"
    }

    fn retry_policy(&self) -> Option<RetryPolicy> {
        Some(tool_retry())
    }

    async fn run(&self, ctx: &mut StageContext) -> Result<StageOutput, StageError> {
        let tools = &self.0.tools;
        let (_, url) = self.0.inputs(ctx)?;
        let dir = self.0.sandbox(ctx)?;
        let id = ctx.run_id.to_string();
        let branch = branch_of(&id);
        // Pushing the same commit again is a no-op: safe to repeat.
        let head = tools.push(&dir, &url, &branch, &ctx.cancel).await?;
        tools.log(&id, &format!("push: {branch} at {head}"));
        output(&json!({"branch": branch, "commit": head}), Usd::ZERO)
    }
}

#[async_trait]
impl Stage for PullRequest {
    fn name(&self) -> &'static str {
        "pull_request"
    }

    fn retry_policy(&self) -> Option<RetryPolicy> {
        Some(tool_retry())
    }

    async fn run(&self, ctx: &mut StageContext) -> Result<StageOutput, StageError> {
        let tools = &self.0.tools;
        let (inputs, url) = self.0.inputs(ctx)?;
        let id = ctx.run_id.to_string();
        let branch = branch_of(&id);
        let title = title_of(&inputs.user_request);
        let summary = ctx
            .previous
            .get("implement")
            .and_then(|s| s.get("result"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let body = format!(
            "Work order {id}.\n\n## Request\n\n{}\n\n## Summary\n\n{summary}\n\nThe plan is in `{}`.\n",
            inputs.user_request,
            plan_file(&branch)
        );
        let outputs = tools.output_dir(&id);
        if ctx.provider_mode == ProviderMode::Mock {
            // Mock hosting: a record of the pull request that would have been opened, once.
            let record = outputs.join("pull_request.json");
            if let Ok(text) = std::fs::read_to_string(&record) {
                let existing: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                return output(
                    &json!({"number": existing["number"], "url": existing["url"], "existing": true, "mock": true}),
                    Usd::ZERO,
                );
            }
            let pr = json!({"number": 1, "url": format!("mock://pull-requests/{branch}"), "title": title,
                            "body": body, "head": branch});
            tools.write_file(
                &record,
                &serde_json::to_string_pretty(&pr).unwrap_or_default(),
            )?;
            tools.log(&id, "pull_request: recorded by mock hosting");
            return output(
                &json!({"number": 1, "url": pr["url"], "existing": false, "mock": true}),
                Usd::ZERO,
            );
        }
        if let Some((number, pr_url)) = tools.find_pull_request(&url, &branch, &ctx.cancel).await? {
            tools.log(&id, &format!("pull_request: found #{number} {pr_url}"));
            return output(
                &json!({"number": number, "url": pr_url, "existing": true, "mock": false}),
                Usd::ZERO,
            );
        }
        let body_file = outputs.join("pull_request_body.md");
        tools.write_file(&body_file, &body)?;
        let (number, pr_url) = tools
            .create_pull_request(&url, &branch, &title, &body_file, &ctx.cancel)
            .await?;
        tools.log(&id, &format!("pull_request: opened #{number} {pr_url}"));
        output(
            &json!({"number": number, "url": pr_url, "existing": false, "mock": false}),
            Usd::ZERO,
        )
    }
}

/// A work-order workflow.
pub struct WorkOrderWorkflow {
    orders: Arc<WorkOrders>,
    kind: WorkflowType,
    stages: Vec<Box<dyn Stage>>,
}

impl WorkOrderWorkflow {
    pub fn new(orders: &Arc<WorkOrders>, kind: WorkflowType) -> Self {
        let mut stages: Vec<Box<dyn Stage>> = vec![
            Box::new(Sandbox(orders.clone())),
            Box::new(AgentStep {
                orders: orders.clone(),
                step: "plan",
            }),
        ];
        if kind == WorkflowType::AgentWorkflowPlan {
            stages.push(Box::new(AgentStep {
                orders: orders.clone(),
                step: "implement",
            }));
            stages.push(Box::new(Commit(orders.clone())));
            stages.push(Box::new(Push(orders.clone())));
            stages.push(Box::new(PullRequest(orders.clone())));
        }
        Self {
            orders: orders.clone(),
            kind,
            stages,
        }
    }
}

impl Workflow for WorkOrderWorkflow {
    fn kind(&self) -> RunKind {
        RunKind::WorkOrder
    }

    fn name(&self) -> &'static str {
        self.kind.as_str()
    }

    fn description(&self) -> &'static str {
        match self.kind {
            WorkflowType::AgentWorkflowPlan => {
                "Clones the repository on a branch, has the coding agent plan and implement the request, commits, pushes and opens a pull request."
            }
            WorkflowType::PlanOnly => {
                "Clones the repository on a branch and has the coding agent write a plan."
            }
        }
    }

    fn queue(&self) -> &'static str {
        WORK_ORDERS_QUEUE
    }

    fn stages(&self) -> &[Box<dyn Stage>] {
        &self.stages
    }

    fn validate(&self, inputs: &mut Value) -> Result<(), InputError> {
        self.input_schema().check(inputs)?;
        // The schema's pattern is the URL policy; the policy reads the URL's parts.
        check_inputs(inputs, &self.orders.policy).map(drop)
    }

    fn input_schema(&self) -> InputSchema {
        let mut schema = InputSchema::of::<WorkOrderInputs>();
        // This deployment's exact rule for repository URLs, and this workflow's type.
        let properties = &mut schema.schema["properties"];
        properties["repository_url"]["pattern"] = json!(self.orders.policy.pattern());
        properties["workflow_type"] = json!({"type": "string", "enum": [self.kind.as_str()]});
        schema
    }

    fn result(&self, outputs: &BTreeMap<String, Value>) -> Value {
        let get = |stage: &str, field: &str| {
            outputs
                .get(stage)
                .and_then(|o| o.get(field).cloned())
                .unwrap_or(Value::Null)
        };
        json!({
            "branch": get("sandbox", "branch"),
            "plan_file": get("plan", "plan_file"),
            "commit": get("push", "commit"),
            "pull_request": outputs.get("pull_request").cloned().unwrap_or(Value::Null),
        })
    }
}
