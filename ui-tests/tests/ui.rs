//! Compile-time behaviour of `#[outbox::queue]` and `#[outbox::handler]`: accepted forms run,
//! misuses fail with the messages in the `.stderr` snapshots.
//!
//! Snapshots are pinned to the stable compiler that CI runs; re-bless them with
//! `TRYBUILD=overwrite cargo test -p outbox-ui-tests --test ui` in the commit that bumps it.

#[rustversion::stable(1.95)]
#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/queue/pass/*.rs");
    t.pass("tests/ui/handler/pass/*.rs");
    t.compile_fail("tests/ui/queue/fail/*.rs");
    t.compile_fail("tests/ui/handler/fail/*.rs");
}
