//! The trace context carried in message headers: the fields an enqueue adds to the headers it
//! stores. Nothing is captured yet, so the stored headers are exactly the producer's.

use crate::headers::Headers;

/// Fields to add to the headers of the messages of one enqueue.
pub(crate) type Captured = Vec<(String, String)>;

/// The current trace context as header fields (none).
pub(crate) fn capture() -> Captured {
    Vec::new()
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
