//! PostgreSQL: its SQL fragments, the statements only it can run, and its DDL.

use sea_orm::{DbBackend, TransactionOptions};

use super::{CommitFiles, Dialect, MigrationLock, StatementCap, Types};
use crate::storage::Tables;

/// The PostgreSQL dialect.
#[derive(Debug)]
pub(crate) struct Postgres;

static TYPES: Types = Types {
    name: "VARCHAR(64)",
    key: "VARCHAR(255)",
    headers: "TEXT",
    big: "BIGINT",
    blob: "BYTEA",
    text: "VARCHAR(255)",
    id: "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    table_suffix: "",
};

impl Dialect for Postgres {
    fn backend(&self) -> DbBackend {
        DbBackend::Postgres
    }

    fn numbered_placeholders(&self) -> bool {
        true
    }

    fn single_writer(&self) -> bool {
        false
    }

    /// The default, READ COMMITTED.
    fn write_transaction(&self) -> TransactionOptions {
        TransactionOptions::default()
    }

    fn listen_notify(&self) -> bool {
        true
    }

    fn plans_key_lists_by_statistics(&self) -> bool {
        true
    }

    fn insert_returning(&self) -> bool {
        true
    }

    fn deletes_wait_on_producers(&self) -> bool {
        false
    }

    fn low_water_mark(&self) -> bool {
        true
    }

    fn commit_files(&self) -> Option<CommitFiles> {
        None
    }

    fn statement_cap(&self) -> Option<StatementCap> {
        None
    }

    fn now_ms(&self) -> &'static str {
        "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT"
    }

    fn greatest_fn(&self) -> &'static str {
        "GREATEST"
    }

    fn integer_cast_type(&self) -> &'static str {
        "BIGINT"
    }

    fn optimization_fence(&self) -> &'static str {
        " OFFSET 0"
    }

    fn insert_ignore(&self, table: &str, cols: &str, values: &str) -> String {
        format!("INSERT INTO {table} ({cols}) {values} ON CONFLICT DO NOTHING")
    }

    fn insert_unless_key(&self, table: &str, cols: &str, values: &str, key: &str) -> String {
        format!("INSERT INTO {table} ({cols}) {values} ON CONFLICT ({key}) DO NOTHING")
    }

    /// The sequencer's pass is one statement here.
    fn reread_after_lock(&self, _incoming: &str) -> Option<String> {
        None
    }

    /// Not used by the engine (the sequencer's pass is one statement here); kept correct so
    /// that this dialect answers every question.
    fn json_pairs_join(&self, table: &str) -> String {
        format!(
            "(SELECT (e->>0)::BIGINT AS id, (e->>1)::BIGINT AS seq FROM jsonb_array_elements(?::jsonb) AS e) AS x \
             JOIN {table} AS i ON i.id = x.id"
        )
    }

    /// Read the oldest rows, lock their partitions, delete the rows of the locked ones,
    /// insert them numbered per partition in id order, advance `last_seq`, notify the queues'
    /// handlers. Rows another sequencer moved after this statement's snapshot are not deleted
    /// again (the DELETE re-checks them), so they are not numbered twice; the locked partition
    /// row is read at its latest version.
    fn sequence_pass(&self, t: &Tables) -> Option<String> {
        Some(format!(
            "WITH scan AS (SELECT id, queue, partition_no FROM {inc} WHERE id > $3 ORDER BY id LIMIT $1), \
             locked AS (SELECT p.queue, p.partition_no, p.last_seq FROM {parts} p \
                        WHERE (p.queue, p.partition_no) IN (SELECT DISTINCT queue, partition_no FROM scan) \
                        FOR UPDATE SKIP LOCKED), \
             mine AS MATERIALIZED (SELECT s.id, l.last_seq FROM scan s \
                       JOIN locked l ON l.queue = s.queue AND l.partition_no = s.partition_no), \
             moved AS (DELETE FROM {inc} i USING mine WHERE i.id = mine.id \
                       RETURNING i.id, i.queue, i.partition_no, i.payload, i.target_handler, i.dedup_key, i.headers, i.created_at, mine.last_seq), \
             ins AS (INSERT INTO {out} (queue, partition_no, seq, payload, target_handler, dedup_key, headers, created_at) \
                     SELECT m.queue, m.partition_no, \
                            m.last_seq + ROW_NUMBER() OVER (PARTITION BY m.queue, m.partition_no ORDER BY m.id), \
                            m.payload, m.target_handler, m.dedup_key, m.headers, m.created_at \
                     FROM moved m \
                     RETURNING queue, partition_no, seq), \
             upd AS (UPDATE {parts} p SET last_seq = x.last \
                     FROM (SELECT queue, partition_no, MIN(seq) AS lo, MAX(seq) AS last FROM ins GROUP BY queue, partition_no) x \
                     WHERE p.queue = x.queue AND p.partition_no = x.partition_no \
                     RETURNING p.queue, p.partition_no, x.lo, x.last), \
             per_queue AS (SELECT queue, COUNT(*) AS n FROM ins GROUP BY queue), \
             woke AS (SELECT pg_notify($2, 's:' || queue) FROM per_queue) \
             SELECT (SELECT COUNT(*) FROM scan), q.queue, q.n, (SELECT COUNT(*) FROM woke), (SELECT COUNT(*) FROM upd), \
                    (SELECT MAX(id) FROM scan), \
                    CASE WHEN $4 THEN (SELECT string_agg(queue || '/' || partition_no || ':' || lo || '-' || last, ',' \
                                                         ORDER BY queue, partition_no) FROM upd) END \
             FROM (SELECT 1) one LEFT JOIN per_queue q ON true",
            parts = t.partitions,
            inc = t.incoming,
            out = t.outgoing,
        ))
    }

    fn release_due(&self, t: &Tables) -> Option<String> {
        let (s, inc, now) = (&t.scheduled, &t.incoming, self.now_ms());
        Some(format!(
            "WITH due AS (SELECT id FROM {s} WHERE due_at <= {now} ORDER BY due_at, id LIMIT ? \
                          FOR UPDATE SKIP LOCKED), \
             moved AS (DELETE FROM {s} x USING due WHERE x.id = due.id \
                       RETURNING x.id, x.queue, x.partition_no, x.payload, x.dedup_key, x.headers, x.due_at) \
             INSERT INTO {inc} (queue, partition_no, payload, target_handler, dedup_key, headers, created_at) \
             SELECT queue, partition_no, payload, NULL, dedup_key, headers, due_at FROM moved ORDER BY due_at, id"
        ))
    }

    fn notifying_insert(&self, insert: &str) -> Option<String> {
        Some(format!(
            "WITH ins AS ({insert} RETURNING 1) SELECT pg_notify(?, ?) FROM ins LIMIT 1"
        ))
    }

    fn file_settings(&self) -> Option<&'static str> {
        None
    }

    fn migration_lock(&self) -> MigrationLock {
        MigrationLock::Transaction("SELECT pg_advisory_xact_lock(hashtext(?))")
    }

    fn schema_v1(&self, t: &Tables) -> Vec<String> {
        let p = &t.prefix;
        vec![
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
        "SELECT COUNT(*) FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_name = ?"
    }

    fn column_count(&self) -> &'static str {
        "SELECT COUNT(*) FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = ? AND column_name = ?"
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

/// The transactions that hold a write lock on `incoming` now (every producer takes it
/// before its insert draws an id, and keeps it until it ends), as one comma-separated list of
/// virtual transaction ids (see [`Dialect::low_water_mark`]).
pub(crate) fn incoming_writers(t: &Tables) -> String {
    format!(
        "SELECT string_agg(virtualtransaction, ',') FROM pg_locks \
         WHERE locktype = 'relation' AND relation = '{}'::regclass \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND mode = 'RowExclusiveLock' AND pid IS DISTINCT FROM pg_backend_pid()",
        t.incoming
    )
}

/// Whether any of the virtual transactions listed in `$1` (from [`incoming_writers`]) still
/// holds its write lock on `incoming`.
pub(crate) fn writers_remain(t: &Tables) -> String {
    format!(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'relation' \
         AND relation = '{}'::regclass AND mode = 'RowExclusiveLock' \
         AND virtualtransaction = ANY (string_to_array($1, ',')))",
        t.incoming
    )
}

/// Sends notification `$2` on channel `$1`.
pub(crate) const NOTIFY: &str = "SELECT pg_notify($1, $2)";
