//! Server backends without a URL, and libfaketime when it is absent, show their tests as
//! `ignored`, with the reason, instead of passing without running (see `build_support.rs`).

#[path = "build_support.rs"]
mod support;

fn main() {
    support::mark_unreachable_backends();
    support::find_faketime();
}
