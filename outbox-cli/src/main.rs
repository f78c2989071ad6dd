//! The `outbox` command-line tool (in progress).

fn main() {}
