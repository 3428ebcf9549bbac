//! The run status document: what `GET /runs/{id}` and `GET /workflows/status/{id}` answer.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::{
    money::Usd,
    store::{Progress, ProviderMode, RunError, RunKind, RunRecord, RunStatus, StageStatus},
};

/// One stage in the status document.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StageDoc {
    pub name: String,
    pub status: StageStatus,
    pub attempts: u32,
    /// Attempts the stage may take before the run fails (its retry policy), where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    #[schema(value_type = f64)]
    pub cost_usd: Usd,
    pub artifacts: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<RunError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The run whose checkpoint this stage reused (at no cost).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reused_from: Option<String>,
}

/// The run status document.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunDoc {
    pub run_id: String,
    pub kind: RunKind,
    pub name: String,
    pub status: RunStatus,
    #[schema(value_type = Object)]
    pub inputs: Value,
    pub provider_mode: ProviderMode,
    pub current_stage: Option<String>,
    pub last_completed_stage: Option<String>,
    /// Absent in listings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<StageDoc>>,
    #[schema(value_type = f64)]
    pub cost_usd: Usd,
    /// True when mock providers did the work: `cost_usd` is what live providers would charge.
    pub cost_simulated: bool,
    #[schema(value_type = Option<f64>)]
    pub budget_usd: Option<Usd>,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub error: Option<RunError>,
    pub cancel_requested: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub worker: Option<String>,
    pub artifacts_url: String,
    /// Whether stages may reuse earlier runs' checkpoints, and which did.
    pub reuse: bool,
    pub reused_stages: Vec<String>,
}

impl RunDoc {
    /// The whole document, stages included.
    pub fn full(run: RunRecord) -> Self {
        Self::new(run, true)
    }

    /// The document as listings show it, without its stages.
    pub fn summary(run: RunRecord) -> Self {
        Self::new(run, false)
    }

    fn new(run: RunRecord, with_stages: bool) -> Self {
        let last_completed_stage = run.last_completed_stage().map(str::to_owned);
        let reused_stages = run
            .stages
            .iter()
            .filter(|s| s.reused_from.is_some())
            .map(|s| s.name.clone())
            .collect();
        let stages = with_stages.then(|| {
            run.stages
                .into_iter()
                .map(|s| StageDoc {
                    name: s.name,
                    status: s.status,
                    attempts: s.attempts,
                    max_attempts: None,
                    started_at: s.started_at,
                    finished_at: s.finished_at,
                    cost_usd: s.cost_usd,
                    artifacts: s.artifacts,
                    progress: s.progress,
                    error: s.error,
                    next_attempt_at: s.next_attempt_at,
                    reused_from: s.reused_from,
                })
                .collect()
        });
        Self {
            run_id: run.id.to_string(),
            kind: run.kind,
            name: run.name,
            status: run.status,
            inputs: run.inputs,
            provider_mode: run.provider_mode,
            current_stage: run.current_stage,
            last_completed_stage,
            stages,
            cost_usd: run.cost_usd,
            cost_simulated: run.provider_mode == ProviderMode::Mock,
            budget_usd: run.budget_usd,
            result: run.result,
            error: run.error,
            cancel_requested: run.cancel_requested,
            created_at: run.created_at,
            updated_at: run.updated_at,
            finished_at: run.finished_at,
            worker: run.worker,
            artifacts_url: format!("/artifacts/runs/{}", run.id),
            reuse: run.reuse,
            reused_stages,
        }
    }
}
