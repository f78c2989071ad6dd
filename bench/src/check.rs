//! Payloads, the per-cell correctness checker and latency statistics.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The ~200-byte JSON body of every benchmark message.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Payload {
    /// Partition the producer chose.
    pub(crate) p: u32,
    /// Index of the message within its partition, in producer order (0, 1, 2, …).
    pub(crate) k: u64,
    /// Global index of the message.
    pub(crate) i: u64,
    /// Wall clock (µs since the epoch) just before the producer's commit.
    pub(crate) t: i64,
    /// Padding up to about 200 bytes.
    pub(crate) pad: String,
}

const PAD: &str = "lorem-ipsum-dolor-sit-amet-consectetur-adipiscing-elit-sed-do-eiusmod-tempor-incididunt-ut-labore-et-dolore-magna-aliqua-ut-enim-ad-minim-veniam-quis-nostrud-exerc";

/// Serializes a payload of about 200 bytes.
pub(crate) fn payload(p: u32, k: u64, i: u64, t: i64) -> Vec<u8> {
    serde_json::to_vec(&Payload {
        p,
        k,
        i,
        t,
        pad: PAD.to_owned(),
    })
    .unwrap_or_default()
}

/// Wall clock in µs since the epoch (comparable across processes on one machine).
pub(crate) fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Default)]
struct Part {
    next_k: u64,
    last_seq: i64,
}

/// Checks what handlers see: every message once (no loss, no duplicate) and, per partition,
/// in producer order with strictly increasing `seq`.
#[derive(Debug)]
pub(crate) struct Checker {
    parts: Vec<Mutex<Part>>,
    handled: AtomicU64,
    duplicates: AtomicU64,
    violations: AtomicU64,
    first_problem: Mutex<Option<String>>,
}

impl Checker {
    pub(crate) fn new(partitions: u32) -> Self {
        Self {
            parts: (0..partitions)
                .map(|_| Mutex::new(Part::default()))
                .collect(),
            handled: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            violations: AtomicU64::new(0),
            first_problem: Mutex::new(None),
        }
    }

    pub(crate) fn problem(&self, what: String) {
        self.violations.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut p) = self.first_problem.lock()
            && p.is_none()
        {
            *p = Some(what);
        }
    }

    /// Records one delivery of the message `k` of `partition` at sequence `seq` (`None` where
    /// the system has no sequence number to show).
    pub(crate) fn see(&self, partition: u32, seq: Option<i64>, body: &Payload) {
        if body.p != partition {
            self.problem(format!(
                "message for partition {} delivered on partition {partition}",
                body.p
            ));
            return;
        }
        let Some(slot) = self.parts.get(partition as usize) else {
            self.problem(format!("partition {partition} out of range"));
            return;
        };
        let Ok(mut part) = slot.lock() else {
            return;
        };
        if body.k == part.next_k {
            if let Some(seq) = seq {
                if seq <= part.last_seq {
                    let last = part.last_seq;
                    drop(part);
                    self.problem(format!("partition {partition}: seq {seq} after {last}"));
                    return;
                }
                part.last_seq = seq;
            }
            part.next_k += 1;
            drop(part);
            self.handled.fetch_add(1, Ordering::Relaxed);
        } else if body.k < part.next_k {
            drop(part);
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        } else {
            let expected = part.next_k;
            drop(part);
            self.problem(format!(
                "partition {partition}: message {} delivered before message {expected} (order or loss)",
                body.k
            ));
        }
    }

    /// Distinct messages handled in order so far.
    pub(crate) fn handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }

    /// Redeliveries seen.
    pub(crate) fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// Whether an order or loss problem was seen.
    pub(crate) fn broken(&self) -> bool {
        self.violations.load(Ordering::Relaxed) > 0
    }

    /// The verdict once the cell is over: `expected` messages, duplicates allowed or not.
    pub(crate) fn verdict(&self, expected: u64, duplicates_allowed: bool) -> Result<(), String> {
        if let Ok(p) = self.first_problem.lock()
            && let Some(p) = p.as_ref()
        {
            return Err(format!(
                "{} order/loss violations, first: {p}",
                self.violations.load(Ordering::Relaxed)
            ));
        }
        let handled = self.handled();
        if handled != expected {
            return Err(format!("handled {handled} of {expected} messages"));
        }
        let dups = self.duplicates();
        if dups > 0 && !duplicates_allowed {
            return Err(format!("{dups} duplicate deliveries"));
        }
        Ok(())
    }
}

/// Percentile (nearest rank) of sorted values.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The middle value (the upper one of an even count) of unsorted figures; NaN for none.
pub(crate) fn upper_median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Sorts latencies and returns them in milliseconds.
pub(crate) fn sorted_ms(lat: &[Duration]) -> Vec<f64> {
    let mut v: Vec<f64> = lat.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    v.sort_by(f64::total_cmp);
    v
}
