//! Application state as `State<T>` after the context (or in its place on a leased handler),
//! several state types, batch handlers with state, and handlers returning `anyhow::Result<()>`
//! (the `anyhow` feature), with `?` on `anyhow::Error` inside them.

use std::sync::Arc;

use outbox::sea_orm::DatabaseTransaction;
use outbox::{HandlerError, LeaseContext, State};

#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Email {
    to: String,
}

#[derive(Clone)]
struct Mailer {
    from: Arc<str>,
}

#[derive(Clone)]
struct Limits {
    max: usize,
}

#[outbox::handler(leased)]
async fn send(
    msg: Email,
    ctx: &LeaseContext,
    State(mailer): State<Mailer>,
    limits: State<Limits>,
) -> Result<(), HandlerError> {
    let _ = (msg.to, ctx.attempt(), mailer.from, limits.max);
    Ok(())
}

#[outbox::handler(leased, name = "send_without_context")]
async fn send_no_ctx(msg: Email, State(mailer): State<Mailer>) -> Result<(), HandlerError> {
    let _ = (msg.to, mailer.from);
    Ok(())
}

#[outbox::handler(transactional, batch, batch_size = 16)]
async fn archive(
    msgs: Vec<Email>,
    txn: &DatabaseTransaction,
    State(limits): State<Limits>,
) -> Result<(), HandlerError> {
    let _ = (msgs.len(), txn, limits.max);
    Ok(())
}

fn parse(to: &str) -> anyhow::Result<usize> {
    anyhow::ensure!(to.contains('@'), "no `@` in {to:?}");
    Ok(to.len())
}

#[outbox::handler(leased)]
async fn validate(msg: Email, State(limits): State<Limits>) -> anyhow::Result<()> {
    let len = parse(&msg.to)?;
    anyhow::ensure!(len <= limits.max, "address too long");
    Ok(())
}

#[outbox::handler(transactional)]
async fn audit(msg: Email, _txn: &DatabaseTransaction) -> anyhow::Result<()> {
    parse(&msg.to)?;
    Ok(())
}

fn main() {
    // The fns stay callable as written.
    let _ = send_no_ctx(
        Email { to: "a@b".into() },
        State(Mailer { from: "x@y".into() }),
    );
}
