//! The testing kit (`outbox::testing`): faults on leased and transactional handlers, capture,
//! idle detection with blocked partitions and dead letters.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::testing::{Fault, TestError, TestKit};
use outbox::{
    DeadLetterFilter, HandlerError, HandlerSpec, NewMessage, Overrides, PoisonPolicy, QueueSpec,
};

type Log = Arc<Mutex<Vec<(String, u32)>>>;

fn leased(log: &Log) -> HandlerSpec {
    let log = log.clone();
    HandlerSpec::leased("mail", "send", move |m, ctx| {
        log.lock().expect("log").push((
            String::from_utf8_lossy(m.payload()).into_owned(),
            ctx.attempt(),
        ));
        Box::pin(async { Ok(()) })
    })
}

async fn kit(handlers: Vec<HandlerSpec>, queues: Vec<QueueSpec>) -> TestKit {
    let mut b = TestKit::builder()
        .discover(false)
        .install_global(false)
        .idle_timeout(Duration::from_secs(10));
    for q in queues {
        b = b.queue(q);
    }
    for h in handlers {
        b = b.handler(h);
    }
    b.build().await.expect("kit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_faults_redeliver_with_the_attempt_raised() {
    for fault in [Fault::Fail, Fault::LeaseExpires, Fault::CrashBeforeAck] {
        let log = Log::default();
        let kit = kit(vec![leased(&log)], vec![QueueSpec::new("mail", 2)]).await;
        kit.outbox()
            .enqueue(kit.db(), NewMessage::new("mail", 1, "hello"))
            .await
            .expect("enqueue");
        kit.inject("send", fault);
        let status = kit.run_until_idle().await.expect("idle");
        assert_eq!(status.queue("mail").map(|q| q.handlers[0].waiting), Some(0));
        let seen = log.lock().expect("log").clone();
        let expected: Vec<(String, u32)> = match fault {
            // The handler never ran on the failed attempt.
            Fault::Fail => vec![("hello".into(), 2)],
            // It ran, its ack was lost, it ran again: the side effect happened twice.
            _ => vec![("hello".into(), 1), ("hello".into(), 2)],
        };
        assert_eq!(seen, expected, "{fault:?}");
        assert_eq!(kit.pending_faults(), 0);
        assert_eq!(
            kit.enqueued_raw("mail").await.expect("capture"),
            [b"hello".to_vec()]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_attempts_and_blocked_partitions_count_as_idle() {
    let always_fails = |queue: &'static str| {
        HandlerSpec::transactional(queue, "h", |_m, _txn| {
            Box::pin(async { Err(HandlerError::retry(std::io::Error::other("down"))) })
        })
        .overrides(Overrides::NONE.max_attempts(3))
    };
    let kit = kit(
        vec![always_fails("dl"), always_fails("blk")],
        vec![
            QueueSpec::new("dl", 1),
            QueueSpec::new("blk", 1).poison_policy(PoisonPolicy::Block),
        ],
    )
    .await;
    for q in ["dl", "blk"] {
        kit.outbox()
            .enqueue(kit.db(), NewMessage::new(q, 0, "x"))
            .await
            .expect("enqueue");
    }
    let started = std::time::Instant::now();
    let status = kit.run_until_idle().await.expect("idle");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "retries are fast"
    );
    assert_eq!(status.blocked(), [("blk", "h", 0)]);
    let dead = kit
        .outbox()
        .dead_letters(&DeadLetterFilter::all(), 0, 10)
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].queue.as_str(), dead[0].attempts), ("dl", 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_chosen_queues_run_and_a_stuck_handler_times_out() {
    let log = Log::default();
    let stuck = HandlerSpec::leased("slow", "stuck", |_m, _ctx| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        })
    });
    let kit = TestKit::builder()
        .discover(false)
        .install_global(false)
        .idle_timeout(Duration::from_millis(300))
        .queue(QueueSpec::new("mail", 1))
        .queue(QueueSpec::new("slow", 1))
        .handler(leased(&log))
        .handler(stuck)
        .build()
        .await
        .expect("kit");
    for q in ["mail", "slow"] {
        kit.outbox()
            .enqueue(kit.db(), NewMessage::new(q, 0, "m"))
            .await
            .expect("enqueue");
    }
    kit.run_queues_until_idle(["mail"])
        .await
        .expect("mail is idle");
    assert_eq!(log.lock().expect("log").len(), 1);
    match kit.run_queues_until_idle(["slow"]).await {
        Err(TestError::NotIdle { waiting, .. }) => assert_eq!(waiting, ["slow/stuck/0: 1"]),
        other => panic!("expected NotIdle, got {other:?}"),
    }
}

/// The kit's clock for scheduled messages: a message due in an hour is not delivered by a run,
/// and is after `advance` past its time; one due later still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advance_delivers_scheduled_messages_that_fall_due() {
    let log = Log::default();
    let kit = kit(vec![leased(&log)], vec![QueueSpec::new("mail", 2)]).await;
    for (body, hours) in [("in-1h", 1), ("in-3h", 3)] {
        kit.outbox()
            .enqueue(
                kit.db(),
                NewMessage::new("mail", 0, body).deliver_after(Duration::from_secs(hours * 3600)),
            )
            .await
            .expect("enqueue");
    }
    kit.run_until_idle().await.expect("idle");
    assert!(log.lock().expect("log").is_empty(), "nothing is due yet");
    kit.advance(Duration::from_secs(2 * 3600))
        .await
        .expect("advance");
    let status = kit.run_until_idle().await.expect("idle");
    assert_eq!(*log.lock().expect("log"), [("in-1h".to_owned(), 1)]);
    assert_eq!(status.queue("mail").map(|q| q.scheduled), Some(1));
    kit.advance(Duration::from_secs(2 * 3600))
        .await
        .expect("advance");
    kit.run_until_idle().await.expect("idle");
    assert_eq!(log.lock().expect("log").len(), 2);
}
