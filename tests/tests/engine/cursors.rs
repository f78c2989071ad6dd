//! Guarantees 6 and 7, one cursor per handler: fan-out (every handler sees every message, in
//! order) and vacuum (rows go only once every handler's cursor passed them).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use outbox::{HandlerError, HandlerSpec, NewMessage, Overrides, Profile, QueueSpec};
use outbox_tests::{Harness, Seen, TestDb, on_every_backend};

use super::{WAIT, leased_recorder, recorder};

/// Guarantee 6: several handlers of one queue each see every message, in order.
async fn every_handler_sees_every_message(t: Arc<TestDb>) {
    let db = t.pool(12).await;
    let seen = Seen::default();
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("fan", 2))
            .handler(recorder("fan", "projection", &seen))
            .handler(leased_recorder("fan", "mailer", &seen))
    })
    .await;
    let batch: Vec<NewMessage> = (0..40)
        .map(|i| NewMessage::new("fan", i % 2, format!("{i:03}")))
        .collect();
    h.enqueue_batch(&batch).await;
    seen.wait_until(WAIT, "both handlers", |d| d.len() >= 80)
        .await;
    for handler in ["projection", "mailer"] {
        let mine = seen.of(handler);
        assert_eq!(mine.len(), 40, "{handler}");
        for part in 0..2 {
            let b: Vec<_> = mine
                .iter()
                .filter(|d| d.partition == part)
                .map(|d| d.body.clone())
                .collect();
            let mut sorted = b.clone();
            sorted.sort();
            assert_eq!(b, sorted, "{handler} partition {part}");
        }
    }
    h.finish().await;
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
    let h = Harness::start(db.clone(), |b| {
        b.runtime_tuning(tuning)
            .queue(QueueSpec::new("vac", 2))
            .handler(recorder("vac", "fast", &seen))
            .handler(slow)
    })
    .await;
    let batch: Vec<NewMessage> = (0..30)
        .map(|i| NewMessage::new("vac", i % 2, format!("{i}")))
        .collect();
    h.enqueue_batch(&batch).await;
    seen.wait_until(WAIT, "fast handler done", |d| {
        d.iter().filter(|d| d.handler == "fast").count() == 30
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let depth = h.depth("vac").await;
    assert_eq!(
        depth.stored, 30,
        "vacuum removed rows the slow handler has not processed"
    );
    slow_ok.store(true, Ordering::SeqCst);
    h.wait_depth("vac", "vacuumed after both handlers", |d| d.stored == 0)
        .await;
    let slow_bodies: std::collections::BTreeSet<_> =
        seen.of("slow").into_iter().map(|d| d.body).collect();
    assert_eq!(
        slow_bodies.len(),
        30,
        "slow handler saw every message before vacuum"
    );
    h.finish().await;
}

/// Vacuum reaches every partition of a queue wider than one vacuum step (64 partitions),
/// although it asks the database only for partitions with something to delete.
async fn vacuum_reaches_every_partition_of_a_wide_queue(t: Arc<TestDb>) {
    const PARTITIONS: u32 = 200;
    let db = t.pool(12).await;
    let seen = Seen::default();
    let mut tuning = Profile::LowLatency.runtime();
    tuning.vacuum_interval = Duration::from_millis(50);
    tuning.vacuum_after_acks = 1;
    let h = Harness::start(db.clone(), |b| {
        b.runtime_tuning(tuning)
            .queue(QueueSpec::new("wide", PARTITIONS))
            .handler(recorder("wide", "all", &seen))
    })
    .await;
    // Two messages in the first half of the partitions, one in the rest.
    let batch: Vec<NewMessage> = (0..PARTITIONS + PARTITIONS / 2)
        .map(|i| NewMessage::new("wide", i % PARTITIONS, format!("{i}")))
        .collect();
    h.enqueue_batch(&batch).await;
    seen.wait_until(WAIT, "every message handled", |d| d.len() == batch.len())
        .await;
    h.wait_depth("wide", "every partition vacuumed", |d| d.stored == 0)
        .await;
    h.finish().await;
}

on_every_backend!(
    every_handler_sees_every_message,
    vacuum_keeps_what_any_handler_still_needs,
    vacuum_reaches_every_partition_of_a_wide_queue,
);
