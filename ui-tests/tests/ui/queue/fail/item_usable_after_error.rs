//! An argument error is reported once; the type is still declared and still a queue, so its
//! uses add no secondary errors.
use outbox::Queue;

#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 0)]
struct Ping {
    #[outbox(key)]
    id: i64,
}

fn main() {
    let p = Ping { id: 1 };
    let _ = (p.id, p.partition(), Ping::NAME);
}
