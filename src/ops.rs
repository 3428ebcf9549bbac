//! Operator commands that read and change the store directly, on either backend:
//! `stagecraft inspect …` and `stagecraft retry`.

use std::fmt::Write;

use anyhow::Context;
use serde_json::json;

use crate::{
    ids::RunId,
    store::{FromStage, ResumeChanges, RunFilter, RunRecord, RunStatus, RunStore},
};

/// What `stagecraft inspect` shows.
#[derive(Debug, clap::Subcommand)]
pub enum Inspect {
    /// Runs by queue and status.
    Queues,
    /// Live worker processes.
    Workers,
    /// Runs, newest first.
    Runs {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One run: its status document and events.
    Run { run_id: String },
    /// Failed runs (attempts exhausted or permanent errors), which `retry` re-queues.
    Dead {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

fn parse_id(text: &str) -> anyhow::Result<RunId> {
    RunId::parse(text).with_context(|| format!("{text:?} is not a run id"))
}

fn summary(run: &RunRecord) -> serde_json::Value {
    json!({
        "run_id": run.id.to_string(),
        "kind": run.kind.as_str(),
        "name": run.name,
        "status": run.status.as_str(),
        "current_stage": run.current_stage,
        "last_completed_stage": run.last_completed_stage(),
        "cost_usd": run.cost_usd,
        "error": run.error,
        "worker": run.worker,
        "created_at": run.created_at,
        "updated_at": run.updated_at,
    })
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_uppercase()).collect(), &mut out);
    for row in rows {
        line(row, &mut out);
    }
    out
}

async fn list(
    store: &dyn RunStore,
    status: Option<RunStatus>,
    limit: u32,
) -> anyhow::Result<(Vec<RunRecord>, u64)> {
    let filter = RunFilter {
        status,
        limit: limit.clamp(1, 500),
        ..RunFilter::default()
    };
    let page = store.list_runs(&filter).await?;
    Ok((page.runs, page.total))
}

fn runs_table(runs: &[RunRecord], total: u64) -> String {
    let rows = runs
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.name.clone(),
                r.status.as_str().to_owned(),
                r.current_stage
                    .clone()
                    .or_else(|| r.last_completed_stage().map(str::to_owned))
                    .unwrap_or_default(),
                r.error.as_ref().map(|e| e.code.clone()).unwrap_or_default(),
                r.updated_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            ]
        })
        .collect();
    format!(
        "{}({} of {total})\n",
        table(
            &["run", "name", "status", "stage", "error", "updated"],
            rows
        ),
        runs.len()
    )
}

/// `stagecraft inspect …`: prints what the store holds, as tables or (with `--json`) JSON.
pub async fn inspect(store: &dyn RunStore, what: Inspect, as_json: bool) -> anyhow::Result<()> {
    let text = match what {
        Inspect::Queues => queues(store, as_json).await?,
        Inspect::Workers => workers(store, as_json).await?,
        Inspect::Runs { status, limit } => {
            let status = match status {
                Some(s) => {
                    Some(RunStatus::parse(&s).with_context(|| format!("unknown status {s:?}"))?)
                }
                None => None,
            };
            runs(store, status, limit, as_json).await?
        }
        Inspect::Dead { limit } => runs(store, Some(RunStatus::Failed), limit, as_json).await?,
        Inspect::Run { run_id } => run(store, &run_id, as_json).await?,
    };
    print!("{text}");
    if !text.ends_with('\n') {
        println!();
    }
    Ok(())
}

/// Dollars rounded to cents, as operators read them (the store keeps micro-dollars).
fn cents(usd: crate::money::Usd) -> String {
    format!("${:.2}", usd.dollars())
}

async fn queues(store: &dyn RunStore, as_json: bool) -> anyhow::Result<String> {
    let depths = store.queue_depths().await?;
    if as_json {
        return Ok(serde_json::to_string_pretty(&json!({"queues": depths}))?);
    }
    let rows = depths
        .iter()
        .map(|d| {
            vec![
                d.queue.clone(),
                d.status.as_str().to_owned(),
                d.count.to_string(),
            ]
        })
        .collect();
    Ok(table(&["queue", "status", "runs"], rows))
}

async fn workers(store: &dyn RunStore, as_json: bool) -> anyhow::Result<String> {
    let workers = store.list_workers().await?;
    if as_json {
        return Ok(serde_json::to_string_pretty(&json!({"workers": workers}))?);
    }
    let rows = workers
        .iter()
        .map(|w| {
            vec![
                w.id.to_string(),
                w.queues.join(","),
                w.concurrency.to_string(),
                w.last_heartbeat.format("%H:%M:%S").to_string(),
                w.running.join(","),
            ]
        })
        .collect();
    Ok(table(
        &["worker", "queues", "concurrency", "heartbeat", "running"],
        rows,
    ))
}

async fn runs(
    store: &dyn RunStore,
    status: Option<RunStatus>,
    limit: u32,
    as_json: bool,
) -> anyhow::Result<String> {
    let (runs, total) = list(store, status, limit).await?;
    if as_json {
        let runs: Vec<_> = runs.iter().map(summary).collect();
        return Ok(serde_json::to_string_pretty(
            &json!({"runs": runs, "total": total}),
        )?);
    }
    Ok(runs_table(&runs, total))
}

async fn run(store: &dyn RunStore, run_id: &str, as_json: bool) -> anyhow::Result<String> {
    let id = parse_id(run_id)?;
    let run = store
        .get_run(id)
        .await?
        .with_context(|| format!("run {id} not found"))?;
    let events = store.events_after(id, 0, 10_000).await?;
    if as_json {
        let mut doc = summary(&run);
        doc["inputs"] = run.inputs.clone();
        doc["stages"] = serde_json::to_value(&run.stages)?;
        doc["result"] = run.result.clone().unwrap_or_default();
        doc["events"] = serde_json::to_value(&events)?;
        return Ok(serde_json::to_string_pretty(&doc)?);
    }
    let mut out = format!(
        "run {}  {} {}  status {}  cost {}  worker {}\n",
        run.id,
        run.kind.as_str(),
        run.name,
        run.status.as_str(),
        cents(run.cost_usd),
        run.worker.as_deref().unwrap_or("-")
    );
    if let Some(error) = &run.error {
        let _ = writeln!(out, "error {}: {}", error.code, error.message);
    }
    let rows = run
        .stages
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.status.as_str().to_owned(),
                s.attempts.to_string(),
                cents(s.cost_usd),
                s.progress
                    .map(|p| format!("{}/{}", p.done, p.total))
                    .unwrap_or_default(),
                s.artifacts.len().to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &["stage", "status", "attempts", "cost", "steps", "artifacts"],
        rows,
    ));
    let _ = writeln!(out, "\nevents:");
    for event in events {
        let _ = writeln!(
            out,
            "  {:>4}  {}  {:<16} {:<10} {}",
            event.seq,
            event.at.format("%H:%M:%S%.3f"),
            event.kind,
            event.stage.unwrap_or_default(),
            event.data
        );
    }
    Ok(out)
}

/// Re-queues a failed (or cancelled) run from its first stage without a checkpoint.
pub async fn retry(store: &dyn RunStore, run_id: &str) -> anyhow::Result<()> {
    let id = parse_id(run_id)?;
    let run = store
        .resume(id, FromStage::Auto, ResumeChanges::default())
        .await?;
    println!("{}", serde_json::to_string_pretty(&summary(&run))?);
    Ok(())
}
