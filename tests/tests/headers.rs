//! Message headers (issue 15): set at enqueue, stored with the message, given to every kind of
//! handler, kept by dead-lettering, replay and scheduled delivery; headers that break a limit
//! are refused with nothing written.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::sea_orm::{DatabaseConnection, TransactionTrait};
use outbox::{
    Builder, DeadLetterFilter, EnqueueError, HandlerError, HandlerSpec, HeaderError, Headers,
    NewMessage, Overrides, QueueSpec,
};
use outbox_tests::{Harness, TestDb, eventually, on_every_backend, scalar};

const WAIT: Duration = Duration::from_secs(60);

/// Starts a runtime on `db` with what `configure` adds, waiting up to [`WAIT`] and giving
/// handlers 10 s to finish at shutdown.
async fn start(db: &DatabaseConnection, configure: impl FnOnce(Builder) -> Builder) -> Harness {
    Harness::start(db.clone(), configure)
        .await
        .with_wait(WAIT)
        .with_grace(Duration::from_secs(10))
}

/// One delivery: (handler, body, attempt, headers).
type Delivery = (String, String, u32, Headers);

/// What handlers saw.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Delivery>>>);

impl Log {
    fn push(&self, handler: &str, m: &outbox::Message) {
        self.0.lock().expect("log").push((
            handler.to_owned(),
            String::from_utf8_lossy(m.payload()).into_owned(),
            m.attempt(),
            m.headers().clone(),
        ));
    }

    fn all(&self) -> Vec<Delivery> {
        self.0.lock().expect("log").clone()
    }

    /// The headers `handler` saw with `body` (the last delivery).
    fn headers(&self, handler: &str, body: &str) -> Option<Headers> {
        self.all()
            .into_iter()
            .rev()
            .find(|(h, b, _, _)| h == handler && b == body)
            .map(|(_, _, _, headers)| headers)
    }

    async fn wait(&self, what: &str, n: usize) {
        eventually(WAIT, what, || async { self.all().len() >= n }).await;
    }
}

fn headers(pairs: &[(&str, &str)]) -> Headers {
    pairs.iter().copied().collect()
}

/// Transactional, leased and both batch handlers see the headers set at enqueue, through a
/// plain connection and a transaction; a message without headers has none.
async fn every_kind_of_handler_sees_the_headers(t: Arc<TestDb>) {
    let db = t.pool(16).await;
    let log = Log::default();
    let (a, b, c, d) = (log.clone(), log.clone(), log.clone(), log.clone());
    let h = start(&db, |builder| {
        builder
            .queue(QueueSpec::new("hdr", 2))
            .handler(HandlerSpec::transactional("hdr", "tx", move |m, _| {
                a.push("tx", m);
                Box::pin(async { Ok(()) })
            }))
            .handler(HandlerSpec::leased("hdr", "leased", move |m, _| {
                b.push("leased", m);
                Box::pin(async { Ok(()) })
            }))
            .handler(HandlerSpec::transactional_batch(
                "hdr",
                "tx-batch",
                move |ms, _| {
                    for m in ms {
                        c.push("tx-batch", m);
                    }
                    Box::pin(async { Ok(()) })
                },
            ))
            .handler(HandlerSpec::leased_batch(
                "hdr",
                "leased-batch",
                move |ms, _| {
                    for m in ms {
                        d.push("leased-batch", m);
                    }
                    Box::pin(async { Ok(()) })
                },
            ))
    })
    .await;
    let one = headers(&[("request-id", "r-1"), ("tenant", "acme")]);
    let two = headers(&[("request-id", "r-2"), ("note", "é \"quoted\" {json} 'x'")]);
    h.enqueue(NewMessage::new("hdr", 0, "one").headers(one.clone()))
        .await;
    h.enqueue_committed(&[
        NewMessage::new("hdr", 1, "two")
            .header("request-id", "r-2")
            .header("note", "é \"quoted\" {json} 'x'"),
        NewMessage::new("hdr", 1, "none"),
    ])
    .await;
    log.wait("every handler saw the three messages", 12).await;
    for handler in ["tx", "leased", "tx-batch", "leased-batch"] {
        assert_eq!(log.headers(handler, "one"), Some(one.clone()), "{handler}");
        assert_eq!(log.headers(handler, "two"), Some(two.clone()), "{handler}");
        assert_eq!(
            log.headers(handler, "none"),
            Some(Headers::new()),
            "{handler}"
        );
    }
    h.finish().await;
}

/// A dead letter keeps the message's headers; a replay delivers them again.
async fn dead_letter_and_replay_keep_the_headers(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let log = Log::default();
    let l = log.clone();
    let refuse = Arc::new(AtomicBool::new(true));
    let r = refuse.clone();
    let h = start(&db, |b| {
        b.queue(QueueSpec::new("hdr", 1)).handler(
            HandlerSpec::transactional("hdr", "h", move |m, _| {
                l.push("h", m);
                let refuse = r.load(Ordering::SeqCst);
                Box::pin(async move {
                    if refuse {
                        Err(HandlerError::reject("not yet"))
                    } else {
                        Ok(())
                    }
                })
            })
            .overrides(Overrides::NONE.max_attempts(1)),
        )
    })
    .await;
    let sent = headers(&[(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )]);
    h.enqueue(NewMessage::new("hdr", 0, "poison").headers(sent.clone()))
        .await;
    let all = DeadLetterFilter::all();
    h.wait_dead_letters(&all, 1, "the message is dead-lettered")
        .await;
    let dead = h
        .outbox()
        .dead_letters(&all, 0, 10)
        .await
        .expect("dead letters");
    assert_eq!(dead[0].headers, sent, "the dead letter keeps the headers");
    assert_eq!(
        h.outbox()
            .dead_letter(dead[0].id)
            .await
            .expect("one dead letter")
            .headers,
        sent
    );
    refuse.store(false, Ordering::SeqCst);
    h.outbox()
        .replay_dead_letter(dead[0].id)
        .await
        .expect("replay");
    log.wait("the replayed message is handled", 2).await;
    let seen = log.all();
    assert_eq!(
        seen.len(),
        2,
        "{:?}",
        seen.iter().map(|s| &s.1).collect::<Vec<_>>()
    );
    assert_eq!(seen[1].3, sent, "the replay delivers the headers again");
    h.finish().await;
}

/// A scheduled message carries its headers when it becomes due.
async fn a_scheduled_message_keeps_its_headers(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let log = Log::default();
    let l = log.clone();
    let h = start(&db, |b| {
        b.queue(QueueSpec::new("hdr", 1))
            .handler(HandlerSpec::transactional("hdr", "h", move |m, _| {
                l.push("h", m);
                Box::pin(async { Ok(()) })
            }))
    })
    .await;
    let sent = headers(&[("request-id", "later")]);
    let txn = db.begin().await.expect("begin");
    let done = h
        .enqueue_in(
            &txn,
            NewMessage::new("hdr", 0, "later")
                .headers(sent.clone())
                .deliver_after(Duration::from_millis(300)),
        )
        .await;
    txn.commit().await.expect("commit");
    assert!(
        matches!(done, outbox::Enqueued::Scheduled { .. }),
        "{done:?}"
    );
    log.wait("the scheduled message is handled", 1).await;
    assert_eq!(log.headers("h", "later"), Some(sent));
    h.finish().await;
}

/// Headers that break a limit fail the whole batch with a typed error and write nothing,
/// scheduled or not.
async fn bad_headers_are_refused_and_nothing_is_written(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    let h = start(&db, |b| b.queue(QueueSpec::new("hdr", 1))).await;
    let too_many: Headers = (0..=outbox::MAX_HEADERS)
        .map(|i| (format!("h{i}"), "v"))
        .collect();
    type Expected = fn(&HeaderError) -> bool;
    let cases: Vec<(NewMessage, Expected)> = vec![
        (
            NewMessage::new("hdr", 0, "x").header("bad name", "v"),
            |e| matches!(e, HeaderError::BadName { .. }),
        ),
        (NewMessage::new("hdr", 0, "x").header("", "v"), |e| {
            matches!(e, HeaderError::EmptyName)
        }),
        (NewMessage::new("hdr", 0, "x").header("k", "a\0b"), |e| {
            matches!(e, HeaderError::BadValue { .. })
        }),
        (
            NewMessage::new("hdr", 0, "x").header("k", "a\r\nInjected: 1"),
            |e| matches!(e, HeaderError::BadValue { .. }),
        ),
        (
            NewMessage::new("hdr", 0, "x")
                .header("k", "v".repeat(outbox::MAX_HEADER_VALUE_BYTES + 1)),
            |e| matches!(e, HeaderError::ValueTooLong { .. }),
        ),
        (
            NewMessage::new("hdr", 0, "x")
                .header("k".repeat(outbox::MAX_HEADER_NAME_BYTES + 1), "v"),
            |e| matches!(e, HeaderError::NameTooLong { .. }),
        ),
        (NewMessage::new("hdr", 0, "x").headers(too_many), |e| {
            matches!(e, HeaderError::TooMany { .. })
        }),
    ];
    for (bad, expected) in cases {
        for scheduled in [false, true] {
            let bad = if scheduled {
                bad.clone().deliver_after(Duration::from_secs(60))
            } else {
                bad.clone()
            };
            // A good message first: the batch is refused as a whole.
            let batch = [NewMessage::new("hdr", 0, "good").header("ok", "1"), bad];
            match h.outbox().enqueue_batch(&db, &batch).await {
                Err(EnqueueError::InvalidHeaders { queue, source }) => {
                    assert_eq!(queue, "hdr");
                    assert!(expected(&source), "unexpected {source:?}");
                }
                other => panic!("bad headers accepted: {other:?}"),
            }
        }
    }
    for table in ["outbox_incoming", "outbox_outgoing", "outbox_scheduled"] {
        assert_eq!(
            scalar(&db, &format!("SELECT COUNT(*) FROM {table}")).await,
            0,
            "{table} is empty"
        );
    }
    h.finish().await;
}

/// A typed message whose fields carry headers (`#[outbox(header)]`).
#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2, name = "hdr_typed")]
struct Invoice {
    #[outbox(key, header)]
    account: i64,
    #[outbox(header = "tenant-id")]
    tenant: String,
    body: String,
}

/// `#[outbox(header)]` fields reach the handler as headers, beside headers given at enqueue
/// (which win over a field's header of the same name); a field value a header cannot hold is
/// refused at enqueue with nothing written.
async fn header_fields_of_a_typed_message_reach_the_handler(t: Arc<TestDb>) {
    use outbox::Queue;

    let db = t.pool(16).await;
    let log = Log::default();
    let seen = log.clone();
    let h = start(&db, |b| {
        b.queue(QueueSpec::new(Invoice::NAME, Invoice::PARTITIONS))
            .handler(HandlerSpec::transactional(
                Invoice::NAME,
                "tx",
                move |m, _| {
                    seen.push("tx", m);
                    Box::pin(async { Ok(()) })
                },
            ))
    })
    .await;
    let invoice = |tenant: &str, body: &str| Invoice {
        account: 7,
        tenant: tenant.to_owned(),
        body: body.to_owned(),
    };
    let txn = db.begin().await.expect("begin");
    invoice("acme", "fields")
        .enqueue_with(h.outbox(), &txn)
        .await
        .expect("enqueue fields");
    let explicit = invoice("acme", "explicit")
        .to_message()
        .expect("message")
        .headers(headers(&[("tenant-id", "override"), ("request-id", "r-9")]));
    h.enqueue_in(&txn, explicit).await;
    txn.commit().await.expect("commit");

    // A line break cannot travel in a header: typed error, nothing written.
    let txn = db.begin().await.expect("begin");
    let bad = invoice("evil\r\nX-Injected: 1", "bad")
        .enqueue_with(h.outbox(), &txn)
        .await;
    assert!(
        matches!(bad, Err(EnqueueError::InvalidHeaders { .. })),
        "a header value with CR LF is refused: {bad:?}"
    );
    txn.commit().await.expect("commit");

    log.wait("both messages handled", 2).await;
    let body = |b: &str| format!(r#"{{"account":7,"tenant":"acme","body":"{b}"}}"#);
    assert_eq!(
        log.headers("tx", &body("fields")),
        Some(headers(&[("account", "7"), ("tenant-id", "acme")]))
    );
    assert_eq!(
        log.headers("tx", &body("explicit")),
        Some(headers(&[
            ("account", "7"),
            ("request-id", "r-9"),
            ("tenant-id", "override")
        ]))
    );
    h.stop().await;
    assert_eq!(
        log.all().len(),
        2,
        "the refused message was never delivered"
    );
    h.assert_invariants().await;
}

on_every_backend!(
    header_fields_of_a_typed_message_reach_the_handler,
    every_kind_of_handler_sees_the_headers,
    dead_letter_and_replay_keep_the_headers,
    a_scheduled_message_keeps_its_headers,
    bad_headers_are_refused_and_nothing_is_written,
);
