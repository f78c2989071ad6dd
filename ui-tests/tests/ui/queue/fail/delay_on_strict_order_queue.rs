#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2, strict_order, delay_ms = 60_000)]
struct LedgerEntry {
    #[outbox(key)]
    account: i64,
    cents: i64,
}

fn main() {}
