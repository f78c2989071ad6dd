//! The outbox schema as sea-orm-migration migrations, for applications that run their own
//! `Migrator`: one migration per schema version, in order. The runtime's own start-up
//! migration skips a current schema, so both may be used; with
//! [`Builder::migrate_on_start(false)`](crate::Builder::migrate_on_start) the application's
//! migrator is the only one that changes the schema.
//!
//! ```no_run
//! use sea_orm_migration::{MigrationTrait, MigratorTrait};
//!
//! struct Migrator;
//!
//! impl MigratorTrait for Migrator {
//!     fn migrations() -> Vec<Box<dyn MigrationTrait>> {
//!         let mut all: Vec<Box<dyn MigrationTrait>> = Vec::new();
//!         // ... the application's own migrations ...
//!         all.extend(outbox::migration::migrations());
//!         all
//!     }
//! }
//! ```

use sea_orm::{ConnectionTrait, DbErr};
use sea_orm_migration::{MigrationName, MigrationTrait, SchemaManager, async_trait};

use crate::error::InvalidName;
use crate::queue::validate_prefix;
use crate::runtime::DEFAULT_TABLE_PREFIX;
use crate::storage::{Tables, schema};

/// The migrations of every schema version, in order, for the default table prefix `outbox_`.
pub fn migrations() -> Vec<Box<dyn MigrationTrait>> {
    for_prefix(DEFAULT_TABLE_PREFIX)
}

/// The migrations of every schema version, in order, for another table prefix (the one given
/// to [`Builder::table_prefix`](crate::Builder::table_prefix)).
pub fn migrations_with_table_prefix(
    prefix: impl Into<String>,
) -> Result<Vec<Box<dyn MigrationTrait>>, InvalidName> {
    let prefix = prefix.into();
    validate_prefix(&prefix)?;
    Ok(for_prefix(&prefix))
}

fn for_prefix(prefix: &str) -> Vec<Box<dyn MigrationTrait>> {
    schema::MIGRATIONS
        .iter()
        .map(|&(version, name)| {
            Box::new(Migration {
                prefix: prefix.to_owned(),
                version,
                name,
            }) as Box<dyn MigrationTrait>
        })
        .collect()
}

/// The migration to one schema version (see [`migrations`]). Its `up` brings the outbox
/// tables to that version; its `down` undoes it (the first one drops the tables).
#[derive(Debug, Clone)]
pub struct Migration {
    prefix: String,
    version: i64,
    name: &'static str,
}

impl Migration {
    /// The schema version this migration brings the tables to.
    pub fn version(&self) -> i64 {
        self.version
    }
}

impl MigrationName for Migration {
    fn name(&self) -> &str {
        self.name
    }
}

// The trait's signatures come from `async_trait`, which needs the elided lifetime.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let c = manager.get_connection();
        schema::apply(
            c,
            crate::storage::dialect::of(c.get_database_backend()),
            &Tables::new(&self.prefix),
            self.version,
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let c = manager.get_connection();
        schema::revert(c, &Tables::new(&self.prefix), self.version).await
    }
}
