//! MySQL/MariaDB: its SQL fragments and its DDL.

use sea_orm::{DbBackend, IsolationLevel, TransactionOptions};

use super::{CommitFiles, Dialect, MigrationLock, StatementCap, Types};
use crate::storage::Tables;

/// The MySQL/MariaDB dialect.
#[derive(Debug)]
pub(crate) struct MySql;

/// Names compare byte for byte: `ascii_bin` (names are ASCII by validation), not the
/// default case-insensitive collation.
const NAME: &str = "VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin";

static TYPES: Types = Types {
    name: NAME,
    key: "VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
    // `TEXT` stops at 64 KiB.
    headers: "MEDIUMTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
    big: "BIGINT",
    blob: "LONGBLOB",
    text: "VARCHAR(255)",
    id: "id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY",
    table_suffix: " ENGINE=InnoDB",
};

impl Dialect for MySql {
    fn backend(&self) -> DbBackend {
        DbBackend::MySql
    }

    fn numbered_placeholders(&self) -> bool {
        false
    }

    fn single_writer(&self) -> bool {
        false
    }

    /// READ COMMITTED: no gap locks, a fresh snapshot per statement.
    fn write_transaction(&self) -> TransactionOptions {
        TransactionOptions {
            isolation_level: Some(IsolationLevel::ReadCommitted),
            ..Default::default()
        }
    }

    fn listen_notify(&self) -> bool {
        false
    }

    fn insert_returning(&self) -> bool {
        false
    }

    /// Seen on MariaDB 10.11: an `IN` list planned as a scan, and a range scan that reads one
    /// record past its end.
    fn deletes_wait_on_producers(&self) -> bool {
        true
    }

    fn low_water_mark(&self) -> bool {
        false
    }

    fn commit_files(&self) -> Option<CommitFiles> {
        None
    }

    fn statement_cap(&self) -> Option<StatementCap> {
        Some(StatementCap {
            setting: "max_allowed_packet",
            query: "SELECT @@max_allowed_packet",
        })
    }

    fn now_ms(&self) -> &'static str {
        "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000)"
    }

    fn greatest_fn(&self) -> &'static str {
        "GREATEST"
    }

    fn integer_cast_type(&self) -> &'static str {
        "SIGNED"
    }

    fn optimization_fence(&self) -> &'static str {
        " LIMIT 18446744073709551615"
    }

    fn insert_ignore(&self, table: &str, cols: &str, values: &str) -> String {
        format!("INSERT IGNORE INTO {table} ({cols}) {values}")
    }

    fn insert_unless_key(&self, table: &str, cols: &str, values: &str, _key: &str) -> String {
        format!("INSERT IGNORE INTO {table} ({cols}) {values}")
    }

    fn reread_after_lock(&self, incoming: &str) -> Option<String> {
        Some(format!(
            "JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$')) AS x \
             STRAIGHT_JOIN {incoming} AS i ON i.id = x.id"
        ))
    }

    fn json_pairs_join(&self, table: &str) -> String {
        format!(
            "JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$[0]', seq BIGINT PATH '$[1]')) AS x \
             STRAIGHT_JOIN {table} AS i ON i.id = x.id"
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

    fn file_settings(&self) -> Option<&'static str> {
        None
    }

    fn migration_lock(&self) -> MigrationLock {
        MigrationLock::Named {
            take: "SELECT GET_LOCK(?, 60)",
            release: "SELECT RELEASE_LOCK(?)",
        }
    }

    fn schema_v1(&self, t: &Tables) -> Vec<String> {
        let p = &t.prefix;
        vec![
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
        ]
    }

    /// Version 1 compared names with the column's collation, case-insensitively by default,
    /// so `orders` and `Orders` were one queue: every name column becomes `ascii_bin`. Error
    /// texts become `utf8mb4` so any text a handler returns can be stored.
    fn exact_names_v2(&self, t: &Tables) -> Vec<String> {
        let nn = format!("{NAME} NOT NULL");
        let null = format!("{NAME} NULL");
        vec![
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
        ]
    }

    fn types(&self) -> &'static Types {
        &TYPES
    }

    fn table_count(&self) -> &'static str {
        "SELECT COUNT(*) FROM information_schema.tables \
         WHERE table_schema = DATABASE() AND table_name = ?"
    }

    fn column_count(&self) -> &'static str {
        "SELECT COUNT(*) FROM information_schema.columns \
         WHERE table_schema = DATABASE() AND table_name = ? AND column_name = ?"
    }

    /// MySQL has no `CREATE INDEX IF NOT EXISTS`.
    fn index_count(&self) -> Option<&'static str> {
        Some(
            "SELECT COUNT(*) FROM information_schema.statistics \
             WHERE table_schema = DATABASE() AND table_name = ? AND index_name = ?",
        )
    }

    fn inbox_table(&self, table: &str, max_id: usize) -> Vec<String> {
        vec![format!(
            "CREATE TABLE IF NOT EXISTS {table} (message_id VARCHAR({max_id}) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY, received_at_ms BIGINT NOT NULL, INDEX {table}_received (received_at_ms)) ENGINE=InnoDB"
        )]
    }

    fn drop_index(&self, name: &str, table: &str) -> String {
        format!("DROP INDEX {name} ON {table}")
    }
}
