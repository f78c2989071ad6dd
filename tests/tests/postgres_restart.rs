//! The PostgreSQL server restarted in the middle of a drain: the runtime reconnects by itself
//! (pool, workers and the LISTEN connection) and drains with no loss and no duplicate effect.
//!
//! It restarts the local server, so it runs only when `OUTBOX_TEST_PG_RESTART` names the
//! command that restarts it (`.ci/run` sets it); it lives in its own test binary so no other
//! test runs while the server is down.

use std::sync::Arc;
use std::time::Duration;

use outbox::sea_orm::TransactionTrait;
use outbox::{HandlerSpec, NewMessage, Outbox, Profile, QueueSpec};
use outbox_tests::{
    Kind, TestDb, assert_invariants, create_effects_table, effects, eventually, write_effect,
};

async fn server_restart_mid_drain_loses_nothing(t: Arc<TestDb>) {
    let Ok(restart) = std::env::var("OUTBOX_TEST_PG_RESTART") else {
        eprintln!("skipped: OUTBOX_TEST_PG_RESTART not set");
        return;
    };
    let db = t.pool(8).await;
    create_effects_table(&db).await;
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("restart", 4))
        .handler(HandlerSpec::transactional("restart", "writer", |m, txn| {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok(write_effect(txn, "writer", m).await?)
            })
        }))
        .start()
        .await
        .expect("start");
    let n = 1_000u32;
    let txn = db.begin().await.expect("begin");
    let batch: Vec<_> = (0..n)
        .map(|i| NewMessage::new("restart", i % 4, format!("{i:05}")))
        .collect();
    rt.outbox()
        .enqueue_batch(&txn, &batch)
        .await
        .expect("enqueue");
    txn.commit().await.expect("commit");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = std::process::Command::new("sh")
        .args(["-c", &restart])
        .status()
        .expect("run the restart command");
    assert!(status.success(), "`{restart}` failed");
    // Messages enqueued after the restart reach the runtime too (LISTEN reconnected).
    let mut late = Vec::new();
    for i in n..n + 20 {
        late.push(NewMessage::new("restart", i % 4, format!("{i:05}")));
    }
    eventually(Duration::from_secs(30), "enqueue after the restart", || {
        let (rt, db, late) = (rt.outbox().clone(), db.clone(), late.clone());
        async move { rt.enqueue_batch(&db, &late).await.is_ok() }
    })
    .await;
    outbox_tests::wait_drained(rt.outbox(), "restart", Duration::from_secs(90)).await;
    let rows = effects(&db).await;
    assert_eq!(
        rows.len(),
        n as usize + 20,
        "lost or duplicated effects across the restart"
    );
    for p in 0..4 {
        let seqs: Vec<i64> = rows.iter().filter(|r| r.1 == p).map(|r| r.2).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as i64).collect::<Vec<_>>(),
            "partition {p}"
        );
    }
    rt.shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    assert_invariants(&db, "outbox_").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_server_restart_mid_drain_loses_nothing() {
    outbox_tests::run(Kind::Postgres, server_restart_mid_drain_loses_nothing).await;
}
