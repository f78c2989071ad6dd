//! The engine's guarantees (the README's "Guarantees" table), each proven on SQLite, PostgreSQL and MariaDB.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use outbox::sea_orm::{ConnectionTrait, DatabaseConnection, Statement, TransactionTrait};
use outbox::{
    DeadLetterFilter, EnqueueError, Error, HandlerError, HandlerSpec, NewMessage, Outbox,
    Overrides, PoisonPolicy, Profile, QueueSpec, RegistryProblem, StartError,
};
use outbox_tests::{
    Seen, TestDb, create_effects_table, effects, eventually, on_every_backend, write_effect,
};

const WAIT: Duration = Duration::from_secs(30);

fn recorder(queue: &'static str, name: &'static str, seen: &Seen) -> HandlerSpec {
    let seen = seen.clone();
    HandlerSpec::transactional(queue, name, move |m, _txn| {
        seen.push(name, m);
        Box::pin(async { Ok(()) })
    })
}

fn leased_recorder(queue: &'static str, name: &'static str, seen: &Seen) -> HandlerSpec {
    let seen = seen.clone();
    HandlerSpec::leased(queue, name, move |m, _ctx| {
        seen.push(name, m);
        Box::pin(async { Ok(()) })
    })
}

async fn raw(db: &DatabaseConnection, sql: &str) {
    db.execute_raw(Statement::from_string(
        db.get_database_backend(),
        sql.to_owned(),
    ))
    .await
    .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn bodies(d: &[outbox_tests::Delivery]) -> Vec<String> {
    d.iter().map(|d| d.body.clone()).collect()
}

/// Guarantee 1: enqueue joins the caller's transaction; rollback (also of a savepoint) means
/// the message never existed.
async fn enqueue_commits_and_rolls_back_with_the_caller(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("atomic", 2))
        .handler(recorder("atomic", "h", &seen))
        .start()
        .await
        .expect("start");

    let txn = db.begin().await.expect("begin");
    rt.enqueue(&txn, NewMessage::new("atomic", 0, "rolled-back"))
        .await
        .expect("enqueue");
    txn.rollback().await.expect("rollback");

    let txn = db.begin().await.expect("begin");
    rt.enqueue(&txn, NewMessage::new("atomic", 0, "outer-1"))
        .await
        .expect("enqueue");
    let sp = txn.begin().await.expect("savepoint");
    rt.enqueue(&sp, NewMessage::new("atomic", 0, "inner"))
        .await
        .expect("enqueue");
    sp.rollback().await.expect("rollback savepoint");
    rt.enqueue(&txn, NewMessage::new("atomic", 0, "outer-2"))
        .await
        .expect("enqueue");
    // Not visible to the workers before commit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        seen.all().is_empty(),
        "delivered before commit: {:?}",
        seen.all()
    );
    txn.commit().await.expect("commit");

    seen.wait_until(WAIT, "two messages", |d| d.len() >= 2)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bodies(&seen.all()), ["outer-1", "outer-2"]);
    let depth = rt.depth("atomic").await.expect("depth");
    assert_eq!(depth.unsequenced, 0);
    assert_eq!(depth.handlers[0].pending, 0);
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// A sequencing pass takes the oldest rows of every queue at once. A partition that another
/// sequencer holds is left to it, and the rest of the pass goes on: the other partition and
/// the other queue are delivered while it is held, and its own messages once it is released,
/// in order. (SQLite has one writer, so nothing else can hold a partition there.)
async fn a_held_partition_does_not_hold_up_the_others(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("held", 2))
        .queue(QueueSpec::new("other", 1))
        .handler(recorder("held", "h", &seen))
        .handler(recorder("other", "o", &seen))
        .start()
        .await
        .expect("start");
    // Another sequencer's transaction, as it would hold partition 0 of `held`.
    let holder = db.begin().await.expect("begin");
    holder
        .query_one_raw(Statement::from_string(
            holder.get_database_backend(),
            "SELECT last_seq FROM outbox_partitions WHERE queue = 'held' AND partition_no = 0 FOR UPDATE",
        ))
        .await
        .expect("hold partition 0");
    let batch: Vec<_> = (0..6)
        .map(|i| NewMessage::new("held", i % 2, format!("p{}-{i}", i % 2)))
        .chain([NewMessage::new("other", 0, "o-0")])
        .collect();
    rt.enqueue_batch(&db, &batch).await.expect("enqueue");
    seen.wait_until(WAIT, "partition 1 and the other queue", |d| d.len() == 4)
        .await;
    assert!(
        seen.all()
            .iter()
            .all(|d| d.partition == 1 || d.handler == "o"),
        "nothing of the held partition before it is released: {:?}",
        seen.all()
    );
    holder.rollback().await.expect("release");
    seen.wait_until(WAIT, "the held partition after release", |d| d.len() == 7)
        .await;
    let held: Vec<_> = seen
        .of("h")
        .into_iter()
        .filter(|d| d.partition == 0)
        .map(|d| (d.seq, d.body))
        .collect();
    assert_eq!(
        held,
        [(1, "p0-0".into()), (2, "p0-2".into()), (3, "p0-4".into())]
    );
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// Guarantee 2: a message whose transaction commits after one holding a higher id is not
/// skipped; it takes its place in commit order.
async fn late_commit_of_a_lower_id_is_delivered_in_commit_order(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("late", 1))
        .handler(recorder("late", "h", &seen))
        .start()
        .await
        .expect("start");
    if !t.concurrent_writers() {
        // SQLite has a single writer: the earlier transaction commits first by construction.
        rt.enqueue(&db, NewMessage::new("late", 0, "A"))
            .await
            .expect("enqueue");
        rt.enqueue(&db, NewMessage::new("late", 0, "B"))
            .await
            .expect("enqueue");
        seen.wait_until(WAIT, "A and B", |d| d.len() == 2).await;
        assert_eq!(bodies(&seen.all()), ["A", "B"]);
        rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
        return;
    }
    let a = db.begin().await.expect("begin a");
    rt.enqueue(&a, NewMessage::new("late", 0, "A-lower-id"))
        .await
        .expect("enqueue a");
    let b = db.begin().await.expect("begin b");
    rt.enqueue(&b, NewMessage::new("late", 0, "B-higher-id"))
        .await
        .expect("enqueue b");
    b.commit().await.expect("commit b");
    // B is delivered while A is still open: an open producer transaction stalls nothing.
    seen.wait_until(WAIT, "B while A is open", |d| d.len() == 1)
        .await;
    a.commit().await.expect("commit a");
    seen.wait_until(WAIT, "A after its commit", |d| d.len() == 2)
        .await;
    let all = seen.all();
    assert_eq!(bodies(&all), ["B-higher-id", "A-lower-id"]);
    assert_eq!(all.iter().map(|d| d.seq).collect::<Vec<_>>(), [1, 2]);
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// Guarantee 2 against the sequencer's low-water mark (PostgreSQL starts its scan above the
/// ids it knows are settled): a producer transaction that drew a low id and stays open while
/// many later messages are sequenced, across several moves of the mark, is still delivered
/// when it commits. (A mark that rose to the highest id moved would skip it forever.)
async fn an_open_producer_holds_the_sequencers_low_water_mark(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("mark", 2))
        .handler(recorder("mark", "h", &seen))
        .start()
        .await
        .expect("start");
    let open = db.begin().await.expect("begin");
    rt.enqueue(&open, NewMessage::new("mark", 0, "open"))
        .await
        .expect("enqueue in the open transaction");
    // Later messages commit one by one for about a second: many passes, each reading ids
    // above the open one, and several looks at the mark.
    for i in 0..40u32 {
        rt.enqueue(&db, NewMessage::new("mark", i % 2, format!("later-{i}")))
            .await
            .expect("enqueue");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    seen.wait_until(WAIT, "the later messages", |d| d.len() == 40)
        .await;
    open.commit().await.expect("commit the open transaction");
    seen.wait_until(WAIT, "the open transaction's message", |d| d.len() == 41)
        .await;
    let all = seen.all();
    let last = all.last().expect("deliveries");
    assert_eq!(last.body, "open");
    assert_eq!(last.partition, 0);
    assert_eq!(
        last.seq, 21,
        "numbered after the 20 later messages of its partition"
    );
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// Guarantee 2: with concurrent producers each partition is delivered densely in sequence
/// order, and each producer's messages keep their order.
async fn concurrent_producers_keep_order_per_partition(t: Arc<TestDb>) {
    let db = t.pool(12).await;
    let seen = Seen::default();
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("order", 3))
        .handler(recorder("order", "h", &seen))
        .start()
        .await
        .expect("start");
    let producers = 4;
    let per = 60;
    let mut tasks = Vec::new();
    for p in 0..producers {
        let (db, ob) = (db.clone(), rt.outbox().clone());
        tasks.push(tokio::spawn(async move {
            for j in 0..per {
                let txn = db.begin().await.expect("begin");
                let part = (j % 3) as u32;
                ob.enqueue(&txn, NewMessage::new("order", part, format!("{p}:{j:04}")))
                    .await
                    .expect("enqueue");
                if j % 2 == 0 {
                    ob.enqueue(&txn, NewMessage::new("order", part, format!("{p}:{j:04}b")))
                        .await
                        .expect("enqueue");
                }
                txn.commit().await.expect("commit");
            }
        }));
    }
    for task in tasks {
        task.await.expect("producer");
    }
    let total = producers * (per + per / 2);
    seen.wait_until(WAIT, "every message", |d| d.len() >= total)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let all = seen.all();
    assert_eq!(all.len(), total, "duplicates delivered");
    for part in 0..3 {
        let d: Vec<_> = all.iter().filter(|d| d.partition == part).collect();
        let seqs: Vec<i64> = d.iter().map(|d| d.seq).collect();
        assert_eq!(
            seqs,
            (1..=d.len() as i64).collect::<Vec<_>>(),
            "partition {part} not dense in order"
        );
        for p in 0..producers {
            let mine: Vec<&str> = d
                .iter()
                .map(|d| d.body.as_str())
                .filter(|b| b.starts_with(&format!("{p}:")))
                .collect();
            let mut sorted = mine.clone();
            sorted.sort();
            assert_eq!(mine, sorted, "producer {p} reordered in partition {part}");
        }
    }
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// Guarantee 3: a transactional handler's writes commit iff the cursor advances; errors and
/// panics (also after partial writes) leave no effect, and retries end with exactly one.
async fn transactional_effects_happen_exactly_once(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    create_effects_table(&db).await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let handler = HandlerSpec::transactional("effects", "writer", move |m, txn| {
        c.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            write_effect(txn, "writer", m).await?;
            let n: u32 = String::from_utf8_lossy(m.payload()).parse().unwrap_or(0);
            if m.attempt() == 1 && n.is_multiple_of(5) {
                return Err(HandlerError::retry("fails after writing its effect"));
            }
            if m.attempt() == 1 && n.is_multiple_of(7) {
                panic!("handler panics after writing its effect");
            }
            Ok(())
        })
    })
    .overrides(
        Overrides::NONE
            .backoff_base(Duration::from_millis(10))
            .backoff_max(Duration::from_millis(40))
            .batch_size(8),
    );
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("effects", 4))
        .handler(handler)
        .start()
        .await
        .expect("start");
    let n = 120u32;
    let batch: Vec<NewMessage> = (1..=n)
        .map(|i| NewMessage::new("effects", i % 4, i.to_string()))
        .collect();
    let txn = db.begin().await.expect("begin");
    rt.enqueue_batch(&txn, &batch).await.expect("enqueue");
    txn.commit().await.expect("commit");
    outbox_tests::wait_drained(&rt, "effects", WAIT).await;
    let rows = effects(&db).await;
    assert_eq!(
        rows.len(),
        n as usize,
        "every message has exactly one effect"
    );
    let mut bodies: Vec<u32> = rows.iter().map(|r| r.3.parse().expect("number")).collect();
    bodies.sort();
    assert_eq!(bodies, (1..=n).collect::<Vec<_>>());
    for part in 0..4 {
        let seqs: Vec<i64> = rows.iter().filter(|r| r.1 == part).map(|r| r.2).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as i64).collect::<Vec<_>>(),
            "partition {part} effects out of order"
        );
    }
    assert!(calls.load(Ordering::Relaxed) > n, "failures were retried");
    assert_eq!(
        rt.count_dead_letters(&DeadLetterFilter::all())
            .await
            .expect("count"),
        0
    );
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// Guarantee 4: a lease that expired without an ack (crashed holder) is taken over after its
/// expiry, with the attempt count raised.
async fn expired_lease_is_redelivered_with_attempt_raised(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let build = || {
        Outbox::builder(db.clone())
            .profile(Profile::LowLatency)
            .queue(QueueSpec::new("lease", 1))
            .handler(leased_recorder("lease", "h", &seen))
    };
    let producer = build().connect().await.expect("connect");
    producer
        .enqueue(&db, NewMessage::new("lease", 0, "m1"))
        .await
        .expect("enqueue");
    // A worker that crashed while holding the lease: it expires in 1.5 s.
    let expires = now_ms() + 1_500;
    raw(
        &db,
        &format!("UPDATE outbox_cursors SET lease_token = 'crashed', lease_owner = 'dead', lease_expires_at = {expires} WHERE queue = 'lease'"),
    )
    .await;
    // Sequence it (the runtime's sequencer), but the lease keeps it from being delivered.
    let rt = build().start().await.expect("start");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(seen.all().is_empty(), "delivered under a live lease");
    seen.wait_until(WAIT, "redelivery after expiry", |d| d.len() == 1)
        .await;
    assert!(now_ms() >= expires, "delivered before the lease expired");
    assert_eq!(
        seen.all()[0].attempt,
        2,
        "attempt raised by the expired lease"
    );
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// Guarantee 4: an ack after the lease was taken over is rejected; only the new holder's ack
/// counts, and the message is delivered again.
async fn ack_of_a_lost_lease_is_rejected(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let (s, db2) = (seen.clone(), db.clone());
    let handler = HandlerSpec::leased("steal", "h", move |m, _ctx| {
        s.push("h", m);
        let db = db2.clone();
        let first = m.attempt() == 1;
        Box::pin(async move {
            if first {
                // Another worker takes the lease over while this one still runs.
                let until = now_ms() + 800;
                raw(&db, &format!("UPDATE outbox_cursors SET lease_token = 'thief', lease_expires_at = {until} WHERE queue = 'steal'")).await;
            }
            Ok(())
        })
    });
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("steal", 1))
        .handler(handler)
        .start()
        .await
        .expect("start");
    rt.enqueue(&db, NewMessage::new("steal", 0, "m"))
        .await
        .expect("enqueue");
    seen.wait_until(WAIT, "redelivery after the stale ack", |d| d.len() >= 2)
        .await;
    let all = seen.all();
    assert_eq!(all[0].seq, all[1].seq);
    assert_eq!(all[1].attempt, 2);
    let o = rt.outbox().clone();
    eventually(WAIT, "acked by the second delivery", || {
        let o = o.clone();
        async move {
            o.depth("steal")
                .await
                .map(|d| d.handlers[0].pending == 0)
                .unwrap_or(false)
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        seen.all().len(),
        2,
        "delivered again after a successful ack"
    );
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// Guarantee 4: an ack after the lease expired is rejected even if nobody took the lease
/// over; the message stays pending and is delivered again with the attempt raised.
async fn ack_after_lease_expiry_is_rejected(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let (s, db2) = (seen.clone(), db.clone());
    let handler = HandlerSpec::leased("expiry", "h", move |m, _ctx| {
        s.push("h", m);
        let db = db2.clone();
        let first = m.attempt() == 1;
        Box::pin(async move {
            if first {
                // The lease runs out while the handler works (a stalled process, a clock jump).
                let past = now_ms() - 1;
                raw(
                    &db,
                    &format!(
                        "UPDATE outbox_cursors SET lease_expires_at = {past} WHERE queue = 'expiry'"
                    ),
                )
                .await;
            }
            Ok(())
        })
    });
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("expiry", 1))
        .handler(handler)
        .start()
        .await
        .expect("start");
    rt.enqueue(&db, NewMessage::new("expiry", 0, "m"))
        .await
        .expect("enqueue");
    seen.wait_until(WAIT, "redelivery after the late ack", |d| d.len() >= 2)
        .await;
    let all = seen.all();
    assert_eq!((all[0].seq, all[1].seq, all[1].attempt), (1, 1, 2));
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    assert_eq!(
        seen.all().len(),
        2,
        "delivered again after a successful ack"
    );
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// Batch handlers: one call per batch, effects and ack in one commit; a failing batch is
/// split until the poisoned message is alone, which alone is dead-lettered; everything else is
/// handled exactly once and in order.
async fn batch_handlers_isolate_a_poisoned_message(t: Arc<TestDb>) {
    let db = t.pool(10).await;
    create_effects_table(&db).await;
    let seen = Seen::default();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let tx = HandlerSpec::transactional_batch("batchy", "writer", move |msgs, txn| {
        c.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            for m in msgs {
                write_effect(txn, "writer", m).await?;
            }
            if msgs.iter().any(|m| m.payload() == b"poison") {
                return Err(HandlerError::reject("poison in the batch"));
            }
            Ok(())
        })
    })
    .overrides(Overrides::NONE.batch_size(16));
    let s = seen.clone();
    let leased = HandlerSpec::leased_batch("batchy", "mailer", move |msgs, ctx| {
        assert_eq!(ctx.seq(), msgs[0].seq());
        let poisoned = msgs.iter().any(|m| m.payload() == b"poison");
        if !poisoned {
            for m in msgs {
                s.push("mailer", m);
            }
        }
        Box::pin(async move {
            if poisoned {
                Err(HandlerError::reject("poison"))
            } else {
                Ok(())
            }
        })
    })
    .overrides(Overrides::NONE.batch_size(16));
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("batchy", 2))
        .handler(tx)
        .handler(leased)
        .start()
        .await
        .expect("start");
    let msgs: Vec<NewMessage> = (0..40)
        .map(|i| {
            NewMessage::new(
                "batchy",
                i % 2,
                if i == 17 {
                    "poison".to_owned()
                } else {
                    format!("{i:03}")
                },
            )
        })
        .collect();
    rt.enqueue_batch(&db, &msgs).await.expect("enqueue");
    outbox_tests::wait_drained(&rt, "batchy", WAIT).await;
    let rows = effects(&db).await;
    let mut bodies: Vec<String> = rows.iter().map(|r| r.3.clone()).collect();
    assert_eq!(
        bodies.len(),
        39,
        "the poisoned message's effect must be rolled back, the rest kept once"
    );
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), 39, "duplicate effects");
    for p in 0..2 {
        let seqs: Vec<i64> = rows.iter().filter(|r| r.1 == p).map(|r| r.2).collect();
        let mut sorted = seqs.clone();
        sorted.sort();
        assert_eq!(seqs, sorted, "partition {p} out of order");
    }
    let dead = rt
        .dead_letters(&DeadLetterFilter::all(), 0, 10)
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 2, "one per handler: {dead:?}");
    assert!(dead.iter().all(|d| d.payload == b"poison"));
    assert_eq!(seen.of("mailer").len(), 39);
    assert!(
        calls.load(Ordering::Relaxed) < 40,
        "batches were used: {} calls",
        calls.load(Ordering::Relaxed)
    );
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// Guarantee 4: a leased handler may renew its lease to work longer than one lease; a renewal
/// after expiry or after the ack fails and does not resurrect the lease.
async fn leased_handlers_renew_their_lease(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let stash: Arc<std::sync::Mutex<Vec<outbox::LeaseContext>>> = Arc::default();
    let renewals = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (s, st, rn, db2) = (seen.clone(), stash.clone(), renewals.clone(), db.clone());
    let handler = HandlerSpec::leased("renew", "h", move |m, ctx| {
        s.push("h", m);
        st.lock().expect("lock").push(ctx.clone());
        let (rn, db, body) = (
            rn.clone(),
            db2.clone(),
            String::from_utf8_lossy(m.payload()).into_owned(),
        );
        Box::pin(async move {
            if body == "long" {
                // Three times the time before cancellation, renewing as it goes.
                for _ in 0..3 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let r = ctx.renew().await.map_err(|e| e.to_string());
                    rn.lock().expect("lock").push(r);
                }
            } else if body == "expired" && m.attempt() == 1 {
                let past = now_ms() - 1;
                raw(
                    &db,
                    &format!(
                        "UPDATE outbox_cursors SET lease_expires_at = {past} WHERE queue = 'renew'"
                    ),
                )
                .await;
                let r = ctx.renew().await;
                rn.lock().expect("lock").push(r.map_err(|e| e.to_string()));
            }
            Ok(())
        })
    })
    .overrides(
        Overrides::NONE
            .lease(Duration::from_millis(600))
            .lease_headroom(Duration::from_millis(200)),
    );
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("renew", 1))
        .handler(handler)
        .start()
        .await
        .expect("start");
    rt.enqueue(&db, NewMessage::new("renew", 0, "long"))
        .await
        .expect("enqueue");
    seen.wait_until(WAIT, "the long handler", |d| !d.is_empty())
        .await;
    outbox_tests::wait_drained(&rt, "renew", WAIT).await;
    let r = renewals.lock().expect("lock").clone();
    assert_eq!(r.len(), 3);
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    assert_eq!(
        seen.all().len(),
        1,
        "a renewed lease is not taken over: {:?}",
        seen.all()
    );

    // After the ack, the batch's lease cannot be renewed.
    let acked = stash.lock().expect("lock")[0].clone();
    assert!(matches!(acked.renew().await, Err(Error::LeaseLost)));

    // After expiry, renewal fails and the message is delivered again.
    rt.enqueue(&db, NewMessage::new("renew", 0, "expired"))
        .await
        .expect("enqueue");
    seen.wait_until(WAIT, "redelivery after the failed renewal", |d| {
        d.len() >= 3
    })
    .await;
    let r = renewals.lock().expect("lock").clone();
    assert_eq!(r.len(), 4);
    assert!(
        r[3].as_ref().is_err_and(|e| e.contains("lease was lost")),
        "{r:?}"
    );
    assert_eq!(seen.all()[2].attempt, 2);
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// Guarantee 5: backoff that new traffic does not cut short, max attempts, dead letter with
/// the last error, the partition moves on; replay delivers once even when replays race;
/// discard and purge.
async fn retries_dead_letters_and_replay(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let healed = Arc::new(AtomicBool::new(false));
    let (s, h) = (seen.clone(), healed.clone());
    let handler = HandlerSpec::transactional("dlq", "h", move |m, _txn| {
        s.push("h", m);
        let fail = m.payload().starts_with(b"poison") && !h.load(Ordering::SeqCst);
        Box::pin(async move {
            if fail {
                Err(HandlerError::retry(std::io::Error::other(
                    "downstream refused",
                )))
            } else {
                Ok(())
            }
        })
    })
    .overrides(
        Overrides::NONE
            .max_attempts(3)
            .backoff_base(Duration::from_millis(400))
            .backoff_max(Duration::from_millis(400)),
    );
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("dlq", 1))
        .handler(handler)
        .start()
        .await
        .expect("start");
    rt.enqueue(&db, NewMessage::new("dlq", 0, "poison-1"))
        .await
        .expect("enqueue");
    seen.wait_until(WAIT, "first attempt", |d| !d.is_empty())
        .await;
    let first_at = std::time::Instant::now();
    // New traffic on the partition during the backoff must not cut it short.
    for i in 0..5 {
        rt.enqueue(&db, NewMessage::new("dlq", 0, format!("after-{i}")))
            .await
            .expect("enqueue");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen.wait_until(WAIT, "second attempt", |d| d.len() >= 2)
        .await;
    assert!(
        first_at.elapsed() >= Duration::from_millis(190),
        "backoff cut short: {:?}",
        first_at.elapsed()
    );
    seen.wait_until(WAIT, "dead letter and the rest", |d| d.len() >= 3 + 5)
        .await;
    let all = seen.all();
    assert_eq!(bodies(&all[..3]), ["poison-1", "poison-1", "poison-1"]);
    assert_eq!(
        all[..3].iter().map(|d| d.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(
        bodies(&all[3..]),
        ["after-0", "after-1", "after-2", "after-3", "after-4"]
    );

    let dead = rt
        .dead_letters(&DeadLetterFilter::all().queue("dlq"), 0, 10)
        .await
        .expect("list");
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(
        (d.payload.as_slice(), d.attempts, d.partition, d.seq),
        (&b"poison-1"[..], 3, 0, 1)
    );
    assert!(
        d.last_error.contains("downstream refused"),
        "{}",
        d.last_error
    );
    assert!(d.failed_at_ms >= d.enqueued_at_ms);
    assert_eq!(
        rt.count_dead_letters(&DeadLetterFilter::all().handler("h"))
            .await
            .expect("count"),
        1
    );
    assert_eq!(
        rt.count_dead_letters(&DeadLetterFilter::all().handler("other"))
            .await
            .expect("count"),
        0
    );

    // Replay after the fix: delivered once more, at the tail, with attempts reset.
    healed.store(true, Ordering::SeqCst);
    let (a, b) = tokio::join!(rt.replay_dead_letter(d.id), rt.replay_dead_letter(d.id));
    assert!(
        a.is_ok() != b.is_ok(),
        "exactly one racing replay wins: {a:?} {b:?}"
    );
    assert!(matches!(
        a.err().or(b.err()),
        Some(Error::DeadLetterNotFound(_))
    ));
    seen.wait_until(WAIT, "replayed message", |d| d.len() >= 9)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all = seen.all();
    assert_eq!(all.len(), 9, "replayed once");
    assert_eq!(
        (all[8].body.as_str(), all[8].attempt, all[8].seq),
        ("poison-1", 1, 7)
    );
    assert_eq!(
        rt.count_dead_letters(&DeadLetterFilter::all())
            .await
            .expect("count"),
        0
    );

    // Discard and purge.
    healed.store(false, Ordering::SeqCst);
    rt.enqueue(&db, NewMessage::new("dlq", 0, "poison-2"))
        .await
        .expect("enqueue");
    rt.enqueue(&db, NewMessage::new("dlq", 0, "poison-3"))
        .await
        .expect("enqueue");
    let o = rt.outbox().clone();
    eventually(WAIT, "two dead letters", || {
        let o = o.clone();
        async move {
            o.count_dead_letters(&DeadLetterFilter::all())
                .await
                .unwrap_or(0)
                == 2
        }
    })
    .await;
    let dead = rt
        .dead_letters(&DeadLetterFilter::all(), 0, 10)
        .await
        .expect("list");
    rt.discard_dead_letter(dead[0].id).await.expect("discard");
    assert!(matches!(
        rt.discard_dead_letter(dead[0].id).await,
        Err(Error::DeadLetterNotFound(_))
    ));
    assert_eq!(
        rt.purge_dead_letters(&DeadLetterFilter::all().queue("dlq"))
            .await
            .expect("purge"),
        1
    );
    assert_eq!(
        rt.count_dead_letters(&DeadLetterFilter::all())
            .await
            .expect("count"),
        0
    );
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// Guarantee 5 (block policy): an exhausted head blocks its partition until an operator acts;
/// other partitions go on.
async fn block_policy_holds_the_head_until_an_operator_acts(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let healed = Arc::new(AtomicBool::new(false));
    let (s, h) = (seen.clone(), healed.clone());
    let handler = HandlerSpec::transactional("blocky", "h", move |m, _txn| {
        s.push("h", m);
        let fail = m.payload() == b"bad" && !h.load(Ordering::SeqCst);
        Box::pin(async move {
            if fail {
                Err(HandlerError::reject("bad input"))
            } else {
                Ok(())
            }
        })
    });
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("blocky", 2).poison_policy(PoisonPolicy::Block))
        .handler(handler)
        .start()
        .await
        .expect("start");
    for body in ["bad", "second"] {
        rt.enqueue(&db, NewMessage::new("blocky", 0, body))
            .await
            .expect("enqueue");
    }
    rt.enqueue(&db, NewMessage::new("blocky", 1, "other-partition"))
        .await
        .expect("enqueue");
    seen.wait_until(WAIT, "head attempt and other partition", |d| d.len() >= 2)
        .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let all = seen.all();
    assert!(bodies(&all).contains(&"other-partition".to_owned()));
    assert!(
        !bodies(&all).contains(&"second".to_owned()),
        "a blocked partition moved on"
    );
    let depth = rt.depth("blocky").await.expect("depth");
    assert_eq!(depth.handlers[0].blocked_partitions, 1);
    assert_eq!(depth.handlers[0].dead, 0);

    healed.store(true, Ordering::SeqCst);
    let head = head_seq(&rt, "blocky", "h", 0).await;
    assert_eq!(head, 1, "the operator sees the poisoned head");
    assert!(matches!(
        rt.unblock("blocky", 0, "h", head + 1).await,
        Err(Error::HeadMoved {
            expected: 2,
            found: Some(1),
            ..
        })
    ));
    assert!(matches!(
        rt.unblock("blocky", 1, "h", 1).await,
        Err(Error::HeadMoved { found: None, .. })
    ));
    rt.unblock("blocky", 0, "h", head).await.expect("unblock");
    seen.wait_until(WAIT, "head and successor after unblock", |d| {
        bodies(d).contains(&"second".to_owned())
    })
    .await;
    let tail: Vec<_> = seen
        .of("h")
        .into_iter()
        .filter(|d| d.partition == 0)
        .map(|d| d.body)
        .collect();
    assert_eq!(tail.last().map(String::as_str), Some("second"));
    assert_eq!(tail[tail.len() - 2], "bad");

    // skip_head moves a blocked head to the dead letters.
    healed.store(false, Ordering::SeqCst);
    rt.enqueue(&db, NewMessage::new("blocky", 0, "bad"))
        .await
        .expect("enqueue");
    rt.enqueue(&db, NewMessage::new("blocky", 0, "third"))
        .await
        .expect("enqueue");
    let o = rt.outbox().clone();
    eventually(WAIT, "blocked again", || {
        let o = o.clone();
        async move {
            o.depth("blocky")
                .await
                .map(|d| d.handlers[0].blocked_partitions == 1)
                .unwrap_or(false)
        }
    })
    .await;
    let head = head_seq(&rt, "blocky", "h", 0).await;
    rt.skip_head("blocky", 0, "h", head).await.expect("skip");
    seen.wait_until(WAIT, "successor after skip", |d| {
        bodies(d).contains(&"third".to_owned())
    })
    .await;
    // The operator's second click names the head that is gone: the healthy successor, already
    // handled or not, is never skipped by it.
    assert!(matches!(
        rt.skip_head("blocky", 0, "h", head).await,
        Err(Error::HeadMoved { .. })
    ));
    assert_eq!(
        rt.count_dead_letters(&DeadLetterFilter::all())
            .await
            .expect("count"),
        1
    );
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// The head a handler waits on in a partition, as the status shows it to an operator.
async fn head_seq(rt: &Outbox, queue: &str, handler: &str, partition: u32) -> i64 {
    rt.queue_status(queue)
        .await
        .expect("status")
        .handler(handler)
        .and_then(|h| h.partition(partition))
        .and_then(|p| p.head_seq)
        .expect("a head message")
}

/// Guarantee 6: several handlers of one queue each see every message, in order.
async fn every_handler_sees_every_message(t: Arc<TestDb>) {
    let db = t.pool(12).await;
    let seen = Seen::default();
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("fan", 2))
        .handler(recorder("fan", "projection", &seen))
        .handler(leased_recorder("fan", "mailer", &seen))
        .start()
        .await
        .expect("start");
    let batch: Vec<NewMessage> = (0..40)
        .map(|i| NewMessage::new("fan", i % 2, format!("{i:03}")))
        .collect();
    rt.enqueue_batch(&db, &batch).await.expect("enqueue");
    seen.wait_until(WAIT, "both handlers", |d| d.len() >= 80)
        .await;
    for h in ["projection", "mailer"] {
        let mine = seen.of(h);
        assert_eq!(mine.len(), 40, "{h}");
        for part in 0..2 {
            let b: Vec<_> = mine
                .iter()
                .filter(|d| d.partition == part)
                .map(|d| d.body.clone())
                .collect();
            let mut sorted = b.clone();
            sorted.sort();
            assert_eq!(b, sorted, "{h} partition {part}");
        }
    }
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// Guarantee 7: vacuum deletes only what every handler of the queue has processed.
async fn vacuum_keeps_what_any_handler_still_needs(t: Arc<TestDb>) {
    let db = t.pool(12).await;
    let seen = Seen::default();
    let slow_ok = Arc::new(AtomicBool::new(false));
    let (s, ok) = (seen.clone(), slow_ok.clone());
    let slow = HandlerSpec::transactional("vac", "slow", move |m, _txn| {
        s.push("slow", m);
        let pass = ok.load(Ordering::SeqCst);
        Box::pin(async move {
            if pass {
                Ok(())
            } else {
                Err(HandlerError::retry("not yet"))
            }
        })
    })
    .overrides(
        Overrides::NONE
            .backoff_base(Duration::from_millis(50))
            .backoff_max(Duration::from_millis(50))
            .max_attempts(1_000_000),
    );
    let mut tuning = Profile::LowLatency.runtime();
    tuning.vacuum_interval = Duration::from_millis(50);
    tuning.vacuum_after_acks = 1;
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .runtime_tuning(tuning)
        .queue(QueueSpec::new("vac", 2))
        .handler(recorder("vac", "fast", &seen))
        .handler(slow)
        .start()
        .await
        .expect("start");
    let batch: Vec<NewMessage> = (0..30)
        .map(|i| NewMessage::new("vac", i % 2, format!("{i}")))
        .collect();
    rt.enqueue_batch(&db, &batch).await.expect("enqueue");
    seen.wait_until(WAIT, "fast handler done", |d| {
        d.iter().filter(|d| d.handler == "fast").count() == 30
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let depth = rt.depth("vac").await.expect("depth");
    assert_eq!(
        depth.stored, 30,
        "vacuum removed rows the slow handler has not processed"
    );
    slow_ok.store(true, Ordering::SeqCst);
    let o = rt.outbox().clone();
    eventually(WAIT, "vacuumed after both handlers", || {
        let o = o.clone();
        async move { o.depth("vac").await.map(|d| d.stored == 0).unwrap_or(false) }
    })
    .await;
    let slow_bodies: std::collections::BTreeSet<_> =
        seen.of("slow").into_iter().map(|d| d.body).collect();
    assert_eq!(
        slow_bodies.len(),
        30,
        "slow handler saw every message before vacuum"
    );
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// Guarantees 2 and 3 across runtimes: two runtimes with their own pools on one database share
/// the work with no duplicate effect and keep order per partition.
async fn two_runtimes_share_work_without_duplicates(t: Arc<TestDb>) {
    let setup = t.pool(4).await;
    create_effects_table(&setup).await;
    let start = |db: DatabaseConnection| async move {
        Outbox::builder(db)
            .profile(Profile::LowLatency)
            .queue(QueueSpec::new("shared", 8))
            .handler(
                HandlerSpec::transactional("shared", "writer", |m, txn| {
                    Box::pin(async move { Ok(write_effect(txn, "writer", m).await?) })
                })
                .overrides(Overrides::NONE.batch_size(10)),
            )
            .start()
            .await
            .expect("start")
    };
    let (db1, db2) = (t.pool(8).await, t.pool(8).await);
    let a = start(db1.clone()).await;
    let b = start(db2.clone()).await;
    let n = 800u32;
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        let txn = db1.begin().await.expect("begin");
        let msgs: Vec<_> = chunk
            .iter()
            .map(|i| NewMessage::new("shared", i % 8, i.to_string()))
            .collect();
        a.enqueue_batch(&txn, &msgs).await.expect("enqueue");
        txn.commit().await.expect("commit");
    }
    eventually(WAIT, "drained", || {
        let a = a.outbox().clone();
        async move {
            a.depth("shared")
                .await
                .map(|d| d.unsequenced == 0 && d.handlers[0].pending == 0)
                .unwrap_or(false)
        }
    })
    .await;
    let rows = effects(&setup).await;
    assert_eq!(rows.len(), n as usize, "lost or duplicated effects");
    for part in 0..8 {
        let seqs: Vec<i64> = rows.iter().filter(|r| r.1 == part).map(|r| r.2).collect();
        assert_eq!(
            seqs,
            (1..=n as i64 / 8).collect::<Vec<_>>(),
            "partition {part}"
        );
        let b: Vec<u32> = rows
            .iter()
            .filter(|r| r.1 == part)
            .map(|r| r.3.parse().expect("n"))
            .collect();
        let mut sorted = b.clone();
        sorted.sort();
        assert_eq!(b, sorted, "partition {part} effects out of enqueue order");
    }
    a.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown a");
    b.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown b");
}

/// Guarantee 2: never two batches of one (partition, handler) at once, across runtimes with
/// their own pools; for both modes, measured inside the handlers.
async fn one_batch_per_partition_at_a_time_across_runtimes(t: Arc<TestDb>) {
    use std::collections::HashMap;
    use std::sync::Mutex;
    let in_flight: Arc<Mutex<HashMap<(String, u32), u32>>> = Arc::default();
    let overlaps = Arc::new(AtomicU32::new(0));
    let handled = Arc::new(AtomicU32::new(0));
    let guard = |name: &'static str| {
        let (in_flight, overlaps, handled) = (in_flight.clone(), overlaps.clone(), handled.clone());
        move |m: &outbox::Message| {
            let key = (name.to_owned(), m.partition());
            let (in_flight, overlaps, handled) =
                (in_flight.clone(), overlaps.clone(), handled.clone());
            Box::pin(async move {
                {
                    let mut f = in_flight.lock().expect("lock");
                    let n = f.entry(key.clone()).or_default();
                    *n += 1;
                    if *n > 1 {
                        overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
                *in_flight.lock().expect("lock").entry(key).or_default() -= 1;
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }) as outbox::HandlerFuture<'static>
        }
    };
    let mut runtimes = Vec::new();
    for _ in 0..2 {
        let db = t.pool(12).await;
        let (tx, leased) = (guard("tx"), guard("leased"));
        runtimes.push(
            Outbox::builder(db)
                .profile(Profile::LowLatency)
                .queue(QueueSpec::new("excl", 4))
                .handler(
                    HandlerSpec::transactional("excl", "tx", move |m, _| tx(m))
                        .overrides(Overrides::NONE.batch_size(4).concurrency(4)),
                )
                .handler(
                    HandlerSpec::leased("excl", "leased", move |m, _| leased(m))
                        .overrides(Overrides::NONE.batch_size(4).concurrency(4)),
                )
                .start()
                .await
                .expect("start"),
        );
    }
    let db = t.pool(2).await;
    let batch: Vec<NewMessage> = (0..200)
        .map(|i| NewMessage::new("excl", i % 4, format!("{i}")))
        .collect();
    runtimes[0]
        .enqueue_batch(&db, &batch)
        .await
        .expect("enqueue");
    outbox_tests::wait_drained(&runtimes[1], "excl", WAIT).await;
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two batches of one partition ran at once"
    );
    assert!(handled.load(Ordering::SeqCst) >= 400);
    for rt in runtimes {
        rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    }
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// Depth counts are exact after a scripted sequence: unsequenced before any runtime, then
/// pending, retrying and dead per handler.
async fn depth_counts_are_exact(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let producer = Outbox::builder(db.clone())
        .queue(QueueSpec::new("depth", 3))
        .connect()
        .await
        .expect("connect");
    for (p, n) in [(0u32, 5), (1, 3), (2, 1)] {
        for i in 0..n {
            producer
                .enqueue(&db, NewMessage::new("depth", p, format!("{p}-{i}")))
                .await
                .expect("enqueue");
        }
    }
    let d = producer.depth("depth").await.expect("depth");
    assert_eq!(
        (d.unsequenced, d.stored, d.handlers.len()),
        (9, 0, 0),
        "{d:?}"
    );
    // Partition 0 retries its head for a long time, partition 1 dead-letters its head, 2 is fine.
    let handler = HandlerSpec::transactional("depth", "h", |m, _| {
        let body = String::from_utf8_lossy(m.payload()).into_owned();
        Box::pin(async move {
            match body.as_str() {
                "0-0" => Err(HandlerError::retry("later")),
                "1-0" => Err(HandlerError::reject("never")),
                _ => Ok(()),
            }
        })
    })
    .overrides(
        Overrides::NONE
            .backoff_base(Duration::from_secs(600))
            .backoff_max(Duration::from_secs(600)),
    );
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("depth", 3))
        .handler(handler)
        .start()
        .await
        .expect("start");
    let o = rt.outbox().clone();
    eventually(WAIT, "settled", || {
        let o = o.clone();
        async move {
            o.depth("depth")
                .await
                .map(|d| {
                    d.unsequenced == 0 && d.handlers[0].pending == 5 && d.handlers[0].dead == 1
                })
                .unwrap_or(false)
        }
    })
    .await;
    let d = rt.depth("depth").await.expect("depth");
    assert_eq!((d.unsequenced, d.stored), (0, 9), "{d:?}");
    let h = &d.handlers[0];
    assert_eq!(
        (
            h.pending,
            h.retrying_partitions,
            h.leased_partitions,
            h.blocked_partitions,
            h.dead
        ),
        (5, 1, 0, 0, 1),
        "{h:?}"
    );
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// Guarantee 9: shutdown lets in-flight handlers finish within the grace period; past it, they
/// are cancelled, leases released, nothing half-acked, and the message is delivered later.
async fn graceful_shutdown_finishes_or_releases_work(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let build = |sleep_ms: u64| {
        let s = seen.clone();
        Outbox::builder(db.clone())
            .profile(Profile::LowLatency)
            .queue(QueueSpec::new("stop", 1))
            .handler(HandlerSpec::leased("stop", "h", move |m, _ctx| {
                s.push("h", m);
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
                    Ok(())
                })
            }))
    };
    let rt = build(300).start().await.expect("start");
    rt.enqueue(&db, NewMessage::new("stop", 0, "finishes"))
        .await
        .expect("enqueue");
    seen.wait_until(WAIT, "handler started", |d| d.len() == 1)
        .await;
    rt.shutdown(Duration::from_secs(10))
        .await
        .expect("graceful shutdown");
    let depth = rt.depth("stop").await.expect("depth");
    assert_eq!(
        (
            depth.handlers[0].pending,
            depth.handlers[0].leased_partitions
        ),
        (0, 0)
    );

    let rt = build(60_000).start().await.expect("start");
    rt.enqueue(&db, NewMessage::new("stop", 0, "cancelled"))
        .await
        .expect("enqueue");
    seen.wait_until(WAIT, "slow handler started", |d| d.len() == 2)
        .await;
    let res = rt.shutdown(Duration::from_millis(200)).await;
    assert!(matches!(res, Err(Error::ShutdownTimedOut(_))), "{res:?}");
    let depth = rt.depth("stop").await.expect("depth");
    assert_eq!(
        (
            depth.handlers[0].pending,
            depth.handlers[0].leased_partitions
        ),
        (1, 0),
        "lease not released"
    );

    let rt = build(0).start().await.expect("restart");
    seen.wait_until(WAIT, "redelivered after restart", |d| d.len() == 3)
        .await;
    assert_eq!(seen.all()[2].body, "cancelled");
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

/// Guarantee 8: bad input gets a typed error and writes nothing.
async fn bad_input_gets_typed_errors_and_writes_nothing(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let ob = Outbox::builder(db.clone())
        .max_payload_bytes(64)
        .queue(QueueSpec::new("valid", 4))
        .connect()
        .await
        .expect("connect");
    let e = ob
        .enqueue(&db, NewMessage::new("bad name;--", 0, "x"))
        .await;
    assert!(matches!(e, Err(EnqueueError::InvalidName(_))), "{e:?}");
    let e = ob.enqueue(&db, NewMessage::new("nobody", 0, "x")).await;
    assert!(
        matches!(e, Err(EnqueueError::UnknownQueue(ref q)) if q == "nobody"),
        "{e:?}"
    );
    let e = ob.enqueue(&db, NewMessage::new("valid", 4, "x")).await;
    assert!(
        matches!(
            e,
            Err(EnqueueError::PartitionOutOfRange {
                partition: 4,
                partitions: 4,
                ..
            })
        ),
        "{e:?}"
    );
    let e = ob
        .enqueue(&db, NewMessage::new("valid", 0, vec![7u8; 65]))
        .await;
    assert!(
        matches!(
            e,
            Err(EnqueueError::PayloadTooLarge {
                size: 65,
                limit: 64,
                ..
            })
        ),
        "{e:?}"
    );
    // A batch with one bad message writes nothing.
    let batch = [
        NewMessage::new("valid", 0, "ok"),
        NewMessage::new("valid", 9, "bad partition"),
    ];
    assert!(ob.enqueue_batch(&db, &batch).await.is_err());
    assert_eq!(
        ob.depth("valid").await.expect("depth").unsequenced,
        0,
        "a rejected batch wrote rows"
    );
    // Exactly at the limit, binary and non-ASCII bytes round-trip.
    let mut exact: Vec<u8> = "é✓".as_bytes().to_vec();
    exact.extend((0..=255u8).cycle().take(64 - exact.len()));
    ob.enqueue(&db, NewMessage::new("valid", 3, exact.clone()))
        .await
        .expect("payload at the limit");
    let seen = Seen::default();
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    let rt = Outbox::builder(db.clone())
        .max_payload_bytes(64)
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("valid", 4))
        .handler(HandlerSpec::transactional("valid", "h", move |m, _| {
            g.lock().expect("lock").push(m.payload().to_vec());
            Box::pin(async { Ok(()) })
        }))
        .start()
        .await
        .expect("start");
    eventually(WAIT, "round trip", || {
        let g = got.clone();
        async move { !g.lock().expect("lock").is_empty() }
    })
    .await;
    assert_eq!(got.lock().expect("lock")[0], exact);
    drop(seen);
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");

    // Start-up reports every registry problem at once, including a changed partition count.
    let err = Outbox::builder(db.clone())
        .queue(QueueSpec::new("valid", 8))
        .queue(QueueSpec::new("dup", 1))
        .queue(QueueSpec::new("dup", 1))
        .queue(QueueSpec::new("zero", 0))
        .handler(HandlerSpec::leased("ghost", "h", |_, _| {
            Box::pin(async { Ok(()) })
        }))
        .start()
        .await
        .expect_err("invalid declarations");
    let StartError::Registry(problems) = err else {
        panic!("{err:?}")
    };
    assert!(
        problems.contains(&RegistryProblem::DuplicateQueue("dup".into())),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| matches!(p, RegistryProblem::InvalidPartitions { partitions: 0, .. })),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| matches!(p, RegistryProblem::HandlerWithoutQueue { .. })),
        "{problems:?}"
    );
    let err = Outbox::builder(db.clone())
        .queue(QueueSpec::new("valid", 8))
        .connect()
        .await
        .expect_err("mismatch");
    assert!(
        matches!(&err, StartError::Registry(p) if p == &[RegistryProblem::PartitionMismatch { queue: "valid".into(), declared: 8, stored: 4 }]),
        "{err:?}"
    );
}

/// Producer-only processes: enqueue without workers is durable; a runtime started later
/// delivers what was enqueued before it started.
async fn producer_only_then_start_delivers_the_backlog(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let producer = Outbox::builder(db.clone())
        .queue(QueueSpec::new("backlog", 2))
        .connect()
        .await
        .expect("connect");
    for i in 0..10 {
        producer
            .enqueue(&db, NewMessage::new("backlog", i % 2, format!("{i}")))
            .await
            .expect("enqueue");
    }
    // A fresh pool sees them: durable on return.
    let other = t.pool(2).await;
    let fresh = Outbox::builder(other)
        .queue(QueueSpec::new("backlog", 2))
        .connect()
        .await
        .expect("connect");
    assert_eq!(fresh.depth("backlog").await.expect("depth").unsequenced, 10);
    let seen = Seen::default();
    let rt = Outbox::builder(db.clone())
        .queue(QueueSpec::new("backlog", 2))
        .handler(recorder("backlog", "h", &seen))
        .start()
        .await
        .expect("start");
    seen.wait_until(WAIT, "backlog", |d| d.len() == 10).await;
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    outbox_tests::assert_invariants(&db, "outbox_").await;
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

on_every_backend!(
    enqueue_commits_and_rolls_back_with_the_caller,
    late_commit_of_a_lower_id_is_delivered_in_commit_order,
    #[skip(
        sqlite = "skipped on SQLite: one writer, so no transaction can stay open while others commit"
    )]
    an_open_producer_holds_the_sequencers_low_water_mark,
    concurrent_producers_keep_order_per_partition,
    transactional_effects_happen_exactly_once,
    expired_lease_is_redelivered_with_attempt_raised,
    ack_of_a_lost_lease_is_rejected,
    ack_after_lease_expiry_is_rejected,
    leased_handlers_renew_their_lease,
    batch_handlers_isolate_a_poisoned_message,
    retries_dead_letters_and_replay,
    block_policy_holds_the_head_until_an_operator_acts,
    every_handler_sees_every_message,
    vacuum_keeps_what_any_handler_still_needs,
    two_runtimes_share_work_without_duplicates,
    one_batch_per_partition_at_a_time_across_runtimes,
    depth_counts_are_exact,
    graceful_shutdown_finishes_or_releases_work,
    bad_input_gets_typed_errors_and_writes_nothing,
    producer_only_then_start_delivers_the_backlog,
    #[skip(sqlite = "skipped on SQLite: one writer, so nothing else can hold a partition")]
    a_held_partition_does_not_hold_up_the_others,
);
