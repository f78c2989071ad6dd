#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Ping;

#[outbox::handler(transactionl)]
async fn h(_msg: Ping, _txn: &outbox::sea_orm::DatabaseTransaction) -> Result<(), outbox::HandlerError> {
    Ok(())
}

fn main() {}
