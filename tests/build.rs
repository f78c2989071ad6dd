//! Server backends without a URL, and libfaketime when it is absent, show their tests as
//! `ignored`, with the reason, instead of passing without running (see `build_support.rs`).

#[path = "build_support.rs"]
mod support;

fn main() {
    support::mark_unreachable_backends();
    support::find_faketime();
    probe_postgres_tls();
}

/// `tests/tls.rs` needs a PostgreSQL server with TLS on: `outbox_no_pg_tls` marks its tests
/// ignored (with the reason) when the `tls` feature is on but the server at
/// `OUTBOX_TEST_POSTGRES_URL` answers `SHOW ssl` with `off` (asked through `psql`), unless
/// `OUTBOX_TEST_REQUIRE` contains `postgres-tls`.
fn probe_postgres_tls() {
    println!("cargo::rustc-check-cfg=cfg(outbox_no_pg_tls)");
    println!("cargo::rerun-if-env-changed=OUTBOX_TEST_POSTGRES_URL");
    if std::env::var_os("CARGO_FEATURE_TLS").is_none() {
        return;
    }
    let required = std::env::var("OUTBOX_TEST_REQUIRE")
        .unwrap_or_default()
        .split(',')
        .any(|s| s.trim() == "postgres-tls");
    let url = std::env::var("OUTBOX_TEST_POSTGRES_URL").unwrap_or_default();
    let on = !url.is_empty()
        && std::process::Command::new("psql")
            .args([url.as_str(), "-Atc", "SHOW ssl"])
            .output()
            .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "on");
    if !on && !required {
        println!("cargo::rustc-cfg=outbox_no_pg_tls");
    }
}
