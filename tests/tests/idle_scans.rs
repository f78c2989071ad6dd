//! An idle handler does not re-read its cursors at every poll while nothing changes in the
//! database, and still finds what another process commits, what another process's sequencer
//! moves, and a retry that comes due.
//!
//! SQLite: a watch on the database file tells that nothing was written. PostgreSQL and
//! MariaDB: a poll reads the count of changes that sequencers and operators mark, one row,
//! and reads the cursors only when it moved. The scans are counted by `outbox_scans_total`;
//! the process-wide recorder is installed once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use outbox::sea_orm::TransactionTrait;
use outbox::{HandlerError, HandlerSpec, NewMessage, Outbox, Overrides, Profile, QueueSpec};
use outbox_tests::{Seen, TestDb, assert_invariants, on_every_backend, recorder};

/// The handler's retry delay after its one failure.
const RETRY: Duration = Duration::from_millis(300);
/// Well below the 10 s the runtime waits at most between two reads of its cursors.
const FOUND_WITHIN: Duration = Duration::from_millis(2_500);

/// Scans of the handlers of `queue` since the last call. Each backend's test has its own queue
/// name: they run at once and share the recorder.
fn scans(queue: &str) -> u64 {
    recorder::since_last(queue, outbox::metrics::SCANS)
}

/// After `settle`, the handlers of `queue` read their cursors at most once in 3 s of idle
/// polling (60 polls at 50 ms; 3 on PostgreSQL, which polls once a second).
async fn assert_idle(queue: &str, settle: Duration, when: &str) {
    tokio::time::sleep(settle).await;
    let _ = scans(queue);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = scans(queue);
    eprintln!("{when}: {idle} reads in 3 s");
    assert!(idle <= 1, "{when}: {idle} reads of the cursors in 3 s");
}

async fn an_idle_handler_does_not_rescan_an_unchanged_database(t: Arc<TestDb>) {
    recorder::install();
    let queue: &'static str = format!("idle_{:?}", t.kind).to_lowercase().leak();
    let db = t.pool(6).await;
    let seen = Seen::default();
    let failed_once = Arc::new(AtomicU32::new(0));
    let handler = {
        let (seen, failed_once) = (seen.clone(), failed_once.clone());
        HandlerSpec::transactional(queue, "h", move |m, _txn| {
            let fail = m.payload() == b"flaky" && failed_once.fetch_add(1, Ordering::SeqCst) == 0;
            if !fail {
                seen.push("h", m);
            }
            Box::pin(async move {
                if fail {
                    Err(HandlerError::retry(std::io::Error::other("once")))
                } else {
                    Ok(())
                }
            })
        })
        .overrides(Overrides::NONE.backoff_base(RETRY).backoff_max(RETRY))
    };
    // LowLatency polls every 50 ms (PostgreSQL: once a second).
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new(queue, 64))
        .handler(handler)
        .start()
        .await
        .expect("start");
    let producer_db = t.pool(2).await;
    let producer = Outbox::builder(producer_db.clone())
        .queue(QueueSpec::new(queue, 64))
        .connect()
        .await
        .expect("connect producer");
    let commit = |body: &'static str| {
        let (producer, producer_db) = (producer.clone(), producer_db.clone());
        async move {
            let txn = producer_db.begin().await.expect("begin");
            producer
                .enqueue(&txn, NewMessage::new(queue, 7, body))
                .await
                .expect("enqueue");
            txn.commit().await.expect("commit");
        }
    };

    // 1. Idle: the polls skip their reads.
    assert_idle(queue, Duration::from_secs(1), "idle").await;

    // 2. Another process commits: the watch (SQLite), NOTIFY (PostgreSQL) or the poll
    //    (MariaDB) wakes the sequencer, which wakes the handler.
    commit("other").await;
    seen.wait_until(FOUND_WITHIN, "the commit of another process", |d| {
        d.len() == 1
    })
    .await;

    // 3. A retry comes due while nothing writes: the poll at its due time reads.
    commit("flaky").await;
    seen.wait_until(
        FOUND_WITHIN,
        "the retry that came due while the database was quiet",
        |d| d.len() == 2,
    )
    .await;
    assert_eq!(
        failed_once.load(Ordering::SeqCst),
        2,
        "failed once, then handled"
    );
    assert!(
        scans(queue) > 0,
        "wake-ups and the due retry read the cursors"
    );

    // 4. Idle again, once vacuum removed what was handled (SQLite's watch sees that write).
    assert_idle(queue, Duration::from_secs(3), "idle after work").await;

    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    assert_invariants(&db, "outbox_").await;
}

/// Rows that another process's sequencer moved reach a handler here whose polls skip their
/// reads. The consumer's own sequencer polls every 5 s (`Relaxed`), so on MariaDB only the
/// producer's mark of its pass tells the handler in time; on PostgreSQL (NOTIFY) and SQLite
/// (the file watch) the consumer's sequencer may take the rows first, which is found too.
async fn rows_another_sequencer_moved_reach_an_idle_handler(t: Arc<TestDb>) {
    recorder::install();
    let db = t.pool(6).await;
    let seen = Seen::default();
    let handler = {
        let seen = seen.clone();
        HandlerSpec::transactional("elsewhere", "h", move |m, _txn| {
            seen.push("h", m);
            Box::pin(async { Ok(()) })
        })
        .overrides(Overrides::NONE.poll_interval(Duration::from_millis(50)))
    };
    let consumer = Outbox::builder(db.clone())
        .profile(Profile::Relaxed)
        .queue(QueueSpec::new("elsewhere", 64))
        .handler(handler)
        .start()
        .await
        .expect("start the consumer");
    let producer_db = t.pool(6).await;
    let producer = Outbox::builder(producer_db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("elsewhere", 64))
        .start()
        .await
        .expect("start the producer (a sequencer, no handler)");
    for (n, body) in ["one", "two"].into_iter().enumerate() {
        // Idle long enough for the consumer's polls to skip their reads.
        tokio::time::sleep(Duration::from_secs(1)).await;
        producer
            .outbox()
            .enqueue(&producer_db, NewMessage::new("elsewhere", 3, body))
            .await
            .expect("enqueue");
        seen.wait_until(FOUND_WITHIN, "rows another process sequenced", |d| {
            d.len() == n + 1
        })
        .await;
    }
    producer
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown the producer");
    consumer
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown the consumer");
    assert_invariants(&db, "outbox_").await;
}

/// A process that shuts down lets a partition go with work left: another process's idle
/// handler takes it at once, not at its next full read of the cursors (10 s) or when the lease
/// it saw would have expired. A handles one message per batch and is stopped inside its first;
/// B polls every 50 ms.
async fn a_partition_a_stopped_process_let_go_reaches_an_idle_handler(t: Arc<TestDb>) {
    recorder::install();
    let queue: &'static str = format!("handoff_{:?}", t.kind).to_lowercase().leak();
    let db = t.pool(6).await;
    let seen = Seen::default();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let gate = Arc::new(tokio::sync::Mutex::new(Some((started_tx, release_rx))));
    let first = {
        let (seen, gate) = (seen.clone(), gate.clone());
        HandlerSpec::leased(queue, "h", move |m, _ctx| {
            seen.push("a", m);
            let gate = gate.clone();
            Box::pin(async move {
                if let Some((started, release)) = gate.lock().await.take() {
                    let _ = started.send(());
                    let _ = release.await;
                }
                Ok(())
            })
        })
        .overrides(Overrides::NONE.batch_size(1))
    };
    let a = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new(queue, 4))
        .handler(first)
        .start()
        .await
        .expect("start A");
    let batch: Vec<NewMessage> = (0..5)
        .map(|i| NewMessage::new(queue, 0, format!("m{i}")))
        .collect();
    a.outbox()
        .enqueue_batch(&db, &batch)
        .await
        .expect("enqueue");
    started_rx.await.expect("A took the first message");

    let b_db = t.pool(6).await;
    let second = {
        let seen = seen.clone();
        HandlerSpec::leased(queue, "h", move |m, _ctx| {
            seen.push("b", m);
            Box::pin(async { Ok(()) })
        })
        .overrides(Overrides::NONE.poll_interval(Duration::from_millis(50)))
    };
    let b = Outbox::builder(b_db)
        .profile(Profile::Relaxed)
        .queue(QueueSpec::new(queue, 4))
        .handler(second)
        .start()
        .await
        .expect("start B");
    // B has seen the partition leased by A; its polls skip their reads.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let stopping = tokio::spawn(async move { a.shutdown(Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = release_tx.send(());
    stopping
        .await
        .expect("join")
        .expect("A shuts down within its grace");
    seen.wait_until(
        FOUND_WITHIN,
        "the rest of the partition A let go, handled by B",
        |d| d.len() == 5,
    )
    .await;
    let by_b = seen.of("b").len();
    assert!(by_b >= 1, "B handled none of the partition: {by_b}");
    b.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown B");
    assert_invariants(&db, "outbox_").await;
}

on_every_backend!(
    an_idle_handler_does_not_rescan_an_unchanged_database,
    rows_another_sequencer_moved_reach_an_idle_handler,
    a_partition_a_stopped_process_let_go_reaches_an_idle_handler,
);
