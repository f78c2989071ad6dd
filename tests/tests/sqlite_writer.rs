//! SQLite's single writer (issue 11): the runtime never holds the write lock long enough to
//! make a producer fail, and a leased ack that waited behind another writer keeps its lease.
//! PostgreSQL and MariaDB lock rows, not the database, so neither case exists there.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use outbox::sea_orm::TransactionTrait;
use outbox::{DeadLetterFilter, HandlerSpec, NewMessage, Outbox, Overrides, Profile, QueueSpec};
use outbox_tests::{Seen, TestDb, eventually, on_every_backend, wait_drained};

const WAIT: Duration = Duration::from_secs(60);

/// A transactional handler that runs 7 s on its first attempt: producers on connections with
/// sqlx's default 5 s busy timeout keep enqueueing while it runs, and the attempt is cut at
/// `sqlite_write_hold` as a counted failure, then retried. (Before: the handler held the
/// write lock for 7 s and the producers failed with `database is locked` after 5 s.)
async fn a_slow_transactional_handler_does_not_fail_producers(t: Arc<TestDb>) {
    let db = t.pool(4).await;
    let producers = t.pool(2).await;
    let seen = Seen::default();
    let inside = Arc::new(AtomicBool::new(false));
    let (s, flag) = (seen.clone(), inside.clone());
    let slow = HandlerSpec::transactional("slow", "h", move |m, _txn| {
        s.push("h", m);
        let first = m.attempt() == 1 && m.payload() == b"first";
        let flag = flag.clone();
        Box::pin(async move {
            if first {
                flag.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(7)).await;
            }
            Ok(())
        })
    })
    .overrides(
        Overrides::NONE
            .max_attempts(3)
            .backoff_base(Duration::from_millis(50))
            .backoff_max(Duration::from_millis(100)),
    );
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("slow", 1))
        .handler(slow)
        .start()
        .await
        .expect("start");
    rt.outbox()
        .enqueue(&db, NewMessage::new("slow", 0, "first"))
        .await
        .expect("enqueue");
    eventually(WAIT, "the slow handler runs", || {
        let inside = inside.clone();
        async move { inside.load(Ordering::SeqCst) }
    })
    .await;
    // Producers over the whole 7 s the handler would like to run, each in its own transaction.
    let mut slowest = Duration::ZERO;
    for i in 0..14 {
        let started = Instant::now();
        let txn = producers.begin().await.expect("begin");
        rt.outbox()
            .enqueue(&txn, NewMessage::new("slow", 0, format!("m{i}")))
            .await
            .unwrap_or_else(|e| panic!("enqueue {i} while the handler runs: {e}"));
        txn.commit()
            .await
            .unwrap_or_else(|e| panic!("commit {i} while the handler runs: {e}"));
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_drained(rt.outbox(), "slow", WAIT).await;
    let first: Vec<u32> = seen
        .all()
        .iter()
        .filter(|d| d.body == "first")
        .map(|d| d.attempt)
        .collect();
    assert_eq!(
        first,
        [1, 2],
        "the held attempt was cut, counted and retried"
    );
    let bodies: Vec<String> = seen
        .all()
        .into_iter()
        .filter(|d| d.attempt == 1 && d.body != "first")
        .map(|d| d.body)
        .collect();
    let expected: Vec<String> = (0..14).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, expected, "every produced message, once, in order");
    assert_eq!(
        rt.outbox()
            .count_dead_letters(&DeadLetterFilter::all())
            .await
            .expect("count"),
        0
    );
    eprintln!("slowest producer transaction while the handler ran: {slowest:?}");
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
}

/// A leased handler finishes within its lease, but its ack waits behind a producer that holds
/// the write lock past the lease's end: the ack was requested in time, so it is accepted and
/// the message is handled once. (Before: the ack was judged when it finally ran, refused as
/// late, and the message ran again until it was dead-lettered.)
async fn a_leased_ack_that_waited_for_the_writer_keeps_its_lease(t: Arc<TestDb>) {
    let db = t.pool(4).await;
    let producer = t.pool(2).await;
    let seen = Seen::default();
    let inside = Arc::new(AtomicBool::new(false));
    let go = Arc::new(AtomicBool::new(false));
    let (s, flag, release) = (seen.clone(), inside.clone(), go.clone());
    let leased = HandlerSpec::leased("acks", "h", move |m, _ctx| {
        s.push("h", m);
        let (flag, release) = (flag.clone(), release.clone());
        Box::pin(async move {
            flag.store(true, Ordering::SeqCst);
            while !release.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(())
        })
    })
    .overrides(
        Overrides::NONE
            .lease(Duration::from_secs(2))
            .lease_headroom(Duration::from_millis(500))
            .max_attempts(3)
            .backoff_base(Duration::from_millis(50))
            .backoff_max(Duration::from_millis(100)),
    );
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("acks", 1))
        .handler(leased)
        .start()
        .await
        .expect("start");
    rt.outbox()
        .enqueue(&db, NewMessage::new("acks", 0, "m"))
        .await
        .expect("enqueue");
    eventually(WAIT, "the leased handler runs", || {
        let inside = inside.clone();
        async move { inside.load(Ordering::SeqCst) }
    })
    .await;
    // A producer takes the write lock and keeps it 3 s, past the 2 s lease; the handler
    // returns at once, so its ack waits behind the producer (inside the 5 s busy timeout).
    let txn = outbox::sqlite::begin(&producer).await.expect("begin");
    rt.outbox()
        .enqueue(&txn, NewMessage::new("acks", 0, "held"))
        .await
        .expect("enqueue");
    go.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    txn.commit().await.expect("commit");
    wait_drained(rt.outbox(), "acks", WAIT).await;
    let runs: Vec<(String, u32)> = seen
        .all()
        .into_iter()
        .map(|d| (d.body, d.attempt))
        .collect();
    assert_eq!(
        runs,
        [("m".to_owned(), 1), ("held".to_owned(), 1)],
        "the ack requested within the lease was accepted: one run per message"
    );
    assert_eq!(
        rt.outbox()
            .count_dead_letters(&DeadLetterFilter::all())
            .await
            .expect("count"),
        0
    );
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
}

on_every_backend!(
    #[skip(
        postgres = "skipped on PostgreSQL: row locks, no single writer",
        mysql = "skipped on MariaDB: row locks, no single writer"
    )]
    a_slow_transactional_handler_does_not_fail_producers,
    #[skip(
        postgres = "skipped on PostgreSQL: row locks, no single writer",
        mysql = "skipped on MariaDB: row locks, no single writer"
    )]
    a_leased_ack_that_waited_for_the_writer_keeps_its_lease,
);
