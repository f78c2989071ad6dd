//! Guarantee 9, graceful shutdown: in-flight work finishes within the grace period, or is
//! cancelled with its lease released and delivered later.

use std::sync::Arc;
use std::time::Duration;

use outbox::{Builder, Error, HandlerSpec, NewMessage, QueueSpec};
use outbox_tests::{Harness, Seen, TestDb, on_every_backend};

use super::WAIT;

/// Guarantee 9: shutdown lets in-flight handlers finish within the grace period; past it, they
/// are cancelled, leases released, nothing half-acked, and the message is delivered later.
async fn graceful_shutdown_finishes_or_releases_work(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let configure = |sleep_ms: u64| {
        let s = seen.clone();
        move |b: Builder| {
            b.queue(QueueSpec::new("stop", 1))
                .handler(HandlerSpec::leased("stop", "h", move |m, _ctx| {
                    s.push("h", m);
                    Box::pin(async move {
                        tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
                        Ok(())
                    })
                }))
        }
    };
    let h = Harness::start(db.clone(), configure(300)).await;
    h.enqueue(NewMessage::new("stop", 0, "finishes")).await;
    seen.wait_until(WAIT, "handler started", |d| d.len() == 1)
        .await;
    h.running()
        .shutdown(Duration::from_secs(10))
        .await
        .expect("graceful shutdown");
    let depth = h.depth("stop").await;
    assert_eq!(
        (
            depth.handlers[0].pending,
            depth.handlers[0].leased_partitions
        ),
        (0, 0)
    );

    let h = Harness::start(db.clone(), configure(60_000)).await;
    h.enqueue(NewMessage::new("stop", 0, "cancelled")).await;
    seen.wait_until(WAIT, "slow handler started", |d| d.len() == 2)
        .await;
    let res = h.running().shutdown(Duration::from_millis(200)).await;
    assert!(matches!(res, Err(Error::ShutdownTimedOut(_))), "{res:?}");
    let depth = h.depth("stop").await;
    assert_eq!(
        (
            depth.handlers[0].pending,
            depth.handlers[0].leased_partitions
        ),
        (1, 0),
        "lease not released"
    );

    let h = Harness::start(db.clone(), configure(0)).await;
    seen.wait_until(WAIT, "redelivered after restart", |d| d.len() == 3)
        .await;
    assert_eq!(seen.all()[2].body, "cancelled");
    h.finish().await;
}

on_every_backend!(graceful_shutdown_finishes_or_releases_work,);
