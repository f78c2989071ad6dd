//! Deduplication keys (issue 13): one message per key on a queue while it waits and for a
//! retention window after it was handled, enforced by a unique index in the producer's
//! transaction, also when thousands of transactions race on the same keys and some roll back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use outbox::sea_orm::{DatabaseConnection, DbErr, TransactionTrait};
use outbox::{
    EnqueueError, Enqueued, HandlerSpec, NewMessage, Outbox, Profile, QueueSpec, RuntimeTuning,
};
use outbox_tests::{Harness, Seen, TestDb, on_every_backend, scalar};

const WAIT: Duration = Duration::from_secs(60);

fn recorder(queue: &'static str, seen: &Seen) -> HandlerSpec {
    let seen = seen.clone();
    HandlerSpec::transactional(queue, "h", move |m, _txn| {
        seen.push("h", m);
        Box::pin(async { Ok(()) })
    })
}

/// Vacuum soon after every ack, so released keys are seen quickly.
fn eager() -> RuntimeTuning {
    let mut t = Profile::LowLatency.runtime();
    t.vacuum_after_acks = 1;
    t.vacuum_interval = Duration::from_millis(100);
    t
}

/// Messages stored for `queue` (waiting or sequenced).
async fn stored(db: &DatabaseConnection, queue: &str) -> i64 {
    scalar(
        db,
        &format!("SELECT COUNT(*) FROM outbox_incoming WHERE queue = '{queue}'"),
    )
    .await
        + scalar(
            db,
            &format!("SELECT COUNT(*) FROM outbox_outgoing WHERE queue = '{queue}'"),
        )
        .await
}

/// A second message with a key is a duplicate while the first waits, after it was handled
/// within the retention window, and in the same batch; the key is free again once the window
/// has passed. Bad keys are refused with a typed error and write nothing.
async fn a_key_holds_while_pending_and_for_its_retention(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    // Created first without workers, so the first message waits unhandled.
    let producer = Outbox::builder(db.clone())
        .queue(QueueSpec::new("dd", 2))
        .connect()
        .await
        .expect("connect");
    let key = |body: &str| NewMessage::new("dd", 0, body.to_owned()).dedup_key("order-1");
    assert_eq!(
        producer.enqueue(&db, key("first")).await.expect("enqueue"),
        Enqueued::Stored
    );
    assert_eq!(
        producer.enqueue(&db, key("again")).await.expect("enqueue"),
        Enqueued::Duplicate,
        "while the first waits"
    );
    // Another queue's key space is its own; another key is another message.
    let done = producer
        .enqueue_batch(
            &db,
            &[
                NewMessage::new("dd", 1, "other-1").dedup_key("order-2"),
                NewMessage::new("dd", 1, "other-2").dedup_key("order-2"),
                NewMessage::new("dd", 1, "plain"),
            ],
        )
        .await
        .expect("batch");
    assert_eq!(
        done,
        [Enqueued::Stored, Enqueued::Duplicate, Enqueued::Stored],
        "a key used twice in one batch"
    );
    for (bad, why) in [
        (String::new(), "must not be empty"),
        ("x".repeat(256), "at most 255 bytes"),
        ("a\0b".to_owned(), "NUL"),
    ] {
        let err = producer
            .enqueue(&db, NewMessage::new("dd", 0, "bad").dedup_key(bad))
            .await
            .expect_err("bad key");
        assert!(
            matches!(&err, EnqueueError::InvalidDedupKey { reason, .. } if reason.contains(why)),
            "{err:?}"
        );
    }
    assert_eq!(
        stored(&db, "dd").await,
        3,
        "duplicates and bad keys wrote nothing"
    );

    let h = Harness::start(db.clone(), |b| {
        b.runtime_tuning(eager())
            .queue(QueueSpec::new("dd", 2).dedup_retention(Duration::from_secs(2)))
            .handler(recorder("dd", &seen))
    })
    .await
    .with_wait(WAIT);
    seen.wait_until(WAIT, "three messages", |d| d.len() == 3)
        .await;
    h.eventually("the handled messages are vacuumed", || async {
        stored(&db, "dd").await == 0
    })
    .await;
    assert_eq!(
        h.enqueue(key("after-handled")).await,
        Enqueued::Duplicate,
        "handled, but within the retention window"
    );
    h.eventually("the key is free after the retention window", || async {
        // Each try writes nothing while the key is held.
        matches!(
            h.outbox().enqueue(&db, key("later")).await,
            Ok(Enqueued::Stored)
        )
    })
    .await;
    seen.wait_until(WAIT, "the later message", |d| d.len() == 4)
        .await;
    let bodies: Vec<String> = seen.all().into_iter().map(|d| d.body).collect();
    assert_eq!(bodies.iter().filter(|b| *b == "later").count(), 1);
    assert!(
        !bodies
            .iter()
            .any(|b| b == "again" || b == "other-2" || b == "after-handled")
    );
    let snap = h.outbox().status().await.expect("status");
    assert_eq!(snap.queue("dd").map(|q| q.scheduled), Some(0));
    h.finish().await;
}

/// Whether `e` is a conflict the database asks the caller to retry (deadlock, serialization
/// failure, busy): a real producer retries its transaction.
fn retryable(e: &DbErr) -> bool {
    let text = e.to_string().to_lowercase();
    [
        "deadlock",
        "lock wait timeout",
        "could not serialize",
        "database is locked",
        "busy",
    ]
    .iter()
    .any(|w| text.contains(w))
}

/// 8 producers each try all 400 keys (3,200 transactions), two at a time on the same key; a
/// quarter of their transactions roll back after enqueueing. Every key ends with exactly one committed
/// message: no duplicates, none lost, and each is delivered once.
async fn racing_transactions_store_one_message_per_key(t: Arc<TestDb>) {
    const PRODUCERS: usize = 8;
    const KEYS: usize = 400;
    let db = t.pool(16).await;
    let seen = Seen::default();
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("race", 4))
            .handler(recorder("race", &seen))
    })
    .await;
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let (db, rt) = (db.clone(), h.outbox().clone());
        tasks.push(tokio::spawn(async move {
            // (key, body) of every committed Stored result.
            let mut committed: Vec<(usize, String)> = Vec::new();
            let mut retries = 0u32;
            for i in 0..KEYS {
                // Producers walk the keys in pairs, so two transactions hold one key at
                // once; the pairs start at different places.
                let k = (i + (p / 2) * (KEYS / 4)) % KEYS;
                let body = format!("p{p}-k{k}");
                loop {
                    let attempt = async {
                        let txn = outbox::sqlite::begin(&db).await?;
                        let message = NewMessage::new("race", (k % 4) as u32, body.clone())
                            .dedup_key(format!("key-{k}"));
                        let done = match rt.enqueue(&txn, message).await {
                            Ok(d) => d,
                            Err(EnqueueError::Database(e)) => return Err(e),
                            Err(e) => panic!("enqueue: {e}"),
                        };
                        // Keep the key held a moment, so the other of the pair waits on it.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        // Producer 0 always commits; the others roll back a quarter of theirs.
                        if p != 0 && (k + p).is_multiple_of(4) {
                            txn.rollback().await?;
                            return Ok(None);
                        }
                        txn.commit().await?;
                        Ok::<_, DbErr>(Some(done))
                    }
                    .await;
                    match attempt {
                        Ok(Some(Enqueued::Stored)) => {
                            committed.push((k, body.clone()));
                            break;
                        }
                        Ok(Some(Enqueued::Duplicate) | None) => break,
                        Ok(Some(other)) => panic!("unexpected {other:?}"),
                        Err(e) if retryable(&e) => {
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        Err(e) => panic!("producer {p}, key {k}: {e}"),
                    }
                }
            }
            (committed, retries)
        }));
    }
    let mut winners: HashMap<usize, Vec<String>> = HashMap::new();
    let mut retries = 0;
    for task in tasks {
        let (committed, r) = task.await.expect("producer");
        retries += r;
        for (k, body) in committed {
            winners.entry(k).or_default().push(body);
        }
    }
    eprintln!(
        "{} transactions, {retries} retried after a conflict",
        PRODUCERS * KEYS
    );
    let doubled: Vec<_> = winners.iter().filter(|(_, w)| w.len() > 1).collect();
    assert!(doubled.is_empty(), "keys stored twice: {doubled:?}");
    assert_eq!(
        winners.len(),
        KEYS,
        "every key has its one committed message"
    );
    seen.wait_until(WAIT, "every key delivered", |d| d.len() >= KEYS)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let delivered: Vec<String> = seen.all().into_iter().map(|d| d.body).collect();
    assert_eq!(delivered.len(), KEYS, "delivered once each");
    for (k, w) in &winners {
        assert!(
            delivered.contains(&w[0]),
            "key {k}: the committed message {} was not delivered",
            w[0]
        );
    }
    h.finish().await;
}

/// The typed API: a `#[outbox(dedup)]` field is the message's key.
#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2, name = "typed_dedup")]
struct Charge {
    #[outbox(key)]
    account: i64,
    #[outbox(dedup)]
    request_id: String,
    cents: i64,
}

async fn a_typed_dedup_field_is_the_key(t: Arc<TestDb>) {
    use outbox::Queue;

    let db = t.pool(8).await;
    let rt = Outbox::builder(db.clone())
        .queue(QueueSpec::new("typed_dedup", 2))
        .connect()
        .await
        .expect("connect");
    let charge = |cents| Charge {
        account: 7,
        request_id: "req-42".to_owned(),
        cents,
    };
    assert_eq!(
        charge(100).to_message().expect("message").key(),
        Some("req-42")
    );
    let txn = db.begin().await.expect("begin");
    assert_eq!(
        charge(100).enqueue_with(&rt, &txn).await.expect("enqueue"),
        Enqueued::Stored
    );
    assert_eq!(
        charge(999).enqueue_with(&rt, &txn).await.expect("enqueue"),
        Enqueued::Duplicate,
        "a retried request"
    );
    txn.commit().await.expect("commit");
    assert_eq!(stored(&db, "typed_dedup").await, 1);
}

on_every_backend!(
    a_key_holds_while_pending_and_for_its_retention,
    racing_transactions_store_one_message_per_key,
    a_typed_dedup_field_is_the_key,
);
