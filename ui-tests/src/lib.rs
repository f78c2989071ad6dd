//! trybuild tests of the outbox attributes live in `tests/`.
