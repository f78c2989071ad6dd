//! Processors: per handler, a dispatcher finds partitions with work and runs one batch task per
//! partition at a time; the batch runs in the handler's mode (transactional or leased).
//!
//! Every failed attempt takes one path: [`failure::decide`] gives the verdict, and one guarded
//! cursor write ([`Store::settle`](crate::storage::Store)) records it in the right transaction
//! (see [`Processor::record_failure`] and the two batch functions).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use sea_orm::DbErr;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::Shared;
use super::failure::{self, Failed};
use super::lease::Lease;
use super::worker::{Cause, Next};
use crate::error::HandlerError;
use crate::handler::{HandlerFuture, LeaseContext, Mode, Scope};
use crate::metrics;
use crate::profile::Tuning;
use crate::queue::{Message, PoisonPolicy};
use crate::storage::{
    CursorKey, CursorRow, Fence, Outcome, StoredMessage, Verdict, WriteTxn, attempts_from_db,
};
use crate::trace;
use crate::typed::HandlerMode;

/// One handler as the runtime runs it.
pub(crate) struct Processor {
    pub(crate) shared: Arc<Shared>,
    pub(crate) queue: Arc<str>,
    pub(crate) handler: Arc<str>,
    pub(crate) mode: Mode,
    pub(crate) tuning: Tuning,
    pub(crate) policy: PoisonPolicy,
    pub(crate) owner: Arc<str>,
    pub(crate) wake: Arc<Notify>,
    pub(crate) in_flight: Mutex<HashSet<u32>>,
    /// Ready partitions the last scan found and no batch task has taken yet.
    pub(crate) backlog: Mutex<Backlog>,
    /// When the last scan started.
    pub(crate) scanned: Mutex<Option<Instant>>,
    /// On a server: the count of marked changes read before the last scan that a poll made
    /// (see [`Processor::unchanged_since_scan`]; empty while no change was ever marked);
    /// `None` until a poll read it.
    pub(crate) changes_seen: Mutex<Option<String>>,
    pub(crate) slots: Arc<Semaphore>,
    /// The dispatcher left ready partitions behind for lack of a slot.
    pub(crate) starved: AtomicBool,
    /// SQLite: the longest a transactional batch may hold the single write lock.
    pub(crate) write_hold: Option<Duration>,
    pub(crate) tracker: TaskTracker,
    pub(crate) cancel: CancellationToken,
    pub(crate) hard: CancellationToken,
    /// Past the shutdown's release window: stop even inside a database call.
    pub(crate) abandon: CancellationToken,
}

/// What the dispatcher's last scan found: the partitions to start, in order, and when the
/// earliest held one (waiting for a retry or a lease) comes free.
///
/// The dispatcher works through this list before it scans again. A scan reads every cursor
/// row of the handler, so scanning after each finished partition made a drain over many
/// partitions quadratic (4,096 partitions: one full scan per partition drained).
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    ready: VecDeque<Ready>,
    due: Option<Instant>,
}

/// A partition the last scan found ready.
#[derive(Debug, Clone, Copy)]
struct Ready {
    partition: u32,
    /// Messages after the cursor when scanned.
    waiting: i64,
    /// The head has failed before: it is claimed alone, with its failure rules.
    retried: bool,
}

/// The most partitions one group claim takes (one transaction of a transactional handler).
const MAX_GROUP: usize = 64;

/// Where a watch on the database's files tells that nothing changed (SQLite), a poll skips the
/// scan but still scans at least this often.
const SCAN_AT_LEAST_EVERY: Duration = Duration::from_secs(10);

/// A locked cursor and the batch read under its lock.
struct Claim {
    txn: WriteTxn,
    cur: CursorRow,
    batch: Vec<StoredMessage>,
    limit: u32,
}

/// How one batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// More messages may be waiting: run another batch now.
    More,
    /// A batch was handled and nothing more is waiting.
    Done,
    /// Nothing was claimed: locked elsewhere, leased, waiting for a retry, blocked or empty.
    Idle,
}

/// What stops a handler call: a time limit (the handler's timeout, or SQLite's write-lock
/// budget when `budget`), or the lease's deadline, which `renew` may move.
enum Limit<'a> {
    Time { limit: Duration, budget: bool },
    Lease(&'a Lease),
}

/// Why a handler call did not succeed.
enum CallError {
    Handler(HandlerError),
    /// The call ran past its time limit (`budget`: the SQLite write-lock budget, not the
    /// handler's own timeout).
    Limit {
        budget: bool,
        what: String,
    },
    /// Hard shutdown cancelled the call.
    Interrupted,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Handler(e) => write!(f, "{}", e.reason()),
            CallError::Limit { what, .. } => f.write_str(what),
            CallError::Interrupted => f.write_str("interrupted by shutdown"),
        }
    }
}

impl CallError {
    fn failed(&self) -> Failed {
        match self {
            CallError::Handler(e) => Failed::from_handler(e),
            CallError::Limit { what, .. } => Failed::retry(what),
            CallError::Interrupted => Failed::retry("interrupted by shutdown"),
        }
    }
}

/// A failure of message k > 0 of a transactional batch: the batch rolled back, and the next
/// pass redoes the k-1 successes and records this failure in the same commit.
struct Carried {
    /// The cursor the failed batch started from.
    after_seq: i64,
    /// The last message of the prefix to redo.
    last_ok: i64,
    message: StoredMessage,
    failed: Failed,
}

/// What a group claim leaves to do.
#[derive(Debug, Default)]
struct GroupEnd {
    /// A batch was handled and committed.
    worked: bool,
    /// Partitions to claim one by one.
    alone: Vec<u32>,
    /// Partitions to claim again as a group.
    regroup: Vec<u32>,
}

/// What one partition's drain carries from a batch to the next.
#[derive(Default)]
struct Drain {
    /// Claim at most this many next time (a prefix to redo, or half of a batch to bisect).
    limit_once: Option<u32>,
    carried: Option<Carried>,
}

impl Processor {
    fn key(&self, partition: u32) -> CursorKey<'_> {
        CursorKey {
            queue: &self.queue,
            handler: &self.handler,
            partition,
        }
    }

    /// One dispatcher pass: start a batch task for each ready partition that is free, from the
    /// backlog of the last scan, scanning again only once that backlog is used up.
    pub(crate) async fn dispatch(self: &Arc<Self>, cause: Cause) -> Result<Next, DbErr> {
        if self.backlog_is_empty()
            && !(cause == Cause::Timer && self.unchanged_since_scan().await?)
        {
            let started = Instant::now();
            let fresh = self.scan().await?;
            metrics::scanned(&self.queue, &self.handler);
            if let Ok(mut b) = self.backlog.lock() {
                *b = fresh;
            }
            if let Ok(mut s) = self.scanned.lock() {
                *s = Some(started);
            }
        }
        let mut left_behind = false;
        while !self.cancel.is_cancelled() {
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                // Every slot is busy; the next task to finish wakes us.
                self.starved.store(true, Ordering::SeqCst);
                left_behind = !self.backlog_is_empty();
                break;
            };
            let Some(first) = self
                .backlog
                .lock()
                .ok()
                .and_then(|mut b| b.ready.pop_front())
            else {
                break;
            };
            {
                let Ok(mut set) = self.in_flight.lock() else {
                    break;
                };
                if !set.insert(first.partition) {
                    // Its task is still running; it wakes us if it did any work, and the next
                    // scan finds whatever is left.
                    continue;
                }
            }
            let group = self.gather(first);
            let this = self.clone();
            self.tracker.spawn(async move {
                let work = async {
                    match group.as_slice() {
                        [partition] => this.drain_partition(*partition).await,
                        _ => this.drain_group(&group).await,
                    }
                };
                let worked = tokio::select! {
                    // Past the release window nothing waits for a database call that hangs.
                    () = this.abandon.cancelled() => false,
                    worked = work => worked,
                };
                if let Ok(mut set) = this.in_flight.lock() {
                    for partition in &group {
                        set.remove(partition);
                    }
                }
                drop(permit);
                // Look again if messages may have arrived meanwhile or others wait for a slot.
                // A partition found locked elsewhere does not wake the dispatcher, so two
                // runtimes do not spin on each other's locks.
                if worked || this.starved.swap(false, Ordering::SeqCst) {
                    this.wake.notify_one();
                }
            });
        }
        if left_behind {
            if self.slots.available_permits() > 0 {
                // A task finished between the failed acquire and the flag: look again now.
                return Ok(Next::More);
            }
            return Ok(Next::Idle);
        }
        let due = self.backlog.lock().ok().and_then(|b| b.due);
        Ok(match due {
            Some(at) => Next::After(
                at.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ),
            None => Next::Idle,
        })
    }

    /// The partitions one batch task takes, starting with `first` (already in flight): for a
    /// transactional handler, the ready partitions that follow it in the backlog while their
    /// messages fit in one batch, so that a drain over many shallow partitions costs one
    /// transaction per group instead of one per partition. The backlog is shared out over the
    /// free slots, so that a handler's concurrency still applies. A partition whose head failed
    /// before, or with a full batch waiting, runs alone.
    fn gather(&self, first: Ready) -> Vec<u32> {
        let mut group = vec![first.partition];
        let batch = i64::from(self.tuning.batch_size);
        let groupable = |r: &Ready| !r.retried && r.waiting < batch;
        if self.mode.kind != HandlerMode::Transactional || !groupable(&first) {
            return group;
        }
        let (Ok(mut backlog), Ok(mut set)) = (self.backlog.lock(), self.in_flight.lock()) else {
            return group;
        };
        let share = (backlog.ready.len() + 1)
            .div_ceil(self.slots.available_permits() + 1)
            .min(MAX_GROUP);
        let mut messages = first.waiting;
        while group.len() < share {
            let Some(&next) = backlog.ready.front() else {
                break;
            };
            if !groupable(&next) || messages + next.waiting > batch {
                break;
            }
            backlog.ready.pop_front();
            if set.insert(next.partition) {
                group.push(next.partition);
                messages += next.waiting;
            }
        }
        group
    }

    /// A poll finds nothing a new scan would: that scan is recent, no partition it saw held
    /// has come due, and nothing changed since. A scan reads every cursor row of the handler:
    /// at 4,096 partitions, idle polls cost an idle SQLite runtime 6-15% of a core, and a
    /// database server 8-16% at 10 handlers.
    ///
    /// Nothing changed: on SQLite, a watch on the database's files saw no write; on a server,
    /// the count of changes the sequencers and operators mark ([`Store::changes`]) is the one
    /// read before the last scan a poll made. (A poll that goes on to scan keeps the count it
    /// read: a change marked after that read shows as a new count at a later poll.)
    ///
    /// [`Store::changes`]: crate::storage::Store::changes
    async fn unchanged_since_scan(&self) -> Result<bool, DbErr> {
        let last = self.scanned.lock().ok().and_then(|s| *s);
        let due = self.backlog.lock().ok().and_then(|b| b.due);
        if due.is_some_and(|d| d <= Instant::now()) {
            return Ok(false);
        }
        if self.shared.wake.unchanged_since(last, SCAN_AT_LEAST_EVERY) {
            return Ok(true);
        }
        if !self.shared.store.marks_changes() {
            return Ok(false);
        }
        let now = self.shared.store.changes().await?.unwrap_or_default();
        let Ok(mut seen) = self.changes_seen.lock() else {
            return Ok(false);
        };
        let same = seen.as_ref() == Some(&now);
        *seen = Some(now);
        Ok(same && last.is_some_and(|l| l.elapsed() < SCAN_AT_LEAST_EVERY))
    }

    fn backlog_is_empty(&self) -> bool {
        self.backlog.lock().map_or(true, |b| b.ready.is_empty())
    }

    /// Reads the handler's cursors: the partitions with work that are free now, and when the
    /// first held one comes free.
    async fn scan(&self) -> Result<Backlog, DbErr> {
        let ready = self
            .shared
            .store
            .ready_partitions(&self.queue, &self.handler)
            .await?;
        let scanned_at = Instant::now();
        let mut backlog = Backlog::default();
        let mut due: Option<i64> = None;
        for rp in ready {
            let now = rp.now;
            let mut held_until = (rp.retry_at > now).then_some(rp.retry_at);
            if let Some(exp) = rp.lease_expires_at.filter(|&e| e > now) {
                held_until = Some(held_until.map_or(exp, |b: i64| b.max(exp)));
            }
            match held_until {
                Some(t) => {
                    let wait = t - now;
                    due = Some(due.map_or(wait, |d| d.min(wait)));
                }
                None => backlog.ready.push_back(Ready {
                    partition: rp.partition,
                    waiting: rp.waiting,
                    retried: rp.attempts > 0,
                }),
            }
        }
        backlog.due =
            due.map(|ms| scanned_at + Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
        Ok(backlog)
    }

    /// Runs batches of one partition until it is drained, held or taken elsewhere; returns
    /// whether it did anything.
    async fn drain_partition(&self, partition: u32) -> bool {
        let mut worked = false;
        let mut drain = Drain::default();
        let mut error_delay = Duration::from_millis(100);
        while !self.cancel.is_cancelled() {
            let res = match self.mode.kind {
                HandlerMode::Transactional => self.transactional_batch(partition, &mut drain).await,
                HandlerMode::Leased => self.leased_batch(partition, &mut drain).await,
            };
            match res {
                Ok(Step::More) => worked = true,
                Ok(Step::Done) => return true,
                Ok(Step::Idle) => return worked,
                Err(e) => {
                    // The database failed outside any handler (claiming, recording): not the
                    // message's fault, so nothing is counted; try again on a timer.
                    worked = true;
                    tracing::warn!(queue = %self.queue, handler = %self.handler, partition, error = %e,
                        retry_in = ?error_delay, "batch failed; retrying");
                    tokio::select! {
                        () = self.cancel.cancelled() => return worked,
                        () = tokio::time::sleep(error_delay) => {}
                    }
                    error_delay = (error_delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        worked
    }

    /// Drains a group of shallow partitions: group claims while they find work, then one by one
    /// the partitions a group left to the single path (a head that failed before, a full batch,
    /// a group that failed); returns whether it did anything.
    async fn drain_group(&self, group: &[u32]) -> bool {
        let mut worked = false;
        let mut alone = Vec::new();
        let mut todo = group.to_vec();
        while !todo.is_empty() && !self.cancel.is_cancelled() {
            match self.group_batch(&todo).await {
                Ok(end) => {
                    worked |= end.worked;
                    alone.extend(end.alone);
                    todo = end.regroup;
                }
                Err(e) => {
                    // The database failed outside any handler: each partition retries on its
                    // own, with the single path's backoff.
                    tracing::warn!(queue = %self.queue, handler = %self.handler, partitions = todo.len(),
                        error = %e, "group batch failed; claiming its partitions one by one");
                    alone.append(&mut todo);
                }
            }
        }
        for partition in alone {
            if self.cancel.is_cancelled() {
                break;
            }
            worked |= self.drain_partition(partition).await;
        }
        worked
    }

    /// One transaction over the batches of several partitions: lock their cursors, read every
    /// batch in one statement, mark the claim, handle each partition's messages in order, and
    /// settle every cursor in the same commit, guarded by the mark (as a single batch).
    ///
    /// Only partitions whose head has no failed attempt are taken; the others are left to the
    /// single path with its failure rules. Any failure (a handler error, a panic, a time limit,
    /// a failed settle or commit) rolls the whole group back and leaves every partition to the
    /// single path: each message's effects are redone there, and only the message that fails
    /// there is charged. On SQLite the group stops taking messages at half of the write-lock
    /// budget and commits; the partitions it did not finish are claimed again as a group.
    async fn group_batch(&self, group: &[u32]) -> Result<GroupEnd, DbErr> {
        let store = &self.shared.store;
        let mut end = GroupEnd::default();
        let txn = store.begin_write().await?;
        let mut claimed = Vec::new();
        for (partition, cur) in store
            .lock_cursors(&*txn, &self.queue, &self.handler, group)
            .await?
        {
            if cur.held() {
                // The next scan says when it comes free.
                continue;
            }
            if cur.attempts > 0 || cur.abandoned_lease() {
                end.alone.push(partition);
                continue;
            }
            claimed.push((partition, cur.processed_seq));
        }
        let limit = self.tuning.batch_size;
        let batches = match claimed.is_empty() {
            true => BTreeMap::new(),
            false => {
                store
                    .read_batches(&*txn, &self.queue, &claimed, limit)
                    .await?
            }
        };
        // What fits in one batch: a partition with a full batch waiting runs alone, and the
        // ones past the batch size are claimed again as a group.
        let mut taken = 0usize;
        claimed.retain(|&(p, _)| {
            let Some(batch) = batches.get(&p) else {
                return false;
            };
            if batch.len() >= limit as usize {
                end.alone.push(p);
                return false;
            }
            if taken > 0 && taken + batch.len() > limit as usize {
                end.regroup.push(p);
                return false;
            }
            taken += batch.len();
            true
        });
        if claimed.is_empty() {
            txn.rollback().await?;
            return Ok(end);
        }
        let partitions: Vec<u32> = claimed.iter().map(|&(p, _)| p).collect();
        let marker = new_token();
        store
            .mark_claims(&*txn, &self.queue, &self.handler, &partitions, &marker)
            .await?;
        let span = tracing::info_span!("outbox.batch", queue = %self.queue, handler = %self.handler,
            partitions = partitions.len(), mode = "transactional");
        async {
            let started = Instant::now();
            let mut handled = 0usize;
            let mut stopped = false;
            let mut failure = None;
            let mut progress: Vec<(u32, i64)> = Vec::with_capacity(claimed.len());
            for &(partition, after) in &claimed {
                let batch = batches.get(&partition).map_or(&[][..], Vec::as_slice);
                let mut processed = after;
                if !stopped && failure.is_none() {
                    let (done, reached) = self
                        .handle_in_group(&txn, partition, batch, started, &mut handled)
                        .await;
                    processed = reached.unwrap_or(after);
                    match done {
                        Ok(finished) => stopped = !finished,
                        Err(e) => failure = Some(e),
                    }
                }
                progress.push((partition, processed));
            }
            if let Some(err) = failure {
                // A failed rollback (lost connection) still releases the locks server-side.
                let _ = txn.rollback().await;
                if !matches!(err, CallError::Interrupted) {
                    tracing::debug!(queue = %self.queue, handler = %self.handler, error = %err,
                        "a group's batch failed; its partitions are claimed one by one");
                    end.alone.extend(partitions);
                }
                return Ok(end);
            }
            let span = trace::group_ack_span(&self.queue, &self.handler, progress.len());
            span.record("handled", handled);
            let settle = async {
                let settled = store
                    .settle_group(&*txn, &self.queue, &self.handler, &progress, &marker)
                    .await;
                match settled {
                    Ok(true) => txn.commit().await.map(|()| true),
                    other => {
                        let _ = txn.rollback().await;
                        other.map(|_| false)
                    }
                }
            };
            let reason = match trace::traced(span, settle).await {
                Ok(true) => None,
                Ok(false) => Some("the database rolled the transaction back while the handlers ran".to_owned()),
                Err(e) => Some(format!("the transaction failed after the handlers returned: {e}")),
            };
            if let Some(reason) = reason {
                // The single path finds the message that breaks it, if one does.
                tracing::info!(queue = %self.queue, handler = %self.handler, partitions = partitions.len(),
                    %reason, "group transaction failed; claiming its partitions one by one");
                end.alone.extend(partitions);
                return Ok(end);
            }
            end.worked = true;
            let n = u64::try_from(handled).unwrap_or(0);
            self.shared.acked(n);
            metrics::handled(&self.queue, &self.handler, n);
            for &(partition, processed) in &progress {
                let batch = batches.get(&partition).map_or(&[][..], Vec::as_slice);
                // Not finished before the write budget ran out: claimed again as a group.
                if batch.last().is_some_and(|last| last.seq > processed) {
                    end.regroup.push(partition);
                }
            }
            Ok(end)
        }
        .instrument(span)
        .await
    }

    /// Handles one partition's batch inside a group's transaction. Returns whether it finished
    /// the batch (`Ok(false)`: the SQLite write budget stopped it) or the error that fails the
    /// group, and the last sequence handled or passed over, if any.
    async fn handle_in_group(
        &self,
        txn: &WriteTxn,
        partition: u32,
        batch: &[StoredMessage],
        started: Instant,
        handled: &mut usize,
    ) -> (Result<bool, CallError>, Option<i64>) {
        let mut reached = None;
        if self.mode.batch {
            let msgs = self.messages(batch, partition, 0);
            if !msgs.is_empty() {
                let (limit, budget) = self.time_left(started, *handled > 0);
                if limit.is_zero() {
                    return (Ok(false), None);
                }
                let scope = Scope::Transaction(txn);
                if let Err(e) = self
                    .invoke(&msgs, scope, Limit::Time { limit, budget })
                    .await
                {
                    return (Err(e), None);
                }
                *handled += msgs.len();
            }
            return (Ok(true), batch.last().map(|m| m.seq));
        }
        for m in batch {
            if self.mine(m) {
                let (limit, budget) = self.time_left(started, *handled > 0);
                if limit.is_zero() {
                    return (Ok(false), reached);
                }
                let msg = m.clone().into_message(&self.queue, partition, 1);
                let one = std::slice::from_ref(&msg);
                let scope = Scope::Transaction(txn);
                if let Err(e) = self.invoke(one, scope, Limit::Time { limit, budget }).await {
                    return (Err(e), reached);
                }
                *handled += 1;
            }
            reached = Some(m.seq);
        }
        (Ok(true), reached)
    }

    /// Runs a handler future, catching panics, failing it when `limit` completes; hard shutdown
    /// interrupts it.
    async fn guarded(
        &self,
        fut: HandlerFuture<'_>,
        limit: impl std::future::Future<Output = ()>,
        limit_error: impl FnOnce() -> CallError,
    ) -> Result<(), CallError> {
        // Typed enqueue inside the handler goes to the outbox that runs it.
        let current = super::Outbox {
            shared: self.shared.clone(),
        };
        let fut = current.scope(fut);
        tokio::select! {
            biased;
            () = self.hard.cancelled() => Err(CallError::Interrupted),
            r = AssertUnwindSafe(fut).catch_unwind() => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(CallError::Handler(e)),
                Err(panic) => Err(CallError::Handler(HandlerError::retry(format!(
                    "handler panicked: {}",
                    panic_message(panic.as_ref())
                )))),
            },
            () = limit => Err(limit_error()),
        }
    }

    /// Calls the handler with `messages` (one, or the batch of a batch handler) under `scope`,
    /// stopped at `limit`, in the handler's span and timed by the metrics.
    async fn invoke(
        &self,
        messages: &[Message],
        scope: Scope<'_>,
        limit: Limit<'_>,
    ) -> Result<(), CallError> {
        let Some(head) = messages.first() else {
            return Ok(());
        };
        let span = if self.mode.batch {
            trace::batch_handler_span(&self.queue, &self.handler, messages)
        } else {
            trace::handler_span(&self.queue, &self.handler, head)
        };
        let fut = span.in_scope(|| (self.mode.call)(messages, scope));
        let guarded = async {
            match limit {
                Limit::Time { limit, budget } => self.call(fut, limit, budget).await,
                Limit::Lease(lease) => self.call_leased(fut, lease).await,
            }
        };
        let timed = metrics::timed(&self.queue, &self.handler, head, guarded);
        trace::traced(span, timed).await
    }

    /// Runs one transactional handler call within `limit`; `budget` says the limit is SQLite's
    /// write-lock budget rather than the handler's timeout.
    async fn call(
        &self,
        fut: HandlerFuture<'_>,
        limit: Duration,
        budget: bool,
    ) -> Result<(), CallError> {
        self.guarded(fut, tokio::time::sleep(limit), || CallError::Limit {
            budget,
            what: if budget {
                format!(
                    "transactional handler held SQLite's write lock for more than {limit:?} \
                     (RuntimeTuning::sqlite_write_hold); producers wait behind it, so move slow \
                     work to a leased handler"
                )
            } else {
                format!("handler did not finish within {limit:?}")
            },
        })
        .await
    }

    /// Runs one leased handler call until the lease's deadline, which `renew` may move.
    async fn call_leased(&self, fut: HandlerFuture<'_>, lease: &Lease) -> Result<(), CallError> {
        self.guarded(fut, lease.expired(), || CallError::Limit {
            budget: false,
            what: "lease deadline reached (lease end minus headroom)".to_owned(),
        })
        .await
    }

    /// Whether this handler handles `m`: every message, except replayed copies addressed to
    /// another handler of the queue.
    fn mine(&self, m: &StoredMessage) -> bool {
        m.target_handler
            .as_deref()
            .is_none_or(|t| t == &*self.handler)
    }

    /// The messages of `batch` this handler should see, with their attempt numbers (the first
    /// of them carries the cursor's failed attempts).
    fn messages(
        &self,
        batch: &[StoredMessage],
        partition: u32,
        head_attempts: i64,
    ) -> Vec<Message> {
        batch
            .iter()
            .filter(|m| self.mine(m))
            .enumerate()
            .map(|(i, m)| {
                let attempt = if i == 0 {
                    next_attempt(head_attempts)
                } else {
                    1
                };
                m.clone().into_message(&self.queue, partition, attempt)
            })
            .collect()
    }

    /// Locks the cursor of `partition` (skipping it if another worker holds it) and reads the
    /// next batch; `None`, with the transaction rolled back, when the partition is held
    /// (blocked, waiting for a retry, leased) or has nothing to read.
    async fn claim(&self, partition: u32, drain: &mut Drain) -> Result<Option<Claim>, DbErr> {
        let store = &self.shared.store;
        let txn = store.begin_write().await?;
        let Some(cur) = store.lock_cursor(&*txn, self.key(partition)).await? else {
            txn.rollback().await?;
            return Ok(None);
        };
        if cur.held() {
            txn.rollback().await?;
            return Ok(None);
        }
        let limit = drain.limit_once.take().unwrap_or(self.tuning.batch_size);
        let batch = store
            .read_batch(&*txn, &self.queue, partition, cur.processed_seq, limit)
            .await?;
        if batch.is_empty() {
            txn.rollback().await?;
            return Ok(None);
        }
        Ok(Some(Claim {
            txn,
            cur,
            batch,
            limit,
        }))
    }

    /// Records the `attempts`-th failure of `message` (the handler's head, after the messages
    /// up to `processed_seq`) in a fresh transaction, if the cursor is still as `cur` was.
    async fn record_failure(
        &self,
        partition: u32,
        cur: &CursorRow,
        processed_seq: i64,
        message: &StoredMessage,
        attempts: i64,
        failed: &Failed,
    ) -> Result<(), DbErr> {
        let store = &self.shared.store;
        let verdict = failure::decide(attempts, failed, &self.tuning, self.policy);
        let outcome = Outcome::Failed {
            processed_seq,
            message,
            attempts,
            verdict,
            error: &failed.text,
        };
        let fence = Fence::State {
            processed_seq: cur.processed_seq,
            attempts: cur.attempts,
        };
        let txn = store.begin_write().await?;
        if store
            .settle(&*txn, self.key(partition), outcome, fence)
            .await?
        {
            txn.commit().await?;
            self.log_failure(partition, message, attempts, verdict, failed);
        } else {
            // Someone else moved the cursor meanwhile: their outcome stands.
            txn.rollback().await?;
        }
        Ok(())
    }

    /// Logs and counts a failure once it is recorded.
    fn log_failure(
        &self,
        partition: u32,
        m: &StoredMessage,
        attempts: i64,
        verdict: Verdict,
        failed: &Failed,
    ) {
        let error = &failed.text;
        let (dead, blocked) = (verdict == Verdict::DeadLetter, verdict == Verdict::Block);
        metrics::failed(&self.queue, &self.handler, dead, blocked);
        match verdict {
            Verdict::DeadLetter => {
                tracing::warn!(queue = %self.queue, handler = %self.handler, partition, seq = m.seq, attempts, %error, "message dead-lettered");
            }
            Verdict::Block => {
                tracing::error!(queue = %self.queue, handler = %self.handler, partition, seq = m.seq, attempts, %error, "partition blocked by a poisoned message");
            }
            Verdict::Retry(after) => {
                tracing::info!(queue = %self.queue, handler = %self.handler, partition, seq = m.seq, attempts, retry_in = ?after, %error, "handler failed; will retry");
            }
        }
    }

    // ------------------------------------------------------------ transactional

    /// One batch in one transaction: lock the cursor, mark the claim, handle the messages in
    /// order, and settle the cursor in the same commit, guarded by the mark (a transaction the
    /// database rolled back behind the handler has lost it, so the cursor cannot move alone).
    ///
    /// A failure of the head is recorded in a fresh transaction. A failure at message `k > 0`
    /// rolls the batch back; the next pass redoes the successes before it and records the
    /// failure of message k in their commit (its effects are redone, never kept from a failed
    /// batch). A batch whose handlers all succeeded but whose transaction then failed is split
    /// in halves until the message that breaks it is alone, and only that one is charged.
    async fn transactional_batch(&self, partition: u32, drain: &mut Drain) -> Result<Step, DbErr> {
        let store = &self.shared.store;
        let Some(Claim {
            txn,
            cur,
            batch,
            limit,
        }) = self.claim(partition, drain).await?
        else {
            return Ok(Step::Idle);
        };
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return Ok(Step::Done);
        };
        let carried = drain.carried.take().filter(|c| {
            c.after_seq == cur.processed_seq && last.seq == c.last_ok && cur.attempts == 0
        });
        let marker = new_token();
        store
            .mark_claim(&*txn, self.key(partition), &marker)
            .await?;
        let span = tracing::info_span!("outbox.batch", queue = %self.queue, handler = %self.handler,
            partition, first_seq = first.seq, last_seq = last.seq, attempt = cur.attempts + 1, mode = "transactional");
        async {
            let started = Instant::now();
            let mut processed = cur.processed_seq;
            // Mine messages handled so far; the first of them is the head.
            let mut handled = 0usize;
            let mut stopped_early = false;
            let mut failure: Option<(usize, CallError)> = None;
            match self.mode.batch {
                false => {
                    for (i, m) in batch.iter().enumerate() {
                        if !self.mine(m) {
                            processed = m.seq;
                            continue;
                        }
                        let (limit, budget) = self.time_left(started, handled > 0);
                        if limit.is_zero() {
                            stopped_early = true;
                            break;
                        }
                        let attempt = if handled == 0 {
                            next_attempt(cur.attempts)
                        } else {
                            1
                        };
                        let msg = m.clone().into_message(&self.queue, partition, attempt);
                        let one = std::slice::from_ref(&msg);
                        let scope = Scope::Transaction(&txn);
                        match self.invoke(one, scope, Limit::Time { limit, budget }).await {
                            Ok(()) => {
                                processed = m.seq;
                                handled += 1;
                            }
                            Err(e) => {
                                failure = Some((i, e));
                                break;
                            }
                        }
                    }
                }
                true => {
                    let msgs = self.messages(&batch, partition, cur.attempts);
                    let (limit, budget) = self.time_left(started, false);
                    let scope = Scope::Transaction(&txn);
                    let res = self
                        .invoke(&msgs, scope, Limit::Time { limit, budget })
                        .await;
                    match res {
                        Ok(()) => {
                            processed = last.seq;
                            handled = msgs.len();
                        }
                        Err(e) => failure = Some((0, e)),
                    }
                }
            }
            let Some((i, err)) = failure else {
                let span = trace::ack_span(&self.queue, &self.handler, partition, processed);
                span.record("handled", handled);
                if let Some(c) = &carried {
                    span.record("failed_seq", c.message.seq);
                }
                let commit = self.commit_batch(
                    partition, txn, &cur, &marker, &batch, processed, handled, carried, drain,
                );
                let step = trace::traced(span, commit).await?;
                let full = batch.len() == limit as usize || stopped_early;
                return Ok(if step == Step::Done && full {
                    Step::More
                } else {
                    step
                });
            };
            // A failed rollback (lost connection) still releases the locks server-side.
            let _ = txn.rollback().await;
            let mine: Vec<&StoredMessage> = batch.iter().filter(|m| self.mine(m)).collect();
            match (self.mode.batch, err) {
                (_, CallError::Interrupted) => Ok(Step::Done),
                (true, _) if mine.len() > 1 => {
                    // The call does not say which message failed: split the batch to find it.
                    drain.limit_once = Some((batch.len() / 2).max(1) as u32);
                    Ok(Step::More)
                }
                (true, err) => {
                    if let Some(m) = mine.first() {
                        let before = seq_before(&batch, m.seq, cur.processed_seq);
                        self.record_failure(
                            partition,
                            &cur,
                            before,
                            m,
                            cur.attempts + 1,
                            &err.failed(),
                        )
                        .await?;
                    }
                    Ok(Step::More)
                }
                (false, err) if handled == 0 => {
                    self.record_failure(
                        partition,
                        &cur,
                        processed,
                        &batch[i],
                        cur.attempts + 1,
                        &err.failed(),
                    )
                    .await?;
                    Ok(Step::More)
                }
                (false, CallError::Limit { budget: true, .. }) => {
                    // Out of SQLite write-lock time at a later message: not its fault. Commit
                    // the successes before it; it runs again as the head, with the whole budget.
                    drain.limit_once = Some(i as u32);
                    Ok(Step::More)
                }
                (false, err) => {
                    drain.limit_once = Some(i as u32);
                    drain.carried = Some(Carried {
                        after_seq: cur.processed_seq,
                        last_ok: processed,
                        message: batch[i].clone(),
                        failed: err.failed(),
                    });
                    Ok(Step::More)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The time limit of the next transactional call, and whether it is SQLite's write-lock
    /// budget. Zero when a batch that already handled something should stop and commit.
    fn time_left(&self, started: Instant, after_first: bool) -> (Duration, bool) {
        let timeout = self.tuning.handler_timeout;
        let Some(hold) = self.write_hold else {
            return (timeout, false);
        };
        let elapsed = started.elapsed();
        if after_first && elapsed >= hold / 2 {
            return (Duration::ZERO, true);
        }
        let left = hold.saturating_sub(elapsed).max(Duration::from_millis(1));
        if left < timeout {
            (left, true)
        } else {
            (timeout, false)
        }
    }

    /// Settles a transactional batch whose handlers all succeeded (with the carried failure of
    /// the message after them, if any) and commits. A transaction that fails here (the database
    /// rolled it back, a statement failed, the commit failed) is split in halves while several
    /// messages ran in it; the one message left is charged with the failure.
    #[allow(clippy::too_many_arguments)]
    async fn commit_batch(
        &self,
        partition: u32,
        txn: WriteTxn,
        cur: &CursorRow,
        marker: &str,
        batch: &[StoredMessage],
        processed: i64,
        handled: usize,
        carried: Option<Carried>,
        drain: &mut Drain,
    ) -> Result<Step, DbErr> {
        let store = &self.shared.store;
        let carried = carried.filter(|c| c.last_ok == processed);
        let outcome = match &carried {
            Some(c) => Outcome::Failed {
                processed_seq: processed,
                message: &c.message,
                attempts: 1,
                verdict: failure::decide(1, &c.failed, &self.tuning, self.policy),
                error: &c.failed.text,
            },
            None => Outcome::Progress {
                processed_seq: processed,
                attempts: if handled == 0 { cur.attempts } else { 0 },
            },
        };
        let settled = match store
            .settle(&*txn, self.key(partition), outcome, Fence::Claim(marker))
            .await
        {
            Ok(true) => txn
                .commit()
                .await
                .map_err(|e| format!("commit failed: {e}")),
            Ok(false) => {
                let _ = txn.rollback().await;
                Err(
                    "the database rolled the transaction back while the handler ran \
                     (a deadlock, busy or I/O error the handler swallowed?)"
                        .to_owned(),
                )
            }
            Err(e) => {
                let _ = txn.rollback().await;
                Err(format!(
                    "the transaction failed after the handler returned: {e}"
                ))
            }
        };
        let reason = match settled {
            Ok(()) => {
                if let (Some(c), Outcome::Failed { verdict, .. }) = (&carried, outcome) {
                    self.log_failure(partition, &c.message, 1, verdict, &c.failed);
                }
                let n = u64::try_from(handled).unwrap_or(0);
                self.shared.acked(n);
                metrics::handled(&self.queue, &self.handler, n);
                return Ok(Step::Done);
            }
            Err(reason) => reason,
        };
        let mine: Vec<&StoredMessage> = batch.iter().filter(|m| self.mine(m)).collect();
        match mine.as_slice() {
            // Nothing of this handler ran: the database failed, not a message.
            [] => Err(DbErr::Custom(reason)),
            [m] => {
                let before = seq_before(batch, m.seq, cur.processed_seq);
                self.record_failure(
                    partition,
                    cur,
                    before,
                    m,
                    cur.attempts + 1,
                    &Failed::retry(reason),
                )
                .await?;
                Ok(Step::More)
            }
            _ => {
                tracing::info!(queue = %self.queue, handler = %self.handler, partition, %reason,
                    "batch transaction failed; splitting it to find the message that breaks it");
                drain.limit_once = Some((batch.len() / 2).max(1) as u32);
                Ok(Step::More)
            }
        }
    }

    // ------------------------------------------------------------ leased

    /// One leased batch: claim a lease in a short transaction, run the handler outside any
    /// transaction until the lease end minus headroom, then settle what happened with a write
    /// fenced by the lease token and its expiry.
    async fn leased_batch(&self, partition: u32, drain: &mut Drain) -> Result<Step, DbErr> {
        let store = &self.shared.store;
        let key = self.key(partition);
        let Some(Claim {
            txn: claim_txn,
            cur,
            batch,
            limit,
        }) = self.claim(partition, drain).await?
        else {
            return Ok(Step::Idle);
        };
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return Ok(Step::Done);
        };
        let mut attempts = cur.attempts;
        if cur.abandoned_lease() {
            // The previous holder's lease expired without an ack: a failed attempt of this
            // handler's head (never of a copy addressed to another handler).
            let Some(head) = batch.iter().find(|m| self.mine(m)) else {
                let outcome = Outcome::Progress {
                    processed_seq: last.seq,
                    attempts: 0,
                };
                let fence = Fence::State {
                    processed_seq: cur.processed_seq,
                    attempts: cur.attempts,
                };
                store.settle(&*claim_txn, key, outcome, fence).await?;
                claim_txn.commit().await?;
                return Ok(Step::More);
            };
            attempts += 1;
            let failed =
                Failed::retry("lease expired without an ack (the worker crashed or stalled)");
            let verdict = failure::decide(attempts, &failed, &self.tuning, self.policy);
            if !matches!(verdict, Verdict::Retry(_)) {
                let outcome = Outcome::Failed {
                    processed_seq: seq_before(&batch, head.seq, cur.processed_seq),
                    message: head,
                    attempts,
                    verdict,
                    error: &failed.text,
                };
                let fence = Fence::State {
                    processed_seq: cur.processed_seq,
                    attempts: cur.attempts,
                };
                if store.settle(&*claim_txn, key, outcome, fence).await? {
                    claim_txn.commit().await?;
                    self.log_failure(partition, head, attempts, verdict, &failed);
                } else {
                    claim_txn.rollback().await?;
                }
                return Ok(Step::More);
            }
            // Attempts left: redeliver now, with the attempt raised.
        }
        let lease = Lease::take(
            &self.shared,
            &*claim_txn,
            &self.queue,
            &self.handler,
            partition,
            &self.owner,
            &self.tuning,
            attempts,
        )
        .await?;
        claim_txn.commit().await?;

        let span = tracing::info_span!("outbox.batch", queue = %self.queue, handler = %self.handler,
            partition, first_seq = first.seq, last_seq = last.seq, attempt = attempts + 1, mode = "leased");
        async {
            let full = batch.len() == limit as usize;
            let mut processed = cur.processed_seq;
            let mut handled = 0usize;
            let mut failure: Option<(usize, CallError)> = None;
            let ctx_for = |seq: i64, attempt: u32| LeaseContext {
                queue: self.queue.clone(),
                handler: self.handler.clone(),
                partition,
                seq,
                attempt,
                lease: lease.clone(),
            };
            match self.mode.batch {
                true => {
                    let msgs = self.messages(&batch, partition, attempts);
                    let result = match msgs.first() {
                        None => Ok(()),
                        Some(m) => {
                            let ctx = ctx_for(m.seq, m.attempt);
                            let scope = Scope::Lease(&ctx);
                            self.invoke(&msgs, scope, Limit::Lease(&lease)).await
                        }
                    };
                    match result {
                        Ok(()) => {
                            processed = last.seq;
                            handled = msgs.len();
                        }
                        Err(e) => failure = Some((0, e)),
                    }
                }
                false => {
                    for (i, m) in batch.iter().enumerate() {
                        if !self.mine(m) {
                            processed = m.seq;
                            continue;
                        }
                        if self.cancel.is_cancelled() {
                            failure = Some((i, CallError::Interrupted));
                            break;
                        }
                        let attempt = if handled == 0 {
                            next_attempt(attempts)
                        } else {
                            1
                        };
                        let msg = m.clone().into_message(&self.queue, partition, attempt);
                        let ctx = ctx_for(m.seq, attempt);
                        let result = if lease.deadline() <= Instant::now() {
                            Err(CallError::Limit {
                                budget: false,
                                what: "lease deadline reached before the handler started"
                                    .to_owned(),
                            })
                        } else {
                            let one = std::slice::from_ref(&msg);
                            let scope = Scope::Lease(&ctx);
                            self.invoke(one, scope, Limit::Lease(&lease)).await
                        };
                        match result {
                            Ok(()) => {
                                processed = m.seq;
                                handled += 1;
                            }
                            Err(e) => {
                                failure = Some((i, e));
                                break;
                            }
                        }
                    }
                }
            }
            let fence = lease.fence();
            let head_attempts = if handled == 0 { attempts } else { 0 };
            let mine = batch.iter().filter(|m| self.mine(m)).count();
            let (recorded, progress, more) = match failure {
                None => (None, (processed, head_attempts), full),
                // Shutdown: give the lease back with what was done; nothing is charged.
                Some((_, CallError::Interrupted)) => (None, (processed, head_attempts), false),
                Some(_) if self.mode.batch && mine > 1 => {
                    // The call does not say which message failed: give the lease back without
                    // progress and claim the first half next.
                    drain.limit_once = Some((batch.len() / 2).max(1) as u32);
                    (None, (cur.processed_seq, attempts), true)
                }
                Some((i, err)) => {
                    let m = match self.mode.batch {
                        true => batch.iter().find(|m| self.mine(m)).unwrap_or(&batch[i]),
                        false => &batch[i],
                    };
                    let failed = err.failed();
                    let n = head_attempts + 1;
                    let verdict = failure::decide(n, &failed, &self.tuning, self.policy);
                    (Some((m, n, verdict, failed)), (processed, 0), true)
                }
            };
            let outcome = match &recorded {
                Some((m, n, verdict, failed)) => Outcome::Failed {
                    processed_seq: seq_before(&batch, m.seq, progress.0),
                    message: m,
                    attempts: *n,
                    verdict: *verdict,
                    error: &failed.text,
                },
                None => Outcome::Progress {
                    processed_seq: progress.0,
                    attempts: progress.1,
                },
            };
            let span = match &outcome {
                Outcome::Failed {
                    processed_seq,
                    message,
                    ..
                } => {
                    let span =
                        trace::ack_span(&self.queue, &self.handler, partition, *processed_seq);
                    span.record("failed_seq", message.seq);
                    span
                }
                Outcome::Progress { processed_seq, .. } => {
                    trace::ack_span(&self.queue, &self.handler, partition, *processed_seq)
                }
            };
            span.record("handled", handled);
            let settle = async {
                if matches!(
                    outcome,
                    Outcome::Failed {
                        verdict: Verdict::DeadLetter,
                        ..
                    }
                ) {
                    let txn = store.begin_write().await?;
                    let ok = store.settle(&*txn, key, outcome, fence).await?;
                    txn.commit().await?;
                    Ok::<bool, DbErr>(ok)
                } else {
                    let _gate = store.write_guard().await;
                    store.settle(&store.db, key, outcome, fence).await
                }
            };
            let acked = trace::traced(span.clone(), settle).await?;
            if !acked {
                trace::failed(&span, &"lease lost before the ack");
                tracing::warn!(queue = %self.queue, handler = %self.handler, partition,
                    "lease lost before the ack; the batch will be redelivered");
                return Ok(Step::Done);
            }
            if let Some((m, n, verdict, failed)) = &recorded {
                self.log_failure(partition, m, *n, *verdict, failed);
            }
            let n = u64::try_from(handled).unwrap_or(0);
            self.shared.acked(n);
            metrics::handled(&self.queue, &self.handler, n);
            Ok(if more { Step::More } else { Step::Done })
        }
        .instrument(span)
        .await
    }
}

/// The sequence just before `seq` in `batch` (where a cursor stands when `seq` is next), or
/// `start` if `seq` is the first of the batch.
fn seq_before(batch: &[StoredMessage], seq: i64, start: i64) -> i64 {
    batch
        .iter()
        .take_while(|m| m.seq < seq)
        .last()
        .map_or(start, |m| m.seq)
}

/// A lease token or claim marker: 128 random bits, not derivable from ids.
pub(super) fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// The attempt number of the next delivery after `failed` stored failed attempts (1 for none).
fn next_attempt(failed: i64) -> u32 {
    attempts_from_db(failed).saturating_add(1)
}
