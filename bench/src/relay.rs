//! S5, relay to a broker (`outbox-bench relay`): relay throughput into NATS JetStream and
//! RabbitMQ beside a raw publish loop of the same client (same payloads, same batches, same
//! pipelined acks), and commit-to-broker latency, on each backend.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use outbox::relay::nats::{JetStream, async_nats};
use outbox::relay::rabbitmq::{RabbitMq, lapin};
use outbox::relay::{Broker, Outgoing, RelaySpec};
use outbox::sea_orm::TransactionTrait;
use outbox::{NewMessage, Outbox, Overrides, Profile, QueueSpec};

use crate::Res;
use crate::check::{payload, percentile, sorted_ms};
use crate::db::{Backend, FreshDb, Servers};

/// Which broker a cell publishes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum BrokerKind {
    /// NATS JetStream.
    Nats,
    /// RabbitMQ with publisher confirms.
    Rabbitmq,
}

/// Options of the relay scenario.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) backends: Vec<Backend>,
    pub(crate) brokers: Vec<BrokerKind>,
    pub(crate) messages: u64,
    pub(crate) latency_messages: u64,
    pub(crate) nats_url: String,
    pub(crate) amqp_url: String,
    pub(crate) servers: Servers,
}

const PARTITIONS: u32 = 8;
const BATCH: u32 = 500;
const CONCURRENCY: u32 = 2;

/// One destination, fresh per cell, and how to count and watch what reached it.
enum Dest {
    Nats {
        client: async_nats::Client,
        stream: String,
        subject: String,
    },
    Rabbit {
        channel: lapin::Channel,
        _conn: lapin::Connection,
        queue: String,
    },
}

impl Dest {
    async fn new(kind: BrokerKind, o: &Options) -> Res<Dest> {
        let tag = format!("{:012x}", rand::random::<u64>() >> 16);
        Ok(match kind {
            BrokerKind::Nats => {
                let client = async_nats::connect(&o.nats_url).await?;
                let stream = format!("OUTBOX_BENCH_{tag}");
                let subject = format!("outboxbench{tag}");
                async_nats::jetstream::new(client.clone())
                    .create_stream(async_nats::jetstream::stream::Config {
                        name: stream.clone(),
                        subjects: vec![format!("{subject}.>")],
                        ..Default::default()
                    })
                    .await?;
                Dest::Nats {
                    client,
                    stream,
                    subject,
                }
            }
            BrokerKind::Rabbitmq => {
                let conn =
                    lapin::Connection::connect(&o.amqp_url, lapin::ConnectionProperties::default())
                        .await?;
                let channel = conn.create_channel().await?;
                let queue = format!("outbox_bench_{tag}");
                channel
                    .queue_declare(
                        queue.as_str().into(),
                        lapin::options::QueueDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        lapin::types::FieldTable::default(),
                    )
                    .await?;
                Dest::Rabbit {
                    channel,
                    _conn: conn,
                    queue,
                }
            }
        })
    }

    /// A broker client publishing here, and the template of the destination.
    async fn broker(&self, o: &Options) -> Res<(Arc<dyn BrokerObj>, String)> {
        Ok(match self {
            Dest::Nats {
                stream, subject, ..
            } => {
                let client = async_nats::connect(&o.nats_url).await?;
                (
                    Arc::new(JetStream::new(client).check_stream(stream)),
                    format!("{subject}.{{partition}}"),
                )
            }
            Dest::Rabbit { queue, .. } => (
                Arc::new(RabbitMq::new(o.amqp_url.clone(), "")),
                queue.clone(),
            ),
        })
    }

    async fn count(&self) -> Res<u64> {
        Ok(match self {
            Dest::Nats { client, stream, .. } => {
                let js = async_nats::jetstream::new(client.clone());
                js.get_stream(stream).await?.info().await?.state.messages
            }
            Dest::Rabbit { channel, queue, .. } => u64::from(
                channel
                    .queue_declare(
                        queue.as_str().into(),
                        lapin::options::QueueDeclareOptions {
                            durable: true,
                            passive: true,
                            ..Default::default()
                        },
                        lapin::types::FieldTable::default(),
                    )
                    .await?
                    .message_count(),
            ),
        })
    }

    async fn wait_for(&self, n: u64, within: Duration) -> Res<()> {
        let deadline = Instant::now() + within;
        loop {
            let c = self.count().await?;
            if c >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{c} of {n} messages reached the broker").into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn clean(self) {
        match self {
            Dest::Nats { client, stream, .. } => {
                let _ = async_nats::jetstream::new(client)
                    .delete_stream(&stream)
                    .await;
            }
            Dest::Rabbit { channel, queue, .. } => {
                let _ = channel
                    .queue_delete(queue.as_str().into(), Default::default())
                    .await;
            }
        }
    }
}

/// `Broker`, usable both as `Arc<dyn …>` and inside a relay.
trait BrokerObj: Broker {}
impl<B: Broker> BrokerObj for B {}

/// The shared broker of a cell handed to the relay.
struct Shared(Arc<dyn BrokerObj>);

impl Broker for Shared {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    fn prepare(&self) -> outbox::relay::BoxFuture<'_, Result<(), outbox::BoxDynError>> {
        self.0.prepare()
    }
    fn publish<'a>(
        &'a self,
        batch: &'a [Outgoing],
    ) -> outbox::relay::BoxFuture<'a, Result<(), outbox::relay::PublishError>> {
        self.0.publish(batch)
    }
}

fn bench_payload(i: u64) -> Vec<u8> {
    payload(
        (i % u64::from(PARTITIONS)) as u32,
        i / u64::from(PARTITIONS),
        i,
        0,
    )
}

/// Relay throughput: pre-fill and sequence, then time from `start()` until the broker holds
/// every message.
async fn relay_rate(o: &Options, db: &FreshDb, kind: BrokerKind) -> Res<f64> {
    let dest = Dest::new(kind, o).await?;
    let pool = db.pool(8, false).await?;
    let outbox = Outbox::builder(pool.clone())
        .queue(QueueSpec::new("bench", PARTITIONS))
        .connect()
        .await?;
    for chunk in 0..o.messages.div_ceil(1_000) {
        let txn = pool.begin().await?;
        let msgs: Vec<NewMessage> = (chunk * 1_000..((chunk + 1) * 1_000).min(o.messages))
            .map(|i| {
                NewMessage::new(
                    "bench",
                    (i % u64::from(PARTITIONS)) as u32,
                    bench_payload(i),
                )
            })
            .collect();
        outbox.enqueue_batch(&txn, &msgs).await?;
        txn.commit().await?;
    }
    // Number the backlog first (a runtime without handlers runs only the sequencer), so the
    // cell times the relay itself; S2 already measures the engine's drain with sequencing.
    let sequencer = Outbox::builder(pool.clone())
        .profile(Profile::HighThroughput)
        .queue(QueueSpec::new("bench", PARTITIONS))
        .start()
        .await?;
    while sequencer.outbox().depth("bench").await?.unsequenced > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sequencer.shutdown(Duration::from_secs(10)).await?;
    let (broker, template) = dest.broker(o).await?;
    let started = Instant::now();
    let running = Outbox::builder(pool)
        .profile(Profile::HighThroughput)
        .queue(QueueSpec::new("bench", PARTITIONS))
        .relay(
            RelaySpec::new("bench", Shared(broker), template)
                .overrides(Overrides::NONE.batch_size(BATCH).concurrency(CONCURRENCY)),
        )
        .start()
        .await?;
    dest.wait_for(o.messages, Duration::from_secs(600)).await?;
    let secs = started.elapsed().as_secs_f64();
    running.shutdown(Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held = dest.count().await?;
    dest.clean().await;
    if held != o.messages {
        return Err(format!("the broker holds {held} messages, {} committed", o.messages).into());
    }
    Ok(o.messages as f64 / secs)
}

/// The raw publish loop: the same client, payloads and batches, `CONCURRENCY` tasks each
/// publishing whole batches with pipelined acks.
async fn raw_rate(o: &Options, kind: BrokerKind) -> Res<f64> {
    let dest = Dest::new(kind, o).await?;
    let (broker, template) = dest.broker(o).await?;
    broker.prepare().await?;
    let template = outbox::relay::Template::parse(&template)?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..u64::from(CONCURRENCY) {
        let broker = broker.clone();
        let template = template.clone();
        let messages = o.messages;
        tasks.push(tokio::spawn(async move {
            let mine: Vec<u64> = (0..messages)
                .filter(|i| i % u64::from(CONCURRENCY) == t)
                .collect();
            for chunk in mine.chunks(BATCH as usize) {
                let batch: Vec<Outgoing> = chunk
                    .iter()
                    .map(|&i| {
                        let p = (i % u64::from(PARTITIONS)) as u32;
                        outgoing(
                            format!("raw/bench/{p}/{i}"),
                            template.render("bench", p, ""),
                            p,
                            i as i64,
                            bench_payload(i),
                        )
                    })
                    .collect();
                broker.publish(&batch).await.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    dest.wait_for(o.messages, Duration::from_secs(60)).await?;
    let secs = started.elapsed().as_secs_f64();
    dest.clean().await;
    Ok(o.messages as f64 / secs)
}

fn outgoing(
    id: String,
    destination: String,
    partition: u32,
    seq: i64,
    payload: Vec<u8>,
) -> Outgoing {
    let mut o = Outgoing::new(id, destination, "bench", payload);
    o.partition = partition;
    o.seq = seq;
    o
}

/// Commit-to-broker latency: a producer commits one message every 2 ms; a subscriber on the
/// broker stamps each arrival. Returns (p50, p99) in ms.
async fn latency(o: &Options, db: &FreshDb, kind: BrokerKind) -> Res<(f64, f64)> {
    let dest = Dest::new(kind, o).await?;
    let n = o.latency_messages;
    let arrivals: Arc<Mutex<Vec<Option<Instant>>>> =
        Arc::new(Mutex::new(vec![None; usize::try_from(n)?]));
    let seen = arrivals.clone();
    let record = move |data: &[u8]| {
        let now = Instant::now();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data)
            && let Some(i) = v.get("i").and_then(serde_json::Value::as_u64)
            && let Ok(mut a) = seen.lock()
            && let Some(slot) = a.get_mut(i as usize)
        {
            slot.get_or_insert(now);
        }
    };
    let watcher = match &dest {
        Dest::Nats {
            client, subject, ..
        } => {
            let mut sub = client.subscribe(format!("{subject}.>")).await?;
            tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    record(&m.payload);
                }
            })
        }
        Dest::Rabbit { channel, queue, .. } => {
            let mut consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    "bench".into(),
                    lapin::options::BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await?;
            tokio::spawn(async move {
                while let Some(Ok(d)) = consumer.next().await {
                    record(&d.data);
                }
            })
        }
    };
    let pool = db.pool(8, false).await?;
    let (broker, template) = dest.broker(o).await?;
    let running = Outbox::builder(pool.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("bench", PARTITIONS))
        .relay(RelaySpec::new("bench", Shared(broker), template))
        .start()
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut committed = Vec::with_capacity(usize::try_from(n)?);
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    for i in 0..n {
        tick.tick().await;
        let txn = pool.begin().await?;
        running
            .outbox()
            .enqueue(
                &txn,
                NewMessage::new(
                    "bench",
                    (i % u64::from(PARTITIONS)) as u32,
                    bench_payload(i),
                ),
            )
            .await?;
        txn.commit().await?;
        committed.push(Instant::now());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = arrivals
            .lock()
            .map(|a| a.iter().all(Option::is_some))
            .unwrap_or(false);
        if done {
            break;
        }
        if Instant::now() > deadline {
            return Err("not every message reached the subscriber within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.shutdown(Duration::from_secs(10)).await?;
    watcher.abort();
    let lat: Vec<Duration> = arrivals
        .lock()
        .map_err(|_| "poisoned")?
        .iter()
        .zip(&committed)
        .filter_map(|(a, c)| a.map(|a| a.saturating_duration_since(*c)))
        .collect();
    if lat.len() as u64 != n {
        return Err("latency: messages missing".into());
    }
    dest.clean().await;
    let ms = sorted_ms(&lat);
    Ok((percentile(&ms, 50.0), percentile(&ms, 99.0)))
}

/// Runs every cell and prints one Markdown table; `Err` if a cell failed its check.
pub(crate) async fn run(o: &Options) -> Res<()> {
    println!(
        "### S5 relay to a broker ({} messages, {PARTITIONS} partitions, batch {BATCH}, concurrency {CONCURRENCY}; latency: {} messages, one per 2 ms, LowLatency)\n",
        o.messages, o.latency_messages
    );
    println!(
        "| backend | broker | relay msgs/s | raw publish msgs/s | relay / raw | commit→broker p50 ms | p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut failed = Vec::new();
    for &backend in &o.backends {
        for &kind in &o.brokers {
            let name = match kind {
                BrokerKind::Nats => "NATS JetStream",
                BrokerKind::Rabbitmq => "RabbitMQ",
            };
            let cell = async {
                let db = FreshDb::create(backend, &o.servers).await?;
                let relay = relay_rate(o, &db, kind).await;
                db.drop_db().await;
                let relay = relay?;
                let raw = raw_rate(o, kind).await?;
                let db = FreshDb::create(backend, &o.servers).await?;
                let lat = latency(o, &db, kind).await;
                db.drop_db().await;
                let (p50, p99) = lat?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((relay, raw, p50, p99))
            };
            match cell.await {
                Ok((relay, raw, p50, p99)) => println!(
                    "| {backend} | {name} | {relay:.0} | {raw:.0} | {:.2}x | {p50:.1} | {p99:.1} |",
                    relay / raw
                ),
                Err(e) => {
                    println!("| {backend} | {name} | FAILED: {e} | | | | |");
                    failed.push(format!("{backend}/{name}: {e}"));
                }
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; ").into())
    }
}
