//! Processors: per handler, a dispatcher finds partitions with work and runs one batch task per
//! partition at a time; the batch runs in the handler's mode (transactional or leased).

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use sea_orm::DbErr;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::Shared;
use super::worker::Next;
use crate::error::{HandlerError, full_chain};
use crate::handler::{HandlerFuture, LeaseContext, LeasedFn, Mode, TxFn};
use crate::profile::Tuning;
use crate::queue::PoisonPolicy;
use crate::storage::{CursorRow, CursorUpdate, NewLease, StoredMessage, now_ms};

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
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) tracker: TaskTracker,
    pub(crate) cancel: CancellationToken,
    pub(crate) hard: CancellationToken,
}

/// How one batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// More messages may be waiting: run another batch now.
    More,
    /// Nothing more to do here now.
    Done,
}

/// Why a handler call did not succeed.
enum Failure {
    Handler(HandlerError),
    /// Hard shutdown cancelled the call.
    Interrupted,
}

impl Processor {
    /// One dispatcher pass: start a batch task for each ready partition that is free.
    pub(crate) async fn dispatch(self: &Arc<Self>) -> Result<Next, DbErr> {
        let ready = self
            .shared
            .store
            .ready_partitions(&self.queue, &self.handler)
            .await?;
        let now = now_ms();
        let mut due: Option<i64> = None;
        for rp in ready {
            if self.cancel.is_cancelled() {
                break;
            }
            let mut blocked_until = None;
            if rp.retry_at > now {
                blocked_until = Some(rp.retry_at);
            }
            if let Some(exp) = rp.lease_expires_at.filter(|&e| e > now) {
                blocked_until = Some(blocked_until.map_or(exp, |b: i64| b.max(exp)));
            }
            if let Some(t) = blocked_until {
                due = Some(due.map_or(t, |d| d.min(t)));
                continue;
            }
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                // Every slot is busy; a finishing task wakes us.
                break;
            };
            {
                let Ok(mut set) = self.in_flight.lock() else {
                    break;
                };
                if !set.insert(rp.partition) {
                    continue;
                }
            }
            let this = self.clone();
            self.tracker.spawn(async move {
                this.drain_partition(rp.partition).await;
                if let Ok(mut set) = this.in_flight.lock() {
                    set.remove(&rp.partition);
                }
                drop(permit);
                this.wake.notify_one();
            });
        }
        Ok(match due {
            Some(t) => Next::After(Duration::from_millis((t - now).max(1) as u64)),
            None => Next::Idle,
        })
    }

    /// Runs batches of one partition until it is drained, blocked or taken elsewhere.
    async fn drain_partition(&self, partition: u32) {
        let mut limit_once = None;
        let mut error_delay = Duration::from_millis(100);
        while !self.cancel.is_cancelled() {
            let res = match &self.mode {
                Mode::Transactional(f) => {
                    self.transactional_batch(f, partition, &mut limit_once)
                        .await
                }
                Mode::Leased(f) => self.leased_batch(f, partition).await,
            };
            match res {
                Ok(Step::More) => continue,
                Ok(Step::Done) => return,
                Err(e) => {
                    tracing::warn!(queue = %self.queue, handler = %self.handler, partition, error = %e,
                        retry_in = ?error_delay, "batch failed; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(error_delay) => {}
                    }
                    error_delay = (error_delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Runs one handler call with its time limit, catching panics; hard shutdown interrupts it.
    async fn call(&self, fut: HandlerFuture<'_>, limit: Duration) -> Result<(), Failure> {
        let guarded = tokio::time::timeout(limit, AssertUnwindSafe(fut).catch_unwind());
        tokio::select! {
            biased;
            _ = self.hard.cancelled() => Err(Failure::Interrupted),
            r = guarded => match r {
                Ok(Ok(Ok(()))) => Ok(()),
                Ok(Ok(Err(e))) => Err(Failure::Handler(e)),
                Ok(Err(panic)) => Err(Failure::Handler(HandlerError::retry(format!(
                    "handler panicked: {}",
                    panic_message(panic.as_ref())
                )))),
                Err(_) => Err(Failure::Handler(HandlerError::retry(format!(
                    "handler did not finish within {limit:?}"
                )))),
            }
        }
    }

    fn mine(&self, m: &StoredMessage) -> bool {
        m.target_handler
            .as_deref()
            .is_none_or(|t| t == &*self.handler)
    }

    /// The cursor state after a failed attempt of `head` (whose failed attempts now number
    /// `attempts`): retry later, dead-letter, or block.
    fn after_failure(
        &self,
        before: i64,
        head: &StoredMessage,
        attempts: i64,
        err: &HandlerError,
    ) -> (CursorUpdate, bool) {
        let reason = err_text(err);
        let poisoned = err.is_reject() || attempts >= i64::from(self.tuning.max_attempts);
        if !poisoned {
            let retry_at = now_ms() + self.tuning.backoff(attempts as u64).as_millis() as i64;
            return (
                CursorUpdate {
                    processed_seq: before,
                    attempts,
                    retry_at,
                    blocked: false,
                    last_error: Some(reason),
                },
                false,
            );
        }
        match self.policy {
            PoisonPolicy::Block => (
                CursorUpdate {
                    processed_seq: before,
                    attempts,
                    retry_at: 0,
                    blocked: true,
                    last_error: Some(reason),
                },
                false,
            ),
            _ => (
                CursorUpdate {
                    processed_seq: head.seq,
                    attempts: 0,
                    retry_at: 0,
                    blocked: false,
                    last_error: None,
                },
                true,
            ),
        }
    }

    // ------------------------------------------------------------ transactional

    /// One batch in one transaction: lock the cursor, handle messages in order, advance the
    /// cursor in the same commit. On a failure at message `k > 0` the whole transaction rolls
    /// back and the next pass handles exactly the `k` messages that succeeded (their effects
    /// are redone, never kept from a failed batch); a failure of the head is recorded with its
    /// attempt count in a fresh transaction.
    async fn transactional_batch(
        &self,
        f: &TxFn,
        partition: u32,
        limit_once: &mut Option<u32>,
    ) -> Result<Step, DbErr> {
        let store = &self.shared.store;
        let txn = store.begin_write().await?;
        let Some(cur) = store
            .lock_cursor(&*txn, &self.queue, &self.handler, partition)
            .await?
        else {
            let _ = txn.rollback().await;
            return Ok(Step::Done);
        };
        if cur.blocked || cur.retry_at > now_ms() {
            let _ = txn.rollback().await;
            return Ok(Step::Done);
        }
        let limit = limit_once.take().unwrap_or(self.tuning.batch_size);
        let batch = store
            .read_batch(&*txn, &self.queue, partition, cur.processed_seq, limit)
            .await?;
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            let _ = txn.rollback().await;
            return Ok(Step::Done);
        };
        let span = tracing::info_span!("outbox.batch", queue = %self.queue, handler = %self.handler,
            partition, first_seq = first.seq, last_seq = last.seq, attempt = cur.attempts + 1, mode = "transactional");
        async {
            let full = batch.len() == limit as usize;
            let mut processed = cur.processed_seq;
            let mut failure = None;
            for (i, m) in batch.iter().enumerate() {
                if !self.mine(m) {
                    processed = m.seq;
                    continue;
                }
                let attempt = if i == 0 { cur.attempts as u64 + 1 } else { 1 };
                let msg = m.clone().into_message(&self.queue, partition, attempt);
                match crate::metrics::timed(
                    &self.queue,
                    &self.handler,
                    &msg,
                    self.call(f(&msg, &txn), self.tuning.handler_timeout),
                )
                .await
                {
                    Ok(()) => processed = m.seq,
                    Err(e) => {
                        failure = Some((i, e));
                        break;
                    }
                }
            }
            match failure {
                None => {
                    let u = CursorUpdate {
                        processed_seq: processed,
                        attempts: 0,
                        retry_at: 0,
                        blocked: false,
                        last_error: None,
                    };
                    store
                        .update_cursor(&*txn, &self.queue, &self.handler, partition, &u, None)
                        .await?;
                    if let Err(e) = txn.commit().await {
                        // The handlers' writes are rolled back with it; count the attempt on the head.
                        let err = HandlerError::retry(format!("commit failed: {e}"));
                        self.record_head_failure(partition, &cur, first, &err)
                            .await?;
                        return Ok(Step::More);
                    }
                    self.shared.acked(batch.len() as u64);
                    crate::metrics::handled(&self.queue, &self.handler, batch.len() as u64);
                    Ok(if full { Step::More } else { Step::Done })
                }
                Some((_, Failure::Interrupted)) => Ok(Step::Done),
                Some((0, Failure::Handler(err))) => {
                    // A failed rollback (lost connection) still releases the locks server-side.
                    let _ = txn.rollback().await;
                    self.record_head_failure(partition, &cur, first, &err)
                        .await?;
                    Ok(Step::More)
                }
                Some((k, Failure::Handler(_))) => {
                    let _ = txn.rollback().await;
                    *limit_once = Some(k as u32);
                    Ok(Step::More)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Records a failed attempt of `head` if the cursor still points just before it.
    async fn record_head_failure(
        &self,
        partition: u32,
        before: &CursorRow,
        head: &StoredMessage,
        err: &HandlerError,
    ) -> Result<(), DbErr> {
        let store = &self.shared.store;
        let txn = store.begin_write().await?;
        let Some(cur) = store
            .lock_cursor(&*txn, &self.queue, &self.handler, partition)
            .await?
        else {
            return txn.rollback().await;
        };
        if cur.processed_seq != before.processed_seq || cur.attempts != before.attempts {
            // Someone else moved the cursor meanwhile.
            return txn.rollback().await;
        }
        let (u, dead) = self.after_failure(cur.processed_seq, head, cur.attempts + 1, err);
        self.log_failure(partition, head, &u, dead, err);
        if dead {
            store
                .insert_dead_letter(
                    &*txn,
                    &self.queue,
                    partition,
                    &self.handler,
                    head,
                    &err_text(err),
                    cur.attempts + 1,
                )
                .await?;
        }
        store
            .update_cursor(&*txn, &self.queue, &self.handler, partition, &u, None)
            .await?;
        txn.commit().await
    }

    fn log_failure(
        &self,
        partition: u32,
        head: &StoredMessage,
        u: &CursorUpdate,
        dead: bool,
        err: &HandlerError,
    ) {
        let error = err_text(err);
        crate::metrics::failed(&self.queue, &self.handler, dead, u.blocked);
        if dead {
            tracing::warn!(queue = %self.queue, handler = %self.handler, partition, seq = head.seq, %error, "message dead-lettered");
        } else if u.blocked {
            tracing::error!(queue = %self.queue, handler = %self.handler, partition, seq = head.seq, %error, "partition blocked by a poisoned message");
        } else {
            tracing::info!(queue = %self.queue, handler = %self.handler, partition, seq = head.seq, attempts = u.attempts, %error, "handler failed; will retry");
        }
    }

    // ------------------------------------------------------------ leased

    /// One leased batch: claim a lease in a short transaction, run the handler outside any
    /// transaction until the lease end minus headroom, then ack what succeeded with a write
    /// fenced by the lease token.
    async fn leased_batch(&self, f: &LeasedFn, partition: u32) -> Result<Step, DbErr> {
        let store = &self.shared.store;
        let claim_txn = store.begin_write().await?;
        let Some(cur) = store
            .lock_cursor(&*claim_txn, &self.queue, &self.handler, partition)
            .await?
        else {
            let _ = claim_txn.rollback().await;
            return Ok(Step::Done);
        };
        let now = now_ms();
        if cur.blocked || cur.retry_at > now || cur.lease_expires_at.is_some_and(|e| e > now) {
            let _ = claim_txn.rollback().await;
            return Ok(Step::Done);
        }
        let batch = store
            .read_batch(
                &*claim_txn,
                &self.queue,
                partition,
                cur.processed_seq,
                self.tuning.batch_size,
            )
            .await?;
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            let _ = claim_txn.rollback().await;
            return Ok(Step::Done);
        };
        let mut attempts = cur.attempts;
        if cur.lease_token.is_some() {
            // The previous holder's lease expired without an ack: that was a failed attempt.
            attempts += 1;
            if attempts >= i64::from(self.tuning.max_attempts) {
                let err = HandlerError::retry("lease expired without an ack");
                let (u, dead) = self.after_failure(cur.processed_seq, first, attempts, &err);
                self.log_failure(partition, first, &u, dead, &err);
                if dead {
                    store
                        .insert_dead_letter(
                            &*claim_txn,
                            &self.queue,
                            partition,
                            &self.handler,
                            first,
                            &err_text(&err),
                            attempts,
                        )
                        .await?;
                }
                store
                    .update_cursor(&*claim_txn, &self.queue, &self.handler, partition, &u, None)
                    .await?;
                claim_txn.commit().await?;
                return Ok(Step::More);
            }
        }
        let token = new_token();
        let lease_ms = self.tuning.lease.as_millis() as i64;
        let started = tokio::time::Instant::now();
        let expires_at = now_ms() + lease_ms;
        store
            .take_lease(
                &*claim_txn,
                &self.queue,
                &self.handler,
                partition,
                &NewLease {
                    token: &token,
                    owner: &self.owner,
                    expires_at,
                    attempts,
                },
            )
            .await?;
        claim_txn.commit().await?;

        let deadline = started + (self.tuning.lease - self.tuning.lease_headroom);
        let span = tracing::info_span!("outbox.batch", queue = %self.queue, handler = %self.handler,
            partition, first_seq = first.seq, last_seq = last.seq, attempt = attempts + 1, mode = "leased");
        async {
            let full = batch.len() == self.tuning.batch_size as usize;
            let mut processed = cur.processed_seq;
            let mut failure: Option<(usize, HandlerError)> = None;
            let mut interrupted = false;
            for (i, m) in batch.iter().enumerate() {
                if !self.mine(m) {
                    processed = m.seq;
                    continue;
                }
                if self.cancel.is_cancelled() {
                    interrupted = true;
                    break;
                }
                let attempt = if i == 0 { attempts as u64 + 1 } else { 1 };
                let msg = m.clone().into_message(&self.queue, partition, attempt);
                let ctx = LeaseContext {
                    queue: self.queue.clone(),
                    handler: self.handler.clone(),
                    partition,
                    seq: m.seq,
                    attempt,
                    deadline,
                    lease_expires_at_ms: expires_at,
                };
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let result = if left.is_zero() {
                    Err(Failure::Handler(HandlerError::retry(
                        "lease deadline reached before the handler started",
                    )))
                } else {
                    crate::metrics::timed(
                        &self.queue,
                        &self.handler,
                        &msg,
                        self.call(f(&msg, &ctx), left),
                    )
                    .await
                };
                match result {
                    Ok(()) => processed = m.seq,
                    Err(Failure::Interrupted) => {
                        interrupted = true;
                        break;
                    }
                    Err(Failure::Handler(e)) => {
                        failure = Some((i, e));
                        break;
                    }
                }
            }
            let head_attempts = if processed == cur.processed_seq {
                attempts
            } else {
                0
            };
            let had_failure = failure.is_some();
            let acked = match failure {
                Some((i, err)) => {
                    let failed = &batch[i];
                    let (u, dead) = self.after_failure(processed, failed, head_attempts + 1, &err);
                    self.log_failure(partition, failed, &u, dead, &err);
                    let txn = store.begin_write().await?;
                    let ok = store
                        .update_cursor(
                            &*txn,
                            &self.queue,
                            &self.handler,
                            partition,
                            &u,
                            Some(&token),
                        )
                        .await?;
                    if ok && dead {
                        store
                            .insert_dead_letter(
                                &*txn,
                                &self.queue,
                                partition,
                                &self.handler,
                                failed,
                                &err_text(&err),
                                head_attempts + 1,
                            )
                            .await?;
                    }
                    txn.commit().await?;
                    ok
                }
                None => {
                    let u = CursorUpdate {
                        processed_seq: processed,
                        attempts: head_attempts,
                        retry_at: 0,
                        blocked: false,
                        last_error: None,
                    };
                    let _gate = store.write_guard().await;
                    store
                        .update_cursor(
                            &store.db,
                            &self.queue,
                            &self.handler,
                            partition,
                            &u,
                            Some(&token),
                        )
                        .await?
                }
            };
            if !acked {
                tracing::warn!(queue = %self.queue, handler = %self.handler, partition,
                    "lease lost before the ack; the batch will be redelivered");
                return Ok(Step::Done);
            }
            self.shared
                .acked((processed - cur.processed_seq).max(0) as u64);
            crate::metrics::handled(
                &self.queue,
                &self.handler,
                (processed - cur.processed_seq).max(0) as u64,
            );
            Ok(if interrupted {
                Step::Done
            } else if full || had_failure {
                Step::More
            } else {
                Step::Done
            })
        }
        .instrument(span)
        .await
    }
}

fn err_text(e: &HandlerError) -> String {
    full_chain(e.reason())
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

/// A lease token: 128 random bits, not derivable from ids.
fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}
