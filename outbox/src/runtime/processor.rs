//! Processors: per handler, a dispatcher finds partitions with work and runs one batch task per
//! partition at a time; the batch runs in the handler's mode (transactional or leased).

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
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
use crate::handler::{
    Call, HandlerFuture, Lease, LeaseContext, LeaseState, LeasedBatchFn, LeasedFn, Mode, TxBatchFn,
    TxFn,
};
use crate::metrics;
use crate::profile::Tuning;
use crate::queue::Message;
use crate::queue::PoisonPolicy;
use crate::storage::{CursorRow, CursorUpdate, NewLease, StoredMessage, WriteTxn, now_ms};

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
    /// The dispatcher left ready partitions behind for lack of a slot.
    pub(crate) starved: AtomicBool,
    pub(crate) tracker: TaskTracker,
    pub(crate) cancel: CancellationToken,
    pub(crate) hard: CancellationToken,
}

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
        let mut left_behind = false;
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
                // Every slot is busy; the next task to finish wakes us.
                self.starved.store(true, Ordering::SeqCst);
                left_behind = true;
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
                let worked = this.drain_partition(rp.partition).await;
                if let Ok(mut set) = this.in_flight.lock() {
                    set.remove(&rp.partition);
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
        if left_behind && self.slots.available_permits() > 0 {
            // A task finished between the failed acquire and the flag: look again now.
            return Ok(Next::More);
        }
        Ok(match due {
            Some(t) => Next::After(Duration::from_millis((t - now).max(1) as u64)),
            None => Next::Idle,
        })
    }

    /// Runs batches of one partition until it is drained, blocked or taken elsewhere; returns
    /// whether it did anything.
    async fn drain_partition(&self, partition: u32) -> bool {
        let mut worked = false;
        let mut limit_once = None;
        let mut error_delay = Duration::from_millis(100);
        while !self.cancel.is_cancelled() {
            let res = match &self.mode {
                Mode::Transactional(f) => {
                    self.transactional_batch(f, partition, &mut limit_once)
                        .await
                }
                Mode::Leased(f) => self.leased_batch(f, partition, &mut limit_once).await,
            };
            match res {
                Ok(Step::More) => worked = true,
                Ok(Step::Done) => return true,
                Ok(Step::Idle) => return worked,
                Err(e) => {
                    worked = true;
                    tracing::warn!(queue = %self.queue, handler = %self.handler, partition, error = %e,
                        retry_in = ?error_delay, "batch failed; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return worked,
                        _ = tokio::time::sleep(error_delay) => {}
                    }
                    error_delay = (error_delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        worked
    }

    /// Runs one transactional handler call with its time limit.
    async fn call(&self, fut: HandlerFuture<'_>, limit: Duration) -> Result<(), Failure> {
        self.guarded(fut, tokio::time::sleep(limit), || {
            format!("handler did not finish within {limit:?}")
        })
        .await
    }

    /// Runs one leased handler call until the lease's deadline, which `renew` may move.
    async fn call_leased(&self, fut: HandlerFuture<'_>, lease: &Lease) -> Result<(), Failure> {
        let watchdog = async {
            loop {
                let deadline = lease.deadline();
                tokio::time::sleep_until(deadline).await;
                if lease.deadline() <= deadline {
                    return;
                }
            }
        };
        self.guarded(fut, watchdog, || {
            "lease deadline reached (lease end minus headroom)".to_owned()
        })
        .await
    }

    /// Runs a handler future, catching panics, failing it when `limit` completes; hard shutdown
    /// interrupts it.
    async fn guarded(
        &self,
        fut: HandlerFuture<'_>,
        limit: impl std::future::Future<Output = ()>,
        timed_out: impl Fn() -> String,
    ) -> Result<(), Failure> {
        tokio::select! {
            biased;
            _ = self.hard.cancelled() => Err(Failure::Interrupted),
            r = AssertUnwindSafe(fut).catch_unwind() => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(Failure::Handler(e)),
                Err(panic) => Err(Failure::Handler(HandlerError::retry(format!(
                    "handler panicked: {}",
                    panic_message(panic.as_ref())
                )))),
            },
            () = limit => Err(Failure::Handler(HandlerError::retry(timed_out()))),
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

    /// Locks the cursor of `partition` (skipping it if another worker holds it) and reads the
    /// next batch; `None`, with the transaction rolled back, when the partition is blocked,
    /// waiting for a retry, leased by someone else, or has nothing to read.
    async fn claim(
        &self,
        partition: u32,
        limit_once: &mut Option<u32>,
    ) -> Result<Option<Claim>, DbErr> {
        let store = &self.shared.store;
        let txn = store.begin_write().await?;
        let Some(cur) = store
            .lock_cursor(&*txn, &self.queue, &self.handler, partition)
            .await?
        else {
            let _ = txn.rollback().await;
            return Ok(None);
        };
        let now = now_ms();
        if cur.blocked || cur.retry_at > now || cur.lease_expires_at.is_some_and(|e| e > now) {
            let _ = txn.rollback().await;
            return Ok(None);
        }
        let limit = limit_once.take().unwrap_or(self.tuning.batch_size);
        let batch = store
            .read_batch(&*txn, &self.queue, partition, cur.processed_seq, limit)
            .await?;
        if batch.is_empty() {
            let _ = txn.rollback().await;
            return Ok(None);
        }
        Ok(Some(Claim {
            txn,
            cur,
            batch,
            limit,
        }))
    }

    // ------------------------------------------------------------ transactional

    /// One batch in one transaction: lock the cursor, handle messages in order, advance the
    /// cursor in the same commit. On a failure at message `k > 0` the whole transaction rolls
    /// back and the next pass handles exactly the `k` messages that succeeded (their effects
    /// are redone, never kept from a failed batch); a failure of the head is recorded with its
    /// attempt count in a fresh transaction.
    async fn transactional_batch(
        &self,
        f: &Call<TxFn, TxBatchFn>,
        partition: u32,
        limit_once: &mut Option<u32>,
    ) -> Result<Step, DbErr> {
        let store = &self.shared.store;
        let Some(Claim {
            txn,
            cur,
            batch,
            limit,
        }) = self.claim(partition, limit_once).await?
        else {
            return Ok(Step::Idle);
        };
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return Ok(Step::Done);
        };
        let span = tracing::info_span!("outbox.batch", queue = %self.queue, handler = %self.handler,
            partition, first_seq = first.seq, last_seq = last.seq, attempt = cur.attempts + 1, mode = "transactional");
        async {
            let full = batch.len() == limit as usize;
            let mut processed = cur.processed_seq;
            let mut failure = None;
            match f {
                Call::One(f) => {
                    for (i, m) in batch.iter().enumerate() {
                        if !self.mine(m) {
                            processed = m.seq;
                            continue;
                        }
                        let attempt = if i == 0 { cur.attempts as u64 + 1 } else { 1 };
                        let msg = m.clone().into_message(&self.queue, partition, attempt);
                        let call = self.call(f(&msg, &txn), self.tuning.handler_timeout);
                        match metrics::timed(&self.queue, &self.handler, &msg, call).await {
                            Ok(()) => processed = m.seq,
                            Err(e) => {
                                failure = Some((i, e));
                                break;
                            }
                        }
                    }
                }
                Call::Many(f) => {
                    let msgs = self.messages(&batch, partition, cur.attempts);
                    let res = match msgs.first() {
                        None => Ok(()),
                        Some(head) => {
                            let call = self.call(f(&msgs, &txn), self.tuning.handler_timeout);
                            metrics::timed(&self.queue, &self.handler, head, call).await
                        }
                    };
                    match res {
                        Ok(()) => processed = last.seq,
                        // Alone: the head's failure. Several: split the batch to find it.
                        Err(e) => {
                            failure = Some((if batch.len() == 1 { 0 } else { batch.len() / 2 }, e))
                        }
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
                    metrics::handled(&self.queue, &self.handler, batch.len() as u64);
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
        metrics::failed(&self.queue, &self.handler, dead, u.blocked);
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
    async fn leased_batch(
        &self,
        f: &Call<LeasedFn, LeasedBatchFn>,
        partition: u32,
        limit_once: &mut Option<u32>,
    ) -> Result<Step, DbErr> {
        let store = &self.shared.store;
        let Some(Claim {
            txn: claim_txn,
            cur,
            batch,
            limit,
        }) = self.claim(partition, limit_once).await?
        else {
            return Ok(Step::Idle);
        };
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
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

        let lease = Arc::new(Lease {
            shared: self.shared.clone(),
            token: token.clone(),
            length: self.tuning.lease,
            headroom: self.tuning.lease_headroom,
            state: Mutex::new(LeaseState {
                deadline: started + (self.tuning.lease - self.tuning.lease_headroom),
                expires_at_ms: expires_at,
            }),
        });
        let span = tracing::info_span!("outbox.batch", queue = %self.queue, handler = %self.handler,
            partition, first_seq = first.seq, last_seq = last.seq, attempt = attempts + 1, mode = "leased");
        async {
            let full = batch.len() == limit as usize;
            let mut processed = cur.processed_seq;
            let mut failure: Option<(usize, HandlerError)> = None;
            let mut interrupted = false;
            let ctx_for = |seq: i64, attempt: u64| LeaseContext {
                queue: self.queue.clone(),
                handler: self.handler.clone(),
                partition,
                seq,
                attempt,
                lease: lease.clone(),
            };
            let one = match f {
                Call::One(one) => Some(one),
                Call::Many(many) => {
                    let msgs = self.messages(&batch, partition, attempts);
                    let result = match msgs.first() {
                        None => Ok(()),
                        Some(m) => {
                            let ctx = ctx_for(m.seq, m.attempt);
                            let call = self.call_leased(many(&msgs, &ctx), &lease);
                            metrics::timed(&self.queue, &self.handler, m, call).await
                        }
                    };
                    match result {
                        Ok(()) => processed = last.seq,
                        Err(Failure::Interrupted) => interrupted = true,
                        Err(Failure::Handler(e)) if batch.len() == 1 => failure = Some((0, e)),
                        Err(Failure::Handler(_)) => {
                            // Split the batch to find the failing message: give the lease
                            // back without progress and claim the first half next.
                            self.ack_lease(partition, &token, cur.processed_seq, attempts)
                                .await?;
                            *limit_once = Some((batch.len() / 2) as u32);
                            return Ok(Step::More);
                        }
                    }
                    None
                }
            };
            for (i, m) in batch.iter().enumerate() {
                let Some(f) = one else { break };
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
                let ctx = ctx_for(m.seq, attempt);
                let result = if lease.deadline() <= tokio::time::Instant::now() {
                    Err(Failure::Handler(HandlerError::retry(
                        "lease deadline reached before the handler started",
                    )))
                } else {
                    let call = self.call_leased(f(&msg, &ctx), &lease);
                    metrics::timed(&self.queue, &self.handler, &msg, call).await
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
                    self.ack_lease(partition, &token, processed, head_attempts)
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
            metrics::handled(
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

impl Processor {
    /// The messages of `batch` this handler should see, with their attempt numbers (the head
    /// carries the cursor's failed attempts).
    fn messages(
        &self,
        batch: &[StoredMessage],
        partition: u32,
        head_attempts: i64,
    ) -> Vec<Message> {
        batch
            .iter()
            .enumerate()
            .filter(|(_, m)| self.mine(m))
            .map(|(i, m)| {
                let attempt = if i == 0 { head_attempts as u64 + 1 } else { 1 };
                m.clone().into_message(&self.queue, partition, attempt)
            })
            .collect()
    }
}

impl Processor {
    /// Records a leased batch's progress (no failure) and gives the lease back, fenced by its
    /// token and expiry; false if the lease was lost meanwhile.
    async fn ack_lease(
        &self,
        partition: u32,
        token: &str,
        processed: i64,
        attempts: i64,
    ) -> Result<bool, DbErr> {
        let store = &self.shared.store;
        let u = CursorUpdate {
            processed_seq: processed,
            attempts,
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
                Some(token),
            )
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

#[cfg(test)]
mod token_tests {
    #[test]
    fn lease_tokens_are_unique_and_128_bits() {
        let tokens: std::collections::HashSet<String> =
            (0..10_000).map(|_| super::new_token()).collect();
        assert_eq!(tokens.len(), 10_000);
        assert!(
            tokens
                .iter()
                .all(|t| t.len() == 32 && t.chars().all(|c| c.is_ascii_hexdigit()))
        );
    }
}
