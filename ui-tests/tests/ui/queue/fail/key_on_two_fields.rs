#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Ping {
    #[outbox(key)]
    a: i64,
    #[outbox(key)]
    b: i64,
}

fn main() {}
