#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Ping;

struct S;

impl S {
    #[outbox::handler(leased)]
    async fn h(&self, _msg: Ping) -> Result<(), outbox::HandlerError> {
        Ok(())
    }
}

fn main() {}
