//! What the SQL stores keep of a run and a stage, column by column, and the one checked
//! conversion into records they share: an unknown kind, status or provider mode, a run id that
//! does not parse, a count that does not fit or JSON that does not decode is corruption, never
//! a default. A store reads its columns into [`StoredRun`] and [`StoredStage`] (its own types:
//! SQLite keeps booleans as integers) and calls `into_record`.

use serde_json::Value;

use super::{
    Progress, ProviderMode, RunKind, RunRecord, RunStatus, StageRecord, StageStatus, StoreError,
    StoreResult, to_datetime,
};
use crate::{
    ids::{FenceToken, RunId},
    money::Usd,
};

/// A value as the JSON text a SQL store keeps.
pub fn json_text(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

/// Stored JSON text decoded; `what` names it in the corruption it may be.
pub fn parse_json<T: serde::de::DeserializeOwned>(
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
pub fn run_id(text: &str) -> StoreResult<RunId> {
    RunId::parse(text).ok_or_else(|| StoreError::Corrupt(format!("run id {text}")))
}

/// A stored count (attempts, progress, concurrency), checked to fit.
pub fn count(value: i64, what: &str) -> StoreResult<u32> {
    u32::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} {value}")))
}

/// A row of `runs` as stored (times in milliseconds, money in micro-dollars, JSON as text).
#[derive(Debug, Clone)]
pub struct StoredRun {
    pub id: String,
    pub kind: String,
    pub name: String,
    pub queue: String,
    pub inputs: String,
    pub status: String,
    pub provider_mode: String,
    pub budget_micros: Option<i64>,
    pub cost_micros: i64,
    pub current_stage: Option<String>,
    pub result: Option<String>,
    pub error: Option<String>,
    pub worker: Option<String>,
    pub fence: i64,
    pub lease_expires_at: Option<i64>,
    pub cancel_requested: bool,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    pub reuse: bool,
}

impl StoredRun {
    /// The run, without its stages (and `event_seq` 0).
    pub fn into_record(self) -> StoreResult<RunRecord> {
        let corrupt = |what: &str, value: &str| StoreError::Corrupt(format!("{what} {value}"));
        Ok(RunRecord {
            id: run_id(&self.id)?,
            kind: RunKind::parse(&self.kind).ok_or_else(|| corrupt("run kind", &self.kind))?,
            name: self.name,
            queue: self.queue,
            inputs: parse_json(Some(self.inputs), "inputs")?.unwrap_or(Value::Null),
            status: RunStatus::parse(&self.status)
                .ok_or_else(|| corrupt("run status", &self.status))?,
            provider_mode: ProviderMode::parse(&self.provider_mode)
                .ok_or_else(|| corrupt("provider mode", &self.provider_mode))?,
            budget_usd: self.budget_micros.map(Usd::from_micros),
            cost_usd: Usd::from_micros(self.cost_micros),
            current_stage: self.current_stage,
            result: parse_json(self.result, "result")?,
            error: parse_json(self.error, "error")?,
            worker: self.worker,
            fence: FenceToken(self.fence),
            lease_expires_at: self.lease_expires_at.map(to_datetime),
            cancel_requested: self.cancel_requested,
            created_at: to_datetime(self.created_at),
            updated_at: to_datetime(self.updated_at),
            finished_at: self.finished_at.map(to_datetime),
            reuse: self.reuse,
            stages: Vec::new(),
            event_seq: 0,
        })
    }
}

/// A row of `stages` as stored (also as a JSON object of these fields, as a store may read
/// a run's stages together with the run).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct StoredStage {
    pub name: String,
    pub status: String,
    pub attempts: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub cost_micros: i64,
    pub artifacts: String,
    pub output: Option<String>,
    pub error: Option<String>,
    pub progress_done: Option<i64>,
    pub progress_total: Option<i64>,
    pub next_attempt_at: Option<i64>,
    pub reused_from: Option<String>,
}

impl StoredStage {
    pub fn into_record(self) -> StoreResult<StageRecord> {
        Ok(StageRecord {
            name: self.name,
            status: StageStatus::parse(&self.status)
                .ok_or_else(|| StoreError::Corrupt(format!("stage status {}", self.status)))?,
            attempts: count(self.attempts, "stage attempts")?,
            started_at: self.started_at.map(to_datetime),
            finished_at: self.finished_at.map(to_datetime),
            cost_usd: Usd::from_micros(self.cost_micros),
            artifacts: parse_json(Some(self.artifacts), "artifacts")?.unwrap_or_default(),
            output: parse_json(self.output, "output")?,
            error: parse_json(self.error, "error")?,
            progress: match (self.progress_done, self.progress_total) {
                (Some(done), Some(total)) => Some(Progress {
                    done: count(done, "stage progress")?,
                    total: count(total, "stage progress")?,
                }),
                _ => None,
            },
            next_attempt_at: self.next_attempt_at.map(to_datetime),
            reused_from: self.reused_from,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage() -> StoredStage {
        StoredStage {
            name: "only".into(),
            status: "pending".into(),
            attempts: 0,
            started_at: None,
            finished_at: None,
            cost_micros: 0,
            artifacts: "[]".into(),
            output: None,
            error: None,
            progress_done: None,
            progress_total: None,
            next_attempt_at: None,
            reused_from: None,
        }
    }

    #[test]
    fn counts_that_do_not_fit_are_corruption() {
        assert_eq!(count(3, "x").expect("fits"), 3);
        assert!(matches!(count(-1, "x"), Err(StoreError::Corrupt(_))));
        assert!(matches!(count(i64::MAX, "x"), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn what_does_not_fit_a_record_is_corruption() {
        assert!(stage().into_record().is_ok());
        for broken in [
            StoredStage {
                status: "sleeping".into(),
                ..stage()
            },
            StoredStage {
                attempts: -1,
                ..stage()
            },
            StoredStage {
                progress_done: Some(1),
                progress_total: Some(i64::MAX),
                ..stage()
            },
            StoredStage {
                artifacts: "{not json".into(),
                ..stage()
            },
        ] {
            assert!(
                matches!(broken.clone().into_record(), Err(StoreError::Corrupt(_))),
                "{broken:?}"
            );
        }
    }
}
