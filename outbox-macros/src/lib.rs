//! Procedural macros of `outbox`. Implementation detail: use the attributes re-exported by `outbox`.
