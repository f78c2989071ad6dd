#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Ping;

#[outbox::handler(leased)]
async fn h<T: outbox::Queue>(_msg: T) -> Result<(), outbox::HandlerError> {
    Ok(())
}

fn main() {}
