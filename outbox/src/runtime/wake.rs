//! Wake-ups: in-process signals with stored permits, an eager re-check window for enqueues
//! whose commit has not happened yet, and for other processes' commits PostgreSQL
//! LISTEN/NOTIFY, a watch on SQLite's write-ahead log, and quick re-checks after work was found
//! where nothing announces commits (adaptive polling).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// First re-check delay after an in-process enqueue; doubles up to the poll interval.
const EAGER_FIRST: Duration = Duration::from_millis(1);
/// How long after an in-process enqueue the sequencer keeps re-checking quickly. An enqueue
/// signals before its transaction commits; this window covers the usual commit delay, and the
/// poll interval covers any longer one.
const EAGER_WINDOW: Duration = Duration::from_secs(2);
/// How long after a look that found work the sequencer keeps re-checking quickly where no
/// notification announces other processes' commits: producers write in bursts and trickles,
/// and the next commit is likely close behind. The same ramp as [`EAGER_WINDOW`]'s, so the
/// end of a burst costs a few dozen reads of `incoming` and an idle runtime none.
const ACTIVE_WINDOW: Duration = Duration::from_secs(2);
/// How long after a write to the database's files the sequencer keeps re-checking: the write
/// that commits can be seen a moment before the commit itself (SQLite writes the log, then
/// publishes it in its shared-memory index), so one look right away may come too early.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
const WRITE_SEEN_WINDOW: Duration = Duration::from_millis(8);
/// How long before a handler's scan a write to the database's files must have happened for
/// the scan to have seen its commit (see [`Wake::files_quiet_since`]): far more than the
/// moment between SQLite's write of the log and the commit becoming visible, and than the
/// watch's delivery of the event.
const WRITE_SETTLED: Duration = Duration::from_millis(100);
/// How long after this process's own bookkeeping write ends a write seen by the watch is still
/// taken for that write (the watch delivers its events a moment after the write).
const OWN_WRITE_SEEN: Duration = Duration::from_millis(20);

#[derive(Debug)]
struct Eager {
    until: Option<Instant>,
    next_delay: Duration,
}

impl Eager {
    /// Keeps the window open at least `window` from now (never shortens it).
    fn open_for(&mut self, window: Duration) {
        let until = Instant::now() + window;
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
    }
}

/// Every wake-up source of one runtime. `Notify::notify_one` stores a permit, so a signal sent
/// before a worker waits is not lost.
#[derive(Debug)]
pub(crate) struct Wake {
    notified_on_commit: bool,
    pub(crate) sequencer: Arc<Notify>,
    pub(crate) vacuum: Arc<Notify>,
    pub(crate) scheduler: Arc<Notify>,
    eager: Mutex<Eager>,
    handlers: RwLock<HashMap<String, Vec<Arc<Notify>>>>,
    /// When the database's files were last written, once a watch on them runs (SQLite; see
    /// [`watch_files`]); `None` without a watch.
    last_write: Mutex<Option<Instant>>,
    /// This process writes bookkeeping that no poll looks for (the heartbeat) until this
    /// instant (`None`: not now; see [`own_write`](Wake::own_write)).
    own_write_until: Mutex<Option<Instant>>,
}

impl Wake {
    /// `notified_on_commit`: the database announces committed enqueues itself (PostgreSQL's
    /// NOTIFY), so an in-process enqueue needs no eager re-checks.
    pub(crate) fn new(notified_on_commit: bool) -> Self {
        Self {
            notified_on_commit,
            sequencer: Arc::new(Notify::new()),
            vacuum: Arc::new(Notify::new()),
            scheduler: Arc::new(Notify::new()),
            eager: Mutex::new(Eager {
                until: None,
                next_delay: EAGER_FIRST,
            }),
            handlers: RwLock::new(HashMap::new()),
            last_write: Mutex::new(None),
            own_write_until: Mutex::new(None),
        }
    }

    /// Runs `write`, a write of this process's own bookkeeping that no poll looks for (the
    /// heartbeat of its handlers, every 10 s by default), so that what the watch sees of it does
    /// not end a quiet spell: otherwise an idle runtime would read everything again after each
    /// heartbeat. Another process's commit seen in the same moment is taken for it too; the
    /// sequencer still looks at once (every write wakes it), and the polls read at least every
    /// 10 s (handlers) or once a minute (vacuum, gauges).
    pub(crate) async fn own_write<F: std::future::Future>(&self, write: F) -> F::Output {
        if let Ok(mut o) = self.own_write_until.lock() {
            *o = Some(Instant::now() + Duration::from_secs(3_600));
        }
        let out = write.await;
        if let Ok(mut o) = self.own_write_until.lock() {
            *o = Some(Instant::now() + OWN_WRITE_SEEN);
        }
        out
    }

    /// A watch on the database's files now runs: every commit, by any process, is seen as a
    /// write (see [`files_written`](Wake::files_written)).
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn watching_files(&self) {
        if let Ok(mut w) = self.last_write.lock() {
            *w = Some(Instant::now());
        }
    }

    /// Whether the database cannot have changed since a scan that started at `scan`: a watch
    /// on its files runs, and their last write came [`WRITE_SETTLED`] or more before the
    /// scan, so the scan saw that commit. `false` without a watch (a server, a database in
    /// memory): there, only reading tells.
    pub(crate) fn files_quiet_since(&self, scan: Instant) -> bool {
        self.last_write
            .lock()
            .ok()
            .and_then(|w| *w)
            .is_some_and(|w| w + WRITE_SETTLED <= scan)
    }

    /// A message was enqueued in this process (perhaps not committed yet).
    pub(crate) fn enqueued(&self) {
        if self.notified_on_commit {
            return; // the NOTIFY sent with the insert wakes the sequencer once it commits
        }
        if let Ok(mut e) = self.eager.lock() {
            e.open_for(EAGER_WINDOW);
            e.next_delay = EAGER_FIRST;
        }
        self.sequencer.notify_one();
    }

    /// A scheduled message was enqueued in this process: its due time may come before the
    /// scheduler's next look.
    pub(crate) fn scheduled(&self) {
        self.scheduler.notify_one();
    }

    /// A producer coalesced its notifications and one of its transactions may commit later
    /// still: re-check quickly for a while, as after an in-process enqueue.
    pub(crate) fn commit_may_follow(&self) {
        if let Ok(mut e) = self.eager.lock() {
            e.open_for(EAGER_WINDOW);
            e.next_delay = EAGER_FIRST;
        }
        self.sequencer.notify_one();
    }

    /// The sequencer found nothing: when to look again if an enqueue is still expected.
    pub(crate) fn eager_delay(&self, cap: Duration) -> Option<Duration> {
        let mut e = self.eager.lock().ok()?;
        let until = e.until?;
        if Instant::now() >= until {
            e.until = None;
            return None;
        }
        let d = e.next_delay.min(cap);
        e.next_delay = (e.next_delay * 2).min(cap);
        Some(d)
    }

    /// The sequencer found work: re-check quickly again. Where nothing announces other
    /// processes' commits, keep doing so for [`ACTIVE_WINDOW`] (adaptive polling): another
    /// process's trickle is then found within milliseconds instead of at the next poll.
    pub(crate) fn found_work(&self) {
        if let Ok(mut e) = self.eager.lock() {
            e.next_delay = EAGER_FIRST;
            if !self.notified_on_commit {
                e.open_for(ACTIVE_WINDOW);
            }
        }
    }

    /// Whether a poll may skip the read that last started at `read` (a handler's scan of its
    /// cursors, vacuum's look for processed messages, the gauges' status read): the database's
    /// files are quiet since (see [`files_quiet_since`](Wake::files_quiet_since)) and that
    /// read is less than `at_least_every` old, so a write the watch missed costs at most that
    /// delay. `false` before the first read.
    pub(crate) fn unchanged_since(&self, read: Option<Instant>, at_least_every: Duration) -> bool {
        read.is_some_and(|r| r.elapsed() < at_least_every && self.files_quiet_since(r))
    }

    /// A file the database writes on every commit changed: another process may have committed
    /// (or this one did; the look costs one read). Look now, and again within a few
    /// milliseconds in case the write was seen before its commit was.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn files_written(&self) {
        let now = Instant::now();
        let own = self
            .own_write_until
            .lock()
            .ok()
            .and_then(|o| *o)
            .is_some_and(|until| now <= until);
        if !own
            && let Ok(mut w) = self.last_write.lock()
            && w.is_some()
        {
            *w = Some(now);
        }
        if let Ok(mut e) = self.eager.lock() {
            e.open_for(WRITE_SEEN_WINDOW);
            e.next_delay = EAGER_FIRST;
        }
        self.sequencer.notify_one();
    }

    pub(crate) fn register_handler(&self, queue: &str) -> Arc<Notify> {
        let n = Arc::new(Notify::new());
        if let Ok(mut h) = self.handlers.write() {
            h.entry(queue.to_owned()).or_default().push(n.clone());
        }
        n
    }

    /// Messages of `queue` were sequenced.
    pub(crate) fn sequenced(&self, queue: &str) {
        if let Ok(h) = self.handlers.read() {
            for n in h.get(queue).into_iter().flatten() {
                n.notify_one();
            }
        }
    }

    /// Everything may have changed (start-up, a lost notification connection).
    pub(crate) fn all(&self) {
        self.sequencer.notify_one();
        self.scheduler.notify_one();
        if let Ok(h) = self.handlers.read() {
            for n in h.values().flatten() {
                n.notify_one();
            }
        }
    }
}

#[cfg(feature = "postgres")]
/// Listens on the PostgreSQL channel and turns notifications into wake-ups. Reconnects after
/// a lost connection and then wakes every worker, since notifications sent meanwhile are lost.
pub(crate) async fn listen_postgres(
    pool: sea_orm::sqlx::PgPool,
    channel: String,
    wake: Arc<Wake>,
    cancel: tokio_util::sync::CancellationToken,
) {
    use sea_orm::sqlx::postgres::PgListener;
    let mut delay = Duration::from_millis(100);
    while !cancel.is_cancelled() {
        let listener = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(&channel).await?;
            Ok::<_, sea_orm::sqlx::Error>(l)
        }
        .await;
        match listener {
            Ok(mut l) => {
                delay = Duration::from_millis(100);
                wake.all();
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        n = l.try_recv() => match n {
                            Ok(Some(n)) => dispatch(&wake, n.payload()),
                            Ok(None) => {
                                tracing::warn!("notification connection lost; reconnecting");
                                wake.all();
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "notification listener failed");
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "could not listen for notifications")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

#[cfg(feature = "sqlite")]
/// Watches the files a commit writes (SQLite's write-ahead log; see
/// [`Store::commit_files`](crate::storage::Store::commit_files)) and wakes the sequencer when
/// one is written: a commit by another process is then found at once, not at the next poll.
/// The watch is on their directory, so the log is still seen after it is deleted and made
/// again. It ends when the returned watcher is dropped.
pub(crate) fn watch_files(
    files: &[std::path::PathBuf],
    wake: Arc<Wake>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let names: Vec<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(Into::into))
        .collect();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        match event {
            Ok(e) => {
                let written = matches!(e.kind, EventKind::Modify(_) | EventKind::Create(_))
                    && e.paths.iter().any(|p| {
                        p.file_name()
                            .is_some_and(|n| names.iter().any(|name| name == n))
                    });
                if written {
                    wake.files_written();
                }
            }
            // Events were lost (the kernel's queue overflowed): anything may have changed.
            Err(e) => {
                tracing::debug!(error = %e, "database file watch");
                wake.files_written();
                wake.all();
            }
        }
    })?;
    let dirs: std::collections::BTreeSet<&std::path::Path> =
        files.iter().filter_map(|f| f.parent()).collect();
    for dir in dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}

#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
fn dispatch(wake: &Wake, payload: &str) {
    if let Some(queue) = payload.strip_prefix("s:") {
        wake.sequenced(queue);
    } else if payload == crate::storage::notify::TRAILING {
        wake.commit_may_follow();
    } else {
        wake.sequencer.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_enqueue_opens_a_short_eager_window_with_a_ramp() {
        let w = Wake::new(false);
        let cap = Duration::from_millis(50);
        assert_eq!(w.eager_delay(cap), None, "no enqueue, no eager re-check");
        w.enqueued();
        let ramp: Vec<_> = (0..8)
            .filter_map(|_| w.eager_delay(cap))
            .map(|d| d.as_millis())
            .collect();
        assert_eq!(ramp, [1, 2, 4, 8, 16, 32, 50, 50]);
        w.found_work();
        assert_eq!(w.eager_delay(cap), Some(Duration::from_millis(1)));
        tokio::time::advance(EAGER_WINDOW).await;
        assert_eq!(
            w.eager_delay(cap),
            None,
            "the window closes; polling takes over"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn found_work_keeps_looking_quickly_only_where_commits_are_not_announced() {
        let cap = Duration::from_millis(50);
        let polled = Wake::new(false);
        polled.found_work();
        let ramp: Vec<_> = (0..4)
            .filter_map(|_| polled.eager_delay(cap))
            .map(|d| d.as_millis())
            .collect();
        assert_eq!(ramp, [1, 2, 4, 8], "adaptive polling after work was found");
        tokio::time::advance(ACTIVE_WINDOW).await;
        assert_eq!(polled.eager_delay(cap), None, "idle again: the poll only");

        let announced = Wake::new(true);
        announced.found_work();
        assert_eq!(
            announced.eager_delay(cap),
            None,
            "NOTIFY announces every commit; no re-checks needed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_file_write_wakes_the_sequencer_and_re_checks_briefly() {
        let cap = Duration::from_millis(50);
        let w = Wake::new(false);
        w.files_written();
        tokio::time::timeout(Duration::from_millis(1), w.sequencer.notified())
            .await
            .expect("a write to the database's files wakes the sequencer");
        assert_eq!(w.eager_delay(cap), Some(Duration::from_millis(1)));
        assert_eq!(w.eager_delay(cap), Some(Duration::from_millis(2)));
        tokio::time::advance(WRITE_SEEN_WINDOW).await;
        assert_eq!(
            w.eager_delay(cap),
            None,
            "a short window: writes are frequent"
        );

        // It never shortens the longer window of an in-process enqueue.
        w.enqueued();
        w.files_written();
        tokio::time::advance(WRITE_SEEN_WINDOW).await;
        assert_eq!(w.eager_delay(cap), Some(Duration::from_millis(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_files_are_quiet_only_under_a_watch_and_long_after_the_last_write() {
        let w = Wake::new(false);
        assert!(
            !w.files_quiet_since(Instant::now()),
            "without a watch nothing tells that the database did not change"
        );
        w.watching_files();
        let scan = Instant::now();
        assert!(!w.files_quiet_since(scan), "a write may just have happened");
        tokio::time::advance(WRITE_SETTLED).await;
        assert!(w.files_quiet_since(Instant::now()));

        w.files_written();
        let before = Instant::now();
        tokio::time::advance(WRITE_SETTLED / 2).await;
        assert!(
            !w.files_quiet_since(Instant::now()),
            "a scan right after a write may have missed its commit"
        );
        tokio::time::advance(WRITE_SETTLED).await;
        assert!(w.files_quiet_since(Instant::now()));
        assert!(!w.files_quiet_since(before), "a scan before the write");
    }

    #[tokio::test(start_paused = true)]
    async fn the_processs_own_bookkeeping_write_does_not_end_a_quiet_spell() {
        let w = Wake::new(false);
        w.watching_files();
        tokio::time::advance(WRITE_SETTLED).await;
        let scan = Instant::now();
        w.own_write(async { w.files_written() }).await;
        // The watch's event comes a moment after the write.
        tokio::time::advance(OWN_WRITE_SEEN / 2).await;
        w.files_written();
        tokio::time::advance(WRITE_SETTLED).await;
        assert!(w.files_quiet_since(scan), "the heartbeat is not a change");

        tokio::time::advance(OWN_WRITE_SEEN).await;
        w.files_written();
        assert!(!w.files_quiet_since(scan), "a write after it is");
    }
}
