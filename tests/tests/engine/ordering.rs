//! Guarantee 2, order per partition: commit order, dense sequences, no partition or open
//! producer transaction holding up the others, one batch of a (partition, handler) at a time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use outbox::sea_orm::{ConnectionTrait, Statement, TransactionTrait};
use outbox::{HandlerSpec, NewMessage, Overrides, QueueSpec};
use outbox_tests::{Harness, Seen, TestDb, on_every_backend};

use super::{WAIT, bodies, recorder};

/// A sequencing pass takes the oldest rows of every queue at once. A partition that another
/// sequencer holds is left to it, and the rest of the pass goes on: the other partition and
/// the other queue are delivered while it is held, and its own messages once it is released,
/// in order. (SQLite has one writer, so nothing else can hold a partition there.)
async fn a_held_partition_does_not_hold_up_the_others(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("held", 2))
            .queue(QueueSpec::new("other", 1))
            .handler(recorder("held", "h", &seen))
            .handler(recorder("other", "o", &seen))
    })
    .await;
    // Another sequencer's transaction, as it would hold partition 0 of `held`.
    let holder = db.begin().await.expect("begin");
    holder
        .query_one_raw(Statement::from_string(
            holder.get_database_backend(),
            "SELECT last_seq FROM outbox_partitions WHERE queue = 'held' AND partition_no = 0 FOR UPDATE",
        ))
        .await
        .expect("hold partition 0");
    let batch: Vec<_> = (0..6)
        .map(|i| NewMessage::new("held", i % 2, format!("p{}-{i}", i % 2)))
        .chain([NewMessage::new("other", 0, "o-0")])
        .collect();
    h.enqueue_batch(&batch).await;
    seen.wait_until(WAIT, "partition 1 and the other queue", |d| d.len() == 4)
        .await;
    assert!(
        seen.all()
            .iter()
            .all(|d| d.partition == 1 || d.handler == "o"),
        "nothing of the held partition before it is released: {:?}",
        seen.all()
    );
    holder.rollback().await.expect("release");
    seen.wait_until(WAIT, "the held partition after release", |d| d.len() == 7)
        .await;
    let held: Vec<_> = seen
        .of("h")
        .into_iter()
        .filter(|d| d.partition == 0)
        .map(|d| (d.seq, d.body))
        .collect();
    assert_eq!(
        held,
        [(1, "p0-0".into()), (2, "p0-2".into()), (3, "p0-4".into())]
    );
    h.finish().await;
}

/// Guarantee 2: a message whose transaction commits after one holding a higher id is not
/// skipped; it takes its place in commit order.
async fn late_commit_of_a_lower_id_is_delivered_in_commit_order(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("late", 1))
            .handler(recorder("late", "h", &seen))
    })
    .await;
    if !t.concurrent_writers() {
        // SQLite has a single writer: the earlier transaction commits first by construction.
        h.enqueue(NewMessage::new("late", 0, "A")).await;
        h.enqueue(NewMessage::new("late", 0, "B")).await;
        seen.wait_until(WAIT, "A and B", |d| d.len() == 2).await;
        assert_eq!(bodies(&seen.all()), ["A", "B"]);
        h.finish().await;
        return;
    }
    let a = db.begin().await.expect("begin a");
    h.outbox()
        .enqueue(&a, NewMessage::new("late", 0, "A-lower-id"))
        .await
        .expect("enqueue a");
    let b = db.begin().await.expect("begin b");
    h.outbox()
        .enqueue(&b, NewMessage::new("late", 0, "B-higher-id"))
        .await
        .expect("enqueue b");
    b.commit().await.expect("commit b");
    // B is delivered while A is still open: an open producer transaction stalls nothing.
    seen.wait_until(WAIT, "B while A is open", |d| d.len() == 1)
        .await;
    a.commit().await.expect("commit a");
    seen.wait_until(WAIT, "A after its commit", |d| d.len() == 2)
        .await;
    let all = seen.all();
    assert_eq!(bodies(&all), ["B-higher-id", "A-lower-id"]);
    assert_eq!(all.iter().map(|d| d.seq).collect::<Vec<_>>(), [1, 2]);
    h.finish().await;
}

/// Guarantee 2 against the sequencer's low-water mark (PostgreSQL starts its scan above the
/// ids it knows are settled): a producer transaction that drew a low id and stays open while
/// many later messages are sequenced, across several moves of the mark, is still delivered
/// when it commits. (A mark that rose to the highest id moved would skip it forever.)
async fn an_open_producer_holds_the_sequencers_low_water_mark(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("mark", 2))
            .handler(recorder("mark", "h", &seen))
    })
    .await;
    let open = db.begin().await.expect("begin");
    h.outbox()
        .enqueue(&open, NewMessage::new("mark", 0, "open"))
        .await
        .expect("enqueue in the open transaction");
    // Later messages commit one by one for about a second: many passes, each reading ids
    // above the open one, and several looks at the mark.
    for i in 0..40u32 {
        h.enqueue(NewMessage::new("mark", i % 2, format!("later-{i}")))
            .await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    seen.wait_until(WAIT, "the later messages", |d| d.len() == 40)
        .await;
    open.commit().await.expect("commit the open transaction");
    seen.wait_until(WAIT, "the open transaction's message", |d| d.len() == 41)
        .await;
    let all = seen.all();
    let last = all.last().expect("deliveries");
    assert_eq!(last.body, "open");
    assert_eq!(last.partition, 0);
    assert_eq!(
        last.seq, 21,
        "numbered after the 20 later messages of its partition"
    );
    h.finish().await;
}

/// Guarantee 2: with concurrent producers each partition is delivered densely in sequence
/// order, and each producer's messages keep their order.
async fn concurrent_producers_keep_order_per_partition(t: Arc<TestDb>) {
    let db = t.pool(12).await;
    let seen = Seen::default();
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("order", 3))
            .handler(recorder("order", "h", &seen))
    })
    .await;
    let producers = 4;
    let per = 60;
    let mut tasks = Vec::new();
    for p in 0..producers {
        let (db, ob) = (db.clone(), h.outbox().clone());
        tasks.push(tokio::spawn(async move {
            for j in 0..per {
                let txn = db.begin().await.expect("begin");
                let part = (j % 3) as u32;
                ob.enqueue(&txn, NewMessage::new("order", part, format!("{p}:{j:04}")))
                    .await
                    .expect("enqueue");
                if j % 2 == 0 {
                    ob.enqueue(&txn, NewMessage::new("order", part, format!("{p}:{j:04}b")))
                        .await
                        .expect("enqueue");
                }
                txn.commit().await.expect("commit");
            }
        }));
    }
    for task in tasks {
        task.await.expect("producer");
    }
    let total = producers * (per + per / 2);
    seen.wait_until(WAIT, "every message", |d| d.len() >= total)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let all = seen.all();
    assert_eq!(all.len(), total, "duplicates delivered");
    for part in 0..3 {
        let d: Vec<_> = all.iter().filter(|d| d.partition == part).collect();
        let seqs: Vec<i64> = d.iter().map(|d| d.seq).collect();
        assert_eq!(
            seqs,
            (1..=d.len() as i64).collect::<Vec<_>>(),
            "partition {part} not dense in order"
        );
        for p in 0..producers {
            let mine: Vec<&str> = d
                .iter()
                .map(|d| d.body.as_str())
                .filter(|b| b.starts_with(&format!("{p}:")))
                .collect();
            let mut sorted = mine.clone();
            sorted.sort();
            assert_eq!(mine, sorted, "producer {p} reordered in partition {part}");
        }
    }
    h.finish().await;
}

/// Guarantee 2: never two batches of one (partition, handler) at once, across runtimes with
/// their own pools; for both modes, measured inside the handlers.
async fn one_batch_per_partition_at_a_time_across_runtimes(t: Arc<TestDb>) {
    use std::collections::HashMap;
    use std::sync::Mutex;
    let in_flight: Arc<Mutex<HashMap<(String, u32), u32>>> = Arc::default();
    let overlaps = Arc::new(AtomicU32::new(0));
    let handled = Arc::new(AtomicU32::new(0));
    let guard = |name: &'static str| {
        let (in_flight, overlaps, handled) = (in_flight.clone(), overlaps.clone(), handled.clone());
        move |m: &outbox::Message| {
            let key = (name.to_owned(), m.partition());
            let (in_flight, overlaps, handled) =
                (in_flight.clone(), overlaps.clone(), handled.clone());
            Box::pin(async move {
                {
                    let mut f = in_flight.lock().expect("lock");
                    let n = f.entry(key.clone()).or_default();
                    *n += 1;
                    if *n > 1 {
                        overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
                *in_flight.lock().expect("lock").entry(key).or_default() -= 1;
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }) as outbox::HandlerFuture<'static>
        }
    };
    let mut runtimes = Vec::new();
    for _ in 0..2 {
        let db = t.pool(12).await;
        let (tx, leased) = (guard("tx"), guard("leased"));
        runtimes.push(
            Harness::start(db, |b| {
                b.queue(QueueSpec::new("excl", 4))
                    .handler(
                        HandlerSpec::transactional("excl", "tx", move |m, _| tx(m))
                            .overrides(Overrides::NONE.batch_size(4).concurrency(4)),
                    )
                    .handler(
                        HandlerSpec::leased("excl", "leased", move |m, _| leased(m))
                            .overrides(Overrides::NONE.batch_size(4).concurrency(4)),
                    )
            })
            .await,
        );
    }
    let db = t.pool(2).await;
    let batch: Vec<NewMessage> = (0..200)
        .map(|i| NewMessage::new("excl", i % 4, format!("{i}")))
        .collect();
    runtimes[0].enqueue_batch_in(&db, &batch).await;
    runtimes[1].wait_drained("excl").await;
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two batches of one partition ran at once"
    );
    assert!(handled.load(Ordering::SeqCst) >= 400);
    // Both stop before the stored state is checked: a running one may hold a lease.
    for h in runtimes {
        h.stop().await;
    }
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

on_every_backend!(
    late_commit_of_a_lower_id_is_delivered_in_commit_order,
    #[skip(
        sqlite = "skipped on SQLite: one writer, so no transaction can stay open while others commit"
    )]
    an_open_producer_holds_the_sequencers_low_water_mark,
    concurrent_producers_keep_order_per_partition,
    one_batch_per_partition_at_a_time_across_runtimes,
    #[skip(sqlite = "skipped on SQLite: one writer, so nothing else can hold a partition")]
    a_held_partition_does_not_hold_up_the_others,
);
