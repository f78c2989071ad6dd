//! The receiving side of a relay: an inbox that applies a redelivered message once.
//!
//! Brokers deliver at least once, and a relay publishes a message again when it crashed
//! between publish and ack (RabbitMQ keeps both copies). The consumer records each message's
//! stable id (the `Outbox-Id` header, AMQP `message_id`, or `Nats-Msg-Id`) in its own
//! database, in the same sea-orm transaction as the message's effects: the first delivery
//! inserts the id and applies the effects, a copy finds the id and does nothing. Ids older
//! than the retention window are removed by [`Inbox::cleanup`]; keep the window longer than
//! any redelivery can take (the relay's lease plus the broker's redelivery delay).
//!
//! ```no_run
//! # async fn demo(db: outbox::sea_orm::DatabaseConnection, id: &str) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox::inbox::Inbox;
//! use outbox::sea_orm::TransactionTrait;
//!
//! let inbox = Inbox::new("app_")?;
//! inbox.create_table(&db).await?;
//! let txn = db.begin().await?;
//! if inbox.receive(&txn, id).await? {
//!     // First delivery: apply the message's effects through `txn`.
//! }
//! txn.commit().await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbErr};

use crate::error::InvalidName;
use crate::queue::validate_prefix;
use crate::storage::{dialect, statement};

/// Default retention of received ids: seven days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Longest message id the inbox stores, in bytes.
pub const MAX_ID_BYTES: usize = 255;

/// Ids of received messages in a table `{prefix}inbox` of the receiver's database.
#[derive(Debug, Clone)]
pub struct Inbox {
    table: String,
    retention: Duration,
}

impl Inbox {
    /// An inbox in the table `{prefix}inbox`, keeping ids for [`DEFAULT_RETENTION`]. The
    /// prefix follows the outbox's rules (lowercase letters, digits and `_`, at most 32).
    pub fn new(prefix: &str) -> Result<Self, InvalidName> {
        validate_prefix(prefix)?;
        Ok(Self {
            table: format!("{prefix}inbox"),
            retention: DEFAULT_RETENTION,
        })
    }

    /// How long ids are kept before [`cleanup`](Inbox::cleanup) may remove them.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the table and its index if they do not exist.
    pub async fn create_table<C: ConnectionTrait>(&self, db: &C) -> Result<(), DbErr> {
        let dialect = dialect::of(db.get_database_backend());
        for s in dialect.inbox_table(&self.table, MAX_ID_BYTES) {
            db.execute_unprepared(&s).await?;
        }
        Ok(())
    }

    /// Records `message_id` through `txn` (the transaction that applies the message's
    /// effects); `true` if it was not received before, `false` for a copy, whose effects must
    /// not be applied. A concurrent receipt of the same id waits for the other transaction
    /// and then sees its outcome. An id that is empty, longer than [`MAX_ID_BYTES`] or not
    /// ASCII fails with [`DbErr::Custom`] before anything is written.
    pub async fn receive<C: ConnectionTrait>(
        &self,
        txn: &C,
        message_id: &str,
    ) -> Result<bool, DbErr> {
        if message_id.is_empty() || message_id.len() > MAX_ID_BYTES || !message_id.is_ascii() {
            return Err(DbErr::Custom(format!(
                "inbox message id must be 1 to {MAX_ID_BYTES} ASCII bytes, got {} bytes",
                message_id.len()
            )));
        }
        let backend = txn.get_database_backend();
        let sql = dialect::of(backend).insert_unless_key(
            &self.table,
            "message_id, received_at_ms",
            "VALUES (?, ?)",
            "message_id",
        );
        let r = txn
            .execute_raw(statement(
                backend,
                &sql,
                vec![message_id.into(), crate::storage::now_ms().into()],
            ))
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Removes ids received longer ago than the retention window; returns how many.
    pub async fn cleanup<C: ConnectionTrait>(&self, db: &C) -> Result<u64, DbErr> {
        let cutoff = crate::storage::now_ms()
            .saturating_sub(i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX));
        let r = db
            .execute_raw(statement(
                db.get_database_backend(),
                &format!("DELETE FROM {} WHERE received_at_ms < ?", self.table),
                vec![cutoff.into()],
            ))
            .await?;
        Ok(r.rows_affected())
    }
}
