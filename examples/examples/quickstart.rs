//! Quickstart: a typed queue with a routing key, one leased and one transactional handler,
//! messages enqueued in the same transaction as a business row, on an embedded SQLite file.
//!
//! ```text
//! cargo run -p outbox-examples --example quickstart
//! ```
//!
//! It creates a database in a temporary directory, places three orders (each order row and its
//! `OrderPlaced` message commit together), waits until both handlers have seen every message,
//! prints what they did, shuts down gracefully and exits 0.
#![allow(clippy::print_stdout)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outbox::sea_orm::{
    self, ConnectionTrait, DatabaseTransaction, DbBackend, Statement, TransactionTrait,
};
use outbox::{HandlerError, LeaseContext, Profile, Queue};
use serde::{Deserialize, Serialize};

/// One queue, `order_placed`, with 4 partitions. Messages of one customer share a partition,
/// so each handler sees them in the order they were placed.
#[derive(Debug, Serialize, Deserialize)]
#[outbox::queue(partitions = 4)]
struct OrderPlaced {
    #[outbox(key)]
    customer_id: i64,
    order_id: i64,
    total_cents: i64,
}

static RECEIPTS: AtomicUsize = AtomicUsize::new(0);

/// At-least-once, outside any transaction: the place for e-mails and HTTP calls. Use
/// `ctx.idempotency_key()` to make such side effects idempotent.
#[outbox::handler(leased)]
async fn send_receipt(msg: OrderPlaced, ctx: &LeaseContext) -> Result<(), HandlerError> {
    println!(
        "send_receipt:  order {} of customer {} ({} cents), partition {}, attempt {}, key {}",
        msg.order_id,
        msg.customer_id,
        msg.total_cents,
        ctx.partition(),
        ctx.attempt(),
        ctx.idempotency_key()
    );
    RECEIPTS.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// Inside the transaction that acks the message: its writes commit if and only if the message
/// counts as handled (exactly-once effects in this database).
#[outbox::handler(transactional)]
async fn add_to_ledger(msg: OrderPlaced, txn: &DatabaseTransaction) -> Result<(), HandlerError> {
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Sqlite,
        "INSERT INTO ledger (order_id, cents) VALUES (?, ?)",
        [msg.order_id.into(), msg.total_cents.into()],
    ))
    .await?;
    println!(
        "add_to_ledger: order {} booked in the same transaction as its ack",
        msg.order_id
    );
    Ok(())
}

async fn count(db: &impl ConnectionTrait, table: &str) -> Result<i64, sea_orm::DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Sqlite,
            format!("SELECT COUNT(*) FROM {table}"),
        ))
        .await?;
    row.map_or(Ok(0), |r| r.try_get_by_index(0))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("quickstart.db").display()
    );
    // WAL and a 30 s busy timeout. Any pool size works on SQLite (writes take turns); advice in
    // docs/OPERATIONS.md, "What a SQLite user can rely on".
    let mut options = outbox::sqlite::connect_options(url);
    options.max_connections(4);
    let db = sea_orm::Database::connect(options).await?;
    db.execute_unprepared(
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, total_cents INTEGER NOT NULL);
         CREATE TABLE ledger (order_id INTEGER PRIMARY KEY, cents INTEGER NOT NULL);",
    )
    .await?;

    // Discovers the queue and both handlers declared above, creates the outbox tables and
    // starts the workers.
    let running = outbox::start(db.clone(), Profile::LowLatency).await?;

    let orders = [(1, 7, 1999), (2, 42, 500), (3, 7, 1250)];
    let txn = db.begin().await?;
    for (order_id, customer_id, total_cents) in orders {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Sqlite,
            "INSERT INTO orders (id, customer_id, total_cents) VALUES (?, ?, ?)",
            [order_id.into(), customer_id.into(), total_cents.into()],
        ))
        .await?;
        OrderPlaced {
            customer_id,
            order_id,
            total_cents,
        }
        .enqueue(&txn)
        .await?;
    }
    // The orders and their messages become visible together, or not at all.
    txn.commit().await?;

    let deadline = Instant::now() + Duration::from_secs(10);
    while RECEIPTS.load(Ordering::SeqCst) < orders.len()
        || count(&db, "ledger").await? < orders.len() as i64
    {
        if Instant::now() > deadline {
            return Err("messages were not handled within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    running.shutdown(Duration::from_secs(5)).await?;
    println!(
        "done: {} orders, {} receipts, {} ledger rows",
        count(&db, "orders").await?,
        RECEIPTS.load(Ordering::SeqCst),
        count(&db, "ledger").await?
    );
    Ok(())
}
