#[derive(serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Ping {
    id: i64,
}

fn main() {}
