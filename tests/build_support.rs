// Shared by `tests/build.rs` and `outbox-cli/build.rs`.

/// Marks the server backends (and brokers: `nats`, `rabbitmq`) that this test build cannot reach, so their tests show as
/// `ignored` (with the reason) instead of passing without running. A backend is reachable when
/// its URL variable is set; one named in `OUTBOX_TEST_REQUIRE` is never ignored (its tests then
/// fail loudly if the URL is missing).
pub(crate) fn mark_unreachable_backends() {
    for (backend, var) in [
        ("postgres", "OUTBOX_TEST_POSTGRES_URL"),
        ("mysql", "OUTBOX_TEST_MYSQL_URL"),
        ("nats", "OUTBOX_TEST_NATS_URL"),
        ("rabbitmq", "OUTBOX_TEST_RABBITMQ_URL"),
    ] {
        println!("cargo::rerun-if-env-changed={var}");
        println!("cargo::rustc-check-cfg=cfg(outbox_no_{backend})");
        let configured = std::env::var(var).is_ok_and(|v| !v.is_empty());
        let required = std::env::var("OUTBOX_TEST_REQUIRE")
            .unwrap_or_default()
            .split(',')
            .any(|s| s.trim() == backend);
        if !configured && !required {
            println!("cargo::rustc-cfg=outbox_no_{backend}");
        }
    }
    println!("cargo::rerun-if-env-changed=OUTBOX_TEST_REQUIRE");
}

/// Finds libfaketime (Debian's `libfaketime`), which the clock-skew tests preload into worker
/// processes: its path in `OUTBOX_FAKETIME_LIB`, or the `outbox_no_faketime` cfg when it is
/// absent and not required (`OUTBOX_TEST_REQUIRE` containing `faketime`).
pub(crate) fn find_faketime() {
    println!("cargo::rustc-check-cfg=cfg(outbox_no_faketime)");
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ];
    for c in candidates {
        println!("cargo::rerun-if-changed={c}");
    }
    match candidates.iter().find(|c| std::path::Path::new(c).exists()) {
        Some(path) => println!("cargo::rustc-env=OUTBOX_FAKETIME_LIB={path}"),
        None => {
            println!("cargo::rustc-env=OUTBOX_FAKETIME_LIB=");
            let required = std::env::var("OUTBOX_TEST_REQUIRE")
                .unwrap_or_default()
                .split(',')
                .any(|s| s.trim() == "faketime");
            if !required {
                println!("cargo::rustc-cfg=outbox_no_faketime");
            }
        }
    }
}

/// Finds Debian's chromium and chromedriver, which the dashboard's browser tests drive: the
/// `outbox_no_browser` cfg when either is absent and not required (`OUTBOX_TEST_REQUIRE`
/// containing `browser`), so those tests show as ignored with the reason.
#[allow(dead_code)]
pub(crate) fn find_browser() {
    println!("cargo::rustc-check-cfg=cfg(outbox_no_browser)");
    let paths = ["/usr/bin/chromium", "/usr/bin/chromedriver"];
    for p in paths {
        println!("cargo::rerun-if-changed={p}");
    }
    let present = paths.iter().all(|p| std::path::Path::new(p).exists());
    let required = std::env::var("OUTBOX_TEST_REQUIRE")
        .unwrap_or_default()
        .split(',')
        .any(|s| s.trim() == "browser");
    if !present && !required {
        println!("cargo::rustc-cfg=outbox_no_browser");
    }
}
