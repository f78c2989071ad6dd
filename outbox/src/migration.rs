//! The outbox schema as a sea-orm-migration migration, for applications that run their own
//! `Migrator`. The runtime's own start-up migration is idempotent, so both may be used.
//!
//! ```no_run
//! use sea_orm_migration::{MigrationTrait, MigratorTrait};
//!
//! struct Migrator;
//!
//! impl MigratorTrait for Migrator {
//!     fn migrations() -> Vec<Box<dyn MigrationTrait>> {
//!         vec![Box::new(outbox::migration::Migration::new())]
//!     }
//! }
//! ```

use sea_orm::{ConnectionTrait, DbErr};
use sea_orm_migration::{MigrationName, MigrationTrait, SchemaManager, async_trait};

use crate::error::InvalidName;
use crate::queue::validate_prefix;
use crate::runtime::DEFAULT_TABLE_PREFIX;
use crate::storage::{Tables, schema};

/// Creates (and on `down`, drops) the outbox tables.
#[derive(Debug, Clone)]
pub struct Migration {
    prefix: String,
}

impl Migration {
    /// The migration for the default table prefix `outbox_`.
    pub fn new() -> Self {
        Self {
            prefix: DEFAULT_TABLE_PREFIX.to_owned(),
        }
    }

    /// The migration for another table prefix (the one given to
    /// [`Builder::table_prefix`](crate::Builder::table_prefix)).
    pub fn with_table_prefix(prefix: impl Into<String>) -> Result<Self, InvalidName> {
        let prefix = prefix.into();
        validate_prefix(&prefix)?;
        Ok(Self { prefix })
    }
}

impl Default for Migration {
    fn default() -> Self {
        Self::new()
    }
}

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261124_000001_outbox_schema_v1"
    }
}

// The trait's signatures come from `async_trait`, which needs the elided lifetime.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let c = manager.get_connection();
        schema::apply(c, c.get_database_backend(), &Tables::new(&self.prefix)).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        schema::drop_all(manager.get_connection(), &Tables::new(&self.prefix)).await
    }
}
