//! The `noop` workflow: one stage that does nothing and costs nothing. It measures what the
//! engine itself costs per run (claim, lease, checkpoint, status) and smoke-tests a deployment.

use async_trait::async_trait;
use serde_json::json;

use super::{Workflow, queues};
use crate::{
    schema::InputSchema,
    stage::{Stage, StageContext, StageError, StageOutput},
    store::RunKind,
};

pub const NAME: &str = "noop";

pub struct Noop {
    stages: Vec<Box<dyn Stage>>,
}

impl Noop {
    pub fn new() -> Self {
        Self {
            stages: vec![Box::new(NoopStage)],
        }
    }
}

impl Default for Noop {
    fn default() -> Self {
        Self::new()
    }
}

impl Workflow for Noop {
    fn kind(&self) -> RunKind {
        RunKind::Workflow
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> &'static str {
        "One stage that does nothing: measures the engine's own cost per run"
    }

    fn queue(&self) -> &'static str {
        queues::WORKFLOWS
    }

    fn stages(&self) -> &[Box<dyn Stage>] {
        &self.stages
    }

    fn input_schema(&self) -> InputSchema {
        InputSchema::new(
            json!({"type": "object", "additionalProperties": false, "properties": {}}),
            Default::default(),
        )
    }
}

struct NoopStage;

#[async_trait]
impl Stage for NoopStage {
    fn name(&self) -> &'static str {
        "noop"
    }

    async fn run(&self, _ctx: &mut StageContext) -> Result<StageOutput, StageError> {
        Ok(StageOutput {
            output: json!({}),
            cost_usd: crate::money::Usd::ZERO,
        })
    }
}
