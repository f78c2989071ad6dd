//! The fixture most engine tests are built on: start a runtime, enqueue, wait, finish.
//!
//! A test starts a [`Harness`] with its queues and handlers, enqueues through it, waits for
//! what it expects, makes its own assertions, and ends with [`Harness::finish`]: shutdown within
//! [`GRACE`], then [`assert_invariants`](crate::assert_invariants) on the stored state. Every
//! helper panics with what it was doing, so a failure names its step.

use std::time::Duration;

use outbox::sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};
use outbox::{Builder, Enqueued, NewMessage, Outbox, Profile, QueueDepth, Running};

/// How long a harness waits for a condition before it fails the test.
pub const WAIT: Duration = Duration::from_secs(30);

/// The grace period [`Harness::finish`] and [`Harness::stop`] give in-flight handlers.
pub const GRACE: Duration = Duration::from_secs(5);

/// A started runtime on one test database.
///
/// Outbox methods are called through [`outbox`](Harness::outbox), the runtime's own (shutdown,
/// `wait_idle`) through [`running`](Harness::running).
#[derive(Debug)]
#[must_use = "end the test with `finish` (shutdown and invariants) or `stop`"]
pub struct Harness {
    db: DatabaseConnection,
    running: Running,
}

impl Harness {
    /// Starts a runtime on `db` with [`Profile::LowLatency`] and what `configure` adds to the
    /// builder (queues, handlers, tuning); panics if it does not start.
    pub async fn start(
        db: DatabaseConnection,
        configure: impl FnOnce(Builder) -> Builder,
    ) -> Harness {
        let builder = configure(Outbox::builder(db.clone()).profile(Profile::LowLatency));
        Harness::start_builder(db, builder).await
    }

    /// Starts the runtime `builder` describes, as it is (no profile added); `db` is the pool
    /// the harness enqueues on and checks the invariants with.
    pub async fn start_builder(db: DatabaseConnection, builder: Builder) -> Harness {
        let running = builder.start().await.expect("start");
        Harness { db, running }
    }

    /// The pool the harness enqueues on.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The outbox handle of the runtime.
    pub fn outbox(&self) -> &Outbox {
        self.running.outbox()
    }

    /// The runtime itself.
    pub fn running(&self) -> &Running {
        &self.running
    }

    /// Enqueues one message on the pool, outside any transaction; returns what the enqueue did
    /// (stored, scheduled, duplicate).
    pub async fn enqueue(&self, message: NewMessage) -> Enqueued {
        self.enqueue_in(&self.db, message).await
    }

    /// Enqueues one message through `conn`: the caller's transaction, savepoint or pool.
    pub async fn enqueue_in<C: ConnectionTrait>(&self, conn: &C, message: NewMessage) -> Enqueued {
        let queue = message.queue().to_owned();
        self.outbox()
            .enqueue(conn, message)
            .await
            .unwrap_or_else(|e| panic!("enqueue to `{queue}`: {e:?}"))
    }

    /// Enqueues `messages` on the pool in one statement, outside any transaction.
    pub async fn enqueue_batch(&self, messages: &[NewMessage]) -> Vec<Enqueued> {
        self.enqueue_batch_in(&self.db, messages).await
    }

    /// Enqueues `messages` through `conn` in one statement.
    pub async fn enqueue_batch_in<C: ConnectionTrait>(
        &self,
        conn: &C,
        messages: &[NewMessage],
    ) -> Vec<Enqueued> {
        self.outbox()
            .enqueue_batch(conn, messages)
            .await
            .unwrap_or_else(|e| panic!("enqueue of {} messages: {e:?}", messages.len()))
    }

    /// Enqueues `messages` in one transaction of their own and commits it.
    pub async fn enqueue_committed(&self, messages: &[NewMessage]) -> Vec<Enqueued> {
        let txn = self.db.begin().await.expect("begin");
        let done = self.enqueue_batch_in(&txn, messages).await;
        txn.commit().await.expect("commit");
        done
    }

    /// Waits until `queue` has nothing unsequenced and no handler has anything pending, or
    /// panics after [`WAIT`].
    pub async fn wait_drained(&self, queue: &str) {
        crate::wait_drained(self.outbox(), queue, WAIT).await;
    }

    /// Waits until the depth of `queue` satisfies `pred` (a failed read counts as not yet), or
    /// panics after [`WAIT`] naming `what`.
    pub async fn wait_depth(&self, queue: &str, what: &str, pred: impl Fn(&QueueDepth) -> bool) {
        let pred = &pred;
        crate::eventually(WAIT, what, move || async move {
            self.outbox()
                .depth(queue)
                .await
                .map(|d| pred(&d))
                .unwrap_or(false)
        })
        .await;
    }

    /// The depth of `queue` now.
    pub async fn depth(&self, queue: &str) -> QueueDepth {
        self.outbox().depth(queue).await.expect("depth")
    }

    /// Shuts the runtime down within [`GRACE`] (panics if in-flight work had to be cancelled)
    /// and leaves the stored state unchecked: for tests whose state is checked elsewhere, or
    /// whose other runtimes still run. The outbox handle stays usable (status, dead letters).
    pub async fn stop(&self) {
        self.running.shutdown(GRACE).await.expect("shutdown");
    }

    /// Shuts the runtime down within [`GRACE`] (panics if in-flight work had to be cancelled),
    /// then checks the global invariants of the stored state
    /// ([`assert_invariants`](crate::assert_invariants), tables of the default prefix).
    pub async fn finish(self) {
        self.running.shutdown(GRACE).await.expect("shutdown");
        crate::assert_invariants(&self.db, outbox::DEFAULT_TABLE_PREFIX).await;
    }
}
