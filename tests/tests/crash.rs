//! Real crash tests: worker processes drain one queue together while the test SIGKILLs them at
//! chosen points — inside a transactional handler before its commit, inside a leased handler,
//! between a leased handler's return and its ack, and at random moments (sequencing, vacuum,
//! claims) — and restarts them. Afterwards nothing is lost, order per partition is kept, no
//! transactional effect is duplicated, and leased duplicates come only from killed holders.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::{Duration, Instant};
use tokio::sync::mpsc::{
    UnboundedReceiver as Receiver, UnboundedSender as Sender, unbounded_channel as channel,
};

use outbox::sea_orm::TransactionTrait;
use outbox::{NewMessage, Outbox, QueueSpec};
use outbox_tests::{TestDb, create_effects_table, effects, eventually, on_every_backend};

const PARTITIONS: u32 = 8;
/// At least this many messages; the producers go on until the last kill round.
const MESSAGES: usize = 300;
const WORKERS: usize = 3;
const ROUNDS: usize = 40;

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    pid: u32,
}

fn spawn(url: &str, tx: &Sender<(u32, String)>) -> Worker {
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-crash-worker"))
        .args([
            "--url",
            url,
            "--partitions",
            &PARTITIONS.to_string(),
            "--pause-ms",
            "4",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn worker");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let tx = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((pid, line)).is_err() {
                break;
            }
        }
    });
    let stdin = child.stdin.take();
    Worker { child, stdin, pid }
}

/// Everything the workers printed, by pid.
#[derive(Default)]
struct Log {
    lines: Vec<(u32, String)>,
}

impl Log {
    /// Drains the channel until a line from `pid` satisfies `pred` (true) or `timeout` (false).
    async fn wait_for(
        &mut self,
        rx: &mut Receiver<(u32, String)>,
        pid: u32,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some((p, line))) => {
                    let hit = p == pid && pred(&line);
                    self.lines.push((p, line));
                    if hit {
                        return true;
                    }
                }
                Ok(None) | Err(_) => return false,
            }
        }
        false
    }

    /// Waits for `ready` from `pid`, which may already be in the log.
    async fn wait_ready(&mut self, rx: &mut Receiver<(u32, String)>, pid: u32) -> bool {
        self.lines.iter().any(|(p, l)| *p == pid && l == "ready")
            || self
                .wait_for(rx, pid, Duration::from_secs(60), |l| l == "ready")
                .await
    }

    fn drain(&mut self, rx: &mut Receiver<(u32, String)>) {
        while let Ok(l) = rx.try_recv() {
            self.lines.push(l);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum KillAt {
    InsideTransactional,
    InsideLeased,
    AfterLeasedHandlerBeforeAck,
    Anywhere,
}

async fn workers_killed_at_chosen_points_lose_and_duplicate_nothing(t: Arc<TestDb>) {
    let db = t.pool(8).await;
    create_effects_table(&db).await;
    let producer = Outbox::builder(db.clone())
        .queue(QueueSpec::new("crash", PARTITIONS))
        .connect()
        .await
        .expect("connect");
    let (tx, mut rx) = channel();
    let mut log = Log::default();
    let mut workers: Vec<Worker> = (0..WORKERS).map(|_| spawn(&t.url, &tx)).collect();
    for w in &workers {
        assert!(
            log.wait_ready(&mut rx, w.pid).await,
            "worker {} not ready; lines: {:?}",
            w.pid,
            log.lines
        );
    }

    // Producers enqueue while workers die and restart.
    let (pdb, pob) = (db.clone(), producer.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let produce = tokio::spawn(async move {
        let mut n = 0usize;
        while n < MESSAGES || !stopped.load(Ordering::SeqCst) {
            let txn = pdb.begin().await.expect("begin");
            let k = 1 + n % 5;
            let batch: Vec<NewMessage> = (n..n + k)
                .map(|i| NewMessage::new("crash", (i as u32 * 7) % PARTITIONS, format!("{i:05}")))
                .collect();
            n += batch.len();
            pob.enqueue_batch(&txn, &batch).await.expect("enqueue");
            txn.commit().await.expect("commit");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        n
    });

    let modes = [
        KillAt::InsideTransactional,
        KillAt::InsideLeased,
        KillAt::AfterLeasedHandlerBeforeAck,
        KillAt::Anywhere,
    ];
    let mut killed: HashSet<u32> = HashSet::new();
    let mut kills: BTreeMap<String, usize> = BTreeMap::new();
    for round in 0..ROUNDS {
        let victim = round % workers.len();
        let pid = workers[victim].pid;
        let mode = modes[round % modes.len()];
        let reached = match mode {
            KillAt::InsideTransactional => {
                log.wait_for(&mut rx, pid, Duration::from_secs(3), |l| {
                    l.starts_with("inside tx ")
                })
                .await
            }
            KillAt::InsideLeased => {
                log.wait_for(&mut rx, pid, Duration::from_secs(3), |l| {
                    l.starts_with("inside lease ")
                })
                .await
            }
            KillAt::AfterLeasedHandlerBeforeAck => {
                log.wait_for(&mut rx, pid, Duration::from_secs(3), |l| {
                    l.starts_with("done lease ")
                })
                .await
            }
            KillAt::Anywhere => {
                tokio::time::sleep(Duration::from_millis(37 * (round as u64 % 5))).await;
                true
            }
        };
        let w = &mut workers[victim];
        w.child.kill().expect("SIGKILL");
        w.child.wait().expect("reap");
        killed.insert(pid);
        let key = format!(
            "{mode:?}{}",
            if reached {
                ""
            } else {
                " (point not reached; killed anyway)"
            }
        );
        *kills.entry(key).or_default() += 1;
        workers[victim] = spawn(&t.url, &tx);
        let new_pid = workers[victim].pid;
        assert!(
            log.wait_ready(&mut rx, new_pid).await,
            "restarted worker not ready"
        );
    }
    stop.store(true, Ordering::SeqCst);
    let produced = produce.await.expect("producer");

    let ob = producer.clone();
    eventually(
        Duration::from_secs(120),
        "the survivors drain everything",
        || {
            let ob = ob.clone();
            async move {
                ob.depth("crash")
                    .await
                    .map(|d| {
                        d.unsequenced == 0
                            && d.handlers.len() == 2
                            && d.handlers.iter().all(|h| h.pending == 0)
                    })
                    .unwrap_or(false)
            }
        },
    )
    .await;
    for w in &mut workers {
        drop(w.stdin.take()); // graceful stop
    }
    for w in &mut workers {
        w.child.wait().expect("worker exit");
    }
    log.drain(&mut rx);

    // Transactional: exactly one effect per message, in sequence order per partition.
    let rows = effects(&db).await;
    let mut bodies: Vec<String> = rows.iter().map(|r| r.3.clone()).collect();
    bodies.sort();
    let expected: Vec<String> = (0..produced).map(|i| format!("{i:05}")).collect();
    assert_eq!(
        bodies.len(),
        produced,
        "lost or duplicated transactional effects"
    );
    assert_eq!(bodies, expected);
    for p in 0..PARTITIONS {
        let seqs: Vec<i64> = rows.iter().filter(|r| r.1 == p).map(|r| r.2).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as i64).collect::<Vec<_>>(),
            "partition {p} reordered"
        );
    }

    // Leased: at least once; a message handled twice was first handled by a killed holder.
    let mut done: HashMap<(u32, i64), Vec<u32>> = HashMap::new();
    for (pid, line) in &log.lines {
        let mut f = line.split_whitespace();
        if (f.next(), f.next()) == (Some("done"), Some("lease")) {
            let p: u32 = f.next().and_then(|x| x.parse().ok()).expect("partition");
            let s: i64 = f.next().and_then(|x| x.parse().ok()).expect("seq");
            done.entry((p, s)).or_default().push(*pid);
        }
    }
    let per_partition: HashMap<u32, i64> = rows.iter().fold(HashMap::new(), |mut m, r| {
        *m.entry(r.1).or_default() += 1;
        m
    });
    let mut duplicates = 0;
    for p in 0..PARTITIONS {
        for s in 1..=per_partition.get(&p).copied().unwrap_or(0) {
            let pids = done
                .get(&(p, s))
                .unwrap_or_else(|| panic!("leased handler never finished {p}/{s}"));
            let survivors = pids.iter().filter(|pid| !killed.contains(pid)).count();
            assert!(
                survivors <= 1,
                "{p}/{s} handled {survivors} times by workers that were not killed"
            );
            duplicates += pids.len() - 1;
        }
    }
    let inside_tx_killed = log
        .lines
        .iter()
        .filter(|(pid, l)| killed.contains(pid) && l.starts_with("inside tx "))
        .count();
    let handled_lines = log
        .lines
        .iter()
        .filter(|(_, l)| l.starts_with("done "))
        .count();
    eprintln!("{handled_lines} handler completions logged");
    eprintln!(
        "crash test on {:?}: {ROUNDS} SIGKILLs {kills:?}; {produced} messages; 0 lost, 0 reordered, 0 duplicate transactional effects; \
         {duplicates} leased redeliveries, all from killed holders; {inside_tx_killed} transactional handler runs by killed workers",
        t.kind
    );
    outbox_tests::assert_invariants(&db, "outbox_").await;
    if let Some(wal) = t.sqlite_wal_bytes() {
        // Checkpoints keep up with a drain by several processes (SQLite's default
        // auto-checkpoint is 1000 pages, about 4 MiB; the WAL is reused, not grown).
        assert!(wal < 32 << 20, "the WAL grew to {wal} bytes");
        eprintln!("SQLite WAL after the drain: {wal} bytes");
    }
}

on_every_backend!(workers_killed_at_chosen_points_lose_and_duplicate_nothing);
