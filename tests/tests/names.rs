//! Queue and handler names mean the same on every backend (issue 10): they compare byte for
//! byte, so names that differ only in case (or by a trailing space) are distinct everywhere,
//! lookups and filters never match a name the caller did not give, and existing databases are
//! upgraded to that.

use std::sync::Arc;
use std::time::Duration;

use outbox::sea_orm::{DbBackend, TransactionTrait};
use outbox::{
    DeadLetterFilter, EnqueueError, Error, HandlerError, HandlerSpec, NewMessage, QueueSpec,
};
use outbox_tests::{Harness, Kind, Seen, TestDb, eventually, on_every_backend, scalar};
use sea_orm_migration::{MigrationTrait, MigratorTrait};

const WAIT: Duration = Duration::from_secs(30);

fn recorder(
    queue: &'static str,
    name: &'static str,
    tag: &'static str,
    seen: &Seen,
) -> HandlerSpec {
    let seen = seen.clone();
    HandlerSpec::transactional(queue, name, move |m, _txn| {
        seen.push(tag, m);
        Box::pin(async { Ok(()) })
    })
}

/// `orders` and `Orders` are two queues, `send` and `Send` two handlers: each sees only its
/// own messages, and one enqueue to each spelling in one transaction stalls nothing. (Before,
/// on MariaDB, they shared rows: messages crossed queues, a fan-out handler missed messages,
/// and such a transaction made every sequencer pass fail with a duplicate key.)
async fn names_differing_only_in_case_are_distinct(t: Arc<TestDb>) {
    let db = t.pool(16).await;
    let seen = Seen::default();
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("orders", 2))
            .queue(QueueSpec::new("Orders", 2))
            .handler(recorder("orders", "send", "orders/send", &seen))
            .handler(recorder("orders", "Send", "orders/Send", &seen))
            .handler(recorder("Orders", "send", "Orders/send", &seen))
    })
    .await;
    for round in 0..3 {
        let txn = db.begin().await.expect("begin");
        h.enqueue_in(&txn, NewMessage::new("orders", 0, format!("lower-{round}")))
            .await;
        h.enqueue_in(&txn, NewMessage::new("Orders", 0, format!("upper-{round}")))
            .await;
        txn.commit().await.expect("commit");
    }
    seen.wait_until(WAIT, "three messages per handler", |d| d.len() == 9)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bodies = |tag: &str| -> Vec<String> { seen.of(tag).into_iter().map(|d| d.body).collect() };
    assert_eq!(bodies("orders/send"), ["lower-0", "lower-1", "lower-2"]);
    assert_eq!(bodies("orders/Send"), ["lower-0", "lower-1", "lower-2"]);
    assert_eq!(bodies("Orders/send"), ["upper-0", "upper-1", "upper-2"]);

    // An undeclared spelling is an unknown queue, not an alias.
    let err = h
        .outbox()
        .enqueue(&db, NewMessage::new("ORDERS", 0, "stray"))
        .await
        .expect_err("ORDERS is not declared");
    assert!(matches!(err, EnqueueError::UnknownQueue(q) if q == "ORDERS"));
    let status = h.outbox().status().await.expect("status");
    let names: Vec<&str> = status.queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(status.queue("orders").expect("orders").handlers.len(), 2);
    assert_eq!(status.queue("Orders").expect("Orders").handlers.len(), 1);
    h.finish().await;
}

/// Dead-letter filters and lookups match the name given, byte for byte: `ORDERS` matches none
/// of `orders`' dead letters, and a name with a trailing space is refused before any SQL
/// (before, on MariaDB, both matched, so replay and purge acted on rows the operator did not
/// name).
async fn name_filters_match_exactly(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let handler = HandlerSpec::transactional("orders", "send", |_m, _txn| {
        Box::pin(async { Err(HandlerError::reject("refused")) })
    });
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("orders", 1)).handler(handler)
    })
    .await;
    h.enqueue(NewMessage::new("orders", 0, "m")).await;
    eventually(WAIT, "a dead letter", || async {
        h.outbox()
            .count_dead_letters(&DeadLetterFilter::all())
            .await
            .is_ok_and(|n| n == 1)
    })
    .await;
    h.stop().await;

    let count = |f: DeadLetterFilter| {
        let rt = h.outbox().clone();
        async move { rt.count_dead_letters(&f).await }
    };
    assert_eq!(
        count(DeadLetterFilter::all().queue("orders"))
            .await
            .expect("count"),
        1
    );
    assert_eq!(
        count(DeadLetterFilter::all().queue("ORDERS"))
            .await
            .expect("count"),
        0
    );
    assert_eq!(
        count(DeadLetterFilter::all().handler("SEND"))
            .await
            .expect("count"),
        0
    );
    for bad in [
        DeadLetterFilter::all().queue("orders "),
        DeadLetterFilter::all().handler("send "),
    ] {
        assert!(matches!(
            count(bad.clone()).await,
            Err(Error::InvalidName(_))
        ));
        assert!(matches!(
            h.outbox().purge_dead_letters(&bad).await,
            Err(Error::InvalidName(_))
        ));
    }
    assert_eq!(
        h.outbox()
            .purge_dead_letters(&DeadLetterFilter::all().queue("Orders"))
            .await
            .expect("purge"),
        0,
        "a purge of another spelling deletes nothing"
    );
    assert_eq!(count(DeadLetterFilter::all()).await.expect("count"), 1);
    assert!(matches!(
        h.outbox().queue_status("ORDERS").await,
        Err(Error::UnknownQueue(_))
    ));
}

struct FirstVersionOnly;

impl MigratorTrait for FirstVersionOnly {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        outbox::migration::migrations()
            .into_iter()
            .take(1)
            .collect()
    }
}

/// A database created by the first schema is upgraded at start: names become exact on
/// MariaDB (binary collation), the handler registry and the instance id appear, and messages
/// waiting at the upgrade are delivered.
async fn an_existing_database_is_upgraded_to_exact_names(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    FirstVersionOnly::up(&db, None).await.expect("version 1");
    assert_eq!(
        scalar(&db, "SELECT MAX(version) FROM outbox_schema_version").await,
        1
    );
    // What the first schema's runtime wrote: a queue, its partition, a waiting message.
    for sql in [
        "INSERT INTO outbox_queues (name, partitions, created_at) VALUES ('legacy', 1, 0)",
        "INSERT INTO outbox_partitions (queue, partition_no) VALUES ('legacy', 0)",
        "INSERT INTO outbox_cursors (queue, handler, partition_no, updated_at) VALUES ('legacy', 'h', 0, 0)",
    ] {
        db.execute_unprepared(sql).await.expect(sql);
    }
    let payload = if t.kind == Kind::Postgres {
        "'\\x77616974696e67'::bytea"
    } else {
        "X'77616974696e67'"
    };
    db.execute_unprepared(&format!(
        "INSERT INTO outbox_incoming (queue, partition_no, payload, created_at) VALUES ('legacy', 0, {payload}, 0)"
    ))
    .await
    .expect("waiting message");

    let seen = Seen::default();
    // Starting upgrades the schema.
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("legacy", 1))
            .queue(QueueSpec::new("Legacy", 1))
            .handler(recorder("legacy", "h", "legacy/h", &seen))
            .handler(recorder("Legacy", "h", "Legacy/h", &seen))
    })
    .await;
    assert_eq!(
        scalar(&db, "SELECT MAX(version) FROM outbox_schema_version").await,
        4
    );
    assert_eq!(
        h.outbox().instance_id().await.expect("instance id").len(),
        32
    );
    if db.get_database_backend() == DbBackend::MySql {
        let not_binary = scalar(
            &db,
            "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() \
             AND table_name LIKE 'outbox\\_%' AND column_name IN ('name', 'queue', 'handler', 'target_handler') \
             AND collation_name <> 'ascii_bin'",
        )
        .await;
        assert_eq!(not_binary, 0, "every name column compares byte for byte");
    }
    seen.wait_until(WAIT, "the waiting message", |d| d.len() == 1)
        .await;
    h.enqueue(NewMessage::new("Legacy", 0, "new")).await;
    seen.wait_until(WAIT, "the new queue's message", |d| d.len() == 2)
        .await;
    assert_eq!(seen.of("legacy/h")[0].body, "waiting");
    assert_eq!(seen.of("Legacy/h")[0].body, "new");
    h.finish().await;
}

use outbox::sea_orm::ConnectionTrait;

on_every_backend!(
    names_differing_only_in_case_are_distinct,
    name_filters_match_exactly,
    an_existing_database_is_upgraded_to_exact_names,
);
