//! The raw SQL ceilings: the same work written as the plainest SQL.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, TransactionTrait, Value};

use crate::Res;
use crate::cell::Outcome;
use crate::check::{Checker, Payload, now_us, payload};
use crate::db::{Backend, FreshDb, begin_write, scalar, stmt};
use crate::ours::{STALL, s1_metrics, wait_handled};

fn blob(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "BLOB",
        Backend::Postgres => "BYTEA",
        Backend::Mysql => "LONGBLOB",
    }
}

fn values(rows: usize, per_row: usize) -> String {
    let one = format!("({})", vec!["?"; per_row].join(", "));
    vec![one; rows].join(", ")
}

/// S1 ceiling: the same payloads as `INSERT`s into a table shaped like the outbox's incoming
/// table: one single-row `INSERT` per transaction, or one multi-row `INSERT` per transaction.
pub(crate) async fn s1(
    db: &FreshDb,
    per_tx: usize,
    producers: usize,
    total: usize,
) -> Res<Outcome> {
    let pool = db.pool(producers as u32 + 1, false).await?;
    let id = match db.backend {
        Backend::Sqlite => "id INTEGER PRIMARY KEY",
        Backend::Postgres => "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        Backend::Mysql => "id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY",
    };
    pool.execute_unprepared(&format!(
        "CREATE TABLE bench_raw ({id}, queue VARCHAR(64) NOT NULL, partition_no BIGINT NOT NULL, payload {} NOT NULL, created_at BIGINT NOT NULL)",
        blob(db.backend)
    ))
    .await?;
    let backend = pool.get_database_backend();
    let sql = format!(
        "INSERT INTO bench_raw (queue, partition_no, payload, created_at) VALUES {}",
        values(per_tx, 4)
    );
    let per_producer = total / producers / per_tx;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..producers {
        let (pool, sql) = (pool.clone(), sql.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_producer);
            for t in 0..per_producer {
                let mut vals: Vec<Value> = Vec::with_capacity(per_tx * 4);
                for j in 0..per_tx {
                    let i = ((w * per_producer + t) * per_tx + j) as u64;
                    let p = (i % 8) as u32;
                    let now = now_us();
                    vals.push("bench".into());
                    vals.push(i64::from(p).into());
                    vals.push(payload(p, i / 8, i, now).into());
                    vals.push((now / 1000).into());
                }
                let start = Instant::now();
                let txn = pool.begin().await?;
                txn.execute_raw(stmt(backend, &sql, vals)).await?;
                txn.commit().await?;
                lat.push(start.elapsed());
            }
            Res::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let wall = t0.elapsed();
    let written = per_producer * per_tx * producers;
    let stored = scalar(
        &pool,
        stmt(backend, "SELECT COUNT(*) FROM bench_raw", vec![]),
    )
    .await?;
    let check = if stored == written as i64 {
        Ok(())
    } else {
        Err(format!("{stored} rows stored, {written} inserted"))
    };
    pool.close().await.ok();
    Ok(Outcome::checked(check, s1_metrics(written, wall, &lat)))
}

/// Workers of the S2 ceiling.
const WORKERS: u32 = 4;

/// S2 ceiling: `n` rows pre-sequenced in `(partition, seq)`; 4 workers each loop "lock a
/// partition's cursor row (`FOR UPDATE SKIP LOCKED`; `BEGIN IMMEDIATE` on SQLite), read up to
/// `batch` rows with `seq > cursor`, advance the cursor, commit".
///
/// With `sequence_chunk`, the ceiling of a pipeline that numbers messages in commit order
/// after they are written (as ours must): the backlog starts in an unnumbered table keyed by
/// an auto-increment id, and while the workers drain, one task moves each partition's oldest
/// `sequence_chunk` rows into the numbered table (`INSERT … SELECT` by id range, `DELETE` by id
/// range, one transaction per chunk). With no concurrent producers an id range is safe; ours
/// cannot assume that.
pub(crate) async fn s2(
    db: &FreshDb,
    partitions: u32,
    batch: u32,
    n: u64,
    count_statements: bool,
    sequence_chunk: Option<u32>,
) -> Res<Outcome> {
    let pool = db.pool(WORKERS + 1, count_statements).await?;
    let backend = pool.get_database_backend();
    pool.execute_unprepared(&format!(
        "CREATE TABLE bench_q (partition_no BIGINT NOT NULL, seq BIGINT NOT NULL, payload {} NOT NULL, PRIMARY KEY (partition_no, seq))",
        blob(db.backend)
    ))
    .await?;
    pool.execute_unprepared(
        "CREATE TABLE bench_cursor (partition_no BIGINT NOT NULL PRIMARY KEY, processed_seq BIGINT NOT NULL)",
    )
    .await?;
    let cursors: Vec<Value> = (0..partitions)
        .flat_map(|p| [Value::from(i64::from(p)), Value::from(0i64)])
        .collect();
    pool.execute_raw(stmt(
        backend,
        &format!(
            "INSERT INTO bench_cursor (partition_no, processed_seq) VALUES {}",
            values(partitions as usize, 2)
        ),
        cursors,
    ))
    .await?;
    if sequence_chunk.is_some() {
        let id = match db.backend {
            Backend::Sqlite => "INTEGER PRIMARY KEY",
            Backend::Postgres => "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
            Backend::Mysql => "BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY",
        };
        pool.execute_unprepared(&format!(
            "CREATE TABLE bench_in (id {id}, partition_no BIGINT NOT NULL, payload {} NOT NULL)",
            blob(db.backend)
        ))
        .await?;
        pool.execute_unprepared("CREATE INDEX bench_in_p ON bench_in (partition_no, id)")
            .await?;
    }
    let mut i = 0u64;
    while i < n {
        let end = (i + 500).min(n);
        let mut vals = Vec::with_capacity((end - i) as usize * 3);
        for i in i..end {
            let p = (i % u64::from(partitions)) as u32;
            let k = i / u64::from(partitions);
            vals.push(Value::from(i64::from(p)));
            vals.push(Value::from(k as i64 + 1));
            vals.push(Value::from(payload(p, k, i, now_us())));
        }
        let sql = if sequence_chunk.is_some() {
            // Same rows without their number: (partition, payload).
            vals = vals
                .chunks(3)
                .flat_map(|r| [r[0].clone(), r[2].clone()])
                .collect();
            format!(
                "INSERT INTO bench_in (partition_no, payload) VALUES {}",
                values((end - i) as usize, 2)
            )
        } else {
            format!(
                "INSERT INTO bench_q (partition_no, seq, payload) VALUES {}",
                values((end - i) as usize, 3)
            )
        };
        let txn = pool.begin().await?;
        txn.execute_raw(stmt(backend, &sql, vals)).await?;
        txn.commit().await?;
        i = end;
    }

    let checker = Arc::new(Checker::new(partitions));
    let st0 = crate::sys::statements();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    if let Some(chunk) = sequence_chunk {
        let (pool, checker) = (pool.clone(), checker.clone());
        tasks.push(tokio::spawn(async move {
            let r = sequencer(&pool, backend, partitions, chunk, n).await;
            if let Err(e) = &r {
                checker.problem(format!("sequencer: {e}"));
            }
            r
        }));
    }
    for w in 0..WORKERS {
        let (pool, checker) = (pool.clone(), checker.clone());
        tasks.push(tokio::spawn(async move {
            worker(
                &pool,
                backend,
                &checker,
                w % partitions,
                partitions,
                batch,
                n,
            )
            .await
        }));
    }
    let waited = wait_handled(&checker, n, t0, STALL).await;
    let drained = t0.elapsed();
    let statements = crate::sys::statements() - st0;
    for t in tasks {
        t.abort();
    }
    pool.close().await.ok();
    let mut metrics = BTreeMap::from([
        (
            "msgs_per_s".into(),
            checker.handled() as f64 / drained.as_secs_f64(),
        ),
        ("secs".into(), drained.as_secs_f64()),
        ("duplicates".into(), checker.duplicates() as f64),
    ]);
    if count_statements {
        metrics.insert(
            "stmts_per_1k_msgs".into(),
            statements as f64 * 1000.0 / n as f64,
        );
    }
    let check = waited.map(|_| ()).and_then(|()| checker.verdict(n, false));
    Ok(Outcome::checked(check, metrics))
}

/// Numbers every partition's oldest `chunk` unnumbered rows into `bench_q`, partition after
/// partition, until all `n` are numbered.
async fn sequencer(
    pool: &DatabaseConnection,
    backend: DbBackend,
    partitions: u32,
    chunk: u32,
    n: u64,
) -> Res<()> {
    let mut last = vec![0i64; partitions as usize];
    let mut moved = 0u64;
    let pick = format!(
        "SELECT MIN(id), MAX(id), COUNT(*) FROM (SELECT id FROM bench_in WHERE partition_no = ? ORDER BY id LIMIT {chunk}) AS t"
    );
    while moved < n {
        for p in 0..partitions {
            let txn = begin_write(pool).await?;
            let key = || vec![Value::from(i64::from(p))];
            let row = txn
                .query_one_raw(stmt(backend, &pick, key()))
                .await?
                .ok_or("no row")?;
            let count: i64 = row.try_get_by_index(2)?;
            if count == 0 {
                txn.rollback().await?;
                continue;
            }
            let (lo, hi): (i64, i64) = (row.try_get_by_index(0)?, row.try_get_by_index(1)?);
            let range = |first: Value| {
                vec![
                    first,
                    Value::from(i64::from(p)),
                    Value::from(lo),
                    Value::from(hi),
                ]
            };
            txn.execute_raw(stmt(
                backend,
                "INSERT INTO bench_q (partition_no, seq, payload) \
                 SELECT partition_no, ? + ROW_NUMBER() OVER (ORDER BY id), payload FROM bench_in \
                 WHERE partition_no = ? AND id BETWEEN ? AND ?",
                range(Value::from(last[p as usize])),
            ))
            .await?;
            let mut del = range(Value::from(0i64));
            del.remove(0);
            txn.execute_raw(stmt(
                backend,
                "DELETE FROM bench_in WHERE partition_no = ? AND id BETWEEN ? AND ?",
                del,
            ))
            .await?;
            txn.commit().await?;
            last[p as usize] += count;
            moved += count as u64;
        }
    }
    Ok(())
}

async fn worker(
    pool: &DatabaseConnection,
    backend: DbBackend,
    checker: &Checker,
    mut p: u32,
    partitions: u32,
    batch: u32,
    n: u64,
) -> Res<()> {
    let lock = if backend == DbBackend::Sqlite {
        ""
    } else {
        " FOR UPDATE SKIP LOCKED"
    };
    let lock_sql = format!("SELECT processed_seq FROM bench_cursor WHERE partition_no = ?{lock}");
    let read_sql = format!(
        "SELECT seq, payload FROM bench_q WHERE partition_no = ? AND seq > ? ORDER BY seq LIMIT {batch}"
    );
    let mut idle_sweep = 0;
    while checker.handled() < n && !checker.broken() {
        let txn = begin_write(pool).await?;
        let Some(row) = txn
            .query_one_raw(stmt(backend, &lock_sql, vec![i64::from(p).into()]))
            .await?
        else {
            txn.rollback().await?;
            p = (p + 1) % partitions;
            idle_sweep += 1;
            if idle_sweep >= partitions {
                idle_sweep = 0;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            continue;
        };
        let cursor: i64 = row.try_get_by_index(0)?;
        let rows = txn
            .query_all_raw(stmt(
                backend,
                &read_sql,
                vec![i64::from(p).into(), cursor.into()],
            ))
            .await?;
        let mut last = cursor;
        for r in &rows {
            let seq: i64 = r.try_get_by_index(0)?;
            let body: Vec<u8> = r.try_get_by_index(1)?;
            let body: Payload = serde_json::from_slice(&body)?;
            checker.see(p, Some(seq), &body);
            last = seq;
        }
        if last > cursor {
            txn.execute_raw(stmt(
                backend,
                "UPDATE bench_cursor SET processed_seq = ? WHERE partition_no = ?",
                vec![last.into(), i64::from(p).into()],
            ))
            .await?;
        }
        txn.commit().await?;
        if rows.len() < batch as usize {
            p = (p + 1) % partitions;
            idle_sweep += 1;
            if idle_sweep >= partitions {
                idle_sweep = 0;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        } else {
            idle_sweep = 0;
        }
    }
    Ok(())
}
