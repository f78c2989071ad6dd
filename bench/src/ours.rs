//! The scenarios on this project's engine.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use outbox::sea_orm::{DatabaseConnection, TransactionTrait};
use outbox::{HandlerSpec, Message, NewMessage, Outbox, Overrides, Profile, QueueSpec};

use crate::cell::{HandlerKind, Outcome, ProfileName};
use crate::check::{Checker, Payload, now_us, payload, percentile, sorted_ms};
use crate::db::{Backend, FreshDb};
use crate::{Res, sys};

pub(crate) const QUEUE: &str = "bench";
pub(crate) const GRACE: Duration = Duration::from_secs(10);
/// A cell fails when nothing was handled for this long.
pub(crate) const STALL: Duration = Duration::from_secs(30);

/// Pool size for a runtime with `handlers` handlers at concurrency 2, plus producers.
pub(crate) fn pool_size(backend: Backend, handlers: u32, producers: u32) -> u32 {
    if backend == Backend::Sqlite {
        4 + producers
    } else {
        2 + 2 * handlers + producers + 2
    }
}

fn parse(m: &Message) -> Option<Payload> {
    serde_json::from_slice(m.payload()).ok()
}

fn see(checker: &Checker, m: &Message) {
    match parse(m) {
        Some(body) => checker.see(m.partition(), Some(m.seq()), &body),
        None => checker.see(
            m.partition(),
            Some(m.seq()),
            &Payload {
                p: u32::MAX,
                k: 0,
                i: 0,
                t: 0,
                pad: String::new(),
            },
        ),
    }
}

pub(crate) fn handler(kind: HandlerKind, checker: &Arc<Checker>) -> HandlerSpec {
    let c = checker.clone();
    match kind {
        HandlerKind::Tx => HandlerSpec::transactional(QUEUE, "h", move |m, _txn| {
            see(&c, m);
            Box::pin(async { Ok(()) })
        }),
        HandlerKind::Leased => HandlerSpec::leased(QUEUE, "h", move |m, _ctx| {
            see(&c, m);
            Box::pin(async { Ok(()) })
        }),
    }
}

/// Waits until `checker` handled `n` messages; the elapsed time since `t0`. Gives up when
/// nothing progressed for `stall` (or an order/loss problem was seen: the verdict tells it).
pub(crate) async fn wait_handled(
    checker: &Checker,
    n: u64,
    t0: Instant,
    stall: Duration,
) -> Result<Duration, String> {
    let (mut last, mut since) = (0, Instant::now());
    loop {
        let handled = checker.handled();
        if handled >= n || checker.broken() {
            return Ok(t0.elapsed());
        }
        if handled != last {
            (last, since) = (handled, Instant::now());
        } else if since.elapsed() > stall {
            return Err(format!(
                "stalled: no progress for {stall:?}, handled {handled} of {n}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Producer-side statistics of S1 into metrics.
pub(crate) fn s1_metrics(total: usize, wall: Duration, lat: &[Duration]) -> BTreeMap<String, f64> {
    let ms = sorted_ms(lat);
    BTreeMap::from([
        ("msgs_per_s".into(), total as f64 / wall.as_secs_f64()),
        ("p50_ms".into(), percentile(&ms, 50.0)),
        ("p99_ms".into(), percentile(&ms, 99.0)),
    ])
}

/// S1: enqueue inside the caller's transaction (`enqueue` for 1 per transaction,
/// `enqueue_batch` for more); the latency is begin→commit of the caller's transaction.
pub(crate) async fn s1(
    db: &FreshDb,
    per_tx: usize,
    producers: usize,
    total: usize,
) -> Res<Outcome> {
    let pool = db.pool(producers as u32 + 2, false).await?;
    let ob = Outbox::builder(pool.clone())
        .queue(QueueSpec::new(QUEUE, 8))
        .connect()
        .await?;
    let per_producer = total / producers / per_tx;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..producers {
        let (ob, pool) = (ob.clone(), pool.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_producer);
            for t in 0..per_producer {
                let msgs: Vec<NewMessage> = (0..per_tx)
                    .map(|j| {
                        let i = ((w * per_producer + t) * per_tx + j) as u64;
                        let p = (i % 8) as u32;
                        NewMessage::new(QUEUE, p, payload(p, i / 8, i, now_us()))
                    })
                    .collect();
                let start = Instant::now();
                let txn = pool.begin().await?;
                if per_tx == 1 {
                    for m in msgs {
                        ob.enqueue(&txn, m).await?;
                    }
                } else {
                    ob.enqueue_batch(&txn, &msgs).await?;
                }
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
    let depth = ob.depth(QUEUE).await?;
    let check = if depth.unsequenced == written as i64 {
        Ok(())
    } else {
        Err(format!(
            "{} messages stored, {written} enqueued",
            depth.unsequenced
        ))
    };
    pool.close().await.ok();
    Ok(Outcome::checked(check, s1_metrics(written, wall, &lat)))
}

/// Pre-fills `n` messages round-robin over `partitions` with enqueue_batch (1,000 per
/// transaction), through a producer-only outbox.
pub(crate) async fn prefill(pool: &DatabaseConnection, partitions: u32, n: u64) -> Res<()> {
    let ob = Outbox::builder(pool.clone())
        .queue(QueueSpec::new(QUEUE, partitions))
        .connect()
        .await?;
    let mut i = 0u64;
    while i < n {
        let end = (i + 1_000).min(n);
        let msgs: Vec<NewMessage> = (i..end)
            .map(|i| {
                let p = (i % u64::from(partitions)) as u32;
                NewMessage::new(QUEUE, p, payload(p, i / u64::from(partitions), i, now_us()))
            })
            .collect();
        let txn = pool.begin().await?;
        ob.enqueue_batch(&txn, &msgs).await?;
        txn.commit().await?;
        i = end;
    }
    Ok(())
}

/// S2: pre-fill `n`, start the runtime, time until every message is handled.
pub(crate) async fn s2(
    db: &FreshDb,
    kind: HandlerKind,
    profile: ProfileName,
    partitions: u32,
    n: u64,
    count_statements: bool,
    (batch, concurrency, sequencer_batch): (Option<u32>, Option<u32>, Option<u32>),
) -> Res<Outcome> {
    let mut knobs = Overrides::NONE;
    if let Some(b) = batch {
        knobs = knobs.batch_size(b);
    }
    if let Some(c) = concurrency {
        knobs = knobs.concurrency(c);
    }
    let in_flight = concurrency.unwrap_or(profile.profile().tuning().concurrency);
    let pool = db
        .pool(
            pool_size(db.backend, 1, 0) + in_flight.saturating_sub(2),
            count_statements,
        )
        .await?;
    prefill(&pool, partitions, n).await?;
    let checker = Arc::new(Checker::new(partitions));
    let st0 = sys::statements();
    let t0 = Instant::now();
    let mut runtime = profile.profile().runtime();
    if let Some(b) = sequencer_batch {
        runtime.sequencer_batch = b;
    }
    let rt = Outbox::builder(pool.clone())
        .profile(profile.profile())
        .runtime_tuning(runtime)
        .queue(QueueSpec::new(QUEUE, partitions).overrides(knobs))
        .handler(handler(kind, &checker))
        .start()
        .await?;
    let waited = wait_handled(&checker, n, t0, STALL).await;
    let drained = t0.elapsed();
    let statements = sys::statements() - st0;
    rt.shutdown(GRACE).await?;
    let depth = rt.outbox().depth(QUEUE).await?;
    let pending = depth.handlers.first().map_or(-1, |h| h.pending);
    let mut metrics = BTreeMap::from([
        (
            "msgs_per_s".into(),
            checker.handled() as f64 / drained.as_secs_f64(),
        ),
        ("secs".into(), drained.as_secs_f64()),
        ("duplicates".into(), checker.duplicates() as f64),
    ]);
    metrics.insert("pending_after".into(), pending as f64);
    if count_statements {
        metrics.insert(
            "stmts_per_1k_msgs".into(),
            statements as f64 * 1000.0 / n as f64,
        );
    }
    pool.close().await.ok();
    let check = waited
        .map(|_| ())
        .and_then(|()| checker.verdict(n, kind == HandlerKind::Leased))
        .and_then(|()| {
            if pending == 0 {
                Ok(())
            } else {
                Err(format!("depth reports {pending} pending after the drain"))
            }
        });
    Ok(Outcome::checked(check, metrics))
}

/// Latency figures of S3 from commit and handler-start times (µs, wall clock).
fn s3_metrics(commit_us: &[i64], start_us: &[AtomicI64]) -> BTreeMap<String, f64> {
    let mut ms: Vec<f64> = commit_us
        .iter()
        .zip(start_us)
        .map(|(c, s)| (s.load(Ordering::Relaxed) - c) as f64 / 1e3)
        .collect();
    ms.sort_by(f64::total_cmp);
    BTreeMap::from([
        ("p50_ms".into(), percentile(&ms, 50.0)),
        ("p95_ms".into(), percentile(&ms, 95.0)),
        ("p99_ms".into(), percentile(&ms, 99.0)),
        ("max_ms".into(), percentile(&ms, 100.0)),
        ("min_ms".into(), percentile(&ms, 0.0)),
    ])
}

/// Produces `n` messages, one committed transaction every `interval`, on 8 partitions;
/// returns the wall-clock time (µs) at which each commit returned.
pub(crate) async fn produce_paced(
    ob: &Outbox,
    pool: &DatabaseConnection,
    n: u64,
    interval: Duration,
) -> Res<Vec<i64>> {
    let mut commit_us = Vec::with_capacity(n as usize);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..n {
        tick.tick().await;
        let p = (i % 8) as u32;
        let txn = pool.begin().await?;
        ob.enqueue(
            &txn,
            NewMessage::new(QUEUE, p, payload(p, i / 8, i, now_us())),
        )
        .await?;
        txn.commit().await?;
        commit_us.push(now_us());
    }
    Ok(commit_us)
}

/// S3: `LowLatency` runtime, a producer committing one message every `interval`.
pub(crate) async fn s3(
    db: &FreshDb,
    cross_process: bool,
    n: u64,
    interval: Duration,
    concurrency: Option<u32>,
) -> Res<Outcome> {
    let extra = concurrency.map_or(0, |c| c.saturating_sub(2));
    let pool = db.pool(pool_size(db.backend, 1, 1) + extra, false).await?;
    let checker = Arc::new(Checker::new(8));
    let start_us: Arc<Vec<AtomicI64>> = Arc::new((0..n).map(|_| AtomicI64::new(0)).collect());
    let (c, s) = (checker.clone(), start_us.clone());
    let h = HandlerSpec::transactional(QUEUE, "h", move |m, _txn| {
        let now = now_us();
        if let Some(body) = parse(m) {
            if let Some(slot) = s.get(body.i as usize) {
                // The first delivery counts.
                let _ = slot.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
            }
            c.see(m.partition(), Some(m.seq()), &body);
        }
        Box::pin(async { Ok(()) })
    });
    let mut queue = QueueSpec::new(QUEUE, 8);
    if let Some(c) = concurrency {
        queue = queue.overrides(outbox::Overrides::NONE.concurrency(c));
    }
    let rt = Outbox::builder(pool.clone())
        .profile(Profile::LowLatency)
        .queue(queue)
        .handler(h)
        .start()
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    let commit_us = if cross_process {
        produce_in_child(db, n, interval).await?
    } else {
        produce_paced(rt.outbox(), &pool, n, interval).await?
    };
    let waited = wait_handled(&checker, n, t0, STALL).await;
    rt.shutdown(GRACE).await?;
    pool.close().await.ok();
    let metrics = if waited.is_ok() && commit_us.len() as u64 == n {
        s3_metrics(&commit_us, &start_us)
    } else {
        BTreeMap::new()
    };
    let check = waited.map(|_| ()).and_then(|()| checker.verdict(n, false));
    Ok(Outcome::checked(check, metrics))
}

/// Runs the hidden `produce` subcommand of this binary against `db` and reads its commit times.
async fn produce_in_child(db: &FreshDb, n: u64, interval: Duration) -> Res<Vec<i64>> {
    let exe = std::env::current_exe()?;
    let out = tokio::process::Command::new(exe)
        .arg("produce")
        .arg("--url")
        .arg(&db.url)
        .arg("--count")
        .arg(n.to_string())
        .arg("--interval-us")
        .arg(interval.as_micros().to_string())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    if !out.status.success() {
        return Err(format!("producer process failed: {}", out.status).into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The child side of the cross-process S3 variant: a producer-only outbox.
pub(crate) async fn produce_main(url: &str, n: u64, interval: Duration) -> Res<Vec<i64>> {
    let mut o = outbox::sea_orm::ConnectOptions::new(url.to_owned());
    o.max_connections(2).sqlx_logging(false);
    let pool = outbox::sea_orm::Database::connect(o).await?;
    let ob = Outbox::builder(pool.clone())
        .queue(QueueSpec::new(QUEUE, 8))
        .connect()
        .await?;
    let out = produce_paced(&ob, &pool, n, interval).await?;
    pool.close().await.ok();
    Ok(out)
}

/// S4: `queues` queues of `partitions` partitions, one transactional handler each, `Default`
/// profile, no traffic: CPU, statements and memory over `secs` after a warm-up.
pub(crate) async fn s4(
    db: &FreshDb,
    queues: u32,
    partitions: u32,
    secs: f64,
    warmup: Duration,
) -> Res<Outcome> {
    let pool = db.pool(pool_size(db.backend, queues, 0), true).await?;
    let admin = db.pool(1, false).await?;
    let mut b = Outbox::builder(pool.clone()).profile(Profile::Default);
    for q in 0..queues {
        let name = format!("idle_{q}");
        b = b
            .queue(QueueSpec::new(name.clone(), partitions))
            .handler(HandlerSpec::transactional(name, "h", |_m, _txn| {
                Box::pin(async { Ok(()) })
            }));
    }
    let rt = b.start().await?;
    tokio::time::sleep(warmup).await;
    let (cpu0, st0, srv0) = (
        sys::cpu_seconds(),
        sys::statements(),
        db.server_counter(&admin).await,
    );
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let (cpu1, st1, srv1) = (
        sys::cpu_seconds(),
        sys::statements(),
        db.server_counter(&admin).await,
    );
    let el = t0.elapsed().as_secs_f64();
    let rss = sys::rss_mib();
    rt.shutdown(GRACE).await?;
    pool.close().await.ok();
    admin.close().await.ok();
    let mut m = BTreeMap::from([
        ("cpu_pct".into(), (cpu1 - cpu0) / el * 100.0),
        ("stmts_per_s".into(), (st1 - st0) as f64 / el),
        ("rss_mib".into(), rss),
    ]);
    if let (Some(a), Some(b)) = (srv0, srv1) {
        // The counter query itself adds one to each reading on MariaDB.
        let own = if db.backend == Backend::Mysql { 1 } else { 0 };
        let key = if db.backend == Backend::Postgres {
            "server_xacts_per_s"
        } else {
            "server_questions_per_s"
        };
        m.insert(key.into(), (b - a - own).max(0) as f64 / el);
    }
    Ok(Outcome::passed(m))
}
