//! `outbox serve`: the real binary serves the dashboard on a free local port against a real
//! database; pages come back over plain HTTP and an action without login is refused.

use std::sync::Arc;
use std::time::Duration;

use outbox::{HandlerError, HandlerSpec, NewMessage, Outbox, Profile, QueueSpec};
use outbox_tests::{TestDb, eventually, on_every_backend};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// One plain HTTP/1.1 request; returns the status code and the body.
async fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

async fn serves_the_dashboard(t: Arc<TestDb>) {
    let db = t.pool(16).await;
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("served", 2))
        .handler(HandlerSpec::transactional("served", "h", |_m, _txn| {
            Box::pin(async { Err(HandlerError::reject("no")) })
        }))
        .start()
        .await
        .expect("start");
    rt.outbox()
        .enqueue(
            &db,
            NewMessage::new("served", 1, r#"{"secret":"personal"}"#),
        )
        .await
        .expect("enqueue");
    eventually(Duration::from_secs(30), "a dead letter", || async {
        rt.outbox()
            .count_dead_letters(&outbox::DeadLetterFilter::all())
            .await
            .is_ok_and(|n| n == 1)
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    let id = rt
        .outbox()
        .dead_letters(&outbox::DeadLetterFilter::all(), 0, 1)
        .await
        .expect("list")[0]
        .id;

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
        .env("DATABASE_URL", &t.url)
        .env_remove("OUTBOX_DASHBOARD_TOKEN")
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--hide-payloads",
            "--token",
            "t0ken",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start outbox serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .expect("serve prints its address")
    .expect("read");
    assert!(line.contains("actions after login"), "{line}");
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("an address")
        .to_owned();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    let (code, page) = http(&addr, "GET", "/", "").await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains(r#"id="h-served-h""#), "{page}");
    let (code, page) = http(&addr, "GET", &format!("/dead-letters/{id}"), "").await;
    assert_eq!(code, 200);
    assert!(
        page.contains("payload-hidden") && !page.contains("personal"),
        "{page}"
    );
    let (code, _) = http(
        &addr,
        "POST",
        &format!("/dead-letters/{id}/discard"),
        "csrf=x",
    )
    .await;
    assert_eq!(code, 403, "no login, no action");
    assert!(
        rt.outbox().dead_letter(id).await.is_ok(),
        "nothing was discarded"
    );
    let (code, _) = http(&addr, "GET", "/queues/nope", "").await;
    assert_eq!(code, 404);
    // Guessing the token: ten wrong ones are refused one by one, then every attempt is
    // refused for the rest of the minute, the right token too.
    for i in 0..10 {
        let (code, _) = http(&addr, "POST", "/login", &format!("token=guess{i}")).await;
        assert_eq!(code, 403, "wrong token {i}");
    }
    let (code, page) = http(&addr, "POST", "/login", "token=t0ken").await;
    assert_eq!(code, 429, "{page}");
    assert!(page.contains("try again in"), "{page}");
    child.kill().await.ok();
}

on_every_backend!(serves_the_dashboard);

#[test]
fn serve_refuses_a_relative_mount_path() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("db").display());
    let migrate = std::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["--database-url", &url, "migrate"])
        .output()
        .expect("run");
    assert!(migrate.status.success());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["--database-url", &url, "serve", "--mount-path", "outbox"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mount-path"));
}
