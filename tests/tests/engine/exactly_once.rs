//! Guarantee 3, transactional handlers: effects commit iff the cursor advances, exactly once,
//! also with several runtimes on one database.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use outbox::sea_orm::DatabaseConnection;
use outbox::{DeadLetterFilter, HandlerError, HandlerSpec, NewMessage, Overrides, QueueSpec};
use outbox_tests::{
    Harness, TestDb, create_effects_table, effects, on_every_backend, write_effect,
};

/// Guarantee 3: a transactional handler's writes commit iff the cursor advances; errors and
/// panics (also after partial writes) leave no effect, and retries end with exactly one.
async fn transactional_effects_happen_exactly_once(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    create_effects_table(&db).await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let handler = HandlerSpec::transactional("effects", "writer", move |m, txn| {
        c.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            write_effect(txn, "writer", m).await?;
            let n: u32 = String::from_utf8_lossy(m.payload()).parse().unwrap_or(0);
            if m.attempt() == 1 && n.is_multiple_of(5) {
                return Err(HandlerError::retry("fails after writing its effect"));
            }
            if m.attempt() == 1 && n.is_multiple_of(7) {
                panic!("handler panics after writing its effect");
            }
            Ok(())
        })
    })
    .overrides(
        Overrides::NONE
            .backoff_base(Duration::from_millis(10))
            .backoff_max(Duration::from_millis(40))
            .batch_size(8),
    );
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("effects", 4)).handler(handler)
    })
    .await;
    let n = 120u32;
    let batch: Vec<NewMessage> = (1..=n)
        .map(|i| NewMessage::new("effects", i % 4, i.to_string()))
        .collect();
    h.enqueue_committed(&batch).await;
    h.wait_drained("effects").await;
    let rows = effects(&db).await;
    assert_eq!(
        rows.len(),
        n as usize,
        "every message has exactly one effect"
    );
    let mut bodies: Vec<u32> = rows.iter().map(|r| r.3.parse().expect("number")).collect();
    bodies.sort();
    assert_eq!(bodies, (1..=n).collect::<Vec<_>>());
    for part in 0..4 {
        let seqs: Vec<i64> = rows.iter().filter(|r| r.1 == part).map(|r| r.2).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as i64).collect::<Vec<_>>(),
            "partition {part} effects out of order"
        );
    }
    assert!(calls.load(Ordering::Relaxed) > n, "failures were retried");
    assert_eq!(
        h.outbox()
            .count_dead_letters(&DeadLetterFilter::all())
            .await
            .expect("count"),
        0
    );
    h.finish().await;
}

/// Guarantees 2 and 3 across runtimes: two runtimes with their own pools on one database share
/// the work with no duplicate effect and keep order per partition.
async fn two_runtimes_share_work_without_duplicates(t: Arc<TestDb>) {
    let setup = t.pool(4).await;
    create_effects_table(&setup).await;
    let start = |db: DatabaseConnection| {
        Harness::start(db, |b| {
            b.queue(QueueSpec::new("shared", 8)).handler(
                HandlerSpec::transactional("shared", "writer", |m, txn| {
                    Box::pin(async move { Ok(write_effect(txn, "writer", m).await?) })
                })
                .overrides(Overrides::NONE.batch_size(10)),
            )
        })
    };
    let (db1, db2) = (t.pool(8).await, t.pool(8).await);
    let a = start(db1.clone()).await;
    let b = start(db2.clone()).await;
    let n = 800u32;
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        let msgs: Vec<_> = chunk
            .iter()
            .map(|i| NewMessage::new("shared", i % 8, i.to_string()))
            .collect();
        a.enqueue_committed(&msgs).await;
    }
    a.wait_depth("shared", "drained", |d| {
        d.unsequenced == 0 && d.handlers[0].pending == 0
    })
    .await;
    let rows = effects(&setup).await;
    assert_eq!(rows.len(), n as usize, "lost or duplicated effects");
    for part in 0..8 {
        let seqs: Vec<i64> = rows.iter().filter(|r| r.1 == part).map(|r| r.2).collect();
        assert_eq!(
            seqs,
            (1..=n as i64 / 8).collect::<Vec<_>>(),
            "partition {part}"
        );
        let b: Vec<u32> = rows
            .iter()
            .filter(|r| r.1 == part)
            .map(|r| r.3.parse().expect("n"))
            .collect();
        let mut sorted = b.clone();
        sorted.sort();
        assert_eq!(b, sorted, "partition {part} effects out of enqueue order");
    }
    // Both stop before the stored state is checked: a running one may hold a lease.
    a.stop().await;
    b.finish().await;
}

on_every_backend!(
    transactional_effects_happen_exactly_once,
    two_runtimes_share_work_without_duplicates,
);
