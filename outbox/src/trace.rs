//! Spans of the pipeline, and the trace context carried in message headers.
//!
//! The spans exist with or without the `opentelemetry` feature (they are plain `tracing`
//! spans, free when no subscriber wants them). With the feature, an enqueue inside a span
//! stores that span's OpenTelemetry context in the message's headers as W3C `traceparent` and
//! `tracestate`, and the span of the handler call that receives the message continues it: a
//! child on the first attempt, a span linked to it on a retry (a retry is a new piece of
//! work caused by the same message, which the producer's trace should not grow by).

use std::fmt;
use std::future::Future;

use tracing::Instrument;
use tracing::field::Empty;

use crate::headers::Headers;
use crate::queue::Message;

/// Trace fields to add to the headers of the messages of one enqueue (empty without the
/// `opentelemetry` feature, or outside a span with a valid OpenTelemetry context).
pub(crate) type Captured = Vec<(String, String)>;

/// The current span's trace context as header fields.
#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn capture() -> Captured {
    Vec::new()
}

/// The current span's trace context as header fields (`traceparent`, `tracestate`).
#[cfg(feature = "opentelemetry")]
pub(crate) fn capture() -> Captured {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let span = tracing::Span::current();
    if span.is_disabled() {
        return Vec::new();
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut fields = Fields(Vec::new());
    opentelemetry_sdk::propagation::TraceContextPropagator::new().inject_context(&cx, &mut fields);
    fields.0
}

/// The stored form of `headers` plus `trace` (a header the producer set wins over a captured
/// field of the same name).
pub(crate) fn stored_headers(headers: &Headers, trace: &Captured) -> Option<String> {
    if trace.is_empty() || trace.iter().all(|(k, _)| headers.contains(k)) {
        return headers.to_json();
    }
    let mut all = headers.clone();
    for (k, v) in trace {
        if !all.contains(k) {
            all.insert(k.clone(), v.clone());
        }
    }
    all.to_json()
}

/// The span of one handler call for one message: a child of the producer's span on the first
/// attempt, linked to it on later ones (with the `opentelemetry` feature).
pub(crate) fn handler_span(queue: &str, handler: &str, m: &Message) -> tracing::Span {
    let span = tracing::info_span!(
        "outbox.handle",
        queue,
        handler,
        partition = m.partition,
        seq = m.seq,
        attempt = m.attempt,
        otel.status_code = Empty,
        otel.status_message = Empty
    );
    #[cfg(feature = "opentelemetry")]
    if !span.is_disabled() {
        follow(&span, m);
    }
    span
}

/// The span of one handler call for a batch of messages: linked to each message's producer
/// span (a span has one parent, and the messages of a batch may come from many traces).
pub(crate) fn batch_handler_span(queue: &str, handler: &str, ms: &[Message]) -> tracing::Span {
    let (first, last) = match (ms.first(), ms.last()) {
        (Some(f), Some(l)) => (f.seq, l.seq),
        _ => (0, 0),
    };
    let partition = ms.first().map_or(0, |m| m.partition);
    let attempt = ms.first().map_or(1, |m| m.attempt);
    let span = tracing::info_span!(
        "outbox.handle_batch",
        queue,
        handler,
        partition,
        first_seq = first,
        last_seq = last,
        messages = ms.len(),
        attempt,
        otel.status_code = Empty,
        otel.status_message = Empty
    );
    #[cfg(feature = "opentelemetry")]
    if !span.is_disabled() {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        for m in ms {
            if let Some(producer) = producer_context(m.headers()) {
                span.add_link(producer);
            }
        }
    }
    span
}

/// The span of the cursor writes that settle a group of partitions' batches in one statement.
pub(crate) fn group_ack_span(queue: &str, handler: &str, partitions: usize) -> tracing::Span {
    tracing::info_span!(
        "outbox.ack",
        queue,
        handler,
        partitions,
        handled = Empty,
        otel.status_code = Empty,
        otel.status_message = Empty
    )
}

/// The span of an ack: the cursor of `handler` on `partition` of `queue` moves to `seq`
/// (`handled` messages, a failure being recorded when `failed_seq` is set).
pub(crate) fn ack_span(queue: &str, handler: &str, partition: u32, seq: i64) -> tracing::Span {
    tracing::info_span!(
        "outbox.ack",
        queue,
        handler,
        partition,
        seq,
        handled = Empty,
        failed_seq = Empty,
        otel.status_code = Empty,
        otel.status_message = Empty
    )
}

/// Runs `call` in `span` and records a failure on it: `otel.status_code = "ERROR"` and
/// `otel.status_message`, which `tracing-opentelemetry` turns into the span's error status.
pub(crate) async fn traced<T, E: fmt::Display>(
    span: tracing::Span,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let result = call.instrument(span.clone()).await;
    if let Err(e) = &result {
        failed(&span, e);
    }
    result
}

/// Marks `span` failed with `error`.
pub(crate) fn failed(span: &tracing::Span, error: &dyn fmt::Display) {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_message", tracing::field::display(error));
}

/// Makes `span` continue the producer's trace of `m`: its child on the first attempt, linked
/// to it on a retry.
#[cfg(feature = "opentelemetry")]
fn follow(span: &tracing::Span, m: &Message) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let Some(producer) = producer_context(m.headers()) else {
        return;
    };
    if m.attempt <= 1 {
        let parent = opentelemetry::Context::new().with_remote_span_context(producer);
        // Fails only when the span has no OpenTelemetry layer: nothing to continue then.
        let _ = span.set_parent(parent);
    } else {
        span.add_link(producer);
    }
}

/// The producer's span context carried in `headers`, if valid.
#[cfg(feature = "opentelemetry")]
fn producer_context(headers: &Headers) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    if !headers.contains("traceparent") {
        return None;
    }
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .extract(&HeaderReader(headers));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Collects injected fields.
#[cfg(feature = "opentelemetry")]
struct Fields(Vec<(String, String)>);

#[cfg(feature = "opentelemetry")]
impl opentelemetry::propagation::Injector for Fields {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

/// Reads fields from message headers.
#[cfg(feature = "opentelemetry")]
struct HeaderReader<'a>(&'a Headers);

#[cfg(feature = "opentelemetry")]
impl opentelemetry::propagation::Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k).collect()
    }
}
