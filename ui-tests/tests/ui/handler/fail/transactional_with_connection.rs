//! A transactional handler writes through the transaction that acks the message, not through
//! the application's connection.

use outbox::sea_orm::DatabaseConnection;

#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Ping;

#[outbox::handler(transactional)]
async fn h(_msg: Ping, _db: &DatabaseConnection) -> Result<(), outbox::HandlerError> {
    Ok(())
}

fn main() {}
