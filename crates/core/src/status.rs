//! The run status document: what `GET /runs/{id}` and `GET /workflows/status/{id}` answer, and
//! what studio runs keep in `runs/{id}/metadata.json`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::{
    artifacts::ArtifactStore,
    ids::RunId,
    store::{
        Progress, ProviderMode, RunError, RunKind, RunRecord, RunStatus, SharedStore, StageStatus,
    },
};

/// Writes the run's status document to `runs/{id}/metadata.json` (studio runs keep it current:
/// the worker after every stage start, checkpoint and ending, the API after cancel and resume).
///
/// Invariant: `metadata.json` moves forward only. The document carries `event_seq`, the run's
/// event-log position it was read at (one snapshot with the run), and is written only over an
/// older one, under a lock shared by every writer of the host, so two writers racing (a
/// worker's checkpoint, an API's cancel) can never leave the older state on disk.
pub async fn write_metadata(
    store: &SharedStore,
    artifacts: &ArtifactStore,
    run_id: RunId,
) -> Result<(), String> {
    let run = store
        .get_run(run_id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("run {run_id} not found"))?;
    let event_seq = run.event_seq;
    let document = Metadata {
        document: RunDoc::new(run, true),
        event_seq,
    };
    let bytes = serde_json::to_vec_pretty(&document).map_err(|e| e.to_string())?;
    artifacts
        .write_newer(
            &format!("runs/{run_id}/metadata.json"),
            bytes,
            event_seq,
            |written| {
                serde_json::from_slice::<Value>(written)
                    .ok()
                    .and_then(|v| v.get("event_seq").and_then(Value::as_i64))
            },
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// `metadata.json`: the status document and the event-log position it shows.
#[derive(Serialize)]
struct Metadata {
    #[serde(flatten)]
    document: RunDoc,
    /// The sequence number of the run's last event when the document was read.
    event_seq: i64,
}

/// One stage in the status document.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StageDoc {
    pub name: String,
    pub status: StageStatus,
    pub attempts: u32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub cost_usd: f64,
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
    pub cost_usd: f64,
    /// True when mock providers did the work: `cost_usd` is what live providers would charge.
    pub cost_simulated: bool,
    pub budget_usd: Option<f64>,
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
    pub fn new(run: RunRecord, with_stages: bool) -> Self {
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
