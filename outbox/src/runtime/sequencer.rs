//! The sequencer: moves committed messages from `incoming` to `outgoing` with dense
//! per-partition sequence numbers, the oldest first, across all queues in one transaction per
//! pass (see `storage/sequence.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sea_orm::DbErr;
use tracing::field::Empty;

use super::Shared;
use super::worker::Next;

/// Pause when the oldest rows all belong to partitions another sequencer holds.
const HELD_ELSEWHERE: Duration = Duration::from_millis(5);

/// Size of the first pass over a backlog. Passes double while they come back full, up to the
/// configured batch: handlers get their first messages after a short transaction, and a long
/// backlog is still moved in large ones.
const FIRST_PASS: u32 = 500;

pub(crate) struct Sequencer {
    shared: Arc<Shared>,
    max: u32,
    poll: Duration,
    limit: AtomicU32,
}

impl Sequencer {
    pub(crate) fn new(shared: Arc<Shared>, max: u32, poll: Duration) -> Arc<Self> {
        Arc::new(Self {
            shared,
            max,
            poll,
            limit: AtomicU32::new(FIRST_PASS.min(max)),
        })
    }

    pub(crate) async fn step(&self) -> Result<Next, DbErr> {
        let limit = self.limit.load(Ordering::Relaxed);
        let span = tracing::debug_span!(
            "outbox.sequence",
            limit,
            scanned = Empty,
            moved = Empty,
            queues = Empty,
            otel.status_code = Empty,
            otel.status_message = Empty
        );
        let pass =
            crate::trace::traced(span.clone(), self.shared.store.sequence_pass(limit)).await?;
        span.record("scanned", pass.scanned);
        span.record("moved", pass.moved_total());
        if !pass.moved.is_empty() && !span.is_disabled() {
            // Which queues got how many new sequence numbers, `queue:n` separated by commas.
            let queues: Vec<String> = pass.moved.iter().map(|(q, n)| format!("{q}:{n}")).collect();
            span.record("queues", queues.join(",").as_str());
        }
        for (queue, _) in &pass.moved {
            self.shared.wake.sequenced(queue);
        }
        let moved = pass.moved_total();
        if moved > 0 {
            self.shared.wake.found_work();
        }
        if pass.scanned == u64::from(limit) {
            self.limit
                .store(limit.saturating_mul(2).min(self.max), Ordering::Relaxed);
            return Ok(if moved > 0 {
                Next::More
            } else {
                Next::After(HELD_ELSEWHERE)
            });
        }
        self.limit
            .store(FIRST_PASS.min(self.max), Ordering::Relaxed);
        if pass.scanned > moved {
            // Some rows belong to partitions another process is sequencing right now.
            return Ok(Next::After(HELD_ELSEWHERE));
        }
        Ok(match self.shared.wake.eager_delay(self.poll) {
            Some(d) => Next::After(d),
            None => Next::Idle,
        })
    }
}
