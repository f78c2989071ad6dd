//! Throughput over the last minutes, from samples of each handler's summed `processed_seq`
//! kept in memory.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use outbox::Status;

use crate::Dashboard;

/// At most this many samples are kept, whatever the window.
const MAX_SAMPLES: usize = 2_000;

/// One reading: when (database clock, ms) and each (queue, handler)'s processed total.
#[derive(Debug)]
struct Sample {
    at_ms: i64,
    processed: HashMap<(String, String), i64>,
}

/// The samples within the window, oldest first.
#[derive(Debug)]
pub(crate) struct Samples {
    window_ms: i64,
    list: VecDeque<Sample>,
}

/// Messages per second between two samples, ending at `at_ms`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rate {
    pub(crate) at_ms: i64,
    pub(crate) per_sec: f64,
}

impl Samples {
    pub(crate) fn new(window: Duration) -> Self {
        Samples {
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
            list: VecDeque::new(),
        }
    }

    fn push(&mut self, status: &Status) {
        let at_ms = status.taken_at_ms;
        if self.list.back().is_some_and(|s| at_ms - s.at_ms < 500) {
            return; // a page view right after the timer's sample adds nothing
        }
        let mut processed = HashMap::new();
        for q in &status.queues {
            for h in &q.handlers {
                let total = h.partitions.iter().map(|p| p.processed_seq).sum();
                processed.insert((q.name.clone(), h.name.clone()), total);
            }
        }
        self.list.push_back(Sample { at_ms, processed });
        while self
            .list
            .front()
            .is_some_and(|s| at_ms - s.at_ms > self.window_ms)
            || self.list.len() > MAX_SAMPLES
        {
            self.list.pop_front();
        }
    }

    /// Rates of one handler (`Some`) or of all handlers summed (`None`).
    pub(crate) fn rates(&self, key: Option<(&str, &str)>) -> Vec<Rate> {
        let total = |s: &Sample| -> HashMap<(String, String), i64> {
            match key {
                Some((q, h)) => s
                    .processed
                    .iter()
                    .filter(|((sq, sh), _)| sq == q && sh == h)
                    .map(|(k, v)| (k.clone(), *v))
                    .collect(),
                None => s.processed.clone(),
            }
        };
        let mut out = Vec::new();
        for pair in self.list.iter().collect::<Vec<_>>().windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let dt = (b.at_ms - a.at_ms).max(1) as f64 / 1000.0;
            let before = total(a);
            // A cursor that went back (a handler retired and registered anew) counts as 0.
            let done: i64 = total(b)
                .iter()
                .map(|(k, v)| (v - before.get(k).copied().unwrap_or(*v)).max(0))
                .sum();
            out.push(Rate {
                at_ms: b.at_ms,
                per_sec: done as f64 / dt,
            });
        }
        out
    }

    pub(crate) fn window_ms(&self) -> i64 {
        self.window_ms
    }
}

/// Records a sample of `status`.
pub(crate) fn record(dashboard: &Dashboard, status: &Status) {
    if let Ok(mut s) = dashboard.samples.lock() {
        s.push(status);
    }
}

/// An inline SVG line chart of `rates` over the window ending at `now_ms`.
pub(crate) fn chart(
    rates: &[Rate],
    now_ms: i64,
    window_ms: i64,
    w: u32,
    h: u32,
    axes: bool,
) -> String {
    let max = rates.iter().map(|r| r.per_sec).fold(0.0_f64, f64::max);
    let top = if max > 0.0 { max } else { 1.0 };
    let (left, bottom) = if axes { (48.0, 16.0) } else { (1.0, 1.0) };
    let pw = f64::from(w) - left - 1.0;
    let ph = f64::from(h) - bottom - 2.0;
    let x = |at: i64| {
        left + pw * (1.0 - ((now_ms - at) as f64 / window_ms.max(1) as f64).clamp(0.0, 1.0))
    };
    let y = |v: f64| 1.0 + ph * (1.0 - v / top);
    let mut points = String::new();
    for r in rates {
        let _ = write!(points, "{:.1},{:.1} ", x(r.at_ms), y(r.per_sec));
    }
    let class = if axes { "chart" } else { "spark" };
    let mut svg = format!(
        r#"<svg class="{class}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="throughput, at most {max:.1} messages per second">"#
    );
    if axes {
        let base = 1.0 + ph;
        let _ = write!(
            svg,
            r#"<line class="axis" x1="{left}" y1="{base:.1}" x2="{:.1}" y2="{base:.1}"/><line class="axis" x1="{left}" y1="1" x2="{left}" y2="{base:.1}"/><text x="{:.1}" y="12" text-anchor="end">{max:.1}/s</text><text x="{:.1}" y="{base:.1}" text-anchor="end">0</text><text x="{left}" y="{}" >-{} min</text><text x="{:.1}" y="{}" text-anchor="end">now</text>"#,
            left + pw,
            left - 4.0,
            left - 4.0,
            h - 2,
            window_ms / 60_000,
            left + pw,
            h - 2,
        );
    }
    if rates.len() >= 2 {
        let _ = write!(svg, r#"<polyline points="{}"/>"#, points.trim_end());
    } else {
        let _ = write!(
            svg,
            r#"<text class="nodata" x="{:.1}" y="{:.1}" text-anchor="middle">collecting…</text>"#,
            left + pw / 2.0,
            1.0 + ph / 2.0 + 4.0
        );
    }
    svg.push_str("</svg>");
    svg
}
