//! The sequencer: moves committed messages from `incoming` to `outgoing` with dense
//! per-partition sequence numbers, the oldest first, across all queues in one transaction per
//! pass (see `storage/sequence.rs`).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sea_orm::DbErr;
use tokio::time::Instant;
use tracing::field::Empty;

use super::Shared;
use super::worker::Next;

/// Pause when the oldest rows all belong to partitions another sequencer holds.
const HELD_ELSEWHERE: Duration = Duration::from_millis(5);

/// Size of the first pass over a backlog. Passes double while they come back full, up to the
/// configured batch: handlers get their first messages after a short transaction, and a long
/// backlog is still moved in large ones.
const FIRST_PASS: u32 = 500;

/// How often the low-water mark is looked at (two small reads of `pg_locks` and one of
/// `incoming`): rows moved in between are the most the scan walks past again.
const LOW_WATER_EVERY: Duration = Duration::from_millis(100);

/// The most often a sequencer marks its passes as a change in the database (see [`Marks`]).
const MARK_AT_MOST_EVERY: Duration = Duration::from_millis(10);

pub(crate) struct Sequencer {
    shared: Arc<Shared>,
    max: u32,
    poll: Duration,
    limit: AtomicU32,
    low_water: Mutex<LowWater>,
    marks: Mutex<Marks>,
}

/// MySQL/MariaDB: after passes that moved rows, the sequencer bumps a count in the database
/// ([`Store::mark_changed`](crate::storage::Store::mark_changed)) that idle handlers read, one
/// row, before they read all their cursors: handlers of this process are woken directly, but
/// those of another process would otherwise have to scan at every poll (at 4,096 partitions
/// and 10 handlers, 16% of a core of the database server). On PostgreSQL the pass notifies
/// every process's handlers of its queues (NOTIFY), which wakes them to scan, so it marks
/// nothing.
///
/// The mark follows the pass's commit, so a handler that sees it scans after the rows are
/// visible. Under load it goes out at most every [`MARK_AT_MOST_EVERY`]; a pass that moved
/// rows meanwhile leaves it pending, and the next pass sends it (a pass that moves nothing
/// included, so the end of a burst is marked too).
#[derive(Debug, Default)]
struct Marks {
    pending: bool,
    last: Option<Instant>,
    /// A failure to mark was logged as a warning (later ones go to debug).
    warned: bool,
}

/// PostgreSQL: the id below which the scan of `incoming` need not look.
///
/// Every pass reads the oldest rows of `incoming` by id. Moved rows are deleted, and while any
/// transaction of the database holds an old snapshot (a `REPEATABLE READ` report, `pg_dump`)
/// PostgreSQL keeps their index entries, so a scan from the lowest id walks every row moved
/// since that snapshot began: passes grew to 80-100 ms after 300,000 messages. The scan starts
/// above this mark instead.
///
/// The mark may pass an id only when no transaction can still commit a row at or below it.
/// Ids are drawn in time order, and every producer holds a write lock on `incoming` from
/// before its insert draws an id until it ends. So with `upto` the highest id a pass read and
/// `writers` the transactions holding that lock just after it: once all of `writers` have
/// ended, every id up to `upto` is committed (and visible) or gone. The mark then rises to
/// just below the lowest such id still waiting (or to `upto`).
#[derive(Debug, Default)]
struct LowWater {
    floor: i64,
    candidate: Option<Candidate>,
    looked_at: Option<Instant>,
    /// A failure to advance was logged as a warning (later ones go to debug).
    warned: bool,
}

#[derive(Debug)]
struct Candidate {
    upto: i64,
    /// Virtual transaction ids, comma-separated; `None`: no writer at all.
    writers: Option<String>,
}

impl Sequencer {
    pub(crate) fn new(shared: Arc<Shared>, max: u32, poll: Duration) -> Arc<Self> {
        Arc::new(Self {
            shared,
            max,
            poll,
            limit: AtomicU32::new(FIRST_PASS.min(max)),
            low_water: Mutex::default(),
            marks: Mutex::default(),
        })
    }

    /// After a pass (`moved`: it moved rows): marks the change in the database when one is
    /// pending and the last mark is old enough, or the pass moved nothing (see [`Marks`]).
    async fn mark(&self, moved: bool) {
        let store = &self.shared.store;
        // PostgreSQL: the pass itself notified every process's handlers of its queues.
        if !store.marks_changes() || store.dialect.listen_notify() {
            return;
        }
        let send = {
            let Ok(mut m) = self.marks.lock() else {
                return;
            };
            m.pending |= moved;
            let send =
                m.pending && (!moved || m.last.is_none_or(|t| t.elapsed() >= MARK_AT_MOST_EVERY));
            if send {
                m.pending = false;
                m.last = Some(Instant::now());
            }
            send
        };
        if send && let Err(e) = store.mark_changed().await {
            // Other processes' idle handlers then find the rows at their next full read (at
            // least every 10 s); this process's handlers were woken already.
            let first = self
                .marks
                .lock()
                .map(|mut m| {
                    m.pending = true;
                    !std::mem::replace(&mut m.warned, true)
                })
                .unwrap_or(false);
            if first {
                tracing::warn!(error = %e, "sequencer could not mark its pass for other processes; their idle handlers read their cursors at least every 10 s");
            } else {
                tracing::debug!(error = %e, "sequencer could not mark its pass");
            }
        }
    }

    fn floor(&self) -> i64 {
        self.low_water.lock().map_or(0, |l| l.floor)
    }

    /// After a pass that read up to `max_id`: takes a new candidate mark, or raises the floor
    /// to the last one if its writers have ended (see [`LowWater`]). At most every
    /// [`LOW_WATER_EVERY`].
    async fn advance_low_water(&self, max_id: Option<i64>) -> Result<(), DbErr> {
        let store = &self.shared.store;
        let (floor, candidate) = {
            let Ok(mut l) = self.low_water.lock() else {
                return Ok(());
            };
            if l.looked_at.is_some_and(|t| t.elapsed() < LOW_WATER_EVERY) {
                return Ok(());
            }
            l.looked_at = Some(Instant::now());
            (l.floor, l.candidate.take())
        };
        let candidate = match candidate {
            Some(c) => Some(c),
            None => match max_id.filter(|&m| m > floor) {
                // The writers are read after the pass that saw `upto`.
                Some(upto) => Some(Candidate {
                    upto,
                    writers: store.pg_incoming_writers().await?,
                }),
                None => None,
            },
        };
        let Some(c) = candidate else {
            return Ok(());
        };
        let ended = match &c.writers {
            None => true,
            Some(w) => !store.pg_writers_remain(w).await?,
        };
        if !ended {
            if let Ok(mut l) = self.low_water.lock() {
                l.candidate = Some(c);
            }
            return Ok(());
        }
        let waiting = store.pg_first_id_between(floor, c.upto).await?;
        let raised = waiting.map_or(c.upto, |id| id - 1);
        if let Ok(mut l) = self.low_water.lock() {
            l.floor = l.floor.max(raised);
            tracing::trace!(floor = l.floor, upto = c.upto, waiting = ?waiting, "sequencer low-water mark");
        }
        Ok(())
    }

    pub(crate) async fn step(&self) -> Result<Next, DbErr> {
        let limit = self.limit.load(Ordering::Relaxed);
        let span = tracing::debug_span!(
            "outbox.sequence",
            limit,
            scanned = Empty,
            moved = Empty,
            queues = Empty,
            sequenced = Empty,
            otel.status_code = Empty,
            otel.status_message = Empty
        );
        let floor = self.floor();
        // The sequence numbers given are worth their text only to a subscriber that takes
        // the span.
        let detail = !span.is_disabled();
        let pass = crate::trace::traced(
            span.clone(),
            self.shared.store.sequence_pass(limit, floor, detail),
        )
        .await?;
        if self.shared.store.dialect.low_water_mark()
            && let Err(e) = self.advance_low_water(pass.max_id).await
        {
            // The mark only saves work: left where it is, the scan starts lower and still
            // finds every row. The pass itself has committed; its wake-ups below still go out.
            let first = self
                .low_water
                .lock()
                .map(|mut l| !std::mem::replace(&mut l.warned, true))
                .unwrap_or(false);
            if first {
                tracing::warn!(error = %e, "sequencer low-water mark not advanced (reading pg_locks failed); passes read incoming from the mark they have");
            } else {
                tracing::debug!(error = %e, "sequencer low-water mark not advanced");
            }
        }
        span.record("scanned", pass.scanned);
        span.record("moved", pass.moved_total());
        if !pass.moved.is_empty() && !span.is_disabled() {
            // Which queues got how many new sequence numbers, `queue:n` separated by commas.
            let queues: Vec<String> = pass.moved.iter().map(|(q, n)| format!("{q}:{n}")).collect();
            span.record("queues", queues.join(",").as_str());
        }
        if let Some(sequenced) = &pass.sequenced {
            span.record("sequenced", sequenced.as_str());
        }
        for (queue, _) in &pass.moved {
            self.shared.wake.sequenced(queue);
        }
        let moved = pass.moved_total();
        if moved > 0 {
            self.shared.wake.found_work();
        }
        self.mark(moved > 0).await;
        if pass.scanned == u64::from(limit) {
            self.limit
                .store(limit.saturating_mul(2).min(self.max), Ordering::Relaxed);
            return Ok(if moved > 0 {
                Next::More
            } else {
                Next::After(HELD_ELSEWHERE)
            });
        }
        self.limit
            .store(FIRST_PASS.min(self.max), Ordering::Relaxed);
        if pass.scanned > moved {
            // Some rows belong to partitions another process is sequencing right now.
            return Ok(Next::After(HELD_ELSEWHERE));
        }
        Ok(match self.shared.wake.eager_delay(self.poll) {
            Some(d) => Next::After(d),
            None => Next::Idle,
        })
    }
}
