//! Rows as records: what a row of `runs`, `stages` or their JSON columns decodes to, with
//! every stored value checked (an unknown status or provider mode is corruption, never a
//! default).

use serde_json::Value;
use sqlx::{Row, sqlite::SqliteRow};
use stagecraft_core::{
    ids::{FenceToken, RunId},
    money::Usd,
    store::{
        Progress, ProviderMode, RunKind, RunRecord, RunStatus, StageRecord, StageStatus,
        StoreError, StoreResult, to_datetime,
    },
};

use crate::Db;

pub(crate) fn json_text(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    text: Option<String>,
    what: &str,
) -> StoreResult<Option<T>> {
    match text {
        None => Ok(None),
        Some(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("{what}: {e}"))),
    }
}

/// A run with its stages and the sequence number of its last event, read on `conn` (a read
/// transaction, or a write transaction that may hold it uncommitted).
pub(crate) async fn read_run(
    conn: &mut sqlx::SqliteConnection,
    id: RunId,
) -> StoreResult<Option<RunRecord>> {
    let row = sqlx::query(
        "SELECT *, (SELECT COALESCE(MAX(seq), 0) FROM events e WHERE e.run_id = runs.id) AS event_seq \
         FROM runs WHERE id = ?",
    )
    .bind(id.to_string())
    .fetch_optional(&mut *conn)
    .await.db()?;
    let Some(row) = row else { return Ok(None) };
    let mut run = run_from_row(&row)?;
    run.event_seq = row.try_get("event_seq").db()?;
    let stages = sqlx::query("SELECT * FROM stages WHERE run_id = ? ORDER BY idx")
        .bind(id.to_string())
        .fetch_all(&mut *conn)
        .await
        .db()?;
    run.stages = stages
        .iter()
        .map(stage_from_row)
        .collect::<StoreResult<_>>()?;
    Ok(Some(run))
}

pub(crate) fn run_from_row(row: &SqliteRow) -> StoreResult<RunRecord> {
    let id: String = row.try_get("id").db()?;
    let kind: String = row.try_get("kind").db()?;
    let status: String = row.try_get("status").db()?;
    let mode: String = row.try_get("provider_mode").db()?;
    Ok(RunRecord {
        id: RunId::parse(&id).ok_or_else(|| StoreError::Corrupt(format!("run id {id}")))?,
        kind: RunKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("run kind {kind}")))?,
        name: row.try_get("name").db()?,
        queue: row.try_get("queue").db()?,
        inputs: parse_json(Some(row.try_get("inputs").db()?), "inputs")?.unwrap_or(Value::Null),
        status: RunStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("run status {status}")))?,
        provider_mode: ProviderMode::parse(&mode)
            .ok_or_else(|| StoreError::Corrupt(format!("provider mode {mode}")))?,
        budget_usd: row
            .try_get::<Option<i64>, _>("budget_micros")
            .db()?
            .map(Usd::from_micros),
        cost_usd: Usd::from_micros(row.try_get("cost_micros").db()?),
        current_stage: row.try_get("current_stage").db()?,
        result: parse_json(row.try_get("result").db()?, "result")?,
        error: parse_json(row.try_get("error").db()?, "error")?,
        worker: row.try_get("worker").db()?,
        fence: FenceToken(row.try_get("fence").db()?),
        lease_expires_at: row
            .try_get::<Option<i64>, _>("lease_expires_at")
            .db()?
            .map(to_datetime),
        cancel_requested: row.try_get::<i64, _>("cancel_requested").db()? != 0,
        created_at: to_datetime(row.try_get("created_at").db()?),
        updated_at: to_datetime(row.try_get("updated_at").db()?),
        finished_at: row
            .try_get::<Option<i64>, _>("finished_at")
            .db()?
            .map(to_datetime),
        reuse: row.try_get::<i64, _>("reuse").db()? != 0,
        stages: Vec::new(),
        event_seq: 0,
    })
}

pub(crate) fn stage_from_row(row: &SqliteRow) -> StoreResult<StageRecord> {
    let status: String = row.try_get("status").db()?;
    let done: Option<i64> = row.try_get("progress_done").db()?;
    let total: Option<i64> = row.try_get("progress_total").db()?;
    Ok(StageRecord {
        name: row.try_get("name").db()?,
        status: StageStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("stage status {status}")))?,
        attempts: row.try_get::<i64, _>("attempts").db()? as u32,
        started_at: row
            .try_get::<Option<i64>, _>("started_at")
            .db()?
            .map(to_datetime),
        finished_at: row
            .try_get::<Option<i64>, _>("finished_at")
            .db()?
            .map(to_datetime),
        cost_usd: Usd::from_micros(row.try_get("cost_micros").db()?),
        artifacts: parse_json(Some(row.try_get("artifacts").db()?), "artifacts")?
            .unwrap_or_default(),
        output: parse_json(row.try_get("output").db()?, "output")?,
        error: parse_json(row.try_get("error").db()?, "error")?,
        progress: match (done, total) {
            (Some(done), Some(total)) => Some(Progress {
                done: done as u32,
                total: total as u32,
            }),
            _ => None,
        },
        next_attempt_at: row
            .try_get::<Option<i64>, _>("next_attempt_at")
            .db()?
            .map(to_datetime),
        reused_from: row.try_get("reused_from").db()?,
    })
}
