//! The status API: per queue, handler and partition, what waits, how old it is, who holds the
//! lease, whether the partition is blocked, the last error and the dead letters.
//!
//! [`Outbox::status`] works on a running outbox and on one built for tools with
//! [`Outbox::admin`], which starts no workers:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let url = format!("sqlite://{}?mode=rwc", dir.path().join("db").display());
//! let db = outbox::sea_orm::Database::connect(url.as_str()).await?;
//! let admin = outbox::Outbox::admin(db, outbox::DEFAULT_TABLE_PREFIX)?;
//! admin.migrate().await?;
//! let status = admin.status().await?;
//! for q in &status.queues {
//!     for h in &q.handlers {
//!         println!("{}/{}: {} waiting, lag {:?}", q.name, h.name, h.waiting(), h.lag());
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Reading the status costs seven statements whatever the partition count (one per table,
//! grouped; the head message of each cursor is an index probe), but returns a row per
//! (handler, partition). [`Outbox::status_totals`] sums the partitions in the database
//! instead: the same per-handler figures in a few rows, which is what a health check, an
//! alert or the metrics gauges need at thousands of partitions. Times are the database's
//! clock.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

use crate::error::Error;
use crate::queue::validate_name;
use crate::runtime::Outbox;
use crate::storage::status::{Detail, StatusRows};
use crate::storage::{STALE_AFTER_HEARTBEATS, attempts_from_db};

/// The state of every queue of one outbox, read at [`taken_at_ms`](Status::taken_at_ms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Status {
    /// When the status was read, in milliseconds since the Unix epoch.
    pub taken_at_ms: i64,
    /// The schema version stored in the database (`None` before the first migration).
    pub schema_version: Option<i64>,
    /// Every registered queue, by name.
    pub queues: Vec<QueueStatus>,
}

impl Status {
    /// The status of one queue.
    pub fn queue(&self, name: &str) -> Option<&QueueStatus> {
        self.queues.iter().find(|q| q.name == name)
    }

    /// Partitions blocked by a poisoned head, as `(queue, handler, partition)`.
    pub fn blocked(&self) -> Vec<(&str, &str, u32)> {
        let mut out = Vec::new();
        for q in &self.queues {
            for h in &q.handlers {
                for p in h.partitions.iter().filter(|p| p.blocked) {
                    out.push((q.name.as_str(), h.name.as_str(), p.partition));
                }
            }
        }
        out
    }

    /// Dead letters of every queue.
    pub fn dead_letters(&self) -> i64 {
        self.queues.iter().map(|q| q.dead_letters).sum()
    }
}

/// The most scheduled messages a status read counts per queue (see
/// [`QueueStatus::scheduled_capped`]).
pub const SCHEDULED_COUNT_CAP: i64 = 10_000;

/// The state of one queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct QueueStatus {
    /// Queue name.
    pub name: String,
    /// Partition count.
    pub partitions: u32,
    /// Committed messages waiting to be sequenced.
    pub unsequenced: i64,
    /// Dead letters of this queue (every handler, including handlers no longer registered).
    pub dead_letters: i64,
    /// Scheduled messages not due yet (they count nowhere else until due), counted up to
    /// [`SCHEDULED_COUNT_CAP`]: see [`scheduled_capped`](QueueStatus::scheduled_capped).
    pub scheduled: i64,
    /// More than [`SCHEDULED_COUNT_CAP`] messages are scheduled and `scheduled` is the cap:
    /// status does not count them all, so a large calendar of future messages costs each
    /// status read (and each metrics refresh) no more than the cap.
    pub scheduled_capped: bool,
    /// When the next scheduled message is due, in milliseconds since the Unix epoch by the
    /// database's clock.
    pub next_due_at_ms: Option<i64>,
    /// One entry per registered handler, by name.
    pub handlers: Vec<HandlerStatus>,
}

impl QueueStatus {
    /// The status of one handler.
    pub fn handler(&self, name: &str) -> Option<&HandlerStatus> {
        self.handlers.iter().find(|h| h.name == name)
    }
}

/// One handler's view of a queue, summed over its partitions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HandlerStatus {
    /// Handler name.
    pub name: String,
    /// Sequenced messages this handler has not handled yet.
    pub pending: i64,
    /// Messages not handled yet, sequenced or not ([`pending`](HandlerStatus::pending) plus the
    /// queue's unsequenced messages).
    pub waiting: i64,
    /// Age of the oldest message this handler has not handled, in milliseconds (`None` when
    /// nothing waits): the largest partition lag.
    pub lag_ms: Option<i64>,
    /// Partitions whose head waits for a retry.
    pub retrying_partitions: u32,
    /// Partitions held by a live lease.
    pub leased_partitions: u32,
    /// Partitions blocked by a poisoned head (block policy): they need an operator.
    pub blocked_partitions: u32,
    /// Dead letters of this handler.
    pub dead_letters: i64,
    /// `None` while a running process serves this handler; otherwise how long no process has
    /// (since the last one stopped reporting, or since it was registered if none ever did), in
    /// milliseconds. A handler counts as served until three of its heartbeat intervals pass
    /// without a report. A stale handler that no longer exists pins vacuum: retire it with
    /// [`Outbox::retire_handler`].
    pub stale_for_ms: Option<i64>,
    /// Every partition, by index.
    pub partitions: Vec<PartitionStatus>,
}

impl HandlerStatus {
    /// The status of one partition.
    pub fn partition(&self, partition: u32) -> Option<&PartitionStatus> {
        self.partitions.iter().find(|p| p.partition == partition)
    }

    /// Messages not handled yet, sequenced or not.
    pub fn waiting(&self) -> i64 {
        self.waiting
    }

    /// Age of the oldest message not handled yet.
    pub fn lag(&self) -> Option<Duration> {
        self.lag_ms
            .map(|ms| Duration::from_millis(ms.max(0) as u64))
    }

    /// Whether no running process serves this handler (see
    /// [`stale_for_ms`](HandlerStatus::stale_for_ms)).
    pub fn is_stale(&self) -> bool {
        self.stale_for_ms.is_some()
    }
}

/// One (queue, handler, partition).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PartitionStatus {
    /// Partition index.
    pub partition: u32,
    /// Committed messages of this partition waiting to be sequenced (shared by every handler).
    pub unsequenced: i64,
    /// Sequenced messages this handler has not handled yet.
    pub pending: i64,
    /// The last sequence this handler is done with (handled, dead-lettered or skipped).
    pub processed_seq: i64,
    /// The sequence of the next message this handler will handle, if one is waiting: the one
    /// to name in [`Outbox::skip_head`] and [`Outbox::unblock`].
    pub head_seq: Option<i64>,
    /// When the oldest message this handler has not handled was enqueued (ms since the Unix
    /// epoch, database clock).
    pub oldest_unhandled_at_ms: Option<i64>,
    /// Age of that message at [`Status::taken_at_ms`], in milliseconds.
    pub lag_ms: Option<i64>,
    /// The lease on this partition, if one is recorded (an expired one was not released: its
    /// holder crashed or stalled; the next claim takes it over).
    pub lease: Option<Lease>,
    /// Failed attempts of the head message.
    pub attempts: u32,
    /// When the head is retried, if it waits for a retry (ms since the Unix epoch).
    pub retry_at_ms: Option<i64>,
    /// Whether a poisoned head blocks the partition (block policy) until an operator acts.
    pub blocked: bool,
    /// The last error of the head message, while it is failing.
    pub last_error: Option<String>,
    /// Dead letters of this handler and partition.
    pub dead_letters: i64,
}

impl PartitionStatus {
    /// Age of the oldest message not handled yet.
    pub fn lag(&self) -> Option<Duration> {
        self.lag_ms
            .map(|ms| Duration::from_millis(ms.max(0) as u64))
    }
}

/// A lease on a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Lease {
    /// The runtime holding it (`<process id>-<random>`).
    pub owner: String,
    /// When it expires (ms since the Unix epoch).
    pub expires_at_ms: i64,
    /// Whether it had expired when the status was read.
    pub expired: bool,
}

/// Counts of one handler's view of a queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandlerDepth {
    /// Handler name.
    pub handler: String,
    /// Sequenced messages this handler has not processed yet.
    pub pending: i64,
    /// Partitions whose head is waiting for a retry.
    pub retrying_partitions: u32,
    /// Partitions held by a live lease.
    pub leased_partitions: u32,
    /// Partitions blocked by a poisoned head (block policy).
    pub blocked_partitions: u32,
    /// Dead letters of this handler.
    pub dead: i64,
}

/// Depth of one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueDepth {
    /// Queue name.
    pub queue: String,
    /// Committed messages not yet sequenced.
    pub unsequenced: i64,
    /// Sequenced messages still stored (not yet vacuumed).
    pub stored: i64,
    /// One entry per registered handler.
    pub handlers: Vec<HandlerDepth>,
}

impl QueueDepth {
    fn empty(queue: &str) -> Self {
        QueueDepth {
            queue: queue.to_owned(),
            ..Default::default()
        }
    }

    /// The depth as a summary of a queue's status.
    fn of(status: &QueueStatus, stored: i64) -> Self {
        QueueDepth {
            queue: status.name.clone(),
            unsequenced: status.unsequenced,
            stored,
            handlers: status
                .handlers
                .iter()
                .map(|h| HandlerDepth {
                    handler: h.name.clone(),
                    pending: h.pending,
                    retrying_partitions: h.retrying_partitions,
                    leased_partitions: h.leased_partitions,
                    blocked_partitions: h.blocked_partitions,
                    dead: h.dead_letters,
                })
                .collect(),
        }
    }
}

impl Outbox {
    /// The state of every registered queue, handler and partition. Only reads: a running
    /// outbox refreshes the gauges of [`metrics`](crate::metrics) from it on its own timer.
    pub async fn status(&self) -> Result<Status, Error> {
        let rows = self.store().status_rows(None, Detail::Partitions).await?;
        Ok(build(&rows))
    }

    /// The state of every registered queue and handler, summed over the partitions in the
    /// database: every figure of [`status`](Outbox::status) but the per-partition entries
    /// (each [`HandlerStatus::partitions`] is empty, so [`Status::blocked`] lists nothing; the
    /// count is [`HandlerStatus::blocked_partitions`]). It reads the same tables with a
    /// handful of statements, but returns one row per handler instead of one per (handler,
    /// partition) and looks up the head message only of partitions with work: at 4,096
    /// partitions and 10 handlers, 10 rows instead of 40,960. The gauges of
    /// [`metrics`](crate::metrics) are refreshed from it.
    pub async fn status_totals(&self) -> Result<Status, Error> {
        let rows = self.store().status_rows(None, Detail::Totals).await?;
        Ok(build(&rows))
    }

    /// The state of one queue; [`Error::UnknownQueue`] if it is not registered.
    pub async fn queue_status(&self, queue: &str) -> Result<QueueStatus, Error> {
        validate_name("queue", queue)?;
        let rows = self
            .store()
            .status_rows(Some(queue), Detail::Partitions)
            .await?;
        build(&rows)
            .queues
            .into_iter()
            .next()
            .ok_or_else(|| Error::UnknownQueue(queue.to_owned()))
    }

    /// Counts of a queue: unsequenced, stored, and per handler pending, retrying, leased,
    /// blocked and dead. A summary of [`queue_status`](Outbox::queue_status) plus the count of
    /// sequenced messages not vacuumed yet; a queue that is not registered has all counts 0.
    pub async fn depth(&self, queue: &str) -> Result<QueueDepth, Error> {
        let status = match self.queue_status(queue).await {
            Ok(status) => status,
            Err(Error::UnknownQueue(_)) => return Ok(QueueDepth::empty(queue)),
            Err(e) => return Err(e),
        };
        let stored = self.store().stored(queue).await?;
        Ok(QueueDepth::of(&status, stored))
    }
}

/// How long no process has served a handler, `None` while one does.
fn stale_for(rows: &StatusRows, queue: &str, handler: &str) -> Option<i64> {
    let now = rows.now;
    let Some(h) = rows
        .handlers
        .iter()
        .find(|h| h.queue == queue && h.handler == handler)
    else {
        // Registered before the registry existed and never started since: nobody serves it.
        return Some(0);
    };
    match (h.seen_at, h.heartbeat_ms) {
        (Some(seen), Some(every)) if now - seen < every * STALE_AFTER_HEARTBEATS => None,
        (Some(seen), _) => Some((now - seen).max(0)),
        (None, _) => Some((now - h.registered_at).max(0)),
    }
}

/// Adds the handlers of a [`Detail::Totals`] read: their cursors came summed from the
/// database, so every handler has its totals and no partitions. A handler's cursors cover
/// every partition of its queue (registration creates them all), so its unsequenced messages
/// and the oldest of them are its queue's.
fn add_totals(rows: &StatusRows, queues: &mut [QueueStatus]) {
    let now = rows.now;
    for t in &rows.totals {
        let Some(q) = queues.iter_mut().find(|q| q.name == t.queue) else {
            continue;
        };
        let oldest_incoming = rows
            .incoming
            .iter()
            .filter(|r| r.queue == t.queue)
            .filter_map(|r| r.oldest_at)
            .min();
        let oldest = match (t.oldest_head_at, oldest_incoming) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let count = |n: i64| u32::try_from(n.max(0)).unwrap_or(u32::MAX);
        q.handlers.push(HandlerStatus {
            name: t.handler.clone(),
            pending: t.pending.max(0),
            waiting: t.pending.max(0) + q.unsequenced,
            lag_ms: oldest.map(|at| (now - at).max(0)),
            retrying_partitions: count(t.retrying),
            leased_partitions: count(t.leased),
            blocked_partitions: count(t.blocked),
            dead_letters: rows
                .dead
                .iter()
                .filter(|d| d.queue == t.queue && d.handler == t.handler)
                .map(|d| d.count)
                .sum(),
            stale_for_ms: stale_for(rows, &t.queue, &t.handler),
            partitions: Vec::new(),
        });
    }
}

/// Assembles the status from the grouped rows.
fn build(rows: &StatusRows) -> Status {
    let now = rows.now;
    let incoming: HashMap<(&str, u32), (i64, Option<i64>)> = rows
        .incoming
        .iter()
        .map(|r| ((r.queue.as_str(), r.partition), (r.count, r.oldest_at)))
        .collect();
    let dead: HashMap<(&str, &str, u32), i64> = rows
        .dead
        .iter()
        .map(|r| ((r.queue.as_str(), r.handler.as_str(), r.partition), r.count))
        .collect();
    let mut queues: Vec<QueueStatus> = rows
        .queues
        .iter()
        .map(|q| QueueStatus {
            name: q.name.clone(),
            partitions: q.partitions,
            unsequenced: rows
                .incoming
                .iter()
                .filter(|r| r.queue == q.name)
                .map(|r| r.count)
                .sum(),
            dead_letters: rows
                .dead
                .iter()
                .filter(|r| r.queue == q.name)
                .map(|r| r.count)
                .sum(),
            scheduled: rows
                .scheduled
                .iter()
                .find(|s| s.queue == q.name)
                .map_or(0, |s| s.count),
            scheduled_capped: rows
                .scheduled
                .iter()
                .find(|s| s.queue == q.name)
                .is_some_and(|s| s.capped),
            next_due_at_ms: rows
                .scheduled
                .iter()
                .find(|s| s.queue == q.name)
                .and_then(|s| s.next_due_at),
            handlers: Vec::new(),
        })
        .collect();
    add_totals(rows, &mut queues);
    for c in &rows.cursors {
        let Some(q) = queues.iter_mut().find(|q| q.name == c.queue) else {
            continue;
        };
        if q.handlers.last().is_none_or(|h| h.name != c.handler) {
            q.handlers.push(HandlerStatus {
                name: c.handler.clone(),
                pending: 0,
                waiting: 0,
                lag_ms: None,
                retrying_partitions: 0,
                leased_partitions: 0,
                blocked_partitions: 0,
                dead_letters: 0,
                stale_for_ms: stale_for(rows, &c.queue, &c.handler),
                partitions: Vec::new(),
            });
        }
        let Some(h) = q.handlers.last_mut() else {
            continue;
        };
        let (unsequenced, oldest_incoming) = incoming
            .get(&(c.queue.as_str(), c.partition))
            .copied()
            .unwrap_or((0, None));
        let pending = c.pending.max(0);
        let head = if pending > 0 {
            c.head_enqueued_at
        } else {
            None
        };
        let oldest = match (head, oldest_incoming) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let lag_ms = oldest.map(|t| (now - t).max(0));
        let lease = c.lease_owner.clone().map(|owner| {
            let expires_at_ms = c.lease_expires_at.unwrap_or(0);
            Lease {
                owner,
                expires_at_ms,
                expired: expires_at_ms <= now,
            }
        });
        let retry_at_ms = (pending > 0 && c.retry_at > now).then_some(c.retry_at);
        let dead_letters = dead
            .get(&(c.queue.as_str(), c.handler.as_str(), c.partition))
            .copied()
            .unwrap_or(0);
        h.pending += pending;
        h.waiting += pending + unsequenced;
        h.lag_ms = h.lag_ms.max(lag_ms);
        h.retrying_partitions += u32::from(retry_at_ms.is_some());
        h.leased_partitions += u32::from(lease.as_ref().is_some_and(|l| !l.expired));
        h.blocked_partitions += u32::from(c.blocked);
        h.dead_letters += dead_letters;
        h.partitions.push(PartitionStatus {
            partition: c.partition,
            unsequenced,
            pending,
            processed_seq: c.processed_seq,
            head_seq: c.head_seq.filter(|_| pending > 0),
            oldest_unhandled_at_ms: oldest,
            lag_ms,
            lease,
            attempts: attempts_from_db(c.attempts),
            retry_at_ms,
            blocked: c.blocked,
            last_error: c.last_error.clone(),
            dead_letters,
        });
    }
    Status {
        taken_at_ms: now,
        schema_version: rows.schema_version,
        queues,
    }
}
