//! Parsing of the attributes' own arguments with `syn::meta::parser`.
//!
//! Every problem is recorded in [`Errors`] and parsing goes on, so one compile shows them all.

use proc_macro2::{Span, TokenStream};
use syn::meta::ParseNestedMeta;
use syn::parse::Parser;
use syn::spanned::Spanned;

use crate::check::Errors;
use crate::names;

/// Argument names, written once.
pub(crate) mod sym {
    pub(crate) const PARTITIONS: &str = "partitions";
    pub(crate) const NAME: &str = "name";
    pub(crate) const MAX_ATTEMPTS: &str = "max_attempts";
    pub(crate) const POISON: &str = "poison";
    pub(crate) const BATCH_SIZE: &str = "batch_size";
    pub(crate) const CONCURRENCY: &str = "concurrency";
    pub(crate) const LEASE_MS: &str = "lease_ms";
    pub(crate) const CRATE: &str = "crate";
    pub(crate) const TRANSACTIONAL: &str = "transactional";
    pub(crate) const LEASED: &str = "leased";
    pub(crate) const BATCH: &str = "batch";
    pub(crate) const KEY: &str = "key";
    pub(crate) const DEDUP: &str = "dedup";
    pub(crate) const HEADER: &str = "header";
    pub(crate) const DELAY_MS: &str = "delay_ms";
    pub(crate) const STRICT_ORDER: &str = "strict_order";
}

/// One argument's value and where it was written.
pub(crate) struct Arg<T> {
    pub(crate) value: T,
    pub(crate) span: Span,
}

/// Knobs both attributes accept.
#[derive(Default)]
pub(crate) struct Knobs {
    pub(crate) max_attempts: Option<Arg<u32>>,
    pub(crate) batch_size: Option<Arg<u32>>,
    pub(crate) concurrency: Option<Arg<u32>>,
    pub(crate) lease_ms: Option<Arg<u64>>,
}

/// Arguments of `#[outbox::queue(…)]`.
#[derive(Default)]
pub(crate) struct QueueArgs {
    pub(crate) partitions: Option<Arg<u32>>,
    /// Whether `partitions` was written at all (valid or not).
    pub(crate) partitions_written: bool,
    pub(crate) name: Option<Arg<String>>,
    pub(crate) poison: Option<Arg<Poison>>,
    /// `delay_ms = N`: every message is delivered N ms after its enqueue.
    pub(crate) delay_ms: Option<Arg<u64>>,
    /// `strict_order`: commit order only, scheduled delivery refused.
    pub(crate) strict_order: Option<Span>,
    pub(crate) knobs: Knobs,
    pub(crate) krate: Option<syn::Path>,
}

/// The longest `delay_ms` accepted: one year.
pub(crate) const MAX_DELAY_MS: u64 = 365 * 86_400_000;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Poison {
    DeadLetter,
    Block,
}

/// How a handler runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Transactional,
    Leased,
}

/// Arguments of `#[outbox::handler(…)]`.
#[derive(Default)]
pub(crate) struct HandlerArgs {
    pub(crate) mode: Option<Arg<Mode>>,
    /// `batch`: the handler takes `Vec<Payload>` and is called once per batch.
    pub(crate) batch: Option<Span>,
    pub(crate) name: Option<Arg<String>>,
    pub(crate) knobs: Knobs,
    pub(crate) krate: Option<syn::Path>,
}

const QUEUE_KEYS: &str = "`partitions`, `name`, `max_attempts`, `poison`, `delay_ms`, `strict_order`, `batch_size`, `concurrency`, `crate`";
const HANDLER_KEYS: &str = "`transactional`, `leased`, `batch`, `name`, `max_attempts`, `batch_size`, `concurrency`, `lease_ms`, `crate`";

/// Parses `args` with `each` called per argument; a syntax error that stops the parser is
/// recorded too.
fn parse_with(
    args: TokenStream,
    errors: &mut Errors,
    mut each: impl FnMut(&ParseNestedMeta<'_>, &mut Errors) -> syn::Result<()>,
) {
    let parser = syn::meta::parser(|meta| each(&meta, errors));
    if let Err(e) = parser.parse2(args) {
        errors.push(e);
    }
}

/// Records `value` in `slot`, or a "set more than once" error.
fn set<T>(slot: &mut Option<Arg<T>>, value: Option<T>, key: &str, span: Span, errors: &mut Errors) {
    if slot.is_some() {
        errors.at(span, format_args!("`{key}` set more than once"));
    } else if let Some(value) = value {
        *slot = Some(Arg { value, span });
    }
}

/// Parses `= <integer>` in `min..=max`, reporting problems at the literal.
fn int<T>(
    meta: &ParseNestedMeta<'_>,
    key: &str,
    min: u64,
    max: u64,
    errors: &mut Errors,
) -> syn::Result<Option<T>>
where
    T: TryFrom<u64>,
{
    let expr: syn::Expr = meta.value()?.parse()?;
    let syn::Expr::Lit(syn::ExprLit {
        lit: syn::Lit::Int(lit),
        ..
    }) = &expr
    else {
        errors.at(
            expr.span(),
            format_args!("`{key}` expects an integer literal, as in `{key} = {min}`"),
        );
        return Ok(None);
    };
    match lit.base10_parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(T::try_from(n).ok()),
        _ => {
            errors.at(lit.span(), format_args!("`{key}` must be {min} to {max}"));
            Ok(None)
        }
    }
}

/// Parses `= "<string>"`.
pub(crate) fn string(
    meta: &ParseNestedMeta<'_>,
    key: &str,
    errors: &mut Errors,
) -> syn::Result<Option<syn::LitStr>> {
    let expr: syn::Expr = meta.value()?.parse()?;
    match expr {
        syn::Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Str(s),
            ..
        }) => Ok(Some(s)),
        other => {
            errors.at(
                other.span(),
                format_args!("`{key}` expects a string literal, as in `{key} = \"…\"`"),
            );
            Ok(None)
        }
    }
}

/// Parses and validates `name = "…"`.
fn name(
    meta: &ParseNestedMeta<'_>,
    kind: &str,
    errors: &mut Errors,
) -> syn::Result<Option<String>> {
    let Some(lit) = string(meta, sym::NAME, errors)? else {
        return Ok(None);
    };
    let value = lit.value();
    if let Some(why) = names::name_problem(&value) {
        errors.at(
            lit.span(),
            format_args!("invalid {kind} name `{value}`: {why}"),
        );
        return Ok(None);
    }
    Ok(Some(value))
}

/// Parses `crate = "path"`.
fn krate(
    meta: &ParseNestedMeta<'_>,
    slot: &mut Option<syn::Path>,
    errors: &mut Errors,
) -> syn::Result<()> {
    let span = meta.path.span();
    let Some(lit) = string(meta, sym::CRATE, errors)? else {
        return Ok(());
    };
    if slot.is_some() {
        errors.at(span, "`crate` set more than once");
        return Ok(());
    }
    match lit.parse::<syn::Path>() {
        Ok(path) => *slot = Some(path),
        Err(_) => errors.at(
            lit.span(),
            format_args!(
                "`crate` expects a path, as in `crate = \"::outbox\"`; found `{}`",
                lit.value()
            ),
        ),
    }
    Ok(())
}

/// Parses the knobs shared by both attributes; returns false if `key` is not one.
fn knob(
    meta: &ParseNestedMeta<'_>,
    key: &str,
    knobs: &mut Knobs,
    errors: &mut Errors,
) -> syn::Result<bool> {
    let span = meta.path.span();
    match key {
        sym::MAX_ATTEMPTS => {
            let v = int(meta, key, 1, u64::from(u32::MAX), errors)?;
            set(&mut knobs.max_attempts, v, key, span, errors);
        }
        sym::BATCH_SIZE => {
            let v = int(meta, key, 1, 10_000, errors)?;
            set(&mut knobs.batch_size, v, key, span, errors);
        }
        sym::CONCURRENCY => {
            let v = int(meta, key, 1, 256, errors)?;
            set(&mut knobs.concurrency, v, key, span, errors);
        }
        sym::LEASE_MS => {
            let v = int(meta, key, 1, 86_400_000, errors)?;
            set(&mut knobs.lease_ms, v, key, span, errors);
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// Skips the value of an unknown argument so parsing can go on.
fn skip(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(syn::Token![=]) {
        let _: syn::Expr = meta.value()?.parse()?;
    } else if meta.input.peek(syn::token::Paren) {
        let _: proc_macro2::Group = meta.input.parse()?;
    }
    Ok(())
}

/// A hint for a likely misspelling or a name other queue libraries use.
fn hint(key: &str) -> &'static str {
    match key {
        "partition" | "partition_count" | "shards" => " (did you mean `partitions`?)",
        "retries" | "max_retries" | "attempts" | "retry" => " (did you mean `max_attempts`?)",
        "batch" | "batch_len" => " (did you mean `batch_size`?)",
        "lease" | "lease_time" | "timeout" => " (did you mean `lease_ms`?)",
        "poison_policy" | "on_poison" | "dead_letter" => " (did you mean `poison`?)",
        "delay" | "delay_secs" | "scheduled_in" | "run_in" => " (did you mean `delay_ms`?)",
        "ordered" | "fifo" | "strict" => " (did you mean `strict_order`?)",
        "transaction" | "tx" | "txn" => " (did you mean `transactional`?)",
        "lease_based" | "at_least_once" => " (did you mean `leased`?)",
        "krate" | "outbox" => " (did you mean `crate`?)",
        _ => "",
    }
}

fn key_of(meta: &ParseNestedMeta<'_>) -> String {
    match meta.path.get_ident() {
        Some(ident) => ident.to_string(),
        None => quote::ToTokens::to_token_stream(&meta.path)
            .to_string()
            .replace(' ', ""),
    }
}

impl QueueArgs {
    pub(crate) fn parse(args: TokenStream, errors: &mut Errors) -> Self {
        let mut out = QueueArgs::default();
        let mut seen = std::collections::HashSet::new();
        parse_with(args, errors, |meta, errors| {
            let key = key_of(meta);
            let span = meta.path.span();
            if QUEUE_KEYS.contains(&format!("`{key}`")) && !seen.insert(key.clone()) {
                skip(meta)?;
                errors.at(span, format_args!("`{key}` set more than once"));
                return Ok(());
            }
            match key.as_str() {
                sym::PARTITIONS => {
                    out.partitions_written = true;
                    let v = int(meta, &key, 1, u64::from(names::MAX_PARTITIONS), errors)?;
                    set(&mut out.partitions, v, &key, span, errors);
                }
                sym::NAME => {
                    let v = name(meta, "queue", errors)?;
                    set(&mut out.name, v, &key, span, errors);
                }
                sym::POISON => {
                    let v = string(meta, &key, errors)?.and_then(|lit| match lit.value().as_str() {
                        "dead_letter" => Some(Poison::DeadLetter),
                        "block" => Some(Poison::Block),
                        other => {
                            errors.at(
                                lit.span(),
                                format_args!("unknown `poison` policy `{other}`; expected `\"dead_letter\"` or `\"block\"`"),
                            );
                            None
                        }
                    });
                    set(&mut out.poison, v, &key, span, errors);
                }
                sym::DELAY_MS => {
                    let v = int(meta, &key, 1, MAX_DELAY_MS, errors)?;
                    set(&mut out.delay_ms, v, &key, span, errors);
                }
                sym::STRICT_ORDER => {
                    if !meta.input.is_empty() && !meta.input.peek(syn::Token![,]) {
                        skip(meta)?;
                        errors.at(
                            span,
                            "`strict_order` takes no value; write `#[outbox::queue(partitions = 8, strict_order)]`",
                        );
                    }
                    out.strict_order = Some(span);
                }
                sym::CRATE => krate(meta, &mut out.krate, errors)?,
                sym::LEASE_MS => {
                    skip(meta)?;
                    errors.at(
                        span,
                        "`lease_ms` is a handler knob; set it on `#[outbox::handler]`",
                    );
                }
                _ if knob(meta, &key, &mut out.knobs, errors)? => {}
                _ => {
                    skip(meta)?;
                    let hint = hint(&key);
                    errors.at(
                        span,
                        format_args!("unknown `outbox::queue` argument `{key}`{hint}; expected one of {QUEUE_KEYS}"),
                    );
                }
            }
            Ok(())
        });
        if let (Some(_), Some(delay)) = (out.strict_order, &out.delay_ms) {
            errors.at(
                delay.span,
                "`delay_ms` on a `strict_order` queue: a strict-order queue delivers in commit order and refuses scheduled delivery; remove one of them",
            );
        }
        out
    }
}

impl HandlerArgs {
    pub(crate) fn parse(args: TokenStream, errors: &mut Errors) -> Self {
        let mut out = HandlerArgs::default();
        let mut seen = std::collections::HashSet::new();
        parse_with(args, errors, |meta, errors| {
            let key = key_of(meta);
            let span = meta.path.span();
            if HANDLER_KEYS.contains(&format!("`{key}`")) && !seen.insert(key.clone()) {
                skip(meta)?;
                errors.at(span, format_args!("`{key}` set more than once"));
                return Ok(());
            }
            let mode = match key.as_str() {
                sym::TRANSACTIONAL => Some(Mode::Transactional),
                sym::LEASED => Some(Mode::Leased),
                _ => None,
            };
            if let Some(mode) = mode {
                if !meta.input.is_empty() && !meta.input.peek(syn::Token![,]) {
                    skip(meta)?;
                    errors.at(
                        span,
                        format_args!("`{key}` takes no value; write `#[outbox::handler({key})]`"),
                    );
                }
                match &out.mode {
                    Some(prev) if prev.value == mode => {
                        errors.at(span, format_args!("`{key}` set more than once"))
                    }
                    Some(_) => errors.at(
                        span,
                        "`transactional` and `leased` are exclusive; choose one mode",
                    ),
                    None => out.mode = Some(Arg { value: mode, span }),
                }
                return Ok(());
            }
            match key.as_str() {
                sym::BATCH => {
                    if !meta.input.is_empty() && !meta.input.peek(syn::Token![,]) {
                        skip(meta)?;
                        errors.at(
                            span,
                            "`batch` takes no value; write `#[outbox::handler(transactional, batch)]`",
                        );
                    }
                    out.batch = Some(span);
                }
                sym::NAME => {
                    let v = name(meta, "handler", errors)?;
                    set(&mut out.name, v, &key, span, errors);
                }
                sym::CRATE => krate(meta, &mut out.krate, errors)?,
                sym::PARTITIONS | sym::POISON => {
                    skip(meta)?;
                    errors.at(
                        span,
                        format_args!("`{key}` is a queue setting; set it on `#[outbox::queue]`"),
                    );
                }
                _ if knob(meta, &key, &mut out.knobs, errors)? => {}
                "queue" => {
                    skip(meta)?;
                    errors.at(
                        span,
                        "a handler's queue is the type of its first parameter; remove `queue` and take the message type as the first parameter",
                    );
                }
                _ => {
                    skip(meta)?;
                    let hint = hint(&key);
                    errors.at(
                        span,
                        format_args!("unknown `outbox::handler` argument `{key}`{hint}; expected one of {HANDLER_KEYS}"),
                    );
                }
            }
            Ok(())
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use quote::quote;

    use super::*;

    fn queue(args: TokenStream) -> (QueueArgs, Vec<String>) {
        let mut errors = Errors::default();
        let parsed = QueueArgs::parse(args, &mut errors);
        let messages = errors
            .into_result()
            .map_or_else(Vec::new, |e| e.into_iter().map(|e| e.to_string()).collect());
        (parsed, messages)
    }

    fn handler(args: TokenStream) -> (HandlerArgs, Vec<String>) {
        let mut errors = Errors::default();
        let parsed = HandlerArgs::parse(args, &mut errors);
        let messages = errors
            .into_result()
            .map_or_else(Vec::new, |e| e.into_iter().map(|e| e.to_string()).collect());
        (parsed, messages)
    }

    #[test]
    fn every_queue_argument() {
        let (a, errors) = queue(quote!(
            partitions = 8,
            name = "q.v1",
            max_attempts = 3,
            poison = "block",
            batch_size = 10,
            concurrency = 2,
            crate = "::x"
        ));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(a.partitions.map(|p| p.value), Some(8));
        assert_eq!(a.name.map(|n| n.value).as_deref(), Some("q.v1"));
        assert!(a.poison.is_some_and(|p| p.value == Poison::Block));
        assert_eq!(a.knobs.max_attempts.map(|v| v.value), Some(3));
        assert!(a.krate.is_some());
    }

    #[test]
    fn all_problems_are_collected() {
        let (_, errors) = queue(quote!(
            partitions = 0,
            partitions = 2,
            retries = 3,
            poison = "x",
            name = "1"
        ));
        assert_eq!(errors.len(), 5, "{errors:?}");
        assert!(
            errors[2].contains("did you mean `max_attempts`?"),
            "{}",
            errors[2]
        );
    }

    #[test]
    fn handler_modes() {
        let (a, errors) = handler(quote!(leased, lease_ms = 500));
        assert!(errors.is_empty(), "{errors:?}");
        assert!(a.mode.is_some_and(|m| m.value == Mode::Leased));
        let (_, errors) = handler(quote!(
            transactional,
            leased,
            transactional = 1,
            queue = Foo
        ));
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].contains("exclusive"), "{}", errors[0]);
    }

    #[test]
    fn syntax_errors_are_reported_not_panicked() {
        let (_, errors) = queue(quote!(partitions = 8,, name));
        assert!(!errors.is_empty());
    }
}
