//! `outbox`: operate the outbox tables of a database (SQLite, PostgreSQL, MySQL/MariaDB).
//!
//! ```text
//! outbox --database-url URL [--table-prefix outbox_] <command>
//!   migrate                                 create the tables (idempotent)
//!   status [--queue Q] [--all-partitions] [--json]
//!   dead-letters list [filters] [--limit N] [--after ID] [--json]
//!   dead-letters show ID [--json]
//!   dead-letters replay (ID... | --all [filters]) [--yes]
//!   dead-letters discard ID... [--yes]
//!   dead-letters purge [filters] [--yes]
//!   unblock QUEUE PARTITION HANDLER --head-seq SEQ          retry a blocked partition's head now
//!   skip-head QUEUE PARTITION HANDLER --head-seq SEQ [--yes]  dead-letter the head, go on
//!   retire QUEUE HANDLER [--yes]            remove a handler that no longer runs
//!   serve [--listen 127.0.0.1:9000] [--read-only] [--token T] [--hide-payloads] [--mount-path /p]
//!                                           the web dashboard (see outbox-dashboard)
//! filters: --queue Q --partition P --handler H
//! ```
//!
//! The URL may also come from `DATABASE_URL`. Destructive or redelivering commands (replay,
//! discard, purge, skip-head) ask for confirmation on a terminal; without a terminal they refuse unless
//! `--yes` is given.
//!
//! # Exit codes
//!
//! | Code | Meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | error (database unreachable, SQL error, tables missing, …) |
//! | 2 | usage error (unknown command or option, bad value) |
//! | 3 | not found (dead letter id, queue, partition or head) |
//! | 4 | not confirmed (answered no, or no terminal and no `--yes`) |
//! | 5 | `status --check`: a partition is blocked or dead letters exist |
//! | 6 | conflict: the head is no longer `--head-seq`, is leased, or the handler still runs |

// A command-line tool writes its results to standard output.
#![allow(clippy::print_stdout)]

mod format;

use std::io::{BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use outbox::sea_orm::{ConnectOptions, Database};
use outbox::{DeadLetter, DeadLetterFilter, Error, Outbox};

/// Exit code: success.
const OK: u8 = 0;
/// Exit code: an error.
const FAILED: u8 = 1;
/// Exit code: bad usage (clap uses it too).
const USAGE: u8 = 2;
/// Exit code: something named does not exist.
const NOT_FOUND: u8 = 3;
/// Exit code: the operation was not confirmed.
const NOT_CONFIRMED: u8 = 4;
/// Exit code: `status --check` found blocked partitions or dead letters.
const UNHEALTHY: u8 = 5;
/// Exit code: the state changed under the operator (the head moved, a lease holds it, the
/// handler still runs); nothing was changed.
const CONFLICT: u8 = 6;

/// Operate the outbox tables of a database: migrate, inspect, handle dead letters.
///
/// Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 not confirmed, 5 unhealthy
/// (`status --check`), 6 conflict (the head moved, is leased, or the handler still runs).
#[derive(Debug, Parser)]
#[command(name = "outbox", version)]
struct Cli {
    /// Database URL: sqlite://path?mode=rwc, postgres://…, mysql://…
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// Prefix of the outbox tables.
    #[arg(long, default_value = outbox::DEFAULT_TABLE_PREFIX, global = true)]
    table_prefix: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the outbox tables if they do not exist (idempotent).
    Migrate,
    /// Show waiting messages, lag, leases, blocked partitions and dead letters.
    Status(StatusArgs),
    /// List, show, replay, discard or purge dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Retry the head of a partition blocked by a poisoned message, now.
    Unblock(Head),
    /// Move the head message of a partition to the dead letters and let the partition go on.
    SkipHead {
        #[command(flatten)]
        head: Head,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
    /// Remove a handler that no longer runs (removed or renamed), so vacuum stops keeping
    /// messages for it; its dead letters stay.
    Retire {
        /// Queue name.
        queue: String,
        /// Handler name.
        handler: String,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
    /// Cancel a scheduled message before it is due, by id or by deduplication key (its key
    /// becomes free).
    CancelScheduled {
        /// The id returned when it was scheduled.
        #[arg(required_unless_present = "key", conflicts_with = "key")]
        id: Option<i64>,
        /// The deduplication key instead (with `--queue`).
        #[arg(long, requires = "queue")]
        key: Option<String>,
        /// The queue of `--key`.
        #[arg(long)]
        queue: Option<String>,
    },
    /// Serve the web dashboard: queues, partitions and dead letters in a browser, with
    /// replay, discard, purge, unblock, skip-head and retire for an operator who logs in with
    /// the token. Runs until interrupted (Ctrl-C).
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on. The dashboard speaks plain HTTP: keep it on localhost, or put a
    /// TLS-terminating proxy in front before listening beyond this machine.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Show only: no login and no actions.
    #[arg(long)]
    read_only: bool,
    /// The token operators log in with before acting; without it the dashboard only shows.
    /// Prefer the environment variable: a command line is visible to other local users.
    #[arg(long, env = "OUTBOX_DASHBOARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Keep message payloads (which may hold personal data) off every page.
    #[arg(long)]
    hide_payloads: bool,
    /// Serve under this path (for example `/outbox` behind a proxy).
    #[arg(long, default_value = "")]
    mount_path: String,
}

#[derive(Debug, Args)]
struct Head {
    /// Queue name.
    queue: String,
    /// Partition index.
    partition: u32,
    /// Handler name.
    handler: String,
    /// The head message you saw in `status` (column HEAD); nothing happens if it moved.
    #[arg(long)]
    head_seq: i64,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Only this queue.
    #[arg(long)]
    queue: Option<String>,
    /// List every partition, not only those with something to show.
    #[arg(long)]
    all_partitions: bool,
    /// Print JSON (the `outbox::Status` structure).
    #[arg(long)]
    json: bool,
    /// Exit with code 5 if a partition is blocked or dead letters exist.
    #[arg(long)]
    check: bool,
}

#[derive(Debug, Clone, Default, Args)]
struct Filter {
    /// Only dead letters of this queue.
    #[arg(long)]
    queue: Option<String>,
    /// Only dead letters of this partition.
    #[arg(long)]
    partition: Option<u32>,
    /// Only dead letters of this handler.
    #[arg(long)]
    handler: Option<String>,
}

impl Filter {
    fn to_filter(&self) -> DeadLetterFilter {
        let mut f = DeadLetterFilter::all();
        if let Some(q) = &self.queue {
            f = f.queue(q.clone());
        }
        if let Some(p) = self.partition {
            f = f.partition(p);
        }
        if let Some(h) = &self.handler {
            f = f.handler(h.clone());
        }
        f
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(q) = &self.queue {
            parts.push(format!("queue {q}"));
        }
        if let Some(p) = self.partition {
            parts.push(format!("partition {p}"));
        }
        if let Some(h) = &self.handler {
            parts.push(format!("handler {h}"));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" of {}", parts.join(", "))
        }
    }
}

#[derive(Debug, Subcommand)]
enum DeadLetters {
    /// List dead letters, oldest first.
    List {
        #[command(flatten)]
        filter: Filter,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Only ids above this one (to page: pass the last id seen).
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its payload and last error.
    Show {
        /// Dead letter id.
        id: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back at the tail of their partition, for the handler that gave up.
    Replay {
        /// Dead letter ids.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<i64>,
        /// Every dead letter matching the filters.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        filter: Filter,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
    /// Delete dead letters by id.
    Discard {
        /// Dead letter ids.
        #[arg(required = true)]
        ids: Vec<i64>,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
    /// Delete every dead letter matching the filters.
    Purge {
        #[command(flatten)]
        filter: Filter,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::DeadLetterNotFound(_)
            | Error::UnknownQueue(_)
            | Error::CursorNotFound { .. }
            | Error::HandlerNotFound { .. } => NOT_FOUND,
            Error::HeadMoved { .. }
            | Error::HeadLeased { .. }
            | Error::NotBlocked { .. }
            | Error::HandlerInUse { .. } => CONFLICT,
            // A bad --table-prefix or name given on the command line.
            Error::InvalidName(_) => USAGE,
            _ => FAILED,
        };
        Failure::new(code, format::error_chain(&e))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(FAILED);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn connect(cli: &Cli) -> Result<Outbox, Failure> {
    let Some(url) = cli.database_url.as_deref() else {
        return Err(Failure::new(
            USAGE,
            "no database: pass --database-url or set DATABASE_URL",
        ));
    };
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(2)
        .min_connections(0)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(30))
        .sqlx_logging(false);
    let db = Database::connect(options)
        .await
        .map_err(|e| Failure::new(FAILED, format!("cannot connect to the database: {e}")))?;
    Ok(Outbox::admin(db, &cli.table_prefix)?)
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    let outbox = connect(&cli).await?;
    match cli.command {
        Command::Migrate => {
            outbox.migrate().await?;
            println!(
                "outbox tables are up to date (prefix `{}`)",
                cli.table_prefix
            );
            Ok(OK)
        }
        Command::Status(args) => status(&outbox, &args).await,
        Command::DeadLetters(cmd) => dead_letters(&outbox, cmd).await,
        Command::Unblock(h) => {
            outbox
                .unblock(&h.queue, h.partition, &h.handler, h.head_seq)
                .await?;
            println!(
                "{}/{} partition {}: head {} will be retried now",
                h.queue, h.handler, h.partition, h.head_seq
            );
            Ok(OK)
        }
        Command::SkipHead { head: h, yes } => {
            confirm(
                yes,
                &format!(
                    "Move message {} (the head of {}/{} partition {}) to the dead letters?",
                    h.head_seq, h.queue, h.handler, h.partition
                ),
            )?;
            outbox
                .skip_head(&h.queue, h.partition, &h.handler, h.head_seq)
                .await?;
            println!(
                "{}/{} partition {}: message {} moved to the dead letters",
                h.queue, h.handler, h.partition, h.head_seq
            );
            Ok(OK)
        }
        Command::Retire {
            queue,
            handler,
            yes,
        } => {
            confirm(
                yes,
                &format!(
                    "Retire handler `{handler}` of queue `{queue}` (its cursors are deleted; vacuum \
                     stops keeping messages for it)?"
                ),
            )?;
            let n = outbox.retire_handler(&queue, &handler).await?;
            println!("{queue}/{handler}: retired ({n} partition cursors removed)");
            Ok(OK)
        }
        Command::CancelScheduled { id, key, queue } => {
            let (cancelled, what) = match (id, key, queue) {
                (Some(id), _, _) => (outbox.cancel_scheduled(id).await?, format!("id {id}")),
                (None, Some(key), Some(queue)) => (
                    outbox.cancel_scheduled_by_key(&queue, &key).await?,
                    format!("key `{key}` of queue `{queue}`"),
                ),
                _ => return Err(Failure::new(USAGE, "give an id, or --queue and --key")),
            };
            if cancelled {
                println!("scheduled message with {what}: cancelled");
                Ok(OK)
            } else {
                Err(Failure::new(
                    NOT_FOUND,
                    format!(
                        "no scheduled message with {what} (already due, cancelled, or never scheduled)"
                    ),
                ))
            }
        }
        Command::Serve(args) => serve(outbox, args).await,
    }
}

/// `outbox serve`: the dashboard until Ctrl-C.
async fn serve(outbox: Outbox, args: ServeArgs) -> Result<u8, Failure> {
    // Fail now, with the usual message, if the tables are missing or outdated.
    outbox.status().await?;
    let mount = args.mount_path.trim_end_matches('/').to_owned();
    if !mount.is_empty() && !mount.starts_with('/') {
        return Err(Failure::new(USAGE, "--mount-path must start with `/`"));
    }
    let mut config = outbox_dashboard::Config::new()
        .read_only(args.read_only)
        .show_payloads(!args.hide_payloads)
        .mount_path(mount.clone());
    let mode = if args.read_only {
        "read-only"
    } else if args.token.is_some() {
        "actions after login with the token"
    } else {
        "view only: pass --token or set OUTBOX_DASHBOARD_TOKEN to enable actions"
    };
    if let Some(token) = args.token {
        config = config.token(token);
    }
    let dashboard = outbox_dashboard::router(outbox, config);
    let app = if mount.is_empty() {
        dashboard
    } else {
        axum::Router::new().nest(&mount, dashboard)
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| Failure::new(FAILED, format!("cannot listen on {}: {e}", args.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::new(FAILED, format!("cannot read the bound address: {e}")))?;
    if !addr.ip().is_loopback() {
        eprintln!(
            "warning: listening on {addr}, beyond this machine; the dashboard speaks plain HTTP"
        );
    }
    println!("outbox dashboard on http://{addr}{mount}/ ({mode})");
    std::io::stdout().flush().ok();
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            tokio::signal::ctrl_c().await.ok();
        })
        .await
        .map_err(|e| Failure::new(FAILED, format!("the dashboard stopped: {e}")))?;
    Ok(OK)
}

async fn status(outbox: &Outbox, args: &StatusArgs) -> Result<u8, Failure> {
    let mut status = outbox.status().await.map_err(missing_tables)?;
    if let Some(q) = &args.queue {
        status.queues.retain(|s| &s.name == q);
        if status.queues.is_empty() {
            return Err(Failure::new(NOT_FOUND, format!("unknown queue `{q}`")));
        }
    }
    if args.json {
        let json = serde_json::to_string_pretty(&status)
            .map_err(|e| Failure::new(FAILED, e.to_string()))?;
        println!("{json}");
    } else {
        print!("{}", format::status(&status, args.all_partitions));
    }
    let unhealthy = !status.blocked().is_empty() || status.dead_letters() > 0;
    Ok(if args.check && unhealthy {
        UNHEALTHY
    } else {
        OK
    })
}

/// Explains the most common first-run error.
fn missing_tables(e: Error) -> Failure {
    let mut f = Failure::from(e);
    let m = f.message.to_lowercase();
    if m.contains("no such table") || m.contains("does not exist") || m.contains("doesn't exist") {
        f.message
            .push_str("\nhint: the outbox tables are missing; run `outbox migrate` (and check --table-prefix)");
    }
    f
}

async fn dead_letters(outbox: &Outbox, cmd: DeadLetters) -> Result<u8, Failure> {
    match cmd {
        DeadLetters::List {
            filter,
            limit,
            after,
            json,
        } => {
            let list = outbox
                .dead_letters(&filter.to_filter(), after, limit)
                .await
                .map_err(missing_tables)?;
            if json {
                let v: Vec<_> = list.iter().map(format::dead_letter_json).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                print!("{}", format::dead_letter_table(&list));
            }
            Ok(OK)
        }
        DeadLetters::Show { id, json } => {
            let dl = outbox.dead_letter(id).await.map_err(missing_tables)?;
            if json {
                println!("{}", format::dead_letter_json(&dl));
            } else {
                print!("{}", format::dead_letter_detail(&dl));
            }
            Ok(OK)
        }
        DeadLetters::Replay {
            ids,
            all,
            filter,
            yes,
        } => {
            let ids = if all {
                matching_ids(outbox, &filter.to_filter()).await?
            } else {
                ids
            };
            if ids.is_empty() {
                println!("no dead letters{} to replay", filter.describe());
                return Ok(OK);
            }
            confirm(
                yes,
                &format!(
                    "Replay {} dead letter(s){}? Their handlers will run again.",
                    ids.len(),
                    filter.describe()
                ),
            )?;
            each(outbox, &ids, "replaying", "replayed", |o, id| async move {
                o.replay_dead_letter(id).await
            })
            .await
        }
        DeadLetters::Discard { ids, yes } => {
            confirm(
                yes,
                &format!(
                    "Discard {} dead letter(s)? This cannot be undone.",
                    ids.len()
                ),
            )?;
            each(
                outbox,
                &ids,
                "discarding",
                "discarded",
                |o, id| async move { o.discard_dead_letter(id).await },
            )
            .await
        }
        DeadLetters::Purge { filter, yes } => {
            let f = filter.to_filter();
            let n = outbox
                .count_dead_letters(&f)
                .await
                .map_err(missing_tables)?;
            if n == 0 {
                println!("no dead letters{} to purge", filter.describe());
                return Ok(OK);
            }
            confirm(
                yes,
                &format!(
                    "Purge {n} dead letter(s){}? This cannot be undone.",
                    filter.describe()
                ),
            )?;
            let spinner =
                ProgressBar::new_spinner().with_message(format!("purging {n} dead letters"));
            spinner.enable_steady_tick(Duration::from_millis(100));
            let deleted = outbox.purge_dead_letters(&f).await;
            spinner.finish_and_clear();
            println!("purged {} dead letter(s)", deleted?);
            Ok(OK)
        }
    }
}

/// Ids of every dead letter matching `f`, read before acting so that letters dead-lettered
/// again meanwhile are not picked up twice.
async fn matching_ids(outbox: &Outbox, f: &DeadLetterFilter) -> Result<Vec<i64>, Failure> {
    let mut ids = Vec::new();
    let mut after = 0;
    loop {
        let page: Vec<DeadLetter> = outbox
            .dead_letters(f, after, 1000)
            .await
            .map_err(missing_tables)?;
        let Some(last) = page.last() else {
            return Ok(ids);
        };
        after = last.id;
        ids.extend(page.iter().map(|d| d.id));
    }
}

/// Applies `op` to every id with a progress bar; ids that no longer exist are reported and
/// make the exit code 3.
async fn each<F, Fut>(
    outbox: &Outbox,
    ids: &[i64],
    doing: &str,
    done: &str,
    op: F,
) -> Result<u8, Failure>
where
    F: Fn(Outbox, i64) -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    let bar = ProgressBar::new(ids.len() as u64).with_message(doing.to_owned());
    if let Ok(style) = ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} ({eta})") {
        bar.set_style(style);
    }
    if ids.len() < 20 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut ok = 0;
    let mut missing = Vec::new();
    for &id in ids {
        match op(outbox.clone(), id).await {
            Ok(()) => ok += 1,
            Err(Error::DeadLetterNotFound(id)) => missing.push(id),
            Err(e) => {
                bar.abandon();
                eprintln!("{done} {ok} dead letter(s) before the error");
                return Err(e.into());
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("{done} {ok} dead letter(s)");
    if missing.is_empty() {
        Ok(OK)
    } else {
        let list: Vec<String> = missing.iter().map(ToString::to_string).collect();
        eprintln!("not found: {}", list.join(", "));
        Ok(NOT_FOUND)
    }
}

/// Asks on the terminal unless `yes`; refuses without a terminal.
fn confirm(yes: bool, question: &str) -> Result<(), Failure> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        return Err(Failure::new(
            NOT_CONFIRMED,
            format!("{question}\nrefusing without confirmation: no terminal; pass --yes"),
        ));
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Failure::new(FAILED, e.to_string()))?;
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        Ok(())
    } else {
        Err(Failure::new(
            NOT_CONFIRMED,
            "not confirmed; nothing changed",
        ))
    }
}
