//! Naming rules and limits shared by the runtime and the macro crate, written once.
//!
//! `outbox-macros/src/names.rs` is a symbolic link to this file (serde_derive shares its
//! internals the same way), so an attribute like `#[outbox::queue(name = "...")]` is refused
//! at compile time by exactly the rule the runtime applies to a name given at run time. Keep
//! this file free of dependencies: it is compiled into both crates.

/// Largest partition count of a queue.
pub(crate) const MAX_PARTITIONS: u32 = 4096;

/// Longest queue or handler name, in bytes (names are ASCII).
pub(crate) const MAX_NAME_BYTES: usize = 64;

/// Most headers a message may carry.
pub(crate) const MAX_HEADERS: usize = 32;

/// Longest header name, in bytes.
pub(crate) const MAX_HEADER_NAME_BYTES: usize = 128;

/// Why `name` is not a valid queue or handler name: 1 to 64 ASCII letters, digits, `_`, `-`,
/// `.`, starting with a letter.
pub(crate) fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > MAX_NAME_BYTES {
        Some("must be at most 64 characters")
    } else if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        Some("must start with an ASCII letter")
    } else if !name.chars().all(allowed_in_name) {
        Some("may contain only ASCII letters, digits, `_`, `-` and `.`")
    } else {
        None
    }
}

/// Why a header name is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderNameProblem {
    Empty,
    TooLong,
    BadCharacter,
}

impl HeaderNameProblem {
    /// The rule, as the end of a sentence that starts with the name.
    pub(crate) fn rule(self) -> &'static str {
        match self {
            HeaderNameProblem::Empty => "must not be empty",
            HeaderNameProblem::TooLong => "must be at most 128 bytes",
            HeaderNameProblem::BadCharacter => {
                "may contain only ASCII letters, digits, `-`, `_` and `.`"
            }
        }
    }
}

/// Why `name` is not a valid header name: 1 to 128 ASCII letters, digits, `-`, `_` and `.`
/// (so that every broker accepts it as a header name).
pub(crate) fn header_name_problem(name: &str) -> Option<HeaderNameProblem> {
    if name.is_empty() {
        Some(HeaderNameProblem::Empty)
    } else if name.len() > MAX_HEADER_NAME_BYTES {
        Some(HeaderNameProblem::TooLong)
    } else if !name.chars().all(allowed_in_name) {
        Some(HeaderNameProblem::BadCharacter)
    } else {
        None
    }
}

fn allowed_in_name(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_and_handler_names() {
        assert_eq!(name_problem("order_placed"), None);
        assert_eq!(name_problem("a.b-c_9"), None);
        assert_eq!(name_problem(&"x".repeat(64)), None);
        assert!(name_problem("").is_some());
        assert!(name_problem("1x").is_some());
        assert!(name_problem("a b").is_some());
        assert!(name_problem("é").is_some());
        assert!(name_problem(&"x".repeat(65)).is_some());
    }

    #[test]
    fn header_names() {
        assert_eq!(header_name_problem("trace-id"), None);
        assert_eq!(header_name_problem("1.x_Y"), None);
        assert_eq!(header_name_problem(""), Some(HeaderNameProblem::Empty));
        assert_eq!(
            header_name_problem(&"h".repeat(129)),
            Some(HeaderNameProblem::TooLong)
        );
        assert_eq!(
            header_name_problem("a:b"),
            Some(HeaderNameProblem::BadCharacter)
        );
    }
}
