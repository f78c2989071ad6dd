//! Leases, their takeover and the ack fence are judged by the database's clock (issue 11):
//! worker processes whose own clocks are 30 s ahead or behind (libfaketime preloaded into
//! them) neither take over a live lease, nor delay the recovery of a crashed worker's lease.
//! Every handler call proves it holds its partition alone (`outbox-lease-worker`).
//!
//! SQLite is skipped: its processes read the host's clock, which they share, so a skewed
//! clock would skew the database's own.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use outbox::sea_orm::{ConnectionTrait, DatabaseConnection};
use outbox::{NewMessage, Outbox, QueueSpec};
use outbox_tests::{Kind, TestDb, eventually, scalar};

const LEASE_MS: u64 = 3_000;

struct Worker {
    child: Child,
    pid: u32,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a lease worker whose clock is `skew` off (`"+30s"`, `"-30s"` or `""`).
fn spawn(
    url: &str,
    skew: &str,
    work_ms: u64,
    partitions: u32,
    tx: &Sender<(u32, String)>,
) -> Worker {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox-lease-worker"));
    cmd.args([
        "--url",
        url,
        "--work-ms",
        &work_ms.to_string(),
        "--lease-ms",
        &LEASE_MS.to_string(),
        "--partitions",
        &partitions.to_string(),
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if !skew.is_empty() {
        cmd.env("LD_PRELOAD", env!("OUTBOX_FAKETIME_LIB"))
            .env("FAKETIME", skew)
            // Timers keep the real monotonic clock; only the wall clock is skewed.
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env("FAKETIME_NO_CACHE", "1");
    }
    let mut child = cmd.spawn().expect("spawn lease worker");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let tx = tx.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send((pid, line)).is_err() {
                break;
            }
        }
    });
    Worker { child, pid }
}

/// Waits for a line from `pid` matching `pred`, at most `within`.
fn wait_line(
    rx: &Receiver<(u32, String)>,
    pid: Option<u32>,
    within: Duration,
    pred: impl Fn(&str) -> bool,
) -> Option<(u32, String)> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match rx.recv_timeout(left) {
            Ok((p, l)) if pid.is_none_or(|x| x == p) && pred(&l) => return Some((p, l)),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

async fn setup(t: &TestDb, partitions: u32) -> (DatabaseConnection, Outbox) {
    let db = t.pool(4).await;
    for sql in [
        "CREATE TABLE occupancy (partition_no BIGINT PRIMARY KEY, holder BIGINT)".to_owned(),
        "CREATE TABLE overlap_log (partition_no BIGINT NOT NULL, seq BIGINT NOT NULL, pid BIGINT NOT NULL)".to_owned(),
        "CREATE TABLE runs (partition_no BIGINT NOT NULL, seq BIGINT NOT NULL, pid BIGINT NOT NULL)".to_owned(),
    ] {
        db.execute_unprepared(&sql).await.expect("table");
    }
    for p in 0..partitions {
        db.execute_unprepared(&format!(
            "INSERT INTO occupancy (partition_no) VALUES ({p})"
        ))
        .await
        .expect("occupancy row");
    }
    let producer = Outbox::builder(db.clone())
        .queue(QueueSpec::new("clock", partitions))
        .connect()
        .await
        .expect("connect");
    (db, producer)
}

/// A process whose clock runs 30 s ahead sees every lease of the others as long expired by
/// its own clock; judged by the database's clock it never takes over a live one: no partition
/// is ever run by two processes at once, and every message runs once.
async fn a_process_ahead_never_takes_over_a_live_lease(t: Arc<TestDb>) {
    let partitions = 2;
    let per_partition = 4;
    let (db, producer) = setup(&t, partitions).await;
    let (tx, rx) = channel();
    let normal = spawn(&t.url, "", 1_500, partitions, &tx);
    assert!(
        wait_line(&rx, Some(normal.pid), Duration::from_secs(60), |l| l
            == "ready")
        .is_some()
    );
    let batch: Vec<_> = (0..partitions * per_partition)
        .map(|i| NewMessage::new("clock", i % partitions, format!("{i}")))
        .collect();
    producer.enqueue_batch(&db, &batch).await.expect("enqueue");
    // The skewed process joins while the normal one holds leases.
    assert!(
        wait_line(&rx, Some(normal.pid), Duration::from_secs(30), |l| l
            .starts_with("inside"))
        .is_some()
    );
    let ahead = spawn(&t.url, "+30s", 1_500, partitions, &tx);
    assert!(
        wait_line(&rx, Some(ahead.pid), Duration::from_secs(60), |l| l
            == "ready")
        .is_some()
    );
    let total = i64::from(partitions * per_partition);
    eventually(Duration::from_secs(120), "every message run", || async {
        scalar(
            &db,
            "SELECT COUNT(DISTINCT partition_no * 1000 + seq) FROM runs",
        )
        .await
            == total
    })
    .await;
    drop((normal, ahead));
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) FROM overlap_log").await,
        0,
        "two processes ran one partition at once"
    );
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) FROM runs").await,
        total,
        "a message ran twice"
    );
}

/// A worker crashes holding a lease; the survivor's clock runs 30 s behind. Judged by the
/// database's clock it takes the lease over once it expires (3 s), not 30 s later.
async fn a_process_behind_recovers_a_crashed_lease_on_time(t: Arc<TestDb>) {
    let (db, producer) = setup(&t, 1).await;
    let (tx, rx) = channel();
    let mut doomed = spawn(&t.url, "", 60_000, 1, &tx);
    assert!(
        wait_line(&rx, Some(doomed.pid), Duration::from_secs(60), |l| l
            == "ready")
        .is_some()
    );
    producer
        .enqueue(&db, NewMessage::new("clock", 0, "m"))
        .await
        .expect("enqueue");
    assert!(
        wait_line(&rx, Some(doomed.pid), Duration::from_secs(30), |l| l
            == "inside 0 1")
        .is_some(),
        "the first worker holds the lease"
    );
    let behind = spawn(&t.url, "-30s", 200, 1, &tx);
    assert!(
        wait_line(&rx, Some(behind.pid), Duration::from_secs(60), |l| l
            == "ready")
        .is_some()
    );
    let survivor_pid = behind.pid;
    doomed.child.kill().expect("SIGKILL the holder");
    let killed_at = Instant::now();
    db.execute_unprepared("UPDATE occupancy SET holder = NULL")
        .await
        .expect("free the partition");
    let taken = wait_line(&rx, Some(survivor_pid), Duration::from_secs(25), |l| {
        l == "inside 0 1"
    });
    let waited = killed_at.elapsed();
    assert!(
        taken.is_some(),
        "the survivor did not take the lease over within 25 s"
    );
    assert!(
        waited < Duration::from_millis(LEASE_MS) + Duration::from_secs(10),
        "recovery waited {waited:?}: the lease was judged by the survivor's clock"
    );
    drop(behind);
}

mod postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        outbox_no_postgres,
        ignore = "skipped: OUTBOX_TEST_POSTGRES_URL is not set"
    )]
    #[cfg_attr(
        all(outbox_no_faketime, not(outbox_no_postgres)),
        ignore = "skipped: libfaketime is not installed"
    )]
    async fn a_process_ahead_never_takes_over_a_live_lease() {
        outbox_tests::run(
            super::Kind::Postgres,
            super::a_process_ahead_never_takes_over_a_live_lease,
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        outbox_no_postgres,
        ignore = "skipped: OUTBOX_TEST_POSTGRES_URL is not set"
    )]
    #[cfg_attr(
        all(outbox_no_faketime, not(outbox_no_postgres)),
        ignore = "skipped: libfaketime is not installed"
    )]
    async fn a_process_behind_recovers_a_crashed_lease_on_time() {
        outbox_tests::run(
            super::Kind::Postgres,
            super::a_process_behind_recovers_a_crashed_lease_on_time,
        )
        .await
    }
}

mod mysql {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(outbox_no_mysql, ignore = "skipped: OUTBOX_TEST_MYSQL_URL is not set")]
    #[cfg_attr(
        all(outbox_no_faketime, not(outbox_no_mysql)),
        ignore = "skipped: libfaketime is not installed"
    )]
    async fn a_process_ahead_never_takes_over_a_live_lease() {
        outbox_tests::run(
            super::Kind::Mysql,
            super::a_process_ahead_never_takes_over_a_live_lease,
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(outbox_no_mysql, ignore = "skipped: OUTBOX_TEST_MYSQL_URL is not set")]
    #[cfg_attr(
        all(outbox_no_faketime, not(outbox_no_mysql)),
        ignore = "skipped: libfaketime is not installed"
    )]
    async fn a_process_behind_recovers_a_crashed_lease_on_time() {
        outbox_tests::run(
            super::Kind::Mysql,
            super::a_process_behind_recovers_a_crashed_lease_on_time,
        )
        .await
    }
}

mod sqlite {
    #[test]
    #[ignore = "skipped on SQLite: its processes share the host's clock, which is the database's clock"]
    fn a_process_ahead_never_takes_over_a_live_lease() {}

    #[test]
    #[ignore = "skipped on SQLite: its processes share the host's clock, which is the database's clock"]
    fn a_process_behind_recovers_a_crashed_lease_on_time() {}
}
