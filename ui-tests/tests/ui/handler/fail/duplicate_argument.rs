#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Ping;

#[outbox::handler(leased, leased, max_attempts = 2, max_attempts = 3)]
async fn h(_msg: Ping) -> Result<(), outbox::HandlerError> {
    Ok(())
}

fn main() {}
