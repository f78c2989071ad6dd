//! Prometheus: the outbox's metrics (see `outbox::metrics` for the names) exposed with
//! `metrics-exporter-prometheus`, on an embedded SQLite file.
//!
//! ```text
//! cargo run -p outbox-examples --example prometheus            # handle 20 messages, print the metrics, exit
//! cargo run -p outbox-examples --example prometheus -- --serve # then keep serving them until Ctrl-C
//! curl -s http://127.0.0.1:9898/metrics                        # from another terminal
//! ```
//!
//! The outbox records through the `metrics` facade and installs nothing itself: the
//! application picks the exporter. Here its recorder is installed once at start-up and a tiny
//! HTTP endpoint renders it; in a real service, use the exporter's own HTTP listener (feature
//! `http-listener`) or your web framework's router.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use outbox::{HandlerError, LeaseContext, Profile, Queue};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Serialize, Deserialize)]
#[outbox::queue(partitions = 4)]
struct Ping {
    #[outbox(key)]
    n: u32,
}

#[outbox::handler(leased)]
async fn pong(msg: Ping, _ctx: &LeaseContext) -> Result<(), HandlerError> {
    tokio::time::sleep(Duration::from_millis(u64::from(msg.n % 5))).await;
    Ok(())
}

/// Serves `GET /metrics` (any path, really) on `addr` with the current metrics.
async fn serve(addr: &str, handle: PrometheusHandle) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("serving metrics on http://{addr}/metrics");
    loop {
        let (mut socket, _) = listener.accept().await?;
        let body = handle.render();
        tokio::spawn(async move {
            let mut request = [0_u8; 1024];
            let _ = socket.read(&mut request).await;
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let handle = PrometheusBuilder::new().install_recorder()?;
    let server = tokio::spawn(serve("127.0.0.1:9898", handle.clone()));

    let dir = tempfile::tempdir()?;
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("outbox.db").display()
    );
    let db = outbox::sea_orm::Database::connect(url.as_str()).await?;
    let running = outbox::start(db.clone(), Profile::LowLatency).await?;
    for n in 0..20 {
        Ping { n }.enqueue(&db).await?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // `status()` also refreshes the depth and lag gauges (a running outbox does it every
        // `outbox::metrics::GAUGE_INTERVAL` by itself).
        let status = running.outbox().status().await?;
        let waiting: i64 = status
            .queues
            .iter()
            .flat_map(|q| &q.handlers)
            .map(|h| h.waiting())
            .sum();
        if waiting == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("still {waiting} messages waiting").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for line in handle.render().lines() {
        if line.starts_with("outbox_") && !line.contains("quantile") {
            println!("{line}");
        }
    }
    if std::env::args().any(|a| a == "--serve") {
        println!("Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    }
    server.abort();
    running.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}
