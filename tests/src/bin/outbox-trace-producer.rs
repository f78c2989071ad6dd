//! A producer process for the trace propagation test: connects to `--url`, and for each
//! `--body` enqueues one message to queue `traced` inside its own `produce` span, exported
//! through OpenTelemetry. Then it exits.
//!
//! Lines on stdout: `produced <body> <trace id> <span id>` (hex, W3C form), one per body.

use std::io::Write;

use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use outbox::{NewMessage, Outbox, QueueSpec};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn args(name: &str) -> Vec<String> {
    let all: Vec<String> = std::env::args().collect();
    all.windows(2)
        .filter(|w| w[0] == name)
        .map(|w| w[1].clone())
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let url = args("--url").pop().expect("--url");
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(InMemorySpanExporter::default())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("producer")));
    tracing::subscriber::set_global_default(subscriber).expect("subscriber");
    let mut o = outbox::sea_orm::ConnectOptions::new(url);
    o.max_connections(2).sqlx_logging(false);
    let db = outbox::sea_orm::Database::connect(o)
        .await
        .expect("connect");
    let outbox = Outbox::builder(db.clone())
        .queue(QueueSpec::new("traced", 1))
        .connect()
        .await
        .expect("connect the outbox");
    for body in args("--body") {
        let span = tracing::info_span!("produce", body = %body);
        let sc = span.context().span().span_context().clone();
        outbox
            .enqueue(&db, NewMessage::new("traced", 0, body.clone()))
            .instrument(span)
            .await
            .expect("enqueue");
        say(&format!(
            "produced {body} {} {}",
            sc.trace_id(),
            sc.span_id()
        ));
    }
    let _ = provider.shutdown();
}
