//! The engine's guarantees (the README's "Guarantees" table), each proven on SQLite, PostgreSQL and MariaDB.
//!
//! One test binary, one module per guarantee (numbered as in the README's table). Most tests
//! start their runtime through [`outbox_tests::Harness`] and end with its `finish`: shutdown,
//! then the global invariants of the stored state.

mod atomic_enqueue;
mod bad_input;
mod cursors;
mod depth;
mod exactly_once;
mod failures;
mod leases;
mod ordering;
mod shutdown;

use outbox::HandlerSpec;
use outbox_tests::Seen;
use outbox_tests::harness::WAIT;

fn recorder(queue: &'static str, name: &'static str, seen: &Seen) -> HandlerSpec {
    let seen = seen.clone();
    HandlerSpec::transactional(queue, name, move |m, _txn| {
        seen.push(name, m);
        Box::pin(async { Ok(()) })
    })
}

fn leased_recorder(queue: &'static str, name: &'static str, seen: &Seen) -> HandlerSpec {
    let seen = seen.clone();
    HandlerSpec::leased(queue, name, move |m, _ctx| {
        seen.push(name, m);
        Box::pin(async { Ok(()) })
    })
}

fn bodies(d: &[outbox_tests::Delivery]) -> Vec<String> {
    d.iter().map(|d| d.body.clone()).collect()
}
