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

/// Why a step runs. Only a step after a quiet wait may skip work that nothing can have
/// changed (see [`Wake::files_quiet_since`](super::wake::Wake::files_quiet_since)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The first step, a wake-up, more work, or a retry after an error.
    Nudged,
    /// The wait after [`Next::Idle`] or [`Next::After`] ran out without a wake-up.
    Timer,
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
    F: FnMut(Cause) -> Fut,
    Fut: Future<Output = Result<Next, sea_orm::DbErr>>,
{
    let mut error_delay = pacing.error_min;
    let mut failures: u64 = 0;
    let mut cause = Cause::Nudged;
    while !cancel.is_cancelled() {
        let outcome = AssertUnwindSafe(step(cause)).catch_unwind().await;
        cause = Cause::Nudged;
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
            _ = tokio::time::sleep(wait) => cause = Cause::Timer,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::time::Instant;

    use super::*;

    const PACING: Pacing = Pacing {
        poll: Duration::from_secs(10),
        error_min: Duration::from_millis(100),
        error_max: Duration::from_millis(400),
    };

    /// Runs a scripted worker; returns the paused-clock offsets of its calls.
    async fn script(
        outcomes: Vec<Result<Next, &'static str>>,
        wake: Arc<Notify>,
        run_for: Duration,
    ) -> Vec<Duration> {
        script_causes(outcomes, wake, run_for)
            .await
            .into_iter()
            .map(|(at, _)| at)
            .collect()
    }

    /// Runs a scripted worker; returns the paused-clock offsets of its calls and why each ran.
    async fn script_causes(
        outcomes: Vec<Result<Next, &'static str>>,
        wake: Arc<Notify>,
        run_for: Duration,
    ) -> Vec<(Duration, Cause)> {
        let start = Instant::now();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let cancel = CancellationToken::new();
        let (c, script) = (calls.clone(), Arc::new(Mutex::new(outcomes.into_iter())));
        let task = tokio::spawn(run(
            "test",
            move |cause| {
                let (c, script) = (c.clone(), script.clone());
                async move {
                    c.lock().expect("test").push((start.elapsed(), cause));
                    let next = script.lock().expect("test").next();
                    match next {
                        Some(Ok(n)) => Ok(n),
                        Some(Err("panic")) => panic!("step panicked"),
                        Some(Err(e)) => Err(sea_orm::DbErr::Custom(e.into())),
                        None => Ok(Next::Idle),
                    }
                }
            },
            wake,
            PACING,
            cancel.clone(),
        ));
        tokio::time::sleep(run_for).await;
        cancel.cancel();
        task.await.expect("test");
        calls.lock().expect("test").clone()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn errors_and_panics_retry_on_a_timer_with_backoff() {
        let calls = script(
            vec![
                Err("db down"),
                Err("panic"),
                Err("db down"),
                Err("db down"),
                Ok(Next::Idle),
            ],
            Arc::new(Notify::new()),
            ms(2_000),
        )
        .await;
        // No wake-up is sent: each retry comes from the timer, doubling up to the cap.
        assert_eq!(calls, [ms(0), ms(100), ms(300), ms(700), ms(1_100)]);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_a_wake_up_or_the_poll_interval() {
        let wake = Arc::new(Notify::new());
        // A wake-up sent before the worker waits is kept (stored permit), not lost.
        wake.notify_one();
        let calls = script(vec![Ok(Next::Idle), Ok(Next::Idle)], wake, ms(25_000)).await;
        assert_eq!(calls, [ms(0), ms(0), ms(10_000), ms(20_000)]);
    }

    #[tokio::test(start_paused = true)]
    async fn more_runs_at_once_and_after_waits_at_most_its_delay() {
        let calls = script(
            vec![
                Ok(Next::More),
                Ok(Next::After(ms(250))),
                Ok(Next::After(ms(60_000))),
            ],
            Arc::new(Notify::new()),
            ms(15_000),
        )
        .await;
        // `After` is capped by the poll interval.
        assert_eq!(calls, [ms(0), ms(0), ms(250), ms(10_250)]);
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_wait_that_ran_out_counts_as_a_timer() {
        let wake = Arc::new(Notify::new());
        let w = wake.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ms(3_000)).await;
            w.notify_one();
        });
        let calls = script_causes(
            vec![
                Err("db down"),
                Ok(Next::More),
                Ok(Next::Idle),
                Ok(Next::After(ms(500))),
                Ok(Next::Idle),
            ],
            wake,
            ms(12_000),
        )
        .await;
        use Cause::{Nudged, Timer};
        assert_eq!(
            calls,
            [
                (ms(0), Nudged),     // the first step
                (ms(100), Nudged),   // a retry after an error
                (ms(100), Nudged),   // more work
                (ms(3_000), Nudged), // woken while idle
                (ms(3_500), Timer),  // `After` ran out
            ]
        );
    }
}
