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

/// Deletes the sandboxes (`repositories/{id}/`) of work orders that finished more than
/// `retention` ago or no longer exist (their agent output under `outputs/{id}/` goes too when
/// the run is gone), and clones left half-done by a crash. Answers how many were deleted.
pub async fn clean_sandboxes(
    store: &crate::store::SharedStore,
    data_dir: &std::path::Path,
    retention: std::time::Duration,
) -> usize {
    let repositories = data_dir.join("repositories");
    let Ok(entries) = std::fs::read_dir(&repositories) else {
        return 0;
    };
    let cutoff =
        chrono::Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let mut deleted = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with('.') {
            // A clone interrupted by a crash: stale after an hour.
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(3600));
            if stale && std::fs::remove_dir_all(&path).is_ok() {
                deleted += 1;
            }
            continue;
        }
        let Some(id) = crate::ids::RunId::parse(&name) else {
            continue;
        };
        let (expired, gone) = match store.get_run(id).await {
            Ok(None) => (true, true),
            Ok(Some(run)) => (run.finished_at.is_some_and(|at| at < cutoff), false),
            Err(_) => continue,
        };
        if expired && std::fs::remove_dir_all(&path).is_ok() {
            deleted += 1;
            if gone {
                let _ = std::fs::remove_dir_all(data_dir.join("outputs").join(&name));
            }
        }
    }
    deleted
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use serde_json::json;

    use super::*;
    use crate::{
        clock::SystemClock,
        config::ProviderMode,
        ids::{RunId, WorkerId},
        store::{NewRun, RunKind, SharedStore, StageCheckpoint, sqlite::SqliteStore},
    };

    async fn finished_run(store: &SharedStore) -> RunId {
        let id = RunId::generate();
        store
            .insert_run(NewRun {
                id,
                kind: RunKind::WorkOrder,
                name: "plan_only".into(),
                queue: "work_orders".into(),
                inputs: json!({}),
                provider_mode: ProviderMode::Mock,
                budget_usd: None,
                stage_names: vec!["sandbox".into()],
                idempotency_key: None,
                reuse: false,
            })
            .await
            .expect("insert");
        let worker = WorkerId::for_this_process("test");
        let claimed = store
            .claim(
                &["work_orders".to_owned()],
                &worker,
                Duration::from_secs(10),
                1,
            )
            .await
            .expect("claim");
        let lease = claimed[0].lease.clone();
        store.start_stage(&lease, 0).await.expect("start");
        let checkpoint = StageCheckpoint {
            output: json!({}),
            artifacts: Vec::new(),
            cost_usd: 0.0,
            run_result: Some(json!({})),
            reused_from: None,
        };
        store
            .commit_stage(&lease, 0, checkpoint)
            .await
            .expect("commit");
        id
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sandboxes_of_expired_and_deleted_work_orders_are_cleaned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = crate::config::sqlite_url_for(&dir.path().join("s.db"));
        let store: SharedStore = Arc::new(
            SqliteStore::open(&url, Arc::new(SystemClock))
                .await
                .expect("store"),
        );
        let data = dir.path().join("awo");
        let finished = finished_run(&store).await;
        let unknown = RunId::generate();
        for id in [finished, unknown] {
            std::fs::create_dir_all(data.join("repositories").join(id.to_string()).join(".git"))
                .expect("sandbox");
            std::fs::create_dir_all(data.join("outputs").join(id.to_string())).expect("outputs");
        }
        // A long retention keeps the finished one; the unknown one goes at once.
        assert_eq!(
            clean_sandboxes(&store, &data, Duration::from_secs(86_400)).await,
            1
        );
        assert!(
            data.join("repositories")
                .join(finished.to_string())
                .exists()
        );
        assert!(!data.join("repositories").join(unknown.to_string()).exists());
        assert!(!data.join("outputs").join(unknown.to_string()).exists());
        // Past the retention the finished one goes too; its outputs stay with its run.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            clean_sandboxes(&store, &data, Duration::from_millis(1)).await,
            1
        );
        assert!(
            !data
                .join("repositories")
                .join(finished.to_string())
                .exists()
        );
        assert!(data.join("outputs").join(finished.to_string()).exists());
    }
}
