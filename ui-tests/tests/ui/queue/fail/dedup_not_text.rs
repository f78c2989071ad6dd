#[derive(serde::Serialize, serde::Deserialize)]
struct RequestId {
    bytes: [u8; 16],
}

#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Signup {
    #[outbox(dedup)]
    request: RequestId,
}

fn main() {}
