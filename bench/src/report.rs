//! Aggregation over repetitions and the Markdown tables.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use crate::cell::{Cell, Outcome, Record, System};

/// Median, min and max of one metric over passing repetitions, or why there is none.
#[derive(Debug, Clone)]
pub(crate) enum Summary {
    Value { med: f64, min: f64, max: f64 },
    Failed(String),
    Missing(String),
}

impl Summary {
    fn med(&self) -> Option<f64> {
        match self {
            Summary::Value { med, .. } => Some(*med),
            _ => None,
        }
    }
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v.abs() >= 10_000.0 {
        format!("{:.1}k", v / 1e3)
    } else if v.abs() >= 1_000.0 {
        format!("{:.2}k", v / 1e3)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn show(s: &Summary) -> String {
    match s {
        Summary::Value { med, min, max } => {
            format!("{} [{}–{}]", fmt_num(*med), fmt_num(*min), fmt_num(*max))
        }
        Summary::Failed(e) => format!("FAILED ({})", e.replace('|', "/")),
        Summary::Missing(why) => format!("n/a ({why})"),
    }
}

fn ratio(a: &Summary, b: &Summary) -> String {
    match (a.med(), b.med()) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "n/a".into(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Results grouped by (backend, system, cell).
#[derive(Debug, Default)]
pub(crate) struct Results {
    map: HashMap<(String, System, String), Vec<Outcome>>,
    order: Vec<(String, Cell)>,
    peer_missing: BTreeMap<System, String>,
}

fn key(cell: &Cell) -> String {
    serde_json::to_string(cell).unwrap_or_default()
}

impl Results {
    pub(crate) fn new(records: &[Record], peer_missing: BTreeMap<System, String>) -> Self {
        let mut r = Results {
            peer_missing,
            ..Default::default()
        };
        for rec in records {
            r.map
                .entry((rec.backend.clone(), rec.system, key(&rec.cell)))
                .or_default()
                .push(rec.outcome.clone());
            if rec.system == System::Ours
                && !r
                    .order
                    .iter()
                    .any(|(b, c)| b == &rec.backend && c == &rec.cell)
            {
                r.order.push((rec.backend.clone(), rec.cell.clone()));
            }
        }
        r
    }

    pub(crate) fn summary(
        &self,
        backend: &str,
        system: System,
        cell: &Cell,
        metric: &str,
    ) -> Summary {
        let Some(outs) = self.map.get(&(backend.to_owned(), system, key(cell))) else {
            return Summary::Missing(match self.peer_missing.get(&system) {
                Some(why) => why.clone(),
                None if system.is_peer() => "peer not run for this cell".into(),
                None => "not run".into(),
            });
        };
        if let Some(bad) = outs.iter().find(|o| !o.ok) {
            return Summary::Failed(bad.error.clone().unwrap_or_default());
        }
        let vals: Vec<f64> = outs
            .iter()
            .filter_map(|o| o.metrics.get(metric).copied())
            .filter(|v| v.is_finite())
            .collect();
        if vals.is_empty() {
            return Summary::Missing(format!("no {metric}"));
        }
        Summary::Value {
            med: median(vals.clone()),
            min: vals.iter().copied().fold(f64::INFINITY, f64::min),
            max: vals.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }

    /// Whether every cell of ours and of the ceilings passed its check.
    pub(crate) fn all_passed(&self) -> bool {
        self.map
            .iter()
            .filter(|((_, s, _), _)| !s.is_peer())
            .all(|(_, outs)| outs.iter().all(|o| o.ok))
    }

    /// Failed cells, for the exit message.
    pub(crate) fn failures(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .map
            .iter()
            .flat_map(|((b, s, c), outs)| {
                outs.iter()
                    .filter(|o| !o.ok)
                    .map(move |o| format!("{b} {s:?} {c}: {}", o.error.clone().unwrap_or_default()))
            })
            .collect();
        v.sort();
        v
    }

    fn has_metric(&self, metric: &str) -> bool {
        self.map
            .values()
            .flatten()
            .any(|o| o.metrics.contains_key(metric))
    }

    fn cells(&self, scenario: &str) -> Vec<&(String, Cell)> {
        self.order
            .iter()
            .filter(|(_, c)| c.scenario() == scenario)
            .collect()
    }

    /// The Markdown report.
    pub(crate) fn markdown(&self) -> String {
        let mut out = String::new();
        let o = &mut out;
        let s1 = self.cells("S1");
        if !s1.is_empty() {
            let _ = writeln!(
                o,
                "### S1 enqueue in the caller's transaction (msgs/s, median [min–max]; latency = begin→commit)\n"
            );
            let _ = writeln!(
                o,
                "| backend | cell | ours msgs/s | ours p50 / p99 ms | raw ceiling msgs/s | ceiling p50 / p99 ms | ours ÷ ceiling | cf-modkit-db msgs/s | ours ÷ modkit | awa msgs/s | awa p50 / p99 ms | ours ÷ awa |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|");
            for (b, c) in s1 {
                let ceil = c.ceiling().unwrap_or_else(|| c.clone());
                let ours = self.summary(b, System::Ours, c, "msgs_per_s");
                let ce = self.summary(b, System::Ceiling, &ceil, "msgs_per_s");
                let mk = self.summary(b, System::Modkit, c, "msgs_per_s");
                let awa = self.summary(b, System::Awa, c, "msgs_per_s");
                let lat = |s: System, c: &Cell| {
                    format!(
                        "{} / {}",
                        short(&self.summary(b, s, c, "p50_ms")),
                        short(&self.summary(b, s, c, "p99_ms"))
                    )
                };
                let _ = writeln!(
                    o,
                    "| {b} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    c.label(),
                    show(&ours),
                    lat(System::Ours, c),
                    show(&ce),
                    lat(System::Ceiling, &ceil),
                    ratio(&ours, &ce),
                    show(&mk),
                    ratio(&ours, &mk),
                    show(&awa),
                    lat(System::Awa, c),
                    ratio(&ours, &awa)
                );
            }
            let _ = writeln!(o);
        }
        let s2 = self.cells("S2");
        if !s2.is_empty() {
            let _ = writeln!(
                o,
                "### S2 drain a pre-filled backlog (msgs/s from start() to the last message handled, median [min–max])\n"
            );
            let stmts = self.has_metric("stmts_per_1k_msgs");
            let _ = writeln!(
                o,
                "| backend | cell | ours msgs/s | raw ceiling (same batch) msgs/s | ours ÷ ceiling | ceiling with sequencing msgs/s | ours ÷ it | cf-modkit-db msgs/s | ours ÷ modkit | awa msgs/s | ours ÷ awa |{}",
                if stmts {
                    " statements per 1,000 msgs ours / ceiling |"
                } else {
                    ""
                }
            );
            let _ = writeln!(
                o,
                "|---|---|---|---|---|---|---|---|---|---|---|{}",
                if stmts { "---|" } else { "" }
            );
            for (b, c) in s2 {
                let ceil = c.ceiling().unwrap_or_else(|| c.clone());
                let ours = self.summary(b, System::Ours, c, "msgs_per_s");
                let ce = self.summary(b, System::Ceiling, &ceil, "msgs_per_s");
                let sq = self.summary(b, System::SeqCeiling, &ceil, "msgs_per_s");
                let mk = self.summary(b, System::Modkit, c, "msgs_per_s");
                let awa = self.summary(b, System::Awa, c, "msgs_per_s");
                let extra = if stmts {
                    format!(
                        " {} / {} |",
                        short(&self.summary(b, System::Ours, c, "stmts_per_1k_msgs")),
                        short(&self.summary(b, System::Ceiling, &ceil, "stmts_per_1k_msgs"))
                    )
                } else {
                    String::new()
                };
                let _ = writeln!(
                    o,
                    "| {b} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |{extra}",
                    c.label(),
                    show(&ours),
                    show(&ce),
                    ratio(&ours, &ce),
                    show(&sq),
                    ratio(&ours, &sq),
                    show(&mk),
                    ratio(&ours, &mk),
                    show(&awa),
                    ratio(&ours, &awa)
                );
            }
            let _ = writeln!(o);
        }
        let s3 = self.cells("S3");
        if !s3.is_empty() {
            let _ = writeln!(
                o,
                "### S3 commit→handler-start latency (ours: LowLatency), 1 message per commit every 2 ms (ms, median of reps [min–max])\n"
            );
            let _ = writeln!(o, "| backend | system | producer | p50 | p95 | p99 | max |");
            let _ = writeln!(o, "|---|---|---|---|---|---|---|");
            for (b, c) in s3 {
                for (system, name) in [(System::Ours, "ours"), (System::Awa, "awa")] {
                    if system.is_peer() && !self.map.contains_key(&(b.clone(), system, key(c))) {
                        continue;
                    }
                    let m = |k: &str| show(&self.summary(b, system, c, k));
                    let _ = writeln!(
                        o,
                        "| {b} | {name} | {} | {} | {} | {} | {} |",
                        c.label(),
                        m("p50_ms"),
                        m("p95_ms"),
                        m("p99_ms"),
                        m("max_ms")
                    );
                }
            }
            let _ = writeln!(o);
        }
        let s4 = self.cells("S4");
        if !s4.is_empty() {
            let _ = writeln!(
                o,
                "### S4 idle cost, Default profile, one transactional handler per queue, no traffic (median [min–max])\n"
            );
            let _ = writeln!(
                o,
                "| backend | runtime | CPU % of one core | statements/s (client-side count) | server counter/s | RSS MiB |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|---|");
            for (b, c) in s4 {
                let m = |k: &str| show(&self.summary(b, System::Ours, c, k));
                let server = match b.as_str() {
                    "postgres" => format!("{} xacts", m("server_xacts_per_s")),
                    "mysql" => format!("{} Questions (whole server)", m("server_questions_per_s")),
                    _ => "n/a".into(),
                };
                let _ = writeln!(
                    o,
                    "| {b} | {} | {} | {} | {server} | {} |",
                    c.label(),
                    m("cpu_pct"),
                    m("stmts_per_s"),
                    m("rss_mib")
                );
            }
            let _ = writeln!(o);
        }
        out
    }
}

fn short(s: &Summary) -> String {
    match s {
        Summary::Value { med, .. } => fmt_num(*med),
        Summary::Failed(_) => "FAILED".into(),
        Summary::Missing(_) => "n/a".into(),
    }
}
