//! The embedded run store: one SQLite file in WAL mode, shared by the processes of one host.
//!
//! Every fenced write opens an immediate (write-locking) transaction whose first statement is
//! the fence check, so two processes can never both believe they own a run, and the checks of
//! SQLite's single writer keep claims atomic without any row locks.

mod group;
mod rows;

use std::{collections::HashMap, str::FromStr, sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use group::{GroupCommit, WriteTx};
use rows::{json_text, parse_json, read_run, run_from_row, stage_from_row};
use serde_json::{Value, json};
use sqlx::{
    QueryBuilder, Row,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    },
};
use tokio::sync::Notify;

use stagecraft_core::{
    clock::{Millis, SharedClock},
    ids::{RunId, WorkerId},
    money::Usd,
    store::{
        self as core_store, Actor, Claimed, FromStage, Lease, NewRun, Progress, QueueDepth,
        QueueWait, ResumeChanges, ReusableCheckpoint, RunError, RunEvent, RunFilter, RunKind,
        RunPage, RunPosition, RunRecord, RunStatus, RunStore, StageCheckpoint, StageOutcome,
        StageRecord, StageStatus, StepRecord, StoreError, StoreResult, Throughput,
        WORKER_STALE_AFTER, WorkerInfo, kernel, to_datetime,
    },
};

/// The `sqlite://` URL of a file path.
pub fn sqlite_url_for(path: &std::path::Path) -> String {
    format!("sqlite://{}", path.display())
}

/// sqlx's failures as the store reports them: a pool that cannot hand out a connection in time
/// is the store being unavailable (503 and try again), anything else a database error.
fn store_error(error: sqlx::Error) -> StoreError {
    match error {
        sqlx::Error::PoolTimedOut => StoreError::Unavailable(error.to_string()),
        other => StoreError::Database(other.to_string()),
    }
}

/// `.db()?` turns a sqlx result into the store's.
trait Db<T> {
    fn db(self) -> StoreResult<T>;
}

impl<T> Db<T> for Result<T, sqlx::Error> {
    fn db(self) -> StoreResult<T> {
        self.map_err(store_error)
    }
}

impl<T> Db<T> for Result<T, sqlx::migrate::MigrateError> {
    fn db(self) -> StoreResult<T> {
        self.map_err(|e| StoreError::Migrate(e.to_string()))
    }
}

/// The SQLite implementation of [`RunStore`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    clock: SharedClock,
    /// Wakes this process's idle workers when this process queues a run.
    work_available: Arc<Notify>,
    /// This process's writes, committed in groups (see [`GroupCommit`]).
    writes: Arc<GroupCommit>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub async fn open(database_url: &str, clock: SharedClock) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(database_url)
            .db()?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode survives any process crash; only an OS crash or power loss
            // can lose the last transactions.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        if let Some(dir) = options.get_filename().parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Database(e.to_string()))?;
            }
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            .connect_with(options)
            .await
            .db()?;
        let store = Self {
            writes: GroupCommit::start(pool.clone()).await?,
            pool,
            clock,
            work_available: Arc::new(Notify::new()),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the migrations in `migrations/`. Safe to run from several processes at once.
    pub async fn migrate(&self) -> StoreResult<()> {
        sqlx::migrate!("../../migrations/sqlite")
            .run(&self.pool)
            .await
            .db()?;
        Ok(())
    }

    fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    /// Opens this process's shared write transaction; see [`GroupCommit`].
    async fn begin(&self) -> StoreResult<WriteTx> {
        self.writes.begin().await
    }

    /// Opens a write transaction that holds only if `lease` is still the run's current lease.
    async fn begin_fenced(&self, lease: &Lease) -> StoreResult<WriteTx> {
        let mut tx = self.begin().await?;
        let updated = sqlx::query(
            "UPDATE runs SET updated_at = ? WHERE id = ? AND fence = ? AND lease_owner = ?",
        )
        .bind(self.now())
        .bind(lease.run_id.to_string())
        .bind(lease.fence.0)
        .bind(lease.worker.as_str())
        .execute(&mut *tx)
        .await
        .db()?
        .rows_affected();
        if updated != 1 {
            return Err(tx.refuse(lease).await);
        }
        Ok(tx)
    }
}

/// Appends one of the kernel's events; `stage` is the name of the stage the change is about,
/// which the event names when it is on that stage.
async fn insert_event(
    tx: &mut WriteTx,
    run: RunId,
    at: Millis,
    event: &kernel::Event,
    stage: Option<&str>,
) -> StoreResult<()> {
    sqlx::query("INSERT INTO events (run_id, at, kind, stage, data) VALUES (?, ?, ?, ?, ?)")
        .bind(run.to_string())
        .bind(at)
        .bind(event.kind.as_str())
        .bind(stage.filter(|_| event.on_stage))
        .bind(event.data.to_string())
        .execute(&mut **tx)
        .await
        .db()?;
    Ok(())
}

/// The events of one change of a run, in order and in one statement (one trip to SQLite's
/// thread, however many the change has); `stage` as for [`insert_event`].
async fn insert_events(
    tx: &mut WriteTx,
    run: RunId,
    at: Millis,
    events: &[kernel::Event],
    stage: Option<&str>,
) -> StoreResult<()> {
    let [first, rest @ ..] = events else {
        return Ok(());
    };
    if rest.is_empty() {
        return insert_event(tx, run, at, first, stage).await;
    }
    let rows: Vec<Value> = events
        .iter()
        .map(|event| {
            json!({
                "kind": event.kind.as_str(),
                "stage": stage.filter(|_| event.on_stage),
                "data": event.data.to_string(),
            })
        })
        .collect();
    sqlx::query(
        "INSERT INTO events (run_id, at, kind, stage, data) \
         SELECT ?1, ?2, json_extract(value, '$.kind'), json_extract(value, '$.stage'), \
         json_extract(value, '$.data') FROM json_each(?3) ORDER BY key",
    )
    .bind(run.to_string())
    .bind(at)
    .bind(Value::Array(rows).to_string())
    .execute(&mut **tx)
    .await
    .db()?;
    Ok(())
}

/// The `run_started` events of runs just claimed, in one statement.
async fn record_run_started(
    conn: &mut sqlx::SqliteConnection,
    runs: &[RunRecord],
    worker: &WorkerId,
    now: i64,
) -> StoreResult<()> {
    let started: Vec<Value> = runs
        .iter()
        .map(|run| {
            let event = kernel::run_started(worker.as_str(), run.fence);
            json!({"run_id": run.id.to_string(), "kind": event.kind.as_str(), "data": event.data})
        })
        .collect();
    sqlx::query(
        "INSERT INTO events (run_id, at, kind, stage, data) \
         SELECT json_extract(value, '$.run_id'), ?1, json_extract(value, '$.kind'), NULL, \
         json_extract(value, '$.data') FROM json_each(?2)",
    )
    .bind(now)
    .bind(Value::Array(started).to_string())
    .execute(conn)
    .await
    .db()?;
    Ok(())
}

/// Resets stages from `from` on to pending for a resume. With `keep_steps`, stage `from` keeps
/// its memoised steps and what they cost and reported (progress), so they are not redone.
async fn reset_stages_from(
    tx: &mut WriteTx,
    run: RunId,
    from: usize,
    keep_steps: bool,
) -> StoreResult<()> {
    let first_full_reset = if keep_steps {
        sqlx::query(
            "UPDATE stages SET status = 'pending', attempts = 0, started_at = NULL, finished_at = NULL, \
             output = NULL, error = NULL, next_attempt_at = NULL, reused_from = NULL WHERE run_id = ? AND idx = ?",
        )
        .bind(run.to_string())
        .bind(from as i64)
        .execute(&mut **tx)
        .await.db()?;
        from + 1
    } else {
        from
    };
    sqlx::query(
        "UPDATE stages SET status = 'pending', attempts = 0, started_at = NULL, finished_at = NULL, cost_micros = 0, \
         artifacts = '[]', output = NULL, error = NULL, progress_done = NULL, progress_total = NULL, \
         next_attempt_at = NULL, reused_from = NULL WHERE run_id = ? AND idx >= ?",
    )
    .bind(run.to_string())
    .bind(first_full_reset as i64)
    .execute(&mut **tx)
    .await.db()?;
    Ok(())
}

#[async_trait]
impl RunStore for SqliteStore {
    fn backend_name(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.db()?;
        Ok(())
    }

    async fn get_run(&self, id: RunId) -> StoreResult<Option<RunRecord>> {
        // One read transaction: the run, its last event and its stages are one snapshot.
        let mut read = self.pool.begin().await.db()?;
        let run = read_run(&mut read, id).await?;
        read.commit().await.db()?;
        Ok(run)
    }

    async fn list_runs(&self, filter: &RunFilter) -> StoreResult<RunPage> {
        let total: i64 = if filter.uncounted {
            0
        } else {
            let mut count = QueryBuilder::new("SELECT COUNT(*) AS n FROM runs");
            filtered(&mut count, filter, false);
            count
                .build()
                .fetch_one(&self.pool)
                .await
                .db()?
                .try_get("n")
                .db()?
        };
        let mut page = QueryBuilder::new("SELECT * FROM runs");
        filtered(&mut page, filter, true);
        page.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(filter.limit));
        let rows = page.build().fetch_all(&self.pool).await.db()?;
        let runs = rows
            .iter()
            .map(run_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(RunPage {
            runs,
            total: total as u64,
            scan: None,
        })
    }

    async fn heartbeat(&self, lease: &Lease, ttl: Duration) -> StoreResult<bool> {
        let (store, lease) = (self.clone(), lease.clone());
        detached(async move { store.heartbeat_now(&lease, ttl).await }).await
    }

    async fn steps(&self, run: RunId, stage: usize) -> StoreResult<Vec<StepRecord>> {
        let rows = sqlx::query(
            "SELECT key, output, cost_micros, artifacts FROM steps WHERE run_id = ? AND stage_idx = ? ORDER BY created_at",
        )
        .bind(run.to_string())
        .bind(stage as i64)
        .fetch_all(&self.pool)
        .await.db()?;
        rows.iter()
            .map(|row| {
                Ok(StepRecord {
                    key: row.try_get("key").db()?,
                    output: parse_json(Some(row.try_get("output").db()?), "step output")?
                        .unwrap_or(Value::Null),
                    cost_usd: Usd::from_micros(row.try_get("cost_micros").db()?),
                    artifacts: parse_json(Some(row.try_get("artifacts").db()?), "step artifacts")?
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    async fn record_reusable(&self, key: &str, checkpoint: &ReusableCheckpoint) -> StoreResult<()> {
        let (store, key, checkpoint) = (self.clone(), key.to_owned(), checkpoint.clone());
        detached(async move {
            let now = store.now();
            let mut tx = store.begin().await?;
            sqlx::query(
                "INSERT INTO reusable (key, run_id, stage, output, artifacts, created_at) VALUES (?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (key) DO UPDATE SET run_id = excluded.run_id, stage = excluded.stage, \
                 output = excluded.output, artifacts = excluded.artifacts, created_at = excluded.created_at",
            )
            .bind(&key)
            .bind(checkpoint.run_id.to_string())
            .bind(&checkpoint.stage)
            .bind(checkpoint.output.to_string())
            .bind(json_text(&checkpoint.artifacts))
            .bind(now)
            .execute(&mut *tx)
            .await.db()?;
            tx.commit().await.db()?;
            Ok(())
        })
        .await
    }

    async fn find_reusable(&self, key: &str) -> StoreResult<Option<ReusableCheckpoint>> {
        let row =
            sqlx::query("SELECT run_id, stage, output, artifacts FROM reusable WHERE key = ?")
                .bind(key)
                .fetch_optional(&self.pool)
                .await
                .db()?;
        let Some(row) = row else { return Ok(None) };
        let run_id: String = row.try_get("run_id").db()?;
        Ok(Some(ReusableCheckpoint {
            run_id: RunId::parse(&run_id)
                .ok_or_else(|| StoreError::Corrupt(format!("run id {run_id}")))?,
            stage: row.try_get("stage").db()?,
            output: parse_json(Some(row.try_get("output").db()?), "reusable output")?
                .unwrap_or(Value::Null),
            artifacts: parse_json(Some(row.try_get("artifacts").db()?), "reusable artifacts")?
                .unwrap_or_default(),
        }))
    }

    async fn purge_finished(&self, retention: Duration) -> StoreResult<u64> {
        let retention = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = self.now().saturating_sub(retention);
        // Bounded: at most PURGE_BATCH runs (with their stages, steps and events) per call.
        let store = self.clone();
        detached(async move {
            let mut tx = store.begin().await?;
            let deleted = sqlx::query(
                "DELETE FROM runs WHERE id IN (SELECT id FROM runs WHERE finished_at IS NOT NULL \
                 AND finished_at < ? ORDER BY finished_at LIMIT ?)",
            )
            .bind(cutoff)
            .bind(core_store::PURGE_BATCH as i64)
            .execute(&mut *tx)
            .await
            .db()?
            .rows_affected();
            tx.commit().await.db()?;
            Ok(deleted)
        })
        .await
    }

    async fn events_after(
        &self,
        run: RunId,
        after_seq: i64,
        limit: u32,
    ) -> StoreResult<Vec<RunEvent>> {
        let rows = sqlx::query(
            "SELECT seq, at, kind, stage, data FROM events WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(run.to_string())
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await.db()?;
        rows.iter()
            .map(|row| {
                Ok(RunEvent {
                    seq: row.try_get("seq").db()?,
                    run_id: run,
                    at: to_datetime(row.try_get("at").db()?),
                    kind: {
                        let kind: String = row.try_get("kind").db()?;
                        kernel::EventKind::parse(&kind)
                            .ok_or_else(|| StoreError::Corrupt(format!("event kind {kind}")))?
                    },
                    stage: row.try_get("stage").db()?,
                    data: parse_json(Some(row.try_get("data").db()?), "event data")?
                        .unwrap_or(Value::Null),
                })
            })
            .collect()
    }

    async fn run_positions(&self, runs: &[RunId]) -> StoreResult<Vec<RunPosition>> {
        let ids: Vec<String> = runs.iter().map(RunId::to_string).collect();
        let rows = sqlx::query(
            "SELECT r.id, r.status, (SELECT COALESCE(MAX(seq), 0) FROM events e WHERE e.run_id = r.id) AS last \
             FROM runs r WHERE r.id IN (SELECT value FROM json_each(?))",
        )
        .bind(json_text(&ids))
        .fetch_all(&self.pool)
        .await.db()?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id").db()?;
                let status: String = row.try_get("status").db()?;
                Ok(RunPosition {
                    run_id: RunId::parse(&id)
                        .ok_or_else(|| StoreError::Corrupt(format!("run id {id}")))?,
                    last_event_seq: row.try_get("last").db()?,
                    finished: RunStatus::parse(&status).is_none_or(RunStatus::is_finished),
                })
            })
            .collect()
    }

    async fn oldest_waiting(&self) -> StoreResult<Vec<QueueWait>> {
        // One index seek per queue and status (`runs_due`).
        let rows = sqlx::query(
            "SELECT queue, MIN(available_at) AS due FROM runs WHERE status IN ('queued', 'retrying') \
             GROUP BY queue ORDER BY queue",
        )
        .fetch_all(&self.pool)
        .await
        .db()?;
        rows.iter()
            .map(|row| {
                Ok(QueueWait {
                    queue: row.try_get("queue").db()?,
                    oldest_due_at: to_datetime(row.try_get("due").db()?),
                })
            })
            .collect()
    }

    async fn add_throughput(&self, counts: &[Throughput]) -> StoreResult<()> {
        let (store, counts) = (self.clone(), counts.to_vec());
        detached(async move { store.add_throughput_now(&counts).await }).await
    }

    async fn throughput(&self, since: DateTime<Utc>) -> StoreResult<Vec<Throughput>> {
        let rows = sqlx::query(
            "SELECT queue, minute, completed, failed, cancelled FROM throughput WHERE minute >= ? \
             ORDER BY minute, queue",
        )
        .bind(since.timestamp_millis())
        .fetch_all(&self.pool)
        .await
        .db()?;
        rows.iter()
            .map(|row| {
                let count = |column: &str| -> StoreResult<u64> {
                    Ok(row.try_get::<i64, _>(column).db()?.max(0) as u64)
                };
                Ok(Throughput {
                    queue: row.try_get("queue").db()?,
                    minute: to_datetime(row.try_get("minute").db()?),
                    completed: count("completed")?,
                    failed: count("failed")?,
                    cancelled: count("cancelled")?,
                })
            })
            .collect()
    }

    async fn queue_depths(&self) -> StoreResult<Vec<QueueDepth>> {
        let rows = sqlx::query("SELECT queue, status, COUNT(*) AS n FROM runs GROUP BY queue, status ORDER BY queue, status")
            .fetch_all(&self.pool)
            .await.db()?;
        rows.iter()
            .filter_map(|row| {
                let status: String = row.try_get("status").ok()?;
                Some(Ok(QueueDepth {
                    queue: row.try_get("queue").ok()?,
                    status: RunStatus::parse(&status)?,
                    count: row.try_get::<i64, _>("n").ok()? as u64,
                }))
            })
            .collect()
    }

    async fn worker_heartbeat(&self, worker: &WorkerInfo) -> StoreResult<()> {
        let (store, worker) = (self.clone(), worker.clone());
        detached(async move { store.worker_heartbeat_now(&worker).await }).await
    }

    async fn unregister_worker(&self, id: &WorkerId) -> StoreResult<()> {
        let (store, id) = (self.clone(), id.as_str().to_owned());
        detached(async move {
            let mut tx = store.begin().await?;
            sqlx::query("DELETE FROM workers WHERE id = ?")
                .bind(&id)
                .execute(&mut *tx)
                .await
                .db()?;
            tx.commit().await.db()?;
            Ok(())
        })
        .await
    }

    async fn list_workers(&self) -> StoreResult<Vec<WorkerInfo>> {
        let cutoff = self.now() - WORKER_STALE_AFTER.as_millis() as i64;
        sqlx::query("DELETE FROM workers WHERE heartbeat_at < ?")
            .bind(cutoff)
            .execute(&self.pool)
            .await
            .db()?;
        let rows = sqlx::query("SELECT * FROM workers ORDER BY started_at")
            .fetch_all(&self.pool)
            .await
            .db()?;
        rows.iter()
            .map(|row| {
                Ok(WorkerInfo {
                    id: WorkerId::from(row.try_get::<String, _>("id").db()?),
                    queues: parse_json(Some(row.try_get("queues").db()?), "worker queues")?
                        .unwrap_or_default(),
                    concurrency: row.try_get::<i64, _>("concurrency").db()? as u32,
                    started_at: to_datetime(row.try_get("started_at").db()?),
                    last_heartbeat: to_datetime(row.try_get("heartbeat_at").db()?),
                    running: parse_json(Some(row.try_get("running").db()?), "worker runs")?
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    async fn counters(&self) -> StoreResult<Vec<(String, f64)>> {
        let rows = sqlx::query("SELECT name, value FROM counters ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .db()?;
        rows.iter()
            .map(|row| Ok((row.try_get("name").db()?, row.try_get("value").db()?)))
            .collect()
    }

    async fn wait_for_work(&self, _queues: &[String], poll: Duration) {
        let _ = tokio::time::timeout(poll, self.work_available.notified()).await;
    }

    async fn insert_run(&self, run: NewRun) -> StoreResult<(RunRecord, bool)> {
        let store = self.clone();
        detached(async move { store.insert_run_now(run).await }).await
    }

    async fn claim(
        &self,
        queues: &[String],
        worker: &WorkerId,
        ttl: Duration,
        max: usize,
    ) -> StoreResult<Vec<Claimed>> {
        let (store, queues, worker) = (self.clone(), queues.to_vec(), worker.clone());
        detached(async move { store.claim_now(&queues, &worker, ttl, max).await }).await
    }

    async fn start_stage(&self, lease: &Lease, stage: usize) -> StoreResult<u32> {
        let (store, lease) = (self.clone(), lease.clone());
        detached(async move { store.start_stage_now(&lease, stage).await }).await
    }

    async fn record_step(
        &self,
        lease: &Lease,
        stage: usize,
        step: &StepRecord,
        progress: Progress,
    ) -> StoreResult<()> {
        let (store, lease, step) = (self.clone(), lease.clone(), step.clone());
        detached(async move { store.record_step_now(&lease, stage, &step, progress).await }).await
    }

    async fn commit_stage(
        &self,
        lease: &Lease,
        stage: usize,
        checkpoint: StageCheckpoint,
    ) -> StoreResult<()> {
        let (store, lease) = (self.clone(), lease.clone());
        detached(async move { store.commit_stage_now(&lease, stage, checkpoint).await }).await
    }

    async fn end_attempt(
        &self,
        lease: &Lease,
        stage: usize,
        outcome: StageOutcome,
    ) -> StoreResult<()> {
        let (store, lease) = (self.clone(), lease.clone());
        detached(async move { store.end_attempt_now(&lease, stage, outcome).await }).await
    }

    async fn fail_run(&self, lease: &Lease, error: RunError) -> StoreResult<()> {
        let (store, lease) = (self.clone(), lease.clone());
        detached(async move { store.fail_run_now(&lease, error).await }).await
    }

    async fn request_cancel(&self, id: RunId, actor: Actor) -> StoreResult<RunRecord> {
        let store = self.clone();
        detached(async move { store.request_cancel_now(id, actor).await }).await
    }

    async fn resume(
        &self,
        id: RunId,
        from: FromStage,
        changes: ResumeChanges,
    ) -> StoreResult<RunRecord> {
        let store = self.clone();
        detached(async move { store.resume_now(id, from, changes).await }).await
    }

    async fn sweep_expired_leases(&self) -> StoreResult<Vec<RunId>> {
        let store = self.clone();
        detached(async move { store.sweep_expired_leases_now().await }).await
    }

    async fn add_counters(&self, deltas: &[(String, f64)]) -> StoreResult<()> {
        let (store, deltas) = (self.clone(), deltas.to_vec());
        detached(async move { store.add_counters_now(&deltas).await }).await
    }
}

/// The write operations. The trait methods run each in a task of its own ([`detached`]): an
/// operation shares its transaction with others (group commit), so it must never be stopped
/// half-way because its caller was cancelled.
impl SqliteStore {
    async fn heartbeat_now(&self, lease: &Lease, ttl: Duration) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        // The new expiry counts from after the wait for the write lock.
        let now = self.now();
        let row = sqlx::query(
            "UPDATE runs SET lease_expires_at = ? WHERE id = ? AND fence = ? AND lease_owner = ? \
             RETURNING cancel_requested",
        )
        .bind(now + ttl.as_millis() as i64)
        .bind(lease.run_id.to_string())
        .bind(lease.fence.0)
        .bind(lease.worker.as_str())
        .fetch_optional(&mut *tx)
        .await
        .db()?;
        let Some(row) = row else {
            tx.rollback().await.db()?;
            return Err(StoreError::FenceRejected {
                run_id: lease.run_id,
                fence: lease.fence,
            });
        };
        let cancel_requested = row.try_get::<i64, _>("cancel_requested").db()? != 0;
        tx.commit().await.db()?;
        Ok(cancel_requested)
    }

    async fn worker_heartbeat_now(&self, worker: &WorkerInfo) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO workers (id, queues, concurrency, started_at, heartbeat_at, running) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, running = excluded.running",
        )
        .bind(worker.id.as_str())
        .bind(json_text(&worker.queues))
        .bind(i64::from(worker.concurrency))
        .bind(worker.started_at.timestamp_millis())
        .bind(self.now())
        .bind(json_text(&worker.running))
        .execute(&mut *tx)
        .await.db()?;
        tx.commit().await.db()?;
        Ok(())
    }

    async fn insert_run_now(&self, run: NewRun) -> StoreResult<(RunRecord, bool)> {
        let now = self.now();
        let mut tx = self.begin().await?;
        if let Some(key) = &run.idempotency_key {
            let existing =
                sqlx::query("SELECT id, idempotency_hash FROM runs WHERE idempotency_key = ?")
                    .bind(key)
                    .fetch_optional(&mut *tx)
                    .await
                    .db()?;
            if let Some(row) = existing {
                let id: String = row.try_get("id").db()?;
                let id =
                    RunId::parse(&id).ok_or_else(|| StoreError::Corrupt(format!("run id {id}")))?;
                let hash: Option<String> = row.try_get("idempotency_hash").db()?;
                if hash.is_some() && hash != run.request_hash {
                    tx.rollback().await.db()?;
                    return Err(StoreError::IdempotencyConflict(id));
                }
                // Read in this transaction (the run may have been inserted in the same group,
                // not committed yet), and answered once that group is committed.
                let record = read_run(&mut tx, id)
                    .await?
                    .ok_or(StoreError::NotFound(id))?;
                tx.commit().await.db()?;
                return Ok((record, false));
            }
        }
        sqlx::query(
            "INSERT INTO runs (id, kind, name, queue, inputs, status, provider_mode, budget_micros, available_at, \
             idempotency_key, idempotency_hash, created_at, updated_at, reuse) \
             VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(run.id.to_string())
        .bind(run.kind.as_str())
        .bind(&run.name)
        .bind(&run.queue)
        .bind(run.inputs.to_string())
        .bind(run.provider_mode.as_str())
        .bind(run.budget_usd.map(Usd::micros))
        .bind(now)
        .bind(&run.idempotency_key)
        .bind(&run.request_hash)
        .bind(now)
        .bind(now)
        .bind(i64::from(run.reuse))
        .execute(&mut *tx)
        .await.db()?;
        for (idx, name) in run.stage_names.iter().enumerate() {
            sqlx::query(
                "INSERT INTO stages (run_id, idx, name, status) VALUES (?, ?, ?, 'pending')",
            )
            .bind(run.id.to_string())
            .bind(idx as i64)
            .bind(name)
            .execute(&mut *tx)
            .await
            .db()?;
        }
        insert_event(&mut tx, run.id, now, &kernel::queued(&run.queue), None).await?;
        // The record as this transaction wrote it: once it is committed, the answer cannot fail.
        let record = read_run(&mut tx, run.id)
            .await?
            .ok_or(StoreError::NotFound(run.id))?;
        tx.commit().await.db()?;
        self.work_available.notify_waiters();
        Ok((record, true))
    }

    async fn claim_now(
        &self,
        queues: &[String],
        worker: &WorkerId,
        ttl: Duration,
        max: usize,
    ) -> StoreResult<Vec<Claimed>> {
        let asked = tokio::time::Instant::now();
        let now = self.now();
        // Idle workers ask often: answer "nothing due" from a read, without the write lock, so
        // polling never blocks (or waits for) writers.
        let due: i64 = sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM runs WHERE status IN ('queued', 'retrying') AND available_at <= ?1 \
             AND queue IN (SELECT value FROM json_each(?2))) AS due",
        )
        .bind(now)
        .bind(json_text(&queues))
        .fetch_one(&self.pool)
        .await.db()?
        .try_get("due").db()?;
        if due == 0 {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        // The lease runs from now, after the wait for the write lock, never from before it.
        let now = self.now();
        let rows = sqlx::query(
            "UPDATE runs SET status = 'running', lease_owner = ?1, worker = ?1, lease_expires_at = ?2, \
             fence = fence + 1, updated_at = ?3 \
             WHERE id IN (SELECT id FROM runs WHERE status IN ('queued', 'retrying') AND available_at <= ?3 \
                          AND queue IN (SELECT value FROM json_each(?4)) ORDER BY available_at, id LIMIT ?5) \
             RETURNING *",
        )
        .bind(worker.as_str())
        .bind(now + ttl.as_millis() as i64)
        .bind(now)
        .bind(json_text(&queues))
        .bind(max as i64)
        .fetch_all(&mut *tx)
        .await.db()?;
        if rows.is_empty() {
            tx.rollback().await.db()?;
            return Ok(Vec::new());
        }
        let mut runs = rows
            .iter()
            .map(run_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        record_run_started(&mut tx, &runs, worker, now).await?;
        tx.commit().await.db()?;
        runs.sort_by_key(|run| run.id);
        let mut stages_by_run = self.stages_of(&runs).await?;
        let claimed = runs
            .into_iter()
            .map(|mut run| {
                run.stages = stages_by_run.remove(&run.id).unwrap_or_default();
                let recovered = run.stages.iter().any(|s| s.status == StageStatus::Running);
                Claimed {
                    lease: Lease {
                        run_id: run.id,
                        worker: worker.clone(),
                        fence: run.fence,
                    },
                    run,
                    recovered,
                    asked,
                }
            })
            .collect();
        Ok(claimed)
    }

    /// The stages of these runs, read in one query.
    async fn stages_of(&self, runs: &[RunRecord]) -> StoreResult<HashMap<RunId, Vec<StageRecord>>> {
        let ids: Vec<String> = runs.iter().map(|run| run.id.to_string()).collect();
        let stage_rows = sqlx::query(
            "SELECT * FROM stages WHERE run_id IN (SELECT value FROM json_each(?)) ORDER BY run_id, idx",
        )
        .bind(json_text(&ids))
        .fetch_all(&self.pool)
        .await
        .db()?;
        let mut stages_by_run: HashMap<RunId, Vec<StageRecord>> = HashMap::new();
        for row in &stage_rows {
            let run_id: String = row.try_get("run_id").db()?;
            let run_id = RunId::parse(&run_id)
                .ok_or_else(|| StoreError::Corrupt(format!("stage of run {run_id}")))?;
            stages_by_run
                .entry(run_id)
                .or_default()
                .push(stage_from_row(row)?);
        }
        Ok(stages_by_run)
    }

    async fn start_stage_now(&self, lease: &Lease, stage: usize) -> StoreResult<u32> {
        let now = self.now();
        let mut tx = self.begin().await?;
        // The fence check and the run's own change in one statement.
        let fenced = sqlx::query(
            "UPDATE runs SET status = 'running', updated_at = ?1, \
             current_stage = (SELECT name FROM stages WHERE run_id = ?2 AND idx = ?3) \
             WHERE id = ?2 AND fence = ?4 AND lease_owner = ?5",
        )
        .bind(now)
        .bind(lease.run_id.to_string())
        .bind(stage as i64)
        .bind(lease.fence.0)
        .bind(lease.worker.as_str())
        .execute(&mut *tx)
        .await
        .db()?
        .rows_affected();
        if fenced != 1 {
            return Err(tx.refuse(lease).await);
        }
        let row = sqlx::query(
            "UPDATE stages SET status = 'running', attempts = attempts + 1, started_at = ?, finished_at = NULL, \
             error = NULL, next_attempt_at = NULL WHERE run_id = ? AND idx = ? RETURNING attempts, name",
        )
        .bind(now)
        .bind(lease.run_id.to_string())
        .bind(stage as i64)
        .fetch_optional(&mut *tx)
        .await.db()?
        .ok_or_else(|| StoreError::Corrupt(format!("run {} has no stage {stage}", lease.run_id)))?;
        let attempt = row.try_get::<i64, _>("attempts").db()? as u32;
        let name: String = row.try_get("name").db()?;
        insert_event(
            &mut tx,
            lease.run_id,
            now,
            &kernel::stage_started(attempt),
            Some(&name),
        )
        .await?;
        tx.commit().await.db()?;
        Ok(attempt)
    }

    async fn record_step_now(
        &self,
        lease: &Lease,
        stage: usize,
        step: &StepRecord,
        progress: Progress,
    ) -> StoreResult<()> {
        let now = self.now();
        let mut tx = self.begin_fenced(lease).await?;
        let inserted = sqlx::query(
            "INSERT INTO steps (run_id, stage_idx, key, output, cost_micros, artifacts, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(lease.run_id.to_string())
        .bind(stage as i64)
        .bind(&step.key)
        .bind(step.output.to_string())
        .bind(step.cost_usd.micros())
        .bind(json_text(&step.artifacts))
        .bind(now)
        .execute(&mut *tx)
        .await
        .db()?
        .rows_affected();
        if inserted == 1 {
            let name: String = sqlx::query(
                "UPDATE stages SET cost_micros = cost_micros + ?, progress_done = ?, progress_total = ? \
                 WHERE run_id = ? AND idx = ? RETURNING name",
            )
            .bind(step.cost_usd.micros())
            .bind(i64::from(progress.done))
            .bind(i64::from(progress.total))
            .bind(lease.run_id.to_string())
            .bind(stage as i64)
            .fetch_optional(&mut *tx)
            .await
            .db()?
            .ok_or_else(|| {
                StoreError::Corrupt(format!("run {} has no stage {stage}", lease.run_id))
            })?
            .try_get("name")
            .db()?;
            sqlx::query("UPDATE runs SET cost_micros = cost_micros + ? WHERE id = ?")
                .bind(step.cost_usd.micros())
                .bind(lease.run_id.to_string())
                .execute(&mut *tx)
                .await
                .db()?;
            insert_event(
                &mut tx,
                lease.run_id,
                now,
                &kernel::step_completed(step, progress),
                Some(&name),
            )
            .await?;
        }
        tx.commit().await.db()?;
        Ok(())
    }

    async fn commit_stage_now(
        &self,
        lease: &Lease,
        stage: usize,
        checkpoint: StageCheckpoint,
    ) -> StoreResult<()> {
        let now = self.now();
        let commit = kernel::commit(&checkpoint);
        let mut tx = self.begin().await?;
        // The fence check, the run's cost and (when it completes) its end: one statement.
        let fenced = sqlx::query(
            "UPDATE runs SET updated_at = ?1, cost_micros = cost_micros + ?2, \
             status = CASE WHEN ?7 THEN ?8 ELSE status END, \
             result = CASE WHEN ?7 THEN ?3 ELSE result END, \
             error = CASE WHEN ?7 THEN NULL ELSE error END, \
             finished_at = CASE WHEN ?7 THEN ?1 ELSE finished_at END, \
             current_stage = CASE WHEN ?7 THEN NULL ELSE current_stage END, \
             lease_owner = CASE WHEN ?7 THEN NULL ELSE lease_owner END, \
             lease_expires_at = CASE WHEN ?7 THEN NULL ELSE lease_expires_at END \
             WHERE id = ?4 AND fence = ?5 AND lease_owner = ?6",
        )
        .bind(now)
        .bind(checkpoint.cost_usd.micros())
        .bind(checkpoint.run_result.as_ref().map(Value::to_string))
        .bind(lease.run_id.to_string())
        .bind(lease.fence.0)
        .bind(lease.worker.as_str())
        .bind(commit.completes_run)
        .bind(RunStatus::Completed.as_str())
        .execute(&mut *tx)
        .await
        .db()?
        .rows_affected();
        if fenced != 1 {
            return Err(tx.refuse(lease).await);
        }
        let name: String = sqlx::query(
            "UPDATE stages SET status = ?, finished_at = ?, output = ?, artifacts = ?, \
             cost_micros = cost_micros + ?, error = NULL, next_attempt_at = NULL, reused_from = ? \
             WHERE run_id = ? AND idx = ? RETURNING name",
        )
        .bind(StageStatus::Completed.as_str())
        .bind(now)
        .bind(checkpoint.output.to_string())
        .bind(json_text(&checkpoint.artifacts))
        .bind(checkpoint.cost_usd.micros())
        .bind(checkpoint.reused_from.map(|id| id.to_string()))
        .bind(lease.run_id.to_string())
        .bind(stage as i64)
        .fetch_optional(&mut *tx)
        .await
        .db()?
        .ok_or_else(|| StoreError::Corrupt(format!("run {} has no stage {stage}", lease.run_id)))?
        .try_get("name")
        .db()?;
        insert_events(&mut tx, lease.run_id, now, &commit.events, Some(&name)).await?;
        tx.commit().await.db()?;
        Ok(())
    }

    async fn end_attempt_now(
        &self,
        lease: &Lease,
        stage: usize,
        outcome: StageOutcome,
    ) -> StoreResult<()> {
        let now = self.now();
        let end = kernel::attempt_end(&outcome);
        let later = |delay: Option<Duration>| delay.map(|d| now + d.as_millis() as i64);
        let mut tx = self.begin_fenced(lease).await?;
        let name: String = sqlx::query(
            "UPDATE stages SET status = ?, error = ?, finished_at = ?, next_attempt_at = ? \
             WHERE run_id = ? AND idx = ? RETURNING name",
        )
        .bind(end.stage.as_str())
        .bind(end.stage_error.as_ref().map(json_text))
        .bind(end.stage_finished.then_some(now))
        .bind(later(end.next_attempt_in))
        .bind(lease.run_id.to_string())
        .bind(stage as i64)
        .fetch_optional(&mut *tx)
        .await
        .db()?
        .ok_or_else(|| StoreError::Corrupt(format!("run {} has no stage {stage}", lease.run_id)))?
        .try_get("name")
        .db()?;
        sqlx::query(
            "UPDATE runs SET status = ?, error = COALESCE(?, error), finished_at = ?, \
             available_at = COALESCE(?, available_at), lease_owner = NULL, lease_expires_at = NULL WHERE id = ?",
        )
        .bind(end.run.as_str())
        .bind(end.run_error.as_ref().map(json_text))
        .bind(end.finishes_run().then_some(now))
        .bind(later(end.due_in))
        .bind(lease.run_id.to_string())
        .execute(&mut *tx)
        .await
        .db()?;
        insert_events(&mut tx, lease.run_id, now, &end.events, Some(&name)).await?;
        tx.commit().await.db()?;
        self.work_available.notify_waiters();
        Ok(())
    }

    async fn fail_run_now(&self, lease: &Lease, error: RunError) -> StoreResult<()> {
        let now = self.now();
        let (status, event) = kernel::run_failed(&error);
        let mut tx = self.begin_fenced(lease).await?;
        sqlx::query(
            "UPDATE runs SET status = ?, error = ?, finished_at = ?, lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = ?",
        )
        .bind(status.as_str())
        .bind(json_text(&error))
        .bind(now)
        .bind(lease.run_id.to_string())
        .execute(&mut *tx)
        .await
        .db()?;
        insert_event(&mut tx, lease.run_id, now, &event, None).await?;
        tx.commit().await.db()?;
        Ok(())
    }

    async fn request_cancel_now(&self, id: RunId, actor: Actor) -> StoreResult<RunRecord> {
        let now = self.now();
        let mut tx = self.begin().await?;
        let row = sqlx::query("SELECT status FROM runs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await
            .db()?
            .ok_or(StoreError::NotFound(id))?;
        let status: String = row.try_get("status").db()?;
        let status = RunStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("run status {status}")))?;
        let decided = match kernel::cancel(id, status, actor) {
            Ok(decided) => decided,
            Err(refused) => {
                tx.rollback().await.db()?;
                return Err(refused);
            }
        };
        match decided {
            kernel::Cancel::Now { run, event } => {
                sqlx::query(
                    "UPDATE runs SET status = ?, cancel_requested = 1, finished_at = ?2, updated_at = ?2 \
                     WHERE id = ?3",
                )
                .bind(run.as_str())
                .bind(now)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await
                .db()?;
                sqlx::query(
                    "UPDATE stages SET status = ?, finished_at = ?, next_attempt_at = NULL \
                     WHERE run_id = ? AND status = ?",
                )
                .bind(StageStatus::Cancelled.as_str())
                .bind(now)
                .bind(id.to_string())
                .bind(StageStatus::Retrying.as_str())
                .execute(&mut *tx)
                .await
                .db()?;
                insert_event(&mut tx, id, now, &event, None).await?;
            }
            kernel::Cancel::Requested { event } => {
                sqlx::query("UPDATE runs SET cancel_requested = 1, updated_at = ? WHERE id = ?")
                    .bind(now)
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await
                    .db()?;
                insert_event(&mut tx, id, now, &event, None).await?;
            }
        }
        let record = read_run(&mut tx, id)
            .await?
            .ok_or(StoreError::NotFound(id))?;
        tx.commit().await.db()?;
        Ok(record)
    }

    async fn resume_now(
        &self,
        id: RunId,
        from: FromStage,
        changes: ResumeChanges,
    ) -> StoreResult<RunRecord> {
        let now = self.now();
        let run = self.get_run(id).await?.ok_or(StoreError::NotFound(id))?;
        let from_idx = core_store::resume_start(&run, &from)?;
        let forget_steps = matches!(from, FromStage::Named(_));
        let mut tx = self.begin().await?;
        // The status check again, inside the write lock: a concurrent resume may have won.
        let from_name = run.stages[from_idx].name.clone();
        let (status, event) = kernel::resumed(&from_name, changes.actor);
        let updated = sqlx::query(
            "UPDATE runs SET status = ?, available_at = ?, updated_at = ?, result = NULL, error = NULL, \
             finished_at = NULL, cancel_requested = 0, current_stage = NULL, lease_owner = NULL, lease_expires_at = NULL, \
             inputs = COALESCE(?, inputs), budget_micros = COALESCE(?, budget_micros) \
             WHERE id = ? AND status = ?",
        )
        .bind(status.as_str())
        .bind(now)
        .bind(now)
        .bind(changes.inputs.as_ref().map(|inputs| inputs.to_string()))
        .bind(changes.budget_usd.map(Usd::micros))
        .bind(id.to_string())
        .bind(run.status.as_str())
        .execute(&mut *tx)
        .await.db()?
        .rows_affected();
        if updated != 1 {
            tx.rollback().await.db()?;
            return Err(StoreError::Conflict(format!(
                "run {id} changed while resuming; try again"
            )));
        }
        reset_stages_from(&mut tx, id, from_idx, !forget_steps).await?;
        if forget_steps {
            sqlx::query("DELETE FROM steps WHERE run_id = ? AND stage_idx >= ?")
                .bind(id.to_string())
                .bind(from_idx as i64)
                .execute(&mut *tx)
                .await
                .db()?;
        }
        insert_event(&mut tx, id, now, &event, Some(&from_name)).await?;
        let record = read_run(&mut tx, id)
            .await?
            .ok_or(StoreError::NotFound(id))?;
        tx.commit().await.db()?;
        self.work_available.notify_waiters();
        Ok(record)
    }

    async fn sweep_expired_leases_now(&self) -> StoreResult<Vec<RunId>> {
        let now = self.now();
        // Most sweeps find nothing: check with a read before taking the write lock.
        let expired: i64 = sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM runs WHERE status = 'running' AND lease_expires_at < ?) AS expired",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await.db()?
        .try_get("expired").db()?;
        if expired == 0 {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        let expired = sqlx::query(
            "SELECT id, worker, cancel_requested FROM runs WHERE status = ?1 AND lease_expires_at < ?2 \
             ORDER BY lease_expires_at LIMIT ?3",
        )
        .bind(RunStatus::Running.as_str())
        .bind(now)
        .bind(core_store::SWEEP_BATCH as i64)
        .fetch_all(&mut *tx)
        .await
        .db()?;
        let mut recovered = Vec::with_capacity(expired.len());
        for row in &expired {
            let id: String = row.try_get("id").db()?;
            let Some(id) = RunId::parse(&id) else {
                continue;
            };
            let worker: Option<String> = row.try_get("worker").db()?;
            let cancel_requested = row.try_get::<i64, _>("cancel_requested").db()? != 0;
            let expiry = kernel::lease_expired(cancel_requested, worker.as_deref());
            sqlx::query(
                "UPDATE runs SET status = ?1, updated_at = ?2, lease_owner = NULL, lease_expires_at = NULL, \
                 finished_at = CASE WHEN ?3 THEN finished_at ELSE ?2 END, \
                 available_at = CASE WHEN ?3 THEN ?2 ELSE available_at END WHERE id = ?4",
            )
            .bind(expiry.run.as_str())
            .bind(now)
            .bind(expiry.requeue)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .db()?;
            insert_event(&mut tx, id, now, &expiry.event, None).await?;
            if expiry.requeue {
                recovered.push(id);
            }
        }
        tx.commit().await.db()?;
        if !recovered.is_empty() {
            self.work_available.notify_waiters();
        }
        Ok(recovered)
    }

    async fn add_throughput_now(&self, counts: &[Throughput]) -> StoreResult<()> {
        if counts.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        for count in counts {
            sqlx::query(
                "INSERT INTO throughput (queue, minute, completed, failed, cancelled) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT (queue, minute) DO UPDATE SET completed = completed + excluded.completed, \
                 failed = failed + excluded.failed, cancelled = cancelled + excluded.cancelled",
            )
            .bind(&count.queue)
            .bind(count.minute.timestamp_millis())
            .bind(count.completed as i64)
            .bind(count.failed as i64)
            .bind(count.cancelled as i64)
            .execute(&mut *tx)
            .await
            .db()?;
        }
        let kept = i64::try_from(core_store::THROUGHPUT_KEPT.as_millis()).unwrap_or(i64::MAX);
        sqlx::query("DELETE FROM throughput WHERE minute < ?")
            .bind(self.now().saturating_sub(kept))
            .execute(&mut *tx)
            .await
            .db()?;
        tx.commit().await.db()?;
        Ok(())
    }

    async fn add_counters_now(&self, deltas: &[(String, f64)]) -> StoreResult<()> {
        if deltas.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        for (name, amount) in deltas {
            sqlx::query("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value")
                .bind(name)
                .bind(amount)
                .execute(&mut *tx)
                .await.db()?;
        }
        tx.commit().await.db()?;
        Ok(())
    }
}

/// Adds the listing's filters to `query` as a `WHERE` clause naming only the filters set, so
/// the planner picks the index of the narrowest one; `with_cursor` adds the page's cursor.
fn filtered(query: &mut QueryBuilder<sqlx::Sqlite>, filter: &RunFilter, with_cursor: bool) {
    let mut clause = " WHERE ";
    let mut and = |query: &mut QueryBuilder<sqlx::Sqlite>| {
        query.push(clause);
        clause = " AND ";
    };
    for (column, value) in [
        ("kind", filter.kind.map(RunKind::as_str).map(str::to_owned)),
        ("status", filter.status.map(|s| s.as_str().to_owned())),
        ("name", filter.name.clone()),
        ("queue", filter.queue.clone()),
        // With `error IS NOT NULL`, the clause is the partial index `runs_error_code`'s.
        (
            "error IS NOT NULL AND json_extract(error, '$.code')",
            filter.error_code.clone(),
        ),
    ] {
        if let Some(value) = value {
            and(query);
            query.push(column).push(" = ").push_bind(value);
        }
    }
    if let Some(since) = filter.since {
        and(query);
        query.push("id >= ").push_bind(since.to_string());
    }
    if let Some(until) = filter.until {
        and(query);
        query.push("id < ").push_bind(until.to_string());
    }
    if let Some(before) = filter.before.filter(|_| with_cursor) {
        and(query);
        query.push("id < ").push_bind(before.to_string());
    }
    if let Some(min) = filter.min_cost {
        and(query);
        query.push("cost_micros >= ").push_bind(min.micros());
    }
    if let Some(max) = filter.max_cost {
        and(query);
        query.push("cost_micros <= ").push_bind(max.micros());
    }
    if let Some(text) = &filter.input_text {
        and(query);
        // The trigram index finds three characters or more; shorter text matches nothing.
        if text.chars().count() < core_store::MIN_SEARCH_CHARS {
            query.push("0");
            return;
        }
        // One phrase of the trigram index: the text anywhere inside one value.
        query
            .push("id IN (SELECT run_id FROM run_search WHERE rowid IN (SELECT rowid FROM run_search_index WHERE run_search_index MATCH ")
            .push_bind(format!("\"{}\"", text.replace('"', "\"\"")))
            .push("))");
    }
}

/// Runs a write operation to completion whatever happens to the caller.
async fn detached<T: Send + 'static>(
    operation: impl std::future::Future<Output = StoreResult<T>> + Send + 'static,
) -> StoreResult<T> {
    tokio::spawn(operation)
        .await
        .map_err(|e| StoreError::Unavailable(format!("write task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use futures::future::join_all;

    use super::*;
    use stagecraft_core::{clock::SystemClock, ids::FenceToken};

    async fn store(dir: &tempfile::TempDir) -> SqliteStore {
        let url = sqlite_url_for(&dir.path().join("s.db"));
        SqliteStore::open(&url, Arc::new(SystemClock))
            .await
            .expect("open")
    }

    fn new_run(id: RunId) -> NewRun {
        NewRun {
            id,
            ..stagecraft_core::testing::workflow_run("noop", "workflows", &["noop"])
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_grouped_and_every_ok_is_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(&dir).await;
        let ids: Vec<RunId> = (0..300).map(|_| RunId::generate()).collect();
        let results = join_all(ids.iter().map(|id| store.insert_run(new_run(*id)))).await;
        assert!(results.iter().all(Result::is_ok));
        // A fresh store on the same file sees every acknowledged write.
        let reopened = super::tests::store(&dir).await;
        let total = reopened
            .list_runs(&RunFilter {
                limit: 1,
                ..RunFilter::default()
            })
            .await
            .expect("list")
            .total;
        assert_eq!(total, 300);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_lease_is_swept_and_its_holder_fenced_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = stagecraft_core::clock::ManualClock::starting_now();
        let url = sqlite_url_for(&dir.path().join("s.db"));
        let store = SqliteStore::open(&url, Arc::new(clock.clone()))
            .await
            .expect("open");
        store
            .insert_run(new_run(RunId::generate()))
            .await
            .expect("insert");
        let queues = ["workflows".to_owned()];
        let ttl = Duration::from_secs(10);
        let first = store
            .claim(&queues, &WorkerId::from("a".to_owned()), ttl, 1)
            .await
            .expect("claim");
        let lease = first[0].lease.clone();
        store.start_stage(&lease, 0).await.expect("start");
        // Within the lease nothing is swept, and a heartbeat extends it.
        clock.advance(Duration::from_secs(9));
        assert!(
            store
                .sweep_expired_leases()
                .await
                .expect("sweep")
                .is_empty()
        );
        store.heartbeat(&lease, ttl).await.expect("heartbeat");
        clock.advance(Duration::from_secs(9));
        assert!(
            store
                .sweep_expired_leases()
                .await
                .expect("sweep")
                .is_empty()
        );
        // Past it, the run is re-queued and taken by another worker with a larger fence.
        clock.advance(Duration::from_secs(2));
        assert_eq!(
            store.sweep_expired_leases().await.expect("sweep"),
            vec![lease.run_id]
        );
        let second = store
            .claim(&queues, &WorkerId::from("b".to_owned()), ttl, 1)
            .await
            .expect("claim");
        assert!(second[0].lease.fence > lease.fence);
        assert!(second[0].recovered);
        let refused = store.heartbeat(&lease, ttl).await;
        assert!(
            matches!(refused, Err(StoreError::FenceRejected { .. })),
            "{refused:?}"
        );
        let refused = store.end_attempt(&lease, 0, StageOutcome::Abandoned).await;
        assert!(
            matches!(refused, Err(StoreError::FenceRejected { .. })),
            "{refused:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_fence_in_a_group_fails_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(&dir).await;
        for _ in 0..20 {
            store
                .insert_run(new_run(RunId::generate()))
                .await
                .expect("insert");
        }
        let worker = WorkerId::from("w".to_owned());
        let claimed = store
            .claim(
                &["workflows".to_owned()],
                &worker,
                Duration::from_secs(30),
                20,
            )
            .await
            .expect("claim");
        assert_eq!(claimed.len(), 20);
        let stale = |c: &Claimed| Lease {
            fence: FenceToken(c.lease.fence.0 - 1),
            ..c.lease.clone()
        };
        let starts = join_all(claimed.iter().enumerate().map(|(i, c)| {
            let lease = if i % 2 == 0 {
                stale(c)
            } else {
                c.lease.clone()
            };
            let store = store.clone();
            async move { store.start_stage(&lease, 0).await }
        }))
        .await;
        for (i, result) in starts.iter().enumerate() {
            if i % 2 == 0 {
                assert!(
                    matches!(result, Err(StoreError::FenceRejected { .. })),
                    "{result:?}"
                );
            } else {
                assert_eq!(result.as_ref().expect("started"), &1);
            }
        }
        for (i, c) in claimed.iter().enumerate() {
            let run = store.get_run(c.run.id).await.expect("get").expect("run");
            let expected = if i % 2 == 0 {
                StageStatus::Pending
            } else {
                StageStatus::Running
            };
            assert_eq!(run.stages[0].status, expected);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_poisons_only_its_group_and_ok_still_means_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(&dir).await;
        let taken = RunId::generate();
        store.insert_run(new_run(taken)).await.expect("insert");
        // A duplicate id fails after the transaction began; whatever shares its group fails with
        // it, and everything else commits. Either way, Ok must mean written.
        let mut attempts: Vec<RunId> = (0..50).map(|_| RunId::generate()).collect();
        attempts.insert(25, taken);
        let results = join_all(attempts.iter().map(|id| store.insert_run(new_run(*id)))).await;
        assert!(results[25].is_err(), "the duplicate must fail");
        for (id, result) in attempts.iter().zip(&results) {
            let stored = store.get_run(*id).await.expect("get").is_some();
            if result.is_ok() {
                assert!(stored, "{id} acknowledged but not stored");
            } else if *id != taken {
                assert!(!stored, "{id} reported failed but stored");
            }
        }
        // The store keeps working afterwards.
        store
            .insert_run(new_run(RunId::generate()))
            .await
            .expect("insert after a failure");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_caller_does_not_break_the_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(&dir).await;
        let ids: Vec<RunId> = (0..100).map(|_| RunId::generate()).collect();
        let futures = ids.iter().enumerate().map(|(i, id)| {
            let store = store.clone();
            let id = *id;
            async move {
                if i % 3 == 0 {
                    // Give up at once: the write goes on without its caller.
                    let _ = tokio::time::timeout(
                        Duration::from_micros(1),
                        store.insert_run(new_run(id)),
                    )
                    .await;
                    None
                } else {
                    Some(store.insert_run(new_run(id)).await.is_ok())
                }
            }
        });
        let outcomes = join_all(futures).await;
        assert!(
            outcomes.iter().flatten().all(|ok| *ok),
            "a write failed: {outcomes:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (i, id) in ids.iter().enumerate() {
            if i % 3 != 0 {
                assert!(store.get_run(*id).await.expect("get").is_some());
            }
        }
    }
}
