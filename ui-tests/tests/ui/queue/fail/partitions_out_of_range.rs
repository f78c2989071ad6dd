#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 5000)]
struct Ping;

fn main() {}
