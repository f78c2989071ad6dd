#[outbox::queue(partitions = 2)]
fn ping() {}

fn main() {
    ping();
}
