//! The SQL of a cursor, one per (queue, handler, partition): finding partitions with work,
//! claiming a batch, leases, settling the outcome of a batch in one guarded write, and the
//! operator's actions on a cursor (unblock, skip the head, retire a handler).
//!
//! Every time here is the database's clock
//! ([`Dialect::now_ms`](super::dialect::Dialect::now_ms)), so processes whose clocks disagree
//! still agree on retry times and on who holds a lease.

use std::collections::BTreeMap;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DbErr, Value};

use super::{Store, col, exec};
use crate::storage::StoredMessage;

/// Names one cursor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CursorKey<'a> {
    pub(crate) queue: &'a str,
    pub(crate) handler: &'a str,
    pub(crate) partition: u32,
}

impl CursorKey<'_> {
    fn values(&self) -> Vec<Value> {
        vec![
            self.queue.into(),
            self.handler.into(),
            i64::from(self.partition).into(),
        ]
    }
}

const KEY: &str = "queue = ? AND handler = ? AND partition_no = ?";

/// A cursor row as read under its lock, with the database's clock at that moment.
#[derive(Debug, Clone)]
pub(crate) struct CursorRow {
    pub(crate) processed_seq: i64,
    /// Failed attempts of the head message.
    pub(crate) attempts: i64,
    pub(crate) retry_at: i64,
    pub(crate) blocked: bool,
    pub(crate) lease_expires_at: Option<i64>,
    /// The database's clock when the row was read.
    pub(crate) now: i64,
}

impl CursorRow {
    /// Whether a live lease, a pending retry or the block policy holds the head.
    pub(crate) fn held(&self) -> bool {
        self.blocked
            || self.retry_at > self.now
            || self.lease_expires_at.is_some_and(|e| e > self.now)
    }

    /// A lease was taken and never given back: its holder crashed or stalled past the expiry.
    pub(crate) fn abandoned_lease(&self) -> bool {
        self.lease_expires_at.is_some()
    }
}

/// A partition where a handler has unprocessed messages, with what may hold it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadyPartition {
    pub(crate) partition: u32,
    /// Messages after the cursor (of every handler: replayed copies addressed to another
    /// handler count too).
    pub(crate) waiting: i64,
    /// Failed attempts of the head.
    pub(crate) attempts: i64,
    pub(crate) retry_at: i64,
    pub(crate) lease_expires_at: Option<i64>,
    /// The database's clock when read.
    pub(crate) now: i64,
}

/// What the failure of a message leads to (see `runtime::failure::decide`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Try it again after this delay.
    Retry(Duration),
    /// Keep it at the head until an operator acts (block policy).
    Block,
    /// Copy it to the dead letters and move past it.
    DeadLetter,
}

/// The outcome of a batch, as one write of its cursor.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome<'a> {
    /// Messages up to `processed_seq` are handled; the head after it has `attempts` failed
    /// attempts (0 once the cursor moved).
    Progress { processed_seq: i64, attempts: i64 },
    /// Messages up to `processed_seq` are handled and `message`, the next of this handler,
    /// failed for the `attempts`-th time.
    Failed {
        processed_seq: i64,
        message: &'a StoredMessage,
        attempts: i64,
        verdict: Verdict,
        /// The stored error text, already bounded and sanitised.
        error: &'a str,
    },
}

/// What guards a cursor write: it happens only if the cursor is still as this says.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fence<'a> {
    /// It still carries this claim marker, written in the same transaction: a transaction the
    /// database rolled back behind the runtime's back has lost it.
    Claim(&'a str),
    /// It still holds this lease, unexpired when the ack was requested (`judged_at`, SQLite,
    /// whose processes share the host's clock) or now by the database's clock.
    Lease {
        token: &'a str,
        judged_at: Option<i64>,
    },
    /// It is still where it was read: at `processed_seq` with `attempts`.
    State { processed_seq: i64, attempts: i64 },
}

/// Why an operator's action on a cursor did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No such cursor.
    NoCursor,
    /// The head is not the message the operator saw (`None`: nothing waits).
    Moved { found: Option<i64> },
    /// A live lease holds the head right now.
    Leased,
    /// The partition is not blocked (unblock only).
    NotBlocked,
}

/// Why a handler could not be retired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RetireRefused {
    /// The handler is not registered.
    NotFound,
    /// A running process served it this long ago (ms), within its staleness window.
    InUse { seen_ms_ago: i64 },
}

const CURSOR_COLS: &str = "processed_seq, attempts, retry_at, blocked, lease_expires_at";

fn cursor_from_row(r: &sea_orm::QueryResult) -> Result<CursorRow, DbErr> {
    Ok(CursorRow {
        processed_seq: col(r, 0)?,
        attempts: col(r, 1)?,
        retry_at: col(r, 2)?,
        blocked: col::<i64>(r, 3)? != 0,
        lease_expires_at: col(r, 4)?,
        now: col(r, 5)?,
    })
}

fn message_from_row(r: &sea_orm::QueryResult) -> Result<StoredMessage, DbErr> {
    Ok(StoredMessage {
        seq: col(r, 0)?,
        payload: col(r, 1)?,
        target_handler: col(r, 2)?,
        created_at: col(r, 3)?,
        headers: col(r, 4)?,
    })
}

impl Store {
    /// Partitions of `queue` where `handler` has unprocessed messages and is not blocked. A
    /// cursor behind the vacuumed sequence (a handler added after vacuum) counts from there.
    pub(crate) async fn ready_partitions(
        &self,
        queue: &str,
        handler: &str,
    ) -> Result<Vec<ReadyPartition>, DbErr> {
        let rows = self
            .db
            .query_all_raw(self.stmt(
                &format!(
                    "SELECT c.partition_no, c.retry_at, c.lease_expires_at, {now}, \
                     p.last_seq - {from}, c.attempts FROM {} c JOIN {} p \
                     ON p.queue = c.queue AND p.partition_no = c.partition_no \
                     WHERE c.queue = ? AND c.handler = ? AND p.last_seq > {from} AND c.blocked = 0",
                    self.t.cursors,
                    self.t.partitions,
                    from = self.dialect.greatest("c.processed_seq", "p.vacuumed_seq"),
                    now = self.dialect.now_ms(),
                ),
                vec![queue.into(), handler.into()],
            ))
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ReadyPartition {
                    partition: u32::try_from(col::<i64>(r, 0)?).unwrap_or(0),
                    retry_at: col(r, 1)?,
                    lease_expires_at: col(r, 2)?,
                    now: col(r, 3)?,
                    waiting: col(r, 4)?,
                    attempts: col(r, 5)?,
                })
            })
            .collect()
    }

    /// Locks a cursor row (skipping it if another worker holds it) and reads it with the
    /// database's clock.
    pub(crate) async fn lock_cursor<C: ConnectionTrait>(
        &self,
        c: &C,
        key: CursorKey<'_>,
    ) -> Result<Option<CursorRow>, DbErr> {
        let row = c
            .query_one_raw(self.stmt(
                &format!(
                    "SELECT {CURSOR_COLS}, {} FROM {} WHERE {KEY}{}",
                    self.dialect.now_ms(),
                    self.t.cursors,
                    self.dialect.skip_locked()
                ),
                key.values(),
            ))
            .await?;
        row.as_ref().map(cursor_from_row).transpose()
    }

    /// Locks the cursors of `partitions` for a group claim (skipping those another worker
    /// holds) and reads them with the database's clock, in partition order.
    pub(crate) async fn lock_cursors<C: ConnectionTrait>(
        &self,
        c: &C,
        queue: &str,
        handler: &str,
        partitions: &[u32],
    ) -> Result<Vec<(u32, CursorRow)>, DbErr> {
        let mut values: Vec<Value> = vec![queue.into(), handler.into()];
        values.extend(partitions.iter().map(|&p| Value::from(i64::from(p))));
        let rows = c
            .query_all_raw(self.stmt(
                &format!(
                    "SELECT {CURSOR_COLS}, {}, partition_no FROM {} \
                     WHERE queue = ? AND handler = ? AND partition_no IN {} \
                     ORDER BY partition_no{}",
                    self.dialect.now_ms(),
                    self.t.cursors,
                    Store::list(partitions.len()),
                    self.dialect.skip_locked()
                ),
                values,
            ))
            .await?;
        rows.iter()
            .map(|r| {
                let partition = u32::try_from(col::<i64>(r, 6)?).unwrap_or(0);
                Ok((partition, cursor_from_row(r)?))
            })
            .collect()
    }

    /// For each `(partition, after_seq)`, the messages with sequence numbers in
    /// `after_seq + 1 ..= after_seq + limit` (a partition's numbers are dense, so these are the
    /// next `limit` at most), in sequence order: one statement for a group claim, one bounded
    /// range of the primary key per partition, as an `OR` of the ranges (or a `UNION ALL`
    /// where the planner needs statistics for the `OR`: see
    /// [`Dialect::plans_key_lists_by_statistics`](super::dialect::Dialect::plans_key_lists_by_statistics)).
    /// Sub-selects with `ORDER BY seq LIMIT` each cost MariaDB about 50 ms at 64 partitions.
    pub(crate) async fn read_batches<C: ConnectionTrait>(
        &self,
        c: &C,
        queue: &str,
        from: &[(u32, i64)],
        limit: u32,
    ) -> Result<BTreeMap<u32, Vec<StoredMessage>>, DbErr> {
        const COLUMNS: &str = "seq, payload, target_handler, created_at, headers, partition_no";
        // Each partition's range of the key: `(partition, first excluded, last included)`.
        let ranges = from.iter().map(|&(partition, after_seq)| {
            [
                Value::from(i64::from(partition)),
                after_seq.into(),
                after_seq.saturating_add(i64::from(limit)).into(),
            ]
        });
        let mut values: Vec<Value> = Vec::with_capacity(from.len() * 4 + 1);
        let sql = if self.dialect.plans_key_lists_by_statistics() {
            let mut branches = Vec::with_capacity(from.len());
            for range in ranges {
                values.push(queue.into());
                values.extend(range);
                branches.push(format!(
                    "SELECT {COLUMNS} FROM {} WHERE queue = ? AND partition_no = ? \
                     AND seq > ? AND seq <= ?",
                    self.t.outgoing
                ));
            }
            branches.join(" UNION ALL ")
        } else {
            // The queue is in every term: SQLite serves an OR from an index only when each term
            // can use it (6 ms per read at 64 partitions with the queue outside, 0.3 ms inside).
            let mut ors = Vec::with_capacity(from.len());
            for range in ranges {
                values.push(queue.into());
                values.extend(range);
                ors.push("(queue = ? AND partition_no = ? AND seq > ? AND seq <= ?)");
            }
            format!(
                "SELECT {COLUMNS} FROM {} WHERE {}",
                self.t.outgoing,
                ors.join(" OR ")
            )
        };
        let rows = c.query_all_raw(self.stmt(&sql, values)).await?;
        let mut batches: BTreeMap<u32, Vec<StoredMessage>> = BTreeMap::new();
        for r in &rows {
            let partition = u32::try_from(col::<i64>(r, 5)?).unwrap_or(0);
            batches
                .entry(partition)
                .or_default()
                .push(message_from_row(r)?);
        }
        for batch in batches.values_mut() {
            batch.sort_by_key(|m| m.seq);
        }
        Ok(batches)
    }

    /// Up to `limit` messages after `after_seq`, in sequence order.
    pub(crate) async fn read_batch<C: ConnectionTrait>(
        &self,
        c: &C,
        queue: &str,
        partition: u32,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, DbErr> {
        let rows = c
            .query_all_raw(self.stmt(
                &format!(
                    "SELECT seq, payload, target_handler, created_at, headers FROM {} \
                     WHERE queue = ? AND partition_no = ? AND seq > ? ORDER BY seq LIMIT ?",
                    self.t.outgoing
                ),
                vec![
                    queue.into(),
                    i64::from(partition).into(),
                    after_seq.into(),
                    i64::from(limit).into(),
                ],
            ))
            .await?;
        rows.iter().map(message_from_row).collect()
    }

    /// The first message after `after_seq` that `key.handler` handles: addressed to every
    /// handler, or a replayed copy addressed to it.
    pub(crate) async fn head_for<C: ConnectionTrait>(
        &self,
        c: &C,
        key: CursorKey<'_>,
        after_seq: i64,
    ) -> Result<Option<StoredMessage>, DbErr> {
        let row = c
            .query_one_raw(self.stmt(
                &format!(
                    "SELECT seq, payload, target_handler, created_at, headers FROM {} \
                     WHERE queue = ? AND partition_no = ? AND seq > ? \
                     AND (target_handler IS NULL OR target_handler = ?) ORDER BY seq LIMIT 1",
                    self.t.outgoing
                ),
                vec![
                    key.queue.into(),
                    i64::from(key.partition).into(),
                    after_seq.into(),
                    key.handler.into(),
                ],
            ))
            .await?;
        row.as_ref().map(message_from_row).transpose()
    }

    /// Writes a claim marker on a locked cursor, in the claiming transaction (see
    /// [`Fence::Claim`]).
    pub(crate) async fn mark_claim<C: ConnectionTrait>(
        &self,
        c: &C,
        key: CursorKey<'_>,
        marker: &str,
    ) -> Result<(), DbErr> {
        let mut values: Vec<Value> = vec![marker.into()];
        values.extend(key.values());
        exec(
            c,
            self.stmt(
                &format!("UPDATE {} SET lease_token = ? WHERE {KEY}", self.t.cursors),
                values,
            ),
        )
        .await?;
        Ok(())
    }

    /// Writes one claim marker on the locked cursors of a group (see [`Fence::Claim`]).
    pub(crate) async fn mark_claims<C: ConnectionTrait>(
        &self,
        c: &C,
        queue: &str,
        handler: &str,
        partitions: &[u32],
        marker: &str,
    ) -> Result<(), DbErr> {
        let mut values: Vec<Value> = vec![marker.into(), queue.into(), handler.into()];
        values.extend(partitions.iter().map(|&p| Value::from(i64::from(p))));
        exec(
            c,
            self.stmt(
                &format!(
                    "UPDATE {} SET lease_token = ? WHERE queue = ? AND handler = ? \
                     AND partition_no IN {}",
                    self.t.cursors,
                    Store::list(partitions.len())
                ),
                values,
            ),
        )
        .await?;
        Ok(())
    }

    /// Settles a group whose handlers all succeeded: each cursor moves to its
    /// `(partition, processed_seq)`, with no failed attempt, if every one of them still carries
    /// the group's claim `marker` (else nothing is written and this returns false).
    pub(crate) async fn settle_group<C: ConnectionTrait>(
        &self,
        c: &C,
        queue: &str,
        handler: &str,
        progress: &[(u32, i64)],
        marker: &str,
    ) -> Result<bool, DbErr> {
        let now = self.dialect.now_ms();
        let mut values: Vec<Value> = Vec::with_capacity(progress.len() * 3 + 3);
        let mut cases = String::new();
        for &(partition, processed_seq) in progress {
            cases.push_str(" WHEN ? THEN ?");
            values.extend([i64::from(partition).into(), processed_seq.into()]);
        }
        values.extend([queue.into(), handler.into()]);
        values.extend(progress.iter().map(|&(p, _)| Value::from(i64::from(p))));
        values.push(marker.into());
        let sql = format!(
            "UPDATE {} SET processed_seq = CASE partition_no{cases} END, attempts = 0, \
             retry_at = 0, blocked = 0, last_error = NULL, lease_token = NULL, \
             lease_owner = NULL, lease_expires_at = NULL, updated_at = {now} \
             WHERE queue = ? AND handler = ? AND partition_no IN {} AND lease_token = ?",
            self.t.cursors,
            Store::list(progress.len())
        );
        Ok(exec(c, self.stmt(&sql, values)).await? == progress.len() as u64)
    }

    /// Takes the lease of a locked cursor until `lease` from now (database clock), recording
    /// the head's failed attempts.
    pub(crate) async fn take_lease<C: ConnectionTrait>(
        &self,
        c: &C,
        key: CursorKey<'_>,
        token: &str,
        owner: &str,
        lease: Duration,
        attempts: i64,
    ) -> Result<(), DbErr> {
        let mut values: Vec<Value> = vec![
            token.into(),
            owner.into(),
            (lease.as_millis() as i64).into(),
            attempts.into(),
        ];
        values.extend(key.values());
        let now = self.dialect.now_ms();
        exec(
            c,
            self.stmt(
                &format!(
                    "UPDATE {} SET lease_token = ?, lease_owner = ?, lease_expires_at = {now} + ?, \
                     attempts = ?, updated_at = {now} WHERE {KEY}",
                    self.t.cursors
                ),
                values,
            ),
        )
        .await?;
        Ok(())
    }

    /// Extends a live lease to `lease` from now (database clock); false if it expired or
    /// changed hands (a renewal never resurrects a lost lease).
    pub(crate) async fn renew_lease(
        &self,
        key: CursorKey<'_>,
        token: &str,
        lease: Duration,
    ) -> Result<bool, DbErr> {
        let _gate = self.write_guard().await;
        let mut values: Vec<Value> = vec![(lease.as_millis() as i64).into()];
        values.extend(key.values());
        values.push(token.into());
        let now = self.dialect.now_ms();
        Ok(exec(
            &self.db,
            self.stmt(
                &format!(
                    "UPDATE {} SET lease_expires_at = {now} + ?, updated_at = {now} \
                     WHERE {KEY} AND lease_token = ? AND lease_expires_at > {now}",
                    self.t.cursors
                ),
                values,
            ),
        )
        .await?
            == 1)
    }

    /// Settles a batch: writes its outcome to the cursor if `fence` still holds, clearing any
    /// lease or claim marker, and copies a message dead-lettered by the outcome to the dead
    /// letters, attributed to `key.handler`. Returns whether the fence held (nothing is written
    /// otherwise). Run it in a transaction when the outcome dead-letters.
    pub(crate) async fn settle<C: ConnectionTrait>(
        &self,
        c: &C,
        key: CursorKey<'_>,
        outcome: Outcome<'_>,
        fence: Fence<'_>,
    ) -> Result<bool, DbErr> {
        let now = self.dialect.now_ms();
        let mut sets = String::from("processed_seq = ?, attempts = ?, ");
        let mut values: Vec<Value> = Vec::new();
        let mut dead = None;
        match outcome {
            Outcome::Progress {
                processed_seq,
                attempts,
            } => {
                sets.push_str("retry_at = 0, blocked = 0, last_error = NULL");
                values.extend([processed_seq.into(), attempts.into()]);
            }
            Outcome::Failed {
                processed_seq,
                message,
                attempts,
                verdict,
                error,
            } => match verdict {
                Verdict::Retry(after) => {
                    sets.push_str(&format!(
                        "retry_at = {now} + ?, blocked = 0, last_error = ?"
                    ));
                    values.extend([
                        processed_seq.into(),
                        attempts.into(),
                        (after.as_millis() as i64).into(),
                        error.into(),
                    ]);
                }
                Verdict::Block => {
                    sets.push_str("retry_at = 0, blocked = 1, last_error = ?");
                    values.extend([processed_seq.into(), attempts.into(), error.into()]);
                }
                Verdict::DeadLetter => {
                    sets.push_str("retry_at = 0, blocked = 0, last_error = NULL");
                    values.extend([message.seq.into(), 0i64.into()]);
                    dead = Some((message, attempts, error));
                }
            },
        }
        let mut sql = format!(
            "UPDATE {} SET {sets}, lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL, \
             updated_at = {now} WHERE {KEY}",
            self.t.cursors
        );
        values.extend(key.values());
        match fence {
            Fence::Claim(marker) => {
                sql.push_str(" AND lease_token = ?");
                values.push(marker.into());
            }
            Fence::Lease { token, judged_at } => {
                sql.push_str(" AND lease_token = ? AND lease_expires_at > ");
                values.push(token.into());
                match judged_at {
                    Some(at) => {
                        sql.push('?');
                        values.push(at.into());
                    }
                    None => sql.push_str(now),
                }
            }
            Fence::State {
                processed_seq,
                attempts,
            } => {
                sql.push_str(" AND processed_seq = ? AND attempts = ?");
                values.extend([processed_seq.into(), attempts.into()]);
            }
        }
        if exec(c, self.stmt(&sql, values)).await? != 1 {
            return Ok(false);
        }
        if let Some((m, attempts, error)) = dead {
            self.insert_dead_letter(c, key, m, error, attempts).await?;
        }
        Ok(true)
    }

    /// Copies a message to the dead-letter table.
    async fn insert_dead_letter<C: ConnectionTrait>(
        &self,
        c: &C,
        key: CursorKey<'_>,
        m: &StoredMessage,
        last_error: &str,
        attempts: i64,
    ) -> Result<(), DbErr> {
        exec(
            c,
            self.stmt(
                &format!(
                    "INSERT INTO {} (queue, partition_no, seq, handler, payload, last_error, attempts, enqueued_at, headers, failed_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, {})",
                    self.t.dead_letters,
                    self.dialect.now_ms()
                ),
                vec![
                    key.queue.into(),
                    i64::from(key.partition).into(),
                    m.seq.into(),
                    key.handler.into(),
                    m.payload.clone().into(),
                    last_error.into(),
                    attempts.into(),
                    m.created_at.into(),
                    m.headers.clone().into(),
                ],
            ),
        )
        .await?;
        Ok(())
    }

    // ---------------------------------------------------------------- operator actions

    /// Locks a cursor and checks that its head is `expected_seq` and not leased.
    async fn operator_head<C: ConnectionTrait>(
        &self,
        c: &C,
        key: CursorKey<'_>,
        expected_seq: i64,
    ) -> Result<Result<(CursorRow, StoredMessage), Refused>, DbErr> {
        let row = c
            .query_one_raw(self.stmt(
                &format!(
                    "SELECT {CURSOR_COLS}, {} FROM {} WHERE {KEY}{}",
                    self.dialect.now_ms(),
                    self.t.cursors,
                    self.dialect.for_update()
                ),
                key.values(),
            ))
            .await?;
        let Some(cur) = row.as_ref().map(cursor_from_row).transpose()? else {
            return Ok(Err(Refused::NoCursor));
        };
        let head = match self.head_for(c, key, cur.processed_seq).await? {
            Some(h) if h.seq == expected_seq => h,
            other => {
                return Ok(Err(Refused::Moved {
                    found: other.map(|h| h.seq),
                }));
            }
        };
        if cur.lease_expires_at.is_some_and(|e| e > cur.now) {
            return Ok(Err(Refused::Leased));
        }
        Ok(Ok((cur, head)))
    }

    /// Lets a blocked head be tried again now, if the head is still `expected_seq`.
    pub(crate) async fn unblock(
        &self,
        key: CursorKey<'_>,
        expected_seq: i64,
    ) -> Result<Result<(), Refused>, DbErr> {
        let txn = self.begin_write().await?;
        let (cur, _) = match self.operator_head(&*txn, key, expected_seq).await? {
            Ok(found) => found,
            Err(refused) => {
                txn.rollback().await?;
                return Ok(Err(refused));
            }
        };
        if !cur.blocked {
            txn.rollback().await?;
            return Ok(Err(Refused::NotBlocked));
        }
        let mut values = key.values();
        values.push(cur.processed_seq.into());
        exec(
            &*txn,
            self.stmt(
                &format!(
                    "UPDATE {} SET blocked = 0, attempts = 0, retry_at = 0, updated_at = {} \
                     WHERE {KEY} AND processed_seq = ?",
                    self.t.cursors,
                    self.dialect.now_ms()
                ),
                values,
            ),
        )
        .await?;
        txn.commit().await?;
        Ok(Ok(()))
    }

    /// Moves the head message `expected_seq` to the dead letters and advances past it, if it
    /// is still the head and not leased.
    pub(crate) async fn skip_head(
        &self,
        key: CursorKey<'_>,
        expected_seq: i64,
    ) -> Result<Result<(), Refused>, DbErr> {
        let txn = self.begin_write().await?;
        let (cur, head) = match self.operator_head(&*txn, key, expected_seq).await? {
            Ok(found) => found,
            Err(refused) => {
                txn.rollback().await?;
                return Ok(Err(refused));
            }
        };
        let reason = self
            .last_error(&*txn, key)
            .await?
            .unwrap_or_else(|| "skipped by an operator".to_owned());
        let outcome = Outcome::Failed {
            processed_seq: cur.processed_seq,
            message: &head,
            attempts: cur.attempts,
            verdict: Verdict::DeadLetter,
            error: &reason,
        };
        let fence = Fence::State {
            processed_seq: cur.processed_seq,
            attempts: cur.attempts,
        };
        if !self.settle(&*txn, key, outcome, fence).await? {
            txn.rollback().await?;
            return Ok(Err(Refused::Moved {
                found: Some(head.seq),
            }));
        }
        txn.commit().await?;
        Ok(Ok(()))
    }

    async fn last_error<C: ConnectionTrait>(
        &self,
        c: &C,
        key: CursorKey<'_>,
    ) -> Result<Option<String>, DbErr> {
        let row = c
            .query_one_raw(self.stmt(
                &format!("SELECT last_error FROM {} WHERE {KEY}", self.t.cursors),
                key.values(),
            ))
            .await?;
        Ok(row
            .map(|r| col::<Option<String>>(&r, 0))
            .transpose()?
            .flatten())
    }

    // ---------------------------------------------------------------- handler registry

    /// Records that this process serves `handlers` now, promising to do so again within
    /// `interval`.
    pub(crate) async fn heartbeat(
        &self,
        handlers: &[(&str, &str)],
        interval: Duration,
    ) -> Result<(), DbErr> {
        for chunk in handlers.chunks(200) {
            let mut values: Vec<Value> = vec![(interval.as_millis() as i64).into()];
            let mut preds = Vec::with_capacity(chunk.len());
            for (q, h) in chunk {
                preds.push("(queue = ? AND handler = ?)");
                values.push((*q).into());
                values.push((*h).into());
            }
            let _gate = self.write_guard().await;
            exec(
                &self.db,
                self.stmt(
                    &format!(
                        "UPDATE {} SET seen_at = {}, heartbeat_ms = ? WHERE {}",
                        self.t.handlers,
                        self.dialect.now_ms(),
                        preds.join(" OR ")
                    ),
                    values,
                ),
            )
            .await?;
        }
        Ok(())
    }

    /// Removes a handler's cursors and registration, so vacuum no longer waits for it. Refused
    /// while a process serves it (its heartbeat is younger than `STALE_AFTER_HEARTBEATS`
    /// intervals).
    pub(crate) async fn retire_handler(
        &self,
        queue: &str,
        handler: &str,
    ) -> Result<Result<u64, RetireRefused>, DbErr> {
        let txn = self.begin_write().await?;
        let row = txn
            .query_one_raw(self.stmt(
                &format!(
                    "SELECT seen_at, heartbeat_ms, {} FROM {} WHERE queue = ? AND handler = ?{}",
                    self.dialect.now_ms(),
                    self.t.handlers,
                    self.dialect.for_update()
                ),
                vec![queue.into(), handler.into()],
            ))
            .await?;
        let delete_cursors = self.stmt(
            &format!(
                "DELETE FROM {} WHERE queue = ? AND handler = ?",
                self.t.cursors
            ),
            vec![queue.into(), handler.into()],
        );
        let Some(r) = row else {
            // Cursors of a handler registered before the registry existed are retired too.
            let n = exec(&*txn, delete_cursors).await?;
            txn.commit().await?;
            return Ok(if n == 0 {
                Err(RetireRefused::NotFound)
            } else {
                Ok(n)
            });
        };
        let (seen, interval, now): (Option<i64>, Option<i64>, i64) =
            (col(&r, 0)?, col(&r, 1)?, col(&r, 2)?);
        if let (Some(seen), Some(interval)) = (seen, interval)
            && now - seen < interval * STALE_AFTER_HEARTBEATS
        {
            txn.rollback().await?;
            return Ok(Err(RetireRefused::InUse {
                seen_ms_ago: (now - seen).max(0),
            }));
        }
        let n = exec(&*txn, delete_cursors).await?;
        exec(
            &*txn,
            self.stmt(
                &format!(
                    "DELETE FROM {} WHERE queue = ? AND handler = ?",
                    self.t.handlers
                ),
                vec![queue.into(), handler.into()],
            ),
        )
        .await?;
        txn.commit().await?;
        Ok(Ok(n))
    }
}

/// A handler is stale when no process has served it for this many of its heartbeat intervals.
pub(crate) const STALE_AFTER_HEARTBEATS: i64 = 3;
