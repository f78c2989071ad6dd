#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(name = "ping")]
struct Ping;

fn main() {}
