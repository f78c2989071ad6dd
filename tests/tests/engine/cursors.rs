//! Guarantees 6 and 7, one cursor per handler: fan-out (every handler sees every message, in
//! order) and vacuum (rows go only once every handler's cursor passed them).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use outbox::{HandlerError, HandlerSpec, NewMessage, Outbox, Overrides, Profile, QueueSpec};
use outbox_tests::{Seen, TestDb, eventually, on_every_backend};

use super::{WAIT, leased_recorder, recorder};

/// Guarantee 6: several handlers of one queue each see every message, in order.
async fn every_handler_sees_every_message(t: Arc<TestDb>) {
    let db = t.pool(12).await;
    let seen = Seen::default();
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("fan", 2))
        .handler(recorder("fan", "projection", &seen))
        .handler(leased_recorder("fan", "mailer", &seen))
        .start()
        .await
        .expect("start");
    let batch: Vec<NewMessage> = (0..40)
        .map(|i| NewMessage::new("fan", i % 2, format!("{i:03}")))
        .collect();
    rt.enqueue_batch(&db, &batch).await.expect("enqueue");
    seen.wait_until(WAIT, "both handlers", |d| d.len() >= 80)
        .await;
    for h in ["projection", "mailer"] {
        let mine = seen.of(h);
        assert_eq!(mine.len(), 40, "{h}");
        for part in 0..2 {
            let b: Vec<_> = mine
                .iter()
                .filter(|d| d.partition == part)
                .map(|d| d.body.clone())
                .collect();
            let mut sorted = b.clone();
            sorted.sort();
            assert_eq!(b, sorted, "{h} partition {part}");
        }
    }
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// Guarantee 7: vacuum deletes only what every handler of the queue has processed.
async fn vacuum_keeps_what_any_handler_still_needs(t: Arc<TestDb>) {
    let db = t.pool(12).await;
    let seen = Seen::default();
    let slow_ok = Arc::new(AtomicBool::new(false));
    let (s, ok) = (seen.clone(), slow_ok.clone());
    let slow = HandlerSpec::transactional("vac", "slow", move |m, _txn| {
        s.push("slow", m);
        let pass = ok.load(Ordering::SeqCst);
        Box::pin(async move {
            if pass {
                Ok(())
            } else {
                Err(HandlerError::retry("not yet"))
            }
        })
    })
    .overrides(
        Overrides::NONE
            .backoff_base(Duration::from_millis(50))
            .backoff_max(Duration::from_millis(50))
            .max_attempts(1_000_000),
    );
    let mut tuning = Profile::LowLatency.runtime();
    tuning.vacuum_interval = Duration::from_millis(50);
    tuning.vacuum_after_acks = 1;
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .runtime_tuning(tuning)
        .queue(QueueSpec::new("vac", 2))
        .handler(recorder("vac", "fast", &seen))
        .handler(slow)
        .start()
        .await
        .expect("start");
    let batch: Vec<NewMessage> = (0..30)
        .map(|i| NewMessage::new("vac", i % 2, format!("{i}")))
        .collect();
    rt.enqueue_batch(&db, &batch).await.expect("enqueue");
    seen.wait_until(WAIT, "fast handler done", |d| {
        d.iter().filter(|d| d.handler == "fast").count() == 30
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let depth = rt.depth("vac").await.expect("depth");
    assert_eq!(
        depth.stored, 30,
        "vacuum removed rows the slow handler has not processed"
    );
    slow_ok.store(true, Ordering::SeqCst);
    let o = rt.outbox().clone();
    eventually(WAIT, "vacuumed after both handlers", || {
        let o = o.clone();
        async move { o.depth("vac").await.map(|d| d.stored == 0).unwrap_or(false) }
    })
    .await;
    let slow_bodies: std::collections::BTreeSet<_> =
        seen.of("slow").into_iter().map(|d| d.body).collect();
    assert_eq!(
        slow_bodies.len(),
        30,
        "slow handler saw every message before vacuum"
    );
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

on_every_backend!(
    every_handler_sees_every_message,
    vacuum_keeps_what_any_handler_still_needs,
);
