//! Harness of the outbox integration tests: one test body, run on every configured backend.
//!
//! SQLite always runs (a fresh file per test). PostgreSQL runs when `OUTBOX_TEST_POSTGRES_URL`
//! is set and MySQL/MariaDB when `OUTBOX_TEST_MYSQL_URL` is set; each test creates its own
//! database on that server and drops it afterwards. `OUTBOX_TEST_REQUIRE=postgres,mysql` turns a
//! missing URL into a failure instead of a skip.
//!
//! Most engine tests start their runtime through [`Harness`]: enqueue, wait, and end with
//! [`Harness::finish`] (shutdown, then [`assert_invariants`]).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement,
};

/// The backends a test body runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// SQLite file in WAL mode.
    Sqlite,
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    Mysql,
}

impl Kind {
    fn env(self) -> Option<&'static str> {
        match self {
            Kind::Sqlite => None,
            Kind::Postgres => Some("OUTBOX_TEST_POSTGRES_URL"),
            Kind::Mysql => Some("OUTBOX_TEST_MYSQL_URL"),
        }
    }

    fn required(self) -> bool {
        let name = match self {
            Kind::Sqlite => return true,
            Kind::Postgres => "postgres",
            Kind::Mysql => "mysql",
        };
        std::env::var("OUTBOX_TEST_REQUIRE")
            .unwrap_or_default()
            .split(',')
            .any(|s| s.trim() == name)
    }
}

/// A fresh database for one test.
#[derive(Debug)]
pub struct TestDb {
    /// Backend kind.
    pub kind: Kind,
    /// URL of the fresh database.
    pub url: String,
    admin: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    async fn create(kind: Kind) -> Option<TestDb> {
        let suffix = format!("{:012x}", rand::random::<u64>() >> 16);
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("outbox.db").display()
                );
                Some(TestDb {
                    kind,
                    url,
                    admin: None,
                    _dir: Some(dir),
                })
            }
            Kind::Postgres | Kind::Mysql => {
                let var = kind.env().unwrap_or_default();
                let base = match std::env::var(var) {
                    Ok(u) if !u.is_empty() => u,
                    _ => {
                        assert!(
                            !kind.required(),
                            "{var} is not set but OUTBOX_TEST_REQUIRE asks for this backend"
                        );
                        eprintln!("skipped: {var} not set");
                        return None;
                    }
                };
                let name = format!("outbox_t_{suffix}");
                let admin = Database::connect(base.as_str())
                    .await
                    .expect("connect to test server");
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create test database");
                admin.close().await.ok();
                let (head, _) = base.rsplit_once('/').expect("URL with a database path");
                Some(TestDb {
                    kind,
                    url: format!("{head}/{name}"),
                    admin: Some((base, name)),
                    _dir: None,
                })
            }
        }
    }

    /// A new pool on this database.
    pub async fn pool(&self, max: u32) -> DatabaseConnection {
        let mut o = ConnectOptions::new(self.url.clone());
        o.max_connections(max)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(30))
            .sqlx_logging(false);
        Database::connect(o)
            .await
            .expect("connect to test database")
    }

    async fn drop_db(&self) {
        if let Some((base, name)) = &self.admin
            && let Ok(admin) = Database::connect(base.as_str()).await
        {
            let sql = if self.kind == Kind::Postgres {
                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            } else {
                format!("DROP DATABASE IF EXISTS {name}")
            };
            admin.execute_unprepared(&sql).await.ok();
            admin.close().await.ok();
        }
    }

    /// Size of the SQLite write-ahead log, for SQLite databases.
    pub fn sqlite_wal_bytes(&self) -> Option<u64> {
        let dir = self._dir.as_ref()?;
        std::fs::metadata(dir.path().join("outbox.db-wal"))
            .ok()
            .map(|m| m.len())
    }

    /// Whether two write transactions can be open at once (not on SQLite).
    pub fn concurrent_writers(&self) -> bool {
        self.kind != Kind::Sqlite
    }
}

/// Runs `body` on a fresh database of `kind` (or skips if the backend is not configured).
pub async fn run<F, Fut>(kind: Kind, body: F)
where
    F: FnOnce(Arc<TestDb>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OUTBOX_TEST_LOG")
                .unwrap_or_else(|_| "off".into()),
        )
        .with_test_writer()
        .try_init();
    let Some(db) = TestDb::create(kind).await else {
        return;
    };
    let db = Arc::new(db);
    let result = tokio::spawn(body(db.clone())).await;
    db.drop_db().await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Expands test bodies into one `#[tokio::test]` per backend: `mod sqlite`, `mod postgres`,
/// `mod mysql`.
///
/// A server backend whose URL is not set shows its tests as `ignored` (see `build.rs`). A test
/// that does not apply to a backend says so with `#[skip(backend = "why")]` before its name; it
/// is then reported as ignored with that reason on that backend, never as passed:
///
/// ```ignore
/// on_every_backend!(
///     runs_everywhere,
///     #[skip(sqlite = "one writer: nothing else can hold a partition")]
///     needs_concurrent_writers,
/// );
/// ```
#[macro_export]
macro_rules! on_every_backend {
    ($( $(#[skip($($b:ident = $why:literal),+ $(,)?)])? $name:ident ),* $(,)?) => {
        mod sqlite {
            $( $crate::__backend_test!(sqlite, Sqlite, $name, [$($($b = $why),+)?]); )*
        }
        mod postgres {
            $( $crate::__backend_test!(postgres, Postgres, $name, [$($($b = $why),+)?]); )*
        }
        mod mysql {
            $( $crate::__backend_test!(mysql, Mysql, $name, [$($($b = $why),+)?]); )*
        }
    };
}

/// Like [`on_every_backend!`], for tests that also need a broker: `$no` is the broker's cfg
/// (`outbox_no_nats`, `outbox_no_rabbitmq`, set by `build.rs` when its URL is neither set nor
/// required), and the tests show as ignored with `$why` when it is set.
///
/// ```ignore
/// on_every_backend_with_broker!(outbox_no_nats, "skipped: OUTBOX_TEST_NATS_URL is not set"; relays, chaos);
/// ```
#[macro_export]
macro_rules! on_every_backend_with_broker {
    ($no:ident, $why:literal; $( $name:ident ),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[cfg_attr($no, ignore = $why)]
                async fn $name() {
                    $crate::run($crate::Kind::Sqlite, super::$name).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[cfg_attr(
                    any(outbox_no_postgres, $no),
                    ignore = "skipped: OUTBOX_TEST_POSTGRES_URL or the broker's URL is not set"
                )]
                async fn $name() {
                    $crate::run($crate::Kind::Postgres, super::$name).await
                }
            )*
        }
        mod mysql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[cfg_attr(
                    any(outbox_no_mysql, $no),
                    ignore = "skipped: OUTBOX_TEST_MYSQL_URL or the broker's URL is not set"
                )]
                async fn $name() {
                    $crate::run($crate::Kind::Mysql, super::$name).await
                }
            )*
        }
    };
}

/// One backend's test of [`on_every_backend!`]: skipped when listed, else run.
#[doc(hidden)]
#[macro_export]
macro_rules! __backend_test {
    (sqlite, $kind:ident, $name:ident, [sqlite = $why:literal $(, $($rest:tt)*)?]) => {
        $crate::__backend_test!(@skip $name, $why);
    };
    (postgres, $kind:ident, $name:ident, [postgres = $why:literal $(, $($rest:tt)*)?]) => {
        $crate::__backend_test!(@skip $name, $why);
    };
    (mysql, $kind:ident, $name:ident, [mysql = $why:literal $(, $($rest:tt)*)?]) => {
        $crate::__backend_test!(@skip $name, $why);
    };
    ($b:ident, $kind:ident, $name:ident, [$other:ident = $why:literal $(, $($rest:tt)*)?]) => {
        $crate::__backend_test!($b, $kind, $name, [$($($rest)*)?]);
    };
    (sqlite, $kind:ident, $name:ident, []) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $crate::run($crate::Kind::$kind, super::$name).await
        }
    };
    (postgres, $kind:ident, $name:ident, []) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[cfg_attr(outbox_no_postgres, ignore = "skipped: OUTBOX_TEST_POSTGRES_URL is not set")]
        async fn $name() {
            $crate::run($crate::Kind::$kind, super::$name).await
        }
    };
    (mysql, $kind:ident, $name:ident, []) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[cfg_attr(outbox_no_mysql, ignore = "skipped: OUTBOX_TEST_MYSQL_URL is not set")]
        async fn $name() {
            $crate::run($crate::Kind::$kind, super::$name).await
        }
    };
    (@skip $name:ident, $why:literal) => {
        #[test]
        #[ignore = $why]
        fn $name() {
            // Reported as ignored with the reason; running it with `--ignored` does nothing.
            let _ = super::$name;
        }
    };
}

/// What handlers saw, in the order they saw it.
#[derive(Debug, Clone, Default)]
pub struct Seen(Arc<Mutex<Vec<Delivery>>>);

/// One delivery to a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Handler name.
    pub handler: String,
    /// Partition.
    pub partition: u32,
    /// Sequence number.
    pub seq: i64,
    /// Payload as text.
    pub body: String,
    /// Attempt number.
    pub attempt: u32,
}

impl Seen {
    /// Records a delivery.
    pub fn push(&self, handler: &str, m: &outbox::Message) {
        self.0.lock().expect("seen lock").push(Delivery {
            handler: handler.to_owned(),
            partition: m.partition(),
            seq: m.seq(),
            body: String::from_utf8_lossy(m.payload()).into_owned(),
            attempt: m.attempt(),
        });
    }

    /// Every delivery so far.
    pub fn all(&self) -> Vec<Delivery> {
        self.0.lock().expect("seen lock").clone()
    }

    /// Deliveries of one handler.
    pub fn of(&self, handler: &str) -> Vec<Delivery> {
        self.all()
            .into_iter()
            .filter(|d| d.handler == handler)
            .collect()
    }

    /// Waits until `pred` holds for the deliveries, or panics after `timeout`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[Delivery]) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(&self.all()) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; seen: {:?}",
                summary(&self.all())
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn summary(d: &[Delivery]) -> String {
    if d.len() <= 20 {
        format!("{d:?}")
    } else {
        format!("{} deliveries, last {:?}", d.len(), &d[d.len() - 5..])
    }
}

/// Waits until an async condition holds, or panics after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a query returning one integer.
pub async fn scalar<C: ConnectionTrait>(c: &C, sql: &str) -> i64 {
    let row = c
        .query_one_raw(Statement::from_string(
            c.get_database_backend(),
            sql.to_owned(),
        ))
        .await
        .expect("query")
        .expect("a row");
    row.try_get_by_index::<i64>(0).expect("an integer")
}

/// Creates the business table the handlers write to: one row per effect.
pub async fn create_effects_table(db: &DatabaseConnection) {
    let sql = match db.get_database_backend() {
        DbBackend::Postgres => {
            "CREATE TABLE effects (id BIGSERIAL PRIMARY KEY, handler TEXT NOT NULL, partition_no BIGINT NOT NULL, seq BIGINT NOT NULL, body TEXT NOT NULL)"
        }
        DbBackend::MySql => {
            "CREATE TABLE effects (id BIGINT AUTO_INCREMENT PRIMARY KEY, handler VARCHAR(64) NOT NULL, partition_no BIGINT NOT NULL, seq BIGINT NOT NULL, body VARCHAR(255) NOT NULL) ENGINE=InnoDB"
        }
        _ => {
            "CREATE TABLE effects (id INTEGER PRIMARY KEY AUTOINCREMENT, handler TEXT NOT NULL, partition_no INTEGER NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL)"
        }
    };
    db.execute_unprepared(sql)
        .await
        .expect("create effects table");
}

/// Inserts one effect row through `c` (the handler's transaction).
pub async fn write_effect<C: ConnectionTrait>(
    c: &C,
    handler: &str,
    m: &outbox::Message,
) -> Result<(), outbox::sea_orm::DbErr> {
    let backend = c.get_database_backend();
    let sql = if backend == DbBackend::Postgres {
        "INSERT INTO effects (handler, partition_no, seq, body) VALUES ($1, $2, $3, $4)"
    } else {
        "INSERT INTO effects (handler, partition_no, seq, body) VALUES (?, ?, ?, ?)"
    };
    c.execute_raw(Statement::from_sql_and_values(
        backend,
        sql,
        [
            handler.into(),
            i64::from(m.partition()).into(),
            m.seq().into(),
            String::from_utf8_lossy(m.payload()).into_owned().into(),
        ],
    ))
    .await
    .map(|_| ())
}

/// Effect rows as (handler, partition, seq, body), in insertion (commit) order.
pub async fn effects(db: &DatabaseConnection) -> Vec<(String, u32, i64, String)> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT handler, partition_no, seq, body FROM effects ORDER BY id",
        ))
        .await
        .expect("read effects");
    rows.iter()
        .map(|r| {
            (
                r.try_get_by_index(0).expect("handler"),
                r.try_get_by_index::<i64>(1).expect("partition") as u32,
                r.try_get_by_index(2).expect("seq"),
                r.try_get_by_index(3).expect("body"),
            )
        })
        .collect()
}

async fn rows_i64<C: ConnectionTrait>(c: &C, sql: &str) -> Vec<Vec<i64>> {
    let rows = c
        .query_all_raw(Statement::from_string(
            c.get_database_backend(),
            sql.to_owned(),
        ))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter()
        .map(|r| {
            let mut v = Vec::new();
            let mut i = 0;
            while let Ok(x) = r.try_get_by_index::<Option<i64>>(i) {
                v.push(x.unwrap_or(-1));
                i += 1;
            }
            v
        })
        .collect()
}

/// Global invariants of the stored state, checked at the end of property tests (after the
/// runtimes stopped):
/// - per partition, sequenced messages are dense: every seq above the lowest cursor up to
///   `last_seq` is stored, and none at or below `vacuumed_seq` is;
/// - every cursor is within `[0, last_seq]` and holds no lease;
/// - each message is exactly one of pending (above the cursor), processed or dead (at or below
///   it): a dead letter's seq is at or below its handler's cursor and appears once.
pub async fn assert_invariants(db: &DatabaseConnection, prefix: &str) {
    let parts = {
        let rows = db
            .query_all_raw(Statement::from_string(
                db.get_database_backend(),
                format!(
                    "SELECT queue, partition_no, last_seq, vacuumed_seq FROM {prefix}partitions"
                ),
            ))
            .await
            .expect("partitions");
        rows.iter()
            .map(|r| {
                (
                    r.try_get_by_index::<String>(0).expect("queue"),
                    r.try_get_by_index::<i64>(1).expect("partition"),
                    r.try_get_by_index::<i64>(2).expect("last_seq"),
                    r.try_get_by_index::<i64>(3).expect("vacuumed_seq"),
                )
            })
            .collect::<Vec<_>>()
    };
    for (queue, p, last, vacuumed) in parts {
        let cursors = rows_i64(
            db,
            &format!(
                "SELECT processed_seq, lease_expires_at FROM {prefix}cursors WHERE queue = '{queue}' AND partition_no = {p}"
            ),
        )
        .await;
        for c in &cursors {
            assert!(
                (0..=last).contains(&c[0]),
                "{queue}/{p}: cursor {} outside [0, {last}]",
                c[0]
            );
            assert_eq!(
                c[1], -1,
                "{queue}/{p}: a lease is still held after shutdown"
            );
        }
        let min_cursor = cursors.iter().map(|c| c[0]).min().unwrap_or(0);
        let stored = rows_i64(
            db,
            &format!("SELECT seq FROM {prefix}outgoing WHERE queue = '{queue}' AND partition_no = {p} ORDER BY seq"),
        )
        .await;
        let seqs: Vec<i64> = stored.iter().map(|r| r[0]).collect();
        assert!(
            seqs.iter().all(|&s| s > vacuumed && s <= last),
            "{queue}/{p}: stored seqs {seqs:?} outside ({vacuumed}, {last}]"
        );
        if let Some(&first) = seqs.first() {
            assert_eq!(
                seqs,
                (first..=last).collect::<Vec<_>>(),
                "{queue}/{p}: a hole in the stored sequence"
            );
        }
        let needed_from = min_cursor.max(vacuumed) + 1;
        for s in needed_from..=last {
            assert!(
                seqs.binary_search(&s).is_ok(),
                "{queue}/{p}: seq {s} is unprocessed but was deleted"
            );
        }
        let dead = rows_i64(
            db,
            &format!(
                "SELECT d.seq, c.processed_seq FROM {prefix}dead_letters d JOIN {prefix}cursors c \
                 ON c.queue = d.queue AND c.handler = d.handler AND c.partition_no = d.partition_no \
                 WHERE d.queue = '{queue}' AND d.partition_no = {p}"
            ),
        )
        .await;
        for d in &dead {
            assert!(
                d[0] <= d[1],
                "{queue}/{p}: dead letter seq {} is also pending (cursor {})",
                d[0],
                d[1]
            );
        }
    }
    let dup = rows_i64(
        db,
        &format!(
            "SELECT COUNT(*) FROM (SELECT queue, handler, partition_no, seq FROM {prefix}dead_letters \
             GROUP BY queue, handler, partition_no, seq HAVING COUNT(*) > 1) x"
        ),
    )
    .await;
    assert_eq!(dup[0][0], 0, "a message was dead-lettered twice");
}

/// Waits until `queue` has nothing unsequenced and no handler has anything pending.
pub async fn wait_drained(outbox: &outbox::Outbox, queue: &str, timeout: Duration) {
    eventually(timeout, &format!("queue `{queue}` drained"), || async {
        outbox
            .depth(queue)
            .await
            .map(|d| d.unsequenced == 0 && d.handlers.iter().all(|h| h.pending == 0))
            .unwrap_or(false)
    })
    .await;
}

pub mod brokers;
pub mod harness;
pub mod recorder;

pub use harness::Harness;
