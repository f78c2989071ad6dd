//! Orders on PostgreSQL: a business table and the outbox written in one transaction, one queue
//! fanned out to two handlers, and a graceful shutdown on Ctrl-C.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run -p outbox-examples --example orders
//! ```
//!
//! It places an order every 200 ms. Each order row commits together with its `OrderPlaced`
//! message; every fifth order is rolled back instead, and its message never exists. Two handlers
//! consume the queue, each with its own cursor (fan-out):
//!
//! - `ship_order` (leased, at-least-once) stands for a call to a warehouse API; the warehouse
//!   client is application state, given once at start with `.state(warehouse)` and received as
//!   `State<Warehouse>`;
//! - `update_customer_stats` (transactional) updates a summary table in the transaction that
//!   acks the message, so each order is counted exactly once.
//!
//! Press Ctrl-C: the runtime stops taking work, lets in-flight handlers finish within 10 s,
//! releases its leases and the program prints the totals.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use outbox::sea_orm::{
    self, ConnectionTrait, DatabaseTransaction, DbBackend, Statement, TransactionTrait,
};
use outbox::{HandlerError, LeaseContext, Profile, Queue, State};
use serde::{Deserialize, Serialize};

/// Queue `order_placed`, 8 partitions; one customer's orders stay in order.
#[derive(Debug, Serialize, Deserialize)]
#[outbox::queue(partitions = 8, max_attempts = 5)]
struct OrderPlaced {
    #[outbox(key)]
    customer_id: i64,
    order_id: i64,
    total_cents: i64,
}

/// The warehouse API client: application state, cheap to clone (shared inside), given once at
/// start. A real one would hold an HTTP client and credentials.
#[derive(Clone)]
struct Warehouse {
    name: Arc<str>,
    shipped: Arc<AtomicU64>,
}

/// Leased: runs outside any transaction; a real one would call the warehouse with
/// `ctx.idempotency_key()` so a redelivery does not ship twice.
#[outbox::handler(leased, lease_ms = 15_000)]
async fn ship_order(
    msg: OrderPlaced,
    ctx: &LeaseContext,
    State(warehouse): State<Warehouse>,
) -> Result<(), HandlerError> {
    println!(
        "ship_order:            order {:>3} of customer {} from {} (partition {}, attempt {})",
        msg.order_id,
        msg.customer_id,
        warehouse.name,
        ctx.partition(),
        ctx.attempt()
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    warehouse.shipped.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Transactional: the summary row changes if and only if the message is acked.
#[outbox::handler(transactional)]
async fn update_customer_stats(
    msg: OrderPlaced,
    txn: &DatabaseTransaction,
) -> Result<(), HandlerError> {
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO customer_stats (customer_id, orders, total_cents) VALUES ($1, 1, $2)
         ON CONFLICT (customer_id) DO UPDATE
         SET orders = customer_stats.orders + 1, total_cents = customer_stats.total_cents + EXCLUDED.total_cents",
        [msg.customer_id.into(), msg.total_cents.into()],
    ))
    .await?;
    println!("update_customer_stats: order {:>3} counted", msg.order_id);
    Ok(())
}

/// Writes the order row and its message in one transaction; `commit = false` rolls both back.
async fn place_order(
    db: &sea_orm::DatabaseConnection,
    customer_id: i64,
    total_cents: i64,
    commit: bool,
) -> Result<Option<i64>, Box<dyn std::error::Error>> {
    let txn = db.begin().await?;
    let row = txn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO orders (customer_id, total_cents) VALUES ($1, $2) RETURNING id",
            [customer_id.into(), total_cents.into()],
        ))
        .await?
        .ok_or("INSERT … RETURNING returned no row")?;
    let order_id: i64 = row.try_get_by_index(0)?;
    OrderPlaced {
        customer_id,
        order_id,
        total_cents,
    }
    .enqueue(&txn)
    .await?;
    if commit {
        txn.commit().await?;
        Ok(Some(order_id))
    } else {
        txn.rollback().await?;
        Ok(None)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL, e.g. postgres://postgres@127.0.0.1:5432/test")?;
    let mut options = sea_orm::ConnectOptions::new(url);
    options.max_connections(16);
    let db = sea_orm::Database::connect(options).await?;
    db.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS orders (id BIGSERIAL PRIMARY KEY, customer_id BIGINT NOT NULL, total_cents BIGINT NOT NULL);
         CREATE TABLE IF NOT EXISTS customer_stats (customer_id BIGINT PRIMARY KEY, orders BIGINT NOT NULL, total_cents BIGINT NOT NULL);",
    )
    .await?;

    let warehouse = Warehouse {
        name: "warehouse-east".into(),
        shipped: Arc::default(),
    };
    let running = outbox::start(db.clone(), Profile::Default)
        .state(warehouse.clone())
        .await?;
    println!("running; press Ctrl-C to stop");

    let producer = {
        let db = db.clone();
        tokio::spawn(async move {
            let mut placed = 0_u64;
            let mut ticker = tokio::time::interval(Duration::from_millis(200));
            for n in 1_i64.. {
                ticker.tick().await;
                let commit = n % 5 != 0;
                match place_order(&db, n % 7, 100 * n, commit).await {
                    Ok(Some(_)) => placed += 1,
                    Ok(None) => println!("order rolled back: its message never existed"),
                    Err(e) => println!("placing an order failed: {e}"),
                }
                if placed > 0 && placed.is_multiple_of(25) {
                    println!("{placed} orders placed so far");
                }
            }
        })
    };

    tokio::signal::ctrl_c().await?;
    println!("Ctrl-C: stopping the producer, then the outbox (grace 10 s)");
    producer.abort();
    let _ = producer.await;
    running.shutdown(Duration::from_secs(10)).await?;

    let depth = running.outbox().depth(OrderPlaced::NAME).await?;
    println!("left to handle after shutdown: {depth:?}");
    let stats = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT COALESCE(SUM(orders), 0)::BIGINT FROM customer_stats",
        ))
        .await?;
    let counted: i64 = stats.map_or(Ok(0), |r| r.try_get_by_index(0))?;
    println!("orders counted by update_customer_stats so far (all runs): {counted}");
    println!(
        "orders shipped by ship_order in this run: {}",
        warehouse.shipped.load(Ordering::Relaxed)
    );
    Ok(())
}
