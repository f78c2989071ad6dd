//! Process readings (CPU time, resident memory) and a client-side count of SQL statements.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tracing::span::{Attributes, Id};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

static STATEMENTS: AtomicU64 = AtomicU64::new(0);

/// Whether sequencer passes are timed (off unless a scenario asks: it enables a span).
static TIME_PASSES: AtomicBool = AtomicBool::new(false);
/// Sequencer passes that moved rows since the last [`take_pass_times`]: (duration in ms,
/// rows moved).
static PASS_TIMES: Mutex<Vec<(f64, u64)>> = Mutex::new(Vec::new());

/// The sequencer's span, one per pass.
const PASS_SPAN: &str = "outbox.sequence";

/// A handler batch's span (from the claim's mark through the handler calls to the commit).
const BATCH_SPAN: &str = "outbox.batch";
/// Whether handler batches are timed (off unless a scenario asks: it enables a span).
static TIME_BATCHES: AtomicBool = AtomicBool::new(false);
/// Handler batches that ended since the start, and their summed duration in µs.
static BATCHES: AtomicU64 = AtomicU64::new(0);
static BATCH_US: AtomicU64 = AtomicU64::new(0);

/// Starts timing handler batches (the engine's `outbox.batch` span).
pub(crate) fn time_batches() {
    TIME_BATCHES.store(true, Ordering::Relaxed);
}

/// Handler batches ended so far and their summed duration in µs (subtract two readings).
pub(crate) fn batch_totals() -> (u64, u64) {
    (
        BATCHES.load(Ordering::Relaxed),
        BATCH_US.load(Ordering::Relaxed),
    )
}

/// Starts timing sequencer passes (the engine's `outbox.sequence` span).
pub(crate) fn time_passes() {
    TIME_PASSES.store(true, Ordering::Relaxed);
}

/// The passes recorded so far, in order, emptying the record.
pub(crate) fn take_pass_times() -> Vec<(f64, u64)> {
    PASS_TIMES
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default()
}

/// Statements sqlx reported (`sqlx::query` events) on pools opened with statement logging.
pub(crate) fn statements() -> u64 {
    STATEMENTS.load(Ordering::Relaxed)
}

/// Counts `sqlx::query` events and, when asked, times the sequencer's passes; enables
/// nothing else.
struct CountStatements;

/// When a timed span began (kept in the span's extensions).
struct Began(Instant);

/// Rows a pass moved (its `moved` field, recorded when it ends).
struct Moved(u64);

impl tracing::field::Visit for Moved {
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "moved" {
            self.0 = value;
        }
    }

    fn record_debug(&mut self, _field: &tracing::field::Field, _value: &dyn std::fmt::Debug) {}
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for CountStatements {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if metadata.target() == "sqlx::query" {
            Interest::always()
        } else if metadata.is_span()
            && (metadata.name() == PASS_SPAN || metadata.name() == BATCH_SPAN)
        {
            // Decided per span: timing is switched on at run time.
            Interest::sometimes()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        metadata.target() == "sqlx::query"
            || (metadata.is_span()
                && metadata.name() == PASS_SPAN
                && TIME_PASSES.load(Ordering::Relaxed))
            || (metadata.is_span()
                && metadata.name() == BATCH_SPAN
                && TIME_BATCHES.load(Ordering::Relaxed))
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() == "sqlx::query" {
            STATEMENTS.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_new_span(&self, _attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Began(Instant::now()));
        }
    }

    fn on_record(&self, id: &Id, values: &tracing::span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut moved = Moved(0);
            values.record(&mut moved);
            if moved.0 > 0 {
                span.extensions_mut().insert(moved);
            }
        }
    }

    /// Only passes that moved rows count (idle polls are not what is measured); every
    /// handler batch counts.
    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let ext = span.extensions();
        if span.metadata().name() == BATCH_SPAN {
            if let Some(began) = ext.get::<Began>() {
                BATCHES.fetch_add(1, Ordering::Relaxed);
                BATCH_US.fetch_add(began.0.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            return;
        }
        if let (Some(began), Some(moved)) = (ext.get::<Began>(), ext.get::<Moved>())
            && let Ok(mut v) = PASS_TIMES.lock()
        {
            v.push((began.0.elapsed().as_secs_f64() * 1e3, moved.0));
        }
    }
}

/// Installs the statement counter as the global subscriber.
pub(crate) fn install_counter() {
    use tracing_subscriber::layer::SubscriberExt;
    let subscriber = tracing_subscriber::registry().with(CountStatements);
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// CPU time of this process (user + system), in seconds. Assumes the usual 100 ticks/s.
pub(crate) fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat").map_or(f64::NAN, |stat| stat_cpu_seconds(&stat).1)
}

/// The command name and the user plus system CPU seconds of one `/proc/<pid>/stat`.
fn stat_cpu_seconds(stat: &str) -> (&str, f64) {
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return ("", f64::NAN);
    };
    let name = &stat[open + 1..close];
    let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let tick = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (name, (tick(11) + tick(12)) / 100.0)
}

/// CPU seconds of every process of the local database servers named `names` (`postgres`:
/// the postmaster, every connection's backend and the background workers; `mariadbd` or
/// `mysqld`: one process). Processes that ended between two readings are not counted, so
/// read it around a span where the connections stay open. 0 when no such process runs here.
pub(crate) fn server_cpu_seconds(names: &[&str]) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return f64::NAN;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .map(|stat| {
            let (name, secs) = stat_cpu_seconds(&stat);
            if names.contains(&name) { secs } else { 0.0 }
        })
        .filter(|secs| secs.is_finite())
        .sum()
}

/// Busy and total jiffies of the whole machine (all CPUs) from `/proc/stat`; the busy share
/// between two readings is the machine's load, database servers and other users included.
pub(crate) fn machine_jiffies() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = f.iter().take(8).sum();
    // idle (3) and iowait (4) are not busy.
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// The 1-, 5- and 15-minute load averages, as `uptime` prints them.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

/// Resident memory of this process in MiB.
pub(crate) fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}
