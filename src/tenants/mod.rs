//! The tenants' parts of the HTTP API, behind one interface: the HTTP core serves whatever
//! routes and OpenAPI additions [`TenantApi`]s bring, and names no tenant.
//!
//! - `studio.rs`: `/agents` (list, schemas, one-agent runs);
//! - `work_orders.rs`: `/agent-work-orders` (create, list, status, steps, the agent's log).

mod studio;
mod work_orders;

use std::sync::Arc;

use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;

use crate::{http::AppState, store::ProviderMode, workflows::Catalog};

/// A tenant's part of the HTTP API.
pub trait TenantApi: Send + Sync {
    /// Its routes, with their OpenAPI paths, tags and component schemas.
    fn routes(&self) -> OpenApiRouter<AppState>;

    /// Adds what the derived OpenAPI document cannot say (this deployment's limits, event
    /// stream payloads) to the document served at `/openapi.json`.
    fn document(&self, _doc: &mut Value, _catalog: &Catalog, _default_mode: ProviderMode) {}
}

/// The tenants' APIs of this deployment.
pub fn apis() -> Arc<[Arc<dyn TenantApi>]> {
    Arc::new([
        Arc::new(studio::StudioApi) as Arc<dyn TenantApi>,
        Arc::new(work_orders::WorkOrdersApi),
    ])
}
