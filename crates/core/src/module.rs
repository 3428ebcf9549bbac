//! The seam tenants plug into: a family of workflows (the studio, agent work orders) and what it
//! keeps beside its runs.
//!
//! Invariant: core, the stores and the HTTP core name no tenant; the application hands its
//! tenants to the catalogue and the sweeper as [`Module`]s.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;

use crate::{
    artifacts::ArtifactStore,
    health::ToolCheck,
    ids::RunId,
    store::{RunKind, SharedStore},
    workflows::Catalog,
};

/// What the sweeper gives a tenant's housekeeping.
pub struct Housekeeping<'a> {
    pub store: &'a SharedStore,
    /// How long finished runs are kept (`RUN_RETENTION_DAYS`).
    pub retention: Duration,
    /// The artifact store, in processes that have one.
    pub artifacts: Option<&'a ArtifactStore>,
    /// The runs whose `runs/{id}/` directory was just deleted because the run is gone.
    pub gone_runs: &'a [String],
}

/// A tenant: its workflows, and the files it keeps for them.
#[async_trait]
pub trait Module: Send + Sync {
    /// The tenant's name, for logs.
    fn name(&self) -> &'static str;

    /// Adds the tenant's workflows (and one-agent runs) to the catalogue.
    fn register(&self, catalog: &mut Catalog);

    /// Deletes what the tenant keeps for runs past retention or gone; file work runs on the
    /// blocking pool. Answers how many runs' files it deleted, for the log.
    async fn housekeeping(&self, _work: &Housekeeping<'_>) -> usize {
        0
    }

    /// The tools the tenant needs, each started (probed once) here and reported by `/health`
    /// under its name.
    async fn tool_checks(&self) -> Vec<(&'static str, ToolCheck)> {
        Vec::new()
    }

    /// What a worker taking runs from `queues` should be told at start: a tool it lacks, an
    /// isolation it cannot give.
    fn worker_warnings(&self, _queues: &[String]) -> Vec<String> {
        Vec::new()
    }

    /// What the tenant does when one of its runs changes, if anything.
    fn observer(&self) -> Option<Arc<dyn RunObserver>> {
        None
    }
}

/// The tenants of a process.
pub type Modules = Arc<[Arc<dyn Module>]>;

/// A change to a run: a stage started or committed, the run's execution ended in a worker, or
/// the API cancelled or resumed it. The observer reads the run as it now is from `store`.
pub struct RunChange<'a> {
    pub run: RunId,
    pub store: &'a SharedStore,
    pub artifacts: &'a ArtifactStore,
}

/// A tenant's reaction to changes of its runs (the studio keeps each run's `metadata.json`).
#[async_trait]
pub trait RunObserver: Send + Sync {
    /// Whether changes to runs of this kind and name concern the observer; asked once per
    /// execution and per API change, so it must be cheap.
    fn watches(&self, kind: RunKind, name: &str) -> bool;

    /// Reacts to a change. A failure is the observer's to log: it never fails the run.
    async fn changed(&self, change: &RunChange<'_>);
}

/// The observers of a process's tenants.
#[derive(Clone, Default)]
pub struct Observers(Arc<[Arc<dyn RunObserver>]>);

impl Observers {
    pub fn of(modules: &[Arc<dyn Module>]) -> Self {
        Self(modules.iter().filter_map(|m| m.observer()).collect())
    }

    /// The observers a run of this kind and name concerns (usually none: no allocation).
    pub fn watching(&self, kind: RunKind, name: &str) -> Vec<Arc<dyn RunObserver>> {
        self.0
            .iter()
            .filter(|o| o.watches(kind, name))
            .cloned()
            .collect()
    }

    /// Tells every observer concerned that the run changed.
    pub async fn notify(&self, kind: RunKind, name: &str, change: &RunChange<'_>) {
        for observer in self.watching(kind, name) {
            observer.changed(change).await;
        }
    }
}

impl Catalog {
    /// The core's own workflows and those of each tenant.
    pub fn of(modules: &[Arc<dyn Module>]) -> Self {
        let mut catalog = Self::with_builtins();
        for module in modules {
            module.register(&mut catalog);
        }
        catalog
    }
}
