#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Signup {
    #[outbox(header = "tenant id")]
    tenant: String,
    #[outbox(header = "")]
    region: String,
    #[outbox(header = 7)]
    plan: String,
}

fn main() {}
