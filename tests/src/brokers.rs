//! Brokers for the relay tests: the shared NATS and RabbitMQ servers, private `nats-server`
//! processes that a test may kill and restart, and readers of what a JetStream stream holds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outbox::relay::nats::async_nats;
use outbox::relay::nats::async_nats::jetstream;
use outbox::relay::rabbitmq::lapin;

/// URL of the shared broker named by `var`, or a panic when `OUTBOX_TEST_REQUIRE` names it
/// and it is not set (the test is compiled as ignored when it is neither set nor required).
fn url(var: &str, name: &str) -> String {
    match std::env::var(var) {
        Ok(u) if !u.is_empty() => u,
        _ => panic!(
            "{var} is not set (OUTBOX_TEST_REQUIRE asks for `{name}`, or the test was run with --ignored)"
        ),
    }
}

/// The shared NATS server (`OUTBOX_TEST_NATS_URL`, for example `nats://127.0.0.1:4222`).
pub fn nats_url() -> String {
    url("OUTBOX_TEST_NATS_URL", "nats")
}

/// The shared RabbitMQ (`OUTBOX_TEST_RABBITMQ_URL`, `amqp://guest:guest@127.0.0.1:5672/%2f`).
pub fn rabbitmq_url() -> String {
    url("OUTBOX_TEST_RABBITMQ_URL", "rabbitmq")
}

/// A fresh name for a stream, subject prefix or exchange: `<prefix><12 hex digits>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{:012x}", rand::random::<u64>() >> 16)
}

/// Connects to the NATS server at `url`, failing the test if it does not answer.
pub async fn nats(url: &str) -> async_nats::Client {
    async_nats::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to NATS at {url}: {e}"))
}

/// A private `nats-server -js` on a free port with its own store, to kill and restart.
#[derive(Debug)]
pub struct NatsServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts one and waits until it accepts connections.
    pub async fn start() -> NatsServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind a free port")
            .local_addr()
            .expect("local addr")
            .port();
        let mut s = NatsServer {
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        s.restart().await;
        s
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills it with SIGKILL (no-op if it is not running).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it (again) on the same port and store, and waits until it accepts connections.
    pub async fn restart(&mut self) {
        self.kill();
        let child = Command::new("/usr/sbin/nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start /usr/sbin/nats-server");
        self.child = Some(child);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("nats-server on port {} did not start", self.port);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One message as a JetStream stream stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The stream's sequence.
    pub stream_seq: u64,
    /// The subject.
    pub subject: String,
    /// The `Outbox-Id` header.
    pub id: String,
    /// The `Nats-Msg-Id` header.
    pub nats_id: String,
    /// `Outbox-Partition`.
    pub partition: u32,
    /// `Outbox-Seq`.
    pub seq: i64,
    /// The payload as text.
    pub body: String,
    /// Every header, by name (the first value of each).
    pub headers: BTreeMap<String, String>,
}

/// Everything `stream` holds, in stream order.
pub async fn stream_messages(js: &jetstream::Context, stream: &str) -> Vec<Stored> {
    let mut s = js.get_stream(stream).await.expect("get stream");
    let state = s.info().await.expect("stream info").state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let m = s.get_raw_message(seq).await.expect("get stored message");
        let h = |name: &str| {
            m.headers
                .get(name)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        out.push(Stored {
            stream_seq: m.sequence,
            subject: m.subject.to_string(),
            id: h("Outbox-Id"),
            nats_id: h("Nats-Msg-Id"),
            partition: h("Outbox-Partition").parse().expect("partition header"),
            seq: h("Outbox-Seq").parse().expect("seq header"),
            body: String::from_utf8_lossy(&m.payload).into_owned(),
            headers: m
                .headers
                .iter()
                .filter_map(|(k, v)| Some((k.to_string(), v.first()?.as_str().to_owned())))
                .collect(),
        });
    }
    out
}

/// How many messages `stream` holds.
pub async fn stream_len(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Checks what a broker received against what was committed: `bodies` as `key:n` texts.
/// Every committed body arrived exactly once, nothing else arrived, and each key's messages
/// arrived in increasing `n`. Returns a description of the first problem.
pub fn check_delivery(received: &[String], committed: &[String]) -> Result<(), String> {
    let mut seen = HashSet::new();
    for b in received {
        if !seen.insert(b.as_str()) {
            return Err(format!("duplicate: {b}"));
        }
    }
    let want: HashSet<&str> = committed.iter().map(String::as_str).collect();
    if let Some(extra) = seen.difference(&want).next() {
        return Err(format!("arrived but never committed: {extra}"));
    }
    let mut missing: Vec<&&str> = want.difference(&seen).collect();
    missing.sort();
    if let Some(m) = missing.first() {
        return Err(format!(
            "{} committed message(s) missing, first {m}",
            missing.len()
        ));
    }
    let mut last: HashMap<&str, u64> = HashMap::new();
    for b in received {
        let (k, n) = b
            .split_once(':')
            .ok_or_else(|| format!("body {b} is not key:n"))?;
        let n: u64 = n.parse().map_err(|_| format!("body {b} is not key:n"))?;
        if let Some(prev) = last.insert(k, n)
            && prev >= n
        {
            return Err(format!("key {k}: {n} arrived after {prev}"));
        }
    }
    Ok(())
}

/// One message as a RabbitMQ queue delivered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// AMQP `message_id`.
    pub id: String,
    /// AMQP `delivery_mode` (2: persistent).
    pub delivery_mode: u8,
    /// The routing key.
    pub routing_key: String,
    /// The payload as text.
    pub body: String,
    /// The AMQP headers whose values are strings, by name.
    pub headers: BTreeMap<String, String>,
}

/// Takes every message now in the RabbitMQ queue `queue` (auto-ack), in queue order.
pub async fn drain_queue(ch: &lapin::Channel, queue: &str) -> Vec<Delivered> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
    {
        let d = m.delivery;
        out.push(Delivered {
            id: d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
            delivery_mode: d.properties.delivery_mode().unwrap_or(0),
            routing_key: d.routing_key.as_str().to_owned(),
            body: String::from_utf8_lossy(&d.data).into_owned(),
            headers: d
                .properties
                .headers()
                .as_ref()
                .map(|t| {
                    t.inner()
                        .iter()
                        .filter_map(|(k, v)| match v {
                            lapin::types::AMQPValue::LongString(s) => {
                                Some((k.to_string(), s.to_string()))
                            }
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    out
}

/// Checks an at-least-once delivery: every copy of a body carries the same id, and the
/// first copies alone pass [`check_delivery`]. Returns the first copies and how many
/// duplicates there were.
pub fn check_at_least_once(
    received: &[Delivered],
    committed: &[String],
) -> Result<(Vec<Delivered>, usize), String> {
    let mut ids: HashMap<&str, &str> = HashMap::new();
    let mut firsts = Vec::new();
    for d in received {
        match ids.get(d.body.as_str()) {
            Some(id) if *id != d.id => {
                return Err(format!(
                    "body {} arrived with ids {id} and {}",
                    d.body, d.id
                ));
            }
            Some(_) => {}
            None => {
                ids.insert(&d.body, &d.id);
                firsts.push(d.clone());
            }
        }
    }
    let bodies: Vec<String> = firsts.iter().map(|d| d.body.clone()).collect();
    check_delivery(&bodies, committed)?;
    Ok((firsts, received.len() - bodies.len()))
}
