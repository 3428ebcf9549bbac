//! Rows as records: what a row of `runs`, `stages` or their JSON columns decodes to, with
//! every stored value checked (an unknown status or provider mode, a negative count, is
//! corruption, never a default).

use serde_json::Value;
use sqlx::{PgConnection, Row, postgres::PgRow};
use stagecraft_core::{
    ids::RunId,
    store::{
        RunRecord, StageRecord, StoreResult,
        stored::{StoredRun, StoredStage},
    },
};

use crate::{Db, Sql};

pub(crate) use stagecraft_core::store::stored::{count, json_text, parse_json, run_id};

/// The text the input search matches for these inputs: the string and number values inside
/// them, one per line, never a key (as [`stagecraft_core::store::inputs_contain`] looks at
/// them). NUL characters, which PostgreSQL text cannot hold, are left out.
pub fn search_text(inputs: &Value) -> String {
    fn walk(value: &Value, words: &mut Vec<String>) {
        match value {
            Value::String(s) => words.push(s.replace('\0', "")),
            Value::Number(n) => words.push(n.to_string()),
            Value::Array(items) => items.iter().for_each(|v| walk(v, words)),
            Value::Object(map) => map.values().for_each(|v| walk(v, words)),
            Value::Bool(_) | Value::Null => {}
        }
    }
    let mut words = Vec::new();
    walk(inputs, &mut words);
    words.join("\n")
}

/// A run with its stages and the sequence number of its last event, read on `conn` (a
/// repeatable-read transaction, or a write transaction that holds the run's row).
pub(crate) async fn read_run(
    sql: Sql,
    conn: &mut PgConnection,
    id: RunId,
) -> StoreResult<Option<RunRecord>> {
    let row = sql
        .query(concat!(
            "SELECT ",
            run_columns!(),
            ", (SELECT COALESCE(MAX(seq), 0) FROM events e WHERE e.run_id = runs.id) AS event_seq \
         FROM runs WHERE id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await
        .db()?;
    let Some(row) = row else { return Ok(None) };
    let mut run = run_from_row(&row)?;
    run.event_seq = row.try_get("event_seq").db()?;
    let stages = sql
        .query(concat!(
            "SELECT ",
            stage_columns!(),
            " FROM stages WHERE run_id = $1 ORDER BY idx"
        ))
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

/// A run as `run_columns!` selects it, without its stages (and `event_seq` 0).
pub(crate) fn run_from_row(row: &PgRow) -> StoreResult<RunRecord> {
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
        cancel_requested: row.try_get("cancel_requested").db()?,
        created_at: row.try_get("created_at").db()?,
        updated_at: row.try_get("updated_at").db()?,
        finished_at: row.try_get("finished_at").db()?,
        reuse: row.try_get("reuse").db()?,
    }
    .into_record()
}

/// A run as the claim answers it: `run_columns!` and its stages as one JSON array
/// (`stage_fields!`) in the column `stages`.
pub(crate) fn claimed_run(row: &PgRow) -> StoreResult<RunRecord> {
    let mut run = run_from_row(row)?;
    let stages: Option<Vec<StoredStage>> = parse_json(row.try_get("stages").db()?, "stages")?;
    run.stages = stages
        .unwrap_or_default()
        .into_iter()
        .map(StoredStage::into_record)
        .collect::<StoreResult<_>>()?;
    Ok(run)
}

/// A stage as `stage_columns!` selects it.
pub(crate) fn stage_from_row(row: &PgRow) -> StoreResult<StageRecord> {
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_search_text_holds_values_never_keys() {
        let inputs = json!({"topic": "Rust Lifetimes", "n": 41, "tags": ["ocean", true, null],
                            "nested": {"deep": "a\u{0}b"}});
        let text = search_text(&inputs);
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort_unstable();
        assert_eq!(lines, ["41", "Rust Lifetimes", "ab", "ocean"]);
        assert!(!text.contains("topic"));
    }
}
