//! Procedural macros of `outbox`. Implementation detail: use the attributes re-exported by
//! `outbox` (`#[outbox::queue]`, `#[outbox::handler]`); their documentation lives there.
#![doc(test(no_crate_inject, attr(deny(warnings))))]
// A library reports through `tracing` and its errors, never by printing.
#![deny(clippy::print_stdout, clippy::print_stderr, clippy::dbg_macro)]

mod args;
mod check;
mod handler;
mod names;
mod paths;
mod queue;

use proc_macro::TokenStream;

#[doc = include_str!("docs/queue.md")]
#[proc_macro_attribute]
pub fn queue(args: TokenStream, item: TokenStream) -> TokenStream {
    queue::expand(args.into(), item.into()).into()
}

#[doc = include_str!("docs/handler.md")]
#[proc_macro_attribute]
pub fn handler(args: TokenStream, item: TokenStream) -> TokenStream {
    handler::expand(args.into(), item.into()).into()
}
