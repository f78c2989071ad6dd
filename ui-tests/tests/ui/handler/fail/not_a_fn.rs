#[outbox::handler(leased)]
struct NotAFn;

fn main() {
    let _ = NotAFn;
}
