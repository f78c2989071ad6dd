//! The engine's guarantees (the README's "Guarantees" table), each proven on SQLite, PostgreSQL and MariaDB.
//!
//! One test binary, one module per guarantee (numbered as in the README's table).

mod atomic_enqueue;
mod bad_input;
mod cursors;
mod depth;
mod exactly_once;
mod failures;
mod leases;
mod ordering;
mod shutdown;

use std::time::Duration;

use outbox::HandlerSpec;
use outbox_tests::Seen;

const WAIT: Duration = Duration::from_secs(30);

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
