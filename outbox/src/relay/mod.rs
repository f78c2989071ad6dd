//! Relays: publish what a queue committed to a message broker, in order per partition.
//!
//! A relay is a handler of its queue with its own cursor (so a queue can have local handlers
//! and relays at once). It runs on the leased path: it leases a partition's next batch on the
//! database clock, publishes the batch in sequence order with the broker's acknowledgements
//! pipelined, and moves the cursor, fenced by the lease token, only once the broker acked every
//! message of the batch. A crash between publish and ack publishes the batch again: every
//! message carries a stable id, `{instance}/{queue}/{partition}/{seq}` (the instance is
//! [`Outbox::instance_id`](crate::Outbox::instance_id)), the same on every retry, so the broker
//! (NATS JetStream's `Nats-Msg-Id`) or the receiver's [inbox](crate::inbox) drops the copy.
//!
//! ```no_run
//! # async fn demo(db: outbox::sea_orm::DatabaseConnection) -> Result<(), Box<dyn std::error::Error>> {
//! # #[cfg(feature = "nats")] {
//! use outbox::relay::{RelaySpec, nats::JetStream};
//! use outbox::{Outbox, QueueSpec};
//!
//! let client = outbox::relay::nats::async_nats::connect("127.0.0.1:4222").await?;
//! let broker = JetStream::new(client).create_stream("ORDERS", ["orders.>"]);
//! let running = Outbox::builder(db)
//!     .queue(QueueSpec::new("orders", 8))
//!     .relay(RelaySpec::new("orders", broker, "orders.{partition}"))
//!     .start()
//!     .await?;
//! # running.shutdown(std::time::Duration::from_secs(5)).await?;
//! # }
//! # Ok(()) }
//! ```
//!
//! # What the broker receives
//!
//! | header | value |
//! |---|---|
//! | `Outbox-Id` (and `Nats-Msg-Id`, AMQP `message_id`) | `{instance}/{queue}/{partition}/{seq}` |
//! | `Outbox-Queue` | the queue name |
//! | `Outbox-Partition` | the partition |
//! | `Outbox-Seq` | the sequence number in the partition |
//! | `Outbox-Enqueued-At` | enqueue time, milliseconds since the Unix epoch |
//!
//! The subject (NATS) or routing key (RabbitMQ) comes from a template over `{queue}`,
//! `{partition}` and `{key}`. The outbox stores no key with a message, so `{key}` is what
//! [`RelaySpec::key`] derives from the message (for example a field of its payload), or the
//! partition when no key function is set. Messages with one key share a partition, so the
//! relay keeps their order.
//!
//! # Failures
//!
//! * The broker refuses a message for good (JetStream: above the stream's message or header
//!   size limit or the server's `max_payload`, or an invalid subject; RabbitMQ: above
//!   `max_message_size`): it is dead-lettered with the broker's reason, and the relay goes on
//!   with the next one. Every other broker answer (a full stream, a deleted exchange) is
//!   retried like an outage.
//! * The broker is unreachable mid-stream: the relay keeps its lease, renews it, and retries
//!   from the first unacknowledged message with a backoff (up to 5 s), for as long as it takes;
//!   nothing is dead-lettered for an outage.
//! * The broker is unreachable at start: [`Builder::start`](crate::Builder::start) fails with
//!   [`StartError::Relay`](crate::StartError::Relay).
//!
//! Order: the relay publishes one partition's messages in sequence order and only moves on
//! once all of a batch is acked. When an ack fails in the middle of a pipelined batch, the
//! relay publishes again from that message; a later message of the same batch that the broker
//! had already stored keeps its earlier position (JetStream drops the re-sent copy as a
//! duplicate). A broker connection that drops loses the acks of every message after the
//! first lost one, so this needs the broker to store message k+1 while failing k, which a
//! single JetStream server or RabbitMQ channel does not do.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{BoxDynError, HandlerError};
use crate::handler::{HandlerSpec, LeaseContext};
use crate::profile::Overrides;
use crate::queue::Message;

#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats;
#[cfg(feature = "rabbitmq")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbitmq")))]
pub mod rabbitmq;

/// A boxed future, as [`Broker`] methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The header names a relay sets on every message.
pub mod headers {
    /// The stable message id, `{instance}/{queue}/{partition}/{seq}`.
    pub const ID: &str = "Outbox-Id";
    /// The queue name.
    pub const QUEUE: &str = "Outbox-Queue";
    /// The partition.
    pub const PARTITION: &str = "Outbox-Partition";
    /// The sequence number in the partition.
    pub const SEQ: &str = "Outbox-Seq";
    /// Enqueue time, milliseconds since the Unix epoch.
    pub const ENQUEUED_AT: &str = "Outbox-Enqueued-At";
}

/// One message as a relay hands it to its [`Broker`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Outgoing {
    /// The stable id, `{instance}/{queue}/{partition}/{seq}`.
    pub id: String,
    /// The subject or routing key, rendered from the relay's template.
    pub destination: String,
    /// The queue name.
    pub queue: Arc<str>,
    /// The partition.
    pub partition: u32,
    /// The sequence number in the partition.
    pub seq: i64,
    /// Enqueue time, milliseconds since the Unix epoch.
    pub enqueued_at_ms: i64,
    /// The payload.
    pub payload: Vec<u8>,
    /// The message's headers, forwarded as broker headers (before the relay's own `Outbox-*`
    /// headers, which win over a header of the same name).
    pub headers: crate::Headers,
}

impl Outgoing {
    /// A message of `queue` for `destination` with partition, sequence and enqueue time 0 (set
    /// the fields after): for a broker's own tests and raw publish loops.
    pub fn new(
        id: impl Into<String>,
        destination: impl Into<String>,
        queue: &str,
        payload: Vec<u8>,
    ) -> Self {
        Self {
            id: id.into(),
            destination: destination.into(),
            queue: Arc::from(queue),
            partition: 0,
            seq: 0,
            enqueued_at_ms: 0,
            payload,
            headers: crate::Headers::new(),
        }
    }
}

/// Why a broker did not take a batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The broker refused message `index` of the batch for good (too large, invalid
    /// destination): it is dead-lettered with `reason`. The messages before it were acked.
    #[error("the broker refused the message: {reason}")]
    Refused {
        /// Index of the refused message in the batch.
        index: usize,
        /// The broker's reason.
        reason: String,
    },
    /// The broker could not be reached or did not ack in time; the first `acked` messages of
    /// the batch were acked, and the relay publishes again from the next one.
    #[error("the broker is unavailable ({acked} message(s) of the batch acked)")]
    Unavailable {
        /// How many leading messages of the batch were acked.
        acked: usize,
        /// What failed.
        #[source]
        source: BoxDynError,
    },
}

/// A message broker a relay publishes to. Implemented by [`nats::JetStream`] and
/// [`rabbitmq::RabbitMq`]; implement it to relay elsewhere.
pub trait Broker: Send + Sync + 'static {
    /// A short name of the broker kind, used in the default relay name (`relay-{kind}`).
    fn kind(&self) -> &'static str;

    /// Checks that the broker is reachable and its destinations exist (creating them if so
    /// configured). [`Builder::start`](crate::Builder::start) calls it once, before any worker
    /// starts, and fails with [`StartError::Relay`](crate::StartError::Relay) if it fails.
    fn prepare(&self) -> BoxFuture<'_, Result<(), BoxDynError>>;

    /// Publishes `batch` in order, pipelining the broker's acks, and returns once every
    /// message was acked, or at the first message that was not.
    fn publish<'a>(&'a self, batch: &'a [Outgoing]) -> BoxFuture<'a, Result<(), PublishError>>;
}

/// A subject or routing-key template: literal text with `{queue}`, `{partition}` and `{key}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Queue,
    Partition,
    Key,
}

/// A template that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid destination template `{template}`: {reason}")]
pub struct TemplateError {
    /// The template.
    pub template: String,
    /// What is wrong.
    pub reason: String,
}

impl Template {
    /// Parses `template`; `{queue}`, `{partition}` and `{key}` are replaced per message.
    pub fn parse(template: &str) -> Result<Template, TemplateError> {
        let err = |reason: String| TemplateError {
            template: template.to_owned(),
            reason,
        };
        if template.is_empty() {
            return Err(err("it is empty".to_owned()));
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find(['{', '}']) {
            if rest[open..].starts_with('}') {
                return Err(err("`}` without `{`".to_owned()));
            }
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let Some(close) = after.find('}') else {
                return Err(err("`{` without `}`".to_owned()));
            };
            parts.push(match &after[..close] {
                "queue" => Part::Queue,
                "partition" => Part::Partition,
                "key" => Part::Key,
                other => {
                    return Err(err(format!(
                        "unknown placeholder `{{{other}}}`; expected one of `{{queue}}`, `{{partition}}`, `{{key}}`"
                    )));
                }
            });
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_owned()));
        }
        Ok(Template { parts })
    }

    /// The destination of one message.
    pub fn render(&self, queue: &str, partition: u32, key: &str) -> String {
        let mut s = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => s.push_str(l),
                Part::Queue => s.push_str(queue),
                Part::Partition => s.push_str(&partition.to_string()),
                Part::Key => s.push_str(key),
            }
        }
        s
    }
}

type KeyFn = Arc<dyn Fn(&Message) -> Option<String> + Send + Sync>;

/// A relay of one queue to one broker, declared with [`Builder::relay`](crate::Builder::relay).
#[derive(Clone)]
pub struct RelaySpec {
    pub(crate) queue: Cow<'static, str>,
    pub(crate) name: Cow<'static, str>,
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) template: String,
    key: Option<KeyFn>,
    overrides: Overrides,
}

impl fmt::Debug for RelaySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelaySpec")
            .field("queue", &self.queue)
            .field("name", &self.name)
            .field("broker", &self.broker.kind())
            .field("template", &self.template)
            .field("overrides", &self.overrides)
            .finish_non_exhaustive()
    }
}

impl RelaySpec {
    /// Relays `queue` to `broker`, each message to the destination (subject or routing key)
    /// rendered from `template` (see [`Template`]). The relay's cursor is named
    /// `relay-{kind}` (for example `relay-nats`) unless [`name`](RelaySpec::name) says otherwise.
    pub fn new(
        queue: impl Into<Cow<'static, str>>,
        broker: impl Broker,
        template: impl Into<String>,
    ) -> Self {
        let name = format!("relay-{}", broker.kind());
        Self {
            queue: queue.into(),
            name: name.into(),
            broker: Arc::new(broker),
            template: template.into(),
            key: None,
            overrides: Overrides::NONE,
        }
    }

    /// Relays the typed queue `Q` (see [`RelaySpec::new`]).
    pub fn of<Q: crate::Queue>(broker: impl Broker, template: impl Into<String>) -> Self {
        Self::new(Q::NAME, broker, template)
    }

    /// The relay's durable name: its cursor's name. Renaming it starts a new cursor at the
    /// oldest retained message (which publishes them again).
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Derives `{key}` of the template from a message (for example a field of its payload);
    /// `None` falls back to the partition.
    pub fn key<F>(mut self, f: F) -> Self
    where
        F: Fn(&Message) -> Option<String> + Send + Sync + 'static,
    {
        self.key = Some(Arc::new(f));
        self
    }

    /// Knobs of the relay's handler: `batch_size` is how many messages are pipelined per
    /// broker round, `concurrency` how many partitions publish at once, `lease` how long a
    /// batch may take before it is renewed.
    pub fn overrides(mut self, overrides: Overrides) -> Self {
        self.overrides = overrides;
        self
    }

    pub(crate) fn overrides_ref(&self) -> &Overrides {
        &self.overrides
    }

    /// The queue relayed.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The relay's name.
    pub fn get_name(&self) -> &str {
        &self.name
    }

    /// The relay as the leased batch handler the runtime runs.
    pub(crate) fn into_handler(self) -> Result<HandlerSpec, TemplateError> {
        let template = Template::parse(&self.template)?;
        let core = Arc::new(Core {
            broker: self.broker,
            template,
            key: self.key,
            instance: tokio::sync::OnceCell::new(),
        });
        Ok(
            HandlerSpec::leased_batch(self.queue, self.name, move |msgs, ctx| {
                let core = core.clone();
                Box::pin(async move { core.run(msgs, ctx).await })
            })
            .overrides(self.overrides),
        )
    }
}

struct Core {
    broker: Arc<dyn Broker>,
    template: Template,
    key: Option<KeyFn>,
    instance: tokio::sync::OnceCell<String>,
}

/// Longest pause between two publish attempts while the broker is unavailable.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Core {
    async fn run(&self, msgs: &[Message], ctx: &LeaseContext) -> Result<(), HandlerError> {
        let instance = self
            .instance
            .get_or_try_init(|| async {
                match ctx.lease.store().instance_id().await {
                    Ok(Some(id)) => Ok(id),
                    Ok(None) => Err(HandlerError::retry(
                        "the outbox has no instance id (schema older than version 2)",
                    )),
                    Err(e) => Err(HandlerError::retry(e)),
                }
            })
            .await?;
        let out: Vec<Outgoing> = msgs
            .iter()
            .map(|m| {
                let key = self
                    .key
                    .as_ref()
                    .and_then(|k| k(m))
                    .unwrap_or_else(|| m.partition.to_string());
                Outgoing {
                    id: message_id(instance, &m.queue, m.partition, m.seq),
                    destination: self.template.render(&m.queue, m.partition, &key),
                    queue: m.queue.clone(),
                    partition: m.partition,
                    seq: m.seq,
                    enqueued_at_ms: m.enqueued_at_ms,
                    payload: m.payload.clone(),
                    headers: m.headers.clone(),
                }
            })
            .collect();
        let mut from = 0;
        let mut delay = Duration::from_millis(100);
        // The lease is renewed whenever less than half of it is left, so an outage of any
        // length never reaches the lease deadline (which would count as a failed attempt).
        let half = ctx.remaining() / 2;
        loop {
            if ctx.remaining() < half {
                ctx.renew().await.map_err(HandlerError::retry)?;
            }
            let budget = ctx.remaining().saturating_sub(Duration::from_millis(20));
            let published =
                match tokio::time::timeout(budget, self.broker.publish(&out[from..])).await {
                    Ok(r) => r,
                    Err(_) => Err(PublishError::Unavailable {
                        acked: 0,
                        source: "the broker did not ack the batch before the lease deadline".into(),
                    }),
                };
            match published {
                Ok(()) => return Ok(()),
                Err(PublishError::Refused { index, reason }) => {
                    // A batch of several: the runtime splits it until the refused message is
                    // alone, then dead-letters it with this reason. Those before it were acked
                    // and are published again meanwhile; their ids make that a duplicate.
                    tracing::warn!(queue = %ctx.queue(), relay = %ctx.handler(), partition = ctx.partition(),
                        seq = out.get(from + index).map(|o| o.seq), %reason, "the broker refused a message");
                    return Err(HandlerError::reject(reason));
                }
                Err(PublishError::Unavailable { acked, source }) => {
                    from = (from + acked).min(out.len());
                    tracing::warn!(queue = %ctx.queue(), relay = %ctx.handler(), partition = ctx.partition(),
                        error = %crate::error::full_chain(source.as_ref()), retry_in = ?delay,
                        "broker unavailable; publishing again from the first unacked message");
                    // Keep the partition while waiting; a lost lease means another worker took
                    // over, and this one must stop.
                    ctx.renew().await.map_err(HandlerError::retry)?;
                    tokio::time::sleep(delay.min(ctx.remaining() / 2)).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// The stable id of a relayed message.
pub fn message_id(instance: &str, queue: &str, partition: u32, seq: i64) -> String {
    format!("{instance}/{queue}/{partition}/{seq}")
}

/// The full text of an error and its sources, for broker reasons.
#[cfg(any(feature = "nats", feature = "rabbitmq"))]
fn reason(e: &(dyn std::error::Error + 'static)) -> String {
    crate::error::full_chain(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_and_refuse_unknown_placeholders() {
        let t = Template::parse("orders.{queue}.{partition}.{key}").expect("valid");
        assert_eq!(t.render("q", 3, "k-1"), "orders.q.3.k-1");
        assert_eq!(
            Template::parse("plain").expect("valid").render("q", 0, "k"),
            "plain"
        );
        for bad in ["", "a.{nope}", "a.{key", "a}"] {
            assert!(Template::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
