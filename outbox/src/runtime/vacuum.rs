//! Vacuum: deletes sequenced messages that every handler of their queue has processed, in
//! bounded chunks, releasing their deduplication keys; deletes keys released longer ago than
//! their queue's retention window. Woken early when many messages were acked.

use std::sync::Arc;

use sea_orm::DbErr;

use super::Shared;
use super::worker::Next;

/// `retention`: each queue of this process with its deduplication window in milliseconds.
pub(crate) async fn step(
    shared: &Arc<Shared>,
    chunk: u32,
    retention: &[(String, i64)],
) -> Result<Next, DbErr> {
    let (deleted, more) = shared.store.vacuum(chunk).await?;
    if deleted > 0 {
        tracing::debug!(deleted, "vacuumed processed messages");
    }
    for (queue, ms) in retention {
        let expired = shared.store.expire_dedup_keys(queue, *ms).await?;
        if expired > 0 {
            tracing::debug!(queue, expired, "deduplication keys expired");
        }
    }
    Ok(if more { Next::More } else { Next::Idle })
}
