//! The one failure path: what a failed attempt leads to, and the error text that is stored.
//!
//! [`decide`] is pure (attempts, policy, error, knobs → retry after a delay, block, or
//! dead-letter); the processor turns its verdict into one guarded cursor write
//! ([`Store::settle`](crate::storage::Store)), whatever made the attempt fail: an error or a
//! panic of the handler, its time limit, a database error inside its transaction, a cursor
//! update or a commit that failed.

use std::time::Duration;

use crate::error::{HandlerError, full_chain};
use crate::profile::Tuning;
use crate::queue::PoisonPolicy;
use crate::storage::{Verdict, attempts_from_db};

/// The longest error text stored with a failing cursor or a dead letter, in bytes. A longer
/// text is cut at a character boundary and ends with ` [truncated]`.
pub const MAX_ERROR_BYTES: usize = 8 * 1024;

/// What ends a cut error text.
const TRUNCATED: &str = " [truncated]";

/// A failed attempt, as the processor records it.
#[derive(Debug, Clone)]
pub(crate) struct Failed {
    /// The stored text: bounded and sanitised ([`error_text`]).
    pub(crate) text: String,
    /// An explicit reject: dead-letter now, whatever the attempts left.
    pub(crate) rejected: bool,
}

impl Failed {
    pub(crate) fn from_handler(e: &HandlerError) -> Self {
        Self {
            text: error_text(&full_chain(e.reason())),
            rejected: e.is_reject(),
        }
    }

    /// A failure that is not the handler's verdict (a timeout, a failed commit, ...).
    pub(crate) fn retry(reason: impl AsRef<str>) -> Self {
        Self {
            text: error_text(reason.as_ref()),
            rejected: false,
        }
    }
}

/// The verdict on a message whose failed attempts now number `attempts` (this one included).
pub(crate) fn decide(
    attempts: i64,
    failure: &Failed,
    tuning: &Tuning,
    policy: PoisonPolicy,
) -> Verdict {
    let exhausted = failure.rejected || attempts >= i64::from(tuning.max_attempts);
    if !exhausted {
        return Verdict::Retry(backoff(tuning, attempts));
    }
    match policy {
        PoisonPolicy::Block => Verdict::Block,
        _ => Verdict::DeadLetter,
    }
}

fn backoff(tuning: &Tuning, attempts: i64) -> Duration {
    tuning.backoff(attempts_from_db(attempts))
}

/// An error text that every backend stores as given: at most [`MAX_ERROR_BYTES`] bytes, cut
/// at a character boundary, with NUL characters (which PostgreSQL refuses in text) replaced by
/// U+FFFD. Rust strings are valid UTF-8 already; the columns take any of it.
pub(crate) fn error_text(raw: &str) -> String {
    let clean: String = if raw.contains('\0') {
        raw.replace('\0', "\u{FFFD}")
    } else {
        raw.to_owned()
    };
    if clean.len() <= MAX_ERROR_BYTES {
        return clean;
    }
    let mut end = MAX_ERROR_BYTES - TRUNCATED.len();
    while !clean.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + TRUNCATED.len());
    out.push_str(&clean[..end]);
    out.push_str(TRUNCATED);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Overrides, Profile};

    fn tuning(max_attempts: u32) -> Tuning {
        Profile::Default.tuning().with(
            &Overrides::NONE
                .max_attempts(max_attempts)
                .backoff_base(Duration::from_millis(100))
                .backoff_max(Duration::from_millis(1_000)),
        )
    }

    fn retry() -> Failed {
        Failed::retry("boom")
    }

    #[test]
    fn a_failure_with_attempts_left_is_retried_after_a_growing_backoff() {
        let t = tuning(5);
        for attempts in 1..5 {
            let Verdict::Retry(d) = decide(attempts, &retry(), &t, PoisonPolicy::DeadLetter) else {
                panic!("attempt {attempts} must be retried");
            };
            let raw = Duration::from_millis(100)
                .saturating_mul(1 << (attempts - 1))
                .min(Duration::from_millis(1_000));
            assert!(d >= raw / 2 && d <= raw, "attempt {attempts}: {d:?}");
        }
    }

    #[test]
    fn the_last_attempt_dead_letters_or_blocks_per_policy() {
        let t = tuning(3);
        assert_eq!(
            decide(3, &retry(), &t, PoisonPolicy::DeadLetter),
            Verdict::DeadLetter
        );
        assert_eq!(decide(3, &retry(), &t, PoisonPolicy::Block), Verdict::Block);
        assert_eq!(
            decide(i64::MAX, &retry(), &t, PoisonPolicy::DeadLetter),
            Verdict::DeadLetter,
            "attempts never overflow into a retry"
        );
    }

    #[test]
    fn a_reject_ends_at_the_first_attempt() {
        let t = tuning(10);
        let reject = Failed::from_handler(&HandlerError::reject("invalid"));
        assert_eq!(
            decide(1, &reject, &t, PoisonPolicy::DeadLetter),
            Verdict::DeadLetter
        );
        assert_eq!(decide(1, &reject, &t, PoisonPolicy::Block), Verdict::Block);
    }

    #[test]
    fn max_attempts_of_one_never_retries() {
        assert_eq!(
            decide(1, &retry(), &tuning(1), PoisonPolicy::DeadLetter),
            Verdict::DeadLetter
        );
    }

    #[test]
    fn error_texts_are_bounded_at_a_character_boundary() {
        let short = "disk full";
        assert_eq!(error_text(short), short);
        let exact = "x".repeat(MAX_ERROR_BYTES);
        assert_eq!(
            error_text(&exact),
            exact,
            "exactly at the limit is kept whole"
        );
        for pad in 0..4 {
            // Four-byte characters straddle the cut at every offset.
            let long = format!("{}{}", "y".repeat(pad), "🦀".repeat(MAX_ERROR_BYTES));
            let cut = error_text(&long);
            assert!(cut.len() <= MAX_ERROR_BYTES, "{} bytes", cut.len());
            assert!(cut.ends_with(TRUNCATED));
            assert!(long.starts_with(cut.trim_end_matches(TRUNCATED)));
        }
    }

    #[test]
    fn nul_characters_are_replaced() {
        assert_eq!(error_text("a\0b"), "a\u{FFFD}b");
        let long = format!("{}\0", "z".repeat(MAX_ERROR_BYTES * 2));
        assert!(!error_text(&long).contains('\0'));
    }

    #[test]
    fn the_stored_text_carries_the_error_chain() {
        let io = std::io::Error::other("connection refused");
        let f = Failed::from_handler(&HandlerError::retry(io));
        assert_eq!(f.text, "connection refused");
        assert!(!f.rejected);
    }
}
