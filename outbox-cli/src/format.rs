//! Text and JSON rendering of statuses and dead letters.

use std::fmt::Write;

use outbox::{DeadLetter, Status};
use serde_json::json;

/// An error and its sources on one line.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let _ = write!(s, ": {inner}");
        cur = inner.source();
    }
    s
}

/// A table with left-aligned columns separated by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            let _ = write!(l, "{c:<w$}", w = widths[i]);
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, &mut header.iter().copied());
    for r in rows {
        line(&mut out, &mut r.iter().map(String::as_str));
    }
    out
}

/// A duration in milliseconds as `850ms`, `12.3s`, `4m05s`, `2h03m`, `3d04h`.
pub(crate) fn age(ms: Option<i64>) -> String {
    let Some(ms) = ms else {
        return "-".to_owned();
    };
    let s = ms / 1000;
    if ms < 1000 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600)
    }
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS.mmm UTC`.
pub(crate) fn timestamp(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03} UTC",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        flat
    } else {
        let mut t: String = flat.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// The status as tables: queues, handlers, then the partitions worth looking at.
pub(crate) fn status(s: &Status, all_partitions: bool) -> String {
    let mut out = String::new();
    if s.queues.is_empty() {
        out.push_str("no queues registered\n");
        return out;
    }
    let rows: Vec<Vec<String>> = s
        .queues
        .iter()
        .flat_map(|q| {
            let queue_row = (q.handlers.is_empty()).then(|| {
                vec![
                    q.name.clone(),
                    q.partitions.to_string(),
                    q.unsequenced.to_string(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    q.dead_letters.to_string(),
                ]
            });
            queue_row.into_iter().chain(q.handlers.iter().map(|h| {
                let name = match h.stale_for_ms {
                    Some(ms) => format!("{}/{} (stale {})", q.name, h.name, age(Some(ms))),
                    None => format!("{}/{}", q.name, h.name),
                };
                vec![
                    name,
                    q.partitions.to_string(),
                    q.unsequenced.to_string(),
                    h.waiting.to_string(),
                    age(h.lag_ms),
                    h.retrying_partitions.to_string(),
                    h.leased_partitions.to_string(),
                    h.blocked_partitions.to_string(),
                    h.dead_letters.to_string(),
                ]
            }))
        })
        .collect();
    out.push_str(&table(
        &[
            "QUEUE/HANDLER",
            "PARTITIONS",
            "UNSEQUENCED",
            "WAITING",
            "LAG",
            "RETRYING",
            "LEASED",
            "BLOCKED",
            "DEAD",
        ],
        &rows,
    ));

    let mut parts = Vec::new();
    for q in &s.queues {
        for h in &q.handlers {
            for p in &h.partitions {
                let busy = p.unsequenced > 0
                    || p.pending > 0
                    || p.blocked
                    || p.attempts > 0
                    || p.lease.is_some()
                    || p.dead_letters > 0;
                if !(busy || all_partitions) {
                    continue;
                }
                let state = if p.blocked {
                    "BLOCKED".to_owned()
                } else if let Some(at) = p.retry_at_ms {
                    format!("retry in {}", age(Some(at - s.taken_at_ms)))
                } else if let Some(l) = &p.lease {
                    if l.expired {
                        format!("lease expired ({})", l.owner)
                    } else {
                        format!(
                            "leased by {} for {}",
                            l.owner,
                            age(Some(l.expires_at_ms - s.taken_at_ms))
                        )
                    }
                } else if p.pending + p.unsequenced > 0 {
                    "waiting".to_owned()
                } else {
                    "idle".to_owned()
                };
                parts.push(vec![
                    format!("{}/{}", q.name, h.name),
                    p.partition.to_string(),
                    p.head_seq.map_or_else(|| "-".to_owned(), |s| s.to_string()),
                    (p.pending + p.unsequenced).to_string(),
                    age(p.lag_ms),
                    p.attempts.to_string(),
                    p.dead_letters.to_string(),
                    state,
                    p.last_error
                        .as_deref()
                        .map(|e| one_line(e, 60))
                        .unwrap_or_default(),
                ]);
            }
        }
    }
    out.push('\n');
    if parts.is_empty() {
        out.push_str("every partition is idle\n");
    } else {
        out.push_str(&table(
            &[
                "QUEUE/HANDLER",
                "PARTITION",
                "HEAD",
                "WAITING",
                "LAG",
                "ATTEMPTS",
                "DEAD",
                "STATE",
                "LAST ERROR",
            ],
            &parts,
        ));
    }
    let blocked = s.blocked();
    if !blocked.is_empty() {
        let _ = writeln!(
            out,
            "\n{} blocked partition(s): fix the cause, then `outbox unblock` or `outbox skip-head` them \
             with the HEAD shown (`--head-seq`)",
            blocked.len()
        );
    }
    for q in s.queues.iter().filter(|q| q.scheduled > 0) {
        let next = q.next_due_at_ms.map_or_else(String::new, |d| {
            if d <= s.taken_at_ms {
                ", next due now".to_owned()
            } else {
                format!(", next due in {}", age(Some(d - s.taken_at_ms)))
            }
        });
        let _ = writeln!(
            out,
            "\n{}: {}{} scheduled message(s){next} (cancel with `Outbox::cancel_scheduled`)",
            q.name,
            if q.scheduled_capped { "more than " } else { "" },
            q.scheduled
        );
    }
    let stale: Vec<String> = s
        .queues
        .iter()
        .flat_map(|q| {
            q.handlers
                .iter()
                .filter(|h| h.is_stale())
                .map(move |h| format!("{}/{}", q.name, h.name))
        })
        .collect();
    if !stale.is_empty() {
        let _ = writeln!(
            out,
            "\n{} stale handler(s), served by no running process: {}; if removed for good, \
             `outbox retire QUEUE HANDLER` lets vacuum move on",
            stale.len(),
            stale.join(", ")
        );
    }
    out
}

fn payload_text(p: &[u8]) -> Option<&str> {
    std::str::from_utf8(p).ok()
}

fn hex(p: &[u8]) -> String {
    p.iter()
        .fold(String::with_capacity(p.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A dead letter as JSON; the payload as text when it is UTF-8, else as hex.
pub(crate) fn dead_letter_json(d: &DeadLetter) -> serde_json::Value {
    let mut v = json!({
        "id": d.id,
        "queue": d.queue,
        "partition": d.partition,
        "seq": d.seq,
        "handler": d.handler,
        "attempts": d.attempts,
        "last_error": d.last_error,
        "enqueued_at_ms": d.enqueued_at_ms,
        "failed_at_ms": d.failed_at_ms,
        "headers": d.headers.iter().collect::<std::collections::BTreeMap<_, _>>(),
    });
    match payload_text(&d.payload) {
        Some(t) => v["payload"] = json!(t),
        None => v["payload_hex"] = json!(hex(&d.payload)),
    }
    v
}

/// Dead letters as a table.
pub(crate) fn dead_letter_table(list: &[DeadLetter]) -> String {
    if list.is_empty() {
        return "no dead letters\n".to_owned();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|d| {
            vec![
                d.id.to_string(),
                d.queue.clone(),
                d.partition.to_string(),
                d.seq.to_string(),
                d.handler.clone(),
                d.attempts.to_string(),
                timestamp(d.failed_at_ms),
                one_line(&d.last_error, 60),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "QUEUE",
            "PARTITION",
            "SEQ",
            "HANDLER",
            "ATTEMPTS",
            "FAILED AT",
            "LAST ERROR",
        ],
        &rows,
    )
}

/// One dead letter in full.
pub(crate) fn dead_letter_detail(d: &DeadLetter) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "id:          {}", d.id);
    let _ = writeln!(out, "queue:       {}", d.queue);
    let _ = writeln!(out, "partition:   {}", d.partition);
    let _ = writeln!(out, "seq:         {}", d.seq);
    let _ = writeln!(out, "handler:     {}", d.handler);
    let _ = writeln!(out, "attempts:    {}", d.attempts);
    let _ = writeln!(out, "enqueued at: {}", timestamp(d.enqueued_at_ms));
    let _ = writeln!(out, "failed at:   {}", timestamp(d.failed_at_ms));
    let _ = writeln!(out, "last error:  {}", d.last_error);
    if d.headers.is_empty() {
        let _ = writeln!(out, "headers:     (none)");
    } else {
        let _ = writeln!(out, "headers:");
        for (name, value) in d.headers.iter() {
            let _ = writeln!(out, "  {name}: {value}");
        }
    }
    match payload_text(&d.payload) {
        Some(t) => {
            let _ = writeln!(out, "payload ({} bytes):\n{t}", d.payload.len());
        }
        None => {
            let _ = writeln!(
                out,
                "payload ({} bytes, hex):\n{}",
                d.payload.len(),
                hex(&d.payload)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_ages() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(timestamp(951_782_400_123), "2000-02-29 00:00:00.123 UTC");
        assert_eq!(timestamp(1_795_525_490_571), "2026-11-24 13:04:50.571 UTC");
        assert_eq!(age(None), "-");
        assert_eq!(age(Some(850)), "850ms");
        assert_eq!(age(Some(12_345)), "12.3s");
        assert_eq!(age(Some(245_000)), "4m05s");
        assert_eq!(age(Some(7_380_000)), "2h03m");
        assert_eq!(age(Some(3 * 86_400_000 + 4 * 3_600_000)), "3d04h");
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A     BB\nlong  x\n");
    }
}
