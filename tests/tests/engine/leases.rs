//! Guarantee 4, leased handlers: at-least-once with fencing; an expired lease is taken over,
//! an ack of a lost or expired lease is rejected, a lease can be renewed while it is held.

use std::sync::Arc;
use std::time::Duration;

use outbox::sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use outbox::{Builder, Error, HandlerSpec, NewMessage, Outbox, Overrides, Profile, QueueSpec};
use outbox_tests::{Harness, Seen, TestDb, on_every_backend};

use super::{WAIT, leased_recorder};

async fn raw(db: &DatabaseConnection, sql: &str) {
    db.execute_raw(Statement::from_string(
        db.get_database_backend(),
        sql.to_owned(),
    ))
    .await
    .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Guarantee 4: a lease that expired without an ack (crashed holder) is taken over after its
/// expiry, with the attempt count raised.
async fn expired_lease_is_redelivered_with_attempt_raised(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let configure = |b: Builder| {
        b.queue(QueueSpec::new("lease", 1))
            .handler(leased_recorder("lease", "h", &seen))
    };
    let producer = configure(Outbox::builder(db.clone()).profile(Profile::LowLatency))
        .connect()
        .await
        .expect("connect");
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
    let h = Harness::start(db.clone(), configure).await;
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
    h.finish().await;
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
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("steal", 1)).handler(handler)
    })
    .await;
    h.enqueue(NewMessage::new("steal", 0, "m")).await;
    seen.wait_until(WAIT, "redelivery after the stale ack", |d| d.len() >= 2)
        .await;
    let all = seen.all();
    assert_eq!(all[0].seq, all[1].seq);
    assert_eq!(all[1].attempt, 2);
    h.wait_depth("steal", "acked by the second delivery", |d| {
        d.handlers[0].pending == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        seen.all().len(),
        2,
        "delivered again after a successful ack"
    );
    h.finish().await;
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
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("expiry", 1)).handler(handler)
    })
    .await;
    h.enqueue(NewMessage::new("expiry", 0, "m")).await;
    seen.wait_until(WAIT, "redelivery after the late ack", |d| d.len() >= 2)
        .await;
    let all = seen.all();
    assert_eq!((all[0].seq, all[1].seq, all[1].attempt), (1, 1, 2));
    h.finish().await;
    // Counted after the shutdown: nothing is delivered any more.
    assert_eq!(
        seen.all().len(),
        2,
        "delivered again after a successful ack"
    );
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
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("renew", 1)).handler(handler)
    })
    .await;
    h.enqueue(NewMessage::new("renew", 0, "long")).await;
    seen.wait_until(WAIT, "the long handler", |d| !d.is_empty())
        .await;
    h.wait_drained("renew").await;
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
    h.enqueue(NewMessage::new("renew", 0, "expired")).await;
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
    h.finish().await;
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

on_every_backend!(
    expired_lease_is_redelivered_with_attempt_raised,
    ack_of_a_lost_lease_is_rejected,
    ack_after_lease_expiry_is_rejected,
    leased_handlers_renew_their_lease,
);
