//! Storage footprint (`outbox-bench footprint`): what a backlog of N messages costs the
//! database while it waits, what the drain and the runtime's own vacuum leave behind, and on
//! PostgreSQL the WAL and the dead tuples each message produces.
//!
//! Per backend, on a fresh database: the tables are created, N messages are pre-filled
//! (1,000 per transaction, as S2 does) and the tables measured while they wait in `incoming`;
//! a HighThroughput runtime without handlers sequences them (they wait in the sequenced
//! table, which vacuum keeps since no cursor passed them) and the tables are measured; then a
//! HighThroughput runtime with one transactional handler drains them (every message checked
//! once, in order), its vacuum (interval shortened to [`VACUUM_INTERVAL`]) runs until the
//! sequenced table is empty, and the tables are measured again; last, a manual reclaim
//! (PostgreSQL `VACUUM`, what autovacuum would do; SQLite `VACUUM`, a rewrite of the file;
//! MariaDB `OPTIMIZE TABLE`, a rebuild) and a last measurement.
//!
//! Sizes: PostgreSQL `pg_table_size` (heap, TOAST, free space and visibility maps) and
//! `pg_indexes_size`; MariaDB `information_schema.TABLES` after `ANALYZE TABLE`
//! (`DATA_LENGTH` + `INDEX_LENGTH` + `DATA_FREE`, and the `.ibd` file's size); SQLite the
//! `dbstat` virtual table (pages of each table's b-tree and of its indexes), plus the file,
//! its WAL and the free-list. WAL (PostgreSQL) and redo (MariaDB `Innodb_lsn_current`) are
//! server-wide: anything else writing meanwhile is counted too, so on PostgreSQL a run waits
//! until other databases stop committing and reports the transactions they committed during
//! each phase. PostgreSQL's WAL is also read back with `pg_walinspect` (kept by a temporary
//! replication slot of the run's own session) to split each phase into record bytes and
//! full-page images: the images depend on where checkpoints fall, the records do not.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, QueryResult, Statement};
use outbox::{Outbox, Profile, QueueSpec};
use serde::Serialize;

use crate::Res;
use crate::cell::HandlerKind;
use crate::check::Checker;
use crate::db::{Backend, FreshDb, Servers};
use crate::ours;

/// The runtime's vacuum interval in the drain (the profile's is 5 s).
const VACUUM_INTERVAL: Duration = Duration::from_millis(500);
/// How long sequencing, or the runtime's vacuum after the drain, may take.
const CLEAN_TIMEOUT: Duration = Duration::from_secs(600);
/// How long MariaDB's purge may take to catch up after the drain.
const PURGE_TIMEOUT: Duration = Duration::from_secs(60);
/// The history list length at which MariaDB's purge counts as caught up: zero, since one
/// entry may be a transaction that deleted thousands of rows (another client of the server
/// can keep it above zero: the wait then ends at the timeout, with a note).
const PURGED: i64 = 0;
/// PostgreSQL: how long no other database must commit before a run starts.
const QUIET: Duration = Duration::from_secs(10);
/// PostgreSQL: how long to wait for that at most.
const QUIET_TIMEOUT: Duration = Duration::from_secs(600);

/// Options of the footprint scenario.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) backends: Vec<Backend>,
    pub(crate) partitions: u32,
    pub(crate) messages: u64,
    pub(crate) reps: usize,
    pub(crate) json: PathBuf,
    pub(crate) servers: Servers,
}

/// PostgreSQL's counters of one table, cumulative since the database was created.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct PgStats {
    ins: i64,
    upd: i64,
    hot_upd: i64,
    del: i64,
    live: i64,
    dead: i64,
}

/// One table at one moment. `data`: the table itself (PostgreSQL heap with TOAST and maps,
/// InnoDB clustered index, SQLite table b-tree); `index`: its other indexes (PostgreSQL: all,
/// the primary key's too); `free`: MariaDB `DATA_FREE`.
#[derive(Debug, Clone, Default, Serialize)]
struct TableFig {
    data: i64,
    index: i64,
    free: i64,
    /// MariaDB: the size of the table's `.ibd` file.
    file: Option<i64>,
    /// PostgreSQL: row counters.
    stats: Option<PgStats>,
}

impl TableFig {
    fn total(&self) -> i64 {
        self.data + self.index + self.free
    }
}

/// Every table at one moment, and whole-database figures (SQLite: file, WAL, free-list;
/// PostgreSQL: `pg_database_size`; MariaDB: the sum of the tables' files).
#[derive(Debug, Clone, Default, Serialize)]
struct Snapshot {
    tables: BTreeMap<String, TableFig>,
    whole: BTreeMap<String, i64>,
}

impl Snapshot {
    fn total(&self) -> i64 {
        self.tables.values().map(TableFig::total).sum()
    }
}

/// Server-wide counters read between phases.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Counters {
    /// PostgreSQL: WAL position in bytes; MariaDB: `Innodb_lsn_current`.
    log_bytes: i64,
    /// PostgreSQL `pg_stat_wal`: records and full-page images.
    wal_records: i64,
    wal_fpi: i64,
    /// PostgreSQL: checkpoints so far (timed and requested).
    checkpoints: i64,
    /// PostgreSQL: transactions committed or rolled back in other databases of the server.
    other_xacts: i64,
}

impl Counters {
    fn since(self, before: Counters) -> Counters {
        Counters {
            log_bytes: self.log_bytes - before.log_bytes,
            wal_records: self.wal_records - before.wal_records,
            wal_fpi: self.wal_fpi - before.wal_fpi,
            checkpoints: self.checkpoints - before.checkpoints,
            other_xacts: self.other_xacts - before.other_xacts,
        }
    }
}

/// PostgreSQL: one phase's WAL read back with `pg_walinspect` (the records between its two
/// positions, whoever wrote them): bytes of records and of full-page images, per resource
/// manager too.
#[derive(Debug, Clone, Default, Serialize)]
struct WalSplit {
    records: i64,
    record_bytes: i64,
    fpi_bytes: i64,
    /// Resource manager: (records, record bytes, full-page-image bytes).
    by_rmgr: BTreeMap<String, (i64, i64, i64)>,
}

/// One run on one backend.
#[derive(Debug, Clone, Serialize)]
struct Run {
    backend: String,
    rep: usize,
    messages: u64,
    partitions: u32,
    enqueue_secs: f64,
    /// A runtime without handlers, until every message was sequenced.
    sequence_secs: f64,
    /// The handler's runtime, until every message was handled.
    drain_secs: f64,
    /// From the last message handled until the sequenced table was empty.
    clean_secs: f64,
    /// MariaDB: the wait for purge after sequencing and after the drain (seconds, history
    /// list length then).
    purge: [Option<(f64, i64)>; 2],
    /// What the manual reclaim was.
    manual: &'static str,
    /// N messages in `incoming`.
    waiting: Snapshot,
    /// N messages in the sequenced table, waiting for a handler.
    sequenced: Snapshot,
    /// Everything handled and vacuumed by the runtime.
    drained: Snapshot,
    /// After the manual reclaim.
    reclaimed: Snapshot,
    /// Server-wide counters per phase.
    enqueue_log: Counters,
    sequence_log: Counters,
    handle_log: Counters,
    manual_log: Counters,
    /// PostgreSQL: the same four phases' WAL read back, if `pg_walinspect` could.
    wal_split: [Option<WalSplit>; 4],
    notes: Vec<String>,
}

fn raw(backend: Backend, sql: &str) -> Statement {
    let b = match backend {
        Backend::Sqlite => DbBackend::Sqlite,
        Backend::Postgres => DbBackend::Postgres,
        Backend::Mysql => DbBackend::MySql,
    };
    Statement::from_string(b, sql.to_owned())
}

async fn rows(c: &DatabaseConnection, backend: Backend, sql: &str) -> Res<Vec<QueryResult>> {
    Ok(c.query_all_raw(raw(backend, sql)).await?)
}

async fn one_i64(c: &DatabaseConnection, backend: Backend, sql: &str) -> Res<i64> {
    let row = c.query_one_raw(raw(backend, sql)).await?.ok_or("no row")?;
    Ok(row.try_get_by_index::<i64>(0)?)
}

/// MariaDB: one global status variable as a number.
async fn status(c: &DatabaseConnection, name: &str) -> Res<i64> {
    let row = c
        .query_one_raw(raw(
            Backend::Mysql,
            &format!("SHOW GLOBAL STATUS LIKE '{name}'"),
        ))
        .await?
        .ok_or_else(|| format!("no status variable {name}"))?;
    let v: String = row.try_get_by_index(1)?;
    Ok(v.parse()?)
}

/// PostgreSQL: waits until no other session is connected to this database, so every
/// engine connection has ended and flushed its statistics (a backend flushes at exit).
async fn settle(db: &FreshDb, probe: &DatabaseConnection, notes: &mut Vec<String>) -> Res<()> {
    if db.backend != Backend::Postgres {
        return Ok(());
    }
    let t0 = Instant::now();
    loop {
        let others = one_i64(
            probe,
            db.backend,
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .await?;
        if others == 0 {
            break;
        }
        if t0.elapsed() > Duration::from_secs(15) {
            notes.push(format!(
                "{others} other sessions still connected after 15 s: their statistics may be missing"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // This session's own pending statistics (WAL of a manual VACUUM) go out when it is idle.
    probe
        .execute_unprepared("SELECT pg_stat_force_next_flush()")
        .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    probe
        .execute_unprepared("SELECT pg_stat_clear_snapshot()")
        .await?;
    Ok(())
}

async fn counters(db: &FreshDb, probe: &DatabaseConnection) -> Res<Counters> {
    let b = db.backend;
    Ok(match b {
        Backend::Sqlite => Counters::default(),
        Backend::Postgres => Counters {
            log_bytes: one_i64(
                probe,
                b,
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::BIGINT",
            )
            .await?,
            wal_records: one_i64(probe, b, "SELECT wal_records::BIGINT FROM pg_stat_wal").await?,
            wal_fpi: one_i64(probe, b, "SELECT wal_fpi::BIGINT FROM pg_stat_wal").await?,
            checkpoints: one_i64(
                probe,
                b,
                "SELECT (checkpoints_timed + checkpoints_req)::BIGINT FROM pg_stat_bgwriter",
            )
            .await?,
            other_xacts: one_i64(
                probe,
                b,
                "SELECT COALESCE(SUM(xact_commit + xact_rollback), 0)::BIGINT FROM pg_stat_database WHERE datname IS NOT NULL AND datname <> current_database()",
            )
            .await?,
        },
        Backend::Mysql => Counters {
            log_bytes: status(probe, "Innodb_lsn_current").await?,
            ..Counters::default()
        },
    })
}

async fn snapshot(db: &FreshDb, probe: &DatabaseConnection) -> Res<Snapshot> {
    let b = db.backend;
    let mut s = Snapshot::default();
    match b {
        Backend::Postgres => {
            for r in rows(
                probe,
                b,
                "SELECT c.relname::TEXT, pg_table_size(c.oid)::BIGINT, pg_indexes_size(c.oid)::BIGINT, \
                 s.n_tup_ins::BIGINT, s.n_tup_upd::BIGINT, s.n_tup_hot_upd::BIGINT, s.n_tup_del::BIGINT, \
                 s.n_live_tup::BIGINT, s.n_dead_tup::BIGINT \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid \
                 WHERE n.nspname = current_schema() AND c.relkind = 'r'",
            )
            .await?
            {
                let g = |i| r.try_get_by_index::<Option<i64>>(i).map(Option::unwrap_or_default);
                s.tables.insert(
                    r.try_get_by_index(0)?,
                    TableFig {
                        data: g(1)?,
                        index: g(2)?,
                        free: 0,
                        file: None,
                        stats: Some(PgStats {
                            ins: g(3)?,
                            upd: g(4)?,
                            hot_upd: g(5)?,
                            del: g(6)?,
                            live: g(7)?,
                            dead: g(8)?,
                        }),
                    },
                );
            }
            s.whole.insert(
                "database".into(),
                one_i64(probe, b, "SELECT pg_database_size(current_database())").await?,
            );
        }
        Backend::Mysql => {
            let names: Vec<String> = rows(
                probe,
                b,
                "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_TYPE = 'BASE TABLE'",
            )
            .await?
            .iter()
            .map(|r| r.try_get_by_index::<String>(0))
            .collect::<Result<_, _>>()?;
            for t in &names {
                probe
                    .execute_unprepared(&format!("ANALYZE TABLE `{t}`"))
                    .await?;
            }
            for r in rows(
                probe,
                b,
                "SELECT t.TABLE_NAME, CAST(t.DATA_LENGTH AS SIGNED), CAST(t.INDEX_LENGTH AS SIGNED), \
                 CAST(t.DATA_FREE AS SIGNED), CAST(f.FILE_SIZE AS SIGNED) \
                 FROM information_schema.TABLES t LEFT JOIN information_schema.INNODB_SYS_TABLESPACES f \
                 ON f.NAME = CONCAT(t.TABLE_SCHEMA, '/', t.TABLE_NAME) \
                 WHERE t.TABLE_SCHEMA = DATABASE() AND t.TABLE_TYPE = 'BASE TABLE'",
            )
            .await?
            {
                let g = |i| r.try_get_by_index::<Option<i64>>(i).map(Option::unwrap_or_default);
                s.tables.insert(
                    r.try_get_by_index(0)?,
                    TableFig {
                        data: g(1)?,
                        index: g(2)?,
                        free: g(3)?,
                        file: r.try_get_by_index::<Option<i64>>(4)?,
                        stats: None,
                    },
                );
            }
            let files = s.tables.values().filter_map(|t| t.file).sum();
            s.whole.insert("files".into(), files);
        }
        Backend::Sqlite => {
            // The bundled SQLite is built with SQLITE_ENABLE_DBSTAT_VTAB; a build without it
            // fails here and only the whole-file figures are reported.
            match rows(
                probe,
                b,
                "SELECT m.tbl_name, s.name, SUM(s.pgsize) FROM dbstat s JOIN sqlite_master m ON m.name = s.name GROUP BY s.name",
            )
            .await
            {
                Ok(found) => {
                    for r in found {
                        let table: String = r.try_get_by_index(0)?;
                        let name: String = r.try_get_by_index(1)?;
                        let bytes: i64 = r.try_get_by_index(2)?;
                        let t = s.tables.entry(table.clone()).or_default();
                        if name == table {
                            t.data += bytes;
                        } else {
                            t.index += bytes;
                        }
                    }
                }
                Err(e) => {
                    s.whole.insert("dbstat_unavailable".into(), 1);
                    eprintln!("dbstat: {e}");
                }
            }
            let page = one_i64(probe, b, "PRAGMA page_size").await?;
            s.whole.insert(
                "pages".into(),
                page * one_i64(probe, b, "PRAGMA page_count").await?,
            );
            s.whole.insert(
                "freelist".into(),
                page * one_i64(probe, b, "PRAGMA freelist_count").await?,
            );
            let list = rows(probe, b, "PRAGMA database_list").await?;
            let file: String = list.first().ok_or("no database")?.try_get_by_index(2)?;
            let size = |p: String| std::fs::metadata(p).map_or(0, |m| m.len() as i64);
            s.whole.insert("file".into(), size(file.clone()));
            s.whole.insert("wal".into(), size(format!("{file}-wal")));
        }
    }
    Ok(s)
}

/// MariaDB: waits for purge to remove the delete-marked records (history list length at or
/// below [`PURGED`]); the wait and the length then.
async fn wait_purged(probe: &DatabaseConnection) -> Res<(f64, i64)> {
    let t0 = Instant::now();
    loop {
        let len = status(probe, "Innodb_history_list_length").await?;
        if len <= PURGED || t0.elapsed() > PURGE_TIMEOUT {
            return Ok((t0.elapsed().as_secs_f64(), len));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The manual reclaim after the drain; what it was.
async fn reclaim(db: &FreshDb, probe: &DatabaseConnection, snap: &Snapshot) -> Res<&'static str> {
    let names: Vec<&String> = snap.tables.keys().collect();
    Ok(match db.backend {
        Backend::Postgres => {
            let list: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
            probe
                .execute_unprepared(&format!("VACUUM {}", list.join(", ")))
                .await?;
            "VACUUM"
        }
        Backend::Mysql => {
            for n in names {
                probe
                    .execute_unprepared(&format!("OPTIMIZE TABLE `{n}`"))
                    .await?;
            }
            "OPTIMIZE TABLE"
        }
        Backend::Sqlite => {
            probe
                .execute_unprepared("PRAGMA wal_checkpoint(TRUNCATE)")
                .await?;
            probe.execute_unprepared("VACUUM").await?;
            probe
                .execute_unprepared("PRAGMA wal_checkpoint(TRUNCATE)")
                .await?;
            "VACUUM (rewrites the file)"
        }
    })
}

/// PostgreSQL: makes the WAL of this run readable afterwards: `pg_walinspect` in this
/// database and a temporary physical replication slot of the probe's session, which keeps
/// the server from recycling WAL until the session ends (checkpoints otherwise remove the
/// segments of a long phase). `false` (and a note) if either is not possible.
async fn keep_wal(db: &FreshDb, probe: &DatabaseConnection, notes: &mut Vec<String>) -> bool {
    if db.backend != Backend::Postgres {
        return false;
    }
    let r = async {
        probe
            .execute_unprepared("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            .await?;
        probe
            .execute_unprepared(&format!(
                "SELECT pg_create_physical_replication_slot('{}_wal', true, true)",
                db.name
            ))
            .await?;
        Res::Ok(())
    }
    .await;
    match r {
        Ok(()) => true,
        Err(e) => {
            notes.push(format!("WAL not read back (pg_walinspect, slot): {e}"));
            false
        }
    }
}

fn lsn(pos: i64) -> String {
    format!("{:X}/{:X}", pos >> 32, pos & 0xFFFF_FFFF)
}

/// PostgreSQL: the WAL between two positions, read back with `pg_walinspect`.
async fn wal_split(
    probe: &DatabaseConnection,
    from: &Counters,
    to: &Counters,
    notes: &mut Vec<String>,
) -> Option<WalSplit> {
    let sql = format!(
        "SELECT \"resource_manager/record_type\", count::BIGINT, record_size::BIGINT, fpi_size::BIGINT \
         FROM pg_get_wal_stats('{}'::pg_lsn, LEAST('{}'::pg_lsn, pg_current_wal_flush_lsn()), false) WHERE count > 0",
        lsn(from.log_bytes),
        lsn(to.log_bytes)
    );
    let found = match rows(probe, Backend::Postgres, &sql).await {
        Ok(found) => found,
        Err(e) => {
            notes.push(format!("pg_get_wal_stats: {e}"));
            return None;
        }
    };
    let mut w = WalSplit::default();
    for r in found {
        let (Ok(name), Ok(count), Ok(rec), Ok(fpi)) = (
            r.try_get_by_index::<String>(0),
            r.try_get_by_index::<i64>(1),
            r.try_get_by_index::<i64>(2),
            r.try_get_by_index::<i64>(3),
        ) else {
            continue;
        };
        w.records += count;
        w.record_bytes += rec;
        w.fpi_bytes += fpi;
        w.by_rmgr.insert(name, (count, rec, fpi));
    }
    Some(w)
}

/// PostgreSQL: waits until no other database of the server committed a transaction for
/// [`QUIET`] (at most [`QUIET_TIMEOUT`]), since WAL is counted server-wide. `false` if the
/// server did not fall quiet.
async fn wait_quiet(db: &FreshDb, probe: &DatabaseConnection) -> Res<bool> {
    if db.backend != Backend::Postgres {
        return Ok(true);
    }
    let t0 = Instant::now();
    let (mut last, mut since) = (counters(db, probe).await?.other_xacts, Instant::now());
    loop {
        if since.elapsed() >= QUIET {
            return Ok(true);
        }
        if t0.elapsed() > QUIET_TIMEOUT {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        probe
            .execute_unprepared("SELECT pg_stat_clear_snapshot()")
            .await?;
        let now = counters(db, probe).await?.other_xacts;
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
}

/// A runtime on the queue; with `checker`, one transactional handler feeding it.
async fn runtime(
    pool: &DatabaseConnection,
    partitions: u32,
    checker: Option<&Arc<Checker>>,
) -> Res<outbox::Running> {
    let mut tuning = Profile::HighThroughput.runtime();
    tuning.vacuum_interval = VACUUM_INTERVAL;
    let mut b = Outbox::builder(pool.clone())
        .profile(Profile::HighThroughput)
        .runtime_tuning(tuning)
        .queue(QueueSpec::new(ours::QUEUE, partitions));
    if let Some(c) = checker {
        b = b.handler(ours::handler(HandlerKind::Tx, c));
    }
    Ok(b.start().await?)
}

/// Waits until the queue's depth satisfies `done`.
async fn wait_depth(
    rt: &outbox::Running,
    what: &str,
    done: impl Fn(&outbox::QueueDepth) -> bool,
) -> Res<()> {
    let t0 = Instant::now();
    loop {
        let d = rt.outbox().depth(ours::QUEUE).await?;
        if done(&d) {
            return Ok(());
        }
        if t0.elapsed() > CLEAN_TIMEOUT {
            return Err(format!(
                "{what}: not done in {CLEAN_TIMEOUT:?}: {} stored, {} unsequenced",
                d.stored, d.unsequenced
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn measure(db: &FreshDb, partitions: u32, n: u64, rep: usize) -> Res<Run> {
    let mut notes = Vec::new();
    let probe = db.pool(1, false).await?;

    // The tables, before anything is counted.
    let pool = db.pool(2, false).await?;
    Outbox::builder(pool.clone())
        .queue(QueueSpec::new(ours::QUEUE, partitions))
        .connect()
        .await?;
    pool.close().await.ok();
    settle(db, &probe, &mut notes).await?;
    if !wait_quiet(db, &probe).await? {
        notes.push(format!(
            "other databases kept committing for {QUIET_TIMEOUT:?} before the run: WAL figures include their writes"
        ));
    }
    let wal_kept = keep_wal(db, &probe, &mut notes).await;
    let c0 = counters(db, &probe).await?;

    // Enqueue: N messages wait in `incoming`.
    let pool = db.pool(2, false).await?;
    let t = Instant::now();
    ours::prefill(&pool, partitions, n).await?;
    let enqueue_secs = t.elapsed().as_secs_f64();
    pool.close().await.ok();
    settle(db, &probe, &mut notes).await?;
    let c1 = counters(db, &probe).await?;
    let waiting = snapshot(db, &probe).await?;

    // Sequence: a runtime without handlers moves them to the sequenced table, where they wait
    // for a handler (vacuum keeps them: no cursor has passed them).
    let pool = db.pool(ours::pool_size(db.backend, 1, 0), false).await?;
    let t = Instant::now();
    let rt = runtime(&pool, partitions, None).await?;
    let sequenced_ok = wait_depth(&rt, "sequencing", |d| {
        d.unsequenced == 0 && d.stored == n as i64
    })
    .await;
    let sequence_secs = t.elapsed().as_secs_f64();
    rt.shutdown(ours::GRACE).await?;
    drop(rt);
    pool.close().await.ok();
    sequenced_ok?;
    let purge_seq = purge(db, &probe, &mut notes).await?;
    settle(db, &probe, &mut notes).await?;
    let c2 = counters(db, &probe).await?;
    let sequenced = snapshot(db, &probe).await?;

    // Handle and vacuum: one transactional handler, every message checked.
    let pool = db.pool(ours::pool_size(db.backend, 1, 0), false).await?;
    let checker = Arc::new(Checker::new(partitions));
    let t = Instant::now();
    let rt = runtime(&pool, partitions, Some(&checker)).await?;
    let waited = ours::wait_handled(&checker, n, t, ours::STALL).await;
    let drain_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let cleaned = match &waited {
        Ok(_) => wait_depth(&rt, "vacuum", |d| d.unsequenced == 0 && d.stored == 0).await,
        Err(_) => Ok(()),
    };
    let clean_secs = t.elapsed().as_secs_f64();
    rt.shutdown(ours::GRACE).await?;
    let depth = rt.outbox().depth(ours::QUEUE).await?;
    drop(rt);
    pool.close().await.ok();
    waited?;
    checker.verdict(n, false)?;
    let pending = depth.handlers.first().map_or(-1, |h| h.pending);
    if pending != 0 {
        return Err(format!("depth reports {pending} pending after the drain").into());
    }
    cleaned?;
    let purge_drain = purge(db, &probe, &mut notes).await?;
    settle(db, &probe, &mut notes).await?;
    let c3 = counters(db, &probe).await?;
    let drained = snapshot(db, &probe).await?;

    // What a manual reclaim returns.
    let manual = reclaim(db, &probe, &drained).await?;
    settle(db, &probe, &mut notes).await?;
    let c4 = counters(db, &probe).await?;
    let reclaimed = snapshot(db, &probe).await?;
    let mut split = [None, None, None, None];
    if wal_kept {
        for (i, (a, b)) in [(&c0, &c1), (&c1, &c2), (&c2, &c3), (&c3, &c4)]
            .into_iter()
            .enumerate()
        {
            split[i] = wal_split(&probe, a, b, &mut notes).await;
        }
    }
    // Ends the session, and with it the slot.
    probe.close().await.ok();

    Ok(Run {
        backend: db.backend.name().into(),
        rep,
        messages: n,
        partitions,
        enqueue_secs,
        sequence_secs,
        drain_secs,
        clean_secs,
        purge: [purge_seq, purge_drain],
        manual,
        waiting,
        sequenced,
        drained,
        reclaimed,
        enqueue_log: c1.since(c0),
        sequence_log: c2.since(c1),
        handle_log: c3.since(c2),
        manual_log: c4.since(c3),
        wal_split: split,
        notes,
    })
}

/// MariaDB: waits for purge (see [`wait_purged`]); the wait and the history list length.
async fn purge(
    db: &FreshDb,
    probe: &DatabaseConnection,
    notes: &mut Vec<String>,
) -> Res<Option<(f64, i64)>> {
    if db.backend != Backend::Mysql {
        return Ok(None);
    }
    let (s, len) = wait_purged(probe).await?;
    if len > PURGED {
        notes.push(format!(
            "purge not caught up after {s:.0} s: history list length {len}"
        ));
    }
    Ok(Some((s, len)))
}

const MAIN_TABLES: [&str; 4] = ["incoming", "outgoing", "cursors", "partitions"];

fn mb(bytes: i64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

fn per(v: i64, n: u64) -> f64 {
    v as f64 / n.max(1) as f64
}

impl Run {
    /// The four moments, labelled.
    fn moments(&self) -> [(String, &Snapshot); 4] {
        [
            ("waiting in incoming".into(), &self.waiting),
            ("sequenced, waiting for the handler".into(), &self.sequenced),
            ("after drain + vacuum".into(), &self.drained),
            (format!("after {}", self.manual), &self.reclaimed),
        ]
    }

    /// The tables shown one by one: the pipeline's four, and any other that reached 1 MB.
    fn shown(&self) -> Vec<String> {
        let big = |name: &String| {
            self.moments()
                .iter()
                .any(|(_, s)| s.tables.get(name).is_some_and(|t| t.total() >= 1_000_000))
        };
        self.waiting
            .tables
            .keys()
            .filter(|name| MAIN_TABLES.iter().any(|m| name.ends_with(m)) || big(name))
            .cloned()
            .collect()
    }

    fn dead(s: &Snapshot) -> i64 {
        s.tables
            .values()
            .filter_map(|t| t.stats.map(|s| s.dead))
            .sum()
    }
}

/// The sum of `names` in `s`.
fn sum(s: &Snapshot, names: &[&String]) -> TableFig {
    let mut f = TableFig::default();
    for name in names {
        if let Some(t) = s.tables.get(*name) {
            f.data += t.data;
            f.index += t.index;
            f.free += t.free;
            if let Some(v) = t.file {
                f.file = Some(f.file.unwrap_or(0) + v);
            }
            if let Some(st) = t.stats {
                let mut a = f.stats.unwrap_or_default();
                a.ins += st.ins;
                a.upd += st.upd;
                a.hot_upd += st.hot_upd;
                a.del += st.del;
                a.live += st.live;
                a.dead += st.dead;
                f.stats = Some(a);
            }
        }
    }
    f
}

fn print_run(r: &Run) {
    let n = r.messages;
    let rate = |secs: f64| n as f64 / secs;
    println!(
        "#### {} run {}: {n} messages over {} partitions\n",
        r.backend,
        r.rep + 1,
        r.partitions
    );
    println!(
        "Enqueue {:.1} s ({:.0} msgs/s); sequence (runtime without handlers) {:.1} s ({:.0} msgs/s); handle {:.1} s ({:.0} msgs/s); sequenced table empty {:.1} s after the last message was handled. Manual reclaim: {}.\n",
        r.enqueue_secs,
        rate(r.enqueue_secs),
        r.sequence_secs,
        rate(r.sequence_secs),
        r.drain_secs,
        rate(r.drain_secs),
        r.clean_secs,
        r.manual
    );
    let phases = [
        ("enqueue", &r.enqueue_log),
        ("sequence", &r.sequence_log),
        ("handle + vacuum", &r.handle_log),
        (r.manual, &r.manual_log),
    ];
    match r.backend.as_str() {
        "postgres" => {
            for ((what, c), split) in phases.into_iter().zip(&r.wal_split) {
                let read_back = split.as_ref().map_or(String::new(), |w| {
                    format!(
                        ": records {:.0} B/msg + full-page images {:.0} B/msg",
                        per(w.record_bytes, n),
                        per(w.fpi_bytes, n)
                    )
                });
                println!(
                    "- WAL, {what}: {} MB = {:.0} B/msg{read_back} ({:.2} records/msg, {} full-page images), checkpoints {}, transactions in other databases {}",
                    mb(c.log_bytes),
                    per(c.log_bytes, n),
                    per(c.wal_records, n),
                    c.wal_fpi,
                    c.checkpoints,
                    c.other_xacts
                );
            }
            println!();
        }
        "mysql" => {
            for (what, c) in phases {
                println!(
                    "- InnoDB redo (Innodb_lsn_current, server-wide), {what}: {} MB = {:.0} B/msg",
                    mb(c.log_bytes),
                    per(c.log_bytes, n)
                );
            }
            for (what, p) in ["sequence", "drain"].iter().zip(&r.purge) {
                if let Some((s, len)) = p {
                    println!(
                        "- purge after {what}: waited {s:.1} s, history list length then {len}"
                    );
                }
            }
            println!();
        }
        _ => {
            let w = |s: &Snapshot, k: &str| s.whole.get(k).copied().unwrap_or(0);
            for (label, s) in r.moments() {
                println!(
                    "- {label}: file {} MB, WAL file {} MB, pages in use {} MB, free-list {} MB",
                    mb(w(s, "file")),
                    mb(w(s, "wal")),
                    mb(w(s, "pages") - w(s, "freelist")),
                    mb(w(s, "freelist"))
                );
            }
            println!();
        }
    }
    let pg = r.backend == "postgres";
    let mysql = r.backend == "mysql";
    let split = if mysql {
        "data + index + free"
    } else {
        "table + indexes"
    };
    let moments = r.moments();
    print!("| table ({split}, MB) |");
    for (i, (label, _)) in moments.iter().enumerate() {
        print!(" {label} |");
        if i < 2 {
            print!(" B/msg |");
        }
    }
    if mysql {
        print!(" .ibd files MB, at each moment |");
    }
    if pg {
        print!(
            " rows inserted / updated (HOT) / deleted per msg, whole run | dead tuples per msg, at each moment |"
        );
    }
    println!();
    println!(
        "|---|---|---|---|---|---|---|{}{}",
        if mysql { "---|" } else { "" },
        if pg { "---|---|" } else { "" }
    );
    let shown = r.shown();
    let rest: Vec<&String> = r
        .waiting
        .tables
        .keys()
        .filter(|k| !shown.contains(k))
        .collect();
    let mut lines: Vec<(String, Vec<&String>)> =
        shown.iter().map(|s| (s.clone(), vec![s])).collect();
    if !rest.is_empty() {
        lines.push((format!("{} other tables", rest.len()), rest));
    }
    lines.push(("**all**".into(), r.waiting.tables.keys().collect()));
    for (label, names) in lines {
        let figs: Vec<TableFig> = moments.iter().map(|(_, s)| sum(s, &names)).collect();
        print!("| {label} |");
        for (i, f) in figs.iter().enumerate() {
            if mysql {
                print!(
                    " {} ({} + {} + {}) |",
                    mb(f.total()),
                    mb(f.data),
                    mb(f.index),
                    mb(f.free)
                );
            } else {
                print!(" {} ({} + {}) |", mb(f.total()), mb(f.data), mb(f.index));
            }
            if i < 2 {
                print!(" {:.0} |", per(f.total(), n));
            }
        }
        if mysql {
            let files: Vec<String> = figs
                .iter()
                .map(|f| f.file.map_or("n/a".into(), mb))
                .collect();
            print!(" {} |", files.join(" / "));
        }
        if pg {
            let st = figs[2].stats.unwrap_or_default();
            let dead: Vec<String> = figs
                .iter()
                .map(|f| format!("{:.2}", per(f.stats.unwrap_or_default().dead, n)))
                .collect();
            print!(
                " {:.2} / {:.2} ({:.2}) / {:.2} | {} |",
                per(st.ins, n),
                per(st.upd, n),
                per(st.hot_upd, n),
                per(st.del, n),
                dead.join(" / ")
            );
        }
        println!();
    }
    for note in &r.notes {
        println!("\nNote: {note}");
    }
    println!();
}

fn print_summary(runs: &[Run]) {
    println!(
        "### Storage footprint: summary (all outbox tables; MB = 10^6 bytes; log: PostgreSQL WAL, MariaDB redo, both server-wide)\n"
    );
    println!(
        "| backend | run | messages | waiting in incoming MB (B/msg) | sequenced MB (B/msg) | after drain + vacuum MB | after manual reclaim MB | log B/msg: enqueue / sequence / handle + vacuum | PostgreSQL WAL without full-page images, B/msg | dead tuples per msg: sequenced / drained / after VACUUM |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in runs {
        let n = r.messages;
        let log = if r.backend == "sqlite" {
            "n/a".into()
        } else {
            format!(
                "{:.0} / {:.0} / {:.0}",
                per(r.enqueue_log.log_bytes, n),
                per(r.sequence_log.log_bytes, n),
                per(r.handle_log.log_bytes, n)
            )
        };
        let bare = if r.wal_split[..3].iter().all(Option::is_some) {
            let b: Vec<String> = r.wal_split[..3]
                .iter()
                .flatten()
                .map(|w| format!("{:.0}", per(w.record_bytes, n)))
                .collect();
            b.join(" / ")
        } else {
            "n/a".into()
        };
        let dead = if r.backend == "postgres" {
            format!(
                "{:.2} / {:.2} / {:.2}",
                per(Run::dead(&r.sequenced), n),
                per(Run::dead(&r.drained), n),
                per(Run::dead(&r.reclaimed), n)
            )
        } else {
            "n/a".into()
        };
        println!(
            "| {} | {} | {n} | {} ({:.0}) | {} ({:.0}) | {} | {} | {log} | {bare} | {dead} |",
            r.backend,
            r.rep + 1,
            mb(r.waiting.total()),
            per(r.waiting.total(), n),
            mb(r.sequenced.total()),
            per(r.sequenced.total(), n),
            mb(r.drained.total()),
            mb(r.reclaimed.total()),
        );
    }
    println!();
}

/// Runs every backend, prints the tables and writes the JSON; `Err` if a run failed.
pub(crate) async fn run(o: &Options) -> Res<()> {
    let mut failed = Vec::new();
    let mut runs = Vec::new();
    println!(
        "### Storage footprint: {} messages over {} partitions, pre-filled 1,000 per transaction, sequenced by a runtime without handlers, then drained by one transactional handler (HighThroughput, vacuum every {VACUUM_INTERVAL:?}) until the sequenced table is empty; MB = 10^6 bytes\n",
        o.messages, o.partitions
    );
    for &backend in &o.backends {
        for rep in 0..o.reps {
            eprintln!("footprint: {backend} run {}", rep + 1);
            let cell = async {
                let db = FreshDb::create(backend, &o.servers).await?;
                let r = measure(&db, o.partitions, o.messages, rep).await;
                db.drop_db().await;
                r
            };
            match cell.await {
                Ok(r) => {
                    print_run(&r);
                    runs.push(r);
                }
                Err(e) => {
                    println!("#### {backend} run {}: FAILED: {e}\n", rep + 1);
                    failed.push(format!("{backend} run {}: {e}", rep + 1));
                }
            }
        }
    }
    print_summary(&runs);
    std::fs::write(&o.json, serde_json::to_vec_pretty(&runs)?)
        .map_err(|e| format!("could not write {}: {e}", o.json.display()))?;
    eprintln!("footprint: figures written to {}", o.json.display());
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; ").into())
    }
}
