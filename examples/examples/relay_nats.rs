//! Relay to NATS JetStream: a typed queue whose committed messages a relay publishes into a
//! JetStream stream, in order per customer, and a consumer that applies them exactly once
//! through an inbox in its own database.
//!
//! ```text
//! cargo run -p outbox-examples --example relay_nats
//! ```
//!
//! It needs a NATS server with JetStream at `NATS_URL` (default `nats://127.0.0.1:4222`;
//! `nats-server -js` starts one). It creates the stream `OUTBOX_EXAMPLE_<random>` at start,
//! places five orders (each order row and its message commit together), receives them from
//! the stream with a pull consumer, applies each through the inbox (a redelivery would be a
//! no-op), prints what arrived, deletes the stream and exits 0.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use outbox::inbox::Inbox;
use outbox::relay::RelaySpec;
use outbox::relay::nats::{JetStream, async_nats};
use outbox::sea_orm::{self, ConnectionTrait, DbBackend, Statement, TransactionTrait};
use outbox::{Profile, Queue};
use serde::{Deserialize, Serialize};

/// Messages of one customer share a partition, and so keep their order on the way out.
#[derive(Debug, Serialize, Deserialize)]
#[outbox::queue(partitions = 4)]
struct OrderPlaced {
    #[outbox(key)]
    customer_id: i64,
    order_id: i64,
}

async fn sqlite(
    dir: &std::path::Path,
    name: &str,
) -> Result<sea_orm::DatabaseConnection, sea_orm::DbErr> {
    let mut o =
        outbox::sqlite::connect_options(format!("sqlite://{}?mode=rwc", dir.join(name).display()));
    o.max_connections(4);
    sea_orm::Database::connect(o).await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let dir = tempfile::tempdir()?;
    let db = sqlite(dir.path(), "shop.db").await?;
    db.execute_unprepared(
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL)",
    )
    .await?;

    let stream = format!("OUTBOX_EXAMPLE_{:08x}", rand_suffix());
    let subjects = format!("{}.>", stream.to_lowercase());
    let client = async_nats::connect(&nats_url).await?;
    // The relay: one line next to the typed queue, started with it. `{key}` is the customer.
    let relay = RelaySpec::of::<OrderPlaced>(
        JetStream::new(client.clone()).create_stream(&stream, [subjects.clone()]),
        format!("{}.{{key}}", stream.to_lowercase()),
    )
    .key(|m| {
        outbox::decode::<OrderPlaced>(m)
            .ok()
            .map(|o| o.customer_id.to_string())
    });
    let running = outbox::discover(db.clone())
        .profile(Profile::LowLatency)
        .relay(relay)
        .start()
        .await?;

    let orders = [(1, 7), (2, 42), (3, 7), (4, 42), (5, 7)];
    let txn = db.begin().await?;
    for (order_id, customer_id) in orders {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Sqlite,
            "INSERT INTO orders (id, customer_id) VALUES (?, ?)",
            [order_id.into(), customer_id.into()],
        ))
        .await?;
        OrderPlaced {
            customer_id,
            order_id,
        }
        .enqueue(&txn)
        .await?;
    }
    txn.commit().await?;

    // The receiving service: its own database, an inbox, and a pull consumer on the stream.
    let receiver = sqlite(dir.path(), "receiver.db").await?;
    receiver
        .execute_unprepared("CREATE TABLE shipments (order_id INTEGER PRIMARY KEY)")
        .await?;
    let inbox = Inbox::new("shipping_")?;
    inbox.create_table(&receiver).await?;
    let js = async_nats::jetstream::new(client);
    let consumer = js
        .get_stream(&stream)
        .await?
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("shipping".into()),
            ..Default::default()
        })
        .await?;
    let mut applied = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while applied < orders.len() {
        if Instant::now() > deadline {
            return Err("the relayed messages did not arrive within 20 s".into());
        }
        let mut batch = consumer
            .batch()
            .max_messages(10)
            .expires(Duration::from_millis(500))
            .messages()
            .await?;
        while let Some(msg) = batch.next().await {
            let msg = msg?;
            let id = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Outbox-Id"))
                .map(|v| v.as_str().to_owned())
                .ok_or("a relayed message without Outbox-Id")?;
            let order: OrderPlaced = serde_json::from_slice(&msg.payload)?;
            let txn = receiver.begin().await?;
            if inbox.receive(&txn, &id).await? {
                txn.execute_raw(Statement::from_sql_and_values(
                    DbBackend::Sqlite,
                    "INSERT INTO shipments (order_id) VALUES (?)",
                    [order.order_id.into()],
                ))
                .await?;
                applied += 1;
                println!(
                    "received {} on {}: order {} of customer {}",
                    id, msg.subject, order.order_id, order.customer_id
                );
            }
            txn.commit().await?;
            msg.ack().await?;
        }
    }

    running.shutdown(Duration::from_secs(5)).await?;
    js.delete_stream(&stream).await?;
    println!("done: {applied} orders relayed and applied once");
    Ok(())
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ std::process::id())
        .unwrap_or(0)
}
