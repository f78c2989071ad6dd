//! One process-wide metrics recorder for the tests that count what the runtime did.
//!
//! A snapshot of the debugging recorder resets every counter of the process, and the tests of
//! one binary run at once: read directly, one test's snapshot would steal another's counts. So
//! every snapshot is added to running totals here, under one lock, and each test reads the
//! totals of its own queue names (one per test and backend).

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// Counter totals by (queue, name), and what [`since_last`] returned last.
#[derive(Default)]
struct Totals {
    counted: BTreeMap<(String, String), u64>,
    read: BTreeMap<(String, String), u64>,
}

fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("install the recorder");
        snapshotter
    })
}

/// Installs the recorder (once per process). Call it before the runtime records anything:
/// counts recorded before are lost.
pub fn install() {
    snapshotter();
}

/// Adds a snapshot to the totals and runs `f` on them.
fn with_totals<T>(f: impl FnOnce(&mut Totals) -> T) -> T {
    static TOTALS: OnceLock<Mutex<Totals>> = OnceLock::new();
    let mut totals = TOTALS
        .get_or_init(Mutex::default)
        .lock()
        .expect("totals lock");
    for (k, _, _, v) in snapshotter().snapshot().into_vec() {
        let key = k.key();
        let Some(queue) = key.labels().find(|l| l.key() == "queue") else {
            continue;
        };
        if let DebugValue::Counter(n) = v {
            *totals
                .counted
                .entry((queue.value().to_owned(), key.name().to_owned()))
                .or_default() += n;
        }
    }
    f(&mut totals)
}

/// The counters labelled with `queue` since the recorder was installed, by name.
pub fn counters(queue: &str) -> BTreeMap<String, u64> {
    with_totals(|t| {
        t.counted
            .iter()
            .filter(|((q, _), _)| q == queue)
            .map(|((_, name), n)| (name.clone(), *n))
            .collect()
    })
}

/// The counter `name` of `queue` since the last call with the same two (or since the recorder
/// was installed).
pub fn since_last(queue: &str, name: &str) -> u64 {
    with_totals(|t| {
        let key = (queue.to_owned(), name.to_owned());
        let now = t.counted.get(&key).copied().unwrap_or(0);
        let before = t.read.insert(key, now).unwrap_or(0);
        now - before
    })
}
