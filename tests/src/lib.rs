//! Test support for the outbox integration tests.
