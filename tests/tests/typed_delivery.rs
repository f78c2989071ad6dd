//! The typed layer end to end on SQLite: typed enqueue inside the caller's transaction, keyed
//! routing and per-key order, fan-out to a transactional and a leased handler, and payloads
//! that do not decode going to the dead letters instead of panicking.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use outbox::sea_orm::{
    self, ConnectionTrait, DatabaseTransaction, DbBackend, Statement, TransactionTrait,
};
use outbox::{
    DeadLetterFilter, EnqueueError, HandlerError, LeaseContext, NewMessage, Profile, Queue,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[outbox::queue(partitions = 4, max_attempts = 3)]
struct Note {
    #[outbox(key)]
    author: u32,
    n: u32,
}

static SEEN: Mutex<Vec<(u32, u32, u32)>> = Mutex::new(Vec::new());

#[outbox::handler(leased)]
async fn collect(msg: Note, ctx: &LeaseContext) -> Result<(), HandlerError> {
    assert_eq!(ctx.partition(), msg.partition());
    SEEN.lock()
        .expect("lock")
        .push((msg.author, msg.n, ctx.partition()));
    Ok(())
}

#[outbox::handler(transactional, batch_size = 5)]
async fn store(msg: Note, txn: &DatabaseTransaction) -> Result<(), HandlerError> {
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Sqlite,
        "INSERT INTO notes (author, n) VALUES (?, ?)",
        [msg.author.into(), msg.n.into()],
    ))
    .await?;
    Ok(())
}

async fn count(db: &impl ConnectionTrait) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT COUNT(*) FROM notes",
        ))
        .await
        .expect("count");
    row.map_or(0, |r| r.try_get_by_index(0).expect("int"))
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_enqueue_delivery_order_and_poison_payloads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("typed.db").display()
    );
    let mut options = sea_orm::ConnectOptions::new(url);
    options.max_connections(4);
    let db = sea_orm::Database::connect(options).await.expect("sqlite");
    db.execute_unprepared("CREATE TABLE notes (author INTEGER NOT NULL, n INTEGER NOT NULL)")
        .await
        .expect("table");

    // No outbox yet: typed enqueue says so and writes nothing.
    let early = Note { author: 1, n: 0 }.enqueue(&db).await;
    assert!(
        matches!(early, Err(EnqueueError::NotConnected)),
        "{early:?}"
    );

    let running = outbox::start(db.clone(), Profile::LowLatency)
        .await
        .expect("start");

    // Rolled back: never delivered.
    let txn = db.begin().await.expect("begin");
    Note { author: 9, n: 999 }
        .enqueue(&txn)
        .await
        .expect("enqueue");
    txn.rollback().await.expect("rollback");

    // Committed: one message per call, in call order per key.
    let txn = db.begin().await.expect("begin");
    for n in 1..=10 {
        Note { author: 1, n }.enqueue(&txn).await.expect("enqueue");
    }
    let batch: Vec<_> = (1..=10).map(|n| Note { author: 2, n }).collect();
    Note::enqueue_batch(&batch, &txn).await.expect("batch");
    Note { author: 3, n: 1 }
        .enqueue_with(running.outbox(), &txn)
        .await
        .expect("explicit outbox");
    txn.commit().await.expect("commit");

    wait_for("both handlers", async || {
        SEEN.lock().expect("lock").len() >= 21 && count(&db).await >= 21
    })
    .await;
    let seen = SEEN.lock().expect("lock").clone();
    assert_eq!(seen.len(), 21, "{seen:?}");
    assert!(
        seen.iter().all(|(author, _, _)| *author != 9),
        "rolled back message delivered"
    );
    for author in [1, 2] {
        let ns: Vec<_> = seen.iter().filter(|s| s.0 == author).map(|s| s.1).collect();
        assert_eq!(ns, (1..=10).collect::<Vec<_>>(), "order of author {author}");
        let partition = outbox::partition_for_key(&author, Note::PARTITIONS);
        assert!(
            seen.iter()
                .filter(|s| s.0 == author)
                .all(|s| s.2 == partition)
        );
    }

    // A payload that does not decode as `Note` is rejected by both handlers: dead-lettered
    // with the decode error, never a panic, and the partition moves on.
    running
        .outbox()
        .enqueue(
            &db,
            NewMessage::new(Note::NAME, 0, b"{\"author\":\"x\"}".to_vec()),
        )
        .await
        .expect("raw enqueue");
    let filter = DeadLetterFilter::all().queue(Note::NAME);
    wait_for("dead letters", async || {
        running
            .outbox()
            .count_dead_letters(&filter)
            .await
            .expect("count")
            >= 2
    })
    .await;
    let dead = running
        .outbox()
        .dead_letters(&filter, 0, 10)
        .await
        .expect("list");
    assert_eq!(dead.len(), 2, "{dead:?}");
    for d in &dead {
        assert!(
            d.last_error.contains("could not be decoded as"),
            "{}",
            d.last_error
        );
        assert_eq!(d.attempts, 1, "rejected at once, not retried");
    }
    let before = SEEN.lock().expect("lock").len();
    Note { author: 4, n: 1 }
        .enqueue(&db)
        .await
        .expect("enqueue after poison");
    wait_for("delivery after the poison message", async || {
        SEEN.lock().expect("lock").len() > before
    })
    .await;

    running
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}
