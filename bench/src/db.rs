//! Fresh databases per cell, pools, raw statements and server-side counters.

use std::fmt;
use std::time::Duration;

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    Statement, Value,
};

use crate::Res;

/// The database servers (or file) a cell runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub(crate) enum Backend {
    /// SQLite file in WAL mode.
    Sqlite,
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    Mysql,
}

impl Backend {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
            Backend::Mysql => "mysql",
        }
    }

    /// Command names of the server's processes, for [`crate::sys::server_cpu_seconds`]
    /// (none for SQLite: it runs inside the process).
    pub(crate) fn server_processes(self) -> &'static [&'static str] {
        match self {
            Backend::Sqlite => &[],
            Backend::Postgres => &["postgres"],
            Backend::Mysql => &["mariadbd", "mysqld"],
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Server URLs (admin connections; each cell creates its own database there).
#[derive(Debug, Clone)]
pub(crate) struct Servers {
    pub(crate) postgres: String,
    pub(crate) mysql: String,
}

/// A throwaway database: `outbox_b_<random>` on a server, or a SQLite file in a temp dir.
#[derive(Debug)]
pub(crate) struct FreshDb {
    pub(crate) backend: Backend,
    pub(crate) url: String,
    pub(crate) name: String,
    admin: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl FreshDb {
    pub(crate) async fn create(backend: Backend, servers: &Servers) -> Res<FreshDb> {
        let name = format!("outbox_b_{:012x}", rand::random::<u64>() >> 16);
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir()?;
                let path = dir.path().join("bench.db");
                let url = format!("sqlite://{}?mode=rwc", path.display());
                let db = FreshDb {
                    backend,
                    url,
                    name,
                    admin: None,
                    _dir: Some(dir),
                };
                // WAL is a property of the file: set it once, before anyone uses it.
                let c = db.pool(1, false).await?;
                c.execute_unprepared("PRAGMA journal_mode=WAL").await?;
                c.close().await?;
                Ok(db)
            }
            Backend::Postgres | Backend::Mysql => {
                let base = if backend == Backend::Postgres {
                    &servers.postgres
                } else {
                    &servers.mysql
                };
                let admin = Database::connect(base.as_str()).await?;
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await?;
                admin.close().await?;
                let (head, _) = base
                    .rsplit_once('/')
                    .ok_or("server URL needs a database path")?;
                Ok(FreshDb {
                    backend,
                    url: format!("{head}/{name}"),
                    name,
                    admin: Some(base.clone()),
                    _dir: None,
                })
            }
        }
    }

    /// A pool on this database. `log_statements` makes sqlx emit one `sqlx::query` event per
    /// statement (counted by [`crate::sys::statements`]).
    pub(crate) async fn pool(&self, max: u32, log_statements: bool) -> Res<DatabaseConnection> {
        let mut o = ConnectOptions::new(self.url.clone());
        o.max_connections(max)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(60))
            .sqlx_logging(log_statements);
        Ok(Database::connect(o).await?)
    }

    pub(crate) async fn drop_db(self) {
        if let Some(base) = &self.admin
            && let Ok(admin) = Database::connect(base.as_str()).await
        {
            let sql = if self.backend == Backend::Postgres {
                format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)
            } else {
                format!("DROP DATABASE IF EXISTS {}", self.name)
            };
            admin.execute_unprepared(&sql).await.ok();
            admin.close().await.ok();
        }
    }

    /// A server-side counter of work sent to this database, if the backend has one:
    /// PostgreSQL `xact_commit + xact_rollback` of this database (transactions), MariaDB
    /// global `Questions` (statements of every client of the server, so other users add noise).
    pub(crate) async fn server_counter(&self, admin: &DatabaseConnection) -> Option<i64> {
        match self.backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                admin
                    .execute_unprepared("SELECT pg_stat_clear_snapshot()")
                    .await
                    .ok()?;
                let row = admin
                    .query_one_raw(Statement::from_sql_and_values(
                        DbBackend::Postgres,
                        "SELECT (xact_commit + xact_rollback)::BIGINT FROM pg_stat_database WHERE datname = $1",
                        [Value::from(self.name.clone())],
                    ))
                    .await
                    .ok()??;
                row.try_get_by_index::<i64>(0).ok()
            }
            Backend::Mysql => {
                let row = admin
                    .query_one_raw(Statement::from_string(
                        DbBackend::MySql,
                        "SHOW GLOBAL STATUS LIKE 'Questions'",
                    ))
                    .await
                    .ok()??;
                let v: String = row.try_get_by_index(1).ok()?;
                v.parse().ok()
            }
        }
    }

    /// The durability settings in force, as text for the report.
    pub(crate) async fn durability(&self) -> String {
        let Ok(c) = self.pool(1, false).await else {
            return "unknown".into();
        };
        let q = |sql: &'static str| {
            let c = c.clone();
            async move {
                match c
                    .query_one_raw(Statement::from_string(c.get_database_backend(), sql))
                    .await
                {
                    Ok(Some(r)) => r
                        .try_get_by_index::<String>(0)
                        .or_else(|_| r.try_get_by_index::<i64>(0).map(|v| v.to_string()))
                        .unwrap_or_else(|_| "?".into()),
                    _ => "?".into(),
                }
            }
        };
        let s = match self.backend {
            Backend::Sqlite => format!(
                "journal_mode={} synchronous={} (0=OFF 1=NORMAL 2=FULL 3=EXTRA) busy_timeout={}ms",
                q("PRAGMA journal_mode").await,
                q("PRAGMA synchronous").await,
                q("PRAGMA busy_timeout").await
            ),
            Backend::Postgres => format!(
                "synchronous_commit={} fsync={} wal_level={} shared_buffers={} server_version={}",
                q("SHOW synchronous_commit").await,
                q("SHOW fsync").await,
                q("SHOW wal_level").await,
                q("SHOW shared_buffers").await,
                q("SHOW server_version").await
            ),
            Backend::Mysql => format!(
                "innodb_flush_log_at_trx_commit={} sync_binlog={} log_bin={} innodb_buffer_pool_size={} version={}",
                q("SELECT CAST(@@innodb_flush_log_at_trx_commit AS CHAR)").await,
                q("SELECT CAST(@@sync_binlog AS CHAR)").await,
                q("SELECT CAST(@@log_bin AS CHAR)").await,
                q("SELECT CAST(@@innodb_buffer_pool_size AS CHAR)").await,
                q("SELECT VERSION()").await
            ),
        };
        c.close().await.ok();
        s
    }
}

/// Raw SQL with `?` placeholders (rewritten to `$n` for PostgreSQL), as the engine writes its
/// own.
pub(crate) use outbox::__workspace::statement as stmt;

/// A write transaction as the raw ceilings take it: the engine's own
/// ([`begin_on`](outbox::__workspace::begin_on): `BEGIN IMMEDIATE` on SQLite, READ COMMITTED
/// on MySQL/MariaDB, the default on PostgreSQL).
pub(crate) async fn begin_write(db: &DatabaseConnection) -> Res<DatabaseTransaction> {
    Ok(outbox::__workspace::begin_on(db).await?)
}

/// One `i64` from a single-row query.
pub(crate) async fn scalar<C: ConnectionTrait>(c: &C, s: Statement) -> Res<i64> {
    let row = c.query_one_raw(s).await?.ok_or("no row")?;
    Ok(row.try_get_by_index::<i64>(0)?)
}
