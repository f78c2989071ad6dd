//! Application state for handlers: the [`State`] extractor and the values given at start.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use crate::handler::{HandlerSpec, Mode};

/// Application state a handler takes as a parameter, like axum's `State`: an HTTP client, a
/// mailer, configuration, a pool.
///
/// Give each state type once at start, with `.state(value)` on [`start`](crate::start),
/// [`discover`](crate::discover) or [`Outbox::builder`](crate::Outbox::builder); a handler
/// takes it after the message and the context, as `State<T>` (destructuring works:
/// `State(mailer): State<Mailer>`). Each call receives a clone of the value given at start, so
/// `T` is cheap to clone: an `Arc`, or a handle that is one inside (an HTTP client, a pool).
/// `T` must be `Clone + Send + Sync + 'static`; types are told apart by their [`TypeId`], so
/// several state types can be given, one value each.
///
/// A handler that needs a state nobody gave is reported by start, with every other missing
/// state, in [`StartError::MissingState`](crate::StartError::MissingState): nothing runs.
///
/// ```
/// use std::sync::Arc;
/// use outbox::{HandlerError, LeaseContext, State};
/// # #[derive(serde::Serialize, serde::Deserialize)]
/// # #[outbox::queue(partitions = 1)]
/// # struct Email { to: String }
///
/// #[derive(Clone)]
/// struct Mailer {
///     from: Arc<str>,
/// }
///
/// #[outbox::handler(leased)]
/// async fn send(msg: Email, ctx: &LeaseContext, State(mailer): State<Mailer>) -> Result<(), HandlerError> {
///     // mailer.send(&mailer.from, &msg.to, ctx.idempotency_key()).await?;
///     # let _ = (msg, ctx, mailer);
///     Ok(())
/// }
///
/// # async fn demo(db: outbox::sea_orm::DatabaseConnection) -> Result<(), outbox::StartError> {
/// let running = outbox::start(db, outbox::Profile::Default)
///     .state(Mailer { from: "shop@example.com".into() })
///     .await?;
/// # drop(running);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct State<T>(pub T);

impl<T> Deref for State<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for State<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// The state values given at start, one per type.
#[derive(Clone, Default)]
pub struct States {
    map: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for States {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("States")
            .field("len", &self.map.len())
            .finish_non_exhaustive()
    }
}

impl States {
    /// Adds `value`, replacing an earlier value of the same type.
    pub(crate) fn insert<T: Clone + Send + Sync + 'static>(&mut self, value: T) {
        self.map.insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// A clone of the value of type `T`, if one was given.
    pub fn get<T: Clone + 'static>(&self) -> Option<T> {
        self.map
            .get(&TypeId::of::<T>())
            .and_then(|v| v.downcast_ref::<T>())
            .cloned()
    }

    fn contains(&self, id: TypeId) -> bool {
        self.map.contains_key(&id)
    }
}

/// A state type a handler needs: its [`TypeId`] and its name for messages.
#[derive(Debug, Clone, Copy)]
pub struct StateKey {
    id: TypeId,
    name: &'static str,
}

impl StateKey {
    /// The key of state type `T`.
    pub fn of<T: 'static>() -> Self {
        Self {
            id: TypeId::of::<T>(),
            name: std::any::type_name::<T>(),
        }
    }
}

/// A handler parameter filled from the state given at start: implemented by [`State<T>`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a handler parameter",
    label = "not `outbox::State<T>` with `T: Clone + Send + Sync + 'static`",
    note = "a handler takes the message, its context (`&DatabaseTransaction` or `&LeaseContext`), then application state as `outbox::State<T>` where `T: Clone + Send + Sync + 'static` (wrap it in an `Arc` if it is not `Clone`), given at start with `.state(value)`"
)]
pub trait FromStates: Sized {
    /// The state type looked up.
    fn key() -> StateKey;
    /// The value, if one was given at start.
    fn from_states(states: &States) -> Option<Self>;
}

impl<T: Clone + Send + Sync + 'static> FromStates for State<T> {
    fn key() -> StateKey {
        StateKey::of::<T>()
    }

    fn from_states(states: &States) -> Option<Self> {
        states.get::<T>().map(State)
    }
}

/// A handler that needs state types: `needs`, and how to build its calls from the values.
#[derive(Clone)]
pub(crate) struct Binding {
    needs: Vec<StateKey>,
    bind: Arc<dyn Fn(Arc<States>) -> Mode + Send + Sync>,
}

/// A handler of queue `queue`, named `handler`, whose state type `type_name` was not given at
/// start (see [`StartError::MissingState`](crate::StartError::MissingState)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MissingState {
    /// Queue name.
    pub queue: String,
    /// Handler name.
    pub handler: String,
    /// The Rust type of the state it takes as `State<T>`.
    pub type_name: &'static str,
}

impl fmt::Display for MissingState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "handler `{}` of queue `{}` takes `State<{}>`, which was not given",
            self.handler, self.queue, self.type_name
        )
    }
}

/// A handler spec whose calls need `needs`: `bind` builds it from the values given at start.
/// Until then (and for [`HandlerSpec`]s used without start) it is built from no values, so a
/// call fails with a retryable error naming the missing state instead of running.
pub fn with_state<F>(needs: Vec<StateKey>, bind: F) -> HandlerSpec
where
    F: Fn(Arc<States>) -> HandlerSpec + Send + Sync + 'static,
{
    let mut spec = bind(Arc::new(States::default()));
    let mut needs = needs;
    let mut seen = std::collections::HashSet::new();
    needs.retain(|k| seen.insert(k.id));
    spec.state = Some(Binding {
        needs,
        bind: Arc::new(move |states| bind(states).mode),
    });
    spec
}

impl HandlerSpec {
    /// Builds this handler's calls from `states`; returns the state types it needs that are
    /// missing there (and then changes nothing).
    pub(crate) fn bind_state(&mut self, states: &Arc<States>) -> Vec<MissingState> {
        let Some(binding) = &self.state else {
            return Vec::new();
        };
        let missing: Vec<_> = binding
            .needs
            .iter()
            .filter(|k| !states.contains(k.id))
            .map(|k| MissingState {
                queue: self.queue.to_string(),
                handler: self.name.to_string(),
                type_name: k.name,
            })
            .collect();
        if missing.is_empty() {
            self.mode = (binding.bind)(states.clone());
            // Bound for good: a later bind (another builder) has nothing left to check.
            self.state = None;
        }
        missing
    }
}

/// What a handler's call returns when its state is missing: only reachable when a handler spec
/// runs without going through start (which refuses to start then).
#[derive(Debug)]
struct StateNotGiven(&'static str);

impl fmt::Display for StateNotGiven {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "handler state `{}` was not given at start; pass it with `.state(value)`",
            self.0
        )
    }
}

impl std::error::Error for StateNotGiven {}

/// The error of a call whose state `T` is missing.
pub fn missing<T: FromStates>() -> crate::HandlerError {
    crate::HandlerError::retry(StateNotGiven(T::key().name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Config(u32);

    #[test]
    fn states_are_keyed_by_type() {
        let mut s = States::default();
        s.insert(Config(1));
        s.insert(String::from("x"));
        s.insert(Config(2));
        assert_eq!(s.get::<Config>(), Some(Config(2)));
        assert_eq!(s.get::<String>().as_deref(), Some("x"));
        assert_eq!(s.get::<u8>(), None);
        assert_eq!(
            <State<Config> as FromStates>::from_states(&s),
            Some(State(Config(2)))
        );
    }
}
