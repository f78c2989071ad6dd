//! A worker process for the trace propagation test: handles queue `traced` on `--url` with
//! handler `h`, exporting its spans through OpenTelemetry into memory, until `--expect`
//! messages were handled; a message whose body starts with `retry` fails its first attempt.
//! Then it shuts down and prints what it exported.
//!
//! Lines on stdout: `handled <seq> <body> <attempt>` for each call, then one line per
//! `outbox.handle` span: `span <seq> <attempt> <trace id> <span id> <parent span id>
//! <status> <links>`, links as `trace:span` separated by commas (`-` for none); and one line
//! per `outbox.sequence` span that gave sequence numbers: `sequenced <queue/partition:first-last,…>`.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::Value;
use opentelemetry::trace::{Status, TracerProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use outbox::{HandlerError, HandlerSpec, Outbox, Overrides, Profile, QueueSpec};
use tracing_subscriber::layer::SubscriberExt;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn arg(name: &str) -> Option<String> {
    let mut args = std::env::args();
    while let Some(a) = args.next() {
        if a == name {
            return args.next();
        }
    }
    None
}

fn int(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::I64(n)) => *n,
        Some(other) => other.as_str().parse().unwrap_or(-1),
        None => -1,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = arg("--url").expect("--url");
    let expect: usize = arg("--expect")
        .and_then(|n| n.parse().ok())
        .expect("--expect");
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("worker")));
    tracing::subscriber::set_global_default(subscriber).expect("subscriber");
    let mut o = outbox::sea_orm::ConnectOptions::new(url);
    o.max_connections(8).sqlx_logging(false);
    let db = outbox::sea_orm::Database::connect(o)
        .await
        .expect("connect");
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    let running = Outbox::builder(db)
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("traced", 1))
        .handler(
            HandlerSpec::transactional("traced", "h", move |m, _| {
                let body = String::from_utf8_lossy(m.payload()).into_owned();
                say(&format!("handled {} {body} {}", m.seq(), m.attempt()));
                let fail = body.starts_with("retry") && m.attempt() == 1;
                if !fail {
                    d.fetch_add(1, Ordering::SeqCst);
                }
                Box::pin(async move {
                    if fail {
                        Err(HandlerError::retry("the first attempt fails"))
                    } else {
                        Ok(())
                    }
                })
            })
            .overrides(
                Overrides::NONE
                    .batch_size(1)
                    .backoff_base(Duration::from_millis(50))
                    .backoff_max(Duration::from_millis(100)),
            ),
        )
        .start()
        .await
        .expect("start");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::SeqCst) < expect && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    let _ = provider.force_flush();
    for s in exporter.get_finished_spans().expect("spans") {
        let attr = |key: &str| {
            s.attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.clone())
        };
        if s.name == "outbox.sequence" {
            if let Some(given) = attr("sequenced") {
                say(&format!("sequenced {}", given.as_str()));
            }
            continue;
        }
        if s.name != "outbox.handle" {
            continue;
        }
        let status = match &s.status {
            Status::Error { .. } => "error",
            Status::Ok => "ok",
            Status::Unset => "unset",
        };
        let links: Vec<String> = s
            .links
            .iter()
            .map(|l| format!("{}:{}", l.span_context.trace_id(), l.span_context.span_id()))
            .collect();
        say(&format!(
            "span {} {} {} {} {} {status} {}",
            int(attr("seq").as_ref()),
            int(attr("attempt").as_ref()),
            s.span_context.trace_id(),
            s.span_context.span_id(),
            s.parent_span_id,
            if links.is_empty() {
                "-".to_owned()
            } else {
                links.join(",")
            }
        ));
    }
    let _ = provider.shutdown();
}
