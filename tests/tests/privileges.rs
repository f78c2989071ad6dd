//! Least privilege (issue 11): schema changes belong to the migrate step. A runtime whose
//! database user may only read and write rows starts when the schema is current, and fails
//! with a typed error naming the migration to run when it is not.

use std::sync::Arc;
use std::time::Duration;

use outbox::sea_orm::{ConnectionTrait, DatabaseConnection};
use outbox::{HandlerSpec, NewMessage, Outbox, Profile, QueueSpec, StartError};
use outbox_tests::{Kind, Seen, TestDb, on_every_backend, scalar, wait_drained};

const WAIT: Duration = Duration::from_secs(30);

/// Creates a user that may read and write the rows of the test database but change nothing
/// of its schema, and returns a pool logged in as that user.
async fn rows_only_user(t: &TestDb, admin: &DatabaseConnection) -> DatabaseConnection {
    let user = format!("outbox_rw_{:08x}", rand::random::<u32>());
    let (head, db_name) = t.url.rsplit_once('/').expect("a database in the URL");
    let url = match t.kind {
        Kind::Postgres => {
            for sql in [
                format!("CREATE ROLE {user} LOGIN PASSWORD 'pw'"),
                format!("GRANT CONNECT ON DATABASE {db_name} TO {user}"),
                format!("GRANT USAGE ON SCHEMA public TO {user}"),
                "REVOKE CREATE ON SCHEMA public FROM PUBLIC".to_owned(),
                format!(
                    "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {user}"
                ),
                format!("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {user}"),
            ] {
                admin
                    .execute_unprepared(&sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            let host = head.rsplit_once('@').map_or(head, |(_, h)| h);
            format!("postgres://{user}:pw@{host}/{db_name}")
        }
        _ => {
            for sql in [
                format!("CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'"),
                format!("CREATE USER '{user}'@'localhost' IDENTIFIED BY 'pw'"),
                format!("GRANT SELECT, INSERT, UPDATE, DELETE ON `{db_name}`.* TO '{user}'@'%'"),
                format!(
                    "GRANT SELECT, INSERT, UPDATE, DELETE ON `{db_name}`.* TO '{user}'@'localhost'"
                ),
            ] {
                admin
                    .execute_unprepared(&sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            let host = head.rsplit_once('@').map_or(head, |(_, h)| h);
            format!("mysql://{user}:pw@{host}/{db_name}")
        }
    };
    let mut o = outbox::sea_orm::ConnectOptions::new(url);
    o.max_connections(8).sqlx_logging(false);
    outbox::sea_orm::Database::connect(o)
        .await
        .expect("connect as the rows-only user")
}

async fn drop_user(t: &TestDb, admin: &DatabaseConnection, rw: &DatabaseConnection) {
    let user = scalar_text(rw, t.kind).await;
    rw.clone().close().await.ok();
    let sqls = match t.kind {
        Kind::Postgres => vec![
            format!("DROP OWNED BY {user}"),
            format!("DROP ROLE IF EXISTS {user}"),
        ],
        _ => vec![
            format!("DROP USER IF EXISTS '{user}'@'%'"),
            format!("DROP USER IF EXISTS '{user}'@'localhost'"),
        ],
    };
    for sql in sqls {
        admin.execute_unprepared(&sql).await.ok();
    }
}

async fn scalar_text(c: &DatabaseConnection, kind: Kind) -> String {
    let sql = if kind == Kind::Postgres {
        "SELECT current_user"
    } else {
        "SELECT SUBSTRING_INDEX(CURRENT_USER(), '@', 1)"
    };
    let row = c
        .query_one_raw(outbox::sea_orm::Statement::from_string(
            c.get_database_backend(),
            sql,
        ))
        .await
        .expect("user")
        .expect("a row");
    row.try_get_by_index(0).expect("text")
}

fn builder(db: DatabaseConnection, seen: &Seen) -> outbox::Builder {
    let s = seen.clone();
    Outbox::builder(db)
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("least", 2))
        .handler(HandlerSpec::transactional("least", "h", move |m, _txn| {
            s.push("h", m);
            Box::pin(async { Ok(()) })
        }))
}

/// The rows-only user starts on a current schema (no DDL runs) and delivers; on an empty
/// database, or an outdated one, it fails with a typed error that names the migration.
async fn a_rows_only_user_runs_on_a_current_schema(t: Arc<TestDb>) {
    let admin = t.pool(4).await;
    let seen = Seen::default();

    // An empty database: the rows-only user cannot create the tables.
    let rw = rows_only_user(&t, &admin).await;
    let err = builder(rw.clone(), &seen)
        .start()
        .await
        .expect_err("no tables, no DDL right");
    assert!(
        matches!(&err, StartError::Migration { from: None, to: 4, migration, .. } if migration.contains("v1")),
        "{err:?}"
    );
    assert!(err.to_string().contains("outbox migrate"), "{err}");
    let err = builder(rw.clone(), &seen)
        .migrate_on_start(false)
        .start()
        .await
        .expect_err("no tables");
    assert!(
        matches!(
            err,
            StartError::SchemaOutdated {
                found: None,
                expected: 4,
                ..
            }
        ),
        "{err:?}"
    );
    drop_user(&t, &admin, &rw).await;

    // The migrate step, run by a user that may change the schema.
    Outbox::admin(admin.clone(), "outbox_")
        .expect("admin")
        .migrate()
        .await
        .expect("migrate");
    let rw = rows_only_user(&t, &admin).await;
    let rt = builder(rw.clone(), &seen)
        .start()
        .await
        .expect("start on a current schema");
    let batch: Vec<_> = (0..20)
        .map(|i| NewMessage::new("least", i % 2, format!("{i}")))
        .collect();
    rt.outbox()
        .enqueue_batch(&rw, &batch)
        .await
        .expect("enqueue");
    wait_drained(rt.outbox(), "least", WAIT).await;
    assert_eq!(seen.all().len(), 20);
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");

    // An outdated schema: refused with the migration to run, whether or not start may migrate.
    admin
        .execute_unprepared("DELETE FROM outbox_schema_version WHERE version >= 2")
        .await
        .expect("pretend version 1");
    let err = builder(rw.clone(), &seen)
        .migrate_on_start(false)
        .start()
        .await
        .expect_err("outdated");
    assert!(
        matches!(&err, StartError::SchemaOutdated { found: Some(1), expected: 4, migration } if migration.contains("exact_names")),
        "{err:?}"
    );
    let err = builder(rw.clone(), &seen)
        .start()
        .await
        .expect_err("outdated, no DDL right");
    assert!(
        matches!(
            err,
            StartError::Migration {
                from: Some(1),
                to: 4,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        scalar(&admin, "SELECT MAX(version) FROM outbox_schema_version").await,
        1
    );
    drop_user(&t, &admin, &rw).await;
}

/// PostgreSQL: the sequencer's low-water mark reads `pg_locks`. Where an administrator has
/// revoked that view, sequencing and delivery go on (the mark stays where it is, the scan
/// starts lower), across several passes and looks at the mark.
async fn sequencing_goes_on_where_pg_locks_is_not_readable(t: Arc<TestDb>) {
    let admin = t.pool(4).await;
    Outbox::admin(admin.clone(), "outbox_")
        .expect("admin")
        .migrate()
        .await
        .expect("migrate");
    // Per database: the view's grants live in this throwaway database's catalog.
    admin
        .execute_unprepared("REVOKE SELECT ON pg_catalog.pg_locks FROM PUBLIC")
        .await
        .expect("revoke pg_locks");
    let rw = rows_only_user(&t, &admin).await;
    let denied = rw
        .query_one_raw(outbox::sea_orm::Statement::from_string(
            rw.get_database_backend(),
            "SELECT COUNT(*) FROM pg_locks",
        ))
        .await;
    assert!(denied.is_err(), "pg_locks still readable: {denied:?}");
    let seen = Seen::default();
    let rt = builder(rw.clone(), &seen)
        .start()
        .await
        .expect("start without pg_locks");
    for round in 0..5u32 {
        let batch: Vec<_> = (0..10u32)
            .map(|i| NewMessage::new("least", i % 2, format!("{round}-{i}")))
            .collect();
        rt.outbox()
            .enqueue_batch(&rw, &batch)
            .await
            .expect("enqueue");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    wait_drained(rt.outbox(), "least", WAIT).await;
    assert_eq!(seen.all().len(), 50);
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    drop_user(&t, &admin, &rw).await;
}

on_every_backend!(
    #[skip(sqlite = "skipped on SQLite: no database users")]
    a_rows_only_user_runs_on_a_current_schema,
    #[skip(
        sqlite = "skipped on SQLite: no pg_locks",
        mysql = "skipped on MariaDB: no pg_locks (and no low-water mark)"
    )]
    sequencing_goes_on_where_pg_locks_is_not_readable,
);
