//! SQLite: its SQL fragments and its DDL.

use sea_orm::{DbBackend, SqliteTransactionMode, TransactionOptions};

use super::{CommitFiles, Dialect, MigrationLock, StatementCap, Types};
use crate::storage::Tables;

/// The SQLite dialect.
#[derive(Debug)]
pub(crate) struct Sqlite;

static TYPES: Types = Types {
    name: "TEXT",
    key: "TEXT",
    headers: "TEXT",
    big: "INTEGER",
    blob: "BLOB",
    text: "TEXT",
    id: "id INTEGER PRIMARY KEY",
    table_suffix: "",
};

impl Dialect for Sqlite {
    fn backend(&self) -> DbBackend {
        DbBackend::Sqlite
    }

    fn numbered_placeholders(&self) -> bool {
        false
    }

    fn single_writer(&self) -> bool {
        true
    }

    /// `BEGIN IMMEDIATE`: the write lock up front, so a transaction never has to upgrade a
    /// read lock (no `SQLITE_BUSY_SNAPSHOT`).
    fn write_transaction(&self) -> TransactionOptions {
        TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..Default::default()
        }
    }

    fn listen_notify(&self) -> bool {
        false
    }

    fn insert_returning(&self) -> bool {
        false
    }

    fn deletes_wait_on_producers(&self) -> bool {
        false
    }

    fn low_water_mark(&self) -> bool {
        false
    }

    fn commit_files(&self) -> Option<CommitFiles> {
        Some(CommitFiles {
            list: "PRAGMA database_list",
            // WAL (what the engine sets), and the file itself in the rollback-journal modes.
            suffixes: &["-wal", ""],
        })
    }

    fn statement_cap(&self) -> Option<StatementCap> {
        None
    }

    fn now_ms(&self) -> &'static str {
        "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
    }

    fn greatest_fn(&self) -> &'static str {
        "MAX"
    }

    fn integer_cast_type(&self) -> &'static str {
        "INTEGER"
    }

    fn optimization_fence(&self) -> &'static str {
        " LIMIT -1"
    }

    fn insert_ignore(&self, table: &str, cols: &str, values: &str) -> String {
        format!("INSERT OR IGNORE INTO {table} ({cols}) {values}")
    }

    fn insert_unless_key(&self, table: &str, cols: &str, values: &str, key: &str) -> String {
        format!("INSERT INTO {table} ({cols}) {values} ON CONFLICT ({key}) DO NOTHING")
    }

    /// One writer: no other sequencer runs between the read and the locks.
    fn reread_after_lock(&self, _incoming: &str) -> Option<String> {
        None
    }

    fn json_pairs_join(&self, table: &str) -> String {
        format!(
            "(SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS seq FROM json_each(?)) AS x \
             JOIN {table} AS i ON i.id = x.id"
        )
    }

    fn sequence_pass(&self, _t: &Tables) -> Option<String> {
        None
    }

    fn release_due(&self, _t: &Tables) -> Option<String> {
        None
    }

    fn notifying_insert(&self, _insert: &str) -> Option<String> {
        None
    }

    /// WAL is a property of the database file; it lets readers run beside the writer.
    fn file_settings(&self) -> Option<&'static str> {
        Some("PRAGMA journal_mode=WAL")
    }

    fn migration_lock(&self) -> MigrationLock {
        MigrationLock::WriteTransaction
    }

    fn schema_v1(&self, t: &Tables) -> Vec<String> {
        let p = &t.prefix;
        vec![
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
        ]
    }

    /// Text already compares byte for byte, and takes any character.
    fn exact_names_v2(&self, _t: &Tables) -> Vec<String> {
        Vec::new()
    }

    fn types(&self) -> &'static Types {
        &TYPES
    }

    fn table_count(&self) -> &'static str {
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?"
    }

    fn column_count(&self) -> &'static str {
        "SELECT COUNT(*) FROM pragma_table_info(?) WHERE name = ?"
    }

    fn index_count(&self) -> Option<&'static str> {
        None
    }

    fn inbox_table(&self, table: &str, max_id: usize) -> Vec<String> {
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {table} (message_id VARCHAR({max_id}) NOT NULL PRIMARY KEY, received_at_ms BIGINT NOT NULL)"
            ),
            format!("CREATE INDEX IF NOT EXISTS {table}_received ON {table} (received_at_ms)"),
        ]
    }

    fn drop_index(&self, name: &str, _table: &str) -> String {
        format!("DROP INDEX IF EXISTS {name}")
    }
}
