//! The typed layer: the [`Queue`] trait behind `#[outbox::queue]`, typed enqueue, the key hash,
//! the registry that `#[outbox::queue]` and `#[outbox::handler]` fill, and the one-call
//! [`start`] / [`connect`] with [`discover`] for finer control.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{EnqueueError, HandlerError, StartError};
use crate::handler::{Context, HandlerFuture, HandlerSpec, LeaseContext};
use crate::headers::Headers;
use crate::profile::{Overrides, Profile};
use crate::queue::{Enqueued, Message, NewMessage, PoisonPolicy, QueueSpec};
use crate::runtime::{Builder, Outbox, Running};

/// A message type with its own durable queue, usually declared with `#[outbox::queue]`.
///
/// The payload is stored as JSON (`serde_json`), so its serde representation is part of the
/// storage format: messages enqueued by an older build must still deserialize in a newer one
/// (add fields with `#[serde(default)]`, never rename them silently). A payload that no longer
/// decodes is dead-lettered with the decode error, never a panic.
///
/// # Partitions and order
///
/// [`partition`](Queue::partition) routes a message. With a `#[outbox(key)]` field it is
/// [`partition_for_key`] of that field: every message with the same key lands in the same
/// partition and is handled in commit order (the order their transactions committed). Without a key, messages are spread over the
/// partitions round-robin and **no order between them is implied**.
///
/// Implementing this trait by hand is supported; keep `NAME` stable (it is part of the storage
/// schema) and `partition` below `PARTITIONS`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an outbox queue",
    label = "not declared with `#[outbox::queue]`",
    note = "declare it: `#[outbox::queue(partitions = 8)]` on the type, together with `#[derive(Serialize, Deserialize)]`"
)]
pub trait Queue: Payload + Send + Sync + 'static {
    /// The durable queue name (see [`validate_name`](crate::validate_name)).
    const NAME: &'static str;
    /// The partition count, 1 to [`MAX_PARTITIONS`](crate::MAX_PARTITIONS).
    const PARTITIONS: u32;

    /// Whether messages of this queue may be scheduled (`true` unless declared
    /// `#[outbox::queue(strict_order)]`). On a strict-order queue every message is delivered in
    /// commit order within its partition: [`enqueue_at`](Queue::enqueue_at) and
    /// [`enqueue_after`](Queue::enqueue_after) fail with
    /// [`EnqueueError::SchedulingForbidden`] and write nothing.
    const SCHEDULING: bool = true;

    /// A delay every message of this queue waits before delivery (`#[outbox::queue(delay_ms =
    /// N)]`); `None` delivers at commit. An explicit [`enqueue_at`](Queue::enqueue_at) or
    /// [`enqueue_after`](Queue::enqueue_after) replaces it.
    const DELAY: Option<Duration> = None;

    /// The partition of this message, below [`PARTITIONS`](Queue::PARTITIONS).
    fn partition(&self) -> u32;

    /// The deduplication key of this message ([`NewMessage::dedup_key`]): with a
    /// `#[outbox(dedup)]` field, that field's `Display` text; `None` otherwise.
    fn dedup_key(&self) -> Option<String> {
        None
    }

    /// The headers this message carries by itself ([`NewMessage::headers`]): with
    /// `#[outbox(header)]` fields, each field's `Display` text under its header name; none
    /// otherwise. Headers given at enqueue ([`enqueue_with_headers`](Queue::enqueue_with_headers))
    /// come on top and win over a header of the same name.
    fn headers(&self) -> Headers {
        Headers::new()
    }

    /// This message as untyped bytes: JSON payload, routed by [`partition`](Queue::partition),
    /// with its [`dedup_key`](Queue::dedup_key), its [`headers`](Queue::headers) and the
    /// queue's [`DELAY`](Queue::DELAY). Add a delivery time with [`NewMessage::deliver_at`] or
    /// [`NewMessage::deliver_after`].
    fn to_message(&self) -> Result<NewMessage, EnqueueError> {
        let payload = self.to_json().map_err(|source| EnqueueError::Serialize {
            queue: Self::NAME.to_owned(),
            source,
        })?;
        let mut message = NewMessage::new(Self::NAME, self.partition(), payload);
        if let Some(key) = self.dedup_key() {
            message = message.dedup_key(key);
        }
        let headers = self.headers();
        if !headers.is_empty() {
            message = message.headers(headers);
        }
        if let Some(delay) = Self::DELAY {
            message = message.deliver_after(delay);
        }
        Ok(message)
    }

    /// Enqueues this message through `conn` (a transaction: the message exists if and only if
    /// it commits) on the outbox of this process, installed by [`start`], [`connect`] or
    /// [`set_global`]. Without one it fails with [`EnqueueError::NotConnected`].
    fn enqueue<C: ConnectionTrait>(
        &self,
        conn: &C,
    ) -> impl Future<Output = Result<Enqueued, EnqueueError>> + Send {
        let message = self.to_message();
        async move {
            let outbox = global().ok_or(EnqueueError::NotConnected)?;
            outbox.enqueue(conn, message?).await
        }
    }

    /// Like [`enqueue`](Queue::enqueue), delivered at `at` by the database's clock (see
    /// [`NewMessage::deliver_at`]).
    fn enqueue_at<C: ConnectionTrait>(
        &self,
        conn: &C,
        at: SystemTime,
    ) -> impl Future<Output = Result<Enqueued, EnqueueError>> + Send {
        let message = scheduled_message(self);
        async move {
            let outbox = global().ok_or(EnqueueError::NotConnected)?;
            outbox.enqueue(conn, message?.deliver_at(at)).await
        }
    }

    /// Like [`enqueue`](Queue::enqueue), delivered `delay` after the enqueue by the database's
    /// clock (see [`NewMessage::deliver_after`]).
    fn enqueue_after<C: ConnectionTrait>(
        &self,
        conn: &C,
        delay: Duration,
    ) -> impl Future<Output = Result<Enqueued, EnqueueError>> + Send {
        let message = scheduled_message(self);
        async move {
            let outbox = global().ok_or(EnqueueError::NotConnected)?;
            outbox.enqueue(conn, message?.deliver_after(delay)).await
        }
    }

    /// Enqueues `items` in order through `conn`, on the outbox of this process. Every item is
    /// serialized and validated first: if one fails nothing is written.
    fn enqueue_batch<C: ConnectionTrait>(
        items: &[Self],
        conn: &C,
    ) -> impl Future<Output = Result<Vec<Enqueued>, EnqueueError>> + Send {
        let messages: Result<Vec<_>, _> = items.iter().map(Self::to_message).collect();
        async move {
            let outbox = global().ok_or(EnqueueError::NotConnected)?;
            outbox.enqueue_batch(conn, &messages?).await
        }
    }

    /// Like [`enqueue`](Queue::enqueue), with `headers` stored beside the payload (handlers
    /// read them with [`Message::headers`]; relays forward them). Headers that break a limit
    /// fail with [`EnqueueError::InvalidHeaders`] and write nothing.
    fn enqueue_with_headers<C: ConnectionTrait>(
        &self,
        conn: &C,
        headers: Headers,
    ) -> impl Future<Output = Result<Enqueued, EnqueueError>> + Send {
        let message = self.to_message();
        async move {
            let outbox = global().ok_or(EnqueueError::NotConnected)?;
            outbox.enqueue(conn, message?.headers(headers)).await
        }
    }

    /// Enqueues this message through `conn` on an explicit `outbox` (for example one with
    /// another table prefix than the process-wide one).
    fn enqueue_with<C: ConnectionTrait>(
        &self,
        outbox: &Outbox,
        conn: &C,
    ) -> impl Future<Output = Result<Enqueued, EnqueueError>> + Send {
        let message = self.to_message();
        async move { outbox.enqueue(conn, message?).await }
    }
}

// ---- the current outbox: a task's scope, else the process-wide one -----------------------

static GLOBAL: RwLock<Option<Outbox>> = RwLock::new(None);

tokio::task_local! {
    /// The outbox of the scope this task runs in ([`Outbox::scope`]); a runtime scopes every
    /// handler call with its own.
    static CURRENT: Outbox;
}

/// Makes `outbox` the one that typed enqueue ([`Queue::enqueue`]) uses in this process outside
/// any [scope](Outbox::scope), replacing any previous one. [`start`], [`connect`] and
/// [`Builder::declared`] call it for you.
pub fn set_global(outbox: Outbox) {
    match GLOBAL.write() {
        Ok(mut g) => *g = Some(outbox),
        Err(poisoned) => *poisoned.into_inner() = Some(outbox),
    }
}

/// The outbox that typed enqueue uses here: the one of the enclosing [scope](Outbox::scope)
/// (inside a handler, the runtime that runs it), else the process-wide one installed by
/// [`start`], [`connect`] or [`set_global`], if any.
pub fn global() -> Option<Outbox> {
    if let Ok(outbox) = CURRENT.try_with(Outbox::clone) {
        return Some(outbox);
    }
    match GLOBAL.read() {
        Ok(g) => g.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

impl Outbox {
    /// Runs `fut` with this outbox as the current one: typed enqueue ([`Queue::enqueue`]) and
    /// [`global`] inside it, on this task, use it instead of the process-wide outbox. The way
    /// `tracing` scopes a dispatcher, for a process with several outboxes or tests that run in
    /// parallel. A runtime runs every handler call in a scope of its own outbox, so a handler's
    /// typed enqueue goes to the outbox that runs it, on any runtime flavor.
    pub async fn scope<F: Future>(&self, fut: F) -> F::Output {
        CURRENT.scope(self.clone(), fut).await
    }
}

// ---- routing -----------------------------------------------------------------------------

/// The partition of a message with routing key `key`: the 64-bit XXH3 hash (seed 0) of the
/// key's `serde_json` bytes, modulo `partitions`.
///
/// This function is stable: it never changes in a release that does not also change the
/// storage format, and any other language can compute it (`7` hashes the bytes `7`,
/// `"abc"` hashes the five bytes `"abc"` with their quotes). Changing a queue's partition
/// count moves keys to other partitions, which is why the runtime refuses to start when the
/// declared count differs from the database.
///
/// Returns 0 when `partitions` is 0, and hashes whatever was written before the error if the
/// key cannot be serialized (keys are normally integers, strings or ids, which always
/// serialize).
///
/// ```
/// assert_eq!(outbox::partition_for_key(&7_i64, 8), outbox::partition_for_key(&7_u8, 8));
/// assert!(outbox::partition_for_key("customer-42", 16) < 16);
/// ```
pub fn partition_for_key<K: Serialize + ?Sized>(key: &K, partitions: u32) -> u32 {
    if partitions == 0 {
        return 0;
    }
    let mut hasher = HashWriter(xxhash_rust::xxh3::Xxh3::new());
    // A failing key still routes deterministically: the bytes written so far are hashed.
    let _ = serde_json::to_writer(&mut hasher, key);
    (hasher.0.digest() % u64::from(partitions)) as u32
}

struct HashWriter(xxhash_rust::xxh3::Xxh3);

impl std::io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

static SPREAD: AtomicU32 = AtomicU32::new(0);

/// The partition of a message without a key: round-robin over `partitions` within this
/// process. No order between such messages is implied.
pub fn spread(partitions: u32) -> u32 {
    if partitions <= 1 {
        return 0;
    }
    SPREAD.fetch_add(1, Ordering::Relaxed) % partitions
}

// ---- registry ----------------------------------------------------------------------------

/// How a handler runs: see [`HandlerSpec::transactional`] and [`HandlerSpec::leased`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandlerMode {
    /// Inside the transaction that acks its messages.
    Transactional,
    /// Outside any transaction, under a time lease.
    Leased,
}

/// [`Queue::to_message`] for an explicit delivery time, refused on a queue that forbids
/// scheduling.
fn scheduled_message<Q: Queue>(message: &Q) -> Result<NewMessage, EnqueueError> {
    if !Q::SCHEDULING {
        return Err(EnqueueError::SchedulingForbidden {
            queue: Q::NAME.to_owned(),
        });
    }
    message.to_message()
}

/// The text of a `#[outbox(dedup)]` field: any type with a `Display` text (strings, integers,
/// UUIDs).
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a deduplication key: it has no text form",
    label = "`#[outbox(dedup)]` on a field of type `{Self}`",
    note = "a deduplication key is text: use a `String`, an integer, or a type that implements `Display`"
)]
pub trait DedupKey {
    /// The key's text.
    fn dedup_text(&self) -> String;
}

impl<T: fmt::Display + ?Sized> DedupKey for T {
    fn dedup_text(&self) -> String {
        self.to_string()
    }
}

/// The stored form of a queue's messages: JSON through serde. Implemented for every type
/// that is `Serialize` and `DeserializeOwned`; a type without them gets one error that names
/// the fix (rather than one per missing serde trait).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a queue message: it must be `Serialize` and `Deserialize`",
    label = "needs `#[derive(serde::Serialize, serde::Deserialize)]`",
    note = "add `#[derive(serde::Serialize, serde::Deserialize)]` to `{Self}` (messages are stored as JSON)"
)]
pub trait Payload: Sized {
    /// This message as the JSON bytes that are stored.
    fn to_json(&self) -> serde_json::Result<Vec<u8>>;
    /// A message back from its stored JSON bytes.
    fn from_json(bytes: &[u8]) -> serde_json::Result<Self>;
}

impl<T: Serialize + DeserializeOwned> Payload for T {
    fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(self)
    }

    fn from_json(bytes: &[u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(bytes)
    }
}

/// The text of an `#[outbox(header)]` field (for generated code): its `Display` text.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a header value: it has no text form",
    label = "`#[outbox(header)]` on a field of type `{Self}`",
    note = "a header value is text: use a `String`, an integer, or a type that implements `Display`"
)]
pub trait HeaderValue {
    /// The value's text.
    fn header_text(&self) -> String;
}

impl<T: fmt::Display + ?Sized> HeaderValue for T {
    fn header_text(&self) -> String {
        self.to_string()
    }
}

/// A queue declared with `#[outbox::queue]`, as collected in this binary's registry.
#[derive(Debug, Clone, Copy)]
pub struct QueueDecl {
    name: &'static str,
    partitions: u32,
    policy: PoisonPolicy,
    overrides: Overrides,
    type_name: &'static str,
}

impl QueueDecl {
    /// A declaration of queue `name` with `partitions` partitions, for the Rust type named
    /// `type_name` (used in messages).
    pub const fn new(name: &'static str, partitions: u32, type_name: &'static str) -> Self {
        Self {
            name,
            partitions,
            policy: PoisonPolicy::DeadLetter,
            overrides: Overrides::NONE,
            type_name,
        }
    }

    /// Sets the poison policy.
    pub const fn policy(mut self, policy: PoisonPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the queue's knobs.
    pub const fn overrides(mut self, overrides: Overrides) -> Self {
        self.overrides = overrides;
        self
    }

    /// The queue name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// The partition count.
    pub const fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The poison policy.
    pub const fn poison_policy(&self) -> PoisonPolicy {
        self.policy
    }

    /// The queue's knobs.
    pub const fn get_overrides(&self) -> Overrides {
        self.overrides
    }

    /// The Rust type declared as this queue.
    pub const fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// The untyped declaration the [`Builder`] takes.
    pub fn spec(&self) -> QueueSpec {
        QueueSpec::new(self.name, self.partitions)
            .poison_policy(self.policy)
            .overrides(self.overrides)
    }
}

/// A handler declared with `#[outbox::handler]`, as collected in this binary's registry.
#[derive(Clone, Copy)]
pub struct HandlerDecl {
    queue: &'static str,
    name: &'static str,
    mode: HandlerMode,
    overrides: Overrides,
    build: fn() -> HandlerSpec,
}

impl fmt::Debug for HandlerDecl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerDecl")
            .field("queue", &self.queue)
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("overrides", &self.overrides)
            .finish_non_exhaustive()
    }
}

impl HandlerDecl {
    /// A declaration of handler `name` of `queue`; `build` makes its [`HandlerSpec`].
    pub const fn new(
        queue: &'static str,
        name: &'static str,
        mode: HandlerMode,
        build: fn() -> HandlerSpec,
    ) -> Self {
        Self {
            queue,
            name,
            mode,
            overrides: Overrides::NONE,
            build,
        }
    }

    /// Sets the handler's knobs.
    pub const fn overrides(mut self, overrides: Overrides) -> Self {
        self.overrides = overrides;
        self
    }

    /// The queue consumed.
    pub const fn queue(&self) -> &'static str {
        self.queue
    }

    /// The handler name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// The mode.
    pub const fn mode(&self) -> HandlerMode {
        self.mode
    }

    /// The handler's knobs.
    pub const fn get_overrides(&self) -> Overrides {
        self.overrides
    }

    /// The untyped handler the [`Builder`] takes, with this declaration's knobs.
    pub fn spec(&self) -> HandlerSpec {
        (self.build)().overrides(self.overrides)
    }
}

inventory::collect!(QueueDecl);
inventory::collect!(HandlerDecl);

/// Every queue declared with `#[outbox::queue]` in this binary, sorted by name (duplicates
/// kept: [`Builder::start`] reports them).
pub fn queues() -> Vec<&'static QueueDecl> {
    let mut v: Vec<_> = inventory::iter::<QueueDecl>.into_iter().collect();
    v.sort_by_key(|d| d.name);
    v
}

/// Every handler declared with `#[outbox::handler]` in this binary, sorted by queue and name
/// (duplicates kept: [`Builder::start`] reports them).
pub fn handlers() -> Vec<&'static HandlerDecl> {
    let mut v: Vec<_> = inventory::iter::<HandlerDecl>.into_iter().collect();
    v.sort_by_key(|d| (d.queue, d.name));
    v
}

// ---- typed handler wrappers --------------------------------------------------------------

/// A payload that could not be decoded into its queue's type. Handlers never see it: the
/// message is rejected (dead-lettered) with this error.
#[derive(Debug)]
pub struct DecodeError {
    queue: String,
    type_name: &'static str,
    source: serde_json::Error,
}

impl DecodeError {
    /// The queue of the message.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The Rust type the payload should have decoded into.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "payload of queue `{}` could not be decoded as `{}`",
            self.queue, self.type_name
        )
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Decodes a delivered message's payload as `T`.
pub fn decode<T: Queue>(message: &Message) -> Result<T, DecodeError> {
    decode_payload(message)
}

fn decode_payload<T: Payload>(message: &Message) -> Result<T, DecodeError> {
    T::from_json(message.payload()).map_err(|source| DecodeError {
        queue: message.queue().to_owned(),
        type_name: std::any::type_name::<T>(),
        source,
    })
}

fn decode_all<T: Payload>(messages: &[Message]) -> Result<Vec<T>, DecodeError> {
    messages.iter().map(decode_payload::<T>).collect()
}

fn rejected<'a>(e: DecodeError) -> HandlerFuture<'a> {
    Box::pin(std::future::ready(Err(HandlerError::reject(e))))
}

/// A typed transactional handler `call` of queue `T`, named `name`: payloads that do not
/// decode are rejected (dead-lettered) without calling it.
pub fn transactional<T: Queue>(
    name: &'static str,
    call: impl for<'a> Fn(T, &'a DatabaseTransaction) -> HandlerFuture<'a> + Send + Sync + 'static,
) -> HandlerSpec {
    typed_one(T::NAME, name, call)
}

/// A typed leased handler `call` of queue `T`, named `name`: payloads that do not decode are
/// rejected (dead-lettered) without calling it.
pub fn leased<T: Queue>(
    name: &'static str,
    call: impl for<'a> Fn(T, &'a LeaseContext) -> HandlerFuture<'a> + Send + Sync + 'static,
) -> HandlerSpec {
    typed_one(T::NAME, name, call)
}

/// A typed transactional batch handler `call` of queue `T`, named `name`: it receives up to
/// `batch_size` messages of one partition, in order, and its writes commit with their ack. A
/// failure splits the batch until the failing message is alone (see
/// [`HandlerSpec::transactional_batch`]); a payload that does not decode is rejected that way.
pub fn transactional_batch<T: Queue>(
    name: &'static str,
    call: impl for<'a> Fn(Vec<T>, &'a DatabaseTransaction) -> HandlerFuture<'a> + Send + Sync + 'static,
) -> HandlerSpec {
    typed_many(T::NAME, name, call)
}

/// A typed leased batch handler `call` of queue `T`, named `name` (see
/// [`HandlerSpec::leased_batch`]).
pub fn leased_batch<T: Queue>(
    name: &'static str,
    call: impl for<'a> Fn(Vec<T>, &'a LeaseContext) -> HandlerFuture<'a> + Send + Sync + 'static,
) -> HandlerSpec {
    typed_many(T::NAME, name, call)
}

/// A typed handler of one message per call, on queue `queue`, in the mode its context `Cx`
/// decides: payloads that do not decode as `T` are rejected (dead-lettered) without calling
/// it. The handler macro calls it with the queue's name, so the generated code checks that its
/// payload is a [`Queue`] in one place (one error at the user's type, not one per use).
#[doc(hidden)]
pub fn typed_one<T: Payload, Cx: Context>(
    queue: &'static str,
    name: &'static str,
    call: impl for<'a> Fn(T, &'a Cx) -> HandlerFuture<'a> + Send + Sync + 'static,
) -> HandlerSpec {
    HandlerSpec::one(
        queue,
        name,
        move |m: &Message, cx: &Cx| match decode_payload(m) {
            Ok(v) => call(v, cx),
            Err(e) => rejected(e),
        },
    )
}

/// [`typed_one`] for a handler of a whole batch per call.
#[doc(hidden)]
pub fn typed_many<T: Payload, Cx: Context>(
    queue: &'static str,
    name: &'static str,
    call: impl for<'a> Fn(Vec<T>, &'a Cx) -> HandlerFuture<'a> + Send + Sync + 'static,
) -> HandlerSpec {
    HandlerSpec::many(
        queue,
        name,
        move |m: &[Message], cx: &Cx| match decode_all(m) {
            Ok(v) => call(v, cx),
            Err(e) => rejected(e),
        },
    )
}

// ---- discovery and one-call start --------------------------------------------------------

/// Starts the workers of every queue and handler declared in this binary with `profile`, and
/// makes the outbox the process-wide one for typed enqueue.
///
/// Every registry problem (duplicate queue or handler names, a handler whose queue is not
/// declared, invalid names or knobs, partition counts that differ from the database) is
/// reported at once in [`StartError::Registry`]. Give handlers their application state with
/// [`Start::state`] before awaiting; use [`discover`] to select handlers or set other options.
///
/// Calling it again while the first runtime runs is allowed and starts a second set of workers
/// for the same handlers, which share the work as two processes would: each partition is
/// handled by one of them at a time, in order, and nothing is delivered twice (tested by
/// `concurrent_bootstrap_creates_the_schema_once`, which starts several at once on one
/// database). The process-wide outbox for typed enqueue is then the newest one. In one process
/// that only adds contention; to split handlers between runtimes, select disjoint sets with
/// [`Builder::only_handlers`].
///
/// ```
/// # #[derive(Clone)] struct Mailer;
/// # async fn demo(db: outbox::sea_orm::DatabaseConnection) -> Result<(), outbox::StartError> {
/// let running = outbox::start(db, outbox::Profile::Default).state(Mailer).await?;
/// # drop(running);
/// # Ok(()) }
/// ```
pub fn start(db: DatabaseConnection, profile: Profile) -> Start {
    Start {
        builder: discover(db).profile(profile),
    }
}

/// The start of every declaration of this binary, made by [`start`]: await it, after giving the
/// handlers their state with [`state`](Start::state).
#[must_use = "nothing starts until it is awaited"]
#[derive(Debug)]
pub struct Start {
    builder: Builder,
}

impl Start {
    /// Gives handlers that take `State<T>` this value (see [`State`](crate::State)); one value
    /// per type, a later one replaces an earlier one.
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.builder = self.builder.state(value);
        self
    }
}

impl std::future::IntoFuture for Start {
    type Output = Result<Running, StartError>;
    type IntoFuture = std::pin::Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.builder.start())
    }
}

/// Creates the tables and registers every queue and handler declared in this binary, starts no
/// workers, and makes the outbox the process-wide one for typed enqueue: for processes that
/// only enqueue.
pub async fn connect(db: DatabaseConnection) -> Result<Outbox, StartError> {
    discover(db).connect().await
}

/// A [`Builder`] that adds every queue and handler declared in this binary with
/// `#[outbox::queue]` and `#[outbox::handler]` when it connects or starts (see
/// [`Builder::declared`]), and makes the outbox the process-wide one for typed enqueue.
///
/// ```
/// # async fn demo(db: outbox::sea_orm::DatabaseConnection) -> Result<(), outbox::StartError> {
/// let running = outbox::discover(db)
///     .profile(outbox::Profile::LowLatency)
///     .only_handlers(["send_receipt", "order_placed/project"])
///     .start()
///     .await?;
/// # drop(running);
/// # Ok(()) }
/// ```
pub fn discover(db: DatabaseConnection) -> Builder {
    Outbox::builder(db).declared()
}

/// Which declarations a [`Builder`] adds at start, and whether it installs the outbox as the
/// process-wide one.
#[derive(Debug, Clone)]
pub(crate) struct Discovery {
    only_handlers: Option<HashSet<String>>,
    excluded_handlers: HashSet<String>,
    excluded_queues: HashSet<String>,
    install: bool,
}

impl Default for Discovery {
    fn default() -> Self {
        Discovery {
            only_handlers: None,
            excluded_handlers: HashSet::new(),
            excluded_queues: HashSet::new(),
            install: true,
        }
    }
}

/// Declarations of this binary: the builder adds them when it connects or starts.
impl Builder {
    /// Adds every queue and handler declared in this binary with `#[outbox::queue]` and
    /// `#[outbox::handler]` when it connects or starts, beside those given by hand, and makes
    /// the outbox the process-wide one for typed enqueue (see
    /// [`install_global`](Builder::install_global)). [`discover`] is
    /// `Outbox::builder(db).declared()`.
    ///
    /// A handler filter ([`only_handlers`](Builder::only_handlers),
    /// [`exclude_handler`](Builder::exclude_handler)) names a handler as `name` (any queue)
    /// or `queue/name`. Excluding a queue also excludes its handlers; selecting handlers keeps
    /// every queue declared, so this process can still enqueue to all of them. A filter that
    /// names no declaration is logged as a `tracing` warning at start. Duplicate declarations
    /// are reported by `start` with everything else that is wrong.
    pub fn declared(mut self) -> Self {
        self.discovery.get_or_insert_with(Discovery::default);
        self
    }

    /// Runs only these declared handlers (`name` or `queue/name`); may be called several
    /// times. Implies [`declared`](Builder::declared).
    pub fn only_handlers<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.discovery
            .get_or_insert_with(Discovery::default)
            .only_handlers
            .get_or_insert_with(HashSet::new)
            .extend(names.into_iter().map(Into::into));
        self
    }

    /// Does not run this declared handler (`name` or `queue/name`). Implies
    /// [`declared`](Builder::declared).
    pub fn exclude_handler(mut self, name: impl Into<String>) -> Self {
        self.discovery
            .get_or_insert_with(Discovery::default)
            .excluded_handlers
            .insert(name.into());
        self
    }

    /// Leaves out the queue `name` declared with `#[outbox::queue]`, and every declared handler
    /// of it. Implies [`declared`](Builder::declared).
    pub fn exclude_queue(mut self, name: impl Into<String>) -> Self {
        self.discovery
            .get_or_insert_with(Discovery::default)
            .excluded_queues
            .insert(name.into());
        self
    }

    /// Whether [`start`](Builder::start) and [`connect`](Builder::connect) make the outbox the
    /// process-wide one for typed enqueue (default: true with [`declared`](Builder::declared),
    /// false without). Implies `declared`.
    pub fn install_global(mut self, install: bool) -> Self {
        self.discovery
            .get_or_insert_with(Discovery::default)
            .install = install;
        self
    }

    /// Adds the selected declarations (with [`declared`](Builder::declared)); returns whether
    /// the outbox is to be installed as the process-wide one.
    pub(crate) fn add_declarations(&mut self) -> bool {
        let Some(discovery) = self.discovery.take() else {
            return false;
        };
        let matches = |set: &HashSet<String>, d: &HandlerDecl| {
            set.contains(d.name) || set.contains(&format!("{}/{}", d.queue, d.name))
        };
        let (queues, handlers) = (queues(), handlers());
        discovery.warn_unmatched(&queues, &handlers);
        for q in queues {
            if !discovery.excluded_queues.contains(q.name) {
                self.queues.push(q.spec());
            }
        }
        for h in handlers {
            let selected = !discovery.excluded_queues.contains(h.queue)
                && !matches(&discovery.excluded_handlers, h)
                && discovery
                    .only_handlers
                    .as_ref()
                    .is_none_or(|only| matches(only, h));
            if selected {
                self.handlers.push(h.spec());
            }
        }
        discovery.install
    }
}

impl Discovery {
    /// A filter naming nothing is most likely a typo: say so instead of silently running
    /// other handlers than intended.
    fn warn_unmatched(&self, queues: &[&QueueDecl], handlers: &[&HandlerDecl]) {
        let handler_known = |name: &String| {
            handlers
                .iter()
                .any(|h| *name == h.name || *name == format!("{}/{}", h.queue, h.name))
        };
        let filters = self
            .only_handlers
            .iter()
            .flatten()
            .chain(&self.excluded_handlers);
        for name in filters.filter(|n| !handler_known(n)) {
            tracing::warn!(filter = %name, "handler filter matches no declared handler");
        }
        for name in self
            .excluded_queues
            .iter()
            .filter(|n| !queues.iter().any(|q| q.name == n.as_str()))
        {
            tracing::warn!(filter = %name, "excluded queue matches no declared queue");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xxh3_is_the_reference_algorithm() {
        // Reference vector of XXH3-64 with seed 0 for the empty input.
        assert_eq!(xxhash_rust::xxh3::xxh3_64(b""), 0x2D06_8005_38D3_94C2);
    }

    #[test]
    fn key_hash_is_pinned() {
        // Part of the storage format: a change here moves keys to other partitions.
        // XXH3-64, seed 0, of the key's serde_json bytes.
        fn check<K: Serialize + ?Sized>(key: &K, bytes: &[u8], hash: u64) {
            assert_eq!(xxhash_rust::xxh3::xxh3_64(bytes), hash);
            assert_eq!(serde_json::to_vec(key).ok().as_deref(), Some(bytes));
            for partitions in [1_u32, 2, 8, 1000, 4096] {
                assert_eq!(
                    partition_for_key(key, partitions),
                    (hash % u64::from(partitions)) as u32
                );
            }
        }
        check(&7_i64, b"7", 0x06ee_d105_b822_85fa);
        check("abc", b"\"abc\"", 0x236a_c269_8e6b_6688);
        check(&-1_i32, b"-1", 0xbc25_a7b6_12cb_a21f);
        check(&[1_u8, 2], b"[1,2]", 0x233b_603c_eeca_89be);
        assert_eq!(partition_for_key(&7_i64, 8), 2);
        assert_eq!(partition_for_key("abc", 16), 8);
        assert_eq!(partition_for_key(&7_i64, 0), 0);
    }

    #[test]
    fn spread_stays_in_range_and_visits_every_partition() {
        let mut seen = [false; 5];
        for _ in 0..50 {
            seen[spread(5) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(spread(1), 0);
        assert_eq!(spread(0), 0);
    }

    #[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
    struct Ping {
        n: u32,
    }

    impl Queue for Ping {
        const NAME: &'static str = "ping";
        const PARTITIONS: u32 = 4;
        fn partition(&self) -> u32 {
            partition_for_key(&self.n, Self::PARTITIONS)
        }
    }

    fn message(payload: &[u8]) -> Message {
        Message {
            queue: "ping".into(),
            partition: 0,
            seq: 1,
            payload: payload.to_vec(),
            enqueued_at_ms: 0,
            attempt: 1,
            headers: crate::Headers::new(),
        }
    }

    #[test]
    fn typed_messages_round_trip_and_bad_payloads_are_rejected() {
        let m = Ping { n: 7 }.to_message();
        let m = m.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            m,
            NewMessage::new("ping", partition_for_key(&7_u32, 4), b"{\"n\":7}".to_vec())
        );
        assert_eq!(
            decode::<Ping>(&message(b"{\"n\":7}")).ok(),
            Some(Ping { n: 7 })
        );
        let e = decode::<Ping>(&message(b"{\"n\":\"x\"}")).err();
        let e = e.map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("payload of queue `ping` could not be decoded as `outbox::typed::tests::Ping`")
        );
    }

    #[test]
    fn a_strict_order_queue_refuses_a_delivery_time() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Entry;
        impl Queue for Entry {
            const NAME: &'static str = "ledger";
            const PARTITIONS: u32 = 1;
            const SCHEDULING: bool = false;
            fn partition(&self) -> u32 {
                0
            }
        }
        let r = scheduled_message(&Entry);
        assert!(
            matches!(&r, Err(EnqueueError::SchedulingForbidden { queue }) if queue == "ledger"),
            "{r:?}"
        );
        assert!(Entry.to_message().is_ok(), "a plain enqueue is fine");
    }

    #[tokio::test]
    async fn typed_enqueue_without_an_outbox_is_not_connected() {
        // Only meaningful while no test of this binary installs a global outbox.
        if global().is_none() {
            let db = sea_orm::DatabaseConnection::default();
            let r = Ping { n: 1 }.enqueue(&db).await;
            assert!(matches!(r, Err(EnqueueError::NotConnected)), "{r:?}");
        }
    }
}
