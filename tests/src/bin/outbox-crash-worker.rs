//! A worker process for the crash tests: runs the outbox runtime against `--url` and reports
//! on stdout what its handlers do, so the parent test can SIGKILL it at chosen points.
//!
//! Lines: `ready`, `inside <handler> <partition> <seq>` (inside the handler, after a
//! transactional handler wrote its effect row, before the commit), `done <handler> <partition>
//! <seq>` (the handler returns Ok). After `inside` the handler pauses `--pause-ms`, which gives
//! the parent time to kill it right there.

use std::io::Write;
use std::time::Duration;

use outbox::{HandlerSpec, Outbox, Overrides, Profile, QueueSpec};

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn arg(name: &str) -> Option<String> {
    let mut args = std::env::args();
    while let Some(a) = args.next() {
        if a == name {
            return args.next();
        }
    }
    None
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = arg("--url").expect("--url");
    let partitions: u32 = arg("--partitions")
        .and_then(|p| p.parse().ok())
        .unwrap_or(8);
    let pause = Duration::from_millis(arg("--pause-ms").and_then(|p| p.parse().ok()).unwrap_or(5));
    let mut o = outbox::sea_orm::ConnectOptions::new(url);
    o.max_connections(10).sqlx_logging(false);
    let db = outbox::sea_orm::Database::connect(o)
        .await
        .expect("connect");
    let mut tuning = Profile::LowLatency.runtime();
    tuning.vacuum_after_acks = 50;
    tuning.vacuum_interval = Duration::from_millis(100);
    let knobs = Overrides::NONE
        .batch_size(5)
        .lease(Duration::from_millis(1_500))
        .lease_headroom(Duration::from_millis(500))
        .backoff_base(Duration::from_millis(20))
        .backoff_max(Duration::from_millis(100))
        .max_attempts(1_000);
    let running = Outbox::builder(db)
        .profile(Profile::LowLatency)
        .runtime_tuning(tuning)
        .queue(QueueSpec::new("crash", partitions).overrides(knobs))
        .handler(HandlerSpec::transactional("crash", "tx", move |m, txn| {
            Box::pin(async move {
                outbox_tests::write_effect(txn, "tx", m).await?;
                say(&format!("inside tx {} {}", m.partition(), m.seq()));
                tokio::time::sleep(pause).await;
                say(&format!("done tx {} {}", m.partition(), m.seq()));
                Ok(())
            })
        }))
        .handler(HandlerSpec::leased("crash", "lease", move |m, _ctx| {
            Box::pin(async move {
                say(&format!("inside lease {} {}", m.partition(), m.seq()));
                tokio::time::sleep(pause).await;
                say(&format!("done lease {} {}", m.partition(), m.seq()));
                Ok(())
            })
        }))
        .start()
        .await
        .expect("start");
    say("ready");
    // Runs until killed; a clean exit on stdin EOF lets the parent stop survivors gracefully.
    let _ = tokio::task::spawn_blocking(|| {
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
    })
    .await;
    let _ = running.shutdown(Duration::from_secs(5)).await;
}
