//! Group commit: the write operations of one process take turns in one shared transaction on
//! one connection, which commits when no operation is waiting (at most [`MAX_GROUP`] per group).

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use sqlx::{Sqlite, SqlitePool};
use stagecraft_core::store::{Lease, StoreError, StoreResult};
use tokio::sync::Notify;

use crate::{Db, store_error};

/// Group commit: the write operations of this process share one SQLite transaction on one
/// connection, taking turns through a fair async mutex, and the transaction commits when no
/// further operation is waiting (or after [`MAX_GROUP`] operations). Each operation's
/// `commit()` returns only once the transaction holding its changes is committed, so a caller
/// that sees `Ok` has a durable write, as with a transaction of its own; the group pays for one
/// `BEGIN`/`COMMIT` and one WAL commit instead of one each.
///
/// Invariant: one operation's failure never fails another's. Each operation runs inside a
/// savepoint of the shared transaction: an operation that gives up (`rollback()`: not found, a
/// conflict, a stale fence) or fails part-way (dropped on an error after some of its writes) has
/// its own savepoint rolled back, and the rest of the group commits as if it had never run. Only
/// when SQLite itself cannot undo a savepoint or commit is the whole group rolled back, and every
/// operation in it gets the error.
///
/// The bookkeeping travels with its neighbours, so a group of n operations pays n + 1 round
/// trips to SQLite's thread for it, not 2n + 2: the first operation's savepoint is opened with
/// the transaction (`BEGIN IMMEDIATE; SAVEPOINT op`), a committed operation's savepoint is left
/// open and released by the next operation's (`RELEASE op; SAVEPOINT op`), and the last one's
/// by the `COMMIT` itself.
pub(crate) struct GroupCommit {
    state: Arc<tokio::sync::Mutex<GroupState>>,
    /// Operations waiting for their turn; the last one of a burst commits.
    queued: Arc<AtomicUsize>,
    /// Wakes the flusher, which commits a transaction left open by an operation whose successor
    /// was cancelled while it waited, or undoes an operation dropped part-way.
    flush: Arc<Notify>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("queued", &self.queued)
            .finish()
    }
}

/// Most operations in one transaction.
const MAX_GROUP: usize = 64;

struct GroupState {
    conn: Option<sqlx::pool::PoolConnection<Sqlite>>,
    pool: SqlitePool,
    open: bool,
    /// Operations in the open transaction, waiting for its outcome.
    waiters: Vec<tokio::sync::oneshot::Sender<Result<(), String>>>,
    /// The last operation ended part-way: its savepoint is still open and must be rolled back
    /// before anything else runs.
    undo: bool,
    /// The last operation committed: its savepoint is still open, its changes kept, and the
    /// next operation's savepoint releases it (or the transaction's end does).
    held: bool,
    /// The transaction cannot be trusted any more: roll everything back.
    poisoned: bool,
}

impl GroupState {
    async fn connection(&mut self) -> StoreResult<&mut sqlx::SqliteConnection> {
        if self.conn.is_none() {
            self.conn = Some(self.pool.acquire().await.db()?);
        }
        match self.conn.as_mut() {
            Some(conn) => Ok(&mut **conn),
            None => Err(StoreError::Unavailable("no connection".to_owned())),
        }
    }

    /// Runs statements of the group's own bookkeeping; a failure poisons the transaction.
    async fn control(&mut self, statement: &'static str) -> bool {
        let done = match self.connection().await {
            Ok(conn) => sqlx::raw_sql(statement).execute(conn).await.is_ok(),
            Err(_) => false,
        };
        if !done {
            self.poisoned = true;
        }
        done
    }

    /// Rolls back the savepoint of an operation that ended part-way, if there is one.
    async fn undo_pending(&mut self) {
        if self.undo {
            if self.open {
                self.control("ROLLBACK TO op; RELEASE op").await;
            }
            // Cleared only once done: an interrupted rollback is tried again.
            self.undo = false;
        }
    }

    /// Ends the open transaction (commit, or rollback when poisoned) and tells every waiter.
    async fn finish(&mut self) {
        self.undo_pending().await;
        self.held = false;
        if !self.open {
            self.poisoned = false;
            return;
        }
        // A committed operation's savepoint still open is committed (or undone) with the rest.
        let statement = if self.poisoned { "ROLLBACK" } else { "COMMIT" };
        let outcome = match self.connection().await {
            Ok(conn) => sqlx::raw_sql(statement)
                .execute(conn)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        let outcome = match (self.poisoned, outcome) {
            (true, _) => Err("the store could not keep this write apart from a failed one; nothing of the group was written".to_owned()),
            (false, outcome) => outcome,
        };
        if outcome.is_err() {
            // The connection's state is unknown (a failed COMMIT may leave its transaction
            // open, holding the write lock): close it rather than return it to the pool, and
            // start over with a fresh one.
            if let Some(conn) = self.conn.take() {
                let _ = conn.close().await;
            }
        }
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(outcome.clone());
        }
        self.open = false;
        self.poisoned = false;
    }
}

impl GroupCommit {
    pub(crate) async fn start(pool: SqlitePool) -> StoreResult<Arc<Self>> {
        let writes = Arc::new(Self {
            state: Arc::new(tokio::sync::Mutex::new(GroupState {
                conn: None,
                pool,
                open: false,
                waiters: Vec::new(),
                undo: false,
                held: false,
                poisoned: false,
            })),
            queued: Arc::new(AtomicUsize::new(0)),
            flush: Arc::new(Notify::new()),
        });
        let state = Arc::downgrade(&writes.state);
        let flush = writes.flush.clone();
        tokio::spawn(async move {
            loop {
                flush.notified().await;
                let Some(state) = state.upgrade() else { return };
                // Behind every operation already queued (the mutex is fair).
                let mut state = state.lock().await;
                if state.open {
                    state.finish().await;
                }
            }
        });
        Ok(writes)
    }

    pub(crate) async fn begin(&self) -> StoreResult<WriteTx> {
        struct Queued<'a>(&'a AtomicUsize);
        impl Drop for Queued<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.queued.fetch_add(1, Ordering::SeqCst);
        let guard = {
            let _queued = Queued(&self.queued);
            self.state.clone().lock_owned().await
        };
        let mut tx = WriteTx {
            guard: Some(guard),
            queued: self.queued.clone(),
            flush: self.flush.clone(),
            savepoint: false,
        };
        let state = tx.state();
        state.undo_pending().await;
        if state.poisoned {
            state.finish().await;
        }
        if !state.open {
            let conn = state.connection().await?;
            if let Err(error) = sqlx::raw_sql("BEGIN IMMEDIATE; SAVEPOINT op")
                .execute(&mut *conn)
                .await
            {
                // Whether the transaction began is unknown: closing the connection ends it.
                if let Some(conn) = state.conn.take() {
                    let _ = conn.close().await;
                }
                return Err(store_error(error));
            }
            state.open = true;
        } else {
            let statement = if state.held {
                "RELEASE op; SAVEPOINT op"
            } else {
                "SAVEPOINT op"
            };
            state.held = false;
            if !state.control(statement).await {
                return Err(StoreError::Unavailable(
                    "the store could not open a savepoint".to_owned(),
                ));
            }
        }
        tx.savepoint = true;
        Ok(tx)
    }
}

/// One operation's turn in the shared write transaction, inside its own savepoint.
pub(crate) struct WriteTx {
    guard: Option<tokio::sync::OwnedMutexGuard<GroupState>>,
    /// Operations waiting for their turn after this one.
    queued: Arc<AtomicUsize>,
    flush: Arc<Notify>,
    /// This operation's savepoint is open (dropping the turn then undoes its changes).
    savepoint: bool,
}

impl WriteTx {
    fn state(&mut self) -> &mut GroupState {
        self.guard
            .as_mut()
            .expect("a write transaction holds its turn until it ends")
    }

    fn others_waiting(&self) -> bool {
        self.queued.load(Ordering::SeqCst) > 0
    }

    /// Commits this operation's changes: now if nobody else is waiting, otherwise together with
    /// the operations that follow. Returns once they are durable.
    pub(crate) async fn commit(mut self) -> Result<(), sqlx::Error> {
        self.savepoint = false;
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let waiting = self.others_waiting();
        let state = self.state();
        // Released by the next operation's savepoint, or committed with the transaction.
        state.held = true;
        state.waiters.push(sender);
        if !waiting || state.waiters.len() >= MAX_GROUP {
            state.finish().await;
        } else {
            self.flush.notify_one();
        }
        drop(self.guard.take());
        match receiver.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(sqlx::Error::Protocol(message)),
            Err(_) => Err(sqlx::Error::Protocol(
                "the write transaction was abandoned".to_owned(),
            )),
        }
    }

    /// Ends a turn whose fenced first statement matched nothing: the lease is not current.
    pub(crate) async fn refuse(self, lease: &Lease) -> StoreError {
        // Only this operation's savepoint is undone; the group goes on.
        let _ = self.rollback().await;
        StoreError::FenceRejected {
            run_id: lease.run_id,
            fence: lease.fence,
        }
    }

    /// Gives up this operation: its own changes (if any) are undone, the group's are kept.
    pub(crate) async fn rollback(mut self) -> Result<(), sqlx::Error> {
        self.savepoint = false;
        let state = self.state();
        state.control("ROLLBACK TO op; RELEASE op").await;
        if state.waiters.is_empty() && state.open {
            state.finish().await;
        }
        Ok(())
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if let Some(mut guard) = self.guard.take() {
            if self.savepoint {
                // Ended part-way: whatever it changed is undone before the next operation.
                guard.undo = true;
            }
            if guard.open {
                self.flush.notify_one();
            }
        }
    }
}

impl std::ops::Deref for WriteTx {
    type Target = sqlx::SqliteConnection;
    fn deref(&self) -> &Self::Target {
        self.guard
            .as_ref()
            .and_then(|g| g.conn.as_deref())
            .expect("an open write transaction has a connection")
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.guard
            .as_mut()
            .and_then(|g| g.conn.as_deref_mut())
            .expect("an open write transaction has a connection")
    }
}
