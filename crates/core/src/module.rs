//! The seam tenants plug into: a family of workflows (the studio, agent work orders) and what it
//! keeps beside its runs.
//!
//! Invariant: core, the stores and the HTTP core name no tenant; the application hands its
//! tenants to the catalogue and the sweeper as [`Module`]s.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;

use crate::{artifacts::ArtifactStore, store::SharedStore, workflows::Catalog};

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
}

/// The tenants of a process.
pub type Modules = Arc<[Arc<dyn Module>]>;
