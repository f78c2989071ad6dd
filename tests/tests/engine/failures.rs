//! Guarantee 5, retries and dead letters: backoff, max attempts, dead letters, replay, discard
//! and purge, the block policy, and batch handlers isolating a poisoned message.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use outbox::{
    DeadLetterFilter, Error, HandlerError, HandlerSpec, NewMessage, Outbox, Overrides,
    PoisonPolicy, QueueSpec,
};
use outbox_tests::{
    Harness, Seen, TestDb, create_effects_table, effects, eventually, on_every_backend,
    write_effect,
};

use super::{WAIT, bodies};

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
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("batchy", 2))
            .handler(tx)
            .handler(leased)
    })
    .await;
    let ob = h.outbox();
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
    h.enqueue_batch(&msgs).await;
    h.wait_drained("batchy").await;
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
    let dead = ob
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
    h.finish().await;
}

/// Guarantee 5: backoff that new traffic does not cut short, max attempts, dead letter with
/// the last error, the partition moves on; replay delivers once even when replays race;
/// discard and purge.
async fn retries_dead_letters_and_replay(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let healed = Arc::new(AtomicBool::new(false));
    let (s, heal) = (seen.clone(), healed.clone());
    let handler = HandlerSpec::transactional("dlq", "h", move |m, _txn| {
        s.push("h", m);
        let fail = m.payload().starts_with(b"poison") && !heal.load(Ordering::SeqCst);
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
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("dlq", 1)).handler(handler)
    })
    .await;
    let ob = h.outbox();
    h.enqueue(NewMessage::new("dlq", 0, "poison-1")).await;
    seen.wait_until(WAIT, "first attempt", |d| !d.is_empty())
        .await;
    let first_at = std::time::Instant::now();
    // New traffic on the partition during the backoff must not cut it short.
    for i in 0..5 {
        h.enqueue(NewMessage::new("dlq", 0, format!("after-{i}")))
            .await;
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

    let dead = ob
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
        ob.count_dead_letters(&DeadLetterFilter::all().handler("h"))
            .await
            .expect("count"),
        1
    );
    assert_eq!(
        ob.count_dead_letters(&DeadLetterFilter::all().handler("other"))
            .await
            .expect("count"),
        0
    );

    // Replay after the fix: delivered once more, at the tail, with attempts reset.
    healed.store(true, Ordering::SeqCst);
    let (a, b) = tokio::join!(ob.replay_dead_letter(d.id), ob.replay_dead_letter(d.id));
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
        ob.count_dead_letters(&DeadLetterFilter::all())
            .await
            .expect("count"),
        0
    );

    // Discard and purge.
    healed.store(false, Ordering::SeqCst);
    h.enqueue(NewMessage::new("dlq", 0, "poison-2")).await;
    h.enqueue(NewMessage::new("dlq", 0, "poison-3")).await;
    let o = ob.clone();
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
    let dead = ob
        .dead_letters(&DeadLetterFilter::all(), 0, 10)
        .await
        .expect("list");
    ob.discard_dead_letter(dead[0].id).await.expect("discard");
    assert!(matches!(
        ob.discard_dead_letter(dead[0].id).await,
        Err(Error::DeadLetterNotFound(_))
    ));
    assert_eq!(
        ob.purge_dead_letters(&DeadLetterFilter::all().queue("dlq"))
            .await
            .expect("purge"),
        1
    );
    assert_eq!(
        ob.count_dead_letters(&DeadLetterFilter::all())
            .await
            .expect("count"),
        0
    );
    h.finish().await;
}

/// Guarantee 5 (block policy): an exhausted head blocks its partition until an operator acts;
/// other partitions go on.
async fn block_policy_holds_the_head_until_an_operator_acts(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let healed = Arc::new(AtomicBool::new(false));
    let (s, heal) = (seen.clone(), healed.clone());
    let handler = HandlerSpec::transactional("blocky", "h", move |m, _txn| {
        s.push("h", m);
        let fail = m.payload() == b"bad" && !heal.load(Ordering::SeqCst);
        Box::pin(async move {
            if fail {
                Err(HandlerError::reject("bad input"))
            } else {
                Ok(())
            }
        })
    });
    let h = Harness::start(db.clone(), |b| {
        b.queue(QueueSpec::new("blocky", 2).poison_policy(PoisonPolicy::Block))
            .handler(handler)
    })
    .await;
    let ob = h.outbox();
    for body in ["bad", "second"] {
        h.enqueue(NewMessage::new("blocky", 0, body)).await;
    }
    h.enqueue(NewMessage::new("blocky", 1, "other-partition"))
        .await;
    seen.wait_until(WAIT, "head attempt and other partition", |d| d.len() >= 2)
        .await;
    // The verdict commits after the handler returned: wait for it rather than guess how long
    // a loaded machine takes, then give the partition time to move on if it wrongly would.
    h.wait_depth("blocky", "partition 0 blocked", |d| {
        d.handlers[0].blocked_partitions == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let all = seen.all();
    assert!(bodies(&all).contains(&"other-partition".to_owned()));
    assert!(
        !bodies(&all).contains(&"second".to_owned()),
        "a blocked partition moved on"
    );
    let depth = h.depth("blocky").await;
    assert_eq!(depth.handlers[0].blocked_partitions, 1);
    assert_eq!(depth.handlers[0].dead, 0);

    healed.store(true, Ordering::SeqCst);
    let head = head_seq(ob, "blocky", "h", 0).await;
    assert_eq!(head, 1, "the operator sees the poisoned head");
    assert!(matches!(
        ob.unblock("blocky", 0, "h", head + 1).await,
        Err(Error::HeadMoved {
            expected: 2,
            found: Some(1),
            ..
        })
    ));
    assert!(matches!(
        ob.unblock("blocky", 1, "h", 1).await,
        Err(Error::HeadMoved { found: None, .. })
    ));
    ob.unblock("blocky", 0, "h", head).await.expect("unblock");
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
    h.enqueue(NewMessage::new("blocky", 0, "bad")).await;
    h.enqueue(NewMessage::new("blocky", 0, "third")).await;
    h.wait_depth("blocky", "blocked again", |d| {
        d.handlers[0].blocked_partitions == 1
    })
    .await;
    let head = head_seq(ob, "blocky", "h", 0).await;
    ob.skip_head("blocky", 0, "h", head).await.expect("skip");
    seen.wait_until(WAIT, "successor after skip", |d| {
        bodies(d).contains(&"third".to_owned())
    })
    .await;
    // The operator's second click names the head that is gone: the healthy successor, already
    // handled or not, is never skipped by it.
    assert!(matches!(
        ob.skip_head("blocky", 0, "h", head).await,
        Err(Error::HeadMoved { .. })
    ));
    assert_eq!(
        ob.count_dead_letters(&DeadLetterFilter::all())
            .await
            .expect("count"),
        1
    );
    h.finish().await;
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

on_every_backend!(
    batch_handlers_isolate_a_poisoned_message,
    retries_dead_letters_and_replay,
    block_policy_holds_the_head_until_an_operator_acts,
);
