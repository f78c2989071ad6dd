//! `outbox-bench`: scenarios S1–S4 of BENCHMARKS.md on SQLite, PostgreSQL and MySQL/MariaDB,
//! each cell on a fresh database, side by side with the raw SQL ceilings and (with
//! `--peer modkit,awa`) cf-modkit-db 0.7.2 and awa 0.6.9 run as child processes. Every cell
//! checks correctness; the process exits non-zero if a cell of ours or of a ceiling failed its
//! check (a peer's failure is reported, not counted).
//!
//! ```sh
//! cargo run --release -p outbox-bench -- --backends sqlite,postgres,mysql --reps 3
//! cargo run -p outbox-bench -- --smoke --backends sqlite,postgres,mysql
//! ```
#![allow(
    clippy::print_stdout,
    reason = "the report goes to stdout, the progress display to stderr"
)]

mod ceiling;
mod cell;
mod check;
mod db;
mod footprint;
mod horizon;
mod ours;
mod partitions;
mod relay;
mod report;
mod scheduled;
mod steady;
mod sys;
mod tracecost;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use cell::{Cell, HandlerKind, Outcome, ProfileName, Record, System};
use db::{Backend, FreshDb, Servers};

/// Errors of the harness itself (a cell's error becomes a failed outcome).
pub(crate) type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Which scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    S1,
    S2,
    S3,
    S4,
}

/// Peers run as child processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Peer {
    /// cf-modkit-db 0.7.2 (bench/modkit-peer, built separately).
    Modkit,
    /// awa 0.6.9, PostgreSQL only (bench/awa-peer, built separately).
    Awa,
}

impl Peer {
    fn system(self) -> System {
        match self {
            Peer::Modkit => System::Modkit,
            Peer::Awa => System::Awa,
        }
    }
}

/// Benchmarks of the outbox, side by side with raw SQL, cf-modkit-db and awa.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Backends to run on.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres,mysql")]
    backends: Vec<Backend>,
    /// Scenarios to run.
    #[arg(long, value_delimiter = ',', default_value = "s1,s2,s3,s4")]
    scenarios: Vec<Scenario>,
    /// Repetitions of every cell (median, min and max are reported; default 3, smoke 1).
    #[arg(long)]
    reps: Option<u32>,
    /// Tiny sizes: every scenario on every backend in well under a minute (for CI).
    #[arg(long)]
    smoke: bool,
    /// S1: messages per cell (default 4,000 at 1/tx and 50,000 at 100/tx; smoke 200 / 2,000).
    #[arg(long)]
    s1_messages: Option<usize>,
    /// S2: messages pre-filled per cell (default 100,000; smoke 2,000).
    #[arg(long)]
    s2_messages: Option<u64>,
    /// S2: partitions of the queue.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    partitions: Vec<u32>,
    /// S2: profiles.
    #[arg(long, value_delimiter = ',', default_value = "high-throughput,default")]
    profiles: Vec<ProfileName>,
    /// S2: handler kinds.
    #[arg(long, value_delimiter = ',', default_value = "tx,leased")]
    handlers: Vec<HandlerKind>,
    /// S3: messages per cell (default 2,500; smoke 200).
    #[arg(long)]
    s3_messages: Option<u64>,
    /// S3: interval between the producer's commits, in µs.
    #[arg(long, default_value_t = 2_000)]
    s3_interval_us: u64,
    /// S3: override the LowLatency profile's handler concurrency (diagnostics).
    #[arg(long)]
    s3_concurrency: Option<u32>,
    /// S3: skip the cross-process variant.
    #[arg(long)]
    no_cross_process: bool,
    /// S4: measured seconds per cell (default 60; smoke 2).
    #[arg(long)]
    s4_secs: Option<f64>,
    /// S4: repetitions (default: --reps).
    #[arg(long)]
    s4_reps: Option<u32>,
    /// S4: partitions per queue (8 queues each); 64 is the scenario, 1 shows whether the cost
    /// grows with partitions.
    #[arg(long, value_delimiter = ',', default_value = "64,1")]
    s4_partitions: Vec<u32>,
    /// S2: partitions at which the peer runs (it is slow at its Default profile).
    #[arg(long, value_delimiter = ',', default_value = "8")]
    peer_partitions: Vec<u32>,
    /// S2: messages the peer drains with its Default profile (it caps a partition near
    /// 100 msgs/s by design, so a full backlog would take minutes; the rate is what is compared).
    #[arg(long, default_value_t = 5_000)]
    peer_default_messages: u64,
    /// S2: messages the awa peer drains (in its ordered mode, one worker per partition, it
    /// handles a few hundred msgs/s on this machine; the rate is what is compared).
    #[arg(long, default_value_t = 20_000)]
    awa_s2_messages: u64,
    /// S1: messages the awa peer enqueues per cell at most (its enqueue costs about 1 ms per
    /// job here; the rate is what is compared).
    #[arg(long, default_value_t = 10_000)]
    awa_s1_messages: usize,
    /// S2: count the statements sent per message (sqlx statement events; costs some CPU).
    #[arg(long)]
    count_statements: bool,
    /// S2: handler batch size of ours instead of the profile's (for tuning sweeps; the
    /// ceilings keep the profile's batch).
    #[arg(long)]
    s2_batch: Option<u32>,
    /// S2: partitions in flight per handler for ours instead of the profile's (tuning sweeps).
    #[arg(long)]
    s2_concurrency: Option<u32>,
    /// S2: messages ours sequences per transaction instead of the profile's (tuning sweeps).
    #[arg(long)]
    s2_sequencer_batch: Option<u32>,
    /// Skip the raw SQL ceilings.
    #[arg(long)]
    no_ceiling: bool,
    /// Run peers next to ours in every cell they support (`modkit`, `awa`, or both).
    #[arg(long, value_delimiter = ',')]
    peer: Vec<Peer>,
    /// The cf-modkit-db peer's binary (build: see docs/BENCHMARKS.md).
    #[arg(
        long,
        env = "OUTBOX_BENCH_PEER_BIN",
        default_value = "bench/modkit-peer/target/release/outbox-bench-modkit-peer"
    )]
    peer_bin: PathBuf,
    /// The awa peer's binary (build: see docs/BENCHMARKS.md).
    #[arg(
        long,
        env = "OUTBOX_BENCH_AWA_PEER_BIN",
        default_value = "bench/awa-peer/target/release/outbox-bench-awa-peer"
    )]
    awa_peer_bin: PathBuf,
    /// PostgreSQL server (a database of it to connect to for CREATE/DROP DATABASE).
    #[arg(
        long,
        env = "OUTBOX_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
    /// MySQL/MariaDB server.
    #[arg(
        long,
        env = "OUTBOX_BENCH_MYSQL_URL",
        default_value = "mysql://root@127.0.0.1:3306/test"
    )]
    mysql_url: String,
    /// Where to write every repetition's figures as JSON.
    #[arg(long, default_value = "bench-results.json")]
    json: PathBuf,
    /// No progress display.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// S5: relay throughput into NATS JetStream and RabbitMQ beside a raw publish loop of the
    /// same client, and commit-to-broker latency (see BENCHMARKS.md).
    Relay {
        /// Backends to run on.
        #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres,mysql")]
        backends: Vec<Backend>,
        /// Brokers.
        #[arg(long, value_delimiter = ',', default_value = "nats,rabbitmq")]
        brokers: Vec<relay::BrokerKind>,
        /// Messages pre-filled per throughput cell.
        #[arg(long, default_value_t = 20_000)]
        messages: u64,
        /// Messages of the latency cell (one every 2 ms).
        #[arg(long, default_value_t = 1_000)]
        latency_messages: u64,
        /// NATS server with JetStream.
        #[arg(
            long,
            env = "OUTBOX_BENCH_NATS_URL",
            default_value = "nats://127.0.0.1:4222"
        )]
        nats_url: String,
        /// RabbitMQ.
        #[arg(
            long,
            env = "OUTBOX_BENCH_RABBITMQ_URL",
            default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
        )]
        amqp_url: String,
    },
    /// The cost of the `opentelemetry` feature: S2 drain by a build with it (`--on-bin`) and
    /// one without (`--off-bin`), alternating, medians side by side (see BENCHMARKS.md).
    TraceCost {
        /// This binary built with `--features opentelemetry`.
        #[arg(long)]
        on_bin: PathBuf,
        /// This binary built without it.
        #[arg(long)]
        off_bin: PathBuf,
        /// Backends to run on.
        #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres,mysql")]
        backends: Vec<Backend>,
        /// Partitions of the queue.
        #[arg(long, value_delimiter = ',', default_value = "8")]
        partitions: Vec<u32>,
        /// Handler kinds.
        #[arg(long, value_delimiter = ',', default_value = "tx")]
        handlers: Vec<HandlerKind>,
        /// Profile.
        #[arg(long, default_value = "high-throughput")]
        profile: ProfileName,
        /// Messages pre-filled per run.
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        /// Repetitions per build.
        #[arg(long, default_value_t = 5)]
        reps: u32,
    },
    /// One cell of ours on a fresh database, its outcome as a JSON line (internal: the child
    /// of `trace-cost`).
    #[command(hide = true)]
    RunCell {
        #[arg(long)]
        backend: Backend,
        #[arg(long)]
        cell: String,
    },
    /// Scheduled delivery: lateness after the due time in a quiet system, and the cost of a
    /// million future messages to a drain and a status read (see BENCHMARKS.md).
    Scheduled {
        /// Backends to run on.
        #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres,mysql")]
        backends: Vec<Backend>,
        /// Scheduled messages per latency run.
        #[arg(long, default_value_t = 300)]
        messages: u64,
        /// Future messages stored for the cost cells.
        #[arg(long, default_value_t = 1_000_000)]
        future: u64,
        /// Immediate messages drained by the cost cells.
        #[arg(long, default_value_t = 20_000)]
        drain: u64,
        /// Repetitions of every cell.
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Partition scaling: a drain over few and over very many partitions with many handlers,
    /// and the idle cost at the largest count (see BENCHMARKS.md).
    Partitions {
        /// Backends to run on.
        #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres,mysql")]
        backends: Vec<Backend>,
        /// Partition counts of the queue.
        #[arg(long, value_delimiter = ',', default_value = "64,4096")]
        partitions: Vec<u32>,
        /// Handlers of the queue.
        #[arg(long, default_value_t = 10)]
        handlers: u32,
        /// Messages drained per run.
        #[arg(long, default_value_t = 10_000)]
        messages: u64,
        /// Repetitions of every drain cell.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Seconds of the idle measurement (0 skips it).
        #[arg(long, default_value_t = 20.0)]
        idle_secs: f64,
    },
    /// A held horizon: S2 drains with and without a transaction holding an old snapshot for
    /// the whole run, and the sequencer's pass times early and late (see BENCHMARKS.md).
    Horizon {
        /// Backends to run on (SQLite has no horizon and is skipped).
        #[arg(long, value_delimiter = ',', default_value = "postgres,mysql")]
        backends: Vec<Backend>,
        /// Partitions of the queue.
        #[arg(long, default_value_t = 8)]
        partitions: u32,
        /// Messages per drain.
        #[arg(long, default_value_t = 300_000)]
        messages: u64,
        /// Repetitions of each of the two cells.
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Storage footprint: table sizes with a backlog waiting and after the drain and vacuum,
    /// PostgreSQL WAL bytes and dead tuples per message (see BENCHMARKS.md).
    Footprint {
        /// Backends to run on.
        #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres,mysql")]
        backends: Vec<Backend>,
        /// Partitions of the queue.
        #[arg(long, default_value_t = 8)]
        partitions: u32,
        /// Messages pre-filled and drained per run.
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        /// Runs per backend (WAL is server-wide: a second run shows whether another client
        /// wrote meanwhile).
        #[arg(long, default_value_t = 1)]
        reps: usize,
        /// Where to write every run's figures as JSON.
        #[arg(long, default_value = "footprint-results.json")]
        json: PathBuf,
    },
    /// S5 steady state (issue 16): producers and a handler together on one queue; the highest
    /// offered enqueue rate sustained with a bounded backlog, commit-to-handled latency at 50%
    /// and 90% of it, and the same with a held snapshot (see BENCHMARKS.md).
    Steady {
        /// Backends to run on.
        #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres,mysql")]
        backends: Vec<Backend>,
        /// Partitions of the queue.
        #[arg(long, default_value_t = 8)]
        partitions: u32,
        /// Producer tasks in the runtime's process (must divide --partitions: each owns
        /// partitions, so per-partition commit order is known).
        #[arg(long, default_value_t = 4)]
        producers: u32,
        /// Messages per producer transaction (enqueue_batch).
        #[arg(long, default_value_t = 100)]
        per_tx: u32,
        /// The handler's profile.
        #[arg(long, default_value = "high-throughput")]
        profile: ProfileName,
        /// Seconds per search step (judged on the second half).
        #[arg(long, default_value_t = 16.0)]
        step_secs: f64,
        /// First offered rate of the search, msgs/s (default: 0.4 x the S1 rate with
        /// --producers producers measured first).
        #[arg(long)]
        start_rate: Option<f64>,
        /// Search: multiply (divide) the rate by this while steps pass (fail).
        #[arg(long, default_value_t = 1.5)]
        factor: f64,
        /// Search: stop bisecting when the lowest failure is within this share of the highest
        /// pass.
        #[arg(long, default_value_t = 0.05)]
        resolution: f64,
        /// Search: at most this many steps.
        #[arg(long, default_value_t = 12)]
        max_steps: usize,
        /// Skip the search and take this as the sustained rate (msgs/s).
        #[arg(long)]
        rate: Option<f64>,
        /// Seconds of each latency run (50%, 90%, 90% held).
        #[arg(long, default_value_t = 20.0)]
        latency_secs: f64,
        /// Seconds at the start of a run whose messages are left out of the latency figures.
        #[arg(long, default_value_t = 2.0)]
        warmup_secs: f64,
        /// A step sustains its rate if committed and handled rates reach this share of it.
        #[arg(long, default_value_t = 0.97)]
        keep_up: f64,
        /// A step sustains its rate if the backlog grows over its second half by at most this
        /// many seconds' worth of offered messages (or one sequencer pass, if that is more).
        #[arg(long, default_value_t = 0.25)]
        max_growth_secs: f64,
        /// S1 messages per measurement of the enqueue rate.
        #[arg(long, default_value_t = 50_000)]
        s1_messages: usize,
        /// S1 repetitions (median).
        #[arg(long, default_value_t = 3)]
        s1_reps: usize,
        /// Skip the held-snapshot runs.
        #[arg(long)]
        no_held: bool,
        /// Skip the sustained-rate search with the held snapshot (keep the 90% run).
        #[arg(long)]
        no_held_search: bool,
    },
    /// The producer of the cross-process S3 variant (internal).
    #[command(hide = true)]
    Produce {
        #[arg(long)]
        url: String,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        interval_us: u64,
    },
}

fn plan(a: &Args) -> Vec<Cell> {
    let mut cells = Vec::new();
    let smoke = a.smoke;
    for s in &a.scenarios {
        match s {
            Scenario::S1 => {
                for (per_tx, def, def_smoke) in [(1, 4_000, 200), (100, 50_000, 2_000)] {
                    for producers in [1, 4] {
                        let total = a.s1_messages.unwrap_or(if smoke { def_smoke } else { def });
                        cells.push(Cell::S1 {
                            per_tx,
                            producers,
                            total: total.max(per_tx * producers),
                        });
                    }
                }
            }
            Scenario::S2 => {
                let messages = a.s2_messages.unwrap_or(if smoke { 2_000 } else { 100_000 });
                for &profile in &a.profiles {
                    for &handler in &a.handlers {
                        for &partitions in &a.partitions {
                            cells.push(Cell::S2 {
                                handler,
                                profile,
                                partitions,
                                messages,
                            });
                        }
                    }
                }
            }
            Scenario::S3 => {
                let messages = a.s3_messages.unwrap_or(if smoke { 200 } else { 2_500 });
                for cross_process in [false, true] {
                    if cross_process && a.no_cross_process {
                        continue;
                    }
                    cells.push(Cell::S3 {
                        cross_process,
                        messages,
                        interval_us: a.s3_interval_us,
                    });
                }
            }
            Scenario::S4 => {
                let secs = a.s4_secs.unwrap_or(if smoke { 2.0 } else { 60.0 });
                for &partitions in &a.s4_partitions {
                    cells.push(Cell::S4 {
                        queues: 8,
                        partitions,
                        secs,
                    });
                }
            }
        }
    }
    cells
}

/// Runs one cell of one system on a fresh database.
async fn run_cell(
    a: &Args,
    backend: Backend,
    servers: &Servers,
    system: System,
    cell: &Cell,
) -> Outcome {
    let db = match FreshDb::create(backend, servers).await {
        Ok(db) => db,
        Err(e) => return Outcome::failed(format!("fresh database: {e}"), Default::default()),
    };
    let result = match system {
        System::Ours => run_ours(a, &db, cell).await,
        System::Ceiling => run_ceiling(a, &db, cell, false).await,
        System::SeqCeiling => run_ceiling(a, &db, cell, true).await,
        System::Modkit => run_peer(a, Peer::Modkit, &db, cell).await,
        System::Awa => run_peer(a, Peer::Awa, &db, cell).await,
    };
    db.drop_db().await;
    result.unwrap_or_else(|e| Outcome::failed(e.to_string(), Default::default()))
}

async fn run_ours(a: &Args, db: &FreshDb, cell: &Cell) -> Res<Outcome> {
    match *cell {
        Cell::S1 {
            per_tx,
            producers,
            total,
        } => ours::s1(db, per_tx, producers, total).await,
        Cell::S2 {
            handler,
            profile,
            partitions,
            messages,
        } => {
            ours::s2(
                db,
                handler,
                profile,
                partitions,
                messages,
                a.count_statements,
                (a.s2_batch, a.s2_concurrency, a.s2_sequencer_batch),
            )
            .await
        }
        Cell::S3 {
            cross_process,
            messages,
            interval_us,
        } => {
            ours::s3(
                db,
                cross_process,
                messages,
                Duration::from_micros(interval_us),
                a.s3_concurrency,
            )
            .await
        }
        Cell::S4 {
            queues,
            partitions,
            secs,
        } => {
            let warmup = Duration::from_secs(if a.smoke { 1 } else { 3 });
            ours::s4(db, queues, partitions, secs, warmup).await
        }
    }
}

async fn run_ceiling(a: &Args, db: &FreshDb, cell: &Cell, sequenced: bool) -> Res<Outcome> {
    match *cell {
        Cell::S1 {
            per_tx,
            producers,
            total,
        } => ceiling::s1(db, per_tx, producers, total).await,
        Cell::S2 {
            profile,
            partitions,
            messages,
            ..
        } => {
            ceiling::s2(
                db,
                partitions,
                profile.batch(),
                messages,
                a.count_statements,
                sequenced.then(|| profile.profile().runtime().sequencer_batch),
            )
            .await
        }
        _ => Err("no ceiling for this scenario".into()),
    }
}

async fn run_peer(a: &Args, peer: Peer, db: &FreshDb, cell: &Cell) -> Res<Outcome> {
    let mut cell = cell.clone();
    if let Cell::S2 {
        profile, messages, ..
    } = &mut cell
    {
        match peer {
            Peer::Modkit if *profile == ProfileName::Default => {
                *messages = (*messages).min(a.peer_default_messages);
            }
            Peer::Awa => *messages = (*messages).min(a.awa_s2_messages),
            Peer::Modkit => {}
        }
    }
    if let (Peer::Awa, Cell::S1 { total, .. }) = (peer, &mut cell) {
        *total = (*total).min(a.awa_s1_messages);
    }
    let bin = match peer {
        Peer::Modkit => &a.peer_bin,
        Peer::Awa => &a.awa_peer_bin,
    };
    let out = tokio::process::Command::new(bin)
        .arg("--backend")
        .arg(db.backend.name())
        .arg("--url")
        .arg(&db.url)
        .arg("--cell")
        .arg(serde_json::to_string(&cell)?)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text.lines().rev().find(|l| l.starts_with('{')) else {
        return Err(format!("peer printed no result (exit {})", out.status).into());
    };
    Ok(serde_json::from_str(line)?)
}

/// Whether the peer runs this cell. cf-modkit-db implements S1 and S2. awa implements S1,
/// S2 with the leased handler (its handlers run outside the transaction that completes the
/// job; it has no profiles, so it runs the HighThroughput cells only) and S3 with the producer
/// in its process, on PostgreSQL.
fn peer_supports(a: &Args, peer: Peer, backend: Backend, cell: &Cell) -> bool {
    match (peer, cell) {
        (Peer::Modkit, Cell::S1 { .. }) => true,
        (Peer::Modkit, Cell::S2 { partitions, .. }) => a.peer_partitions.contains(partitions),
        (Peer::Modkit, _) | (Peer::Awa, Cell::S4 { .. }) => false,
        (Peer::Awa, _) if backend != Backend::Postgres => false,
        (Peer::Awa, Cell::S1 { .. }) => true,
        (
            Peer::Awa,
            Cell::S2 {
                handler,
                profile,
                partitions,
                ..
            },
        ) => {
            *handler == HandlerKind::Leased
                && *profile == ProfileName::HighThroughput
                && a.peer_partitions.contains(partitions)
        }
        (Peer::Awa, Cell::S3 { cross_process, .. }) => !cross_process,
    }
}

impl Args {
    fn servers(&self) -> Servers {
        Servers {
            postgres: self.postgres_url.clone(),
            mysql: self.mysql_url.clone(),
        }
    }
}

/// The exit code of a subcommand; a failure is said on stderr.
fn finished(what: &str, r: Res<()>) -> std::process::ExitCode {
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{what} failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async_main(args))
}

async fn async_main(args: Args) -> std::process::ExitCode {
    if let Some(Cmd::Produce {
        url,
        count,
        interval_us,
    }) = &args.cmd
    {
        return match ours::produce_main(url, *count, Duration::from_micros(*interval_us)).await {
            Ok(times) => {
                println!("{}", serde_json::to_string(&times).unwrap_or_default());
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("producer: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if let Some(Cmd::RunCell { backend, cell }) = &args.cmd {
        println!("opentelemetry={}", tracecost::FEATURE_ON);
        // The same subscriber as a cell of the main run.
        sys::install_counter();
        let servers = args.servers();
        let outcome = match serde_json::from_str::<Cell>(cell) {
            Ok(cell) => run_cell(&args, *backend, &servers, System::Ours, &cell).await,
            Err(e) => Outcome::failed(format!("bad --cell: {e}"), Default::default()),
        };
        println!("{}", serde_json::to_string(&outcome).unwrap_or_default());
        return if outcome.ok {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        };
    }
    if let Some(Cmd::TraceCost {
        on_bin,
        off_bin,
        backends,
        partitions,
        handlers,
        profile,
        messages,
        reps,
    }) = &args.cmd
    {
        let o = tracecost::Options {
            on_bin: on_bin.clone(),
            off_bin: off_bin.clone(),
            backends: backends.clone(),
            partitions: partitions.clone(),
            handlers: handlers.clone(),
            profile: *profile,
            messages: *messages,
            reps: *reps,
        };
        return finished("trace-cost", tracecost::run(&args, &o).await);
    }
    if let Some(Cmd::Scheduled {
        backends,
        messages,
        future,
        drain,
        reps,
    }) = &args.cmd
    {
        let o = scheduled::Options {
            backends: backends.clone(),
            messages: *messages,
            future: *future,
            drain: *drain,
            reps: (*reps).max(1),
            servers: args.servers(),
        };
        return finished("scheduled benchmark", scheduled::run(&o).await);
    }
    if let Some(Cmd::Horizon {
        backends,
        partitions,
        messages,
        reps,
    }) = &args.cmd
    {
        sys::install_counter();
        let o = horizon::Options {
            backends: backends.clone(),
            partitions: *partitions,
            messages: *messages,
            reps: (*reps).max(1),
            servers: args.servers(),
        };
        return finished("horizon benchmark", horizon::run(&o).await);
    }
    if let Some(Cmd::Footprint {
        backends,
        partitions,
        messages,
        reps,
        json,
    }) = &args.cmd
    {
        let o = footprint::Options {
            backends: backends.clone(),
            partitions: (*partitions).max(1),
            messages: (*messages).max(1),
            reps: (*reps).max(1),
            json: json.clone(),
            servers: args.servers(),
        };
        return finished("footprint benchmark", footprint::run(&o).await);
    }
    if let Some(Cmd::Steady {
        backends,
        partitions,
        producers,
        per_tx,
        profile,
        step_secs,
        start_rate,
        factor,
        resolution,
        max_steps,
        rate,
        latency_secs,
        warmup_secs,
        keep_up,
        max_growth_secs,
        s1_messages,
        s1_reps,
        no_held,
        no_held_search,
    }) = &args.cmd
    {
        sys::install_counter();
        let o = steady::Options {
            backends: backends.clone(),
            partitions: *partitions,
            producers: *producers,
            per_tx: (*per_tx).max(1),
            profile: *profile,
            step_secs: *step_secs,
            start_rate: *start_rate,
            factor: factor.max(1.01),
            resolution: *resolution,
            max_steps: (*max_steps).max(1),
            rate: *rate,
            latency_secs: *latency_secs,
            warmup_secs: *warmup_secs,
            keep_up: *keep_up,
            max_growth_secs: *max_growth_secs,
            s1_messages: *s1_messages,
            s1_reps: *s1_reps,
            held: !*no_held,
            held_search: !*no_held && !*no_held_search,
            servers: args.servers(),
        };
        return finished("steady benchmark", steady::run(&o).await);
    }
    if let Some(Cmd::Partitions {
        backends,
        partitions,
        handlers,
        messages,
        reps,
        idle_secs,
    }) = &args.cmd
    {
        sys::install_counter();
        let o = partitions::Options {
            backends: backends.clone(),
            partitions: partitions.clone(),
            handlers: (*handlers).max(1),
            messages: *messages,
            reps: (*reps).max(1),
            idle_secs: *idle_secs,
            servers: args.servers(),
        };
        return finished("partitions benchmark", partitions::run(&o).await);
    }
    if let Some(Cmd::Relay {
        backends,
        brokers,
        messages,
        latency_messages,
        nats_url,
        amqp_url,
    }) = &args.cmd
    {
        let o = relay::Options {
            backends: backends.clone(),
            brokers: brokers.clone(),
            messages: *messages,
            latency_messages: *latency_messages,
            nats_url: nats_url.clone(),
            amqp_url: amqp_url.clone(),
            servers: args.servers(),
        };
        return finished("relay benchmark", relay::run(&o).await);
    }
    sys::install_counter();
    let servers = args.servers();
    let cells = plan(&args);
    let mut peer_missing = std::collections::BTreeMap::new();
    let mut peers = Vec::new();
    for (peer, bin, name) in [
        (Peer::Modkit, &args.peer_bin, "modkit"),
        (Peer::Awa, &args.awa_peer_bin, "awa"),
    ] {
        if !args.peer.contains(&peer) {
            peer_missing.insert(peer.system(), format!("peer not run; pass --peer {name}"));
        } else if !bin.exists() {
            peer_missing.insert(
                peer.system(),
                format!("peer binary {} not built", bin.display()),
            );
        } else {
            peers.push(peer);
        }
    }
    let reps = args.reps.unwrap_or(if args.smoke { 1 } else { 3 });

    let mut jobs: Vec<(Backend, Cell, u32, System)> = Vec::new();
    let mut ceilings_done: Vec<(Backend, Cell, u32)> = Vec::new();
    for &backend in &args.backends {
        for cell in &cells {
            let reps = match cell {
                Cell::S4 { .. } => args.s4_reps.unwrap_or(reps),
                _ => reps,
            };
            for rep in 0..reps.max(1) {
                jobs.push((backend, cell.clone(), rep, System::Ours));
                if !args.no_ceiling
                    && let Some(c) = cell.ceiling()
                    && !ceilings_done.contains(&(backend, c.clone(), rep))
                {
                    ceilings_done.push((backend, c.clone(), rep));
                    if matches!(c, Cell::S2 { .. }) {
                        jobs.push((backend, c.clone(), rep, System::SeqCeiling));
                    }
                    jobs.push((backend, c, rep, System::Ceiling));
                }
                for &peer in &peers {
                    if peer_supports(&args, peer, backend, cell) {
                        jobs.push((backend, cell.clone(), rep, peer.system()));
                    }
                }
            }
        }
    }

    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(jobs.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut settings = Vec::new();
    for &backend in &args.backends {
        match FreshDb::create(backend, &servers).await {
            Ok(db) => {
                settings.push((backend, db.durability().await));
                db.drop_db().await;
            }
            Err(e) => settings.push((backend, format!("unavailable: {e}"))),
        }
    }
    let mut records = Vec::new();
    for (backend, cell, rep, system) in jobs {
        bar.set_message(format!(
            "{backend} {} {} {:?} rep {}",
            cell.scenario(),
            cell.label(),
            system,
            rep + 1
        ));
        let outcome = run_cell(&args, backend, &servers, system, &cell).await;
        if !outcome.ok {
            bar.println(format!(
                "FAILED {backend} {} {} {system:?} rep {}: {}",
                cell.scenario(),
                cell.label(),
                rep + 1,
                outcome.error.clone().unwrap_or_default()
            ));
        }
        records.push(Record {
            backend: backend.name().into(),
            system,
            scenario: cell.scenario().into(),
            variant: if matches!(system, System::Ceiling | System::SeqCeiling) {
                cell.ceiling_label()
            } else {
                cell.label()
            },
            cell,
            rep,
            outcome,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();

    let results = report::Results::new(&records, peer_missing);
    println!("## outbox-bench results\n");
    println!(
        "reps: {reps}, smoke: {}, build: {}\n",
        args.smoke,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    for (b, s) in &settings {
        println!("- {b}: {s}");
    }
    println!();
    print!("{}", results.markdown());

    let json = serde_json::json!({
        "reps": reps,
        "smoke": args.smoke,
        "release": !cfg!(debug_assertions),
        "settings": settings.iter().map(|(b, s)| (b.name().to_owned(), s.clone())).collect::<std::collections::BTreeMap<_, _>>(),
        "records": records,
    });
    if let Err(e) = std::fs::write(
        &args.json,
        serde_json::to_vec_pretty(&json).unwrap_or_default(),
    ) {
        eprintln!("could not write {}: {e}", args.json.display());
        return std::process::ExitCode::FAILURE;
    }
    if results.all_passed() {
        std::process::ExitCode::SUCCESS
    } else {
        for f in results.failures() {
            eprintln!("FAILED: {f}");
        }
        std::process::ExitCode::FAILURE
    }
}
