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
    /// While the run is leased: when its lease expires unless its worker beats again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<DateTime<Utc>>,
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
            lease_expires_at: run
                .lease_expires_at
                .filter(|_| run.status == RunStatus::Running),
            artifacts_url: format!("/artifacts/runs/{}", run.id),
            reuse: run.reuse,
            reused_stages,
        }
    }
}

/// What resuming a run would do, computed from the run as stored (`GET /runs/{id}/resume-preview`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ResumePreview {
    pub run_id: String,
    /// The stage the resume starts from.
    pub from_stage: String,
    /// Every stage of the run, in order, with what the resume does to it.
    pub stages: Vec<StagePreview>,
    /// What the stages redone cost when they last ran: the estimate of redoing them with the
    /// same inputs, less the memoised steps kept. Stages that never ran are not in it (see
    /// `stages_never_run`).
    #[schema(value_type = f64)]
    pub estimated_cost_usd: Usd,
    /// Stages to run that have no earlier cost to estimate from.
    pub stages_never_run: Vec<String>,
    /// What the run has spent so far; a resume keeps it.
    #[schema(value_type = f64)]
    pub spent_usd: Usd,
    #[schema(value_type = Option<f64>)]
    pub budget_usd: Option<Usd>,
    /// Whether the spent money plus the estimate exceeds the budget (raise it when resuming).
    pub over_budget: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StagePreview {
    pub name: String,
    /// Its status now.
    pub status: StageStatus,
    /// Whether the resume runs it again (its checkpoint, if any, is discarded).
    pub redo: bool,
    /// Memoised steps that stay recorded and are not paid again.
    pub steps_kept: u32,
    #[schema(value_type = f64)]
    pub steps_kept_cost_usd: Usd,
    /// What the stage cost when it last ran (0 when it never ran).
    #[schema(value_type = f64)]
    pub last_cost_usd: Usd,
}

impl ResumePreview {
    /// The preview of resuming `run` from stage `start`; `kept_steps` are the memoised steps
    /// of that stage a resume from `auto` keeps.
    pub fn of(
        run: &RunRecord,
        start: usize,
        from: &crate::store::FromStage,
        kept_steps: &[crate::store::StepRecord],
    ) -> Self {
        let keeps_steps = matches!(from, crate::store::FromStage::Auto);
        let mut estimated = Usd::ZERO;
        let mut never_run = Vec::new();
        let stages = run
            .stages
            .iter()
            .enumerate()
            .map(|(index, stage)| {
                let redo = index >= start;
                let (steps_kept, steps_kept_cost) = if redo && keeps_steps && index == start {
                    (
                        kept_steps.len() as u32,
                        kept_steps.iter().fold(Usd::ZERO, |sum, s| sum + s.cost_usd),
                    )
                } else {
                    (0, Usd::ZERO)
                };
                if redo {
                    if stage.cost_usd == Usd::ZERO && stage.started_at.is_none() {
                        never_run.push(stage.name.clone());
                    } else {
                        estimated += (stage.cost_usd - steps_kept_cost).max(Usd::ZERO);
                    }
                }
                StagePreview {
                    name: stage.name.clone(),
                    status: stage.status,
                    redo,
                    steps_kept,
                    steps_kept_cost_usd: steps_kept_cost,
                    last_cost_usd: stage.cost_usd,
                }
            })
            .collect();
        Self {
            run_id: run.id.to_string(),
            from_stage: run.stages[start].name.clone(),
            stages,
            estimated_cost_usd: estimated,
            stages_never_run: never_run,
            spent_usd: run.cost_usd,
            budget_usd: run.budget_usd,
            over_budget: run
                .budget_usd
                .is_some_and(|budget| run.cost_usd + estimated > budget),
        }
    }
}
