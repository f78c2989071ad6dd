//! Database faults and awkward producers: connections killed from the server side mid-drain,
//! a pool too small for the profile, a producer transaction held open for seconds, a queue
//! nobody handles.

use std::sync::Arc;
use std::time::Duration;

use outbox::sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait,
};
use outbox::{HandlerSpec, NewMessage, Outbox, QueueSpec, StartError};
use outbox_tests::{
    Harness, Seen, TestDb, assert_invariants, create_effects_table, effects, on_every_backend,
    write_effect,
};

const WAIT: Duration = Duration::from_secs(60);

fn writer() -> HandlerSpec {
    HandlerSpec::transactional("faults", "writer", |m, txn| {
        Box::pin(async move { Ok(write_effect(txn, "writer", m).await?) })
    })
}

/// Kills every other connection to the test database from the server side; returns how many.
async fn kill_connections(admin: &DatabaseConnection) -> usize {
    let backend = admin.get_database_backend();
    if backend == DbBackend::Postgres {
        let rows = admin
            .query_all_raw(Statement::from_string(
                backend,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
            ))
            .await
            .expect("terminate");
        rows.len()
    } else {
        let rows = admin
            .query_all_raw(Statement::from_string(
                backend,
                "SELECT id FROM information_schema.processlist WHERE db = DATABASE() AND id <> CONNECTION_ID()",
            ))
            .await
            .expect("processlist");
        let mut n = 0;
        for r in rows {
            let id: i64 = r.try_get_by_index(0).expect("id");
            if admin
                .execute_unprepared(&format!("KILL {id}"))
                .await
                .is_ok()
            {
                n += 1;
            }
        }
        n
    }
}

/// Connections killed server-side while the runtime drains: it reconnects by itself and
/// drains with no loss and no duplicate effect.
async fn connections_killed_mid_drain_lose_nothing(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    create_effects_table(&db).await;
    let h = Harness::start(db, |b| {
        b.queue(QueueSpec::new("faults", 4)).handler(writer())
    })
    .await
    .with_wait(WAIT)
    .with_grace(Duration::from_secs(10));
    let n = 600u32;
    let batch: Vec<_> = (0..n)
        .map(|i| NewMessage::new("faults", i % 4, format!("{i:05}")))
        .collect();
    h.enqueue_committed(&batch).await;
    let admin = t.pool(1).await;
    let mut killed = 0;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        killed += kill_connections(&admin).await;
    }
    assert!(killed > 0, "no connection was killed");
    h.wait_drained("faults").await;
    let rows = effects(&admin).await;
    assert_eq!(
        rows.len(),
        n as usize,
        "lost or duplicated effects after {killed} killed connections"
    );
    for p in 0..4 {
        let seqs: Vec<i64> = rows.iter().filter(|r| r.1 == p).map(|r| r.2).collect();
        assert_eq!(
            seqs,
            (1..=n as i64 / 4).collect::<Vec<_>>(),
            "partition {p}"
        );
    }
    h.stop().await;
    // Checked on the admin connection, which the kills spared.
    assert_invariants(&admin, "outbox_").await;
}

/// A pool smaller than the profile needs fails at start with a clear, typed error.
async fn pool_too_small_fails_fast(t: Arc<TestDb>) {
    let db = t.pool(1).await;
    let err = Outbox::builder(db.clone())
        .queue(QueueSpec::new("faults", 4))
        .handler(writer())
        .handler(HandlerSpec::leased("faults", "mailer", |_, _| {
            Box::pin(async { Ok(()) })
        }))
        .start()
        .await
        .expect_err("pool of one connection");
    // Two handlers of concurrency 2, the sequencer, the scans; PostgreSQL's listener too.
    let needed = if t.kind == outbox_tests::Kind::Postgres {
        7
    } else {
        6
    };
    assert!(
        matches!(err, StartError::PoolTooSmall { needed: n, available: 1 } if n == needed),
        "{err:?}"
    );
    assert!(err.to_string().contains("max_connections"), "{err}");
}

/// A producer that keeps its transaction open for seconds stalls neither other producers
/// nor other partitions, and its message is delivered once it commits.
async fn long_producer_transaction_stalls_nothing(t: Arc<TestDb>) {
    let db = t.pool(10).await;
    let seen = Seen::default();
    let s = seen.clone();
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("faults", 2))
            .handler(HandlerSpec::transactional("faults", "h", move |m, _| {
                s.push("h", m);
                Box::pin(async { Ok(()) })
            }))
    })
    .await;
    // Rows just below and just above the open transaction's row: the sequencer's deletes
    // around it (on MySQL/MariaDB, runs of consecutive ids) must never touch it.
    let before = db.begin().await.expect("begin");
    let early: Vec<_> = (0..4)
        .map(|i| NewMessage::new("faults", i % 2, format!("early-{i}")))
        .collect();
    h.enqueue_batch_in(&before, &early).await;
    let long = db.begin().await.expect("begin");
    h.enqueue_in(&long, NewMessage::new("faults", 0, "long"))
        .await;
    before.commit().await.expect("commit");
    for i in 0..16 {
        h.enqueue(NewMessage::new("faults", i % 2, format!("short-{i}")))
            .await;
    }
    seen.wait_until(
        Duration::from_secs(8),
        "others while the long transaction is open",
        |d| d.len() == 20,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    long.commit().await.expect("commit");
    seen.wait_until(WAIT, "the long transaction's message", |d| d.len() == 21)
        .await;
    assert_eq!(seen.all()[20].body, "long");
    h.finish().await;
}

/// Messages of a queue nobody handles stay pending, are never dead-lettered, and show in the
/// depth counts.
async fn queue_nobody_handles_keeps_its_messages(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("faults", 2))
            .queue(QueueSpec::new("orphan", 2))
            .handler(writer())
    })
    .await
    .with_wait(WAIT);
    create_effects_table(&db).await;
    for i in 0..5 {
        h.enqueue(NewMessage::new("orphan", i % 2, "x")).await;
    }
    h.wait_depth("orphan", "sequenced", |d| {
        d.unsequenced == 0 && d.stored == 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = h.depth("orphan").await;
    assert_eq!((d.stored, d.handlers.len()), (5, 0), "{d:?}");
    assert_eq!(
        h.outbox()
            .count_dead_letters(&outbox::DeadLetterFilter::all().queue("orphan"))
            .await
            .expect("count"),
        0
    );
    h.finish().await;
}

/// sea-orm opens SQLite with a single connection unless told otherwise; the runtime, a
/// transactional handler and producers all work on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_runs_on_a_single_connection() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("one.db").display());
    let db = outbox::sea_orm::Database::connect(url.as_str())
        .await
        .expect("connect");
    create_effects_table(&db).await;
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("faults", 2)).handler(writer())
    })
    .await
    .with_wait(WAIT);
    for i in 0..20 {
        let txn = db.begin().await.expect("begin");
        h.enqueue_in(&txn, NewMessage::new("faults", i % 2, format!("{i}")))
            .await;
        txn.commit().await.expect("commit");
    }
    h.wait_drained("faults").await;
    assert_eq!(effects(&db).await.len(), 20);
    h.finish().await;
}

/// A batch bigger than one statement's packet (24 messages of 1 MiB) is split into several
/// INSERTs inside the caller's transaction and delivered byte-exact.
async fn large_batch_of_large_payloads(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    let h = Harness::start(db, |b| {
        b.queue(QueueSpec::new("faults", 1)).handler(
            HandlerSpec::leased("faults", "h", move |m, _| {
                g.lock()
                    .expect("lock")
                    .push((m.payload().len(), m.payload()[0]));
                Box::pin(async { Ok(()) })
            })
            .overrides(outbox::Overrides::NONE.batch_size(4)),
        )
    })
    .await
    .with_wait(WAIT);
    let batch: Vec<_> = (0..24u8)
        .map(|i| NewMessage::new("faults", 0, vec![i; 1 << 20]))
        .collect();
    // 24 MiB in one transaction.
    h.enqueue_committed(&batch).await;
    h.wait_drained("faults").await;
    let got = got.lock().expect("lock").clone();
    assert_eq!(got, (0..24u8).map(|i| (1 << 20, i)).collect::<Vec<_>>());
    h.finish().await;
}

on_every_backend!(
    large_batch_of_large_payloads,
    #[skip(
        sqlite = "skipped on SQLite: an embedded database has no server-side connections to kill"
    )]
    connections_killed_mid_drain_lose_nothing,
    #[skip(
        sqlite = "skipped on SQLite: any pool works, one connection included (see `sqlite_runs_on_a_single_connection`)"
    )]
    pool_too_small_fails_fast,
    #[skip(
        sqlite = "skipped on SQLite: one writer, an open write transaction holds every producer by design"
    )]
    long_producer_transaction_stalls_nothing,
    queue_nobody_handles_keeps_its_messages,
);
