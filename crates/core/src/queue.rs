//! Delivery of runs to workers: an apalis worker whose backend claims runs from our store.
//!
//! Invariant: this is the only module that names apalis types.
//!
//! apalis supplies the worker runtime (concurrency, tracing, graceful stop); the backend is
//! ours. Its stream asks the run store for due runs only for the worker's free slots, so claims
//! never pile up in a process, and the claim itself takes the lease. A slot frees as soon as
//! its run's last stage has run, before that stage's checkpoint commit: the claim for the next
//! run then travels to the store with the commit instead of waiting for its answer. apalis's
//! own storages are not used: their retry bookkeeping, per-worker orphan recovery and polling
//! would decide a run's fate instead of the engine.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use apalis::layers::WorkerBuilderExt;
use apalis::prelude::{Task, WorkerBuilder, WorkerContext};
use apalis_core::backend::{Backend, BackendConfig};
use futures::{FutureExt, Stream, StreamExt, stream::BoxStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    engine::Engine,
    ids::WorkerId,
    store::{Claimed, SharedStore, StageOutcome, WorkerInfo},
};

/// How a worker pool claims runs.
#[derive(Debug, Clone)]
pub struct ClaimSettings {
    pub queues: Vec<String>,
    pub lease_ttl: Duration,
    pub poll_interval: Duration,
}

/// The apalis backend: a stream of runs claimed from the store.
struct ClaimBackend {
    claims: BoxStream<'static, Task<Claimed>>,
    stopping: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
#[error("claim backend error")]
pub struct ClaimBackendError;

/// Most runs claimed in one store call.
const MAX_CLAIM_BATCH: usize = 32;

/// A worker's slots: `busy` counts runs handed to the executor whose stages are not done.
#[derive(Default)]
struct Slots {
    busy: AtomicUsize,
    freed: Notify,
}

impl Slots {
    /// The release of one run's slot, callable many times, effective once.
    fn release(self: &Arc<Self>) -> impl Fn() + Clone + Send + use<> {
        let slots = self.clone();
        let released = Arc::new(AtomicBool::new(false));
        move || {
            if !released.swap(true, Ordering::SeqCst) {
                slots.busy.fetch_sub(1, Ordering::SeqCst);
                slots.freed.notify_one();
            }
        }
    }
}

impl ClaimBackend {
    /// The stream claims as many runs at once as there are free slots (so a busy store call
    /// serves many slots), and waits while none is free.
    fn new(
        store: SharedStore,
        worker: WorkerId,
        settings: ClaimSettings,
        stopping: CancellationToken,
        concurrency: usize,
        slots: Arc<Slots>,
    ) -> Self {
        let state = (VecDeque::<Claimed>::new(), 0u32);
        let on_close = stopping.clone();
        let claims = futures::stream::unfold(state, move |(mut buffer, mut failures)| {
            let store = store.clone();
            let worker = worker.clone();
            let settings = settings.clone();
            let stopping = stopping.clone();
            let slots = slots.clone();
            async move {
                loop {
                    if stopping.is_cancelled() {
                        release_unstarted(&store, buffer).await;
                        return None;
                    }
                    if let Some(claimed) = buffer.pop_front() {
                        slots.busy.fetch_add(1, Ordering::SeqCst);
                        return Some((Task::new(claimed), (buffer, failures)));
                    }
                    let free = concurrency.saturating_sub(slots.busy.load(Ordering::SeqCst)).min(MAX_CLAIM_BATCH);
                    if free == 0 {
                        // A release between the load and this wait leaves a permit: no wake-up is lost.
                        tokio::select! {
                            () = slots.freed.notified() => {}
                            () = stopping.cancelled() => {}
                        }
                        continue;
                    }
                    match store.claim(&settings.queues, &worker, settings.lease_ttl, free).await {
                        Ok(claimed) if !claimed.is_empty() => {
                            failures = 0;
                            buffer.extend(claimed);
                        }
                        Ok(_) => {
                            failures = 0;
                            tokio::select! {
                                () = store.wait_for_work(&settings.queues, settings.poll_interval) => {}
                                () = stopping.cancelled() => {}
                            }
                        }
                        Err(error) => {
                            // The store is unreachable: keep trying with a growing pause, never exit.
                            failures = failures.saturating_add(1);
                            let pause = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                            warn!(error = %error, pause_ms = pause.as_millis() as u64, "claim failed; retrying");
                            tokio::select! {
                                () = tokio::time::sleep(pause) => {}
                                () = stopping.cancelled() => {}
                            }
                        }
                    }
                }
            }
        })
        .boxed();
        Self {
            claims,
            stopping: on_close,
        }
    }
}

/// Gives back runs that were claimed but never started because the worker is stopping.
async fn release_unstarted(store: &SharedStore, buffer: VecDeque<Claimed>) {
    for claimed in buffer {
        let first_open = claimed.run.first_open_stage().unwrap_or(0);
        let outcome = StageOutcome::Abandoned;
        if let Err(error) = store.end_attempt(&claimed.lease, first_open, outcome).await {
            warn!(run.id = %claimed.run.id, error = %error, "releasing an unstarted run failed; its lease will expire");
        }
    }
}

impl Backend for ClaimBackend {
    type Task = Task<Claimed>;
    type Error = ClaimBackendError;

    fn poll_ready(
        &mut self,
        _cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        Pin::new(&mut self.claims)
            .poll_next(cx)
            .map(|next| next.map(Ok))
    }

    /// apalis closes the backend once its running tasks are done. A claim may still be on its
    /// way then (the stop came while the store answered it): the stream is driven to its end,
    /// which gives back whatever it claimed, so no run stays leased to a process that is gone.
    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        self.stopping.cancel();
        loop {
            match Pin::new(&mut self.claims).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                // Once stopping, the stream yields no run (it gives them back itself).
                Poll::Ready(Some(task)) => {
                    warn!(run.id = %task.args.run.id, "a run claimed while stopping is left to its lease");
                }
            }
        }
    }
}

impl BackendConfig for ClaimBackend {
    type Args = Claimed;
    type Id = apalis_core::task::task_id::RandomId;
    type Kind = apalis_core::backend::finalize::Ephemeral;
    type Config = ();
    type Layer = tower::layer::util::Identity;

    fn config(&self) -> &Self::Config {
        &()
    }

    fn middleware(&mut self, _worker: &mut WorkerContext) -> Self::Layer {
        tower::layer::util::Identity::new()
    }
}

/// Runs a pool of `concurrency` run executors until `shutdown` fires, then stops claiming,
/// lets running stages finish within the grace period, abandons what is left, and returns.
pub async fn run_workers(
    engine: Arc<Engine>,
    settings: ClaimSettings,
    concurrency: usize,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let slots = Arc::new(Slots::default());
    let backend = ClaimBackend::new(
        engine.store.clone(),
        engine.worker.clone(),
        settings.clone(),
        engine.stopping.clone(),
        concurrency,
        slots.clone(),
    );
    let executor = engine.clone();
    let worker = WorkerBuilder::new(engine.worker.to_string())
        .backend(backend)
        // Our slots limit the runs whose stages execute; a run whose slot is free may still be
        // committing, so apalis's own limit leaves room for one such run per slot.
        .concurrency(concurrency * 2)
        .build(move |claimed: Claimed| {
            let engine = executor.clone();
            let release = slots.release();
            async move {
                let run = claimed.run.id;
                // A panic outside a stage (stages' own are caught by the engine) costs this one
                // run its lease, which expires and is swept; it never stops the worker.
                let executed = std::panic::AssertUnwindSafe(engine.execute(claimed, release.clone()))
                    .catch_unwind()
                    .await;
                if executed.is_err() {
                    tracing::error!(run.id = %run, "executing the run panicked; its lease will expire and the run be re-queued");
                }
                release();
                true
            }
        });
    // Printed, not logged: scripts and tests read readiness from here, whatever the log level.
    crate::announce(&format!("stagecraft: worker {} started", engine.worker));
    info!(worker.id = %engine.worker, queues = ?settings.queues, concurrency, "worker started");
    let presence_stop = CancellationToken::new();
    let presence = tokio::spawn(keep_presence(
        engine.clone(),
        settings.queues.clone(),
        concurrency,
        presence_stop.clone(),
    ));
    let stopping = engine.stopping.clone();
    let abandon = engine.abandon.clone();
    let signal = async move {
        shutdown.cancelled().await;
        info!(
            grace_secs = grace.as_secs(),
            "stopping: no new runs; running stages may finish within the grace period"
        );
        stopping.cancel();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            abandon.cancel();
        });
        Ok::<(), std::io::Error>(())
    };
    let outcome = worker
        .run_until(signal)
        .await
        .map_err(|e| anyhow::anyhow!("worker failed: {e}"));
    presence_stop.cancel();
    let _ = presence.await;
    outcome?;
    info!(worker.id = %engine.worker, "worker stopped");
    Ok(())
}

/// How often a worker reports itself and flushes its metrics.
const PRESENCE_INTERVAL: Duration = Duration::from_secs(2);

/// Registers the worker, refreshes its heartbeat and current runs and flushes its metrics every
/// [`PRESENCE_INTERVAL`] until `stop`, then flushes once more and unregisters.
async fn keep_presence(
    engine: Arc<Engine>,
    queues: Vec<String>,
    concurrency: usize,
    stop: CancellationToken,
) {
    let started_at = chrono::Utc::now();
    let mut ticker = tokio::time::interval(PRESENCE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = ticker.tick() => false,
            () = stop.cancelled() => true,
        };
        let running = engine
            .running
            .lock()
            .map(|r| r.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        let info = WorkerInfo {
            id: engine.worker.clone(),
            queues: queues.clone(),
            concurrency: concurrency as u32,
            started_at,
            last_heartbeat: chrono::Utc::now(),
            running,
        };
        let deltas = engine.metrics.take();
        if let Err(error) = engine.store.add_counters(&deltas).await {
            warn!(error = %error, "flushing metrics failed; keeping them for the next try");
            engine.metrics.restore(deltas);
        }
        let finished = engine.metrics.take_throughput();
        if let Err(error) = engine.store.add_throughput(&finished).await {
            warn!(error = %error, "flushing the queues' history failed; keeping it for the next try");
            engine.metrics.restore_throughput(finished);
        }
        if stopping {
            if let Err(error) = engine.store.unregister_worker(&info.id).await {
                warn!(error = %error, "unregistering the worker failed; it will age out");
            }
            return;
        }
        if let Err(error) = engine.store.worker_heartbeat(&info).await {
            warn!(error = %error, "worker heartbeat failed");
        }
    }
}

/// Re-queues runs with expired leases, and deletes runs, their artifacts and work-order
/// sandboxes past retention, every `interval`, until `shutdown` fires.
/// Deletes the finished runs past retention, one bounded batch per store call, pausing between
/// batches so a long backlog never holds the store's write lock for long.
async fn purge(store: &SharedStore, retention: Duration, shutdown: &CancellationToken) {
    let mut total = 0;
    loop {
        match store.purge_finished(retention).await {
            Ok(deleted) => {
                total += deleted;
                if deleted < crate::store::PURGE_BATCH {
                    break;
                }
            }
            Err(error) => {
                warn!(error = %error, "retention purge failed");
                break;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
            () = shutdown.cancelled() => break,
        }
    }
    if total > 0 {
        info!(runs = total, "deleted finished runs past retention");
    }
}

/// Re-queues runs whose lease expired, at every tick; every ten minutes, deletes finished runs
/// past retention, the artifact directories of runs that are gone, and lets each tenant clean up
/// what it keeps.
pub async fn run_sweeper(
    store: SharedStore,
    interval: Duration,
    retention: Duration,
    artifacts: Option<crate::artifacts::ArtifactStore>,
    modules: crate::module::Modules,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_purge: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match store.sweep_expired_leases().await {
            Ok(recovered) if !recovered.is_empty() => {
                info!(runs = recovered.len(), ids = ?recovered, "re-queued runs whose lease expired");
            }
            Ok(_) => {}
            Err(error) => warn!(error = %error, "lease sweep failed"),
        }
        if last_purge.is_none_or(|at| at.elapsed() >= Duration::from_secs(600)) {
            last_purge = Some(tokio::time::Instant::now());
            purge(&store, retention, &shutdown).await;
            housekeeping(&store, retention, artifacts.as_ref(), &modules).await;
        }
    }
}

/// The artifact directories of runs that are gone, stale workspaces, then each tenant's own
/// files.
async fn housekeeping(
    store: &SharedStore,
    retention: Duration,
    artifacts: Option<&crate::artifacts::ArtifactStore>,
    modules: &crate::module::Modules,
) {
    let gone_runs = match artifacts {
        Some(artifacts) => crate::artifacts::clean_gone_runs(store, artifacts).await,
        None => Vec::new(),
    };
    if !gone_runs.is_empty() {
        info!(
            runs = gone_runs.len(),
            "deleted the artifacts of runs past retention"
        );
    }
    // Workspaces of killed processes; a live one is never this old.
    let stale = match artifacts {
        Some(artifacts) => {
            artifacts
                .clean_scratch(Duration::from_secs(24 * 3600))
                .await
        }
        None => 0,
    };
    if stale > 0 {
        info!(
            workspaces = stale,
            "deleted workspaces left by stopped processes"
        );
    }
    let work = crate::module::Housekeeping {
        store,
        retention,
        artifacts,
        gone_runs: &gone_runs,
    };
    for module in modules.iter() {
        let cleaned = module.housekeeping(&work).await;
        if cleaned > 0 {
            info!(
                module = module.name(),
                runs = cleaned,
                "deleted files of runs past retention"
            );
        }
    }
}
