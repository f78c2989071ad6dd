//! Tables of the outbox, created and upgraded by versioned migrations that are safe to run from
//! several processes at once, and the registration of queues, handlers and their cursors.
//!
//! Each version is one step (`step_1`, `step_2`, ...) that brings the schema from the version
//! before it; a step is idempotent, so a step interrupted half way (MySQL commits each DDL
//! statement on its own) is simply run again. The version reached is recorded in
//! `schema_version`. A runtime whose schema is current runs no DDL at all, so a database user
//! that may only read and write rows can run it.

use sea_orm::{ConnectionTrait, DbBackend, DbErr};

use super::{Store, Tables, col, exec, statement};

/// Version of the schema this build writes and needs.
pub(crate) const SCHEMA_VERSION: i64 = 4;

/// The migration of each version, by name (also the names of the sea-orm-migration
/// migrations in [`crate::migration`]).
pub(crate) const MIGRATIONS: [(i64, &str); 4] = [
    (1, "m20261124_000001_outbox_schema_v1"),
    (2, "m20261202_000002_outbox_exact_names_and_handlers"),
    (3, "m20261206_000003_outbox_dedup_and_scheduled"),
    (4, "m20261207_000004_outbox_headers"),
];

/// The name of the migration that brings the schema to `version`.
pub(crate) fn migration_name(version: i64) -> &'static str {
    MIGRATIONS
        .iter()
        .find(|(v, _)| *v == version)
        .map_or("unknown", |(_, n)| n)
}

/// Result of registering a queue.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Registered {
    Ok,
    PartitionMismatch { stored: u32 },
}

/// Version 1: the statements that create every table and index of the first schema; each is
/// idempotent.
fn step_1(backend: DbBackend, t: &Tables) -> Vec<String> {
    let p = &t.prefix;
    match backend {
        sea_orm::DbBackend::Postgres => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {} (version BIGINT NOT NULL)",
                t.schema_version
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (name VARCHAR(64) PRIMARY KEY, partitions BIGINT NOT NULL, created_at BIGINT NOT NULL)",
                t.queues
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (queue VARCHAR(64) NOT NULL, partition_no BIGINT NOT NULL, last_seq BIGINT NOT NULL DEFAULT 0, vacuumed_seq BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (queue, partition_no))",
                t.partitions
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, queue VARCHAR(64) NOT NULL, partition_no BIGINT NOT NULL, payload BYTEA NOT NULL, target_handler VARCHAR(64), created_at BIGINT NOT NULL)",
                t.incoming
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (queue VARCHAR(64) NOT NULL, partition_no BIGINT NOT NULL, seq BIGINT NOT NULL, payload BYTEA NOT NULL, target_handler VARCHAR(64), created_at BIGINT NOT NULL, PRIMARY KEY (queue, partition_no, seq))",
                t.outgoing
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (queue VARCHAR(64) NOT NULL, handler VARCHAR(64) NOT NULL, partition_no BIGINT NOT NULL, processed_seq BIGINT NOT NULL DEFAULT 0, attempts BIGINT NOT NULL DEFAULT 0, retry_at BIGINT NOT NULL DEFAULT 0, blocked BIGINT NOT NULL DEFAULT 0, last_error TEXT, lease_token VARCHAR(64), lease_owner VARCHAR(64), lease_expires_at BIGINT, updated_at BIGINT NOT NULL, PRIMARY KEY (queue, handler, partition_no))",
                t.cursors
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, queue VARCHAR(64) NOT NULL, partition_no BIGINT NOT NULL, seq BIGINT NOT NULL, handler VARCHAR(64) NOT NULL, payload BYTEA NOT NULL, last_error TEXT NOT NULL, attempts BIGINT NOT NULL, enqueued_at BIGINT NOT NULL, failed_at BIGINT NOT NULL)",
                t.dead_letters
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {p}dead_letters_queue ON {} (queue, handler, partition_no)",
                t.dead_letters
            ),
        ],
        sea_orm::DbBackend::MySql => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {} (version BIGINT NOT NULL) ENGINE=InnoDB",
                t.schema_version
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (name VARCHAR(64) NOT NULL PRIMARY KEY, partitions BIGINT NOT NULL, created_at BIGINT NOT NULL) ENGINE=InnoDB",
                t.queues
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (queue VARCHAR(64) NOT NULL, partition_no BIGINT NOT NULL, last_seq BIGINT NOT NULL DEFAULT 0, vacuumed_seq BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (queue, partition_no)) ENGINE=InnoDB",
                t.partitions
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, queue VARCHAR(64) NOT NULL, partition_no BIGINT NOT NULL, payload LONGBLOB NOT NULL, target_handler VARCHAR(64), created_at BIGINT NOT NULL) ENGINE=InnoDB",
                t.incoming
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (queue VARCHAR(64) NOT NULL, partition_no BIGINT NOT NULL, seq BIGINT NOT NULL, payload LONGBLOB NOT NULL, target_handler VARCHAR(64), created_at BIGINT NOT NULL, PRIMARY KEY (queue, partition_no, seq)) ENGINE=InnoDB",
                t.outgoing
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (queue VARCHAR(64) NOT NULL, handler VARCHAR(64) NOT NULL, partition_no BIGINT NOT NULL, processed_seq BIGINT NOT NULL DEFAULT 0, attempts BIGINT NOT NULL DEFAULT 0, retry_at BIGINT NOT NULL DEFAULT 0, blocked BIGINT NOT NULL DEFAULT 0, last_error TEXT, lease_token VARCHAR(64), lease_owner VARCHAR(64), lease_expires_at BIGINT, updated_at BIGINT NOT NULL, PRIMARY KEY (queue, handler, partition_no)) ENGINE=InnoDB",
                t.cursors
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, queue VARCHAR(64) NOT NULL, partition_no BIGINT NOT NULL, seq BIGINT NOT NULL, handler VARCHAR(64) NOT NULL, payload LONGBLOB NOT NULL, last_error TEXT NOT NULL, attempts BIGINT NOT NULL, enqueued_at BIGINT NOT NULL, failed_at BIGINT NOT NULL, INDEX {p}dead_letters_queue (queue, handler, partition_no)) ENGINE=InnoDB",
                t.dead_letters
            ),
        ],
        _ => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {} (version INTEGER NOT NULL)",
                t.schema_version
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (name TEXT NOT NULL PRIMARY KEY, partitions INTEGER NOT NULL, created_at INTEGER NOT NULL)",
                t.queues
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (queue TEXT NOT NULL, partition_no INTEGER NOT NULL, last_seq INTEGER NOT NULL DEFAULT 0, vacuumed_seq INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (queue, partition_no))",
                t.partitions
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (id INTEGER PRIMARY KEY, queue TEXT NOT NULL, partition_no INTEGER NOT NULL, payload BLOB NOT NULL, target_handler TEXT, created_at INTEGER NOT NULL)",
                t.incoming
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (queue TEXT NOT NULL, partition_no INTEGER NOT NULL, seq INTEGER NOT NULL, payload BLOB NOT NULL, target_handler TEXT, created_at INTEGER NOT NULL, PRIMARY KEY (queue, partition_no, seq))",
                t.outgoing
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (queue TEXT NOT NULL, handler TEXT NOT NULL, partition_no INTEGER NOT NULL, processed_seq INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, retry_at INTEGER NOT NULL DEFAULT 0, blocked INTEGER NOT NULL DEFAULT 0, last_error TEXT, lease_token TEXT, lease_owner TEXT, lease_expires_at INTEGER, updated_at INTEGER NOT NULL, PRIMARY KEY (queue, handler, partition_no))",
                t.cursors
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, partition_no INTEGER NOT NULL, seq INTEGER NOT NULL, handler TEXT NOT NULL, payload BLOB NOT NULL, last_error TEXT NOT NULL, attempts INTEGER NOT NULL, enqueued_at INTEGER NOT NULL, failed_at INTEGER NOT NULL)",
                t.dead_letters
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {p}dead_letters_queue ON {} (queue, handler, partition_no)",
                t.dead_letters
            ),
        ],
    }
}

/// Version 2: names compare byte for byte on every backend, error texts take any character, a
/// registry of handlers (which process serves each one, so status can tell a stale cursor), and
/// an instance id for this outbox.
///
/// PostgreSQL and SQLite already compare text byte for byte. MySQL/MariaDB compare with the
/// column's collation, case-insensitively by default, so `orders` and `Orders` were one queue
/// there: every name column becomes `ascii_bin` (names are ASCII by validation). Error texts
/// become `utf8mb4` so any text a handler returns can be stored.
fn step_2(backend: DbBackend, t: &Tables) -> Vec<String> {
    let name = name_type(backend);
    let mut out = Vec::new();
    if backend == DbBackend::MySql {
        let nn = format!("{name} NOT NULL");
        let null = format!("{name} NULL");
        out.extend([
            format!("ALTER TABLE {} MODIFY name {nn}", t.queues),
            format!("ALTER TABLE {} MODIFY queue {nn}", t.partitions),
            format!(
                "ALTER TABLE {} MODIFY queue {nn}, MODIFY target_handler {null}",
                t.incoming
            ),
            format!(
                "ALTER TABLE {} MODIFY queue {nn}, MODIFY target_handler {null}",
                t.outgoing
            ),
            format!(
                "ALTER TABLE {} MODIFY queue {nn}, MODIFY handler {nn}, \
                 MODIFY last_error TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL",
                t.cursors
            ),
            format!(
                "ALTER TABLE {} MODIFY queue {nn}, MODIFY handler {nn}, \
                 MODIFY last_error TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL",
                t.dead_letters
            ),
        ]);
    }
    let (big, engine) = match backend {
        DbBackend::Sqlite => ("INTEGER", ""),
        DbBackend::MySql => ("BIGINT", " ENGINE=InnoDB"),
        _ => ("BIGINT", ""),
    };
    out.push(format!(
        "CREATE TABLE IF NOT EXISTS {} (queue {name} NOT NULL, handler {name} NOT NULL, \
         registered_at {big} NOT NULL, seen_at {big}, heartbeat_ms {big}, \
         PRIMARY KEY (queue, handler)){engine}",
        t.handlers
    ));
    let text = if backend == DbBackend::Sqlite {
        "TEXT"
    } else {
        "VARCHAR(255)"
    };
    out.push(format!(
        "CREATE TABLE IF NOT EXISTS {} (name {name} NOT NULL PRIMARY KEY, value {text} NOT NULL){engine}",
        t.meta
    ));
    out
}

/// Version 3: deduplication keys and scheduled delivery.
///
/// `dedup` holds one row per (queue, key) in use: inserted in the producer's transaction (its
/// primary key is what makes a second enqueue a duplicate, also under concurrent producers),
/// released by vacuum when the message is gone, deleted a retention window later. The key
/// travels with the message (`incoming.dedup_key`, `outgoing.dedup_key`) so vacuum knows which
/// keys it releases. `scheduled` holds messages until they are due; its `(due_at, id)` index
/// lets the scheduler find the due ones without reading the future ones.
fn step_3(backend: DbBackend, t: &Tables) -> Vec<String> {
    let p = &t.prefix;
    let name = name_type(backend);
    let key = key_type(backend);
    let (big, blob, id, engine) = match backend {
        DbBackend::Sqlite => ("INTEGER", "BLOB", "id INTEGER PRIMARY KEY", ""),
        DbBackend::MySql => (
            "BIGINT",
            "LONGBLOB",
            "id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY",
            " ENGINE=InnoDB",
        ),
        _ => (
            "BIGINT",
            "BYTEA",
            "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
            "",
        ),
    };
    let mut out = vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {} (queue {name} NOT NULL, dedup_key {key} NOT NULL, \
             created_at {big} NOT NULL, released_at {big}, PRIMARY KEY (queue, dedup_key)){engine}",
            t.dedup
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {} ({id}, queue {name} NOT NULL, partition_no {big} NOT NULL, \
             payload {blob} NOT NULL, dedup_key {key}, due_at {big} NOT NULL, created_at {big} NOT NULL){engine}",
            t.scheduled
        ),
    ];
    if backend == DbBackend::MySql {
        // MySQL has no CREATE INDEX IF NOT EXISTS; `add_missing_index` checks the catalog.
    } else {
        out.extend([
            format!(
                "CREATE INDEX IF NOT EXISTS {p}dedup_released ON {} (released_at)",
                t.dedup
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {p}scheduled_due ON {} (due_at, id)",
                t.scheduled
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {p}scheduled_key ON {} (queue, dedup_key)",
                t.scheduled
            ),
        ]);
    }
    out
}

/// Version 4: message headers. Every table that holds a message gets a nullable `headers`
/// column (JSON text, `NULL` for none): `incoming`, `outgoing`, `scheduled` and
/// `dead_letters`; the sequencer, the scheduler, dead-lettering and replay copy it along.
/// Existing rows read as messages without headers. Columns only, added by
/// [`add_missing_column`] so an interrupted step runs again. The same step adds an index of
/// scheduled messages by queue and due time, so status finds each queue's next due message and
/// counts its scheduled messages (up to a cap) without reading them all.
fn headers_tables(t: &Tables) -> [&String; 4] {
    [&t.incoming, &t.outgoing, &t.scheduled, &t.dead_letters]
}

/// The column type of stored headers: JSON text, bounded by the limits of
/// [`Headers`](crate::Headers) (MySQL's `TEXT` stops at 64 KiB, so `MEDIUMTEXT` there).
fn headers_type(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::MySql => "MEDIUMTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
        _ => "TEXT",
    }
}

/// The column type of a deduplication key: up to 255 characters, compared exactly.
fn key_type(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::MySql => "VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
        DbBackend::Sqlite => "TEXT",
        _ => "VARCHAR(255)",
    }
}

/// Adds `column` to `table` unless it is there (MySQL has no `ADD COLUMN IF NOT EXISTS`,
/// SQLite neither).
async fn add_missing_column<C: ConnectionTrait>(
    c: &C,
    backend: DbBackend,
    table: &str,
    column: &str,
    ty: &str,
) -> Result<(), DbErr> {
    let check = match backend {
        DbBackend::Postgres => {
            "SELECT COUNT(*) FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = ? AND column_name = ?"
        }
        DbBackend::MySql => {
            "SELECT COUNT(*) FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND table_name = ? AND column_name = ?"
        }
        _ => "SELECT COUNT(*) FROM pragma_table_info(?) WHERE name = ?",
    };
    let row = c
        .query_one_raw(statement(backend, check, vec![table.into(), column.into()]))
        .await?;
    let present = match row {
        Some(r) => col::<i64>(&r, 0)? > 0,
        None => false,
    };
    if !present {
        c.execute_unprepared(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))
            .await?;
    }
    Ok(())
}

/// Drops `column` from `table` if it is there.
#[cfg(feature = "migration")]
async fn drop_present_column<C: ConnectionTrait>(
    c: &C,
    backend: DbBackend,
    table: &str,
    column: &str,
) -> Result<(), DbErr> {
    let check = match backend {
        DbBackend::Postgres => {
            "SELECT COUNT(*) FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = ? AND column_name = ?"
        }
        DbBackend::MySql => {
            "SELECT COUNT(*) FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND table_name = ? AND column_name = ?"
        }
        _ => "SELECT COUNT(*) FROM pragma_table_info(?) WHERE name = ?",
    };
    let row = c
        .query_one_raw(statement(backend, check, vec![table.into(), column.into()]))
        .await?;
    if let Some(r) = row
        && col::<i64>(&r, 0)? > 0
    {
        c.execute_unprepared(&format!("ALTER TABLE {table} DROP COLUMN {column}"))
            .await?;
    }
    Ok(())
}

/// Creates index `name` on `table (cols)` on MySQL/MariaDB unless it exists.
async fn add_missing_index<C: ConnectionTrait>(
    c: &C,
    table: &str,
    name: &str,
    cols: &str,
) -> Result<(), DbErr> {
    let row = c
        .query_one_raw(statement(
            DbBackend::MySql,
            "SELECT COUNT(*) FROM information_schema.statistics \
             WHERE table_schema = DATABASE() AND table_name = ? AND index_name = ?",
            vec![table.into(), name.into()],
        ))
        .await?;
    let present = match row {
        Some(r) => col::<i64>(&r, 0)? > 0,
        None => false,
    };
    if !present {
        c.execute_unprepared(&format!("CREATE INDEX {name} ON {table} ({cols})"))
            .await?;
    }
    Ok(())
}

/// The column type of a queue or handler name.
fn name_type(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::MySql => "VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin",
        DbBackend::Sqlite => "TEXT",
        _ => "VARCHAR(64)",
    }
}

/// `INSERT` of one row that does nothing when the primary key exists.
pub(crate) fn insert_ignore_sql(
    backend: DbBackend,
    table: &str,
    cols: &str,
    values: &str,
) -> String {
    match backend {
        DbBackend::MySql => format!("INSERT IGNORE INTO {table} ({cols}) {values}"),
        DbBackend::Sqlite => format!("INSERT OR IGNORE INTO {table} ({cols}) {values}"),
        _ => format!("INSERT INTO {table} ({cols}) {values} ON CONFLICT DO NOTHING"),
    }
}

impl Store {
    /// The schema version recorded in the database; `None` before the first migration.
    pub(crate) async fn schema_version(&self) -> Result<Option<i64>, DbErr> {
        current_version(&self.db, self.backend, &self.t).await
    }

    /// Brings the schema to [`SCHEMA_VERSION`]. Idempotent, and serialized between processes:
    /// an advisory lock on PostgreSQL, a named lock on MySQL/MariaDB, the write lock on SQLite.
    /// A current schema costs one read and runs no DDL. Returns the version found before.
    pub(crate) async fn migrate(&self) -> Result<Option<i64>, DbErr> {
        if self.is_sqlite() {
            // WAL is a property of the database file; it lets readers run beside the writer.
            self.db
                .execute_unprepared("PRAGMA journal_mode=WAL")
                .await?;
        }
        let found = self.schema_version().await?;
        match found {
            Some(v) if v == SCHEMA_VERSION => return Ok(found),
            Some(v) if v > SCHEMA_VERSION => return Err(too_new(v)),
            _ => {}
        }
        let lock_name = format!("outbox-migrate:{}", self.prefix);
        let txn = self.begin_write().await?;
        if self.is_pg() {
            exec(
                &*txn,
                self.stmt(
                    "SELECT pg_advisory_xact_lock(hashtext(?))",
                    vec![lock_name.clone().into()],
                ),
            )
            .await?;
        } else if self.is_mysql() {
            let row = txn
                .query_one_raw(self.stmt("SELECT GET_LOCK(?, 60)", vec![lock_name.clone().into()]))
                .await?;
            let got: Option<i64> = match row {
                Some(r) => col(&r, 0)?,
                None => None,
            };
            if got != Some(1) {
                return Err(DbErr::Custom(format!(
                    "could not take the migration lock `{lock_name}`"
                )));
            }
        }
        let mut result = apply(&*txn, self.backend, &self.t, SCHEMA_VERSION).await;
        if self.is_mysql() {
            let release = txn
                .execute_raw(self.stmt("SELECT RELEASE_LOCK(?)", vec![lock_name.into()]))
                .await;
            if result.is_ok() {
                result = release.map(|_| ());
            }
        }
        result?;
        txn.commit().await?;
        Ok(found)
    }

    /// Registers a queue and its partitions, or reports the stored partition count if it
    /// differs. Safe to run concurrently from several processes.
    pub(crate) async fn register_queue(
        &self,
        name: &str,
        partitions: u32,
    ) -> Result<Registered, DbErr> {
        let txn = self.begin_write().await?;
        let now = self.now_sql();
        exec(
            &*txn,
            self.stmt(
                &insert_ignore_sql(
                    self.backend,
                    &self.t.queues,
                    "name, partitions, created_at",
                    &format!("VALUES (?, ?, {now})"),
                ),
                vec![name.into(), i64::from(partitions).into()],
            ),
        )
        .await?;
        let stored = self
            .queue_partitions(&*txn, name)
            .await?
            .unwrap_or(partitions);
        if stored != partitions {
            return Ok(Registered::PartitionMismatch { stored });
        }
        for chunk in (0..partitions).collect::<Vec<_>>().chunks(500) {
            let mut values = Vec::with_capacity(chunk.len() * 2);
            for p in chunk {
                values.push(name.into());
                values.push(i64::from(*p).into());
            }
            exec(
                &*txn,
                self.stmt(
                    &insert_ignore_sql(
                        self.backend,
                        &self.t.partitions,
                        "queue, partition_no",
                        &format!("VALUES {}", vec![Store::list(2); chunk.len()].join(", ")),
                    ),
                    values,
                ),
            )
            .await?;
        }
        txn.commit().await?;
        Ok(Registered::Ok)
    }

    /// Registers a handler and creates its cursor rows (one per partition). A new cursor starts
    /// where vacuum has deleted up to, so a handler added late sees every retained message and
    /// counts none of the deleted ones as pending.
    pub(crate) async fn register_handler(
        &self,
        queue: &str,
        handler: &str,
        partitions: u32,
    ) -> Result<(), DbErr> {
        let txn = self.begin_write().await?;
        let now = self.now_sql();
        exec(
            &*txn,
            self.stmt(
                &insert_ignore_sql(
                    self.backend,
                    &self.t.handlers,
                    "queue, handler, registered_at",
                    &format!("VALUES (?, ?, {now})"),
                ),
                vec![queue.into(), handler.into()],
            ),
        )
        .await?;
        exec(
            &*txn,
            self.stmt(
                &insert_ignore_sql(
                    self.backend,
                    &self.t.cursors,
                    "queue, handler, partition_no, processed_seq, updated_at",
                    &format!(
                        "SELECT p.queue, ?, p.partition_no, p.vacuumed_seq, {now} FROM {} p \
                         WHERE p.queue = ? AND p.partition_no < ?",
                        self.t.partitions
                    ),
                ),
                vec![handler.into(), queue.into(), i64::from(partitions).into()],
            ),
        )
        .await?;
        txn.commit().await
    }

    /// The stored partition count of a queue.
    pub(crate) async fn queue_partitions<C: ConnectionTrait>(
        &self,
        c: &C,
        name: &str,
    ) -> Result<Option<u32>, DbErr> {
        let row = c
            .query_one_raw(self.stmt(
                &format!("SELECT partitions FROM {} WHERE name = ?", self.t.queues),
                vec![name.into()],
            ))
            .await?;
        match row {
            Some(r) => Ok(Some(u32::try_from(col::<i64>(&r, 0)?).unwrap_or(0))),
            None => Ok(None),
        }
    }

    /// The id of this outbox, created once by the migration to version 2.
    pub(crate) async fn instance_id(&self) -> Result<Option<String>, DbErr> {
        let row = self
            .db
            .query_one_raw(self.stmt(
                &format!(
                    "SELECT value FROM {} WHERE name = 'instance_id'",
                    self.t.meta
                ),
                vec![],
            ))
            .await?;
        row.map(|r| col::<String>(&r, 0)).transpose()
    }
}

fn too_new(found: i64) -> DbErr {
    DbErr::Custom(format!(
        "the outbox schema is at version {found}, newer than this build's {SCHEMA_VERSION}; upgrade outbox"
    ))
}

/// The version recorded in `t.schema_version`, or `None` if the table does not exist yet. Reads
/// the catalog first, so it needs no privilege beyond reading rows.
pub(crate) async fn current_version<C: ConnectionTrait>(
    c: &C,
    backend: DbBackend,
    t: &Tables,
) -> Result<Option<i64>, DbErr> {
    let exists_sql = match backend {
        DbBackend::Postgres => {
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name = ?"
        }
        DbBackend::MySql => {
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name = ?"
        }
        _ => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
    };
    let row = c
        .query_one_raw(statement(
            backend,
            exists_sql,
            vec![t.schema_version.clone().into()],
        ))
        .await?;
    let exists = match row {
        Some(r) => col::<i64>(&r, 0)? > 0,
        None => false,
    };
    if !exists {
        return Ok(None);
    }
    let row = c
        .query_one_raw(statement(
            backend,
            &format!("SELECT MAX(version) FROM {}", t.schema_version),
            vec![],
        ))
        .await?;
    match row {
        Some(r) => col(&r, 0),
        None => Ok(None),
    }
}

/// Brings the schema of `t` through `c` up to version `target` (steps above the recorded
/// version), recording each version reached. The caller provides the serialization between
/// processes (see [`Store::migrate`]).
pub(crate) async fn apply<C: ConnectionTrait>(
    c: &C,
    backend: DbBackend,
    t: &Tables,
    target: i64,
) -> Result<(), DbErr> {
    let found = current_version(c, backend, t).await?.unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(too_new(found));
    }
    for version in (found + 1)..=target.min(SCHEMA_VERSION) {
        apply_step(c, backend, t, version).await?;
    }
    Ok(())
}

/// Runs the step to `version` and records it.
async fn apply_step<C: ConnectionTrait>(
    c: &C,
    backend: DbBackend,
    t: &Tables,
    version: i64,
) -> Result<(), DbErr> {
    let sql = match version {
        1 => step_1(backend, t),
        2 => step_2(backend, t),
        3 => step_3(backend, t),
        4 => Vec::new(),
        _ => return Err(too_new(version)),
    };
    for s in sql {
        c.execute_unprepared(&s).await?;
    }
    match version {
        1 => drop_incoming_index(c, backend, t).await?,
        2 => {
            // Version-1 databases made before the sequencer read `incoming` by primary key
            // still carry its old index (that change kept the version number).
            drop_incoming_index(c, backend, t).await?;
            // Handlers registered before the registry existed: listed, never seen yet.
            let now = now_sql(backend);
            c.execute_unprepared(&insert_ignore_sql(
                backend,
                &t.handlers,
                "queue, handler, registered_at",
                &format!("SELECT DISTINCT queue, handler, {now} FROM {}", t.cursors),
            ))
            .await?;
            let id = format!("{:032x}", rand::random::<u128>());
            exec(
                c,
                statement(
                    backend,
                    &insert_ignore_sql(
                        backend,
                        &t.meta,
                        "name, value",
                        "VALUES ('instance_id', ?)",
                    ),
                    vec![id.into()],
                ),
            )
            .await?;
        }
        3 => {
            let key = key_type(backend);
            add_missing_column(c, backend, &t.incoming, "dedup_key", key).await?;
            add_missing_column(c, backend, &t.outgoing, "dedup_key", key).await?;
            if backend == DbBackend::MySql {
                let p = &t.prefix;
                add_missing_index(c, &t.dedup, &format!("{p}dedup_released"), "released_at")
                    .await?;
                add_missing_index(c, &t.scheduled, &format!("{p}scheduled_due"), "due_at, id")
                    .await?;
                add_missing_index(
                    c,
                    &t.scheduled,
                    &format!("{p}scheduled_key"),
                    "queue, dedup_key",
                )
                .await?;
            }
        }
        4 => {
            for table in headers_tables(t) {
                add_missing_column(c, backend, table, "headers", headers_type(backend)).await?;
            }
            let name = format!("{}scheduled_queue_due", t.prefix);
            if backend == DbBackend::MySql {
                add_missing_index(c, &t.scheduled, &name, "queue, due_at").await?;
            } else {
                c.execute_unprepared(&format!(
                    "CREATE INDEX IF NOT EXISTS {name} ON {} (queue, due_at)",
                    t.scheduled
                ))
                .await?;
            }
        }
        _ => {}
    }
    exec(
        c,
        statement(
            backend,
            &format!("INSERT INTO {} (version) VALUES (?)", t.schema_version),
            vec![version.into()],
        ),
    )
    .await?;
    Ok(())
}

/// The database's clock in milliseconds since the Unix epoch, as an SQL expression (see
/// [`Store::now_sql`]).
pub(crate) fn now_sql(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Postgres => "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
        DbBackend::MySql => {
            "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000)"
        }
        _ => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    }
}

/// Databases created before the sequencer read `incoming` by primary key have a secondary
/// index on it that only costs producers now: drop it.
async fn drop_incoming_index<C: ConnectionTrait>(
    c: &C,
    backend: DbBackend,
    t: &Tables,
) -> Result<(), DbErr> {
    let index = format!("{}incoming_partition", t.prefix);
    match backend {
        DbBackend::MySql => {
            let row = c
                .query_one_raw(statement(
                    backend,
                    "SELECT COUNT(*) FROM information_schema.statistics \
                     WHERE table_schema = DATABASE() AND table_name = ? AND index_name = ?",
                    vec![t.incoming.clone().into(), index.clone().into()],
                ))
                .await?;
            let present: i64 = match row {
                Some(r) => col(&r, 0)?,
                None => 0,
            };
            if present > 0 {
                c.execute_unprepared(&format!("ALTER TABLE {} DROP INDEX {index}", t.incoming))
                    .await?;
            }
        }
        _ => {
            c.execute_unprepared(&format!("DROP INDEX IF EXISTS {index}"))
                .await?;
        }
    }
    Ok(())
}

/// Undoes the step to `version` (the down migrations): version 4 drops the `headers` columns,
/// version 3 the deduplication and scheduling tables, version 2 drops the handler registry
/// and the instance id (names keep their exact comparison), version 1 drops every table.
#[cfg(feature = "migration")]
pub(crate) async fn revert<C: ConnectionTrait>(
    c: &C,
    t: &Tables,
    version: i64,
) -> Result<(), DbErr> {
    let backend = c.get_database_backend();
    let tables: Vec<&String> = match version {
        1 => vec![
            &t.scheduled,
            &t.dedup,
            &t.meta,
            &t.handlers,
            &t.dead_letters,
            &t.cursors,
            &t.outgoing,
            &t.incoming,
            &t.partitions,
            &t.queues,
            &t.schema_version,
        ],
        2 => vec![&t.meta, &t.handlers],
        4 => {
            for table in headers_tables(t) {
                drop_present_column(c, backend, table, "headers").await?;
            }
            let name = format!("{}scheduled_queue_due", t.prefix);
            c.execute_unprepared(&if backend == DbBackend::MySql {
                format!("DROP INDEX {name} ON {}", t.scheduled)
            } else {
                format!("DROP INDEX IF EXISTS {name}")
            })
            .await?;
            vec![]
        }
        _ => {
            drop_present_column(c, backend, &t.incoming, "dedup_key").await?;
            drop_present_column(c, backend, &t.outgoing, "dedup_key").await?;
            vec![&t.scheduled, &t.dedup]
        }
    };
    for table in tables {
        c.execute_unprepared(&format!("DROP TABLE IF EXISTS {table}"))
            .await?;
    }
    if version > 1 {
        exec(
            c,
            statement(
                backend,
                &format!("DELETE FROM {} WHERE version >= ?", t.schema_version),
                vec![version.into()],
            ),
        )
        .await?;
    }
    Ok(())
}
