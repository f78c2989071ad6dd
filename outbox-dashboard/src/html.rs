//! HTML helpers: escaping, the page layout, error pages, number and time formatting.

use std::fmt::Write as _;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::Dashboard;

/// Escapes text for HTML content and quoted attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query parameter value.
pub(crate) fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A whole page, or only its `<main>` content when the live-refresh script asks for it.
pub(crate) struct Page<'a> {
    pub(crate) title: String,
    pub(crate) body: String,
    /// Refreshes itself (overview and queue pages).
    pub(crate) live: bool,
    pub(crate) fragment: bool,
    pub(crate) status: StatusCode,
    pub(crate) dashboard: &'a Dashboard,
    pub(crate) logged_in: bool,
}

impl Page<'_> {
    pub(crate) fn render(self) -> Response {
        if self.fragment {
            return respond(self.status, self.body);
        }
        let d = self.dashboard;
        let c = &d.config;
        let mode = if c.read_only {
            r#"<span class="badge ro">read-only</span>"#.to_owned()
        } else if c.token.is_none() {
            r#"<span class="badge ro" title="start with a token to enable actions">view only: no token configured</span>"#.to_owned()
        } else if self.logged_in {
            format!(
                r#"<form method="post" action="{}" class="inline"><input type="hidden" name="csrf" value="{}"><button type="submit" id="logout">Log out</button></form>"#,
                esc(&d.link("/logout")),
                esc(&crate::security::csrf_token(d))
            )
        } else {
            format!(
                r#"<a href="{}" id="login">Log in to act</a>"#,
                esc(&d.link("/login"))
            )
        };
        let refresh = if self.live {
            format!(r#" data-refresh="{}""#, c.refresh.as_secs().max(1))
        } else {
            String::new()
        };
        let pause = if self.live {
            r#"<label class="pause"><input type="checkbox" id="pause"> pause refresh</label>"#
        } else {
            ""
        };
        let html = format!(
            r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · outbox</title><link rel="stylesheet" href="{css}"><script src="{js}" defer></script></head>
<body><header><a class="brand" href="{home}">outbox</a><nav><a href="{home}">Overview</a><a href="{dead}">Dead letters</a></nav>{pause}<span class="mode">{mode}</span></header>
<main{refresh}>{body}</main></body></html>"#,
            title = esc(&self.title),
            css = esc(&d.link("/assets/app.css")),
            js = esc(&d.link("/assets/app.js")),
            home = esc(&d.link("/")),
            dead = esc(&d.link("/dead-letters")),
            body = self.body,
        );
        respond(self.status, html)
    }
}

/// An HTML response with the dashboard's security headers.
pub(crate) fn respond(status: StatusCode, html: String) -> Response {
    let mut r = (status, html).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Why a request was refused: a page with a 4xx or 5xx status that says what happened and that
/// nothing changed.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    pub(crate) title: &'static str,
    pub(crate) detail: String,
}

impl Refusal {
    pub(crate) fn bad_request(detail: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            title: "Bad request",
            detail: detail.into(),
        }
    }

    pub(crate) fn not_found(detail: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::NOT_FOUND,
            title: "Not found",
            detail: detail.into(),
        }
    }

    pub(crate) fn forbidden(detail: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::FORBIDDEN,
            title: "Forbidden",
            detail: detail.into(),
        }
    }

    pub(crate) fn too_many(detail: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::TOO_MANY_REQUESTS,
            title: "Too many attempts",
            detail: detail.into(),
        }
    }

    /// Maps an engine error to a status: bad names 400, unknown things 404, a head that moved
    /// or a handler still served 409, anything else 500.
    pub(crate) fn from_engine(e: &outbox::Error) -> Self {
        use outbox::Error as E;
        let (status, title) = match e {
            E::InvalidName(_) => (StatusCode::BAD_REQUEST, "Bad request"),
            E::UnknownQueue(_)
            | E::DeadLetterNotFound(_)
            | E::CursorNotFound { .. }
            | E::HandlerNotFound { .. } => (StatusCode::NOT_FOUND, "Not found"),
            E::HeadMoved { .. }
            | E::HeadLeased { .. }
            | E::NotBlocked { .. }
            | E::HandlerInUse { .. } => (StatusCode::CONFLICT, "Conflict"),
            E::SchemaOutdated { .. } => (StatusCode::SERVICE_UNAVAILABLE, "Schema outdated"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "Error"),
        };
        let mut detail = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            let _ = write!(detail, ": {s}");
            source = s.source();
        }
        Refusal {
            status,
            title,
            detail,
        }
    }

    pub(crate) fn page(self, dashboard: &Dashboard, logged_in: bool) -> Response {
        let body = format!(
            r#"<section class="refusal"><h1 id="refusal">{status} {title}</h1><p class="detail">{detail}</p><p>Nothing was changed.</p><p><a href="{home}">Back to the overview</a></p></section>"#,
            status = self.status.as_u16(),
            title = self.title,
            detail = esc(&self.detail),
            home = esc(&dashboard.link("/")),
        );
        Page {
            title: format!("{} {}", self.status.as_u16(), self.title),
            body,
            live: false,
            fragment: false,
            status: self.status,
            dashboard,
            logged_in,
        }
        .render()
    }
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS.mmm UTC`.
pub(crate) fn time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
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
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{milli:03} UTC",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// A duration in milliseconds, short: `850 ms`, `12.3 s`, `4 min 10 s`, `3 h 2 min`.
pub(crate) fn dur(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000)
    } else {
        format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(enc("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }

    #[test]
    fn formats_times_and_durations() {
        assert_eq!(time(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(time(1_709_251_199_999), "2024-02-29 23:59:59.999 UTC");
        assert_eq!(time(-1), "1969-12-31 23:59:59.999 UTC");
        assert_eq!(dur(850), "850 ms");
        assert_eq!(dur(12_345), "12.3 s");
        assert_eq!(dur(250_000), "4 min 10 s");
        assert_eq!(dur(10_920_000), "3 h 2 min");
    }
}
