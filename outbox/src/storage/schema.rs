//! Tables of the outbox, created by an idempotent migration that is safe to run from several
//! processes at once, and the registration of queues and handler cursors.

use sea_orm::{ConnectionTrait, DbBackend, DbErr};

use super::{Store, Tables, col, exec, now_ms, statement};

/// Current version of the schema written by [`Store::migrate`].
pub(crate) const SCHEMA_VERSION: i64 = 1;

/// Result of registering a queue.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Registered {
    Ok,
    PartitionMismatch { stored: u32 },
}

/// The statements that create every table and index of `t` on `backend`; each is idempotent.
pub(crate) fn ddl(backend: DbBackend, t: &Tables) -> Vec<String> {
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

impl Store {
    /// Creates the tables if they do not exist. Idempotent, and serialized between processes:
    /// an advisory lock on PostgreSQL, a named lock on MySQL/MariaDB, the write lock on SQLite.
    pub(crate) async fn migrate(&self) -> Result<(), DbErr> {
        if self.is_sqlite() {
            // WAL is a property of the database file; it lets readers run beside the writer.
            self.db
                .execute_unprepared("PRAGMA journal_mode=WAL")
                .await?;
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
        let mut result = apply(&*txn, self.backend, &self.t).await;
        if self.is_mysql() {
            let release = txn
                .execute_raw(self.stmt("SELECT RELEASE_LOCK(?)", vec![lock_name.into()]))
                .await;
            if result.is_ok() {
                result = release.map(|_| ());
            }
        }
        result?;
        txn.commit().await
    }

    /// `INSERT` that does nothing when the primary key exists.
    fn insert_ignore(
        &self,
        table: &str,
        cols: &str,
        rows: usize,
        per_row: usize,
        conflict: &str,
    ) -> String {
        let values = vec![Store::list(per_row); rows].join(", ");
        if self.is_mysql() {
            let first = cols.split(',').next().unwrap_or(cols).trim();
            format!(
                "INSERT INTO {table} ({cols}) VALUES {values} ON DUPLICATE KEY UPDATE {first} = {first}"
            )
        } else {
            format!(
                "INSERT INTO {table} ({cols}) VALUES {values} ON CONFLICT ({conflict}) DO NOTHING"
            )
        }
    }

    /// Registers a queue and its partitions, or reports the stored partition count if it
    /// differs. Safe to run concurrently from several processes.
    pub(crate) async fn register_queue(
        &self,
        name: &str,
        partitions: u32,
    ) -> Result<Registered, DbErr> {
        let txn = self.begin_write().await?;
        let now = now_ms();
        exec(
            &*txn,
            self.stmt(
                &self.insert_ignore(&self.t.queues, "name, partitions, created_at", 1, 3, "name"),
                vec![name.into(), i64::from(partitions).into(), now.into()],
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
                    &self.insert_ignore(
                        &self.t.partitions,
                        "queue, partition_no",
                        chunk.len(),
                        2,
                        "queue, partition_no",
                    ),
                    values,
                ),
            )
            .await?;
        }
        txn.commit().await?;
        Ok(Registered::Ok)
    }

    /// Creates the cursor rows of a handler (one per partition), starting before the oldest
    /// retained message.
    pub(crate) async fn register_handler(
        &self,
        queue: &str,
        handler: &str,
        partitions: u32,
    ) -> Result<(), DbErr> {
        let txn = self.begin_write().await?;
        let now = now_ms();
        for chunk in (0..partitions).collect::<Vec<_>>().chunks(300) {
            let mut values = Vec::with_capacity(chunk.len() * 4);
            for p in chunk {
                values.push(queue.into());
                values.push(handler.into());
                values.push(i64::from(*p).into());
                values.push(now.into());
            }
            exec(
                &*txn,
                self.stmt(
                    &self.insert_ignore(
                        &self.t.cursors,
                        "queue, handler, partition_no, updated_at",
                        chunk.len(),
                        4,
                        "queue, handler, partition_no",
                    ),
                    values,
                ),
            )
            .await?;
        }
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
}

/// Creates the tables of `t` through `c` and records the schema version. The caller provides
/// the serialization between processes (see [`Store::migrate`]).
pub(crate) async fn apply<C: ConnectionTrait>(
    c: &C,
    backend: DbBackend,
    t: &Tables,
) -> Result<(), DbErr> {
    for sql in ddl(backend, t) {
        c.execute_unprepared(&sql).await?;
    }
    drop_incoming_index(c, backend, t).await?;
    let row = c
        .query_one_raw(statement(
            backend,
            &format!("SELECT MAX(version) FROM {}", t.schema_version),
            vec![],
        ))
        .await?;
    let current: Option<i64> = match row {
        Some(r) => col(&r, 0)?,
        None => None,
    };
    match current {
        None => {
            exec(
                c,
                statement(
                    backend,
                    &format!("INSERT INTO {} (version) VALUES (?)", t.schema_version),
                    vec![SCHEMA_VERSION.into()],
                ),
            )
            .await?;
            Ok(())
        }
        Some(v) if v > SCHEMA_VERSION => Err(DbErr::Custom(format!(
            "the outbox schema is at version {v}, newer than this build's {SCHEMA_VERSION}; upgrade outbox"
        ))),
        Some(_) => Ok(()),
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

/// Drops every table of `t` (the down migration).
#[cfg(feature = "migration")]
pub(crate) async fn drop_all<C: ConnectionTrait>(c: &C, t: &Tables) -> Result<(), DbErr> {
    for table in [
        &t.dead_letters,
        &t.cursors,
        &t.outgoing,
        &t.incoming,
        &t.partitions,
        &t.queues,
        &t.schema_version,
    ] {
        c.execute_unprepared(&format!("DROP TABLE IF EXISTS {table}"))
            .await?;
    }
    Ok(())
}
