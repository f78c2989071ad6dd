//! Scheduled delivery (issue 13): a message is delivered never before its time by the
//! database's clock, takes its place at the tail of its partition when due, can be cancelled
//! by id or deduplication key until then, and shows in status.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use outbox::sea_orm::{ConnectionTrait, Statement};
use outbox::{EnqueueError, Enqueued, HandlerSpec, NewMessage, Outbox, QueueSpec};
use outbox_tests::{Harness, Seen, TestDb, eventually, on_every_backend};

const WAIT: Duration = Duration::from_secs(60);

/// The database's clock, in milliseconds since the Unix epoch.
async fn db_now<C: ConnectionTrait>(c: &C) -> i64 {
    let sql = match c.get_database_backend() {
        outbox::sea_orm::DbBackend::Postgres => {
            "SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT"
        }
        outbox::sea_orm::DbBackend::MySql => {
            "SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000"
        }
        _ => "SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    };
    let row = c
        .query_one_raw(Statement::from_string(c.get_database_backend(), sql))
        .await
        .expect("now")
        .expect("a row");
    row.try_get_by_index::<i64>(0).expect("now")
}

/// Records each delivery with the database's clock at the moment the handler ran.
#[derive(Clone, Default)]
struct Timed(Arc<Mutex<Vec<(String, i64)>>>);

impl Timed {
    fn handler(&self, queue: &'static str) -> HandlerSpec {
        let log = self.0.clone();
        HandlerSpec::transactional(queue, "h", move |m, txn| {
            let log = log.clone();
            let body = String::from_utf8_lossy(m.payload()).into_owned();
            Box::pin(async move {
                let now = db_now(txn).await;
                log.lock().expect("log").push((body, now));
                Ok(())
            })
        })
    }

    fn all(&self) -> Vec<(String, i64)> {
        self.0.lock().expect("log").clone()
    }
}

/// A message scheduled 1.5 s ahead is delivered after the messages enqueued before it became
/// due and before the ones enqueued after, never before its time; one due in the past is
/// delivered at once.
async fn a_scheduled_message_waits_for_its_time_and_then_its_turn(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let log = Timed::default();
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("sch", 1))
            .handler(log.handler("sch"))
    })
    .await;
    let before = db_now(&db).await;
    let done = h
        .enqueue(NewMessage::new("sch", 0, "later").deliver_after(Duration::from_millis(1500)))
        .await;
    assert!(matches!(done, Enqueued::Scheduled { .. }), "{done:?}");
    h.enqueue(NewMessage::new("sch", 0, "now")).await;
    let past = SystemTime::now() - Duration::from_secs(60);
    h.enqueue(NewMessage::new("sch", 0, "overdue").deliver_at(past))
        .await;
    eventually(WAIT, "the immediate and overdue ones", || async {
        log.all().len() == 2
    })
    .await;
    let status = h.outbox().queue_status("sch").await.expect("status");
    assert_eq!(
        status.scheduled, 1,
        "the later one waits, counted as scheduled"
    );
    assert!(status.next_due_at_ms.is_some_and(|d| d >= before + 1500));
    eventually(WAIT, "the later one", || async { log.all().len() == 3 }).await;
    h.enqueue(NewMessage::new("sch", 0, "after")).await;
    eventually(WAIT, "the last one", || async { log.all().len() == 4 }).await;
    let runs = log.all();
    let order: Vec<&str> = runs.iter().map(|(b, _)| b.as_str()).collect();
    assert_eq!(order, ["now", "overdue", "later", "after"]);
    let later_at = runs[2].1;
    assert!(
        later_at >= before + 1500,
        "delivered {} ms before its time",
        before + 1500 - later_at
    );
    eprintln!(
        "scheduled 1500 ms ahead, handled {} ms after enqueue (database clock)",
        later_at - before
    );
    assert_eq!(
        h.outbox()
            .queue_status("sch")
            .await
            .expect("status")
            .scheduled,
        0
    );
    h.finish().await;
}

/// A scheduled message cancelled by id or by key is never delivered, and its key is free
/// again; cancelling what is not scheduled says so.
async fn a_scheduled_message_can_be_cancelled(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let s = seen.clone();
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("cxl", 2))
            .handler(HandlerSpec::transactional("cxl", "h", move |m, _| {
                s.push("h", m);
                Box::pin(async { Ok(()) })
            }))
    })
    .await;
    let ob = h.outbox();
    let later = |body: &str| {
        NewMessage::new("cxl", 0, body.to_owned()).deliver_after(Duration::from_secs(2))
    };
    let Enqueued::Scheduled { id } = h.enqueue(later("by-id")).await else {
        panic!("not scheduled");
    };
    let keyed = h.enqueue(later("by-key").dedup_key("reminder-9")).await;
    assert!(matches!(keyed, Enqueued::Scheduled { .. }));
    assert_eq!(
        h.enqueue(later("dup").dedup_key("reminder-9")).await,
        Enqueued::Duplicate,
        "a scheduled message holds its key"
    );
    h.enqueue(later("kept")).await;
    assert_eq!(ob.queue_status("cxl").await.expect("status").scheduled, 3);

    assert!(ob.cancel_scheduled(id).await.expect("cancel"));
    assert!(!ob.cancel_scheduled(id).await.expect("cancel twice"));
    assert!(
        ob.cancel_scheduled_by_key("cxl", "reminder-9")
            .await
            .expect("cancel by key")
    );
    assert!(
        !ob.cancel_scheduled_by_key("cxl", "no-such-key")
            .await
            .expect("cancel unknown")
    );
    assert_eq!(
        h.enqueue(NewMessage::new("cxl", 1, "reused").dedup_key("reminder-9"))
            .await,
        Enqueued::Stored,
        "the cancelled message's key is free"
    );
    seen.wait_until(WAIT, "kept and reused", |d| d.len() == 2)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut bodies: Vec<String> = seen.all().into_iter().map(|d| d.body).collect();
    bodies.sort();
    assert_eq!(bodies, ["kept", "reused"]);
    let Enqueued::Scheduled { id: gone } = h
        .enqueue(NewMessage::new("cxl", 0, "due").deliver_after(Duration::ZERO))
        .await
    else {
        panic!("not scheduled");
    };
    seen.wait_until(WAIT, "the due one", |d| d.len() == 3).await;
    assert!(
        !ob.cancel_scheduled(gone).await.expect("cancel"),
        "already delivered"
    );
    h.finish().await;
}

/// Scheduled messages are moved only when due: thousands of future ones stay where they are
/// (the sequencer never sees them), and a delivery time before 1970 is refused.
async fn future_messages_stay_out_of_the_pipeline(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let s = seen.clone();
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("fut", 4))
            .handler(HandlerSpec::transactional("fut", "h", move |m, _| {
                s.push("h", m);
                Box::pin(async { Ok(()) })
            }))
    })
    .await;
    let far = SystemTime::now() + Duration::from_secs(3600);
    let batch: Vec<NewMessage> = (0..2_000)
        .map(|i| NewMessage::new("fut", i % 4, format!("f{i}")).deliver_at(far))
        .collect();
    let done = h.enqueue_batch(&batch).await;
    assert!(done.iter().all(|d| matches!(d, Enqueued::Scheduled { .. })));
    h.enqueue(NewMessage::new("fut", 0, "now")).await;
    seen.wait_until(WAIT, "the immediate one", |d| d.len() == 1)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(seen.all().len(), 1, "no future message was delivered");
    let q = h.outbox().queue_status("fut").await.expect("status");
    assert_eq!(q.scheduled, 2_000);
    assert_eq!(q.unsequenced, 0);
    let err = h
        .outbox()
        .enqueue(
            &db,
            NewMessage::new("fut", 0, "old")
                .deliver_at(SystemTime::UNIX_EPOCH - Duration::from_secs(1)),
        )
        .await
        .expect_err("before 1970");
    assert!(
        matches!(err, EnqueueError::InvalidDeliveryTime { .. }),
        "{err:?}"
    );
    h.finish().await;
}

/// A queue declared with a delay: every message waits for it.
#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2, name = "typed_delay", delay_ms = 1200)]
struct Reminder {
    #[outbox(key)]
    user: i64,
    text: String,
}

/// A strict-order queue refuses a delivery time and writes nothing.
#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2, name = "typed_strict", strict_order)]
struct LedgerEntry {
    #[outbox(key)]
    account: i64,
}

async fn a_queue_delay_schedules_every_message(t: Arc<TestDb>) {
    use outbox::Queue;

    let db = t.pool(8).await;
    let log = Timed::default();
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("typed_delay", 2))
            .queue(QueueSpec::new("typed_strict", 2))
            .handler(log.handler("typed_delay"))
    })
    .await;
    let before = db_now(&db).await;
    let reminder = Reminder {
        user: 3,
        text: "renew".to_owned(),
    };
    let done = reminder
        .enqueue_with(h.outbox(), &db)
        .await
        .expect("enqueue");
    assert!(matches!(done, Enqueued::Scheduled { .. }), "{done:?}");
    eventually(WAIT, "the reminder", || async { log.all().len() == 1 }).await;
    let handled_at = log.all()[0].1;
    assert!(
        handled_at >= before + 1200,
        "delivered {} ms before the queue's delay",
        before + 1200 - handled_at
    );
    // A strict-order queue's message is stored for delivery in commit order; a delivery
    // time is refused before anything is written.
    let entry = LedgerEntry { account: 1 };
    assert_eq!(
        entry.enqueue_with(h.outbox(), &db).await.expect("enqueue"),
        Enqueued::Stored
    );
    let status = h
        .outbox()
        .queue_status("typed_strict")
        .await
        .expect("status");
    assert_eq!(status.scheduled, 0);
    h.finish().await;
}

/// Status counts scheduled messages up to `SCHEDULED_COUNT_CAP` and says when there are more,
/// so a large calendar of future messages does not make every status read count them all.
async fn status_counts_scheduled_messages_up_to_a_cap(t: Arc<TestDb>) {
    use outbox::sea_orm::TransactionTrait;

    let db = t.pool(8).await;
    let rt = Outbox::builder(db.clone())
        .queue(QueueSpec::new("cal", 4))
        .queue(QueueSpec::new("few", 1))
        .connect()
        .await
        .expect("connect");
    let cap = outbox::SCHEDULED_COUNT_CAP;
    let later: Vec<_> = (0..=cap)
        .map(|i| {
            NewMessage::new("cal", (i % 4) as u32, format!("m{i}"))
                .deliver_after(Duration::from_secs(3600))
        })
        .collect();
    let txn = db.begin().await.expect("begin");
    let done = rt.enqueue_batch(&txn, &later).await.expect("enqueue");
    txn.commit().await.expect("commit");
    rt.enqueue(
        &db,
        NewMessage::new("few", 0, "x").deliver_after(Duration::from_secs(60)),
    )
    .await
    .expect("enqueue");
    let status = rt.status().await.expect("status");
    let cal = status.queue("cal").expect("cal");
    assert_eq!((cal.scheduled, cal.scheduled_capped), (cap, true));
    assert!(cal.next_due_at_ms.is_some());
    let few = status.queue("few").expect("few");
    assert_eq!((few.scheduled, few.scheduled_capped), (1, false));
    let Enqueued::Scheduled { id } = done[0] else {
        panic!("{:?}", done[0])
    };
    assert!(rt.cancel_scheduled(id).await.expect("cancel"));
    let cal = rt.queue_status("cal").await.expect("status");
    assert_eq!(
        (cal.scheduled, cal.scheduled_capped),
        (cap, false),
        "exactly the cap left: counted exactly"
    );
}

on_every_backend!(
    status_counts_scheduled_messages_up_to_a_cap,
    a_queue_delay_schedules_every_message,
    a_scheduled_message_waits_for_its_time_and_then_its_turn,
    a_scheduled_message_can_be_cancelled,
    future_messages_stay_out_of_the_pipeline,
);
