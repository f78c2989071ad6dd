//! Guarantee 8, bad input gets a typed error and writes nothing.

use std::sync::Arc;

use outbox::{
    EnqueueError, HandlerSpec, NewMessage, Outbox, QueueSpec, RegistryProblem, StartError,
};
use outbox_tests::{Harness, TestDb, eventually, on_every_backend};

use super::WAIT;

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
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    let h = Harness::start(db.clone(), |b| {
        b.max_payload_bytes(64)
            .queue(QueueSpec::new("valid", 4))
            .handler(HandlerSpec::transactional("valid", "h", move |m, _| {
                g.lock().expect("lock").push(m.payload().to_vec());
                Box::pin(async { Ok(()) })
            }))
    })
    .await;
    eventually(WAIT, "round trip", || {
        let g = got.clone();
        async move { !g.lock().expect("lock").is_empty() }
    })
    .await;
    assert_eq!(got.lock().expect("lock")[0], exact);
    // Stopped, not finished: the failed starts below must leave the state as it is too.
    h.stop().await;

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
    h.assert_invariants().await;
}

on_every_backend!(bad_input_gets_typed_errors_and_writes_nothing,);
