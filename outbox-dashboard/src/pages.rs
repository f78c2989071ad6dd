//! The pages: overview, a queue's partitions, the dead-letter list and one dead letter, login,
//! and the embedded assets.

use std::fmt::Write as _;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use outbox::{DeadLetter, DeadLetterFilter, HandlerStatus, PartitionStatus, QueueStatus, Status};

use crate::html::{Page, Refusal, dur, enc, esc, time};
use crate::security::{csrf_token, logged_in};
use crate::{AppState, Dashboard, samples};

/// Payload bytes shown at most on the detail page.
const MAX_SHOWN_PAYLOAD: usize = 64 * 1024;
/// Partition tables show only busy partitions by default above this count.
const SHOW_ALL_UP_TO: u32 = 64;

fn fragment(headers: &HeaderMap) -> bool {
    headers.contains_key("x-outbox-fragment")
}

fn page(d: &Dashboard, headers: &HeaderMap, title: String, body: String, live: bool) -> Response {
    Page {
        title,
        body,
        live,
        fragment: fragment(headers),
        status: StatusCode::OK,
        dashboard: d,
        logged_in: logged_in(d, headers),
    }
    .render()
}

fn refuse(d: &Dashboard, headers: &HeaderMap, r: Refusal) -> Response {
    if fragment(headers) {
        // The live-refresh script keeps the last good content and dims it.
        return (r.status, r.detail).into_response();
    }
    r.page(d, logged_in(d, headers))
}

/// A small form posting to `action` with the CSRF token and extra hidden fields.
pub(crate) fn action_form(
    d: &Dashboard,
    action: &str,
    hidden: &[(&str, String)],
    label: &str,
    id: &str,
    danger: bool,
) -> String {
    let mut f = format!(
        r#"<form method="post" class="inline" action="{}"><input type="hidden" name="csrf" value="{}">"#,
        esc(&d.link(action)),
        esc(&csrf_token(d))
    );
    for (k, v) in hidden {
        let _ = write!(
            f,
            r#"<input type="hidden" name="{}" value="{}">"#,
            esc(k),
            esc(v)
        );
    }
    let _ = write!(
        f,
        r#"<button type="submit" id="{}"{}>{}</button></form>"#,
        esc(id),
        if danger { r#" class="danger""# } else { "" },
        esc(label)
    );
    f
}

fn num(n: i64) -> String {
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// A queue's scheduled count; `10000+` where status stopped counting.
fn scheduled(q: &QueueStatus) -> String {
    if q.scheduled_capped {
        format!("{}+", num(q.scheduled))
    } else {
        num(q.scheduled)
    }
}

/// When a queue's next scheduled message is due, by the database's clock.
fn next_due(q: &QueueStatus) -> String {
    q.next_due_at_ms.map_or_else(
        || "nothing scheduled".to_owned(),
        |ms| format!("next due {}", time(ms)),
    )
}

fn lag(ms: Option<i64>) -> String {
    ms.map_or_else(|| "—".to_owned(), dur)
}

/// Whether a handler is served by a running process, as a badge.
fn served(h: &HandlerStatus) -> String {
    match h.stale_for_ms {
        None => r#"<span class="badge ok">running</span>"#.to_owned(),
        Some(ms) => format!(
            r#"<span class="badge warn stale">stale for {}</span>"#,
            esc(&dur(ms))
        ),
    }
}

/// GET `/`: queues and handlers, totals and throughput.
pub(crate) async fn overview(State(d): State<AppState>, headers: HeaderMap) -> Response {
    let status = match d.outbox.status().await {
        Ok(s) => s,
        Err(e) => return refuse(&d, &headers, Refusal::from_engine(&e)),
    };
    samples::record(&d, &status);
    let body = overview_body(&d, &status, logged_in(&d, &headers));
    page(&d, &headers, "Overview".to_owned(), body, true)
}

pub(crate) fn overview_body(d: &Dashboard, status: &Status, acting: bool) -> String {
    let handlers = || status.queues.iter().flat_map(|q| q.handlers.iter());
    let waiting: i64 = status
        .queues
        .iter()
        .map(|q| q.handlers.iter().map(|h| h.pending).max().unwrap_or(0) + q.unsequenced)
        .sum();
    let blocked: u32 = handlers().map(|h| h.blocked_partitions).sum();
    let stale = handlers().filter(|h| h.is_stale()).count();
    let dead = status.dead_letters();
    let (rates, window_ms, per_handler) = match d.samples.lock() {
        Ok(s) => {
            let mut per = std::collections::HashMap::new();
            for q in &status.queues {
                for h in &q.handlers {
                    per.insert(
                        (q.name.clone(), h.name.clone()),
                        s.rates(Some((&q.name, &h.name))),
                    );
                }
            }
            (s.rates(None), s.window_ms(), per)
        }
        Err(_) => (Vec::new(), 600_000, Default::default()),
    };
    let now = status.taken_at_ms;
    let card = |id: &str, n: String, label: &str, alert: bool| {
        format!(
            r#"<div class="card{}"><span class="num" id="{id}">{n}</span>{label}</div>"#,
            if alert { " alert" } else { "" }
        )
    };
    let mut b = format!(
        r#"<h1>Overview</h1><p class="taken">Read at <span id="taken-at">{}</span> (database clock) · schema version {}</p><div class="cards">{}{}{}{}{}</div>"#,
        esc(&time(now)),
        status
            .schema_version
            .map_or_else(|| "none".to_owned(), |v| v.to_string()),
        card(
            "total-queues",
            num(status.queues.len() as i64),
            "queues",
            false
        ),
        card("total-waiting", num(waiting), "waiting", false),
        card(
            "total-blocked",
            num(i64::from(blocked)),
            "blocked partitions",
            blocked > 0
        ),
        card("total-dead", num(dead), "dead letters", dead > 0),
        card(
            "total-stale",
            num(stale as i64),
            "stale handlers",
            stale > 0
        ),
    );
    let current = rates.last().map_or(0.0, |r| r.per_sec);
    let _ = write!(
        b,
        r#"<h2>Throughput</h2><p class="muted">Messages handled per second by all handlers, last {} minutes (now <span id="rate-now">{current:.1}</span>/s).</p>{}"#,
        window_ms / 60_000,
        samples::chart(&rates, now, window_ms, 720, 140, true)
    );
    b.push_str(r#"<h2>Queues</h2><table id="queues"><thead><tr><th>Queue</th><th>Partitions</th><th>Unsequenced</th><th>Scheduled</th><th>Handler</th><th>Waiting</th><th>Lag</th><th>Retrying</th><th>Leased</th><th>Blocked</th><th>Dead letters</th><th>Served</th><th>Throughput</th><th></th></tr></thead><tbody>"#);
    if status.queues.is_empty() {
        b.push_str(r#"<tr><td colspan="14" class="muted">No queue is registered in this database yet.</td></tr>"#);
    }
    for q in &status.queues {
        let rows = q.handlers.len().max(1);
        let qlink = esc(&d.link(&format!("/queues/{}", enc(&q.name))));
        let head = format!(
            r#"<td rowspan="{rows}"><a href="{qlink}" class="queue-link">{}</a></td><td rowspan="{rows}" class="n">{}</td><td rowspan="{rows}" class="n">{}</td><td rowspan="{rows}" class="n scheduled" title="{}">{}</td>"#,
            esc(&q.name),
            q.partitions,
            num(q.unsequenced),
            esc(&next_due(q)),
            scheduled(q),
        );
        if q.handlers.is_empty() {
            let _ = write!(
                b,
                r#"<tr id="q-{}">{head}<td colspan="10" class="muted">no handler</td></tr>"#,
                esc(&q.name)
            );
        }
        for (i, h) in q.handlers.iter().enumerate() {
            let rates = per_handler
                .get(&(q.name.clone(), h.name.clone()))
                .cloned()
                .unwrap_or_default();
            let rate = rates.last().map_or(0.0, |r| r.per_sec);
            let dead_link = esc(&d.link(&format!(
                "/dead-letters?queue={}&handler={}",
                enc(&q.name),
                enc(&h.name)
            )));
            let retire = if acting && h.is_stale() {
                action_form(
                    d,
                    &format!("/queues/{}/handlers/{}/retire", enc(&q.name), enc(&h.name)),
                    &[],
                    "Retire",
                    &format!("retire-{}-{}", q.name, h.name),
                    true,
                )
            } else {
                String::new()
            };
            let _ = write!(
                b,
                r#"<tr id="h-{qn}-{hn}" class="{cls}">{head}<td class="handler">{hn}</td><td class="n waiting">{}</td><td class="n lag">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n blocked">{}</td><td class="n dead"><a href="{dead_link}">{}</a></td><td class="served">{}</td><td class="tp">{} <span class="rate">{rate:.1}/s</span></td><td>{retire}</td></tr>"#,
                num(h.waiting),
                esc(&lag(h.lag_ms)),
                h.retrying_partitions,
                h.leased_partitions,
                h.blocked_partitions,
                num(h.dead_letters),
                served(h),
                samples::chart(&rates, now, window_ms, 120, 24, false),
                qn = esc(&q.name),
                hn = esc(&h.name),
                cls = if h.blocked_partitions > 0 {
                    "blocked"
                } else if h.is_stale() {
                    "stale"
                } else {
                    ""
                },
                head = if i == 0 { head.as_str() } else { "" },
            );
        }
    }
    b.push_str("</tbody></table>");
    b
}

/// Query of the queue page: `show=all|busy`.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct QueueQuery {
    show: Option<String>,
}

fn busy(p: &PartitionStatus) -> bool {
    p.pending > 0 || p.unsequenced > 0 || p.blocked || p.attempts > 0 || p.dead_letters > 0
}

/// GET `/queues/{queue}`: every handler's partitions, with unblock and skip-head.
pub(crate) async fn queue(
    State(d): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    query: Result<Query<QueueQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match d.outbox.queue_status(&name).await {
        Ok(q) => q,
        Err(e) => return refuse(&d, &headers, Refusal::from_engine(&e)),
    };
    let show_all = match query.as_ref().ok().and_then(|q| q.show.as_deref()) {
        Some("all") => true,
        Some("busy") => false,
        _ => q.partitions <= SHOW_ALL_UP_TO,
    };
    let body = queue_body(&d, &q, show_all, logged_in(&d, &headers));
    page(&d, &headers, format!("Queue {}", q.name), body, true)
}

fn queue_body(d: &Dashboard, q: &QueueStatus, show_all: bool, acting: bool) -> String {
    let qe = enc(&q.name);
    let mut b = format!(
        r#"<h1>Queue <span id="queue-name">{}</span></h1><p>{} partitions · <span id="unsequenced">{}</span> unsequenced · <span id="scheduled">{}</span> scheduled (<span id="next-due">{}</span>) · <a href="{}" id="queue-dead">{} dead letters</a> · showing {} partitions (<a href="{}">busy</a> | <a href="{}">all</a>)</p>"#,
        esc(&q.name),
        q.partitions,
        num(q.unsequenced),
        scheduled(q),
        esc(&next_due(q)),
        esc(&d.link(&format!("/dead-letters?queue={qe}"))),
        num(q.dead_letters),
        if show_all { "all" } else { "busy" },
        esc(&d.link(&format!("/queues/{qe}?show=busy"))),
        esc(&d.link(&format!("/queues/{qe}?show=all"))),
    );
    if q.handlers.is_empty() {
        b.push_str(r#"<p class="muted">No handler consumes this queue.</p>"#);
    }
    for h in &q.handlers {
        let he = enc(&h.name);
        let _ = write!(
            b,
            r#"<h2 id="handler-{}">Handler {} {}</h2><p class="muted">{} waiting · lag {} · {} retrying · {} leased · {} blocked · {} dead letters</p>"#,
            esc(&h.name),
            esc(&h.name),
            served(h),
            num(h.waiting),
            esc(&lag(h.lag_ms)),
            h.retrying_partitions,
            h.leased_partitions,
            h.blocked_partitions,
            num(h.dead_letters),
        );
        b.push_str(r#"<table class="partitions"><thead><tr><th>Partition</th><th>Head seq</th><th>Processed seq</th><th>Pending</th><th>Unsequenced</th><th>Lag</th><th>Attempts</th><th>Retry at</th><th>Lease</th><th>State</th><th>Last error</th><th>Dead</th><th></th></tr></thead><tbody>"#);
        let mut shown = 0;
        for p in h.partitions.iter().filter(|p| show_all || busy(p)) {
            shown += 1;
            let lease = p.lease.as_ref().map_or_else(String::new, |l| {
                format!(
                    "{}{} until {}",
                    esc(&l.owner),
                    if l.expired { " (expired)" } else { "" },
                    esc(&time(l.expires_at_ms))
                )
            });
            let state = if p.blocked {
                r#"<span class="badge bad">blocked</span>"#
            } else if p.retry_at_ms.is_some() {
                r#"<span class="badge warn">retrying</span>"#
            } else if p.pending > 0 {
                r#"<span class="badge">busy</span>"#
            } else {
                r#"<span class="badge ok">idle</span>"#
            };
            let mut actions = String::new();
            if acting && let Some(head) = p.head_seq {
                let base = format!("/queues/{qe}/handlers/{he}/partitions/{}", p.partition);
                let hidden = [("head_seq", head.to_string())];
                if p.blocked {
                    actions.push_str(&action_form(
                        d,
                        &format!("{base}/unblock"),
                        &hidden,
                        "Unblock",
                        &format!("unblock-{}-{}", h.name, p.partition),
                        false,
                    ));
                }
                actions.push_str(&action_form(
                    d,
                    &format!("{base}/skip-head"),
                    &hidden,
                    "Skip head",
                    &format!("skip-{}-{}", h.name, p.partition),
                    true,
                ));
            }
            let _ = write!(
                b,
                r#"<tr id="p-{hn}-{pn}" class="{cls}"><td class="n">{pn}</td><td class="n head-seq">{}</td><td class="n processed-seq">{}</td><td class="n pending">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n attempts">{}</td><td>{}</td><td>{lease}</td><td class="state">{state}</td><td class="err">{}</td><td class="n"><a href="{}">{}</a></td><td class="actions">{actions}</td></tr>"#,
                p.head_seq.map_or_else(|| "—".to_owned(), |s| s.to_string()),
                p.processed_seq,
                num(p.pending),
                num(p.unsequenced),
                esc(&lag(p.lag_ms)),
                p.attempts,
                p.retry_at_ms.map_or_else(String::new, |t| esc(&time(t))),
                esc(p.last_error.as_deref().unwrap_or("")),
                esc(&d.link(&format!(
                    "/dead-letters?queue={qe}&handler={he}&partition={}",
                    p.partition
                ))),
                num(p.dead_letters),
                hn = esc(&h.name),
                pn = p.partition,
                cls = if p.blocked { "blocked" } else { "" },
            );
        }
        if shown == 0 {
            b.push_str(r#"<tr><td colspan="13" class="muted">No busy partition.</td></tr>"#);
        }
        b.push_str("</tbody></table>");
        if acting && h.is_stale() {
            b.push_str(&action_form(
                d,
                &format!("/queues/{qe}/handlers/{he}/retire"),
                &[],
                "Retire this stale handler",
                &format!("retire-{}-{}", q.name, h.name),
                true,
            ));
        }
    }
    b
}

/// The dead-letter filter of a query or form: `queue`, `partition`, `handler` (empty = any).
pub(crate) fn filter_of(pairs: &[(String, String)]) -> Result<DeadLetterFilter, Refusal> {
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    };
    let mut f = DeadLetterFilter::all();
    if let Some(q) = get("queue") {
        outbox::validate_name("queue", q).map_err(|e| Refusal::bad_request(e.to_string()))?;
        f = f.queue(q);
    }
    if let Some(h) = get("handler") {
        outbox::validate_name("handler", h).map_err(|e| Refusal::bad_request(e.to_string()))?;
        f = f.handler(h);
    }
    if let Some(p) = get("partition") {
        let p = p.parse::<u32>().map_err(|_| {
            Refusal::bad_request(format!("partition `{p}` is not a partition number"))
        })?;
        f = f.partition(p);
    }
    Ok(f)
}

/// GET `/dead-letters`: filtered, paged by id.
pub(crate) async fn dead_letters(
    State(d): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let pairs = match query {
        Ok(Query(p)) => p,
        Err(e) => return refuse(&d, &headers, Refusal::bad_request(e.body_text())),
    };
    let filter = match filter_of(&pairs) {
        Ok(f) => f,
        Err(r) => return refuse(&d, &headers, r),
    };
    let after = match pairs
        .iter()
        .find(|(k, _)| k == "after")
        .map(|(_, v)| v.trim())
    {
        None | Some("") => 0,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n >= 0 => n,
            _ => {
                return refuse(
                    &d,
                    &headers,
                    Refusal::bad_request(format!("`after` must be a dead-letter id, not `{v}`")),
                );
            }
        },
    };
    let size = d.config.page_size;
    let (list, count) = match tokio::try_join!(
        d.outbox.dead_letters(&filter, after, size + 1),
        d.outbox.count_dead_letters(&filter)
    ) {
        Ok(r) => r,
        Err(e) => return refuse(&d, &headers, Refusal::from_engine(&e)),
    };
    let acting = logged_in(&d, &headers);
    let body = dead_letters_body(&d, &filter, after, &list, count, acting);
    page(&d, &headers, "Dead letters".to_owned(), body, false)
}

fn filter_query(f: &DeadLetterFilter) -> String {
    let mut q = Vec::new();
    if let Some(v) = &f.queue {
        q.push(format!("queue={}", enc(v)));
    }
    if let Some(p) = f.partition {
        q.push(format!("partition={p}"));
    }
    if let Some(v) = &f.handler {
        q.push(format!("handler={}", enc(v)));
    }
    q.join("&")
}

fn dead_letters_body(
    d: &Dashboard,
    f: &DeadLetterFilter,
    after: i64,
    list: &[DeadLetter],
    count: i64,
    acting: bool,
) -> String {
    let size = d.config.page_size as usize;
    let shown = &list[..list.len().min(size)];
    let mut b = format!(
        r#"<h1>Dead letters</h1><form method="get" class="filters" action="{}"><label>Queue<input type="text" name="queue" id="f-queue" value="{}"></label><label>Partition<input type="number" min="0" name="partition" id="f-partition" value="{}"></label><label>Handler<input type="text" name="handler" id="f-handler" value="{}"></label><button type="submit" id="f-apply">Filter</button> <a href="{}">clear</a></form><p><span id="dl-count">{}</span> matching dead letters{}.</p>"#,
        esc(&d.link("/dead-letters")),
        esc(f.queue.as_deref().unwrap_or("")),
        f.partition.map_or_else(String::new, |p| p.to_string()),
        esc(f.handler.as_deref().unwrap_or("")),
        esc(&d.link("/dead-letters")),
        count,
        if after > 0 {
            format!(" (this page: ids after {after})")
        } else {
            String::new()
        },
    );
    if acting {
        let _ = write!(
            b,
            r#"<form method="post" id="bulk" action="{}"><input type="hidden" name="csrf" value="{}"></form>"#,
            esc(&d.link("/dead-letters/bulk")),
            esc(&csrf_token(d))
        );
    }
    b.push_str(r#"<table id="dead-letters"><thead><tr><th></th><th>Id</th><th>Queue</th><th>Partition</th><th>Seq</th><th>Handler</th><th>Attempts</th><th>Failed at</th><th>Error</th></tr></thead><tbody>"#);
    if shown.is_empty() {
        b.push_str(r#"<tr><td colspan="9" class="muted">No dead letters.</td></tr>"#);
    }
    for dl in shown {
        let error: String = dl.last_error.chars().take(160).collect();
        let _ = write!(
            b,
            r#"<tr id="dl-{id}"><td>{}</td><td class="n"><a href="{}">{id}</a></td><td>{}</td><td class="n">{}</td><td class="n">{}</td><td>{}</td><td class="n">{}</td><td>{}</td><td class="err">{}</td></tr>"#,
            if acting {
                format!(
                    r#"<input type="checkbox" form="bulk" name="id" value="{}" id="sel-{}" aria-label="select {}">"#,
                    dl.id, dl.id, dl.id
                )
            } else {
                String::new()
            },
            esc(&d.link(&format!("/dead-letters/{}", dl.id))),
            esc(&dl.queue),
            dl.partition,
            dl.seq,
            esc(&dl.handler),
            dl.attempts,
            esc(&time(dl.failed_at_ms)),
            esc(&error),
            id = dl.id,
        );
    }
    b.push_str("</tbody></table>");
    let fq = filter_query(f);
    let sep = if fq.is_empty() { "" } else { "&" };
    b.push_str(r#"<p class="pager">"#);
    if after > 0 {
        let _ = write!(
            b,
            r#"<a href="{}" id="first-page">First page</a>"#,
            esc(&d.link(&format!("/dead-letters?{fq}")))
        );
    }
    if list.len() > size
        && let Some(last) = shown.last()
    {
        let _ = write!(
            b,
            r#"<a href="{}" id="next-page">Next page</a>"#,
            esc(&d.link(&format!("/dead-letters?{fq}{sep}after={}", last.id)))
        );
    }
    b.push_str("</p>");
    if acting && count > 0 {
        let _ = write!(
            b,
            r#"<div class="bulk"><button type="submit" form="bulk" name="action" value="replay" id="bulk-replay">Replay selected</button><button type="submit" form="bulk" name="action" value="discard" id="bulk-discard" class="danger">Discard selected</button></div>"#
        );
        let mut purge = format!(
            r#"<form method="post" class="bulk" action="{}"><input type="hidden" name="csrf" value="{}">"#,
            esc(&d.link("/dead-letters/purge")),
            esc(&csrf_token(d))
        );
        for (k, v) in [
            ("queue", f.queue.clone().unwrap_or_default()),
            (
                "partition",
                f.partition.map_or_else(String::new, |p| p.to_string()),
            ),
            ("handler", f.handler.clone().unwrap_or_default()),
        ] {
            let _ = write!(
                purge,
                r#"<input type="hidden" name="{k}" value="{}">"#,
                esc(&v)
            );
        }
        let _ = write!(
            purge,
            r#"<label><input type="checkbox" name="confirm" value="yes" id="purge-confirm"> delete all {count} matching dead letters for good</label><button type="submit" id="purge" class="danger">Purge matching</button></form>"#
        );
        b.push_str(&purge);
    }
    b
}

/// Parses a dead-letter id from the path.
pub(crate) fn parse_id(raw: &str) -> Result<i64, Refusal> {
    match raw.parse::<i64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(Refusal::bad_request(format!(
            "`{raw}` is not a dead-letter id"
        ))),
    }
}

/// GET `/dead-letters/{id}`.
pub(crate) async fn dead_letter(
    State(d): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Response {
    let dl = match parse_id(&raw) {
        Ok(id) => match d.outbox.dead_letter(id).await {
            Ok(dl) => dl,
            Err(e) => return refuse(&d, &headers, Refusal::from_engine(&e)),
        },
        Err(r) => return refuse(&d, &headers, r),
    };
    let acting = logged_in(&d, &headers);
    let payload = if d.config.show_payloads {
        let (kind, text) = render_payload(&dl.payload);
        format!(
            r#"<h2>Payload <span class="muted">({kind}, {} bytes)</span></h2><pre id="payload">{}</pre>"#,
            dl.payload.len(),
            esc(&text)
        )
    } else {
        format!(
            r#"<h2>Payload</h2><p id="payload-hidden" class="muted">Payloads are hidden by the dashboard's configuration ({} bytes).</p>"#,
            dl.payload.len()
        )
    };
    // Header names always; values only where payloads are shown (they may carry as much as
    // the payload does).
    let header_rows: String = dl
        .headers
        .iter()
        .map(|(name, value)| {
            let value = if d.config.show_payloads {
                esc(value)
            } else {
                r#"<span class="muted">hidden</span>"#.to_owned()
            };
            format!("<dt>{}</dt><dd>{value}</dd>", esc(name))
        })
        .collect();
    let headers_html = if header_rows.is_empty() {
        r#"<h2>Headers</h2><p id="headers" class="muted">none</p>"#.to_owned()
    } else {
        format!(r#"<h2>Headers</h2><dl class="meta" id="headers">{header_rows}</dl>"#)
    };
    let actions = if acting {
        format!(
            r#"<p>{} {}</p>"#,
            action_form(
                &d,
                &format!("/dead-letters/{}/replay", dl.id),
                &[],
                "Replay",
                "replay",
                false
            ),
            action_form(
                &d,
                &format!("/dead-letters/{}/discard", dl.id),
                &[],
                "Discard",
                "discard",
                true
            )
        )
    } else {
        String::new()
    };
    let body = format!(
        r#"<h1>Dead letter <span id="dl-id">{id}</span></h1>{actions}<dl class="meta"><dt>Queue</dt><dd><a href="{ql}">{q}</a></dd><dt>Partition</dt><dd>{p}</dd><dt>Seq</dt><dd>{seq}</dd><dt>Handler</dt><dd id="dl-handler">{h}</dd><dt>Attempts</dt><dd id="dl-attempts">{a}</dd><dt>Enqueued at</dt><dd>{en}</dd><dt>Dead-lettered at</dt><dd>{fa}</dd></dl><h2>Last error</h2><pre id="error">{err}</pre>{headers_html}{payload}"#,
        id = dl.id,
        ql = esc(&d.link(&format!("/queues/{}", enc(&dl.queue)))),
        q = esc(&dl.queue),
        p = dl.partition,
        seq = dl.seq,
        h = esc(&dl.handler),
        a = dl.attempts,
        en = esc(&time(dl.enqueued_at_ms)),
        fa = esc(&time(dl.failed_at_ms)),
        err = esc(&dl.last_error),
    );
    page(&d, &headers, format!("Dead letter {}", dl.id), body, false)
}

/// A payload as pretty JSON when it parses, else as a hex dump; truncated past 64 KiB.
pub(crate) fn render_payload(bytes: &[u8]) -> (&'static str, String) {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes)
        && let Ok(pretty) = serde_json::to_string_pretty(&v)
    {
        return ("JSON", pretty);
    }
    let shown = &bytes[..bytes.len().min(MAX_SHOWN_PAYLOAD)];
    let mut out = String::new();
    for (i, chunk) in shown.chunks(16).enumerate() {
        let _ = write!(out, "{:08x}  ", i * 16);
        for j in 0..16 {
            match chunk.get(j) {
                Some(b) => {
                    let _ = write!(out, "{b:02x} ");
                }
                None => out.push_str("   "),
            }
        }
        out.push_str(" |");
        out.extend(chunk.iter().map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                char::from(b)
            } else {
                '.'
            }
        }));
        out.push_str("|\n");
    }
    if bytes.len() > shown.len() {
        let _ = write!(out, "… {} more bytes not shown", bytes.len() - shown.len());
    }
    ("hex", out)
}

/// GET `/login`.
pub(crate) async fn login(
    State(d): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if !d.config.actions_enabled() {
        let why = if d.config.read_only {
            "the dashboard is read-only"
        } else {
            "actions are disabled: the dashboard was started without a token"
        };
        return refuse(&d, &headers, Refusal::forbidden(why));
    }
    let next = query
        .ok()
        .and_then(|Query(q)| q.into_iter().find(|(k, _)| k == "next").map(|(_, v)| v))
        .unwrap_or_else(|| d.link("/"));
    let body = format!(
        r#"<h1>Log in</h1><p>Enter the dashboard token to replay, discard and purge dead letters, unblock partitions, skip heads and retire handlers.</p><form method="post" action="{}"><input type="hidden" name="next" value="{}"><label>Token <input type="password" name="token" id="token" autocomplete="current-password" autofocus></label> <button type="submit" id="login-submit">Log in</button></form>"#,
        esc(&d.link("/login")),
        esc(&next)
    );
    page(&d, &headers, "Log in".to_owned(), body, false)
}

/// Fallback: a page for every unknown path.
pub(crate) async fn not_found(State(d): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    refuse(
        &d,
        &headers,
        Refusal::not_found(format!("there is no page at {}", uri.path())),
    )
}

/// GET on an action's address: actions are form submissions only.
pub(crate) async fn post_only(State(d): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    refuse(
        &d,
        &headers,
        Refusal {
            status: StatusCode::METHOD_NOT_ALLOWED,
            title: "Method not allowed",
            detail: format!(
                "{} is an action: it runs only from the dashboard's buttons (POST)",
                uri.path()
            ),
        },
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    r
}

/// The embedded stylesheet.
pub(crate) async fn css() -> Response {
    asset("text/css; charset=utf-8", include_str!("../assets/app.css"))
}

/// The embedded live-refresh script.
pub(crate) async fn js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("../assets/app.js"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_render_as_pretty_json_or_hex() {
        let (kind, text) = render_payload(br#"{"a":1,"b":[true]}"#);
        assert_eq!(kind, "JSON");
        assert!(text.contains("\"a\": 1"), "{text}");
        let (kind, text) = render_payload(&[0, 1, b'A', 0xff]);
        assert_eq!(kind, "hex");
        assert_eq!(
            text,
            "00000000  00 01 41 ff                                      |..A.|\n"
        );
        let big = vec![0u8; MAX_SHOWN_PAYLOAD + 5];
        assert!(render_payload(&big).1.ends_with("5 more bytes not shown"));
    }

    #[test]
    fn filters_refuse_bad_input() {
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect()
        };
        let f = filter_of(&pairs(&[
            ("queue", "orders"),
            ("partition", "3"),
            ("handler", ""),
        ]))
        .expect("valid");
        assert_eq!(f, DeadLetterFilter::all().queue("orders").partition(3));
        assert!(filter_of(&pairs(&[("partition", "-1")])).is_err());
        assert!(filter_of(&pairs(&[("queue", "x'; DROP")])).is_err());
        assert!(parse_id("0").is_err());
        assert!(parse_id("abc").is_err());
        assert_eq!(parse_id("42").ok(), Some(42));
    }
}
