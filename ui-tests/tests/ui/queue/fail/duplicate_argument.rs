#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 4, partitions = 8, name = "a", name = "b")]
struct Ping;

fn main() {}
