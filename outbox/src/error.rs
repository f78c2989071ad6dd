//! Error types, one enum per surface.

use std::fmt;

/// A boxed error that can cross threads: what handlers and stores report.
pub type BoxDynError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with the crate's general [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the administrative and runtime APIs (migrate, dead letters, status, shutdown).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database reported an error.
    #[error("database error")]
    Database(#[source] sea_orm::DbErr),
    /// A name (queue, handler or table prefix) is not valid.
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    /// The queue is not registered in the database.
    #[error("unknown queue `{0}`")]
    UnknownQueue(String),
    /// The dead letter does not exist (already replayed, discarded or purged).
    #[error("dead letter {0} not found")]
    DeadLetterNotFound(i64),
    /// The lease expired or was taken over before it could be renewed.
    #[error("the lease was lost (expired or taken over); stop non-idempotent work")]
    LeaseLost,
    /// The database is of a backend whose feature of `outbox` is off in this build.
    #[error(
        "the database is {backend:?} but outbox was built without its `{feature}` feature; enable it in Cargo.toml: `outbox = {{ version = \"…\", features = [\"{feature}\"] }}`"
    )]
    BackendNotEnabled {
        /// The backend of the connection.
        backend: sea_orm::DbBackend,
        /// The feature of `outbox` that supports it.
        feature: &'static str,
    },
    /// The runtime did not stop within the grace period; in-flight work was cancelled and its
    /// leases released (or, where a database call hung, left to expire).
    #[error("shutdown grace period of {0:?} elapsed; in-flight handlers were cancelled")]
    ShutdownTimedOut(std::time::Duration),
    /// [`Running::wait_idle`](crate::Running::wait_idle) gave up: what was committed when it
    /// was called is not all handled yet. `waiting` names each queue, handler and partition
    /// still behind (and whether it is blocked by a poisoned head).
    #[error("not idle after {waited:?}: {}", waiting.join(", "))]
    NotIdle {
        /// How long it waited.
        waited: std::time::Duration,
        /// What is still waiting, as `queue/handler/partition` (or `unsequenced messages`).
        waiting: Vec<String>,
    },
    /// An operator action named a head message that is no longer the head: it was handled,
    /// skipped or replayed meanwhile. Nothing was changed; read the status again.
    #[error(
        "the head of queue `{queue}` partition {partition} for handler `{handler}` is no longer seq {expected} ({}); nothing was changed",
        found.map_or_else(|| "nothing waits".to_owned(), |s| format!("it is now seq {s}"))
    )]
    HeadMoved {
        /// Queue name.
        queue: String,
        /// Handler name.
        handler: String,
        /// Partition.
        partition: u32,
        /// The sequence the operator saw.
        expected: i64,
        /// The head now, if a message waits.
        found: Option<i64>,
    },
    /// The head is held by a live lease: a worker is handling it right now.
    #[error(
        "the head of queue `{queue}` partition {partition} for handler `{handler}` is leased by a running worker; try again when the lease ends"
    )]
    HeadLeased {
        /// Queue name.
        queue: String,
        /// Handler name.
        handler: String,
        /// Partition.
        partition: u32,
    },
    /// `unblock` on a partition that is not blocked.
    #[error("queue `{queue}` partition {partition} is not blocked for handler `{handler}`")]
    NotBlocked {
        /// Queue name.
        queue: String,
        /// Handler name.
        handler: String,
        /// Partition.
        partition: u32,
    },
    /// No cursor for this queue, handler and partition.
    #[error("no handler `{handler}` on queue `{queue}` partition {partition}")]
    CursorNotFound {
        /// Queue name.
        queue: String,
        /// Handler name.
        handler: String,
        /// Partition.
        partition: u32,
    },
    /// The handler is not registered on the queue.
    #[error("no handler `{handler}` is registered on queue `{queue}`")]
    HandlerNotFound {
        /// Queue name.
        queue: String,
        /// Handler name.
        handler: String,
    },
    /// The handler cannot be retired: a running process served it recently.
    #[error(
        "handler `{handler}` of queue `{queue}` was served by a running process {seen_ms_ago} ms ago; stop the processes that run it first"
    )]
    HandlerInUse {
        /// Queue name.
        queue: String,
        /// Handler name.
        handler: String,
        /// How long ago a process last reported serving it.
        seen_ms_ago: i64,
    },
    /// The database's schema is older than this build needs (or absent).
    #[error(
        "the outbox schema is at version {} but this build needs version {expected}: run `outbox migrate`, `Outbox::migrate()` or the migrations of `outbox::migration` (migration `{migration}`) as a user allowed to change the schema",
        found.map_or_else(|| "none (no outbox tables)".to_owned(), |v| v.to_string())
    )]
    SchemaOutdated {
        /// The version found (`None`: no outbox tables).
        found: Option<i64>,
        /// The version this build needs.
        expected: i64,
        /// The name of the next migration to run.
        migration: &'static str,
    },
}

impl From<sea_orm::DbErr> for Error {
    fn from(e: sea_orm::DbErr) -> Self {
        Error::Database(e)
    }
}

/// A queue, handler or table-prefix name that cannot be used.
///
/// Names are 1 to 64 characters of ASCII letters, digits, `_`, `-` and `.`, starting with a
/// letter; a table prefix is at most 32 characters of lowercase letters, digits and `_`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} name `{name}`: {reason}")]
pub struct InvalidName {
    /// What was being named: `queue`, `handler` or `table prefix`.
    pub kind: &'static str,
    /// The rejected name.
    pub name: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

/// Errors of [`enqueue`](crate::Outbox::enqueue) and its typed and batch forms. On any of them
/// nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnqueueError {
    /// The queue name is not valid.
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    /// The queue is not registered in the database (run the runtime's migrate/registration
    /// first, or declare the queue on the builder).
    #[error("unknown queue `{0}`")]
    UnknownQueue(String),
    /// The partition index is not below the queue's partition count.
    #[error("partition {partition} out of range for queue `{queue}` with {partitions} partitions")]
    PartitionOutOfRange {
        /// Queue name.
        queue: String,
        /// Requested partition.
        partition: u32,
        /// Partition count of the queue.
        partitions: u32,
    },
    /// The payload is larger than the configured limit.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes for queue `{queue}`")]
    PayloadTooLarge {
        /// Queue name.
        queue: String,
        /// Payload size in bytes.
        size: usize,
        /// Configured limit in bytes.
        limit: usize,
    },
    /// The payload could not be serialized (typed enqueue).
    #[error("payload of queue `{queue}` could not be serialized")]
    Serialize {
        /// Queue name.
        queue: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// The connection or transaction belongs to another kind of database than the outbox.
    #[error("connection is {found:?} but the outbox runs on {expected:?}")]
    BackendMismatch {
        /// Backend of the outbox.
        expected: sea_orm::DbBackend,
        /// Backend of the connection passed in.
        found: sea_orm::DbBackend,
    },
    /// A typed enqueue found no outbox for this process: call `outbox::start` or
    /// `outbox::connect` first, or pass an [`Outbox`](crate::Outbox) explicitly.
    #[error(
        "no outbox is connected in this process; call `outbox::start` or `outbox::connect` first"
    )]
    NotConnected,
    /// The connection is not connected to any database (for example
    /// `DatabaseConnection::default()`).
    #[error(
        "the connection is disconnected; pass a connected `DatabaseConnection` or a transaction"
    )]
    Disconnected,
    /// The database server refuses statements this large (MySQL/MariaDB `max_allowed_packet`).
    /// Raise the server setting or lower the payload limit.
    #[error(
        "the server refused a payload of {size} bytes for queue `{queue}`: it exceeds the server's `{setting}`"
    )]
    PayloadTooLargeForServer {
        /// Queue name.
        queue: String,
        /// Payload size in bytes.
        size: usize,
        /// The server setting that limits it.
        setting: &'static str,
    },
    /// A deduplication key is empty, longer than
    /// [`MAX_DEDUP_KEY_BYTES`](crate::MAX_DEDUP_KEY_BYTES), or contains a NUL character.
    #[error("invalid deduplication key for queue `{queue}`: {reason}")]
    InvalidDedupKey {
        /// Queue name.
        queue: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The message's [headers](crate::Headers) break a limit; nothing was written.
    #[error("invalid headers for queue `{queue}`")]
    InvalidHeaders {
        /// Queue name.
        queue: String,
        /// Which limit, and where.
        #[source]
        source: crate::HeaderError,
    },
    /// A delivery time before 1970 or a delay beyond what the database can count (about 290
    /// million years in milliseconds).
    #[error("invalid delivery time for queue `{queue}`: {reason}")]
    InvalidDeliveryTime {
        /// Queue name.
        queue: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A delivery time or delay on a queue declared `#[outbox::queue(strict_order)]`, which
    /// delivers every message in commit order.
    #[error(
        "queue `{queue}` is strict-order: it delivers in commit order and refuses scheduled delivery"
    )]
    SchedulingForbidden {
        /// Queue name.
        queue: String,
    },
    /// The database reported an error; the caller's transaction should be rolled back.
    #[error("database error")]
    Database(#[source] sea_orm::DbErr),
}

impl From<sea_orm::DbErr> for EnqueueError {
    fn from(e: sea_orm::DbErr) -> Self {
        EnqueueError::Database(e)
    }
}

/// One problem found while building or starting the runtime. [`StartError::Registry`] carries
/// all of them at once.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryProblem {
    /// Two queue declarations use one name.
    DuplicateQueue(String),
    /// Two handlers of one queue use one name.
    DuplicateHandler {
        /// Queue name.
        queue: String,
        /// Handler name.
        handler: String,
    },
    /// A handler consumes a queue that is declared nowhere.
    HandlerWithoutQueue {
        /// Queue name.
        queue: String,
        /// Handler name.
        handler: String,
    },
    /// The queue exists in the database with another partition count.
    PartitionMismatch {
        /// Queue name.
        queue: String,
        /// Count in the declaration.
        declared: u32,
        /// Count in the database.
        stored: u32,
    },
    /// A name is not valid.
    InvalidName(InvalidName),
    /// A declared partition count is zero or above the maximum.
    InvalidPartitions {
        /// Queue name.
        queue: String,
        /// Declared count.
        partitions: u32,
    },
    /// A knob of a profile, queue or handler is out of range.
    InvalidTuning(String),
    /// A relay's destination template cannot be parsed.
    InvalidRelay {
        /// Queue name.
        queue: String,
        /// Relay name.
        relay: String,
        /// What is wrong.
        error: crate::relay::TemplateError,
    },
}

impl fmt::Display for RegistryProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DuplicateQueue(q) => write!(f, "queue `{q}` is declared more than once"),
            Self::DuplicateHandler { queue, handler } => {
                write!(
                    f,
                    "handler `{handler}` of queue `{queue}` is declared more than once"
                )
            }
            Self::HandlerWithoutQueue { queue, handler } => {
                write!(
                    f,
                    "handler `{handler}` consumes queue `{queue}`, which is not declared"
                )
            }
            Self::PartitionMismatch {
                queue,
                declared,
                stored,
            } => write!(
                f,
                "queue `{queue}` is declared with {declared} partitions but the database has {stored}"
            ),
            Self::InvalidName(e) => e.fmt(f),
            Self::InvalidPartitions { queue, partitions } => write!(
                f,
                "queue `{queue}` has {partitions} partitions; expected 1 to {}",
                crate::queue::MAX_PARTITIONS
            ),
            Self::InvalidTuning(why) => f.write_str(why),
            Self::InvalidRelay {
                queue,
                relay,
                error,
            } => write!(f, "relay `{relay}` of queue `{queue}`: {error}"),
        }
    }
}

/// Errors of building or starting the runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The declarations are inconsistent; every problem found is listed.
    #[error("{} registry problem(s): {}", .0.len(), join(.0))]
    Registry(Vec<RegistryProblem>),
    /// Handlers take application state (`State<T>`) that was not given with `.state(value)`;
    /// every missing one is listed. Nothing was started.
    #[error(
        "{} handler state(s) missing: {}; give each with `.state(value)` on `outbox::start`, `outbox::discover` or `Outbox::builder`",
        .0.len(),
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    MissingState(Vec<crate::state::MissingState>),
    /// The database is of a backend whose feature of `outbox` is off in this build: nothing
    /// was started or created.
    #[error(
        "the database is {backend:?} but outbox was built without its `{feature}` feature; enable it in Cargo.toml: `outbox = {{ version = \"…\", features = [\"{feature}\"] }}`"
    )]
    BackendNotEnabled {
        /// The backend of the connection.
        backend: sea_orm::DbBackend,
        /// The feature of `outbox` that supports it.
        feature: &'static str,
    },
    /// The connection pool cannot hold the connections the runtime needs.
    #[error(
        "the connection pool allows {available} connections but the runtime needs at least {needed}; raise max_connections or lower handler concurrency"
    )]
    PoolTooSmall {
        /// Connections the runtime needs.
        needed: u32,
        /// Maximum connections of the pool.
        available: u32,
    },
    /// The database's schema is older than this build and migrating at start is off (see
    /// [`Builder::migrate_on_start`](crate::Builder::migrate_on_start)).
    #[error(
        "the outbox schema is at version {} but this build needs version {expected}: run `outbox migrate`, `Outbox::migrate()` or the migrations of `outbox::migration` (migration `{migration}`) as a user allowed to change the schema",
        found.map_or_else(|| "none (no outbox tables)".to_owned(), |v| v.to_string())
    )]
    SchemaOutdated {
        /// The version found (`None`: no outbox tables).
        found: Option<i64>,
        /// The version this build needs.
        expected: i64,
        /// The name of the next migration to run.
        migration: &'static str,
    },
    /// Migrating the schema at start failed, typically because the database user may not
    /// change the schema.
    #[error(
        "could not migrate the outbox schema from version {} to {to} (migration `{migration}`); run `outbox migrate` as a user allowed to change the schema, or grant this one the right",
        from.map_or_else(|| "none".to_owned(), |v| v.to_string())
    )]
    Migration {
        /// The version found.
        from: Option<i64>,
        /// The version this build needs.
        to: i64,
        /// The name of the migration that failed.
        migration: &'static str,
        /// The database's error.
        #[source]
        source: sea_orm::DbErr,
    },
    /// The configured payload limit is above what the database server accepts in one
    /// statement, so an enqueue near the limit would fail.
    #[error(
        "the payload limit of {limit} bytes is above the server's `{setting}` of {server} bytes (less {margin} bytes for the statement); raise `{setting}` or lower `Builder::max_payload_bytes`"
    )]
    PayloadLimitAboveServer {
        /// The configured limit.
        limit: usize,
        /// The server setting.
        setting: &'static str,
        /// Its value.
        server: u64,
        /// Room kept for the rest of the statement.
        margin: u64,
    },
    /// The database reported an error while migrating or registering.
    #[error("database error during start-up")]
    Database(#[source] sea_orm::DbErr),
    /// A relay's broker could not be reached at start, or its destination (a JetStream stream,
    /// a RabbitMQ exchange) is missing and could not be created. Nothing was started.
    #[error(
        "relay `{relay}` of queue `{queue}` cannot start: its broker is unreachable or not ready"
    )]
    Relay {
        /// Queue name.
        queue: String,
        /// Relay name.
        relay: String,
        /// What the broker client reported.
        #[source]
        source: BoxDynError,
    },
}

impl From<sea_orm::DbErr> for StartError {
    fn from(e: sea_orm::DbErr) -> Self {
        StartError::Database(e)
    }
}

fn join(problems: &[RegistryProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// What a handler returns when it did not succeed: retry later, or reject for good.
///
/// Any `std::error::Error` converts into [`HandlerError::Retry`] with `?`; an
/// `anyhow::Error` or `eyre::Report` with [`HandlerError::retry`] (or return
/// `anyhow::Result<()>` from the handler, see [`IntoHandlerResult`]). A retried message is
/// delivered again after an exponential backoff; after `max_attempts` it is dead-lettered (or
/// blocks its partition, per the queue's policy). A rejected message is dead-lettered at once.
#[non_exhaustive]
pub enum HandlerError {
    /// A transient failure: try again after a backoff.
    Retry(BoxDynError),
    /// A permanent failure: dead-letter the message now.
    Reject(BoxDynError),
}

impl HandlerError {
    /// A transient failure with this reason.
    pub fn retry(reason: impl Into<BoxDynError>) -> Self {
        Self::Retry(reason.into())
    }

    /// A permanent failure with this reason.
    pub fn reject(reason: impl Into<BoxDynError>) -> Self {
        Self::Reject(reason.into())
    }

    /// True for [`HandlerError::Reject`].
    pub fn is_reject(&self) -> bool {
        matches!(self, Self::Reject(_))
    }

    /// The reason, as recorded in `last_error` and in dead letters.
    pub fn reason(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        match self {
            Self::Retry(e) | Self::Reject(e) => e.as_ref(),
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        Self::Retry(Box::new(e))
    }
}

/// What a handler may return: `Result<(), HandlerError>`, `Result<(), BoxDynError>`, and with
/// the `anyhow` and `eyre`
/// features `anyhow::Result<()>` and `eyre::Result<()>`, whose errors are retried (their whole
/// chain is kept as the recorded reason). `#[outbox::handler]` converts through this trait.
///
/// Implement it for a result type of your own whose error is not a `std::error::Error`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a result an outbox handler can return",
    label = "handler returns this",
    note = "return `Result<(), outbox::HandlerError>` (`?` converts any `std::error::Error` into a retry), `Result<(), outbox::BoxDynError>`, or `anyhow::Result<()>` / `eyre::Result<()>` with the `anyhow` / `eyre` feature of `outbox`"
)]
pub trait IntoHandlerResult {
    /// This result as the runtime reads it.
    fn into_handler_result(self) -> Result<(), HandlerError>;
}

impl IntoHandlerResult for Result<(), HandlerError> {
    fn into_handler_result(self) -> Result<(), HandlerError> {
        self
    }
}

/// A boxed error as a retry.
impl IntoHandlerResult for Result<(), BoxDynError> {
    fn into_handler_result(self) -> Result<(), HandlerError> {
        self.map_err(HandlerError::Retry)
    }
}

/// An `anyhow::Error` as a retry: the boxed error keeps the context chain as its sources.
#[cfg(feature = "anyhow")]
#[cfg_attr(docsrs, doc(cfg(feature = "anyhow")))]
impl IntoHandlerResult for Result<(), anyhow::Error> {
    fn into_handler_result(self) -> Result<(), HandlerError> {
        self.map_err(HandlerError::retry)
    }
}

/// An `eyre::Report` as a retry: the boxed error keeps the context chain as its sources.
#[cfg(feature = "eyre")]
#[cfg_attr(docsrs, doc(cfg(feature = "eyre")))]
impl IntoHandlerResult for Result<(), eyre::Report> {
    fn into_handler_result(self) -> Result<(), HandlerError> {
        self.map_err(HandlerError::retry)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retry(e) => f.debug_tuple("Retry").field(e).finish(),
            Self::Reject(e) => f.debug_tuple("Reject").field(e).finish(),
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retry(e) => write!(f, "retry: {}", full_chain(e.as_ref())),
            Self::Reject(e) => write!(f, "reject: {}", full_chain(e.as_ref())),
        }
    }
}

/// An error and its sources on one line, as stored in `last_error`.
pub(crate) fn full_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(all(test, feature = "anyhow"))]
mod anyhow_tests {
    use super::*;

    #[test]
    fn anyhow_errors_are_retried_with_their_chain() {
        use anyhow::Context as _;
        let r: anyhow::Result<()> = Err(std::io::Error::other("connection reset"))
            .context("calling the mailer")
            .context("sending receipt 7");
        let e = r.into_handler_result().err();
        let e = e.map(|e| (e.is_reject(), e.to_string()));
        assert_eq!(
            e,
            Some((
                false,
                "retry: sending receipt 7: calling the mailer: connection reset".to_owned()
            ))
        );
    }
}

#[cfg(all(test, feature = "eyre"))]
mod eyre_tests {
    use super::*;

    #[test]
    fn eyre_reports_are_retried_with_their_chain() {
        use eyre::WrapErr as _;
        let r: eyre::Result<()> =
            Err(std::io::Error::other("connection reset")).wrap_err("calling the mailer");
        let e = r.into_handler_result().err();
        let e = e.map(|e| (e.is_reject(), e.to_string()));
        assert_eq!(
            e,
            Some((
                false,
                "retry: calling the mailer: connection reset".to_owned()
            ))
        );
    }
}
