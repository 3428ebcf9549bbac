//! Long-lived requests, bounded: event streams and synchronous waits.
//!
//! Each API process serves at most `MAX_EVENT_STREAMS` event streams and `MAX_SYNC_WAITS`
//! synchronous submits at once; one more is refused at once with 503 `overloaded` and a
//! `Retry-After`, so a crowd of waiting clients can never take the memory, file descriptors or
//! store capacity that submissions need.
//!
//! Invariant: open streams and waits never poll the store themselves. One watcher task per
//! process asks the store, every [`WATCH_INTERVAL`], where each watched run's event log ends and
//! whether the run has finished (one batched call whatever the number of runs and clients), and
//! wakes the clients of the runs that moved; a client then reads only its new events.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::ApiError;
use crate::{
    config::Config,
    ids::RunId,
    store::{RunPosition, SharedStore},
};

/// How often the watcher asks the store about the watched runs.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// Most runs asked about in one store call.
const WATCH_BATCH: usize = 500;

/// A watched run as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watched {
    /// The sequence number of the run's last event, `None` until the watcher first asked.
    pub last_event: Option<i64>,
    /// The run has finished (or no longer exists): its event log will not grow.
    pub finished: bool,
}

/// The per-process caps and the shared run watcher.
#[derive(Clone)]
pub struct Limits {
    streams: Arc<Semaphore>,
    waits: Arc<Semaphore>,
    watcher: Arc<Watcher>,
}

impl Limits {
    pub fn new(config: &Config, store: SharedStore) -> Self {
        Self {
            streams: Arc::new(Semaphore::new(config.max_event_streams)),
            waits: Arc::new(Semaphore::new(config.max_sync_waits)),
            watcher: Watcher::start(store),
        }
    }

    /// A slot for one event stream, held as long as the stream is open.
    pub fn event_stream(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded {
                message: "this API process serves as many event streams as it may \
                          (MAX_EVENT_STREAMS); try again shortly"
                    .to_owned(),
                retry_after_secs: 5,
            })
    }

    /// A slot for one synchronous wait.
    pub fn sync_wait(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.waits
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded {
                message: "this API process holds as many synchronous waits as it may \
                          (MAX_SYNC_WAITS); submit with \"async\": true and poll, or try again \
                          shortly"
                    .to_owned(),
                retry_after_secs: 2,
            })
    }

    /// Follows a run: the receiver changes whenever its event log grows or it finishes.
    pub fn watch(&self, run: RunId) -> watch::Receiver<Watched> {
        self.watcher.subscribe(run)
    }
}

/// The one task per process that asks the store about every watched run.
struct Watcher {
    runs: Mutex<HashMap<RunId, watch::Sender<Watched>>>,
}

impl Watcher {
    fn start(store: SharedStore) -> Arc<Self> {
        let watcher = Arc::new(Self {
            runs: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&watcher);
        tokio::spawn(watch_loop(weak, store));
        watcher
    }

    fn subscribe(&self, run: RunId) -> watch::Receiver<Watched> {
        let initial = Watched {
            last_event: None,
            finished: false,
        };
        match self.runs.lock() {
            Ok(mut runs) => runs
                .entry(run)
                .or_insert_with(|| watch::channel(initial).0)
                .subscribe(),
            // A poisoned map cannot happen (nothing panics while holding it); answer a
            // receiver that says the run is finished, so the client ends instead of hanging.
            Err(_) => {
                watch::channel(Watched {
                    last_event: None,
                    finished: true,
                })
                .1
            }
        }
    }

    /// The runs someone still watches; forgets the others.
    fn watched(&self) -> Vec<RunId> {
        let Ok(mut runs) = self.runs.lock() else {
            return Vec::new();
        };
        runs.retain(|_, sender| sender.receiver_count() > 0);
        runs.keys().copied().collect()
    }

    fn publish(&self, positions: &[RunPosition], asked: &[RunId]) {
        let Ok(runs) = self.runs.lock() else { return };
        for id in asked {
            let Some(sender) = runs.get(id) else { continue };
            // A run the store no longer has is finished for its watchers.
            let now = positions.iter().find(|p| p.run_id == *id).map_or(
                Watched {
                    last_event: Some(0),
                    finished: true,
                },
                |p| Watched {
                    last_event: Some(p.last_event_seq),
                    finished: p.finished,
                },
            );
            sender.send_if_modified(|seen| {
                let changed = *seen != now;
                *seen = now;
                changed
            });
        }
    }
}

async fn watch_loop(watcher: Weak<Watcher>, store: SharedStore) {
    let mut ticker = tokio::time::interval(WATCH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(watcher) = watcher.upgrade() else {
            return;
        };
        let runs = watcher.watched();
        for batch in runs.chunks(WATCH_BATCH) {
            match store.run_positions(batch).await {
                Ok(positions) => watcher.publish(&positions, batch),
                // Clients keep what they saw; the next tick asks again.
                Err(error) => tracing::warn!(error = %error, "watching runs failed"),
            }
        }
    }
}
