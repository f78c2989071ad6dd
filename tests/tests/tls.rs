//! TLS to PostgreSQL through the `tls-rustls` feature of outbox: with `sslmode=require` the
//! runtime's own connections are encrypted (`pg_stat_ssl`), and messages flow as usual.
//!
//! Run with `cargo test -p outbox-tests --features tls --test tls` and
//! `OUTBOX_TEST_POSTGRES_URL` set; the server needs `ssl = on` (Debian's PostgreSQL ships a
//! snakeoil certificate: `ALTER SYSTEM SET ssl = on; SELECT pg_reload_conf();`). Without the
//! feature, the URL or a server with TLS, the test shows as ignored with the reason.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outbox::sea_orm::{ConnectOptions, ConnectionTrait, Database, TransactionTrait};
use outbox::{HandlerSpec, LeaseContext, Message, NewMessage, Outbox, Profile, QueueSpec};
use outbox_tests::{Kind, TestDb, eventually, scalar};

/// Whether this connection's session is encrypted, by the server's account.
async fn encrypted(db: &impl ConnectionTrait) -> i64 {
    scalar(
        db,
        "SELECT COALESCE((SELECT ssl::int FROM pg_stat_ssl WHERE pid = pg_backend_pid()), 0)::BIGINT",
    )
    .await
}

async fn runtime_works_over_tls(t: Arc<TestDb>) {
    let with = |mode: &str| {
        let mut o = ConnectOptions::new(format!("{}?sslmode={mode}", t.url));
        o.max_connections(8).min_connections(0).sqlx_logging(false);
        o
    };
    // The check tells the two apart: a plain session reports 0.
    let plain = Database::connect(with("disable"))
        .await
        .expect("plain connection");
    assert_eq!(
        encrypted(&plain).await,
        0,
        "sslmode=disable is not encrypted"
    );
    plain.close().await.ok();

    let db = Database::connect(with("require"))
        .await
        .expect("sslmode=require connects (built with tls-rustls)");
    assert_eq!(encrypted(&db).await, 1, "sslmode=require is encrypted");

    let handled = Arc::new(AtomicUsize::new(0));
    let count = handled.clone();
    let running = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("tls_pings", 2))
        .handler(HandlerSpec::leased(
            "tls_pings",
            "count",
            move |_m: &Message, _ctx: &LeaseContext| {
                count.fetch_add(1, Ordering::SeqCst);
                Box::pin(async { Ok(()) })
            },
        ))
        .start()
        .await
        .expect("start over TLS");
    let txn = db.begin().await.expect("begin");
    for p in 0..10_u32 {
        running
            .outbox()
            .enqueue(&txn, NewMessage::new("tls_pings", p % 2, b"ping".to_vec()))
            .await
            .expect("enqueue");
    }
    assert_eq!(
        encrypted(&txn).await,
        1,
        "the producer's transaction is encrypted"
    );
    txn.commit().await.expect("commit");
    eventually(Duration::from_secs(20), "10 pings handled", || {
        let handled = handled.clone();
        async move { handled.load(Ordering::SeqCst) == 10 }
    })
    .await;
    // Every session of this database is the runtime's or the test's, and all are encrypted.
    let plain_sessions = scalar(
        &db,
        "SELECT COUNT(*)::BIGINT FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid WHERE a.datname = current_database() AND NOT s.ssl",
    )
    .await;
    assert_eq!(
        plain_sessions, 0,
        "no session of this database is in plain text"
    );
    running
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "tls"),
    ignore = "skipped: built without TLS; run `cargo test -p outbox-tests --features tls --test tls`"
)]
#[cfg_attr(
    all(feature = "tls", outbox_no_postgres),
    ignore = "skipped: OUTBOX_TEST_POSTGRES_URL is not set"
)]
#[cfg_attr(
    all(feature = "tls", not(outbox_no_postgres), outbox_no_pg_tls),
    ignore = "skipped: the PostgreSQL server has TLS off (`SHOW ssl`); turn it on or require it with OUTBOX_TEST_REQUIRE=postgres-tls"
)]
async fn postgres_runtime_works_over_tls() {
    outbox_tests::run(Kind::Postgres, runtime_works_over_tls).await
}
