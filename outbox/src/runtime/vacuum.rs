//! Vacuum: deletes sequenced messages that every handler of their queue has processed, in
//! bounded chunks, releasing their deduplication keys; deletes keys released longer ago than
//! their queue's retention window. Woken early when many messages were acked.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sea_orm::DbErr;
use tokio::time::Instant;

use super::Shared;
use super::worker::{Cause, Next};

/// Where nothing tells of processed messages (see [`step`]), a poll skips the look for them
/// but still looks at least this often.
const LOOK_AT_LEAST_EVERY: Duration = Duration::from_secs(60);

/// The last look for processed messages: when it started, and this process's count of acked
/// messages then.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Looked {
    at: Instant,
    acked: u64,
}

/// `retention`: each queue of this process with its deduplication window in milliseconds.
/// `looked`: the last look for processed messages. A poll skips that look (it reads every
/// cursor row: at 4,096 partitions and 10 handlers, a tenth of a second of a server's CPU)
/// while nothing can have been processed since, and the look is less than a minute old:
/// on SQLite a watch on the database's files saw no write; on a server this process acked
/// nothing (messages other processes ack are vacuumed by their own runtimes, woken by their
/// acks, or by this one within the minute). The expiry of deduplication keys, which depends
/// on the time alone, always runs.
pub(crate) async fn step(
    shared: &Arc<Shared>,
    cause: Cause,
    looked: &Mutex<Option<Looked>>,
    chunk: u32,
    retention: &[(String, i64)],
) -> Result<Next, DbErr> {
    let last = looked.lock().ok().and_then(|l| *l);
    let acked = shared.acked_total.load(Ordering::Relaxed);
    let quiet = match last {
        _ if cause != Cause::Timer => false,
        Some(l) if shared.store.marks_changes() => {
            l.acked == acked && l.at.elapsed() < LOOK_AT_LEAST_EVERY
        }
        l => shared
            .wake
            .unchanged_since(l.map(|l| l.at), LOOK_AT_LEAST_EVERY),
    };
    let mut more = false;
    if !quiet {
        let started = Instant::now();
        let (deleted, left) = shared.store.vacuum(chunk).await?;
        if deleted > 0 {
            tracing::debug!(deleted, "vacuumed processed messages");
        }
        if let Ok(mut l) = looked.lock() {
            *l = Some(Looked { at: started, acked });
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
