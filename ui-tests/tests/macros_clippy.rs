//! The expansions raise no pedantic clippy lint in the user's crate: CI's
//! `cargo clippy --workspace --all-targets -- -D warnings` checks this file under
//! `deny(clippy::pedantic)`.
#![deny(clippy::pedantic)]

use outbox::sea_orm::{ConnectionTrait, DatabaseTransaction};
use outbox::{HandlerError, LeaseContext, Queue};
use serde::{Deserialize, Serialize};

/// A keyed queue with every option.
#[derive(Debug, Serialize, Deserialize)]
#[outbox::queue(
    partitions = 16,
    name = "clippy.keyed",
    max_attempts = 4,
    poison = "block",
    batch_size = 20,
    concurrency = 3
)]
struct Keyed {
    #[outbox(key)]
    id: u64,
    body: String,
}

/// An enum queue without a key.
#[derive(Debug, Serialize, Deserialize)]
#[outbox::queue(partitions = 2)]
enum Unkeyed {
    A,
    B(u8),
}

#[outbox::handler(transactional, max_attempts = 2, batch_size = 5, concurrency = 1)]
async fn keyed_tx(msg: Keyed, txn: &DatabaseTransaction) -> Result<(), HandlerError> {
    txn.execute_unprepared(&format!("SELECT {}, '{}'", msg.id, msg.body.len()))
        .await?;
    Ok(())
}

#[outbox::handler(leased, name = "keyed-leased", lease_ms = 10_000)]
async fn keyed_leased(msg: Keyed, ctx: &LeaseContext) -> Result<(), HandlerError> {
    tokio::task::yield_now().await;
    let _ = (msg.id, ctx.attempt());
    Ok(())
}

#[outbox::handler(leased)]
async fn unkeyed(msg: Unkeyed) -> Result<(), HandlerError> {
    tokio::task::yield_now().await;
    match msg {
        Unkeyed::A | Unkeyed::B(_) => Ok(()),
    }
}

#[test]
fn declarations_are_registered() {
    assert_eq!(Keyed::NAME, "clippy.keyed");
    assert_eq!(Unkeyed::NAME, "unkeyed");
    assert!(Unkeyed::B(1).partition() < 2);
    assert_eq!(outbox::handlers().len(), 3);
}
