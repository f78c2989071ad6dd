#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2, crate = "not a path")]
struct Ping;

fn main() {}
