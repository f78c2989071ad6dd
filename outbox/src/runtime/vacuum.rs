//! Vacuum: deletes sequenced messages that every handler of their queue has processed, in
//! bounded chunks, releasing their deduplication keys; deletes keys released longer ago than
//! their queue's retention window. Woken early when many messages were acked.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sea_orm::DbErr;
use tokio::time::Instant;

use super::Shared;
use super::worker::{Cause, Next};

/// Where a watch on the database's files tells that nothing changed (SQLite), a poll skips the
/// look for processed messages but still looks at least this often.
const LOOK_AT_LEAST_EVERY: Duration = Duration::from_secs(60);

/// `retention`: each queue of this process with its deduplication window in milliseconds.
/// `looked`: when the last look for processed messages started. A poll skips that look (it
/// reads every cursor row) while a watch on the database's files saw no write since; the
/// expiry of deduplication keys, which depends on the time alone, always runs.
pub(crate) async fn step(
    shared: &Arc<Shared>,
    cause: Cause,
    looked: &Mutex<Option<Instant>>,
    chunk: u32,
    retention: &[(String, i64)],
) -> Result<Next, DbErr> {
    let last = looked.lock().ok().and_then(|l| *l);
    let mut more = false;
    if !(cause == Cause::Timer && shared.wake.unchanged_since(last, LOOK_AT_LEAST_EVERY)) {
        let started = Instant::now();
        let (deleted, left) = shared.store.vacuum(chunk).await?;
        if deleted > 0 {
            tracing::debug!(deleted, "vacuumed processed messages");
        }
        if let Ok(mut l) = looked.lock() {
            *l = Some(started);
        }
        more = left;
    }
    for (queue, ms) in retention {
        let expired = shared.store.expire_dedup_keys(queue, *ms).await?;
        if expired > 0 {
            tracing::debug!(queue, expired, "deduplication keys expired");
        }
    }
    Ok(if more { Next::More } else { Next::Idle })
}
