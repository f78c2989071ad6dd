//! The lease of a leased handler's batch, from take to ack, in one place.
//!
//! - **Take**: [`Lease::take`] writes a fresh token and the expiry (database clock) on the
//!   cursor row, inside the claim transaction that locked it.
//! - **Run**: the handler is cancelled when [`Lease::expired`] fires, at the lease's end minus
//!   the headroom kept for the ack.
//! - **Renew**: [`Lease::renew`] (through [`LeaseContext::renew`](crate::LeaseContext::renew))
//!   moves the expiry and the deadline, only while the lease is still held.
//! - **Ack or release**: the cursor write that records progress or a failure is guarded by
//!   [`Lease::fence`], so it lands only while the token is still on the row and unexpired.
//!   Giving the lease back (shutdown, a failure to retry) is the same guarded write with the
//!   progress made so far; it clears the token.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sea_orm::{ConnectionTrait, DbErr};
use tokio::time::Instant;

use super::Shared;
use crate::profile::Tuning;
use crate::storage::{CursorKey, Fence, now_ms};

/// The lease of one batch, shared by the contexts of its messages.
pub(crate) struct Lease {
    shared: Arc<Shared>,
    queue: Arc<str>,
    handler: Arc<str>,
    partition: u32,
    token: String,
    length: Duration,
    headroom: Duration,
    state: Mutex<LeaseState>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseState {
    /// When the handler is cancelled: lease end minus headroom.
    pub(crate) deadline: Instant,
    pub(crate) expires_at_ms: i64,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("length", &self.length)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Takes the lease of the cursor `(queue, handler, partition)`, locked by the claim
    /// transaction `c`, for `tuning.lease`, recording the head's failed `attempts`. It holds
    /// once `c` commits.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn take<C: ConnectionTrait>(
        shared: &Arc<Shared>,
        c: &C,
        queue: &Arc<str>,
        handler: &Arc<str>,
        partition: u32,
        owner: &str,
        tuning: &Tuning,
        attempts: i64,
    ) -> Result<Arc<Lease>, DbErr> {
        let token = super::processor::new_token();
        let started = Instant::now();
        let key = CursorKey {
            queue,
            handler,
            partition,
        };
        shared
            .store
            .take_lease(c, key, &token, owner, tuning.lease, attempts)
            .await?;
        Ok(Arc::new(Lease {
            shared: shared.clone(),
            queue: queue.clone(),
            handler: handler.clone(),
            partition,
            token,
            length: tuning.lease,
            headroom: tuning.lease_headroom,
            state: Mutex::new(LeaseState {
                deadline: started + tuning.lease.saturating_sub(tuning.lease_headroom),
                expires_at_ms: now_ms() + tuning.lease.as_millis() as i64,
            }),
        }))
    }

    /// The store of the runtime that holds the lease.
    pub(crate) fn store(&self) -> &crate::storage::Store {
        &self.shared.store
    }

    pub(crate) fn state(&self) -> LeaseState {
        match self.state.lock() {
            Ok(s) => *s,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.state().deadline
    }

    /// Completes at the deadline, or at a later one if [`renew`](Lease::renew) moved it.
    pub(crate) async fn expired(&self) {
        loop {
            let deadline = self.deadline();
            tokio::time::sleep_until(deadline).await;
            if self.deadline() <= deadline {
                return;
            }
        }
    }

    /// Extends the lease by its full length from now (database clock); false when it had
    /// expired or changed hands (a renewal never resurrects a lost lease).
    pub(crate) async fn renew(&self) -> Result<bool, DbErr> {
        let expires_at_ms = now_ms() + self.length.as_millis() as i64;
        let started = Instant::now();
        let key = CursorKey {
            queue: &self.queue,
            handler: &self.handler,
            partition: self.partition,
        };
        let renewed = self
            .shared
            .store
            .renew_lease(key, &self.token, self.length)
            .await?;
        if renewed && let Ok(mut s) = self.state.lock() {
            s.deadline = started + self.length.saturating_sub(self.headroom);
            s.expires_at_ms = expires_at_ms;
        }
        Ok(renewed)
    }

    /// The guard of the ack: the cursor still holds this lease, unexpired. On a single-writer
    /// backend (SQLite) the ack may wait behind the engine's own writer, so it is judged by
    /// when it was asked for (one host, one clock); elsewhere the database's clock judges it
    /// when it runs.
    pub(crate) fn fence(&self) -> Fence<'_> {
        Fence::Lease {
            token: &self.token,
            judged_at: self.shared.store.dialect.single_writer().then(now_ms),
        }
    }
}
