//! Application state is taken as `State<T>`, not as a bare reference or value.

#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Ping;

#[derive(Clone)]
struct Mailer;

#[outbox::handler(leased)]
async fn h(
    _msg: Ping,
    _ctx: &outbox::LeaseContext,
    _mailer: &Mailer,
) -> Result<(), outbox::HandlerError> {
    Ok(())
}

fn main() {}
