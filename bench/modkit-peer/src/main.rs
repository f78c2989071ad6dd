//! cf-modkit-db 0.7.2's outbox driven through outbox-bench's scenario definitions (S1 and S2).
//!
//! Run by `outbox-bench --peer modkit` as a child process, once per cell and repetition, on a
//! fresh database the harness created: `--backend B --url U --cell JSON`. Prints one JSON line
//! in the harness's `Outcome` shape: `{"ok":…,"error":…,"metrics":{…}}`.

#[path = "../../src/check.rs"]
#[allow(dead_code)]
mod check;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use modkit_db::outbox::{
    EnqueueMessage, HandlerResult, LeasedMessageHandler, MessageResult, Outbox, OutboxMessage,
    OutboxProfile, Partitions, TransactionalMessageHandler,
};
use modkit_db::{ConnectOpts, Db, connect_db};
use sea_orm::{ConnectionTrait, Database, Statement};
use serde::{Deserialize, Serialize};

use check::{Checker, Payload, now_us, payload, percentile, sorted_ms};

const QUEUE: &str = "bench";
const TYPE: &str = "application/json";

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
        profile: String,
        partitions: u32,
        messages: u64,
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

async fn connect(args: &Args) -> anyhow::Result<Db> {
    // SQLite with more than one connection hits `database is locked` in this design (DESIGN.md
    // §4 defect 11), so it gets one connection, as in the reference figures.
    let max = if args.backend == "sqlite" { 1 } else { 16 };
    let opts = ConnectOpts {
        max_conns: Some(max),
        ..Default::default()
    };
    // Durable like the other systems: the reference defaults SQLite to synchronous=NORMAL.
    let url = if args.backend == "sqlite" {
        format!("{}&synchronous=FULL", args.url)
    } else {
        args.url.clone()
    };
    let db = connect_db(&url, opts).await?;
    modkit_db::migration_runner::run_migrations_for_testing(
        &db,
        modkit_db::outbox::outbox_migrations(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("migrations: {e:?}"))?;
    Ok(db)
}

/// Registers the queue without starting workers (producer side).
async fn producer(db: &Db, partitions: u32) -> anyhow::Result<Arc<Outbox>> {
    let handle = Outbox::builder(db.clone())
        .queue(QUEUE, Partitions::of(partitions as u16))
        .transactional(Noop)
        .start()
        .await?;
    let ob = handle.outbox().clone();
    handle.stop().await;
    Ok(ob)
}

struct Noop;

#[async_trait::async_trait]
impl TransactionalMessageHandler for Noop {
    async fn handle(&self, _txn: &dyn ConnectionTrait, _msg: &OutboxMessage) -> HandlerResult {
        HandlerResult::Retry {
            reason: "producer-only".into(),
        }
    }
}

async fn enqueue_tx(ob: &Arc<Outbox>, db: &Db, msgs: Vec<(u32, Vec<u8>)>) -> anyhow::Result<()> {
    let ob2 = ob.clone();
    let (_, r) = ob
        .transaction(db.clone(), move |tx| {
            Box::pin(async move {
                if msgs.len() == 1 {
                    for (p, body) in msgs {
                        ob2.enqueue(tx, QUEUE, p, body, TYPE).await?;
                    }
                } else {
                    let items: Vec<EnqueueMessage<'_>> = msgs
                        .into_iter()
                        .map(|(partition, payload)| EnqueueMessage {
                            partition,
                            payload,
                            payload_type: TYPE,
                        })
                        .collect();
                    ob2.enqueue_batch(tx, QUEUE, &items).await?;
                }
                Ok(())
            })
        })
        .await;
    r
}

async fn count(url: &str, sql: &str) -> anyhow::Result<i64> {
    let c = Database::connect(url).await?;
    let row = c
        .query_one(Statement::from_string(
            c.get_database_backend(),
            sql.to_owned(),
        ))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no row"))?;
    let n: i64 = row.try_get_by_index(0)?;
    c.close().await.ok();
    Ok(n)
}

async fn s1(args: &Args, per_tx: usize, producers: usize, total: usize) -> anyhow::Result<Outcome> {
    let db = connect(args).await?;
    let ob = producer(&db, 8).await?;
    let per_producer = total / producers / per_tx;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..producers {
        let (ob, db) = (ob.clone(), db.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_producer);
            for t in 0..per_producer {
                let msgs: Vec<(u32, Vec<u8>)> = (0..per_tx)
                    .map(|j| {
                        let i = ((w * per_producer + t) * per_tx + j) as u64;
                        let p = (i % 8) as u32;
                        (p, payload(p, i / 8, i, now_us()))
                    })
                    .collect();
                let start = Instant::now();
                enqueue_tx(&ob, &db, msgs).await?;
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
    let stored = count(&args.url, "SELECT COUNT(*) FROM modkit_outbox_incoming").await?;
    let ms = sorted_ms(&lat);
    let metrics = BTreeMap::from([
        ("msgs_per_s".into(), written as f64 / wall.as_secs_f64()),
        ("p50_ms".into(), percentile(&ms, 50.0)),
        ("p99_ms".into(), percentile(&ms, 99.0)),
    ]);
    let check = if stored == written as i64 {
        Ok(())
    } else {
        Err(format!("{stored} incoming rows, {written} enqueued"))
    };
    Ok(checked(check, metrics))
}

struct TxHandler(Arc<Checker>);

#[async_trait::async_trait]
impl TransactionalMessageHandler for TxHandler {
    async fn handle(&self, _txn: &dyn ConnectionTrait, msg: &OutboxMessage) -> HandlerResult {
        see(&self.0, msg);
        HandlerResult::Success
    }
}

struct LeasedHandler(Arc<Checker>);

#[async_trait::async_trait]
impl LeasedMessageHandler for LeasedHandler {
    async fn handle(&self, msg: &OutboxMessage) -> MessageResult {
        see(&self.0, msg);
        MessageResult::Ok
    }
}

/// The peer's `partition_id` is a table key, not the partition index: order is checked per
/// partition index carried in the payload.
fn see(c: &Checker, msg: &OutboxMessage) {
    if let Ok(body) = serde_json::from_slice::<Payload>(&msg.payload) {
        c.see(body.p, Some(msg.seq), &body);
    } else {
        c.see(
            u32::MAX,
            None,
            &Payload {
                p: 0,
                k: 0,
                i: 0,
                t: 0,
                pad: String::new(),
            },
        );
    }
}

async fn s2(
    args: &Args,
    handler: &str,
    profile: &str,
    partitions: u32,
    n: u64,
) -> anyhow::Result<Outcome> {
    let db = connect(args).await?;
    let ob = producer(&db, partitions).await?;
    let mut i = 0u64;
    while i < n {
        let end = (i + 1_000).min(n);
        let msgs = (i..end)
            .map(|i| {
                let p = (i % u64::from(partitions)) as u32;
                (p, payload(p, i / u64::from(partitions), i, now_us()))
            })
            .collect();
        enqueue_tx(&ob, &db, msgs).await?;
        i = end;
    }
    let checker = Arc::new(Checker::new(partitions));
    let profile = match profile {
        "high_throughput" => OutboxProfile::high_throughput(),
        _ => OutboxProfile::default_profile(),
    };
    let t0 = Instant::now();
    let b = Outbox::builder(db.clone())
        .profile(profile)
        .queue(QUEUE, Partitions::of(partitions as u16));
    let handle = if handler == "leased" {
        b.leased(LeasedHandler(checker.clone())).start().await?
    } else {
        b.transactional(TxHandler(checker.clone())).start().await?
    };
    let stall = Duration::from_secs(15);
    let (mut last, mut since) = (0, Instant::now());
    let waited = loop {
        let handled = checker.handled();
        if handled >= n || checker.broken() {
            break Ok(());
        }
        if handled != last {
            (last, since) = (handled, Instant::now());
        } else if since.elapsed() > stall {
            break Err(format!(
                "stalled: no progress for {stall:?}, handled {handled} of {n}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let drained = t0.elapsed();
    handle.stop().await;
    let metrics = BTreeMap::from([
        (
            "msgs_per_s".into(),
            checker.handled() as f64 / drained.as_secs_f64(),
        ),
        ("secs".into(), drained.as_secs_f64()),
        ("duplicates".into(), checker.duplicates() as f64),
    ]);
    let check = waited.and_then(|()| checker.verdict(n, handler == "leased"));
    Ok(checked(check, metrics))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = Args::parse();
    let result = match serde_json::from_str::<Cell>(&args.cell) {
        Ok(Cell::S1 {
            per_tx,
            producers,
            total,
        }) => s1(&args, per_tx, producers, total).await,
        Ok(Cell::S2 {
            handler,
            profile,
            partitions,
            messages,
        }) => s2(&args, &handler, &profile, partitions, messages).await,
        Ok(Cell::Other) => Err(anyhow::anyhow!("scenario not implemented by the peer")),
        Err(e) => Err(anyhow::anyhow!("bad --cell: {e}")),
    };
    let out = result.unwrap_or_else(|e| Outcome {
        ok: false,
        error: Some(format!("{e:#}")),
        metrics: BTreeMap::new(),
    });
    println!("{}", serde_json::to_string(&out).unwrap_or_default());
}
