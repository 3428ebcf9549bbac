//! The Redis run store: API and workers on any number of hosts against one Redis.
//!
//! Every state change is one call of the function library `redis.lua` (atomic, fenced, bounded
//! work; loaded with `FUNCTION LOAD`, so Redis 7.0 or later is needed). Idle workers
//! block on a per-queue wake list (`BLPOP`) instead of polling, with the wait capped by the next
//! due retry. Keys live under one prefix; the README's Redis section lists them.
//!
//! Connections: commands go through a `ConnectionManager` to the primary (`primary.rs`: the
//! server of `REDIS_URL`, or the one Sentinel names, followed through failovers), which
//! reconnects by itself after Redis restarts; blocking waits use a connection of their own so
//! they never hold up commands. With durable acknowledgements (`REDIS_DURABLE_ACKS=N`) every
//! state change is answered only after `WAIT` says N replicas have it.
//! Cluster mode is not supported (the script addresses keys it computes).

mod primary;

pub use primary::SentinelOptions;

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::{AsyncCommands, Value as RedisValue, aio::ConnectionManager};
use serde_json::Value;
use tokio::sync::{Mutex, Semaphore, mpsc, oneshot};

use stagecraft_core::{
    ids::{FenceToken, RunId, WorkerId},
    money::Usd,
    store::{
        self as core_store, Actor, Claimed, FromStage, Lease, MAX_STAGES, NewRun, Progress,
        ProviderMode, QueueDepth, QueueWait, ResumeChanges, ReusableCheckpoint, RunError, RunEvent,
        RunFacts, RunFilter, RunKind, RunPage, RunPosition, RunRecord, RunStatus, RunStore,
        ScanExtent, StageCheckpoint, StageOutcome, StageRecord, StageStatus, StepRecord,
        StoreError, StoreResult, Throughput, WORKER_STALE_AFTER, WorkerInfo, kernel, to_datetime,
    },
};

const SCRIPT: &str = include_str!("redis.lua");

/// The store's function library as Redis loads it: `redis.lua` with its `#!lua` line and the
/// registration of its one function, both named after a hash of the text, so processes of
/// different versions (a rolling deploy) each call their own.
#[derive(Clone)]
struct Library {
    function: String,
    code: String,
}

impl Library {
    fn new() -> Self {
        let text = format!("{}{SCRIPT}", constants());
        let hash = redis::Script::new(&text).get_hash().to_owned();
        let function = format!("stagecraft_{}", &hash[..16]);
        let code = format!(
            "#!lua name={function}\n{text}\nredis.register_function('{function}', batch)\n"
        );
        Self { function, code }
    }

    /// Loads (or reloads) the library; Redis keeps it in its RDB and AOF files.
    async fn load(&self, conn: &mut ConnectionManager) -> redis::RedisResult<()> {
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&self.code)
            .query_async::<String>(conn)
            .await
            .map(|_| ())
    }
}
/// The frozen names the library writes by itself (event kinds `EV`, run statuses `RS`, stage
/// statuses `SS`), from the core's enums: the library never spells them on its own.
fn constants() -> String {
    let table = |name: &str, entries: Vec<&str>| {
        let fields: Vec<String> = entries.iter().map(|e| format!("{e} = '{e}'")).collect();
        format!("local {name} = {{ {} }}\n", fields.join(", "))
    };
    table(
        "EV",
        kernel::EventKind::ALL.iter().map(|k| k.as_str()).collect(),
    ) + &table("RS", RunStatus::ALL.iter().map(|s| s.as_str()).collect())
        + &table("SS", StageStatus::ALL.iter().map(|s| s.as_str()).collect())
}

/// The arguments that carry the kernel's events to the library: their count, then the kind,
/// whether it names the stage (1|0) and the data of each.
fn event_args(args: &mut Vec<String>, events: &[kernel::Event]) {
    args.push(events.len().to_string());
    for event in events {
        args.push(event.kind.as_str().to_owned());
        args.push(if event.on_stage { "1" } else { "0" }.to_owned());
        args.push(event.data.to_string());
    }
}

/// Runs deleted per purge call, at most.
const BATCH: usize = 500;

const HOUR_MS: i64 = 3_600_000;
/// How often a read-decide-apply change (cancel) is tried again when the run changed between
/// its read and its write.
const CHANGED_RETRIES: usize = 3;
/// The longest an idle worker blocks before checking again (retries due later are woken by
/// their due time, new runs by the wake list).
const MAX_BLOCK: Duration = Duration::from_secs(1);

/// How to reach Redis and what an acknowledgement means.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `REDIS_URL`: the server, or with Sentinel the password, database and user of the servers.
    pub url: String,
    pub sentinel: Option<SentinelOptions>,
    /// `REDIS_DURABLE_ACKS`: replicas that must have a state change before it is answered (0:
    /// answered once the primary has it).
    pub durable_acks: u32,
    /// How long a change waits for those replicas before it is answered as failed.
    pub ack_timeout: Duration,
}

impl RedisOptions {
    /// One server, no replicas awaited.
    pub fn direct(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            sentinel: None,
            durable_acks: 0,
            ack_timeout: Duration::from_secs(2),
        }
    }
}

/// `WAIT` (or `WAITAOF`) after every state change, when acknowledgements must be durable.
#[derive(Debug, Clone, Copy)]
struct Durable {
    replicas: u32,
    timeout: Duration,
    /// The primary keeps an append-only file and knows `WAITAOF` (Redis 7.2 or later): the
    /// change must then be in the primary's file and the replicas' files, fsynced, not only
    /// in their memory.
    aof: bool,
}

impl Durable {
    /// Appends `WAIT replicas timeout` (or `WAITAOF 1 replicas timeout`) to a pipeline;
    /// nothing when no replica is awaited.
    fn add_wait(self, pipe: &mut redis::Pipeline) -> bool {
        if self.replicas == 0 {
            return false;
        }
        let timeout = self.timeout.as_millis() as u64;
        if self.aof {
            pipe.cmd("WAITAOF").arg(1).arg(self.replicas).arg(timeout);
        } else {
            pipe.cmd("WAIT").arg(self.replicas).arg(timeout);
        }
        true
    }

    /// The answer of `WAIT` (a count) or `WAITAOF` (the local and the replicas' counts), as the
    /// acknowledgement it allows.
    fn check(self, answer: &RedisValue) -> StoreResult<()> {
        let (local, acknowledged) = match answer {
            RedisValue::Int(n) => (1, *n),
            RedisValue::Array(counts) => match counts.as_slice() {
                [RedisValue::Int(local), RedisValue::Int(n)] => (*local, *n),
                _ => {
                    return Err(StoreError::Corrupt(format!(
                        "answer of WAITAOF: {answer:?}"
                    )));
                }
            },
            other => return Err(StoreError::Corrupt(format!("answer of WAIT: {other:?}"))),
        };
        if local >= 1 && acknowledged >= i64::from(self.replicas) {
            return Ok(());
        }
        let kept = if self.aof {
            "fsynced to the append-only files of"
        } else {
            "reached"
        };
        Err(StoreError::Unavailable(format!(
            "the change was {kept} {acknowledged} of the {} replicas REDIS_DURABLE_ACKS asks for within {} ms; it may be lost in a failover",
            self.replicas,
            self.timeout.as_millis()
        )))
    }

    /// Waits for the replicas after a write made on `conn`.
    async fn wait(self, conn: &mut ConnectionManager) -> StoreResult<()> {
        let mut pipe = redis::pipe();
        if !self.add_wait(&mut pipe) {
            return Ok(());
        }
        let (answer,): (RedisValue,) = pipe.query_async(conn).await.db()?;
        self.check(&answer)
    }
}

/// Whether the server keeps an append-only file and knows `WAITAOF` (7.2 or later).
async fn waitaof_available(conn: &mut ConnectionManager) -> bool {
    let info: String = match redis::cmd("INFO")
        .arg("server")
        .arg("persistence")
        .query_async(conn)
        .await
    {
        Ok(info) => info,
        Err(_) => return false,
    };
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
            .map(str::trim)
    };
    let version: Vec<u32> = field("redis_version")
        .unwrap_or_default()
        .split('.')
        .filter_map(|p| p.parse().ok())
        .collect();
    let recent = version.as_slice() >= [7, 2].as_slice();
    recent && field("aof_enabled") == Some("1")
}

#[derive(Clone)]
pub struct RedisStore {
    primary: std::sync::Arc<primary::Primary>,
    durable: Durable,
    prefix: String,
    /// Script operations on their way to [`send_batches`] (bounded: see [`MAX_QUEUED_OPS`]).
    batches: mpsc::Sender<Pending>,
    /// How long finished runs are kept (the store's retention period).
    retention: Duration,
    /// The connection blocking waits use (with the primary it goes to), opened on first use
    /// and replaced after an error or a failover.
    blocking: std::sync::Arc<Mutex<Option<(String, redis::aio::MultiplexedConnection)>>>,
    /// Stages the claim started, not yet handed to the engine: see [`Prestarted`].
    prestarted: std::sync::Arc<Prestarted>,
}

/// The claim starts a run's first open stage itself, saving the worker a round trip per run.
/// The engine does not know: its `start_stage` is answered here, from memory, and a stage given
/// back before the engine started it has the claim's attempt taken back. Only this process
/// holds the lease, so nothing else can start the stage meanwhile. Entries of leases lost
/// without a word are dropped after [`PRESTART_FORGET_AFTER`].
#[derive(Default)]
struct Prestarted(std::sync::Mutex<HashMap<Lease, (usize, u32, std::time::Instant)>>);

/// How long a claim's start is remembered for a lease the engine never came back to.
const PRESTART_FORGET_AFTER: Duration = Duration::from_secs(3600);

impl Prestarted {
    fn insert(&self, lease: &Lease, stage: usize, attempt: u32) {
        if let Ok(mut map) = self.0.lock() {
            if map.len() >= 1024 {
                map.retain(|_, (.., at)| at.elapsed() < PRESTART_FORGET_AFTER);
            }
            let at = std::time::Instant::now();
            map.insert(lease.clone(), (stage, attempt, at));
        }
    }

    /// The claim's start of `stage` under `lease`, forgotten as it is answered.
    fn take(&self, lease: &Lease, stage: usize) -> Option<u32> {
        let mut map = self.0.lock().ok()?;
        match map.get(lease) {
            Some(&(started, attempt, _)) if started == stage => {
                map.remove(lease);
                Some(attempt)
            }
            _ => None,
        }
    }

    /// Forgets the lease's entry: the stage it names, which nobody started since the claim.
    fn forget(&self, lease: &Lease) -> Option<usize> {
        let mut map = self.0.lock().ok()?;
        map.remove(lease).map(|(stage, ..)| stage)
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Redis's failures as the store reports them: a Redis that cannot be reached is the store being
/// unavailable (503 and try again), an error answer a Redis error.
fn store_error(error: redis::RedisError) -> StoreError {
    // A replica that was a primary (READONLY), a primary without the replicas
    // `min-replicas-to-write` asks for (NOREPLICAS), or one still syncing (MASTERDOWN,
    // LOADING): the right primary is soon there again.
    let failing_over = matches!(
        error.code(),
        Some("READONLY" | "NOREPLICAS" | "MASTERDOWN" | "LOADING")
    );
    let unreachable = failing_over
        || (!refused_by_tls(&error)
            && (error.is_io_error()
                || error.is_connection_refusal()
                || error.is_connection_dropped()
                || error.is_timeout()
                || error.is_unrecoverable_error()));
    if unreachable {
        StoreError::Unavailable(error.to_string())
    } else {
        StoreError::Redis(error.to_string())
    }
}

/// Whether an I/O failure is TLS refusing the server `REDIS_URL` names (see
/// [`stagecraft_core::store::refuses_the_server`]), which waiting would not change.
fn refused_by_tls(error: &redis::RedisError) -> bool {
    let Some(source) = std::error::Error::source(error) else {
        return false;
    };
    let io = source.downcast_ref::<std::io::Error>().or_else(|| {
        source
            .downcast_ref::<std::sync::Arc<dyn std::error::Error + Send + Sync>>()
            .and_then(|inner| inner.downcast_ref::<std::io::Error>())
    });
    io.is_some_and(stagecraft_core::store::refuses_the_server)
}

/// The same failure once more, for each operation a failed call carried.
fn again(error: &StoreError) -> StoreError {
    match error {
        StoreError::Unavailable(text) => StoreError::Unavailable(text.clone()),
        StoreError::Corrupt(text) => StoreError::Corrupt(text.clone()),
        other => StoreError::Redis(other.to_string()),
    }
}

/// The Redis server's clock (`TIME`) in milliseconds: the one clock every host of a deployment
/// shares.
async fn server_millis(conn: &mut ConnectionManager) -> StoreResult<i64> {
    let (secs, micros): (String, String) = redis::cmd("TIME").query_async(conn).await.db()?;
    Ok(secs
        .parse::<i64>()
        .unwrap_or(0)
        .saturating_mul(1000)
        .saturating_add(micros.parse::<i64>().unwrap_or(0) / 1000))
}

/// `.db()?` turns a Redis result into the store's.
trait Db<T> {
    fn db(self) -> StoreResult<T>;
}

impl<T> Db<T> for Result<T, redis::RedisError> {
    fn db(self) -> StoreResult<T> {
        self.map_err(store_error)
    }
}

impl RedisStore {
    /// Connects to one Redis. Fails when Redis cannot be reached now; afterwards reconnects by
    /// itself.
    pub async fn open(url: &str, prefix: &str, retention: Duration) -> StoreResult<Self> {
        Self::connect(&RedisOptions::direct(url), prefix, retention).await
    }

    /// Connects to the primary `options` name (through Sentinel when given), and follows it
    /// through failovers from then on.
    pub async fn connect(
        options: &RedisOptions,
        prefix: &str,
        retention: Duration,
    ) -> StoreResult<Self> {
        let library = Library::new();
        let primary =
            primary::Primary::open(&options.url, options.sentinel.clone(), &library).await?;
        let conn = primary.conn();
        // Eviction would silently drop runs. Managed Redis may refuse CONFIG: then say nothing.
        let policy: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut conn.clone())
            .await;
        if let Ok(policy) = policy {
            if let Some(value) = policy.get(1) {
                if value != "noeviction" {
                    tracing::warn!(maxmemory_policy = %value, "Redis may evict keys; set maxmemory-policy noeviction or runs can be lost");
                }
            }
        }
        if let Err(error) = library.load(&mut conn.clone()).await {
            if error.to_string().to_lowercase().contains("unknown command") {
                return Err(StoreError::Redis(
                    "Redis 7.0 or later is needed (Stagecraft loads a function library)".into(),
                ));
            }
            return Err(store_error(error));
        }
        let durable = Durable {
            replicas: options.durable_acks,
            timeout: options.ack_timeout,
            aof: options.durable_acks > 0 && waitaof_available(&mut conn.clone()).await,
        };
        let (batches, pending) = mpsc::channel(MAX_QUEUED_OPS);
        tokio::spawn(send_batches(
            pending,
            Link {
                primary: primary.clone(),
                library,
                prefix: prefix.to_owned(),
                durable,
            },
        ));
        let store = Self {
            primary,
            durable,
            prefix: prefix.to_owned(),
            batches,
            retention,
            blocking: Default::default(),
            prestarted: Default::default(),
        };
        store.index_listing().await?;
        Ok(store)
    }

    /// Adds runs stored before the listing's kind, name and queue indexes existed to them,
    /// once per deployment (a marker key says it was done), in batches.
    async fn index_listing(&self) -> StoreResult<()> {
        let mut conn = self.primary.conn();
        let marker = self.key("by:indexed");
        if conn.exists::<_, bool>(&marker).await.db()? {
            return Ok(());
        }
        let mut cursor: Option<String> = None;
        loop {
            let ids: Vec<String> = redis::cmd("ZRANGEBYLEX")
                .arg(self.key("runs"))
                .arg(
                    cursor
                        .as_deref()
                        .map_or_else(|| "-".to_owned(), |id| format!("({id}")),
                )
                .arg("+")
                .arg("LIMIT")
                .arg(0)
                .arg(BATCH)
                .query_async(&mut conn)
                .await
                .db()?;
            let Some(last) = ids.last().cloned() else {
                break;
            };
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HMGET")
                    .arg(self.key(&format!("run:{id}")))
                    .arg(&["kind", "name", "queue"]);
            }
            let fields: Vec<Vec<Option<String>>> = pipe.query_async(&mut conn).await.db()?;
            let mut add = redis::pipe();
            for (id, values) in ids.iter().zip(fields) {
                for (field, value) in ["kind", "name", "queue"].iter().zip(values) {
                    if let Some(value) = value {
                        add.zadd(self.key(&format!("by:{field}:{value}")), id, 0)
                            .ignore();
                    }
                }
            }
            add.query_async::<()>(&mut conn).await.db()?;
            cursor = Some(last);
            if ids.len() < BATCH {
                break;
            }
        }
        conn.set::<_, _, ()>(&marker, "1").await.db()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// One operation of the script. Operations issued while earlier calls are in flight are
    /// sent together in the next call (see [`send_batches`]).
    async fn call<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        args: &[String],
    ) -> StoreResult<T> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            op,
            args: args.to_vec(),
            reply,
        };
        let closed = || StoreError::Unavailable("the Redis store is closed".into());
        match self.batches.try_send(pending) {
            Ok(()) => {}
            // New work is refused while the queue is full; the work of runs already leased
            // (and claims, which only come from free slots) waits for room instead.
            Err(mpsc::error::TrySendError::Full(pending)) if waits_when_full(op) => {
                self.batches.send(pending).await.map_err(|_| closed())?;
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(StoreError::Busy(format!(
                    "{MAX_QUEUED_OPS} Redis operations are waiting in this process"
                )));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(closed()),
        }
        let value = answer
            .await
            .map_err(|_| StoreError::Unavailable("the Redis store is closed".into()))??;
        T::from_redis_value(value).map_err(|e| StoreError::Corrupt(format!("answer of {op}: {e}")))
    }

    async fn fenced(&self, op: &'static str, lease: &Lease, args: Vec<String>) -> StoreResult<i64> {
        let mut all = vec![
            lease.run_id.to_string(),
            lease.fence.0.to_string(),
            lease.worker.to_string(),
        ];
        all.extend(args);
        let answer: i64 = self.call(op, &all).await?;
        if answer < 0 {
            return Err(StoreError::FenceRejected {
                run_id: lease.run_id,
                fence: lease.fence,
            });
        }
        Ok(answer)
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// The hash of one queue's finished runs in the hour holding `at` (milliseconds), by
    /// minute and outcome; it expires after [`core_store::THROUGHPUT_KEPT`] and an hour.
    fn throughput_key(&self, queue: &str, at: i64) -> String {
        self.key(&format!(
            "throughput:{queue}:{}",
            at - at.rem_euclid(HOUR_MS)
        ))
    }
}

/// Where a listing's run ids come from, newest first.
enum RunIds {
    /// A sorted set whose members all score 0, so it is ordered by id (ids sort by time).
    Set(String),
    /// Ids read whole, sorted newest first.
    Listed(Vec<String>),
}

/// The fields a bounded scan of the run list reads, in this order.
const SCAN_FIELDS: [&str; 7] = [
    "kind",
    "name",
    "queue",
    "cost_micros",
    "cost_usd",
    "error",
    "inputs",
];

impl RedisStore {
    /// The runs of these ids that still exist, in order.
    async fn runs_by_id(&self, ids: &[String]) -> StoreResult<Vec<RunRecord>> {
        let mut runs = Vec::with_capacity(ids.len());
        for id in ids.iter().filter_map(|id| RunId::parse(id)) {
            if let Some(run) = self.get_run(id).await? {
                runs.push(run);
            }
        }
        Ok(runs)
    }

    /// The indexes holding the runs the filter asks for (every run's when it names none).
    async fn indexes_of(
        &self,
        conn: &mut ConnectionManager,
        filter: &RunFilter,
    ) -> StoreResult<Vec<RunIds>> {
        let mut indexes = Vec::new();
        match filter.status {
            // Running runs are the lease index; they have no status set of their own. There
            // are at most as many as the workers' slots, so they are read whole and sorted.
            Some(RunStatus::Running) => {
                let mut ids: Vec<String> = conn.zrange(self.key("leases"), 0, -1).await.db()?;
                ids.sort_unstable_by(|a, b| b.cmp(a));
                indexes.push(RunIds::Listed(ids));
            }
            Some(status) => {
                indexes.push(RunIds::Set(
                    self.key(&format!("status:{}", status.as_str())),
                ));
            }
            None => {}
        }
        let by = [
            ("kind", filter.kind.map(|k| k.as_str().to_owned())),
            ("name", filter.name.clone()),
            ("queue", filter.queue.clone()),
        ];
        for (field, value) in by {
            if let Some(value) = value {
                indexes.push(RunIds::Set(self.key(&format!("by:{field}:{value}"))));
            }
        }
        if indexes.is_empty() {
            indexes.push(RunIds::Set(self.key("runs")));
        }
        Ok(indexes)
    }

    /// A page of the runs the filter admits, read from the driving index from `cursor` down,
    /// newest first, each checked against the other indexes and, where the filter needs it,
    /// its fields. One page examines at most [`core_store::SCAN_LIMIT`] runs, in batches (Redis
    /// is never blocked by one long call), and says how far it looked.
    async fn scan_runs(
        &self,
        conn: &mut ConnectionManager,
        scan: Scan<'_>,
        mut cursor: Option<String>,
    ) -> StoreResult<RunPage> {
        let limit = scan.filter.limit as usize;
        let fields = if scan.filter.input_text.is_some() {
            &SCAN_FIELDS[..]
        } else {
            &SCAN_FIELDS[..SCAN_FIELDS.len() - 1]
        };
        let (mut examined, mut total, mut complete) = (0u64, 0u64, false);
        let mut matched = Vec::new();
        while examined < core_store::SCAN_LIMIT {
            let want = BATCH.min((core_store::SCAN_LIMIT - examined) as usize);
            let batch = scan
                .driver
                .page(conn, cursor.as_deref(), scan.range, want)
                .await?;
            if batch.is_empty() {
                complete = true;
                break;
            }
            let mut pipe = redis::pipe();
            for id in &batch {
                for other in scan.others {
                    other.queue_membership(&mut pipe, id);
                }
                if scan.checks_fields {
                    pipe.cmd("HMGET")
                        .arg(self.key(&format!("run:{id}")))
                        .arg(fields);
                }
            }
            let answers: Vec<RedisValue> = if scan.others.is_empty() && !scan.checks_fields {
                Vec::new()
            } else {
                pipe.query_async(conn).await.db()?
            };
            let per_id = scan.others.len() + usize::from(scan.checks_fields);
            for (i, id) in batch.iter().enumerate() {
                examined += 1;
                let answers = answers
                    .get(i * per_id..(i + 1) * per_id)
                    .unwrap_or_default();
                if scan.admits(id, answers) {
                    total += 1;
                    let on_page = scan
                        .page_before
                        .as_deref()
                        .is_none_or(|before| id.as_str() < before);
                    if on_page && matched.len() < limit {
                        matched.push(id.clone());
                    }
                }
            }
            cursor = batch.last().cloned().or(cursor);
            if batch.len() < want {
                complete = true;
                break;
            }
        }
        Ok(RunPage {
            runs: self.runs_by_id(&matched).await?,
            total,
            scan: Some(ScanExtent {
                examined,
                complete,
                last: cursor.as_deref().and_then(RunId::parse),
            }),
        })
    }
}

/// One scan of the run list: the index it reads, the ones it checks, and the filter.
struct Scan<'a> {
    driver: &'a RunIds,
    others: &'a [RunIds],
    range: &'a IdRange,
    filter: &'a RunFilter,
    checks_fields: bool,
    /// The page holds only runs older than this one (the cursor), wherever the scan starts.
    page_before: Option<String>,
}

impl Scan<'_> {
    /// Whether run `id` passes, from the answers of its membership checks (one per other
    /// index) and, last, its fields.
    fn admits(&self, id: &str, answers: &[RedisValue]) -> bool {
        let in_others = self
            .others
            .iter()
            .zip(answers)
            .all(|(other, answer)| other.holds(id, answer));
        if !in_others {
            return false;
        }
        if !self.checks_fields {
            return true;
        }
        let values: Vec<Option<String>> = match answers.last() {
            Some(RedisValue::Array(items)) => items.iter().map(text_of).collect(),
            _ => return false,
        };
        facts_admitted(self.filter, &values)
    }
}

fn text_of(value: &RedisValue) -> Option<String> {
    match value {
        RedisValue::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        RedisValue::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

/// Whether the filter admits a run of these [`SCAN_FIELDS`] values (a run deleted meanwhile
/// has none and is left out).
fn facts_admitted(filter: &RunFilter, values: &[Option<String>]) -> bool {
    let get = |index: usize| values.get(index).and_then(Option::as_deref);
    let Some(name) = get(1) else { return false };
    let cost = Usd::from_micros(get(3).and_then(|v| v.parse().ok()).unwrap_or(0))
        + get(4)
            .and_then(|v| v.parse::<f64>().ok())
            .and_then(Usd::from_dollars)
            .unwrap_or_default();
    let error: Option<RunError> = get(5).and_then(|text| serde_json::from_str(text).ok());
    let inputs: Option<Value> = get(6).and_then(|text| serde_json::from_str(text).ok());
    filter.admits(&RunFacts {
        kind: get(0).and_then(RunKind::parse),
        name,
        queue: get(2).unwrap_or_default(),
        cost_usd: cost,
        error_code: error.as_ref().map(|e| e.code.as_str()),
        inputs: inputs.as_ref(),
    })
}

/// A range of run ids (of creation times): from `since` (inclusive) to `until` (exclusive).
#[derive(Debug, Default)]
struct IdRange {
    since: Option<String>,
    until: Option<String>,
}

impl IdRange {
    fn holds(&self, id: &str) -> bool {
        self.since.as_deref().is_none_or(|since| id >= since)
            && self.until.as_deref().is_none_or(|until| id < until)
    }
}

impl RunIds {
    /// Adds the check of whether `id` is in this index to `pipe` (nothing for a listed one).
    fn queue_membership(&self, pipe: &mut redis::Pipeline, id: &str) {
        match self {
            RunIds::Set(key) => {
                pipe.cmd("ZSCORE").arg(key).arg(id);
            }
            RunIds::Listed(_) => {
                pipe.cmd("ECHO").arg("listed");
            }
        }
    }

    /// Whether `id` is in this index, from the answer of [`Self::queue_membership`].
    fn holds(&self, id: &str, answer: &RedisValue) -> bool {
        match self {
            RunIds::Set(_) => !matches!(answer, RedisValue::Nil),
            RunIds::Listed(ids) => ids.iter().any(|listed| listed == id),
        }
    }

    async fn count(&self, conn: &mut ConnectionManager, range: &IdRange) -> StoreResult<u64> {
        Ok(match self {
            RunIds::Set(key) => redis::cmd("ZLEXCOUNT")
                .arg(key)
                .arg(
                    range
                        .since
                        .as_deref()
                        .map_or_else(|| "-".to_owned(), |id| format!("[{id}")),
                )
                .arg(
                    range
                        .until
                        .as_deref()
                        .map_or_else(|| "+".to_owned(), |id| format!("({id}")),
                )
                .query_async(conn)
                .await
                .db()?,
            RunIds::Listed(ids) => ids.iter().filter(|id| range.holds(id)).count() as u64,
        })
    }

    /// Up to `count` ids older than `before` (all when `None`) and in `range`, newest first.
    async fn page(
        &self,
        conn: &mut ConnectionManager,
        before: Option<&str>,
        range: &IdRange,
        count: usize,
    ) -> StoreResult<Vec<String>> {
        Ok(match self {
            RunIds::Set(key) => redis::cmd("ZREVRANGEBYLEX")
                .arg(key)
                .arg(before.map_or_else(|| "+".to_owned(), |id| format!("({id}")))
                .arg(
                    range
                        .since
                        .as_deref()
                        .map_or_else(|| "-".to_owned(), |id| format!("[{id}")),
                )
                .arg("LIMIT")
                .arg(0)
                .arg(count)
                .query_async(conn)
                .await
                .db()?,
            RunIds::Listed(ids) => ids
                .iter()
                .filter(|id| before.is_none_or(|before| id.as_str() < before) && range.holds(id))
                .take(count)
                .cloned()
                .collect(),
        })
    }
}

/// Script operations sent in one call at most.
const MAX_BATCH_OPS: usize = 64;
/// Script operations waiting in one process at most; beyond, new work (inserts, cancels,
/// resumes, reads) is refused with [`StoreError::Busy`] while the work of leased runs waits.
pub const MAX_QUEUED_OPS: usize = 4096;

/// Whether an operation waits for room in a full queue rather than being refused: the writes
/// of runs a worker holds, which must not be lost to a burst of submissions.
fn waits_when_full(op: &str) -> bool {
    matches!(
        op,
        "heartbeat"
            | "start_stage"
            | "record_step"
            | "commit"
            | "end_attempt"
            | "fail_run"
            | "claim"
            | "sweep"
            | "purge"
    )
}

/// The marker the library puts first in the answer of an operation that failed.
const OP_ERROR: &[u8] = b"!error";

/// One operation's answer: its value, or the error the library caught while running it.
fn op_answer(value: RedisValue) -> StoreResult<RedisValue> {
    if let RedisValue::Array(items) = &value {
        if let [RedisValue::BulkString(marker), message] = items.as_slice() {
            if marker.as_slice() == OP_ERROR {
                return Err(StoreError::Redis(
                    text(message).unwrap_or("operation failed").to_owned(),
                ));
            }
        }
    }
    Ok(value)
}
/// What a batch needs to reach the primary.
#[derive(Clone)]
struct Link {
    primary: std::sync::Arc<primary::Primary>,
    library: Library,
    prefix: String,
    durable: Durable,
}

impl Link {
    /// One call of the library with the batch's operations, followed (in the same round trip)
    /// by `WAIT` when acknowledgements must be durable.
    async fn send(&self, batch: &[Pending]) -> StoreResult<Vec<RedisValue>> {
        let mut conn = self.primary.conn();
        let mut pipe = redis::pipe();
        let call = pipe
            .cmd("FCALL")
            .arg(&self.library.function)
            .arg(0)
            .arg(&self.prefix)
            .arg("batch");
        for op in batch {
            call.arg(op.op).arg(op.args.len()).arg(&op.args);
        }
        let waits = self.durable.add_wait(&mut pipe);
        let mut answer: redis::RedisResult<Vec<RedisValue>> = pipe.query_async(&mut conn).await;
        // A Redis that restarted without its data (or whose functions were flushed), or a new
        // primary that never had it, lacks the library: load it and repeat the call, which
        // did nothing.
        if answer
            .as_ref()
            .is_err_and(|e| e.to_string().contains("Function not found"))
        {
            answer = match self.library.load(&mut conn).await {
                Ok(()) => pipe.query_async(&mut conn).await,
                Err(error) => Err(error),
            };
        }
        let mut answers = answer.map_err(store_error)?;
        if waits {
            let answer = answers.pop().unwrap_or(RedisValue::Nil);
            self.durable.check(&answer)?;
        }
        match answers.pop() {
            Some(RedisValue::Array(values)) if answers.is_empty() => Ok(values),
            other => Err(StoreError::Corrupt(format!("answer of FCALL: {other:?}"))),
        }
    }
}

/// Script calls in flight at once; operations issued meanwhile wait and go together.
const MAX_CALLS_IN_FLIGHT: usize = 4;

/// A script operation waiting for its call.
struct Pending {
    op: &'static str,
    args: Vec<String>,
    reply: oneshot::Sender<StoreResult<RedisValue>>,
}

/// Sends script operations in batches until every store handle is gone: a call takes whatever
/// operations wait, up to [`MAX_BATCH_OPS`], so an idle store answers one operation at once and
/// a busy one shares each call (and each index write of the script) among many runs.
async fn send_batches(mut pending: mpsc::Receiver<Pending>, link: Link) {
    let calls = std::sync::Arc::new(Semaphore::new(MAX_CALLS_IN_FLIGHT));
    while let Some(first) = pending.recv().await {
        let Ok(permit) = calls.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_OPS {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let link = link.clone();
        tokio::spawn(async move {
            let answer = link.send(&batch).await;
            drop(permit);
            match answer {
                Ok(values) if values.len() == batch.len() => {
                    // Each operation ran on its own: one that failed fails alone.
                    for (op, value) in batch.into_iter().zip(values) {
                        let _ = op.reply.send(op_answer(value));
                    }
                }
                Ok(values) => {
                    let text = format!("{} answers for {} operations", values.len(), batch.len());
                    for op in batch {
                        let _ = op.reply.send(Err(StoreError::Corrupt(text.clone())));
                    }
                }
                Err(error) => {
                    link.primary.suspect(&error);
                    for op in batch {
                        let _ = op.reply.send(Err(again(&error)));
                    }
                }
            }
        });
    }
}

fn json_text(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

/// A reply's text, borrowed.
fn text(value: &RedisValue) -> Option<&str> {
    match value {
        RedisValue::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        RedisValue::SimpleString(text) => Some(text),
        _ => None,
    }
}

/// Set fields of a hash (or of one stage in it), borrowed from the reply. Found by a scan: a
/// run has a few dozen fields, too few for a map of owned strings to pay for itself.
#[derive(Default)]
struct HashFields<'a>(Vec<(&'a str, &'a str)>);

impl<'a> HashFields<'a> {
    fn get(&self, name: &str) -> Option<&'a str> {
        self.0
            .iter()
            .find(|(field, _)| *field == name)
            .map(|(_, value)| *value)
    }
}

fn millis(map: &HashFields<'_>, field: &str) -> Option<DateTime<Utc>> {
    map.get(field)
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| to_datetime(v as i64))
}

fn number(map: &HashFields<'_>, field: &str) -> f64 {
    map.get(field).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

/// An amount kept in micro-dollars under `field`, plus what a hash written before that kept in
/// dollars under `legacy`.
fn money(map: &HashFields<'_>, field: &str, legacy: &str) -> Usd {
    let micros = map.get(field).and_then(|v| v.parse().ok()).unwrap_or(0);
    let dollars = map
        .get(legacy)
        .and_then(|v| v.parse::<f64>().ok())
        .and_then(Usd::from_dollars)
        .unwrap_or_default();
    Usd::from_micros(micros) + dollars
}

fn parse_json<T: serde::de::DeserializeOwned>(
    map: &HashFields<'_>,
    field: &str,
) -> StoreResult<Option<T>> {
    match map.get(field) {
        None => Ok(None),
        Some(text) => serde_json::from_str(text)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("{field}: {e}"))),
    }
}

fn run_from_maps(run: &HashFields<'_>, stages: &[HashFields<'_>]) -> StoreResult<RunRecord> {
    let field = |name: &str| {
        run.get(name)
            .map(str::to_owned)
            .ok_or_else(|| StoreError::Corrupt(format!("run has no {name}")))
    };
    let id = field("id")?;
    let kind = field("kind")?;
    let status = field("status")?;
    let stages = stages
        .iter()
        .map(|stage| {
            let status = stage.get("status").unwrap_or_default();
            Ok(StageRecord {
                name: stage.get("name").unwrap_or_default().to_owned(),
                status: StageStatus::parse(status)
                    .ok_or_else(|| StoreError::Corrupt(format!("stage status {status}")))?,
                attempts: number(stage, "attempts") as u32,
                started_at: millis(stage, "started_at"),
                finished_at: millis(stage, "finished_at"),
                cost_usd: money(stage, "cost_micros", "cost_usd"),
                artifacts: parse_json(stage, "artifacts")?.unwrap_or_default(),
                output: parse_json(stage, "output")?,
                error: parse_json(stage, "error")?,
                progress: match (stage.get("progress_done"), stage.get("progress_total")) {
                    (Some(done), Some(total)) => Some(Progress {
                        done: done.parse().unwrap_or(0),
                        total: total.parse().unwrap_or(0),
                    }),
                    _ => None,
                },
                next_attempt_at: millis(stage, "next_attempt_at"),
                reused_from: stage.get("reused_from").map(str::to_owned),
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    Ok(RunRecord {
        id: RunId::parse(&id).ok_or_else(|| StoreError::Corrupt(format!("run id {id}")))?,
        kind: RunKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("run kind {kind}")))?,
        name: field("name")?,
        queue: field("queue")?,
        inputs: parse_json(run, "inputs")?.unwrap_or(Value::Null),
        status: RunStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("run status {status}")))?,
        provider_mode: {
            let mode = field("provider_mode")?;
            ProviderMode::parse(&mode)
                .ok_or_else(|| StoreError::Corrupt(format!("provider mode {mode}")))?
        },
        budget_usd: match (run.get("budget_micros"), run.get("budget_usd")) {
            (Some(micros), _) if !micros.is_empty() => micros.parse().ok().map(Usd::from_micros),
            (_, Some(dollars)) => dollars.parse().ok().and_then(Usd::from_dollars),
            _ => None,
        },
        cost_usd: money(run, "cost_micros", "cost_usd"),
        current_stage: run.get("current_stage").map(str::to_owned),
        result: parse_json(run, "result")?,
        error: parse_json(run, "error")?,
        worker: run.get("worker").map(str::to_owned),
        fence: FenceToken(number(run, "fence") as i64),
        lease_expires_at: millis(run, "lease_expires_at"),
        cancel_requested: run.get("cancel_requested") == Some("1"),
        created_at: millis(run, "created_at").unwrap_or_default(),
        updated_at: millis(run, "updated_at").unwrap_or_default(),
        finished_at: millis(run, "finished_at"),
        reuse: run.get("reuse") == Some("1"),
        stages,
        event_seq: run
            .get("event_seq")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
    })
}

/// A run from its hash: the run's fields, and each stage's as `s{index}:{field}`; an empty
/// field is an unset one.
fn run_from_hash(hash: &RedisValue) -> StoreResult<Option<RunRecord>> {
    let RedisValue::Array(items) = hash else {
        return Ok(None);
    };
    if items.is_empty() {
        return Ok(None);
    }
    let mut run = HashFields(Vec::with_capacity(items.len() / 2));
    let mut stages: Vec<HashFields<'_>> = Vec::new();
    for pair in items.chunks(2) {
        let [field, value] = pair else { continue };
        let (Some(field), Some(value)) = (text(field), text(value)) else {
            continue;
        };
        // The library keeps unset fields of the hot path as empty strings.
        if value.is_empty() {
            continue;
        }
        match stage_field(field) {
            Some((index, _)) if index >= MAX_STAGES => {
                return Err(StoreError::Corrupt(format!(
                    "a run stores a field of stage {index}; at most {MAX_STAGES} exist"
                )));
            }
            Some((index, name)) => {
                if stages.len() <= index {
                    stages.resize_with(index + 1, HashFields::default);
                }
                stages[index].0.push((name, value));
            }
            None => run.0.push((field, value)),
        }
    }
    let declared = run
        .get("stages")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0);
    if declared > MAX_STAGES || stages.len() > MAX_STAGES {
        return Err(StoreError::Corrupt(format!(
            "a run declares {declared} stages or stores {}; at most {MAX_STAGES} exist",
            stages.len()
        )));
    }
    if stages.len() < declared {
        stages.resize_with(declared, HashFields::default);
    }
    run_from_maps(&run, &stages).map(Some)
}

/// `s{index}:{name}` → (index, name); run fields never look like this.
fn stage_field(field: &str) -> Option<(usize, &str)> {
    let rest = field.strip_prefix('s')?;
    let (index, name) = rest.split_once(':')?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((index.parse().ok()?, name))
}

/// An event as the script stores it (`at` in milliseconds; its sequence number is its
/// position in the list).
#[derive(serde::Deserialize)]
struct StoredEvent {
    at: i64,
    kind: kernel::EventKind,
    stage: Option<String>,
    data: Value,
}

#[async_trait]
impl RunStore for RedisStore {
    fn backend_name(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> StoreResult<()> {
        let mut conn = self.primary.conn();
        let _: String = redis::cmd("PING").query_async(&mut conn).await.db()?;
        Ok(())
    }

    async fn insert_run(&self, run: NewRun) -> StoreResult<(RunRecord, bool)> {
        let mut args = vec![
            run.id.to_string(),
            run.kind.as_str().to_owned(),
            run.name.clone(),
            run.queue.clone(),
            run.inputs.to_string(),
            run.provider_mode.as_str().to_owned(),
            run.budget_usd
                .map(|b| b.micros().to_string())
                .unwrap_or_default(),
            run.idempotency_key.clone().unwrap_or_default(),
            run.request_hash.clone().unwrap_or_default(),
            if run.reuse { "1" } else { "0" }.to_owned(),
            run.stage_names.len().to_string(),
        ];
        args.extend(run.stage_names.iter().cloned());
        event_args(&mut args, &[kernel::queued(&run.queue)]);
        let (id, created, at, hash): (String, i64, i64, String) =
            self.call("insert", &args).await?;
        if created == 1 {
            // The run is exactly what was sent, queued, with its one event: no need to read
            // it back.
            let mut record = RunRecord::queued(run, to_datetime(at));
            record.event_seq = 1;
            return Ok((record, true));
        }
        // Another run holds the idempotency key: answer that one, if it was asked for alike.
        let id = RunId::parse(&id).ok_or_else(|| StoreError::Corrupt(format!("run id {id}")))?;
        if !hash.is_empty() && Some(&hash) != run.request_hash.as_ref() {
            return Err(StoreError::IdempotencyConflict(id));
        }
        let record = self.get_run(id).await?.ok_or(StoreError::NotFound(id))?;
        Ok((record, false))
    }

    async fn get_run(&self, id: RunId) -> StoreResult<Option<RunRecord>> {
        let hash: RedisValue = self.call("get", &[id.to_string()]).await?;
        run_from_hash(&hash)
    }

    async fn list_runs(&self, filter: &RunFilter) -> StoreResult<RunPage> {
        let mut conn = self.primary.conn();
        let range = IdRange {
            since: filter.since.map(|id| id.to_string()),
            until: filter.until.map(|id| id.to_string()),
        };
        let cursor = match (filter.before, filter.until) {
            (Some(before), Some(until)) => Some(before.min(until)),
            (before, until) => before.or(until),
        }
        .map(|id| id.to_string());
        let mut indexes = self.indexes_of(&mut conn, filter).await?;
        // The index with the fewest ids in the range drives; the others are checked per id.
        let mut sizes = Vec::with_capacity(indexes.len());
        for index in &indexes {
            sizes.push(index.count(&mut conn, &range).await?);
        }
        let smallest = (0..indexes.len()).min_by_key(|&i| sizes[i]).unwrap_or(0);
        let driver = indexes.swap_remove(smallest);
        let checks_fields = filter.min_cost.is_some()
            || filter.max_cost.is_some()
            || filter.error_code.is_some()
            || filter.input_text.is_some();
        if indexes.is_empty() && !checks_fields {
            let page = driver
                .page(&mut conn, cursor.as_deref(), &range, filter.limit as usize)
                .await?;
            return Ok(RunPage {
                runs: self.runs_by_id(&page).await?,
                total: sizes[smallest],
                scan: None,
            });
        }
        // A driving index small enough to read whole is read from the top of the range, so the
        // total counts every match (the page still starts after the cursor).
        let whole = sizes[smallest] <= core_store::SCAN_LIMIT;
        let scan = Scan {
            driver: &driver,
            others: &indexes,
            range: &range,
            filter,
            checks_fields,
            page_before: cursor.clone(),
        };
        let start = if whole { range.until.clone() } else { cursor };
        self.scan_runs(&mut conn, scan, start).await
    }

    async fn claim(
        &self,
        queues: &[String],
        worker: &WorkerId,
        ttl: Duration,
        max: usize,
    ) -> StoreResult<Vec<Claimed>> {
        let asked = tokio::time::Instant::now();
        let mut args = vec![
            worker.to_string(),
            ttl.as_millis().to_string(),
            max.to_string(),
            self.primary.fence_floor().to_string(),
        ];
        args.extend(queues.iter().cloned());
        // Five values per claimed run, in one flat list (nested lists cost Redis more).
        let flat: Vec<RedisValue> = self.call("claim", &args).await?;
        if flat.is_empty() {
            return Ok(Vec::new());
        }
        if flat.len() % 5 != 0 {
            return Err(StoreError::Corrupt(format!(
                "answer of claim: {} values",
                flat.len()
            )));
        }
        let answer = flat
            .chunks_exact(5)
            .map(|c| {
                redis::from_redis_value::<(String, i64, i64, u32, i64)>(RedisValue::Array(
                    c.to_vec(),
                ))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt(format!("answer of claim: {e}")))?;
        // The script answers ids, fences and the stage it started; the hashes are read here in
        // one pipeline, which costs Redis far less than copying them through the script. Only
        // the lease holder writes a running run, so nothing changes them in between.
        let mut pipe = redis::pipe();
        for (id, ..) in &answer {
            pipe.cmd("HGETALL").arg(self.key(&format!("run:{id}")));
        }
        let mut conn = self.primary.conn();
        let hashes: Vec<RedisValue> = pipe.query_async(&mut conn).await.db()?;
        let mut claimed = Vec::with_capacity(answer.len());
        for ((id, fence, started, attempt, recovered), hash) in answer.iter().zip(&hashes) {
            let id =
                RunId::parse(id).ok_or_else(|| StoreError::Corrupt(format!("claimed id {id}")))?;
            let run = run_from_hash(hash)?
                .ok_or_else(|| StoreError::Corrupt(format!("claimed run {id} has no hash")))?;
            let lease = Lease {
                run_id: id,
                worker: worker.clone(),
                fence: FenceToken(*fence),
            };
            if let Ok(stage) = usize::try_from(*started) {
                self.prestarted.insert(&lease, stage, *attempt);
            }
            claimed.push(Claimed {
                lease,
                run,
                recovered: *recovered == 1,
                asked,
            });
        }
        Ok(claimed)
    }

    async fn heartbeat(&self, lease: &Lease, ttl: Duration) -> StoreResult<bool> {
        Ok(self
            .fenced("heartbeat", lease, vec![ttl.as_millis().to_string()])
            .await?
            == 1)
    }

    async fn start_stage(&self, lease: &Lease, stage: usize) -> StoreResult<u32> {
        if let Some(attempt) = self.prestarted.take(lease, stage) {
            return Ok(attempt);
        }
        Ok(self
            .fenced("start_stage", lease, vec![stage.to_string()])
            .await? as u32)
    }

    async fn steps(&self, run: RunId, stage: usize) -> StoreResult<Vec<StepRecord>> {
        let mut conn = self.primary.conn();
        let all: HashMap<String, String> = conn
            .hgetall(self.key(&format!("run:{run}:steps")))
            .await
            .db()?;
        let prefix = format!("{stage}:");
        all.iter()
            .filter(|(field, _)| field.starts_with(&prefix))
            .map(|(_, value)| {
                serde_json::from_str(value).map_err(|e| StoreError::Corrupt(format!("step: {e}")))
            })
            .collect()
    }

    async fn record_step(
        &self,
        lease: &Lease,
        stage: usize,
        step: &StepRecord,
        progress: Progress,
    ) -> StoreResult<()> {
        let mut args = vec![
            stage.to_string(),
            step.key.clone(),
            json_text(step),
            step.cost_usd.micros().to_string(),
            progress.done.to_string(),
            progress.total.to_string(),
        ];
        event_args(&mut args, &[kernel::step_completed(step, progress)]);
        self.fenced("record_step", lease, args).await?;
        Ok(())
    }

    async fn commit_stage(
        &self,
        lease: &Lease,
        stage: usize,
        checkpoint: StageCheckpoint,
    ) -> StoreResult<()> {
        self.prestarted.forget(lease);
        let commit = kernel::commit(&checkpoint);
        let mut args = vec![
            stage.to_string(),
            checkpoint.output.to_string(),
            json_text(&checkpoint.artifacts),
            checkpoint.cost_usd.micros().to_string(),
            checkpoint
                .run_result
                .map(|r| r.to_string())
                .unwrap_or_default(),
            checkpoint
                .reused_from
                .map(|id| id.to_string())
                .unwrap_or_default(),
            if commit.completes_run {
                RunStatus::Completed.as_str()
            } else {
                ""
            }
            .to_owned(),
        ];
        event_args(&mut args, &commit.events);
        self.fenced("commit", lease, args).await?;
        Ok(())
    }

    async fn end_attempt(
        &self,
        lease: &Lease,
        stage: usize,
        outcome: StageOutcome,
    ) -> StoreResult<()> {
        let end = kernel::attempt_end(&outcome);
        let prestarted = self.prestarted.forget(lease);
        let unstarted = prestarted == Some(stage) && matches!(outcome, StageOutcome::Abandoned);
        let millis =
            |delay: Option<Duration>| delay.map(|d| d.as_millis().to_string()).unwrap_or_default();
        let mut args = vec![
            stage.to_string(),
            end.stage.as_str().to_owned(),
            end.run.as_str().to_owned(),
            end.stage_error.as_ref().map(json_text).unwrap_or_default(),
            end.run_error.as_ref().map(json_text).unwrap_or_default(),
            if end.stage_finished { "1" } else { "0" }.to_owned(),
            millis(end.next_attempt_in),
            millis(end.due_in),
            // A stage the claim started and the worker gives back unrun: the claim's attempt is
            // not counted (this store's own bookkeeping, beside the decision).
            if unstarted { "1" } else { "0" }.to_owned(),
        ];
        event_args(&mut args, &end.events);
        self.fenced("end_attempt", lease, args).await?;
        Ok(())
    }

    async fn fail_run(&self, lease: &Lease, error: RunError) -> StoreResult<()> {
        let (status, event) = kernel::run_failed(&error);
        let unstarted = self.prestarted.forget(lease);
        let mut args = vec![
            json_text(&error),
            status.as_str().to_owned(),
            unstarted.map(|stage| stage.to_string()).unwrap_or_default(),
        ];
        event_args(&mut args, &[event]);
        self.fenced("fail_run", lease, args).await?;
        Ok(())
    }

    async fn request_cancel(&self, id: RunId, actor: Actor) -> StoreResult<RunRecord> {
        // Read, decide, and apply only to the run as it was read: a run whose status changed
        // in between is read and decided again.
        for _ in 0..CHANGED_RETRIES {
            let run = self.get_run(id).await?.ok_or(StoreError::NotFound(id))?;
            let (at_once, status, events) = match kernel::cancel(id, run.status, actor)? {
                kernel::Cancel::Now { run, event } => ("1", run.as_str(), vec![event]),
                kernel::Cancel::Requested { event } => ("0", "", vec![event]),
            };
            let mut args = vec![
                id.to_string(),
                run.status.as_str().to_owned(),
                at_once.to_owned(),
                status.to_owned(),
            ];
            event_args(&mut args, &events);
            let answer: String = self.call("cancel", &args).await?;
            match answer.as_str() {
                "ok" => return self.get_run(id).await?.ok_or(StoreError::NotFound(id)),
                "missing" => return Err(StoreError::NotFound(id)),
                _ => continue,
            }
        }
        Err(StoreError::Conflict(format!(
            "run {id} keeps changing; try again"
        )))
    }

    async fn resume(
        &self,
        id: RunId,
        from: FromStage,
        changes: ResumeChanges,
    ) -> StoreResult<RunRecord> {
        let run = self.get_run(id).await?.ok_or(StoreError::NotFound(id))?;
        let from_idx = core_store::resume_start(&run, &from)?;
        let forget = matches!(from, FromStage::Named(_));
        let (status, event) = kernel::resumed(&run.stages[from_idx].name, changes.actor);
        let mut args = vec![
            id.to_string(),
            run.status.as_str().to_owned(),
            from_idx.to_string(),
            if forget { "1" } else { "0" }.to_owned(),
            changes
                .inputs
                .as_ref()
                .map(|inputs| inputs.to_string())
                .unwrap_or_default(),
            changes
                .budget_usd
                .map(|budget| budget.micros().to_string())
                .unwrap_or_default(),
            status.as_str().to_owned(),
        ];
        event_args(&mut args, &[event]);
        let answer: String = self.call("resume", &args).await?;
        match answer.as_str() {
            "ok" => self.get_run(id).await?.ok_or(StoreError::NotFound(id)),
            "missing" => Err(StoreError::NotFound(id)),
            _ => Err(StoreError::Conflict(format!(
                "run {id} changed while resuming; try again"
            ))),
        }
    }

    async fn record_reusable(&self, key: &str, checkpoint: &ReusableCheckpoint) -> StoreResult<()> {
        // Kept as long as a finished run is: by then its artifacts may be gone.
        let mut conn = self.primary.conn();
        let _: () = conn
            .pset_ex(
                self.key(&format!("reuse:{key}")),
                json_text(checkpoint),
                self.retention.as_millis() as u64,
            )
            .await
            .db()?;
        self.durable.wait(&mut conn).await
    }

    async fn find_reusable(&self, key: &str) -> StoreResult<Option<ReusableCheckpoint>> {
        let mut conn = self.primary.conn();
        let text: Option<String> = conn.get(self.key(&format!("reuse:{key}"))).await.db()?;
        let Some(text) = text else { return Ok(None) };
        let checkpoint: ReusableCheckpoint = serde_json::from_str(&text)
            .map_err(|e| StoreError::Corrupt(format!("reusable checkpoint: {e}")))?;
        let exists: bool = conn
            .exists(self.key(&format!("run:{}", checkpoint.run_id)))
            .await
            .db()?;
        Ok(exists.then_some(checkpoint))
    }

    async fn sweep_expired_leases(&self) -> StoreResult<Vec<RunId>> {
        // Read the expired leases, decide each, and apply the decisions only to leases that
        // are still the ones read (a worker may renew or release in between).
        let mut conn = self.primary.conn();
        let now = server_millis(&mut conn).await?;
        let ids: Vec<String> = conn
            .zrangebyscore_limit(
                self.key("leases"),
                "-inf",
                now - 1,
                0,
                core_store::SWEEP_BATCH as isize,
            )
            .await
            .db()?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET")
                .arg(self.key(&format!("run:{id}")))
                .arg("lease_expires_at")
                .arg("cancel_requested")
                .arg("worker");
        }
        let leases: Vec<(Option<String>, Option<String>, Option<String>)> =
            pipe.query_async(&mut conn).await.db()?;
        let expiries = ids
            .iter()
            .zip(leases)
            .map(|(id, (expires, cancel, worker))| async move {
                let expiry = kernel::lease_expired(
                    cancel.as_deref() == Some("1"),
                    worker.as_deref().filter(|w| !w.is_empty()),
                );
                let mut args = vec![
                    id.clone(),
                    expires.unwrap_or_default(),
                    expiry.run.as_str().to_owned(),
                    if expiry.requeue { "1" } else { "0" }.to_owned(),
                ];
                event_args(&mut args, &[expiry.event]);
                let applied: i64 = self.call("expire", &args).await?;
                Ok::<_, StoreError>(
                    (applied == 1 && expiry.requeue)
                        .then(|| RunId::parse(id))
                        .flatten(),
                )
            });
        let mut recovered = Vec::new();
        for outcome in futures::future::join_all(expiries).await {
            if let Some(id) = outcome? {
                recovered.push(id);
            }
        }
        Ok(recovered)
    }

    async fn purge_finished(&self, retention: Duration) -> StoreResult<u64> {
        let mut conn = self.primary.conn();
        let now_ms = server_millis(&mut conn).await?;
        let retention = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms.saturating_sub(retention);
        // Bounded: one batch per call; the sweeper calls again while batches come back full.
        self.call(
            "purge",
            &[cutoff.to_string(), core_store::PURGE_BATCH.to_string()],
        )
        .await
    }

    async fn events_after(
        &self,
        run: RunId,
        after_seq: i64,
        limit: u32,
    ) -> StoreResult<Vec<RunEvent>> {
        let mut conn = self.primary.conn();
        let start = after_seq.clamp(0, i64::from(u32::MAX)) as isize;
        let items: Vec<String> = conn
            .lrange(
                self.key(&format!("run:{run}:events")),
                start,
                start.saturating_add(limit as isize).saturating_sub(1),
            )
            .await
            .db()?;
        items
            .iter()
            .zip(start as i64 + 1..)
            .map(|(text, seq)| {
                let stored: StoredEvent = serde_json::from_str(text)
                    .map_err(|e| StoreError::Corrupt(format!("event: {e}")))?;
                Ok(RunEvent {
                    seq,
                    run_id: run,
                    at: to_datetime(stored.at),
                    kind: stored.kind,
                    stage: stored.stage,
                    data: stored.data,
                })
            })
            .collect()
    }

    async fn run_positions(&self, runs: &[RunId]) -> StoreResult<Vec<RunPosition>> {
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.primary.conn();
        let mut pipe = redis::pipe();
        for id in runs {
            pipe.cmd("LLEN")
                .arg(self.key(&format!("run:{id}:events")))
                .cmd("HGET")
                .arg(self.key(&format!("run:{id}")))
                .arg("status");
        }
        let answers: Vec<(i64, Option<String>)> = pipe.query_async(&mut conn).await.db()?;
        Ok(runs
            .iter()
            .zip(answers)
            .filter_map(|(id, (events, status))| {
                let status = status.filter(|s| !s.is_empty())?;
                Some(RunPosition {
                    run_id: *id,
                    last_event_seq: events,
                    finished: RunStatus::parse(&status).is_none_or(RunStatus::is_finished),
                })
            })
            .collect())
    }

    async fn oldest_waiting(&self) -> StoreResult<Vec<QueueWait>> {
        let mut conn = self.primary.conn();
        let mut queues: Vec<String> = self
            .queue_depths()
            .await?
            .into_iter()
            .filter(|d| matches!(d.status, RunStatus::Queued | RunStatus::Retrying))
            .map(|d| d.queue)
            .collect();
        queues.dedup();
        if queues.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for queue in &queues {
            pipe.cmd("ZRANGE")
                .arg(self.key(&format!("queue:{queue}:due")))
                .arg(0)
                .arg(0)
                .arg("WITHSCORES");
        }
        let oldest: Vec<Vec<(String, i64)>> = pipe.query_async(&mut conn).await.db()?;
        Ok(queues
            .into_iter()
            .zip(oldest)
            .filter_map(|(queue, first)| {
                let (_, due) = first.into_iter().next()?;
                Some(QueueWait {
                    queue,
                    oldest_due_at: to_datetime(due),
                })
            })
            .collect())
    }

    async fn add_throughput(&self, counts: &[Throughput]) -> StoreResult<()> {
        if counts.is_empty() {
            return Ok(());
        }
        let mut conn = self.primary.conn();
        let kept = core_store::THROUGHPUT_KEPT.as_millis() as i64 + HOUR_MS;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for count in counts {
            let minute = count.minute.timestamp_millis();
            let key = self.throughput_key(&count.queue, minute);
            for (outcome, n) in [
                ("completed", count.completed),
                ("failed", count.failed),
                ("cancelled", count.cancelled),
            ] {
                if n > 0 {
                    pipe.hincr(&key, format!("{minute}:{outcome}"), n).ignore();
                }
            }
            pipe.pexpire(&key, kept).ignore();
            pipe.sadd(self.key("throughput:queues"), &count.queue)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.db()
    }

    async fn throughput(&self, since: DateTime<Utc>) -> StoreResult<Vec<Throughput>> {
        let mut conn = self.primary.conn();
        let queues: Vec<String> = conn.smembers(self.key("throughput:queues")).await.db()?;
        let now = server_millis(&mut conn).await?;
        let since = since.timestamp_millis();
        let first_hour = since - since.rem_euclid(HOUR_MS);
        let mut keys = Vec::new();
        for queue in &queues {
            let mut hour = first_hour;
            while hour <= now {
                keys.push((queue, self.throughput_key(queue, hour)));
                hour += HOUR_MS;
            }
        }
        let mut pipe = redis::pipe();
        for (_, key) in &keys {
            pipe.hgetall(key);
        }
        let hours: Vec<HashMap<String, u64>> = if keys.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut conn).await.db()?
        };
        let mut minutes: std::collections::BTreeMap<(i64, &str), Throughput> = Default::default();
        for ((queue, _), fields) in keys.iter().zip(hours) {
            for (field, n) in fields {
                let Some((minute, outcome)) = field.split_once(':') else {
                    continue;
                };
                let Ok(minute) = minute.parse::<i64>() else {
                    continue;
                };
                if minute < since {
                    continue;
                }
                let entry = minutes
                    .entry((minute, queue.as_str()))
                    .or_insert_with(|| Throughput {
                        queue: (*queue).clone(),
                        minute: to_datetime(minute),
                        ..Throughput::default()
                    });
                match outcome {
                    "completed" => entry.completed += n,
                    "failed" => entry.failed += n,
                    "cancelled" => entry.cancelled += n,
                    _ => {}
                }
            }
        }
        Ok(minutes.into_values().collect())
    }

    async fn queue_depths(&self) -> StoreResult<Vec<QueueDepth>> {
        let mut conn = self.primary.conn();
        let counts: HashMap<String, i64> = conn.hgetall(self.key("counts")).await.db()?;
        let mut depths: Vec<QueueDepth> = counts
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .filter_map(|(field, n)| {
                let (queue, status) = field.rsplit_once(':')?;
                Some(QueueDepth {
                    queue: queue.to_owned(),
                    status: RunStatus::parse(status)?,
                    count: n as u64,
                })
            })
            .collect();
        depths.sort_by(|a, b| (&a.queue, a.status.as_str()).cmp(&(&b.queue, b.status.as_str())));
        Ok(depths)
    }

    async fn worker_heartbeat(&self, worker: &WorkerInfo) -> StoreResult<()> {
        let mut conn = self.primary.conn();
        let now_ms = server_millis(&mut conn).await?;
        let mut info = worker.clone();
        info.last_heartbeat = to_datetime(now_ms);
        let key = self.key(&format!("worker:{}", worker.id));
        redis::pipe()
            .atomic()
            .zadd(self.key("workers"), worker.id.as_str(), now_ms)
            .set(&key, json_text(&info))
            .pexpire(&key, (2 * WORKER_STALE_AFTER.as_millis()) as i64)
            .query_async::<()>(&mut conn)
            .await
            .db()?;
        Ok(())
    }

    async fn unregister_worker(&self, id: &WorkerId) -> StoreResult<()> {
        let mut conn = self.primary.conn();
        redis::pipe()
            .atomic()
            .zrem(self.key("workers"), id.as_str())
            .del(self.key(&format!("worker:{id}")))
            .query_async::<()>(&mut conn)
            .await
            .db()?;
        Ok(())
    }

    async fn list_workers(&self) -> StoreResult<Vec<WorkerInfo>> {
        let mut conn = self.primary.conn();
        let now_ms = server_millis(&mut conn).await?;
        let cutoff = now_ms - WORKER_STALE_AFTER.as_millis() as i64;
        let stale: Vec<String> = conn
            .zrangebyscore(self.key("workers"), "-inf", cutoff)
            .await
            .db()?;
        for id in &stale {
            let _: () = redis::pipe()
                .zrem(self.key("workers"), id)
                .del(self.key(&format!("worker:{id}")))
                .query_async(&mut conn)
                .await
                .db()?;
        }
        let ids: Vec<String> = conn.zrange(self.key("workers"), 0, -1).await.db()?;
        let mut workers = Vec::with_capacity(ids.len());
        for id in ids {
            let text: Option<String> = conn.get(self.key(&format!("worker:{id}"))).await.db()?;
            if let Some(info) = text.and_then(|t| serde_json::from_str::<WorkerInfo>(&t).ok()) {
                workers.push(info);
            }
        }
        workers.sort_by_key(|w| w.started_at);
        Ok(workers)
    }

    async fn add_counters(&self, deltas: &[(String, f64)]) -> StoreResult<()> {
        if deltas.is_empty() {
            return Ok(());
        }
        let mut conn = self.primary.conn();
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (name, amount) in deltas {
            pipe.cmd("HINCRBYFLOAT")
                .arg(self.key("metrics"))
                .arg(name)
                .arg(*amount)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.db()?;
        Ok(())
    }

    async fn counters(&self) -> StoreResult<Vec<(String, f64)>> {
        let mut conn = self.primary.conn();
        let all: HashMap<String, f64> = conn.hgetall(self.key("metrics")).await.db()?;
        let mut counters: Vec<_> = all.into_iter().collect();
        counters.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(counters)
    }

    async fn wait_for_work(&self, queues: &[String], timeout: Duration) {
        // Something due already, or due before the longest block: wait only that long.
        let next_due: StoreResult<i64> = self.call("next_due", queues).await;
        let wait = match next_due {
            Ok(0) => return,
            Ok(ms) if ms > 0 => Duration::from_millis(ms as u64).min(MAX_BLOCK),
            Ok(_) => MAX_BLOCK,
            Err(_) => {
                tokio::time::sleep(timeout).await;
                return;
            }
        };
        let mut guard = self.blocking.lock().await;
        let primary = self.primary.current();
        if guard.as_ref().is_none_or(|(addr, _)| *addr != primary.addr) {
            match primary.client.get_multiplexed_async_connection().await {
                Ok(conn) => *guard = Some((primary.addr.clone(), conn)),
                Err(_) => {
                    drop(guard);
                    tokio::time::sleep(timeout).await;
                    return;
                }
            }
        }
        let Some((_, conn)) = guard.as_mut() else {
            return;
        };
        let keys: Vec<String> = queues
            .iter()
            .map(|q| self.key(&format!("queue:{q}:wake")))
            .collect();
        let seconds = wait.as_secs_f64().max(0.01);
        // The client-side limit is longer than the server-side block, so a live connection is
        // never cut short; a dead one is replaced next time.
        let answer = tokio::time::timeout(
            wait + Duration::from_secs(2),
            redis::cmd("BLPOP")
                .arg(&keys)
                .arg(seconds)
                .query_async::<Option<(String, String)>>(conn),
        )
        .await;
        if !matches!(answer, Ok(Ok(_))) {
            *guard = None;
            drop(guard);
            tokio::time::sleep(timeout).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_network_failure_is_an_outage_and_refused_tls_is_final() {
        let io = |kind| redis::RedisError::from(std::io::Error::from(kind));
        for kind in [
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::UnexpectedEof,
            std::io::ErrorKind::NotFound,
        ] {
            assert!(matches!(store_error(io(kind)), StoreError::Unavailable(_)));
        }
        let untrusted = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName),
        ));
        assert!(matches!(store_error(untrusted), StoreError::Redis(_)));
        let alert = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::DecryptError,
        ));
        assert!(matches!(store_error(alert), StoreError::Unavailable(_)));
    }

    #[test]
    fn a_change_is_acknowledged_only_when_enough_replicas_have_it() {
        let wait = Durable {
            replicas: 2,
            timeout: Duration::from_millis(100),
            aof: false,
        };
        assert!(wait.check(&RedisValue::Int(2)).is_ok());
        assert!(wait.check(&RedisValue::Int(3)).is_ok());
        let short = wait.check(&RedisValue::Int(1)).expect_err("one replica");
        assert!(matches!(short, StoreError::Unavailable(_)), "{short}");
        let waitaof = Durable { aof: true, ..wait };
        let counts = |local, replicas| {
            RedisValue::Array(vec![RedisValue::Int(local), RedisValue::Int(replicas)])
        };
        assert!(waitaof.check(&counts(1, 2)).is_ok());
        assert!(waitaof.check(&counts(0, 2)).is_err(), "not fsynced locally");
        assert!(waitaof.check(&counts(1, 1)).is_err());
        assert!(matches!(
            waitaof.check(&RedisValue::Nil),
            Err(StoreError::Corrupt(_))
        ));
    }
}
