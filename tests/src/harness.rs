//! The fixture most engine tests are built on: start a runtime, enqueue, wait, finish.
//!
//! A test starts a [`Harness`] with its queues and handlers, enqueues through it, waits for
//! what it expects, makes its own assertions, and ends with [`Harness::finish`]: shutdown within
//! [`GRACE`], then [`assert_invariants`](crate::assert_invariants) on the stored state. A test
//! that asserts on what the stopped runtime left (dead letters, every attempt seen) ends with
//! [`Harness::stop`], its assertions, then [`Harness::assert_invariants`]. Every helper panics
//! with what it was doing, so a failure names its step.
//!
//! The harness waits [`WAIT`] and gives [`GRACE`] unless the test says otherwise
//! ([`Harness::with_wait`], [`Harness::with_grace`]).

use std::future::Future;
use std::time::Duration;

use outbox::sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};
use outbox::{
    Builder, DeadLetterFilter, Enqueued, NewMessage, Outbox, Profile, QueueDepth, Running,
};

/// How long a harness waits for a condition before it fails the test, unless
/// [`Harness::with_wait`] says otherwise.
pub const WAIT: Duration = Duration::from_secs(30);

/// The grace period [`Harness::finish`] and [`Harness::stop`] give in-flight handlers, unless
/// [`Harness::with_grace`] says otherwise.
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
    wait: Duration,
    grace: Duration,
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
        Harness {
            db,
            running,
            wait: WAIT,
            grace: GRACE,
        }
    }

    /// Waits up to `wait` (instead of [`WAIT`]) in [`wait_drained`](Harness::wait_drained),
    /// [`wait_depth`](Harness::wait_depth) and [`eventually`](Harness::eventually).
    pub fn with_wait(mut self, wait: Duration) -> Harness {
        self.wait = wait;
        self
    }

    /// Gives in-flight handlers `grace` (instead of [`GRACE`]) in [`stop`](Harness::stop) and
    /// [`finish`](Harness::finish).
    pub fn with_grace(mut self, grace: Duration) -> Harness {
        self.grace = grace;
        self
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
    /// panics after the harness's wait.
    pub async fn wait_drained(&self, queue: &str) {
        crate::wait_drained(self.outbox(), queue, self.wait).await;
    }

    /// Waits until the depth of `queue` satisfies `pred` (a failed read counts as not yet), or
    /// panics after the harness's wait naming `what`.
    pub async fn wait_depth(&self, queue: &str, what: &str, pred: impl Fn(&QueueDepth) -> bool) {
        let pred = &pred;
        self.eventually(what, move || async move {
            self.outbox()
                .depth(queue)
                .await
                .map(|d| pred(&d))
                .unwrap_or(false)
        })
        .await;
    }

    /// Waits until `filter` matches `n` dead letters (a failed count counts as not yet), or
    /// panics after the harness's wait naming `what`.
    pub async fn wait_dead_letters(&self, filter: &DeadLetterFilter, n: i64, what: &str) {
        self.eventually(what, || async {
            self.outbox()
                .count_dead_letters(filter)
                .await
                .is_ok_and(|c| c == n)
        })
        .await;
    }

    /// Waits until `cond` holds, or panics after the harness's wait naming `what`.
    pub async fn eventually<F, Fut>(&self, what: &str, cond: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        crate::eventually(self.wait, what, cond).await;
    }

    /// The depth of `queue` now.
    pub async fn depth(&self, queue: &str) -> QueueDepth {
        self.outbox().depth(queue).await.expect("depth")
    }

    /// Shuts the runtime down within the harness's grace (panics if in-flight work had to be
    /// cancelled) and leaves the stored state unchecked: for tests that assert on what it left
    /// first, or whose other runtimes still run. The outbox handle stays usable (status, dead
    /// letters).
    pub async fn stop(&self) {
        self.running.shutdown(self.grace).await.expect("shutdown");
    }

    /// Checks the global invariants of the stored state now
    /// ([`assert_invariants`](crate::assert_invariants), tables of the default prefix): after
    /// [`stop`](Harness::stop) of this and every other runtime on the database, since a running
    /// one may hold a lease.
    pub async fn assert_invariants(&self) {
        crate::assert_invariants(&self.db, outbox::DEFAULT_TABLE_PREFIX).await;
    }

    /// Shuts the runtime down within the harness's grace (panics if in-flight work had to be
    /// cancelled), then checks the global invariants of the stored state
    /// ([`assert_invariants`](Harness::assert_invariants)).
    pub async fn finish(self) {
        self.stop().await;
        self.assert_invariants().await;
    }
}
