//! Server backends without a URL, and a missing chromium or chromedriver, show the browser
//! tests as `ignored`, with the reason, instead of passing without running (see
//! `tests/build_support.rs`).

#[path = "../tests/build_support.rs"]
#[allow(dead_code)]
mod support;

fn main() {
    support::mark_unreachable_backends();
    support::find_browser();
}
