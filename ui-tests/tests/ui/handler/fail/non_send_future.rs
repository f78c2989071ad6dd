#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Ping;

#[outbox::handler(leased)]
async fn h(_msg: Ping) -> Result<(), outbox::HandlerError> {
    let not_send = std::rc::Rc::new(1);
    tokio::task::yield_now().await;
    let _ = not_send;
    Ok(())
}

fn main() {}
