//! Depth counts: exact after a scripted sequence (unsequenced, stored, pending, retrying,
//! leased, blocked, dead).

use std::sync::Arc;
use std::time::Duration;

use outbox::{HandlerError, HandlerSpec, NewMessage, Outbox, Overrides, QueueSpec};
use outbox_tests::{Harness, TestDb, on_every_backend};

/// Depth counts are exact after a scripted sequence: unsequenced before any runtime, then
/// pending, retrying and dead per handler.
async fn depth_counts_are_exact(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let producer = Outbox::builder(db.clone())
        .queue(QueueSpec::new("depth", 3))
        .connect()
        .await
        .expect("connect");
    for (p, n) in [(0u32, 5), (1, 3), (2, 1)] {
        for i in 0..n {
            producer
                .enqueue(&db, NewMessage::new("depth", p, format!("{p}-{i}")))
                .await
                .expect("enqueue");
        }
    }
    let d = producer.depth("depth").await.expect("depth");
    assert_eq!(
        (d.unsequenced, d.stored, d.handlers.len()),
        (9, 0, 0),
        "{d:?}"
    );
    // Partition 0 retries its head for a long time, partition 1 dead-letters its head, 2 is fine.
    let handler = HandlerSpec::transactional("depth", "h", |m, _| {
        let body = String::from_utf8_lossy(m.payload()).into_owned();
        Box::pin(async move {
            match body.as_str() {
                "0-0" => Err(HandlerError::retry("later")),
                "1-0" => Err(HandlerError::reject("never")),
                _ => Ok(()),
            }
        })
    })
    .overrides(
        Overrides::NONE
            .backoff_base(Duration::from_secs(600))
            .backoff_max(Duration::from_secs(600)),
    );
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("depth", 3)).handler(handler)
    })
    .await;
    h.wait_depth("depth", "settled", |d| {
        d.unsequenced == 0 && d.handlers[0].pending == 5 && d.handlers[0].dead == 1
    })
    .await;
    let d = h.depth("depth").await;
    assert_eq!((d.unsequenced, d.stored), (0, 9), "{d:?}");
    let handler = &d.handlers[0];
    assert_eq!(
        (
            handler.pending,
            handler.retrying_partitions,
            handler.leased_partitions,
            handler.blocked_partitions,
            handler.dead
        ),
        (5, 1, 0, 0, 1),
        "{handler:?}"
    );
    h.finish().await;
}

on_every_backend!(depth_counts_are_exact,);
