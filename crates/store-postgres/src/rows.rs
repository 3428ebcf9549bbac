//! Rows as records: what a row of `runs`, `stages` or their JSON columns decodes to, with
//! every stored value checked (an unknown status or provider mode, a negative count, is
//! corruption, never a default).

use serde_json::Value;
use sqlx::{PgConnection, Row, postgres::PgRow};
use stagecraft_core::{
    ids::{FenceToken, RunId},
    money::Usd,
    store::{
        Progress, ProviderMode, RunKind, RunRecord, RunStatus, StageRecord, StageStatus,
        StoreError, StoreResult, to_datetime,
    },
};

use crate::{Db, Sql};

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

/// A stored run id, checked.
pub(crate) fn run_id(text: &str) -> StoreResult<RunId> {
    RunId::parse(text).ok_or_else(|| StoreError::Corrupt(format!("run id {text}")))
}

/// A stored count (attempts, progress, concurrency), checked to fit.
pub(crate) fn count(value: i64, what: &str) -> StoreResult<u32> {
    u32::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} {value}")))
}

/// The text the input search matches for these inputs: the string and number values inside
/// them, one per line, never a key (as [`stagecraft_core::store::inputs_contain`] looks at
/// them). NUL characters, which PostgreSQL text cannot hold, are left out.
pub(crate) fn search_text(inputs: &Value) -> String {
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
    let id: String = row.try_get("id").db()?;
    let kind: String = row.try_get("kind").db()?;
    let status: String = row.try_get("status").db()?;
    let mode: String = row.try_get("provider_mode").db()?;
    Ok(RunRecord {
        id: run_id(&id)?,
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
        cancel_requested: row.try_get("cancel_requested").db()?,
        created_at: to_datetime(row.try_get("created_at").db()?),
        updated_at: to_datetime(row.try_get("updated_at").db()?),
        finished_at: row
            .try_get::<Option<i64>, _>("finished_at")
            .db()?
            .map(to_datetime),
        reuse: row.try_get("reuse").db()?,
        stages: Vec::new(),
        event_seq: 0,
    })
}

/// A stage as `stage_columns!` selects it.
pub(crate) fn stage_from_row(row: &PgRow) -> StoreResult<StageRecord> {
    let status: String = row.try_get("status").db()?;
    let done: Option<i64> = row.try_get("progress_done").db()?;
    let total: Option<i64> = row.try_get("progress_total").db()?;
    Ok(StageRecord {
        name: row.try_get("name").db()?,
        status: StageStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("stage status {status}")))?,
        attempts: count(row.try_get("attempts").db()?, "stage attempts")?,
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
                done: count(done, "stage progress")?,
                total: count(total, "stage progress")?,
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

    #[test]
    fn counts_that_do_not_fit_are_corruption() {
        assert_eq!(count(3, "x").expect("fits"), 3);
        assert!(matches!(count(-1, "x"), Err(StoreError::Corrupt(_))));
        assert!(matches!(count(i64::MAX, "x"), Err(StoreError::Corrupt(_))));
    }
}
