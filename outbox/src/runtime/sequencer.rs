//! The sequencer: moves committed messages from `incoming` to `outgoing` with dense
//! per-partition sequence numbers, the oldest first, across all queues in one transaction per
//! pass (see `storage/sequence.rs`).

use std::sync::Arc;
use std::time::Duration;

use sea_orm::DbErr;

use super::Shared;
use super::worker::Next;

/// Pause when the oldest rows all belong to partitions another sequencer holds.
const HELD_ELSEWHERE: Duration = Duration::from_millis(5);

pub(crate) async fn step(shared: &Arc<Shared>, batch: u32, poll: Duration) -> Result<Next, DbErr> {
    let pass = shared.store.sequence_pass(batch).await?;
    for (queue, _) in &pass.moved {
        shared.wake.sequenced(queue);
    }
    let moved = pass.moved_total();
    if moved > 0 {
        shared.wake.found_work();
    }
    if pass.scanned == u64::from(batch) {
        return Ok(if moved > 0 {
            Next::More
        } else {
            Next::After(HELD_ELSEWHERE)
        });
    }
    if pass.scanned > moved {
        // Some rows belong to partitions another process is sequencing right now.
        return Ok(Next::After(HELD_ELSEWHERE));
    }
    Ok(match shared.wake.eager_delay(poll) {
        Some(d) => Next::After(d),
        None => Next::Idle,
    })
}
