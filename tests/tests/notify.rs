//! PostgreSQL wake-ups across processes when producers coalesce their NOTIFYs.
//!
//! Only the first enqueue of a coalescing window carries a NOTIFY; the others rely on a
//! trailing notification and on the listeners' quick re-checks after it. The consumer here
//! polls every 5 s (`Relaxed`), so a message found well before that was found by a wake-up.
//! The producer is a second `Outbox` on its own pool: to the consumer it is another process.

use std::sync::Arc;
use std::time::Duration;

use outbox::sea_orm::TransactionTrait;
use outbox::sea_orm::sqlx::postgres::PgListener;
use outbox::{HandlerSpec, NewMessage, Outbox, Profile, QueueSpec};
use outbox_tests::{Kind, Seen, TestDb, assert_invariants};

const WINDOW: Duration = Duration::from_millis(300);
/// Well below the consumer's 5 s poll interval.
const WOKEN_WITHIN: Duration = Duration::from_millis(2_500);

async fn coalesced_enqueues_still_wake_another_process(t: Arc<TestDb>) {
    let consumer_db = t.pool(4).await;
    let seen = Seen::default();
    let rt = {
        let seen = seen.clone();
        Outbox::builder(consumer_db.clone())
            .profile(Profile::Relaxed)
            .queue(QueueSpec::new("wake", 1))
            .handler(HandlerSpec::leased("wake", "h", move |m, _ctx| {
                seen.push("h", m);
                Box::pin(async { Ok(()) })
            }))
            .start()
            .await
            .expect("start consumer")
    };
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
