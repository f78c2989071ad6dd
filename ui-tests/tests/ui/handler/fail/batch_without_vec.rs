use outbox::sea_orm::DatabaseTransaction;

#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Ping;

#[outbox::handler(transactional, batch)]
async fn pong(msg: Ping, txn: &DatabaseTransaction) -> Result<(), outbox::HandlerError> {
    let _ = (msg, txn);
    Ok(())
}

fn main() {}
