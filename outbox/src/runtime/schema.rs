//! The schema as an outbox handle sees it: creating it, and the identity it was created with.
//! The DDL itself lives in `storage/schema.rs`; applications with their own migrator use
//! `outbox::migration` (feature `migration`) instead.

use super::Outbox;
use crate::error::Error;
use crate::storage::schema::{SCHEMA_VERSION, migration_name};

impl Outbox {
    /// Creates the outbox tables if they do not exist (idempotent, safe from several processes
    /// at once). [`Builder::connect`](crate::Builder::connect) and `start` do it too.
    pub async fn migrate(&self) -> Result<(), Error> {
        self.store().migrate().await?;
        Ok(())
    }

    /// The id of this outbox: random, created once with the schema, the same for every process
    /// on this database and table prefix. Relays use it to build message ids that stay unique
    /// if the outbox tables are ever created anew.
    pub async fn instance_id(&self) -> Result<String, Error> {
        let store = &self.shared.store;
        match store.instance_id().await {
            Ok(Some(id)) => Ok(id),
            Ok(None) | Err(_) => {
                let found = store.schema_version().await?;
                Err(Error::SchemaOutdated {
                    found,
                    expected: SCHEMA_VERSION,
                    migration: migration_name(found.unwrap_or(0) + 1),
                })
            }
        }
    }
}
