//! The relay into NATS JetStream (issue 12), against a real `nats-server` with JetStream: the
//! shared one (`OUTBOX_TEST_NATS_URL`) or a private one that a test kills and restarts.
//!
//! Every check reads what the stream holds: exactly the committed messages, each once (no
//! duplicate in the stream), in order per key.

#![cfg_attr(outbox_no_nats, allow(dead_code, unused_imports))]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use outbox::relay::RelaySpec;
use outbox::relay::nats::{JetStream, async_nats};
use outbox::sea_orm::TransactionTrait;
use outbox::{DeadLetterFilter, NewMessage, Outbox, Overrides, Profile, QueueSpec, StartError};
use outbox_tests::brokers::{self, NatsServer, check_delivery, stream_len, stream_messages};
use outbox_tests::{TestDb, eventually};

const PARTITIONS: u32 = 4;
const KEYS: u32 = 12;

fn knobs() -> Overrides {
    Overrides::NONE
        .batch_size(32)
        .lease(Duration::from_secs(2))
        .lease_headroom(Duration::from_millis(400))
        .max_attempts(1_000)
}

/// The body of message `n` of `key`, and its partition: one key, one partition.
fn message(key: u32, n: u64) -> (u32, String) {
    (
        outbox::partition_for_key(&key, PARTITIONS),
        format!("k{key}:{n}"),
    )
}

/// Enqueues `count` messages (round-robin over the keys) starting at `from`, in transactions
/// of `per_txn`; returns the committed bodies.
async fn enqueue(outbox: &Outbox, from: u64, count: u64, per_txn: u64) -> Vec<String> {
    let mut committed = Vec::new();
    let mut n = from;
    while n < from + count {
        let txn = outbox.db().begin().await.expect("begin");
        let mut batch = Vec::new();
        for _ in 0..per_txn.min(from + count - n) {
            let (p, body) = message((n % u64::from(KEYS)) as u32, n);
            // Headers travel as NATS headers.
            batch.push(NewMessage::new("relay", p, body.clone()).header("x-body", body.clone()));
            committed.push(body);
            n += 1;
        }
        outbox.enqueue_batch(&txn, &batch).await.expect("enqueue");
        txn.commit().await.expect("commit");
    }
    committed
}

/// A stream named after the test, created fresh, with subjects `<prefix>.>`.
async fn fresh_stream(js: &async_nats::jetstream::Context) -> (String, String) {
    let name = brokers::unique("OUTBOXT");
    let prefix = brokers::unique("outboxt");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("{prefix}.>")],
        ..Default::default()
    })
    .await
    .expect("create stream");
    (name, prefix)
}

/// Waits until the stream holds `n` messages, then a little longer to catch extras.
async fn wait_for(js: &async_nats::jetstream::Context, stream: &str, n: usize, within: Duration) {
    let what = format!("{n} messages in stream {stream}");
    eventually(within, &what, || async {
        stream_len(js, stream).await >= n as u64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
}

fn bodies(stored: &[brokers::Stored]) -> Vec<String> {
    stored.iter().map(|s| s.body.clone()).collect()
}

async fn relays_exactly_what_was_committed(db: Arc<TestDb>) {
    let client = brokers::nats(&brokers::nats_url()).await;
    let js = async_nats::jetstream::new(client.clone());
    let (stream, prefix) = fresh_stream(&js).await;
    let local = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = local.clone();
    let running = Outbox::builder(db.pool(10).await)
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("relay", PARTITIONS))
        .relay(
            RelaySpec::new(
                "relay",
                JetStream::new(client).check_stream(&stream),
                format!("{prefix}.{{queue}}.{{partition}}.{{key}}"),
            )
            .key(|m| {
                std::str::from_utf8(m.payload())
                    .ok()
                    .and_then(|b| b.split_once(':'))
                    .map(|(k, _)| k.to_owned())
            })
            .overrides(knobs()),
        )
        // A local handler on the same queue keeps its own cursor.
        .handler(outbox::HandlerSpec::leased(
            "relay",
            "local",
            move |_, _| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Box::pin(async { Ok(()) })
            },
        ))
        .start()
        .await
        .expect("start");
    let mut committed = enqueue(running.outbox(), 0, 200, 7).await;
    // A rolled-back transaction publishes nothing.
    {
        let txn = running.outbox().db().begin().await.expect("begin");
        for n in 1_000..1_010 {
            let (p, body) = message(0, n);
            running
                .outbox()
                .enqueue(&txn, NewMessage::new("relay", p, body))
                .await
                .expect("enqueue");
        }
        txn.rollback().await.expect("rollback");
    }
    committed.extend(enqueue(running.outbox(), 200, 100, 1).await);
    wait_for(&js, &stream, committed.len(), Duration::from_secs(60)).await;
    let stored = stream_messages(&js, &stream).await;
    check_delivery(&bodies(&stored), &committed).expect("delivery");
    let instance = running.outbox().instance_id().await.expect("instance id");
    for s in &stored {
        assert_eq!(s.id, format!("{instance}/relay/{}/{}", s.partition, s.seq));
        assert_eq!(s.nats_id, s.id, "Nats-Msg-Id is the stable id");
        assert_eq!(
            s.headers.get("x-body"),
            Some(&s.body),
            "the message's header was forwarded"
        );
        let key = s.body.split_once(':').map(|(k, _)| k).unwrap_or_default();
        assert_eq!(s.subject, format!("{prefix}.relay.{}.{key}", s.partition));
    }
    eventually(
        Duration::from_secs(30),
        "the local handler saw every message",
        || async { local.load(std::sync::atomic::Ordering::SeqCst) == committed.len() as u64 },
    )
    .await;
    let depth = running.outbox().depth("relay").await.expect("depth");
    let relay = depth
        .handlers
        .iter()
        .find(|h| h.handler == "relay-nats")
        .expect("the relay has its own cursor");
    assert_eq!(relay.pending, 0, "{depth:?}");
    running
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    let _ = js.delete_stream(&stream).await;
}

async fn refused_message_is_dead_lettered_with_the_brokers_reason(db: Arc<TestDb>) {
    let client = brokers::nats(&brokers::nats_url()).await;
    let js = async_nats::jetstream::new(client.clone());
    let stream = brokers::unique("OUTBOXT");
    let prefix = brokers::unique("outboxt");
    let running = Outbox::builder(db.pool(10).await)
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("relay", 1))
        .relay(
            RelaySpec::new(
                "relay",
                // Created at start, with a limit the middle message exceeds.
                JetStream::new(client).create_stream_with(async_nats::jetstream::stream::Config {
                    name: stream.clone(),
                    subjects: vec![format!("{prefix}.>")],
                    max_message_size: 1_024,
                    ..Default::default()
                }),
                format!("{prefix}.{{partition}}"),
            )
            .overrides(knobs()),
        )
        .start()
        .await
        .expect("start");
    let txn = running.outbox().db().begin().await.expect("begin");
    let msgs = [
        NewMessage::new("relay", 0, "k0:1"),
        NewMessage::new("relay", 0, vec![b'x'; 4_096]),
        NewMessage::new("relay", 0, "k0:3"),
    ];
    running
        .outbox()
        .enqueue_batch(&txn, &msgs)
        .await
        .expect("enqueue");
    txn.commit().await.expect("commit");
    wait_for(&js, &stream, 2, Duration::from_secs(30)).await;
    let stored = stream_messages(&js, &stream).await;
    assert_eq!(bodies(&stored), ["k0:1", "k0:3"]);
    let dead = running
        .outbox()
        .dead_letters(&DeadLetterFilter::all(), 0, 10)
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((dead[0].seq, dead[0].handler.as_str()), (2, "relay-nats"));
    assert!(
        dead[0].last_error.contains("maximum"),
        "the broker's reason is kept: {}",
        dead[0].last_error
    );
    running
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    let _ = js.delete_stream(&stream).await;
}

async fn a_full_stream_is_waited_for_not_dead_lettered(db: Arc<TestDb>) {
    use async_nats::jetstream::stream::{Config, DiscardPolicy};
    let client = brokers::nats(&brokers::nats_url()).await;
    let js = async_nats::jetstream::new(client.clone());
    let stream = brokers::unique("OUTBOXT");
    let prefix = brokers::unique("outboxt");
    let config = Config {
        name: stream.clone(),
        subjects: vec![format!("{prefix}.>")],
        max_messages: 2,
        discard: DiscardPolicy::New,
        ..Default::default()
    };
    js.create_stream(config.clone())
        .await
        .expect("create stream");
    let running = Outbox::builder(db.pool(10).await)
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("relay", PARTITIONS))
        .relay(
            RelaySpec::new(
                "relay",
                JetStream::new(client).check_stream(&stream),
                format!("{prefix}.{{partition}}"),
            )
            .overrides(knobs().max_attempts(2)),
        )
        .start()
        .await
        .expect("start");
    let committed = enqueue(running.outbox(), 0, 3, 3).await;
    wait_for(&js, &stream, 2, Duration::from_secs(30)).await;
    // JetStream answers "maximum messages exceeded" for the third: a full stream is not the
    // message's fault, so the relay keeps trying instead of dead-lettering it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dead = running
        .outbox()
        .dead_letters(&DeadLetterFilter::all(), 0, 10)
        .await
        .expect("dead letters");
    assert!(
        dead.is_empty(),
        "a full stream dead-letters nothing: {dead:?}"
    );
    assert_eq!(stream_len(&js, &stream).await, 2);
    js.update_stream(Config {
        max_messages: -1,
        ..config
    })
    .await
    .expect("raise the limit");
    wait_for(&js, &stream, 3, Duration::from_secs(30)).await;
    let stored = stream_messages(&js, &stream).await;
    check_delivery(&bodies(&stored), &committed).expect("delivery once there is room");
    running
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    let _ = js.delete_stream(&stream).await;
}

async fn broker_killed_and_restarted_mid_stream(db: Arc<TestDb>) {
    let mut server = NatsServer::start().await;
    let client = brokers::nats(&server.url()).await;
    let js = async_nats::jetstream::new(client.clone());
    let (stream, prefix) = fresh_stream(&js).await;
    let running = Outbox::builder(db.pool(10).await)
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("relay", PARTITIONS))
        .relay(
            RelaySpec::new(
                "relay",
                JetStream::new(client).check_stream(&stream),
                format!("{prefix}.{{partition}}"),
            )
            // Two attempts only: an outage must never count as a failed attempt.
            .overrides(knobs().max_attempts(2)),
        )
        .start()
        .await
        .expect("start");
    let producer = {
        let o = running.outbox().clone();
        tokio::spawn(async move {
            let mut all = Vec::new();
            for round in 0..30 {
                all.extend(enqueue(&o, round * 10, 10, 5).await);
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            all
        })
    };
    eventually(Duration::from_secs(30), "some messages relayed", || async {
        stream_len(&js, &stream).await >= 40
    })
    .await;
    // Down for much longer than two leases: the relay keeps renewing its lease meanwhile.
    server.kill();
    tokio::time::sleep(Duration::from_secs(10)).await;
    server.restart().await;
    let committed = producer.await.expect("producer");
    wait_for(&js, &stream, committed.len(), Duration::from_secs(90)).await;
    let stored = stream_messages(&js, &stream).await;
    check_delivery(&bodies(&stored), &committed).expect("delivery across a broker restart");
    let dead = running
        .outbox()
        .dead_letters(&DeadLetterFilter::all(), 0, 10)
        .await
        .expect("dead letters");
    assert!(dead.is_empty(), "an outage dead-letters nothing: {dead:?}");
    running
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}

async fn relay_process_killed_in_a_loop(db: Arc<TestDb>) {
    const ROUNDS: usize = 20;
    let nats = brokers::nats_url();
    let client = brokers::nats(&nats).await;
    let js = async_nats::jetstream::new(client);
    let (stream, prefix) = fresh_stream(&js).await;
    // Registers the queue; this process only produces.
    let producer_outbox = Outbox::builder(db.pool(4).await)
        .queue(QueueSpec::new("relay", PARTITIONS))
        .connect()
        .await
        .expect("connect");
    let worker = |stdin: Stdio, ack_delay_ms: u64| {
        Command::new(env!("CARGO_BIN_EXE_outbox-relay-worker"))
            .args([
                "--url", &db.url, "--nats", &nats, "--stream", &stream, "--prefix", &prefix,
            ])
            .args(["--partitions", &PARTITIONS.to_string()])
            .args(["--ack-delay-ms", &ack_delay_ms.to_string()])
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn outbox-relay-worker")
    };
    // A backlog keeps every relay busy publishing when it is killed, so kills land between
    // publish and ack; the producer goes on meanwhile.
    let backlog = enqueue(&producer_outbox, 0, 3_000, 100).await;
    let producer = {
        let o = producer_outbox.clone();
        tokio::spawn(async move {
            let mut all = backlog;
            for round in 0..60 {
                all.extend(enqueue(&o, 10_000 + round * 20, 20, 4).await);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            all
        })
    };
    let mut arrived_while_killing = Vec::new();
    for _ in 0..ROUNDS {
        let mut child = worker(Stdio::null(), 150);
        let wait = rand::random_range(50..900);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        child.kill().expect("SIGKILL the relay");
        child.wait().expect("reap");
        arrived_while_killing.push(stream_len(&js, &stream).await);
    }
    let committed = producer.await.expect("producer");
    assert!(
        arrived_while_killing.last().copied().unwrap_or(0) > 0,
        "the killed relays published something: {arrived_while_killing:?}"
    );
    // A last relay that is left to finish.
    let mut last = worker(Stdio::piped(), 0);
    wait_for(&js, &stream, committed.len(), Duration::from_secs(120)).await;
    drop(last.stdin.take());
    let _ = last.wait();
    let stored = stream_messages(&js, &stream).await;
    check_delivery(&bodies(&stored), &committed).expect("delivery across relay kills");
    let _ = js.delete_stream(&stream).await;
}

outbox_tests::on_every_backend_with_broker!(
    outbox_no_nats, "skipped: OUTBOX_TEST_NATS_URL is not set";
    relays_exactly_what_was_committed,
    refused_message_is_dead_lettered_with_the_brokers_reason,
    a_full_stream_is_waited_for_not_dead_lettered,
    broker_killed_and_restarted_mid_stream,
    relay_process_killed_in_a_loop,
);

/// A broker that does not answer at start: a typed error naming the relay, and nothing runs.
#[tokio::test]
async fn unreachable_broker_fails_start_with_a_typed_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("o.db").display());
    let db = outbox::sea_orm::Database::connect(url.as_str())
        .await
        .expect("sqlite");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    // Nothing listens on `port`; the client keeps trying in the background.
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(format!("nats://127.0.0.1:{port}"))
        .await
        .expect("a client that retries");
    let err = Outbox::builder(db)
        .queue(QueueSpec::new("relay", 1))
        .relay(RelaySpec::new(
            "relay",
            JetStream::new(client).start_timeout(Duration::from_millis(500)),
            "x.{partition}",
        ))
        .start()
        .await
        .expect_err("start must fail");
    match &err {
        StartError::Relay { queue, relay, .. } => {
            assert_eq!((queue.as_str(), relay.as_str()), ("relay", "relay-nats"));
        }
        other => panic!("expected StartError::Relay, got {other:?}"),
    }
}

/// A template with an unknown placeholder is a registry problem, reported before any I/O.
#[tokio::test]
async fn bad_template_is_a_registry_problem() {
    let db = outbox::sea_orm::Database::connect("sqlite::memory:")
        .await
        .expect("sqlite");
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect("nats://127.0.0.1:1")
        .await
        .expect("client");
    let err = Outbox::builder(db)
        .queue(QueueSpec::new("relay", 1))
        .relay(RelaySpec::new("relay", JetStream::new(client), "x.{nope}"))
        .connect()
        .await
        .expect_err("connect must refuse the template");
    let text = err.to_string();
    assert!(text.contains("unknown placeholder `{nope}`"), "{text}");
}
