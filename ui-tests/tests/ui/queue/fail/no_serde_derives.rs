//! A queue type needs serde's derives: its payload is stored as JSON.

#[outbox::queue(partitions = 2)]
struct Ping {
    id: i64,
}

fn main() {}
