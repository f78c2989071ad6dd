//! How long the dashboard's overview takes to render for 8 queues x 256 partitions with a
//! large backlog (a million waiting messages by default): builds the data set, then times
//! `GET /` over HTTP (the page's one `status()` read included) and prints the median.
//!
//! ```sh
//! cargo run --release -p outbox-dashboard --example overview_speed -- [DATABASE_URL|""] [MESSAGES]
//! ```
//!
//! Without a URL it uses a temporary SQLite file. The database should be empty: the example
//! registers `speed_0` .. `speed_7` and fills them.

// An example program reports on standard output.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use outbox::{HandlerError, HandlerSpec, NewMessage, Outbox, Overrides, Profile, QueueSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const QUEUES: u32 = 8;
const PARTITIONS: u32 = 256;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = tempfile::tempdir()?;
    let url = args.next().filter(|u| !u.is_empty()).unwrap_or_else(|| {
        format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("speed.db").display()
        )
    });
    let messages: u32 = args.next().map_or(Ok(1_000_000), |s| s.parse())?;
    let mut options = outbox::sea_orm::ConnectOptions::new(url.clone());
    options.max_connections(32).sqlx_logging(false);
    let db = outbox::sea_orm::Database::connect(options).await?;

    // Register the queues, each with a handler that keeps failing its head (retried with a
    // long backoff), so the sequencer moves the whole backlog into the partitions and nothing
    // drains it.
    let mut builder = Outbox::builder(db.clone()).profile(Profile::HighThroughput);
    for q in 0..QUEUES {
        let name: &'static str = Box::leak(format!("speed_{q}").into_boxed_str());
        builder = builder.queue(QueueSpec::new(name, PARTITIONS)).handler(
            HandlerSpec::transactional(name, "held", |_m, _txn| {
                Box::pin(async { Err(HandlerError::retry("held for the measurement")) })
            })
            .overrides(
                Overrides::NONE
                    .max_attempts(1_000_000)
                    .backoff_base(Duration::from_secs(600))
                    .backoff_max(Duration::from_secs(600)),
            ),
        );
    }
    let rt = builder.start().await?;
    let started = Instant::now();
    let batch = 5_000;
    let mut sent = 0;
    while sent < messages {
        let n = batch.min(messages - sent);
        let msgs: Vec<_> = (sent..sent + n)
            .map(|i| {
                NewMessage::new(
                    format!("speed_{}", i % QUEUES),
                    (i / QUEUES) % PARTITIONS,
                    format!(r#"{{"i":{i}}}"#),
                )
            })
            .collect();
        rt.outbox().enqueue_batch(&db, &msgs).await?;
        sent += n;
    }
    println!("enqueued {messages} messages in {:.1?}", started.elapsed());
    loop {
        let s = rt.outbox().status().await?;
        let unsequenced: i64 = s.queues.iter().map(|q| q.unsequenced).sum();
        if unsequenced == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("sequenced after {:.1?}", started.elapsed());
    rt.shutdown(Duration::from_secs(10)).await?;
    // What autovacuum does a little later after a bulk load: fresh planner statistics.
    if db.get_database_backend() == outbox::sea_orm::DbBackend::Postgres {
        use outbox::sea_orm::ConnectionTrait as _;
        db.execute_unprepared("ANALYZE").await?;
    }

    // The dashboard on an admin outbox, as `outbox serve` runs it.
    let admin = Outbox::admin(db.clone(), outbox::DEFAULT_TABLE_PREFIX)?;
    let waiting: i64 = admin
        .status()
        .await?
        .queues
        .iter()
        .flat_map(|q| q.handlers.iter().map(|h| h.waiting))
        .sum();
    // The engine's status read alone, to tell it from the rendering.
    let mut reads = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        admin.status().await?;
        reads.push(t.elapsed());
    }
    reads.sort();
    let app = outbox_dashboard::router(admin, outbox_dashboard::Config::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..21 {
        let t = Instant::now();
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut page = Vec::new();
        s.read_to_end(&mut page).await?;
        times.push(t.elapsed());
        bytes = page.len();
        if !page.starts_with(b"HTTP/1.1 200") {
            return Err(format!("overview failed: {}", String::from_utf8_lossy(&page)).into());
        }
    }
    times.sort();
    println!(
        "{} backend, {QUEUES} queues x {PARTITIONS} partitions, {waiting} waiting: overview in {:.1?} median ({:.1?} .. {:.1?}), {bytes} bytes; of which Outbox::status() {:.1?} median",
        url.split(':').next().unwrap_or("?"),
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        reads[reads.len() / 2],
    );
    Ok(())
}
