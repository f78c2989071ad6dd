//! Scheduled delivery (`outbox-bench scheduled`): how late a scheduled message is handled after
//! its due time in a quiet system, and what a large number of future messages costs the rest of
//! the pipeline (a drain of immediate messages and a status read, with and without them).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outbox::sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use outbox::{HandlerSpec, NewMessage, Outbox, Profile, QueueSpec};

use crate::Res;
use crate::check::{payload, percentile, upper_median};
use crate::db::{Backend, FreshDb, Servers};

/// Options of the scheduled-delivery scenario.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) backends: Vec<Backend>,
    /// Scheduled messages per latency cell.
    pub(crate) messages: u64,
    /// Future messages stored before the cost cells.
    pub(crate) future: u64,
    /// Immediate messages drained by the cost cells.
    pub(crate) drain: u64,
    pub(crate) reps: usize,
    pub(crate) servers: Servers,
}

const PARTITIONS: u32 = 8;
const QUEUE: &str = "sched";

fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The database's clock in ms since the epoch.
async fn db_now<C: ConnectionTrait>(c: &C) -> Res<i64> {
    let sql = match c.get_database_backend() {
        DbBackend::Postgres => "SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
        DbBackend::MySql => {
            "SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000"
        }
        _ => "SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    };
    let row = c
        .query_one_raw(Statement::from_string(c.get_database_backend(), sql))
        .await?
        .ok_or("no row")?;
    Ok(row.try_get_by_index::<i64>(0)?)
}

/// Lateness of every message (handled by the database's clock minus due), in ms.
async fn latency(db: &FreshDb, profile: Profile, n: u64) -> Res<Vec<f64>> {
    let pool = db.pool(6, false).await?;
    let seen: Arc<Mutex<Vec<(u64, i64)>>> = Arc::default();
    let log = seen.clone();
    let rt = Outbox::builder(pool.clone())
        .profile(profile)
        .queue(QueueSpec::new(QUEUE, PARTITIONS))
        .handler(HandlerSpec::transactional(QUEUE, "h", move |m, txn| {
            let log = log.clone();
            let i = std::str::from_utf8(m.payload())
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            Box::pin(async move {
                let now = db_now(txn)
                    .await
                    .map_err(|e| outbox::HandlerError::retry(e.to_string()))?;
                if let Ok(mut l) = log.lock() {
                    l.push((i, now));
                }
                Ok(())
            })
        }))
        .start()
        .await?;
    // Each message is enqueued 200 to 1,000 ms before it is due, one every 20 ms, so dues
    // arrive spread out and interleaved with enqueues, as in an application.
    let mut due = Vec::with_capacity(n as usize);
    for i in 0..n {
        let ahead = 200 + (rand::random::<u64>() % 800);
        let at = SystemTime::now() + Duration::from_millis(ahead);
        due.push(epoch_ms(at));
        let m = NewMessage::new(QUEUE, (i % u64::from(PARTITIONS)) as u32, i.to_string())
            .deliver_at(at);
        rt.outbox().enqueue(&pool, m).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.lock().map(|l| l.len() as u64).unwrap_or(0) < n {
        if Instant::now() > deadline {
            return Err("scheduled messages missing after 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rt.shutdown(Duration::from_secs(10)).await?;
    pool.close().await?;
    let seen = seen.lock().map(|l| l.clone()).unwrap_or_default();
    if seen.len() as u64 != n {
        return Err(format!("{} deliveries for {n} messages", seen.len()).into());
    }
    let mut late: Vec<f64> = seen
        .iter()
        .map(|&(i, at)| (at - due[i as usize]) as f64)
        .collect();
    late.sort_by(f64::total_cmp);
    Ok(late)
}

/// Stores `n` messages due in a day with one statement per 100,000 (the bulk load a long-lived
/// application accumulates; going through `enqueue` would time the load, not the cost).
async fn store_future(pool: &DatabaseConnection, n: u64) -> Res<()> {
    let backend = pool.get_database_backend();
    let due = epoch_ms(SystemTime::now()) + 86_400_000;
    let chunk = 100_000;
    let mut from = 0;
    while from < n {
        let to = (from + chunk).min(n);
        let rows = format!(
            "SELECT '{QUEUE}', x % {PARTITIONS}, {blob}, NULL, {due} + x, {due}",
            blob = match backend {
                DbBackend::Postgres => "'\\x7b7d'::bytea",
                _ => "X'7b7d'",
            }
        );
        let cols = "(queue, partition_no, payload, dedup_key, due_at, created_at)";
        let sql = match backend {
            DbBackend::Postgres => format!(
                "INSERT INTO outbox_scheduled {cols} {rows} FROM generate_series({from}, {}) AS g(x)",
                to - 1
            ),
            DbBackend::MySql => format!(
                "INSERT INTO outbox_scheduled {cols} {rows} FROM (SELECT seq AS x FROM seq_{from}_to_{}) g",
                to - 1
            ),
            _ => format!(
                "INSERT INTO outbox_scheduled {cols} WITH RECURSIVE g(x) AS (SELECT {from} UNION ALL \
                 SELECT x + 1 FROM g WHERE x + 1 < {to}) {rows} FROM g"
            ),
        };
        pool.execute_unprepared(&sql).await?;
        from = to;
    }
    if backend == DbBackend::Postgres {
        pool.execute_unprepared("ANALYZE").await?;
    }
    Ok(())
}

/// Drain rate of `drain` immediate messages and the median `status()` time, with `future`
/// messages scheduled for tomorrow.
async fn cost(db: &FreshDb, future: u64, drain: u64) -> Res<(f64, f64)> {
    let pool = db.pool(6, false).await?;
    // Create the tables (and the queue) before the bulk load.
    let producer = Outbox::builder(pool.clone())
        .queue(QueueSpec::new(QUEUE, PARTITIONS))
        .connect()
        .await?;
    if future > 0 {
        store_future(&pool, future).await?;
    }
    let batch: Vec<NewMessage> = (0..1_000u64)
        .map(|i| {
            NewMessage::new(
                QUEUE,
                (i % u64::from(PARTITIONS)) as u32,
                payload(0, 0, i, 0),
            )
        })
        .collect();
    for _ in 0..drain / 1_000 {
        producer.enqueue_batch(&pool, &batch).await?;
    }
    let expected = (drain / 1_000) * 1_000;
    let handled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = handled.clone();
    let started = Instant::now();
    let rt = Outbox::builder(pool.clone())
        .profile(Profile::HighThroughput)
        .queue(QueueSpec::new(QUEUE, PARTITIONS))
        .handler(HandlerSpec::transactional_batch(
            QUEUE,
            "h",
            move |ms, _txn| {
                count.fetch_add(ms.len() as u64, std::sync::atomic::Ordering::Relaxed);
                Box::pin(async { Ok(()) })
            },
        ))
        .start()
        .await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while handled.load(std::sync::atomic::Ordering::Relaxed) < expected {
        if Instant::now() > deadline {
            return Err("drain did not finish in 600 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = expected as f64 / started.elapsed().as_secs_f64();
    let mut reads = Vec::new();
    for _ in 0..11 {
        let t = Instant::now();
        let s = rt.outbox().queue_status(QUEUE).await?;
        reads.push(t.elapsed().as_secs_f64() * 1e3);
        let shown_ok = if future as i64 > outbox::SCHEDULED_COUNT_CAP {
            s.scheduled_capped && s.scheduled == outbox::SCHEDULED_COUNT_CAP
        } else {
            !s.scheduled_capped && s.scheduled == future as i64
        };
        if !shown_ok {
            return Err(format!("status shows {} scheduled, {future} stored", s.scheduled).into());
        }
    }
    reads.sort_by(f64::total_cmp);
    rt.shutdown(Duration::from_secs(10)).await?;
    pool.close().await?;
    Ok((rate, reads[reads.len() / 2]))
}

/// Runs every cell and prints two Markdown tables; `Err` if a cell failed.
pub(crate) async fn run(o: &Options) -> Res<()> {
    let mut failed = Vec::new();
    println!(
        "### Scheduled delivery: lateness after the due time ({} messages per run, each enqueued 200-1,000 ms before it is due, one every 20 ms, {PARTITIONS} partitions; handled time read from the database's clock in the handler; {} runs pooled)\n",
        o.messages, o.reps
    );
    println!("| backend | profile (poll interval) | early | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    for &backend in &o.backends {
        for (profile, name) in [
            (Profile::Default, "Default (500 ms)"),
            (Profile::LowLatency, "LowLatency (50 ms)"),
        ] {
            let mut all = Vec::new();
            let mut error = None;
            for _ in 0..o.reps {
                let cell = async {
                    let db = FreshDb::create(backend, &o.servers).await?;
                    let r = latency(&db, profile, o.messages).await;
                    db.drop_db().await;
                    r
                };
                match cell.await {
                    Ok(v) => all.extend(v),
                    Err(e) => error = Some(e.to_string()),
                }
            }
            if let Some(e) = error {
                println!("| {backend} | {name} | FAILED: {e} | | | |");
                failed.push(format!("{backend}/{name}: {e}"));
                continue;
            }
            all.sort_by(f64::total_cmp);
            let early = all.iter().filter(|&&l| l < 0.0).count();
            println!(
                "| {backend} | {name} | {early} | {:.0} | {:.0} | {:.0} |",
                percentile(&all, 50.0),
                percentile(&all, 99.0),
                all.last().copied().unwrap_or(f64::NAN)
            );
            if early > 0 {
                failed.push(format!("{backend}/{name}: {early} delivered early"));
            }
        }
    }
    println!(
        "\n### Cost of future messages: {} immediate messages drained (HighThroughput, {PARTITIONS} partitions, one batch handler) with none and with {} messages due tomorrow; medians of {} runs\n",
        o.drain, o.future, o.reps
    );
    println!(
        "| backend | drain msgs/s, none | drain msgs/s, {} future | ratio | status() ms, none | status() ms, {} future |",
        o.future, o.future
    );
    println!("|---|---|---|---|---|---|");
    for &backend in &o.backends {
        let mut runs: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
        let mut error = None;
        for _ in 0..o.reps {
            for (slot, future) in [(0, 0), (1, o.future)] {
                let cell = async {
                    let db = FreshDb::create(backend, &o.servers).await?;
                    let r = cost(&db, future, o.drain).await;
                    db.drop_db().await;
                    r
                };
                match cell.await {
                    Ok(v) => runs[slot].push(v),
                    Err(e) => error = Some(e.to_string()),
                }
            }
        }
        if let Some(e) = error {
            println!("| {backend} | FAILED: {e} | | | | |");
            failed.push(format!("{backend}/cost: {e}"));
            continue;
        }
        let rate = |s: usize| upper_median(runs[s].iter().map(|r| r.0).collect());
        let status = |s: usize| upper_median(runs[s].iter().map(|r| r.1).collect());
        println!(
            "| {backend} | {:.0} | {:.0} | {:.2}x | {:.1} | {:.1} |",
            rate(0),
            rate(1),
            rate(1) / rate(0),
            status(0),
            status(1)
        );
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; ").into())
    }
}
