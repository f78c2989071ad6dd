#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = "8", name = ping, max_attempts = -1, batch_size = 0, concurrency = 1000)]
struct Ping;

fn main() {}
