//! Guarantee 1, atomic enqueue: a message exists iff the caller's transaction commits, and a
//! committed message is delivered, also when it was enqueued before any runtime ran.

use std::sync::Arc;
use std::time::Duration;

use outbox::sea_orm::TransactionTrait;
use outbox::{NewMessage, Outbox, QueueSpec};
use outbox_tests::{Harness, Seen, TestDb, on_every_backend};

use super::{WAIT, bodies, recorder};

/// Guarantee 1: enqueue joins the caller's transaction; rollback (also of a savepoint) means
/// the message never existed.
async fn enqueue_commits_and_rolls_back_with_the_caller(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("atomic", 2))
            .handler(recorder("atomic", "h", &seen))
    })
    .await;

    let txn = db.begin().await.expect("begin");
    h.enqueue_in(&txn, NewMessage::new("atomic", 0, "rolled-back"))
        .await;
    txn.rollback().await.expect("rollback");

    let txn = db.begin().await.expect("begin");
    h.enqueue_in(&txn, NewMessage::new("atomic", 0, "outer-1"))
        .await;
    let sp = txn.begin().await.expect("savepoint");
    h.enqueue_in(&sp, NewMessage::new("atomic", 0, "inner"))
        .await;
    sp.rollback().await.expect("rollback savepoint");
    h.enqueue_in(&txn, NewMessage::new("atomic", 0, "outer-2"))
        .await;
    // Not visible to the workers before commit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        seen.all().is_empty(),
        "delivered before commit: {:?}",
        seen.all()
    );
    txn.commit().await.expect("commit");

    seen.wait_until(WAIT, "two messages", |d| d.len() >= 2)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bodies(&seen.all()), ["outer-1", "outer-2"]);
    let depth = h.depth("atomic").await;
    assert_eq!(depth.unsequenced, 0);
    assert_eq!(depth.handlers[0].pending, 0);
    h.finish().await;
}

/// Producer-only processes: enqueue without workers is durable; a runtime started later
/// delivers what was enqueued before it started.
async fn producer_only_then_start_delivers_the_backlog(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let producer = Outbox::builder(db.clone())
        .queue(QueueSpec::new("backlog", 2))
        .connect()
        .await
        .expect("connect");
    for i in 0..10 {
        producer
            .enqueue(&db, NewMessage::new("backlog", i % 2, format!("{i}")))
            .await
            .expect("enqueue");
    }
    // A fresh pool sees them: durable on return.
    let other = t.pool(2).await;
    let fresh = Outbox::builder(other)
        .queue(QueueSpec::new("backlog", 2))
        .connect()
        .await
        .expect("connect");
    assert_eq!(fresh.depth("backlog").await.expect("depth").unsequenced, 10);
    let seen = Seen::default();
    // No profile: the runtime's defaults.
    let h = Harness::start_builder(
        db.clone(),
        Outbox::builder(db.clone())
            .queue(QueueSpec::new("backlog", 2))
            .handler(recorder("backlog", "h", &seen)),
    )
    .await;
    seen.wait_until(WAIT, "backlog", |d| d.len() == 10).await;
    h.finish().await;
}

on_every_backend!(
    enqueue_commits_and_rolls_back_with_the_caller,
    producer_only_then_start_delivers_the_backlog,
);
