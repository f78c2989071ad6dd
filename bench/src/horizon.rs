//! A held horizon (`outbox-bench horizon`): S2 drains with and without a transaction that
//! holds an old snapshot for the whole run (PostgreSQL: `REPEATABLE READ`, as a report or
//! `pg_dump` would; MariaDB: a consistent snapshot). Such a transaction keeps every row the
//! pipeline deletes meanwhile, so anything that scans from the oldest row slows down as the
//! run goes on. Reports the drain rate of each and the sequencer's pass times, early and late
//! in the run, to show whether they stay flat.

use std::time::Duration;

use outbox::sea_orm::{
    AccessMode, ConnectionTrait, DatabaseTransaction, IsolationLevel, TransactionTrait,
};

use crate::Res;
use crate::cell::{HandlerKind, ProfileName};
use crate::check::percentile;
use crate::db::{Backend, FreshDb, Servers};
use crate::{ours, sys};

/// Options of the held-horizon scenario.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) backends: Vec<Backend>,
    pub(crate) partitions: u32,
    pub(crate) messages: u64,
    pub(crate) reps: usize,
    pub(crate) servers: Servers,
}

/// Opens a transaction on its own connection and takes its snapshot now.
pub(crate) async fn hold(
    db: &FreshDb,
) -> Res<(outbox::sea_orm::DatabaseConnection, DatabaseTransaction)> {
    let conn = db.pool(1, false).await?;
    let txn = conn
        .begin_with_config(
            Some(IsolationLevel::RepeatableRead),
            Some(AccessMode::ReadOnly),
        )
        .await?;
    // The snapshot is taken by the first read (MariaDB: the first consistent read).
    txn.execute_unprepared("SELECT COUNT(*) FROM outbox_queues")
        .await?;
    Ok((conn, txn))
}

/// One drain; the rate, and the pass times (ms) in the order they ran.
async fn drain(
    db: &FreshDb,
    partitions: u32,
    messages: u64,
    held: bool,
) -> Res<(f64, Vec<(f64, u64)>)> {
    // Create the tables first, so the held transaction can read one.
    let pool = db.pool(2, false).await?;
    outbox::Outbox::builder(pool.clone())
        .queue(outbox::QueueSpec::new("bench", partitions))
        .connect()
        .await?;
    pool.close().await.ok();
    let holder = if held { Some(hold(db).await?) } else { None };
    sys::take_pass_times();
    let outcome = ours::s2(
        db,
        HandlerKind::Tx,
        ProfileName::HighThroughput,
        partitions,
        messages,
        false,
        (None, None, None),
    )
    .await?;
    let passes = sys::take_pass_times();
    if let Some((conn, txn)) = holder {
        txn.rollback().await?;
        conn.close().await.ok();
    }
    if !outcome.ok {
        return Err(outcome
            .error
            .unwrap_or_else(|| "check failed".into())
            .into());
    }
    let rate = outcome
        .metrics
        .get("msgs_per_s")
        .copied()
        .unwrap_or(f64::NAN);
    Ok((rate, passes))
}

/// Per pass, ms per 1,000 rows moved (passes grow from 500 rows to the batch at the start of
/// a drain, so their raw durations are not comparable); p50 / p99 over the first and over the
/// last quarter of the passes.
fn early_late(passes: &[(f64, u64)]) -> (f64, f64, f64, f64) {
    let per_k: Vec<f64> = passes
        .iter()
        .map(|&(ms, rows)| ms * 1_000.0 / rows.max(1) as f64)
        .collect();
    let n = per_k.len();
    let quarter = (n / 4).max(1).min(n);
    let mut early = per_k[..quarter].to_vec();
    let mut late = per_k[n - quarter..].to_vec();
    early.sort_by(f64::total_cmp);
    late.sort_by(f64::total_cmp);
    (
        percentile(&early, 50.0),
        percentile(&early, 99.0),
        percentile(&late, 50.0),
        percentile(&late, 99.0),
    )
}

/// Runs quiet and held drains alternately and prints a Markdown table; `Err` if one failed.
pub(crate) async fn run(o: &Options) -> Res<()> {
    sys::time_passes();
    let mut failed = Vec::new();
    println!(
        "### Held horizon: S2 drain of {} messages over {} partitions (HighThroughput, one transactional handler), quiet and with a read-only REPEATABLE READ transaction opened before the pre-fill and held to the end; medians of {} runs each, alternated. Pass times: the sequencer's `outbox.sequence` span (one pass plus its low-water bookkeeping) per 1,000 rows moved, over the passes that moved rows, in the median-rate run of each kind\n",
        o.messages, o.partitions, o.reps
    );
    println!(
        "| backend | quiet msgs/s | held msgs/s | held / quiet | run | first quarter of passes: ms per 1k rows p50 / p99 | last quarter: p50 / p99 | passes |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &backend in &o.backends {
        if backend == Backend::Sqlite {
            // No MVCC horizon: a reader does not keep deleted rows in SQLite's b-trees.
            continue;
        }
        let mut quiet: Vec<(f64, Vec<(f64, u64)>)> = Vec::new();
        let mut held: Vec<(f64, Vec<(f64, u64)>)> = Vec::new();
        let mut error = None;
        for _ in 0..o.reps {
            for with_hold in [false, true] {
                let cell = async {
                    let db = FreshDb::create(backend, &o.servers).await?;
                    let r = drain(&db, o.partitions, o.messages, with_hold).await;
                    db.drop_db().await;
                    r
                };
                match cell.await {
                    Ok(r) if with_hold => held.push(r),
                    Ok(r) => quiet.push(r),
                    Err(e) => error = Some(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        if let Some(e) = error {
            println!("| {backend} | FAILED: {e} | | | | | | |");
            failed.push(format!("{backend}: {e}"));
            continue;
        }
        let pick = |mut runs: Vec<(f64, Vec<(f64, u64)>)>| {
            runs.sort_by(|a, b| a.0.total_cmp(&b.0));
            runs.get(runs.len() / 2).cloned()
        };
        let (Some((q, quiet_passes)), Some((h, passes))) = (pick(quiet), pick(held)) else {
            continue;
        };
        let times = |p: &[(f64, u64)]| {
            let (e50, e99, l50, l99) = early_late(p);
            format!("{e50:.1} / {e99:.1} | {l50:.1} / {l99:.1} | {}", p.len())
        };
        println!(
            "| {backend} | {q:.0} | {h:.0} | {:.2}x | quiet | {} |",
            h / q,
            times(&quiet_passes)
        );
        println!("| | | | | held | {} |", times(&passes));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; ").into())
    }
}
