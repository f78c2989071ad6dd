//! The cost of the `opentelemetry` feature: the S2 drain run by two builds of this binary, one
//! with the feature and one without, as child processes on fresh databases, alternating which
//! goes first in each repetition, side by side in one report.
//!
//! ```sh
//! cargo build --release -p outbox-bench && cp target/release/outbox-bench /tmp/outbox-bench-off
//! cargo build --release -p outbox-bench --features opentelemetry && cp target/release/outbox-bench /tmp/outbox-bench-on
//! /tmp/outbox-bench-on trace-cost --on-bin /tmp/outbox-bench-on --off-bin /tmp/outbox-bench-off --reps 7
//! ```

use std::path::{Path, PathBuf};

use crate::cell::{Cell, HandlerKind, Outcome, ProfileName};
use crate::db::Backend;
use crate::{Args, Res};

/// Whether this build has the `opentelemetry` feature of `outbox`.
pub(crate) const FEATURE_ON: bool = cfg!(feature = "opentelemetry");

/// What `trace-cost` runs.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) on_bin: PathBuf,
    pub(crate) off_bin: PathBuf,
    pub(crate) backends: Vec<Backend>,
    pub(crate) partitions: Vec<u32>,
    pub(crate) handlers: Vec<HandlerKind>,
    pub(crate) profile: ProfileName,
    pub(crate) messages: u64,
    pub(crate) reps: u32,
}

/// Runs one cell in a child build; its msgs/s.
async fn child(a: &Args, bin: &Path, expect_on: bool, backend: Backend, cell: &Cell) -> Res<f64> {
    let out = tokio::process::Command::new(bin)
        .arg("--postgres-url")
        .arg(&a.postgres_url)
        .arg("--mysql-url")
        .arg(&a.mysql_url)
        .arg("run-cell")
        .arg("--backend")
        .arg(backend.name())
        .arg("--cell")
        .arg(serde_json::to_string(cell)?)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let feature = format!("opentelemetry={expect_on}");
    if !text.lines().any(|l| l == feature) {
        return Err(format!(
            "{} is not the build with {feature} (exit {})",
            bin.display(),
            out.status
        )
        .into());
    }
    let Some(line) = text.lines().rev().find(|l| l.starts_with('{')) else {
        return Err(format!("{} printed no result (exit {})", bin.display(), out.status).into());
    };
    let o: Outcome = serde_json::from_str(line)?;
    if !o.ok {
        return Err(format!("cell failed: {}", o.error.unwrap_or_default()).into());
    }
    o.metrics
        .get("msgs_per_s")
        .copied()
        .ok_or_else(|| "no msgs_per_s".into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn show(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{:.1}k [{:.1}k–{:.1}k]",
        median(v.to_vec()) / 1e3,
        min / 1e3,
        max / 1e3
    )
}

/// Runs every cell `reps` times with each build, alternating which goes first, and prints a
/// Markdown table of medians.
pub(crate) async fn run(a: &Args, o: &Options) -> Res<()> {
    println!(
        "| backend | cell | feature off msgs/s | feature on msgs/s | on ÷ off |\n|---|---|---|---|---|"
    );
    for &backend in &o.backends {
        for &partitions in &o.partitions {
            for &handler in &o.handlers {
                let cell = Cell::S2 {
                    handler,
                    profile: o.profile,
                    partitions,
                    messages: o.messages,
                };
                let (mut off, mut on) = (Vec::new(), Vec::new());
                for rep in 0..o.reps {
                    let order = if rep % 2 == 0 {
                        [false, true]
                    } else {
                        [true, false]
                    };
                    for feature in order {
                        let bin = if feature { &o.on_bin } else { &o.off_bin };
                        let v = child(a, bin, feature, backend, &cell).await?;
                        eprintln!(
                            "{backend} {} rep {} opentelemetry={feature}: {v:.0} msgs/s",
                            cell.label(),
                            rep + 1
                        );
                        if feature { &mut on } else { &mut off }.push(v);
                    }
                }
                println!(
                    "| {backend} | {} | {} | {} | {:.3}× |",
                    cell.label(),
                    show(&off),
                    show(&on),
                    median(on.clone()) / median(off.clone())
                );
            }
        }
    }
    Ok(())
}
