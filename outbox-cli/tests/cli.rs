//! The real `outbox` binary against real databases, on every backend: state is prepared with
//! the library, then the binary runs and its output and exit code are checked.

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use outbox::{
    DEFAULT_TABLE_PREFIX, HandlerError, HandlerSpec, NewMessage, Outbox, PoisonPolicy, Profile,
    QueueSpec,
};
use outbox_tests::{TestDb, eventually, on_every_backend};

/// Runs the binary with `args` against `t`'s database (stdin closed: no terminal).
async fn outbox(t: &TestDb, args: &[&str]) -> (i32, String, String) {
    let url = t.url.clone();
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let out: Output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
            .env("DATABASE_URL", url)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run the outbox binary")
    })
    .await
    .expect("join");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

fn picky(queue: &'static str) -> HandlerSpec {
    HandlerSpec::transactional(queue, "picky", move |m, _txn| {
        let poison = m.payload().starts_with(b"poison");
        Box::pin(async move {
            if poison {
                Err(HandlerError::reject(std::io::Error::other(
                    "downstream said no",
                )))
            } else {
                Ok(())
            }
        })
    })
}

/// Three dead letters in `cli` (partition 0: one, partition 1: two) and a blocked partition
/// in `held`.
async fn prepare(t: &TestDb) {
    let db = t.pool(8).await;
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .queue(QueueSpec::new("cli", 2))
        .queue(QueueSpec::new("held", 1).poison_policy(PoisonPolicy::Block))
        .handler(picky("cli"))
        .handler(picky("held"))
        .start()
        .await
        .expect("start");
    let batch = [
        NewMessage::new("cli", 0, "poison-a").header("request-id", "r-7"),
        NewMessage::new("cli", 0, "fine"),
        NewMessage::new("cli", 1, "poison-b"),
        NewMessage::new("cli", 1, vec![b'p', b'o', b'i', b's', b'o', b'n', 0xff]),
        NewMessage::new("held", 0, "poison-c"),
    ];
    rt.outbox()
        .enqueue_batch(&db, &batch)
        .await
        .expect("enqueue");
    eventually(
        Duration::from_secs(30),
        "dead letters and a block",
        || async {
            let s = rt.outbox().status().await.expect("status");
            s.dead_letters() == 3 && s.blocked().len() == 1
        },
    )
    .await;
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
}

async fn migrate_and_status_of_an_empty_database(t: Arc<TestDb>) {
    let (code, _, err) = outbox(&t, &["status"]).await;
    assert_eq!(code, 1, "status before migrate: {err}");
    assert!(err.contains("outbox migrate"), "{err}");
    let (code, out, err) = outbox(&t, &["migrate"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("up to date"), "{out}");
    let (code, out, _) = outbox(&t, &["migrate"]).await;
    assert_eq!(code, 0, "migrate is idempotent: {out}");
    let (code, out, _) = outbox(&t, &["status", "--json"]).await;
    assert_eq!(code, 0);
    let s = json(&out);
    assert_eq!(s["schema_version"], 4);
    assert_eq!(s["queues"], serde_json::json!([]));
    let (code, out, _) = outbox(&t, &["status"]).await;
    assert_eq!((code, out.as_str()), (0, "no queues registered\n"));
    let (code, out, _) = outbox(&t, &["dead-letters", "list"]).await;
    assert_eq!((code, out.as_str()), (0, "no dead letters\n"));
    let (code, _, err) = outbox(&t, &["--table-prefix", "Bad-Prefix", "status"]).await;
    assert_eq!(code, 2, "an invalid prefix is a usage error: {err}");
    // Another prefix has no tables yet.
    let (code, _, err) = outbox(&t, &["--table-prefix", "other_", "status"]).await;
    assert_eq!(code, 1, "{err}");
}

async fn status_shows_lag_blocked_partitions_and_dead_letters(t: Arc<TestDb>) {
    prepare(&t).await;
    // Something waiting, with no worker running: it shows up with its lag.
    let admin = Outbox::admin(t.pool(1).await, DEFAULT_TABLE_PREFIX).expect("admin");
    admin
        .enqueue(admin.db(), NewMessage::new("cli", 1, "waiting"))
        .await
        .expect("enqueue");

    let (code, out, err) = outbox(&t, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("QUEUE/HANDLER"), "{out}");
    let line = |prefix: &str| {
        out.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in\n{out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    // QUEUE/HANDLER PARTITIONS UNSEQUENCED WAITING LAG RETRYING LEASED BLOCKED DEAD
    let cli = line("cli/picky  ");
    assert_eq!(
        (cli[1], cli[2], cli[3], cli[7], cli[8]),
        ("2", "1", "1", "0", "3"),
        "{out}"
    );
    let held = line("held/picky  ");
    assert_eq!((held[3], held[7], held[8]), ("1", "1", "0"), "{out}");
    assert!(out.contains("BLOCKED"), "{out}");
    assert!(out.contains("downstream said no"), "{out}");
    assert!(out.contains("1 blocked partition(s)"), "{out}");

    let (code, out, _) = outbox(&t, &["status", "--json", "--queue", "held"]).await;
    assert_eq!(code, 0);
    let s = json(&out);
    assert_eq!(s["queues"].as_array().map(Vec::len), Some(1));
    let p = &s["queues"][0]["handlers"][0]["partitions"][0];
    assert_eq!(
        (
            p["blocked"].as_bool(),
            p["attempts"].as_i64(),
            p["head_seq"].as_i64()
        ),
        (Some(true), Some(1), Some(1))
    );

    let (code, _, err) = outbox(&t, &["status", "--queue", "nope"]).await;
    assert_eq!(code, 3, "unknown queue: {err}");
    let (code, _, _) = outbox(&t, &["status", "--check"]).await;
    assert_eq!(code, 5, "blocked partitions and dead letters are unhealthy");

    // Unblocking names the head the operator saw: another one changes nothing (6, conflict).
    let (code, _, err) = outbox(&t, &["unblock", "held", "0", "picky", "--head-seq", "2"]).await;
    assert_eq!(code, 6, "a head that is not the head: {err}");
    assert!(err.contains("no longer seq 2"), "{err}");
    let (code, _, err) = outbox(&t, &["unblock", "held", "0", "picky"]).await;
    assert_eq!(code, 2, "the head is required: {err}");
    // Unblocking retries the head at once (no handler runs here, so it stays at the head).
    let (code, out, err) = outbox(&t, &["unblock", "held", "0", "picky", "--head-seq", "1"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("retried now"), "{out}");
    let (_, out, _) = outbox(&t, &["status", "--json", "--queue", "held"]).await;
    let p = &json(&out)["queues"][0]["handlers"][0]["partitions"][0];
    assert_eq!(
        (
            p["blocked"].as_bool(),
            p["attempts"].as_i64(),
            p["pending"].as_i64()
        ),
        (Some(false), Some(0), Some(1))
    );
}

async fn dead_letter_workflow(t: Arc<TestDb>) {
    prepare(&t).await;
    let (code, out, err) = outbox(&t, &["dead-letters", "list", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let all = json(&out);
    let all = all.as_array().expect("array").clone();
    assert_eq!(all.len(), 3, "{out}");
    let ids: Vec<i64> = all.iter().filter_map(|d| d["id"].as_i64()).collect();
    // Partitions are handled concurrently, so dead-letter ids need not follow partition order.
    let a = all
        .iter()
        .find(|d| d["payload"] == "poison-a")
        .expect("poison-a dead-lettered");
    assert_eq!(a["last_error"], "downstream said no");
    assert_eq!(a["headers"]["request-id"], "r-7", "{a}");
    let binary = all
        .iter()
        .find(|d| d.get("payload_hex").is_some())
        .expect("hex payload");
    assert_eq!(binary["payload_hex"], "706f69736f6eff");

    let (code, out, _) = outbox(
        &t,
        &[
            "dead-letters",
            "list",
            "--partition",
            "1",
            "--handler",
            "picky",
        ],
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 3, "header and two rows: {out}");
    assert!(out.starts_with("ID "), "{out}");

    let after = ids[0].to_string();
    let (code, out, _) = outbox(
        &t,
        &[
            "dead-letters",
            "list",
            "--json",
            "--after",
            &after,
            "--limit",
            "1",
        ],
    )
    .await;
    assert_eq!(code, 0);
    let page: Vec<i64> = json(&out)
        .as_array()
        .map(|a| a.iter().filter_map(|d| d["id"].as_i64()).collect())
        .unwrap_or_default();
    assert_eq!(page, [ids[1]], "paging");

    let first = a["id"].as_i64().expect("id").to_string();
    let (code, out, _) = outbox(&t, &["dead-letters", "show", &first]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("queue:       cli") && out.contains("poison-a"),
        "{out}"
    );
    assert!(out.contains("last error:  downstream said no"), "{out}");
    assert!(out.contains("headers:\n  request-id: r-7\n"), "{out}");
    let (code, _, err) = outbox(&t, &["dead-letters", "show", "999999"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("dead letter 999999 not found"), "{err}");

    // Destructive without a terminal and without --yes: refused, nothing changed.
    let (code, _, err) = outbox(&t, &["dead-letters", "discard", &first]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("--yes"), "{err}");
    let (code, _, _) = outbox(&t, &["dead-letters", "purge"]).await;
    assert_eq!(code, 4);
    let (code, _, _) = outbox(&t, &["dead-letters", "replay", "--all"]).await;
    assert_eq!(code, 4);
    let (_, out, _) = outbox(&t, &["dead-letters", "list", "--json"]).await;
    assert_eq!(json(&out).as_array().map(Vec::len), Some(3));

    // Usage errors.
    let (code, _, _) = outbox(&t, &["dead-letters", "list", "--partition", "x"]).await;
    assert_eq!(code, 2);
    let (code, _, _) = outbox(&t, &["dead-letters", "replay"]).await;
    assert_eq!(code, 2, "replay needs ids or --all");
    let (code, _, _) = outbox(&t, &["frobnicate"]).await;
    assert_eq!(code, 2);

    // Replay partition 1 (two letters): they go back to the queue for their handler.
    let (code, out, err) = outbox(
        &t,
        &[
            "dead-letters",
            "replay",
            "--all",
            "--queue",
            "cli",
            "--partition",
            "1",
            "--yes",
        ],
    )
    .await;
    assert_eq!(
        (code, out.as_str()),
        (0, "replayed 2 dead letter(s)\n"),
        "{err}"
    );
    let admin = Outbox::admin(t.pool(1).await, DEFAULT_TABLE_PREFIX).expect("admin");
    let q = admin.queue_status("cli").await.expect("status");
    assert_eq!((q.unsequenced, q.dead_letters), (2, 1));

    // Discard one that exists and one that does not: 3 (not found), the other is gone.
    let (code, out, err) =
        outbox(&t, &["dead-letters", "discard", &first, "424242", "--yes"]).await;
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.contains("discarded 1 dead letter(s)"), "{out}");
    assert!(err.contains("not found: 424242"), "{err}");

    // Purge what is left (the blocked queue's head is not a dead letter until skipped).
    let skip = ["skip-head", "held", "0", "picky", "--head-seq", "1"];
    let (code, _, _) = outbox(&t, &skip).await;
    assert_eq!(code, 4, "skip-head asks first");
    let (code, _, _) = outbox(&t, &["unblock", "held", "7", "picky", "--head-seq", "1"]).await;
    assert_eq!(code, 3, "no such partition");
    let (code, out, err) = outbox(&t, &[&skip[..], &["--yes"]].concat()).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("message 1 moved to the dead letters"), "{out}");
    let (code, _, err) = outbox(&t, &[&skip[..], &["--yes"]].concat()).await;
    assert_eq!(code, 6, "the head moved: nothing is skipped twice: {err}");
    let (code, out, err) = outbox(&t, &["dead-letters", "purge", "--queue", "held", "-y"]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "purged 1 dead letter(s)\n"),
        "{err}"
    );
    let (code, out, _) = outbox(&t, &["dead-letters", "purge", "--yes"]).await;
    assert_eq!((code, out.as_str()), (0, "no dead letters to purge\n"));
    let (code, _, _) = outbox(&t, &["status", "--check"]).await;
    assert_eq!(code, 0, "healthy again");
}

/// A handler no process runs shows as stale; `retire` asks, removes its cursors, and then
/// knows it no more.
async fn retire_a_stale_handler(t: Arc<TestDb>) {
    let db = t.pool(4).await;
    Outbox::builder(db.clone())
        .queue(QueueSpec::new("gone", 3))
        .handler(picky("gone"))
        .connect()
        .await
        .expect("register a handler that no process runs");
    let (code, out, _) = outbox(&t, &["status", "--all-partitions"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("gone/picky (stale"), "{out}");
    assert!(out.contains("1 stale handler(s)"), "{out}");
    let (code, _, _) = outbox(&t, &["retire", "gone", "picky"]).await;
    assert_eq!(code, 4, "retire asks first");
    let (code, out, err) = outbox(&t, &["retire", "gone", "picky", "--yes"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("retired (3 partition cursors removed)"),
        "{out}"
    );
    let (code, _, err) = outbox(&t, &["retire", "gone", "picky", "--yes"]).await;
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = outbox(&t, &["retire", "gone", "Picky ", "--yes"]).await;
    assert_eq!(code, 2, "an invalid name is a usage error: {err}");
}

/// Scheduled messages show in status and can be cancelled by id or key.
async fn scheduled_messages_are_shown_and_cancelled(t: Arc<TestDb>) {
    let db = t.pool(4).await;
    let rt = Outbox::builder(db.clone())
        .queue(QueueSpec::new("later", 2))
        .connect()
        .await
        .expect("connect");
    let hour = std::time::Duration::from_secs(3600);
    let Ok(outbox::Enqueued::Scheduled { id }) = rt
        .enqueue(&db, NewMessage::new("later", 0, "a").deliver_after(hour))
        .await
    else {
        panic!("not scheduled");
    };
    rt.enqueue(
        &db,
        NewMessage::new("later", 1, "b")
            .deliver_after(hour)
            .dedup_key("remind-7"),
    )
    .await
    .expect("enqueue");
    let (code, out, _) = outbox(&t, &["status"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("later: 2 scheduled message(s), next due in 59m"),
        "{out}"
    );
    let (code, out, err) = outbox(&t, &["cancel-scheduled", &id.to_string()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cancelled"), "{out}");
    let (code, _, err) = outbox(&t, &["cancel-scheduled", &id.to_string()]).await;
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = outbox(&t, &["cancel-scheduled", "--key", "remind-7"]).await;
    assert_eq!(code, 2, "--key needs --queue: {err}");
    let (code, _, err) = outbox(
        &t,
        &["cancel-scheduled", "--queue", "later", "--key", "remind-7"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = outbox(&t, &["status"]).await;
    assert_eq!(code, 0);
    assert!(!out.contains("scheduled message(s)"), "{out}");
}

on_every_backend!(
    migrate_and_status_of_an_empty_database,
    status_shows_lag_blocked_partitions_and_dead_letters,
    dead_letter_workflow,
    retire_a_stale_handler,
    scheduled_messages_are_shown_and_cancelled,
);

#[test]
fn no_database_is_a_usage_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
        .env_remove("DATABASE_URL")
        .arg("status")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--database-url"));
}

#[test]
fn help_lists_the_commands_and_exit_codes() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
        .arg("--help")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["migrate", "status", "dead-letters", "3 not found"] {
        assert!(help.contains(word), "{word} in {help}");
    }
}

/// Prints the text outputs, for eyeballing: `cargo test -p outbox-cli show_outputs -- --nocapture --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints outputs for a human"]
async fn show_outputs() {
    outbox_tests::run(outbox_tests::Kind::Sqlite, |t: Arc<TestDb>| async move {
        prepare(&t).await;
        for args in [
            &["status"][..],
            &["dead-letters", "list"],
            &["dead-letters", "show", "1"],
        ] {
            let (code, out, err) = outbox(&t, args).await;
            eprintln!("$ outbox {}  (exit {code})\n{out}{err}", args.join(" "));
        }
    })
    .await;
}
