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

/// The future a handler returns.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;

pub(crate) type TxFn =
    Arc<dyn for<'a> Fn(&'a Message, &'a DatabaseTransaction) -> HandlerFuture<'a> + Send + Sync>;
pub(crate) type LeasedFn =
    Arc<dyn for<'a> Fn(&'a Message, &'a LeaseContext) -> HandlerFuture<'a> + Send + Sync>;

pub(crate) type TxBatchFn =
    Arc<dyn for<'a> Fn(&'a [Message], &'a DatabaseTransaction) -> HandlerFuture<'a> + Send + Sync>;
pub(crate) type LeasedBatchFn =
    Arc<dyn for<'a> Fn(&'a [Message], &'a LeaseContext) -> HandlerFuture<'a> + Send + Sync>;

/// How a handler is called: one message per call, or a whole batch per call.
#[derive(Clone)]
pub(crate) enum Call<One, Many> {
    One(One),
    Many(Many),
}

#[derive(Clone)]
pub(crate) enum Mode {
    Transactional(Call<TxFn, TxBatchFn>),
    Leased(Call<LeasedFn, LeasedBatchFn>),
}

impl Mode {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Mode::Transactional(Call::One(_)) => "transactional",
            Mode::Transactional(Call::Many(_)) => "transactional batch",
            Mode::Leased(Call::One(_)) => "leased",
            Mode::Leased(Call::Many(_)) => "leased batch",
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
        Self {
            queue: queue.into(),
            name: name.into(),
            mode: Mode::Transactional(Call::One(Arc::new(f))),
            overrides: Overrides::NONE,
            state: None,
        }
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
        Self {
            queue: queue.into(),
            name: name.into(),
            mode: Mode::Leased(Call::One(Arc::new(f))),
            overrides: Overrides::NONE,
            state: None,
        }
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
        Self {
            queue: queue.into(),
            name: name.into(),
            mode: Mode::Transactional(Call::Many(Arc::new(f))),
            overrides: Overrides::NONE,
            state: None,
        }
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
        Self {
            queue: queue.into(),
            name: name.into(),
            mode: Mode::Leased(Call::Many(Arc::new(f))),
            overrides: Overrides::NONE,
            state: None,
        }
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
