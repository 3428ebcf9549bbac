//! The `demo` workflow: three stages (`one`, `two`, `three`) whose behaviour is set by the
//! inputs, so every path of the engine can be exercised and watched without any provider.
//!
//! Inputs (all optional):
//! - `sleep_ms`: how long each stage works;
//! - `steps`: memoised steps per stage, each sleeping `sleep_ms / steps` and writing one small
//!   artifact;
//! - `fail`: map of stage name to how many executions of that stage fail transiently before
//!   one succeeds (counted over the run's whole life, so a run whose attempts were exhausted
//!   succeeds when resumed, like a run whose flaky dependency recovered);
//! - `fatal`: a stage that fails permanently;
//! - `cost_usd`: what each stage costs (and is estimated to cost, for budgets).
//!
//! Every stage attempt and every executed step appends a line to the run's work ledger,
//! `runs/{run_id}/executions.log`: the record of work actually done (what a paid provider
//! would have billed), which shows that finished stages and steps are never executed again.
//! A stage attempt's line is `stage {stage} attempt {n} fence {token}`: the lease it ran under.
//! A stage without steps also appends `tick {stage} {execution}` every 100 ms while it works,
//! which shows when an execution was really running.

use std::{collections::BTreeMap, time::Duration};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{InputError, Workflow, parse_inputs, queues};
use crate::{
    money::Usd,
    schema::InputSchema,
    stage::{Stage, StageContext, StageError, StageOutput},
    store::RunKind,
};

pub const NAME: &str = "demo";
const STAGES: [&str; 3] = ["one", "two", "three"];
const MAX_SLEEP_MS: u64 = 24 * 3600 * 1000;
const MAX_STEPS: u32 = 10_000;
const MAX_FAILURES: u32 = 1000;
const MAX_COST_USD: f64 = 1_000_000.0;
/// How often a working stage without steps writes a tick to the ledger.
const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DemoInputs {
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    steps: u32,
    #[serde(default)]
    fail: BTreeMap<String, u32>,
    #[serde(default)]
    fatal: Option<String>,
    #[serde(default)]
    cost_usd: Usd,
}

impl DemoInputs {
    fn check(&self) -> Result<(), InputError> {
        let invalid = |field: &str, message: String| InputError {
            field: format!("inputs.{field}"),
            message,
        };
        if self.sleep_ms > MAX_SLEEP_MS {
            return Err(invalid(
                "sleep_ms",
                format!("must be at most {MAX_SLEEP_MS}"),
            ));
        }
        if self.steps > MAX_STEPS {
            return Err(invalid("steps", format!("must be at most {MAX_STEPS}")));
        }
        if self.cost_usd.is_negative() || self.cost_usd.dollars() > MAX_COST_USD {
            return Err(invalid(
                "cost_usd",
                format!("must be between 0 and {MAX_COST_USD}"),
            ));
        }
        if let Some((stage, _)) = self.fail.iter().find(|(_, n)| **n > MAX_FAILURES) {
            return Err(invalid(
                &format!("fail.{stage}"),
                format!("must be at most {MAX_FAILURES}"),
            ));
        }
        for stage in self.fail.keys().chain(self.fatal.iter()) {
            if !STAGES.contains(&stage.as_str()) {
                let field = if self.fatal.as_ref() == Some(stage) {
                    "fatal".to_owned()
                } else {
                    format!("fail.{stage}")
                };
                return Err(invalid(
                    &field,
                    format!("unknown stage {stage:?}; stages are {}", STAGES.join(", ")),
                ));
            }
        }
        Ok(())
    }
}

pub struct Demo {
    stages: Vec<Box<dyn Stage>>,
}

impl Demo {
    pub fn new() -> Self {
        Self {
            stages: STAGES
                .iter()
                .map(|name| Box::new(DemoStage { name }) as Box<dyn Stage>)
                .collect(),
        }
    }
}

impl Default for Demo {
    fn default() -> Self {
        Self::new()
    }
}

impl Workflow for Demo {
    fn kind(&self) -> RunKind {
        RunKind::Workflow
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> &'static str {
        "Three configurable stages for trying the engine: sleeps, memoised steps, planned failures and costs"
    }

    fn queue(&self) -> &'static str {
        queues::WORKFLOWS
    }

    fn stages(&self) -> &[Box<dyn Stage>] {
        &self.stages
    }

    fn validate(&self, inputs: &mut Value) -> Result<(), InputError> {
        self.input_schema().check(inputs)?;
        parse_inputs::<DemoInputs>(inputs)?.check()
    }

    fn input_schema(&self) -> InputSchema {
        let failures = json!({"type": "integer", "minimum": 0, "maximum": MAX_FAILURES});
        let schema = json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "sleep_ms": {"type": "integer", "minimum": 0, "maximum": MAX_SLEEP_MS, "description": "how long each stage works"},
                "steps": {"type": "integer", "minimum": 0, "maximum": MAX_STEPS, "description": "memoised steps per stage"},
                "fail": {"type": "object", "additionalProperties": false,
                         "properties": {"one": failures, "two": failures, "three": failures},
                         "description": "stage name -> transient failures before success"},
                "fatal": {"type": "string", "enum": STAGES, "description": "a stage that fails permanently"},
                "cost_usd": {"type": "number", "minimum": 0, "maximum": MAX_COST_USD, "description": "cost of each stage"}
            }
        });
        InputSchema::new(schema, Default::default())
    }

    fn result(&self, outputs: &BTreeMap<String, Value>) -> Value {
        json!({"stages": STAGES.iter().map(|s| outputs.get(*s).cloned().unwrap_or(Value::Null)).collect::<Vec<_>>()})
    }
}

struct DemoStage {
    name: &'static str,
}

fn inputs_of(ctx: &StageContext) -> Result<DemoInputs, StageError> {
    parse_inputs(&ctx.inputs).map_err(|e| StageError::fatal("invalid_input", e.to_string()))
}

#[async_trait]
impl Stage for DemoStage {
    fn name(&self) -> &'static str {
        self.name
    }

    fn estimated_cost_usd(&self, ctx: &StageContext) -> Usd {
        inputs_of(ctx).map(|i| i.cost_usd).unwrap_or_default()
    }

    async fn run(&self, ctx: &mut StageContext) -> Result<StageOutput, StageError> {
        let inputs = inputs_of(ctx)?;
        let ledger = format!("{}/executions.log", ctx.run_dir());
        let marker = format!("stage {} attempt", self.name);
        let earlier_executions = ctx
            .artifact_store()
            .read_to_string(&ledger)
            .await?
            .unwrap_or_default()
            .lines()
            .filter(|line| line.starts_with(&marker))
            .count() as u32;
        ctx.artifact_store()
            .append_line(
                &ledger,
                &format!("{marker} {} fence {}", ctx.attempt, ctx.lease().fence),
            )
            .await?;
        let execution = earlier_executions + 1;
        if inputs.fatal.as_deref() == Some(self.name) {
            return Err(StageError::fatal(
                "planned_failure",
                format!("stage {} was asked to fail", self.name),
            ));
        }
        let planned = inputs.fail.get(self.name).copied().unwrap_or(0);
        if execution <= planned {
            return Err(StageError::retryable(format!(
                "planned transient failure {execution} of {planned} in stage {}",
                self.name
            )));
        }
        let mut reused = 0;
        if inputs.steps > 0 {
            ctx.set_step_total(inputs.steps);
            let pause = Duration::from_millis(inputs.sleep_ms / u64::from(inputs.steps));
            for step in 0..inputs.steps {
                let key = format!("step-{step}");
                if ctx.memoised::<Value>(&key).is_some() {
                    reused += 1;
                    continue;
                }
                ctx.artifact_store()
                    .append_line(&ledger, &format!("step {}/{key}", self.name))
                    .await?;
                tokio::time::sleep(pause).await;
                let path = format!("{}/{}/{key}.json", ctx.run_dir(), self.name);
                let body = json!({"stage": self.name, "step": step});
                let path = ctx
                    .artifact_store()
                    .write(&path, body.to_string().into_bytes())
                    .await?;
                ctx.complete_step(&key, &body, Usd::ZERO, vec![path])
                    .await?;
            }
        } else {
            let until = tokio::time::Instant::now() + Duration::from_millis(inputs.sleep_ms);
            let tick = format!("tick {} {execution}", self.name);
            while tokio::time::Instant::now() < until {
                tokio::time::sleep_until(until.min(tokio::time::Instant::now() + TICK)).await;
                ctx.artifact_store().append_line(&ledger, &tick).await?;
            }
        }
        let output = json!({
            "stage": self.name,
            "attempt": ctx.attempt,
            "steps": inputs.steps,
            "steps_reused": reused,
        });
        let path = format!("{}/{}/output.json", ctx.run_dir(), self.name);
        ctx.write_artifact(&path, output.to_string().into_bytes())
            .await?;
        Ok(StageOutput {
            output,
            cost_usd: inputs.cost_usd,
        })
    }
}
