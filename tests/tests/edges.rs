//! Edges of a deployment (issues 10 and 11): a disconnected connection, a payload limit the
//! server cannot take, a shutdown while a database call hangs, and the connection PostgreSQL's
//! listener takes from the pool.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use outbox::sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, TransactionTrait,
};
use outbox::{EnqueueError, Error, HandlerSpec, NewMessage, Outbox, QueueSpec, StartError};
use outbox_tests::{Harness, Kind, Seen, TestDb, on_every_backend};

/// A `DatabaseConnection` connected to nothing gets a typed error from enqueue, start and
/// admin, never a panic (sea-orm panics when asked such a connection's backend).
async fn a_disconnected_connection_gets_a_typed_error(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let rt = Outbox::builder(db.clone())
        .queue(QueueSpec::new("edge", 1))
        .connect()
        .await
        .expect("connect");
    let nowhere = DatabaseConnection::default();
    let err = rt
        .enqueue(&nowhere, NewMessage::new("edge", 0, "m"))
        .await
        .expect_err("disconnected");
    assert!(matches!(err, EnqueueError::Disconnected), "{err:?}");
    assert!(err.to_string().contains("disconnected"), "{err}");
    let start = Outbox::builder(DatabaseConnection::default())
        .queue(QueueSpec::new("edge", 1))
        .start()
        .await;
    assert!(matches!(start, Err(StartError::Database(_))), "{start:?}");
    let admin = Outbox::admin(DatabaseConnection::default(), "outbox_");
    assert!(matches!(admin, Err(Error::Database(_))), "{admin:?}");
}

/// A payload limit above MariaDB's `max_allowed_packet` is refused at start with a typed
/// error naming the setting (before: start succeeded and an enqueue near the limit reset the
/// connection).
async fn a_payload_limit_above_the_servers_packet_is_refused_at_start(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let row = db
        .query_one_raw(outbox::sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT @@max_allowed_packet",
        ))
        .await
        .expect("packet")
        .expect("a row");
    let packet: u64 = row.try_get_by_index(0).expect("value");
    let limit = usize::try_from(packet).expect("size") + 1;
    let err = Outbox::builder(db.clone())
        .max_payload_bytes(limit)
        .queue(QueueSpec::new("edge", 1))
        .connect()
        .await
        .expect_err("limit above the packet");
    assert!(
        matches!(&err, StartError::PayloadLimitAboveServer { setting: "max_allowed_packet", server, .. } if *server == packet),
        "{err:?}"
    );
    assert!(err.to_string().contains("max_allowed_packet"), "{err}");
    Outbox::builder(db.clone())
        .max_payload_bytes(1 << 20)
        .queue(QueueSpec::new("edge", 1))
        .connect()
        .await
        .expect("a limit within the packet");
}

/// `shutdown` returns with a clear error even while a database call hangs (a row lock held by
/// another transaction; on SQLite the write lock, with a busy timeout longer than the test):
/// past the grace period and the release window every task is abandoned. (Before: it waited
/// for the hung call forever.)
async fn shutdown_returns_while_a_database_call_hangs(t: Arc<TestDb>) {
    let db = if t.kind == Kind::Sqlite {
        let mut o = ConnectOptions::new(t.url.clone());
        o.max_connections(4)
            .sqlx_logging(false)
            .map_sqlx_sqlite_opts(|o| o.busy_timeout(Duration::from_secs(300)));
        Database::connect(o).await.expect("connect")
    } else {
        t.pool(8).await
    };
    db.execute_unprepared("CREATE TABLE blocker (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)")
        .await
        .expect("table");
    db.execute_unprepared("INSERT INTO blocker (id, v) VALUES (1, 0)")
        .await
        .expect("row");
    let inside = Arc::new(AtomicBool::new(false));
    let flag = inside.clone();
    // On SQLite a handler's transaction holds the write lock from its first statement, so the
    // hang is staged on a leased handler instead: it is held at a gate after its lease is
    // written, the test then takes the write lock, opens the gate, and the handler's ack
    // waits on the lock. (Before: the message was enqueued and the lock taken afterwards,
    // so on a fast run the message was already handled and nothing hung.)
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = if t.kind == Kind::Sqlite {
        let gate = gate.clone();
        HandlerSpec::leased("hang", "h", move |_m, _lease| {
            flag.store(true, Ordering::SeqCst);
            let gate = gate.clone();
            Box::pin(async move {
                let _open = gate.acquire().await;
                Ok(())
            })
        })
    } else {
        HandlerSpec::transactional("hang", "h", move |_m, txn| {
            flag.store(true, Ordering::SeqCst);
            Box::pin(async move {
                txn.execute_unprepared("UPDATE blocker SET v = v + 1 WHERE id = 1")
                    .await?;
                Ok(())
            })
        })
    };
    let rt = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("hang", 1)).handler(handler)
    })
    .await;
    let other = t.pool(2).await;
    let held_by_the_other = if t.kind == Kind::Sqlite {
        "the handler holds its lease at the gate"
    } else {
        "the handler waits on the row lock"
    };
    let h = other.begin().await.expect("begin");
    if t.kind != Kind::Sqlite {
        h.execute_unprepared("UPDATE blocker SET v = 10 WHERE id = 1")
            .await
            .expect("hold the row");
    }
    rt.enqueue(NewMessage::new("hang", 0, "m")).await;
    rt.eventually(held_by_the_other, || {
        let inside = inside.clone();
        async move { inside.load(Ordering::SeqCst) }
    })
    .await;
    if t.kind == Kind::Sqlite {
        h.execute_unprepared("UPDATE blocker SET v = 10 WHERE id = 1")
            .await
            .expect("hold the write lock");
        gate.add_permits(1);
    }
    let holder = h;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bound =
        Duration::from_millis(500) + outbox::SHUTDOWN_RELEASE_WINDOW + Duration::from_secs(10);
    let result = tokio::time::timeout(bound, rt.running().shutdown(Duration::from_millis(500)))
        .await
        .expect("shutdown returned while the database call still hangs");
    assert!(
        matches!(result, Err(Error::ShutdownTimedOut(_))),
        "{result:?}"
    );
    // Its tasks were abandoned holding a lease or a transaction: the stored state is not meant
    // to be consistent, so the invariants are not checked.
    holder.rollback().await.expect("release");
}

/// On PostgreSQL the listener holds a pooled connection for as long as the runtime runs: the
/// pool check counts it (before: a pool of exactly the advertised size starved the workers).
async fn the_listener_is_counted_in_the_pool(t: Arc<TestDb>) {
    let seen = Seen::default();
    let s = seen.clone();
    let spec = move || {
        let s = s.clone();
        HandlerSpec::transactional("pool", "h", move |m, _txn| {
            s.push("h", m);
            Box::pin(async { Ok(()) })
        })
    };
    // One handler with the default concurrency 2: 2 + sequencer + scans + listener = 5.
    let small = t.pool(4).await;
    let err = Outbox::builder(small)
        .queue(QueueSpec::new("pool", 4))
        .handler(spec())
        .start()
        .await
        .expect_err("four connections are one short");
    assert!(
        matches!(
            err,
            StartError::PoolTooSmall {
                needed: 5,
                available: 4
            }
        ),
        "{err:?}"
    );
    let h = Harness::start(t.pool(5).await, |b| {
        b.queue(QueueSpec::new("pool", 4)).handler(spec())
    })
    .await;
    let batch: Vec<_> = (0..200)
        .map(|i| NewMessage::new("pool", i % 4, format!("{i}")))
        .collect();
    h.enqueue_batch(&batch).await;
    h.wait_drained("pool").await;
    assert_eq!(seen.all().len(), 200);
    h.finish().await;
}

on_every_backend!(
    a_disconnected_connection_gets_a_typed_error,
    #[skip(
        sqlite = "skipped on SQLite: no packet limit below the payload limit",
        postgres = "skipped on PostgreSQL: no packet limit below the payload limit"
    )]
    a_payload_limit_above_the_servers_packet_is_refused_at_start,
    shutdown_returns_while_a_database_call_hangs,
    #[skip(
        sqlite = "skipped on SQLite: no listener, any pool works",
        mysql = "skipped on MariaDB: no listener"
    )]
    the_listener_is_counted_in_the_pool,
);
