//! The run store: the durable record of runs, their stages, checkpoints, memoised steps,
//! leases and events, and the queue workers claim runs from.
//!
//! Invariant: every write a worker makes on behalf of a run is conditional on the run's current
//! fencing token and lease owner, and is refused with [`StoreError::FenceRejected`] otherwise.
//! Invariant: a stage's checkpoint and the run's status change that follows it are one
//! transaction.
//!
//! [`RunStore`] is the boundary; each store is a crate of its own (`stagecraft-store-sqlite`,
//! the embedded one, and `stagecraft-store-redis`).

pub mod kernel;
pub mod stored;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    clock::Millis,
    ids::{FenceToken, RunId, WorkerId},
    money::Usd,
};

/// Failures of the run store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The caller's lease is no longer the current one: another worker owns the run now, or it
    /// was cancelled or re-queued. The caller must stop working on the run.
    #[error("lease of run {run_id} with fence {fence} is no longer current")]
    FenceRejected { run_id: RunId, fence: FenceToken },
    /// The run does not exist.
    #[error("run {0} not found")]
    NotFound(RunId),
    /// The request conflicts with the run's current state (e.g. resuming a running run).
    #[error("{0}")]
    Conflict(String),
    /// The idempotency key names a run that was submitted with a different request.
    #[error("the Idempotency-Key was used for run {0} with a different request")]
    IdempotencyConflict(RunId),
    /// The stored data could not be read back (corruption or an incompatible schema).
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    /// The database itself failed.
    #[error("database error: {0}")]
    Database(String),
    /// Redis answered with an error.
    #[error("redis error: {0}")]
    Redis(String),
    /// The store cannot be reached now (connection refused, dropped or timed out).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// This process has as much store work waiting as it may queue; try again shortly.
    #[error("store busy: {0}")]
    Busy(String),
    /// The schema could not be migrated.
    #[error("migration failed: {0}")]
    Migrate(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Whether a connection's I/O failure is TLS refusing the server: its certificate is not
/// trusted, names another host or has expired, or there is none. Waiting would not change it,
/// so a store reports it as final rather than as an outage; every other TLS failure (an alert,
/// a connection closed mid-handshake) may be a server restarting or failing over.
pub fn refuses_the_server(error: &std::io::Error) -> bool {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|tls| {
            matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::InvalidCertRevocationList(_)
            )
        })
}

/// Whether a run's providers are the built-in mocks or the paid services. The strings are
/// frozen: they are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProviderMode {
    Mock,
    Live,
}

impl ProviderMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mock => "mock",
            Self::Live => "live",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "mock" => Some(Self::Mock),
            "live" => Some(Self::Live),
            _ => None,
        }
    }
}

/// The three kinds of runs. The strings are frozen: they are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    Agent,
    Workflow,
    WorkOrder,
}

impl RunKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Workflow => "workflow",
            Self::WorkOrder => "work_order",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "agent" => Some(Self::Agent),
            "workflow" => Some(Self::Workflow),
            "work_order" => Some(Self::WorkOrder),
            _ => None,
        }
    }
}

/// A run's status. The strings are frozen: they are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Retrying,
    Completed,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub const ALL: [RunStatus; 6] = [
        Self::Queued,
        Self::Running,
        Self::Retrying,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// A finished run changes only when a user resumes it.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// A stage's status. The strings are frozen: they are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    Pending,
    Running,
    Retrying,
    Completed,
    Failed,
    Cancelled,
}

impl StageStatus {
    pub const ALL: [StageStatus; 6] = [
        Self::Pending,
        Self::Running,
        Self::Retrying,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// A machine-readable error attached to a failed stage or run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunError {
    /// Stable code, e.g. `stage_failed`, `attempts_exhausted`, `budget_exceeded`, `timeout`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

/// Progress of the steps inside a running stage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub done: u32,
    pub total: u32,
}

/// What the API stores when a run is submitted.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: RunId,
    pub kind: RunKind,
    pub name: String,
    pub queue: String,
    pub inputs: Value,
    pub provider_mode: ProviderMode,
    pub budget_usd: Option<Usd>,
    pub stage_names: Vec<String>,
    /// The submission's `Idempotency-Key`, scoped by the route family it came through.
    pub idempotency_key: Option<String>,
    /// A fingerprint of what was asked for: the same key with another fingerprint is refused
    /// ([`StoreError::IdempotencyConflict`]).
    pub request_hash: Option<String>,
    /// Stages may take the checkpoint of an earlier run with the same inputs (at no cost).
    pub reuse: bool,
}

/// One stage of a run as stored: its status and, once completed, its checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StageRecord {
    pub name: String,
    pub status: StageStatus,
    /// Executions of this stage since the run was submitted or last resumed from it.
    pub attempts: u32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    #[schema(value_type = f64)]
    pub cost_usd: Usd,
    /// Paths relative to the artifact root.
    pub artifacts: Vec<String>,
    pub output: Option<Value>,
    pub error: Option<RunError>,
    pub progress: Option<Progress>,
    /// When a stage waits for its backoff: when the next attempt may start.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The run whose checkpoint this stage reused, if it did.
    pub reused_from: Option<String>,
}

/// A run as stored, with its stages.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub id: RunId,
    pub kind: RunKind,
    pub name: String,
    pub queue: String,
    pub inputs: Value,
    pub status: RunStatus,
    pub provider_mode: ProviderMode,
    pub budget_usd: Option<Usd>,
    pub cost_usd: Usd,
    pub current_stage: Option<String>,
    pub result: Option<Value>,
    pub error: Option<RunError>,
    pub worker: Option<String>,
    pub fence: FenceToken,
    /// While the run is leased: when its lease expires unless its worker beats again.
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub cancel_requested: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Whether stages may reuse earlier runs' checkpoints.
    pub reuse: bool,
    pub stages: Vec<StageRecord>,
    /// The sequence number of the run's last event when it was read: every change to the run
    /// appends an event in the same write, so a record with a larger number is a later state
    /// (0 when unknown, as in the record an insert answers). `get_run` reads the run, its stages
    /// and this number as one snapshot.
    pub event_seq: i64,
}

/// Most stages a stored run may have; more means the stored data is corrupt.
pub const MAX_STAGES: usize = 256;

impl RunRecord {
    /// The last stage, in order, whose checkpoint is committed with all stages before it.
    pub fn last_completed_stage(&self) -> Option<&str> {
        self.stages
            .iter()
            .take_while(|s| s.status == StageStatus::Completed)
            .last()
            .map(|s| s.name.as_str())
    }

    /// The first stage without a committed checkpoint, if any.
    pub fn first_open_stage(&self) -> Option<usize> {
        self.stages
            .iter()
            .position(|s| s.status != StageStatus::Completed)
    }

    pub fn stage_index(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }

    /// A run as `insert_run` stores it: queued, nothing run yet, created at `at`.
    pub fn queued(run: NewRun, at: DateTime<Utc>) -> Self {
        Self {
            id: run.id,
            kind: run.kind,
            name: run.name,
            queue: run.queue,
            inputs: run.inputs,
            status: RunStatus::Queued,
            provider_mode: run.provider_mode,
            budget_usd: run.budget_usd,
            cost_usd: Usd::ZERO,
            current_stage: None,
            result: None,
            error: None,
            worker: None,
            fence: FenceToken(0),
            cancel_requested: false,
            created_at: at,
            updated_at: at,
            finished_at: None,
            reuse: run.reuse,
            lease_expires_at: None,
            event_seq: 0,
            stages: run
                .stage_names
                .into_iter()
                .map(|name| StageRecord {
                    name,
                    status: StageStatus::Pending,
                    attempts: 0,
                    started_at: None,
                    finished_at: None,
                    cost_usd: Usd::ZERO,
                    artifacts: Vec::new(),
                    output: None,
                    error: None,
                    progress: None,
                    next_attempt_at: None,
                    reused_from: None,
                })
                .collect(),
        }
    }
}

/// The right of one worker to execute one run, until `expires`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    pub run_id: RunId,
    pub worker: WorkerId,
    pub fence: FenceToken,
}

/// A run a worker has just claimed.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub lease: Lease,
    pub run: RunRecord,
    /// True when the run was taken over after a lease expired or a worker stopped.
    pub recovered: bool,
    /// When the claim was asked for: the store set the lease's expiry after this moment, so
    /// the lease lasts at least its time to live from here (the worker counts from it).
    pub asked: tokio::time::Instant,
}

/// A memoised step's stored result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub key: String,
    pub output: Value,
    pub cost_usd: Usd,
    pub artifacts: Vec<String>,
}

/// What a completed stage commits.
#[derive(Debug, Clone)]
pub struct StageCheckpoint {
    pub output: Value,
    pub artifacts: Vec<String>,
    pub cost_usd: Usd,
    /// Set on the last stage: the run's result, which completes the run.
    pub run_result: Option<Value>,
    /// Set when the checkpoint was taken from an earlier run.
    pub reused_from: Option<RunId>,
}

/// A checkpoint later runs may reuse: where it came from and what it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReusableCheckpoint {
    pub run_id: RunId,
    pub stage: String,
    pub output: Value,
    /// Paths relative to the artifact root, inside the source run's directory.
    pub artifacts: Vec<String>,
}

/// How a stage that did not complete ends its attempt.
#[derive(Debug, Clone)]
pub enum StageOutcome {
    /// Transient failure: the run waits `delay` and is claimed again.
    Retry { error: RunError, delay: Duration },
    /// Permanent failure or attempts exhausted: the run fails.
    Fail { error: RunError },
    /// The user cancelled the run.
    Cancelled,
    /// The worker is stopping: the run goes back to the queue as it is.
    Abandoned,
}

/// Where a resume starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromStage {
    /// The first stage without a committed checkpoint; memoised steps are kept.
    Auto,
    /// This stage and every later one run again; their steps are forgotten.
    Named(String),
}

/// What a resume changes besides the stages: new inputs (the whole object) and a new budget,
/// and who asked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResumeChanges {
    pub inputs: Option<Value>,
    pub budget_usd: Option<Usd>,
    pub actor: Actor,
}

/// Who asked for a change to a run (a cancel, a resume), named in the event it appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Actor {
    /// The caller's role: `operator` (the full `API_TOKEN`), `read_only`, `anonymous` (a deployment without
    /// tokens) or `local` (a command run beside the store).
    pub role: ActorRole,
    /// Through what: `api` (a bearer token), `console` (the console's session) or `cli`.
    pub via: ActorChannel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActorRole {
    Operator,
    /// The read-only token (which can change nothing; named for completeness).
    ReadOnly,
    Anonymous,
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActorChannel {
    Api,
    Console,
    Cli,
}

impl Default for Actor {
    /// A command run beside the store.
    fn default() -> Self {
        Self {
            role: ActorRole::Local,
            via: ActorChannel::Cli,
        }
    }
}

/// Filters of the run listing. Every filter narrows; none set lists every run.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub kind: Option<RunKind>,
    pub status: Option<RunStatus>,
    pub name: Option<String>,
    pub queue: Option<String>,
    /// Only runs older than this one: the cursor of the previous page.
    pub before: Option<RunId>,
    /// Only runs at least as new as this one (the start of a time range: run ids grow with
    /// their creation time, see [`RunId::first_at`]).
    pub since: Option<RunId>,
    /// Only runs older than this one (the end of a time range).
    pub until: Option<RunId>,
    /// Only runs that cost at least this much.
    pub min_cost: Option<Usd>,
    /// Only runs that cost at most this much.
    pub max_cost: Option<Usd>,
    /// Only runs that failed with this error code.
    pub error_code: Option<String>,
    /// Only runs with this text inside a value of their inputs ([`MIN_SEARCH_CHARS`] or more).
    pub input_text: Option<String>,
    pub limit: u32,
    /// The caller needs no total (a later page of a walk through the list): stores that count
    /// by reading may skip it and answer 0.
    pub uncounted: bool,
}

impl RunFilter {
    /// Whether a filter beyond status and the id range is set (the ones a store may have to
    /// check run by run).
    pub fn narrows_beyond_status(&self) -> bool {
        self.kind.is_some()
            || self.name.is_some()
            || self.queue.is_some()
            || self.min_cost.is_some()
            || self.max_cost.is_some()
            || self.error_code.is_some()
            || self.input_text.is_some()
    }

    /// Whether a run passes the filters (the id range and status apart, which stores read
    /// from their indexes).
    pub fn admits(&self, run: &RunFacts<'_>) -> bool {
        self.kind.is_none_or(|k| run.kind == Some(k))
            && self.name.as_deref().is_none_or(|n| run.name == n)
            && self.queue.as_deref().is_none_or(|q| run.queue == q)
            && self.min_cost.is_none_or(|c| run.cost_usd >= c)
            && self.max_cost.is_none_or(|c| run.cost_usd <= c)
            && self
                .error_code
                .as_deref()
                .is_none_or(|code| run.error_code == Some(code))
            && self.input_text.as_ref().is_none_or(|text| {
                run.inputs
                    .is_some_and(|inputs| inputs_contain(inputs, text))
            })
    }
}

/// What [`RunFilter::admits`] looks at, as a store that checks runs one by one reads it.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunFacts<'a> {
    pub kind: Option<RunKind>,
    pub name: &'a str,
    pub queue: &'a str,
    pub cost_usd: Usd,
    pub error_code: Option<&'a str>,
    /// Read only when the filter searches the inputs.
    pub inputs: Option<&'a Value>,
}

/// Fewest characters an input search may have.
pub const MIN_SEARCH_CHARS: usize = 3;

/// Whether a string or number inside `inputs` contains `text` (case-insensitively, as the
/// stores' indexes match).
pub fn inputs_contain(inputs: &Value, text: &str) -> bool {
    let needle = text.to_lowercase();
    fn walk(value: &Value, needle: &str) -> bool {
        match value {
            Value::String(s) => s.to_lowercase().contains(needle),
            Value::Number(n) => n.to_string().contains(needle),
            Value::Array(items) => items.iter().any(|v| walk(v, needle)),
            Value::Object(map) => map.values().any(|v| walk(v, needle)),
            Value::Bool(_) | Value::Null => false,
        }
    }
    walk(inputs, &needle)
}

/// A page of the run listing.
#[derive(Debug, Clone, Default)]
pub struct RunPage {
    pub runs: Vec<RunRecord>,
    /// Runs matching the filters in all, when the store could count them; a store that checks
    /// runs one by one counts the matches among the runs it examined.
    pub total: u64,
    /// When the store checked runs one by one and stopped before the end: how many it
    /// examined, and the id to continue after.
    pub scan: Option<ScanExtent>,
}

/// How far a bounded scan looked.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanExtent {
    pub examined: u64,
    /// Whether every candidate run was examined.
    pub complete: bool,
    /// The last run examined: the next page continues after it.
    pub last: Option<RunId>,
}

/// Most runs a store that cannot index a filter examines for one page.
pub const SCAN_LIMIT: u64 = 10_000;

/// Runs finished in one queue in one minute, by outcome.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Throughput {
    pub queue: String,
    /// The start of the minute.
    pub minute: DateTime<Utc>,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
}

/// How long stores keep throughput history.
pub const THROUGHPUT_KEPT: Duration = Duration::from_secs(25 * 3600);

/// The oldest run waiting in a queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QueueWait {
    pub queue: String,
    /// When the longest-waiting run became due (its submission, or the end of its backoff).
    pub oldest_due_at: DateTime<Utc>,
}

/// One entry of a run's event log, as streamed by `GET /runs/{id}/events`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunEvent {
    /// Position in the store's event log; strictly increasing.
    pub seq: i64,
    pub run_id: RunId,
    pub at: DateTime<Utc>,
    pub kind: kernel::EventKind,
    pub stage: Option<String>,
    pub data: Value,
}

/// Where a run's event log ends and whether it has finished: what watchers of the run need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunPosition {
    pub run_id: RunId,
    /// The sequence number of its last event (0 when it has none).
    pub last_event_seq: i64,
    pub finished: bool,
}

/// Counts by queue and status, for ops.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct QueueDepth {
    pub queue: String,
    pub status: RunStatus,
    pub count: u64,
}

/// A live worker process, as registered in the store.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerInfo {
    #[schema(value_type = String)]
    pub id: WorkerId,
    pub queues: Vec<String>,
    pub concurrency: u32,
    pub started_at: DateTime<Utc>,
    pub last_heartbeat: DateTime<Utc>,
    /// Runs the worker is executing now.
    pub running: Vec<String>,
}

/// Most runs one `purge_finished` call deletes.
pub const PURGE_BATCH: u64 = 500;

/// Most expired leases one `sweep_expired_leases` call handles.
pub const SWEEP_BATCH: u64 = 500;

/// How long a worker may miss heartbeats before it is no longer listed.
pub const WORKER_STALE_AFTER: Duration = Duration::from_secs(30);

/// The durable store behind every process. Implementations must make every method safe to
/// call from several processes at once.
#[async_trait]
pub trait RunStore: Send + Sync + 'static {
    /// Name of the backend for `/health`.
    fn backend_name(&self) -> &'static str;

    /// Checks the store answers.
    async fn ping(&self) -> StoreResult<()>;

    /// Persists a new queued run. With an idempotency key already used, returns the existing
    /// run and `false` (or [`StoreError::IdempotencyConflict`] when that run was asked for
    /// differently). A key is kept as long as the run it names.
    async fn insert_run(&self, run: NewRun) -> StoreResult<(RunRecord, bool)>;

    async fn get_run(&self, id: RunId) -> StoreResult<Option<RunRecord>>;

    /// Runs matching the filter, newest first, without their stages, and how many match in all.
    async fn list_runs(&self, filter: &RunFilter) -> StoreResult<RunPage>;

    /// Claims up to `max` of the oldest due runs of these queues, each with a new lease and a
    /// larger fence, oldest first.
    async fn claim(
        &self,
        queues: &[String],
        worker: &WorkerId,
        ttl: Duration,
        max: usize,
    ) -> StoreResult<Vec<Claimed>>;

    /// Extends the lease. Answers whether a cancel was requested.
    async fn heartbeat(&self, lease: &Lease, ttl: Duration) -> StoreResult<bool>;

    /// Marks a stage running and counts the attempt; answers the attempt number.
    async fn start_stage(&self, lease: &Lease, stage: usize) -> StoreResult<u32>;

    async fn steps(&self, run: RunId, stage: usize) -> StoreResult<Vec<StepRecord>>;

    /// Stores a memoised step's result and the stage's progress.
    async fn record_step(
        &self,
        lease: &Lease,
        stage: usize,
        step: &StepRecord,
        progress: Progress,
    ) -> StoreResult<()>;

    /// Commits a stage's checkpoint, and completes the run when the checkpoint carries the result.
    async fn commit_stage(
        &self,
        lease: &Lease,
        stage: usize,
        checkpoint: StageCheckpoint,
    ) -> StoreResult<()>;

    /// Ends an attempt that did not complete, releasing the lease.
    async fn end_attempt(
        &self,
        lease: &Lease,
        stage: usize,
        outcome: StageOutcome,
    ) -> StoreResult<()>;

    /// Fails the run before any stage runs (e.g. unknown workflow at the worker).
    async fn fail_run(&self, lease: &Lease, error: RunError) -> StoreResult<()>;

    /// Cancels a queued run at once; flags a running one for its worker to stop.
    async fn request_cancel(&self, id: RunId, actor: Actor) -> StoreResult<RunRecord>;

    /// Re-queues a finished run from a stage, keeping the checkpoints before it.
    /// `changes` replace the run's inputs or budget in the same write.
    async fn resume(
        &self,
        id: RunId,
        from: FromStage,
        changes: ResumeChanges,
    ) -> StoreResult<RunRecord>;

    /// Offers a committed checkpoint for reuse under `key` (the newest offer wins).
    async fn record_reusable(&self, key: &str, checkpoint: &ReusableCheckpoint) -> StoreResult<()>;

    /// The checkpoint offered under `key`, if any (and its run still exists).
    async fn find_reusable(&self, key: &str) -> StoreResult<Option<ReusableCheckpoint>>;

    /// Re-queues runs whose lease expired; answers their ids.
    async fn sweep_expired_leases(&self) -> StoreResult<Vec<RunId>>;

    /// Deletes runs finished more than `retention` ago, at most [`PURGE_BATCH`] per call;
    /// answers how many.
    async fn purge_finished(&self, retention: Duration) -> StoreResult<u64>;

    /// Events of a run after `after_seq`, oldest first.
    async fn events_after(
        &self,
        run: RunId,
        after_seq: i64,
        limit: u32,
    ) -> StoreResult<Vec<RunEvent>>;

    /// Where the event logs of these runs end and whether they finished, in one call (at most
    /// 500 ids). Runs that do not exist are left out.
    async fn run_positions(&self, runs: &[RunId]) -> StoreResult<Vec<RunPosition>>;

    async fn queue_depths(&self) -> StoreResult<Vec<QueueDepth>>;

    /// The longest-waiting due run of each queue that has one.
    async fn oldest_waiting(&self) -> StoreResult<Vec<QueueWait>>;

    /// Adds finished runs to the per-minute history of their queues, dropping minutes older
    /// than [`THROUGHPUT_KEPT`].
    async fn add_throughput(&self, counts: &[Throughput]) -> StoreResult<()>;

    /// The per-minute history since `since`, oldest minute first.
    async fn throughput(&self, since: DateTime<Utc>) -> StoreResult<Vec<Throughput>>;

    /// Registers a worker process or refreshes its heartbeat and current runs.
    async fn worker_heartbeat(&self, worker: &WorkerInfo) -> StoreResult<()>;

    /// Removes a worker that stopped cleanly.
    async fn unregister_worker(&self, id: &WorkerId) -> StoreResult<()>;

    /// Workers whose last heartbeat is within [`WORKER_STALE_AFTER`]; forgets older ones.
    async fn list_workers(&self) -> StoreResult<Vec<WorkerInfo>>;

    /// Adds to cluster-wide counters (metric sample name → amount).
    async fn add_counters(&self, deltas: &[(String, f64)]) -> StoreResult<()>;

    /// Every cluster-wide counter.
    async fn counters(&self) -> StoreResult<Vec<(String, f64)>>;

    /// Waits until work may be available on these queues. The embedded store is woken at once
    /// by runs this process queues and otherwise polls every `poll`; Redis blocks on the
    /// queues' wake lists until a run is queued or the next retry is due.
    async fn wait_for_work(&self, queues: &[String], poll: Duration);
}

pub type SharedStore = Arc<dyn RunStore>;

/// Where a resume of `run` starts, or why it cannot.
pub fn resume_start(run: &RunRecord, from: &FromStage) -> StoreResult<usize> {
    let id = run.id;
    if !run.status.is_finished() {
        return Err(StoreError::Conflict(format!(
            "run {id} is {}; only failed, cancelled or completed runs can be resumed",
            run.status.as_str()
        )));
    }
    match from {
        FromStage::Auto => run.first_open_stage().ok_or_else(|| {
            StoreError::Conflict(format!(
                "run {id} has completed every stage; name the stage to resume from"
            ))
        }),
        FromStage::Named(name) => run
            .stage_index(name)
            .ok_or_else(|| StoreError::Conflict(format!("run {id} has no stage named {name:?}"))),
    }
}

/// Converts stored milliseconds to a timestamp.
pub fn to_datetime(ms: Millis) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}
