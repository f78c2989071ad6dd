#![doc = include_str!("docs/crate.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
mod handler;
#[cfg(feature = "migration")]
#[cfg_attr(docsrs, doc(cfg(feature = "migration")))]
pub mod migration;
mod profile;
mod queue;
mod runtime;
pub(crate) mod storage;

pub use error::{
    BoxDynError, EnqueueError, Error, HandlerError, InvalidName, RegistryProblem, Result,
    StartError,
};
pub use handler::{HandlerFuture, HandlerSpec, LeaseContext};
pub use profile::{Overrides, Profile, RuntimeTuning, Tuning};
pub use queue::{
    DEFAULT_MAX_PAYLOAD, MAX_PARTITIONS, Message, NewMessage, PoisonPolicy, QueueSpec,
    validate_name,
};
pub use runtime::{Builder, DEFAULT_TABLE_PREFIX, Outbox, Running};
pub use storage::{DeadLetter, DeadLetterFilter, HandlerDepth, QueueDepth};

/// Re-exported so users and generated code name one sea-orm.
pub use sea_orm;

// ---- typed layer (macros, discovery, one-call start): owned by `typed.rs` and `__private` ----
// mod typed;
// pub use typed::*;
