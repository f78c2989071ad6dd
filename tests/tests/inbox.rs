//! The receiving side's inbox (issue 12): a message id recorded in the receiver's own
//! transaction makes a redelivery a no-op, on every backend.

use std::sync::Arc;
use std::time::Duration;

use outbox::inbox::Inbox;
use outbox::sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};
use outbox_tests::{TestDb, scalar};

/// Applies one delivery the way a consumer would: the id and the effect in one transaction.
async fn apply(db: &DatabaseConnection, inbox: &Inbox, id: &str) -> bool {
    let txn = db.begin().await.expect("begin");
    let first = inbox.receive(&txn, id).await.expect("receive");
    if first {
        txn.execute_unprepared("INSERT INTO applied (n) VALUES (1)")
            .await
            .expect("effect");
    }
    txn.commit().await.expect("commit");
    first
}

async fn setup(db: &TestDb) -> (DatabaseConnection, Inbox) {
    let pool = db.pool(4).await;
    pool.execute_unprepared("CREATE TABLE applied (n INTEGER NOT NULL)")
        .await
        .expect("create applied");
    let inbox = Inbox::new("rcv_").expect("valid prefix");
    inbox.create_table(&pool).await.expect("create inbox");
    inbox
        .create_table(&pool)
        .await
        .expect("create is idempotent");
    (pool, inbox)
}

async fn a_redelivery_is_applied_once(db: Arc<TestDb>) {
    let (pool, inbox) = setup(&db).await;
    assert!(apply(&pool, &inbox, "i1/orders/0/1").await);
    assert!(
        !apply(&pool, &inbox, "i1/orders/0/1").await,
        "a copy is absorbed"
    );
    assert!(apply(&pool, &inbox, "i1/orders/0/2").await);
    assert_eq!(scalar(&pool, "SELECT COUNT(*) FROM applied").await, 2);

    // A receipt that rolls back leaves no trace: the redelivery is applied.
    let txn = pool.begin().await.expect("begin");
    assert!(inbox.receive(&txn, "i1/orders/0/3").await.expect("receive"));
    txn.rollback().await.expect("rollback");
    assert!(apply(&pool, &inbox, "i1/orders/0/3").await);
    assert_eq!(scalar(&pool, "SELECT COUNT(*) FROM applied").await, 3);
}

async fn concurrent_copies_apply_once(db: Arc<TestDb>) {
    let (pool, inbox) = setup(&db).await;
    let first = pool.begin().await.expect("begin");
    assert!(inbox.receive(&first, "i1/q/0/9").await.expect("receive"));
    // The copy waits for the first transaction and sees it committed.
    let copy = {
        let (pool, inbox) = (pool.clone(), inbox.clone());
        tokio::spawn(async move { apply(&pool, &inbox, "i1/q/0/9").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!copy.is_finished(), "the copy waits for the first receipt");
    first
        .execute_unprepared("INSERT INTO applied (n) VALUES (1)")
        .await
        .expect("effect");
    first.commit().await.expect("commit");
    assert!(!copy.await.expect("copy task"), "the copy is absorbed");
    assert_eq!(scalar(&pool, "SELECT COUNT(*) FROM applied").await, 1);
}

async fn cleanup_removes_ids_past_the_retention_window(db: Arc<TestDb>) {
    let (pool, inbox) = setup(&db).await;
    for id in ["a", "b", "c"] {
        assert!(apply(&pool, &inbox, id).await);
    }
    assert_eq!(
        inbox.cleanup(&pool).await.expect("cleanup"),
        0,
        "within 7 days"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let short = inbox.clone().retention(Duration::from_millis(10));
    assert_eq!(short.cleanup(&pool).await.expect("cleanup"), 3);
    assert_eq!(scalar(&pool, "SELECT COUNT(*) FROM rcv_inbox").await, 0);
    // After cleanup an old id counts as new again: the window must outlast redeliveries.
    assert!(apply(&pool, &inbox, "a").await);
}

async fn bad_ids_and_prefixes_are_typed_errors(db: Arc<TestDb>) {
    let (pool, inbox) = setup(&db).await;
    let long = "x".repeat(outbox::inbox::MAX_ID_BYTES + 1);
    for bad in ["", long.as_str(), "é"] {
        assert!(inbox.receive(&pool, bad).await.is_err(), "{bad:?}");
    }
    assert!(Inbox::new("Bad-Prefix").is_err());
    assert_eq!(scalar(&pool, "SELECT COUNT(*) FROM rcv_inbox").await, 0);
}

outbox_tests::on_every_backend!(
    a_redelivery_is_applied_once,
    #[skip(sqlite = "one writer: a second transaction cannot run beside the first")]
    concurrent_copies_apply_once,
    cleanup_removes_ids_past_the_retention_window,
    bad_ids_and_prefixes_are_typed_errors,
);
