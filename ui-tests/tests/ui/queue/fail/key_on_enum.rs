#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
enum Ping {
    A {
        #[outbox(key)]
        id: i64,
    },
}

fn main() {}
