//! The tools a tenant needs (the studio's ffmpeg), as `/health` reports them, cheap enough to
//! poll.
//!
//! Invariant: a `/health` request never spawns a process. A tool is probed once at start-up and
//! again at most once a minute, in the background, when a request finds the answer older.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::FutureExt;
use serde::Serialize;

/// How long a probe's answer is served before a request triggers a new one.
const REFRESH_AFTER: Duration = Duration::from_secs(60);

/// Whether a tool can be run.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ToolStatus {
    pub available: bool,
    /// Its version line, or what is wrong and how to fix it.
    pub detail: String,
}

type Probe =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send + Sync>;

struct Cached {
    status: ToolStatus,
    checked: Instant,
    refreshing: bool,
}

/// A tool's last probed status, refreshed in the background at most once a minute.
#[derive(Clone)]
pub struct ToolCheck {
    cached: Arc<Mutex<Cached>>,
    probe: Probe,
}

impl ToolCheck {
    /// Probes the tool now, and keeps `probe` for the refreshes.
    pub async fn start<F, Fut>(probe: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        let probe: Probe = Arc::new(move || Box::pin(probe()));
        let status = status_of(probe().await);
        Self {
            cached: Arc::new(Mutex::new(Cached {
                status,
                checked: Instant::now(),
                refreshing: false,
            })),
            probe,
        }
    }

    /// The last status; starts a refresh in the background when it is older than a minute.
    pub fn status(&self) -> ToolStatus {
        let Ok(mut cached) = self.cached.lock() else {
            return ToolStatus {
                available: false,
                detail: "the tool check is unavailable".to_owned(),
            };
        };
        if cached.checked.elapsed() >= REFRESH_AFTER && !cached.refreshing {
            cached.refreshing = true;
            let (slot, probe) = (self.cached.clone(), self.probe.clone());
            tokio::spawn(async move {
                // A probe that panics counts as a failed check (and the next one is tried).
                let probed = std::panic::AssertUnwindSafe(probe()).catch_unwind().await;
                let status =
                    status_of(probed.unwrap_or_else(|_| Err("the check failed".to_owned())));
                if let Ok(mut cached) = slot.lock() {
                    *cached = Cached {
                        status,
                        checked: Instant::now(),
                        refreshing: false,
                    };
                }
            });
        }
        cached.status.clone()
    }
}

fn status_of(probed: Result<String, String>) -> ToolStatus {
    match probed {
        Ok(detail) => ToolStatus {
            available: true,
            detail,
        },
        Err(detail) => ToolStatus {
            available: false,
            detail,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_probe_runs_at_most_once_a_minute() {
        let probes = Arc::new(AtomicUsize::new(0));
        let counter = probes.clone();
        let check = ToolCheck::start(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok(format!("version {n}")) }
        })
        .await;
        for _ in 0..300 {
            assert_eq!(check.status().detail, "version 0");
        }
        assert_eq!(probes.load(Ordering::SeqCst), 1);
    }
}
