//! Metrics (issue 6): the documented names appear with `queue` and `handler` labels after
//! messages are handled, retried and dead-lettered. One test per binary: it installs the
//! process-wide recorder.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::{CompositeKey, MetricKind};
use outbox::{HandlerError, HandlerSpec, NewMessage, Outbox, Overrides, Profile, QueueSpec};
use outbox_tests::{Kind, TestDb, eventually, run};

type Snapshot = Vec<(
    CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

fn find<'a>(snap: &'a Snapshot, name: &str, labels: &[(&str, &str)]) -> Option<&'a DebugValue> {
    snap.iter()
        .find(|(k, ..)| {
            let key = k.key();
            let have: HashMap<&str, &str> = key.labels().map(|l| (l.key(), l.value())).collect();
            key.name() == name
                && have.len() == labels.len()
                && labels.iter().all(|(k, v)| have.get(k) == Some(v))
        })
        .map(|(.., v)| v)
}

fn count(snap: &Snapshot, name: &str, labels: &[(&str, &str)]) -> u64 {
    match find(snap, name, labels) {
        Some(DebugValue::Counter(n)) => *n,
        _ => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_documented_names_and_labels() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("install the recorder");
    run(Kind::Sqlite, |t: Arc<TestDb>| async move {
        let db = t.pool(4).await;
        let tries = Arc::new(AtomicU32::new(0));
        let tr = tries.clone();
        let flaky = HandlerSpec::transactional("m", "flaky", move |m, _txn| {
            let poison = m.payload() == b"poison";
            let first = m.payload() == b"flaky" && tr.fetch_add(1, Ordering::SeqCst) == 0;
            Box::pin(async move {
                if poison {
                    Err(HandlerError::reject(std::io::Error::other("no")))
                } else if first {
                    Err(HandlerError::retry(std::io::Error::other("later")))
                } else {
                    Ok(())
                }
            })
        })
        .overrides(
            Overrides::NONE
                .backoff_base(Duration::from_millis(10))
                .backoff_max(Duration::from_millis(10)),
        );
        let leased = HandlerSpec::leased("m", "lease", |_m, _ctx| Box::pin(async { Ok(()) }));
        let rt = Outbox::builder(db.clone())
            .profile(Profile::LowLatency)
            .queue(QueueSpec::new("m", 2))
            .handler(flaky)
            .handler(leased)
            .start()
            .await
            .expect("start");
        let batch = [
            NewMessage::new("m", 0, "flaky"),
            NewMessage::new("m", 0, "a"),
            NewMessage::new("m", 1, "poison"),
            NewMessage::new("m", 1, "b"),
        ];
        rt.outbox().enqueue_batch(&db, &batch).await.expect("enqueue");
        eventually(Duration::from_secs(30), "everything handled", || async {
            let s = rt.outbox().status().await.expect("status");
            s.queues[0].handlers.iter().all(|h| h.waiting() == 0)
        })
        .await;
        let snap: Snapshot = snapshotter.snapshot().into_vec();
        let f = [("queue", "m"), ("handler", "flaky")];
        let l = [("queue", "m"), ("handler", "lease")];
        assert_eq!(count(&snap, outbox::metrics::ENQUEUED, &[("queue", "m")]), 4);
        // The rejected message is dead-lettered, not handled.
        assert_eq!(count(&snap, outbox::metrics::HANDLED, &f), 3, "{snap:#?}");
        assert_eq!(count(&snap, outbox::metrics::HANDLED, &l), 4);
        assert_eq!(count(&snap, outbox::metrics::RETRIED, &f), 1);
        assert_eq!(count(&snap, outbox::metrics::DEAD_LETTERED, &f), 1);
        for name in [outbox::metrics::HANDLER_DURATION, outbox::metrics::DELIVERY_LATENCY] {
            for labels in [&f, &l] {
                assert!(
                    matches!(find(&snap, name, labels), Some(DebugValue::Histogram(v)) if !v.is_empty()),
                    "{name} {labels:?}"
                );
            }
        }
        // Gauges are refreshed by the runtime's metrics task (status only reads): wait for
        // its first pass after the drain, the one that sees the dead letter. (Snapshots clear
        // histograms, so the ones above were checked first.)
        let mut snap: Snapshot = Vec::new();
        let deadline = tokio::time::Instant::now() + outbox::metrics::GAUGE_INTERVAL * 3;
        while tokio::time::Instant::now() < deadline {
            snap = snapshotter.snapshot().into_vec();
            if matches!(find(&snap, outbox::metrics::DEAD_LETTERS, &f), Some(DebugValue::Gauge(v)) if v.into_inner() == 1.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
        for name in [
            outbox::metrics::WAITING,
            outbox::metrics::LAG,
            outbox::metrics::BLOCKED_PARTITIONS,
        ] {
            assert!(
                matches!(find(&snap, name, &f), Some(DebugValue::Gauge(v)) if v.into_inner() == 0.0),
                "{name}"
            );
        }
        assert!(matches!(
            find(&snap, outbox::metrics::DEAD_LETTERS, &f),
            Some(DebugValue::Gauge(v)) if v.into_inner() == 1.0
        ));
        assert!(find(&snap, outbox::metrics::UNSEQUENCED, &[("queue", "m")]).is_some());
        // No partition label anywhere.
        assert!(snap.iter().all(|(k, ..)| k.key().labels().all(|l| l.key() != "partition")));
        assert!(snap.iter().any(|(k, ..)| k.kind() == MetricKind::Histogram));
        assert!(
            find(&snap, outbox::metrics::WAITING, &l).is_some(),
            "the leased handler's gauges are refreshed too"
        );
    })
    .await;
}
