//! The relay into RabbitMQ (issue 12), against the real broker (`OUTBOX_TEST_RABBITMQ_URL`):
//! persistent messages with publisher confirms, the stable id as `message_id`, order per key,
//! a connection the broker closes and relay processes killed in a loop. RabbitMQ keeps the
//! copies a lost confirm causes; each copy carries the original's id and the inbox absorbs it.

#![cfg_attr(outbox_no_rabbitmq, allow(dead_code, unused_imports))]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use outbox::inbox::Inbox;
use outbox::relay::RelaySpec;
use outbox::relay::rabbitmq::{RabbitMq, lapin};
use outbox::sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};
use outbox::{NewMessage, Outbox, Overrides, Profile, QueueSpec};
use outbox_tests::brokers::{self, Delivered, check_at_least_once, drain_queue};
use outbox_tests::{TestDb, scalar};

const PARTITIONS: u32 = 4;

/// `rabbitmqctl close_all_connections` closes every test's connections: that test runs alone
/// (write), the others beside each other (read).
static BROKER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());
const KEYS: u32 = 12;

fn knobs() -> Overrides {
    Overrides::NONE
        .batch_size(32)
        .lease(Duration::from_secs(2))
        .lease_headroom(Duration::from_millis(400))
        .max_attempts(1_000)
}

fn message(key: u32, n: u64) -> (u32, String) {
    (
        outbox::partition_for_key(&key, PARTITIONS),
        format!("k{key}:{n}"),
    )
}

async fn enqueue(outbox: &Outbox, from: u64, count: u64, per_txn: u64) -> Vec<String> {
    let mut committed = Vec::new();
    let mut n = from;
    while n < from + count {
        let txn = outbox.db().begin().await.expect("begin");
        let mut batch = Vec::new();
        for _ in 0..per_txn.min(from + count - n) {
            let (p, body) = message((n % u64::from(KEYS)) as u32, n);
            // Headers travel in the AMQP headers table.
            batch.push(NewMessage::new("relay", p, body.clone()).header("x-body", body.clone()));
            committed.push(body);
            n += 1;
        }
        outbox.enqueue_batch(&txn, &batch).await.expect("enqueue");
        txn.commit().await.expect("commit");
    }
    committed
}

/// A channel of the test itself and a fresh durable queue on it.
async fn fresh_queue() -> (lapin::Connection, lapin::Channel, String) {
    let conn = lapin::Connection::connect(
        &brokers::rabbitmq_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("connect to RabbitMQ");
    let ch = conn.create_channel().await.expect("channel");
    let name = brokers::unique("outboxt_");
    ch.queue_declare(
        name.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("declare queue");
    (conn, ch, name)
}

/// Drains `queue` until `n` distinct bodies arrived (or the time is up), then a little longer.
async fn receive(ch: &lapin::Channel, queue: &str, n: usize, within: Duration) -> Vec<Delivered> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    loop {
        got.extend(drain_queue(ch, queue).await);
        let distinct: std::collections::HashSet<&str> =
            got.iter().map(|d| d.body.as_str()).collect();
        if distinct.len() >= n {
            tokio::time::sleep(Duration::from_millis(300)).await;
            got.extend(drain_queue(ch, queue).await);
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {} of {n} messages arrived in {queue}",
            distinct.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Applies every delivery through the inbox, as a consumer would; returns how many were
/// applied (copies are not).
async fn apply_through_inbox(db: &DatabaseConnection, received: &[Delivered]) -> u64 {
    db.execute_unprepared("CREATE TABLE applied (body VARCHAR(64) NOT NULL)")
        .await
        .expect("create applied");
    let inbox = Inbox::new("rcv_").expect("prefix");
    inbox.create_table(db).await.expect("inbox table");
    let mut applied = 0;
    for d in received {
        let txn = db.begin().await.expect("begin");
        if inbox.receive(&txn, &d.id).await.expect("receive") {
            let sql = format!("INSERT INTO applied (body) VALUES ('{}')", d.body);
            txn.execute_unprepared(&sql).await.expect("effect");
            applied += 1;
        }
        txn.commit().await.expect("commit");
    }
    applied
}

async fn relays_persistent_confirmed_messages_in_order(db: Arc<TestDb>) {
    let _shared = BROKER.read().await;
    let (_conn, ch, queue) = fresh_queue().await;
    let exchange = brokers::unique("outboxt_x_");
    let running = Outbox::builder(db.pool(10).await)
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("relay", PARTITIONS))
        .relay(
            RelaySpec::new(
                "relay",
                RabbitMq::new(brokers::rabbitmq_url(), exchange.clone())
                    .declare_exchange(lapin::ExchangeKind::Topic),
                "{queue}.{partition}",
            )
            .overrides(knobs()),
        )
        .start()
        .await
        .expect("start");
    // The relay declared the exchange at start.
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "relay.*".into(),
        lapin::options::QueueBindOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("bind");
    let committed = enqueue(running.outbox(), 0, 300, 6).await;
    let got = receive(&ch, &queue, committed.len(), Duration::from_secs(60)).await;
    let (firsts, dups) = check_at_least_once(&got, &committed).expect("delivery");
    assert_eq!(dups, 0, "no confirm was lost, so no copy");
    let instance = running.outbox().instance_id().await.expect("instance id");
    let ids: std::collections::HashSet<String> = (0..PARTITIONS)
        .flat_map(|p| (1..=300).map(move |s| (p, s)))
        .map(|(p, s)| format!("{instance}/relay/{p}/{s}"))
        .collect();
    for d in &firsts {
        assert_eq!(d.delivery_mode, 2, "persistent");
        assert!(ids.contains(&d.id), "stable id {}", d.id);
        let p = d.id.split('/').nth(2).unwrap_or_default();
        assert_eq!(d.routing_key, format!("relay.{p}"));
        assert_eq!(
            d.headers.get("x-body"),
            Some(&d.body),
            "the message's header was forwarded"
        );
    }
    running
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    let _ = ch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
}

/// Sets RabbitMQ's `max_message_size` for as long as it lives (new channels see it).
struct MaxMessageSize;

impl MaxMessageSize {
    fn set(bytes: u64) -> MaxMessageSize {
        rabbitmqctl_max_message_size(bytes);
        MaxMessageSize
    }
}

impl Drop for MaxMessageSize {
    fn drop(&mut self) {
        rabbitmqctl_max_message_size(134_217_728);
    }
}

fn rabbitmqctl_max_message_size(bytes: u64) {
    let status = Command::new("rabbitmqctl")
        .args([
            "eval",
            &format!("application:set_env(rabbit, max_message_size, {bytes})."),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run rabbitmqctl");
    assert!(
        status.success(),
        "rabbitmqctl eval set_env max_message_size"
    );
}

async fn refused_message_is_dead_lettered_with_the_brokers_reason(db: Arc<TestDb>) {
    // The limit is the broker's, for every client: this test runs alone.
    let _alone = BROKER.write().await;
    let (_conn, ch, queue) = fresh_queue().await;
    let limit = MaxMessageSize::set(2_048);
    let running = Outbox::builder(db.pool(10).await)
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("relay", 1))
        .relay(
            RelaySpec::new(
                "relay",
                RabbitMq::new(brokers::rabbitmq_url(), ""),
                queue.clone(),
            )
            .overrides(knobs()),
        )
        .start()
        .await
        .expect("start");
    let txn = running.outbox().db().begin().await.expect("begin");
    let msgs = [
        NewMessage::new("relay", 0, "k0:1"),
        NewMessage::new("relay", 0, vec![b'x'; 8_192]),
        NewMessage::new("relay", 0, "k0:3"),
    ];
    running
        .outbox()
        .enqueue_batch(&txn, &msgs)
        .await
        .expect("enqueue");
    txn.commit().await.expect("commit");
    let got = receive(&ch, &queue, 2, Duration::from_secs(30)).await;
    let committed = ["k0:1".to_owned(), "k0:3".to_owned()];
    check_at_least_once(&got, &committed).expect("the two small messages arrive");
    let dead = running
        .outbox()
        .dead_letters(&outbox::DeadLetterFilter::all(), 0, 10)
        .await
        .expect("dead letters");
    drop(limit);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        (dead[0].seq, dead[0].handler.as_str()),
        (2, "relay-rabbitmq")
    );
    assert!(
        dead[0].last_error.contains("PRECONDITION_FAILED"),
        "the broker's reason is kept: {}",
        dead[0].last_error
    );
    running
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
}

async fn reconnects_after_the_broker_closes_its_connections(db: Arc<TestDb>) {
    let _alone = BROKER.write().await;
    let (_conn, ch, queue) = fresh_queue().await;
    let running = Outbox::builder(db.pool(10).await)
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("relay", PARTITIONS))
        .relay(
            RelaySpec::new(
                "relay",
                RabbitMq::new(brokers::rabbitmq_url(), ""),
                queue.clone(),
            )
            .overrides(knobs()),
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
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The broker drops every client connection (the relay's among them) mid-stream.
    let status = Command::new("rabbitmqctl")
        .args(["close_all_connections", "outbox relay test"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run rabbitmqctl");
    assert!(status.success(), "rabbitmqctl close_all_connections");
    let committed = producer.await.expect("producer");
    // The test's own channel was closed too.
    let (_conn2, ch2, _) = fresh_queue().await;
    let _ = ch;
    let got = receive(&ch2, &queue, committed.len(), Duration::from_secs(90)).await;
    check_at_least_once(&got, &committed).expect("delivery across a closed connection");
    let applied = apply_through_inbox(&db.pool(4).await, &got).await;
    assert_eq!(
        applied,
        committed.len() as u64,
        "the inbox absorbed every copy"
    );
    running
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    let _ = ch2
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
}

async fn relay_process_killed_in_a_loop(db: Arc<TestDb>) {
    let _shared = BROKER.read().await;
    const ROUNDS: usize = 20;
    let (_conn, ch, queue) = fresh_queue().await;
    let producer_outbox = Outbox::builder(db.pool(4).await)
        .queue(QueueSpec::new("relay", PARTITIONS))
        .connect()
        .await
        .expect("connect");
    let amqp = brokers::rabbitmq_url();
    let worker = |stdin: Stdio, ack_delay_ms: u64| {
        Command::new(env!("CARGO_BIN_EXE_outbox-relay-worker"))
            .args(["--url", &db.url, "--amqp", &amqp, "--routing", &queue])
            .args(["--partitions", &PARTITIONS.to_string()])
            .args(["--ack-delay-ms", &ack_delay_ms.to_string()])
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn outbox-relay-worker")
    };
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
    let mut got = Vec::new();
    for _ in 0..ROUNDS {
        let mut child = worker(Stdio::null(), 150);
        tokio::time::sleep(Duration::from_millis(rand::random_range(50..900))).await;
        child.kill().expect("SIGKILL the relay");
        child.wait().expect("reap");
        got.extend(drain_queue(&ch, &queue).await);
    }
    let committed = producer.await.expect("producer");
    assert!(!got.is_empty(), "the killed relays published something");
    let mut last = worker(Stdio::piped(), 0);
    let rest = committed.len().saturating_sub(
        got.iter()
            .map(|d| d.body.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len(),
    );
    got.extend(receive(&ch, &queue, rest, Duration::from_secs(120)).await);
    drop(last.stdin.take());
    let _ = last.wait();
    got.extend(drain_queue(&ch, &queue).await);
    let (_, dups) = check_at_least_once(&got, &committed).expect("delivery across relay kills");
    let applied = apply_through_inbox(&db.pool(4).await, &got).await;
    assert_eq!(
        applied,
        committed.len() as u64,
        "the inbox absorbed all {dups} copies"
    );
    assert_eq!(
        scalar(&db.pool(1).await, "SELECT COUNT(*) FROM applied").await,
        committed.len() as i64
    );
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
}

outbox_tests::on_every_backend_with_broker!(
    outbox_no_rabbitmq, "skipped: OUTBOX_TEST_RABBITMQ_URL is not set";
    relays_persistent_confirmed_messages_in_order,
    refused_message_is_dead_lettered_with_the_brokers_reason,
    reconnects_after_the_broker_closes_its_connections,
    relay_process_killed_in_a_loop,
);

/// A broker that does not answer, or an exchange that does not exist, fails start with a
/// typed error naming the relay; nothing runs.
#[tokio::test]
#[cfg_attr(
    outbox_no_rabbitmq,
    ignore = "skipped: OUTBOX_TEST_RABBITMQ_URL is not set"
)]
async fn unreachable_broker_or_missing_exchange_fails_start() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let cases = [
        RabbitMq::new(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"), "")
            .connect_timeout(Duration::from_secs(2)),
        RabbitMq::new(brokers::rabbitmq_url(), brokers::unique("outboxt_missing_")),
    ];
    for broker in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("o.db").display());
        let db = outbox::sea_orm::Database::connect(url.as_str())
            .await
            .expect("sqlite");
        let err = Outbox::builder(db)
            .queue(QueueSpec::new("relay", 1))
            .relay(RelaySpec::new("relay", broker, "q"))
            .start()
            .await
            .expect_err("start must fail");
        match &err {
            outbox::StartError::Relay { queue, relay, .. } => {
                assert_eq!(
                    (queue.as_str(), relay.as_str()),
                    ("relay", "relay-rabbitmq")
                );
            }
            other => panic!("expected StartError::Relay, got {other:?}"),
        }
    }
}
