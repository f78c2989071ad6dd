//! The SQL of the pipeline: enqueue, sequence, claim and ack, dead letters, vacuum, status.

use std::sync::Arc;

use sea_orm::{ConnectionTrait, DbErr, Value};

use super::{Store, attempts_from_db, col, exec};
use crate::headers::Headers;
use crate::queue::Message;

/// A stored message with its routing column.
#[derive(Debug, Clone)]
pub(crate) struct StoredMessage {
    pub(crate) seq: i64,
    pub(crate) payload: Vec<u8>,
    pub(crate) target_handler: Option<String>,
    pub(crate) created_at: i64,
    /// The stored headers (JSON text), decoded when the message is delivered.
    pub(crate) headers: Option<String>,
}

/// Partitions one vacuum step cleans (a transaction each) before it returns to its worker,
/// which looks at shutdown before the next step. (One step used to clean every partition: at
/// 4,096 partitions, seconds to more than 10 s during which shutdown waited.)
pub(crate) const VACUUM_PARTITIONS_PER_STEP: usize = 64;

impl StoredMessage {
    pub(crate) fn into_message(self, queue: &Arc<str>, partition: u32, attempt: u32) -> Message {
        Message {
            queue: queue.clone(),
            partition,
            seq: self.seq,
            payload: self.payload,
            enqueued_at_ms: self.created_at,
            attempt,
            headers: Headers::from_json(self.headers.as_deref()),
        }
    }
}

/// A dead letter as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Identifier of the dead letter.
    pub id: i64,
    /// Queue of the message.
    pub queue: String,
    /// Partition of the message.
    pub partition: u32,
    /// Sequence of the message in its partition.
    pub seq: i64,
    /// Handler that gave up on it.
    pub handler: String,
    /// The full payload.
    pub payload: Vec<u8>,
    /// The last error, with its sources.
    pub last_error: String,
    /// Attempts made.
    pub attempts: u32,
    /// When the message was enqueued (ms since the Unix epoch).
    pub enqueued_at_ms: i64,
    /// When it was dead-lettered (ms since the Unix epoch).
    pub failed_at_ms: i64,
    /// The message's headers (a replay keeps them).
    pub headers: Headers,
}

/// Which dead letters an operation applies to; empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetterFilter {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this partition.
    pub partition: Option<u32>,
    /// Only this handler.
    pub handler: Option<String>,
}

impl DeadLetterFilter {
    /// Matches every dead letter.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only dead letters of `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Only dead letters of `partition`.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Only dead letters of `handler`.
    pub fn handler(mut self, handler: impl Into<String>) -> Self {
        self.handler = Some(handler.into());
        self
    }

    /// Checks the names, so a filter never matches rows the caller did not name.
    pub(crate) fn validate(&self) -> Result<(), crate::error::InvalidName> {
        if let Some(q) = &self.queue {
            crate::queue::validate_name("queue", q)?;
        }
        if let Some(h) = &self.handler {
            crate::queue::validate_name("handler", h)?;
        }
        Ok(())
    }

    fn where_clause(&self) -> (String, Vec<Value>) {
        let mut sql = String::from(" WHERE 1 = 1");
        let mut values = Vec::new();
        if let Some(q) = &self.queue {
            sql.push_str(" AND queue = ?");
            values.push(q.clone().into());
        }
        if let Some(p) = self.partition {
            sql.push_str(" AND partition_no = ?");
            values.push(i64::from(p).into());
        }
        if let Some(h) = &self.handler {
            sql.push_str(" AND handler = ?");
            values.push(h.clone().into());
        }
        (sql, values)
    }
}

/// Rows per INSERT statement: at most 500, and at most about 4 MiB of payload (MySQL's
/// `max_allowed_packet` defaults to 16 or 64 MiB), but always at least one row.
/// One message for `incoming`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InsertRow<'a> {
    pub(crate) queue: &'a str,
    pub(crate) partition: u32,
    pub(crate) payload: &'a [u8],
    /// A replayed dead letter goes to this handler only.
    pub(crate) target: Option<&'a str>,
    pub(crate) dedup_key: Option<&'a str>,
    /// The stored form of the headers (JSON text), `None` for none.
    pub(crate) headers: Option<&'a str>,
}

fn statement_rows(rows: &[InsertRow<'_>]) -> usize {
    const MAX_ROWS: usize = 500;
    const MAX_BYTES: usize = 4 << 20;
    let mut bytes = 0;
    let mut n = 0;
    for r in rows.iter().take(MAX_ROWS) {
        bytes += r.payload.len() + r.headers.map_or(0, str::len);
        if n > 0 && bytes > MAX_BYTES {
            break;
        }
        n += 1;
    }
    n.max(1)
}

fn dead_letter_from_row(r: &sea_orm::QueryResult) -> Result<DeadLetter, DbErr> {
    Ok(DeadLetter {
        id: col(r, 0)?,
        queue: col(r, 1)?,
        partition: u32::try_from(col::<i64>(r, 2)?).unwrap_or(0),
        seq: col(r, 3)?,
        handler: col(r, 4)?,
        payload: col(r, 5)?,
        last_error: col(r, 6)?,
        attempts: attempts_from_db(col(r, 7)?),
        enqueued_at_ms: col(r, 8)?,
        failed_at_ms: col(r, 9)?,
        headers: Headers::from_json(col::<Option<String>>(r, 10)?.as_deref()),
    })
}

const DEAD_LETTER_COLS: &str = "id, queue, partition_no, seq, handler, payload, last_error, attempts, enqueued_at, failed_at, headers";

impl Store {
    // ---------------------------------------------------------------- enqueue

    /// Inserts messages into `incoming` on the caller's connection. With LISTEN/NOTIFY
    /// (PostgreSQL) the same statement sends a NOTIFY, which is delivered only if the caller
    /// commits (at most one enqueue per coalescing window carries it; see [`super::notify`]).
    pub(crate) async fn insert_incoming<C: ConnectionTrait>(
        &self,
        c: &C,
        rows: &[InsertRow<'_>],
    ) -> Result<(), DbErr> {
        let now = self.dialect.now_ms();
        let row_sql = format!("(?, ?, ?, ?, ?, ?, {now})");
        let mut rest = rows;
        while !rest.is_empty() {
            let take = statement_rows(rest);
            let (chunk, tail) = rest.split_at(take);
            rest = tail;
            let mut values = Vec::with_capacity(chunk.len() * 6 + 2);
            for r in chunk {
                values.push(r.queue.into());
                values.push(i64::from(r.partition).into());
                values.push(r.payload.to_vec().into());
                values.push(r.target.map(str::to_owned).into());
                values.push(r.dedup_key.map(str::to_owned).into());
                values.push(r.headers.map(str::to_owned).into());
            }
            let insert = format!(
                "INSERT INTO {} (queue, partition_no, payload, target_handler, dedup_key, headers, created_at) VALUES {}",
                self.t.incoming,
                vec![row_sql.as_str(); chunk.len()].join(", ")
            );
            let notifying =
                if self.dialect.listen_notify() && self.notify.take(&self.db, &self.t.channel) {
                    self.dialect.notifying_insert(&insert)
                } else {
                    None
                };
            let sql = match notifying {
                Some(sql) => {
                    values.push(self.t.channel.clone().into());
                    values.push(super::notify::ENQUEUED.into());
                    sql
                }
                None => insert,
            };
            c.execute_raw(self.stmt(&sql, values)).await?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- dead letters

    pub(crate) async fn list_dead_letters(
        &self,
        f: &DeadLetterFilter,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, DbErr> {
        let (mut sql, mut values) = f.where_clause();
        sql.push_str(" AND id > ? ORDER BY id LIMIT ?");
        values.push(after_id.into());
        values.push(i64::from(limit).into());
        let rows = self
            .db
            .query_all_raw(self.stmt(
                &format!(
                    "SELECT {DEAD_LETTER_COLS} FROM {}{sql}",
                    self.t.dead_letters
                ),
                values,
            ))
            .await?;
        rows.iter().map(dead_letter_from_row).collect()
    }

    pub(crate) async fn get_dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, DbErr> {
        let row = self
            .db
            .query_one_raw(self.stmt(
                &format!(
                    "SELECT {DEAD_LETTER_COLS} FROM {} WHERE id = ?",
                    self.t.dead_letters
                ),
                vec![id.into()],
            ))
            .await?;
        row.as_ref().map(dead_letter_from_row).transpose()
    }

    pub(crate) async fn count_dead_letters(&self, f: &DeadLetterFilter) -> Result<i64, DbErr> {
        let (sql, values) = f.where_clause();
        let row = self
            .db
            .query_one_raw(self.stmt(
                &format!("SELECT COUNT(*) FROM {}{sql}", self.t.dead_letters),
                values,
            ))
            .await?;
        row.map(|r| col::<i64>(&r, 0))
            .transpose()
            .map(|n| n.unwrap_or(0))
    }

    /// Puts a dead letter back at the tail of its partition, for its handler only, and deletes
    /// it, in one transaction. Returns false if it no longer exists (so racing replays deliver
    /// it once).
    pub(crate) async fn replay_dead_letter(&self, id: i64) -> Result<bool, DbErr> {
        let txn = self.begin_write().await?;
        let row = txn
            .query_one_raw(self.stmt(
                &format!(
                    "SELECT {DEAD_LETTER_COLS} FROM {} WHERE id = ?{}",
                    self.t.dead_letters,
                    self.dialect.for_update()
                ),
                vec![id.into()],
            ))
            .await?;
        let Some(dl) = row.as_ref().map(dead_letter_from_row).transpose()? else {
            return Ok(false);
        };
        let deleted = exec(
            &*txn,
            self.stmt(
                &format!("DELETE FROM {} WHERE id = ?", self.t.dead_letters),
                vec![id.into()],
            ),
        )
        .await?;
        if deleted != 1 {
            return Ok(false);
        }
        self.insert_incoming(
            &*txn,
            &[InsertRow {
                queue: &dl.queue,
                partition: dl.partition,
                payload: &dl.payload,
                target: Some(&dl.handler),
                dedup_key: None,
                headers: dl.headers.to_json().as_deref(),
            }],
        )
        .await?;
        txn.commit().await?;
        Ok(true)
    }

    pub(crate) async fn delete_dead_letter(&self, id: i64) -> Result<bool, DbErr> {
        let _gate = self.write_guard().await;
        Ok(exec(
            &self.db,
            self.stmt(
                &format!("DELETE FROM {} WHERE id = ?", self.t.dead_letters),
                vec![id.into()],
            ),
        )
        .await?
            == 1)
    }

    pub(crate) async fn purge_dead_letters(&self, f: &DeadLetterFilter) -> Result<u64, DbErr> {
        let _gate = self.write_guard().await;
        let (sql, values) = f.where_clause();
        exec(
            &self.db,
            self.stmt(&format!("DELETE FROM {}{sql}", self.t.dead_letters), values),
        )
        .await
    }

    // ---------------------------------------------------------------- vacuum

    /// Deletes sequenced messages that every handler of their queue has processed, at most
    /// `chunk` rows per partition and statement and [`VACUUM_PARTITIONS_PER_STEP`] partitions
    /// per call. Returns rows deleted and whether more remain. Only partitions with something
    /// to delete come back from the database (an idle runtime at 4,096 partitions used to
    /// fetch 4,096 rows every vacuum interval to find none).
    pub(crate) async fn vacuum(&self, chunk: u32) -> Result<(u64, bool), DbErr> {
        let rows = self
            .db
            .query_all_raw(self.stmt(
                &format!(
                    "SELECT c.queue, c.partition_no, MIN(c.processed_seq), MIN(p.vacuumed_seq) FROM {} c JOIN {} p \
                     ON p.queue = c.queue AND p.partition_no = c.partition_no GROUP BY c.queue, c.partition_no \
                     HAVING MIN(c.processed_seq) > MIN(p.vacuumed_seq) LIMIT {}",
                    self.t.cursors,
                    self.t.partitions,
                    // One more than a step cleans: its presence tells that more remain.
                    VACUUM_PARTITIONS_PER_STEP + 1
                ),
                vec![],
            ))
            .await?;
        let mut deleted = 0;
        let mut more = false;
        let mut cleaned = 0;
        for r in rows {
            if cleaned == VACUUM_PARTITIONS_PER_STEP {
                // The rest goes in the next steps: the worker looks at shutdown in between.
                more = true;
                break;
            }
            let queue: String = col(&r, 0)?;
            let partition: i64 = col(&r, 1)?;
            let min_processed: i64 = col(&r, 2)?;
            let vacuumed: i64 = col(&r, 3)?;
            if min_processed <= vacuumed {
                continue;
            }
            let upto = min_processed.min(vacuumed + i64::from(chunk));
            more |= upto < min_processed;
            cleaned += 1;
            let txn = self.begin_write().await?;
            self.release_dedup_keys(&*txn, &queue, partition, vacuumed, upto)
                .await?;
            deleted += exec(
                &*txn,
                self.stmt(
                    &format!(
                        "DELETE FROM {} WHERE queue = ? AND partition_no = ? AND seq > ? AND seq <= ?",
                        self.t.outgoing
                    ),
                    vec![queue.clone().into(), partition.into(), vacuumed.into(), upto.into()],
                ),
            )
            .await?;
            exec(
                &*txn,
                self.stmt(
                    &format!(
                        "UPDATE {} SET vacuumed_seq = ? WHERE queue = ? AND partition_no = ? AND vacuumed_seq < ?",
                        self.t.partitions
                    ),
                    vec![upto.into(), queue.into(), partition.into(), upto.into()],
                ),
            )
            .await?;
            txn.commit().await?;
        }
        Ok((deleted, more))
    }

    // ---------------------------------------------------------------- status

    /// Sequenced messages of `queue` still stored (not yet vacuumed).
    pub(crate) async fn stored(&self, queue: &str) -> Result<i64, DbErr> {
        let sql = format!("SELECT COUNT(*) FROM {} WHERE queue = ?", self.t.outgoing);
        let row = self
            .db
            .query_one_raw(self.stmt(&sql, vec![queue.into()]))
            .await?;
        Ok(row
            .map(|r| col::<Option<i64>>(&r, 0))
            .transpose()?
            .flatten()
            .unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_statements_are_bounded_by_rows_and_bytes() {
        let small = vec![0u8; 10];
        let big = vec![0u8; 3 << 20];
        let rows = |p: &'static [u8], n: usize| {
            vec![
                InsertRow {
                    queue: "q",
                    partition: 0,
                    payload: p,
                    target: None,
                    dedup_key: None,
                    headers: None,
                };
                n
            ]
        };
        let small: &'static [u8] = small.leak();
        let big: &'static [u8] = big.leak();
        assert_eq!(statement_rows(&rows(small, 1200)), 500);
        assert_eq!(statement_rows(&rows(small, 7)), 7);
        assert_eq!(
            statement_rows(&rows(big, 5)),
            1,
            "two 3 MiB payloads exceed 4 MiB"
        );
        let huge: &'static [u8] = vec![0u8; 9 << 20].leak();
        assert_eq!(
            statement_rows(&rows(huge, 2)),
            1,
            "a row larger than the cap still goes alone"
        );
    }
}
