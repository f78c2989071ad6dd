//! What one benchmark cell is, and what it measured. The peers print the same shapes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Handler kind of a drain cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub(crate) enum HandlerKind {
    /// Runs inside the transaction that acks it.
    Tx,
    /// Runs under a lease, outside any transaction.
    Leased,
}

/// Profile of a drain cell (the peer maps it to its own profile of the same name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ProfileName {
    /// `Profile::HighThroughput` (batch 500).
    HighThroughput,
    /// `Profile::Default` (batch 100).
    Default,
}

impl ProfileName {
    /// The batch size the profile uses, which is the raw ceiling's batch size for it.
    pub(crate) fn batch(self) -> u32 {
        match self {
            ProfileName::HighThroughput => outbox::Profile::HighThroughput.tuning().batch_size,
            ProfileName::Default => outbox::Profile::Default.tuning().batch_size,
        }
    }

    pub(crate) fn profile(self) -> outbox::Profile {
        match self {
            ProfileName::HighThroughput => outbox::Profile::HighThroughput,
            ProfileName::Default => outbox::Profile::Default,
        }
    }

    fn label(self) -> &'static str {
        match self {
            ProfileName::HighThroughput => "HighThroughput",
            ProfileName::Default => "Default",
        }
    }
}

/// One benchmark cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scenario", rename_all = "snake_case")]
pub(crate) enum Cell {
    /// Enqueue in the caller's transaction.
    S1 {
        /// Messages per transaction.
        per_tx: usize,
        /// Concurrent producers.
        producers: usize,
        /// Messages in total.
        total: usize,
    },
    /// Drain a pre-filled backlog.
    S2 {
        /// Handler kind (the raw ceiling has none: it reads and advances a cursor).
        handler: HandlerKind,
        /// Profile.
        profile: ProfileName,
        /// Partitions of the queue.
        partitions: u32,
        /// Messages pre-filled.
        messages: u64,
    },
    /// Commit→handler-start latency at a steady rate.
    S3 {
        /// Producer in a child process.
        cross_process: bool,
        /// Messages produced.
        messages: u64,
        /// Interval between commits, µs.
        interval_us: u64,
    },
    /// Idle cost.
    S4 {
        /// Queues (one transactional handler each).
        queues: u32,
        /// Partitions per queue.
        partitions: u32,
        /// Measured seconds.
        secs: f64,
    },
}

impl Cell {
    pub(crate) fn scenario(&self) -> &'static str {
        match self {
            Cell::S1 { .. } => "S1",
            Cell::S2 { .. } => "S2",
            Cell::S3 { .. } => "S3",
            Cell::S4 { .. } => "S4",
        }
    }

    /// Label of the cell in tables (sizes left out: they are in the header).
    pub(crate) fn label(&self) -> String {
        match self {
            Cell::S1 {
                per_tx, producers, ..
            } => format!("{per_tx}/tx, {producers} producer(s)"),
            Cell::S2 {
                handler,
                profile,
                partitions,
                ..
            } => format!(
                "{} {} p={partitions}",
                match handler {
                    HandlerKind::Tx => "tx",
                    HandlerKind::Leased => "leased",
                },
                profile.label()
            ),
            Cell::S3 { cross_process, .. } => {
                if *cross_process {
                    "cross-process".into()
                } else {
                    "same process".into()
                }
            }
            Cell::S4 {
                queues, partitions, ..
            } => format!("{queues} queues x {partitions} partitions"),
        }
    }

    /// The raw-SQL ceiling cell this cell is compared with, if any.
    pub(crate) fn ceiling(&self) -> Option<Cell> {
        match self {
            Cell::S1 { .. } => Some(self.clone()),
            Cell::S2 {
                profile,
                partitions,
                messages,
                ..
            } => Some(Cell::S2 {
                handler: HandlerKind::Tx,
                profile: *profile,
                partitions: *partitions,
                messages: *messages,
            }),
            _ => None,
        }
    }

    /// Label of the ceiling cell.
    pub(crate) fn ceiling_label(&self) -> String {
        match self {
            Cell::S1 { per_tx, .. } if *per_tx == 1 => {
                format!("{}: 1-row INSERT per tx", self.label())
            }
            Cell::S1 { .. } => format!("{}: multi-row INSERT", self.label()),
            Cell::S2 {
                profile,
                partitions,
                ..
            } => format!(
                "SKIP LOCKED cursor batch={} p={partitions}, 4 workers",
                profile.batch()
            ),
            _ => "-".into(),
        }
    }
}

/// What a cell measured (one repetition).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Outcome {
    /// Whether the correctness check passed.
    pub(crate) ok: bool,
    /// Why not.
    pub(crate) error: Option<String>,
    /// Figures: `msgs_per_s`, `p50_ms`, …
    pub(crate) metrics: BTreeMap<String, f64>,
}

impl Outcome {
    pub(crate) fn passed(metrics: BTreeMap<String, f64>) -> Self {
        Self {
            ok: true,
            error: None,
            metrics,
        }
    }

    pub(crate) fn failed(error: impl Into<String>, metrics: BTreeMap<String, f64>) -> Self {
        Self {
            ok: false,
            error: Some(error.into()),
            metrics,
        }
    }

    /// Passed if `check` is `Ok`.
    pub(crate) fn checked(check: Result<(), String>, metrics: BTreeMap<String, f64>) -> Self {
        match check {
            Ok(()) => Self::passed(metrics),
            Err(e) => Self::failed(e, metrics),
        }
    }
}

/// Which system ran a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum System {
    /// This project.
    Ours,
    /// Plain SQL.
    Ceiling,
    /// Plain SQL of the same two-step pipeline (S2 only): the backlog starts unnumbered, one
    /// task numbers it into the table the workers drain.
    SeqCeiling,
    /// cf-modkit-db 0.7.2.
    Modkit,
    /// awa 0.6.9.
    Awa,
}

impl System {
    /// Whether this is a peer run as a child process (its failures do not fail the run).
    pub(crate) fn is_peer(self) -> bool {
        matches!(self, System::Modkit | System::Awa)
    }
}

/// One result line (also the JSON output shape).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) backend: String,
    pub(crate) system: System,
    pub(crate) scenario: String,
    pub(crate) variant: String,
    pub(crate) cell: Cell,
    pub(crate) rep: u32,
    pub(crate) outcome: Outcome,
}
