//! awa 0.6.9 (a PostgreSQL job queue) driven through outbox-bench's scenario definitions
//! (S1, S2 and S3).
//!
//! Run by `outbox-bench --peer awa` as a child process, once per cell and repetition, on a
//! fresh database the harness created: `--backend postgres --url U --cell JSON`. Prints one
//! JSON line in the harness's `Outcome` shape: `{"ok":…,"error":…,"metrics":{…}}`.
//!
//! Mode: awa's partitioned queue (`PartitionedQueue`, ADR-031), one physical queue per
//! benchmark partition, each with `max_workers = 1`. awa claims FIFO per `(queue, priority)`
//! (one enqueue shard, the default), and one worker per queue runs the claimed jobs one after
//! another, so handlers see each partition in producer order, as in the outbox. More workers
//! per queue would run jobs of one partition concurrently and give up that order. Handlers
//! are at-least-once (the completion is a separate write after the handler), so the peer
//! runs the `leased` drain cells, where the harness allows redeliveries too.

#[path = "../../src/check.rs"]
#[allow(dead_code)]
mod check;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use awa::{
    Client, InsertOpts, InsertParams, JobArgs, JobContext, JobError, JobResult, PartitionedQueue,
    QueueConfig,
};
use clap::Parser;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use check::{Checker, Payload, now_us, payload, percentile, sorted_ms};

/// Logical queue; partition `p` is `PartitionedQueue::physical_queues()[p]`.
const QUEUE: &str = "bench";
/// A cell fails when nothing was handled for this long.
const STALL: Duration = Duration::from_secs(30);
const GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    backend: String,
    #[arg(long)]
    url: String,
    #[arg(long)]
    cell: String,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "scenario", rename_all = "snake_case")]
enum Cell {
    S1 {
        per_tx: usize,
        producers: usize,
        total: usize,
    },
    S2 {
        handler: String,
        partitions: u32,
        messages: u64,
    },
    S3 {
        cross_process: bool,
        messages: u64,
        interval_us: u64,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Default, Serialize)]
struct Outcome {
    ok: bool,
    error: Option<String>,
    metrics: BTreeMap<String, f64>,
}

fn checked(check: Result<(), String>, metrics: BTreeMap<String, f64>) -> Outcome {
    Outcome {
        ok: check.is_ok(),
        error: check.err(),
        metrics,
    }
}

/// The benchmark payload as an awa job's args (stored as `jsonb`: the same fields).
#[derive(Debug, Serialize, Deserialize)]
#[serde(transparent)]
struct Msg(Payload);

impl JobArgs for Msg {
    fn kind() -> &'static str {
        "bench_msg"
    }
}

fn job(pq: &PartitionedQueue, p: u32, body: &[u8]) -> anyhow::Result<InsertParams> {
    Ok(InsertParams {
        kind: Msg::kind().to_owned(),
        args: serde_json::from_slice(body)?,
        opts: InsertOpts {
            queue: pq.physical_queues()[p as usize].clone(),
            ..Default::default()
        },
    })
}

async fn connect(url: &str, max: u32) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(max)
        .connect(url)
        .await?)
}

/// Migrations, then one start and shutdown of a runtime so that a fresh database is switched
/// to awa's default queue-storage engine before anything is enqueued (not timed).
async fn prepare(pool: &PgPool, pq: &PartitionedQueue) -> anyhow::Result<()> {
    awa::migrations::run(pool).await?;
    let client = Client::builder(pool.clone())
        .partitioned_queue(pq, ordered())
        .register::<Msg, _, _>(|_m, _ctx| async { Ok(JobResult::Completed) })
        .build()?;
    client.start().await?;
    client.shutdown(GRACE).await;
    Ok(())
}

/// One worker per physical queue: jobs of a partition run one at a time, in claim (FIFO)
/// order. Everything else is awa's default (LISTEN/NOTIFY wake-up, 200 ms poll fallback,
/// claim batch 512).
///
/// `AWA_PEER_MAX_WORKERS` overrides the worker count per queue (diagnostics only: above 1,
/// jobs of one partition run concurrently, so the peer checks exactly-once delivery but not
/// order; see [`unordered`]).
fn ordered() -> QueueConfig {
    QueueConfig {
        max_workers: max_workers(),
        ..Default::default()
    }
}

fn max_workers() -> u32 {
    std::env::var("AWA_PEER_MAX_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// The diagnostic mode with more than one worker per queue: the checker then gets one
/// "partition" per message, so it checks that each is handled once and none is lost, not
/// their order.
fn unordered() -> bool {
    max_workers() > 1
}

fn new_checker(partitions: u32, n: u64) -> Arc<Checker> {
    Arc::new(Checker::new(if unordered() {
        n as u32
    } else {
        partitions
    }))
}

/// Enqueues `jobs` in one transaction: `insert_many` (one `INSERT` statement) for one job,
/// awa's COPY path (`insert_many_copy`, its recommended bulk insert) for more
/// (`AWA_PEER_MULTI_ROW_INSERT` set: one multi-row `INSERT` instead; diagnostics).
/// awa's faster `QueueStorage::enqueue_params_copy` takes a pool, not the caller's
/// transaction, so it is not an S1 candidate.
async fn enqueue_tx(pool: &PgPool, mut jobs: Vec<InsertParams>) -> anyhow::Result<()> {
    // awa takes a transaction-scoped advisory lock per queue as it inserts each row; batches
    // that span queues in different orders deadlock against each other (seen at 4 producers),
    // so the batch is sorted by queue, a stable sort that keeps each partition's order.
    jobs.sort_by(|a, b| a.opts.queue.cmp(&b.opts.queue));
    let mut tx = pool.begin().await?;
    if jobs.len() == 1 || std::env::var_os("AWA_PEER_MULTI_ROW_INSERT").is_some() {
        awa::insert_many(&mut *tx, &jobs).await?;
    } else {
        awa::insert_many_copy(&mut tx, &jobs).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn stored_jobs(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT COUNT(*)::bigint FROM awa.jobs")
        .fetch_one(pool)
        .await?)
}

async fn s1(args: &Args, per_tx: usize, producers: usize, total: usize) -> anyhow::Result<Outcome> {
    let pool = connect(&args.url, 16).await?;
    let pq = Arc::new(PartitionedQueue::new(QUEUE, 8)?);
    prepare(&pool, &pq).await?;
    let per_producer = total / producers / per_tx;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..producers {
        let (pool, pq) = (pool.clone(), pq.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_producer);
            for t in 0..per_producer {
                let jobs = (0..per_tx)
                    .map(|j| {
                        let i = ((w * per_producer + t) * per_tx + j) as u64;
                        let p = (i % 8) as u32;
                        job(&pq, p, &payload(p, i / 8, i, now_us()))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let start = Instant::now();
                enqueue_tx(&pool, jobs).await?;
                lat.push(start.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let wall = t0.elapsed();
    let written = per_producer * per_tx * producers;
    let stored = stored_jobs(&pool).await?;
    pool.close().await;
    let ms = sorted_ms(&lat);
    let metrics = BTreeMap::from([
        ("msgs_per_s".into(), written as f64 / wall.as_secs_f64()),
        ("p50_ms".into(), percentile(&ms, 50.0)),
        ("p99_ms".into(), percentile(&ms, 99.0)),
    ]);
    let check = if stored == written as i64 {
        Ok(())
    } else {
        Err(format!("{stored} awa jobs stored, {written} enqueued"))
    };
    Ok(checked(check, metrics))
}

/// A runtime over `pq` whose handler feeds `checker` (and records the first handler start of
/// every global index into `start_us`, if given).
fn runtime(
    pool: &PgPool,
    pq: &PartitionedQueue,
    checker: Arc<Checker>,
    start_us: Option<Arc<Vec<AtomicI64>>>,
) -> anyhow::Result<Client> {
    let index: Arc<HashMap<String, u32>> = Arc::new(
        pq.physical_queues()
            .iter()
            .enumerate()
            .map(|(p, q)| (q.clone(), p as u32))
            .collect(),
    );
    Ok(Client::builder(pool.clone())
        .partitioned_queue(pq, ordered())
        .register::<Msg, _, _>(move |Msg(body), ctx: &JobContext| {
            let now = now_us();
            if let Some(slot) = start_us.as_ref().and_then(|s| s.get(body.i as usize)) {
                // The first delivery counts.
                let _ = slot.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
            }
            let p = index.get(&ctx.job.queue).copied().unwrap_or(u32::MAX);
            if unordered() {
                let one = Payload {
                    p: body.i as u32,
                    k: 0,
                    i: body.i,
                    t: body.t,
                    pad: String::new(),
                };
                checker.see(body.i as u32, None, &one);
            } else {
                checker.see(p, Some(ctx.job.id), &body);
            }
            async { Ok::<_, JobError>(JobResult::Completed) }
        })
        .build()?)
}

async fn wait_handled(checker: &Checker, n: u64) -> Result<(), String> {
    let (mut last, mut since) = (0, Instant::now());
    loop {
        let handled = checker.handled();
        if handled >= n || checker.broken() {
            return Ok(());
        }
        if handled != last {
            (last, since) = (handled, Instant::now());
        } else if since.elapsed() > STALL {
            return Err(format!(
                "stalled: no progress for {STALL:?}, handled {handled} of {n}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn s2(args: &Args, handler: &str, partitions: u32, n: u64) -> anyhow::Result<Outcome> {
    if handler != "leased" {
        anyhow::bail!("awa has no handler inside the transaction that completes the job");
    }
    let pool = connect(&args.url, 32).await?;
    let pq = PartitionedQueue::new(QUEUE, partitions as usize)?;
    prepare(&pool, &pq).await?;
    let mut i = 0u64;
    while i < n {
        let end = (i + 1_000).min(n);
        let jobs = (i..end)
            .map(|i| {
                let p = (i % u64::from(partitions)) as u32;
                job(&pq, p, &payload(p, i / u64::from(partitions), i, now_us()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        enqueue_tx(&pool, jobs).await?;
        i = end;
    }
    let checker = new_checker(partitions, n);
    let client = runtime(&pool, &pq, checker.clone(), None)?;
    let t0 = Instant::now();
    client.start().await?;
    let waited = wait_handled(&checker, n).await;
    let drained = t0.elapsed();
    client.shutdown(GRACE).await;
    pool.close().await;
    let metrics = BTreeMap::from([
        (
            "msgs_per_s".into(),
            checker.handled() as f64 / drained.as_secs_f64(),
        ),
        ("secs".into(), drained.as_secs_f64()),
        ("duplicates".into(), checker.duplicates() as f64),
        ("max_workers".into(), f64::from(max_workers())),
    ]);
    let check = waited.and_then(|()| checker.verdict(n, true));
    Ok(checked(check, metrics))
}

async fn s3(args: &Args, n: u64, interval: Duration) -> anyhow::Result<Outcome> {
    let pool = connect(&args.url, 32).await?;
    let pq = PartitionedQueue::new(QUEUE, 8)?;
    prepare(&pool, &pq).await?;
    let checker = new_checker(8, n);
    let start_us: Arc<Vec<AtomicI64>> = Arc::new((0..n).map(|_| AtomicI64::new(0)).collect());
    let client = runtime(&pool, &pq, checker.clone(), Some(start_us.clone()))?;
    client.start().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut commit_us = Vec::with_capacity(n as usize);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..n {
        tick.tick().await;
        let p = (i % 8) as u32;
        let mut tx = pool.begin().await?;
        let opts = InsertOpts {
            queue: pq.physical_queues()[p as usize].clone(),
            ..Default::default()
        };
        let body: Payload = serde_json::from_slice(&payload(p, i / 8, i, now_us()))?;
        awa::insert_with(&mut *tx, &Msg(body), opts).await?;
        tx.commit().await?;
        commit_us.push(now_us());
    }
    let waited = wait_handled(&checker, n).await;
    client.shutdown(GRACE).await;
    pool.close().await;
    let metrics = if waited.is_ok() {
        let mut ms: Vec<f64> = commit_us
            .iter()
            .zip(start_us.iter())
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
    } else {
        BTreeMap::new()
    };
    // Same verdict as ours in S3: no duplicates expected in a quiet run.
    let check = waited.and_then(|()| checker.verdict(n, false));
    Ok(checked(check, metrics))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = Args::parse();
    let result = if args.backend != "postgres" {
        Err(anyhow::anyhow!("awa runs on PostgreSQL only"))
    } else {
        match serde_json::from_str::<Cell>(&args.cell) {
            Ok(Cell::S1 {
                per_tx,
                producers,
                total,
            }) => s1(&args, per_tx, producers, total).await,
            Ok(Cell::S2 {
                handler,
                partitions,
                messages,
            }) => s2(&args, &handler, partitions, messages).await,
            Ok(Cell::S3 {
                cross_process: false,
                messages,
                interval_us,
            }) => s3(&args, messages, Duration::from_micros(interval_us)).await,
            Ok(Cell::S3 { .. }) => Err(anyhow::anyhow!(
                "the cross-process S3 variant is not implemented by the peer"
            )),
            Ok(Cell::Other) => Err(anyhow::anyhow!("scenario not implemented by the peer")),
            Err(e) => Err(anyhow::anyhow!("bad --cell: {e}")),
        }
    };
    let out = result.unwrap_or_else(|e| Outcome {
        ok: false,
        error: Some(format!("{e:#}")),
        metrics: BTreeMap::new(),
    });
    println!("{}", serde_json::to_string(&out).unwrap_or_default());
}
