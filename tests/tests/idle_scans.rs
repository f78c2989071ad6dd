//! An idle handler does not re-read its cursors at every poll while nothing writes to the
//! database, and still finds what another process commits and a retry that comes due.
//!
//! SQLite only: a watch on the database file tells that nothing was written. PostgreSQL and
//! MariaDB are skipped: there every poll reads (on PostgreSQL at most once a second, NOTIFY
//! doing the rest). The scans are counted by `outbox_scans_total`; the process-wide recorder
//! is installed once.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use outbox::sea_orm::TransactionTrait;
use outbox::{HandlerError, HandlerSpec, NewMessage, Outbox, Overrides, Profile, QueueSpec};
use outbox_tests::{Seen, TestDb, assert_invariants, on_every_backend};

/// The handler's retry delay after its one failure.
const RETRY: Duration = Duration::from_millis(300);
/// Well below the 10 s the runtime waits at most between two reads of its cursors.
const FOUND_WITHIN: Duration = Duration::from_millis(2_500);

fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("install the recorder");
        snapshotter
    })
}

/// Scans of handler `h` of queue `idle` since the last call (a snapshot resets counters).
fn scans() -> u64 {
    snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, ..)| {
            let key = k.key();
            key.name() == outbox::metrics::SCANS
                && key
                    .labels()
                    .any(|l| l.key() == "queue" && l.value() == "idle")
        })
        .map(|(.., v)| match v {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

async fn an_idle_handler_does_not_rescan_an_unchanged_database(t: Arc<TestDb>) {
    snapshotter();
    let db = t.pool(4).await;
    let seen = Seen::default();
    let failed_once = Arc::new(AtomicU32::new(0));
    let handler = {
        let (seen, failed_once) = (seen.clone(), failed_once.clone());
        HandlerSpec::transactional("idle", "h", move |m, _txn| {
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
    // LowLatency polls every 50 ms: 40 polls in the 2 s measured below.
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("idle", 64))
        .handler(handler)
        .start()
        .await
        .expect("start");
    let producer_db = t.pool(2).await;
    let producer = Outbox::builder(producer_db.clone())
        .queue(QueueSpec::new("idle", 64))
        .connect()
        .await
        .expect("connect producer");
    let commit = |body: &'static str| {
        let (producer, producer_db) = (producer.clone(), producer_db.clone());
        async move {
            let txn = producer_db.begin().await.expect("begin");
            producer
                .enqueue(&txn, NewMessage::new("idle", 7, body))
                .await
                .expect("enqueue");
            txn.commit().await.expect("commit");
        }
    };

    // 1. Idle: the polls skip their reads.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = scans();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = scans();
    eprintln!("idle: {idle} reads in 2 s");
    assert!(
        idle <= 2,
        "{idle} reads of the cursors in 2 s of idle polling every 50 ms"
    );

    // 2. Another process commits: the watch wakes the sequencer, which wakes the handler.
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
    assert!(scans() > 0, "wake-ups and the due retry read the cursors");

    // 4. Idle again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = scans();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = scans();
    eprintln!("idle after work: {idle} reads in 2 s");
    assert!(
        idle <= 2,
        "{idle} reads of the cursors in 2 s idle after work"
    );

    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    assert_invariants(&db, "outbox_").await;
}

on_every_backend!(
    #[skip(
        postgres = "skipped: no file to watch; every poll reads (NOTIFY wakes the rest)",
        mysql = "skipped: no file to watch; every poll reads"
    )]
    an_idle_handler_does_not_rescan_an_unchanged_database,
);
