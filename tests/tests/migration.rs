//! The schema as a sea-orm-migration migration, on every backend.

use std::sync::Arc;
use std::time::Duration;

use outbox::{HandlerSpec, NewMessage, Outbox, Profile, QueueSpec};
use outbox_tests::{Seen, TestDb, on_every_backend, scalar};
use sea_orm_migration::{MigrationTrait, MigratorTrait};

struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(
            outbox::migration::Migration::with_table_prefix("app_outbox_").expect("prefix"),
        )]
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

use outbox::sea_orm::ConnectionTrait;

on_every_backend!(application_migrator_creates_and_drops_the_schema);
