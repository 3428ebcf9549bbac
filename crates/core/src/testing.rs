//! The conformance suite every run store passes (feature `testing`): each store crate runs it
//! with one line, [`store_conformance!`](crate::store_conformance), given a function that opens
//! a fresh, empty store.
//!
//! The cases speak only through [`RunStore`]: what a caller (the engine, the API, the sweeper)
//! may rely on, whichever store it has.

use std::{any::Any, time::Duration};

use serde_json::{Value, json};

use crate::{
    ids::{FenceToken, RunId, WorkerId},
    money::Usd,
    store::{
        Actor, Claimed, FromStage, Lease, NewRun, Progress, ProviderMode, ResumeChanges,
        ReusableCheckpoint, RunError, RunFilter, RunKind, RunPage, RunStatus, SharedStore,
        StageCheckpoint, StageOutcome, StageStatus, StepRecord, StoreError, WorkerInfo, kernel,
    },
};

/// A fresh store for one case, and whatever must live as long as it (a temporary directory).
pub struct Fixture {
    pub store: SharedStore,
    pub guard: Box<dyn Any + Send>,
}

/// Runs every case of the suite as a test of its own against stores from `$open`, an async
/// function answering a [`Fixture`].
#[macro_export]
macro_rules! store_conformance {
    ($open:path) => {
        $crate::store_conformance!(@cases $open;
            a_submitted_run_is_queued_with_its_stages_pending,
            an_idempotency_key_answers_the_same_run_or_a_conflict,
            a_claim_takes_each_due_run_once_with_a_larger_fence,
            a_stage_records_each_step_once_and_commits_the_run,
            a_stale_lease_is_refused_by_every_write,
            a_retry_waits_its_delay_then_counts_the_next_attempt,
            a_failed_attempt_fails_the_run_with_its_error,
            fail_run_fails_a_claimed_run,
            cancel_ends_a_queued_run_at_once_and_flags_a_running_one,
            an_abandoned_run_goes_back_to_the_queue,
            resume_requeues_a_finished_run_keeping_earlier_checkpoints,
            an_expired_lease_is_swept_back_to_the_queue_and_its_holder_refused,
            a_run_swept_while_a_cancel_was_requested_is_cancelled,
            finished_runs_past_retention_are_purged,
            events_page_in_order_and_positions_say_where_they_end,
            the_events_written_are_the_kernels,
            a_claim_over_several_queues_takes_the_earliest_due_first,
            the_listing_filters_and_pages_newest_first,
            a_reusable_checkpoint_is_found_while_its_run_exists,
            workers_are_listed_while_they_beat,
            counters_add_up,
            the_listing_filters_by_queue_time_error_and_inputs,
            changes_name_their_actor,
            throughput_and_waiting_are_kept_per_queue,
        );
    };
    (@cases $open:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = $open().await;
                $crate::testing::$case(&fixture.store).await;
            }
        )*
    };
}

const QUEUE: &str = "conformance";

/// A run of `stages` on the suite's queue.
/// A mock workflow run named `name` on `queue` with these stages and empty inputs, without a
/// budget, an idempotency key or reuse: what store tests insert (`..` overrides the rest).
pub fn workflow_run(name: &str, queue: &str, stages: &[&str]) -> NewRun {
    NewRun {
        id: RunId::generate(),
        kind: RunKind::Workflow,
        name: name.into(),
        queue: queue.into(),
        inputs: json!({}),
        provider_mode: ProviderMode::Mock,
        budget_usd: None,
        stage_names: stages.iter().map(|s| (*s).to_owned()).collect(),
        idempotency_key: None,
        request_hash: None,
        reuse: false,
    }
}

fn new_run(stages: &[&str]) -> NewRun {
    NewRun {
        inputs: json!({"n": 1}),
        ..workflow_run("conformance", QUEUE, stages)
    }
}

fn worker() -> WorkerId {
    WorkerId::for_this_process("conformance")
}

fn queues() -> Vec<String> {
    vec![QUEUE.to_owned()]
}

async fn submit(store: &SharedStore, stages: &[&str]) -> RunId {
    let (run, created) = store.insert_run(new_run(stages)).await.expect("insert");
    assert!(created);
    run.id
}

/// Claims exactly one run, with a lease of `ttl`.
async fn claim_one(store: &SharedStore, ttl: Duration) -> Claimed {
    let mut claimed = store
        .claim(&queues(), &worker(), ttl, 1)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1, "one run is due");
    claimed.remove(0)
}

/// Starts the claimed run's first open stage and answers its index and attempt number.
async fn start(store: &SharedStore, claimed: &Claimed) -> (usize, u32) {
    let stage = claimed.run.first_open_stage().expect("an open stage");
    let attempt = store
        .start_stage(&claimed.lease, stage)
        .await
        .expect("start");
    (stage, attempt)
}

async fn status(store: &SharedStore, id: RunId) -> RunStatus {
    store
        .get_run(id)
        .await
        .expect("get")
        .expect("exists")
        .status
}

async fn event_kinds(store: &SharedStore, id: RunId) -> Vec<String> {
    store
        .events_after(id, 0, 1000)
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.kind.as_str().to_owned())
        .collect()
}

fn checkpoint(result: Option<Value>) -> StageCheckpoint {
    StageCheckpoint {
        output: json!({"done": true}),
        artifacts: vec![],
        cost_usd: Usd::ZERO,
        run_result: result,
        reused_from: None,
    }
}

fn error(code: &str) -> RunError {
    RunError {
        code: code.into(),
        message: format!("{code} happened"),
    }
}

fn is_fence_rejected<T: std::fmt::Debug>(result: Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::FenceRejected { .. }))
}

pub async fn a_submitted_run_is_queued_with_its_stages_pending(store: &SharedStore) {
    let id = submit(store, &["one", "two"]).await;
    let run = store.get_run(id).await.expect("get").expect("stored");
    assert_eq!(run.status, RunStatus::Queued);
    assert_eq!(run.inputs, json!({"n": 1}));
    let stages: Vec<(&str, StageStatus)> = run
        .stages
        .iter()
        .map(|s| (s.name.as_str(), s.status))
        .collect();
    assert_eq!(
        stages,
        [("one", StageStatus::Pending), ("two", StageStatus::Pending)]
    );
    assert_eq!(event_kinds(store, id).await, ["run_queued"]);
    assert!(
        store
            .get_run(RunId::generate())
            .await
            .expect("get")
            .is_none()
    );
}

pub async fn an_idempotency_key_answers_the_same_run_or_a_conflict(store: &SharedStore) {
    let keyed = |hash: &str| NewRun {
        idempotency_key: Some("runs:order-7".into()),
        request_hash: Some(hash.into()),
        ..new_run(&["one"])
    };
    let (first, created) = store.insert_run(keyed("h1")).await.expect("first");
    assert!(created);
    let (again, created) = store.insert_run(keyed("h1")).await.expect("again");
    assert!(!created);
    assert_eq!(again.id, first.id);
    match store.insert_run(keyed("h2")).await {
        Err(StoreError::IdempotencyConflict(id)) => assert_eq!(id, first.id),
        other => panic!("a different request under the same key: {other:?}"),
    }
    let RunPage {
        runs: listed,
        total,
        ..
    } = store
        .list_runs(&RunFilter {
            limit: 10,
            ..RunFilter::default()
        })
        .await
        .expect("list");
    assert_eq!((listed.len(), total), (1, 1));
}

pub async fn a_claim_takes_each_due_run_once_with_a_larger_fence(store: &SharedStore) {
    let mut ids = vec![];
    for _ in 0..3 {
        ids.push(submit(store, &["one"]).await);
    }
    let other = store
        .insert_run(NewRun {
            queue: "elsewhere".into(),
            ..new_run(&["one"])
        })
        .await
        .expect("insert")
        .0;
    let ttl = Duration::from_secs(30);
    let first = store
        .claim(&queues(), &worker(), ttl, 2)
        .await
        .expect("claim");
    let second = store
        .claim(&queues(), &worker(), ttl, 2)
        .await
        .expect("claim");
    let third = store
        .claim(&queues(), &worker(), ttl, 2)
        .await
        .expect("claim");
    assert_eq!((first.len(), second.len(), third.len()), (2, 1, 0));
    let mut claimed: Vec<RunId> = first.iter().chain(&second).map(|c| c.run.id).collect();
    claimed.sort();
    ids.sort();
    assert_eq!(claimed, ids, "each run once, the oldest first");
    // A leased run says until when; a waiting one has no lease.
    let leased = store.get_run(ids[0]).await.expect("get").expect("run");
    let expires = leased.lease_expires_at.expect("a lease expiry");
    let left = expires - chrono::Utc::now();
    assert!(
        left > chrono::Duration::seconds(20) && left <= chrono::Duration::seconds(31),
        "{left:?}"
    );
    let waiting = store.get_run(other.id).await.expect("get").expect("run");
    assert_eq!(waiting.lease_expires_at, None);
    for c in first.iter().chain(&second) {
        assert!(c.lease.fence > FenceToken(0));
        assert!(!c.recovered);
        assert_eq!(c.run.status, RunStatus::Running);
        assert_eq!(status(store, c.run.id).await, RunStatus::Running);
    }
    assert_eq!(status(store, other.id).await, RunStatus::Queued);
}

pub async fn a_stage_records_each_step_once_and_commits_the_run(store: &SharedStore) {
    let id = submit(store, &["only"]).await;
    let claimed = claim_one(store, Duration::from_secs(30)).await;
    let (stage, attempt) = start(store, &claimed).await;
    assert_eq!((stage, attempt), (0, 1));
    let step = StepRecord {
        key: "step-0".into(),
        output: json!({"text": "hello"}),
        cost_usd: Usd::from_micros(250_000),
        artifacts: vec![],
    };
    let progress = Progress { done: 1, total: 2 };
    for _ in 0..2 {
        store
            .record_step(&claimed.lease, stage, &step, progress)
            .await
            .expect("step");
    }
    let steps = store.steps(id, stage).await.expect("steps");
    assert_eq!(steps.len(), 1, "a step is recorded once");
    assert_eq!(steps[0].output, json!({"text": "hello"}));
    let running = store.get_run(id).await.expect("get").expect("run");
    assert_eq!(running.cost_usd, Usd::from_micros(250_000));
    assert_eq!(running.stages[0].status, StageStatus::Running);
    store
        .commit_stage(
            &claimed.lease,
            stage,
            checkpoint(Some(json!({"answer": 42}))),
        )
        .await
        .expect("commit");
    let run = store.get_run(id).await.expect("get").expect("run");
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.result, Some(json!({"answer": 42})));
    assert_eq!(run.stages[0].status, StageStatus::Completed);
    assert_eq!(run.stages[0].output, Some(json!({"done": true})));
    assert!(run.finished_at.is_some());
    let kinds = event_kinds(store, id).await;
    assert_eq!(kinds.first().map(String::as_str), Some("run_queued"));
    assert_eq!(kinds.last().map(String::as_str), Some("run_completed"));
    for kind in [
        "run_started",
        "stage_started",
        "step_completed",
        "stage_completed",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
    assert_eq!(
        kinds.iter().filter(|k| *k == "step_completed").count(),
        1,
        "{kinds:?}"
    );
}

pub async fn a_stale_lease_is_refused_by_every_write(store: &SharedStore) {
    let id = submit(store, &["only"]).await;
    let claimed = claim_one(store, Duration::from_secs(30)).await;
    let stale = Lease {
        fence: FenceToken(claimed.lease.fence.0 - 1),
        ..claimed.lease.clone()
    };
    let stranger = Lease {
        worker: WorkerId::for_this_process("stranger"),
        ..claimed.lease.clone()
    };
    for lease in [&stale, &stranger] {
        let ttl = Duration::from_secs(30);
        assert!(is_fence_rejected(store.heartbeat(lease, ttl).await));
        assert!(is_fence_rejected(store.start_stage(lease, 0).await));
        let step = StepRecord {
            key: "k".into(),
            output: json!(null),
            cost_usd: Usd::ZERO,
            artifacts: vec![],
        };
        let progress = Progress { done: 1, total: 1 };
        assert!(is_fence_rejected(
            store.record_step(lease, 0, &step, progress).await
        ));
        assert!(is_fence_rejected(
            store
                .commit_stage(lease, 0, checkpoint(Some(json!(1))))
                .await
        ));
        assert!(is_fence_rejected(
            store.end_attempt(lease, 0, StageOutcome::Abandoned).await
        ));
        assert!(is_fence_rejected(store.fail_run(lease, error("x")).await));
    }
    assert_eq!(status(store, id).await, RunStatus::Running);
    assert!(
        !store
            .heartbeat(&claimed.lease, Duration::from_secs(30))
            .await
            .expect("the holder's heartbeat")
    );
}

pub async fn a_retry_waits_its_delay_then_counts_the_next_attempt(store: &SharedStore) {
    let id = submit(store, &["only"]).await;
    let claimed = claim_one(store, Duration::from_secs(30)).await;
    let (stage, attempt) = start(store, &claimed).await;
    assert_eq!(attempt, 1);
    let delay = Duration::from_millis(400);
    store
        .end_attempt(
            &claimed.lease,
            stage,
            StageOutcome::Retry {
                error: error("flaky"),
                delay,
            },
        )
        .await
        .expect("retry");
    let run = store.get_run(id).await.expect("get").expect("run");
    assert_eq!(run.status, RunStatus::Retrying);
    assert_eq!(run.stages[0].status, StageStatus::Retrying);
    assert!(run.stages[0].next_attempt_at.is_some());
    assert_eq!(
        run.stages[0].error.as_ref().map(|e| e.code.as_str()),
        Some("flaky")
    );
    assert!(
        run.error.is_none(),
        "a retrying run has no error of its own"
    );
    let early = store
        .claim(&queues(), &worker(), Duration::from_secs(30), 1)
        .await
        .expect("claim");
    assert!(early.is_empty(), "claimed before its delay");
    tokio::time::sleep(delay + Duration::from_millis(300)).await;
    let again = claim_one(store, Duration::from_secs(30)).await;
    assert!(again.lease.fence > claimed.lease.fence);
    let (_, attempt) = start(store, &again).await;
    assert_eq!(attempt, 2);
    // Released, the stage keeps nothing of the attempts before.
    store
        .end_attempt(&again.lease, stage, StageOutcome::Abandoned)
        .await
        .expect("abandon");
    let run = store.get_run(id).await.expect("get").expect("run");
    assert_eq!(run.stages[0].status, StageStatus::Pending);
    assert!(run.stages[0].error.is_none() && run.stages[0].next_attempt_at.is_none());
    assert!(
        event_kinds(store, id)
            .await
            .iter()
            .any(|k| k == "retry_scheduled")
    );
}

pub async fn a_failed_attempt_fails_the_run_with_its_error(store: &SharedStore) {
    let id = submit(store, &["one", "two"]).await;
    let claimed = claim_one(store, Duration::from_secs(30)).await;
    let (stage, _) = start(store, &claimed).await;
    store
        .end_attempt(
            &claimed.lease,
            stage,
            StageOutcome::Fail {
                error: error("broken"),
            },
        )
        .await
        .expect("fail");
    let run = store.get_run(id).await.expect("get").expect("run");
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.error.as_ref().map(|e| e.code.as_str()), Some("broken"));
    assert_eq!(run.stages[0].status, StageStatus::Failed);
    assert_eq!(run.stages[1].status, StageStatus::Pending);
    assert!(run.finished_at.is_some());
    let kinds = event_kinds(store, id).await;
    assert_eq!(kinds.last().map(String::as_str), Some("run_failed"));
    assert!(kinds.iter().any(|k| k == "stage_failed"));
    assert!(
        store
            .claim(&queues(), &worker(), Duration::from_secs(30), 1)
            .await
            .expect("claim")
            .is_empty()
    );
}

pub async fn fail_run_fails_a_claimed_run(store: &SharedStore) {
    let id = submit(store, &["only"]).await;
    let claimed = claim_one(store, Duration::from_secs(30)).await;
    store
        .fail_run(&claimed.lease, error("unknown_workflow"))
        .await
        .expect("fail run");
    let run = store.get_run(id).await.expect("get").expect("run");
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(
        run.error.as_ref().map(|e| e.code.as_str()),
        Some("unknown_workflow")
    );
    assert_eq!(
        event_kinds(store, id).await.last().map(String::as_str),
        Some("run_failed")
    );
}

pub async fn cancel_ends_a_queued_run_at_once_and_flags_a_running_one(store: &SharedStore) {
    let queued = submit(store, &["only"]).await;
    let cancelled = store
        .request_cancel(queued, Actor::default())
        .await
        .expect("cancel");
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    assert!(cancelled.finished_at.is_some());
    assert_eq!(status(store, queued).await, RunStatus::Cancelled);

    let running = submit(store, &["only"]).await;
    let claimed = claim_one(store, Duration::from_secs(30)).await;
    assert_eq!(claimed.run.id, running);
    let (stage, _) = start(store, &claimed).await;
    let flagged = store
        .request_cancel(running, Actor::default())
        .await
        .expect("cancel");
    assert_eq!(flagged.status, RunStatus::Running);
    assert!(flagged.cancel_requested);
    assert!(
        store
            .heartbeat(&claimed.lease, Duration::from_secs(30))
            .await
            .expect("heartbeat"),
        "the worker learns of the cancel at its heartbeat"
    );
    store
        .end_attempt(&claimed.lease, stage, StageOutcome::Cancelled)
        .await
        .expect("cancelled");
    assert_eq!(status(store, running).await, RunStatus::Cancelled);
    assert!(
        event_kinds(store, running)
            .await
            .iter()
            .any(|k| k == "run_cancelled")
    );

    assert!(matches!(
        store.request_cancel(running, Actor::default()).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store
            .request_cancel(RunId::generate(), Actor::default())
            .await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn an_abandoned_run_goes_back_to_the_queue(store: &SharedStore) {
    let id = submit(store, &["only"]).await;
    let claimed = claim_one(store, Duration::from_secs(30)).await;
    let (stage, _) = start(store, &claimed).await;
    store
        .end_attempt(&claimed.lease, stage, StageOutcome::Abandoned)
        .await
        .expect("abandon");
    assert_eq!(status(store, id).await, RunStatus::Queued);
    assert!(
        event_kinds(store, id)
            .await
            .iter()
            .any(|k| k == "run_released")
    );
    let again = claim_one(store, Duration::from_secs(30)).await;
    assert_eq!(again.run.id, id);
    assert!(again.lease.fence > claimed.lease.fence);
    assert!(is_fence_rejected(
        store
            .heartbeat(&claimed.lease, Duration::from_secs(30))
            .await
    ));
}

/// A run of two stages whose first completed and whose second failed, ending the run.
async fn failed_at_its_second_stage(store: &SharedStore) -> RunId {
    let id = submit(store, &["first", "second"]).await;
    let claimed = claim_one(store, Duration::from_secs(30)).await;
    let (stage, _) = start(store, &claimed).await;
    assert_eq!(stage, 0);
    store
        .commit_stage(&claimed.lease, 0, checkpoint(None))
        .await
        .expect("commit first");
    let second = store.start_stage(&claimed.lease, 1).await.expect("start");
    assert_eq!(second, 1);
    let failed = StageOutcome::Fail {
        error: error("broken"),
    };
    store
        .end_attempt(&claimed.lease, 1, failed)
        .await
        .expect("fail");
    id
}

/// The runs whose inputs contain `text`, as the input search finds them.
async fn found_by_input(store: &SharedStore, text: &str) -> Vec<RunId> {
    let found = store
        .list_runs(&RunFilter {
            input_text: Some(text.into()),
            limit: 10,
            ..RunFilter::default()
        })
        .await
        .expect("search");
    found.runs.iter().map(|r| r.id).collect()
}

pub async fn resume_requeues_a_finished_run_keeping_earlier_checkpoints(store: &SharedStore) {
    let id = failed_at_its_second_stage(store).await;
    assert!(matches!(
        store
            .resume(
                id,
                FromStage::Named("nowhere".into()),
                ResumeChanges::default()
            )
            .await,
        Err(StoreError::Conflict(_))
    ));
    let resumed = store
        .resume(
            id,
            FromStage::Auto,
            ResumeChanges {
                inputs: Some(json!({"n": 2, "note": "amended"})),
                budget_usd: None,
                actor: Actor::default(),
            },
        )
        .await
        .expect("resume");
    assert_eq!(resumed.status, RunStatus::Queued);
    assert_eq!(resumed.inputs, json!({"n": 2, "note": "amended"}));
    // The input search sees the new inputs.
    assert_eq!(found_by_input(store, "amended").await, [id]);
    assert_eq!(resumed.stages[0].status, StageStatus::Completed);
    assert_eq!(resumed.stages[1].status, StageStatus::Pending);
    assert!(resumed.error.is_none() && resumed.finished_at.is_none());
    assert!(matches!(
        store
            .resume(id, FromStage::Auto, ResumeChanges::default())
            .await,
        Err(StoreError::Conflict(_))
    ));
    let again = claim_one(store, Duration::from_secs(30)).await;
    let (stage, attempt) = start(store, &again).await;
    assert_eq!(
        (stage, attempt),
        (1, 1),
        "the first stage without a checkpoint"
    );
    store
        .commit_stage(&again.lease, 1, checkpoint(Some(json!("done"))))
        .await
        .expect("commit second");
    let redo = store
        .resume(
            id,
            FromStage::Named("first".into()),
            ResumeChanges::default(),
        )
        .await
        .expect("resume from the first");
    assert_eq!(redo.stages[0].status, StageStatus::Pending);
    assert_eq!(redo.stages[1].status, StageStatus::Pending);
    assert!(redo.result.is_none());
    assert!(
        event_kinds(store, id)
            .await
            .iter()
            .any(|k| k == "run_resumed")
    );
}

pub async fn an_expired_lease_is_swept_back_to_the_queue_and_its_holder_refused(
    store: &SharedStore,
) {
    let id = submit(store, &["only"]).await;
    let ttl = Duration::from_millis(300);
    let claimed = claim_one(store, ttl).await;
    start(store, &claimed).await;
    assert!(
        store
            .sweep_expired_leases()
            .await
            .expect("sweep")
            .is_empty(),
        "a live lease stays"
    );
    tokio::time::sleep(ttl * 3).await;
    assert_eq!(store.sweep_expired_leases().await.expect("sweep"), [id]);
    assert_eq!(status(store, id).await, RunStatus::Queued);
    assert!(
        event_kinds(store, id)
            .await
            .iter()
            .any(|k| k == "lease_recovered")
    );
    assert!(is_fence_rejected(
        store.heartbeat(&claimed.lease, ttl).await
    ));
    let again = claim_one(store, Duration::from_secs(30)).await;
    assert!(again.recovered, "taken over from a worker that stopped");
    assert!(again.lease.fence > claimed.lease.fence);
}

pub async fn a_run_swept_while_a_cancel_was_requested_is_cancelled(store: &SharedStore) {
    let id = submit(store, &["only"]).await;
    let ttl = Duration::from_millis(300);
    let claimed = claim_one(store, ttl).await;
    start(store, &claimed).await;
    store
        .request_cancel(id, Actor::default())
        .await
        .expect("cancel");
    tokio::time::sleep(ttl * 3).await;
    store.sweep_expired_leases().await.expect("sweep");
    let run = store.get_run(id).await.expect("get").expect("run");
    assert_eq!(run.status, RunStatus::Cancelled);
    assert!(run.finished_at.is_some());
}

pub async fn finished_runs_past_retention_are_purged(store: &SharedStore) {
    let finished = submit(store, &["only"]).await;
    store
        .request_cancel(finished, Actor::default())
        .await
        .expect("cancel");
    let waiting = submit(store, &["only"]).await;
    assert_eq!(
        store
            .purge_finished(Duration::from_secs(3600))
            .await
            .expect("purge"),
        0,
        "within retention"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        store
            .purge_finished(Duration::from_millis(10))
            .await
            .expect("purge"),
        1
    );
    assert!(store.get_run(finished).await.expect("get").is_none());
    assert!(store.get_run(waiting).await.expect("get").is_some());
    // Gone from every listing too, counts included.
    for filter in [
        RunFilter::default(),
        RunFilter {
            name: Some("conformance".into()),
            ..RunFilter::default()
        },
        RunFilter {
            queue: Some(QUEUE.into()),
            ..RunFilter::default()
        },
        RunFilter {
            kind: Some(RunKind::Workflow),
            ..RunFilter::default()
        },
    ] {
        let page = store
            .list_runs(&RunFilter {
                limit: 10,
                ..filter.clone()
            })
            .await
            .expect("list");
        assert_eq!(
            page.runs.iter().map(|r| r.id).collect::<Vec<_>>(),
            [waiting],
            "{filter:?}"
        );
        assert_eq!(page.total, 1, "{filter:?}");
    }
}

pub async fn events_page_in_order_and_positions_say_where_they_end(store: &SharedStore) {
    let id = submit(store, &["only"]).await;
    let claimed = claim_one(store, Duration::from_secs(30)).await;
    let (stage, _) = start(store, &claimed).await;
    store
        .commit_stage(&claimed.lease, stage, checkpoint(Some(json!(1))))
        .await
        .expect("commit");
    let all = store.events_after(id, 0, 1000).await.expect("events");
    assert!(all.len() >= 4, "{all:?}");
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "in order");
    assert!(all.iter().all(|e| e.run_id == id));
    let first_two = store.events_after(id, 0, 2).await.expect("page");
    assert_eq!(first_two.len(), 2);
    let rest = store
        .events_after(id, first_two[1].seq, 1000)
        .await
        .expect("rest");
    assert_eq!(rest.len(), all.len() - 2);
    let positions = store
        .run_positions(&[id, RunId::generate()])
        .await
        .expect("positions");
    assert_eq!(positions.len(), 1, "runs that do not exist are left out");
    assert_eq!(positions[0].run_id, id);
    assert!(positions[0].finished);
    assert_eq!(positions[0].last_event_seq, all[all.len() - 1].seq);
}

/// Every store writes the kernel's events, whatever builds them (a store that fills in what
/// only it knows, the attempt number or the fence, must write what the kernel would).
pub async fn the_events_written_are_the_kernels(store: &SharedStore) {
    let id = submit(store, &["first", "second"]).await;
    let claimed = claim_one(store, Duration::from_secs(30)).await;
    let (stage, attempt) = start(store, &claimed).await;
    let commit = checkpoint(None);
    store
        .commit_stage(&claimed.lease, stage, commit.clone())
        .await
        .expect("commit");
    let second = store
        .start_stage(&claimed.lease, stage + 1)
        .await
        .expect("start the second stage");
    let last = StageCheckpoint {
        cost_usd: Usd::from_micros(1_500),
        artifacts: vec!["cut.mp4".to_owned()],
        ..checkpoint(Some(json!({"answer": 42})))
    };
    store
        .commit_stage(&claimed.lease, stage + 1, last.clone())
        .await
        .expect("commit the last stage");
    let on = |stage: &str, event: kernel::Event| {
        let named = event.on_stage.then(|| stage.to_owned());
        (event.kind, named, event.data)
    };
    let mut expected = vec![
        on("", kernel::queued(QUEUE)),
        on(
            "",
            kernel::run_started(claimed.lease.worker.as_str(), claimed.lease.fence),
        ),
        on("first", kernel::stage_started(attempt)),
    ];
    expected.extend(
        kernel::commit(&commit)
            .events
            .into_iter()
            .map(|e| on("first", e)),
    );
    expected.push(on("second", kernel::stage_started(second)));
    expected.extend(
        kernel::commit(&last)
            .events
            .into_iter()
            .map(|e| on("second", e)),
    );
    let written: Vec<_> = store
        .events_after(id, 0, 100)
        .await
        .expect("events")
        .into_iter()
        .map(|e| (e.kind, e.stage, e.data))
        .collect();
    assert_eq!(written, expected);
}

/// A worker of several queues takes their due runs in order of due time across them.
pub async fn a_claim_over_several_queues_takes_the_earliest_due_first(store: &SharedStore) {
    let mut ids = Vec::new();
    for queue in ["b", "a", "b", "c", "a"] {
        let run = store
            .insert_run(workflow_run("noop", queue, &["only"]))
            .await
            .expect("insert")
            .0;
        ids.push(run.id);
        // Due times a millisecond apart at least: the order is the submissions'.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let queues = ["a".to_owned(), "b".to_owned()];
    let mut taken = Vec::new();
    for _ in 0..3 {
        let claimed = store
            .claim(&queues, &worker(), Duration::from_secs(30), 2)
            .await
            .expect("claim");
        taken.push(claimed.iter().map(|c| c.run.id).collect::<Vec<_>>());
    }
    let expected = [vec![ids[0], ids[1]], vec![ids[2], ids[4]], vec![]];
    for (got, want) in taken.iter().zip(&expected) {
        let (mut got, mut want) = (got.clone(), want.clone());
        got.sort();
        want.sort();
        assert_eq!(got, want, "claims of {taken:?}");
    }
    assert_eq!(
        status(store, ids[3]).await,
        RunStatus::Queued,
        "queue c is not asked for"
    );
}

pub async fn the_listing_filters_and_pages_newest_first(store: &SharedStore) {
    let mut ids = vec![];
    for _ in 0..5 {
        ids.push(submit(store, &["only"]).await);
    }
    store
        .request_cancel(ids[0], Actor::default())
        .await
        .expect("cancel");
    let page = |before: Option<RunId>, status: Option<RunStatus>| RunFilter {
        status,
        before,
        limit: 2,
        ..RunFilter::default()
    };
    let RunPage {
        runs: first, total, ..
    } = store.list_runs(&page(None, None)).await.expect("list");
    assert_eq!(total, 5);
    assert_eq!(
        first.iter().map(|r| r.id).collect::<Vec<_>>(),
        [ids[4], ids[3]],
        "newest first"
    );
    let RunPage { runs: second, .. } = store
        .list_runs(&page(Some(ids[3]), None))
        .await
        .expect("list");
    assert_eq!(
        second.iter().map(|r| r.id).collect::<Vec<_>>(),
        [ids[2], ids[1]]
    );
    let RunPage {
        runs: cancelled,
        total,
        ..
    } = store
        .list_runs(&page(None, Some(RunStatus::Cancelled)))
        .await
        .expect("list");
    assert_eq!(total, 1);
    assert_eq!(cancelled[0].id, ids[0]);
}

pub async fn a_reusable_checkpoint_is_found_while_its_run_exists(store: &SharedStore) {
    let id = submit(store, &["only"]).await;
    let offered = ReusableCheckpoint {
        run_id: id,
        stage: "only".into(),
        output: json!({"kept": true}),
        artifacts: vec![format!("runs/{id}/file.txt")],
    };
    store
        .record_reusable("stage-key", &offered)
        .await
        .expect("offer");
    assert_eq!(
        store.find_reusable("stage-key").await.expect("find"),
        Some(offered)
    );
    assert_eq!(store.find_reusable("other-key").await.expect("find"), None);
    store
        .request_cancel(id, Actor::default())
        .await
        .expect("cancel");
    tokio::time::sleep(Duration::from_millis(50)).await;
    store
        .purge_finished(Duration::from_millis(10))
        .await
        .expect("purge");
    assert_eq!(
        store.find_reusable("stage-key").await.expect("find"),
        None,
        "a checkpoint whose run is gone is not offered"
    );
}

pub async fn workers_are_listed_while_they_beat(store: &SharedStore) {
    let info = WorkerInfo {
        id: WorkerId::from("host:1:worker-a".to_owned()),
        queues: queues(),
        concurrency: 4,
        started_at: chrono::Utc::now(),
        last_heartbeat: chrono::Utc::now(),
        running: vec!["r1".into()],
    };
    store.worker_heartbeat(&info).await.expect("beat");
    let listed = store.list_workers().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, info.id);
    assert_eq!(listed[0].running, ["r1"]);
    assert_eq!(listed[0].concurrency, 4);
    store.unregister_worker(&info.id).await.expect("unregister");
    assert!(store.list_workers().await.expect("list").is_empty());
}

pub async fn counters_add_up(store: &SharedStore) {
    store
        .add_counters(&[("a_total".into(), 2.0), ("b_total".into(), 1.0)])
        .await
        .expect("add");
    store
        .add_counters(&[("a_total".into(), 3.0)])
        .await
        .expect("add");
    let mut counters = store.counters().await.expect("counters");
    counters.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        counters,
        [("a_total".to_owned(), 5.0), ("b_total".to_owned(), 1.0)]
    );
}

/// A run of `name` on `queue` with these inputs.
async fn insert_on(store: &SharedStore, (name, queue): (&str, &str), inputs: Value) -> RunId {
    let run = NewRun {
        inputs,
        ..workflow_run(name, queue, &["only"])
    };
    store.insert_run(run).await.expect("insert").0.id
}

fn ids_of(page: &RunPage) -> Vec<RunId> {
    page.runs.iter().map(|r| r.id).collect()
}

pub async fn the_listing_filters_by_queue_time_error_and_inputs(store: &SharedStore) {
    let a = insert_on(
        store,
        ("alpha", "q1"),
        json!({"topic": "Rust Lifetimes", "n": 41}),
    )
    .await;
    let b = insert_on(
        store,
        ("beta", "q2"),
        json!({"topic": "tide pools", "tags": ["ocean"]}),
    )
    .await;
    let c = insert_on(store, ("alpha", "q2"), json!({"topic": "rusty nails"})).await;
    let list = |filter| list_of(store, filter);
    let by_queue = list(RunFilter {
        queue: Some("q2".into()),
        ..RunFilter::default()
    })
    .await;
    assert_eq!(ids_of(&by_queue), [c, b]);
    assert_eq!(by_queue.total, 2);
    let named = list(RunFilter {
        name: Some("alpha".into()),
        queue: Some("q2".into()),
        ..RunFilter::default()
    })
    .await;
    assert_eq!(ids_of(&named), [c]);
    // Inside a value, in any case; nested values too; never a key.
    for (text, expected) in [
        ("rust", vec![c, a]),
        ("LIFETIME", vec![a]),
        ("ocean", vec![b]),
        ("topic", vec![]),
    ] {
        let found = list(RunFilter {
            input_text: Some(text.into()),
            ..RunFilter::default()
        })
        .await;
        assert_eq!(ids_of(&found), expected, "searching {text:?}");
    }
    // A time range is a range of ids: from `since` (inclusive) up to `until` (exclusive).
    let middle = list(RunFilter {
        since: Some(b),
        until: Some(c),
        ..RunFilter::default()
    })
    .await;
    assert_eq!(ids_of(&middle), [b]);
    assert_eq!(middle.total, 1);
    listing_by_error_and_cost(store, a).await;
}

/// A page of ten under `filter`.
async fn list_of(store: &SharedStore, filter: RunFilter) -> RunPage {
    store
        .list_runs(&RunFilter {
            limit: 10,
            ..filter
        })
        .await
        .expect("list")
}

/// Fails `a` (the one run of queue `q1`, of three stored) with a code, then finds it by that
/// code, and the three by what they cost.
async fn listing_by_error_and_cost(store: &SharedStore, a: RunId) {
    let list = |filter| list_of(store, filter);
    let claimed = store
        .claim(&["q1".to_owned()], &worker(), Duration::from_secs(30), 1)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    let (stage, _) = start(store, &claimed[0]).await;
    store
        .end_attempt(
            &claimed[0].lease,
            stage,
            StageOutcome::Fail {
                error: error("budget_exceeded"),
            },
        )
        .await
        .expect("fail");
    let failed = list(RunFilter {
        error_code: Some("budget_exceeded".into()),
        ..RunFilter::default()
    })
    .await;
    assert_eq!(ids_of(&failed), [a]);
    let none = list(RunFilter {
        error_code: Some("other".into()),
        ..RunFilter::default()
    })
    .await;
    assert!(none.runs.is_empty() && none.total == 0);
    let costly = list(RunFilter {
        min_cost: Usd::from_dollars(0.01),
        ..RunFilter::default()
    })
    .await;
    assert!(costly.runs.is_empty(), "no run has spent anything");
    let cheap = list(RunFilter {
        max_cost: Some(Usd::ZERO),
        ..RunFilter::default()
    })
    .await;
    assert_eq!(cheap.total, 3);
}

pub async fn changes_name_their_actor(store: &SharedStore) {
    use crate::store::{ActorChannel, ActorRole};
    let actor = Actor {
        role: ActorRole::Operator,
        via: ActorChannel::Console,
    };
    let id = submit(store, &["only"]).await;
    store.request_cancel(id, actor).await.expect("cancel");
    let changes = ResumeChanges {
        actor,
        ..ResumeChanges::default()
    };
    store
        .resume(id, FromStage::Auto, changes)
        .await
        .expect("resume");
    let events = store.events_after(id, 0, 100).await.expect("events");
    for kind in ["run_cancelled", "run_resumed"] {
        let event = events
            .iter()
            .find(|e| e.kind == kind)
            .unwrap_or_else(|| panic!("a {kind} event"));
        assert_eq!(
            event.data["actor"],
            json!({"role": "operator", "via": "console"}),
            "{kind}"
        );
    }
}

pub async fn throughput_and_waiting_are_kept_per_queue(store: &SharedStore) {
    let now = chrono::Utc::now();
    let minute = |ago: i64| {
        let at = (now - chrono::Duration::minutes(ago)).timestamp_millis();
        crate::store::to_datetime(at - at.rem_euclid(60_000))
    };
    let count = |queue: &str, at, completed, failed| crate::store::Throughput {
        queue: queue.into(),
        minute: at,
        completed,
        failed,
        cancelled: 0,
    };
    store
        .add_throughput(&[count("q1", minute(3), 2, 1), count("q2", minute(1), 5, 0)])
        .await
        .expect("add");
    store
        .add_throughput(&[count("q1", minute(3), 1, 0), count("q1", minute(90), 7, 0)])
        .await
        .expect("add");
    let hour = store
        .throughput(now - chrono::Duration::hours(1))
        .await
        .expect("history");
    assert_eq!(
        hour,
        [count("q1", minute(3), 3, 1), count("q2", minute(1), 5, 0)],
        "the last hour, oldest minute first, counts added up"
    );
    let day = store
        .throughput(now - chrono::Duration::days(1))
        .await
        .expect("history");
    assert_eq!(day.len(), 3);
    assert!(store.oldest_waiting().await.expect("waiting").is_empty());
    submit(store, &["only"]).await;
    submit(store, &["only"]).await;
    let waiting = store.oldest_waiting().await.expect("waiting");
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].queue, QUEUE);
}
