#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
struct Signup(#[outbox(header)] String, #[outbox(header = "plan")] String);

#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
enum Event {
    Started {
        #[outbox(header)]
        id: String,
    },
}

fn main() {}
