//! Agent work orders: a coding agent working on a git repository, stage by stage.
//!
//! - `url.rs`: which repository URLs may be cloned;
//! - `stream.rs`: the coding agent's stream-json output, parsed line by line;
//! - `tools.rs`: git, the coding-agent CLI and gh through `process.rs`, credentials through the
//!   environment only;
//! - `workflows.rs`: `agent_workflow_plan` and `plan_only`, and the built-in mock agent and
//!   mock pull-request hosting of `provider_mode: mock`.
//!
//! A work order keeps its files under `AWO_DATA_DIR`: `repositories/{id}/` (the sandbox),
//! `outputs/{id}/` (prompts, raw JSONL per step, commit message, pull-request body or mock
//! record) and `logs/{id}.log`.

pub mod stream;
pub mod tools;
pub mod url;
pub mod workflows;

use std::sync::Arc;

use crate::{config::AwoSettings, workflows::Catalog};

/// Adds the work-order workflows to a catalogue.
pub fn register(catalog: &mut Catalog, settings: &AwoSettings) {
    let orders = Arc::new(workflows::WorkOrders {
        tools: tools::Tools::new(settings),
    });
    for kind in [
        workflows::WorkflowType::AgentWorkflowPlan,
        workflows::WorkflowType::PlanOnly,
    ] {
        catalog.add(Arc::new(workflows::WorkOrderWorkflow::new(&orders, kind)));
    }
}
