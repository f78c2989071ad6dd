//! A relay into RabbitMQ (lapin), with publisher confirms.
//!
//! Messages are persistent (`delivery_mode` 2), carry the stable id as AMQP `message_id` and in
//! the `Outbox-Id` header, and are published on one channel in confirm mode, so a partition's
//! messages reach a queue in sequence order. RabbitMQ does not drop duplicates: a message whose
//! confirm was lost (the relay crashed, or the connection dropped, between publish and
//! confirm) is published again, and the receiver's [inbox](crate::inbox) absorbs the copy.
//!
//! The relay connects at start and again by itself whenever the connection or channel fails.

use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use super::{BoxFuture, Broker, Outgoing, PublishError, headers, reason};
use crate::error::BoxDynError;

pub use lapin;

/// A [`Broker`] that publishes to a RabbitMQ exchange with publisher confirms.
pub struct RabbitMq {
    uri: String,
    exchange: String,
    declare: Option<ExchangeKind>,
    connect_timeout: Duration,
    link: Mutex<Option<(Connection, Channel)>>,
}

impl std::fmt::Debug for RabbitMq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMq")
            .field("exchange", &self.exchange)
            .field("declare", &self.declare)
            .finish_non_exhaustive()
    }
}

impl RabbitMq {
    /// Publishes to `exchange` (`""`: the default exchange, where the routing key names a
    /// queue) on the broker at `uri` (`amqp://guest:guest@127.0.0.1:5672/%2f`).
    pub fn new(uri: impl Into<String>, exchange: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            exchange: exchange.into(),
            declare: None,
            connect_timeout: Duration::from_secs(5),
            link: Mutex::new(None),
        }
    }

    /// At start, declare the exchange (durable) with this kind if it does not exist. Without
    /// it, start only checks that the exchange exists (the default exchange `""` always does).
    pub fn declare_exchange(mut self, kind: ExchangeKind) -> Self {
        self.declare = Some(kind);
        self
    }

    /// How long one connection attempt may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    async fn connect(&self) -> Result<(Connection, Channel), lapin::Error> {
        let conn = Connection::connect(&self.uri, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        if !self.exchange.is_empty() {
            // Declared if so configured; otherwise only checked (passive), so a missing
            // exchange fails start instead of closing the channel at every publish.
            let (kind, passive) = match &self.declare {
                Some(kind) => (kind.clone(), false),
                None => (ExchangeKind::Direct, true),
            };
            channel
                .exchange_declare(
                    self.exchange.as_str().into(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        passive,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
        }
        Ok((conn, channel))
    }

    /// The current channel, connecting first if there is none or it failed.
    async fn channel(
        &self,
        link: &mut Option<(Connection, Channel)>,
    ) -> Result<Channel, BoxDynError> {
        if let Some((conn, ch)) = link.as_ref()
            && conn.status().connected()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        if let Some((conn, _)) = link.take() {
            let _ = conn.close(200, "reconnecting".into()).await;
        }
        let fresh = tokio::time::timeout(self.connect_timeout, self.connect())
            .await
            .map_err(|_| {
                format!(
                    "no connection to RabbitMQ within {:?}",
                    self.connect_timeout
                )
            })??;
        let ch = fresh.1.clone();
        *link = Some(fresh);
        Ok(ch)
    }
}

fn properties(o: &Outgoing) -> BasicProperties {
    let mut h = FieldTable::default();
    for (name, value) in o.headers.iter() {
        h.insert(name.into(), AMQPValue::LongString(value.into()));
    }
    h.insert(
        headers::ID.into(),
        AMQPValue::LongString(o.id.as_str().into()),
    );
    h.insert(
        headers::QUEUE.into(),
        AMQPValue::LongString((*o.queue).into()),
    );
    h.insert(
        headers::PARTITION.into(),
        AMQPValue::LongLongInt(i64::from(o.partition)),
    );
    h.insert(headers::SEQ.into(), AMQPValue::LongLongInt(o.seq));
    h.insert(
        headers::ENQUEUED_AT.into(),
        AMQPValue::LongLongInt(o.enqueued_at_ms),
    );
    BasicProperties::default()
        .with_message_id(o.id.as_str().into())
        .with_delivery_mode(2)
        .with_timestamp(u64::try_from(o.enqueued_at_ms / 1000).unwrap_or(0))
        .with_headers(h)
}

/// Why a message of a batch was not confirmed.
enum Miss {
    Failed(lapin::Error),
    Nacked,
}

/// Whether the broker closed the channel over this message for good: `PRECONDITION_FAILED`
/// (a message above `max_message_size`) or `CONTENT_TOO_LARGE`. Any other error (a closed
/// connection, an exchange deleted meanwhile, a refused login) is retried.
fn refused(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp) if matches!(
            amqp.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::CONTENTTOOLARGE)
        )
    )
}

impl Broker for RabbitMq {
    fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    fn prepare(&self) -> BoxFuture<'_, Result<(), BoxDynError>> {
        Box::pin(async move {
            let mut link = self.link.lock().await;
            self.channel(&mut link).await.map(|_| ())
        })
    }

    fn publish<'a>(&'a self, batch: &'a [Outgoing]) -> BoxFuture<'a, Result<(), PublishError>> {
        Box::pin(async move {
            // One channel at a time: confirms of one channel come in publish order.
            let mut link = self.link.lock().await;
            let ch = self
                .channel(&mut link)
                .await
                .map_err(|source| PublishError::Unavailable { acked: 0, source })?;
            let mut confirms = Vec::with_capacity(batch.len());
            let mut first: Option<(usize, Miss)> = None;
            for (i, o) in batch.iter().enumerate() {
                match ch
                    .basic_publish(
                        self.exchange.as_str().into(),
                        o.destination.as_str().into(),
                        BasicPublishOptions::default(),
                        &o.payload,
                        properties(o),
                    )
                    .await
                {
                    Ok(c) => confirms.push(c),
                    Err(e) => {
                        first = Some((i, Miss::Failed(e)));
                        break;
                    }
                }
            }
            // Confirms come in publish order; the first message not confirmed decides.
            for (i, c) in confirms.into_iter().enumerate() {
                let miss = match c.await {
                    Ok(Confirmation::Ack(_) | Confirmation::NotRequested) => continue,
                    Ok(Confirmation::Nack(_)) => Miss::Nacked,
                    Err(e) => Miss::Failed(e),
                };
                if first.as_ref().is_none_or(|(j, _)| i < *j) {
                    first = Some((i, miss));
                }
            }
            let result = match first {
                None => Ok(()),
                Some((index, Miss::Failed(e))) if refused(&e) => Err(PublishError::Refused {
                    index,
                    reason: reason(&e),
                }),
                Some((acked, Miss::Failed(e))) => Err(PublishError::Unavailable {
                    acked,
                    source: Box::new(e),
                }),
                Some((acked, Miss::Nacked)) => Err(PublishError::Unavailable {
                    acked,
                    source: "the broker nacked the message (it could not store it)".into(),
                }),
            };
            if result.is_err() {
                // The channel may be closed or in doubt: start over on a fresh one.
                if let Some((conn, _)) = link.take() {
                    let _ = conn.close(200, "reconnecting".into()).await;
                }
            }
            result
        })
    }
}
