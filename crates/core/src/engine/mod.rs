//! The stage engine: executes one claimed run, stage by stage, under its lease.
//!
//! Invariant: the engine decides what a failure means (retry, fail, cancel); stages only
//! classify their errors as [`StageError`].
//! Invariant: retries are durable: a transient failure stores the time of the next attempt and
//! releases the run, so a crash during the backoff loses nothing and holds no worker slot.
//! Invariant: the engine stops touching a run the moment the store refuses its fencing token.

mod retry;
mod stage;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use futures::FutureExt;
pub use retry::RetryPolicy;
pub use stage::{Stage, StageContext, StageError, StageOutput, StepDone};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::{
    artifacts::ArtifactStore,
    ids::WorkerId,
    metrics::Metrics,
    secrets::Scrubber,
    store::{
        Claimed, Lease, ReusableCheckpoint, RunError, SharedStore, StageCheckpoint, StageOutcome,
        StageStatus, StoreError,
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
    /// Fired when the process begins to stop: no new stage starts, runs are released between
    /// stages.
    pub stopping: CancellationToken,
    /// Fired when the grace period is over: running stages are abandoned and released.
    pub abandon: CancellationToken,
    /// Runs this process is executing now, reported with the worker's heartbeat.
    pub running: std::sync::Mutex<std::collections::BTreeSet<crate::ids::RunId>>,
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
    LeaseLost,
}

impl Engine {
    /// Executes a claimed run until it completes, fails, waits for a retry, is cancelled or
    /// released, or its lease is lost. `stages_done` is called once the run's last stage has
    /// run, just before its checkpoint commit: the worker's slot is free from then on, so the
    /// next run's claim can travel to the store together with that commit.
    pub async fn execute(&self, claimed: Claimed, stages_done: impl FnOnce() + Send) -> Ending {
        let span = info_span!("run", run.id = %claimed.run.id, run.name = %claimed.run.name, fence = claimed.lease.fence.0);
        async move {
            let run_id = claimed.run.id;
            if let Ok(mut running) = self.running.lock() {
                running.insert(run_id);
            }
            let lease = claimed.lease.clone();
            let cancel = CancellationToken::new();
            let lease_lost = CancellationToken::new();
            let heartbeat = tokio::spawn(keep_lease(
                self.store.clone(),
                lease.clone(),
                (claimed.asked, self.settings.lease_ttl),
                cancel.clone(),
                lease_lost.clone(),
            ));
            if claimed.recovered {
                self.metrics.lease_recovered();
            }
            let workflow = self.catalog.get(claimed.run.kind, &claimed.run.name);
            let keeps_metadata = workflow.as_ref().is_some_and(|w| w.keeps_metadata());
            let mut stages_done: Option<Box<dyn FnOnce() + Send + '_>> =
                Some(Box::new(stages_done));
            let ending = self
                .execute_stages(
                    claimed,
                    workflow,
                    &cancel,
                    &lease_lost,
                    keeps_metadata,
                    &mut stages_done,
                )
                .await;
            heartbeat.abort();
            if keeps_metadata && ending != Ending::LeaseLost {
                self.refresh_metadata(run_id).await;
            }
            if ending == Ending::LeaseLost {
                self.metrics.fencing_rejected();
                warn!("lease lost; this worker stopped executing the run");
            }
            if let Ok(mut running) = self.running.lock() {
                running.remove(&run_id);
            }
            info!(ending = ?ending, "run execution ended");
            ending
        }
        .instrument(span)
        .await
    }

    async fn execute_stages(
        &self,
        claimed: Claimed,
        workflow: Option<Arc<dyn Workflow>>,
        cancel: &CancellationToken,
        lease_lost: &CancellationToken,
        keeps_metadata: bool,
        stages_done: &mut Option<Box<dyn FnOnce() + Send + '_>>,
    ) -> Ending {
        let Claimed {
            lease,
            mut run,
            mut started,
            ..
        } = claimed;
        let Some(workflow) = workflow else {
            let error = RunError {
                code: "unknown_workflow".to_owned(),
                message: format!(
                    "no {} named {:?} is known to this worker",
                    run.kind.as_str(),
                    run.name
                ),
            };
            return self.settle(self.store.fail_run(&lease, error).await, Ending::Failed);
        };
        if run.cancel_requested {
            let first_open = run.first_open_stage().unwrap_or(0);
            return self.settle(
                self.store
                    .end_attempt(&lease, first_open, StageOutcome::Cancelled)
                    .await,
                Ending::Cancelled,
            );
        }
        let stages = workflow.stages();
        let same_shape = stages.len() == run.stages.len()
            && stages
                .iter()
                .zip(&run.stages)
                .all(|(stage, record)| stage.name() == record.name);
        if !same_shape {
            let error = RunError {
                code: "workflow_changed".to_owned(),
                message: format!(
                    "the stages of {} changed since this run was submitted (stored: {}; now: {})",
                    run.name,
                    run.stages
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    workflow.stage_names().join(", ")
                ),
            };
            return self.settle(self.store.fail_run(&lease, error).await, Ending::Failed);
        }
        let mut previous = BTreeMap::new();
        for (index, stage) in stages.iter().enumerate() {
            let record = &run.stages[index];
            if record.status == StageStatus::Completed {
                previous.insert(
                    record.name.clone(),
                    record.output.clone().unwrap_or_default(),
                );
                continue;
            }
            if self.stopping.is_cancelled() {
                let outcome = if started.is_some_and(|(i, _)| i == index) {
                    StageOutcome::Unstarted
                } else {
                    StageOutcome::Abandoned
                };
                return self.settle(
                    self.store.end_attempt(&lease, index, outcome).await,
                    Ending::Released,
                );
            }
            // Steps exist only where progress was recorded: skip the read for fresh stages.
            let memo: HashMap<_, _> = if record.progress.is_some() {
                match self.store.steps(run.id, index).await {
                    Ok(steps) => steps.into_iter().map(|s| (s.key.clone(), s)).collect(),
                    Err(error) => return self.store_failure(error),
                }
            } else {
                HashMap::new()
            };
            let mut ctx = StageContext {
                run_id: run.id,
                stage_name: stage.name(),
                stage_index: index,
                attempt: 0,
                inputs: run.inputs.clone(),
                provider_mode: run.provider_mode,
                previous: previous.clone(),
                cancel: cancel.clone(),
                store: self.store.clone(),
                lease: lease.clone(),
                artifacts: self.artifacts.clone(),
                memo,
                step_total: 0,
                written: Vec::new(),
                new_step_cost_usd: 0.0,
                budget_usd: run.budget_usd,
                spent_before_usd: run.cost_usd,
                scrubber: self.scrubber.clone(),
            };
            let reuse_key = stage.reuse_key(&ctx);
            if let (true, Some(key)) = (run.reuse, &reuse_key) {
                if let Some(found) = self.reusable(run.id, key).await {
                    if let Err(error) = self.start_stage(&lease, index, &mut started).await {
                        return self.store_failure(error);
                    }
                    let is_last = index + 1 == stages.len();
                    previous.insert(stage.name().to_owned(), found.output.clone());
                    let checkpoint = StageCheckpoint {
                        output: found.output.clone(),
                        artifacts: found.artifacts.clone(),
                        cost_usd: 0.0,
                        run_result: is_last.then(|| workflow.result(&previous)),
                        reused_from: Some(found.run_id),
                    };
                    if is_last && let Some(done) = stages_done.take() {
                        done();
                    }
                    if let Err(error) = self.store.commit_stage(&lease, index, checkpoint).await {
                        return self.store_failure(error);
                    }
                    info!(stage.name = stage.name(), reused_from = %found.run_id, "stage reused an earlier run's checkpoint");
                    self.offer_for_reuse(key, run.id, stage.name(), found.output, found.artifacts)
                        .await;
                    if is_last {
                        self.metrics.run_finished("completed");
                        return Ending::Completed;
                    }
                    if keeps_metadata {
                        self.refresh_metadata(run.id).await;
                    }
                    continue;
                }
            }
            if let Some(budget) = run.budget_usd {
                let estimate = stage.estimated_cost_usd(&ctx);
                if run.cost_usd + estimate > budget + f64::EPSILON {
                    let error = RunError {
                        code: "budget_exceeded".to_owned(),
                        message: format!(
                            "stage {} is estimated at ${estimate:.2} but only ${:.2} of the ${budget:.2} budget remains",
                            stage.name(),
                            (budget - run.cost_usd).max(0.0)
                        ),
                    };
                    return self.settle(
                        self.store
                            .end_attempt(&lease, index, StageOutcome::Fail { error })
                            .await,
                        Ending::Failed,
                    );
                }
            }
            ctx.attempt = match self.start_stage(&lease, index, &mut started).await {
                Ok(attempt) => attempt,
                Err(error) => return self.store_failure(error),
            };
            if keeps_metadata {
                self.refresh_metadata(run.id).await;
            }
            let policy = stage.retry_policy().unwrap_or(self.settings.default_retry);
            let started = std::time::Instant::now();
            info!(
                stage.name = stage.name(),
                attempt = ctx.attempt,
                "stage started"
            );
            let attempt = std::panic::AssertUnwindSafe(tokio::time::timeout(
                policy.timeout,
                stage.run(&mut ctx),
            ))
            .catch_unwind();
            let result = tokio::select! {
                result = attempt => match result {
                    Ok(Ok(result)) => result,
                    Ok(Err(_elapsed)) => Err(StageError::retryable(format!("stage timed out after {} s", policy.timeout.as_secs_f64()))),
                    Err(_panic) => Err(StageError::fatal("stage_panicked", format!("stage {} panicked", stage.name()))),
                },
                () = cancel.cancelled() => Err(StageError::Cancelled),
                () = lease_lost.cancelled() => return Ending::LeaseLost,
                () = self.abandon.cancelled() => {
                    warn!(stage.name = stage.name(), "grace period over; abandoning the stage");
                    return self.settle(self.store.end_attempt(&lease, index, StageOutcome::Abandoned).await, Ending::Released);
                }
            };
            let elapsed = started.elapsed();
            self.metrics.observe_stage(stage.name(), elapsed);
            match self.vet(stage.name(), result) {
                Ok(done) => {
                    let is_last = index + 1 == stages.len();
                    previous.insert(stage.name().to_owned(), done.output.clone());
                    let run_result = is_last.then(|| workflow.result(&previous));
                    let artifacts = ctx.artifacts();
                    let offered = reuse_key
                        .as_ref()
                        .map(|key| (key.clone(), done.output.clone(), artifacts.clone()));
                    let checkpoint = StageCheckpoint {
                        output: done.output,
                        artifacts,
                        cost_usd: done.cost_usd,
                        run_result,
                        reused_from: None,
                    };
                    if is_last && let Some(done) = stages_done.take() {
                        done();
                    }
                    if let Err(error) = self.store.commit_stage(&lease, index, checkpoint).await {
                        return self.store_failure(error);
                    }
                    if let Some((key, output, artifacts)) = offered {
                        self.offer_for_reuse(&key, run.id, stage.name(), output, artifacts)
                            .await;
                    }
                    if keeps_metadata && !is_last {
                        self.refresh_metadata(run.id).await;
                    }
                    run.cost_usd += done.cost_usd + ctx.new_step_cost_usd;
                    info!(
                        stage.name = stage.name(),
                        duration_ms = elapsed.as_millis() as u64,
                        "stage completed"
                    );
                    if is_last {
                        self.metrics.run_finished("completed");
                        return Ending::Completed;
                    }
                }
                Err(StageError::Retryable(message)) if policy.allows_another_after(ctx.attempt) => {
                    let delay = policy.delay_after(ctx.attempt, &mut rand::rng());
                    warn!(stage.name = stage.name(), attempt = ctx.attempt, delay_ms = delay.as_millis() as u64, error = %message, "stage failed; retry scheduled");
                    self.metrics.retry_scheduled();
                    let error = RunError {
                        code: "stage_error".to_owned(),
                        message,
                    };
                    return self.settle(
                        self.store
                            .end_attempt(&lease, index, StageOutcome::Retry { error, delay })
                            .await,
                        Ending::RetryScheduled,
                    );
                }
                Err(StageError::Retryable(message)) => {
                    let error = RunError {
                        code: "attempts_exhausted".to_owned(),
                        message: format!(
                            "stage {} failed {} times; last error: {message}",
                            stage.name(),
                            ctx.attempt
                        ),
                    };
                    return self.fail(&lease, index, error).await;
                }
                Err(StageError::Fatal { code, message }) => {
                    return self.fail(&lease, index, RunError { code, message }).await;
                }
                Err(StageError::Cancelled) => {
                    self.metrics.run_finished("cancelled");
                    return self.settle(
                        self.store
                            .end_attempt(&lease, index, StageOutcome::Cancelled)
                            .await,
                        Ending::Cancelled,
                    );
                }
                Err(StageError::LeaseLost(_)) => return Ending::LeaseLost,
            }
        }
        // Every stage had a checkpoint yet the run was not completed: the last commit completes
        // the run in the same transaction, so this is an inconsistency. Fail loudly rather than
        // leave the run to be claimed again and again.
        let error = RunError {
            code: "inconsistent_state".to_owned(),
            message: "every stage has a checkpoint but the run was not completed".to_owned(),
        };
        self.settle(self.store.fail_run(&lease, error).await, Ending::Failed)
    }

    /// What a stage handed back, made fit to store: nothing is stored or logged before its
    /// secrets are hidden, and a cost that is not a finite, non-negative amount is an error.
    fn vet(
        &self,
        stage: &str,
        result: Result<StageOutput, StageError>,
    ) -> Result<StageOutput, StageError> {
        match result {
            Ok(done) if !(done.cost_usd.is_finite() && done.cost_usd >= 0.0) => {
                Err(StageError::fatal(
                    "invalid_cost",
                    format!("stage {stage} reported a cost of {}", done.cost_usd),
                ))
            }
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

    /// An earlier run's checkpoint for `key`, made this run's own: its files linked into this
    /// run's directory (no bytes copied) and its output pointing at them. `None` when there is
    /// none, it is this run's, or any of its files is gone.
    async fn reusable(&self, run_id: crate::ids::RunId, key: &str) -> Option<ReusableCheckpoint> {
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
            if !matches!(self.artifacts.regular_file(path), Ok(true)) {
                info!(source = %found.run_id, missing = %path, "a reusable checkpoint's file is gone; running the stage");
                return None;
            }
            let Some(rest) = path.strip_prefix(&from) else {
                artifacts.push(path.clone());
                continue;
            };
            let own = format!("{to}{rest}");
            if let Err(error) = self.artifacts.link(path, &own) {
                warn!(error = %error, "linking a reused file failed; running the stage");
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

    /// Offers a committed checkpoint to later runs; a failure only costs a future reuse.
    async fn offer_for_reuse(
        &self,
        key: &str,
        run_id: crate::ids::RunId,
        stage: &str,
        output: serde_json::Value,
        artifacts: Vec<String>,
    ) {
        let checkpoint = ReusableCheckpoint {
            run_id,
            stage: stage.to_owned(),
            output,
            artifacts,
        };
        if let Err(error) = self.store.record_reusable(key, &checkpoint).await {
            warn!(error = %error, "offering the checkpoint for reuse failed");
        }
    }

    /// Rewrites the run's `metadata.json`; a failure is logged, never fatal to the run.
    async fn refresh_metadata(&self, run_id: crate::ids::RunId) {
        if let Err(error) =
            crate::status::write_metadata(&self.store, &self.artifacts, run_id).await
        {
            warn!(error = %error, "could not update metadata.json");
        }
    }

    /// Starts a stage, unless the claim started it already: then answers that attempt.
    async fn start_stage(
        &self,
        lease: &Lease,
        index: usize,
        started: &mut Option<(usize, u32)>,
    ) -> Result<u32, StoreError> {
        match started.take() {
            Some((i, attempt)) if i == index => Ok(attempt),
            _ => self.store.start_stage(lease, index).await,
        }
    }

    async fn fail(&self, lease: &Lease, index: usize, error: RunError) -> Ending {
        warn!(stage.index = index, error.code = %error.code, error = %error.message, "run failed");
        self.metrics.run_finished("failed");
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
                Ending::LeaseLost
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
