//! Who may act: the login cookie, the CSRF token and the same-origin check.
//!
//! Both the cookie value and the CSRF token are HMAC-SHA256 tags of fixed labels under a
//! secret drawn at random when the router is built, so they are worthless to another process
//! and after a restart. The configured token itself is never stored in the browser.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::Dashboard;
use crate::html::Refusal;

/// Name of the login cookie.
pub(crate) const COOKIE: &str = "outbox_dashboard";

type HmacSha256 = Hmac<Sha256>;

/// Failed logins accepted per [`LOGIN_WINDOW`] before the form refuses every attempt (with
/// 429) until the oldest failure leaves the window.
pub(crate) const MAX_FAILED_LOGINS: usize = 10;
/// The window over which failed logins are counted.
pub(crate) const LOGIN_WINDOW: Duration = Duration::from_secs(60);

/// Failed logins of the last [`LOGIN_WINDOW`], for the whole process: guessing the token
/// costs at least six seconds per attempt. Counted per process, not per client address, which
/// a router nested in another application may not know; an operator locked out by someone
/// guessing waits at most a minute.
#[derive(Debug, Default)]
pub(crate) struct LoginLimiter {
    failures: VecDeque<Instant>,
}

impl LoginLimiter {
    /// `Err(wait)` while the limit is reached: how long until an attempt is accepted again.
    pub(crate) fn check(&mut self, now: Instant) -> Result<(), Duration> {
        while self
            .failures
            .front()
            .is_some_and(|&t| now.duration_since(t) >= LOGIN_WINDOW)
        {
            self.failures.pop_front();
        }
        match self.failures.front() {
            Some(&oldest) if self.failures.len() >= MAX_FAILED_LOGINS => {
                Err(LOGIN_WINDOW.saturating_sub(now.duration_since(oldest)))
            }
            _ => Ok(()),
        }
    }

    /// Records a failed attempt.
    pub(crate) fn failed(&mut self, now: Instant) {
        self.failures.push_back(now);
    }
}

fn mac(d: &Dashboard) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail for a 32-byte key.
    match HmacSha256::new_from_slice(&d.secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    }
}

fn tag(d: &Dashboard, label: &[u8]) -> Vec<u8> {
    let mut m = mac(d);
    m.update(label);
    m.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// Checks `given` against the tag of `label` in constant time.
fn verify(d: &Dashboard, label: &[u8], given: &str) -> bool {
    let Some(bytes) = unhex(given) else {
        return false;
    };
    let mut m = mac(d);
    m.update(label);
    m.verify_slice(&bytes).is_ok()
}

/// The value of the login cookie.
pub(crate) fn session_value(d: &Dashboard) -> String {
    hex(&tag(d, b"session"))
}

/// The CSRF token every action form carries.
pub(crate) fn csrf_token(d: &Dashboard) -> String {
    hex(&tag(d, b"csrf"))
}

/// Whether `given` is the configured token (compared as HMAC tags, in constant time).
pub(crate) fn token_matches(d: &Dashboard, given: &str) -> bool {
    let Some(token) = &d.config.token else {
        return false;
    };
    let expected = {
        let mut m = mac(d);
        m.update(b"token:");
        m.update(token.as_bytes());
        m.finalize().into_bytes()
    };
    let mut m = mac(d);
    m.update(b"token:");
    m.update(given.as_bytes());
    m.verify_slice(&expected).is_ok()
}

/// Whether the request carries a valid login cookie (and actions are enabled at all).
pub(crate) fn logged_in(d: &Dashboard, headers: &HeaderMap) -> bool {
    if !d.config.actions_enabled() {
        return false;
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .any(|(k, v)| k == COOKIE && verify(d, b"session", v))
}

/// Refuses a request that a browser marked as coming from another site or origin.
pub(crate) fn same_origin(headers: &HeaderMap) -> Result<(), Refusal> {
    let get = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return Err(Refusal::forbidden(format!(
            "cross-site request refused (Sec-Fetch-Site: {site})"
        )));
    }
    let host = get(header::HOST);
    let claimed = get(header::ORIGIN).or_else(|| get(header::REFERER));
    if let Some(origin) = claimed {
        let origin_host = origin
            .split_once("://")
            .map(|(_, rest)| rest.split('/').next().unwrap_or(""));
        if origin_host.is_none() || origin_host != host {
            return Err(Refusal::forbidden(format!(
                "cross-origin request refused (from {origin})"
            )));
        }
    }
    Ok(())
}

/// Checks that an action may run: actions enabled, same origin, logged in, CSRF token valid.
pub(crate) fn authorize(
    d: &Dashboard,
    headers: &HeaderMap,
    form: &[(String, String)],
) -> Result<(), Refusal> {
    if d.config.read_only {
        return Err(Refusal::forbidden("the dashboard is read-only"));
    }
    if d.config.token.is_none() {
        return Err(Refusal::forbidden(
            "actions are disabled: the dashboard was started without a token",
        ));
    }
    same_origin(headers)?;
    if !logged_in(d, headers) {
        return Err(Refusal::forbidden("log in before acting"));
    }
    let csrf = form
        .iter()
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v.as_str());
    match csrf {
        Some(t) if verify(d, b"csrf", t) => Ok(()),
        _ => Err(Refusal::forbidden(
            "missing or invalid CSRF token: reload the page and try again",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dashboard(token: Option<&str>) -> Dashboard {
        let config = match token {
            Some(t) => crate::Config::new().token(t),
            None => crate::Config::new(),
        };
        Dashboard {
            outbox: unreachable_outbox(),
            logins: std::sync::Mutex::default(),
            samples: std::sync::Mutex::new(crate::samples::Samples::new(config.window)),
            config,
            secret: rand::random(),
        }
    }

    fn unreachable_outbox() -> outbox::Outbox {
        // A connect-lazily SQLite outbox: these tests never touch the database.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let db = outbox::sea_orm::Database::connect("sqlite::memory:")
                .await
                .expect("sqlite");
            outbox::Outbox::admin(db, outbox::DEFAULT_TABLE_PREFIX).expect("admin")
        })
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().expect("header value"));
        }
        h
    }

    #[test]
    fn tokens_verify_only_for_this_process() {
        let a = dashboard(Some("s3cret"));
        let b = dashboard(Some("s3cret"));
        assert!(token_matches(&a, "s3cret"));
        assert!(!token_matches(&a, "s3cre"));
        assert!(!token_matches(&a, ""));
        assert!(verify(&a, b"csrf", &csrf_token(&a)));
        assert!(
            !verify(&b, b"csrf", &csrf_token(&a)),
            "another process's token"
        );
        assert!(!verify(&a, b"csrf", "zz"));
        assert!(!verify(&a, b"session", &csrf_token(&a)), "labels differ");
    }

    #[test]
    fn actions_need_login_csrf_and_same_origin() {
        let d = dashboard(Some("s3cret"));
        let cookie = format!("other=1; {COOKIE}={}", session_value(&d));
        let good = vec![("csrf".to_owned(), csrf_token(&d))];
        let ok = headers(&[
            ("host", "127.0.0.1:9000"),
            ("origin", "http://127.0.0.1:9000"),
            ("cookie", &cookie),
        ]);
        assert!(authorize(&d, &ok, &good).is_ok());
        assert!(authorize(&d, &ok, &[]).is_err(), "no CSRF token");
        let foreign = headers(&[
            ("host", "127.0.0.1:9000"),
            ("origin", "http://evil.example"),
            ("cookie", &cookie),
        ]);
        assert!(authorize(&d, &foreign, &good).is_err());
        let cross = headers(&[
            ("host", "127.0.0.1:9000"),
            ("sec-fetch-site", "cross-site"),
            ("cookie", &cookie),
        ]);
        assert!(authorize(&d, &cross, &good).is_err());
        let anonymous = headers(&[("host", "127.0.0.1:9000")]);
        assert!(authorize(&d, &anonymous, &good).is_err(), "not logged in");

        let no_token = dashboard(None);
        assert!(authorize(&no_token, &ok, &good).is_err());
        let mut ro = dashboard(Some("s3cret"));
        ro.config.read_only = true;
        let cookie = format!("{COOKIE}={}", session_value(&ro));
        let h = headers(&[("host", "h"), ("cookie", &cookie)]);
        let csrf = vec![("csrf".to_owned(), csrf_token(&ro))];
        assert!(authorize(&ro, &h, &csrf).is_err(), "read-only refuses");
    }

    #[test]
    fn failed_logins_are_limited_per_window() {
        let mut l = LoginLimiter::default();
        let t0 = Instant::now();
        for i in 0..MAX_FAILED_LOGINS {
            assert_eq!(l.check(t0), Ok(()), "attempt {i} is accepted");
            l.failed(t0);
        }
        let wait = l.check(t0 + Duration::from_secs(10));
        assert_eq!(wait, Err(Duration::from_secs(50)), "the next one waits");
        assert_eq!(
            l.check(t0 + LOGIN_WINDOW),
            Ok(()),
            "accepted once the failures left the window"
        );
    }
}
