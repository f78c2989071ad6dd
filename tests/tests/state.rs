//! Handler state on every backend: handlers declared with `#[outbox::handler]` receive the
//! values given at start as `State<T>` (each start its own values), and a start that misses
//! any of them fails before touching the database, listing every missing one at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, Statement, TransactionTrait,
};
use outbox::{HandlerError, LeaseContext, MissingState, Profile, Queue, StartError, State};
use outbox_tests::{TestDb, eventually, on_every_backend, scalar};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[outbox::queue(partitions = 2, name = "state_jobs")]
struct Job {
    #[outbox(key)]
    n: u32,
}

/// What the leased handler saw; one per start, so the backends' tests do not mix.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(String, u32)>>>);

/// A second state type: a label written by both handlers.
#[derive(Clone)]
struct Tag(Arc<str>);

#[outbox::handler(leased)]
async fn see(
    msg: Job,
    ctx: &LeaseContext,
    State(recorder): State<Recorder>,
    State(tag): State<Tag>,
) -> Result<(), HandlerError> {
    recorder
        .0
        .lock()
        .map_err(|_| HandlerError::retry("recorder lock poisoned"))?
        .push((format!("{}:{}", ctx.handler(), tag.0), msg.n));
    Ok(())
}

#[outbox::handler(transactional)]
async fn book(msg: Job, txn: &DatabaseTransaction, tag: State<Tag>) -> Result<(), HandlerError> {
    let sql = if txn.get_database_backend() == DbBackend::Postgres {
        "INSERT INTO booked (tag, n) VALUES ($1, $2)"
    } else {
        "INSERT INTO booked (tag, n) VALUES (?, ?)"
    };
    txn.execute_raw(Statement::from_sql_and_values(
        txn.get_database_backend(),
        sql,
        [tag.0.0.to_string().into(), i64::from(msg.n).into()],
    ))
    .await?;
    Ok(())
}

/// Both handlers see the values given to their own start, every time they are called.
async fn handlers_receive_the_state_given_at_start(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    db.execute_unprepared("CREATE TABLE booked (tag VARCHAR(64) NOT NULL, n BIGINT NOT NULL)")
        .await
        .expect("create booked");
    let recorder = Recorder::default();
    let tag = format!("{:?}", t.kind);
    let running = outbox::discover(db.clone())
        .profile(Profile::LowLatency)
        .install_global(false)
        .state(recorder.clone())
        .state(Tag(tag.clone().into()))
        .start()
        .await
        .expect("start with every state");
    let txn = db.begin().await.expect("begin");
    for n in 0..6 {
        Job { n }
            .enqueue_with(running.outbox(), &txn)
            .await
            .expect("enqueue");
    }
    txn.commit().await.expect("commit");

    eventually(Duration::from_secs(20), "both handlers done", || {
        let (db, recorder) = (db.clone(), recorder.clone());
        async move {
            recorder.0.lock().map(|v| v.len()).unwrap_or(0) == 6
                && scalar(&db, "SELECT COUNT(*) FROM booked").await == 6
        }
    })
    .await;
    let mut seen = recorder.0.lock().expect("lock").clone();
    seen.sort_by_key(|(_, n)| *n);
    assert_eq!(
        seen,
        (0..6)
            .map(|n| (format!("see:{tag}"), n))
            .collect::<Vec<_>>(),
        "the leased handler saw this start's recorder and tag"
    );
    let sql = format!("SELECT COUNT(*) FROM booked WHERE tag = '{tag}'");
    assert_eq!(
        scalar(&db, &sql).await,
        6,
        "the transactional handler saw this start's tag"
    );
    running
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}

/// Every state a handler takes and nobody gave is listed, for every handler, in one error;
/// giving some of them lists only the rest.
async fn a_missing_state_fails_start_with_the_list(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let missing = |handler: &str, type_name: &'static str| (handler.to_owned(), type_name);
    let list = |e: StartError| match e {
        StartError::MissingState(v) => v
            .into_iter()
            .map(|m: MissingState| {
                assert_eq!(m.queue, "state_jobs");
                (m.handler, m.type_name)
            })
            .collect::<Vec<_>>(),
        other => panic!("expected MissingState, got {other:?}"),
    };
    let tag = std::any::type_name::<Tag>();
    let recorder = std::any::type_name::<Recorder>();

    let e = outbox::discover(db.clone())
        .install_global(false)
        .start()
        .await
        .expect_err("no state given");
    let text = e.to_string();
    assert!(
        text.starts_with(
            "3 handler state(s) missing: handler `book` of queue `state_jobs` takes `State<"
        ),
        "{text}"
    );
    assert_eq!(
        list(e),
        [
            missing("book", tag),
            missing("see", recorder),
            missing("see", tag)
        ]
    );

    let e = outbox::discover(db.clone())
        .install_global(false)
        .state(Tag("x".into()))
        .start()
        .await
        .expect_err("the recorder is missing");
    assert_eq!(list(e), [missing("see", recorder)]);

    // Refused before anything touched the database: no outbox table was created.
    let tables = match t.kind {
        outbox_tests::Kind::Sqlite => {
            "SELECT COUNT(*) FROM sqlite_master WHERE name LIKE 'outbox%'"
        }
        outbox_tests::Kind::Postgres => {
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public' AND table_name LIKE 'outbox%'"
        }
        outbox_tests::Kind::Mysql => {
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name LIKE 'outbox%'"
        }
    };
    assert_eq!(scalar(&db, tables).await, 0);
}

on_every_backend!(
    handlers_receive_the_state_given_at_start,
    a_missing_state_fails_start_with_the_list,
);
