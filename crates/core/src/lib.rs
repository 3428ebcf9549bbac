//! Stagecraft's core: durable runs of stages, whoever the tenant.
//!
//! Codemap, in reading order:
//! - [`ids`]: `RunId`, `WorkerId`, `FenceToken`.
//! - [`store`]: the run model (kinds, statuses, provider modes) and [`store::RunStore`], the
//!   boundary every store crate implements: runs, stages, checkpoints, steps, leases, events.
//! - [`schema`]: the JSON Schemas of run inputs, enforced exactly as published.
//! - [`workflows`]: the [`workflows::Workflow`] trait, the catalogue, and the built-in `demo` and
//!   `noop` workflows.
//! - [`module`]: the seam tenants (the studio, agent work orders) plug into: their workflows,
//!   housekeeping, tool checks, and observers of their runs' changes.
//! - [`stage`], [`retry`]: what a workflow's stages are (`Stage`, the `StageContext` they run in,
//!   their errors and outputs) and their retry policy.
//! - [`engine`]: executes one claimed run stage by stage: leases, retries, checkpoints, cancel.
//! - [`queue`]: delivers runs to apalis workers and sweeps expired leases and old runs.
//! - [`status`]: the run status document.
//! - [`health`]: tool checks for `/health`, probed in the background.
//! - [`artifacts`]: files stages write, atomically and durably, under one root.
//! - [`process`]: the one place subprocesses are spawned, each with a cleared environment.
//! - [`secrets`]: hides secret values and token shapes in everything kept or shown.
//! - [`money`]: costs and budgets, exact to the micro-dollar.
//! - [`settings`]: reading a deployment's variables; each crate reads its own section.
//! - [`metrics`], [`clock`]: process plumbing.
//! - `testing` (feature `testing`): the conformance suite every store crate runs.
//!
//! Invariant: nothing here names a tenant or a store implementation.

pub mod artifacts;
pub mod clock;
pub mod engine;
pub mod health;
pub mod ids;
pub mod metrics;
pub mod module;
pub mod money;
pub mod process;
pub mod queue;
pub mod retry;
pub mod schema;
pub mod secrets;
pub mod settings;
pub mod stage;
pub mod status;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod workflows;

/// A line on standard output for the scripts and tests that start this process (readiness);
/// a closed or full output is no reason to stop serving.
pub fn announce(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
