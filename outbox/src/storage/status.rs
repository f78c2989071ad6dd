//! The SQL of the status API: one grouped statement per table, whatever the partition count.

use sea_orm::{ConnectionTrait, DbErr, Value};

#[cfg(feature = "testing")]
use super::exec;
use super::{Store, col};

/// A registered queue.
#[derive(Debug, Clone)]
pub(crate) struct QueueRow {
    pub(crate) name: String,
    pub(crate) partitions: u32,
}

/// Unsequenced messages of one partition.
#[derive(Debug, Clone)]
pub(crate) struct IncomingRow {
    pub(crate) queue: String,
    pub(crate) partition: u32,
    pub(crate) count: i64,
    pub(crate) oldest_at: Option<i64>,
}

/// One cursor with its partition's tail and the enqueue time of its head message.
#[derive(Debug, Clone)]
pub(crate) struct CursorStatusRow {
    pub(crate) queue: String,
    pub(crate) handler: String,
    pub(crate) partition: u32,
    pub(crate) pending: i64,
    /// Where the handler stands: its cursor, or the vacuumed sequence if that is ahead.
    pub(crate) processed_seq: i64,
    /// The next message this handler handles, if one is stored.
    pub(crate) head_seq: Option<i64>,
    pub(crate) attempts: i64,
    pub(crate) retry_at: i64,
    pub(crate) blocked: bool,
    pub(crate) last_error: Option<String>,
    pub(crate) lease_owner: Option<String>,
    pub(crate) lease_expires_at: Option<i64>,
    pub(crate) head_enqueued_at: Option<i64>,
}

/// One handler's cursors summed over its partitions in the database.
#[derive(Debug, Clone)]
pub(crate) struct CursorTotalsRow {
    pub(crate) queue: String,
    pub(crate) handler: String,
    pub(crate) pending: i64,
    /// Partitions with work whose head waits for a retry.
    pub(crate) retrying: i64,
    /// Partitions held by a lease that had not expired.
    pub(crate) leased: i64,
    pub(crate) blocked: i64,
    /// When the oldest head of a partition with work was enqueued.
    pub(crate) oldest_head_at: Option<i64>,
}

/// How much of the cursors a status read returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detail {
    /// One row per (queue, handler, partition): every field of the status.
    Partitions,
    /// One row per (queue, handler), summed in the database: the same totals, a fixed number
    /// of rows whatever the partition count.
    Totals,
}

/// Dead letters of one (queue, handler, partition).
#[derive(Debug, Clone)]
pub(crate) struct DeadRow {
    pub(crate) queue: String,
    pub(crate) handler: String,
    pub(crate) partition: u32,
    pub(crate) count: i64,
}

/// A registered handler and when a process last served it.
#[derive(Debug, Clone)]
pub(crate) struct HandlerRow {
    pub(crate) queue: String,
    pub(crate) handler: String,
    pub(crate) registered_at: i64,
    pub(crate) seen_at: Option<i64>,
    pub(crate) heartbeat_ms: Option<i64>,
}

/// Everything the status API reads, in seven statements.
#[derive(Debug, Clone, Default)]
pub(crate) struct StatusRows {
    /// The database's clock when the status was read.
    pub(crate) now: i64,
    pub(crate) schema_version: Option<i64>,
    pub(crate) queues: Vec<QueueRow>,
    pub(crate) incoming: Vec<IncomingRow>,
    /// Filled when the read was [`Detail::Partitions`].
    pub(crate) cursors: Vec<CursorStatusRow>,
    /// Filled when the read was [`Detail::Totals`].
    pub(crate) totals: Vec<CursorTotalsRow>,
    pub(crate) dead: Vec<DeadRow>,
    pub(crate) handlers: Vec<HandlerRow>,
    pub(crate) scheduled: Vec<super::ScheduledCount>,
}

fn partition_of(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

/// ` WHERE <alias><column> = ?` and its value when the read is for one queue.
fn queue_filter(queue: Option<&str>, alias: &str, column: &str) -> (String, Vec<Value>) {
    match queue {
        Some(q) => (format!(" WHERE {alias}{column} = ?"), vec![q.into()]),
        None => (String::new(), Vec::new()),
    }
}

impl Store {
    /// Reads the state of every queue (or only `queue`): queues, unsequenced messages grouped
    /// by partition, cursors joined with their partition's tail and head message, and dead
    /// letters grouped by handler and partition, the handler registry, and scheduled messages per
    /// queue. Seven statements whatever the partition count; the head lookups are index probes
    /// per cursor. Sequences are dense, so the head is almost always the row right after the
    /// cursor: one primary-key lookup; only when that row is a replay for another handler does
    /// the ordered probe (`ORDER BY seq LIMIT 1`, which stops at the first match) run. Not
    /// `MIN(seq)`: with the `target_handler` condition MariaDB computes it by reading every row
    /// of the partition past the cursor (640 ms for 8 x 256 partitions and a million waiting
    /// messages; 80-110 ms with the ordered probe alone, 35-60 ms with the lookup first).
    ///
    /// With [`Detail::Totals`] the cursors come summed per handler instead (no head lookup
    /// for a partition without work): what the gauges need, in rows that do not grow with the
    /// partition count.
    pub(crate) async fn status_rows(
        &self,
        queue: Option<&str>,
        detail: Detail,
    ) -> Result<StatusRows, DbErr> {
        let filter = |alias: &str, column: &str| queue_filter(queue, alias, column);
        // Read upstream first (scheduled, then incoming, then the cursors over outgoing): a
        // message that moves on between two reads is then seen twice at worst, never missed,
        // so "nothing waits" is never reported while something does.
        let mut scheduled = self.scheduled_counts().await?;
        if let Some(q) = queue {
            scheduled.retain(|s| s.queue == q);
        }
        let version = self
            .db
            .query_one_raw(self.stmt(
                &format!(
                    "SELECT MAX(version), {} FROM {}",
                    self.dialect.now_ms(),
                    self.t.schema_version
                ),
                vec![],
            ))
            .await?;
        let (schema_version, now) = match version {
            Some(r) => (col::<Option<i64>>(&r, 0)?, col::<i64>(&r, 1)?),
            None => (None, crate::storage::now_ms()),
        };

        let (w, v) = filter("", "name");
        let queues = self
            .db
            .query_all_raw(self.stmt(
                &format!(
                    "SELECT name, partitions FROM {}{w} ORDER BY name",
                    self.t.queues
                ),
                v,
            ))
            .await?
            .iter()
            .map(|r| {
                Ok(QueueRow {
                    name: col(r, 0)?,
                    partitions: partition_of(col(r, 1)?),
                })
            })
            .collect::<Result<Vec<_>, DbErr>>()?;

        let (w, v) = filter("", "queue");
        let incoming = self
            .db
            .query_all_raw(self.stmt(
                &format!(
                    "SELECT queue, partition_no, COUNT(*), MIN(created_at) FROM {}{w} \
                     GROUP BY queue, partition_no",
                    self.t.incoming
                ),
                v,
            ))
            .await?
            .iter()
            .map(|r| {
                Ok(IncomingRow {
                    queue: col(r, 0)?,
                    partition: partition_of(col(r, 1)?),
                    count: col(r, 2)?,
                    oldest_at: col(r, 3)?,
                })
            })
            .collect::<Result<Vec<_>, DbErr>>()?;

        let (cursors, totals) = match detail {
            Detail::Partitions => (self.cursor_status_rows(queue).await?, Vec::new()),
            Detail::Totals => (Vec::new(), self.cursor_totals_rows(queue, now).await?),
        };

        let (w, v) = filter("", "queue");
        let dead = self
            .db
            .query_all_raw(self.stmt(
                &format!(
                    "SELECT queue, handler, partition_no, COUNT(*) FROM {}{w} \
                     GROUP BY queue, handler, partition_no",
                    self.t.dead_letters
                ),
                v,
            ))
            .await?
            .iter()
            .map(|r| {
                Ok(DeadRow {
                    queue: col(r, 0)?,
                    handler: col(r, 1)?,
                    partition: partition_of(col(r, 2)?),
                    count: col(r, 3)?,
                })
            })
            .collect::<Result<Vec<_>, DbErr>>()?;

        let (w, v) = filter("", "queue");
        let handlers = self
            .db
            .query_all_raw(self.stmt(
                &format!(
                    "SELECT queue, handler, registered_at, seen_at, heartbeat_ms FROM {}{w}",
                    self.t.handlers
                ),
                v,
            ))
            .await?
            .iter()
            .map(|r| {
                Ok(HandlerRow {
                    queue: col(r, 0)?,
                    handler: col(r, 1)?,
                    registered_at: col(r, 2)?,
                    seen_at: col(r, 3)?,
                    heartbeat_ms: col(r, 4)?,
                })
            })
            .collect::<Result<Vec<_>, DbErr>>()?;

        Ok(StatusRows {
            now,
            handlers,
            scheduled,
            schema_version,
            queues,
            incoming,
            cursors,
            totals,
            dead,
        })
    }

    /// Every cursor of `queue` (or of every queue) with its partition's tail, its head and the
    /// head's enqueue time, by queue, handler and partition.
    async fn cursor_status_rows(&self, queue: Option<&str>) -> Result<Vec<CursorStatusRow>, DbErr> {
        let (w, v) = queue_filter(queue, "c.", "queue");
        self
            .db
            .query_all_raw(self.stmt(
                &format!(
                    "SELECT x.queue, x.handler, x.partition_no, x.last_seq - x.at, x.attempts, x.retry_at, \
                     x.blocked, x.last_error, x.lease_owner, x.lease_expires_at, x.at, x.head, \
                     (SELECT o.created_at FROM {o} o WHERE o.queue = x.queue AND o.partition_no = x.partition_no \
                      AND o.seq = x.head) \
                     FROM (SELECT c.queue, c.handler, c.partition_no, p.last_seq, c.attempts, c.retry_at, \
                           c.blocked, c.last_error, c.lease_owner, c.lease_expires_at, {at} AS at, \
                           {head} AS head \
                           FROM {c} c JOIN {p} p ON p.queue = c.queue AND p.partition_no = c.partition_no{w}{fence}) x \
                     ORDER BY x.queue, x.handler, x.partition_no",
                    o = self.t.outgoing,
                    c = self.t.cursors,
                    p = self.t.partitions,
                    at = self.dialect.greatest("c.processed_seq", "p.vacuumed_seq"),
                    head = self.head_seq_sql(),
                    // Keeps the planner from inlining `head` into the created_at probe, which
                    // would compute it twice per cursor.
                    fence = self.dialect.optimization_fence(),
                ),
                v,
            ))
            .await?
            .iter()
            .map(|r| {
                Ok(CursorStatusRow {
                    queue: col(r, 0)?,
                    handler: col(r, 1)?,
                    partition: partition_of(col(r, 2)?),
                    pending: col(r, 3)?,
                    attempts: col(r, 4)?,
                    retry_at: col(r, 5)?,
                    blocked: col::<i64>(r, 6)? != 0,
                    last_error: col(r, 7)?,
                    lease_owner: col(r, 8)?,
                    lease_expires_at: col(r, 9)?,
                    processed_seq: col(r, 10)?,
                    head_seq: col(r, 11)?,
                    head_enqueued_at: col(r, 12)?,
                })
            })
            .collect()
    }

    /// The cursors of `queue` (or of every queue) summed per handler, judged at `now` (the
    /// database's clock of the same read). The head's enqueue time is looked up only for a
    /// partition with work: an idle handler costs one pass over its cursor rows and no probe.
    async fn cursor_totals_rows(
        &self,
        queue: Option<&str>,
        now: i64,
    ) -> Result<Vec<CursorTotalsRow>, DbErr> {
        let (w, filter) = queue_filter(queue, "c.", "queue");
        let at = self.dialect.greatest("c.processed_seq", "p.vacuumed_seq");
        let mut values: Vec<Value> = vec![now.into(), now.into()];
        values.extend(filter);
        self.db
            .query_all_raw(self.stmt(
                &format!(
                    "SELECT c.queue, c.handler, {pending}, \
                     COUNT(CASE WHEN p.last_seq > {at} AND c.retry_at > ? THEN 1 END), \
                     COUNT(CASE WHEN c.lease_owner IS NOT NULL AND COALESCE(c.lease_expires_at, 0) > ? THEN 1 END), \
                     COUNT(CASE WHEN c.blocked <> 0 THEN 1 END), \
                     MIN(CASE WHEN p.last_seq > {at} THEN {head_at} END) \
                     FROM {c} c JOIN {p} p ON p.queue = c.queue AND p.partition_no = c.partition_no{w} \
                     GROUP BY c.queue, c.handler ORDER BY c.queue, c.handler",
                    pending = self.dialect.sum_int(&format!(
                        "CASE WHEN p.last_seq > {at} THEN p.last_seq - {at} ELSE 0 END"
                    )),
                    head_at = self.head_sql("created_at"),
                    c = self.t.cursors,
                    p = self.t.partitions,
                ),
                values,
            ))
            .await?
            .iter()
            .map(|r| {
                Ok(CursorTotalsRow {
                    queue: col(r, 0)?,
                    handler: col(r, 1)?,
                    pending: col(r, 2)?,
                    retrying: col(r, 3)?,
                    leased: col(r, 4)?,
                    blocked: col(r, 5)?,
                    oldest_head_at: col(r, 6)?,
                })
            })
            .collect()
    }

    #[cfg(feature = "testing")]
    /// Messages of `queue` still stored, for the testing kit's capture: sequenced ones as
    /// `(partition, Some(seq), payload)` in sequence order, then unsequenced ones as
    /// `(partition, None, payload)` in id order.
    pub(crate) async fn stored_messages(
        &self,
        queue: &str,
    ) -> Result<Vec<(u32, Option<i64>, Vec<u8>)>, DbErr> {
        let mut out = Vec::new();
        for r in self
            .db
            .query_all_raw(self.stmt(
                &format!(
                    "SELECT partition_no, seq, payload FROM {} WHERE queue = ? AND target_handler IS NULL \
                     ORDER BY partition_no, seq",
                    self.t.outgoing
                ),
                vec![queue.into()],
            ))
            .await?
        {
            out.push((partition_of(col(&r, 0)?), Some(col(&r, 1)?), col(&r, 2)?));
        }
        for r in self
            .db
            .query_all_raw(self.stmt(
                &format!(
                    "SELECT partition_no, payload FROM {} WHERE queue = ? AND target_handler IS NULL ORDER BY id",
                    self.t.incoming
                ),
                vec![queue.into()],
            ))
            .await?
        {
            out.push((partition_of(col(&r, 0)?), None, col(&r, 1)?));
        }
        Ok(out)
    }

    #[cfg(feature = "testing")]
    /// Makes every live lease of `handler` expire now (testing kit fault injection): the
    /// holder's ack is then rejected and the batch redelivered with the attempt raised.
    pub(crate) async fn expire_leases<C: ConnectionTrait>(
        &self,
        c: &C,
        queue: &str,
        handler: &str,
    ) -> Result<u64, DbErr> {
        exec(
            c,
            self.stmt(
                &format!(
                    "UPDATE {} SET lease_expires_at = {} - 1 WHERE queue = ? AND handler = ? AND lease_expires_at IS NOT NULL",
                    self.t.cursors,
                    self.dialect.now_ms()
                ),
                vec![queue.into(), handler.into()],
            ),
        )
        .await
    }
}

/// Where one handler stands in one partition, for [`Store::idle_positions`].
#[derive(Debug, Clone)]
pub(crate) struct IdlePosition {
    pub(crate) queue: String,
    pub(crate) handler: String,
    pub(crate) partition: u32,
    pub(crate) last_seq: i64,
    /// The next message this handler handles in this partition, if one is stored.
    pub(crate) head_seq: Option<i64>,
    pub(crate) blocked: bool,
}

impl Store {
    /// The next message of cursor `c` (joined with its partition `p`) as a scalar expression:
    /// the row right after the cursor by primary key (sequences are dense), or, when that row
    /// is a replay for another handler, the first one after it that is this handler's.
    fn head_seq_sql(&self) -> String {
        self.head_sql("seq")
    }

    /// `column` of the next message of cursor `c`, found as [`Store::head_seq_sql`] finds it.
    fn head_sql(&self, column: &str) -> String {
        format!(
            "COALESCE((SELECT o.{column} FROM {o} o WHERE o.queue = c.queue AND o.partition_no = c.partition_no \
             AND o.seq = {at} + 1 AND (o.target_handler IS NULL OR o.target_handler = c.handler)), \
             (SELECT o.{column} FROM {o} o WHERE o.queue = c.queue AND o.partition_no = c.partition_no \
             AND o.seq > {at} AND (o.target_handler IS NULL OR o.target_handler = c.handler) \
             ORDER BY o.seq LIMIT 1))",
            o = self.t.outgoing,
            at = self.dialect.greatest("c.processed_seq", "p.vacuumed_seq"),
        )
    }

    /// The highest id in `incoming` now: every message committed so far has an id at most this.
    pub(crate) async fn max_incoming_id(&self) -> Result<Option<i64>, DbErr> {
        let row = self
            .db
            .query_one_raw(self.stmt(&format!("SELECT MAX(id) FROM {}", self.t.incoming), vec![]))
            .await?;
        match row {
            Some(r) => col::<Option<i64>>(&r, 0),
            None => Ok(None),
        }
    }

    /// Whether a message with an id at most `upto` still waits to be sequenced.
    pub(crate) async fn incoming_left(&self, upto: i64) -> Result<bool, DbErr> {
        let row = self
            .db
            .query_one_raw(self.stmt(
                &format!("SELECT id FROM {} WHERE id <= ? LIMIT 1", self.t.incoming),
                vec![upto.into()],
            ))
            .await?;
        Ok(row.is_some())
    }

    /// Every cursor with its partition's tail and its next message: one statement, an index
    /// probe per cursor.
    pub(crate) async fn idle_positions(&self) -> Result<Vec<IdlePosition>, DbErr> {
        self.db
            .query_all_raw(self.stmt(
                &format!(
                    "SELECT c.queue, c.handler, c.partition_no, p.last_seq, c.blocked, {head} \
                     FROM {c} c JOIN {p} p ON p.queue = c.queue AND p.partition_no = c.partition_no",
                    c = self.t.cursors,
                    p = self.t.partitions,
                    head = self.head_seq_sql(),
                ),
                vec![],
            ))
            .await?
            .iter()
            .map(|r| {
                Ok(IdlePosition {
                    queue: col(r, 0)?,
                    handler: col(r, 1)?,
                    partition: partition_of(col(r, 2)?),
                    last_seq: col(r, 3)?,
                    blocked: col::<i64>(r, 4)? != 0,
                    head_seq: col(r, 5)?,
                })
            })
            .collect()
    }
}
