//! Rows as records: what a row of `runs`, `stages` or their JSON columns decodes to, with
//! every stored value checked (an unknown status or provider mode is corruption, never a
//! default).

use sqlx::{Row, sqlite::SqliteRow};
use stagecraft_core::{
    ids::RunId,
    store::{
        RunRecord, StageRecord, StoreResult,
        stored::{StoredRun, StoredStage},
    },
};

use crate::Db;

pub(crate) use stagecraft_core::store::stored::{json_text, parse_json};

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

/// A row of `runs` (SQLite keeps booleans as integers).
pub(crate) fn run_from_row(row: &SqliteRow) -> StoreResult<RunRecord> {
    StoredRun {
        id: row.try_get("id").db()?,
        kind: row.try_get("kind").db()?,
        name: row.try_get("name").db()?,
        queue: row.try_get("queue").db()?,
        inputs: row.try_get("inputs").db()?,
        status: row.try_get("status").db()?,
        provider_mode: row.try_get("provider_mode").db()?,
        budget_micros: row.try_get("budget_micros").db()?,
        cost_micros: row.try_get("cost_micros").db()?,
        current_stage: row.try_get("current_stage").db()?,
        result: row.try_get("result").db()?,
        error: row.try_get("error").db()?,
        worker: row.try_get("worker").db()?,
        fence: row.try_get("fence").db()?,
        lease_expires_at: row.try_get("lease_expires_at").db()?,
        cancel_requested: row.try_get::<i64, _>("cancel_requested").db()? != 0,
        created_at: row.try_get("created_at").db()?,
        updated_at: row.try_get("updated_at").db()?,
        finished_at: row.try_get("finished_at").db()?,
        reuse: row.try_get::<i64, _>("reuse").db()? != 0,
    }
    .into_record()
}

/// A row of `stages`.
pub(crate) fn stage_from_row(row: &SqliteRow) -> StoreResult<StageRecord> {
    StoredStage {
        name: row.try_get("name").db()?,
        status: row.try_get("status").db()?,
        attempts: row.try_get("attempts").db()?,
        started_at: row.try_get("started_at").db()?,
        finished_at: row.try_get("finished_at").db()?,
        cost_micros: row.try_get("cost_micros").db()?,
        artifacts: row.try_get("artifacts").db()?,
        output: row.try_get("output").db()?,
        error: row.try_get("error").db()?,
        progress_done: row.try_get("progress_done").db()?,
        progress_total: row.try_get("progress_total").db()?,
        next_attempt_at: row.try_get("next_attempt_at").db()?,
        reused_from: row.try_get("reused_from").db()?,
    }
    .into_record()
}
