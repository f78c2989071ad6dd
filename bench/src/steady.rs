//! S5 steady state (`outbox-bench steady`, issue 16): producers and a handler running together
//! in one process on one queue of 8 partitions. Finds the highest offered enqueue rate the
//! runtime sustains with a bounded backlog, then measures commit-to-handled latency at 50% and
//! 90% of it, quiet and (PostgreSQL, MariaDB) with a transaction holding an old snapshot for
//! the whole run.
//!
//! How a run at one offered rate (a *step*) works:
//!
//! - a fresh database; a runtime with one transactional handler (`--profile`, HighThroughput by
//!   default: S2's) is started first;
//! - `--producers` tasks commit `--per-tx` messages per transaction (`enqueue_batch`, as S1
//!   100/tx) on a fixed schedule: transaction `s` is due at `start + s * per_tx / rate` and
//!   producer `s % producers` commits it. The schedule is open-loop: a producer that is behind
//!   commits at once, without sleeping, and never skips a transaction or slows the schedule
//!   down; how late it began each one is recorded. At the end of the step producers stop even if
//!   behind, so the committed rate shows whether the producers themselves kept up.
//! - each producer owns the partitions `p` with `p % producers == producer` and spreads each
//!   transaction round-robin over them: with several producers committing at once, commit
//!   order within a partition is then known, so the order check (`check.rs`) stays exact;
//! - commit time: the producer reads the process's monotonic clock right after `commit()`
//!   returns and stores it per transaction (an array indexed by transaction number); the handler
//!   reads the same clock on entry and stores it per message (indexed by the message's global
//!   number, which is in its payload). Latency = handled - committed, one clock, no wall-clock
//!   skew; it can be slightly negative, as the commit is visible before its caller hears of it.
//!   A send time in the payload plus the commit's duration was not used: it would be an
//!   estimate, this is a reading;
//! - a sampler reads (committed, handled) every 100 ms. The step *sustains* its rate when, over
//!   its second half, the committed rate and the handled rate are both at least `--keep-up`
//!   (0.97) times the offered rate and the backlog (committed - handled, least-squares slope)
//!   grew by at most `--max-growth-secs` (0.25) seconds' worth of offered messages, or one
//!   sequencer pass (5,000 messages) if that is more: the backlog saw-tooths by up to a pass;
//! - then the producers stop, the backlog is drained, and every committed message must have been
//!   handled exactly once, in order per partition, with nothing pending: otherwise the command
//!   fails.
//!
//! The search: from `--start-rate` (default 0.4 x the S1 100/tx rate with `--producers`
//! producers measured in the same run), multiply by `--factor` while steps pass (divide while
//! they fail), then bisect (geometric mean) between the highest pass and the lowest failure
//! until they are within `--resolution`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outbox::sea_orm::{DatabaseConnection, TransactionTrait};
use outbox::{HandlerSpec, NewMessage, Outbox, QueueSpec};

use crate::Res;
use crate::cell::ProfileName;
use crate::check::{Checker, Payload, now_us, payload, percentile, upper_median};
use crate::db::{Backend, FreshDb, Servers};
use crate::{horizon, ours, sys};

const QUEUE: &str = "steady";
const GRACE: Duration = Duration::from_secs(10);
/// Interval of the backlog sampler.
const SAMPLE: Duration = Duration::from_millis(100);
/// A transaction begun this much after it was due counts as late.
const LATE: Duration = Duration::from_millis(10);

/// Options of the steady-state scenario.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) backends: Vec<Backend>,
    pub(crate) partitions: u32,
    pub(crate) producers: u32,
    pub(crate) per_tx: u32,
    pub(crate) profile: ProfileName,
    pub(crate) step_secs: f64,
    pub(crate) start_rate: Option<f64>,
    pub(crate) factor: f64,
    pub(crate) resolution: f64,
    pub(crate) max_steps: usize,
    /// Skip the search and take this as the sustained rate.
    pub(crate) rate: Option<f64>,
    pub(crate) latency_secs: f64,
    pub(crate) warmup_secs: f64,
    pub(crate) keep_up: f64,
    pub(crate) max_growth_secs: f64,
    pub(crate) s1_messages: usize,
    pub(crate) s1_reps: usize,
    /// Run the held-horizon variant at 90% (PostgreSQL, MariaDB).
    pub(crate) held: bool,
    /// Also search the sustained rate with the held transaction.
    pub(crate) held_search: bool,
    pub(crate) servers: Servers,
}

/// What the step's threads share: the clock, commit and handled times, counters.
#[derive(Debug)]
struct Shared {
    t0: Instant,
    /// Per transaction: µs after `t0` when its commit returned (0: not committed).
    commit_us: Vec<AtomicI64>,
    /// Per message: µs after `t0` when the handler first saw it (0: not handled).
    handled_us: Vec<AtomicI64>,
    committed: AtomicU64,
    checker: Checker,
    /// Transactions begun more than [`LATE`] after they were due.
    late: AtomicU64,
    /// The largest delay between a transaction's due time and its begin, µs.
    max_lag_us: AtomicU64,
}

impl Shared {
    fn now_us(&self) -> i64 {
        (self.t0.elapsed().as_micros() as i64).max(1)
    }
}

/// One row of the steps table.
#[derive(Debug, Clone, Default)]
struct StepResult {
    label: String,
    offered: f64,
    /// Second half: committed and handled msgs/s.
    committed_rate: f64,
    handled_rate: f64,
    /// Second half: backlog growth by least squares, messages.
    growth: f64,
    /// Second half: the largest backlog sampled.
    max_backlog: u64,
    /// At the end of the offered traffic (`depth()`): committed messages not sequenced yet,
    /// and sequenced messages the handler has not handled: which stage holds the backlog.
    end_unsequenced: i64,
    end_pending: i64,
    /// Share of transactions begun late (%), and the worst lag (ms).
    late_pct: f64,
    max_lag_ms: f64,
    /// Second half: sequencer passes that moved rows per second, rows per pass, pass p50 / p99
    /// ms, and the share of wall time spent in passes (%).
    passes_per_s: f64,
    rows_per_pass: f64,
    pass_p50_ms: f64,
    pass_p99_ms: f64,
    seq_busy_pct: f64,
    /// Second half: handler batches per second, messages per batch, and the share of the
    /// handler's slots (concurrency) spent inside batches (%).
    batches_per_s: f64,
    msgs_per_batch: f64,
    batch_busy_pct: f64,
    /// Second half: this process's CPU (% of one core) and the machine's busy share (% of all
    /// cores, database servers included).
    cpu_pct: f64,
    machine_pct: f64,
    /// Commit-to-handled ms over messages committed after the warm-up: p50, p99, max.
    lat: (f64, f64, f64),
    /// Seconds to drain what was left after the producers stopped.
    drain_secs: f64,
    sustained: bool,
    verdict: String,
}

/// Readings taken at the half and at the end of a step.
#[derive(Debug, Clone, Copy)]
struct Snap {
    at: Instant,
    batches: (u64, u64),
    cpu: f64,
    machine: (u64, u64),
}

fn snap() -> Snap {
    Snap {
        at: Instant::now(),
        batches: sys::batch_totals(),
        cpu: sys::cpu_seconds(),
        machine: sys::machine_jiffies(),
    }
}

fn pool_size(backend: Backend, producers: u32) -> u32 {
    if backend == Backend::Sqlite {
        4 + producers
    } else {
        // One handler at concurrency 2, the sequencer, vacuum and listener, the producers.
        2 + 2 + producers + 2
    }
}

/// The largest backlog growth over a step's second half that still counts as bounded:
/// `--max-growth-secs` of offered messages, but at least one sequencer pass (the profile's
/// sequencer batch). The sequencer moves committed messages in passes of up to that many rows,
/// so the backlog saw-tooths by up to a pass even when it does not grow; a smaller growth
/// is within that noise.
fn growth_bound(o: &Options, rate: f64) -> f64 {
    (o.max_growth_secs * rate).max(f64::from(o.profile.profile().runtime().sequencer_batch))
}

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for &(x, y) in points {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
    }
    if sxx > 0.0 { sxy / sxx } else { 0.0 }
}

/// One producer: commits the transactions `w, w + producers, …` of the schedule until the
/// deadline, each at its due time or at once if behind.
#[allow(
    clippy::too_many_arguments,
    reason = "a task's whole context, passed once"
)]
async fn produce(
    w: u32,
    o: Options,
    ob: Outbox,
    pool: DatabaseConnection,
    shared: Arc<Shared>,
    start: Instant,
    tx_interval: f64,
    deadline: Instant,
) -> Res<()> {
    let owned: Vec<u32> = (0..o.partitions).filter(|p| p % o.producers == w).collect();
    let mut next_k = vec![0u64; o.partitions as usize];
    let slots = shared.commit_us.len() as u64;
    let mut s = u64::from(w);
    while s < slots {
        let due = start + Duration::from_secs_f64(s as f64 * tx_interval);
        if due >= deadline {
            break;
        }
        let now = Instant::now();
        if now < due {
            tokio::time::sleep_until(due.into()).await;
        } else {
            let lag = now - due;
            shared
                .max_lag_us
                .fetch_max(lag.as_micros() as u64, Ordering::Relaxed);
            if lag > LATE {
                shared.late.fetch_add(1, Ordering::Relaxed);
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        let msgs: Vec<NewMessage> = (0..u64::from(o.per_tx))
            .map(|j| {
                let i = s * u64::from(o.per_tx) + j;
                let p = owned[j as usize % owned.len()];
                let k = next_k[p as usize];
                next_k[p as usize] += 1;
                NewMessage::new(QUEUE, p, payload(p, k, i, now_us()))
            })
            .collect();
        let txn = pool.begin().await?;
        ob.enqueue_batch(&txn, &msgs).await?;
        txn.commit().await?;
        let at = shared.now_us();
        shared.commit_us[s as usize].store(at, Ordering::Relaxed);
        shared
            .committed
            .fetch_add(u64::from(o.per_tx), Ordering::Relaxed);
        s += u64::from(o.producers);
    }
    Ok(())
}

/// One step: `rate` msgs/s offered for `secs`; its figures, or `Err` if the correctness check
/// (or the harness) failed.
async fn step(
    o: &Options,
    backend: Backend,
    label: &str,
    rate: f64,
    secs: f64,
    held: bool,
) -> Res<StepResult> {
    let db = FreshDb::create(backend, &o.servers).await?;
    let r = step_on(o, &db, label, rate, secs, held).await;
    db.drop_db().await;
    r
}

async fn step_on(
    o: &Options,
    db: &FreshDb,
    label: &str,
    rate: f64,
    secs: f64,
    held: bool,
) -> Res<StepResult> {
    let pool = db.pool(pool_size(db.backend, o.producers), false).await?;
    // Create the tables first, so the held transaction can read one.
    Outbox::builder(pool.clone())
        .queue(QueueSpec::new(QUEUE, o.partitions))
        .connect()
        .await?;
    let holder = if held {
        Some(horizon::hold(db).await?)
    } else {
        None
    };
    let tx_interval = f64::from(o.per_tx) / rate;
    let slots = (secs / tx_interval).floor() as usize + 1;
    let shared = Arc::new(Shared {
        t0: Instant::now(),
        commit_us: (0..slots).map(|_| AtomicI64::new(0)).collect(),
        handled_us: (0..slots * o.per_tx as usize)
            .map(|_| AtomicI64::new(0))
            .collect(),
        committed: AtomicU64::new(0),
        checker: Checker::new(o.partitions),
        late: AtomicU64::new(0),
        max_lag_us: AtomicU64::new(0),
    });
    let s = shared.clone();
    let handler = HandlerSpec::transactional(QUEUE, "h", move |m, _txn| {
        let now = s.now_us();
        match serde_json::from_slice::<Payload>(m.payload()) {
            Ok(body) => {
                if let Some(slot) = s.handled_us.get(body.i as usize) {
                    // The first delivery counts (a second one fails the check anyway).
                    let _ = slot.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
                }
                s.checker.see(m.partition(), Some(m.seq()), &body);
            }
            Err(e) => s.checker.problem(format!("unreadable payload: {e}")),
        }
        Box::pin(async { Ok(()) })
    });
    let rt = Outbox::builder(pool.clone())
        .profile(o.profile.profile())
        .queue(QueueSpec::new(QUEUE, o.partitions))
        .handler(handler)
        .start()
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let start = Instant::now() + Duration::from_millis(20);
    let half = start + Duration::from_secs_f64(secs / 2.0);
    let deadline = start + Duration::from_secs_f64(secs);
    let mut producers = Vec::new();
    for w in 0..o.producers {
        producers.push(tokio::spawn(produce(
            w,
            o.clone(),
            rt.outbox().clone(),
            pool.clone(),
            shared.clone(),
            start,
            tx_interval,
            deadline,
        )));
    }
    let sampler = {
        let s = shared.clone();
        tokio::spawn(async move {
            let mut samples: Vec<(f64, u64, u64)> = Vec::new();
            let mut tick = tokio::time::interval_at(start.into(), SAMPLE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let at = Instant::now();
                // Handled first: a sample never shows more handled than committed.
                let handled = s.checker.handled();
                let committed = s.committed.load(Ordering::Relaxed);
                samples.push((
                    at.saturating_duration_since(start).as_secs_f64(),
                    committed,
                    handled,
                ));
                if at >= deadline {
                    return samples;
                }
            }
        })
    };
    tokio::time::sleep_until(half.into()).await;
    sys::take_pass_times();
    let a = snap();
    tokio::time::sleep_until(deadline.into()).await;
    let b = snap();
    let passes = sys::take_pass_times();
    let (end_unsequenced, end_pending) = match rt.outbox().depth(QUEUE).await {
        Ok(d) => (d.unsequenced, d.handlers.first().map_or(-1, |h| h.pending)),
        Err(_) => (-1, -1),
    };
    let mut producer_error = None;
    for p in producers {
        match p.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => producer_error = Some(e.to_string()),
            Err(e) => producer_error = Some(e.to_string()),
        }
    }
    let samples = sampler.await?;
    let committed = shared.committed.load(Ordering::Relaxed);
    let stopped = Instant::now();
    let waited = ours::wait_handled(&shared.checker, committed, stopped, ours::STALL).await;
    let drain_secs = stopped.elapsed().as_secs_f64();
    rt.shutdown(GRACE).await?;
    let depth = rt.outbox().depth(QUEUE).await?;
    let pending = depth.handlers.first().map_or(-1, |h| h.pending);
    if let Some((conn, txn)) = holder {
        txn.rollback().await?;
        conn.close().await.ok();
    }
    pool.close().await.ok();
    if let Some(e) = producer_error {
        return Err(format!("{label} at {rate:.0} msgs/s: a producer failed: {e}").into());
    }
    waited
        .and_then(|_| shared.checker.verdict(committed, false))
        .and_then(|()| {
            if pending == 0 {
                Ok(())
            } else {
                Err(format!("depth reports {pending} pending after the drain"))
            }
        })
        .map_err(|e| format!("{label} at {rate:.0} msgs/s: {e}"))?;

    // Second-half figures.
    let second: Vec<&(f64, u64, u64)> = samples.iter().filter(|x| x.0 >= secs / 2.0).collect();
    let (first, last) = match (second.first(), second.last()) {
        (Some(f), Some(l)) if l.0 > f.0 => (**f, **l),
        _ => return Err("no samples in the second half".into()),
    };
    let span = last.0 - first.0;
    let committed_rate = (last.1 - first.1) as f64 / span;
    let handled_rate = (last.2 - first.2) as f64 / span;
    let backlog: Vec<(f64, f64)> = second
        .iter()
        .map(|x| (x.0, x.1.saturating_sub(x.2) as f64))
        .collect();
    let growth = slope(&backlog) * span;
    let max_backlog = second
        .iter()
        .map(|x| x.1.saturating_sub(x.2))
        .max()
        .unwrap_or(0);
    let half_secs = (b.at - a.at).as_secs_f64();
    let concurrency = o.profile.profile().tuning().concurrency;
    let (batches, batch_us) = (b.batches.0 - a.batches.0, b.batches.1 - a.batches.1);
    let mut pass_ms: Vec<f64> = passes.iter().map(|p| p.0).collect();
    pass_ms.sort_by(f64::total_cmp);
    let rows: u64 = passes.iter().map(|p| p.1).sum();
    let machine = {
        let busy = b.machine.0.saturating_sub(a.machine.0) as f64;
        let total = b.machine.1.saturating_sub(a.machine.1) as f64;
        if total > 0.0 {
            busy / total * 100.0
        } else {
            f64::NAN
        }
    };

    // Latency over messages committed after the warm-up.
    let warm_slot = (o.warmup_secs / tx_interval).ceil() as usize;
    let mut lat: Vec<f64> = Vec::new();
    for (s, c) in shared.commit_us.iter().enumerate().skip(warm_slot) {
        let c = c.load(Ordering::Relaxed);
        if c == 0 {
            continue;
        }
        for j in 0..o.per_tx as usize {
            let h = shared.handled_us[s * o.per_tx as usize + j].load(Ordering::Relaxed);
            lat.push((h - c) as f64 / 1e3);
        }
    }
    lat.sort_by(f64::total_cmp);
    let scheduled = (secs / tx_interval).ceil().max(1.0);

    let keeps_producing = committed_rate >= o.keep_up * rate;
    let keeps_handling = handled_rate >= o.keep_up * rate;
    let bounded = growth <= growth_bound(o, rate);
    let sustained = keeps_producing && keeps_handling && bounded;
    let mut why = Vec::new();
    if !keeps_producing {
        why.push("producers behind");
    }
    if !keeps_handling {
        why.push("handled < keep-up");
    }
    if !bounded {
        why.push("backlog grows");
    }
    Ok(StepResult {
        label: label.to_owned(),
        offered: rate,
        committed_rate,
        handled_rate,
        growth,
        max_backlog,
        end_unsequenced,
        end_pending,
        late_pct: shared.late.load(Ordering::Relaxed) as f64 / scheduled * 100.0,
        max_lag_ms: shared.max_lag_us.load(Ordering::Relaxed) as f64 / 1e3,
        passes_per_s: passes.len() as f64 / half_secs,
        rows_per_pass: rows as f64 / passes.len().max(1) as f64,
        pass_p50_ms: percentile(&pass_ms, 50.0),
        pass_p99_ms: percentile(&pass_ms, 99.0),
        seq_busy_pct: pass_ms.iter().sum::<f64>() / (half_secs * 1e3) * 100.0,
        batches_per_s: batches as f64 / half_secs,
        msgs_per_batch: handled_rate * half_secs / batches.max(1) as f64,
        batch_busy_pct: batch_us as f64 / 1e6 / (half_secs * f64::from(concurrency)) * 100.0,
        cpu_pct: (b.cpu - a.cpu) / half_secs * 100.0,
        machine_pct: machine,
        lat: (
            percentile(&lat, 50.0),
            percentile(&lat, 99.0),
            percentile(&lat, 100.0),
        ),
        drain_secs,
        sustained,
        verdict: if sustained {
            "sustained".into()
        } else {
            why.join(", ")
        },
    })
}

fn k(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v >= 10_000.0 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn ms3(l: (f64, f64, f64)) -> String {
    format!("{:.1} / {:.1} / {:.0}", l.0, l.1, l.2)
}

fn print_steps_header(o: &Options) {
    println!(
        "| backend | run | offered msgs/s | committed / handled msgs/s (2nd half) | backlog growth (2nd half) / max / at the end: unsequenced + sequenced | late tx % / max lag ms | sequencer: passes/s, rows/pass, p50 / p99 ms, busy % | handler: batches/s, msgs/batch, busy % of {} slots | CPU: process % of a core / machine % | commit→handled p50 / p99 / max ms | drain s | verdict |",
        o.profile.profile().tuning().concurrency
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
}

fn print_step(backend: Backend, r: &StepResult) {
    println!(
        "| {backend} | {} | {} | {} / {} | {:+.0} / {} / {} + {} | {:.1} / {:.0} | {:.1}, {:.0}, {:.1} / {:.1}, {:.0} | {:.1}, {:.0}, {:.0} | {:.0} / {:.0} | {} | {:.1} | {} |",
        r.label,
        k(r.offered),
        k(r.committed_rate),
        k(r.handled_rate),
        r.growth,
        r.max_backlog,
        r.end_unsequenced,
        r.end_pending,
        r.late_pct,
        r.max_lag_ms,
        r.passes_per_s,
        r.rows_per_pass,
        r.pass_p50_ms,
        r.pass_p99_ms,
        r.seq_busy_pct,
        r.batches_per_s,
        r.msgs_per_batch,
        r.batch_busy_pct,
        r.cpu_pct,
        r.machine_pct,
        ms3(r.lat),
        r.drain_secs,
        r.verdict
    );
}

/// Searches the highest sustained offered rate from `start`: up (or down) by `factor` until
/// the verdict changes, then bisection to `resolution`. The highest sustained step, if any.
async fn search(
    o: &Options,
    backend: Backend,
    label: &str,
    start: f64,
    factor: f64,
    held: bool,
    steps: &mut Vec<StepResult>,
) -> Res<Option<StepResult>> {
    let (mut lo, mut hi): (Option<StepResult>, Option<f64>) = (None, None);
    let mut rate = start;
    for _ in 0..o.max_steps {
        let r = step(o, backend, label, rate.round(), o.step_secs, held).await?;
        print_step(backend, &r);
        steps.push(r.clone());
        if r.sustained {
            lo = Some(r);
        } else {
            hi = Some(rate);
        }
        rate = match (&lo, hi) {
            (Some(l), None) => l.offered * factor,
            (None, Some(h)) => h / factor,
            (Some(l), Some(h)) => {
                if h / l.offered <= 1.0 + o.resolution {
                    break;
                }
                (l.offered * h).sqrt()
            }
            (None, None) => break,
        };
    }
    Ok(lo)
}

/// The S1 100/tx rate (median of `s1_reps`) with `producers` producers.
async fn s1_rate(o: &Options, backend: Backend, producers: usize) -> Res<f64> {
    let mut rates = Vec::new();
    for _ in 0..o.s1_reps.max(1) {
        let db = FreshDb::create(backend, &o.servers).await?;
        let r = ours::s1(&db, o.per_tx as usize, producers, o.s1_messages).await;
        db.drop_db().await;
        let outcome = r?;
        if !outcome.ok {
            return Err(format!("S1 check failed: {}", outcome.error.unwrap_or_default()).into());
        }
        rates.push(
            outcome
                .metrics
                .get("msgs_per_s")
                .copied()
                .unwrap_or(f64::NAN),
        );
    }
    Ok(upper_median(rates))
}

/// The figures of one backend for the summary table.
#[derive(Debug, Default)]
struct Summary {
    load_start: String,
    load_end: String,
    s1_one: f64,
    s1_many: f64,
    sustained: Option<StepResult>,
    at50: Option<StepResult>,
    at90: Option<StepResult>,
    held90: Option<StepResult>,
    /// Whether the search with the held snapshot ran, and its highest sustained step.
    held_searched: bool,
    held_sustained: Option<StepResult>,
    error: Option<String>,
}

async fn run_backend(o: &Options, backend: Backend, sum: &mut Summary) -> Res<()> {
    let mut steps = Vec::new();
    sum.s1_one = s1_rate(o, backend, 1).await?;
    sum.s1_many = if o.producers == 1 {
        sum.s1_one
    } else {
        s1_rate(o, backend, o.producers as usize).await?
    };
    println!(
        "\n{backend}: S1 {}/tx enqueue (median of {}, {} messages): 1 producer {:.0} msgs/s, {} producers {:.0} msgs/s; load average {}\n",
        o.per_tx,
        o.s1_reps.max(1),
        o.s1_messages,
        sum.s1_one,
        o.producers,
        sum.s1_many,
        sys::load_average()
    );
    print_steps_header(o);
    let sustained = match o.rate {
        Some(r) => Some(StepResult {
            offered: r,
            verdict: "given by --rate".into(),
            ..StepResult::default()
        }),
        None => {
            let start = o.start_rate.unwrap_or(0.4 * sum.s1_many);
            search(o, backend, "search", start, o.factor, false, &mut steps).await?
        }
    };
    sum.sustained = sustained.clone();
    let Some(best) = sustained else {
        return Ok(());
    };
    for (share, slot) in [(0.5, &mut sum.at50), (0.9, &mut sum.at90)] {
        let label = format!("{:.0}%", share * 100.0);
        let r = step(
            o,
            backend,
            &label,
            (best.offered * share).round(),
            o.latency_secs,
            false,
        )
        .await?;
        print_step(backend, &r);
        *slot = Some(r);
    }
    if backend != Backend::Sqlite && o.held {
        let r = step(
            o,
            backend,
            "90% held",
            (best.offered * 0.9).round(),
            o.latency_secs,
            true,
        )
        .await?;
        print_step(backend, &r);
        sum.held90 = Some(r);
        if o.held_search {
            // From the quiet rate, in finer steps: the question is whether it holds.
            let factor = o.resolution.mul_add(2.0, 1.0);
            sum.held_searched = true;
            sum.held_sustained = search(
                o,
                backend,
                "search held",
                best.offered,
                factor,
                true,
                &mut steps,
            )
            .await?;
        }
    }
    Ok(())
}

/// Runs every backend and prints the tables; `Err` if a correctness check failed.
pub(crate) async fn run(o: &Options) -> Res<()> {
    if o.producers == 0 || !o.partitions.is_multiple_of(o.producers) {
        return Err("--producers must divide --partitions (each producer owns partitions)".into());
    }
    sys::time_passes();
    sys::time_batches();
    println!(
        "### S5 steady state: {} producers in the runtime's process, {} msgs per transaction, offered open-loop; one queue of {} partitions, one transactional handler ({:?}); steps of {} s judged on their second half (committed and handled >= {}x offered, backlog growth <= {} s of offered messages or one sequencer pass, {} messages, if more); latency runs of {} s, the first {} s left out",
        o.producers,
        o.per_tx,
        o.partitions,
        o.profile,
        o.step_secs,
        o.keep_up,
        o.max_growth_secs,
        o.profile.profile().runtime().sequencer_batch,
        o.latency_secs,
        o.warmup_secs
    );
    let mut sums = Vec::new();
    let mut failed = Vec::new();
    for &backend in &o.backends {
        let mut sum = Summary {
            load_start: sys::load_average(),
            ..Summary::default()
        };
        if let Err(e) = run_backend(o, backend, &mut sum).await {
            eprintln!("{backend}: {e}");
            failed.push(format!("{backend}: {e}"));
            sum.error = Some(e.to_string());
        }
        sum.load_end = sys::load_average();
        sums.push((backend, sum));
    }
    println!("\n### S5 steady state: summary (commit→handled ms p50 / p99 / max)\n");
    println!(
        "| backend | load average at start / end | S1 {}/tx 1 producer | S1 {}/tx {} producers | sustained msgs/s | ÷ S1 {} producers | ÷ S1 1 producer | at 50% | at 90% | 90% held: handled msgs/s, verdict | 90% held latency | held sustained msgs/s | held ÷ quiet |",
        o.per_tx, o.per_tx, o.producers, o.producers
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (backend, s) in &sums {
        if let Some(e) = &s.error {
            println!(
                "| {backend} | {} / {} | FAILED: {e} | | | | | | | | | | |",
                s.load_start, s.load_end
            );
            continue;
        }
        let best = s.sustained.as_ref().map_or(f64::NAN, |r| r.offered);
        let lat = |r: &Option<StepResult>| {
            r.as_ref().map_or("n/a".into(), |r| {
                format!(
                    "{}{}",
                    ms3(r.lat),
                    if r.sustained { "" } else { " (not sustained)" }
                )
            })
        };
        let held = s.held90.as_ref().map_or("n/a".into(), |r| {
            format!("{}, {}", k(r.handled_rate), r.verdict)
        });
        let held_lat = s.held90.as_ref().map_or("n/a".into(), |r| ms3(r.lat));
        let (held_best, held_ratio) = match (s.held_searched, &s.held_sustained) {
            (true, Some(r)) => (k(r.offered), format!("{:.2}x", r.offered / best)),
            (true, None) => ("none sustained".into(), "n/a".into()),
            (false, _) => ("n/a".into(), "n/a".into()),
        };
        println!(
            "| {backend} | {} / {} | {} | {} | {} | {:.2}x | {:.2}x | {} | {} | {held} | {held_lat} | {held_best} | {held_ratio} |",
            s.load_start,
            s.load_end,
            k(s.s1_one),
            k(s.s1_many),
            k(best),
            best / s.s1_many,
            best / s.s1_one,
            lat(&s.at50),
            lat(&s.at90),
        );
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; ").into())
    }
}
