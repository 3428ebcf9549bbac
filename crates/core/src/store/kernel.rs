//! The run state machine: what each change does to a run (its new statuses, the fields it
//! clears, the events it appends), decided here once. Every store applies these decisions in
//! its own transaction (SQLite) or function call (Redis, whose library receives them as
//! arguments); no store decides them again.
//!
//! Invariant: a store writes an event only from a value of this module; event kinds and
//! statuses reach storage only through their frozen `as_str` forms.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    Actor, Progress, RunError, RunStatus, StageCheckpoint, StageOutcome, StageStatus, StepRecord,
    StoreError, StoreResult,
};
use crate::ids::{FenceToken, RunId};

/// What happened to a run, as its event log says. The strings are frozen: they are stored and
/// streamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    RunQueued,
    RunStarted,
    StageStarted,
    StepCompleted,
    StageCompleted,
    RetryScheduled,
    StageFailed,
    RunFailed,
    RunCancelled,
    CancelRequested,
    RunCompleted,
    RunReleased,
    LeaseRecovered,
    RunResumed,
}

impl EventKind {
    pub const ALL: [EventKind; 14] = [
        Self::RunQueued,
        Self::RunStarted,
        Self::StageStarted,
        Self::StepCompleted,
        Self::StageCompleted,
        Self::RetryScheduled,
        Self::StageFailed,
        Self::RunFailed,
        Self::RunCancelled,
        Self::CancelRequested,
        Self::RunCompleted,
        Self::RunReleased,
        Self::LeaseRecovered,
        Self::RunResumed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RunQueued => "run_queued",
            Self::RunStarted => "run_started",
            Self::StageStarted => "stage_started",
            Self::StepCompleted => "step_completed",
            Self::StageCompleted => "stage_completed",
            Self::RetryScheduled => "retry_scheduled",
            Self::StageFailed => "stage_failed",
            Self::RunFailed => "run_failed",
            Self::RunCancelled => "run_cancelled",
            Self::CancelRequested => "cancel_requested",
            Self::RunCompleted => "run_completed",
            Self::RunReleased => "run_released",
            Self::LeaseRecovered => "lease_recovered",
            Self::RunResumed => "run_resumed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

/// A kind equals its frozen form.
impl PartialEq<&str> for EventKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event a change appends: the store adds its time, its sequence number and, when
/// `on_stage`, the name of the stage the change is about.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    pub on_stage: bool,
    pub data: Value,
}

impl Event {
    fn of_run(kind: EventKind, data: Value) -> Self {
        Self {
            kind,
            on_stage: false,
            data,
        }
    }

    fn of_stage(kind: EventKind, data: Value) -> Self {
        Self {
            kind,
            on_stage: true,
            data,
        }
    }
}

/// A run was submitted to `queue`.
pub fn queued(queue: &str) -> Event {
    Event::of_run(EventKind::RunQueued, json!({"queue": queue}))
}

/// A worker took the run under a new lease.
pub fn run_started(worker: &str, fence: FenceToken) -> Event {
    Event::of_run(
        EventKind::RunStarted,
        json!({"worker": worker, "fence": fence.0}),
    )
}

/// The stage's attempt `attempt` began. Starting an attempt makes the stage `running` and the
/// run's current stage, and clears what an earlier attempt left (its error, finish time and
/// retry time).
pub fn stage_started(attempt: u32) -> Event {
    Event::of_stage(EventKind::StageStarted, json!({"attempt": attempt}))
}

/// A memoised step's result was recorded (only the first time its key is seen).
pub fn step_completed(step: &StepRecord, progress: Progress) -> Event {
    Event::of_stage(
        EventKind::StepCompleted,
        json!({"step": step.key, "done": progress.done, "total": progress.total,
               "cost_usd": step.cost_usd}),
    )
}

/// What committing a stage's checkpoint does: the stage is `completed` (its output, artifacts
/// and source kept, its cost added to it and the run); with the run's result, the run is
/// `completed` too, its lease released.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    pub completes_run: bool,
    pub events: Vec<Event>,
}

pub fn commit(checkpoint: &StageCheckpoint) -> Commit {
    let mut data = json!({"cost_usd": checkpoint.cost_usd, "artifacts": checkpoint.artifacts});
    if let Some(source) = checkpoint.reused_from {
        data["reused_from"] = json!(source.to_string());
    }
    let mut events = vec![Event::of_stage(EventKind::StageCompleted, data)];
    let completes_run = checkpoint.run_result.is_some();
    if completes_run {
        events.push(Event::of_run(EventKind::RunCompleted, json!({})));
    }
    Commit {
        completes_run,
        events,
    }
}

/// What ending an attempt that did not complete does. The lease is always released.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptEnd {
    pub stage: StageStatus,
    pub run: RunStatus,
    /// Kept on the stage; `None` clears the stage's error.
    pub stage_error: Option<RunError>,
    /// Kept on the run when it fails; `None` leaves the run's error as it is.
    pub run_error: Option<RunError>,
    /// The stage is over (failed or cancelled): its finish time is now.
    pub stage_finished: bool,
    /// When the stage's next attempt may start (a retry); `None` clears it.
    pub next_attempt_in: Option<Duration>,
    /// When the run is due to be claimed again, from now; `None` when it is not queued again.
    pub due_in: Option<Duration>,
    pub events: Vec<Event>,
}

impl AttemptEnd {
    /// Whether the run is over.
    pub fn finishes_run(&self) -> bool {
        self.run.is_finished()
    }
}

pub fn attempt_end(outcome: &StageOutcome) -> AttemptEnd {
    match outcome {
        StageOutcome::Retry { error, delay } => AttemptEnd {
            stage: StageStatus::Retrying,
            run: RunStatus::Retrying,
            stage_error: Some(error.clone()),
            run_error: None,
            stage_finished: false,
            next_attempt_in: Some(*delay),
            due_in: Some(*delay),
            events: vec![Event::of_stage(
                EventKind::RetryScheduled,
                json!({"delay_ms": delay.as_millis() as u64, "error": error}),
            )],
        },
        StageOutcome::Fail { error } => AttemptEnd {
            stage: StageStatus::Failed,
            run: RunStatus::Failed,
            stage_error: Some(error.clone()),
            run_error: Some(error.clone()),
            stage_finished: true,
            next_attempt_in: None,
            due_in: None,
            events: vec![
                Event::of_stage(EventKind::StageFailed, json!({"error": error})),
                Event::of_run(EventKind::RunFailed, json!({"error": error})),
            ],
        },
        StageOutcome::Cancelled => AttemptEnd {
            stage: StageStatus::Cancelled,
            run: RunStatus::Cancelled,
            stage_error: None,
            run_error: None,
            stage_finished: true,
            next_attempt_in: None,
            due_in: None,
            events: vec![Event::of_stage(EventKind::RunCancelled, json!({}))],
        },
        StageOutcome::Abandoned => AttemptEnd {
            stage: StageStatus::Pending,
            run: RunStatus::Queued,
            stage_error: None,
            run_error: None,
            stage_finished: false,
            next_attempt_in: None,
            due_in: Some(Duration::ZERO),
            events: vec![Event::of_stage(EventKind::RunReleased, json!({}))],
        },
    }
}

/// A claimed run failed before any stage ran (an unknown workflow, a refused budget): the run
/// is `failed` with `error`, its lease released.
pub fn run_failed(error: &RunError) -> (RunStatus, Event) {
    (
        RunStatus::Failed,
        Event::of_run(EventKind::RunFailed, json!({"error": error})),
    )
}

/// What a cancel request does to a run in `status`.
#[derive(Debug, Clone, PartialEq)]
pub enum Cancel {
    /// A queued or retrying run is `cancelled` at once; a stage waiting for its retry is
    /// `cancelled` with it (its retry time cleared).
    Now { run: RunStatus, event: Event },
    /// A running run is flagged; its worker stops at its next heartbeat.
    Requested { event: Event },
}

pub fn cancel(id: RunId, status: RunStatus, actor: Actor) -> StoreResult<Cancel> {
    match status {
        RunStatus::Queued | RunStatus::Retrying => Ok(Cancel::Now {
            run: RunStatus::Cancelled,
            event: Event::of_run(EventKind::RunCancelled, json!({"actor": actor})),
        }),
        RunStatus::Running => Ok(Cancel::Requested {
            event: Event::of_run(EventKind::CancelRequested, json!({"actor": actor})),
        }),
        finished => Err(StoreError::Conflict(format!(
            "run {id} is already {}; only queued, retrying or running runs can be cancelled",
            finished.as_str()
        ))),
    }
}

/// A finished run was queued again from stage `from_stage`, at `actor`'s request.
pub fn resumed(from_stage: &str, actor: Actor) -> (RunStatus, Event) {
    (
        RunStatus::Queued,
        Event::of_stage(
            EventKind::RunResumed,
            json!({"from_stage": from_stage, "actor": actor}),
        ),
    )
}

/// What the sweep does to a running run whose lease expired: one whose cancel was requested
/// is `cancelled`; any other is queued again, due now, for another worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Expiry {
    pub run: RunStatus,
    pub requeue: bool,
    pub event: Event,
}

pub fn lease_expired(cancel_requested: bool, previous_worker: Option<&str>) -> Expiry {
    if cancel_requested {
        Expiry {
            run: RunStatus::Cancelled,
            requeue: false,
            event: Event::of_run(EventKind::RunCancelled, json!({"reason": "lease expired"})),
        }
    } else {
        Expiry {
            run: RunStatus::Queued,
            requeue: true,
            event: Event::of_run(
                EventKind::LeaseRecovered,
                json!({"previous_worker": previous_worker}),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_kind_reads_back_from_its_frozen_form() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
            assert_eq!(
                serde_json::to_value(kind).expect("json"),
                json!(kind.as_str())
            );
        }
        assert_eq!(EventKind::parse("run_exploded"), None);
    }

    #[test]
    fn each_ending_of_an_attempt_is_decided_once() {
        let error = RunError {
            code: "x".into(),
            message: "y".into(),
        };
        let retry = attempt_end(&StageOutcome::Retry {
            error: error.clone(),
            delay: Duration::from_secs(2),
        });
        assert_eq!(
            (retry.stage, retry.run),
            (StageStatus::Retrying, RunStatus::Retrying)
        );
        assert_eq!(
            retry.run_error, None,
            "a retrying run keeps no error of its own"
        );
        assert_eq!(retry.due_in, Some(Duration::from_secs(2)));
        let fail = attempt_end(&StageOutcome::Fail { error });
        assert!(fail.finishes_run() && fail.stage_finished);
        assert_eq!(
            fail.events.iter().map(|e| e.kind).collect::<Vec<_>>(),
            [EventKind::StageFailed, EventKind::RunFailed]
        );
        let release = attempt_end(&StageOutcome::Abandoned);
        assert_eq!(release.due_in, Some(Duration::ZERO));
        assert_eq!(release.stage_error, None);
        let cancelled = attempt_end(&StageOutcome::Cancelled);
        assert!(cancelled.finishes_run() && cancelled.due_in.is_none());
    }

    #[test]
    fn only_unfinished_runs_can_be_cancelled() {
        let id = RunId::generate();
        assert!(matches!(
            cancel(id, RunStatus::Queued, Actor::default()),
            Ok(Cancel::Now { .. })
        ));
        assert!(matches!(
            cancel(id, RunStatus::Running, Actor::default()),
            Ok(Cancel::Requested { .. })
        ));
        for status in [
            RunStatus::Completed,
            RunStatus::Failed,
            RunStatus::Cancelled,
        ] {
            assert!(matches!(
                cancel(id, status, Actor::default()),
                Err(StoreError::Conflict(_))
            ));
        }
    }
}
