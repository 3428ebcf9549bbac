//! Stagecraft: durable runs for long, expensive AI-agent pipelines. This is the application:
//! configuration, the HTTP API, the command line, and the wiring of the tenants to a store.
//!
//! The crates, in reading order (`ARCHITECTURE.md` draws them):
//! - `stagecraft-core`: the run model, the store trait, the engine, delivery to workers, the
//!   tenant seam, subprocesses and artifacts; re-exported here under its module names
//!   ([`ids`], [`store`], [`schema`], [`workflows`], [`module`], [`engine`], [`queue`], [`status`],
//!   [`artifacts`], [`process`], [`secrets`], [`money`], [`metrics`], [`clock`]).
//! - `stagecraft-store-sqlite` ([`store::sqlite`], embedded) and `stagecraft-store-redis`
//!   ([`store::redis`], to scale out).
//! - `stagecraft-studio` ([`studio`]): video-production agents and workflows, mock and live
//!   providers, ffmpeg media.
//! - `stagecraft-awo` ([`awo`]): agent work orders: git sandboxes, the coding-agent CLI, pull
//!   requests.
//!
//! This crate's own modules:
//! - [`config`]: every environment variable, read once, typed.
//! - [`modules`]: which tenants a process runs.
//! - [`http`]: the axum API core (runs, artifacts, ops), its errors and its OpenAPI document.
//! - [`console`]: the operator console at `/ui`, compiled in, using the public API only.
//! - [`tenants`]: the tenants' routes (`/agents`, `/agent-work-orders`) behind one interface.
//! - [`cli`], [`client`], [`ops`]: the `stagecraft` command, its HTTP client, and the operator
//!   commands that read the store directly; [`watch`]: a run followed live in the terminal.
//! - [`telemetry`], [`shutdown`]: process plumbing.

pub use stagecraft_awo as awo;
pub use stagecraft_core::{
    announce, artifacts, clock, engine, health, ids, metrics, module, money, process, queue,
    schema, secrets, status, workflows,
};
pub use stagecraft_studio as studio;

/// The run store: the core's model and trait, and the two stores.
pub mod store {
    pub use stagecraft_core::store::*;
    pub use stagecraft_store_postgres as postgres;
    pub use stagecraft_store_redis as redis;
    pub use stagecraft_store_sqlite as sqlite;
}

pub mod cli;
pub mod client;
pub mod config;
pub mod console;
pub mod http;
pub mod modules;
pub mod ops;
pub mod shutdown;
pub mod telemetry;
pub mod tenants;
pub mod watch;
