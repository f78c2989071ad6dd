//! The dashboard in a real browser (Debian's chromium driven through chromedriver), on SQLite,
//! PostgreSQL and MariaDB: every page and every action, with the database checked through the
//! engine's own status afterwards.
//!
//! Without chromium and chromedriver these tests show as ignored with the reason;
//! `OUTBOX_TEST_REQUIRE=browser` makes them run (and fail) instead. Screenshots land in
//! `target/dashboard-screenshots/`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use outbox::{
    DeadLetterFilter, Error, HandlerError, HandlerSpec, NewMessage, Outbox, PoisonPolicy, Profile,
    QueueSpec, RuntimeTuning,
};
use outbox_dashboard::Config;
use outbox_tests::{TestDb, eventually};

const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "correct horse battery staple";

/// One browser at a time: the machine has two cores.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

macro_rules! in_browser_on_every_backend {
    ($($name:ident),* $(,)?) => {
        in_browser_on_every_backend!(@backend sqlite, Sqlite, any(), "", $($name),*);
        in_browser_on_every_backend!(@backend postgres, Postgres, outbox_no_postgres,
            "skipped: OUTBOX_TEST_POSTGRES_URL is not set", $($name),*);
        in_browser_on_every_backend!(@backend mysql, Mysql, outbox_no_mysql,
            "skipped: OUTBOX_TEST_MYSQL_URL is not set", $($name),*);
    };
    (@backend $m:ident, $kind:ident, $no:meta, $why:literal, $($name:ident),*) => {
        mod $m {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[cfg_attr(
                    outbox_no_browser,
                    ignore = "skipped: chromium or chromedriver is absent (apt-get install chromium chromium-driver)"
                )]
                #[cfg_attr(all($no, not(outbox_no_browser)), ignore = $why)]
                async fn $name() {
                    outbox_tests::run(outbox_tests::Kind::$kind, super::$name).await
                }
            )*
        }
    };
}

/// A headless chromium under a chromedriver of its own, on a free port.
struct Browser {
    client: Client,
    driver: tokio::process::Child,
    base: String,
    shots: String,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

impl Browser {
    async fn start(base: String, shots: &str) -> Browser {
        let port = free_port();
        let driver = tokio::process::Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start /usr/bin/chromedriver (apt-get install chromium-driver)");
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000"]
            }
        });
        let caps = caps.as_object().cloned().unwrap_or_default();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + WAIT;
        let client = loop {
            match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "chromedriver did not start a session: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        Browser {
            client,
            driver,
            base,
            shots: shots.to_owned(),
        }
    }

    async fn goto(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
    }

    async fn text(&self, css: &str) -> String {
        // The overview refreshes itself every second and replaces its elements: an element
        // found just before a refresh is stale when read, so find it again.
        let mut stale = 0;
        loop {
            let found = match self.client.find(Locator::Css(css)).await {
                Ok(e) => e,
                Err(e) => {
                    let url = self.client.current_url().await.map(|u| u.to_string());
                    let page = match self.client.find(Locator::Css("body")).await {
                        Ok(body) => body.text().await.unwrap_or_default(),
                        Err(_) => String::new(),
                    };
                    panic!("find {css} on {url:?}: {e}\npage text: {page}");
                }
            };
            match found.text().await {
                Ok(text) => return text,
                Err(e) if stale < 5 && e.to_string().contains("stale element") => stale += 1,
                Err(e) => panic!("text of {css}: {e}"),
            }
        }
    }

    async fn has(&self, css: &str) -> bool {
        !self
            .client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("find {css}: {e}"))
            .is_empty()
    }

    async fn js(&self, script: &str) -> serde_json::Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("run {script}: {e}"))
    }

    /// Clicks `css` and waits until the browser has loaded the next document.
    async fn click_and_load(&self, css: &str) {
        self.js("document.documentElement.dataset.old = '1'; return null;")
            .await;
        // A self-refreshing page may replace the element between finding and clicking it.
        let mut stale = 0;
        loop {
            let found = self
                .client
                .find(Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("find {css}: {e}"));
            match found.click().await {
                Ok(_) => break,
                Err(e) if stale < 5 && e.to_string().contains("stale element") => stale += 1,
                Err(e) => panic!("click {css}: {e}"),
            }
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self
                .client
                .execute(
                    "return document.readyState === 'complete' && !document.documentElement.dataset.old;",
                    Vec::new(),
                )
                .await;
            if matches!(v, Ok(serde_json::Value::Bool(true))) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no new page after clicking {css}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("find {css}: {e}"));
        e.clear()
            .await
            .unwrap_or_else(|e| panic!("clear {css}: {e}"));
        e.send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::write(dir.join(format!("{}-{name}.png", self.shots)), png)
            .expect("save screenshot");
    }

    async fn close(mut self) {
        self.client.clone().close().await.ok();
        self.driver.kill().await.ok();
    }
}

fn screenshot_dir() -> PathBuf {
    let target = option_env!("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("dashboard-screenshots")
}

/// Serves `router` on a free local port; returns its base URL.
async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(listener, router).await.ok();
    });
    format!("http://{addr}")
}

fn eager() -> RuntimeTuning {
    let mut t = Profile::LowLatency.runtime();
    t.heartbeat_interval = Duration::from_millis(100);
    t
}

fn poisoned(m: &outbox::Message) -> bool {
    m.payload().windows(6).any(|w| w == b"poison")
}

/// Rejects poisoned payloads until `healed`.
fn picky(queue: &'static str, name: &'static str, healed: &Arc<AtomicBool>) -> HandlerSpec {
    let healed = healed.clone();
    HandlerSpec::transactional(queue, name, move |m, _txn| {
        let fail = poisoned(m) && !healed.load(Ordering::SeqCst);
        Box::pin(async move {
            if fail {
                Err(HandlerError::reject("payment provider said no"))
            } else {
                Ok(())
            }
        })
    })
}

fn accept(queue: &'static str, name: &'static str) -> HandlerSpec {
    HandlerSpec::transactional(queue, name, |_m, _txn| Box::pin(async { Ok(()) }))
}

fn queues() -> [QueueSpec; 2] {
    [
        QueueSpec::new("orders", 4),
        QueueSpec::new("payments", 2).poison_policy(PoisonPolicy::Block),
    ]
}

async fn dead(rt: &Outbox, f: DeadLetterFilter) -> i64 {
    rt.count_dead_letters(&f).await.expect("count dead letters")
}

/// Seeds two queues with dead letters, two blocked partitions and a stale handler; returns
/// the running outbox and the switch that heals the picky handlers.
async fn seeded(t: &TestDb) -> (outbox::Running, Arc<AtomicBool>) {
    let db = t.pool(16).await;
    let healed = Arc::new(AtomicBool::new(false));
    let [orders, payments] = queues();
    // An earlier release also ran `legacy` on orders; this one no longer does.
    let earlier = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .runtime_tuning(eager())
        .queue(orders.clone())
        .queue(payments.clone())
        .handler(accept("orders", "legacy"))
        .start()
        .await
        .expect("start the earlier release");
    earlier
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    let rt = Outbox::builder(db.clone())
        .profile(Profile::LowLatency)
        .runtime_tuning(eager())
        .queue(orders)
        .queue(payments)
        .handler(picky("orders", "mailer", &healed))
        .handler(accept("orders", "audit"))
        .handler(picky("payments", "charge", &healed))
        .start()
        .await
        .expect("start");
    let mut batch: Vec<_> = (0..8)
        .map(|i| {
            NewMessage::new(
                "orders",
                i % 4,
                format!(r#"{{"order":{i},"total_cents":1999}}"#),
            )
        })
        .collect();
    for p in 0..3 {
        batch.push(NewMessage::new(
            "orders",
            p,
            format!(r#"{{"kind":"poison","order":{}}}"#, 100 + p),
        ));
    }
    batch.push(NewMessage::new("orders", 3, b"\xff\x00poison\x01".to_vec()));
    batch.push(NewMessage::new("payments", 0, r#""poison-a""#));
    batch.push(NewMessage::new("payments", 0, r#""ok-a""#));
    batch.push(NewMessage::new("payments", 1, r#""poison-b""#));
    rt.outbox()
        .enqueue_batch(&db, &batch)
        .await
        .expect("enqueue");
    // Due in an hour: counted as scheduled, nowhere else.
    rt.outbox()
        .enqueue(
            &db,
            NewMessage::new("payments", 1, r#""later""#).deliver_after(Duration::from_secs(3600)),
        )
        .await
        .expect("enqueue a scheduled message");
    eventually(
        WAIT,
        "4 dead letters, 2 blocked partitions, a stale handler",
        || async {
            let Ok(s) = rt.outbox().status().await else {
                return false;
            };
            s.dead_letters() == 4
                && s.blocked().len() == 2
                && s.queue("orders")
                    .and_then(|q| q.handler("legacy"))
                    .is_some_and(|h| h.is_stale())
        },
    )
    .await;
    (rt, healed)
}

/// Every page, and every action through the browser, with the database checked after each.
async fn every_page_and_action(t: Arc<TestDb>) {
    let _one = ONE_BROWSER.lock().await;
    let (rt, healed) = seeded(&t).await;
    let config = Config::new()
        .token(TOKEN)
        .refresh_interval(Duration::from_secs(1))
        .throughput_sampling(Duration::from_millis(200), Duration::from_secs(120))
        .page_size(3);
    let base = serve(outbox_dashboard::router(rt.outbox().clone(), config)).await;
    let b = Browser::start(base, &format!("{:?}", t.kind).to_lowercase()).await;

    // Overview, logged out: counts, no action forms.
    b.goto("/").await;
    assert_eq!(b.text("#total-dead").await, "4");
    assert_eq!(b.text("#total-blocked").await, "2");
    assert_eq!(b.text("#total-stale").await, "1");
    assert_eq!(b.text("#total-queues").await, "2");
    assert_eq!(b.text("#h-orders-mailer .dead").await, "4");
    assert_eq!(b.text("#h-payments-charge .blocked").await, "2");
    assert!(b.text("#h-orders-legacy").await.contains("stale for"));
    assert_eq!(b.text("#h-payments-charge .scheduled").await, "1");
    assert_eq!(b.text("#h-orders-audit .scheduled").await, "0");
    assert!(b.has("#login").await);
    assert!(
        !b.has("form[method=post] button.danger").await,
        "no actions before login"
    );
    assert!(b.has("svg.chart").await, "throughput chart");

    // Live refresh: a new dead letter shows up without a page load.
    b.js("window.__same_page = 42; return null;").await;
    rt.outbox()
        .enqueue(
            rt.outbox().db(),
            NewMessage::new("orders", 1, r#"{"kind":"poison","order":200}"#),
        )
        .await
        .expect("enqueue");
    let deadline = tokio::time::Instant::now() + WAIT;
    while b.text("#total-dead").await != "5" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the overview never refreshed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        b.js("return window.__same_page;").await,
        serde_json::json!(42),
        "no reload"
    );
    // The throughput chart draws once two samples exist.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !b.has("svg.chart polyline").await {
        assert!(tokio::time::Instant::now() < deadline, "no throughput line");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Log in: a wrong token is refused, the right one shows the actions.
    b.goto("/login").await;
    b.type_into("#token", "wrong").await;
    b.click_and_load("#login-submit").await;
    assert!(b.text("#refusal").await.starts_with("403"));
    b.goto("/login").await;
    b.type_into("#token", TOKEN).await;
    b.click_and_load("#login-submit").await;
    assert!(b.has("#logout").await, "logged in");
    assert!(b.has("#retire-orders-legacy").await);
    b.screenshot("overview").await;

    // Queue page: head and processed seq per partition.
    b.goto("/queues/payments").await;
    assert_eq!(b.text("#queue-name").await, "payments");
    assert_eq!(b.text("#scheduled").await, "1");
    assert!(
        b.text("#next-due").await.starts_with("next due 20"),
        "{}",
        b.text("#next-due").await
    );
    assert_eq!(b.text("#p-charge-0 .head-seq").await, "1");
    assert_eq!(b.text("#p-charge-0 .processed-seq").await, "0");
    assert_eq!(b.text("#p-charge-0 .state").await, "blocked");
    assert_eq!(b.text("#p-charge-1 .head-seq").await, "1");
    b.screenshot("queue").await;

    // Unblock naming a head the operator did not see: 409, nothing changes.
    b.js("document.querySelector('#unblock-charge-0').form.querySelector('input[name=head_seq]').value = '99'; return null;")
        .await;
    b.click_and_load("#unblock-charge-0").await;
    assert!(
        b.text("#refusal").await.starts_with("409"),
        "{}",
        b.text("main").await
    );
    assert!(b.text("main").await.contains("Nothing was changed"));
    let p0 = rt
        .outbox()
        .queue_status("payments")
        .await
        .expect("status")
        .handlers[0]
        .partitions[0]
        .clone();
    assert!(
        p0.blocked && p0.processed_seq == 0 && p0.head_seq == Some(1),
        "{p0:?}"
    );

    // Malformed form (no head_seq): 400, nothing changes.
    b.goto("/queues/payments").await;
    b.js("document.querySelector('#skip-charge-0').form.querySelector('input[name=head_seq]').remove(); return null;")
        .await;
    b.click_and_load("#skip-charge-0").await;
    assert!(b.text("#refusal").await.starts_with("400"));
    assert_eq!(
        dead(rt.outbox(), DeadLetterFilter::all().queue("payments")).await,
        0
    );

    // A forged CSRF token: 403, nothing changes.
    b.goto("/queues/payments").await;
    b.js("document.querySelector('#skip-charge-1').form.querySelector('input[name=csrf]').value = '00ff'; return null;")
        .await;
    b.click_and_load("#skip-charge-1").await;
    assert!(b.text("#refusal").await.starts_with("403"));
    assert_eq!(
        dead(rt.outbox(), DeadLetterFilter::all().queue("payments")).await,
        0
    );

    // Skip head of partition 1: its poison moves to the dead letters, the cursor moves on.
    b.goto("/queues/payments").await;
    b.click_and_load("#skip-charge-1").await;
    assert_eq!(b.text("#done").await, "Done", "{}", b.text("main").await);
    assert_eq!(
        dead(
            rt.outbox(),
            DeadLetterFilter::all().queue("payments").partition(1)
        )
        .await,
        1
    );
    let p1 = rt
        .outbox()
        .queue_status("payments")
        .await
        .expect("status")
        .handlers[0]
        .partitions[1]
        .clone();
    assert!(
        !p1.blocked && p1.processed_seq == 1 && p1.head_seq.is_none(),
        "{p1:?}"
    );

    // Unblock partition 0 once the provider is fixed: the head and the message behind it go.
    healed.store(true, Ordering::SeqCst);
    b.goto("/queues/payments").await;
    b.click_and_load("#unblock-charge-0").await;
    assert_eq!(b.text("#done").await, "Done", "{}", b.text("main").await);
    eventually(WAIT, "partition 0 drained after unblock", || async {
        rt.outbox().queue_status("payments").await.is_ok_and(|q| {
            q.handlers[0].partitions[0].processed_seq == 2 && !q.handlers[0].partitions[0].blocked
        })
    })
    .await;
    assert_eq!(
        dead(
            rt.outbox(),
            DeadLetterFilter::all().queue("payments").partition(0)
        )
        .await,
        0
    );

    // Dead-letter list: filters and paging (3 a page).
    b.goto("/dead-letters").await;
    assert_eq!(b.text("#dl-count").await, "6");
    assert_eq!(
        b.client
            .find_all(Locator::Css("#dead-letters tbody tr"))
            .await
            .expect("rows")
            .len(),
        3
    );
    b.click_and_load("#next-page").await;
    assert_eq!(
        b.client
            .find_all(Locator::Css("#dead-letters tbody tr"))
            .await
            .expect("rows")
            .len(),
        3
    );
    assert!(!b.has("#next-page").await, "6 dead letters make two pages");
    b.click_and_load("#first-page").await;
    b.type_into("#f-queue", "orders").await;
    b.type_into("#f-handler", "mailer").await;
    b.type_into("#f-partition", "1").await;
    b.click_and_load("#f-apply").await;
    assert_eq!(b.text("#dl-count").await, "2", "orders/mailer partition 1");
    b.screenshot("dead-letters").await;

    // Detail: pretty JSON, error, attempts; then replay it (the handler is fixed now).
    let first = rt
        .outbox()
        .dead_letters(&DeadLetterFilter::all().queue("orders").partition(1), 0, 1)
        .await
        .expect("list")[0]
        .clone();
    b.click_and_load(&format!("#dl-{} a", first.id)).await;
    assert_eq!(b.text("#dl-id").await, first.id.to_string());
    assert!(
        b.text("#payload").await.contains(r#""kind": "poison""#),
        "pretty JSON"
    );
    assert!(b.text("#error").await.contains("payment provider said no"));
    assert_eq!(b.text("#dl-handler").await, "mailer");
    b.screenshot("dead-letter").await;
    b.click_and_load("#replay").await;
    assert_eq!(b.text("#done").await, "Done");
    assert!(matches!(
        rt.outbox().dead_letter(first.id).await,
        Err(Error::DeadLetterNotFound(_))
    ));
    assert_eq!(dead(rt.outbox(), DeadLetterFilter::all()).await, 5);

    // The binary payload shows as hex; discard it.
    let binary = rt
        .outbox()
        .dead_letters(&DeadLetterFilter::all().partition(3), 0, 1)
        .await
        .expect("list")[0]
        .clone();
    b.goto(&format!("/dead-letters/{}", binary.id)).await;
    assert!(
        b.text("#payload")
            .await
            .starts_with("00000000  ff 00 70 6f"),
        "hex dump"
    );
    b.click_and_load("#discard").await;
    assert_eq!(b.text("#done").await, "Done");
    assert!(matches!(
        rt.outbox().dead_letter(binary.id).await,
        Err(Error::DeadLetterNotFound(_))
    ));
    assert_eq!(dead(rt.outbox(), DeadLetterFilter::all()).await, 4);

    // Bulk: replay two selected, then discard one selected.
    b.goto("/dead-letters?queue=orders").await;
    let ids: Vec<i64> = rt
        .outbox()
        .dead_letters(&DeadLetterFilter::all().queue("orders"), 0, 10)
        .await
        .expect("list")
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    b.client
        .find(Locator::Css(&format!("#sel-{}", ids[0])))
        .await
        .expect("box")
        .click()
        .await
        .expect("tick");
    b.client
        .find(Locator::Css(&format!("#sel-{}", ids[1])))
        .await
        .expect("box")
        .click()
        .await
        .expect("tick");
    b.click_and_load("#bulk-replay").await;
    assert!(
        b.text("#done-detail").await.starts_with("Replayed 2"),
        "{}",
        b.text("main").await
    );
    assert_eq!(
        dead(rt.outbox(), DeadLetterFilter::all().queue("orders")).await,
        1
    );
    b.goto("/dead-letters?queue=orders").await;
    b.client
        .find(Locator::Css(&format!("#sel-{}", ids[2])))
        .await
        .expect("box")
        .click()
        .await
        .expect("tick");
    b.click_and_load("#bulk-discard").await;
    assert!(b.text("#done-detail").await.starts_with("Discarded 1"));
    assert_eq!(
        dead(rt.outbox(), DeadLetterFilter::all().queue("orders")).await,
        0
    );
    // The replayed messages were handled this time.
    eventually(WAIT, "replayed messages handled", || async {
        rt.outbox()
            .queue_status("orders")
            .await
            .is_ok_and(|q| q.handler("mailer").is_some_and(|h| h.pending == 0))
    })
    .await;

    // Purge: refused without the confirmation box, then done with it.
    b.goto("/dead-letters?queue=payments").await;
    assert_eq!(b.text("#dl-count").await, "1");
    b.click_and_load("#purge").await;
    assert!(b.text("#refusal").await.starts_with("400"));
    assert_eq!(
        dead(rt.outbox(), DeadLetterFilter::all().queue("payments")).await,
        1
    );
    b.goto("/dead-letters?queue=payments").await;
    b.client
        .find(Locator::Css("#purge-confirm"))
        .await
        .expect("box")
        .click()
        .await
        .expect("tick");
    b.click_and_load("#purge").await;
    assert_eq!(b.text("#done-detail").await, "Purged 1 dead letter(s).");
    assert_eq!(dead(rt.outbox(), DeadLetterFilter::all()).await, 0);

    // Retire: a handler still served is refused with 409; the stale one goes.
    b.goto("/").await;
    b.js("var f = document.querySelector('#retire-orders-legacy').form; f.action = f.action.replace('/legacy/', '/mailer/'); return null;")
        .await;
    b.click_and_load("#retire-orders-legacy").await;
    assert!(
        b.text("#refusal").await.starts_with("409"),
        "{}",
        b.text("main").await
    );
    assert!(
        rt.outbox()
            .queue_status("orders")
            .await
            .expect("status")
            .handler("mailer")
            .is_some()
    );
    b.goto("/").await;
    b.click_and_load("#retire-orders-legacy").await;
    assert_eq!(b.text("#done").await, "Done");
    let orders = rt.outbox().queue_status("orders").await.expect("status");
    assert!(orders.handler("legacy").is_none(), "{orders:?}");
    assert!(orders.handler("mailer").is_some());

    // Bad input gets a clear page.
    for (path, code) in [
        ("/dead-letters/999999", "404"),
        ("/dead-letters/abc", "400"),
        ("/dead-letters?partition=x", "400"),
        ("/queues/nope", "404"),
        ("/queues/no%20pe", "400"),
        ("/no/such/page", "404"),
        ("/dead-letters/1/replay", "405"),
    ] {
        b.goto(path).await;
        assert!(
            b.text("#refusal").await.starts_with(code),
            "{path}: {}",
            b.text("main").await
        );
    }

    // Log out: the actions are gone.
    b.goto("/").await;
    b.click_and_load("#logout").await;
    assert!(b.has("#login").await);
    assert!(!b.has("#retire-orders-legacy").await);
    b.close().await;
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
}

/// Read-only with payloads hidden: no action anywhere, action routes refuse, payloads stay
/// off the page.
async fn read_only_hides_payloads_and_refuses_actions(t: Arc<TestDb>) {
    let _one = ONE_BROWSER.lock().await;
    let (rt, _healed) = seeded(&t).await;
    let config = Config::new()
        .token(TOKEN)
        .read_only(true)
        .show_payloads(false);
    let base = serve(outbox_dashboard::router(rt.outbox().clone(), config)).await;
    let b = Browser::start(base, &format!("{:?}-ro", t.kind).to_lowercase()).await;
    b.goto("/").await;
    assert_eq!(b.text("#total-dead").await, "4");
    assert!(b.text("header").await.contains("read-only"));
    assert!(!b.has("#login").await);
    assert!(!b.has("form[method=post]").await);
    b.goto("/login").await;
    assert!(b.text("#refusal").await.starts_with("403"));
    let id = rt
        .outbox()
        .dead_letters(&DeadLetterFilter::all(), 0, 1)
        .await
        .expect("list")[0]
        .id;
    b.goto(&format!("/dead-letters/{id}")).await;
    assert!(b.has("#payload-hidden").await);
    assert!(!b.has("#payload").await);
    assert!(
        !b.text("main").await.contains("poison"),
        "no payload text anywhere"
    );
    assert!(!b.has("#replay").await);
    // A hand-made form posting to the replay route is refused.
    b.js(&format!(
        "var f = document.createElement('form'); f.method = 'post'; f.action = '/dead-letters/{id}/replay'; document.body.appendChild(f); f.submit(); return null;"
    ))
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !b.has("#refusal").await {
        assert!(tokio::time::Instant::now() < deadline, "no refusal page");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(b.text("#refusal").await.starts_with("403"));
    assert!(b.text("main").await.contains("read-only"));
    assert_eq!(dead(rt.outbox(), DeadLetterFilter::all()).await, 4);
    assert!(rt.outbox().dead_letter(id).await.is_ok());
    b.close().await;
    rt.shutdown(Duration::from_secs(5)).await.expect("shutdown");
}

in_browser_on_every_backend!(
    every_page_and_action,
    read_only_hides_payloads_and_refuses_actions,
);
