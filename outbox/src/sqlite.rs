//! Connecting to SQLite the way the outbox expects.
//!
//! SQLite has one writer. Everything that writes (your producers' transactions, the runtime's
//! sequencer, transactional handlers, acks) takes turns on one lock, and a connection that finds
//! it taken waits up to its **busy timeout** before failing with `database is locked`. sqlx's
//! default is 5 s; [`connect_options`] sets [`DEFAULT_BUSY_TIMEOUT`] (30 s) and WAL, so readers
//! never wait for the writer.
//!
//! What a SQLite user can rely on with these options and the default runtime tuning:
//!
//! * The runtime holds the write lock for at most
//!   [`RuntimeTuning::sqlite_write_hold`](crate::RuntimeTuning::sqlite_write_hold) (2 s) at a
//!   time: a transactional batch stops taking messages at half of it, and a handler still running
//!   at the limit fails as a counted attempt. A producer therefore waits at most about that long
//!   for the runtime, well inside its busy timeout.
//! * A producer transaction that stays open after its first write holds the lock too: other
//!   producers and the runtime wait for it (up to their busy timeout). Keep write transactions
//!   short, and begin them with [`begin`] (`BEGIN IMMEDIATE`), which waits for the lock up front
//!   instead of failing when a read transaction later tries to write.
//! * Leased handlers hold no lock while they run; their ack is judged by when it was requested,
//!   so an ack that waited behind another writer does not lose its lease.
//! * Processes on one SQLite file share one host clock, so leases and retry times there are
//!   compared on that clock.

use std::time::Duration;

use sea_orm::{
    ConnectOptions, DatabaseConnection, DatabaseTransaction, DbErr, SqliteTransactionMode,
    TransactionOptions, TransactionTrait,
};

/// The busy timeout [`connect_options`] sets: how long a connection waits for SQLite's single
/// write lock before an operation fails with `database is locked`.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Connection options for a SQLite URL (`sqlite://app.db?mode=rwc`) with WAL and a
/// [`DEFAULT_BUSY_TIMEOUT`] busy timeout. Adjust the pool or logging on the result as usual:
///
/// ```no_run
/// # async fn f() -> Result<(), sea_orm::DbErr> {
/// let db = sea_orm::Database::connect(outbox::sqlite::connect_options("sqlite://app.db?mode=rwc")).await?;
/// # Ok(()) }
/// ```
pub fn connect_options(url: impl Into<String>) -> ConnectOptions {
    connect_options_with_busy_timeout(url, DEFAULT_BUSY_TIMEOUT)
}

/// [`connect_options`] with a busy timeout of your choice.
pub fn connect_options_with_busy_timeout(
    url: impl Into<String>,
    busy_timeout: Duration,
) -> ConnectOptions {
    let mut options = ConnectOptions::new(url);
    options.map_sqlx_sqlite_opts(move |o| {
        o.busy_timeout(busy_timeout)
            .journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
    });
    options
}

/// Begins a write transaction the way SQLite needs it: `BEGIN IMMEDIATE` takes the write lock
/// up front (waiting up to the busy timeout), so a transaction that reads before it enqueues
/// cannot fail later with `database is locked` when it first writes. On PostgreSQL and
/// MySQL/MariaDB this is an ordinary `begin()`.
pub async fn begin(db: &DatabaseConnection) -> Result<DatabaseTransaction, DbErr> {
    db.begin_with_options(TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..Default::default()
    })
    .await
}
