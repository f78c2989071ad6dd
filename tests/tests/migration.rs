//! The schema as a sea-orm-migration migration, on every backend.

use std::sync::Arc;
use std::time::Duration;

use outbox::{HandlerSpec, NewMessage, Outbox, Profile, QueueSpec};
use outbox_tests::{Seen, TestDb, on_every_backend, scalar};
use sea_orm_migration::{MigrationTrait, MigratorTrait};

struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        outbox::migration::migrations_with_table_prefix("app_outbox_").expect("prefix")
    }
}

/// An application's own migrator creates the tables; the runtime then finds them ready, and
/// `down` removes them.
async fn application_migrator_creates_and_drops_the_schema(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    Migrator::up(&db, None).await.expect("migrate up");
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) FROM app_outbox_queues").await,
        0
    );
    let seen = Seen::default();
    let s = seen.clone();
    let rt = Outbox::builder(db.clone())
        .table_prefix("app_outbox_")
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("migrated", 1))
        .handler(HandlerSpec::transactional("migrated", "h", move |m, _| {
            s.push("h", m);
            Box::pin(async { Ok(()) })
        }))
        .start()
        .await
        .expect("start on the migrated schema");
    rt.outbox()
        .enqueue(&db, NewMessage::new("migrated", 0, "hello"))
        .await
        .expect("enqueue");
    seen.wait_until(Duration::from_secs(30), "delivery", |d| d.len() == 1)
        .await;
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    Migrator::down(&db, None).await.expect("migrate down");
    let gone = db
        .execute_unprepared("SELECT COUNT(*) FROM app_outbox_queues")
        .await
        .is_err();
    assert!(gone, "down left the tables");
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

/// A database created before the sequencer read `incoming` by primary key has a secondary
/// index there (at schema version 1: that change kept the version); the upgrade at start drops
/// it (producers no longer pay for it), and messages waiting in `incoming` are delivered.
async fn upgrade_drops_the_old_incoming_index(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    FirstVersionOnly::up(&db, None).await.expect("version 1");
    let mysql = db.get_database_backend() == DbBackend::MySql;
    let create = if mysql {
        "CREATE INDEX outbox_incoming_partition ON outbox_incoming (queue, partition_no, id)"
    } else {
        "CREATE INDEX outbox_incoming_partition ON outbox_incoming (queue, partition_no)"
    };
    db.execute_unprepared(create).await.expect("old index");
    // What the old runtime wrote: the queue, its partitions, four waiting messages.
    db.execute_unprepared(
        "INSERT INTO outbox_queues (name, partitions, created_at) VALUES ('upgraded', 2, 0)",
    )
    .await
    .expect("queue");
    for p in 0..2 {
        db.execute_unprepared(&format!(
            "INSERT INTO outbox_partitions (queue, partition_no) VALUES ('upgraded', {p})"
        ))
        .await
        .expect("partition");
    }
    for i in 0..4u32 {
        let hex: String = format!("m{i}")
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect();
        let payload = if db.get_database_backend() == DbBackend::Postgres {
            format!("'\\x{hex}'::bytea")
        } else {
            format!("X'{hex}'")
        };
        db.execute_unprepared(&format!(
            "INSERT INTO outbox_incoming (queue, partition_no, payload, created_at) \
             VALUES ('upgraded', {}, {payload}, 0)",
            i % 2
        ))
        .await
        .expect("waiting message");
    }
    let indexes = |db: DatabaseConnection| async move {
        let sql = match db.get_database_backend() {
            DbBackend::MySql => {
                "SELECT COUNT(DISTINCT index_name) FROM information_schema.statistics \
                 WHERE table_schema = DATABASE() \
                 AND index_name = 'outbox_incoming_partition'"
            }
            DbBackend::Postgres => {
                "SELECT COUNT(*) FROM pg_indexes WHERE indexname = 'outbox_incoming_partition'"
            }
            _ => {
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' \
                 AND name = 'outbox_incoming_partition'"
            }
        };
        scalar(&db, sql).await
    };
    assert_eq!(indexes(db.clone()).await, 1, "the old index is in place");
    let seen = Seen::default();
    let s = seen.clone();
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("upgraded", 2))
        .handler(HandlerSpec::transactional("upgraded", "h", move |m, _| {
            s.push("h", m);
            Box::pin(async { Ok(()) })
        }))
        .start()
        .await
        .expect("start on the old schema");
    assert_eq!(indexes(db.clone()).await, 0, "start dropped the old index");
    seen.wait_until(Duration::from_secs(30), "delivery", |d| d.len() == 4)
        .await;
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

use outbox::sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend};

on_every_backend!(
    application_migrator_creates_and_drops_the_schema,
    upgrade_drops_the_old_incoming_index
);
