//! The PostgreSQL run store: API and workers on any number of hosts against one PostgreSQL
//! database, with the same behaviour as the embedded SQLite store.
//!
//! Every fenced write is one transaction whose first statement is the fence check, an `UPDATE`
//! of the run's row conditional on its fencing token and lease owner: it matches nothing for a
//! stale lease (refused with [`StoreError::FenceRejected`]), and otherwise holds the run's row
//! lock until the transaction ends, so no other write to the run (a claim, a sweep, a cancel)
//! interleaves with it. Claims lock due runs with `FOR NO KEY UPDATE SKIP LOCKED`, so concurrent
//! claimers never wait for each other and never take the same run.
//!
//! Times come from the store's clock, never the server's `now()`, so every process (and a test's
//! manual clock) decides due times and lease expiries as the SQLite store does.
//!
//! Idle workers `LISTEN` on [`WAKE_CHANNEL`]; writes that make a run due `NOTIFY` it with the
//! run's queue in the same transaction (see [`RunStore::wait_for_work`] below). Waits are always
//! bounded by the poll interval and the next due retry, so a lost notification (a reconnect, a
//! transaction-mode pooler that cannot `LISTEN`) delays a run by at most one poll.

/// The columns a run is read from (`rows::run_from_row`), for `SELECT` and `RETURNING`.
macro_rules! run_columns {
    () => {
        "id, kind, name, queue, inputs, status, provider_mode, budget_micros, cost_micros, \
         current_stage, result, error, worker, fence, lease_expires_at, cancel_requested, \
         created_at, updated_at, finished_at, reuse"
    };
}

/// The columns a stage is read from (`rows::stage_from_row`).
macro_rules! stage_columns {
    () => {
        "run_id, idx, name, status, attempts, started_at, finished_at, cost_micros, artifacts, \
         output, error, progress_done, progress_total, next_attempt_at, reused_from"
    };
}

/// A stage's columns as the fields of a JSON object (`rows::StoredStage`), for a run's stages
/// read with it: `json_build_object(stage_fields!())` of `stages s`.
macro_rules! stage_fields {
    () => {
        "'name', s.name, 'status', s.status, 'attempts', s.attempts, 'started_at', s.started_at, \
         'finished_at', s.finished_at, 'cost_micros', s.cost_micros, 'artifacts', s.artifacts, \
         'output', s.output, 'error', s.error, 'progress_done', s.progress_done, \
         'progress_total', s.progress_total, 'next_attempt_at', s.next_attempt_at, \
         'reused_from', s.reused_from"
    };
}

mod rows;

pub use rows::search_text;

use std::{
    collections::{BTreeMap, BTreeSet},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rows::{claimed_run, count, json_text, parse_json, read_run, run_from_row, run_id};
use serde_json::Value;
use sqlx::{
    PgConnection, Postgres, QueryBuilder, Row,
    postgres::{
        PgArguments, PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgQueryResult, PgRow,
    },
};
use tokio::time::Instant;

use stagecraft_core::{
    clock::{Millis, SharedClock},
    ids::{FenceToken, RunId, WorkerId},
    money::Usd,
    store::{
        self as core_store, Actor, Claimed, FromStage, Lease, NewRun, Progress, QueueDepth,
        QueueWait, ResumeChanges, ReusableCheckpoint, RunError, RunEvent, RunFilter, RunKind,
        RunPage, RunPosition, RunRecord, RunStatus, RunStore, StageCheckpoint, StageOutcome,
        StageStatus, StepRecord, StoreError, StoreResult, Throughput, WORKER_STALE_AFTER,
        WorkerInfo, kernel, to_datetime,
    },
};

/// The notification channel of idle workers; a notification's payload is the queue that has a
/// run due (or a retry newly scheduled). The name is frozen: processes of different versions
/// share it.
pub const WAKE_CHANNEL: &str = "stagecraft_wake";

/// Connections of the store's pool (the `LISTEN` connection is one more).
const MAX_CONNECTIONS: u32 = 10;

/// How long an operation waits for a connection of the pool before the store is unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connecting the `LISTEN` connection may take.
const LISTEN_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// After `LISTEN` could not be set up, idle workers poll for this long before it is tried again.
const LISTEN_RETRY: Duration = Duration::from_secs(5);

/// Most stale notifications a wait discards before it checks for due runs.
const MAX_DRAINED: usize = 1024;

/// Whether a database error's SQLSTATE means the server cannot serve now, and the same request
/// may succeed shortly: connection exceptions (class 08), too many connections, a server
/// shutting down or starting up, a standby that does not accept writes (yet: during a
/// failover, the address may reach it before its promotion), and the serialization failures
/// and deadlocks PostgreSQL resolves by aborting one transaction.
fn transient(sqlstate: &str) -> bool {
    sqlstate.starts_with("08")
        || matches!(
            sqlstate,
            "53300" | "57P01" | "57P02" | "57P03" | "25006" | "40001" | "40P01"
        )
}

/// sqlx's failures as the store reports them: a server that cannot be reached or answers that
/// it cannot serve now is the store being unavailable (503 and try again), anything else a
/// database error (including TLS that cannot be set up as the URL asks: a server without TLS,
/// a certificate that is not trusted; waiting would not change it).
fn store_error(error: sqlx::Error) -> StoreError {
    let unavailable = match &error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Io(io) => !stagecraft_core::store::refuses_the_server(io),
        // The TLS request of a new connection went unanswered: an address that accepts and
        // closes (a proxy or load balancer whose server is down, a failover under way).
        sqlx::Error::Protocol(message) => message.contains("SSLRequest"),
        sqlx::Error::Database(db) => db.code().is_some_and(|code| transient(&code)),
        _ => false,
    };
    if unavailable {
        StoreError::Unavailable(error.to_string())
    } else {
        StoreError::Database(error.to_string())
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

/// A write transaction of the pool.
type Tx = sqlx::Transaction<'static, Postgres>;

/// Milliseconds of a duration, saturating.
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// An engine defect: the leased run has no stage `stage`.
fn no_stage(lease: &Lease, stage: usize) -> StoreError {
    StoreError::Corrupt(format!("run {} has no stage {stage}", lease.run_id))
}

/// The stage name a fenced `UPDATE stages … RETURNING name` answered (none: [`no_stage`]).
fn stage_name(row: Option<PgRow>, lease: &Lease, stage: usize) -> StoreResult<String> {
    row.ok_or_else(|| no_stage(lease, stage))?
        .try_get("name")
        .db()
}

fn fence_rejected(lease: &Lease) -> StoreError {
    StoreError::FenceRejected {
        run_id: lease.run_id,
        fence: lease.fence,
    }
}

/// Ends a transaction whose fenced statement matched nothing: the lease is not current.
async fn refuse(tx: Tx, lease: &Lease) -> StoreError {
    // Nothing was written; a rollback that fails only costs the connection.
    let _ = tx.rollback().await;
    fence_rejected(lease)
}

/// How the store reaches PostgreSQL: directly or through a pooler in session mode (a client
/// keeps its server connection), or through a pooler in transaction mode (PgBouncer's
/// `pool_mode = transaction`: a server connection is a client's only for one transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolMode {
    #[default]
    Session,
    Transaction,
}

/// Where and how a [`PostgresStore`] connects.
#[derive(Clone, Default)]
pub struct PostgresOptions {
    /// `postgres://user:password@host:port/db`: the database, or a pooler in front of it.
    pub url: String,
    pub mode: PoolMode,
    /// With [`PoolMode::Transaction`]: the database itself, not through the pooler, for what
    /// needs a session (the schema's migrations under their advisory lock, and the `LISTEN`
    /// connection of idle workers). Without it, idle workers poll and the schema must have
    /// been migrated already (`stagecraft migrate` with this URL set, from any host).
    pub direct_url: Option<String>,
}

/// A statement with its arguments bound.
type Statement<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// Never the URLs: they may carry passwords.
impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("mode", &self.mode)
            .field("direct_url", &self.direct_url.as_ref().map(|_| "…"))
            .finish_non_exhaustive()
    }
}

/// Statements as the pool mode allows them. Directly, sqlx prepares each statement once per
/// connection under a name and reuses it. A transaction-mode pooler hands one server
/// connection to many clients, whose statement names collide: there, every statement is
/// unnamed (parsed each time).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sql {
    named: bool,
}

impl Sql {
    pub(crate) fn query<'q>(self, text: &'static str) -> Statement<'q> {
        sqlx::query(text).persistent(self.named)
    }
}

/// A connection for statements outside a write transaction. Through a transaction-mode pooler
/// it is a transaction even so: sqlx parses and binds a statement in two exchanges, which the
/// pooler may send to different server connections unless a transaction pins one.
enum Session {
    Direct(sqlx::pool::PoolConnection<Postgres>),
    Pinned(Tx),
}

impl Session {
    /// Ends the session: commits what a pinned one did.
    async fn done(self) -> StoreResult<()> {
        match self {
            Self::Direct(_) => Ok(()),
            Self::Pinned(tx) => tx.commit().await.db(),
        }
    }
}

impl std::ops::Deref for Session {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match self {
            Self::Direct(conn) => conn,
            Self::Pinned(tx) => tx,
        }
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            Self::Direct(conn) => conn,
            Self::Pinned(tx) => tx,
        }
    }
}

/// Idle workers' wake-ups: one `LISTEN` connection per store, used by one waiting worker at a
/// time (a worker process has one claim loop).
#[derive(Debug, Default)]
struct Wake {
    listener: Option<PgListener>,
    /// After `LISTEN` could not be set up: not tried again before then (waits poll meanwhile).
    retry_at: Option<Instant>,
}

/// The PostgreSQL implementation of [`RunStore`].
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    sql: Sql,
    mode: PoolMode,
    /// A pool of one connection, for the `LISTEN` connection alone (reconnected by sqlx); none
    /// behind a transaction-mode pooler without a direct URL (idle workers poll).
    listen_pool: Option<PgPool>,
    /// The direct URL's options, for migrations behind a transaction-mode pooler.
    direct: Option<PgConnectOptions>,
    clock: SharedClock,
    wake: Arc<tokio::sync::Mutex<Wake>>,
}

/// Never the connection options: they carry the password.
impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("mode", &self.mode)
            .field("listens", &self.listen_pool.is_some())
            .finish_non_exhaustive()
    }
}

/// The migrations of `migrations/postgres`.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

impl PostgresStore {
    /// Connects directly to the database of `database_url`
    /// (`postgres://user:password@host:port/db`) and brings its schema up to date.
    pub async fn open(database_url: &str, clock: SharedClock) -> StoreResult<Self> {
        let options = PostgresOptions {
            url: database_url.to_owned(),
            ..PostgresOptions::default()
        };
        Self::connect(&options, clock).await
    }

    /// Connects as `options` say and brings the schema up to date (behind a transaction-mode
    /// pooler without a direct URL: checks that it is).
    pub async fn connect(options: &PostgresOptions, clock: SharedClock) -> StoreResult<Self> {
        let connect = |url: &str| -> StoreResult<PgConnectOptions> {
            Ok(PgConnectOptions::from_str(url)
                .db()?
                .application_name("stagecraft"))
        };
        let pooled = connect(&options.url)?;
        let direct = match (&options.direct_url, options.mode) {
            (Some(url), PoolMode::Transaction) => Some(connect(url)?),
            _ => None,
        };
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(pooled.clone())
            .await
            .db()?;
        // Connected on first wait: API processes never hold it.
        let listen_on = match options.mode {
            PoolMode::Session => Some(pooled),
            PoolMode::Transaction => direct.clone(),
        };
        let listen_pool = listen_on.map(|on| {
            PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(LISTEN_CONNECT_TIMEOUT)
                .max_lifetime(None)
                .idle_timeout(None)
                .connect_lazy_with(on)
        });
        let store = Self {
            pool,
            sql: Sql {
                named: options.mode == PoolMode::Session,
            },
            mode: options.mode,
            listen_pool,
            direct,
            clock,
            wake: Arc::new(tokio::sync::Mutex::new(Wake::default())),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the migrations in `migrations/postgres`. Safe to run from several processes at
    /// once (sqlx holds a session's advisory lock while it migrates, so behind a
    /// transaction-mode pooler this runs on the direct URL; without one it only checks that
    /// every migration was applied).
    pub async fn migrate(&self) -> StoreResult<()> {
        match (self.mode, &self.direct) {
            (PoolMode::Session, _) => MIGRATOR.run(&self.pool).await.db(),
            (PoolMode::Transaction, Some(direct)) => {
                let mut conn = sqlx::ConnectOptions::connect(direct).await.db()?;
                let migrated = MIGRATOR.run(&mut conn).await.db();
                // The connection is only closed: a failure to say goodbye changes nothing.
                let _ = sqlx::Connection::close(conn).await;
                migrated
            }
            (PoolMode::Transaction, None) => self.check_migrated().await,
        }
    }

    /// Fails unless the schema is exactly what this version's migrations make, as sqlx's
    /// migrator would decide: every migration applied, with the same checksum, and none this
    /// version does not know (a newer schema).
    async fn check_migrated(&self) -> StoreResult<()> {
        let mut session = self.session().await?;
        let applied = self
            .sql
            .query("SELECT version, checksum FROM _sqlx_migrations WHERE success")
            .fetch_all(&mut *session)
            .await;
        session.done().await?;
        let applied: BTreeMap<i64, Vec<u8>> = match applied {
            Ok(rows) => rows
                .iter()
                .map(|row| Ok((row.try_get("version")?, row.try_get("checksum")?)))
                .collect::<Result<_, sqlx::Error>>()
                .db()?,
            // No table of migrations yet: none applied.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P01") => {
                BTreeMap::new()
            }
            Err(error) => return Err(store_error(error)),
        };
        let known: BTreeMap<i64, &[u8]> = MIGRATOR
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .map(|m| (m.version, m.checksum.as_ref()))
            .collect();
        let refuse = |what: String| {
            StoreError::Migrate(format!(
                "{what}: behind a transaction-mode pooler, run `stagecraft migrate` with \
                 DATABASE_DIRECT_URL (the database itself, not the pooler) set, or set it for \
                 every process"
            ))
        };
        if let Some(newer) = applied.keys().find(|v| !known.contains_key(v)) {
            return Err(StoreError::Migrate(format!(
                "the schema has migration {newer}, which this version does not know: run the \
                 version that applied it, or a newer one"
            )));
        }
        let missing: Vec<String> = known
            .keys()
            .filter(|v| !applied.contains_key(v))
            .map(ToString::to_string)
            .collect();
        if !missing.is_empty() {
            return Err(refuse(format!(
                "the schema lacks migrations {}",
                missing.join(", ")
            )));
        }
        let differs = |(version, sum): &(&i64, &&[u8])| {
            applied
                .get(*version)
                .is_some_and(|stored| stored.as_slice() != **sum)
        };
        if let Some((changed, _)) = known.iter().find(differs) {
            return Err(refuse(format!(
                "migration {changed} was applied with other contents than this version's"
            )));
        }
        Ok(())
    }

    /// One statement outside a write transaction, on a [`Session`]; its rows.
    async fn fetch_all(&self, query: Statement<'_>) -> StoreResult<Vec<PgRow>> {
        let mut session = self.session().await?;
        let rows = query.fetch_all(&mut *session).await.db()?;
        session.done().await?;
        Ok(rows)
    }

    /// One statement outside a write transaction; its row, if any.
    async fn fetch_optional(&self, query: Statement<'_>) -> StoreResult<Option<PgRow>> {
        let mut session = self.session().await?;
        let row = query.fetch_optional(&mut *session).await.db()?;
        session.done().await?;
        Ok(row)
    }

    /// One statement outside a write transaction; its one row.
    async fn fetch_one(&self, query: Statement<'_>) -> StoreResult<PgRow> {
        let mut session = self.session().await?;
        let row = query.fetch_one(&mut *session).await.db()?;
        session.done().await?;
        Ok(row)
    }

    /// One statement outside a write transaction; what it changed.
    async fn execute(&self, query: Statement<'_>) -> StoreResult<PgQueryResult> {
        let mut session = self.session().await?;
        let done = query.execute(&mut *session).await.db()?;
        session.done().await?;
        Ok(done)
    }

    /// A connection for statements outside a write transaction (see [`Session`]).
    async fn session(&self) -> StoreResult<Session> {
        Ok(match self.mode {
            PoolMode::Session => Session::Direct(self.pool.acquire().await.db()?),
            PoolMode::Transaction => Session::Pinned(self.begin().await?),
        })
    }

    fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    async fn begin(&self) -> StoreResult<Tx> {
        self.pool.begin().await.db()
    }

    /// Opens a write transaction that holds only if `lease` is still the run's current lease:
    /// its first statement checks the lease and locks the run's row until the transaction ends.
    async fn begin_fenced(&self, lease: &Lease) -> StoreResult<Tx> {
        let mut tx = self.begin().await?;
        let updated = self
            .sql
            .query(
                "UPDATE runs SET updated_at = $1 WHERE id = $2 AND fence = $3 AND lease_owner = $4",
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
            return Err(refuse(tx, lease).await);
        }
        Ok(tx)
    }
}

/// The kernel's events as the columns of an `UNNEST`: kinds, whether each is about the stage
/// the change is on, and their data.
struct EventColumns {
    kinds: Vec<String>,
    on_stage: Vec<bool>,
    data: Vec<String>,
}

impl EventColumns {
    fn of(events: &[kernel::Event]) -> Self {
        Self {
            kinds: events.iter().map(|e| e.kind.as_str().to_owned()).collect(),
            on_stage: events.iter().map(|e| e.on_stage).collect(),
            data: events.iter().map(|e| e.data.to_string()).collect(),
        }
    }
}

impl PostgresStore {
    /// Why a fenced single-statement write matched nothing: the lease is not current, or (an
    /// engine defect) the run has no such stage.
    async fn refused(&self, lease: &Lease, stage: usize) -> StoreError {
        let stageless = self
            .fetch_optional(
                self.sql
                    .query(
                        "SELECT 1 FROM runs WHERE id = $1 \
                         AND NOT EXISTS (SELECT 1 FROM stages WHERE run_id = $1 AND idx = $2)",
                    )
                    .bind(lease.run_id.to_string())
                    .bind(stage as i64),
            )
            .await;
        match stageless {
            Ok(Some(_)) => no_stage(lease, stage),
            Ok(None) => fence_rejected(lease),
            Err(error) => error,
        }
    }
}

/// Appends one of the kernel's events; `stage` is the name of the stage the change is about,
/// which the event names when it is on that stage.
async fn insert_event(
    sql: Sql,
    conn: &mut PgConnection,
    run: RunId,
    at: Millis,
    event: &kernel::Event,
    stage: Option<&str>,
) -> StoreResult<()> {
    sql.query("INSERT INTO events (run_id, at, kind, stage, data) VALUES ($1, $2, $3, $4, $5)")
        .bind(run.to_string())
        .bind(at)
        .bind(event.kind.as_str())
        .bind(stage.filter(|_| event.on_stage))
        .bind(event.data.to_string())
        .execute(conn)
        .await
        .db()?;
    Ok(())
}

/// Tells idle workers that `queue` may have a run due, when the transaction on `conn` commits.
async fn notify_queue(sql: Sql, conn: &mut PgConnection, queue: &str) -> StoreResult<()> {
    sql.query("SELECT pg_notify($1, $2)")
        .bind(WAKE_CHANNEL)
        .bind(queue)
        .execute(conn)
        .await
        .db()?;
    Ok(())
}

/// Writes what the input search matches for `run`'s new inputs (whether or not a row is there).
async fn index_inputs(
    sql: Sql,
    conn: &mut PgConnection,
    run: RunId,
    inputs: &Value,
) -> StoreResult<()> {
    sql.query(
        "INSERT INTO run_search (run_id, search_text) VALUES ($1, $2) \
         ON CONFLICT (run_id) DO UPDATE SET search_text = EXCLUDED.search_text",
    )
    .bind(run.to_string())
    .bind(search_text(inputs))
    .execute(conn)
    .await
    .db()?;
    Ok(())
}

/// Resets stages from `from` on to pending for a resume. With `keep_steps`, stage `from` keeps
/// its memoised steps and what they cost and reported (progress), so they are not redone;
/// without, the steps of `from` and later are forgotten.
async fn reset_stages_from(
    sql: Sql,
    conn: &mut PgConnection,
    run: RunId,
    from: usize,
    keep_steps: bool,
) -> StoreResult<()> {
    let first_full_reset = if keep_steps {
        sql.query(
            "UPDATE stages SET status = $1, attempts = 0, started_at = NULL, finished_at = NULL, \
             output = NULL, error = NULL, next_attempt_at = NULL, reused_from = NULL \
             WHERE run_id = $2 AND idx = $3",
        )
        .bind(StageStatus::Pending.as_str())
        .bind(run.to_string())
        .bind(from as i64)
        .execute(&mut *conn)
        .await
        .db()?;
        from + 1
    } else {
        from
    };
    sql.query(
        "UPDATE stages SET status = $1, attempts = 0, started_at = NULL, finished_at = NULL, \
         cost_micros = 0, artifacts = '[]', output = NULL, error = NULL, progress_done = NULL, \
         progress_total = NULL, next_attempt_at = NULL, reused_from = NULL \
         WHERE run_id = $2 AND idx >= $3",
    )
    .bind(StageStatus::Pending.as_str())
    .bind(run.to_string())
    .bind(first_full_reset as i64)
    .execute(&mut *conn)
    .await
    .db()?;
    if !keep_steps {
        sql.query("DELETE FROM steps WHERE run_id = $1 AND stage_idx >= $2")
            .bind(run.to_string())
            .bind(from as i64)
            .execute(&mut *conn)
            .await
            .db()?;
    }
    Ok(())
}

/// The run an idempotency key names, answered as the insert answers it: the run as stored, or
/// [`StoreError::IdempotencyConflict`] when it was asked for with another request.
async fn run_of_key(
    sql: Sql,
    conn: &mut PgConnection,
    key: &str,
    request_hash: Option<&str>,
) -> StoreResult<Option<RunRecord>> {
    let existing = sql
        .query("SELECT id, idempotency_hash FROM runs WHERE idempotency_key = $1")
        .bind(key)
        .fetch_optional(&mut *conn)
        .await
        .db()?;
    let Some(row) = existing else {
        return Ok(None);
    };
    let id = run_id(&row.try_get::<String, _>("id").db()?)?;
    let hash: Option<String> = row.try_get("idempotency_hash").db()?;
    if hash.is_some() && hash.as_deref() != request_hash {
        return Err(StoreError::IdempotencyConflict(id));
    }
    read_run(sql, conn, id)
        .await?
        .ok_or(StoreError::NotFound(id))
        .map(Some)
}

#[async_trait]
impl RunStore for PostgresStore {
    fn backend_name(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> StoreResult<()> {
        // One message of the simple protocol: the same directly and through any pooler.
        sqlx::raw_sql("SELECT 1").execute(&self.pool).await.db()?;
        Ok(())
    }

    async fn get_run(&self, id: RunId) -> StoreResult<Option<RunRecord>> {
        // One repeatable-read transaction: the run, its last event and its stages are one
        // snapshot.
        let mut read = self.begin().await?;
        sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *read)
            .await
            .db()?;
        let run = read_run(self.sql, &mut read, id).await?;
        read.commit().await.db()?;
        Ok(run)
    }

    async fn list_runs(&self, filter: &RunFilter) -> StoreResult<RunPage> {
        let total: i64 = if filter.uncounted {
            0
        } else {
            let mut count = QueryBuilder::<Postgres>::new("SELECT COUNT(*) AS n FROM runs");
            filtered(&mut count, filter, false);
            let counted = count.build().persistent(self.sql.named);
            self.fetch_one(counted).await?.try_get("n").db()?
        };
        let mut page =
            QueryBuilder::<Postgres>::new(concat!("SELECT ", run_columns!(), " FROM runs"));
        filtered(&mut page, filter, true);
        page.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(filter.limit));
        let rows = self
            .fetch_all(page.build().persistent(self.sql.named))
            .await?;
        let runs = rows
            .iter()
            .map(run_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(RunPage {
            runs,
            total: total.max(0) as u64,
            scan: None,
        })
    }

    async fn heartbeat(&self, lease: &Lease, ttl: Duration) -> StoreResult<bool> {
        let (store, lease) = (self.clone(), lease.clone());
        detached(async move { store.heartbeat_now(&lease, ttl).await }).await
    }

    async fn steps(&self, run: RunId, stage: usize) -> StoreResult<Vec<StepRecord>> {
        let rows = self.fetch_all(self.sql.query(
            "SELECT key, output, cost_micros, artifacts FROM steps WHERE run_id = $1 AND stage_idx = $2 \
             ORDER BY created_at, seq",
        )
        .bind(run.to_string())
        .bind(stage as i64)
        ).await?;
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
            store.execute(store.sql.query(
                "INSERT INTO reusable (key, run_id, stage, output, artifacts, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (key) DO UPDATE SET run_id = EXCLUDED.run_id, stage = EXCLUDED.stage, \
                 output = EXCLUDED.output, artifacts = EXCLUDED.artifacts, created_at = EXCLUDED.created_at",
            )
            .bind(&key)
            .bind(checkpoint.run_id.to_string())
            .bind(&checkpoint.stage)
            .bind(checkpoint.output.to_string())
            .bind(json_text(&checkpoint.artifacts))
            .bind(store.now())
            ).await?;
            Ok(())
        })
        .await
    }

    async fn find_reusable(&self, key: &str) -> StoreResult<Option<ReusableCheckpoint>> {
        let row = self
            .fetch_optional(
                self.sql
                    .query("SELECT run_id, stage, output, artifacts FROM reusable WHERE key = $1")
                    .bind(key),
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(ReusableCheckpoint {
            run_id: run_id(&row.try_get::<String, _>("run_id").db()?)?,
            stage: row.try_get("stage").db()?,
            output: parse_json(Some(row.try_get("output").db()?), "reusable output")?
                .unwrap_or(Value::Null),
            artifacts: parse_json(Some(row.try_get("artifacts").db()?), "reusable artifacts")?
                .unwrap_or_default(),
        }))
    }

    async fn purge_finished(&self, retention: Duration) -> StoreResult<u64> {
        let cutoff = self.now().saturating_sub(millis(retention));
        // Bounded: at most PURGE_BATCH runs (with their stages, steps, events and reusable
        // checkpoints, by cascade) per call. The runs are locked as they are chosen, so a run
        // resumed meanwhile is skipped rather than deleted.
        let store = self.clone();
        detached(async move {
            let deleted = store.execute(store.sql.query(
                "WITH doomed AS (SELECT id AS doomed_id FROM runs WHERE finished_at IS NOT NULL \
                 AND finished_at < $1 ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 DELETE FROM runs USING doomed WHERE runs.id = doomed.doomed_id",
            )
            .bind(cutoff)
            .bind(core_store::PURGE_BATCH as i64)
            ).await?
            .rows_affected();
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
        let rows = self.fetch_all(self.sql.query(
            "SELECT seq, at, kind, stage, data FROM events WHERE run_id = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3",
        )
        .bind(run.to_string())
        .bind(after_seq)
        .bind(i64::from(limit))
        ).await?;
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
        let rows = self
            .fetch_all(
                self.sql
                    .query(
                        "SELECT r.id, r.status, \
             (SELECT COALESCE(MAX(seq), 0) FROM events e WHERE e.run_id = r.id) AS last \
             FROM runs r WHERE r.id = ANY($1)",
                    )
                    .bind(ids),
            )
            .await?;
        rows.iter()
            .map(|row| {
                let status: String = row.try_get("status").db()?;
                Ok(RunPosition {
                    run_id: run_id(&row.try_get::<String, _>("id").db()?)?,
                    last_event_seq: row.try_get("last").db()?,
                    finished: RunStatus::parse(&status).is_none_or(RunStatus::is_finished),
                })
            })
            .collect()
    }

    async fn oldest_waiting(&self) -> StoreResult<Vec<QueueWait>> {
        let rows = self.fetch_all(self.sql.query(
            "SELECT queue, MIN(available_at) AS due FROM runs WHERE status IN ('queued', 'retrying') \
             GROUP BY queue ORDER BY queue",
        )
        ).await?;
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
        detached(async move { store.add_throughput_now(counts).await }).await
    }

    async fn throughput(&self, since: DateTime<Utc>) -> StoreResult<Vec<Throughput>> {
        let rows = self.fetch_all(self.sql.query(
            "SELECT queue, minute, completed, failed, cancelled FROM throughput WHERE minute >= $1 \
             ORDER BY minute, queue",
        )
        .bind(since.timestamp_millis())
        ).await?;
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
        let rows = self.fetch_all(self.sql.query(
            "SELECT queue, status, COUNT(*) AS n FROM runs GROUP BY queue, status ORDER BY queue, status",
        )
        ).await?;
        // As the SQLite store: a row it cannot read (an unknown status) is left out.
        rows.iter()
            .filter_map(|row| {
                let status: String = row.try_get("status").ok()?;
                Some(Ok(QueueDepth {
                    queue: row.try_get("queue").ok()?,
                    status: RunStatus::parse(&status)?,
                    count: row.try_get::<i64, _>("n").ok()?.max(0) as u64,
                }))
            })
            .collect()
    }

    async fn worker_heartbeat(&self, worker: &WorkerInfo) -> StoreResult<()> {
        let (store, worker) = (self.clone(), worker.clone());
        detached(async move {
            store.execute(store.sql.query(
                "INSERT INTO workers (id, queues, concurrency, started_at, heartbeat_at, running) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at, running = EXCLUDED.running",
            )
            .bind(worker.id.as_str())
            .bind(json_text(&worker.queues))
            .bind(i64::from(worker.concurrency))
            .bind(worker.started_at.timestamp_millis())
            .bind(store.now())
            .bind(json_text(&worker.running))
            ).await?;
            Ok(())
        })
        .await
    }

    async fn unregister_worker(&self, id: &WorkerId) -> StoreResult<()> {
        let (store, id) = (self.clone(), id.as_str().to_owned());
        detached(async move {
            store
                .execute(
                    store
                        .sql
                        .query("DELETE FROM workers WHERE id = $1")
                        .bind(&id),
                )
                .await?;
            Ok(())
        })
        .await
    }

    async fn list_workers(&self) -> StoreResult<Vec<WorkerInfo>> {
        let cutoff = self.now().saturating_sub(millis(WORKER_STALE_AFTER));
        self.execute(
            self.sql
                .query("DELETE FROM workers WHERE heartbeat_at < $1")
                .bind(cutoff),
        )
        .await?;
        let rows = self
            .fetch_all(self.sql.query(
                "SELECT id, queues, concurrency, started_at, heartbeat_at, running FROM workers \
             ORDER BY started_at",
            ))
            .await?;
        rows.iter()
            .map(|row| {
                Ok(WorkerInfo {
                    id: WorkerId::from(row.try_get::<String, _>("id").db()?),
                    queues: parse_json(Some(row.try_get("queues").db()?), "worker queues")?
                        .unwrap_or_default(),
                    concurrency: count(row.try_get("concurrency").db()?, "worker concurrency")?,
                    started_at: to_datetime(row.try_get("started_at").db()?),
                    last_heartbeat: to_datetime(row.try_get("heartbeat_at").db()?),
                    running: parse_json(Some(row.try_get("running").db()?), "worker runs")?
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    async fn counters(&self) -> StoreResult<Vec<(String, f64)>> {
        let rows = self
            .fetch_all(
                self.sql
                    .query("SELECT name, value FROM counters ORDER BY name"),
            )
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("name").db()?, row.try_get("value").db()?)))
            .collect()
    }

    /// Waits on the store's `LISTEN` connection until a notification names one of `queues`,
    /// the next retry of these queues is due, or `poll` has passed, whichever comes first; a
    /// run already due ends the wait at once. Without a `LISTEN` connection (it failed, or is
    /// being retried) the wait is the same without the notifications: polling. Notifications
    /// that arrived while nobody waited are discarded before the check for due runs, which
    /// sees whatever they announced.
    async fn wait_for_work(&self, queues: &[String], poll: Duration) {
        let deadline = Instant::now()
            .checked_add(poll)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let Ok(mut wake) = tokio::time::timeout_at(deadline, self.wake.lock()).await else {
            return;
        };
        self.listen(&mut wake, deadline).await;
        drain(&mut wake).await;
        // After LISTEN: a run made due from now on is announced to this wait.
        let wait_until = match self.next_due(queues).await {
            Ok(Some(due)) => {
                let now = self.now();
                if due <= now {
                    return;
                }
                let until_due =
                    Duration::from_millis(u64::try_from(due.saturating_sub(now)).unwrap_or(0));
                Instant::now()
                    .checked_add(until_due)
                    .map_or(deadline, |due_at| deadline.min(due_at))
            }
            // Nothing waiting, or the store unreachable: the whole poll.
            Ok(None) | Err(_) => deadline,
        };
        loop {
            if wake.listener.is_none() {
                drop(wake);
                tokio::time::sleep_until(wait_until).await;
                return;
            }
            let Some(listener) = wake.listener.as_mut() else {
                return;
            };
            // `try_recv` is cancel-safe: a wait that ends mid-message loses nothing.
            let received = tokio::time::timeout_at(wait_until, listener.try_recv()).await;
            match received {
                Err(_elapsed) => return,
                Ok(Ok(Some(notification))) => {
                    let queue = notification.payload();
                    if queue.is_empty() || queues.iter().any(|q| q == queue) {
                        return;
                    }
                }
                // The connection was lost and LISTEN renewed: notifications may have been
                // lost in between, so look again.
                Ok(Ok(None)) => return,
                Ok(Err(error)) => {
                    tracing::debug!(error = %error, "the LISTEN connection failed; polling until it is back");
                    // Reconnected at the next wait.
                    wake.listener = None;
                }
            }
        }
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
        detached(async move { store.claim_now(queues, &worker, ttl, max).await }).await
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
        detached(async move { store.add_counters_now(deltas).await }).await
    }
}

/// Discards the notifications already received on the `LISTEN` connection (only those that
/// are there at once; at most [`MAX_DRAINED`]).
async fn drain(wake: &mut Wake) {
    let Some(listener) = wake.listener.as_mut() else {
        return;
    };
    let mut failed = false;
    for _ in 0..MAX_DRAINED {
        match tokio::time::timeout(Duration::ZERO, listener.try_recv()).await {
            Ok(Ok(Some(_))) => {}
            // Nothing more at once, or the connection was renewed (its backlog is gone).
            Err(_) | Ok(Ok(None)) => break,
            Ok(Err(_)) => {
                failed = true;
                break;
            }
        }
    }
    if failed {
        wake.listener = None;
    }
}

/// The wake-up machinery behind [`RunStore::wait_for_work`].
impl PostgresStore {
    /// Makes sure `wake` has a connection listening on [`WAKE_CHANNEL`], unless setting one up
    /// failed within the last [`LISTEN_RETRY`]; gives up at `deadline` (the end of the wait).
    async fn listen(&self, wake: &mut Wake, deadline: Instant) {
        if wake.listener.is_some() || wake.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        // Behind a transaction-mode pooler without a direct URL: never (the pooler would
        // leave the LISTEN on a server connection other clients then get), so waits poll.
        let Some(listen_pool) = &self.listen_pool else {
            return;
        };
        let connect = async {
            let mut listener = PgListener::connect_with(listen_pool).await?;
            listener.listen(WAKE_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        // A listener half set up is dropped (and its connection with it), never kept.
        match tokio::time::timeout_at(deadline, connect).await {
            Ok(Ok(listener)) => {
                wake.listener = Some(listener);
                wake.retry_at = None;
            }
            Ok(Err(error)) => {
                tracing::warn!(error = %error, "LISTEN {WAKE_CHANNEL} failed; idle workers poll");
                wake.retry_at = Some(Instant::now() + LISTEN_RETRY);
            }
            // Out of time for this wait (which then polls); the next wait tries again.
            Err(_) => {}
        }
    }

    /// When the next run of these queues is (or was) due, by the store's clock.
    async fn next_due(&self, queues: &[String]) -> StoreResult<Option<Millis>> {
        let row = self
            .fetch_one(
                self.sql
                    .query(
                        "SELECT MIN(available_at) AS due FROM runs \
             WHERE status IN ('queued', 'retrying') AND queue = ANY($1)",
                    )
                    .bind(queues.to_vec()),
            )
            .await?;
        row.try_get("due").db()
    }
}

/// The write operations. The trait methods run each in a task of its own ([`detached`]): a
/// write once begun runs to its commit or rollback even if its caller stops waiting, so a
/// connection is never returned to the pool in the middle of a transaction's statements.
impl PostgresStore {
    async fn heartbeat_now(&self, lease: &Lease, ttl: Duration) -> StoreResult<bool> {
        // One statement: the fence check and the new expiry, counted from now.
        let row = self.fetch_optional(self.sql.query(
            "UPDATE runs SET lease_expires_at = $1 WHERE id = $2 AND fence = $3 AND lease_owner = $4 \
             RETURNING cancel_requested",
        )
        .bind(self.now().saturating_add(millis(ttl)))
        .bind(lease.run_id.to_string())
        .bind(lease.fence.0)
        .bind(lease.worker.as_str())
        ).await?;
        let Some(row) = row else {
            return Err(fence_rejected(lease));
        };
        row.try_get::<bool, _>("cancel_requested").db()
    }

    async fn insert_run_now(&self, run: NewRun) -> StoreResult<(RunRecord, bool)> {
        let mut tx = self.begin().await?;
        if let Some(key) = &run.idempotency_key {
            if let Some(existing) =
                run_of_key(self.sql, &mut tx, key, run.request_hash.as_deref()).await?
            {
                tx.commit().await.db()?;
                return Ok((existing, false));
            }
        }
        let now = self.now();
        // A submission with the same key committed since the check waits for it and inserts
        // nothing (the key's unique index), instead of failing.
        let inserted = self.sql.query(
            "INSERT INTO runs (id, kind, name, queue, inputs, status, provider_mode, \
             budget_micros, available_at, idempotency_key, idempotency_hash, created_at, updated_at, reuse) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $9, $9, $12) \
             ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
        )
        .bind(run.id.to_string())
        .bind(run.kind.as_str())
        .bind(&run.name)
        .bind(&run.queue)
        .bind(run.inputs.to_string())
        .bind(RunStatus::Queued.as_str())
        .bind(run.provider_mode.as_str())
        .bind(run.budget_usd.map(Usd::micros))
        .bind(now)
        .bind(&run.idempotency_key)
        .bind(&run.request_hash)
        .bind(run.reuse)
        .execute(&mut *tx)
        .await
        .db()?
        .rows_affected();
        if inserted != 1 {
            let existing = self.run_that_took_the_key(&mut tx, &run).await?;
            tx.commit().await.db()?;
            return Ok((existing, false));
        }
        self.sql
            .query(
                "WITH searchable AS (INSERT INTO run_search (run_id, search_text) VALUES ($1, $4)) \
             INSERT INTO stages (run_id, idx, name, status) \
             SELECT $1, stage.n - 1, stage.name, $2 \
             FROM UNNEST($3::text[]) WITH ORDINALITY AS stage (name, n)",
            )
            .bind(run.id.to_string())
            .bind(StageStatus::Pending.as_str())
            .bind(run.stage_names.clone())
            .bind(search_text(&run.inputs))
            .execute(&mut *tx)
            .await
            .db()?;
        insert_event(
            self.sql,
            &mut tx,
            run.id,
            now,
            &kernel::queued(&run.queue),
            None,
        )
        .await?;
        notify_queue(self.sql, &mut tx, &run.queue).await?;
        // The record as this transaction wrote it: once it is committed, the answer cannot fail.
        let record = read_run(self.sql, &mut tx, run.id)
            .await?
            .ok_or(StoreError::NotFound(run.id))?;
        tx.commit().await.db()?;
        Ok((record, true))
    }

    /// The run that took `run`'s idempotency key while `run` was being inserted (read
    /// committed: a statement after the insert sees it).
    async fn run_that_took_the_key(&self, tx: &mut Tx, run: &NewRun) -> StoreResult<RunRecord> {
        let existing = match &run.idempotency_key {
            Some(key) => run_of_key(self.sql, tx, key, run.request_hash.as_deref()).await?,
            None => None,
        };
        existing.ok_or_else(|| {
            StoreError::Database(format!(
                "run {} was neither inserted nor found by its idempotency key",
                run.id
            ))
        })
    }

    async fn claim_now(
        &self,
        queues: Vec<String>,
        worker: &WorkerId,
        ttl: Duration,
        max: usize,
    ) -> StoreResult<Vec<Claimed>> {
        let asked = tokio::time::Instant::now();
        if max == 0 || queues.is_empty() {
            return Ok(Vec::new());
        }
        // The lease runs from now, after the wait for a connection, never from before it.
        let now = self.now();
        // One statement: due runs are locked as they are chosen, the first of each queue in
        // order of due time from the index of waiting runs (runs another claimer or any write
        // holds are skipped, and a run claimed since this statement's snapshot no longer
        // matches once locked: read committed re-checks the row, so no run is claimed twice),
        // leased with a fence one higher, and each gets the kernel's `run_started` event (its
        // data, `{"worker", "fence"}`, built here because only the database knows the fence).
        let mut queues = queues;
        queues.sort_unstable();
        queues.dedup();
        let rows = self
            .fetch_all(
                self.sql
                    .query(concat!(
                        "WITH due AS (SELECT waiting.id AS due_id FROM UNNEST($4::text[]) AS wanted (queue), \
                         LATERAL (SELECT id, available_at FROM runs WHERE queue = wanted.queue \
                         AND status IN ('queued', 'retrying') AND available_at <= $3 \
                         ORDER BY available_at, id LIMIT $5 FOR NO KEY UPDATE SKIP LOCKED) AS waiting \
                         ORDER BY waiting.available_at, waiting.id LIMIT $5), \
                         claimed AS (UPDATE runs SET status = 'running', lease_owner = $1, worker = $1, \
                         lease_expires_at = $2, fence = fence + 1, updated_at = $3 \
                         FROM due WHERE runs.id = due.due_id RETURNING runs.*), \
                         logged AS (INSERT INTO events (run_id, at, kind, stage, data) \
                         SELECT claimed.id, $3, $6, NULL, \
                         jsonb_build_object('worker', $1::text, 'fence', claimed.fence)::text FROM claimed) \
                         SELECT ",
                        run_columns!(),
                        ", (SELECT json_agg(json_build_object(",
                        stage_fields!(),
                        ") ORDER BY s.idx) FROM stages s WHERE s.run_id = claimed.id)::text AS stages \
                         FROM claimed"
                    ))
                    .bind(worker.as_str())
                    .bind(now.saturating_add(millis(ttl)))
                    .bind(now)
                    .bind(queues)
                    .bind(i64::try_from(max).unwrap_or(i64::MAX))
                    .bind(
                        kernel::run_started(worker.as_str(), FenceToken(0))
                            .kind
                            .as_str(),
                    ),
            )
            .await?;
        Ok(claims(&rows, worker, asked))
    }

    async fn start_stage_now(&self, lease: &Lease, stage: usize) -> StoreResult<u32> {
        // One statement, so one round trip and one commit: the fence check (which locks the
        // run's row), the run's and the stage's change, and the kernel's `stage_started` event
        // (its data, `{"attempt": n}`, is built here because only the database knows `n`).
        let row = self.fetch_optional(self.sql.query(
            "WITH fenced AS (UPDATE runs SET status = 'running', updated_at = $1, \
             current_stage = (SELECT name FROM stages WHERE run_id = $2 AND idx = $3) \
             WHERE id = $2 AND fence = $4 AND lease_owner = $5 \
             AND EXISTS (SELECT 1 FROM stages WHERE run_id = $2 AND idx = $3) RETURNING id), \
             started AS (UPDATE stages SET status = $6, attempts = attempts + 1, started_at = $1, \
             finished_at = NULL, error = NULL, next_attempt_at = NULL \
             FROM fenced WHERE stages.run_id = fenced.id AND stages.idx = $3 \
             RETURNING stages.attempts, stages.name), \
             logged AS (INSERT INTO events (run_id, at, kind, stage, data) \
             SELECT $2, $1, $7, started.name, jsonb_build_object('attempt', started.attempts)::text \
             FROM started) \
             SELECT attempts FROM started",
        )
        .bind(self.now())
        .bind(lease.run_id.to_string())
        .bind(stage as i64)
        .bind(lease.fence.0)
        .bind(lease.worker.as_str())
        .bind(StageStatus::Running.as_str())
        .bind(kernel::stage_started(0).kind.as_str())
        ).await?;
        let Some(row) = row else {
            return Err(self.refused(lease, stage).await);
        };
        count(row.try_get("attempts").db()?, "stage attempts")
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
        let inserted = self.sql.query(
            "INSERT INTO steps (run_id, stage_idx, key, output, cost_micros, artifacts, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
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
            let name: String = self.sql.query(
                "UPDATE stages SET cost_micros = cost_micros + $1, progress_done = $2, progress_total = $3 \
                 WHERE run_id = $4 AND idx = $5 RETURNING name",
            )
            .bind(step.cost_usd.micros())
            .bind(i64::from(progress.done))
            .bind(i64::from(progress.total))
            .bind(lease.run_id.to_string())
            .bind(stage as i64)
            .fetch_optional(&mut *tx)
            .await
            .db()
            .and_then(|row| stage_name(row, lease, stage))?;
            self.sql
                .query("UPDATE runs SET cost_micros = cost_micros + $1 WHERE id = $2")
                .bind(step.cost_usd.micros())
                .bind(lease.run_id.to_string())
                .execute(&mut *tx)
                .await
                .db()?;
            insert_event(
                self.sql,
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
        let commit = kernel::commit(&checkpoint);
        let events = EventColumns::of(&commit.events);
        // One statement, so one round trip and one commit: the fence check (which locks the
        // run's row), the run's cost and (when it completes) its end, the stage's checkpoint,
        // and the kernel's events in their order.
        let row = self.fetch_optional(self.sql.query(
            "WITH fenced AS (UPDATE runs SET updated_at = $1, cost_micros = cost_micros + $2, \
             status = CASE WHEN $7 THEN $8 ELSE status END, \
             result = CASE WHEN $7 THEN $3 ELSE result END, \
             error = CASE WHEN $7 THEN NULL ELSE error END, \
             finished_at = CASE WHEN $7 THEN $1 ELSE finished_at END, \
             current_stage = CASE WHEN $7 THEN NULL ELSE current_stage END, \
             lease_owner = CASE WHEN $7 THEN NULL ELSE lease_owner END, \
             lease_expires_at = CASE WHEN $7 THEN NULL ELSE lease_expires_at END \
             WHERE id = $4 AND fence = $5 AND lease_owner = $6 \
             AND EXISTS (SELECT 1 FROM stages WHERE run_id = $4 AND idx = $10) RETURNING id), \
             committed AS (UPDATE stages SET status = $9, finished_at = $1, output = $11, \
             artifacts = $12, cost_micros = cost_micros + $2, error = NULL, next_attempt_at = NULL, \
             reused_from = $13 FROM fenced WHERE stages.run_id = fenced.id AND stages.idx = $10 \
             RETURNING stages.name), \
             logged AS (INSERT INTO events (run_id, at, kind, stage, data) \
             SELECT $4, $1, event.kind, CASE WHEN event.on_stage THEN committed.name END, event.data \
             FROM committed, UNNEST($14::text[], $15::bool[], $16::text[]) WITH ORDINALITY \
             AS event (kind, on_stage, data, n) ORDER BY event.n) \
             SELECT name FROM committed",
        )
        .bind(self.now())
        .bind(checkpoint.cost_usd.micros())
        .bind(checkpoint.run_result.as_ref().map(Value::to_string))
        .bind(lease.run_id.to_string())
        .bind(lease.fence.0)
        .bind(lease.worker.as_str())
        .bind(commit.completes_run)
        .bind(RunStatus::Completed.as_str())
        .bind(StageStatus::Completed.as_str())
        .bind(stage as i64)
        .bind(checkpoint.output.to_string())
        .bind(json_text(&checkpoint.artifacts))
        .bind(checkpoint.reused_from.map(|id| id.to_string()))
        .bind(events.kinds)
        .bind(events.on_stage)
        .bind(events.data)
        ).await?;
        if row.is_none() {
            return Err(self.refused(lease, stage).await);
        }
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
        let later = |delay: Option<Duration>| delay.map(|d| now.saturating_add(millis(d)));
        let mut tx = self.begin_fenced(lease).await?;
        let name: String = self
            .sql
            .query(
                "UPDATE stages SET status = $1, error = $2, finished_at = $3, next_attempt_at = $4 \
             WHERE run_id = $5 AND idx = $6 RETURNING name",
            )
            .bind(end.stage.as_str())
            .bind(end.stage_error.as_ref().map(json_text))
            .bind(end.stage_finished.then_some(now))
            .bind(later(end.next_attempt_in))
            .bind(lease.run_id.to_string())
            .bind(stage as i64)
            .fetch_optional(&mut *tx)
            .await
            .db()
            .and_then(|row| stage_name(row, lease, stage))?;
        let queue: String = self.sql.query(
            "UPDATE runs SET status = $1, error = COALESCE($2, error), finished_at = $3, \
             available_at = COALESCE($4, available_at), lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $5 RETURNING queue",
        )
        .bind(end.run.as_str())
        .bind(end.run_error.as_ref().map(json_text))
        .bind(end.finishes_run().then_some(now))
        .bind(later(end.due_in))
        .bind(lease.run_id.to_string())
        .fetch_one(&mut *tx)
        .await
        .db()?
        .try_get("queue")
        .db()?;
        for event in &end.events {
            insert_event(self.sql, &mut tx, lease.run_id, now, event, Some(&name)).await?;
        }
        if end.due_in.is_some() {
            // Due now (released) or later (a retry): either way idle workers look again, and
            // a retry bounds their next wait.
            notify_queue(self.sql, &mut tx, &queue).await?;
        }
        tx.commit().await.db()?;
        Ok(())
    }

    async fn fail_run_now(&self, lease: &Lease, error: RunError) -> StoreResult<()> {
        let now = self.now();
        let (status, event) = kernel::run_failed(&error);
        let mut tx = self.begin_fenced(lease).await?;
        self.sql
            .query(
                "UPDATE runs SET status = $1, error = $2, finished_at = $3, lease_owner = NULL, \
             lease_expires_at = NULL WHERE id = $4",
            )
            .bind(status.as_str())
            .bind(json_text(&error))
            .bind(now)
            .bind(lease.run_id.to_string())
            .execute(&mut *tx)
            .await
            .db()?;
        insert_event(self.sql, &mut tx, lease.run_id, now, &event, None).await?;
        tx.commit().await.db()?;
        Ok(())
    }

    async fn request_cancel_now(&self, id: RunId, actor: Actor) -> StoreResult<RunRecord> {
        let mut tx = self.begin().await?;
        // The run's row is locked before the decision: no claim, sweep or worker write
        // changes its status between the read and the write.
        let row = self
            .sql
            .query("SELECT status FROM runs WHERE id = $1 FOR NO KEY UPDATE")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await
            .db()?;
        let Some(row) = row else {
            let _ = tx.rollback().await;
            return Err(StoreError::NotFound(id));
        };
        let now = self.now();
        let status: String = row.try_get("status").db()?;
        let status = RunStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("run status {status}")))?;
        let decided = match kernel::cancel(id, status, actor) {
            Ok(decided) => decided,
            Err(refused) => {
                let _ = tx.rollback().await;
                return Err(refused);
            }
        };
        match decided {
            kernel::Cancel::Now { run, event } => {
                self.sql
                    .query(
                        "UPDATE runs SET status = $1, cancel_requested = TRUE, finished_at = $2, \
                     updated_at = $2 WHERE id = $3",
                    )
                    .bind(run.as_str())
                    .bind(now)
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await
                    .db()?;
                self.sql
                    .query(
                        "UPDATE stages SET status = $1, finished_at = $2, next_attempt_at = NULL \
                     WHERE run_id = $3 AND status = $4",
                    )
                    .bind(StageStatus::Cancelled.as_str())
                    .bind(now)
                    .bind(id.to_string())
                    .bind(StageStatus::Retrying.as_str())
                    .execute(&mut *tx)
                    .await
                    .db()?;
                insert_event(self.sql, &mut tx, id, now, &event, None).await?;
            }
            kernel::Cancel::Requested { event } => {
                self.sql
                    .query("UPDATE runs SET cancel_requested = TRUE, updated_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await
                    .db()?;
                insert_event(self.sql, &mut tx, id, now, &event, None).await?;
            }
        }
        let record = read_run(self.sql, &mut tx, id)
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
        let mut tx = self.begin().await?;
        // Locked first, then read and decided: a concurrent resume waits, then finds the run
        // queued and is refused.
        let locked = self
            .sql
            .query("SELECT id FROM runs WHERE id = $1 FOR NO KEY UPDATE")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await
            .db()?;
        if locked.is_none() {
            let _ = tx.rollback().await;
            return Err(StoreError::NotFound(id));
        }
        let run = read_run(self.sql, &mut tx, id)
            .await?
            .ok_or(StoreError::NotFound(id))?;
        let from_idx = match core_store::resume_start(&run, &from) {
            Ok(from_idx) => from_idx,
            Err(refused) => {
                let _ = tx.rollback().await;
                return Err(refused);
            }
        };
        let from_name = run
            .stages
            .get(from_idx)
            .map(|stage| stage.name.clone())
            .ok_or_else(|| StoreError::Corrupt(format!("run {id} has no stage {from_idx}")))?;
        let forget_steps = matches!(from, FromStage::Named(_));
        let now = self.now();
        let (status, event) = kernel::resumed(&from_name, changes.actor);
        let updated = self.sql.query(
            "UPDATE runs SET status = $1, available_at = $2, updated_at = $2, result = NULL, error = NULL, \
             finished_at = NULL, cancel_requested = FALSE, current_stage = NULL, lease_owner = NULL, \
             lease_expires_at = NULL, inputs = COALESCE($3, inputs), \
             budget_micros = COALESCE($4, budget_micros) WHERE id = $5 AND status = $6",
        )
        .bind(status.as_str())
        .bind(now)
        .bind(changes.inputs.as_ref().map(Value::to_string))
        .bind(changes.budget_usd.map(Usd::micros))
        .bind(id.to_string())
        .bind(run.status.as_str())
        .execute(&mut *tx)
        .await
        .db()?
        .rows_affected();
        if updated != 1 {
            let _ = tx.rollback().await;
            return Err(StoreError::Conflict(format!(
                "run {id} changed while resuming; try again"
            )));
        }
        if let Some(inputs) = &changes.inputs {
            index_inputs(self.sql, &mut tx, id, inputs).await?;
        }
        reset_stages_from(self.sql, &mut tx, id, from_idx, !forget_steps).await?;
        insert_event(self.sql, &mut tx, id, now, &event, Some(&from_name)).await?;
        notify_queue(self.sql, &mut tx, &run.queue).await?;
        let record = read_run(self.sql, &mut tx, id)
            .await?
            .ok_or(StoreError::NotFound(id))?;
        tx.commit().await.db()?;
        Ok(record)
    }

    async fn sweep_expired_leases_now(&self) -> StoreResult<Vec<RunId>> {
        let now = self.now();
        // Most sweeps find nothing: check with a read before opening a transaction.
        let expired: bool = self.fetch_one(self.sql.query(
            "SELECT EXISTS (SELECT 1 FROM runs WHERE status = 'running' AND lease_expires_at < $1) AS expired",
        )
        .bind(now)
        ).await?
        .try_get("expired")
        .db()?;
        if !expired {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        // Bounded (SWEEP_BATCH), from the index of running runs (hence the literal status);
        // runs another sweeper (or a heartbeat) holds are skipped, and
        // one whose lease was extended since the snapshot no longer matches once locked.
        let expired = self
            .sql
            .query(
                "SELECT id, queue, worker, cancel_requested FROM runs \
             WHERE status = 'running' AND lease_expires_at < $1 \
             ORDER BY lease_expires_at LIMIT $2 FOR NO KEY UPDATE SKIP LOCKED",
            )
            .bind(now)
            .bind(core_store::SWEEP_BATCH as i64)
            .fetch_all(&mut *tx)
            .await
            .db()?;
        let mut recovered = Vec::with_capacity(expired.len());
        let mut woken = BTreeSet::new();
        for row in &expired {
            let id: String = row.try_get("id").db()?;
            // As the SQLite store: a row whose id cannot be read is left alone.
            let Some(id) = RunId::parse(&id) else {
                continue;
            };
            let worker: Option<String> = row.try_get("worker").db()?;
            let cancel_requested: bool = row.try_get("cancel_requested").db()?;
            let expiry = kernel::lease_expired(cancel_requested, worker.as_deref());
            self.sql.query(
                "UPDATE runs SET status = $1, updated_at = $2, lease_owner = NULL, lease_expires_at = NULL, \
                 finished_at = CASE WHEN $3 THEN finished_at ELSE $2 END, \
                 available_at = CASE WHEN $3 THEN $2 ELSE available_at END WHERE id = $4",
            )
            .bind(expiry.run.as_str())
            .bind(now)
            .bind(expiry.requeue)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .db()?;
            insert_event(self.sql, &mut tx, id, now, &expiry.event, None).await?;
            if expiry.requeue {
                recovered.push(id);
                woken.insert(row.try_get::<String, _>("queue").db()?);
            }
        }
        for queue in &woken {
            notify_queue(self.sql, &mut tx, queue).await?;
        }
        tx.commit().await.db()?;
        Ok(recovered)
    }

    async fn add_throughput_now(&self, mut counts: Vec<Throughput>) -> StoreResult<()> {
        if counts.is_empty() {
            return Ok(());
        }
        // Rows upserted in one order by every process: two flushes never deadlock.
        counts.sort_by(|a, b| (&a.queue, a.minute).cmp(&(&b.queue, b.minute)));
        let mut tx = self.begin().await?;
        for count in &counts {
            self.sql
                .query(
                    "INSERT INTO throughput (queue, minute, completed, failed, cancelled) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (queue, minute) DO UPDATE SET \
                 completed = throughput.completed + EXCLUDED.completed, \
                 failed = throughput.failed + EXCLUDED.failed, \
                 cancelled = throughput.cancelled + EXCLUDED.cancelled",
                )
                .bind(&count.queue)
                .bind(count.minute.timestamp_millis())
                .bind(i64::try_from(count.completed).unwrap_or(i64::MAX))
                .bind(i64::try_from(count.failed).unwrap_or(i64::MAX))
                .bind(i64::try_from(count.cancelled).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await
                .db()?;
        }
        self.sql
            .query("DELETE FROM throughput WHERE minute < $1")
            .bind(
                self.now()
                    .saturating_sub(millis(core_store::THROUGHPUT_KEPT)),
            )
            .execute(&mut *tx)
            .await
            .db()?;
        tx.commit().await.db()?;
        Ok(())
    }

    async fn add_counters_now(&self, mut deltas: Vec<(String, f64)>) -> StoreResult<()> {
        if deltas.is_empty() {
            return Ok(());
        }
        // Rows upserted in one order by every process: two flushes never deadlock.
        deltas.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tx = self.begin().await?;
        for (name, amount) in &deltas {
            self.sql
                .query(
                    "INSERT INTO counters (name, value) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET value = counters.value + EXCLUDED.value",
                )
                .bind(name)
                .bind(*amount)
                .execute(&mut *tx)
                .await
                .db()?;
        }
        tx.commit().await.db()?;
        Ok(())
    }
}

/// The claims of the runs a claim statement answered, with their stages (which cannot change
/// under the new leases: every write to them is fenced), oldest id first. Claimed and
/// committed already, a row that cannot be read does not cost the others their claim: it is
/// left to its lease's expiry, as a crashed worker's run is.
fn claims(rows: &[PgRow], worker: &WorkerId, asked: Instant) -> Vec<Claimed> {
    let mut runs: Vec<RunRecord> = rows
        .iter()
        .filter_map(|row| match claimed_run(row) {
            Ok(run) => Some(run),
            Err(error) => {
                tracing::error!(error = %error, "a claimed run cannot be read; its lease will expire");
                None
            }
        })
        .collect();
    runs.sort_by_key(|run| run.id);
    runs.into_iter()
        .map(|run| Claimed {
            recovered: run.stages.iter().any(|s| s.status == StageStatus::Running),
            lease: Lease {
                run_id: run.id,
                worker: worker.clone(),
                fence: run.fence,
            },
            run,
            asked,
        })
        .collect()
}

/// The `ILIKE` pattern of a text anywhere inside a value: `%`, `_` and `\` in the text match
/// only themselves.
fn contains_pattern(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 2);
    pattern.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// Adds the listing's filters to `query` as a `WHERE` clause naming only the filters set, so
/// the planner picks the index of the narrowest one; `with_cursor` adds the page's cursor.
fn filtered(query: &mut QueryBuilder<Postgres>, filter: &RunFilter, with_cursor: bool) {
    let mut clause = " WHERE ";
    let mut and = |query: &mut QueryBuilder<Postgres>| {
        query.push(clause);
        clause = " AND ";
    };
    for (column, value) in [
        ("kind", filter.kind.map(RunKind::as_str).map(str::to_owned)),
        ("status", filter.status.map(|s| s.as_str().to_owned())),
        ("name", filter.name.clone()),
        ("queue", filter.queue.clone()),
        // The generated column of the partial index `runs_error_code`.
        ("error_code", filter.error_code.clone()),
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
        // As the SQLite store's trigram index: three characters or more, or nothing matches
        // (nor does a text PostgreSQL cannot hold).
        if text.chars().count() < core_store::MIN_SEARCH_CHARS || text.contains('\0') {
            query.push("FALSE");
            return;
        }
        query
            .push("id IN (SELECT run_id FROM run_search WHERE search_text ILIKE ")
            .push_bind(contains_pattern(text))
            .push(" ESCAPE '\\')");
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
    use super::*;

    #[test]
    fn a_search_matches_its_text_literally() {
        assert_eq!(contains_pattern("rust"), "%rust%");
        assert_eq!(contains_pattern("50%_a\\b"), "%50\\%\\_a\\\\b%");
    }

    #[test]
    fn only_connection_failures_make_the_store_unavailable() {
        assert!(matches!(
            store_error(sqlx::Error::PoolTimedOut),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            store_error(sqlx::Error::Io(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused
            ))),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            store_error(sqlx::Error::RowNotFound),
            StoreError::Database(_)
        ));
        // TLS as the URL asks cannot be had: waiting would not change it.
        for refused in [
            sqlx::Error::Tls("server does not support TLS".into()),
            sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            )),
        ] {
            assert!(matches!(store_error(refused), StoreError::Database(_)));
        }
        // Any other TLS failure may be a server restarting (an alert, a decrypt error).
        let alert = sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::DecryptError,
        ));
        assert!(matches!(store_error(alert), StoreError::Unavailable(_)));
        assert!(matches!(
            store_error(sqlx::Error::Protocol(
                "unexpected response from SSLRequest: 0x00".to_owned()
            )),
            StoreError::Unavailable(_)
        ));
        // A socket file not there yet: a server still starting.
        assert!(matches!(
            store_error(sqlx::Error::Io(std::io::Error::from(
                std::io::ErrorKind::NotFound
            ))),
            StoreError::Unavailable(_)
        ));
        assert!(
            transient("08006") && transient("57P01") && transient("40P01") && transient("25006")
        );
        assert!(!transient("23505") && !transient("42P01"));
    }
}
