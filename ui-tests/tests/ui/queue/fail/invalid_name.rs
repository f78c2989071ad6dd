#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2, name = "1 bad name")]
struct Ping;

fn main() {}
