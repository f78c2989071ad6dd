#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Ping {
    #[outbox(routing)]
    a: i64,
}

fn main() {}
