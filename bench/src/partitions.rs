//! Partition scaling (`outbox-bench partitions`): one queue with many handlers, a small backlog
//! spread over a few or very many partitions. Measures the drain time at each partition count
//! (the issue: at 4,096 partitions the dispatcher used to scan every cursor row after every
//! partition it drained) and the idle cost of a runtime at the largest count.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::{HandlerSpec, NewMessage, Outbox, Profile, QueueSpec};

use crate::Res;
use crate::check::{Checker, Payload, payload, upper_median};
use crate::db::{Backend, FreshDb, Servers};
use crate::sys;

/// Options of the partition-scaling scenario.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) backends: Vec<Backend>,
    pub(crate) partitions: Vec<u32>,
    pub(crate) handlers: u32,
    pub(crate) messages: u64,
    pub(crate) reps: usize,
    /// Seconds of the idle measurement (0: skip it).
    pub(crate) idle_secs: f64,
    pub(crate) servers: Servers,
}

const QUEUE: &str = "wide";

fn pool_size(backend: Backend, handlers: u32) -> u32 {
    if backend == Backend::Sqlite {
        4
    } else {
        // Per handler: concurrency 2, plus the sequencer, scans and the listener.
        2 * handlers + 4
    }
}

fn start_builder(pool: &outbox::sea_orm::DatabaseConnection, partitions: u32) -> outbox::Builder {
    Outbox::builder(pool.clone())
        .profile(Profile::Default)
        .queue(QueueSpec::new(QUEUE, partitions))
}

/// Drains `messages` (round-robin over `partitions`, enqueued before start) with `handlers`
/// transactional handlers, each checked for loss, duplicates and order; the seconds from
/// `start()` until every handler saw every message.
async fn drain(db: &FreshDb, partitions: u32, handlers: u32, messages: u64) -> Res<f64> {
    let pool = db.pool(pool_size(db.backend, handlers), false).await?;
    let producer = start_builder(&pool, partitions).connect().await?;
    let mut next_k = vec![0u64; partitions as usize];
    let mut i = 0u64;
    while i < messages {
        let batch: Vec<NewMessage> = (i..(i + 1_000).min(messages))
            .map(|i| {
                let p = (i % u64::from(partitions)) as u32;
                let k = next_k[p as usize];
                next_k[p as usize] += 1;
                NewMessage::new(QUEUE, p, payload(p, k, i, 0))
            })
            .collect();
        i += batch.len() as u64;
        producer.enqueue_batch(&pool, &batch).await?;
    }
    let checkers: Vec<Arc<Checker>> = (0..handlers)
        .map(|_| Arc::new(Checker::new(partitions)))
        .collect();
    let mut b = start_builder(&pool, partitions);
    for (h, c) in checkers.iter().enumerate() {
        let c = c.clone();
        b = b.handler(HandlerSpec::transactional(
            QUEUE,
            format!("h{h}"),
            move |m, _txn| {
                match serde_json::from_slice::<Payload>(m.payload()) {
                    Ok(body) => c.see(m.partition(), Some(m.seq()), &body),
                    Err(e) => c.problem(format!("unreadable payload: {e}")),
                }
                Box::pin(async { Ok(()) })
            },
        ));
    }
    let t0 = Instant::now();
    let rt = b.start().await?;
    let deadline = t0 + Duration::from_secs(900);
    loop {
        if checkers.iter().any(|c| c.broken()) {
            break;
        }
        if checkers.iter().all(|c| c.handled() >= messages) {
            break;
        }
        if Instant::now() > deadline {
            return Err("drain did not finish in 900 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    rt.shutdown(Duration::from_secs(10)).await?;
    pool.close().await.ok();
    for (h, c) in checkers.iter().enumerate() {
        c.verdict(messages, false)
            .map_err(|e| format!("handler h{h}: {e}"))?;
    }
    Ok(secs)
}

/// The idle cost of a runtime: CPU % of one core of this process and of the local database
/// server's processes (0 for SQLite, whose work is in-process), and statements/s.
struct Idle {
    cpu: f64,
    server_cpu: f64,
    statements: f64,
}

/// A runtime at `partitions` with `handlers` handlers and no traffic, measured over `secs`
/// after a 3 s warm-up.
async fn idle(db: &FreshDb, partitions: u32, handlers: u32, secs: f64) -> Res<Idle> {
    let pool = db.pool(pool_size(db.backend, handlers), true).await?;
    let mut b = start_builder(&pool, partitions);
    for h in 0..handlers {
        b = b.handler(HandlerSpec::transactional(
            QUEUE,
            format!("h{h}"),
            |_m, _txn| Box::pin(async { Ok(()) }),
        ));
    }
    let rt = b.start().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let server = db.backend.server_processes();
    let (cpu0, server0, st0, t0) = (
        sys::cpu_seconds(),
        sys::server_cpu_seconds(server),
        sys::statements(),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let el = t0.elapsed().as_secs_f64();
    let measured = Idle {
        cpu: (sys::cpu_seconds() - cpu0) / el * 100.0,
        server_cpu: (sys::server_cpu_seconds(server) - server0) / el * 100.0,
        statements: (sys::statements() - st0) as f64 / el,
    };
    rt.shutdown(Duration::from_secs(10)).await?;
    pool.close().await.ok();
    Ok(measured)
}

/// Runs every cell and prints a Markdown table; `Err` if a cell failed.
pub(crate) async fn run(o: &Options) -> Res<()> {
    let mut failed = Vec::new();
    let widest = o.partitions.iter().copied().max().unwrap_or(1);
    let narrowest = o.partitions.iter().copied().min().unwrap_or(1);
    println!(
        "### Partition scaling: {} messages round-robin over one queue, {} transactional handlers (Profile::Default), enqueued before start; seconds until every handler saw every message, median of {} runs [min-max]; idle: the same runtime at {widest} partitions with no traffic, {}s after a 3 s warm-up; server CPU: the local database server's processes over the same span\n",
        o.messages, o.handlers, o.reps, o.idle_secs
    );
    let header: Vec<String> = o
        .partitions
        .iter()
        .map(|p| format!("drain s, {p} partitions"))
        .collect();
    println!(
        "| backend | {} | {widest} vs {narrowest} | idle CPU % of a core | idle server CPU % | idle statements/s |",
        header.join(" | ")
    );
    println!("|---|{}---|---|---|---|", "---|".repeat(o.partitions.len()));
    for &backend in &o.backends {
        let mut cells = Vec::new();
        let mut medians = Vec::new();
        let mut row_failed = false;
        for &p in &o.partitions {
            let mut runs = Vec::new();
            for _ in 0..o.reps {
                let cell = async {
                    let db = FreshDb::create(backend, &o.servers).await?;
                    let r = drain(&db, p, o.handlers, o.messages).await;
                    db.drop_db().await;
                    r
                };
                match cell.await {
                    Ok(s) => runs.push(s),
                    Err(e) => {
                        failed.push(format!("{backend}/{p} partitions: {e}"));
                        row_failed = true;
                    }
                }
            }
            let (lo, hi) = runs
                .iter()
                .fold((f64::INFINITY, 0f64), |(lo, hi), &s| (lo.min(s), hi.max(s)));
            let m = upper_median(runs);
            medians.push((p, m));
            cells.push(format!("{m:.2} [{lo:.2}-{hi:.2}]"));
        }
        let ratio = {
            let at = |want: u32| medians.iter().find(|(p, _)| *p == want).map(|(_, m)| *m);
            match (at(widest), at(narrowest)) {
                (Some(w), Some(n)) => format!("{:.2}x", w / n),
                _ => "n/a".into(),
            }
        };
        let idle_cell = if o.idle_secs > 0.0 {
            let cell = async {
                let db = FreshDb::create(backend, &o.servers).await?;
                let r = idle(&db, widest, o.handlers, o.idle_secs).await;
                db.drop_db().await;
                r
            };
            match cell.await {
                Ok(i) => {
                    let server = if backend.server_processes().is_empty() {
                        "in-process".to_owned()
                    } else {
                        format!("{:.2}", i.server_cpu)
                    };
                    format!("{:.2} | {server} | {:.1}", i.cpu, i.statements)
                }
                Err(e) => {
                    failed.push(format!("{backend}/idle: {e}"));
                    row_failed = true;
                    "FAILED | | ".into()
                }
            }
        } else {
            "not run | not run | not run".into()
        };
        println!(
            "| {backend}{} | {} | {ratio} | {idle_cell} |",
            if row_failed { " (FAILED)" } else { "" },
            cells.join(" | ")
        );
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; ").into())
    }
}
