//! What a stage is, what it is given, and how it fails.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::retry::RetryPolicy;
use crate::{
    artifacts::{ArtifactError, ArtifactStore},
    ids::RunId,
    money::Usd,
    store::{Lease, Progress, ProviderMode, SharedStore, StepRecord, StoreError},
};

/// How a stage attempt failed. The stage classifies; the engine decides what follows.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Worth another attempt after a backoff (timeouts, 429s, 5xx, a flaky network).
    #[error("{0}")]
    Retryable(String),
    /// Another attempt would fail the same way (bad input, budget exceeded, 4xx).
    #[error("{message}")]
    Fatal { code: String, message: String },
    /// The run was cancelled while the stage ran.
    #[error("cancelled")]
    Cancelled,
    /// The store refused a write: this worker no longer owns the run.
    #[error("lease lost: {0}")]
    LeaseLost(String),
}

impl StageError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Retryable(message.into())
    }

    pub fn fatal(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Fatal {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl From<StoreError> for StageError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::FenceRejected { .. } => Self::LeaseLost(error.to_string()),
            other => Self::Retryable(format!("store: {other}")),
        }
    }
}

impl From<ArtifactError> for StageError {
    fn from(error: ArtifactError) -> Self {
        match error {
            ArtifactError::UnsafePath(_) => Self::fatal("unsafe_artifact_path", error.to_string()),
            ArtifactError::TooLarge { .. } => Self::fatal("artifact_too_large", error.to_string()),
            ArtifactError::Io { .. } | ArtifactError::Object { .. } => {
                Self::Retryable(error.to_string())
            }
        }
    }
}

/// What a completed stage hands to its checkpoint.
#[derive(Debug, Clone, Default)]
pub struct StageOutput {
    pub output: Value,
    /// Cost incurred outside memoised steps (steps record their own).
    pub cost_usd: Usd,
}

/// One named step of a workflow.
#[async_trait]
pub trait Stage: Send + Sync {
    /// The stage's stored name. Frozen once shipped: stored runs refer to it.
    fn name(&self) -> &'static str;

    /// This stage's retry policy; `None` takes the deployment's default.
    fn retry_policy(&self) -> Option<RetryPolicy> {
        None
    }

    /// What the stage is expected to cost, checked against the run's remaining budget before
    /// it starts.
    fn estimated_cost_usd(&self, _ctx: &StageContext) -> Usd {
        Usd::ZERO
    }

    /// A key under which this stage's checkpoint may be reused by another run whose stage has
    /// the same key (see [`StageContext::fingerprint`]); `None`: never reused.
    fn reuse_key(&self, _ctx: &StageContext) -> Option<String> {
        None
    }

    async fn run(&self, ctx: &mut StageContext) -> Result<StageOutput, StageError>;
}

/// Everything one stage attempt may see and do.
pub struct StageContext {
    pub run_id: RunId,
    pub stage_name: &'static str,
    pub stage_index: usize,
    /// 1 for the first execution of this stage, 2 for the second, …
    pub attempt: u32,
    pub inputs: Value,
    pub provider_mode: ProviderMode,
    /// Outputs of the stages before this one, by stage name.
    pub previous: BTreeMap<String, Value>,
    /// Fired when the run is cancelled; long work should stop at the next chance.
    pub cancel: CancellationToken,
    pub(crate) store: SharedStore,
    pub(crate) lease: Lease,
    pub(crate) artifacts: ArtifactStore,
    pub(crate) memo: HashMap<String, StepRecord>,
    pub(crate) step_total: u32,
    pub(crate) written: Vec<String>,
    /// Cost of the steps this attempt completed (already added to the run's ledger).
    pub(crate) new_step_cost_usd: Usd,
    /// The run's budget, if it has one.
    pub budget_usd: Option<Usd>,
    /// What the run had spent when this attempt started, memoised steps included.
    pub(crate) spent_before_usd: Usd,
    /// Hides secrets in step outputs before they are stored.
    pub(crate) scrubber: crate::secrets::Scrubber,
}

/// What a step's work hands back: its output, what it cost and the files it wrote.
#[derive(Debug, Clone)]
pub struct StepDone<T> {
    pub output: T,
    pub cost_usd: Usd,
    pub artifacts: Vec<String>,
}

impl StageContext {
    /// The directory of this run's artifacts, relative to the artifact root.
    pub fn run_dir(&self) -> String {
        format!("runs/{}", self.run_id)
    }

    /// Declares how many steps this stage has, for progress reporting.
    pub fn set_step_total(&mut self, total: u32) {
        self.step_total = total;
    }

    /// The stored output of a step that already completed (in an earlier attempt), if any.
    pub fn memoised<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.memo
            .get(key)
            .and_then(|step| serde_json::from_value(step.output.clone()).ok())
    }

    /// Commits a step's result so no later attempt of this stage redoes it. Artifacts the step
    /// names must be complete already.
    pub async fn complete_step<T: Serialize>(
        &mut self,
        key: &str,
        output: &T,
        cost_usd: Usd,
        artifacts: Vec<String>,
    ) -> Result<(), StageError> {
        if cost_usd.is_negative() {
            return Err(StageError::fatal(
                "invalid_cost",
                format!("step {key} reported a cost of {cost_usd}"),
            ));
        }
        let mut output = serde_json::to_value(output)
            .map_err(|e| StageError::fatal("invalid_step_output", e.to_string()))?;
        self.scrubber.scrub_json(&mut output);
        let record = StepRecord {
            key: key.to_owned(),
            output,
            cost_usd,
            artifacts,
        };
        let done = self.memo.len() as u32 + 1;
        let progress = Progress {
            done,
            total: self.step_total.max(done),
        };
        self.store
            .record_step(&self.lease, self.stage_index, &record, progress)
            .await?;
        self.new_step_cost_usd += cost_usd;
        self.written.extend(record.artifacts.iter().cloned());
        self.memo.insert(key.to_owned(), record);
        Ok(())
    }

    /// Writes a complete artifact file and lists it in this stage's checkpoint.
    pub async fn write_artifact(
        &mut self,
        relative: &str,
        bytes: Vec<u8>,
    ) -> Result<String, StageError> {
        let path = self.artifacts.write(relative, bytes).await?;
        if !self.written.contains(&path) {
            self.written.push(path.clone());
        }
        Ok(path)
    }

    /// A fingerprint of what this stage would produce: its name and `version`, the provider
    /// mode, the given inputs and every earlier stage's output (with this run's own directory
    /// written as a placeholder, so runs that differ only in their ids agree).
    pub fn fingerprint(&self, version: u32, inputs: &Value) -> String {
        let own = format!("runs/{}/", self.run_id);
        let previous = serde_json::to_string(&self.previous)
            .unwrap_or_default()
            .replace(&own, "runs/{run}/");
        let parts = [
            self.stage_name,
            &version.to_string(),
            self.provider_mode.as_str(),
            &inputs.to_string(),
            &previous,
        ];
        // Two FNV-1a hashes with different offsets: 128 bits, stable across builds.
        let hash = |offset: u64| {
            let mut hash = offset;
            for part in parts {
                for byte in part.bytes().chain(std::iter::once(0xff)) {
                    hash ^= u64::from(byte);
                    hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
            hash
        };
        format!(
            "{}:{:016x}{:016x}",
            self.stage_name,
            hash(0xcbf2_9ce4_8422_2325),
            hash(0x6c62_272e_07bb_0142)
        )
    }

    /// What the run has spent so far, this attempt's steps included.
    pub fn spent_usd(&self) -> Usd {
        self.spent_before_usd + self.new_step_cost_usd
    }

    /// Runs one memoised step: answers the stored output when the step completed before;
    /// otherwise refuses with `budget_exceeded` when `estimate_usd` does not fit the remaining
    /// budget, and else awaits `work` and commits its result. `work` is only polled when the step
    /// runs, so a memoised or refused step costs nothing.
    pub async fn step<T, F>(
        &mut self,
        key: &str,
        estimate_usd: Usd,
        work: F,
    ) -> Result<T, StageError>
    where
        T: Serialize + DeserializeOwned,
        F: std::future::Future<Output = Result<StepDone<T>, StageError>>,
    {
        if let Some(done) = self.memoised::<T>(key) {
            return Ok(done);
        }
        if let Some(budget) = self.budget_usd {
            let remaining = (budget - self.spent_usd()).max(Usd::ZERO);
            if estimate_usd > remaining {
                return Err(StageError::fatal(
                    "budget_exceeded",
                    format!(
                        "step {key} of stage {} is estimated at ${estimate_usd} but only ${remaining} of the ${budget} budget remains; raise budget_usd and resume",
                        self.stage_name,
                    ),
                ));
            }
        }
        let done = work.await?;
        self.complete_step(key, &done.output, done.cost_usd, done.artifacts)
            .await?;
        Ok(done.output)
    }

    /// Reads another run (a workflow that builds on an earlier run's checkpoints).
    pub async fn load_run(&self, id: RunId) -> Result<Option<crate::store::RunRecord>, StageError> {
        Ok(self.store.get_run(id).await?)
    }

    /// The lease this attempt runs under (its run, worker and fencing token).
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The artifact store itself, for reads and ledgers.
    pub fn artifact_store(&self) -> &ArtifactStore {
        &self.artifacts
    }

    /// Every artifact this attempt wrote or that its memoised steps name.
    pub fn artifacts(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .memo
            .values()
            .flat_map(|s| s.artifacts.iter().cloned())
            .chain(self.written.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }
}
