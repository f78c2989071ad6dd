//! A state type must be `Clone + Send + Sync + 'static`: handlers run on several threads.

#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Ping;

#[derive(Clone)]
struct Counter(std::rc::Rc<u32>);

#[outbox::handler(leased)]
async fn h(_msg: Ping, _counter: outbox::State<Counter>) -> Result<(), outbox::HandlerError> {
    Ok(())
}

fn main() {}
