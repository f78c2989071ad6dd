//! A testing kit: run handlers until idle on a temporary SQLite database, capture what the code
//! under test enqueued, and inject faults to test that handlers are idempotent.
//!
//! Enabled by the `testing` feature (add it to your `[dev-dependencies]` entry:
//! `outbox = { version = "…", features = ["testing"] }`); it adds no runtime cost and no
//! dependency to production builds.
//!
//! The kit's database is a SQLite file in a temporary directory, deleted with the kit (an
//! in-memory SQLite database is private to one connection, and a pool has several). It runs the
//! real runtime, so what passes here passes in production on SQLite; run the conformance of
//! your SQL against your production backend separately.
//!
//! ```rust,standalone_crate
//! use outbox::testing::{Fault, TestKit};
//! use outbox::sea_orm::DatabaseTransaction;
//! use outbox::{HandlerError, Queue};
//!
//! #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
//! #[outbox::queue(partitions = 4)]
//! struct OrderPlaced {
//!     #[outbox(key)]
//!     customer_id: i64,
//! }
//!
//! #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
//! #[outbox::queue(partitions = 1)]
//! struct ReceiptRequested {
//!     customer_id: i64,
//! }
//!
//! /// The code under test: turns each order into a receipt request, in the ack's transaction.
//! #[outbox::handler(transactional)]
//! async fn request_receipt(msg: OrderPlaced, txn: &DatabaseTransaction) -> Result<(), HandlerError> {
//!     ReceiptRequested { customer_id: msg.customer_id }.enqueue(txn).await?;
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kit = TestKit::new().await?; // every queue and handler declared in this binary
//! OrderPlaced { customer_id: 7 }.enqueue(kit.db()).await?;
//! assert_eq!(kit.enqueued::<OrderPlaced>().await?, [OrderPlaced { customer_id: 7 }]);
//!
//! // The first attempt crashes after the handler ran but before its ack: the transaction
//! // rolls back, the message is redelivered, and exactly one receipt request remains.
//! kit.inject("request_receipt", Fault::CrashBeforeAck);
//! kit.run_queues_until_idle(["order_placed"]).await?;
//! assert_eq!(kit.enqueued::<ReceiptRequested>().await?, [ReceiptRequested { customer_id: 7 }]);
//! assert_eq!(kit.pending_faults(), 0);
//! # Ok(()) }
//! ```
//!
//! # Faults
//!
//! [`TestKit::inject`] queues a [`Fault`] for the next delivery to a handler:
//!
//! | Fault | Transactional handler | Leased handler |
//! |---|---|---|
//! | [`Fault::Fail`] | the attempt fails before the handler runs | same |
//! | [`Fault::CrashBeforeAck`] | the handler runs, then its transaction rolls back (its writes vanish) and the message is redelivered | the handler runs (its side effects stay), the ack never lands and the message is redelivered with the attempt raised |
//! | [`Fault::LeaseExpires`] | like `CrashBeforeAck` | the lease expires while the handler runs: the handler finishes, its ack is rejected (fencing) and the message is redelivered with the attempt raised |
//!
//! A handler that is idempotent ends in the same state with or without these faults.
//!
//! # Retries are fast
//!
//! The kit runs every handler with a backoff of a few milliseconds and a short poll interval,
//! keeping its other knobs (`max_attempts` included), so a test that exercises retries and dead
//! letters takes milliseconds.
//!
//! # The process-wide outbox
//!
//! Typed [`Queue::enqueue`] uses the current outbox ([`global`](crate::global)): the one of
//! the enclosing [scope](Outbox::scope), else the process-wide one. The handlers the kit runs
//! are scoped to the kit's outbox, on any runtime flavor, so tests of one binary can each use a
//! kit in parallel. The kit also installs its outbox process-wide (see
//! [`TestKitBuilder::install_global`]) for the test's own code; with several kits in parallel,
//! wrap that code in [`kit.outbox().scope(…)`](Outbox::scope) or enqueue with
//! [`Queue::enqueue_with`]`(kit.outbox(), …)`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sea_orm::{ConnectOptions, Database, DatabaseConnection};

use crate::error::{Error, HandlerError, StartError};
use crate::handler::{self, HandlerSpec, Scope};
use crate::profile::{Profile, RuntimeTuning};
use crate::queue::QueueSpec;
use crate::runtime::{Builder, Outbox};
use crate::status::Status;
use crate::typed::{Queue, set_global};

/// Makes `outbox` the process-wide outbox.
fn install(outbox: &Outbox) {
    set_global(outbox.clone());
}

/// A fault to inject into one delivery (see the [module docs](self#faults)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// The attempt fails before the handler runs.
    Fail,
    /// The handler runs, then the worker "crashes" before the ack: the message is redelivered.
    CrashBeforeAck,
    /// The lease expires while the handler runs (leased handlers): its ack is rejected.
    LeaseExpires,
}

/// Errors of the testing kit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestError {
    /// The runtime did not start (registry problems, database).
    #[error("the outbox did not start")]
    Start(#[source] StartError),
    /// A status read, capture or shutdown failed.
    #[error("outbox operation failed")]
    Outbox(#[source] Error),
    /// The kit's temporary database could not be created.
    #[error("could not create the temporary database")]
    Io(#[source] std::io::Error),
    /// The handlers did not become idle in time; `waiting` lists what still waits.
    #[error("handlers not idle after {waited:?}; still waiting: {}", .waiting.join(", "))]
    NotIdle {
        /// How long the kit waited.
        waited: Duration,
        /// `queue/handler/partition: n` for every partition with messages left.
        waiting: Vec<String>,
    },
    /// A captured payload does not decode as the requested type.
    #[error("a captured message of queue `{queue}` does not decode")]
    Decode {
        /// Queue name.
        queue: String,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
}

impl From<StartError> for TestError {
    fn from(e: StartError) -> Self {
        TestError::Start(e)
    }
}

impl From<Error> for TestError {
    fn from(e: Error) -> Self {
        TestError::Outbox(e)
    }
}

/// Configures a [`TestKit`].
#[must_use]
#[derive(Debug)]
pub struct TestKitBuilder {
    discover: bool,
    install_global: bool,
    timeout: Duration,
    queues: Vec<QueueSpec>,
    handlers: Vec<HandlerSpec>,
    states: crate::state::States,
}

impl TestKitBuilder {
    /// Gives handlers that take `State<T>` this value (see [`State`](crate::State)).
    /// [`build`](TestKitBuilder::build) fails with [`StartError::MissingState`] listing every
    /// state a handler takes that was not given.
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.states.insert(value);
        self
    }

    /// Whether to take every queue and handler declared with `#[outbox::queue]` and
    /// `#[outbox::handler]` in this binary (default true).
    pub fn discover(mut self, discover: bool) -> Self {
        self.discover = discover;
        self
    }

    /// Adds an untyped queue.
    pub fn queue(mut self, queue: QueueSpec) -> Self {
        self.queues.push(queue);
        self
    }

    /// Adds an untyped handler.
    pub fn handler(mut self, handler: HandlerSpec) -> Self {
        self.handlers.push(handler);
        self
    }

    /// Whether the kit's outbox becomes the process-wide one for typed enqueue (default true).
    pub fn install_global(mut self, install: bool) -> Self {
        self.install_global = install;
        self
    }

    /// How long [`TestKit::run_until_idle`] waits before failing (default 30 s).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Creates the temporary database, its tables, queues and handler cursors.
    pub async fn build(self) -> Result<TestKit, TestError> {
        let dir = tempfile::tempdir().map_err(TestError::Io)?;
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("outbox.db").display()
        );
        let mut options = ConnectOptions::new(url);
        options.max_connections(4).sqlx_logging(false);
        let db = Database::connect(options)
            .await
            .map_err(|e| TestError::Start(StartError::Database(e)))?;
        let mut queues = Vec::new();
        let mut handlers = Vec::new();
        if self.discover {
            queues.extend(crate::typed::queues().iter().map(|q| q.spec()));
            handlers.extend(crate::typed::handlers().iter().map(|h| h.spec()));
        }
        queues.extend(self.queues);
        handlers.extend(self.handlers);
        let states = Arc::new(self.states);
        let missing: Vec<_> = handlers
            .iter_mut()
            .flat_map(|h| h.bind_state(&states))
            .collect();
        if !missing.is_empty() {
            return Err(TestError::Start(StartError::MissingState(missing)));
        }
        let outbox = with_all(
            Outbox::builder(db.clone()),
            &queues,
            handlers.iter().cloned(),
        )
        .connect()
        .await?;
        if self.install_global {
            install(&outbox);
        }
        Ok(TestKit {
            db,
            outbox,
            queues,
            handlers,
            install_global: self.install_global,
            timeout: self.timeout,
            faults: Arc::new(Faults::default()),
            captured: Mutex::new(BTreeMap::new()),
            _dir: dir,
        })
    }
}

fn with_all(
    mut b: Builder,
    queues: &[QueueSpec],
    handlers: impl IntoIterator<Item = HandlerSpec>,
) -> Builder {
    for q in queues {
        b = b.queue(q.clone());
    }
    for h in handlers {
        b = b.handler(h);
    }
    b
}

#[derive(Default)]
struct Faults {
    queued: Mutex<HashMap<String, VecDeque<Fault>>>,
    /// The outbox of the runtime in flight, to expire leases through.
    running: Mutex<Option<Outbox>>,
}

impl Faults {
    fn next(&self, handler: &str) -> Option<Fault> {
        self.queued
            .lock()
            .ok()
            .and_then(|mut q| q.get_mut(handler).and_then(VecDeque::pop_front))
    }

    async fn expire_lease(&self, queue: &str, handler: &str) {
        let outbox = self.running.lock().ok().and_then(|o| o.clone());
        if let Some(outbox) = outbox {
            let store = outbox.store();
            let _gate = store.write_guard().await;
            if let Err(e) = store.expire_leases(&store.db, queue, handler).await {
                tracing::warn!(error = %e, "testing kit: could not expire the lease");
            }
        }
    }
}

#[derive(Debug)]
struct InjectedFault(&'static str);

impl fmt::Display for InjectedFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "injected fault: {}", self.0)
    }
}

impl std::error::Error for InjectedFault {}

fn injected(what: &'static str) -> HandlerError {
    HandlerError::retry(InjectedFault(what))
}

/// The handler with fault injection and fast retries: one wrapper around the erased call,
/// whatever the handler's mode.
fn wrap(spec: &HandlerSpec, faults: &Arc<Faults>) -> HandlerSpec {
    let (queue, name) = (spec.queue.to_string(), spec.name.to_string());
    let (inner, faults) = (spec.mode.call.clone(), faults.clone());
    let mut wrapped = spec.clone();
    wrapped.mode.call = handler::erase(move |messages, scope| {
        let fault = faults.next(&name);
        let (inner, faults, queue, name) =
            (inner.clone(), faults.clone(), queue.clone(), name.clone());
        Box::pin(async move {
            match (fault, scope) {
                (None, _) => inner(messages, scope).await,
                (Some(Fault::Fail), _) => Err(injected("attempt failed")),
                // The transaction rolls back, effects and all.
                (Some(Fault::CrashBeforeAck | Fault::LeaseExpires), Scope::Transaction(_)) => {
                    inner(messages, scope).await?;
                    Err(injected("crash before the ack"))
                }
                (Some(Fault::LeaseExpires), Scope::Lease(_)) => {
                    faults.expire_lease(&queue, &name).await;
                    inner(messages, scope).await
                }
                (Some(Fault::CrashBeforeAck), Scope::Lease(_)) => {
                    inner(messages, scope).await?;
                    // A crashed worker never acks; its lease runs out.
                    faults.expire_lease(&queue, &name).await;
                    Ok(())
                }
            }
        })
    });
    let mut o = spec.overrides;
    o.backoff_base = Some(Duration::from_millis(2));
    o.backoff_max = Some(Duration::from_millis(10));
    o.poll_interval = Some(Duration::from_millis(10));
    wrapped.overrides = o;
    wrapped
}

/// A temporary SQLite outbox for tests: see the [module docs](self).
pub struct TestKit {
    db: DatabaseConnection,
    outbox: Outbox,
    queues: Vec<QueueSpec>,
    handlers: Vec<HandlerSpec>,
    install_global: bool,
    timeout: Duration,
    faults: Arc<Faults>,
    captured: Mutex<BTreeMap<(String, u32, i64), Vec<u8>>>,
    _dir: tempfile::TempDir,
}

impl fmt::Debug for TestKit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestKit")
            .field("queues", &self.queues)
            .field("handlers", &self.handlers)
            .finish_non_exhaustive()
    }
}

impl TestKit {
    /// A kit with every queue and handler declared in this binary.
    pub async fn new() -> Result<TestKit, TestError> {
        Self::builder().build().await
    }

    /// Configures a kit.
    pub fn builder() -> TestKitBuilder {
        TestKitBuilder {
            discover: true,
            install_global: true,
            timeout: Duration::from_secs(30),
            queues: Vec::new(),
            handlers: Vec::new(),
            states: crate::state::States::default(),
        }
    }

    /// The kit's database: enqueue through it or through a transaction of it.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The kit's outbox (untyped enqueue, dead letters, status).
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Queues `fault` for the next delivery to the handler named `handler` (of any queue).
    /// Call it several times to fault several deliveries.
    ///
    /// A leased handler whose lease expires while it runs is redelivered with the attempt
    /// raised: its side effects happen twice, so they must be idempotent.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use outbox::testing::{Fault, TestKit};
    /// use outbox::{HandlerSpec, NewMessage, QueueSpec};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let sent = Arc::new(Mutex::new(Vec::new()));
    /// let log = sent.clone();
    /// let kit = TestKit::builder()
    ///     .discover(false)
    ///     .queue(QueueSpec::new("mail", 1))
    ///     .handler(HandlerSpec::leased("mail", "send", move |m, ctx| {
    ///         log.lock().unwrap().push((ctx.idempotency_key(), ctx.attempt()));
    ///         Box::pin(async { Ok(()) })
    ///     }))
    ///     .build()
    ///     .await?;
    /// kit.outbox().enqueue(kit.db(), NewMessage::new("mail", 0, "hi")).await?;
    /// kit.inject("send", Fault::LeaseExpires);
    /// kit.run_until_idle().await?;
    /// let sent = sent.lock().unwrap().clone();
    /// assert_eq!(sent.len(), 2);                 // delivered twice...
    /// assert_eq!(sent[0].0, sent[1].0);          // ...with one idempotency key
    /// assert_eq!((sent[0].1, sent[1].1), (1, 2)); // and the attempt raised
    /// # Ok(()) }
    /// ```
    pub fn inject(&self, handler: &str, fault: Fault) {
        if let Ok(mut q) = self.faults.queued.lock() {
            q.entry(handler.to_owned()).or_default().push_back(fault);
        }
    }

    /// Injected faults not consumed yet.
    pub fn pending_faults(&self) -> usize {
        self.faults
            .queued
            .lock()
            .map(|q| q.values().map(VecDeque::len).sum())
            .unwrap_or(0)
    }

    /// Advances time for scheduled messages by `by`: every message scheduled to become due
    /// within `by` from now is due at once, and the next [`run_until_idle`](TestKit::run_until_idle)
    /// delivers it (in due order, as it would have been). Nothing else is affected: retries and
    /// leases keep their own times.
    pub async fn advance(&self, by: Duration) -> Result<(), TestError> {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX / 2);
        self.outbox
            .store()
            .advance_scheduled(ms)
            .await
            .map_err(Error::from)?;
        Ok(())
    }

    /// Runs every handler until nothing is left for them (every partition drained, or blocked
    /// by a poisoned head), then stops the runtime. Returns the final status.
    pub async fn run_until_idle(&self) -> Result<Status, TestError> {
        self.run(None).await
    }

    /// Like [`run_until_idle`](TestKit::run_until_idle), running only the handlers of `queues`.
    pub async fn run_queues_until_idle<I, S>(&self, queues: I) -> Result<Status, TestError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.run(Some(queues.into_iter().map(Into::into).collect()))
            .await
    }

    async fn run(&self, only: Option<HashSet<String>>) -> Result<Status, TestError> {
        self.capture().await?;
        let selected: Vec<&HandlerSpec> = self
            .handlers
            .iter()
            .filter(|h| only.as_ref().is_none_or(|o| o.contains(&*h.queue)))
            .collect();
        let watched: HashSet<(String, String)> = selected
            .iter()
            .map(|h| (h.queue.to_string(), h.name.to_string()))
            .collect();
        let runtime = RuntimeTuning {
            vacuum_interval: Duration::from_secs(3600),
            vacuum_after_acks: 0,
            ..Profile::LowLatency.runtime()
        };
        let builder = with_all(
            Outbox::builder(self.db.clone())
                .profile(Profile::LowLatency)
                .runtime_tuning(runtime),
            &self.queues,
            selected.iter().map(|h| wrap(h, &self.faults)),
        );
        let running = builder.start().await?;
        if let Ok(mut r) = self.faults.running.lock() {
            *r = Some(running.outbox().clone());
        }
        if self.install_global {
            install(running.outbox());
        }
        let result = self.wait_idle(running.outbox(), &watched).await;
        let stopped = running.shutdown(Duration::from_secs(1)).await;
        if let Ok(mut r) = self.faults.running.lock() {
            *r = None;
        }
        if self.install_global {
            install(&self.outbox);
        }
        self.capture().await?;
        let status = result?;
        stopped?;
        Ok(status)
    }

    async fn wait_idle(
        &self,
        outbox: &Outbox,
        watched: &HashSet<(String, String)>,
    ) -> Result<Status, TestError> {
        let started = tokio::time::Instant::now();
        loop {
            let status = outbox.status().await?;
            let mut waiting = Vec::new();
            for q in &status.queues {
                // A scheduled message that is due is on its way into a partition.
                if q.next_due_at_ms.is_some_and(|d| d <= status.taken_at_ms)
                    && q.handlers
                        .iter()
                        .any(|h| watched.contains(&(q.name.clone(), h.name.clone())))
                {
                    waiting.push(format!("{}: scheduled messages due", q.name));
                }
                for h in &q.handlers {
                    if !watched.contains(&(q.name.clone(), h.name.clone())) {
                        continue;
                    }
                    for p in &h.partitions {
                        let n = p.pending + p.unsequenced;
                        if n > 0 && !p.blocked {
                            waiting.push(format!("{}/{}/{}: {n}", q.name, h.name, p.partition));
                        }
                    }
                }
            }
            if waiting.is_empty() {
                return Ok(status);
            }
            let waited = started.elapsed();
            if waited >= self.timeout {
                return Err(TestError::NotIdle { waited, waiting });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Copies sequenced messages into the capture, so that vacuum cannot lose them.
    async fn capture(&self) -> Result<(), Error> {
        for q in &self.queues {
            let rows = self.outbox.store().stored_messages(&q.name).await?;
            if let Ok(mut c) = self.captured.lock() {
                for (partition, seq, payload) in rows {
                    if let Some(seq) = seq {
                        c.entry((q.name.to_string(), partition, seq))
                            .or_insert(payload);
                    }
                }
            }
        }
        Ok(())
    }

    /// Payloads of every message enqueued to `queue` since the kit was built (replays of dead
    /// letters excluded): in order within each partition, partitions by index, then those not
    /// sequenced yet in enqueue order.
    pub async fn enqueued_raw(&self, queue: &str) -> Result<Vec<Vec<u8>>, TestError> {
        self.capture().await?;
        let live = self
            .outbox
            .store()
            .stored_messages(queue)
            .await
            .map_err(Error::from)?;
        let mut out: Vec<Vec<u8>> = match self.captured.lock() {
            Ok(c) => c
                .iter()
                .filter(|((q, ..), _)| q == queue)
                .map(|(_, p)| p.clone())
                .collect(),
            Err(_) => Vec::new(),
        };
        out.extend(
            live.into_iter()
                .filter(|(_, seq, _)| seq.is_none())
                .map(|(.., p)| p),
        );
        Ok(out)
    }

    /// Every message of type `T` enqueued since the kit was built, decoded (order as in
    /// [`enqueued_raw`](TestKit::enqueued_raw)).
    pub async fn enqueued<T: Queue>(&self) -> Result<Vec<T>, TestError> {
        self.enqueued_raw(T::NAME)
            .await?
            .iter()
            .map(|p| {
                T::from_json(p).map_err(|source| TestError::Decode {
                    queue: T::NAME.to_owned(),
                    source,
                })
            })
            .collect()
    }
}
