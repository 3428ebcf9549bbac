//! Stagecraft: durable runs for long, expensive AI-agent pipelines.
//!
//! Codemap, in reading order:
//! - [`config`]: every environment variable, read once, typed.
//! - [`ids`]: `RunId`, `WorkerId`, `FenceToken`.
//! - [`store`]: the durable record of runs, stages, checkpoints, steps, leases and events, and
//!   the queue workers claim from ([`store::sqlite`] embedded, [`store::redis`] to scale out).
//! - [`schema`]: the JSON Schemas of run inputs, enforced exactly as published.
//! - [`workflows`]: the catalogue of workflows and their stages ([`workflows::demo`]).
//! - [`studio`]: the video-production agents and workflows, mock providers, ffmpeg media.
//! - [`awo`]: agent work orders: git sandboxes, the coding-agent CLI, pull requests.
//! - [`status`]: the run status document (and `metadata.json`).
//! - [`engine`]: executes one claimed run stage by stage: leases, retries, checkpoints, cancel.
//! - [`queue`]: delivers runs to apalis workers and sweeps expired leases.
//! - [`http`]: the axum API, its errors and its OpenAPI document.
//! - [`artifacts`]: files stages write, atomically, under one root.
//! - [`process`]: the one place subprocesses are spawned, each with a cleared environment.
//! - [`secrets`]: hides secret values and token shapes in everything kept or shown.
//! - [`cli`], [`client`], [`ops`]: the `stagecraft` command, its HTTP client, and the operator
//!   commands that read the store directly.
//! - [`money`]: budgets read exactly, to the micro-dollar.
//! - [`metrics`], [`telemetry`], [`shutdown`], [`clock`]: process plumbing.

pub mod artifacts;
pub mod awo;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod engine;
pub mod http;
pub mod ids;
pub mod metrics;
pub mod money;
pub mod ops;
pub mod process;
pub mod queue;
pub mod schema;
pub mod secrets;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod studio;
pub mod telemetry;
pub mod workflows;
