#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Ping;

#[outbox::handler(leased)]
async fn h() -> Result<(), outbox::HandlerError> {
    Ok(())
}

fn main() {}
