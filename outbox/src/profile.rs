//! Named profiles and the knobs they set; per-queue and per-handler overrides.

use std::time::Duration;

use crate::error::RegistryProblem;

/// A validated set of knobs for the whole runtime. Queue and handler [`Overrides`] win over it.
///
/// | knob | `Default` | `LowLatency` | `HighThroughput` | `Relaxed` |
/// |---|---|---|---|---|
/// | handler batch size | 100 | 16 | 500 | 100 |
/// | partitions in flight per handler | 2 | 2 | 2 | 1 |
/// | poll interval (no notification) | 500 ms | 50 ms | 1 s | 5 s |
/// | messages sequenced per transaction | 5000 | 1000 | 5000 | 5000 |
/// | max attempts | 10 | 10 | 10 | 10 |
/// | retry backoff | 1 s .. 5 min | 100 ms .. 1 min | 1 s .. 5 min | 5 s .. 30 min |
/// | lease / headroom | 30 s / 2 s | 30 s / 2 s | 60 s / 5 s | 60 s / 5 s |
/// | vacuum interval | 5 s | 2 s | 5 s | 30 s |
/// | PostgreSQL NOTIFY coalescing | 1 ms | none | 5 ms | 1 ms |
///
/// On PostgreSQL wake-ups come from LISTEN/NOTIFY, so polling is only a safety net there and
/// runs at most once a second whatever the profile says; on SQLite and MySQL/MariaDB another
/// process's messages are found by polling at this interval (messages of this process wake the
/// workers at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Profile {
    /// Balanced: drains a backlog quickly and stays cheap when idle.
    #[default]
    Default,
    /// Small batches and a short poll interval, for interactive work.
    LowLatency,
    /// Large batches for draining backlogs.
    HighThroughput,
    /// Long intervals for background work on a shared database.
    Relaxed,
}

/// The knobs a handler runs with, after the profile and overrides are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tuning {
    /// Messages read and handled per batch (one transaction for transactional handlers).
    pub batch_size: u32,
    /// Partitions of one handler processed at once by this process.
    pub concurrency: u32,
    /// How often idle workers look for work that no notification announced.
    pub poll_interval: Duration,
    /// Failed attempts after which a message is dead-lettered (or blocks, per queue policy).
    pub max_attempts: u32,
    /// First retry delay; doubles with each attempt, with jitter.
    pub backoff_base: Duration,
    /// Largest retry delay.
    pub backoff_max: Duration,
    /// Lease of a leased handler's batch.
    pub lease: Duration,
    /// Time reserved for the ack: the handler is cancelled at `lease - lease_headroom`.
    pub lease_headroom: Duration,
    /// Time limit of one transactional handler call.
    pub handler_timeout: Duration,
}

/// Knobs of the runtime's shared workers (sequencer and vacuum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RuntimeTuning {
    /// Messages sequenced per transaction, the oldest first across all queues and partitions.
    pub sequencer_batch: u32,
    /// How often vacuum runs when few messages are acked.
    pub vacuum_interval: Duration,
    /// Acked messages after which vacuum runs early.
    pub vacuum_after_acks: u64,
    /// Rows deleted per vacuum statement.
    pub vacuum_chunk: u32,
    /// PostgreSQL: at most one enqueue per this window in a process carries the NOTIFY that
    /// wakes other processes; the rest are covered by it, by later traffic or by one trailing
    /// notification. Notifying transactions commit one at a time, so this keeps concurrent
    /// producers' group commit. Zero: every enqueue notifies.
    pub notify_coalesce: Duration,
    /// First delay before a worker retries after a database error.
    pub error_backoff_min: Duration,
    /// Largest delay before a worker retries after a database error.
    pub error_backoff_max: Duration,
    /// SQLite only: the longest a transactional batch may hold the database's single write
    /// lock. Producers wait for that lock (up to their connection's busy timeout, 5 s by
    /// default, see `outbox::sqlite::connect_options`), so this stays well below it: a batch
    /// stops taking messages at half of it, and a handler still running at the limit fails as
    /// a counted attempt. Put slow work in leased handlers, which hold no lock.
    pub sqlite_write_hold: Duration,
    /// How often a running process records, per handler it serves, that it is alive. Status
    /// marks a handler stale after three intervals without one.
    pub heartbeat_interval: Duration,
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

impl Profile {
    /// The handler knobs of this profile.
    pub const fn tuning(self) -> Tuning {
        let base = Tuning {
            batch_size: 100,
            concurrency: 2,
            poll_interval: ms(500),
            max_attempts: 10,
            backoff_base: ms(1_000),
            backoff_max: ms(300_000),
            lease: ms(30_000),
            lease_headroom: ms(2_000),
            handler_timeout: ms(30_000),
        };
        match self {
            Profile::Default => base,
            Profile::LowLatency => Tuning {
                batch_size: 16,
                poll_interval: ms(50),
                backoff_base: ms(100),
                backoff_max: ms(60_000),
                ..base
            },
            Profile::HighThroughput => Tuning {
                batch_size: 500,
                poll_interval: ms(1_000),
                lease: ms(60_000),
                lease_headroom: ms(5_000),
                handler_timeout: ms(60_000),
                ..base
            },
            Profile::Relaxed => Tuning {
                concurrency: 1,
                poll_interval: ms(5_000),
                backoff_base: ms(5_000),
                backoff_max: ms(1_800_000),
                lease: ms(60_000),
                lease_headroom: ms(5_000),
                ..base
            },
        }
    }

    /// The sequencer and vacuum knobs of this profile.
    pub const fn runtime(self) -> RuntimeTuning {
        let base = RuntimeTuning {
            sequencer_batch: 5_000,
            vacuum_interval: ms(5_000),
            vacuum_after_acks: 10_000,
            vacuum_chunk: 5_000,
            notify_coalesce: ms(1),
            error_backoff_min: ms(100),
            error_backoff_max: ms(5_000),
            sqlite_write_hold: ms(2_000),
            heartbeat_interval: ms(10_000),
        };
        match self {
            Profile::Default => base,
            Profile::LowLatency => RuntimeTuning {
                sequencer_batch: 1_000,
                vacuum_interval: ms(2_000),
                notify_coalesce: Duration::ZERO,
                ..base
            },
            Profile::HighThroughput => RuntimeTuning {
                sequencer_batch: 5_000,
                vacuum_after_acks: 50_000,
                notify_coalesce: ms(5),
                ..base
            },
            Profile::Relaxed => RuntimeTuning {
                vacuum_interval: ms(30_000),
                ..base
            },
        }
    }
}

/// Knobs set on one queue or one handler; `None` keeps the value from the level above
/// (profile ← queue ← handler).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Overrides {
    /// See [`Tuning::batch_size`].
    pub batch_size: Option<u32>,
    /// See [`Tuning::concurrency`].
    pub concurrency: Option<u32>,
    /// See [`Tuning::poll_interval`].
    pub poll_interval: Option<Duration>,
    /// See [`Tuning::max_attempts`].
    pub max_attempts: Option<u32>,
    /// See [`Tuning::backoff_base`].
    pub backoff_base: Option<Duration>,
    /// See [`Tuning::backoff_max`].
    pub backoff_max: Option<Duration>,
    /// See [`Tuning::lease`].
    pub lease: Option<Duration>,
    /// See [`Tuning::lease_headroom`].
    pub lease_headroom: Option<Duration>,
    /// See [`Tuning::handler_timeout`].
    pub handler_timeout: Option<Duration>,
}

macro_rules! setters {
    ($($name:ident: $ty:ty),* $(,)?) => {
        impl Overrides {
            /// No overrides.
            pub const NONE: Overrides = Overrides {
                $($name: None,)*
            };
            $(
                #[doc = concat!("Sets [`Tuning::", stringify!($name), "`].")]
                pub const fn $name(mut self, value: $ty) -> Self {
                    self.$name = Some(value);
                    self
                }
            )*
        }

        impl Tuning {
            /// This tuning with `o`'s values where it sets them.
            pub fn with(mut self, o: &Overrides) -> Tuning {
                $(if let Some(v) = o.$name { self.$name = v; })*
                self
            }
        }
    };
}

setters! {
    batch_size: u32,
    concurrency: u32,
    poll_interval: Duration,
    max_attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    lease: Duration,
    lease_headroom: Duration,
    handler_timeout: Duration,
}

impl Tuning {
    /// Every out-of-range knob, described for `owner` (a queue or handler name).
    pub(crate) fn problems(&self, owner: &str) -> Vec<RegistryProblem> {
        let mut out = Vec::new();
        let mut bad = |ok: bool, what: String| {
            if !ok {
                out.push(RegistryProblem::InvalidTuning(format!("{owner}: {what}")));
            }
        };
        bad(
            (1..=10_000).contains(&self.batch_size),
            format!("batch_size {} must be 1 to 10000", self.batch_size),
        );
        bad(
            (1..=256).contains(&self.concurrency),
            format!("concurrency {} must be 1 to 256", self.concurrency),
        );
        bad(
            self.max_attempts >= 1,
            "max_attempts must be at least 1".into(),
        );
        bad(
            self.poll_interval >= ms(1),
            "poll_interval must be at least 1 ms".into(),
        );
        bad(
            self.backoff_base <= self.backoff_max,
            format!(
                "backoff_base {:?} must not exceed backoff_max {:?}",
                self.backoff_base, self.backoff_max
            ),
        );
        bad(
            self.lease_headroom < self.lease,
            format!(
                "lease_headroom {:?} must be shorter than lease {:?}",
                self.lease_headroom, self.lease
            ),
        );
        bad(
            self.handler_timeout >= ms(1),
            "handler_timeout must be at least 1 ms".into(),
        );
        out
    }

    /// Retry delay after the `attempts`-th failure: `base * 2^(attempts-1)` capped at `max`,
    /// then a random point in its upper half (jitter).
    pub fn backoff(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(32);
        let raw = self
            .backoff_base
            .saturating_mul(1u32 << exp.min(31))
            .min(self.backoff_max);
        let half = raw / 2;
        let jitter = rand::random_range(0.0..=1.0f64);
        half + half.mul_f64(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_is_valid() {
        for p in [
            Profile::Default,
            Profile::LowLatency,
            Profile::HighThroughput,
            Profile::Relaxed,
        ] {
            assert_eq!(p.tuning().problems("p"), vec![], "{p:?}");
        }
    }

    #[test]
    fn overrides_win_and_invalid_values_are_reported() {
        let t = Profile::Default
            .tuning()
            .with(&Overrides::NONE.batch_size(0).lease(ms(1_000)));
        assert_eq!(t.batch_size, 0);
        let problems = t.problems("q");
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered_within_bounds() {
        let t = Profile::Default
            .tuning()
            .with(&Overrides::NONE.backoff_base(ms(100)).backoff_max(ms(1_000)));
        for attempts in 1..40u32 {
            let d = t.backoff(attempts);
            let raw = ms(100)
                .saturating_mul(1 << (attempts - 1).min(31))
                .min(ms(1_000));
            assert!(
                d >= raw / 2 && d <= raw,
                "attempt {attempts}: {d:?} vs {raw:?}"
            );
        }
    }
}
