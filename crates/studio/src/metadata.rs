//! `runs/{id}/metadata.json`: the status document each studio workflow run keeps beside its
//! files, current after every stage start, checkpoint and ending (the worker) and after every
//! cancel and resume (the API), through the tenant seam's [`RunObserver`].

use serde::Serialize;
use serde_json::Value;
use stagecraft_core::{
    artifacts::ArtifactStore,
    ids::RunId,
    module::{RunChange, RunObserver},
    status::RunDoc,
    store::{RunKind, SharedStore},
};
use tracing::warn;

/// The studio's workflows keep `metadata.json`; its one-agent runs do not.
pub struct MetadataObserver {
    pub workflows: &'static [&'static str],
}

#[async_trait::async_trait]
impl RunObserver for MetadataObserver {
    fn watches(&self, kind: RunKind, name: &str) -> bool {
        kind == RunKind::Workflow && self.workflows.contains(&name)
    }

    async fn changed(&self, change: &RunChange<'_>) {
        if let Err(error) = write_metadata(change.store, change.artifacts, change.run).await {
            warn!(run.id = %change.run, error = %error, "could not update metadata.json");
        }
    }
}

/// `metadata.json`: the status document and the event-log position it shows.
#[derive(Serialize)]
struct Metadata {
    #[serde(flatten)]
    document: RunDoc,
    /// The sequence number of the run's last event when the document was read.
    event_seq: i64,
}

/// Writes the run's status document to `runs/{id}/metadata.json`.
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
        document: RunDoc::full(run),
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
