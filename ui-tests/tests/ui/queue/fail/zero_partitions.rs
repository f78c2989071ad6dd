#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 0)]
struct Ping;

fn main() {}
