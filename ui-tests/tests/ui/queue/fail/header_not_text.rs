#[derive(serde::Serialize, serde::Deserialize)]
struct Tenant {
    id: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Signup {
    #[outbox(header)]
    tenant: Tenant,
}

fn main() {}
