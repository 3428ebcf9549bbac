//! Metrics. Each process counts what it does in a [`Metrics`]; workers flush those counts into
//! the store every few seconds, so `GET /metrics` on any API process shows the whole
//! deployment: cluster-wide counters and histograms from the store, and gauges (runs by queue and
//! status, live workers) read from it at scrape time.

use std::{collections::BTreeMap, fmt::Write, sync::Mutex, time::Duration};

use chrono::{DateTime, Utc};

use crate::store::{QueueDepth, RunStatus, Throughput, WorkerInfo};

/// Upper bounds of the stage duration histogram, in seconds.
const STAGE_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0, 7200.0,
];

/// Metric families: name, type, help.
const FAMILIES: [(&str, &str, &str); 7] = [
    (
        "stagecraft_runs_finished_total",
        "counter",
        "Runs finished, by outcome.",
    ),
    (
        "stagecraft_stage_retries_total",
        "counter",
        "Stage retries scheduled after transient failures.",
    ),
    (
        "stagecraft_lease_recoveries_total",
        "counter",
        "Runs taken over after their worker's lease expired.",
    ),
    (
        "stagecraft_fencing_rejections_total",
        "counter",
        "Runs a worker stopped because its lease was no longer current.",
    ),
    (
        "stagecraft_store_failures_total",
        "counter",
        "Runs a worker stopped because a store write failed (the lease then expires).",
    ),
    (
        "stagecraft_stage_executions_total",
        "counter",
        "Stage attempts executed, by stage.",
    ),
    (
        "stagecraft_stage_duration_seconds",
        "histogram",
        "Duration of stage attempts.",
    ),
];

/// How a run finished, as the `outcome` label of `stagecraft_runs_finished_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Completed,
    Failed,
    Cancelled,
}

impl RunOutcome {
    /// The label's value: frozen, dashboards select on it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Counts not yet flushed to the store: plain counters by sample name (`family{labels}`), and
/// stage durations as one histogram per stage, expanded into samples only when taken, so that
/// observing a stage is a few additions rather than formatting a sample name per bucket.
#[derive(Debug, Default)]
pub struct Metrics {
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    counters: BTreeMap<String, f64>,
    stages: BTreeMap<String, StageHistogram>,
    /// Finished runs by queue and minute (milliseconds of its start).
    throughput: BTreeMap<(String, i64), Throughput>,
}

/// Observations of one stage: how many fell in each bucket (not cumulative), their sum and count.
#[derive(Debug, Default)]
struct StageHistogram {
    buckets: [u64; STAGE_BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Metrics {
    fn add(&self, sample: String, amount: f64) {
        if let Ok(mut pending) = self.pending.lock() {
            *pending.counters.entry(sample).or_default() += amount;
        }
    }

    /// A run of `queue` finished at `at`: counted by outcome, and in the queue's history.
    pub fn run_finished(&self, queue: &str, outcome: RunOutcome, at: DateTime<Utc>) {
        let at = at.timestamp_millis();
        let minute = at - at.rem_euclid(60_000);
        if let Ok(mut pending) = self.pending.lock() {
            let count = pending
                .throughput
                .entry((queue.to_owned(), minute))
                .or_insert_with(|| Throughput {
                    queue: queue.to_owned(),
                    minute: crate::store::to_datetime(minute),
                    ..Throughput::default()
                });
            match outcome {
                RunOutcome::Completed => count.completed += 1,
                RunOutcome::Failed => count.failed += 1,
                RunOutcome::Cancelled => count.cancelled += 1,
            }
        }
        self.add(
            format!(
                "stagecraft_runs_finished_total{{outcome=\"{}\"}}",
                outcome.as_str()
            ),
            1.0,
        );
    }

    pub fn store_failed(&self) {
        self.add("stagecraft_store_failures_total".to_owned(), 1.0);
    }

    pub fn retry_scheduled(&self) {
        self.add("stagecraft_stage_retries_total".to_owned(), 1.0);
    }

    pub fn lease_recovered(&self) {
        self.add("stagecraft_lease_recoveries_total".to_owned(), 1.0);
    }

    pub fn fencing_rejected(&self) {
        self.add("stagecraft_fencing_rejections_total".to_owned(), 1.0);
    }

    pub fn observe_stage(&self, stage: &str, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        if !pending.stages.contains_key(stage) {
            pending
                .stages
                .insert(stage.to_owned(), StageHistogram::default());
        }
        if let Some(histogram) = pending.stages.get_mut(stage) {
            if let Some(bucket) = STAGE_BUCKETS.iter().position(|bound| seconds <= *bound) {
                histogram.buckets[bucket] += 1;
            }
            histogram.sum += seconds;
            histogram.count += 1;
        }
    }

    /// Takes the counts accumulated since the last call, as sample deltas (histogram buckets
    /// cumulative, as Prometheus has them).
    pub fn take(&self) -> Vec<(String, f64)> {
        let Ok(mut pending) = self.pending.lock() else {
            return Vec::new();
        };
        let Pending {
            counters,
            stages,
            throughput,
        } = std::mem::take(&mut *pending);
        pending.throughput = throughput;
        drop(pending);
        let mut samples: Vec<(String, f64)> = counters.into_iter().collect();
        for (stage, histogram) in stages {
            let count = histogram.count as f64;
            samples.push((
                format!("stagecraft_stage_executions_total{{stage=\"{stage}\"}}"),
                count,
            ));
            let mut cumulative = 0;
            for (bound, n) in STAGE_BUCKETS.iter().zip(histogram.buckets) {
                cumulative += n;
                if cumulative > 0 {
                    samples.push((
                        format!("stagecraft_stage_duration_seconds_bucket{{stage=\"{stage}\",le=\"{bound}\"}}"),
                        cumulative as f64,
                    ));
                }
            }
            samples.push((
                format!(
                    "stagecraft_stage_duration_seconds_bucket{{stage=\"{stage}\",le=\"+Inf\"}}"
                ),
                count,
            ));
            samples.push((
                format!("stagecraft_stage_duration_seconds_sum{{stage=\"{stage}\"}}"),
                histogram.sum,
            ));
            samples.push((
                format!("stagecraft_stage_duration_seconds_count{{stage=\"{stage}\"}}"),
                count,
            ));
        }
        samples
    }

    /// Takes the finished runs by queue and minute counted since the last call.
    pub fn take_throughput(&self) -> Vec<Throughput> {
        self.pending
            .lock()
            .map(|mut pending| {
                std::mem::take(&mut pending.throughput)
                    .into_values()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Puts history back after a failed flush, so none is lost.
    pub fn restore_throughput(&self, counts: Vec<Throughput>) {
        if let Ok(mut pending) = self.pending.lock() {
            for count in counts {
                let key = (count.queue.clone(), count.minute.timestamp_millis());
                let entry = pending.throughput.entry(key).or_insert_with(|| Throughput {
                    completed: 0,
                    failed: 0,
                    cancelled: 0,
                    ..count.clone()
                });
                entry.completed += count.completed;
                entry.failed += count.failed;
                entry.cancelled += count.cancelled;
            }
        }
    }

    /// Puts counts back after a failed flush, so none is lost.
    pub fn restore(&self, deltas: Vec<(String, f64)>) {
        for (sample, amount) in deltas {
            self.add(sample, amount);
        }
    }
}

/// The Prometheus text exposition of the deployment.
pub fn render(counters: &[(String, f64)], depths: &[QueueDepth], workers: &[WorkerInfo]) -> String {
    let mut out = String::new();
    render_gauges(&mut out, depths, workers);
    for (family, kind, help) in FAMILIES {
        render_family(&mut out, (family, kind, help), counters);
    }
    out
}

fn header(out: &mut String, family: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {family} {help}");
    let _ = writeln!(out, "# TYPE {family} {kind}");
}

/// The gauges read from the store at scrape time: runs by queue and status, waiting runs by
/// queue, live workers.
fn render_gauges(out: &mut String, depths: &[QueueDepth], workers: &[WorkerInfo]) {
    header(
        out,
        "stagecraft_runs",
        "gauge",
        "Runs in the store, by queue and status.",
    );
    for depth in depths {
        let _ = writeln!(
            out,
            "stagecraft_runs{{queue=\"{}\",status=\"{}\"}} {}",
            depth.queue,
            depth.status.as_str(),
            depth.count
        );
    }
    header(
        out,
        "stagecraft_queue_depth",
        "gauge",
        "Runs waiting to be claimed (queued or retrying), by queue.",
    );
    let mut waiting: BTreeMap<&str, u64> = BTreeMap::new();
    for depth in depths {
        if matches!(depth.status, RunStatus::Queued | RunStatus::Retrying) {
            *waiting.entry(depth.queue.as_str()).or_default() += depth.count;
        }
    }
    for (queue, count) in waiting {
        let _ = writeln!(out, "stagecraft_queue_depth{{queue=\"{queue}\"}} {count}");
    }
    header(
        out,
        "stagecraft_workers_live",
        "gauge",
        "Worker processes with a recent heartbeat.",
    );
    let _ = writeln!(out, "stagecraft_workers_live {}", workers.len());
}

/// One family of the counters workers flushed (a histogram's samples are its `_bucket`, `_sum`
/// and `_count`); an unlabelled counter nobody incremented yet is shown as 0.
fn render_family(
    out: &mut String,
    (family, kind, help): (&str, &str, &str),
    counters: &[(String, f64)],
) {
    header(out, family, kind, help);
    let mut any = false;
    for (sample, value) in counters {
        let name = sample.split('{').next().unwrap_or(sample);
        let belongs = name == family
            || (kind == "histogram"
                && name.starts_with(family)
                && name[family.len()..].starts_with('_'));
        if belongs {
            any = true;
            let _ = writeln!(out, "{sample} {value}");
        }
    }
    let unlabelled = !matches!(
        family,
        "stagecraft_runs_finished_total" | "stagecraft_stage_executions_total"
    );
    if !any && kind == "counter" && unlabelled {
        let _ = writeln!(out, "{family} 0");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_observations_fill_cumulative_buckets() {
        let metrics = Metrics::default();
        metrics.observe_stage("one", Duration::from_millis(30));
        metrics.retry_scheduled();
        let taken: BTreeMap<String, f64> = metrics.take().into_iter().collect();
        assert!(
            !taken.contains_key(
                "stagecraft_stage_duration_seconds_bucket{stage=\"one\",le=\"0.01\"}"
            )
        );
        assert_eq!(
            taken["stagecraft_stage_duration_seconds_bucket{stage=\"one\",le=\"0.05\"}"],
            1.0
        );
        assert_eq!(
            taken["stagecraft_stage_duration_seconds_bucket{stage=\"one\",le=\"+Inf\"}"],
            1.0
        );
        assert_eq!(taken["stagecraft_stage_retries_total"], 1.0);
        assert!(metrics.take().is_empty(), "take drains");
        let text = render(&taken.into_iter().collect::<Vec<_>>(), &[], &[]);
        assert!(text.contains("# TYPE stagecraft_stage_duration_seconds histogram"));
        assert!(text.contains("stagecraft_stage_retries_total 1"));
        assert!(text.contains("stagecraft_lease_recoveries_total 0"));
        assert!(text.contains("stagecraft_workers_live 0"));
    }
}
