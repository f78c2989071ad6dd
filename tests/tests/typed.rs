//! The typed layer on every backend: typed enqueue inside the caller's transaction, keyed
//! routing with per-key order, corrupted payload bytes dead-lettered with the decode error
//! (never a panic, never blocking other partitions), and concurrent bootstrap on an empty
//! database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::sea_orm::{ConnectionTrait, DatabaseTransaction, Statement, TransactionTrait};
use outbox::{DeadLetterFilter, HandlerError, HandlerFuture, Outbox, Profile, Queue, QueueSpec};
use outbox_tests::{TestDb, assert_invariants, eventually, on_every_backend, scalar};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[outbox::queue(partitions = 4, name = "typed_notes")]
struct Note {
    #[outbox(key)]
    author: u32,
    n: u32,
}

type Seen = Arc<Mutex<HashMap<String, Vec<(u32, u32, u32)>>>>;

/// Handlers are plain fns; the test tells them apart by the database they write to.
static SEEN: std::sync::LazyLock<Seen> = std::sync::LazyLock::new(Seen::default);

fn record<'a>(note: Note, txn: &'a DatabaseTransaction) -> HandlerFuture<'a> {
    Box::pin(async move {
        let db_name = txn
            .query_one_raw(Statement::from_string(
                txn.get_database_backend(),
                db_name_sql(txn).to_owned(),
            ))
            .await?
            .and_then(|r| r.try_get_by_index::<String>(0).ok())
            .unwrap_or_default();
        SEEN.lock()
            .expect("lock")
            .entry(db_name)
            .or_default()
            .push((note.author, note.n, note.partition()));
        Ok::<(), HandlerError>(())
    })
}

fn db_name_sql(c: &impl ConnectionTrait) -> &'static str {
    match c.get_database_backend() {
        outbox::sea_orm::DbBackend::Postgres => "SELECT current_database()",
        outbox::sea_orm::DbBackend::MySql => "SELECT DATABASE()",
        _ => "SELECT file FROM pragma_database_list WHERE name = 'main'",
    }
}

async fn start(db: &outbox::sea_orm::DatabaseConnection) -> outbox::Running {
    Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new(Note::NAME, Note::PARTITIONS))
        .handler(outbox::transactional::<Note>("record", record))
        .start()
        .await
        .expect("start")
}

/// Typed enqueue joins the caller's transaction, routes by the key's stable hash, and keeps
/// each key's order; payload bytes corrupted in storage are dead-lettered with the decode
/// error while every other message is delivered.
async fn typed_messages_route_by_key_and_bad_bytes_are_dead_lettered(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let rt = start(&db).await;
    let name = scalar_text(&db).await;
    let txn = db.begin().await.expect("begin");
    for n in 0..30 {
        Note { author: n % 5, n }
            .enqueue_with(rt.outbox(), &txn)
            .await
            .expect("typed enqueue");
    }
    txn.rollback().await.expect("rollback");
    let txn = db.begin().await.expect("begin");
    for n in 0..30 {
        Note { author: n % 5, n }
            .enqueue_with(rt.outbox(), &txn)
            .await
            .expect("typed enqueue");
    }
    txn.commit().await.expect("commit");
    let seen = || {
        SEEN.lock()
            .expect("lock")
            .get(&name)
            .cloned()
            .unwrap_or_default()
    };
    eventually(Duration::from_secs(30), "typed delivery", || async {
        seen().len() == 30
    })
    .await;
    let got = seen();
    for author in 0..5 {
        let ns: Vec<u32> = got.iter().filter(|g| g.0 == author).map(|g| g.1).collect();
        assert_eq!(
            ns,
            (0..30).filter(|n| n % 5 == author).collect::<Vec<_>>(),
            "author {author} out of order"
        );
        let parts: std::collections::BTreeSet<u32> =
            got.iter().filter(|g| g.0 == author).map(|g| g.2).collect();
        assert_eq!(parts.len(), 1, "one key, one partition");
        assert_eq!(
            parts.into_iter().next(),
            Some(outbox::partition_for_key(&author, 4))
        );
    }

    // Corrupt one stored payload, then send more: the bad one is dead-lettered, others flow.
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    let poisoned = Note { author: 1, n: 100 };
    let producer = Outbox::builder(db.clone())
        .queue(QueueSpec::new(Note::NAME, Note::PARTITIONS))
        .connect()
        .await
        .expect("connect");
    poisoned
        .enqueue_with(&producer, &db)
        .await
        .expect("enqueue");
    let corrupt = match db.get_database_backend() {
        outbox::sea_orm::DbBackend::Postgres => {
            "UPDATE outbox_incoming SET payload = '\\xFF00FE7B'::bytea"
        }
        _ => "UPDATE outbox_incoming SET payload = X'FF00FE7B'",
    };
    db.execute_unprepared(corrupt)
        .await
        .expect("corrupt the payload");
    for n in 101..104 {
        Note { author: 1, n }
            .enqueue_with(&producer, &db)
            .await
            .expect("enqueue");
    }
    let rt = start(&db).await;
    eventually(
        Duration::from_secs(30),
        "messages after the poison",
        || async { seen().len() == 33 },
    )
    .await;
    let dead = rt
        .outbox()
        .dead_letters(&DeadLetterFilter::all(), 0, 10)
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].payload, vec![0xFF, 0x00, 0xFE, 0x7B]);
    assert_eq!(
        dead[0].attempts, 1,
        "a decode error is rejected at once, not retried"
    );
    assert!(
        dead[0].last_error.contains("Note"),
        "{}",
        dead[0].last_error
    );
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    assert_invariants(&db, "outbox_").await;
}

async fn scalar_text(db: &outbox::sea_orm::DatabaseConnection) -> String {
    db.query_one_raw(Statement::from_string(
        db.get_database_backend(),
        db_name_sql(db).to_owned(),
    ))
    .await
    .expect("db name")
    .and_then(|r| r.try_get_by_index::<String>(0).ok())
    .unwrap_or_default()
}

/// Several runtimes starting at once on an empty database all succeed and create the schema
/// and the queue once.
async fn concurrent_bootstrap_creates_the_schema_once(t: Arc<TestDb>) {
    let mut starts = Vec::new();
    for _ in 0..4 {
        let db = t.pool(8).await;
        starts.push(tokio::spawn(async move { (start(&db).await, db) }));
    }
    let mut running = Vec::new();
    for s in starts {
        running.push(s.await.expect("bootstrap task"));
    }
    let db = &running[0].1;
    assert_eq!(
        scalar(db, "SELECT COUNT(*) FROM outbox_schema_version").await,
        4, // one row per schema version
    );
    assert_eq!(scalar(db, "SELECT COUNT(*) FROM outbox_queues").await, 1);
    assert_eq!(
        scalar(db, "SELECT COUNT(*) FROM outbox_partitions").await,
        4
    );
    assert_eq!(scalar(db, "SELECT COUNT(*) FROM outbox_cursors").await, 4);
    for (rt, _) in running {
        rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[outbox::queue(partitions = 2, name = "typed_bulk")]
struct Bulk {
    #[outbox(key)]
    k: u32,
    n: u32,
}

/// A batch handler written with the attribute: one call, one transaction per batch.
#[outbox::handler(transactional, batch, batch_size = 50)]
async fn bulk_store(items: Vec<Bulk>, txn: &DatabaseTransaction) -> Result<(), HandlerError> {
    for item in items {
        let sql = format!("INSERT INTO bulk (k, n) VALUES ({}, {})", item.k, item.n);
        txn.execute_unprepared(&sql).await?;
    }
    Ok(())
}

/// `#[outbox::handler(transactional, batch)]` discovered and started with `outbox::discover`:
/// every message lands once, through few calls.
async fn attribute_batch_handler_drains_in_batches(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    db.execute_unprepared("CREATE TABLE bulk (k BIGINT NOT NULL, n BIGINT NOT NULL)")
        .await
        .expect("create table");
    let rt = outbox::discover(db.clone())
        .profile(Profile::LowLatency)
        .only_handlers(["bulk_store"])
        .install_global(false)
        .start()
        .await
        .expect("start");
    let items: Vec<Bulk> = (0..200).map(|n| Bulk { k: n % 7, n }).collect();
    let txn = db.begin().await.expect("begin");
    for item in &items {
        item.enqueue_with(rt.outbox(), &txn).await.expect("enqueue");
    }
    txn.commit().await.expect("commit");
    eventually(Duration::from_secs(30), "bulk rows", || async {
        scalar(&db, "SELECT COUNT(*) FROM bulk").await == 200
    })
    .await;
    assert_eq!(scalar(&db, "SELECT COUNT(DISTINCT n) FROM bulk").await, 200);
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
}

on_every_backend!(
    attribute_batch_handler_drains_in_batches,
    typed_messages_route_by_key_and_bad_bytes_are_dead_lettered,
    concurrent_bootstrap_creates_the_schema_once,
);
