//! A state type must be `Clone + Send + Sync + 'static`: each call receives a clone.

#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Ping;

struct Mailer;

#[outbox::handler(leased)]
async fn h(_msg: Ping, _mailer: outbox::State<Mailer>) -> Result<(), outbox::HandlerError> {
    Ok(())
}

fn main() {}
