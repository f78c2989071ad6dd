#[derive(serde::Serialize, serde::Deserialize)]
struct NotAQueue;

#[outbox::handler(leased)]
async fn h(_msg: NotAQueue) -> Result<(), outbox::HandlerError> {
    Ok(())
}

fn main() {}
