//! Wake-ups across processes: a commit made by another process is found before the
//! consumer's next poll.
//!
//! Every consumer here polls every 5 s (`Relaxed`), so a message found well before that was
//! found by a wake-up. Every producer is a second `Outbox` on its own pool: to the consumer it
//! is another process (on SQLite, another connection writing the same file, which is what
//! another process does).
//!
//! - An idle consumer is woken by the database's own signal: PostgreSQL's NOTIFY, SQLite's
//!   write to its write-ahead log. MariaDB has neither, so its idle consumer waits for the
//!   poll; that test is skipped there.
//! - A trickle from another process is found between polls on every backend: after finding
//!   work, a consumer keeps looking quickly for a while (adaptive polling) where no signal
//!   announces commits.
//! - PostgreSQL producers coalesce their NOTIFYs: only the first enqueue of a coalescing window
//!   carries one; the others rely on a trailing notification and on the listeners' quick
//!   re-checks after it.

use std::sync::Arc;
use std::time::Duration;

use outbox::Running;
use outbox::sea_orm::DatabaseConnection;
use outbox::sea_orm::TransactionTrait;
use outbox::sea_orm::sqlx::postgres::PgListener;
use outbox::{HandlerSpec, NewMessage, Outbox, Profile, QueueSpec};
use outbox_tests::{Kind, Seen, TestDb, assert_invariants, on_every_backend};

const WINDOW: Duration = Duration::from_millis(300);
/// Well below the consumer's 5 s poll interval.
const WOKEN_WITHIN: Duration = Duration::from_millis(2_500);

/// A consumer that polls every 5 s, with one leased handler `h` on queue `wake`.
async fn consumer(db: &DatabaseConnection, seen: &Seen) -> Running {
    let seen = seen.clone();
    Outbox::builder(db.clone())
        .profile(Profile::Relaxed)
        .queue(QueueSpec::new("wake", 1))
        .handler(HandlerSpec::leased("wake", "h", move |m, _ctx| {
            seen.push("h", m);
            Box::pin(async { Ok(()) })
        }))
        .start()
        .await
        .expect("start consumer")
}

/// A producer that is, to the consumer, another process: its own `Outbox` on its own pool.
async fn producer(t: &TestDb) -> (Outbox, DatabaseConnection) {
    let db = t.pool(2).await;
    let outbox = Outbox::builder(db.clone())
        .queue(QueueSpec::new("wake", 1))
        .connect()
        .await
        .expect("connect producer");
    (outbox, db)
}

/// Enqueues `body` in its own transaction and returns when `commit()` returned.
async fn commit_one(
    producer: &Outbox,
    db: &DatabaseConnection,
    body: &str,
) -> tokio::time::Instant {
    let txn = db.begin().await.expect("begin");
    producer
        .enqueue(&txn, NewMessage::new("wake", 0, body))
        .await
        .expect("enqueue");
    txn.commit().await.expect("commit");
    tokio::time::Instant::now()
}

async fn a_commit_in_another_process_wakes_an_idle_consumer(t: Arc<TestDb>) {
    let consumer_db = t.pool(4).await;
    let seen = Seen::default();
    let rt = consumer(&consumer_db, &seen).await;
    let (producer, producer_db) = producer(&t).await;
    // Let the consumer's first passes end: from here on it is idle until its next poll.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (n, body) in ["first", "second"].into_iter().enumerate() {
        let committed = commit_one(&producer, &producer_db, body).await;
        seen.wait_until(
            WOKEN_WITHIN,
            &format!("the commit of {body:?} in another process to wake the idle consumer"),
            |d| d.len() > n,
        )
        .await;
        eprintln!("{body}: handled {:?} after its commit", committed.elapsed());
        // Idle again (more than the quick re-checks after finding work last).
        tokio::time::sleep(Duration::from_millis(2_500)).await;
    }
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    assert_invariants(&consumer_db, "outbox_").await;
}

async fn a_trickle_from_another_process_is_found_between_polls(t: Arc<TestDb>) {
    let consumer_db = t.pool(4).await;
    let seen = Seen::default();
    let rt = consumer(&consumer_db, &seen).await;
    let (producer, producer_db) = producer(&t).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The first may wait for the poll where nothing announces commits (MariaDB).
    commit_one(&producer, &producer_db, "0").await;
    seen.wait_until(Duration::from_secs(15), "the first message", |d| {
        !d.is_empty()
    })
    .await;
    // Then one every 200 ms: each is found long before the next poll.
    for n in 1..=8 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let committed = commit_one(&producer, &producer_db, &n.to_string()).await;
        seen.wait_until(
            WOKEN_WITHIN,
            &format!("message {n} of a trickle from another process"),
            |d| d.len() > n,
        )
        .await;
        eprintln!("{n}: handled {:?} after its commit", committed.elapsed());
    }
    let order: Vec<_> = seen.of("h").iter().map(|d| d.body.clone()).collect();
    assert_eq!(order, ["0", "1", "2", "3", "4", "5", "6", "7", "8"]);
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    assert_invariants(&consumer_db, "outbox_").await;
}

on_every_backend!(
    #[skip(
        mysql = "skipped: MariaDB has no signal between processes; an idle consumer finds a commit at its next poll"
    )]
    a_commit_in_another_process_wakes_an_idle_consumer,
    a_trickle_from_another_process_is_found_between_polls,
);

async fn coalesced_enqueues_still_wake_another_process(t: Arc<TestDb>) {
    let consumer_db = t.pool(4).await;
    let seen = Seen::default();
    let rt = consumer(&consumer_db, &seen).await;
    let producer_db = t.pool(4).await;
    let mut tuning = Profile::Relaxed.runtime();
    tuning.notify_coalesce = WINDOW;
    let producer = Outbox::builder(producer_db.clone())
        .runtime_tuning(tuning)
        .queue(QueueSpec::new("wake", 1))
        .connect()
        .await
        .expect("connect producer");
    // What producers announce: `i` carried by an enqueue, `t` trailing.
    let mut listener = PgListener::connect_with(producer_db.get_postgres_connection_pool())
        .await
        .expect("listen");
    listener.listen("outbox_wake").await.expect("listen");
    // Let the consumer's first pass and its LISTEN settle.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. Carries the NOTIFY.
    let first = producer_db.begin().await.expect("begin");
    producer
        .enqueue(&first, NewMessage::new("wake", 0, "carried"))
        .await
        .expect("enqueue");
    first.commit().await.expect("commit");
    // 2. Within the window: no NOTIFY of its own; commits before the trailing one.
    let second = producer_db.begin().await.expect("begin");
    producer
        .enqueue(&second, NewMessage::new("wake", 0, "trailed"))
        .await
        .expect("enqueue");
    tokio::time::sleep(Duration::from_millis(50)).await;
    second.commit().await.expect("commit");
    seen.wait_until(
        WOKEN_WITHIN,
        "the trailing notification to wake the consumer",
        |d| d.len() >= 2,
    )
    .await;

    // 3. Let the window pass so the next enqueue carries the NOTIFY, then one that
    //    commits long after the trailing notification: found by the re-checks it armed.
    tokio::time::sleep(WINDOW * 2).await;
    let third = producer_db.begin().await.expect("begin");
    producer
        .enqueue(&third, NewMessage::new("wake", 0, "carried-2"))
        .await
        .expect("enqueue");
    third.commit().await.expect("commit");
    let late = producer_db.begin().await.expect("begin");
    producer
        .enqueue(&late, NewMessage::new("wake", 0, "late"))
        .await
        .expect("enqueue");
    tokio::time::sleep(WINDOW + Duration::from_millis(400)).await;
    late.commit().await.expect("commit");
    seen.wait_until(
        WOKEN_WITHIN,
        "the re-checks after the trailing notification to find the late commit",
        |d| d.len() >= 4,
    )
    .await;
    let order: Vec<_> = seen.of("h").iter().map(|d| d.body.clone()).collect();
    assert_eq!(order, ["carried", "trailed", "carried-2", "late"]);
    let mut announced = Vec::new();
    while let Ok(Ok(Some(n))) =
        tokio::time::timeout(Duration::from_millis(200), listener.try_recv()).await
    {
        if !n.payload().starts_with("s:") {
            announced.push(n.payload().to_owned());
        }
    }
    assert_eq!(
        announced,
        ["i", "t", "i", "t"],
        "one NOTIFY per window and one trailing notification per burst"
    );
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    assert_invariants(&consumer_db, "outbox_").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_coalesced_enqueues_still_wake_another_process() {
    outbox_tests::run(
        Kind::Postgres,
        coalesced_enqueues_still_wake_another_process,
    )
    .await;
}
