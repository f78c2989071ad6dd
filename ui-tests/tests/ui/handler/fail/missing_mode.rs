#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Ping;

#[outbox::handler(name = "h")]
async fn h(_msg: Ping) -> Result<(), outbox::HandlerError> {
    Ok(())
}

fn main() {}
