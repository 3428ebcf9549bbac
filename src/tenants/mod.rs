//! The tenants' parts of the HTTP API, behind one interface: the HTTP core serves whatever
//! routes and OpenAPI additions [`TenantApi`](crate::http::TenantApi)s bring, and names no
//! tenant.
//!
//! - `studio.rs`: `/agents` (list, schemas, one-agent runs);
//! - `work_orders.rs`: `/agent-work-orders` (create, list, status, steps, the agent's log).

mod studio;
mod work_orders;

use std::sync::Arc;

use crate::http::TenantApi;

/// The tenants' APIs of this deployment.
pub fn apis() -> Arc<[Arc<dyn TenantApi>]> {
    Arc::new([
        Arc::new(studio::StudioApi) as Arc<dyn TenantApi>,
        Arc::new(work_orders::WorkOrdersApi),
    ])
}
