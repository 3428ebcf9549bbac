//! Process-local counters and histograms, rendered in the Prometheus text format by
//! `GET /metrics` together with gauges read from the store.

use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A counter with one label.
#[derive(Debug, Default)]
pub struct LabeledCounter(Mutex<BTreeMap<String, u64>>);

impl LabeledCounter {
    pub fn with_label(&self, label: &str) -> LabeledIncrement<'_> {
        LabeledIncrement {
            counter: self,
            label: label.to_owned(),
        }
    }

    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

pub struct LabeledIncrement<'a> {
    counter: &'a LabeledCounter,
    label: String,
}

impl LabeledIncrement<'_> {
    pub fn inc(self) {
        if let Ok(mut map) = self.counter.0.lock() {
            *map.entry(self.label).or_default() += 1;
        }
    }
}

/// Upper bounds of the stage duration histogram, in seconds.
const STAGE_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0, 7200.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: [u64; STAGE_BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub runs_finished: LabeledCounter,
    pub retries: Counter,
    pub lease_recoveries: Counter,
    pub fence_rejections: Counter,
    stage_seconds: Mutex<BTreeMap<String, Histogram>>,
}

impl Metrics {
    pub fn observe_stage(&self, stage: &str, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Ok(mut map) = self.stage_seconds.lock() {
            let histogram = map.entry(stage.to_owned()).or_default();
            for (bucket, bound) in histogram.buckets.iter_mut().zip(STAGE_BUCKETS) {
                if seconds <= bound {
                    *bucket += 1;
                }
            }
            histogram.count += 1;
            histogram.sum += seconds;
        }
    }

    /// Appends this process's metrics to `out`.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP stagecraft_runs_finished_total Runs this process finished, by outcome."
        );
        let _ = writeln!(out, "# TYPE stagecraft_runs_finished_total counter");
        for (outcome, count) in self.runs_finished.snapshot() {
            let _ = writeln!(
                out,
                "stagecraft_runs_finished_total{{outcome=\"{outcome}\"}} {count}"
            );
        }
        for (name, help, counter) in [
            (
                "stagecraft_retries_total",
                "Stage retries this process scheduled.",
                &self.retries,
            ),
            (
                "stagecraft_lease_recoveries_total",
                "Runs this process took over after another worker's lease expired.",
                &self.lease_recoveries,
            ),
            (
                "stagecraft_fencing_rejections_total",
                "Writes refused because this process no longer held the lease.",
                &self.fence_rejections,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", counter.get());
        }
        let _ = writeln!(
            out,
            "# HELP stagecraft_stage_duration_seconds Duration of stage attempts in this process."
        );
        let _ = writeln!(out, "# TYPE stagecraft_stage_duration_seconds histogram");
        let histograms = self
            .stage_seconds
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        for (stage, histogram) in histograms {
            for (count, bound) in histogram.buckets.iter().zip(STAGE_BUCKETS) {
                let _ = writeln!(
                    out,
                    "stagecraft_stage_duration_seconds_bucket{{stage=\"{stage}\",le=\"{bound}\"}} {count}"
                );
            }
            let _ = writeln!(
                out,
                "stagecraft_stage_duration_seconds_bucket{{stage=\"{stage}\",le=\"+Inf\"}} {}",
                histogram.count
            );
            let _ = writeln!(
                out,
                "stagecraft_stage_duration_seconds_sum{{stage=\"{stage}\"}} {}",
                histogram.sum
            );
            let _ = writeln!(
                out,
                "stagecraft_stage_duration_seconds_count{{stage=\"{stage}\"}} {}",
                histogram.count
            );
        }
    }
}
