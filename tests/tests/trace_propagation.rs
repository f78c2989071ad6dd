//! Trace propagation across processes (issue 15, feature `opentelemetry`): a producer process
//! enqueues inside a span and exits; a worker process handles the messages and exports its
//! spans. The handler's span is a child of the producer's span on the first attempt, and on a
//! retry a span of its own trace with a link to the producer's span.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;

use outbox::{Outbox, QueueSpec};
use outbox_tests::{TestDb, on_every_backend};

/// One `outbox.handle` span as the worker exported it.
#[derive(Debug)]
struct Span {
    seq: i64,
    attempt: i64,
    trace: String,
    id: String,
    parent: String,
    status: String,
    links: Vec<String>,
}

/// Runs a test binary to its end; its stdout lines.
async fn run(bin: &'static str, args: Vec<String>) -> Vec<String> {
    let out = tokio::task::spawn_blocking(move || Command::new(bin).args(&args).output())
        .await
        .expect("join")
        .expect("run the process");
    assert!(
        out.status.success(),
        "{bin} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn handler_span_continues_the_producers_trace(t: Arc<TestDb>) {
    // The schema and the queue, before either process runs.
    let db = t.pool(4).await;
    Outbox::builder(db.clone())
        .queue(QueueSpec::new("traced", 1))
        .connect()
        .await
        .expect("connect");

    let produced: HashMap<String, (String, String)> = run(
        env!("CARGO_BIN_EXE_outbox-trace-producer"),
        ["--url", &t.url, "--body", "first", "--body", "retry-me"]
            .map(str::to_owned)
            .to_vec(),
    )
    .await
    .iter()
    .filter_map(|l| {
        let w: Vec<&str> = l.split(' ').collect();
        (w.len() == 4 && w[0] == "produced")
            .then(|| (w[1].to_owned(), (w[2].to_owned(), w[3].to_owned())))
    })
    .collect();
    assert_eq!(produced.len(), 2, "{produced:?}");

    let lines = run(
        env!("CARGO_BIN_EXE_outbox-trace-worker"),
        ["--url", &t.url, "--expect", "2"]
            .map(str::to_owned)
            .to_vec(),
    )
    .await;
    let mut body_of: HashMap<i64, String> = HashMap::new();
    let mut spans = Vec::new();
    let mut sequenced: Vec<String> = Vec::new();
    for l in &lines {
        let w: Vec<&str> = l.split(' ').collect();
        match w.as_slice() {
            ["sequenced", given] => sequenced.extend(given.split(',').map(str::to_owned)),
            ["handled", seq, body, _] => {
                body_of.insert(seq.parse().expect("seq"), (*body).to_owned());
            }
            ["span", seq, attempt, trace, id, parent, status, links] => spans.push(Span {
                seq: seq.parse().expect("seq"),
                attempt: attempt.parse().expect("attempt"),
                trace: (*trace).to_owned(),
                id: (*id).to_owned(),
                parent: (*parent).to_owned(),
                status: (*status).to_owned(),
                links: if *links == "-" {
                    Vec::new()
                } else {
                    links.split(',').map(str::to_owned).collect()
                },
            }),
            _ => {}
        }
    }
    let spans_of = |body: &str| -> Vec<&Span> {
        let mut v: Vec<&Span> = spans
            .iter()
            .filter(|s| body_of.get(&s.seq).map(String::as_str) == Some(body))
            .collect();
        v.sort_by_key(|s| s.attempt);
        v
    };

    // The sequencer's spans name the sequence numbers they gave: 1 and 2 of `traced/0`, each
    // once.
    let mut given: Vec<i64> = Vec::new();
    for range in &sequenced {
        let (at, seqs) = range.split_once(':').expect("queue/partition:first-last");
        assert_eq!(at, "traced/0", "{sequenced:?}");
        let (first, last) = seqs.split_once('-').expect("first-last");
        given.extend(first.parse::<i64>().expect("first")..=last.parse::<i64>().expect("last"));
    }
    given.sort_unstable();
    assert_eq!(given, [1, 2], "sequencer spans: {sequenced:?}");

    // First attempt: a child of the producer's span, in its trace.
    let (trace, parent) = &produced["first"];
    let first = spans_of("first");
    assert_eq!(first.len(), 1, "one handler span for `first`: {spans:?}");
    assert_eq!(first[0].attempt, 1);
    assert_eq!(&first[0].trace, trace, "same trace as the producer");
    assert_eq!(&first[0].parent, parent, "child of the producer's span");
    assert_ne!(&first[0].id, parent);
    assert!(first[0].links.is_empty(), "{:?}", first[0]);
    assert_ne!(first[0].status, "error");

    // A retry: the first attempt is still the child (and failed); the second is not in the
    // producer's trace but linked to the producer's span.
    let (trace, parent) = &produced["retry-me"];
    let retried = spans_of("retry-me");
    assert_eq!(retried.len(), 2, "two attempts of `retry-me`: {spans:?}");
    assert_eq!(retried[0].attempt, 1);
    assert_eq!(&retried[0].trace, trace);
    assert_eq!(&retried[0].parent, parent);
    assert_eq!(
        retried[0].status, "error",
        "the failure is recorded on the span"
    );
    assert_eq!(retried[1].attempt, 2);
    assert_ne!(&retried[1].trace, trace, "a retry starts its own trace");
    assert_ne!(&retried[1].parent, parent);
    assert_eq!(
        retried[1].links,
        vec![format!("{trace}:{parent}")],
        "a retry links to the producer's span"
    );
    assert_ne!(retried[1].status, "error");
}

on_every_backend!(handler_span_continues_the_producers_trace);
