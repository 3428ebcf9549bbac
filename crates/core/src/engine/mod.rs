//! The stage engine: executes one claimed run, stage by stage, under its lease.
//!
//! Invariant: the engine decides what a failure means (retry, fail, cancel); stages only
//! classify their errors as [`StageError`].
//! Invariant: retries are durable: a transient failure stores the time of the next attempt and
//! releases the run, so a crash during the backoff loses nothing and holds no worker slot.
//! Invariant: the engine stops touching a run the moment the store refuses its fencing token.

use std::{
    collections::{BTreeMap, HashMap},
    ops::ControlFlow,
    sync::Arc,
    time::Duration,
};

pub use crate::{
    retry::RetryPolicy,
    stage::{Stage, StageContext, StageError, StageOutput, StepDone},
};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use serde_json::Value;

use crate::{
    artifacts::ArtifactStore,
    ids::{RunId, WorkerId},
    metrics::{Metrics, RunOutcome},
    module::{Observers, RunChange, RunObserver},
    money::Usd,
    secrets::Scrubber,
    store::{
        Claimed, Lease, ReusableCheckpoint, RunError, RunRecord, SharedStore, StageCheckpoint,
        StageOutcome, StageStatus, StoreError,
    },
    workflows::{Catalog, Workflow},
};

/// Settings of the engine, from the configuration.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub lease_ttl: Duration,
    pub default_retry: RetryPolicy,
}

/// Shared by every run a worker process executes.
pub struct Engine {
    pub store: SharedStore,
    pub catalog: Arc<Catalog>,
    pub artifacts: ArtifactStore,
    pub settings: EngineSettings,
    pub worker: WorkerId,
    pub metrics: Arc<Metrics>,
    /// The tenants' reactions to changes of their runs.
    pub observers: Observers,
    /// Fired when the process begins to stop: no new stage starts, runs are released between
    /// stages.
    pub stopping: CancellationToken,
    /// Fired when the grace period is over: running stages are abandoned and released.
    pub abandon: CancellationToken,
    /// Runs this process is executing now, reported with the worker's heartbeat.
    pub running: std::sync::Mutex<std::collections::BTreeSet<RunId>>,
    /// Hides the deployment's secrets in every error and output the engine stores or logs.
    pub scrubber: Scrubber,
}

/// Why a run's execution ended in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Completed,
    RetryScheduled,
    Failed,
    Cancelled,
    Released,
    /// The store refused the lease's fencing token: another worker owns the run now.
    LeaseLost,
    /// A store write failed; the lease will expire and the sweeper re-queue the run.
    StoreFailed,
}

/// One run's execution in this process: what passes from one stage to the next.
struct Execution<'a> {
    lease: Lease,
    run: RunRecord,
    workflow: Arc<dyn Workflow>,
    /// Outputs of the stages so far, by stage name.
    previous: BTreeMap<String, Value>,
    cancel: &'a CancellationToken,
    lease_lost: &'a CancellationToken,
    watchers: &'a [Arc<dyn RunObserver>],
    /// Called once the last stage has run, just before its commit (in a mutex only so that
    /// the execution can be shared across awaits).
    stages_done: std::sync::Mutex<Option<Box<dyn FnOnce() + Send + 'a>>>,
}

impl Execution<'_> {
    fn is_last(&self, index: usize) -> bool {
        index + 1 == self.run.stages.len()
    }
}

/// What the loop does after a stage.
type Next = ControlFlow<Ending>;

impl Engine {
    /// Executes a claimed run until it completes, fails, waits for a retry, is cancelled or
    /// released, or its lease is lost. `stages_done` is called once the run's last stage has
    /// run, just before its checkpoint commit: the worker's slot is free from then on, so the
    /// next run's claim can travel to the store together with that commit.
    pub async fn execute(&self, claimed: Claimed, stages_done: impl FnOnce() + Send) -> Ending {
        let span = info_span!("run", run.id = %claimed.run.id, run.name = %claimed.run.name, fence = claimed.lease.fence.0);
        async move {
            let run_id = claimed.run.id;
            let queue = claimed.run.queue.clone();
            if let Ok(mut running) = self.running.lock() {
                running.insert(run_id);
            }
            let cancel = CancellationToken::new();
            let lease_lost = CancellationToken::new();
            let heartbeat = tokio::spawn(keep_lease(
                self.store.clone(),
                claimed.lease.clone(),
                (claimed.asked, self.settings.lease_ttl),
                cancel.clone(),
                lease_lost.clone(),
            ));
            if claimed.recovered {
                self.metrics.lease_recovered();
            }
            let watchers = self.observers.watching(claimed.run.kind, &claimed.run.name);
            let ending = match self.runnable(claimed).await {
                Ok((lease, run, workflow)) => {
                    let mut execution = Execution {
                        lease,
                        run,
                        workflow,
                        previous: BTreeMap::new(),
                        cancel: &cancel,
                        lease_lost: &lease_lost,
                        watchers: &watchers,
                        stages_done: std::sync::Mutex::new(Some(Box::new(stages_done))),
                    };
                    self.execute_stages(&mut execution).await
                }
                Err(ending) => ending,
            };
            heartbeat.abort();
            self.finish((run_id, &queue), ending, &watchers).await;
            ending
        }
        .instrument(span)
        .await
    }

    /// The bookkeeping after an execution ended, whatever ended it.
    async fn finish(
        &self,
        (run_id, queue): (RunId, &str),
        ending: Ending,
        watchers: &[Arc<dyn RunObserver>],
    ) {
        let outcome = match ending {
            Ending::Completed => Some(RunOutcome::Completed),
            Ending::Failed => Some(RunOutcome::Failed),
            Ending::Cancelled => Some(RunOutcome::Cancelled),
            _ => None,
        };
        if let Some(outcome) = outcome {
            self.metrics
                .run_finished(queue, outcome, chrono::Utc::now());
        }
        match ending {
            Ending::LeaseLost => {
                self.metrics.fencing_rejected();
                warn!("lease lost; this worker stopped executing the run");
            }
            Ending::StoreFailed => self.metrics.store_failed(),
            _ => self.notify(watchers, run_id).await,
        }
        if let Ok(mut running) = self.running.lock() {
            running.remove(&run_id);
        }
        info!(ending = ?ending, "run execution ended");
    }

    async fn notify(&self, watchers: &[Arc<dyn RunObserver>], run: RunId) {
        let change = RunChange {
            run,
            store: &self.store,
            artifacts: &self.artifacts,
        };
        for observer in watchers {
            observer.changed(&change).await;
        }
    }

    /// The claimed run with its workflow, or the ending when it must not run here: its
    /// workflow is unknown to this worker or changed shape since submission, or a cancel was
    /// requested while it waited.
    async fn runnable(
        &self,
        claimed: Claimed,
    ) -> Result<(Lease, RunRecord, Arc<dyn Workflow>), Ending> {
        let Claimed { lease, run, .. } = claimed;
        let Some(workflow) = self.catalog.get(run.kind, &run.name) else {
            let error = RunError {
                code: "unknown_workflow".to_owned(),
                message: format!(
                    "no {} named {:?} is known to this worker",
                    run.kind.as_str(),
                    run.name
                ),
            };
            return Err(self.settle(self.store.fail_run(&lease, error).await, Ending::Failed));
        };
        if run.cancel_requested {
            let first_open = run.first_open_stage().unwrap_or(0);
            let written = self
                .store
                .end_attempt(&lease, first_open, StageOutcome::Cancelled)
                .await;
            return Err(self.settle(written, Ending::Cancelled));
        }
        let stages = workflow.stages();
        let same_shape = stages.len() == run.stages.len()
            && stages
                .iter()
                .zip(&run.stages)
                .all(|(stage, record)| stage.name() == record.name);
        if !same_shape {
            let stored: Vec<&str> = run.stages.iter().map(|s| s.name.as_str()).collect();
            let error = RunError {
                code: "workflow_changed".to_owned(),
                message: format!(
                    "the stages of {} changed since this run was submitted (stored: {}; now: {})",
                    run.name,
                    stored.join(", "),
                    workflow.stage_names().join(", ")
                ),
            };
            return Err(self.settle(self.store.fail_run(&lease, error).await, Ending::Failed));
        }
        Ok((lease, run, workflow))
    }

    /// Runs every stage without a checkpoint, in order.
    async fn execute_stages(&self, ex: &mut Execution<'_>) -> Ending {
        let workflow = ex.workflow.clone();
        for (index, stage) in workflow.stages().iter().enumerate() {
            let record = &ex.run.stages[index];
            if record.status == StageStatus::Completed {
                let output = record.output.clone().unwrap_or_default();
                ex.previous.insert(record.name.clone(), output);
                continue;
            }
            if self.stopping.is_cancelled() {
                let written = self
                    .store
                    .end_attempt(&ex.lease, index, StageOutcome::Abandoned)
                    .await;
                return self.settle(written, Ending::Released);
            }
            if let ControlFlow::Break(ending) = self.execute_stage(ex, index, stage.as_ref()).await
            {
                return ending;
            }
        }
        // Every stage had a checkpoint yet the run was not completed: the last commit completes
        // the run in the same transaction, so this is an inconsistency. Fail loudly rather than
        // leave the run to be claimed again and again.
        let error = RunError {
            code: "inconsistent_state".to_owned(),
            message: "every stage has a checkpoint but the run was not completed".to_owned(),
        };
        self.settle(self.store.fail_run(&ex.lease, error).await, Ending::Failed)
    }

    /// One stage: reused from an earlier run's checkpoint when allowed, refused when over
    /// budget, else attempted and its result concluded.
    async fn execute_stage(&self, ex: &mut Execution<'_>, index: usize, stage: &dyn Stage) -> Next {
        let mut ctx = match self.context(ex, index, stage).await {
            Ok(ctx) => ctx,
            Err(error) => return ControlFlow::Break(self.store_failure(error)),
        };
        let reuse_key = stage.reuse_key(&ctx);
        if let (true, Some(key)) = (ex.run.reuse, &reuse_key)
            && let Some(found) = self.reusable(ex.run.id, key).await
        {
            return self.reuse(ex, index, stage, key, found).await;
        }
        if let Some(budget) = ex.run.budget_usd {
            let estimate = stage.estimated_cost_usd(&ctx);
            let remaining = (budget - ex.run.cost_usd).max(Usd::ZERO);
            if estimate > remaining {
                let error = RunError {
                    code: "budget_exceeded".to_owned(),
                    message: format!(
                        "stage {} is estimated at ${estimate} but only ${remaining} of the ${budget} budget remains",
                        stage.name(),
                    ),
                };
                return ControlFlow::Break(self.fail(&ex.lease, index, error).await);
            }
        }
        ctx.attempt = self.start_stage(ex, index).await?;
        let policy = stage.retry_policy().unwrap_or(self.settings.default_retry);
        let started = std::time::Instant::now();
        info!(
            stage.name = stage.name(),
            attempt = ctx.attempt,
            "stage started"
        );
        let result = self.attempt(ex, index, stage, &mut ctx, &policy).await?;
        let elapsed = started.elapsed();
        self.metrics.observe_stage(stage.name(), elapsed);
        let done = match self.vet(stage.name(), result) {
            Ok(done) => done,
            Err(error) => {
                return ControlFlow::Break(
                    self.conclude(ex, index, stage, &ctx, &policy, error).await,
                );
            }
        };
        let artifacts = ctx.artifacts();
        ex.run.cost_usd += done.cost_usd + ctx.new_step_cost_usd;
        let checkpoint = StageCheckpoint {
            output: done.output,
            artifacts,
            cost_usd: done.cost_usd,
            run_result: None,
            reused_from: None,
        };
        let next = self.commit(ex, index, stage, checkpoint, reuse_key).await;
        info!(
            stage.name = stage.name(),
            duration_ms = elapsed.as_millis() as u64,
            "stage completed"
        );
        next
    }

    /// The context a stage's attempt runs in, its memoised steps read when it has any.
    async fn context(
        &self,
        ex: &Execution<'_>,
        index: usize,
        stage: &dyn Stage,
    ) -> Result<StageContext, StoreError> {
        let run = &ex.run;
        // Steps exist only where progress was recorded: skip the read for fresh stages.
        let memo: HashMap<_, _> = if run.stages[index].progress.is_some() {
            let steps = self.store.steps(run.id, index).await?;
            steps.into_iter().map(|s| (s.key.clone(), s)).collect()
        } else {
            HashMap::new()
        };
        Ok(StageContext {
            run_id: run.id,
            stage_name: stage.name(),
            stage_index: index,
            attempt: 0,
            inputs: run.inputs.clone(),
            provider_mode: run.provider_mode,
            previous: ex.previous.clone(),
            cancel: ex.cancel.clone(),
            store: self.store.clone(),
            lease: ex.lease.clone(),
            artifacts: self.artifacts.clone(),
            memo,
            step_total: 0,
            written: Vec::new(),
            new_step_cost_usd: Usd::ZERO,
            budget_usd: run.budget_usd,
            spent_before_usd: run.cost_usd,
            scrubber: self.scrubber.clone(),
        })
    }

    /// Completes a stage with an earlier run's checkpoint, at no cost.
    async fn reuse(
        &self,
        ex: &mut Execution<'_>,
        index: usize,
        stage: &dyn Stage,
        key: &str,
        found: ReusableCheckpoint,
    ) -> Next {
        self.start_stage(ex, index).await?;
        let checkpoint = StageCheckpoint {
            output: found.output,
            artifacts: found.artifacts,
            cost_usd: Usd::ZERO,
            run_result: None,
            reused_from: Some(found.run_id),
        };
        info!(stage.name = stage.name(), reused_from = %found.run_id, "stage reused an earlier run's checkpoint");
        self.commit(ex, index, stage, checkpoint, Some(key.to_owned()))
            .await
    }

    /// Starts the stage's attempt and tells the observers.
    async fn start_stage(&self, ex: &Execution<'_>, index: usize) -> ControlFlow<Ending, u32> {
        match self.store.start_stage(&ex.lease, index).await {
            Ok(attempt) => {
                self.notify(ex.watchers, ex.run.id).await;
                ControlFlow::Continue(attempt)
            }
            Err(error) => ControlFlow::Break(self.store_failure(error)),
        }
    }

    /// Commits a stage's checkpoint (the run's result with the last one, which completes the
    /// run), then offers it for reuse under `reuse_key`.
    async fn commit(
        &self,
        ex: &mut Execution<'_>,
        index: usize,
        stage: &dyn Stage,
        mut checkpoint: StageCheckpoint,
        reuse_key: Option<String>,
    ) -> Next {
        let is_last = ex.is_last(index);
        ex.previous
            .insert(stage.name().to_owned(), checkpoint.output.clone());
        if is_last {
            checkpoint.run_result = Some(ex.workflow.result(&ex.previous));
            let done = ex.stages_done.lock().ok().and_then(|mut d| d.take());
            if let Some(done) = done {
                done();
            }
        }
        let offered = reuse_key.map(|key| {
            let offer = ReusableCheckpoint {
                run_id: ex.run.id,
                stage: stage.name().to_owned(),
                output: checkpoint.output.clone(),
                artifacts: checkpoint.artifacts.clone(),
            };
            (key, offer)
        });
        if let Err(error) = self.store.commit_stage(&ex.lease, index, checkpoint).await {
            return ControlFlow::Break(self.store_failure(error));
        }
        if let Some((key, offer)) = offered {
            // A failure only costs a future reuse.
            if let Err(error) = self.store.record_reusable(&key, &offer).await {
                warn!(error = %error, "offering the checkpoint for reuse failed");
            }
        }
        if is_last {
            return ControlFlow::Break(Ending::Completed);
        }
        self.notify(ex.watchers, ex.run.id).await;
        ControlFlow::Continue(())
    }

    /// One attempt of the stage, bounded by its timeout; a panic is a fatal error. Breaks when
    /// the lease is lost or the grace period ends first.
    async fn attempt(
        &self,
        ex: &Execution<'_>,
        index: usize,
        stage: &dyn Stage,
        ctx: &mut StageContext,
        policy: &RetryPolicy,
    ) -> ControlFlow<Ending, Result<StageOutput, StageError>> {
        let attempt =
            std::panic::AssertUnwindSafe(tokio::time::timeout(policy.timeout, stage.run(ctx)))
                .catch_unwind();
        let result = tokio::select! {
            result = attempt => match result {
                Ok(Ok(result)) => result,
                Ok(Err(_elapsed)) => Err(StageError::retryable(format!("stage timed out after {} s", policy.timeout.as_secs_f64()))),
                Err(_panic) => Err(StageError::fatal("stage_panicked", format!("stage {} panicked", stage.name()))),
            },
            () = ex.cancel.cancelled() => Err(StageError::Cancelled),
            () = ex.lease_lost.cancelled() => return ControlFlow::Break(Ending::LeaseLost),
            () = self.abandon.cancelled() => {
                warn!(stage.name = stage.name(), "grace period over; abandoning the stage");
                let written = self.store.end_attempt(&ex.lease, index, StageOutcome::Abandoned).await;
                return ControlFlow::Break(self.settle(written, Ending::Released));
            }
        };
        ControlFlow::Continue(result)
    }

    /// What a failed attempt means: a retry later, a failed run, or a cancelled one.
    async fn conclude(
        &self,
        ex: &Execution<'_>,
        index: usize,
        stage: &dyn Stage,
        ctx: &StageContext,
        policy: &RetryPolicy,
        error: StageError,
    ) -> Ending {
        let lease = &ex.lease;
        match error {
            StageError::Retryable(message) if policy.allows_another_after(ctx.attempt) => {
                let delay = policy.delay_after(ctx.attempt, &mut rand::rng());
                warn!(stage.name = stage.name(), attempt = ctx.attempt, delay_ms = delay.as_millis() as u64, error = %message, "stage failed; retry scheduled");
                self.metrics.retry_scheduled();
                let error = RunError {
                    code: "stage_error".to_owned(),
                    message,
                };
                let outcome = StageOutcome::Retry { error, delay };
                let written = self.store.end_attempt(lease, index, outcome).await;
                self.settle(written, Ending::RetryScheduled)
            }
            StageError::Retryable(message) => {
                let error = RunError {
                    code: "attempts_exhausted".to_owned(),
                    message: format!(
                        "stage {} failed {} times; last error: {message}",
                        stage.name(),
                        ctx.attempt
                    ),
                };
                self.fail(lease, index, error).await
            }
            StageError::Fatal { code, message } => {
                self.fail(lease, index, RunError { code, message }).await
            }
            StageError::Cancelled => {
                let written = self
                    .store
                    .end_attempt(lease, index, StageOutcome::Cancelled)
                    .await;
                self.settle(written, Ending::Cancelled)
            }
            StageError::LeaseLost(_) => Ending::LeaseLost,
        }
    }

    /// What a stage handed back, made fit to store: nothing is stored or logged before its
    /// secrets are hidden, and a cost that is not a finite, non-negative amount is an error.
    fn vet(
        &self,
        stage: &str,
        result: Result<StageOutput, StageError>,
    ) -> Result<StageOutput, StageError> {
        match result {
            Ok(done) if done.cost_usd.is_negative() => Err(StageError::fatal(
                "invalid_cost",
                format!("stage {stage} reported a cost of {}", done.cost_usd),
            )),
            Ok(mut done) => {
                self.scrubber.scrub_json(&mut done.output);
                Ok(done)
            }
            Err(StageError::Retryable(message)) => Err(StageError::Retryable(
                self.scrubber.scrub(&message).into_owned(),
            )),
            Err(StageError::Fatal { code, message }) => Err(StageError::Fatal {
                code,
                message: self.scrubber.scrub(&message).into_owned(),
            }),
            Err(other) => Err(other),
        }
    }

    /// An earlier run's checkpoint for `key`, made this run's own: its files copied into this
    /// run's directory (a hard link or a server-side copy: no bytes pass through the worker) and its output pointing at them. `None` when there is
    /// none, it is this run's, or any of its files is gone.
    async fn reusable(&self, run_id: RunId, key: &str) -> Option<ReusableCheckpoint> {
        let found = match self.store.find_reusable(key).await {
            Ok(Some(found)) if found.run_id != run_id => found,
            Ok(_) => return None,
            Err(error) => {
                warn!(error = %error, "looking up a reusable checkpoint failed; running the stage");
                return None;
            }
        };
        let (from, to) = (format!("runs/{}/", found.run_id), format!("runs/{run_id}/"));
        let mut artifacts = Vec::with_capacity(found.artifacts.len());
        for path in &found.artifacts {
            if !matches!(self.artifacts.is_file(path).await, Ok(true)) {
                info!(source = %found.run_id, missing = %path, "a reusable checkpoint's file is gone; running the stage");
                return None;
            }
            let Some(rest) = path.strip_prefix(&from) else {
                artifacts.push(path.clone());
                continue;
            };
            let own = format!("{to}{rest}");
            if let Err(error) = self.artifacts.copy(path, &own).await {
                warn!(error = %error, "copying a reused file failed; running the stage");
                return None;
            }
            artifacts.push(own);
        }
        let output = serde_json::from_str(&found.output.to_string().replace(&from, &to))
            .unwrap_or(found.output);
        Some(ReusableCheckpoint {
            run_id: found.run_id,
            stage: found.stage,
            output,
            artifacts,
        })
    }

    async fn fail(&self, lease: &Lease, index: usize, error: RunError) -> Ending {
        warn!(stage.index = index, error.code = %error.code, error = %error.message, "run failed");
        self.settle(
            self.store
                .end_attempt(lease, index, StageOutcome::Fail { error })
                .await,
            Ending::Failed,
        )
    }

    /// The ending of a store write that closes the attempt.
    fn settle(&self, written: Result<(), StoreError>, ending: Ending) -> Ending {
        match written {
            Ok(()) => ending,
            Err(error) => self.store_failure(error),
        }
    }

    /// A store error in the middle of a run: a refused fence means someone else owns the run;
    /// anything else leaves the lease to expire, after which the sweeper re-queues the run.
    fn store_failure(&self, error: StoreError) -> Ending {
        match error {
            StoreError::FenceRejected { .. } => Ending::LeaseLost,
            other => {
                warn!(error = %other, "store write failed; the lease will expire and the run be re-queued");
                Ending::StoreFailed
            }
        }
    }
}

/// Renews the lease until aborted; fires `cancel` when a cancel is requested and `lost` when
/// the lease is gone. A worker that cannot prove its lease stops before the lease can expire:
/// when no renewal has succeeded for the lease's time to live less a margin, counted from the
/// moment the last successful request (the claim, then each heartbeat) was sent, `lost` fires
/// at that deadline, even while a heartbeat is still waiting for an answer, which abandons the
/// stage (its subprocesses are killed) and makes the engine write nothing more for the run.
async fn keep_lease(
    store: SharedStore,
    lease: Lease,
    (asked, ttl): (tokio::time::Instant, Duration),
    cancel: CancellationToken,
    lost: CancellationToken,
) {
    let every = renewal_interval(ttl);
    let give_up_after = ttl.saturating_sub(lease_margin(ttl));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    // The store set the lease's expiry after the claim was asked for.
    let mut renewed = asked;
    loop {
        let deadline = renewed + give_up_after;
        let renewal = async {
            ticker.tick().await;
            let sent = tokio::time::Instant::now();
            (
                sent,
                tokio::time::timeout(every, store.heartbeat(&lease, ttl)).await,
            )
        };
        let (sent, answer) = tokio::select! {
            answer = renewal => answer,
            () = tokio::time::sleep_until(deadline) => {
                warn!(
                    unrenewed_ms = renewed.elapsed().as_millis() as u64,
                    lease_ttl_ms = ttl.as_millis() as u64,
                    "the lease could not be renewed; stopping the run before it expires"
                );
                lost.cancel();
                return;
            }
        };
        match answer {
            Ok(Ok(cancel_requested)) => {
                // The store set the new expiry after this request left.
                renewed = sent;
                if cancel_requested {
                    cancel.cancel();
                }
            }
            Ok(Err(StoreError::FenceRejected { .. })) => {
                lost.cancel();
                return;
            }
            Ok(Err(error)) => warn!(error = %error, "heartbeat failed; retrying"),
            Err(_) => warn!(
                timeout_ms = every.as_millis() as u64,
                "heartbeat did not answer; retrying"
            ),
        }
    }
}

/// How often a lease is renewed: four times per time to live, at most once a second.
fn renewal_interval(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// How long before its lease expires an unrenewed worker stops: a fifth of the time to live,
/// at least a renewal interval, so the stage's processes are dead before anyone else may start.
fn lease_margin(ttl: Duration) -> Duration {
    (ttl / 5).max(renewal_interval(ttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unrenewed_worker_stops_well_before_its_lease_expires() {
        for secs in [1, 2, 10, 60] {
            let ttl = Duration::from_secs(secs);
            let stop = ttl - lease_margin(ttl);
            assert!(
                stop > renewal_interval(ttl),
                "{secs}: stops before a renewal"
            );
            assert!(ttl - stop >= renewal_interval(ttl), "{secs}: margin");
        }
    }
}
