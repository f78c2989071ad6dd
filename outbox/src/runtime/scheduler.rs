//! The scheduler: moves scheduled messages into `incoming` when the database's clock reaches
//! their due time, then wakes the sequencer (see `storage/scheduled.rs`). It sleeps until the
//! next due time, at most the poll interval (which covers messages scheduled by other
//! processes), and an in-process scheduled enqueue wakes it at once.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::DbErr;

use super::Shared;
use super::worker::Next;

/// Pause when the due messages were all taken by another process's scheduler.
const HELD_ELSEWHERE: Duration = Duration::from_millis(5);

pub(crate) async fn step(shared: &Arc<Shared>, batch: u32) -> Result<Next, DbErr> {
    let store = &shared.store;
    match store.next_due_in().await? {
        None => Ok(Next::Idle),
        Some(ms) if ms > 0 => Ok(Next::After(Duration::from_millis(ms as u64))),
        Some(_) => {
            let moved = store.release_due(batch).await?;
            if moved == 0 {
                return Ok(Next::After(HELD_ELSEWHERE));
            }
            tracing::debug!(moved, "scheduled messages became due");
            // Committed: the sequencer can number them now (on PostgreSQL no NOTIFY came
            // with these inserts).
            shared.wake.sequencer.notify_one();
            Ok(Next::More)
        }
    }
}
