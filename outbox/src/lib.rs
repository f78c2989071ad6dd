#![doc = include_str!("docs/crate.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
// A library reports through `tracing` and its errors, never by printing.
#![deny(clippy::print_stdout, clippy::print_stderr, clippy::dbg_macro)]

mod error;
mod handler;
mod headers;
pub mod inbox;
pub mod metrics;
#[cfg(feature = "migration")]
#[cfg_attr(docsrs, doc(cfg(feature = "migration")))]
pub mod migration;
mod names;
mod profile;
mod queue;
pub mod relay;
mod runtime;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub mod sqlite;
mod state;
pub mod status;
pub(crate) mod storage;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
mod trace;

pub use error::{
    BoxDynError, EnqueueError, Error, HandlerError, IntoHandlerResult, InvalidName,
    RegistryProblem, Result, StartError,
};
pub use handler::{HandlerFuture, HandlerSpec, LeaseContext};
pub use headers::{
    HeaderError, Headers, MAX_HEADER_NAME_BYTES, MAX_HEADER_VALUE_BYTES, MAX_HEADERS,
};
pub use profile::{Overrides, Profile, RuntimeTuning, Tuning};
pub use queue::{
    DEFAULT_DEDUP_RETENTION, DEFAULT_MAX_PAYLOAD, Enqueued, MAX_DEDUP_KEY_BYTES, MAX_PARTITIONS,
    Message, NewMessage, PoisonPolicy, QueueSpec, validate_name,
};
pub use runtime::failure::MAX_ERROR_BYTES;
pub use runtime::{Builder, DEFAULT_TABLE_PREFIX, Outbox, Running, SHUTDOWN_RELEASE_WINDOW};
pub use state::{MissingState, State};
pub use status::{
    HandlerDepth, HandlerStatus, Lease, PartitionStatus, QueueDepth, QueueStatus,
    SCHEDULED_COUNT_CAP, Status,
};
pub use storage::{DeadLetter, DeadLetterFilter};

/// Re-exported so users and generated code name one sea-orm.
pub use sea_orm;

// ---- typed layer (macros, discovery, one-call start): owned by `typed.rs` and `__private` ----
mod typed;
pub use typed::{
    DecodeError, HandlerDecl, HandlerMode, Payload, Queue, QueueDecl, Start, connect, decode,
    discover, global, handlers, leased, leased_batch, partition_for_key, queues, set_global, start,
    transactional, transactional_batch,
};

#[cfg(feature = "macros")]
#[cfg_attr(docsrs, doc(cfg(feature = "macros")))]
#[doc(inline)]
pub use outbox_macros::{handler, queue};

/// Helpers for this workspace's own tools (`outbox-bench`), so they do not copy the engine.
///
/// **Not public API**: no semver promise; may change or go in any release.
#[doc(hidden)]
pub mod __workspace {
    pub use crate::storage::{begin_on, statement};
}

/// Support for the code that `#[outbox::queue]` and `#[outbox::handler]` generate.
///
/// **Not public API.** Nothing here is covered by semver: it may change in any release, in step
/// with `outbox-macros` (which `outbox` pins exactly).
#[doc(hidden)]
pub mod __private {
    pub use ::core::future::Future;
    pub use ::core::marker::Send;
    pub use ::core::option::Option;
    pub use ::core::pin::Pin;
    pub use ::core::result::Result;
    pub use ::inventory;
    pub use ::sea_orm::DatabaseTransaction;
    pub use ::std::boxed::Box;
    pub use ::std::vec::Vec;

    pub use crate::error::{HandlerError, IntoHandlerResult};
    pub use crate::handler::{Context, HandlerFuture, HandlerSpec, LeaseContext};
    pub use crate::headers::Headers;
    pub use crate::profile::Overrides;
    pub use crate::queue::PoisonPolicy;
    pub use crate::state::{FromStates, StateKey, States, missing, with_state};
    pub use crate::typed::{
        DedupKey, HandlerDecl, HandlerMode, HeaderValue, Queue, QueueDecl, partition_for_key,
        spread, typed_many, typed_one,
    };
    pub use ::std::sync::Arc;
}
