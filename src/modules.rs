//! Which tenants a process runs: the studio and agent work orders, each with its settings and
//! its part of the HTTP API. The one place that lists them.

use std::sync::Arc;

use crate::{config::Config, module::Modules, workflows::Catalog};

/// The tenants of this deployment.
pub fn modules(config: &Config) -> Modules {
    Arc::new([
        Arc::new(crate::studio::StudioModule::new(&config.studio))
            as Arc<dyn crate::module::Module>,
        Arc::new(crate::awo::WorkOrdersModule::new(
            &config.awo,
            &config.scrubber(),
        )),
    ])
}

/// The catalogue of this deployment: the core's workflows and its tenants'.
pub fn catalog(modules: &Modules) -> Catalog {
    Catalog::of(modules)
}

/// The tenants' parts of the HTTP API.
pub fn apis() -> std::sync::Arc<[std::sync::Arc<dyn crate::tenants::TenantApi>]> {
    crate::tenants::apis()
}
