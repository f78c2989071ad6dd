//! Queue declarations, names and messages.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::InvalidName;
use crate::headers::Headers;
use crate::names;
use crate::profile::Overrides;

/// Largest partition count of a queue.
pub const MAX_PARTITIONS: u32 = names::MAX_PARTITIONS;

/// Default limit of a payload, in bytes (1 MiB). Change it with
/// [`Builder::max_payload_bytes`](crate::Builder::max_payload_bytes).
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// How long a deduplication key stays taken after its message was handled by every handler
/// (24 hours), unless the queue sets another window with [`QueueSpec::dedup_retention`].
pub const DEFAULT_DEDUP_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest deduplication key, in bytes.
pub const MAX_DEDUP_KEY_BYTES: usize = 255;

/// What happens when a message exhausts its attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PoisonPolicy {
    /// Copy it to the dead-letter table and move on to the next message of the partition.
    #[default]
    DeadLetter,
    /// Keep it at the head: the partition stops for that handler until an operator unblocks
    /// it ([`Outbox::unblock`](crate::Outbox::unblock)) or skips it to the dead letters
    /// ([`Outbox::skip_head`](crate::Outbox::skip_head)).
    Block,
}

/// A queue: its durable name, partition count and policies.
///
/// The name is part of the storage schema: renaming a queue orphans its stored messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub(crate) name: Cow<'static, str>,
    pub(crate) partitions: u32,
    pub(crate) policy: PoisonPolicy,
    pub(crate) overrides: Overrides,
    pub(crate) dedup_retention: Duration,
}

impl QueueSpec {
    /// A queue with `partitions` partitions (1 to [`MAX_PARTITIONS`]).
    pub fn new(name: impl Into<Cow<'static, str>>, partitions: u32) -> Self {
        Self {
            name: name.into(),
            partitions,
            policy: PoisonPolicy::DeadLetter,
            overrides: Overrides::NONE,
            dedup_retention: DEFAULT_DEDUP_RETENTION,
        }
    }

    /// How long a deduplication key stays taken after its message was handled by every
    /// handler of the queue (default [`DEFAULT_DEDUP_RETENTION`]). While the message waits,
    /// is scheduled or is being handled, its key is always taken.
    pub fn dedup_retention(mut self, window: Duration) -> Self {
        self.dedup_retention = window;
        self
    }

    /// What to do with a message that exhausted its attempts.
    pub fn poison_policy(mut self, policy: PoisonPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Knobs for every handler of this queue (handler overrides still win).
    pub fn overrides(mut self, overrides: Overrides) -> Self {
        self.overrides = overrides;
        self
    }

    /// The queue name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The partition count.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }
}

/// Checks a queue or handler name: 1 to 64 ASCII letters, digits, `_`, `-`, `.`, starting with
/// a letter.
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), InvalidName> {
    let reason = names::name_problem(name);
    match reason {
        None => Ok(()),
        Some(reason) => Err(InvalidName {
            kind,
            name: name.to_owned(),
            reason,
        }),
    }
}

/// Checks a table prefix: at most 32 lowercase ASCII letters, digits and `_`, starting with a
/// letter.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), InvalidName> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 32
        && prefix.starts_with(|c: char| c.is_ascii_lowercase())
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            kind: "table prefix",
            name: prefix.to_owned(),
            reason: "must be 1 to 32 lowercase ASCII letters, digits and `_`, starting with a letter",
        })
    }
}

/// A message to enqueue: queue, partition and payload bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub(crate) queue: Cow<'static, str>,
    pub(crate) partition: u32,
    pub(crate) payload: Vec<u8>,
    pub(crate) dedup_key: Option<String>,
    pub(crate) delivery: Option<Delivery>,
    pub(crate) headers: Headers,
}

/// When a scheduled message becomes due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// At this time (the caller's `SystemTime`, compared with the database's clock).
    At(SystemTime),
    /// This long after the enqueue, by the database's clock.
    After(Duration),
}

/// What an enqueue did with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Enqueued {
    /// Stored: it is delivered once its transaction commits.
    Stored,
    /// Stored for later: it is delivered when due. `id` cancels it until then
    /// ([`Outbox::cancel_scheduled`](crate::Outbox::cancel_scheduled)).
    Scheduled {
        /// The scheduled message's id.
        id: i64,
    },
    /// Nothing was written: a message with the same deduplication key is waiting, scheduled,
    /// being handled, or was handled within the queue's retention window.
    Duplicate,
}

impl Enqueued {
    /// Whether the message was written (stored or scheduled).
    pub fn is_new(&self) -> bool {
        !matches!(self, Enqueued::Duplicate)
    }
}

impl NewMessage {
    /// A message for `partition` of `queue`.
    pub fn new(
        queue: impl Into<Cow<'static, str>>,
        partition: u32,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            queue: queue.into(),
            partition,
            payload: payload.into(),
            dedup_key: None,
            delivery: None,
            headers: Headers::new(),
        }
    }

    /// Sets header `name` to `value` (see [`Headers`] for the limits, checked at enqueue).
    /// Handlers read it with [`Message::headers`]; relays forward it as a broker header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Adds every header of `headers` (replacing headers of the same name).
    pub fn headers(mut self, headers: Headers) -> Self {
        self.headers.extend(headers.0);
        self
    }

    /// The headers set so far.
    pub fn get_headers(&self) -> &Headers {
        &self.headers
    }

    /// Deduplicates on `key` (1 to [`MAX_DEDUP_KEY_BYTES`] bytes, compared exactly): while a
    /// message with this key on this queue waits, is scheduled, or was handled within the
    /// queue's [retention window](QueueSpec::dedup_retention), enqueueing another one writes
    /// nothing and returns [`Enqueued::Duplicate`]. Enforced by a unique index in the
    /// caller's transaction, so two racing transactions store exactly one message (if the
    /// first rolls back, the second's stands).
    pub fn dedup_key(mut self, key: impl Into<String>) -> Self {
        self.dedup_key = Some(key.into());
        self
    }

    /// Delivers the message at `at`, compared with the database's clock (never before). Until
    /// then it waits outside its partition; when due it takes its place at the tail of the
    /// partition, after the messages committed before that moment.
    pub fn deliver_at(mut self, at: SystemTime) -> Self {
        self.delivery = Some(Delivery::At(at));
        self
    }

    /// Delivers the message `delay` after the enqueue, by the database's clock (see
    /// [`deliver_at`](NewMessage::deliver_at)).
    pub fn deliver_after(mut self, delay: Duration) -> Self {
        self.delivery = Some(Delivery::After(delay));
        self
    }

    /// The queue name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The deduplication key, if any.
    pub fn key(&self) -> Option<&str> {
        self.dedup_key.as_deref()
    }
}

/// A delivered message, as a handler sees it.
#[derive(Debug, Clone)]
pub struct Message {
    pub(crate) queue: Arc<str>,
    pub(crate) partition: u32,
    pub(crate) seq: i64,
    pub(crate) payload: Vec<u8>,
    pub(crate) enqueued_at_ms: i64,
    pub(crate) attempt: u32,
    pub(crate) headers: Headers,
}

impl Message {
    /// The queue name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The partition index.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The message's position in its partition: dense, starting at 1, in commit order.
    pub fn seq(&self) -> i64 {
        self.seq
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// When it was enqueued, in milliseconds since the Unix epoch, by the database's clock at
    /// insert (the transaction commits after it).
    pub fn enqueued_at_ms(&self) -> i64 {
        self.enqueued_at_ms
    }

    /// Which attempt this delivery is, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The headers set at enqueue ([`NewMessage::header`]), with the trace context when the
    /// `opentelemetry` feature captured one.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// A key that identifies this message for this handler across redeliveries:
    /// `queue/partition/seq`. Use it to make leased handlers' side effects idempotent.
    pub fn idempotency_key(&self) -> String {
        format!("{}/{}/{}", self.queue, self.partition, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "a",
            "orders",
            "order_placed",
            "Orders.v2-eu",
            &"x".repeat(64),
        ] {
            assert!(validate_name("queue", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "_a",
            "a b",
            "a;drop",
            "é",
            &"x".repeat(65),
            "a'b",
        ] {
            assert!(validate_name("queue", bad).is_err(), "{bad}");
        }
        assert!(validate_prefix("outbox_").is_ok());
        for bad in ["", "Outbox", "a-b", "1a", &"a".repeat(33)] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
    }
}
