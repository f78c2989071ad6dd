//! The actions: every one a `POST` that passes [`authorize`] first, validates all its input
//! before changing anything, and answers with a page saying what changed (or a 4xx page saying
//! nothing did).

use std::fmt::Write as _;

use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::html::{Page, Refusal, enc, esc};
use crate::pages::{filter_of, parse_id};
use crate::security::{COOKIE, authorize, same_origin, session_value, token_matches};
use crate::{AppState, Dashboard};

type FormBody = Result<Form<Vec<(String, String)>>, FormRejection>;

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The page after an action that changed something.
fn done(d: &Dashboard, message: &str, back: &str, back_label: &str) -> Response {
    let body = format!(
        r#"<section class="done"><h1 id="done">Done</h1><p id="done-detail">{}</p><p><a href="{}" id="back">{}</a> · <a href="{}">Overview</a></p></section>"#,
        esc(message),
        esc(&d.link(back)),
        esc(back_label),
        esc(&d.link("/")),
    );
    Page {
        title: "Done".to_owned(),
        body,
        live: false,
        fragment: false,
        status: StatusCode::OK,
        dashboard: d,
        logged_in: true,
    }
    .render()
}

/// Runs `act` if the request may act and its form parses; otherwise the refusal page.
async fn guarded<F, Fut>(d: &Dashboard, headers: &HeaderMap, form: FormBody, act: F) -> Response
where
    F: FnOnce(Vec<(String, String)>) -> Fut,
    Fut: Future<Output = Result<Response, Refusal>>,
{
    let logged = crate::security::logged_in(d, headers);
    let form = match form {
        Ok(Form(f)) => f,
        Err(e) => {
            // Still say "forbidden" first when the request may not act at all.
            if let Err(r) = authorize(d, headers, &[]) {
                return r.page(d, logged);
            }
            return Refusal::bad_request(format!("malformed form: {}", e.body_text()))
                .page(d, logged);
        }
    };
    if let Err(r) = authorize(d, headers, &form) {
        return r.page(d, logged);
    }
    match act(form).await {
        Ok(r) => r,
        Err(r) => r.page(d, logged),
    }
}

fn engine(e: &outbox::Error) -> Refusal {
    Refusal::from_engine(e)
}

/// POST `/dead-letters/{id}/replay`.
pub(crate) async fn replay(
    State(d): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    form: FormBody,
) -> Response {
    guarded(&d, &headers, form, |_| async {
        let id = parse_id(&raw)?;
        d.outbox
            .replay_dead_letter(id)
            .await
            .map_err(|e| engine(&e))?;
        Ok(done(
            &d,
            &format!("Dead letter {id} was put back at the tail of its partition."),
            "/dead-letters",
            "Dead letters",
        ))
    })
    .await
}

/// POST `/dead-letters/{id}/discard`.
pub(crate) async fn discard(
    State(d): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    form: FormBody,
) -> Response {
    guarded(&d, &headers, form, |_| async {
        let id = parse_id(&raw)?;
        d.outbox
            .discard_dead_letter(id)
            .await
            .map_err(|e| engine(&e))?;
        Ok(done(
            &d,
            &format!("Dead letter {id} was discarded."),
            "/dead-letters",
            "Dead letters",
        ))
    })
    .await
}

/// POST `/dead-letters/bulk`: `action=replay|discard` and one `id` per selected dead letter.
pub(crate) async fn bulk(
    State(d): State<AppState>,
    headers: HeaderMap,
    form: FormBody,
) -> Response {
    let d = &*d;
    guarded(d, &headers, form, |form| async move {
        let replay = match field(&form, "action") {
            Some("replay") => true,
            Some("discard") => false,
            other => {
                return Err(Refusal::bad_request(format!(
                    "unknown bulk action `{}`; expected `replay` or `discard`",
                    other.unwrap_or("")
                )));
            }
        };
        // Every id must parse before anything changes.
        let ids = form
            .iter()
            .filter(|(k, _)| k == "id")
            .map(|(_, v)| parse_id(v))
            .collect::<Result<Vec<_>, _>>()?;
        if ids.is_empty() {
            return Err(Refusal::bad_request("select at least one dead letter"));
        }
        let (mut changed, mut missing) = (Vec::new(), Vec::new());
        for id in ids {
            let r = if replay {
                d.outbox.replay_dead_letter(id).await
            } else {
                d.outbox.discard_dead_letter(id).await
            };
            match r {
                Ok(()) => changed.push(id),
                Err(outbox::Error::DeadLetterNotFound(id)) => missing.push(id),
                Err(e) => {
                    let mut r = engine(&e);
                    if !changed.is_empty() {
                        r.detail = format!(
                            "{} (dead letters {changed:?} were already {} before this error)",
                            r.detail,
                            if replay { "replayed" } else { "discarded" }
                        );
                    }
                    return Err(r);
                }
            }
        }
        let mut msg = format!(
            "{} {} dead letter(s): {changed:?}.",
            if replay { "Replayed" } else { "Discarded" },
            changed.len()
        );
        if !missing.is_empty() {
            let _ = write!(msg, " Not found (already gone): {missing:?}.");
        }
        Ok(done(d, &msg, "/dead-letters", "Dead letters"))
    })
    .await
}

/// POST `/dead-letters/purge`: the filter's fields and `confirm=yes`.
pub(crate) async fn purge(
    State(d): State<AppState>,
    headers: HeaderMap,
    form: FormBody,
) -> Response {
    let d = &*d;
    guarded(d, &headers, form, |form| async move {
        let filter = filter_of(&form)?;
        if field(&form, "confirm") != Some("yes") {
            return Err(Refusal::bad_request(
                "tick the confirmation box to purge dead letters",
            ));
        }
        let n = d
            .outbox
            .purge_dead_letters(&filter)
            .await
            .map_err(|e| engine(&e))?;
        Ok(done(
            d,
            &format!("Purged {n} dead letter(s)."),
            "/dead-letters",
            "Dead letters",
        ))
    })
    .await
}

fn head_seq(form: &[(String, String)]) -> Result<i64, Refusal> {
    let raw = field(form, "head_seq").unwrap_or("");
    raw.trim()
        .parse::<i64>()
        .map_err(|_| Refusal::bad_request(format!("`head_seq` must be a sequence, not `{raw}`")))
}

fn partition(raw: &str) -> Result<u32, Refusal> {
    raw.parse::<u32>()
        .map_err(|_| Refusal::bad_request(format!("`{raw}` is not a partition number")))
}

/// POST `/queues/{queue}/handlers/{handler}/partitions/{partition}/unblock` with `head_seq`.
pub(crate) async fn unblock(
    State(d): State<AppState>,
    headers: HeaderMap,
    Path((queue, handler, raw)): Path<(String, String, String)>,
    form: FormBody,
) -> Response {
    let d = &*d;
    guarded(d, &headers, form, |form| async move {
        let p = partition(&raw)?;
        let seq = head_seq(&form)?;
        d.outbox
            .unblock(&queue, p, &handler, seq)
            .await
            .map_err(|e| engine(&e))?;
        Ok(done(
            d,
            &format!(
                "Queue {queue} partition {p} for handler {handler}: head seq {seq} will be tried again now."
            ),
            &format!("/queues/{}", enc(&queue)),
            "Back to the queue",
        ))
    })
    .await
}

/// POST `/queues/{queue}/handlers/{handler}/partitions/{partition}/skip-head` with `head_seq`.
pub(crate) async fn skip_head(
    State(d): State<AppState>,
    headers: HeaderMap,
    Path((queue, handler, raw)): Path<(String, String, String)>,
    form: FormBody,
) -> Response {
    let d = &*d;
    guarded(d, &headers, form, |form| async move {
        let p = partition(&raw)?;
        let seq = head_seq(&form)?;
        d.outbox
            .skip_head(&queue, p, &handler, seq)
            .await
            .map_err(|e| engine(&e))?;
        Ok(done(
            d,
            &format!(
                "Queue {queue} partition {p} for handler {handler}: head seq {seq} was moved to the dead letters."
            ),
            &format!("/queues/{}", enc(&queue)),
            "Back to the queue",
        ))
    })
    .await
}

/// POST `/queues/{queue}/handlers/{handler}/retire`.
pub(crate) async fn retire(
    State(d): State<AppState>,
    headers: HeaderMap,
    Path((queue, handler)): Path<(String, String)>,
    form: FormBody,
) -> Response {
    guarded(&d, &headers, form, |_| async {
        let n = d
            .outbox
            .retire_handler(&queue, &handler)
            .await
            .map_err(|e| engine(&e))?;
        Ok(done(
            &d,
            &format!("Handler {handler} of queue {queue} was retired ({n} cursors removed)."),
            "/",
            "Overview",
        ))
    })
    .await
}

/// Where to go after logging in: a path inside the dashboard, else its overview.
fn safe_next(d: &Dashboard, next: Option<&str>) -> String {
    let home = d.link("/");
    match next {
        Some(n)
            if n.starts_with(&home)
                && !n.starts_with("//")
                && !n.contains('\\')
                && !n.chars().any(char::is_control) =>
        {
            n.to_owned()
        }
        _ => home,
    }
}

fn cookie_path(d: &Dashboard) -> String {
    if d.config.mount_path.is_empty() {
        "/".to_owned()
    } else {
        d.config.mount_path.clone()
    }
}

fn redirect(to: &str, cookie: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// POST `/login` with `token` and `next`.
pub(crate) async fn login(
    State(d): State<AppState>,
    headers: HeaderMap,
    form: FormBody,
) -> Response {
    if d.config.read_only {
        return Refusal::forbidden("the dashboard is read-only").page(&d, false);
    }
    if d.config.token.is_none() {
        return Refusal::forbidden(
            "actions are disabled: the dashboard was started without a token",
        )
        .page(&d, false);
    }
    if let Err(r) = same_origin(&headers) {
        return r.page(&d, false);
    }
    let form = match form {
        Ok(Form(f)) => f,
        Err(e) => {
            return Refusal::bad_request(format!("malformed form: {}", e.body_text()))
                .page(&d, false);
        }
    };
    let now = std::time::Instant::now();
    let mut logins = match d.logins.lock() {
        Ok(l) => l,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Err(wait) = logins.check(now) {
        return Refusal::too_many(format!(
            "too many wrong tokens in the last minute; try again in {} s",
            wait.as_secs().max(1)
        ))
        .page(&d, false);
    }
    if !token_matches(&d, field(&form, "token").unwrap_or("")) {
        logins.failed(now);
        return Refusal::forbidden("wrong token").page(&d, false);
    }
    drop(logins);
    let cookie = format!(
        "{COOKIE}={}; Path={}; HttpOnly; SameSite=Strict",
        session_value(&d),
        cookie_path(&d)
    );
    redirect(&safe_next(&d, field(&form, "next")), &cookie)
}

/// POST `/logout`.
pub(crate) async fn logout(
    State(d): State<AppState>,
    headers: HeaderMap,
    form: FormBody,
) -> Response {
    guarded(&d, &headers, form, |_| async {
        let cookie = format!(
            "{COOKIE}=; Path={}; HttpOnly; SameSite=Strict; Max-Age=0",
            cookie_path(&d)
        );
        Ok(redirect(&d.link("/"), &cookie))
    })
    .await
}
