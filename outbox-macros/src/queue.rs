//! `#[outbox::queue]`: the `Queue` impl and the registry entry, beside the unchanged item.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::spanned::Spanned;

use crate::args::{Knobs, Poison, QueueArgs, sym};
use crate::check::{self, Errors};
use crate::names;
use crate::paths;

/// The routing key: a field access on `self`.
enum Key {
    Named(syn::Ident),
    Index(syn::Index),
}

impl ToTokens for Key {
    fn to_tokens(&self, tokens: &mut TokenStream) {
        match self {
            Key::Named(i) => i.to_tokens(tokens),
            Key::Index(i) => i.to_tokens(tokens),
        }
    }
}

pub(crate) fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let args = QueueArgs::parse(args, &mut errors);
    let mut parsed: syn::Item = match syn::parse2(item.clone()) {
        Ok(i) => i,
        Err(_) => {
            // Not an item we can read: keep the user's tokens and say what is accepted.
            let e = syn::Error::new(
                Span::call_site(),
                "`#[outbox::queue]` goes on a struct or an enum",
            );
            let mut out = e.to_compile_error();
            if let Some(more) = errors.into_result() {
                out.extend(more.to_compile_error());
            }
            out.extend(item);
            return out;
        }
    };
    let (ident, keys) = match &mut parsed {
        syn::Item::Struct(s) => {
            let plain = check_generics(&s.generics, &mut errors);
            let keys = take_keys(s.fields.iter_mut(), true, &mut errors);
            (plain.then(|| s.ident.clone()), keys)
        }
        syn::Item::Enum(e) => {
            let plain = check_generics(&e.generics, &mut errors);
            for v in &mut e.variants {
                take_keys(v.fields.iter_mut(), false, &mut errors);
            }
            (plain.then(|| e.ident.clone()), Keys::default())
        }
        other => {
            errors.at(
                item_keyword_span(other),
                "`#[outbox::queue]` goes on a struct or an enum, the message type of the queue",
            );
            (None, Keys::default())
        }
    };
    if !args.partitions_written {
        errors.at(
            Span::call_site(),
            format_args!(
                "`#[outbox::queue]` requires `{} = N` (1 to {}), as in `#[outbox::queue(partitions = 8)]`",
                sym::PARTITIONS,
                names::MAX_PARTITIONS
            ),
        );
    }
    let mut out = TokenStream::new();
    if let Some(e) = errors.into_result() {
        out.extend(e.to_compile_error());
    }
    out.extend(parsed.to_token_stream());
    if let Some(ident) = ident {
        // Expand with defaults even after an error: the type stays a queue, so its uses
        // elsewhere do not add secondary errors.
        out.extend(impl_queue(&args, &ident, &keys));
    }
    out
}

fn item_keyword_span(item: &syn::Item) -> Span {
    match item {
        syn::Item::Fn(f) => f.sig.fn_token.span,
        syn::Item::Union(u) => u.union_token.span,
        syn::Item::Type(t) => t.type_token.span,
        other => other.span(),
    }
}

/// Whether the type has no generics (a queue needs one concrete type).
fn check_generics(generics: &syn::Generics, errors: &mut Errors) -> bool {
    let plain = generics.params.is_empty();
    if !plain {
        errors.spanned(
            generics,
            "`#[outbox::queue]` does not support generic types: a queue has one durable name; declare a concrete type per queue",
        );
    }
    plain
}

/// The fields that `#[outbox(key)]`, `#[outbox(dedup)]` and `#[outbox(header)]` name.
#[derive(Default)]
struct Keys {
    /// The routing key.
    key: Option<Key>,
    /// The deduplication key.
    dedup: Option<Key>,
    /// The header fields: header name and field, in field order.
    headers: Vec<(String, Key)>,
}

impl Key {
    fn of(field: &syn::Field, index: usize) -> Key {
        match &field.ident {
            Some(i) => Key::Named(i.clone()),
            None => Key::Index(syn::Index {
                index: index as u32,
                span: field.ty.span(),
            }),
        }
    }

    fn span(&self) -> Span {
        match self {
            Key::Named(i) => i.span(),
            Key::Index(i) => i.span,
        }
    }
}

/// The header name of `#[outbox(header)]` (the field's name) or `#[outbox(header = "…")]`,
/// checked; `None` after an error.
fn header_name(
    meta: &syn::meta::ParseNestedMeta<'_>,
    field: &syn::Field,
    errors: &mut Errors,
) -> syn::Result<Option<String>> {
    let (name, span) = if meta.input.peek(syn::Token![=]) {
        match crate::args::string(meta, sym::HEADER, errors)? {
            Some(lit) => (lit.value(), lit.span()),
            None => return Ok(None),
        }
    } else if let Some(ident) = &field.ident {
        let name = ident.to_string();
        let name = name.strip_prefix("r#").unwrap_or(&name).to_owned();
        (name, meta.path.span())
    } else {
        errors.at(
            meta.path.span(),
            "a tuple field has no name to use as the header name; write `#[outbox(header = \"…\")]`",
        );
        return Ok(None);
    };
    if let Some(problem) = names::header_name_problem(&name) {
        let rule = problem.rule();
        if name.is_empty() {
            errors.at(span, format_args!("a header name {rule}"));
        } else {
            errors.at(span, format_args!("header name `{name}` {rule}"));
        }
        return Ok(None);
    }
    Ok(Some(name))
}

/// Removes every `#[outbox(…)]` helper attribute from `fields` and returns the key fields.
fn take_keys<'a>(
    fields: impl Iterator<Item = &'a mut syn::Field>,
    allowed: bool,
    errors: &mut Errors,
) -> Keys {
    let mut key: Option<(Key, syn::Attribute)> = None;
    let mut dedup: Option<(Key, syn::Attribute)> = None;
    let mut headers: Vec<(String, Key, Span)> = Vec::new();
    for (index, field) in fields.enumerate() {
        let mut keep = Vec::with_capacity(field.attrs.len());
        for attr in std::mem::take(&mut field.attrs) {
            if !attr.path().is_ident("outbox") {
                keep.push(attr);
                continue;
            }
            let (mut is_key, mut is_dedup) = (false, false);
            let mut header: Option<(String, Span)> = None;
            let parsed = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident(sym::KEY) {
                    is_key = true;
                } else if meta.path.is_ident(sym::DEDUP) {
                    is_dedup = true;
                } else if meta.path.is_ident(sym::HEADER) {
                    let span = meta.path.span();
                    if !allowed {
                        errors.at(
                            span,
                            "`#[outbox(header)]` is supported on struct fields only; give an enum queue's headers at enqueue (`enqueue_with_headers`)",
                        );
                    }
                    if let Some(name) = header_name(&meta, field, errors)? {
                        header = Some((name, span));
                    }
                } else {
                    let name = meta.path.to_token_stream().to_string();
                    errors.at(
                        meta.path.span(),
                        format_args!(
                            "unknown `outbox` field attribute `{name}`; expected `key`, `dedup` or `header`"
                        ),
                    );
                }
                Ok(())
            });
            if let Err(e) = parsed {
                errors.push(e);
            }
            if let Some((name, span)) = header.filter(|_| allowed) {
                if let Some((_, _, first)) = headers.iter().find(|(n, _, _)| *n == name) {
                    let mut e = syn::Error::new(
                        span,
                        format!(
                            "two fields carry header `{name}`; a message has one value per header name"
                        ),
                    );
                    e.combine(syn::Error::new(
                        *first,
                        format!("first header `{name}` here"),
                    ));
                    errors.push(e);
                } else if headers.len() == names::MAX_HEADERS {
                    errors.at(
                        span,
                        format_args!(
                            "more than {} `#[outbox(header)]` fields; a message carries at most {} headers",
                            names::MAX_HEADERS,
                            names::MAX_HEADERS
                        ),
                    );
                } else {
                    headers.push((name, Key::of(field, index), span));
                }
            }
            for (wanted, word, slot, what) in [
                (
                    is_key,
                    sym::KEY,
                    &mut key,
                    "a queue has one routing key (combine the parts in one field)",
                ),
                (
                    is_dedup,
                    sym::DEDUP,
                    &mut dedup,
                    "a message has one deduplication key (combine the parts in one field)",
                ),
            ] {
                if !wanted {
                    continue;
                }
                if !allowed {
                    errors.spanned(
                        &attr,
                        format_args!(
                            "`#[outbox({word})]` is supported on struct fields only; an enum queue spreads its messages over the partitions"
                        ),
                    );
                } else if let Some((_, first)) = slot.as_ref() {
                    let mut e = syn::Error::new_spanned(
                        &attr,
                        format!("`#[outbox({word})]` on more than one field; {what}"),
                    );
                    e.combine(syn::Error::new_spanned(
                        first,
                        format!("first `#[outbox({word})]` here"),
                    ));
                    errors.push(e);
                } else {
                    *slot = Some((Key::of(field, index), attr.clone()));
                }
            }
        }
        field.attrs = keep;
    }
    Keys {
        key: key.map(|(k, _)| k),
        dedup: dedup.map(|(k, _)| k),
        headers: headers.into_iter().map(|(n, k, _)| (n, k)).collect(),
    }
}

pub(crate) fn overrides(private: &TokenStream, knobs: &Knobs) -> TokenStream {
    let mut calls = TokenStream::new();
    if let Some(a) = &knobs.max_attempts {
        let v = a.value;
        calls.extend(quote!(.max_attempts(#v)));
    }
    if let Some(a) = &knobs.batch_size {
        let v = a.value;
        calls.extend(quote!(.batch_size(#v)));
    }
    if let Some(a) = &knobs.concurrency {
        let v = a.value;
        calls.extend(quote!(.concurrency(#v)));
    }
    if let Some(a) = &knobs.lease_ms {
        let v = a.value;
        calls.extend(quote!(.lease(::core::time::Duration::from_millis(#v))));
    }
    quote!(#private::Overrides::NONE #calls)
}

fn impl_queue(args: &QueueArgs, ident: &syn::Ident, keys: &Keys) -> TokenStream {
    let private = paths::private(args.krate.as_ref());
    let type_name = ident.to_string();
    let type_name = type_name.strip_prefix("r#").unwrap_or(&type_name);
    let name = match &args.name {
        Some(n) => n.value.clone(),
        None => check::snake_case(type_name),
    };
    let partitions = args.partitions.as_ref().map_or(1, |p| p.value);
    let partition = match &keys.key {
        Some(key) => quote!(#private::partition_for_key(&self.#key, #partitions)),
        None => quote!(#private::spread(#partitions)),
    };
    // `Display` of the field, spanned there so a field without it is reported at the field.
    let dedup = keys.dedup.as_ref().map(|field| {
        let text = quote_spanned!(field.span()=> #private::DedupKey::dedup_text(&self.#field));
        quote! {
            #[inline]
            fn dedup_key(&self) -> #private::Option<::std::string::String> {
                #private::Option::Some(#text)
            }
        }
    });
    let headers = (!keys.headers.is_empty()).then(|| {
        let inserts = keys.headers.iter().map(|(name, field)| {
            let text =
                quote_spanned!(field.span()=> #private::HeaderValue::header_text(&self.#field));
            quote!(headers.insert(#name, #text);)
        });
        quote! {
            fn headers(&self) -> #private::Headers {
                let mut headers = #private::Headers::new();
                #(#inserts)*
                headers
            }
        }
    });
    let policy = match args.poison.as_ref().map(|p| p.value) {
        Some(Poison::Block) => quote!(#private::PoisonPolicy::Block),
        Some(Poison::DeadLetter) | None => quote!(#private::PoisonPolicy::DeadLetter),
    };
    let overrides = overrides(&private, &args.knobs);
    let delay = args.delay_ms.as_ref().map(|d| {
        let ms = d.value;
        quote!(const DELAY: #private::Option<::core::time::Duration> =
            #private::Option::Some(::core::time::Duration::from_millis(#ms));)
    });
    let strict = args.strict_order.map(|_| {
        quote!(
            const SCHEDULING: ::core::primitive::bool = false;
        )
    });
    let decl = format_ident!("__OUTBOX_QUEUE");
    // The impl is spanned at the type name, so a missing `Serialize` lands there.
    let impl_head = quote_spanned!(ident.span()=> impl #private::Queue for #ident);
    quote! {
        const _: () = {
            #[automatically_derived]
            #impl_head {
                const NAME: &'static ::core::primitive::str = #name;
                const PARTITIONS: ::core::primitive::u32 = #partitions;
                #strict
                #delay
                #[inline]
                fn partition(&self) -> ::core::primitive::u32 {
                    #partition
                }
                #dedup
                #headers
            }
            const #decl: #private::QueueDecl = #private::QueueDecl::new(
                #name,
                #partitions,
                ::core::concat!(::core::module_path!(), "::", #type_name),
            )
            .policy(#policy)
            .overrides(#overrides);
            #private::inventory::submit! { #decl }
        };
    }
}

#[cfg(test)]
mod tests {
    use quote::quote;

    use super::*;

    #[test]
    fn key_attribute_is_removed_and_used() {
        let out = expand(
            quote!(partitions = 4),
            quote!(
                struct S {
                    #[serde(default)]
                    #[outbox(key)]
                    id: u64,
                }
            ),
        )
        .to_string();
        assert!(!out.contains("outbox (key)"), "{out}");
        assert!(out.contains("serde (default)"), "{out}");
        assert!(
            out.contains("partition_for_key (& self . id , 4u32)"),
            "{out}"
        );
        assert!(out.contains("\"s\""), "{out}");
    }

    #[test]
    fn errors_keep_the_item_and_the_impl() {
        let out = expand(
            quote!(partitions = 0),
            quote!(
                struct OrderPlaced;
            ),
        )
        .to_string();
        assert!(out.contains("compile_error"), "{out}");
        assert!(out.contains("struct OrderPlaced ;"), "{out}");
        assert!(
            out.contains("impl :: outbox :: __private :: Queue for OrderPlaced"),
            "{out}"
        );
    }

    #[test]
    fn not_a_type_keeps_the_tokens() {
        let out = expand(
            quote!(partitions = 1),
            quote!(
                fn f() {}
            ),
        )
        .to_string();
        assert!(
            out.contains("compile_error") && out.contains("fn f"),
            "{out}"
        );
    }
}
