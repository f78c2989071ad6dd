//! The sequencer: moves committed messages from `incoming` to `outgoing` with dense
//! per-partition sequence numbers, one partition transaction at a time.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::DbErr;

use super::Shared;
use super::worker::Next;

/// Partitions looked at per pass.
const SCAN: u32 = 1_000;

pub(crate) async fn step(shared: &Arc<Shared>, batch: u32, poll: Duration) -> Result<Next, DbErr> {
    let store = &shared.store;
    let parts = store.unsequenced_partitions(SCAN).await?;
    let mut more = false;
    let mut found = false;
    for (queue, partition) in &parts {
        match store.sequence_partition(queue, *partition, batch).await? {
            Some(0) | None => {}
            Some(n) => {
                found = true;
                more |= n == u64::from(batch);
                shared.wake.sequenced(queue);
            }
        }
    }
    if found {
        shared.wake.found_work();
    }
    if more {
        return Ok(Next::More);
    }
    Ok(match shared.wake.eager_delay(poll) {
        Some(d) => Next::After(d),
        None => Next::Idle,
    })
}
