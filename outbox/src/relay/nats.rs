//! A relay into NATS JetStream (async-nats).
//!
//! Every message is published with `Nats-Msg-Id` set to its stable id, so JetStream drops a
//! message the relay publishes again (after a crash between publish and ack, or a lost ack)
//! within the stream's duplicate window (`duplicate_window`, two minutes by default: keep it
//! longer than the relay's lease).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;

use super::{BoxFuture, Broker, Outgoing, PublishError, headers, reason};
use crate::error::BoxDynError;

pub use async_nats;

/// What the relay does with the stream at start.
#[derive(Debug, Clone)]
enum StreamSetup {
    /// Nothing: only check that the server answers.
    Nothing,
    /// Check that this stream exists.
    Check(String),
    /// Create the stream if it does not exist.
    Create(Box<stream::Config>),
}

/// A [`Broker`] that publishes into JetStream.
#[derive(Debug, Clone)]
pub struct JetStream {
    client: async_nats::Client,
    js: jetstream::Context,
    setup: StreamSetup,
    start_timeout: Duration,
}

impl JetStream {
    /// Publishes through `client`. At start only checks that the server answers; see
    /// [`check_stream`](JetStream::check_stream) and [`create_stream`](JetStream::create_stream).
    pub fn new(client: async_nats::Client) -> Self {
        let js = jetstream::new(client.clone());
        Self {
            client,
            js,
            setup: StreamSetup::Nothing,
            start_timeout: Duration::from_secs(5),
        }
    }

    /// At start, fail unless the stream `name` exists.
    pub fn check_stream(mut self, name: impl Into<String>) -> Self {
        self.setup = StreamSetup::Check(name.into());
        self
    }

    /// At start, create the stream `name` over `subjects` (file storage, defaults otherwise)
    /// if it does not exist.
    pub fn create_stream<I, S>(self, name: impl Into<String>, subjects: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.create_stream_with(stream::Config {
            name: name.into(),
            subjects: subjects.into_iter().map(Into::into).collect(),
            ..Default::default()
        })
    }

    /// At start, create the stream described by `config` if it does not exist.
    pub fn create_stream_with(mut self, config: stream::Config) -> Self {
        self.setup = StreamSetup::Create(Box::new(config));
        self
    }

    /// How long start waits for the server (default 5 s).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    async fn prepare_inner(&self) -> Result<(), BoxDynError> {
        self.client.flush().await?;
        match &self.setup {
            StreamSetup::Nothing => {}
            StreamSetup::Check(name) => {
                self.js.get_stream(name).await?;
            }
            StreamSetup::Create(config) => {
                self.js.get_or_create_stream((**config).clone()).await?;
            }
        }
        Ok(())
    }
}

/// Whether JetStream said no to this message for good, rather than being out of reach: the
/// message exceeds the server's `max_payload` or the stream's message or header size limit,
/// or its subject is invalid (refused by the client before sending). Any other answer of the
/// server (no space, too many messages, a leader election) is retried.
fn refused(e: &jetstream::context::PublishError) -> bool {
    use jetstream::ErrorCode;
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => true,
        PublishErrorKind::Other => match std::error::Error::source(e) {
            Some(source) => match source.downcast_ref::<jetstream::Error>() {
                Some(js) => matches!(
                    js.error_code(),
                    ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                        | ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM
                ),
                // Not an answer of the server: the client refused the subject, or could not
                // parse the ack (then the server may have stored it; publishing again is safe).
                None => source.downcast_ref::<serde_json::Error>().is_none(),
            },
            None => false,
        },
        _ => false,
    }
}

impl Broker for JetStream {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn prepare(&self) -> BoxFuture<'_, Result<(), BoxDynError>> {
        Box::pin(async move {
            match tokio::time::timeout(self.start_timeout, self.prepare_inner()).await {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "no answer from the NATS server within {:?} (connection state: {:?})",
                    self.start_timeout,
                    self.client.connection_state()
                )
                .into()),
            }
        })
    }

    fn publish<'a>(&'a self, batch: &'a [Outgoing]) -> BoxFuture<'a, Result<(), PublishError>> {
        Box::pin(async move {
            let mut acks = Vec::with_capacity(batch.len());
            let mut failed = None;
            for (i, o) in batch.iter().enumerate() {
                let mut h = HeaderMap::new();
                for (name, value) in o.headers.iter() {
                    h.insert(name, value);
                }
                h.insert("Nats-Msg-Id", o.id.as_str());
                h.insert(headers::ID, o.id.as_str());
                h.insert(headers::QUEUE, &*o.queue);
                h.insert(headers::PARTITION, o.partition.to_string().as_str());
                h.insert(headers::SEQ, o.seq.to_string().as_str());
                h.insert(headers::ENQUEUED_AT, o.enqueued_at_ms.to_string().as_str());
                let msg = PublishMessage::build()
                    .payload(Bytes::copy_from_slice(&o.payload))
                    .headers(h);
                match self.js.send_publish(o.destination.clone(), msg).await {
                    Ok(ack) => acks.push(ack),
                    Err(e) => {
                        failed = Some((i, e));
                        break;
                    }
                }
            }
            // The acks arrive in publish order; the first one missing decides.
            for (i, ack) in acks.into_iter().enumerate() {
                if let Err(e) = ack.await
                    && failed.as_ref().is_none_or(|(j, _)| i < *j)
                {
                    failed = Some((i, e));
                }
            }
            match failed {
                None => Ok(()),
                Some((index, e)) if refused(&e) => Err(PublishError::Refused {
                    index,
                    reason: reason(&e),
                }),
                Some((acked, e)) => Err(PublishError::Unavailable {
                    acked,
                    source: Box::new(e),
                }),
            }
        })
    }
}
