#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Signup {
    #[outbox(header = "tenant")]
    tenant_id: String,
    #[outbox(header = "tenant")]
    tenant_name: String,
}

fn main() {}
