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

pub mod settings;
pub mod stream;
pub mod tools;
pub mod url;
pub mod workflows;

use std::sync::Arc;

pub use settings::{AgentUser, AwoSettings};
use stagecraft_core::{
    module::{Housekeeping, Module},
    secrets::Scrubber,
    workflows::Catalog,
};

/// Agent work orders as a tenant of the core.
pub struct WorkOrdersModule {
    orders: Arc<workflows::WorkOrders>,
}

impl WorkOrdersModule {
    pub fn new(settings: &AwoSettings, scrubber: &Scrubber) -> Self {
        Self {
            orders: Arc::new(workflows::WorkOrders {
                tools: tools::Tools::new(settings, scrubber.clone()),
                policy: url::UrlPolicy::new(&settings.allowed_schemes, &settings.allowed_hosts),
            }),
        }
    }
}

#[async_trait::async_trait]
impl Module for WorkOrdersModule {
    fn name(&self) -> &'static str {
        "work_orders"
    }

    fn worker_warnings(&self, queues: &[String]) -> Vec<String> {
        if !queues.iter().any(|q| q == workflows::WORK_ORDERS_QUEUE) {
            return Vec::new();
        }
        match tools::agent_isolation(&self.orders.tools.settings) {
            Err(refusal) => vec![format!(
                "live work orders will fail on this worker: {refusal}"
            )],
            Ok(None) => vec![
                "this worker is not root, so a live coding agent runs as its own user and could \
                 read what the worker holds; acceptable on a developer's machine only \
                 (production refuses it: run the worker as root with AWO_AGENT_USER)"
                    .to_owned(),
            ],
            Ok(Some(_)) => Vec::new(),
        }
    }

    /// Adds the work-order workflows to a catalogue.
    fn register(&self, catalog: &mut Catalog) {
        for kind in [
            workflows::WorkflowType::AgentWorkflowPlan,
            workflows::WorkflowType::PlanOnly,
        ] {
            catalog.add(Arc::new(workflows::WorkOrderWorkflow::new(
                &self.orders,
                kind,
            )));
        }
    }

    async fn housekeeping(&self, work: &Housekeeping<'_>) -> usize {
        clean_sandboxes(
            work.store,
            &self.orders.tools.settings.data_dir,
            work.retention,
        )
        .await
    }
}

/// Deletes the sandboxes (`repositories/{id}/`) and agent homes (`homes/{id}/`) of work orders
/// that finished more than `retention` ago or no longer exist (their agent output under
/// `outputs/{id}/` goes too when the run is gone), and clones or pushes left half-done by a
/// crash. Answers how many sandboxes were deleted. File work runs on the blocking pool.
pub async fn clean_sandboxes(
    store: &stagecraft_core::store::SharedStore,
    data_dir: &std::path::Path,
    retention: std::time::Duration,
) -> usize {
    let repositories = data_dir.join("repositories");
    let listed = {
        let repositories = repositories.clone();
        tokio::task::spawn_blocking(move || list_dir(&repositories)).await
    };
    let Ok(entries) = listed else {
        return 0;
    };
    let cutoff = chrono::Duration::from_std(retention)
        .ok()
        .and_then(|keep| chrono::Utc::now().checked_sub_signed(keep));
    let mut doomed = Vec::new();
    for (name, age) in entries {
        if name.starts_with('.') {
            // A clone interrupted by a crash: stale after an hour.
            if age > std::time::Duration::from_secs(3600) {
                doomed.push((name, false));
            }
            continue;
        }
        let Some(id) = stagecraft_core::ids::RunId::parse(&name) else {
            continue;
        };
        match store.get_run(id).await {
            Ok(None) => doomed.push((name, true)),
            Ok(Some(run)) => {
                let expired =
                    matches!((run.finished_at, cutoff), (Some(at), Some(cutoff)) if at < cutoff);
                if expired {
                    doomed.push((name, false));
                }
            }
            Err(_) => {}
        }
    }
    let data_dir = data_dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut deleted = 0;
        for (name, gone) in doomed {
            if std::fs::remove_dir_all(repositories.join(&name)).is_ok() {
                deleted += 1;
            }
            let _ = std::fs::remove_dir_all(data_dir.join("homes").join(&name));
            if gone {
                let _ = std::fs::remove_dir_all(data_dir.join("outputs").join(&name));
            }
        }
        // Pushes interrupted by a crash leave their scratch repository behind.
        for (name, age) in list_dir(&data_dir.join("push")) {
            if age > std::time::Duration::from_secs(3600) {
                let _ = std::fs::remove_dir_all(data_dir.join("push").join(name));
            }
        }
        deleted
    })
    .await
    .unwrap_or(0)
}

/// The entries of a directory with their age (by modification time); empty when unreadable.
fn list_dir(dir: &std::path::Path) -> Vec<(String, std::time::Duration)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|entry| {
            let age = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            (entry.file_name().to_string_lossy().into_owned(), age)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use serde_json::json;

    use super::*;
    use stagecraft_core::{
        clock::SystemClock,
        ids::{RunId, WorkerId},
        store::{NewRun, RunKind, SharedStore, StageCheckpoint},
        testing::workflow_run,
    };
    use stagecraft_store_sqlite::{SqliteStore, sqlite_url_for};

    async fn finished_run(store: &SharedStore) -> RunId {
        let id = RunId::generate();
        store
            .insert_run(NewRun {
                id,
                kind: RunKind::WorkOrder,
                ..workflow_run("plan_only", "work_orders", &["sandbox"])
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
            cost_usd: stagecraft_core::money::Usd::ZERO,
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
        let url = sqlite_url_for(&dir.path().join("s.db"));
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
