//! The storage layer: the SQL of every pipeline step, one file per step, and the
//! [`dialect`] of each backend. Nothing outside this module writes SQL.
//!
//! A pipeline file asks the dialect what the backend can do (row locks or a single writer,
//! LISTEN/NOTIFY, a one-statement sequencer pass, ...) and never which backend it is. SQL that
//! is the same everywhere stays in the pipeline file; what is one backend's alone (fragments,
//! whole statements, DDL) lives in that backend's file: `dialect/sqlite.rs`,
//! `dialect/postgres.rs`, `dialect/mysql.rs`.

mod cursor;
pub(crate) mod dialect;
pub(crate) mod notify;
mod ops;
mod scheduled;
pub(crate) mod schema;
mod sequence;
pub(crate) mod status;

pub(crate) use cursor::{
    CursorKey, CursorRow, Fence, Outcome, Refused, RetireRefused, STALE_AFTER_HEARTBEATS, Verdict,
};
pub use dialect::{begin_on, statement};
pub use ops::{DeadLetter, DeadLetterFilter};
pub(crate) use ops::{InsertRow, StoredMessage};
pub(crate) use scheduled::{DueAt, ScheduledCount};
pub(crate) use schema::Registered;

use std::sync::Arc;

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, Statement, Value,
};
use tokio::sync::{Mutex, OwnedMutexGuard};

/// Milliseconds since the Unix epoch, the unit of every stored timestamp.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Table names, derived once from the validated prefix.
#[derive(Debug)]
pub(crate) struct Tables {
    pub(crate) prefix: String,
    pub(crate) schema_version: String,
    pub(crate) queues: String,
    pub(crate) partitions: String,
    pub(crate) incoming: String,
    pub(crate) outgoing: String,
    pub(crate) cursors: String,
    pub(crate) dead_letters: String,
    /// Registered handlers and when a process last served each.
    pub(crate) handlers: String,
    /// Facts about this outbox (its instance id).
    pub(crate) meta: String,
    /// Deduplication keys in use, per queue.
    pub(crate) dedup: String,
    /// Messages waiting for their delivery time.
    pub(crate) scheduled: String,
    /// PostgreSQL NOTIFY channel.
    pub(crate) channel: String,
}

impl Tables {
    pub(crate) fn new(prefix: &str) -> Self {
        let t = |s: &str| format!("{prefix}{s}");
        Self {
            prefix: prefix.to_owned(),
            schema_version: t("schema_version"),
            queues: t("queues"),
            partitions: t("partitions"),
            incoming: t("incoming"),
            outgoing: t("outgoing"),
            cursors: t("cursors"),
            dead_letters: t("dead_letters"),
            handlers: t("handlers"),
            meta: t("meta"),
            dedup: t("dedup"),
            scheduled: t("scheduled"),
            channel: t("wake"),
        }
    }
}

/// The database dialect plus table names. Cheap to clone through `Arc`.
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) db: DatabaseConnection,
    pub(crate) backend: DbBackend,
    /// What the backend can do, and its SQL (see [`dialect`]).
    pub(crate) dialect: &'static dyn dialect::Dialect,
    pub(crate) t: Tables,
    pub(crate) prefix: String,
    /// A single-writer backend (SQLite): the engine's own write transactions queue here
    /// instead of spinning in the database's busy handler.
    write_gate: Option<Arc<Mutex<()>>>,
    /// Which enqueues carry the PostgreSQL NOTIFY (see [`notify`]).
    pub(crate) notify: Arc<notify::NotifyGate>,
}

/// A write transaction of the engine. On SQLite it holds the write gate and began with
/// `BEGIN IMMEDIATE`, so it never has to upgrade a read lock (no `SQLITE_BUSY_SNAPSHOT`).
#[derive(Debug)]
pub(crate) struct WriteTxn {
    pub(crate) txn: DatabaseTransaction,
    _gate: Option<OwnedMutexGuard<()>>,
}

impl WriteTxn {
    pub(crate) async fn commit(self) -> Result<(), DbErr> {
        self.txn.commit().await
    }

    /// Rolls back now, so the row locks are gone before the caller's next transaction (a
    /// dropped transaction rolls back only when its connection is next used).
    pub(crate) async fn rollback(self) -> Result<(), DbErr> {
        self.txn.rollback().await
    }
}

impl std::ops::Deref for WriteTxn {
    type Target = DatabaseTransaction;
    fn deref(&self) -> &DatabaseTransaction {
        &self.txn
    }
}

/// A guard for an engine write outside a transaction (SQLite gate; nothing elsewhere).
#[derive(Debug)]
pub(crate) struct WriteGuard(#[allow(dead_code)] Option<OwnedMutexGuard<()>>);

impl Store {
    pub(crate) fn new(db: DatabaseConnection, prefix: &str) -> Self {
        let backend = db.get_database_backend();
        let dialect = dialect::of(backend);
        Self {
            write_gate: dialect.single_writer().then(|| Arc::new(Mutex::new(()))),
            db,
            backend,
            dialect,
            t: Tables::new(prefix),
            prefix: prefix.to_owned(),
            notify: notify::NotifyGate::new(
                crate::profile::Profile::Default.runtime().notify_coalesce,
            ),
        }
    }

    /// Coalesces producer notifications within `window` (PostgreSQL; see [`notify`]).
    pub(crate) fn with_notify_window(mut self, window: std::time::Duration) -> Self {
        self.notify = notify::NotifyGate::new(window);
        self
    }

    /// Builds a statement from SQL written with `?` placeholders (rewritten to `$n` on
    /// PostgreSQL). Every value is bound, never spliced.
    pub(crate) fn stmt(&self, sql: &str, values: Vec<Value>) -> Statement {
        statement(self.backend, sql, values)
    }

    /// `(?, ?, ...)` with `n` placeholders.
    pub(crate) fn list(n: usize) -> String {
        let mut s = String::with_capacity(n * 3 + 2);
        s.push('(');
        for i in 0..n {
            if i > 0 {
                s.push_str(", ");
            }
            s.push('?');
        }
        s.push(')');
        s
    }

    pub(crate) async fn begin_write(&self) -> Result<WriteTxn, DbErr> {
        let gate = match &self.write_gate {
            Some(g) => Some(g.clone().lock_owned().await),
            None => None,
        };
        let txn = begin_on(&self.db).await?;
        Ok(WriteTxn { txn, _gate: gate })
    }

    /// Whether changes are marked in the database for other processes' idle handlers
    /// ([`Store::mark_changed`]): on a server, where no file watch tells a poll that nothing
    /// was written.
    pub(crate) fn marks_changes(&self) -> bool {
        self.dialect.commit_files().is_none()
    }

    /// The files another process's commit writes, to be watched (see
    /// [`Dialect::commit_files`](dialect::Dialect::commit_files)); empty for a server or a
    /// database in memory.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) async fn commit_files(&self) -> Result<Vec<std::path::PathBuf>, DbErr> {
        let Some(files) = self.dialect.commit_files() else {
            return Ok(Vec::new());
        };
        let rows = self.db.query_all_raw(self.stmt(files.list, vec![])).await?;
        for r in &rows {
            if col::<String>(r, 1)? != "main" {
                continue;
            }
            let path = col::<String>(r, 2)?;
            if path.is_empty() {
                return Ok(Vec::new());
            }
            return Ok(files
                .suffixes
                .iter()
                .map(|suffix| format!("{path}{suffix}").into())
                .collect());
        }
        Ok(Vec::new())
    }

    pub(crate) async fn write_guard(&self) -> WriteGuard {
        match &self.write_gate {
            Some(g) => WriteGuard(Some(g.clone().lock_owned().await)),
            None => WriteGuard(None),
        }
    }
}

/// Reads column `i` of a row.
pub(crate) fn col<T: sea_orm::TryGetable>(
    row: &sea_orm::QueryResult,
    i: usize,
) -> Result<T, DbErr> {
    row.try_get_by_index::<T>(i)
}

/// An attempt count as the public API gives it: stored as a 64-bit integer, counted in `u32`
/// like [`Tuning::max_attempts`](crate::Tuning::max_attempts) (a negative count, written by
/// hand, reads as 0).
pub(crate) fn attempts_from_db(stored: i64) -> u32 {
    u32::try_from(stored.max(0)).unwrap_or(u32::MAX)
}

/// Runs `f` on any connection: shorthand for executing one statement.
pub(crate) async fn exec<C: ConnectionTrait>(c: &C, s: Statement) -> Result<u64, DbErr> {
    Ok(c.execute_raw(s).await?.rows_affected())
}
