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

/// The queues a worker serves when `--queues` names none, in the order workers report them.
pub fn default_queues() -> Vec<String> {
    [
        crate::studio::workflows::AGENTS_QUEUE,
        crate::workflows::queues::WORKFLOWS,
        crate::awo::workflows::WORK_ORDERS_QUEUE,
    ]
    .map(String::from)
    .to_vec()
}

/// The catalogue of this deployment: the core's workflows and its tenants'.
pub fn catalog(modules: &Modules) -> Catalog {
    Catalog::of(modules)
}

/// The tenants' parts of the HTTP API.
pub fn apis() -> std::sync::Arc<[std::sync::Arc<dyn crate::http::TenantApi>]> {
    crate::tenants::apis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_queues_are_every_queue_of_the_catalogue() {
        let config = Config::from_lookup(|_| None).expect("defaults");
        let catalog = catalog(&modules(&config));
        let mut defaults = default_queues();
        defaults.sort();
        assert_eq!(defaults, catalog.queues());
    }
}
