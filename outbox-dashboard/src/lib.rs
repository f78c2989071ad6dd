//! A web dashboard for [`outbox`]: see and repair queues, partitions and dead letters from a
//! browser.
//!
//! [`router`] returns an [`axum::Router`] to mount in your own application. The pages are
//! rendered on the server; the stylesheet and the few lines of script that refresh the live pages
//! are embedded in the binary, so the dashboard works offline and needs no build step.
//!
//! ```no_run
//! # async fn run(outbox: outbox::Outbox) -> std::io::Result<()> {
//! use outbox_dashboard::Config;
//!
//! let config = Config::new().token("a long random secret").mount_path("/outbox");
//! let app = axum::Router::new().nest("/outbox", outbox_dashboard::router(outbox, config));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9000").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! # Security
//!
//! - Without a [token](Config::token) the dashboard only shows; with one, an operator logs in
//!   with it and may replay, discard and purge dead letters, unblock partitions, skip heads and
//!   retire stale handlers. [`Config::read_only`] hides and refuses every action whatever the
//!   token.
//! - Every action is a `POST` carrying a CSRF token (an HMAC of a per-process random secret)
//!   and is refused when the browser says the request came from another origin. The login
//!   cookie is `HttpOnly` and `SameSite=Strict`.
//! - [`Config::show_payloads`]`(false)` keeps payloads (which may hold personal data) off every
//!   page.
//! - Bad input (an unknown queue or dead letter, a malformed form) gets a 4xx page and changes
//!   nothing. Unblock and skip-head name the head sequence the operator saw, so a head that moved
//!   meanwhile gets a `409 Conflict` page instead of skipping the wrong message.
//!
//! The dashboard serves plain HTTP: keep it on localhost or behind a TLS-terminating proxy.
// A library reports through `tracing` and its errors, never by printing.
#![deny(clippy::print_stdout, clippy::print_stderr, clippy::dbg_macro)]

mod actions;
mod html;
mod pages;
mod samples;
mod security;

use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use outbox::Outbox;

use crate::samples::Samples;

/// How the dashboard behaves. Start from [`Config::new`], then set what differs.
#[derive(Clone)]
pub struct Config {
    read_only: bool,
    token: Option<String>,
    show_payloads: bool,
    refresh: Duration,
    mount_path: String,
    sample_every: Duration,
    window: Duration,
    page_size: u32,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("read_only", &self.read_only)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("show_payloads", &self.show_payloads)
            .field("refresh", &self.refresh)
            .field("mount_path", &self.mount_path)
            .field("sample_every", &self.sample_every)
            .field("window", &self.window)
            .field("page_size", &self.page_size)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}

impl Config {
    /// Shows everything, allows no action (no token), refreshes live pages every 5 s, samples
    /// throughput every 5 s over the last 10 minutes, lists 50 dead letters a page, mounted at
    /// `/`.
    pub fn new() -> Self {
        Config {
            read_only: false,
            token: None,
            show_payloads: true,
            refresh: Duration::from_secs(5),
            mount_path: String::new(),
            sample_every: Duration::from_secs(5),
            window: Duration::from_secs(600),
            page_size: 50,
        }
    }

    /// Shows only: no action forms, and every action route answers `403`.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// The token (password) an operator logs in with before acting. Without one, actions are
    /// disabled. An empty token counts as none.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.token = (!token.is_empty()).then_some(token);
        self
    }

    /// Whether message payloads are shown (default `true`). Switch off when payloads hold
    /// personal data.
    pub fn show_payloads(mut self, show: bool) -> Self {
        self.show_payloads = show;
        self
    }

    /// How often the overview and queue pages refresh themselves (at least 1 s).
    pub fn refresh_interval(mut self, every: Duration) -> Self {
        self.refresh = every.max(Duration::from_secs(1));
        self
    }

    /// The path the router is nested at (for example `/outbox`), so links and the login cookie
    /// point inside it. Default: the root.
    pub fn mount_path(mut self, path: impl Into<String>) -> Self {
        let path = path.into();
        self.mount_path = path.trim_end_matches('/').to_owned();
        self
    }

    /// How often the throughput samples are taken (at least 100 ms), and how far back the
    /// chart reaches.
    pub fn throughput_sampling(mut self, every: Duration, window: Duration) -> Self {
        self.sample_every = every.max(Duration::from_millis(100));
        self.window = window.max(self.sample_every * 2);
        self
    }

    /// Dead letters per page (1 to 1000).
    pub fn page_size(mut self, size: u32) -> Self {
        self.page_size = size.clamp(1, 1000);
        self
    }

    /// Whether actions are possible: not read-only and a token is set.
    fn actions_enabled(&self) -> bool {
        !self.read_only && self.token.is_some()
    }
}

/// What every handler shares.
pub(crate) struct Dashboard {
    pub(crate) outbox: Outbox,
    pub(crate) config: Config,
    /// Per-process random secret behind the session cookie and the CSRF tokens.
    pub(crate) secret: [u8; 32],
    pub(crate) samples: Mutex<Samples>,
    /// Failed logins of the last minute.
    pub(crate) logins: Mutex<security::LoginLimiter>,
}

impl Dashboard {
    /// An absolute link inside the dashboard.
    pub(crate) fn link(&self, path: &str) -> String {
        format!("{}{}", self.config.mount_path, path)
    }
}

pub(crate) type AppState = Arc<Dashboard>;

/// The dashboard's routes, to serve alone or nest in an application (then also set
/// [`Config::mount_path`]).
///
/// When called inside a tokio runtime, a background task samples throughput every
/// [sampling interval](Config::throughput_sampling) for as long as the router lives; otherwise
/// samples are taken when the overview is shown.
pub fn router(outbox: Outbox, config: Config) -> Router {
    let state: AppState = Arc::new(Dashboard {
        samples: Mutex::new(Samples::new(config.window)),
        logins: Mutex::default(),
        outbox,
        config,
        secret: rand::random(),
    });
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(sample_while_alive(Arc::downgrade(&state)));
    }
    Router::new()
        .route("/", get(pages::overview))
        .route("/queues/{queue}", get(pages::queue))
        .route("/dead-letters", get(pages::dead_letters))
        .route("/dead-letters/{id}", get(pages::dead_letter))
        .route(
            "/dead-letters/{id}/replay",
            post(actions::replay).get(pages::post_only),
        )
        .route(
            "/dead-letters/{id}/discard",
            post(actions::discard).get(pages::post_only),
        )
        .route(
            "/dead-letters/bulk",
            post(actions::bulk).get(pages::post_only),
        )
        .route(
            "/dead-letters/purge",
            post(actions::purge).get(pages::post_only),
        )
        .route(
            "/queues/{queue}/handlers/{handler}/partitions/{partition}/unblock",
            post(actions::unblock).get(pages::post_only),
        )
        .route(
            "/queues/{queue}/handlers/{handler}/partitions/{partition}/skip-head",
            post(actions::skip_head).get(pages::post_only),
        )
        .route(
            "/queues/{queue}/handlers/{handler}/retire",
            post(actions::retire).get(pages::post_only),
        )
        .route("/login", get(pages::login).post(actions::login))
        .route("/logout", post(actions::logout).get(pages::post_only))
        .route("/assets/app.css", get(pages::css))
        .route("/assets/app.js", get(pages::js))
        .fallback(pages::not_found)
        .with_state(state)
}

/// Takes a throughput sample every interval until the router is dropped.
async fn sample_while_alive(state: Weak<Dashboard>) {
    loop {
        let Some(every) = state.upgrade().map(|s| s.config.sample_every) else {
            return;
        };
        tokio::time::sleep(every).await;
        let Some(s) = state.upgrade() else {
            return;
        };
        if let Ok(status) = s.outbox.status().await {
            samples::record(&s, &status);
        }
    }
}
