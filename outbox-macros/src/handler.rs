//! `#[outbox::handler]`: a typed wrapper and the registry entry, beside the unchanged fn.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned;

use crate::args::{HandlerArgs, Mode};
use crate::check::Errors;
use crate::names;
use crate::paths;

/// What the checks learned about the fn.
struct Sig {
    payload: Option<syn::Type>,
    /// Span of the context parameter's type, if there is one.
    context: Option<Span>,
    /// The types of the `State<T>` parameters after the context, in order.
    states: Vec<syn::Type>,
}

pub(crate) fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let args = HandlerArgs::parse(args, &mut errors);
    let func: syn::ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(_) => {
            let mut out = syn::Error::new(
                Span::call_site(),
                "`#[outbox::handler]` goes on an `async fn`",
            )
            .to_compile_error();
            if let Some(e) = errors.into_result() {
                out.extend(e.to_compile_error());
            }
            out.extend(item);
            return out;
        }
    };
    if args.mode.is_none() {
        errors.at(
            Span::call_site(),
            "`#[outbox::handler]` requires a mode: `#[outbox::handler(transactional)]` (runs in the acking transaction) or `#[outbox::handler(leased)]` (at-least-once, under a lease)",
        );
    }
    let mode = args.mode.as_ref().map(|m| m.value);
    if let (Some(Mode::Transactional), Some(lease)) = (mode, &args.knobs.lease_ms) {
        errors.at(lease.span, "`lease_ms` applies to `leased` handlers only");
    }
    let before = errors.count();
    let sig = check_sig(&func.sig, mode, args.batch.is_some(), &mut errors);
    // A signature the wrapper cannot call would only add secondary errors: register nothing.
    let callable = errors.count() == before;
    let mut out = TokenStream::new();
    if let Some(e) = errors.into_result() {
        out.extend(e.to_compile_error());
    }
    // The user's fn, unchanged: still callable and testable.
    out.extend(func.to_token_stream());
    if let (Some(mode), Some(payload), true) = (mode, sig.payload, callable) {
        out.extend(register(
            &args,
            mode,
            &func.sig,
            &payload,
            sig.context,
            &sig.states,
        ));
    }
    out
}

fn check_sig(sig: &syn::Signature, mode: Option<Mode>, batch: bool, errors: &mut Errors) -> Sig {
    if sig.asyncness.is_none() {
        errors.at(
            sig.fn_token.span,
            "`#[outbox::handler]` requires an `async fn`; write `async fn` here",
        );
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        let generics: &dyn ToTokens = if sig.generics.params.is_empty() {
            &sig.generics.where_clause
        } else {
            &sig.generics
        };
        errors.spanned(
            generics,
            "`#[outbox::handler]` does not support generic functions; the payload type names the queue, so write one handler per queue type",
        );
    }
    if let Some(c) = &sig.constness {
        errors.at(c.span, "`#[outbox::handler]` cannot be a `const fn`");
    }
    if let Some(abi) = &sig.abi {
        errors.at(
            abi.span(),
            "`#[outbox::handler]` cannot have an `extern` ABI",
        );
    }
    if let Some(v) = &sig.variadic {
        errors.at(v.span(), "`#[outbox::handler]` cannot be variadic");
    }
    let mut typed = Vec::new();
    for input in &sig.inputs {
        match input {
            syn::FnArg::Receiver(r) => errors.spanned(
                r,
                "`#[outbox::handler]` goes on a free `async fn`, not a method; call the method from a free fn",
            ),
            syn::FnArg::Typed(t) => typed.push(&*t.ty),
        }
    }
    let expected = match (mode, batch) {
        (Some(Mode::Transactional), false) => {
            "`async fn name(msg: Payload, txn: &DatabaseTransaction, state: State<T>, ...)` (the states are optional)"
        }
        (Some(Mode::Transactional), true) => {
            "`async fn name(msgs: Vec<Payload>, txn: &DatabaseTransaction, state: State<T>, ...)` (the states are optional)"
        }
        (Some(Mode::Leased) | None, false) => {
            "`async fn name(msg: Payload, ctx: &LeaseContext, state: State<T>, ...)` (the context and the states are optional)"
        }
        (Some(Mode::Leased) | None, true) => {
            "`async fn name(msgs: Vec<Payload>, ctx: &LeaseContext, state: State<T>, ...)` (the context and the states are optional)"
        }
    };
    let mut payload = typed.first().map(|ty| (*ty).clone());
    if payload.is_none() {
        errors.at(
            sig.paren_token.span.join(),
            format_args!(
                "`#[outbox::handler]` needs the message as its first parameter: {expected}"
            ),
        );
    }
    if let Some(syn::Type::Reference(r)) = &payload {
        errors.spanned(
            r,
            "the first parameter of a handler takes the message by value (it is decoded for each delivery); remove the `&`",
        );
    }
    if batch {
        payload = match payload.as_ref().map(vec_item) {
            Some(Some(item)) => Some(item),
            Some(None) => {
                errors.spanned(
                    typed[0],
                    format_args!(
                        "a `batch` handler takes the messages as `Vec<Payload>`: {expected}"
                    ),
                );
                None
            }
            None => None,
        };
    }
    // After the message: the context unless it is left out (leased), then `State<T>`s.
    let context = typed.get(1).copied().filter(|ty| !is_state(ty));
    let first_state = if context.is_some() { 2 } else { 1 };
    let mut states = Vec::new();
    for ty in typed.iter().skip(first_state) {
        if is_state(ty) {
            states.push((*ty).clone());
        } else if names(ty, "DatabaseConnection")
            || names(ty, "DatabaseTransaction")
            || names(ty, "LeaseContext")
        {
            errors.spanned(
                ty,
                format_args!(
                    "the context goes directly after the message, and only once: {expected}"
                ),
            );
        } else {
            errors.spanned(
                ty,
                format_args!("a handler takes application state as `outbox::State<T>` (given at start with `.state(value)`); write `State<{}>`, or remove this parameter: {expected}", strip_ref(ty)),
            );
        }
    }
    match (mode, context) {
        (Some(Mode::Transactional), Some(ty)) if names(ty, "DatabaseConnection") => errors.spanned(
            ty,
            "a `transactional` handler receives the transaction that acks the message, `&DatabaseTransaction`, not `&DatabaseConnection`: writes through another connection commit on their own and lose exactly-once; take `txn: &DatabaseTransaction` and write through it",
        ),
        (Some(Mode::Leased), Some(ty)) if names(ty, "DatabaseConnection") => errors.spanned(
            ty,
            "a `leased` handler receives `&LeaseContext`, not a connection; take the application's connection as state, `State<DatabaseConnection>`, given at start with `.state(db.clone())`",
        ),
        (Some(Mode::Transactional), None) if payload.is_some() => errors.at(
            sig.paren_token.span.join(),
            format_args!("a `transactional` handler takes the transaction as its second parameter: {expected}"),
        ),
        (Some(Mode::Transactional), Some(ty)) if names(ty, "LeaseContext") => errors.spanned(
            ty,
            "a `transactional` handler receives `&DatabaseTransaction`, not `&LeaseContext`; use `#[outbox::handler(leased)]` for a leased handler",
        ),
        (Some(Mode::Leased), Some(ty)) if names(ty, "DatabaseTransaction") => errors.spanned(
            ty,
            "a `leased` handler runs outside any transaction and receives `&LeaseContext`; use `#[outbox::handler(transactional)]` to write in the acking transaction",
        ),
        _ => {}
    }
    Sig {
        payload,
        context: context.map(Spanned::span),
        states,
    }
}

/// Whether `ty` is a path ending in `State<..>`.
fn is_state(ty: &syn::Type) -> bool {
    matches!(ty, syn::Type::Path(p) if p.path.segments.last().is_some_and(|s| {
        s.ident == "State" && matches!(s.arguments, syn::PathArguments::AngleBracketed(_))
    }))
}

/// `ty` without its outer `&`/`&mut`, as text for messages.
fn strip_ref(ty: &syn::Type) -> String {
    let ty = match ty {
        syn::Type::Reference(r) => &*r.elem,
        other => other,
    };
    ty.to_token_stream()
        .to_string()
        .replace(" < ", "<")
        .replace(" >", ">")
        .replace(" :: ", "::")
}

/// `T` of a `Vec<T>` type written as a path ending in `Vec`.
fn vec_item(ty: &syn::Type) -> Option<syn::Type> {
    let syn::Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "Vec" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first() {
        Some(syn::GenericArgument::Type(t)) if args.args.len() == 1 => Some(t.clone()),
        _ => None,
    }
}

/// Whether `ty` is a reference to a path ending in `last`.
fn names(ty: &syn::Type, last: &str) -> bool {
    let ty = match ty {
        syn::Type::Reference(r) => &*r.elem,
        other => other,
    };
    matches!(ty, syn::Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == last))
}

fn register(
    args: &HandlerArgs,
    mode: Mode,
    sig: &syn::Signature,
    payload: &syn::Type,
    context: Option<Span>,
    states: &[syn::Type],
) -> TokenStream {
    let private = paths::private(args.krate.as_ref());
    let ident = &sig.ident;
    let fn_name = ident.to_string();
    let fn_name = fn_name.strip_prefix("r#").unwrap_or(&fn_name).to_owned();
    let name = args.name.as_ref().map_or(fn_name, |n| n.value.clone());
    debug_assert!(names::name_problem(&name).is_none() || args.name.is_none());
    let lt = syn::Lifetime::new("'__outbox_a", Span::call_site());
    let batch = args.batch.is_some();
    let (cx_ty, mode_tokens) = match mode {
        Mode::Transactional => (
            quote!(#private::DatabaseTransaction),
            quote!(#private::HandlerMode::Transactional),
        ),
        Mode::Leased => (
            quote!(#private::LeaseContext),
            quote!(#private::HandlerMode::Leased),
        ),
    };
    let adapter = if batch {
        quote!(#private::typed_many)
    } else {
        quote!(#private::typed_one)
    };
    let msg_ty = if batch {
        quote!(#private::Vec<#payload>)
    } else {
        quote!(#payload)
    };
    // The context argument is spanned at the user's parameter type, so a mismatch lands there.
    let cx = match context {
        Some(span) => {
            let arg = quote_spanned!(span=> __outbox_cx);
            quote!(, #arg)
        }
        None => quote!(),
    };
    // Each state is looked up by its parameter type, spanned there: a type that cannot be
    // state is reported on the parameter.
    let state_tys: Vec<TokenStream> = states
        .iter()
        .map(|ty| quote_spanned!(ty.span()=> #ty))
        .collect();
    let state_args: Vec<syn::Ident> = (0..states.len())
        .map(|i| quote::format_ident!("__outbox_state{}", i))
        .collect();
    let (states_param, lookups) = if states.is_empty() {
        (quote!(), quote!())
    } else {
        let lookups = state_tys.iter().zip(&state_args).map(|(ty, arg)| {
            quote! {
                let #arg = match <#ty as #private::FromStates>::from_states(__outbox_states) {
                    #private::Option::Some(v) => v,
                    #private::Option::None => {
                        return #private::Box::pin(async { #private::Result::Err(#private::missing::<#ty>()) });
                    }
                };
            }
        });
        (
            quote!(, __outbox_states: &#private::States),
            quote!(#(#lookups)*),
        )
    };
    // The handler's result goes through `IntoHandlerResult`, spanned at the return type: a
    // result type it cannot return is reported there, once.
    let (ret_span, ret_ty) = match &sig.output {
        syn::ReturnType::Type(_, ty) => (ty.span(), quote!(#ty)),
        syn::ReturnType::Default => (ident.span(), quote!(())),
    };
    let result = quote_spanned!(ret_span=>
        #private::IntoHandlerResult::into_handler_result(__outbox_future.await)
    );
    // The coercion to a boxed `Send` future is spanned at the fn name: a non-`Send` future
    // is reported there, once ("future returned by `f` is not `Send`").
    let boxed = paths::respan(quote!(#private::Box::pin(__outbox_raw)), ident.span());
    let payload_spanned = quote_spanned!(payload.span()=> #payload);
    let overrides = crate::queue::overrides(&private, &args.knobs);
    let build = if states.is_empty() {
        quote!(#adapter::<#payload_spanned, #cx_ty>(__OUTBOX_QUEUE, #name, __outbox_call))
    } else {
        quote! {
            #private::with_state(
                #private::Vec::from([#(<#state_tys as #private::FromStates>::key()),*]),
                |__outbox_states: #private::Arc<#private::States>| {
                    #adapter::<#payload_spanned, #cx_ty>(
                        __OUTBOX_QUEUE,
                        #name,
                        move |__outbox_msg, __outbox_cx| __outbox_call(__outbox_msg, __outbox_cx, &__outbox_states),
                    )
                },
            )
        }
    };
    quote! {
        const _: () = {
            // The one place the payload must be a queue: a type that is not is reported once,
            // at the user's payload type (the adapters below only need a payload).
            const __OUTBOX_QUEUE: &str = <#payload_spanned as #private::Queue>::NAME;
            #[doc(hidden)]
            #[allow(clippy::needless_lifetimes)]
            fn __outbox_call<#lt>(
                __outbox_msg: #msg_ty,
                __outbox_cx: &#lt #cx_ty
                #states_param
            ) -> #private::HandlerFuture<#lt> {
                let _ = &__outbox_cx;
                #lookups
                let __outbox_raw = #ident(__outbox_msg #cx #(, #state_args)*);
                let __outbox_future: #private::Pin<#private::Box<
                    dyn #private::Future<Output = #ret_ty> + #private::Send + #lt
                >> = #boxed;
                #private::Box::pin(async move { #result })
            }
            #[doc(hidden)]
            fn __outbox_build() -> #private::HandlerSpec {
                #build
            }
            #private::inventory::submit! {
                #private::HandlerDecl::new(
                    __OUTBOX_QUEUE,
                    #name,
                    #mode_tokens,
                    __outbox_build,
                )
                .overrides(#overrides)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use quote::quote;

    use super::*;

    #[test]
    fn the_fn_survives_every_error() {
        let out = expand(
            quote!(),
            quote!(
                fn handle<T>(msg: &T, a: u8, b: u8) {}
            ),
        )
        .to_string();
        assert!(out.contains("fn handle"), "{out}");
        for needle in [
            "requires a mode",
            "requires an `async fn`",
            "generic",
            "by value",
            "application state",
        ] {
            assert!(out.contains(needle), "missing {needle:?} in {out}");
        }
        assert!(
            !out.contains("inventory"),
            "nothing registered for an uncallable fn: {out}"
        );
    }

    #[test]
    fn registers_beside_the_unchanged_fn() {
        let item = quote!(
            async fn h(m: Ping, c: &LeaseContext) -> Result<(), HandlerError> {
                Ok(())
            }
        );
        let out = expand(quote!(leased, crate = "my::outbox"), item.clone()).to_string();
        assert!(out.starts_with(&item.to_string()), "{out}");
        assert!(
            out.contains("my :: outbox :: __private :: HandlerDecl"),
            "{out}"
        );
        assert!(!out.contains("compile_error"), "{out}");
    }
}
