#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Signup {
    #[outbox(dedup)]
    email: String,
    #[outbox(dedup)]
    request_id: String,
}

fn main() {}
