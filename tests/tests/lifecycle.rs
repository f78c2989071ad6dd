//! A cursor's life (issue 11): a handler added after vacuum starts at the vacuumed sequence,
//! a handler that no longer runs is marked stale in status and can be retired so vacuum moves
//! on, and the head an operator acts on is this handler's own.

use std::sync::Arc;
use std::time::Duration;

use outbox::{
    Builder, Error, HandlerError, HandlerSpec, NewMessage, Profile, QueueSpec, RuntimeTuning,
};
use outbox_tests::harness::WAIT;
use outbox_tests::{Harness, Seen, TestDb, on_every_backend};

fn recorder(queue: &'static str, name: &'static str, seen: &Seen) -> HandlerSpec {
    let seen = seen.clone();
    HandlerSpec::transactional(queue, name, move |m, _txn| {
        seen.push(name, m);
        Box::pin(async { Ok(()) })
    })
}

/// Vacuum right after every ack, and heartbeats every 100 ms, so a test sees both quickly.
fn eager() -> RuntimeTuning {
    let mut t = Profile::LowLatency.runtime();
    t.vacuum_after_acks = 1;
    t.vacuum_interval = Duration::from_millis(100);
    t.heartbeat_interval = Duration::from_millis(100);
    t
}

/// A handler added to a queue whose messages were already vacuumed starts at the vacuumed
/// sequence: no phantom pending messages, no lag (before: the deleted messages counted as
/// pending until new traffic arrived, a false lag alert).
async fn a_handler_added_after_vacuum_starts_at_the_vacuumed_sequence(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let late = |b: Builder| {
        b.runtime_tuning(eager())
            .queue(QueueSpec::new("late", 1))
            .handler(recorder("late", "first", &seen))
    };
    let h = Harness::start(db.clone(), late).await;
    let batch: Vec<_> = (0..20)
        .map(|i| NewMessage::new("late", 0, format!("m{i}")))
        .collect();
    h.enqueue_batch(&batch).await;
    seen.wait_until(WAIT, "20 deliveries", |d| d.len() == 20)
        .await;
    h.eventually("vacuumed", || async { h.depth("late").await.stored == 0 })
        .await;
    h.stop().await;

    let h = Harness::start(db.clone(), |b| {
        late(b).handler(recorder("late", "second", &seen))
    })
    .await;
    let status = h.outbox().queue_status("late").await.expect("status");
    let second = status.handler("second").expect("registered");
    assert_eq!(second.pending, 0, "no phantom pending messages");
    assert_eq!(second.lag_ms, None, "no phantom lag");
    assert_eq!(second.partitions[0].processed_seq, 20);
    assert_eq!(second.partitions[0].head_seq, None);
    let depth = h.depth("late").await;
    assert!(depth.handlers.iter().all(|h| h.pending == 0), "{depth:?}");

    h.enqueue(NewMessage::new("late", 0, "after")).await;
    seen.wait_until(WAIT, "both handlers see the new message", |d| {
        d.iter().filter(|d| d.body == "after").count() == 2
    })
    .await;
    assert_eq!(
        seen.of("second").len(),
        1,
        "the new handler starts after the vacuumed ones"
    );
    assert_eq!(seen.of("second")[0].seq, 21);
    h.finish().await;
}

/// A handler no process runs any more is marked stale in status (with how long), pins vacuum
/// until it is retired, and cannot be retired while a process serves it.
async fn a_stale_handler_is_shown_and_can_be_retired(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let fleet = |b: Builder| {
        b.runtime_tuning(eager())
            .queue(QueueSpec::new("fleet", 2))
            .handler(recorder("fleet", "kept", &seen))
    };
    let both = Harness::start(db.clone(), |b| {
        fleet(b).handler(recorder("fleet", "removed", &seen))
    })
    .await;
    let status = both.outbox().queue_status("fleet").await.expect("status");
    assert!(status.handlers.iter().all(|h| !h.is_stale()), "{status:?}");
    assert!(matches!(
        both.outbox().retire_handler("fleet", "removed").await,
        Err(Error::HandlerInUse { .. })
    ));
    both.stop().await;

    // The next release no longer has `removed`.
    let h = Harness::start(db.clone(), fleet).await;
    let batch: Vec<_> = (0..10)
        .map(|i| NewMessage::new("fleet", i % 2, format!("m{i}")))
        .collect();
    h.enqueue_batch(&batch).await;
    seen.wait_until(WAIT, "kept handles all", |d| {
        d.iter().filter(|d| d.handler == "kept").count() == 10
    })
    .await;
    h.eventually("removed marked stale", || async {
        h.outbox().queue_status("fleet").await.is_ok_and(|s| {
            s.handler("removed").is_some_and(|h| h.is_stale())
                && s.handler("kept").is_some_and(|h| !h.is_stale())
        })
    })
    .await;
    let status = h.outbox().queue_status("fleet").await.expect("status");
    let removed = status.handler("removed").expect("removed");
    assert!(removed.stale_for_ms.is_some_and(|ms| ms >= 0));
    assert_eq!(removed.pending, 10, "nobody handles its messages");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        h.depth("fleet").await.stored,
        10,
        "the removed handler pins vacuum"
    );

    assert!(matches!(
        h.outbox().retire_handler("fleet", "kept").await,
        Err(Error::HandlerInUse { .. })
    ));
    assert!(matches!(
        h.outbox().retire_handler("fleet", "never").await,
        Err(Error::HandlerNotFound { .. })
    ));
    assert!(matches!(
        h.outbox().retire_handler("fleet", "removed ").await,
        Err(Error::InvalidName(_))
    ));
    assert_eq!(
        h.outbox()
            .retire_handler("fleet", "removed")
            .await
            .expect("retire"),
        2
    );
    h.enqueue(NewMessage::new("fleet", 0, "nudge")).await;
    h.eventually("vacuum moved on", || async {
        h.depth("fleet").await.stored == 0
    })
    .await;
    let status = h.outbox().queue_status("fleet").await.expect("status");
    assert!(status.handler("removed").is_none());
    assert_eq!(
        h.outbox()
            .count_dead_letters(&outbox::DeadLetterFilter::all())
            .await
            .expect("count"),
        0
    );
    h.finish().await;
}

/// The head an operator sees and skips is this handler's own message: a replayed copy
/// addressed to another handler in front of it is neither shown as its head nor skipped.
async fn the_operators_head_is_the_handlers_own_message(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let a = HandlerSpec::transactional("heads", "a", {
        let s = seen.clone();
        move |m, _txn| {
            s.push("a", m);
            let reject = m.payload() == b"poison" && m.attempt() == 1 && s.of("a").len() == 1;
            Box::pin(async move {
                if reject {
                    Err(HandlerError::reject("first time"))
                } else {
                    Ok(())
                }
            })
        }
    });
    let b = HandlerSpec::transactional("heads", "b", {
        let s = seen.clone();
        move |m, _txn| {
            s.push("b", m);
            Box::pin(async { Err(HandlerError::retry("b is down")) })
        }
    })
    .overrides(outbox::Overrides::NONE.max_attempts(1_000));
    let h = Harness::start(db.clone(), |builder| {
        builder
            .queue(QueueSpec::new("heads", 1).poison_policy(outbox::PoisonPolicy::Block))
            .handler(a)
            .handler(b)
    })
    .await;
    h.enqueue(NewMessage::new("heads", 0, "poison")).await;
    h.eventually("a blocked on its head", || async {
        h.outbox()
            .queue_status("heads")
            .await
            .is_ok_and(|s| s.handler("a").is_some_and(|h| h.blocked_partitions == 1))
    })
    .await;
    // `a` skips its poisoned head, then replays it: a copy for `a` only, at seq 2.
    let a_head = h
        .outbox()
        .queue_status("heads")
        .await
        .expect("status")
        .handler("a")
        .expect("a")
        .partitions[0]
        .head_seq
        .expect("a head");
    h.outbox()
        .skip_head("heads", 0, "a", a_head)
        .await
        .expect("skip a's head");
    let id = h
        .outbox()
        .dead_letters(&outbox::DeadLetterFilter::all().handler("a"), 0, 1)
        .await
        .expect("list")[0]
        .id;
    h.outbox().replay_dead_letter(id).await.expect("replay");
    seen.wait_until(WAIT, "a handles the copy", |d| {
        d.iter().filter(|d| d.handler == "a").count() == 2
    })
    .await;
    // `b` is still failing on seq 1; its head is seq 1, never the copy (seq 2).
    let status = h.outbox().queue_status("heads").await.expect("status");
    let b_part = &status.handler("b").expect("b").partitions[0];
    assert_eq!(b_part.head_seq, Some(1));
    assert_eq!(
        b_part.pending, 2,
        "seq 2 is a's copy but counts as stored after b's cursor"
    );
    h.outbox()
        .skip_head("heads", 0, "b", 1)
        .await
        .expect("skip b's head");
    // Nothing of b's is left: the copy for a is not b's head.
    assert!(matches!(
        h.outbox().skip_head("heads", 0, "b", 2).await,
        Err(Error::HeadMoved { found: None, .. })
    ));
    let dead = h
        .outbox()
        .dead_letters(&outbox::DeadLetterFilter::all().handler("b"), 0, 10)
        .await
        .expect("list");
    assert_eq!(dead.iter().map(|d| d.seq).collect::<Vec<_>>(), [1]);
    h.finish().await;
}

/// `wait_idle` returns once everything committed before it is handled, including a scheduled
/// message already due, and not before; a partition blocked by a poisoned head makes it give up
/// with `NotIdle` naming that partition.
async fn wait_idle_returns_when_committed_work_is_handled(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let seen = Seen::default();
    let slow = seen.clone();
    let h = Harness::start(db.clone(), |b| {
        b.profile(Profile::Default)
            .queue(QueueSpec::new("idle", 4))
            .queue(QueueSpec::new("stuck", 1).poison_policy(outbox::PoisonPolicy::Block))
            .handler(HandlerSpec::transactional(
                "idle",
                "slow",
                move |m, _txn| {
                    slow.push("slow", m);
                    Box::pin(async {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        Ok(())
                    })
                },
            ))
            .handler(
                HandlerSpec::transactional("stuck", "poisoned", |_m, _txn| {
                    Box::pin(async { Err(HandlerError::retry("always fails")) })
                })
                .overrides(outbox::Overrides::NONE.max_attempts(1)),
            )
    })
    .await;
    let batch: Vec<_> = (0..300)
        .map(|i| NewMessage::new("idle", i % 4, format!("m{i}")))
        .collect();
    h.enqueue_batch(&batch).await;
    let overdue = std::time::SystemTime::now() - Duration::from_secs(1);
    h.enqueue(NewMessage::new("idle", 0, "overdue").deliver_at(overdue))
        .await;
    h.running().wait_idle(WAIT).await.expect("idle");
    assert_eq!(
        seen.all().len(),
        301,
        "wait_idle returned before every committed message was handled"
    );
    h.enqueue(NewMessage::new("stuck", 0, "poison")).await;
    let err = h
        .running()
        .wait_idle(Duration::from_secs(3))
        .await
        .expect_err("a blocked partition is not idle");
    match err {
        Error::NotIdle { waiting, .. } => {
            assert_eq!(waiting, ["stuck/poisoned/0 (blocked)"], "{waiting:?}")
        }
        other => panic!("expected NotIdle, got {other:?}"),
    }
    h.finish().await;
}

/// Vacuum gives way to shutdown between partitions: with 4,096 partitions to clean at once
/// (one message each, vacuum woken by the last ack), `shutdown` still returns within a short
/// grace period. (Before: one vacuum pass cleaned every partition, a transaction each, without
/// looking at shutdown: seconds on SQLite, more than 10 s on MariaDB, so the grace elapsed.)
async fn shutdown_is_not_held_up_by_vacuum_over_many_partitions(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let partitions = outbox::MAX_PARTITIONS;
    let mut tuning = Profile::Default.runtime();
    tuning.vacuum_after_acks = u64::from(partitions);
    tuning.vacuum_interval = Duration::from_secs(3_600);
    let handled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = handled.clone();
    let h = Harness::start(db.clone(), |b| {
        b.profile(Profile::Default)
            .runtime_tuning(tuning)
            .queue(QueueSpec::new("wide", partitions))
            .handler(HandlerSpec::transactional("wide", "h", move |_m, _txn| {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Box::pin(async { Ok(()) })
            }))
    })
    .await
    .with_wait(Duration::from_secs(120));
    let batch: Vec<NewMessage> = (0..partitions)
        .map(|p| NewMessage::new("wide", p, "m"))
        .collect();
    h.enqueue_batch(&batch).await;
    h.eventually("every message handled", || {
        let handled = handled.clone();
        async move { handled.load(std::sync::atomic::Ordering::SeqCst) == u64::from(partitions) }
    })
    .await;
    // The last ack woke vacuum, which now has every partition to clean.
    h.running()
        .shutdown(Duration::from_millis(500))
        .await
        .expect("shutdown within the grace period while vacuum has 4,096 partitions to clean");
    // The invariants are not checked here: `assert_invariants` reads each of the 4,096
    // partitions with three queries; with it, this test took 11 minutes instead of 1.5 for the
    // three backends on a loaded two-core machine.
}

on_every_backend!(
    shutdown_is_not_held_up_by_vacuum_over_many_partitions,
    wait_idle_returns_when_committed_work_is_handled,
    a_handler_added_after_vacuum_starts_at_the_vacuumed_sequence,
    a_stale_handler_is_shown_and_can_be_retired,
    the_operators_head_is_the_handlers_own_message,
);
