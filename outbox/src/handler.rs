//! Handler declarations: the two modes and what a handler receives.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseTransaction;

use crate::error::HandlerError;
use crate::profile::Overrides;
use crate::queue::Message;
use crate::typed::HandlerMode;

/// The future a handler returns.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;

/// What a handler call runs under: the transaction that acks its messages, or a lease.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Inside the transaction that acks the messages.
    Transaction(&'a DatabaseTransaction),
    /// Under a lease.
    Lease(&'a LeaseContext),
}

/// Every handler, whatever its mode, erased to one shape: the messages of one call (exactly one
/// unless the handler takes batches) and the scope the call runs under. Wrappers (state,
/// fault injection) wrap this one shape.
pub(crate) type Erased =
    Arc<dyn for<'a> Fn(&'a [Message], Scope<'a>) -> HandlerFuture<'a> + Send + Sync>;

/// Erases a closure of the one shape (the bound lets the closure's signature be inferred).
pub(crate) fn erase<F>(f: F) -> Erased
where
    F: for<'a> Fn(&'a [Message], Scope<'a>) -> HandlerFuture<'a> + Send + Sync + 'static,
{
    Arc::new(f)
}

/// The context a handler's signature takes (a transaction or a lease), found in the scope of
/// its call; it decides the handler's mode.
#[doc(hidden)]
pub trait Context: Send + Sync + 'static {
    /// The mode of handlers that take this context.
    const MODE: HandlerMode;
    /// This context, if the call runs under it.
    fn from_scope<'a>(scope: Scope<'a>) -> Option<&'a Self>;
}

impl Context for DatabaseTransaction {
    const MODE: HandlerMode = HandlerMode::Transactional;
    fn from_scope<'a>(scope: Scope<'a>) -> Option<&'a Self> {
        match scope {
            Scope::Transaction(txn) => Some(txn),
            Scope::Lease(_) => None,
        }
    }
}

impl Context for LeaseContext {
    const MODE: HandlerMode = HandlerMode::Leased;
    fn from_scope<'a>(scope: Scope<'a>) -> Option<&'a Self> {
        match scope {
            Scope::Lease(ctx) => Some(ctx),
            Scope::Transaction(_) => None,
        }
    }
}

/// A call the engine routed wrongly (the wrong scope, or several messages to a one-message
/// handler): a bug of the engine, failed as a retryable attempt rather than a panic.
fn misrouted<'a>(messages: usize) -> HandlerFuture<'a> {
    debug_assert!(false, "handler call routed wrongly ({messages} messages)");
    Box::pin(std::future::ready(Err(HandlerError::retry(Misrouted(
        messages,
    )))))
}

#[derive(Debug)]
struct Misrouted(usize);

impl fmt::Display for Misrouted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "outbox engine bug: a handler was called with {} messages or the wrong context",
            self.0
        )
    }
}

impl std::error::Error for Misrouted {}

/// How a handler is called: its mode, whether it takes batches, and the erased call.
#[derive(Clone)]
pub(crate) struct Mode {
    pub(crate) kind: HandlerMode,
    /// Whether one call takes a whole batch (otherwise exactly one message).
    pub(crate) batch: bool,
    pub(crate) call: Erased,
}

impl Mode {
    pub(crate) fn name(&self) -> &'static str {
        match (self.kind, self.batch) {
            (HandlerMode::Transactional, false) => "transactional",
            (HandlerMode::Transactional, true) => "transactional batch",
            (HandlerMode::Leased, false) => "leased",
            (HandlerMode::Leased, true) => "leased batch",
        }
    }
}

/// A handler: the queue it consumes, its durable name, its mode and its knobs.
///
/// Each handler of a queue has its own cursor and sees every message (fan-out). The name is
/// stored with the cursor: renaming a handler starts a new cursor at the oldest retained message.
#[derive(Clone)]
pub struct HandlerSpec {
    pub(crate) queue: Cow<'static, str>,
    pub(crate) name: Cow<'static, str>,
    pub(crate) mode: Mode,
    pub(crate) overrides: Overrides,
    /// The state types its calls take, and how to build them from the values given at start.
    pub(crate) state: Option<crate::state::Binding>,
}

impl fmt::Debug for HandlerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerSpec")
            .field("queue", &self.queue)
            .field("name", &self.name)
            .field("mode", &self.mode.name())
            .field("overrides", &self.overrides)
            .finish()
    }
}

impl HandlerSpec {
    /// A handler of one message per call, in the mode its context decides.
    pub(crate) fn one<Cx: Context>(
        queue: impl Into<Cow<'static, str>>,
        name: impl Into<Cow<'static, str>>,
        f: impl for<'a> Fn(&'a Message, &'a Cx) -> HandlerFuture<'a> + Send + Sync + 'static,
    ) -> Self {
        let call = erase(
            move |messages, scope| match (messages, Cx::from_scope(scope)) {
                ([message], Some(cx)) => f(message, cx),
                _ => misrouted(messages.len()),
            },
        );
        Self::erased(queue, name, Cx::MODE, false, call)
    }

    /// A handler of a whole batch per call, in the mode its context decides.
    pub(crate) fn many<Cx: Context>(
        queue: impl Into<Cow<'static, str>>,
        name: impl Into<Cow<'static, str>>,
        f: impl for<'a> Fn(&'a [Message], &'a Cx) -> HandlerFuture<'a> + Send + Sync + 'static,
    ) -> Self {
        let call = erase(move |messages, scope| match Cx::from_scope(scope) {
            Some(cx) => f(messages, cx),
            None => misrouted(messages.len()),
        });
        Self::erased(queue, name, Cx::MODE, true, call)
    }

    fn erased(
        queue: impl Into<Cow<'static, str>>,
        name: impl Into<Cow<'static, str>>,
        kind: HandlerMode,
        batch: bool,
        call: Erased,
    ) -> Self {
        Self {
            queue: queue.into(),
            name: name.into(),
            mode: Mode { kind, batch, call },
            overrides: Overrides::NONE,
            state: None,
        }
    }

    /// A handler that runs inside the transaction that acks its messages: its writes through
    /// `txn` commit if and only if the cursor moves past the message (exactly-once effects in
    /// this database).
    pub fn transactional<F>(
        queue: impl Into<Cow<'static, str>>,
        name: impl Into<Cow<'static, str>>,
        f: F,
    ) -> Self
    where
        F: for<'a> Fn(&'a Message, &'a DatabaseTransaction) -> HandlerFuture<'a>
            + Send
            + Sync
            + 'static,
    {
        Self::one(queue, name, f)
    }

    /// A handler that runs outside any transaction under a time lease (at-least-once). It is
    /// cancelled at lease end minus headroom; an ack after the lease was lost is rejected.
    pub fn leased<F>(
        queue: impl Into<Cow<'static, str>>,
        name: impl Into<Cow<'static, str>>,
        f: F,
    ) -> Self
    where
        F: for<'a> Fn(&'a Message, &'a LeaseContext) -> HandlerFuture<'a> + Send + Sync + 'static,
    {
        Self::one(queue, name, f)
    }

    /// A transactional handler called with a whole batch (up to `batch_size` messages of one
    /// partition, in order) inside the transaction that acks them all. If it fails, the batch is
    /// split in halves and retried until the failing message is alone; from there the usual
    /// retry, backoff and dead-letter rules apply to that message. Effects of a failed call are
    /// always rolled back.
    pub fn transactional_batch<F>(
        queue: impl Into<Cow<'static, str>>,
        name: impl Into<Cow<'static, str>>,
        f: F,
    ) -> Self
    where
        F: for<'a> Fn(&'a [Message], &'a DatabaseTransaction) -> HandlerFuture<'a>
            + Send
            + Sync
            + 'static,
    {
        Self::many(queue, name, f)
    }

    /// A leased handler called with a whole batch under one lease (at-least-once). A failure
    /// splits the batch as for [`transactional_batch`](HandlerSpec::transactional_batch); the
    /// context's `seq` and `attempt` are those of the first message.
    pub fn leased_batch<F>(
        queue: impl Into<Cow<'static, str>>,
        name: impl Into<Cow<'static, str>>,
        f: F,
    ) -> Self
    where
        F: for<'a> Fn(&'a [Message], &'a LeaseContext) -> HandlerFuture<'a> + Send + Sync + 'static,
    {
        Self::many(queue, name, f)
    }

    /// Knobs for this handler (they win over the queue's and the profile's).
    pub fn overrides(mut self, overrides: Overrides) -> Self {
        self.overrides = overrides;
        self
    }

    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The handler name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// What a leased handler knows about its lease, and how it extends it.
#[derive(Debug, Clone)]
pub struct LeaseContext {
    pub(crate) queue: Arc<str>,
    pub(crate) handler: Arc<str>,
    pub(crate) partition: u32,
    pub(crate) seq: i64,
    pub(crate) attempt: u32,
    pub(crate) lease: Arc<crate::runtime::lease::Lease>,
}

impl LeaseContext {
    /// The queue name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The handler's name.
    pub fn handler(&self) -> &str {
        &self.handler
    }

    /// The partition of the message.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The message's sequence number in its partition (the first message's, for a batch
    /// handler).
    pub fn seq(&self) -> i64 {
        self.seq
    }

    /// Which attempt this delivery is, starting at 1. Raised after a failure and after a
    /// lease that expired without an ack (a crashed or stalled worker).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// A key that stays the same across redeliveries of this message to this handler:
    /// `queue/partition/seq/handler`. Use it to make external side effects idempotent.
    pub fn idempotency_key(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.queue, self.partition, self.seq, self.handler
        )
    }

    /// Time left before the handler is cancelled (lease end minus headroom).
    pub fn remaining(&self) -> Duration {
        self.lease
            .deadline()
            .saturating_duration_since(tokio::time::Instant::now())
    }

    /// When the lease ends, in milliseconds since the Unix epoch, as this process's clock
    /// estimates it. The database's clock is the one that judges the lease (see
    /// [`renew`](LeaseContext::renew)); use [`remaining`](LeaseContext::remaining) to plan work.
    pub fn lease_expires_at_ms(&self) -> i64 {
        self.lease.state().expires_at_ms
    }

    /// Extends the lease by its full length from now, for handlers that need longer than one
    /// lease; returns the new time left before cancellation. Fails with
    /// [`Error::LeaseLost`](crate::Error::LeaseLost) if the lease already expired or was
    /// taken over (a renewal never resurrects a lost lease): stop work whose effects are not
    /// idempotent.
    pub async fn renew(&self) -> Result<Duration, crate::Error> {
        if !self.lease.renew().await? {
            return Err(crate::Error::LeaseLost);
        }
        Ok(self.remaining())
    }
}
