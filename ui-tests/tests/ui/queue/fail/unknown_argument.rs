#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 4, partition = 3, retries = 5)]
struct Ping;

fn main() {}
