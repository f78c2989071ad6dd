//! Vacuum: deletes sequenced messages that every handler of their queue has processed, in
//! bounded chunks; woken early when many messages were acked.

use std::sync::Arc;

use sea_orm::DbErr;

use super::Shared;
use super::worker::Next;

pub(crate) async fn step(shared: &Arc<Shared>, chunk: u32) -> Result<Next, DbErr> {
    let (deleted, more) = shared.store.vacuum(chunk).await?;
    if deleted > 0 {
        tracing::debug!(deleted, "vacuumed processed messages");
    }
    Ok(if more { Next::More } else { Next::Idle })
}
