//! The runtime: the [`Outbox`] handle (enqueue, dead letters, status), its [`Builder`], and the
//! [`Running`] workers with graceful shutdown.

pub(crate) mod failure;
pub(crate) mod lease;
mod processor;
mod scheduler;
mod schema;
mod sequencer;
mod vacuum;
mod wake;
mod worker;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{EnqueueError, Error, RegistryProblem, StartError};
use crate::handler::HandlerSpec;
use crate::profile::{Profile, RuntimeTuning};
use crate::queue::{
    DEFAULT_MAX_PAYLOAD, Delivery, Enqueued, MAX_DEDUP_KEY_BYTES, MAX_PARTITIONS, NewMessage,
    QueueSpec, validate_name, validate_prefix,
};
use crate::relay::RelaySpec;
use crate::storage::schema::{SCHEMA_VERSION, migration_name};
use crate::storage::{
    CursorKey, DeadLetter, DeadLetterFilter, DueAt, InsertRow, Refused, Registered, RetireRefused,
    Store,
};

/// A message as the storage layer writes it.
fn row<'a>(m: &'a NewMessage, headers: &'a Option<String>) -> InsertRow<'a> {
    InsertRow {
        queue: &m.queue,
        partition: m.partition,
        payload: &m.payload,
        target: None,
        dedup_key: m.dedup_key.as_deref(),
        headers: headers.as_deref(),
    }
}

/// When `m` becomes due, as stored: `None` for a message delivered at once.
fn due_at(m: &NewMessage) -> Result<Option<DueAt>, EnqueueError> {
    let invalid = |reason| EnqueueError::InvalidDeliveryTime {
        queue: m.queue.to_string(),
        reason,
    };
    match m.delivery {
        None => Ok(None),
        Some(Delivery::At(at)) => {
            let since = at
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| invalid("before 1970"))?;
            let ms = i64::try_from(since.as_millis()).map_err(|_| invalid("too far ahead"))?;
            Ok(Some(DueAt::At(ms)))
        }
        Some(Delivery::After(delay)) => {
            // Far below i64::MAX, so `now + delay` cannot overflow in SQL.
            const MAX_DELAY_MS: u128 = 1 << 60;
            let ms = delay.as_millis();
            if ms > MAX_DELAY_MS {
                return Err(invalid("delay too long"));
            }
            Ok(Some(DueAt::After(ms as i64)))
        }
    }
}
use wake::Wake;
use worker::Pacing;

/// Poll interval floor on PostgreSQL, where LISTEN/NOTIFY announces new work.
const PG_SAFETY_POLL: Duration = Duration::from_secs(1);

/// The longest a graceful shutdown waits to mark, for other processes, that it let its
/// partitions go (see [`Outbox::mark_changed`]).
const SHUTDOWN_MARK_WITHIN: Duration = Duration::from_millis(200);

/// Default table prefix.
pub const DEFAULT_TABLE_PREFIX: &str = "outbox_";

pub(crate) struct Shared {
    pub(crate) store: Store,
    pub(crate) wake: Arc<Wake>,
    max_payload: usize,
    /// Partition counts of queues known to exist in the database.
    known: RwLock<HashMap<String, u32>>,
    acked: AtomicU64,
    /// Messages acked by this process since it started (vacuum's look on a server skips a
    /// poll while this has not moved; see `vacuum::step`).
    pub(crate) acked_total: AtomicU64,
    vacuum_after: AtomicU64,
}

impl Shared {
    /// Counts acked messages and wakes vacuum when enough accumulated.
    pub(crate) fn acked(&self, n: u64) {
        self.acked_total.fetch_add(n, Ordering::Relaxed);
        let threshold = self.vacuum_after.load(Ordering::Relaxed);
        if threshold > 0 && self.acked.fetch_add(n, Ordering::Relaxed) + n >= threshold {
            self.acked.store(0, Ordering::Relaxed);
            self.wake.vacuum.notify_one();
        }
    }
}

/// A handle to the outbox in one database: enqueue, dead-letter operations and status.
/// Cheap to clone. Obtain it from [`Builder::connect`] (producer only) or from a
/// [`Running`] runtime.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("backend", &self.shared.store.backend)
            .field("table_prefix", &self.shared.store.prefix)
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// Starts configuring an outbox on `db`.
    pub fn builder(db: DatabaseConnection) -> Builder {
        Builder::new(db)
    }

    /// An outbox on `db` for administration and tools: status, dead letters, enqueue to
    /// queues already registered in the database. Registers nothing, starts no workers and
    /// touches no table until used (see [`Outbox::migrate`] to create the tables).
    pub fn admin(db: DatabaseConnection, table_prefix: &str) -> Result<Outbox, Error> {
        validate_prefix(table_prefix)?;
        if disconnected(&db) {
            return Err(Error::Database(disconnected_error()));
        }
        enabled_backend(&db)
            .map_err(|(backend, feature)| Error::BackendNotEnabled { backend, feature })?;
        let shared = Arc::new(Shared {
            store: Store::new(db, table_prefix),
            wake: Arc::new(Wake::new(false)),
            max_payload: DEFAULT_MAX_PAYLOAD,
            known: RwLock::new(HashMap::new()),
            acked: AtomicU64::new(0),
            acked_total: AtomicU64::new(0),
            vacuum_after: AtomicU64::new(0),
        });
        Ok(Outbox { shared })
    }

    pub(crate) fn store(&self) -> &Store {
        &self.shared.store
    }

    /// Whether a poll may skip a read that started at `read`, less than `at_least_every` ago:
    /// nothing was written to the database since (see `wake::Wake::unchanged_since`).
    pub(crate) fn unchanged_since(
        &self,
        read: Option<tokio::time::Instant>,
        at_least_every: Duration,
    ) -> bool {
        self.shared.wake.unchanged_since(read, at_least_every)
    }

    /// The database backend.
    pub fn backend(&self) -> DbBackend {
        self.shared.store.backend
    }

    /// The connection pool the outbox uses for its own work.
    pub fn db(&self) -> &DatabaseConnection {
        &self.shared.store.db
    }

    /// The partition count of `queue`, cached after the first look-up. The look-up reads
    /// through the caller's own connection, so it needs no second pooled connection (a
    /// single-connection SQLite pool held by the caller's transaction would wait forever).
    async fn partitions_of<C: ConnectionTrait>(
        &self,
        conn: &C,
        queue: &str,
    ) -> Result<u32, EnqueueError> {
        if let Some(n) = self
            .shared
            .known
            .read()
            .ok()
            .and_then(|k| k.get(queue).copied())
        {
            return Ok(n);
        }
        match self.shared.store.queue_partitions(conn, queue).await? {
            Some(n) => {
                if let Ok(mut k) = self.shared.known.write() {
                    k.insert(queue.to_owned(), n);
                }
                Ok(n)
            }
            None => Err(EnqueueError::UnknownQueue(queue.to_owned())),
        }
    }

    async fn validate<C: ConnectionTrait>(
        &self,
        conn: &C,
        m: &NewMessage,
    ) -> Result<(), EnqueueError> {
        validate_name("queue", &m.queue)?;
        let partitions = self.partitions_of(conn, &m.queue).await?;
        if m.partition >= partitions {
            return Err(EnqueueError::PartitionOutOfRange {
                queue: m.queue.to_string(),
                partition: m.partition,
                partitions,
            });
        }
        if m.payload.len() > self.shared.max_payload {
            return Err(EnqueueError::PayloadTooLarge {
                queue: m.queue.to_string(),
                size: m.payload.len(),
                limit: self.shared.max_payload,
            });
        }
        if let Some(key) = &m.dedup_key {
            let reason = if key.is_empty() {
                Some("must not be empty")
            } else if key.len() > MAX_DEDUP_KEY_BYTES {
                Some("must be at most 255 bytes")
            } else if key.contains('\0') {
                Some("must not contain NUL characters")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(EnqueueError::InvalidDedupKey {
                    queue: m.queue.to_string(),
                    reason,
                });
            }
        }
        m.headers
            .validate()
            .map_err(|source| EnqueueError::InvalidHeaders {
                queue: m.queue.to_string(),
                source,
            })?;
        due_at(m)?;
        Ok(())
    }

    /// Enqueues one message through `conn`: a transaction (the message exists if and only if
    /// it commits) or a plain connection (durable when this returns). Says whether it was
    /// stored, scheduled, or a duplicate of a message with the same
    /// [deduplication key](NewMessage::dedup_key) (then nothing was written).
    pub async fn enqueue<C: ConnectionTrait>(
        &self,
        conn: &C,
        message: NewMessage,
    ) -> Result<Enqueued, EnqueueError> {
        let mut done = self
            .enqueue_batch(conn, std::slice::from_ref(&message))
            .await?;
        Ok(done.pop().unwrap_or(Enqueued::Duplicate))
    }

    /// Enqueues several messages in call order through `conn`, and says what happened to each
    /// (in the same order). Every message is validated first: if one is invalid nothing is
    /// written. A deduplication key used twice in one batch stores the first message only.
    pub async fn enqueue_batch<C: ConnectionTrait>(
        &self,
        conn: &C,
        messages: &[NewMessage],
    ) -> Result<Vec<Enqueued>, EnqueueError> {
        let store = &self.shared.store;
        // sea-orm panics when asked the backend of a disconnected `DatabaseConnection`.
        let found =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| conn.get_database_backend()))
                .map_err(|_| EnqueueError::Disconnected)?;
        if found != store.backend {
            return Err(EnqueueError::BackendMismatch {
                expected: store.backend,
                found,
            });
        }
        for m in messages {
            self.validate(conn, m).await?;
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        // The stored headers of each message, with the caller's trace context when the
        // `opentelemetry` feature captured one.
        let trace = crate::trace::capture();
        let headers: Vec<Option<String>> = messages
            .iter()
            .map(|m| crate::trace::stored_headers(&m.headers, &trace))
            .collect();
        let cap = store.dialect.statement_cap();
        let too_large =
            |e: sea_orm::DbErr| match (messages.iter().max_by_key(|m| m.payload.len()), cap) {
                (Some(m), Some(cap)) if e.to_string().contains(cap.setting) => {
                    EnqueueError::PayloadTooLargeForServer {
                        queue: m.queue.to_string(),
                        size: m.payload.len(),
                        setting: cap.setting,
                    }
                }
                _ => EnqueueError::Database(e),
            };
        // Plain messages without a key go in one multi-row insert, as before; a key is taken
        // first, in the caller's transaction, and decides whether its message is written.
        let plain = messages
            .iter()
            .all(|m| m.dedup_key.is_none() && m.delivery.is_none());
        if plain {
            let rows: Vec<_> = messages
                .iter()
                .zip(&headers)
                .map(|(m, h)| row(m, h))
                .collect();
            store
                .insert_incoming(conn, &rows)
                .await
                .map_err(too_large)?;
            crate::metrics::enqueued(messages.iter());
            self.shared.wake.enqueued();
            return Ok(vec![Enqueued::Stored; messages.len()]);
        }
        let mut done = Vec::with_capacity(messages.len());
        let mut taken: Vec<(&str, &str)> = Vec::new();
        let mut now: Vec<InsertRow<'_>> = Vec::new();
        let written = async {
            for (m, h) in messages.iter().zip(&headers) {
                if let Some(key) = &m.dedup_key {
                    if !store.claim_dedup_key(conn, &m.queue, key).await? {
                        done.push(Enqueued::Duplicate);
                        continue;
                    }
                    taken.push((&m.queue, key));
                }
                match due_at(m)? {
                    Some(due) => {
                        let id = store
                            .insert_scheduled(conn, row(m, h), due)
                            .await
                            .map_err(too_large)?;
                        done.push(Enqueued::Scheduled { id });
                    }
                    None => {
                        now.push(row(m, h));
                        done.push(Enqueued::Stored);
                    }
                }
            }
            if !now.is_empty() {
                store.insert_incoming(conn, &now).await.map_err(too_large)?;
            }
            Ok::<(), EnqueueError>(())
        }
        .await;
        if let Err(e) = written {
            // On a plain connection the keys taken so far are committed already: give them
            // back, so no key stays taken without its message. (In a transaction the caller
            // rolls back anyway; this is harmless there.)
            for (queue, key) in taken {
                let _ = store.unclaim_dedup_key(conn, queue, key).await;
            }
            return Err(e);
        }
        let duplicates = done.iter().filter(|d| !d.is_new()).count();
        if duplicates > 0 {
            for (m, d) in messages.iter().zip(&done) {
                if !d.is_new() {
                    crate::metrics::duplicate(&m.queue);
                }
            }
        }
        crate::metrics::enqueued(
            messages
                .iter()
                .zip(&done)
                .filter(|(_, d)| d.is_new())
                .map(|(m, _)| m),
        );
        if done.iter().any(|d| matches!(d, Enqueued::Scheduled { .. })) {
            self.shared.wake.scheduled();
        }
        if !now.is_empty() {
            self.shared.wake.enqueued();
        }
        Ok(done)
    }

    /// Cancels the scheduled message `id` (from [`Enqueued::Scheduled`]) before it is due,
    /// and frees its deduplication key. `Ok(false)`: it is not scheduled (any more): already
    /// due and on its way, cancelled, or never scheduled.
    pub async fn cancel_scheduled(&self, id: i64) -> Result<bool, Error> {
        let store = &self.shared.store;
        Ok(store.cancel_scheduled(id).await?)
    }

    /// Cancels the scheduled message of `queue` with deduplication key `key` before it is due,
    /// and frees the key. `Ok(false)`: none is scheduled.
    pub async fn cancel_scheduled_by_key(&self, queue: &str, key: &str) -> Result<bool, Error> {
        validate_name("queue", queue)?;
        Ok(self.shared.store.cancel_scheduled_key(queue, key).await?)
    }

    /// Dead letters matching `filter` with an id above `after_id`, oldest first, at most
    /// `limit` (page with the last id seen).
    pub async fn dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, Error> {
        filter.validate()?;
        Ok(self
            .shared
            .store
            .list_dead_letters(filter, after_id, limit)
            .await?)
    }

    /// One dead letter.
    pub async fn dead_letter(&self, id: i64) -> Result<DeadLetter, Error> {
        self.shared
            .store
            .get_dead_letter(id)
            .await?
            .ok_or(Error::DeadLetterNotFound(id))
    }

    /// How many dead letters match `filter`.
    pub async fn count_dead_letters(&self, filter: &DeadLetterFilter) -> Result<i64, Error> {
        filter.validate()?;
        Ok(self.shared.store.count_dead_letters(filter).await?)
    }

    /// Puts a dead letter back at the tail of its partition, delivered to the handler that
    /// dead-lettered it (other handlers of the queue are not affected), with attempts reset.
    /// Racing replays of one dead letter deliver it once: the loser gets
    /// [`Error::DeadLetterNotFound`].
    pub async fn replay_dead_letter(&self, id: i64) -> Result<(), Error> {
        if self.shared.store.replay_dead_letter(id).await? {
            self.shared.wake.enqueued();
            Ok(())
        } else {
            Err(Error::DeadLetterNotFound(id))
        }
    }

    /// Deletes one dead letter.
    pub async fn discard_dead_letter(&self, id: i64) -> Result<(), Error> {
        if self.shared.store.delete_dead_letter(id).await? {
            Ok(())
        } else {
            Err(Error::DeadLetterNotFound(id))
        }
    }

    /// Deletes every dead letter matching `filter`; returns how many.
    pub async fn purge_dead_letters(&self, filter: &DeadLetterFilter) -> Result<u64, Error> {
        filter.validate()?;
        Ok(self.shared.store.purge_dead_letters(filter).await?)
    }

    /// Lets a partition blocked by a poisoned message (block policy) try its head again now.
    ///
    /// `head_seq` is the head the operator saw ([`PartitionStatus::head_seq`]); if another
    /// message is the head by now, nothing changes and [`Error::HeadMoved`] says so.
    /// [`Error::NotBlocked`] if the partition is not blocked.
    ///
    /// [`PartitionStatus::head_seq`]: crate::PartitionStatus::head_seq
    pub async fn unblock(
        &self,
        queue: &str,
        partition: u32,
        handler: &str,
        head_seq: i64,
    ) -> Result<(), Error> {
        let key = checked_key(queue, handler, partition)?;
        let result = self.shared.store.unblock(key, head_seq).await?;
        refused(result, key, head_seq)?;
        self.shared.wake.sequenced(queue);
        self.mark_changed().await;
        Ok(())
    }

    /// Moves the head message of a partition (for one handler) to the dead letters and lets the
    /// partition continue.
    ///
    /// `head_seq` is the head the operator saw ([`PartitionStatus::head_seq`]): if the handler
    /// finished it meanwhile, the next (healthy) message is not skipped by mistake; nothing
    /// changes and [`Error::HeadMoved`] says so. [`Error::HeadLeased`] while a worker holds it.
    ///
    /// [`PartitionStatus::head_seq`]: crate::PartitionStatus::head_seq
    pub async fn skip_head(
        &self,
        queue: &str,
        partition: u32,
        handler: &str,
        head_seq: i64,
    ) -> Result<(), Error> {
        let key = checked_key(queue, handler, partition)?;
        let result = self.shared.store.skip_head(key, head_seq).await?;
        refused(result, key, head_seq)?;
        self.shared.wake.sequenced(queue);
        self.mark_changed().await;
        Ok(())
    }

    /// After an operator's change that may give a partition work again, or a shutdown that
    /// let partitions go: tells the idle handlers of other processes on a server (see
    /// [`Store::mark_changed`]). The change itself committed; without the mark they find it
    /// at their next full read, within 10 s.
    ///
    /// [`Store::mark_changed`]: crate::storage::Store::mark_changed
    async fn mark_changed(&self) {
        if self.shared.store.marks_changes()
            && let Err(e) = self.shared.store.mark_changed().await
        {
            tracing::warn!(error = %e, "could not mark the change for other processes; their idle handlers find it within 10 s");
        }
    }

    /// Retires a handler that no longer runs (removed or renamed): deletes its cursors so
    /// vacuum stops keeping messages for it. Its dead letters stay. Returns how many cursors
    /// (partitions) were removed.
    ///
    /// Refused with [`Error::HandlerInUse`] while a running process serves the handler (it
    /// reported so within three of its heartbeat intervals). A process that starts it again
    /// later registers it anew, from the oldest retained message.
    pub async fn retire_handler(&self, queue: &str, handler: &str) -> Result<u64, Error> {
        validate_name("queue", queue)?;
        validate_name("handler", handler)?;
        match self.shared.store.retire_handler(queue, handler).await? {
            Ok(n) => Ok(n),
            Err(RetireRefused::NotFound) => Err(Error::HandlerNotFound {
                queue: queue.to_owned(),
                handler: handler.to_owned(),
            }),
            Err(RetireRefused::InUse { seen_ms_ago }) => Err(Error::HandlerInUse {
                queue: queue.to_owned(),
                handler: handler.to_owned(),
                seen_ms_ago,
            }),
        }
    }
}

/// Whether `db` is connected to nothing (sea-orm panics when asked its backend).
/// The backend of `db`, if this build has its feature (see [`StartError::BackendNotEnabled`]).
pub(crate) fn enabled_backend(db: &DatabaseConnection) -> Result<(), (DbBackend, &'static str)> {
    let backend = db.get_database_backend();
    let (feature, enabled) = match backend {
        DbBackend::Sqlite => ("sqlite", cfg!(feature = "sqlite")),
        DbBackend::Postgres => ("postgres", cfg!(feature = "postgres")),
        DbBackend::MySql => ("mysql", cfg!(feature = "mysql")),
        // A backend sea-orm added later: the runtime has no dialect for it.
        _ => (
            "a backend outbox supports (sqlite, postgres or mysql)",
            false,
        ),
    };
    if enabled {
        Ok(())
    } else {
        Err((backend, feature))
    }
}

fn disconnected(db: &DatabaseConnection) -> bool {
    matches!(db.inner, sea_orm::DatabaseConnectionType::Disconnected)
}

fn disconnected_error() -> sea_orm::DbErr {
    sea_orm::DbErr::Custom("the database connection is disconnected".to_owned())
}

/// Validates the names of a cursor key.
fn checked_key<'a>(
    queue: &'a str,
    handler: &'a str,
    partition: u32,
) -> Result<CursorKey<'a>, Error> {
    validate_name("queue", queue)?;
    validate_name("handler", handler)?;
    Ok(CursorKey {
        queue,
        handler,
        partition,
    })
}

/// The typed error of an operator action the storage refused.
fn refused(result: Result<(), Refused>, key: CursorKey<'_>, expected: i64) -> Result<(), Error> {
    let Err(why) = result else {
        return Ok(());
    };
    let (queue, handler, partition) = (key.queue.to_owned(), key.handler.to_owned(), key.partition);
    Err(match why {
        Refused::NoCursor => Error::CursorNotFound {
            queue,
            handler,
            partition,
        },
        Refused::Moved { found } => Error::HeadMoved {
            queue,
            handler,
            partition,
            expected,
            found,
        },
        Refused::Leased => Error::HeadLeased {
            queue,
            handler,
            partition,
        },
        Refused::NotBlocked => Error::NotBlocked {
            queue,
            handler,
            partition,
        },
    })
}

/// Configures an outbox: table prefix, profile, queues and handlers.
///
/// [`connect`](Builder::connect) migrates and registers, for producers;
/// [`start`](Builder::start) also starts the workers.
#[must_use]
pub struct Builder {
    db: DatabaseConnection,
    prefix: String,
    profile: Profile,
    runtime: Option<RuntimeTuning>,
    pub(crate) queues: Vec<QueueSpec>,
    pub(crate) handlers: Vec<HandlerSpec>,
    relays: Vec<RelaySpec>,
    max_payload: usize,
    migrate_on_start: bool,
    states: crate::state::States,
    /// With [`declared`](Builder::declared): the declarations to add at start.
    pub(crate) discovery: Option<crate::typed::Discovery>,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("prefix", &self.prefix)
            .field("profile", &self.profile)
            .field("queues", &self.queues)
            .field("handlers", &self.handlers)
            .field("relays", &self.relays)
            .field("max_payload", &self.max_payload)
            .field("migrate_on_start", &self.migrate_on_start)
            .field("discovery", &self.discovery)
            .finish_non_exhaustive()
    }
}

impl Builder {
    fn new(db: DatabaseConnection) -> Self {
        Self {
            db,
            prefix: DEFAULT_TABLE_PREFIX.to_owned(),
            profile: Profile::Default,
            runtime: None,
            queues: Vec::new(),
            handlers: Vec::new(),
            relays: Vec::new(),
            max_payload: DEFAULT_MAX_PAYLOAD,
            migrate_on_start: true,
            states: crate::state::States::default(),
            discovery: None,
        }
    }

    /// Prefix of every table (default `outbox_`): lowercase letters, digits and `_`.
    pub fn table_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The profile whose knobs apply where queues and handlers set none.
    pub fn profile(mut self, profile: Profile) -> Self {
        self.profile = profile;
        self
    }

    /// Sequencer and vacuum knobs, replacing the profile's.
    pub fn runtime_tuning(mut self, tuning: RuntimeTuning) -> Self {
        self.runtime = Some(tuning);
        self
    }

    /// Declares a queue.
    pub fn queue(mut self, queue: QueueSpec) -> Self {
        self.queues.push(queue);
        self
    }

    /// Declares a handler. Its queue must be declared too.
    pub fn handler(mut self, handler: HandlerSpec) -> Self {
        self.handlers.push(handler);
        self
    }

    /// Gives handlers that take `State<T>` this value (see [`State`](crate::State)): one value
    /// per type, a later one replaces an earlier one. [`start`](Builder::start) fails with
    /// [`StartError::MissingState`] listing every handler whose state was not given.
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.states.insert(value);
        self
    }

    /// Builds the calls of handlers that take state from the values given, or lists every
    /// state that is missing.
    fn bind_states(&mut self) -> Result<(), StartError> {
        let states = Arc::new(std::mem::take(&mut self.states));
        let missing: Vec<_> = self
            .handlers
            .iter_mut()
            .flat_map(|h| h.bind_state(&states))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(StartError::MissingState(missing))
        }
    }

    /// Declares a relay: a handler of its queue, with its own cursor, that publishes the
    /// queue's messages to a broker in order per partition (see [`crate::relay`]). Its queue
    /// must be declared too. [`start`](Builder::start) checks the broker before anything
    /// starts.
    pub fn relay(mut self, relay: RelaySpec) -> Self {
        self.relays.push(relay);
        self
    }

    /// Largest payload accepted by enqueue, in bytes (default 1 MiB). On MySQL/MariaDB it
    /// must fit the server's `max_allowed_packet`; start checks it.
    pub fn max_payload_bytes(mut self, limit: usize) -> Self {
        self.max_payload = limit;
        self
    }

    /// Whether [`connect`](Builder::connect) and [`start`](Builder::start) bring an older
    /// schema up to date (default: yes). A current schema is never touched, so a database user
    /// that may only read and write rows can start the runtime either way. With `false`, an
    /// older schema fails with [`StartError::SchemaOutdated`] naming the migration to run
    /// (`outbox migrate`, [`Outbox::migrate`], or the sea-orm-migration migrations of
    /// `outbox::migration`), for deployments that change the schema in a separate step.
    pub fn migrate_on_start(mut self, migrate: bool) -> Self {
        self.migrate_on_start = migrate;
        self
    }

    /// Turns the declared relays into the leased batch handlers that run them.
    fn take_relays(&mut self) -> Vec<RegistryProblem> {
        let mut problems = Vec::new();
        for r in std::mem::take(&mut self.relays) {
            let (queue, relay) = (r.queue.to_string(), r.name.to_string());
            match r.into_handler() {
                Ok(h) => self.handlers.push(h),
                Err(error) => problems.push(RegistryProblem::InvalidRelay {
                    queue,
                    relay,
                    error,
                }),
            }
        }
        problems
    }

    fn check(&self) -> Vec<RegistryProblem> {
        let mut problems = Vec::new();
        if let Err(e) = validate_prefix(&self.prefix) {
            problems.push(RegistryProblem::InvalidName(e));
        }
        let mut seen = HashSet::new();
        for q in &self.queues {
            if let Err(e) = validate_name("queue", &q.name) {
                problems.push(RegistryProblem::InvalidName(e));
            }
            if !(1..=MAX_PARTITIONS).contains(&q.partitions) {
                problems.push(RegistryProblem::InvalidPartitions {
                    queue: q.name.to_string(),
                    partitions: q.partitions,
                });
            }
            if !seen.insert(&*q.name) {
                problems.push(RegistryProblem::DuplicateQueue(q.name.to_string()));
            }
            problems.extend(
                self.profile
                    .tuning()
                    .with(&q.overrides)
                    .problems(&format!("queue `{}`", q.name)),
            );
        }
        let mut seen_handlers = HashSet::new();
        for h in &self.handlers {
            if let Err(e) = validate_name("handler", &h.name) {
                problems.push(RegistryProblem::InvalidName(e));
            }
            if !seen_handlers.insert((&*h.queue, &*h.name)) {
                problems.push(RegistryProblem::DuplicateHandler {
                    queue: h.queue.to_string(),
                    handler: h.name.to_string(),
                });
            }
            match self.queues.iter().find(|q| q.name == h.queue) {
                None => problems.push(RegistryProblem::HandlerWithoutQueue {
                    queue: h.queue.to_string(),
                    handler: h.name.to_string(),
                }),
                Some(q) => problems.extend(
                    self.profile
                        .tuning()
                        .with(&q.overrides)
                        .with(&h.overrides)
                        .problems(&format!("handler `{}` of queue `{}`", h.name, h.queue)),
                ),
            }
        }
        problems
    }

    /// Validates every declaration (reporting all problems at once), creates the tables if
    /// needed and registers queues and handler cursors. Starts no workers: use it in processes
    /// that only enqueue.
    pub async fn connect(mut self) -> Result<Outbox, StartError> {
        let install = self.add_declarations();
        let outbox = self.prepare().await?.0;
        if install {
            crate::typed::set_global(outbox.clone());
        }
        Ok(outbox)
    }

    async fn prepare(mut self) -> Result<(Outbox, Self), StartError> {
        if disconnected(&self.db) {
            return Err(StartError::Database(disconnected_error()));
        }
        enabled_backend(&self.db)
            .map_err(|(backend, feature)| StartError::BackendNotEnabled { backend, feature })?;
        let mut problems = self.take_relays();
        problems.extend(self.check());
        if !problems.is_empty() {
            return Err(StartError::Registry(problems));
        }
        let store = Store::new(self.db.clone(), &self.prefix).with_notify_window(
            self.runtime
                .unwrap_or_else(|| self.profile.runtime())
                .notify_coalesce,
        );
        let found = store.schema_version().await?;
        match found {
            Some(v) if v == SCHEMA_VERSION => {}
            Some(v) if v > SCHEMA_VERSION => {
                return Err(StartError::Database(sea_orm::DbErr::Custom(format!(
                    "the outbox schema is at version {v}, newer than this build's {SCHEMA_VERSION}; upgrade outbox"
                ))));
            }
            _ if !self.migrate_on_start => {
                return Err(StartError::SchemaOutdated {
                    found,
                    expected: SCHEMA_VERSION,
                    migration: migration_name(found.unwrap_or(0) + 1),
                });
            }
            _ => {
                store
                    .migrate()
                    .await
                    .map_err(|source| StartError::Migration {
                        from: found,
                        to: SCHEMA_VERSION,
                        migration: migration_name(found.unwrap_or(0) + 1),
                        source,
                    })?;
            }
        }
        self.check_payload_limit(&store).await?;
        let mut problems = Vec::new();
        let mut known = HashMap::new();
        for q in &self.queues {
            match store.register_queue(&q.name, q.partitions).await? {
                Registered::Ok => {
                    known.insert(q.name.to_string(), q.partitions);
                }
                Registered::PartitionMismatch { stored } => {
                    problems.push(RegistryProblem::PartitionMismatch {
                        queue: q.name.to_string(),
                        declared: q.partitions,
                        stored,
                    })
                }
            }
        }
        if !problems.is_empty() {
            return Err(StartError::Registry(problems));
        }
        let mut created = 0;
        for h in &self.handlers {
            created += store
                .register_handler(&h.queue, &h.name, known[&*h.queue])
                .await?;
        }
        if created > 0
            && let Err(e) = store.analyze_cursors().await
        {
            tracing::warn!(error = %e, "could not analyze the cursor table; group claims may read more rows until the database does");
        }
        let wake = Arc::new(Wake::new(store.dialect.listen_notify()));
        let shared = Arc::new(Shared {
            store,
            wake,
            max_payload: self.max_payload,
            known: RwLock::new(known),
            acked: AtomicU64::new(0),
            acked_total: AtomicU64::new(0),
            vacuum_after: AtomicU64::new(0),
        });
        Ok((Outbox { shared }, self))
    }

    /// MySQL/MariaDB refuse a statement larger than `max_allowed_packet`: the payload limit
    /// must leave room for the rest of the statement.
    async fn check_payload_limit(&self, store: &Store) -> Result<(), StartError> {
        const MARGIN: u64 = 64 * 1024;
        let Some(cap) = store.dialect.statement_cap() else {
            return Ok(());
        };
        let row = store
            .db
            .query_one_raw(store.stmt(cap.query, vec![]))
            .await?;
        let server: u64 = match row {
            Some(r) => r
                .try_get_by_index::<i64>(0)
                .map(|v| u64::try_from(v).unwrap_or(0))
                .or_else(|_| r.try_get_by_index::<u64>(0))?,
            None => return Ok(()),
        };
        if self.max_payload as u64 + MARGIN > server {
            return Err(StartError::PayloadLimitAboveServer {
                limit: self.max_payload,
                setting: cap.setting,
                server,
                margin: MARGIN,
            });
        }
        Ok(())
    }

    /// Connections the workers need at most at once: one per partition in flight per handler,
    /// one for the sequencer and one for vacuum and dispatch scans, and on PostgreSQL the
    /// listener's (LISTEN holds a pooled connection for as long as the runtime runs). SQLite
    /// has one writer, so the runtime works on any pool there, including sea-orm's default
    /// single connection (its workers then take turns).
    fn connections_needed(&self) -> u32 {
        let dialect = crate::storage::dialect::of(self.db.get_database_backend());
        if dialect.single_writer() {
            return 1;
        }
        let per_handler: u32 = self
            .handlers
            .iter()
            .map(|h| {
                let q = self.queues.iter().find(|q| q.name == h.queue);
                let mut t = self.profile.tuning();
                if let Some(q) = q {
                    t = t.with(&q.overrides);
                }
                t.with(&h.overrides).concurrency
            })
            .sum();
        let listener = u32::from(dialect.listen_notify());
        per_handler + 2 + listener
    }

    /// Connections the relays' handlers need (see [`connections_needed`](Builder::connections_needed)).
    fn relays_concurrency(&self) -> u32 {
        if crate::storage::dialect::of(self.db.get_database_backend()).single_writer() {
            return 0;
        }
        self.relays
            .iter()
            .map(|r| {
                let mut t = self.profile.tuning();
                if let Some(q) = self.queues.iter().find(|q| q.name == r.queue) {
                    t = t.with(&q.overrides);
                }
                t.with(r.overrides_ref()).concurrency
            })
            .sum()
    }

    fn pool_size(&self) -> Option<u32> {
        match &self.db.inner {
            #[cfg(feature = "postgres")]
            sea_orm::DatabaseConnectionType::SqlxPostgresPoolConnection(_) => Some(
                self.db
                    .get_postgres_connection_pool()
                    .options()
                    .get_max_connections(),
            ),
            #[cfg(feature = "mysql")]
            sea_orm::DatabaseConnectionType::SqlxMySqlPoolConnection(_) => Some(
                self.db
                    .get_mysql_connection_pool()
                    .options()
                    .get_max_connections(),
            ),
            #[cfg(feature = "sqlite")]
            sea_orm::DatabaseConnectionType::SqlxSqlitePoolConnection(_) => Some(
                self.db
                    .get_sqlite_connection_pool()
                    .options()
                    .get_max_connections(),
            ),
            _ => None,
        }
    }

    /// Like [`connect`](Builder::connect), then starts the sequencer, vacuum and one dispatcher
    /// per handler. Fails fast if the pool is too small for the configured concurrency.
    pub async fn start(mut self) -> Result<Running, StartError> {
        let install = self.add_declarations();
        let running = self.launch().await?;
        if install {
            crate::typed::set_global(running.outbox().clone());
        }
        Ok(running)
    }

    async fn launch(mut self) -> Result<Running, StartError> {
        self.bind_states()?;
        if disconnected(&self.db) {
            return Err(StartError::Database(disconnected_error()));
        }
        enabled_backend(&self.db)
            .map_err(|(backend, feature)| StartError::BackendNotEnabled { backend, feature })?;
        // Relays count as handlers for the pool; their brokers must answer before anything runs.
        for r in &self.relays {
            r.broker
                .prepare()
                .await
                .map_err(|source| StartError::Relay {
                    queue: r.queue.to_string(),
                    relay: r.name.to_string(),
                    source,
                })?;
        }
        let needed = self.connections_needed() + self.relays_concurrency();
        if let Some(available) = self.pool_size()
            && available < needed
        {
            return Err(StartError::PoolTooSmall { needed, available });
        }
        let (outbox, builder) = self.prepare().await?;
        let shared = outbox.shared.clone();
        let rt = builder.runtime.unwrap_or_else(|| builder.profile.runtime());
        shared
            .vacuum_after
            .store(rt.vacuum_after_acks, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let hard = CancellationToken::new();
        let abandon = CancellationToken::new();
        let tracker = TaskTracker::new();
        // Every task stops at `abandon`, even inside a database call that hangs.
        let spawn = |task: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>| {
            let abandon = abandon.clone();
            tracker.spawn(async move {
                tokio::select! {
                    () = abandon.cancelled() => {}
                    () = task => {}
                }
            });
        };
        let write_hold = shared
            .store
            .dialect
            .single_writer()
            .then_some(rt.sqlite_write_hold);
        let owner: Arc<str> =
            format!("{}-{:08x}", std::process::id(), rand::random::<u32>()).into();
        let base = builder.profile.tuning();
        // On PostgreSQL every change another process makes is announced by NOTIFY (delivered
        // on commit), and retries and lease expiries wake their workers by timer, so polling
        // is only a safety net there and runs at most once a second.
        let listens = shared.store.dialect.listen_notify();
        let pacing = move |poll: Duration| Pacing {
            poll: if listens {
                poll.max(PG_SAFETY_POLL)
            } else {
                poll
            },
            error_min: rt.error_backoff_min,
            error_max: rt.error_backoff_max,
        };

        for h in &builder.handlers {
            let Some(q) = builder.queues.iter().find(|q| q.name == h.queue) else {
                continue;
            };
            let tuning = base.with(&q.overrides).with(&h.overrides);
            let p = Arc::new(processor::Processor {
                shared: shared.clone(),
                queue: Arc::from(&*h.queue),
                handler: Arc::from(&*h.name),
                mode: h.mode.clone(),
                tuning,
                policy: q.policy,
                owner: owner.clone(),
                wake: shared.wake.register_handler(&h.queue),
                in_flight: Mutex::new(HashSet::new()),
                backlog: Mutex::default(),
                scanned: Mutex::new(None),
                changes_seen: Mutex::new(None),
                slots: Arc::new(Semaphore::new(tuning.concurrency as usize)),
                starved: std::sync::atomic::AtomicBool::new(false),
                write_hold,
                tracker: tracker.clone(),
                cancel: cancel.child_token(),
                hard: hard.clone(),
                abandon: abandon.clone(),
            });
            let name = format!("dispatcher {}/{}", h.queue, h.name);
            let wake = p.wake.clone();
            let c = cancel.child_token();
            spawn(Box::pin(async move {
                worker::run(
                    &name,
                    |cause| p.dispatch(cause),
                    wake,
                    pacing(tuning.poll_interval),
                    c,
                )
                .await;
            }));
        }

        let poll = base.poll_interval;
        {
            let s = sequencer::Sequencer::new(shared.clone(), rt.sequencer_batch, poll);
            let wake = shared.wake.sequencer.clone();
            let c = cancel.child_token();
            spawn(Box::pin(async move {
                worker::run("sequencer", |_| s.step(), wake, pacing(poll), c).await;
            }));
        }
        {
            let s = shared.clone();
            let wake = shared.wake.scheduler.clone();
            let c = cancel.child_token();
            let batch = rt.sequencer_batch.min(1_000);
            spawn(Box::pin(async move {
                worker::run(
                    "scheduler",
                    |_| scheduler::step(&s, batch),
                    wake,
                    pacing(poll),
                    c,
                )
                .await;
            }));
        }
        {
            let s = shared.clone();
            let wake = shared.wake.vacuum.clone();
            let c = cancel.child_token();
            let retention: Vec<(String, i64)> = builder
                .queues
                .iter()
                .map(|q| {
                    let ms = i64::try_from(q.dedup_retention.as_millis()).unwrap_or(i64::MAX);
                    (q.name.to_string(), ms)
                })
                .collect();
            spawn(Box::pin(async move {
                let looked = Mutex::new(None);
                worker::run(
                    "vacuum",
                    |cause| vacuum::step(&s, cause, &looked, rt.vacuum_chunk, &retention),
                    wake,
                    pacing(rt.vacuum_interval),
                    c,
                )
                .await;
            }));
        }
        {
            // Once `start` returns, status shows these handlers as served.
            let served: Vec<(String, String)> = builder
                .handlers
                .iter()
                .map(|h| (h.queue.to_string(), h.name.to_string()))
                .collect();
            let pairs: Vec<(&str, &str)> = served
                .iter()
                .map(|(q, h)| (q.as_str(), h.as_str()))
                .collect();
            let every = rt.heartbeat_interval;
            shared
                .wake
                .own_write(shared.store.heartbeat(&pairs, every))
                .await?;
            let s = shared.clone();
            let c = cancel.child_token();
            spawn(Box::pin(async move {
                let pairs: Vec<(&str, &str)> = served
                    .iter()
                    .map(|(q, h)| (q.as_str(), h.as_str()))
                    .collect();
                while !pairs.is_empty() {
                    tokio::select! {
                        () = c.cancelled() => return,
                        () = tokio::time::sleep(every) => {}
                    }
                    // The heartbeat changes nothing a poll looks for: its write is not a change
                    // that ends a quiet spell (see `Wake::own_write`).
                    if let Err(e) = s.wake.own_write(s.store.heartbeat(&pairs, every)).await {
                        tracing::warn!(error = %e, "heartbeat failed; retrying at the next interval");
                    }
                }
            }));
        }
        {
            let o = outbox.clone();
            let c = cancel.child_token();
            spawn(Box::pin(
                async move { crate::metrics::run_gauges(&o, c).await },
            ));
        }
        #[cfg(feature = "postgres")]
        if let sea_orm::DatabaseConnectionType::SqlxPostgresPoolConnection(_) =
            &shared.store.db.inner
        {
            let pool = shared.store.db.get_postgres_connection_pool().clone();
            let channel = shared.store.t.channel.clone();
            let wake = shared.wake.clone();
            let c = cancel.child_token();
            spawn(Box::pin(wake::listen_postgres(pool, channel, wake, c)));
        }
        #[cfg(feature = "sqlite")]
        {
            // SQLite: other processes' commits are seen as writes to the database's log. Without
            // the watch (a database in memory, no file watch on this system) the sequencer polls.
            let watched = match shared.store.commit_files().await {
                Ok(files) if files.is_empty() => None,
                Ok(files) => match wake::watch_files(&files, shared.wake.clone()) {
                    Ok(watcher) => {
                        shared.wake.watching_files();
                        Some(watcher)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch the database file; commits of other processes are found by polling");
                        None
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read where the database file is; commits of other processes are found by polling");
                    None
                }
            };
            if let Some(watcher) = watched {
                let c = cancel.child_token();
                spawn(Box::pin(async move {
                    c.cancelled().await;
                    drop(watcher);
                }));
            }
        }
        // Start every worker with one pass of work: nothing enqueued before start is stranded.
        shared.wake.all();
        tracker.close();
        let handlers = builder
            .handlers
            .iter()
            .map(|h| (h.queue.to_string(), h.name.to_string()))
            .collect();
        Ok(Running {
            outbox,
            handlers,
            cancel,
            hard,
            abandon,
            tracker,
        })
    }
}

/// The running workers of one process; [`outbox`](Running::outbox) is its handle.
///
/// Stop it with [`shutdown`](Running::shutdown); dropping it without shutting down cancels the
/// workers abruptly (in-flight transactions roll back, leases expire on their own).
#[must_use = "dropping `Running` stops the workers; call `shutdown`"]
pub struct Running {
    outbox: Outbox,
    /// (queue, handler) of every handler this process runs.
    handlers: HashSet<(String, String)>,
    cancel: CancellationToken,
    hard: CancellationToken,
    abandon: CancellationToken,
    tracker: TaskTracker,
}

/// After the grace period, how long cancelled handlers have to give their leases back before
/// every task is abandoned, even one stuck in a database call.
pub const SHUTDOWN_RELEASE_WINDOW: Duration = Duration::from_secs(5);

impl fmt::Debug for Running {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Running")
            .field("outbox", &self.outbox)
            .field("stopping", &self.cancel.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Running {
    /// The outbox handle: enqueue, status and repairs.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Stops taking work, lets in-flight batches finish within `grace`, then cancels what is
    /// left (transactions roll back, leases are released) and returns. Idempotent.
    ///
    /// Bounded: past the grace period, cancelled work has [`SHUTDOWN_RELEASE_WINDOW`] to give
    /// its leases back; then every task is abandoned, even one waiting on a database call that
    /// hangs (a lock, a dead server), and this returns [`Error::ShutdownTimedOut`]. What was
    /// abandoned rolls back; its leases expire on their own.
    pub async fn shutdown(&self, grace: Duration) -> Result<(), Error> {
        self.cancel.cancel();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            // Partitions this process let go may still hold work: another process's idle
            // handlers look at once instead of at their next full read. Bounded: a database
            // that hangs does not hold up the return.
            let _ = tokio::time::timeout(SHUTDOWN_MARK_WITHIN, self.outbox.mark_changed()).await;
            return Ok(());
        }
        self.hard.cancel();
        if tokio::time::timeout(SHUTDOWN_RELEASE_WINDOW, self.tracker.wait())
            .await
            .is_err()
        {
            self.abandon.cancel();
            // Abandoned tasks end at their next poll; none waits for anything.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.tracker.wait()).await;
        }
        Err(Error::ShutdownTimedOut(grace))
    }

    /// Waits until every message committed before this call is handled by every handler this
    /// process runs (handled, or dead-lettered after its attempts), or gives up after `timeout`
    /// with [`Error::NotIdle`] naming what is still behind.
    ///
    /// Messages committed after the call do not keep it waiting, so it returns under steady
    /// traffic too. Scheduled messages due when it is called are waited for; those due later
    /// are not. A partition blocked by a poisoned head (`poison = "block"`) waits for an operator, so it
    /// ends in `NotIdle`. Handlers of the same queues in other processes help: what matters is
    /// the handler's cursor in the database, whoever moves it.
    ///
    /// Use it in a command-line job that enqueues and must not exit before its work is done, in
    /// a deployment step, or in tests (the testing kit's
    /// [`run_until_idle`](crate::testing::TestKit::run_until_idle) stops the runtime as well).
    pub async fn wait_idle(&self, timeout: Duration) -> Result<(), Error> {
        let started = tokio::time::Instant::now();
        let store = &self.outbox.shared.store;
        let poll = Duration::from_millis(10);
        let behind = |waiting: Vec<String>| Error::NotIdle {
            waited: started.elapsed(),
            waiting,
        };
        // Scheduled messages due when this was called move into `incoming` first.
        while let Some(due_in) = store.next_due_in().await? {
            let called_ms_ago = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
            if due_in > -called_ms_ago {
                break;
            }
            if started.elapsed() >= timeout {
                return Err(behind(vec!["scheduled messages due".to_owned()]));
            }
            tokio::time::sleep(poll).await;
        }
        // Every message committed so far has an id at most this; once none of them is left in
        // `incoming`, each partition's tail covers them all.
        let upto = store.max_incoming_id().await?;
        if let Some(upto) = upto {
            while store.incoming_left(upto).await? {
                if started.elapsed() >= timeout {
                    return Err(behind(vec!["unsequenced messages".to_owned()]));
                }
                tokio::time::sleep(poll).await;
            }
        }
        let tails: HashMap<(String, u32), i64> = store
            .idle_positions()
            .await?
            .into_iter()
            .map(|p| ((p.queue, p.partition), p.last_seq))
            .collect();
        loop {
            let waiting: Vec<String> = store
                .idle_positions()
                .await?
                .into_iter()
                .filter(|p| {
                    self.handlers
                        .contains(&(p.queue.clone(), p.handler.clone()))
                })
                .filter(|p| {
                    let tail = tails.get(&(p.queue.clone(), p.partition)).copied();
                    p.head_seq
                        .zip(tail)
                        .is_some_and(|(head, tail)| head <= tail)
                })
                .map(|p| {
                    let blocked = if p.blocked { " (blocked)" } else { "" };
                    format!("{}/{}/{}{blocked}", p.queue, p.handler, p.partition)
                })
                .collect();
            if waiting.is_empty() {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(behind(waiting));
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Runs until `signal` completes (for example `tokio::signal::ctrl_c()`), then shuts down
    /// with `grace`.
    pub async fn run_until<F: Future>(self, signal: F, grace: Duration) -> Result<(), Error> {
        signal.await;
        self.shutdown(grace).await
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.abandon.cancel();
        self.hard.cancel();
        self.cancel.cancel();
    }
}
