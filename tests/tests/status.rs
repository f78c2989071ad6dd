//! The status API (issue 6): queues, handlers and partitions on every backend, read from a
//! running outbox and from a bare connection through `Outbox::admin`.

use std::sync::Arc;
use std::time::Duration;

use outbox::{
    DEFAULT_TABLE_PREFIX, Error, HandlerError, HandlerSpec, NewMessage, Outbox, Overrides,
    PoisonPolicy, Profile, QueueSpec, Status,
};
use outbox_tests::{TestDb, eventually, on_every_backend};

const WAIT: Duration = Duration::from_secs(30);

/// Rejects payloads starting with `poison`, accepts the rest.
fn picky(queue: &'static str, name: &'static str) -> HandlerSpec {
    HandlerSpec::transactional(queue, name, move |m, _txn| {
        let poison = m.payload().starts_with(b"poison");
        Box::pin(async move {
            if poison {
                Err(HandlerError::reject(std::io::Error::other(
                    "poisoned payload",
                )))
            } else {
                Ok(())
            }
        })
    })
}

fn accept(queue: &'static str, name: &'static str) -> HandlerSpec {
    HandlerSpec::transactional(queue, name, |_m, _txn| Box::pin(async { Ok(()) }))
}

/// `status` with the per-partition entries dropped, and lags and staleness turned into the
/// times they count from, so that two reads taken a moment apart compare equal.
fn summed(mut s: Status) -> Status {
    let now = s.taken_at_ms;
    for q in &mut s.queues {
        for h in &mut q.handlers {
            h.partitions.clear();
            h.lag_ms = h.lag_ms.map(|lag| now - lag);
            h.stale_for_ms = h.stale_for_ms.map(|stale| now - stale);
        }
    }
    s.taken_at_ms = 0;
    s
}

/// `status_totals` reports, per queue and handler, exactly what `status` sums over the
/// partitions, with no partition entries. Call it while nothing changes.
async fn assert_totals_agree(outbox: &Outbox) {
    let full = outbox.status().await.expect("status");
    let totals = outbox.status_totals().await.expect("status totals");
    assert!(
        totals
            .queues
            .iter()
            .all(|q| q.handlers.iter().all(|h| h.partitions.is_empty())),
        "{totals:#?}"
    );
    assert_eq!(summed(totals), summed(full));
}

async fn status_reports_waiting_lag_blocked_and_dead_letters(t: Arc<TestDb>) {
    let db = t.pool(10).await;
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("st", 2))
        .queue(QueueSpec::new("blk", 1).poison_policy(PoisonPolicy::Block))
        .handler(accept("st", "ok"))
        .handler(picky("st", "picky"))
        .handler(picky("blk", "h"))
        .start()
        .await
        .expect("start");
    for (p, body) in [(0, "a"), (0, "poison-1"), (1, "b")] {
        rt.outbox()
            .enqueue(&db, NewMessage::new("st", p, body))
            .await
            .expect("enqueue");
    }
    rt.outbox()
        .enqueue(&db, NewMessage::new("blk", 0, "poison-2"))
        .await
        .expect("enqueue");
    rt.outbox()
        .enqueue(&db, NewMessage::new("blk", 0, "behind"))
        .await
        .expect("enqueue");
    eventually(WAIT, "dead letter and blocked partition", || async {
        let s = rt.outbox().status().await.expect("status");
        s.dead_letters() == 1
            && s.blocked().len() == 1
            && s.queue("st")
                .is_some_and(|q| q.handlers.iter().all(|h| h.pending == 0) && q.unsequenced == 0)
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");

    // A tool's view: a bare connection, nothing registered, no workers.
    let admin = Outbox::admin(t.pool(2).await, DEFAULT_TABLE_PREFIX).expect("admin");
    for body in ["late-1", "late-2"] {
        admin
            .enqueue(&db, NewMessage::new("st", 1, body))
            .await
            .expect("enqueue without workers");
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let s = admin.status().await.expect("status");
    assert_eq!(s.schema_version, Some(4));
    assert_eq!(
        s.queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(),
        ["blk", "st"]
    );
    let st = s.queue("st").expect("st");
    assert_eq!((st.partitions, st.unsequenced, st.dead_letters), (2, 2, 1));
    assert_eq!(
        st.handlers
            .iter()
            .map(|h| h.name.as_str())
            .collect::<Vec<_>>(),
        ["ok", "picky"]
    );
    for h in &st.handlers {
        assert_eq!((h.pending, h.waiting()), (0, 2), "{h:?}");
        assert!(
            h.lag().is_some_and(|l| l >= Duration::from_millis(10)),
            "{h:?}"
        );
        assert_eq!(h.partitions.len(), 2);
        let p1 = h.partition(1).expect("partition 1");
        assert_eq!((p1.unsequenced, p1.pending), (2, 0));
        assert!(p1.oldest_unhandled_at_ms.is_some());
        let p0 = h.partition(0).expect("partition 0");
        assert_eq!((p0.unsequenced, p0.pending, p0.lag_ms), (0, 0, None));
        assert!(p0.lease.is_none() && !p0.blocked);
    }
    let picky = st.handler("picky").expect("picky");
    assert_eq!(picky.dead_letters, 1);
    assert_eq!(picky.partition(0).expect("p0").dead_letters, 1);
    assert_eq!(st.handler("ok").expect("ok").dead_letters, 0);

    let blk = s.queue("blk").expect("blk");
    let h = blk.handler("h").expect("h");
    assert_eq!(s.blocked(), [("blk", "h", 0)]);
    assert_eq!((h.blocked_partitions, h.pending, h.dead_letters), (1, 2, 0));
    let p = h.partition(0).expect("p0");
    assert!(p.blocked);
    assert_eq!(p.attempts, 1);
    assert!(
        p.last_error
            .as_deref()
            .is_some_and(|e| e.contains("poisoned payload")),
        "{p:?}"
    );
    assert!(p.lag_ms.is_some());

    assert_totals_agree(&admin).await;

    // One queue, and an unknown one.
    let one = admin.queue_status("blk").await.expect("queue status");
    assert_eq!(
        one.handlers[0].partitions[0].oldest_unhandled_at_ms,
        p.oldest_unhandled_at_ms
    );
    assert_eq!((one.name.as_str(), one.handlers.len()), ("blk", 1));
    assert!(matches!(
        admin.queue_status("nope").await,
        Err(Error::UnknownQueue(q)) if q == "nope"
    ));
    // JSON for tools.
    let json = serde_json::to_value(&s).expect("json");
    assert_eq!(
        json["queues"][0]["handlers"][0]["partitions"][0]["blocked"],
        true
    );
}

/// A lease held by a crashed worker shows its owner and expiry.
async fn status_shows_a_live_lease(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let handler = HandlerSpec::leased("lz", "slow", move |_m, _ctx| {
        let rx = rx.clone();
        Box::pin(async move {
            if let Some(rx) = rx.lock().await.take() {
                let _ = rx.await;
            }
            Ok(())
        })
    });
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("lz", 1))
        .handler(handler)
        .start()
        .await
        .expect("start");
    rt.outbox()
        .enqueue(&db, NewMessage::new("lz", 0, "x"))
        .await
        .expect("enqueue");
    eventually(WAIT, "a lease", || async {
        let s = rt.outbox().queue_status("lz").await.expect("status");
        s.handlers[0].leased_partitions == 1
    })
    .await;
    let s = rt.outbox().queue_status("lz").await.expect("status");
    let p = &s.handlers[0].partitions[0];
    let lease = p.lease.as_ref().expect("lease");
    assert!(!lease.expired && lease.expires_at_ms > 0 && !lease.owner.is_empty());
    assert_eq!(p.pending, 1);
    assert_totals_agree(rt.outbox()).await;
    let _ = tx.send(());
    eventually(WAIT, "handled", || async {
        let s = rt.outbox().queue_status("lz").await.expect("status");
        s.handlers[0].pending == 0 && s.handlers[0].partitions[0].lease.is_none()
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
}

/// Totals over many partitions in every state at once: handled, waiting for a retry,
/// pending behind a retry, unsequenced, scheduled, and a stale handler.
async fn status_totals_sum_every_partition(t: Arc<TestDb>) {
    const PARTITIONS: u32 = 16;
    let db = t.pool(10).await;
    let later = HandlerSpec::transactional("tot", "later", |m, _txn| {
        let fail = m.payload().starts_with(b"later");
        Box::pin(async move {
            if fail {
                Err(HandlerError::retry(std::io::Error::other("not yet")))
            } else {
                Ok(())
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
        .queue(QueueSpec::new("tot", PARTITIONS))
        .queue(QueueSpec::new("empty", 4))
        .handler(accept("tot", "ok"))
        .handler(later)
        .start()
        .await
        .expect("start");
    let mut batch = Vec::new();
    for p in 0..PARTITIONS {
        // Every third partition's head fails for "later"; two more messages wait behind it.
        let head = if p % 3 == 0 { "later" } else { "fine" };
        batch.push(NewMessage::new("tot", p, head));
        batch.push(NewMessage::new("tot", p, "fine"));
        batch.push(NewMessage::new("tot", p, "fine"));
    }
    batch.push(NewMessage::new("tot", 5, "someday").deliver_after(Duration::from_secs(3_600)));
    rt.outbox()
        .enqueue_batch(&db, &batch)
        .await
        .expect("enqueue");
    let failing = (0..PARTITIONS).filter(|p| p % 3 == 0).count();
    eventually(WAIT, "ok done, later waiting for retries", || async {
        let s = rt.outbox().queue_status("tot").await.expect("status");
        s.handler("ok").is_some_and(|h| h.pending == 0)
            && s.handler("later")
                .is_some_and(|h| h.retrying_partitions as usize == failing)
    })
    .await;
    assert_totals_agree(rt.outbox()).await;
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");

    // No process serves the handlers now; new messages wait unsequenced.
    let admin = Outbox::admin(t.pool(2).await, DEFAULT_TABLE_PREFIX).expect("admin");
    for p in [1, 7, 7] {
        admin
            .enqueue(&db, NewMessage::new("tot", p, "fine"))
            .await
            .expect("enqueue without workers");
    }
    let totals = admin.status_totals().await.expect("totals");
    let tot = totals.queue("tot").expect("tot");
    assert_eq!((tot.unsequenced, tot.scheduled), (3, 1));
    let later = tot.handler("later").expect("later");
    assert_eq!(later.pending, 3 * failing as i64);
    assert_eq!(later.waiting, 3 * failing as i64 + 3);
    assert!(later.lag_ms.is_some());
    assert_eq!(tot.handler("ok").expect("ok").pending, 0);
    assert!(totals.queue("empty").is_some_and(|q| q.handlers.is_empty()));
    assert_totals_agree(&admin).await;
}

on_every_backend!(
    status_reports_waiting_lag_blocked_and_dead_letters,
    status_shows_a_live_lease,
    status_totals_sum_every_partition,
);
