//! The one worker loop shared by the sequencer, the handler dispatchers and vacuum.
//!
//! A step reports what happened; the loop decides the timing: run again at once after
//! [`Next::More`], wait for a wake-up or the poll interval after [`Next::Idle`], wait at most
//! `d` after [`Next::After`]. A database error or a panic in a step is logged and retried on a
//! timer with exponential backoff; it never waits for a notification that may not come.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What a step found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// There is more work: run again now.
    More,
    /// Nothing to do: wait for a wake-up or the poll interval.
    Idle,
    /// Something becomes due after this delay (or earlier on a wake-up).
    After(Duration),
}

/// Timing of one worker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pacing {
    pub(crate) poll: Duration,
    pub(crate) error_min: Duration,
    pub(crate) error_max: Duration,
}

/// Runs `step` until `cancel` fires.
pub(crate) async fn run<F, Fut>(
    name: &str,
    mut step: F,
    wake: Arc<Notify>,
    pacing: Pacing,
    cancel: CancellationToken,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Next, sea_orm::DbErr>>,
{
    let mut error_delay = pacing.error_min;
    let mut failures: u64 = 0;
    while !cancel.is_cancelled() {
        let outcome = AssertUnwindSafe(step()).catch_unwind().await;
        let wait = match outcome {
            Ok(Ok(next)) => {
                if failures > 0 {
                    tracing::info!(worker = name, failures, "worker recovered");
                }
                failures = 0;
                error_delay = pacing.error_min;
                match next {
                    Next::More => {
                        tokio::task::yield_now().await;
                        continue;
                    }
                    Next::Idle => pacing.poll,
                    Next::After(d) => d.min(pacing.poll),
                }
            }
            failed => {
                if cancel.is_cancelled() {
                    break;
                }
                failures += 1;
                match failed {
                    Ok(Err(e)) => {
                        tracing::warn!(worker = name, error = %e, retry_in = ?error_delay, "worker step failed")
                    }
                    _ => {
                        tracing::error!(worker = name, retry_in = ?error_delay, "worker step panicked")
                    }
                }
                let delay = error_delay;
                error_delay = (error_delay * 2).min(pacing.error_max);
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
