//! What differs between the backends, named by capability.
//!
//! [`Dialect`] is the one question the storage layer asks about a backend: the pipeline files
//! branch on what a backend can do ([`single_writer`](Dialect::single_writer),
//! [`listen_notify`](Dialect::listen_notify), a statement that exists only where the backend
//! has the feature, ...), never on which backend it is. Each backend answers in its own file,
//! which holds every SQL fragment and statement that is that backend's alone, its DDL
//! included: [`sqlite`], [`postgres`], [`mysql`]. SQL that is the same on every backend stays
//! in the pipeline file that sends it.

mod mysql;
pub(crate) mod postgres;
mod sqlite;

use sea_orm::{
    DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, Statement, TransactionOptions,
    TransactionTrait, Value,
};

use super::Tables;

/// A backend's SQL and capabilities. One static value per backend; see [`of`].
pub(crate) trait Dialect: std::fmt::Debug + Send + Sync {
    /// The sea-orm backend this dialect speaks to.
    fn backend(&self) -> DbBackend;

    // ------------------------------------------------------------ capabilities

    /// Placeholders are numbered (`$1`, `$2`, ...) rather than `?` (see [`statement`]).
    fn numbered_placeholders(&self) -> bool;

    /// One writer at a time for the whole database, and no row locks: a write transaction
    /// already excludes every other writer (SQLite). The engine then queues its own writes in
    /// the process instead of spinning in the database's busy handler, and needs a single
    /// connection.
    fn single_writer(&self) -> bool;

    /// Row locks, so that another writer may hold (and change) rows this transaction read
    /// before it locked them.
    fn row_locks(&self) -> bool {
        !self.single_writer()
    }

    /// How the engine begins its write transactions (see [`begin_on`]).
    fn write_transaction(&self) -> TransactionOptions;

    /// LISTEN/NOTIFY: a notification sent in a transaction is delivered to listening
    /// processes on commit (PostgreSQL).
    fn listen_notify(&self) -> bool;

    /// Until a table has statistics (the database's background analyze comes later), the
    /// planner serves an `IN` list or an `OR` of key ranges by reading every row of the key's
    /// prefix and filtering, instead of looking each one up (PostgreSQL: a group claim at
    /// 4,096 partitions read all 4,096 cursor rows of its handler per statement). The engine
    /// then analyzes the cursor table after it creates cursors, and reads a group's batches as
    /// a `UNION ALL` of key ranges, which every branch serves from the key.
    fn plans_key_lists_by_statistics(&self) -> bool {
        false
    }

    /// `INSERT … RETURNING id` gives the ids of the rows inserted; without it, the id of a
    /// one-row insert is the connection's last insert id.
    fn insert_returning(&self) -> bool;

    /// A `DELETE` waits on the lock of every uncommitted producer insert its scan touches,
    /// including one record past the end of a range (InnoDB's next-record locks). The
    /// sequencer then deletes by runs of consecutive ids, each stopped by a `LIMIT`.
    fn deletes_wait_on_producers(&self) -> bool;

    /// The sequencer's scan of `incoming` can start above a low-water mark found from the
    /// lock catalog (PostgreSQL `pg_locks`: which transactions may still commit a row
    /// there). See [`Dialect::sequence_pass`].
    fn low_water_mark(&self) -> bool;

    /// Where another process's commit shows up as a write to files beside the database, which
    /// a file watch can see (SQLite: the write-ahead log, or the file itself in the other
    /// journal modes). `None` for a server: its files are written by the server, not by the
    /// committing process, and tell nothing about which database changed.
    fn commit_files(&self) -> Option<CommitFiles>;

    /// The server setting that caps the size of one statement, and the query that reads it
    /// (MySQL/MariaDB `max_allowed_packet`); `None` where there is no such cap.
    fn statement_cap(&self) -> Option<StatementCap>;

    // ------------------------------------------------------------ SQL fragments

    /// The database's clock in milliseconds since the Unix epoch, as an SQL expression.
    ///
    /// Leases, their takeover, the ack fence, retry times and enqueue times are all judged by
    /// this one clock, so processes whose own clocks disagree still agree on who holds a
    /// lease. (SQLite runs inside each process, on the host's clock, which its processes
    /// share.)
    fn now_ms(&self) -> &'static str;

    /// The name of the SQL function that returns the larger of its arguments.
    fn greatest_fn(&self) -> &'static str;

    /// The larger of two integer SQL expressions.
    fn greatest(&self, a: &str, b: &str) -> String {
        format!("{}({a}, {b})", self.greatest_fn())
    }

    /// The integer type a `CAST` names (an aggregate such as `SUM` of integers is a decimal
    /// on PostgreSQL and MySQL/MariaDB; cast back, it reads as an `i64`).
    fn integer_cast_type(&self) -> &'static str;

    /// `SUM` of an integer SQL expression, as an integer.
    fn sum_int(&self, expr: &str) -> String {
        format!("CAST(SUM({expr}) AS {})", self.integer_cast_type())
    }

    /// `FOR UPDATE SKIP LOCKED` where the backend has row locks; a single writer's write
    /// transaction already excludes every other writer.
    fn skip_locked(&self) -> &'static str {
        if self.row_locks() {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        }
    }

    /// `FOR UPDATE` where the backend has row locks.
    fn for_update(&self) -> &'static str {
        if self.row_locks() { " FOR UPDATE" } else { "" }
    }

    /// A clause that ends a subquery without changing its rows and keeps the planner from
    /// inlining it into the query around it.
    fn optimization_fence(&self) -> &'static str;

    /// `INSERT` of rows that does nothing for a row whose primary key exists. `values` is a
    /// `VALUES (...)` list or a `SELECT`.
    fn insert_ignore(&self, table: &str, cols: &str, values: &str) -> String;

    /// `INSERT` of rows that does nothing for a row whose `key` (the primary key) exists,
    /// naming the key where the backend can.
    fn insert_unless_key(&self, table: &str, cols: &str, values: &str, key: &str) -> String;

    /// Where the sequencer reads rows of `incoming` before it locks their partitions, and a
    /// concurrent sequencer may have moved some of them in between (a backend with row
    /// locks): the rows of `incoming` whose ids are in a JSON array of integers bound as the
    /// one parameter, as a `FROM` source with `incoming` aliased `i` (read by primary key).
    /// `None` where no other sequencer can run between the read and the locks.
    fn reread_after_lock(&self, incoming: &str) -> Option<String>;

    /// `(id, seq)` pairs from a JSON array of two-integer arrays bound as the one parameter,
    /// aliased `x`, joined to the rows of `table` (aliased `i`) by id, as a `FROM` source.
    fn json_pairs_join(&self, table: &str) -> String;

    // ------------------------------------------------------------ whole statements

    /// The sequencer's whole pass as one statement, where the backend can delete, insert,
    /// update and notify in one (data-modifying common table expressions). Parameters:
    /// `$1` limit, `$2` channel, `$3` floor, `$4` detail. `None`: the pass runs as several
    /// statements in a write transaction.
    fn sequence_pass(&self, t: &Tables) -> Option<String>;

    /// The scheduler's release of due messages as one statement (parameter: the limit), or
    /// `None` (several statements in a write transaction).
    fn release_due(&self, t: &Tables) -> Option<String>;

    /// `insert` (an `INSERT … VALUES`) made to also send one notification with two more
    /// parameters, channel and text, delivered only if the transaction commits; `None`
    /// without LISTEN/NOTIFY.
    fn notifying_insert(&self, insert: &str) -> Option<String>;

    /// Settings of the database file applied before a migration, or `None`.
    fn file_settings(&self) -> Option<&'static str>;

    /// How concurrent migrations are kept apart.
    fn migration_lock(&self) -> MigrationLock;

    // ------------------------------------------------------------ schema

    /// The statements that create every table and index of schema version 1.
    fn schema_v1(&self, t: &Tables) -> Vec<String>;

    /// The statements that make names of schema version 1 compare byte for byte and let
    /// error texts hold any character (empty where they already do).
    fn exact_names_v2(&self, t: &Tables) -> Vec<String>;

    /// Column types and the table suffix of the tables created after version 1.
    fn types(&self) -> &'static Types;

    /// Counts the tables named by the one parameter in the current schema.
    fn table_count(&self) -> &'static str;

    /// Counts the columns of table `?` named `?`.
    fn column_count(&self) -> &'static str;

    /// Where the backend has no `CREATE INDEX IF NOT EXISTS` nor `DROP INDEX IF EXISTS`: a
    /// query that counts the indexes of table `?` named `?`, which the migration reads first.
    /// `None` where the backend has both.
    fn index_count(&self) -> Option<&'static str>;

    /// The statements that create an [`Inbox`](crate::inbox::Inbox) table `table` and its
    /// index, ids of up to `max_id` ASCII bytes compared byte for byte.
    fn inbox_table(&self, table: &str, max_id: usize) -> Vec<String>;

    /// Drops index `name` of `table`: `IF EXISTS` where the backend has it (otherwise the
    /// caller reads [`index_count`](Dialect::index_count) first, or the index must exist).
    fn drop_index(&self, name: &str, table: &str) -> String;
}

/// Column types and the table suffix of the DDL after version 1.
#[derive(Debug)]
pub(crate) struct Types {
    /// A queue or handler name: up to 64 ASCII characters, compared byte for byte.
    pub(crate) name: &'static str,
    /// A deduplication key: up to 255 characters, compared exactly.
    pub(crate) key: &'static str,
    /// Stored headers: JSON text, bounded by the limits of [`Headers`](crate::Headers).
    pub(crate) headers: &'static str,
    /// A 64-bit integer.
    pub(crate) big: &'static str,
    /// A message body.
    pub(crate) blob: &'static str,
    /// Short text (a fact of the `meta` table).
    pub(crate) text: &'static str,
    /// The `id` column: an integer primary key the database assigns.
    pub(crate) id: &'static str,
    /// Appended to every `CREATE TABLE`.
    pub(crate) table_suffix: &'static str,
}

/// A cap on the size of one statement (see [`Dialect::statement_cap`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StatementCap {
    /// The server setting, as named in errors.
    pub(crate) setting: &'static str,
    /// Reads the setting, in bytes.
    pub(crate) query: &'static str,
}

/// The files a commit writes (see [`Dialect::commit_files`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CommitFiles {
    /// Lists the attached databases: the row whose second column is `main` has the path of the
    /// database file in its third column (empty for a database in memory).
    pub(crate) list: &'static str,
    /// Appended to the database file's path: the files a commit writes.
    pub(crate) suffixes: &'static [&'static str],
}

/// How concurrent migrations are kept apart (see [`Dialect::migration_lock`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum MigrationLock {
    /// The write transaction itself excludes every other migration.
    WriteTransaction,
    /// A lock taken in the transaction by this statement (one parameter, the lock name) and
    /// held until it ends.
    Transaction(&'static str),
    /// A named lock: `take` (parameter: the name) returns 1 once it is held, `release` gives
    /// it back.
    Named {
        take: &'static str,
        release: &'static str,
    },
}

/// The dialect of `backend`.
pub(crate) fn of(backend: DbBackend) -> &'static dyn Dialect {
    match backend {
        DbBackend::Postgres => &postgres::Postgres,
        DbBackend::MySql => &mysql::MySql,
        // SQLite, and any backend sea-orm adds later (refused at start; see
        // `runtime::enabled_backend`).
        _ => &sqlite::Sqlite,
    }
}

/// Begins a write transaction the way the engine needs it on each backend: `BEGIN IMMEDIATE`
/// on SQLite, READ COMMITTED on MySQL/MariaDB (no gap locks, fresh snapshot per statement),
/// the default READ COMMITTED on PostgreSQL.
pub async fn begin_on(db: &DatabaseConnection) -> Result<DatabaseTransaction, DbErr> {
    db.begin_with_options(of(db.get_database_backend()).write_transaction())
        .await
}

/// A statement from SQL written with `?` placeholders, rewritten to `$n` on PostgreSQL. Every
/// value is bound, never spliced.
pub fn statement(backend: DbBackend, sql: &str, values: Vec<Value>) -> Statement {
    if !of(backend).numbered_placeholders() {
        return Statement::from_sql_and_values(backend, sql, values);
    }
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    Statement::from_sql_and_values(backend, out, values)
}
