#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2, poison = "drop")]
struct Ping;

fn main() {}
