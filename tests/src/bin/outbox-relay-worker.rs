//! A relay process for the kill tests: relays queue `relay` of the database at `--url` into
//! the JetStream stream `--stream` (subjects `<--prefix>.<partition>`), or with
//! `--amqp <url> --routing <key>` into RabbitMQ's default exchange, until stdin closes or it is
//! killed. Prints `ready` once started.
//!
//! `--ack-delay-ms N` holds each batch for up to N ms (random) after the broker acked it and
//! before the relay moves the cursor: a kill then often lands between publish and ack, the
//! moment that makes a relay publish a message twice.

use std::io::Write;
use std::time::Duration;

use outbox::relay::nats::{JetStream, async_nats};
use outbox::relay::rabbitmq::RabbitMq;
use outbox::relay::{BoxFuture, Broker, Outgoing, PublishError, RelaySpec};
use outbox::{Outbox, Overrides, Profile, QueueSpec};

fn arg(name: &str) -> Option<String> {
    let mut args = std::env::args();
    while let Some(a) = args.next() {
        if a == name {
            return args.next();
        }
    }
    None
}

/// A broker, with a pause after each acked batch.
struct SlowAck<B> {
    inner: B,
    max_delay_ms: u64,
}

impl<B: Broker> Broker for SlowAck<B> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn prepare(&self) -> BoxFuture<'_, Result<(), outbox::BoxDynError>> {
        self.inner.prepare()
    }

    fn publish<'a>(&'a self, batch: &'a [Outgoing]) -> BoxFuture<'a, Result<(), PublishError>> {
        Box::pin(async move {
            self.inner.publish(batch).await?;
            if self.max_delay_ms > 0 {
                let ms = rand::random_range(0..=self.max_delay_ms);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            Ok(())
        })
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = arg("--url").expect("--url");
    let partitions: u32 = arg("--partitions")
        .and_then(|p| p.parse().ok())
        .unwrap_or(4);
    let mut o = outbox::sea_orm::ConnectOptions::new(url);
    o.max_connections(8).sqlx_logging(false);
    let db = outbox::sea_orm::Database::connect(o)
        .await
        .expect("connect");
    let max_delay_ms = arg("--ack-delay-ms")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let spec = match arg("--amqp") {
        Some(amqp) => {
            let routing = arg("--routing").expect("--routing");
            let inner = RabbitMq::new(amqp, "");
            RelaySpec::new(
                "relay",
                SlowAck {
                    inner,
                    max_delay_ms,
                },
                routing,
            )
        }
        None => {
            let nats = arg("--nats").expect("--nats");
            let stream = arg("--stream").expect("--stream");
            let prefix = arg("--prefix").expect("--prefix");
            let client = async_nats::connect(nats).await.expect("connect to NATS");
            let inner = JetStream::new(client).check_stream(stream);
            let subject = format!("{prefix}.{{partition}}");
            RelaySpec::new(
                "relay",
                SlowAck {
                    inner,
                    max_delay_ms,
                },
                subject,
            )
        }
    };
    let knobs = Overrides::NONE
        .batch_size(8)
        .lease(Duration::from_millis(1_000))
        .lease_headroom(Duration::from_millis(300))
        .max_attempts(1_000);
    let running = Outbox::builder(db)
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("relay", partitions))
        .relay(spec.overrides(knobs))
        .start()
        .await
        .expect("start");
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "ready");
        let _ = out.flush();
    }
    let _ = tokio::task::spawn_blocking(|| {
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
    })
    .await;
    let _ = running.shutdown(Duration::from_secs(10)).await;
}
