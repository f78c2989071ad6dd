#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2, delay_ms = 0)]
struct Reminder {
    id: i64,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2, delay_ms = "15m", strict_order = true)]
struct Digest {
    id: i64,
}

fn main() {}
