#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Ping;

#[outbox::handler(leased, retries = 3, partitions = 2)]
async fn h(_msg: Ping) -> Result<(), outbox::HandlerError> {
    Ok(())
}

fn main() {}
