//! Tables of the outbox, created and upgraded by versioned migrations that are safe to run from
//! several processes at once, and the registration of queues, handlers and their cursors.
//!
//! Each version is one step (`step_1`, `step_2`, ...) that brings the schema from the version
//! before it; a step is idempotent, so a step interrupted half way (MySQL commits each DDL
//! statement on its own) is simply run again. The version reached is recorded in
//! `schema_version`. A runtime whose schema is current runs no DDL at all, so a database user
//! that may only read and write rows can run it.

use sea_orm::{ConnectionTrait, DbErr};

use super::dialect::{Dialect, MigrationLock};
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

/// Version 1: the statements that create every table and index of the first schema
/// ([`Dialect::schema_v1`]); each is idempotent.
fn step_1(d: &dyn Dialect, t: &Tables) -> Vec<String> {
    d.schema_v1(t)
}

/// Version 2: names compare byte for byte on every backend, error texts take any character, a
/// registry of handlers (which process serves each one, so status can tell a stale cursor), and
/// an instance id for this outbox.
///
/// PostgreSQL and SQLite already compare text byte for byte. MySQL/MariaDB compare with the
/// column's collation, case-insensitively by default, so `orders` and `Orders` were one queue
/// there: every name column becomes `ascii_bin` (names are ASCII by validation). Error texts
/// become `utf8mb4` so any text a handler returns can be stored
/// ([`Dialect::exact_names_v2`]).
fn step_2(d: &dyn Dialect, t: &Tables) -> Vec<String> {
    let ty = d.types();
    let (name, big, text, suffix) = (ty.name, ty.big, ty.text, ty.table_suffix);
    let mut out = d.exact_names_v2(t);
    out.push(format!(
        "CREATE TABLE IF NOT EXISTS {} (queue {name} NOT NULL, handler {name} NOT NULL, \
         registered_at {big} NOT NULL, seen_at {big}, heartbeat_ms {big}, \
         PRIMARY KEY (queue, handler)){suffix}",
        t.handlers
    ));
    out.push(format!(
        "CREATE TABLE IF NOT EXISTS {} (name {name} NOT NULL PRIMARY KEY, value {text} NOT NULL){suffix}",
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
fn step_3(d: &dyn Dialect, t: &Tables) -> Vec<String> {
    let ty = d.types();
    let (name, key, big, blob, id, suffix) =
        (ty.name, ty.key, ty.big, ty.blob, ty.id, ty.table_suffix);
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {} (queue {name} NOT NULL, dedup_key {key} NOT NULL, \
             created_at {big} NOT NULL, released_at {big}, PRIMARY KEY (queue, dedup_key)){suffix}",
            t.dedup
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {} ({id}, queue {name} NOT NULL, partition_no {big} NOT NULL, \
             payload {blob} NOT NULL, dedup_key {key}, due_at {big} NOT NULL, created_at {big} NOT NULL){suffix}",
            t.scheduled
        ),
    ]
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

/// Adds `column` to `table` unless it is there (MySQL has no `ADD COLUMN IF NOT EXISTS`,
/// SQLite neither).
async fn add_missing_column<C: ConnectionTrait>(
    c: &C,
    d: &dyn Dialect,
    table: &str,
    column: &str,
    ty: &str,
) -> Result<(), DbErr> {
    if !column_present(c, d, table, column).await? {
        c.execute_unprepared(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))
            .await?;
    }
    Ok(())
}

/// Whether `table` has `column`.
async fn column_present<C: ConnectionTrait>(
    c: &C,
    d: &dyn Dialect,
    table: &str,
    column: &str,
) -> Result<bool, DbErr> {
    let row = c
        .query_one_raw(statement(
            d.backend(),
            d.column_count(),
            vec![table.into(), column.into()],
        ))
        .await?;
    match row {
        Some(r) => Ok(col::<i64>(&r, 0)? > 0),
        None => Ok(false),
    }
}

/// Drops `column` from `table` if it is there.
#[cfg(feature = "migration")]
async fn drop_present_column<C: ConnectionTrait>(
    c: &C,
    d: &dyn Dialect,
    table: &str,
    column: &str,
) -> Result<(), DbErr> {
    if column_present(c, d, table, column).await? {
        c.execute_unprepared(&format!("ALTER TABLE {table} DROP COLUMN {column}"))
            .await?;
    }
    Ok(())
}

/// Creates index `name` on `table (cols)` unless it exists: `CREATE INDEX IF NOT EXISTS`, or
/// where the backend has none ([`Dialect::index_count`]), a read of the catalog first.
async fn add_missing_index<C: ConnectionTrait>(
    c: &C,
    d: &dyn Dialect,
    table: &str,
    name: &str,
    cols: &str,
) -> Result<(), DbErr> {
    if d.index_count().is_none() {
        c.execute_unprepared(&format!(
            "CREATE INDEX IF NOT EXISTS {name} ON {table} ({cols})"
        ))
        .await?;
    } else if !index_present(c, d, table, name).await? {
        c.execute_unprepared(&format!("CREATE INDEX {name} ON {table} ({cols})"))
            .await?;
    }
    Ok(())
}

/// Whether `table` has index `name`, read from the catalog where the backend has
/// [`Dialect::index_count`] (elsewhere: `true`, and the `IF [NOT] EXISTS` forms decide).
async fn index_present<C: ConnectionTrait>(
    c: &C,
    d: &dyn Dialect,
    table: &str,
    name: &str,
) -> Result<bool, DbErr> {
    let Some(count) = d.index_count() else {
        return Ok(true);
    };
    let row = c
        .query_one_raw(statement(
            d.backend(),
            count,
            vec![table.into(), name.into()],
        ))
        .await?;
    match row {
        Some(r) => Ok(col::<i64>(&r, 0)? > 0),
        None => Ok(false),
    }
}

impl Store {
    /// The schema version recorded in the database; `None` before the first migration.
    pub(crate) async fn schema_version(&self) -> Result<Option<i64>, DbErr> {
        current_version(&self.db, self.dialect, &self.t).await
    }

    /// Brings the schema to [`SCHEMA_VERSION`]. Idempotent, and serialized between processes:
    /// an advisory lock on PostgreSQL, a named lock on MySQL/MariaDB, the write lock on SQLite.
    /// A current schema costs one read and runs no DDL. Returns the version found before.
    pub(crate) async fn migrate(&self) -> Result<Option<i64>, DbErr> {
        if let Some(settings) = self.dialect.file_settings() {
            self.db.execute_unprepared(settings).await?;
        }
        let found = self.schema_version().await?;
        match found {
            Some(v) if v == SCHEMA_VERSION => return Ok(found),
            Some(v) if v > SCHEMA_VERSION => return Err(too_new(v)),
            _ => {}
        }
        let lock_name = format!("outbox-migrate:{}", self.prefix);
        let txn = self.begin_write().await?;
        let lock = self.dialect.migration_lock();
        match lock {
            MigrationLock::WriteTransaction => {}
            MigrationLock::Transaction(take) => {
                exec(&*txn, self.stmt(take, vec![lock_name.clone().into()])).await?;
            }
            MigrationLock::Named { take, .. } => {
                let row = txn
                    .query_one_raw(self.stmt(take, vec![lock_name.clone().into()]))
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
        }
        let mut result = apply(&*txn, self.dialect, &self.t, SCHEMA_VERSION).await;
        if let MigrationLock::Named { release, .. } = lock {
            let release = txn
                .execute_raw(self.stmt(release, vec![lock_name.into()]))
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
        let now = self.dialect.now_ms();
        exec(
            &*txn,
            self.stmt(
                &self.dialect.insert_ignore(
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
                    &self.dialect.insert_ignore(
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
    /// counts none of the deleted ones as pending. Returns the number of cursors created.
    pub(crate) async fn register_handler(
        &self,
        queue: &str,
        handler: &str,
        partitions: u32,
    ) -> Result<u64, DbErr> {
        let txn = self.begin_write().await?;
        let now = self.dialect.now_ms();
        exec(
            &*txn,
            self.stmt(
                &self.dialect.insert_ignore(
                    &self.t.handlers,
                    "queue, handler, registered_at",
                    &format!("VALUES (?, ?, {now})"),
                ),
                vec![queue.into(), handler.into()],
            ),
        )
        .await?;
        let created = exec(
            &*txn,
            self.stmt(
                &self.dialect.insert_ignore(
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
        txn.commit().await?;
        Ok(created)
    }

    /// Gives the planner statistics of the cursor table where it needs them to look up a list
    /// of keys (see [`Dialect::plans_key_lists_by_statistics`]). A role that does not own the
    /// table gets a warning from the database, not an error.
    ///
    /// [`Dialect::plans_key_lists_by_statistics`]: super::dialect::Dialect::plans_key_lists_by_statistics
    pub(crate) async fn analyze_cursors(&self) -> Result<(), DbErr> {
        if self.dialect.plans_key_lists_by_statistics() {
            self.db
                .execute_unprepared(&format!("ANALYZE {}", self.t.cursors))
                .await?;
        }
        Ok(())
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

    /// Counts a change another process's idle handlers must look at: a sequencer pass that
    /// moved rows, an operator's unblock or skip. Kept in `meta` as a number in text, bumped
    /// after the change committed (see [`Store::changes`]).
    pub(crate) async fn mark_changed(&self) -> Result<(), DbErr> {
        let bumped = exec(
            &self.db,
            self.stmt(
                &format!(
                    "UPDATE {} SET value = CAST(value AS {}) + 1 WHERE name = '{CHANGES}'",
                    self.t.meta,
                    self.dialect.integer_cast_type()
                ),
                vec![],
            ),
        )
        .await?;
        if bumped == 0 {
            exec(
                &self.db,
                self.stmt(
                    &self.dialect.insert_ignore(
                        &self.t.meta,
                        "name, value",
                        &format!("VALUES ('{CHANGES}', '1')"),
                    ),
                    vec![],
                ),
            )
            .await?;
        }
        Ok(())
    }

    /// The count of [`Store::mark_changed`] (`None` before the first): equal at two reads, no
    /// change was marked in between, so whatever committed before the first read was there
    /// for a read of the cursors that followed it. One row by primary key.
    pub(crate) async fn changes(&self) -> Result<Option<String>, DbErr> {
        let row = self
            .db
            .query_one_raw(self.stmt(
                &format!("SELECT value FROM {} WHERE name = '{CHANGES}'", self.t.meta),
                vec![],
            ))
            .await?;
        row.map(|r| col::<String>(&r, 0)).transpose()
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

/// The `meta` row that counts [`Store::mark_changed`].
const CHANGES: &str = "changes";

fn too_new(found: i64) -> DbErr {
    DbErr::Custom(format!(
        "the outbox schema is at version {found}, newer than this build's {SCHEMA_VERSION}; upgrade outbox"
    ))
}

/// The version recorded in `t.schema_version`, or `None` if the table does not exist yet. Reads
/// the catalog first, so it needs no privilege beyond reading rows.
pub(crate) async fn current_version<C: ConnectionTrait>(
    c: &C,
    d: &dyn Dialect,
    t: &Tables,
) -> Result<Option<i64>, DbErr> {
    let row = c
        .query_one_raw(statement(
            d.backend(),
            d.table_count(),
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
            d.backend(),
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
    d: &dyn Dialect,
    t: &Tables,
    target: i64,
) -> Result<(), DbErr> {
    let found = current_version(c, d, t).await?.unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(too_new(found));
    }
    for version in (found + 1)..=target.min(SCHEMA_VERSION) {
        apply_step(c, d, t, version).await?;
    }
    Ok(())
}

/// Runs the step to `version` and records it.
async fn apply_step<C: ConnectionTrait>(
    c: &C,
    d: &dyn Dialect,
    t: &Tables,
    version: i64,
) -> Result<(), DbErr> {
    let sql = match version {
        1 => step_1(d, t),
        2 => step_2(d, t),
        3 => step_3(d, t),
        4 => Vec::new(),
        _ => return Err(too_new(version)),
    };
    for s in sql {
        c.execute_unprepared(&s).await?;
    }
    let p = &t.prefix;
    match version {
        1 => drop_incoming_index(c, d, t).await?,
        2 => {
            // Version-1 databases made before the sequencer read `incoming` by primary key
            // still carry its old index (that change kept the version number).
            drop_incoming_index(c, d, t).await?;
            // Handlers registered before the registry existed: listed, never seen yet.
            let now = d.now_ms();
            c.execute_unprepared(&d.insert_ignore(
                &t.handlers,
                "queue, handler, registered_at",
                &format!("SELECT DISTINCT queue, handler, {now} FROM {}", t.cursors),
            ))
            .await?;
            let id = format!("{:032x}", rand::random::<u128>());
            exec(
                c,
                statement(
                    d.backend(),
                    &d.insert_ignore(&t.meta, "name, value", "VALUES ('instance_id', ?)"),
                    vec![id.into()],
                ),
            )
            .await?;
        }
        3 => {
            let key = d.types().key;
            add_missing_column(c, d, &t.incoming, "dedup_key", key).await?;
            add_missing_column(c, d, &t.outgoing, "dedup_key", key).await?;
            let (dedup, scheduled) = (&t.dedup, &t.scheduled);
            add_missing_index(c, d, dedup, &format!("{p}dedup_released"), "released_at").await?;
            add_missing_index(c, d, scheduled, &format!("{p}scheduled_due"), "due_at, id").await?;
            add_missing_index(
                c,
                d,
                scheduled,
                &format!("{p}scheduled_key"),
                "queue, dedup_key",
            )
            .await?;
        }
        4 => {
            for table in headers_tables(t) {
                add_missing_column(c, d, table, "headers", d.types().headers).await?;
            }
            let name = format!("{p}scheduled_queue_due");
            add_missing_index(c, d, &t.scheduled, &name, "queue, due_at").await?;
        }
        _ => {}
    }
    exec(
        c,
        statement(
            d.backend(),
            &format!("INSERT INTO {} (version) VALUES (?)", t.schema_version),
            vec![version.into()],
        ),
    )
    .await?;
    Ok(())
}

/// Databases created before the sequencer read `incoming` by primary key have a secondary
/// index on it that only costs producers now: drop it.
async fn drop_incoming_index<C: ConnectionTrait>(
    c: &C,
    d: &dyn Dialect,
    t: &Tables,
) -> Result<(), DbErr> {
    let index = format!("{}incoming_partition", t.prefix);
    if index_present(c, d, &t.incoming, &index).await? {
        c.execute_unprepared(&d.drop_index(&index, &t.incoming))
            .await?;
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
    let d = super::dialect::of(c.get_database_backend());
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
                drop_present_column(c, d, table, "headers").await?;
            }
            let name = format!("{}scheduled_queue_due", t.prefix);
            c.execute_unprepared(&d.drop_index(&name, &t.scheduled))
                .await?;
            vec![]
        }
        _ => {
            drop_present_column(c, d, &t.incoming, "dedup_key").await?;
            drop_present_column(c, d, &t.outgoing, "dedup_key").await?;
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
                d.backend(),
                &format!("DELETE FROM {} WHERE version >= ?", t.schema_version),
                vec![version.into()],
            ),
        )
        .await?;
    }
    Ok(())
}
