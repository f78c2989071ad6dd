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
    rt.enqueue(&db, NewMessage::new("migrated", 0, "hello"))
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

/// A database created before the sequencer read `incoming` by primary key has a secondary
/// index there; starting drops it (producers no longer pay for it), and messages waiting in
/// `incoming` at the upgrade are delivered.
async fn upgrade_drops_the_old_incoming_index(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let producer = Outbox::builder(db.clone())
        .queue(QueueSpec::new("upgraded", 2))
        .connect()
        .await
        .expect("connect");
    let mysql = db.get_database_backend() == DbBackend::MySql;
    let create = if mysql {
        "CREATE INDEX outbox_incoming_partition ON outbox_incoming (queue, partition_no, id)"
    } else {
        "CREATE INDEX outbox_incoming_partition ON outbox_incoming (queue, partition_no)"
    };
    db.execute_unprepared(create).await.expect("old index");
    for i in 0..4u32 {
        producer
            .enqueue(&db, NewMessage::new("upgraded", i % 2, format!("m{i}")))
            .await
            .expect("enqueue");
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
