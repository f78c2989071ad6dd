//! A worker process for the clock-skew tests: runs a leased handler on queue `clock` against
//! `--url`, with its own (possibly skewed) clock, and proves that no two processes ever run one
//! partition at once.
//!
//! Each call enters the partition by setting `occupancy.holder` from NULL to this process's id
//! (autocommit); finding it taken means another process runs the partition right now, which
//! is recorded in `overlap_log`. It then works `--work-ms`, records the run in `runs`, and leaves.
//! Lines on stdout: `ready`, `inside <partition> <seq>`, `done <partition> <seq>`.

use std::io::Write;
use std::time::Duration;

use outbox::sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
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

async fn exec(db: &DatabaseConnection, sql: &str, values: Vec<outbox::sea_orm::Value>) -> u64 {
    let backend = db.get_database_backend();
    let sql = if backend == DbBackend::Postgres {
        let mut n = 0;
        sql.chars()
            .map(|c| {
                if c == '?' {
                    n += 1;
                    format!("${n}")
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        sql.to_owned()
    };
    db.execute_raw(Statement::from_sql_and_values(backend, sql, values))
        .await
        .expect("statement")
        .rows_affected()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = arg("--url").expect("--url");
    let partitions: u32 = arg("--partitions")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1);
    let work = Duration::from_millis(
        arg("--work-ms")
            .and_then(|p| p.parse().ok())
            .unwrap_or(1_000),
    );
    let lease = Duration::from_millis(
        arg("--lease-ms")
            .and_then(|p| p.parse().ok())
            .unwrap_or(3_000),
    );
    let me = i64::from(std::process::id());
    let mut o = outbox::sea_orm::ConnectOptions::new(url);
    o.max_connections(8).sqlx_logging(false);
    let db = outbox::sea_orm::Database::connect(o)
        .await
        .expect("connect");
    let knobs = Overrides::NONE
        .batch_size(1)
        .lease(lease)
        .lease_headroom(Duration::from_millis(500))
        .max_attempts(1_000);
    let handler_db = db.clone();
    let running = Outbox::builder(db)
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("clock", partitions).overrides(knobs))
        .handler(HandlerSpec::leased("clock", "lease", move |m, _ctx| {
            let db = handler_db.clone();
            let (p, seq) = (i64::from(m.partition()), m.seq());
            Box::pin(async move {
                say(&format!("inside {p} {seq}"));
                let entered = exec(
                    &db,
                    "UPDATE occupancy SET holder = ? WHERE partition_no = ? AND holder IS NULL",
                    vec![me.into(), p.into()],
                )
                .await;
                if entered == 0 {
                    exec(
                        &db,
                        "INSERT INTO overlap_log (partition_no, seq, pid) VALUES (?, ?, ?)",
                        vec![p.into(), seq.into(), me.into()],
                    )
                    .await;
                }
                tokio::time::sleep(work).await;
                exec(
                    &db,
                    "INSERT INTO runs (partition_no, seq, pid) VALUES (?, ?, ?)",
                    vec![p.into(), seq.into(), me.into()],
                )
                .await;
                if entered > 0 {
                    exec(
                        &db,
                        "UPDATE occupancy SET holder = NULL WHERE partition_no = ? AND holder = ?",
                        vec![p.into(), me.into()],
                    )
                    .await;
                }
                say(&format!("done {p} {seq}"));
                Ok(())
            })
        }))
        .start()
        .await
        .expect("start");
    say("ready");
    let _ = tokio::task::spawn_blocking(|| {
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
    })
    .await;
    let _ = running.shutdown(Duration::from_secs(10)).await;
}
