//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! The outbox records through whatever recorder the application installed
//! (`metrics-exporter-prometheus`, StatsD, OpenTelemetry, …) and costs nearly nothing without
//! one. It installs no recorder and forces no exporter: see `examples/prometheus.rs` for one.
//!
//! | Name | Kind | Labels | Meaning |
//! |---|---|---|---|
//! | `outbox_enqueued_total` | counter | `queue` | Messages enqueued through this process (counted when the insert succeeds, so a rolled-back caller transaction still counts). |
//! | `outbox_duplicates_total` | counter | `queue` | Enqueues that wrote nothing because their deduplication key was taken. |
//! | `outbox_handled_total` | counter | `queue`, `handler` | Messages acked by the handler (the cursor moved past them). |
//! | `outbox_batches_total` | counter | `queue`, `handler` | Batches acked: one transaction of a transactional handler (which may carry the batches of several partitions with a few messages each), one lease of a leased handler. `outbox_handled_total` ÷ this is the mean batch fill. |
//! | `outbox_retried_total` | counter | `queue`, `handler` | Failed attempts that will be retried after a backoff. |
//! | `outbox_dead_lettered_total` | counter | `queue`, `handler` | Messages moved to the dead letters (attempts exhausted or rejected). |
//! | `outbox_blocked_total` | counter | `queue`, `handler` | Times a poisoned head blocked a partition (block policy). |
//! | `outbox_handler_duration_seconds` | histogram | `queue`, `handler` | Duration of one handler call that succeeded. |
//! | `outbox_delivery_latency_seconds` | histogram | `queue`, `handler` | From enqueue (`Message::enqueued_at_ms`, the database's clock at insert; commit follows it) to the successful end of the handler call, by this process's clock (skew between it and the database shows here). |
//! | `outbox_scans_total` | counter | `queue`, `handler` | Reads of the handler's cursors for partitions with work (after a wake-up, and at a poll; a poll skips the read while nothing changed, and reads at least every 10 s: on SQLite a watch on the database file saw no write, on a server the count of changes sequencers mark in the database did not move). |
//! | `outbox_waiting` | gauge | `queue`, `handler` | Messages the handler has not handled yet, sequenced or not (depth). |
//! | `outbox_lag_seconds` | gauge | `queue`, `handler` | Age of the oldest message the handler has not handled (0 when nothing waits). |
//! | `outbox_unsequenced` | gauge | `queue` | Committed messages waiting for the sequencer. |
//! | `outbox_blocked_partitions` | gauge | `queue`, `handler` | Partitions blocked by a poisoned head (needs an operator). |
//! | `outbox_dead_letters` | gauge | `queue`, `handler` | Dead letters stored for the handler. |
//! | `outbox_scheduled` | gauge | `queue` | Scheduled messages not due yet. |
//!
//! Labels never include the partition, so the number of series does not grow with the
//! partition count.
//!
//! Counters and histograms are recorded where the event happens. Gauges are read from the
//! database: a running outbox refreshes them every [`GAUGE_INTERVAL`] (one
//! [`Outbox::status_totals`](crate::Outbox::status_totals) read: a fixed number of statements
//! and of rows whatever the partition count; the status calls themselves only read). On SQLite, while a watch on the database file saw no write, the last
//! read is used again with its lags aged, and a new read is made at least once a minute. With
//! several processes on one database every process reports the same gauge values: aggregate
//! them with `max`, not `sum`.

use std::future::Future;
use std::time::{Duration, Instant};

use ::metrics::{counter, gauge, histogram};
use tokio_util::sync::CancellationToken;

use crate::queue::{Message, NewMessage};
use crate::runtime::Outbox;
use crate::status::Status;
use crate::storage::now_ms;

/// How often a running outbox refreshes the gauges.
pub const GAUGE_INTERVAL: Duration = Duration::from_secs(10);

/// Where a watch on the database's files tells that nothing changed (SQLite), the gauges are
/// refreshed from the last status read (lags aged), and read anew at least this often.
const READ_AT_LEAST_EVERY: Duration = Duration::from_secs(60);

/// Name of the counter of enqueued messages.
pub const ENQUEUED: &str = "outbox_enqueued_total";
/// Name of the counter of enqueues that were duplicates of a deduplication key.
pub const DUPLICATES: &str = "outbox_duplicates_total";
/// Name of the counter of handled (acked) messages.
pub const HANDLED: &str = "outbox_handled_total";
/// Name of the counter of acked batches (transactions of a transactional handler, leases of a
/// leased one).
pub const BATCHES: &str = "outbox_batches_total";
/// Name of the counter of failed attempts that will be retried.
pub const RETRIED: &str = "outbox_retried_total";
/// Name of the counter of dead-lettered messages.
pub const DEAD_LETTERED: &str = "outbox_dead_lettered_total";
/// Name of the counter of partitions blocked by a poisoned head.
pub const BLOCKED: &str = "outbox_blocked_total";
/// Name of the histogram of handler call durations.
pub const HANDLER_DURATION: &str = "outbox_handler_duration_seconds";
/// Name of the histogram of enqueue-to-handled latencies.
pub const DELIVERY_LATENCY: &str = "outbox_delivery_latency_seconds";
/// Name of the counter of reads of a handler's cursors looking for work.
pub const SCANS: &str = "outbox_scans_total";
/// Name of the gauge of messages waiting for a handler.
pub const WAITING: &str = "outbox_waiting";
/// Name of the gauge of the age of the oldest unhandled message.
pub const LAG: &str = "outbox_lag_seconds";
/// Name of the gauge of unsequenced messages.
pub const UNSEQUENCED: &str = "outbox_unsequenced";
/// Name of the gauge of blocked partitions.
pub const BLOCKED_PARTITIONS: &str = "outbox_blocked_partitions";
/// Name of the gauge of stored dead letters.
pub const DEAD_LETTERS: &str = "outbox_dead_letters";
/// Name of the gauge of scheduled messages not due yet.
pub const SCHEDULED: &str = "outbox_scheduled";

pub(crate) fn enqueued<'a>(messages: impl IntoIterator<Item = &'a NewMessage>) {
    let mut run: Option<(&str, u64)> = None;
    for m in messages {
        match &mut run {
            Some((q, n)) if *q == &*m.queue => *n += 1,
            _ => {
                if let Some((q, n)) = run.take() {
                    counter!(ENQUEUED, "queue" => q.to_owned()).increment(n);
                }
                run = Some((&m.queue, 1));
            }
        }
    }
    if let Some((q, n)) = run {
        counter!(ENQUEUED, "queue" => q.to_owned()).increment(n);
    }
}

/// Counts an enqueue that wrote nothing because its deduplication key was taken.
pub(crate) fn duplicate(queue: &str) {
    counter!(DUPLICATES, "queue" => queue.to_owned()).increment(1);
}

/// Counts one acked batch and the `n` messages the handler saw in it.
pub(crate) fn handled(queue: &str, handler: &str, n: u64) {
    if n > 0 {
        counter!(HANDLED, "queue" => queue.to_owned(), "handler" => handler.to_owned())
            .increment(n);
        counter!(BATCHES, "queue" => queue.to_owned(), "handler" => handler.to_owned())
            .increment(1);
    }
}

/// Counts a read of a handler's cursors.
pub(crate) fn scanned(queue: &str, handler: &str) {
    counter!(SCANS, "queue" => queue.to_owned(), "handler" => handler.to_owned()).increment(1);
}

/// Counts a failed attempt: dead-lettered, blocked, or to be retried.
pub(crate) fn failed(queue: &str, handler: &str, dead: bool, blocked: bool) {
    let name = if dead {
        DEAD_LETTERED
    } else if blocked {
        BLOCKED
    } else {
        RETRIED
    };
    counter!(name, "queue" => queue.to_owned(), "handler" => handler.to_owned()).increment(1);
}

/// Runs one handler call, recording its duration and, if it succeeded, the latency since
/// the message was enqueued.
pub(crate) async fn timed<T, E>(
    queue: &str,
    handler: &str,
    message: &Message,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = Instant::now();
    let result = call.await;
    if result.is_ok() {
        let labels = [("queue", queue.to_owned()), ("handler", handler.to_owned())];
        histogram!(HANDLER_DURATION, &labels).record(started.elapsed().as_secs_f64());
        let latency_ms = (now_ms() - message.enqueued_at_ms).max(0);
        histogram!(DELIVERY_LATENCY, &labels).record(latency_ms as f64 / 1000.0);
    }
    result
}

/// Sets the gauges from a status read.
pub fn record_status(status: &Status) {
    record_aged(status, Duration::ZERO);
}

/// Records `status` as it reads `elapsed` after it was taken when nothing was written
/// meanwhile: every lag grew by `elapsed`, nothing else changed.
fn record_aged(status: &Status, elapsed: Duration) {
    let aged_ms = i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX);
    for q in &status.queues {
        gauge!(UNSEQUENCED, "queue" => q.name.clone()).set(q.unsequenced as f64);
        gauge!(SCHEDULED, "queue" => q.name.clone()).set(q.scheduled as f64);
        for h in &q.handlers {
            let labels = [("queue", q.name.clone()), ("handler", h.name.clone())];
            gauge!(WAITING, &labels).set(h.waiting as f64);
            let lag_ms = h.lag_ms.map_or(0, |l| l.saturating_add(aged_ms));
            gauge!(LAG, &labels).set(lag_ms as f64 / 1000.0);
            gauge!(BLOCKED_PARTITIONS, &labels).set(f64::from(h.blocked_partitions));
            gauge!(DEAD_LETTERS, &labels).set(h.dead_letters as f64);
        }
    }
}

/// Refreshes the gauges from a status read every [`GAUGE_INTERVAL`] until `cancel` fires. The
/// only writer of the gauges: reading the status elsewhere changes nothing.
///
/// The read sums the partitions in the database ([`Outbox::status_totals`]): one row per
/// handler, where the full status returns one per (handler, partition) (40,960 rows at 4,096
/// partitions and 10 handlers, most of an idle runtime's cost on MySQL/MariaDB).
///
/// Where a watch on the database's files saw no write since the last read (SQLite), nothing
/// but the lags can have changed, and they grew by the time since: the last read is recorded
/// again with its lags aged, not read anew (the read still covers every cursor row in the
/// database).
pub(crate) async fn run_gauges(outbox: &Outbox, cancel: CancellationToken) {
    let mut last: Option<(Status, tokio::time::Instant)> = None;
    loop {
        match &last {
            Some((status, read)) if outbox.unchanged_since(Some(*read), READ_AT_LEAST_EVERY) => {
                record_aged(status, read.elapsed());
            }
            _ => {
                let started = tokio::time::Instant::now();
                match outbox.status_totals().await {
                    Ok(status) => {
                        record_status(&status);
                        last = Some((status, started));
                    }
                    Err(e) => tracing::debug!(error = %e, "metrics: status read failed"),
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(GAUGE_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{HandlerStatus, QueueStatus};

    fn handler(name: &str, lag_ms: Option<i64>) -> HandlerStatus {
        HandlerStatus {
            name: name.into(),
            pending: i64::from(lag_ms.is_some()),
            waiting: i64::from(lag_ms.is_some()),
            lag_ms,
            retrying_partitions: 0,
            leased_partitions: 0,
            blocked_partitions: 0,
            dead_letters: 0,
            stale_for_ms: None,
            partitions: Vec::new(),
        }
    }

    fn status(lags: [Option<i64>; 2]) -> Status {
        Status {
            taken_at_ms: 1_000,
            schema_version: Some(4),
            queues: vec![QueueStatus {
                name: "q".into(),
                partitions: 1,
                unsequenced: 0,
                dead_letters: 0,
                scheduled: 3,
                scheduled_capped: false,
                next_due_at_ms: Some(9_000),
                handlers: vec![handler("waits", lags[0]), handler("idle", lags[1])],
            }],
        }
    }

    #[test]
    fn a_quiet_status_ages_only_the_lags_of_handlers_that_wait() {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        ::metrics::with_local_recorder(&recorder, || {
            record_aged(&status([Some(1_500), None]), Duration::from_secs(2));
        });
        let mut lags: Vec<(String, f64)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, ..)| k.key().name() == LAG)
            .filter_map(|(k, _, _, v)| {
                let handler = k.key().labels().find(|l| l.key() == "handler")?;
                match v {
                    metrics_util::debugging::DebugValue::Gauge(g) => {
                        Some((handler.value().to_owned(), g.into_inner()))
                    }
                    _ => None,
                }
            })
            .collect();
        lags.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            lags,
            [("idle".to_owned(), 0.0), ("waits".to_owned(), 3.5)],
            "the oldest waiting message is two seconds older; a handler with none stays at 0"
        );
    }
}
