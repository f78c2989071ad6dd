//! The sequencer's SQL: number committed `incoming` rows into `outgoing`.
//!
//! One pass reads the oldest committed rows of every queue by primary key (so `incoming` needs
//! no secondary index and producers maintain none), locks the partitions they belong to
//! (`FOR UPDATE SKIP LOCKED`; SQLite's write transaction excludes every other writer), and in
//! one transaction moves each locked partition's rows to `outgoing` with its next dense
//! sequence numbers in id order, deleting what it moved and advancing `last_seq`.
//!
//! Per partition the rows read are the smallest ids visible, so a message whose transaction
//! commits after one with a higher id is found by a later pass and numbered after it: sequence
//! order is commit order, never a skip. Rows of a partition another sequencer holds are left to
//! it.

use std::collections::HashMap;

use sea_orm::{ConnectionTrait, DbErr, Value};

use super::dialect::postgres;
use super::{Store, col, exec};

/// What one pass did.
#[derive(Debug, Default)]
pub(crate) struct Pass {
    /// Committed rows read (at most the pass limit).
    pub(crate) scanned: u64,
    /// Rows moved, per queue.
    pub(crate) moved: Vec<(String, u64)>,
    /// The highest id read (PostgreSQL), a candidate for the scan's low-water mark.
    pub(crate) max_id: Option<i64>,
    /// With `detail`: the sequence numbers given, `queue/partition:first-last` per partition,
    /// comma-separated in queue and partition order.
    pub(crate) sequenced: Option<String>,
}

impl Pass {
    pub(crate) fn moved_total(&self) -> u64 {
        self.moved.iter().map(|(_, n)| n).sum()
    }
}

/// Rows of one partition, in id order.
struct Group {
    queue: String,
    partition: i64,
    ids: Vec<i64>,
    /// The partition's `last_seq`, once this pass holds its lock.
    base: Option<i64>,
}

impl Store {
    /// Sequences up to `limit` of the oldest committed messages, across queues and partitions,
    /// in one transaction.
    /// Where the pass is one statement ([`Dialect::sequence_pass`]) the scan starts above
    /// `floor`, a low-water mark below which no row can still commit (see
    /// [`LowWater`](crate::runtime)); elsewhere it is ignored. With `detail`
    /// the pass also reports the sequence numbers it gave ([`Pass::sequenced`]), for the
    /// sequencer's span.
    pub(crate) async fn sequence_pass(
        &self,
        limit: u32,
        floor: i64,
        detail: bool,
    ) -> Result<Pass, DbErr> {
        if let Some(sql) = self.dialect.sequence_pass(&self.t) {
            return self.sequence_pass_one(sql, limit, floor, detail).await;
        }
        // An idle runtime polls here: one plain read, no write transaction (on SQLite that
        // would take the write lock, on MySQL cost three more statements).
        let any = self
            .db
            .query_one_raw(self.stmt(
                &format!("SELECT id FROM {} LIMIT 1", self.t.incoming),
                vec![],
            ))
            .await?;
        if any.is_none() {
            return Ok(Pass::default());
        }
        let txn = self.begin_write().await?;
        let rows = txn
            .query_all_raw(self.stmt(
                &format!(
                    "SELECT id, queue, partition_no FROM {} ORDER BY id LIMIT ?",
                    self.t.incoming
                ),
                vec![i64::from(limit).into()],
            ))
            .await?;
        let mut pass = Pass {
            scanned: rows.len() as u64,
            ..Pass::default()
        };
        if rows.is_empty() {
            txn.commit().await?;
            return Ok(pass);
        }
        let mut groups: Vec<Group> = Vec::new();
        let mut index: HashMap<(String, i64), usize> = HashMap::new();
        for r in &rows {
            let (id, queue, partition): (i64, String, i64) = (col(r, 0)?, col(r, 1)?, col(r, 2)?);
            let at = *index.entry((queue.clone(), partition)).or_insert_with(|| {
                groups.push(Group {
                    queue,
                    partition,
                    ids: Vec::new(),
                    base: None,
                });
                groups.len() - 1
            });
            groups[at].ids.push(id);
        }

        // Lock the partitions (per queue, one statement) and read where each one stands.
        let mut queues: Vec<String> = Vec::new();
        for g in &groups {
            if !queues.contains(&g.queue) {
                queues.push(g.queue.clone());
            }
        }
        for q in &queues {
            let parts: Vec<i64> = groups
                .iter()
                .filter(|g| g.queue == *q)
                .map(|g| g.partition)
                .collect();
            let mut values: Vec<Value> = vec![q.as_str().into()];
            values.extend(parts.iter().map(|&p| Value::from(p)));
            for r in txn
                .query_all_raw(self.stmt(
                    &format!(
                        "SELECT partition_no, last_seq FROM {} WHERE queue = ? AND partition_no IN {}{}",
                        self.t.partitions,
                        Store::list(parts.len()),
                        self.dialect.skip_locked()
                    ),
                    values,
                ))
                .await?
            {
                let (partition, last): (i64, i64) = (col(&r, 0)?, col(&r, 1)?);
                if let Some(g) = groups
                    .iter_mut()
                    .find(|g| g.queue == *q && g.partition == partition)
                {
                    g.base = Some(last);
                }
            }
        }
        groups.retain(|g| g.base.is_some());
        if groups.is_empty() {
            txn.commit().await?;
            return Ok(pass);
        }

        // With row locks the rows were read before the locks: another sequencer may have
        // moved some since. Keep those still there (a fresh read, after the locks). What it
        // moved was the oldest of the partition, so what is left follows it in id order.
        if let Some(source) = self.dialect.reread_after_lock(&self.t.incoming) {
            let wanted: Vec<i64> = groups.iter().flat_map(|g| g.ids.iter().copied()).collect();
            let present: std::collections::HashSet<i64> = txn
                .query_all_raw(self.stmt(
                    &format!("SELECT i.id FROM {source}"),
                    vec![json_array(&wanted).into()],
                ))
                .await?
                .iter()
                .map(|r| col::<i64>(r, 0))
                .collect::<Result<_, _>>()?;
            for g in &mut groups {
                g.ids.retain(|id| present.contains(id));
            }
            groups.retain(|g| !g.ids.is_empty());
        }

        // Number the rows: each partition's next sequence numbers, in id order.
        let mut pairs: Vec<(i64, i64)> = Vec::new();
        for g in &groups {
            let base = g.base.unwrap_or(0);
            pairs.extend(
                g.ids
                    .iter()
                    .enumerate()
                    .map(|(k, &id)| (id, base + 1 + k as i64)),
            );
        }
        let n = pairs.len() as u64;
        if detail {
            let mut ranges: Vec<(&str, i64, i64, i64)> = groups
                .iter()
                .map(|g| {
                    let base = g.base.unwrap_or(0);
                    (
                        g.queue.as_str(),
                        g.partition,
                        base + 1,
                        base + g.ids.len() as i64,
                    )
                })
                .collect();
            ranges.sort_unstable();
            pass.sequenced = Some(seq_ranges(
                ranges
                    .iter()
                    .map(|&(q, p, a, b)| format!("{q}/{p}:{a}-{b}")),
            ));
        }
        let moved = self.copy_numbered(&*txn, &pairs).await?;
        let ids: Vec<i64> = pairs.iter().map(|&(id, _)| id).collect();
        let deleted = self.delete_incoming(&*txn, &ids).await?;
        if moved != n || deleted != n {
            return Err(DbErr::Custom(format!(
                "sequencer moved {moved} and deleted {deleted} rows for {n} ids; rolled back"
            )));
        }
        for q in &queues {
            let ours: Vec<&Group> = groups.iter().filter(|g| g.queue == *q).collect();
            if ours.is_empty() {
                continue;
            }
            let mut values: Vec<Value> = Vec::with_capacity(ours.len() * 3 + 1);
            let mut case = String::from("CASE partition_no");
            for g in &ours {
                case.push_str(" WHEN ? THEN ?");
                values.push(g.partition.into());
                values.push((g.base.unwrap_or(0) + g.ids.len() as i64).into());
            }
            case.push_str(" END");
            values.push(q.as_str().into());
            values.extend(ours.iter().map(|g| Value::from(g.partition)));
            exec(
                &*txn,
                self.stmt(
                    &format!(
                        "UPDATE {} SET last_seq = {case} WHERE queue = ? AND partition_no IN {}",
                        self.t.partitions,
                        Store::list(ours.len())
                    ),
                    values,
                ),
            )
            .await?;
            pass.moved
                .push((q.clone(), ours.iter().map(|g| g.ids.len() as u64).sum()));
        }
        tracing::trace!(scanned = pass.scanned, moved = n, "sequenced");
        txn.commit().await?;
        Ok(pass)
    }

    /// Copies the rows named by `(id, seq)` pairs from `incoming` to `outgoing` with those
    /// sequence numbers. The pairs go as one JSON parameter; rows are joined by primary key
    /// (a consistent read: no row of an open producer is ever waited on).
    async fn copy_numbered<C: ConnectionTrait>(
        &self,
        c: &C,
        pairs: &[(i64, i64)],
    ) -> Result<u64, DbErr> {
        let mut moved = 0;
        for chunk in pairs.chunks(5_000) {
            let json = format!(
                "[{}]",
                chunk
                    .iter()
                    .map(|(id, seq)| format!("[{id},{seq}]"))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let source = self.dialect.json_pairs_join(&self.t.incoming);
            moved += exec(
                c,
                self.stmt(
                    &format!(
                        "INSERT INTO {} (queue, partition_no, seq, payload, target_handler, dedup_key, headers, created_at) \
                         SELECT i.queue, i.partition_no, x.seq, i.payload, i.target_handler, i.dedup_key, i.headers, i.created_at FROM {source}",
                        self.t.outgoing
                    ),
                    vec![json.into()],
                ),
            )
            .await?;
        }
        Ok(moved)
    }

    /// Deletes moved rows from `incoming` by primary key.
    async fn delete_incoming<C: ConnectionTrait>(&self, c: &C, ids: &[i64]) -> Result<u64, DbErr> {
        let mut deleted = 0;
        if self.dialect.deletes_wait_on_producers() {
            // On MySQL/MariaDB a DELETE waits on the row lock of every uncommitted producer
            // insert its scan touches (seen on MariaDB 10.11: an `IN` list planned as a scan,
            // and a range scan that reads one record past its end). So the rows go by runs of
            // consecutive ids, every one of them ours (no other row can be inside), and each
            // run's DELETE stops at its last row (`LIMIT`) instead of reading the next record.
            // A lone id is a primary-key lookup. Sent as multi-statement batches; the ids are
            // integers read from the database, never user input.
            let statements: Vec<String> = runs(ids)
                .into_iter()
                .map(|(first, last)| {
                    if first == last {
                        format!("DELETE FROM {} WHERE id = {first};", self.t.incoming)
                    } else {
                        format!(
                            "DELETE FROM {} WHERE id >= {first} AND id <= {last} ORDER BY id LIMIT {};",
                            self.t.incoming,
                            last - first + 1
                        )
                    }
                })
                .collect();
            for chunk in statements.chunks(500) {
                deleted += c.execute_unprepared(&chunk.concat()).await?.rows_affected();
            }
        } else {
            for chunk in ids.chunks(900) {
                deleted += exec(
                    c,
                    self.stmt(
                        &format!(
                            "DELETE FROM {} WHERE id IN {}",
                            self.t.incoming,
                            Store::list(chunk.len())
                        ),
                        chunk.iter().map(|&i| Value::from(i)).collect(),
                    ),
                )
                .await?;
            }
        }
        Ok(deleted)
    }

    /// [`sequence_pass`](Store::sequence_pass) as one statement (its own transaction), `sql`
    /// from [`Dialect::sequence_pass`](super::dialect::Dialect::sequence_pass).
    async fn sequence_pass_one(
        &self,
        sql: String,
        limit: u32,
        floor: i64,
        detail: bool,
    ) -> Result<Pass, DbErr> {
        let t = &self.t;
        let rows = self
            .db
            .query_all_raw(sea_orm::Statement::from_sql_and_values(
                self.backend,
                sql,
                [
                    i64::from(limit).into(),
                    t.channel.clone().into(),
                    floor.into(),
                    detail.into(),
                ],
            ))
            .await?;
        let mut pass = Pass::default();
        for r in &rows {
            pass.scanned = col::<i64>(r, 0)? as u64;
            pass.max_id = col::<Option<i64>>(r, 5)?;
            pass.sequenced = col::<Option<String>>(r, 6)?;
            if let Some(queue) = col::<Option<String>>(r, 1)? {
                pass.moved.push((queue, col::<i64>(r, 2)? as u64));
            }
        }
        Ok(pass)
    }
}

/// `ranges` joined with commas.
fn seq_ranges(ranges: impl Iterator<Item = String>) -> String {
    ranges.collect::<Vec<_>>().join(",")
}

impl Store {
    /// PostgreSQL: the transactions that hold a write lock on `incoming` now (every producer
    /// takes it before its insert draws an id, and keeps it until it ends), as a list of
    /// virtual transaction ids; `None` when there are none.
    pub(crate) async fn pg_incoming_writers(&self) -> Result<Option<String>, DbErr> {
        let row = self
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                self.backend,
                postgres::incoming_writers(&self.t),
            ))
            .await?;
        match row {
            Some(r) => col::<Option<String>>(&r, 0),
            None => Ok(None),
        }
    }

    /// PostgreSQL: whether any of `writers` (from [`pg_incoming_writers`]) still holds its
    /// write lock on `incoming`.
    pub(crate) async fn pg_writers_remain(&self, writers: &str) -> Result<bool, DbErr> {
        let row = self
            .db
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                self.backend,
                postgres::writers_remain(&self.t),
                [writers.into()],
            ))
            .await?;
        match row {
            Some(r) => col::<bool>(&r, 0),
            None => Ok(false),
        }
    }

    /// PostgreSQL: the lowest id of `incoming` in `(above, upto]` (rows still to sequence).
    pub(crate) async fn pg_first_id_between(
        &self,
        above: i64,
        upto: i64,
    ) -> Result<Option<i64>, DbErr> {
        let row = self
            .db
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                self.backend,
                format!(
                    "SELECT MIN(id) FROM {} WHERE id > $1 AND id <= $2",
                    self.t.incoming
                ),
                [above.into(), upto.into()],
            ))
            .await?;
        match row {
            Some(r) => col::<Option<i64>>(&r, 0),
            None => Ok(None),
        }
    }
}

/// Maximal runs of consecutive integers, as `(first, last)`, of the sorted `ids`.
fn runs(ids: &[i64]) -> Vec<(i64, i64)> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::new();
    for id in sorted {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == id => *last = id,
            _ => out.push((id, id)),
        }
    }
    out
}

/// A JSON array of integers, for one bound parameter.
fn json_array(ids: &[i64]) -> String {
    format!(
        "[{}]",
        ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_split_at_every_missing_id() {
        assert_eq!(runs(&[]), []);
        assert_eq!(runs(&[7]), [(7, 7)]);
        assert_eq!(runs(&[5, 3, 4, 9, 10, 12]), [(3, 5), (9, 10), (12, 12)]);
    }
}
