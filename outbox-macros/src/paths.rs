//! Token helpers: the crate path and the `__private` paths the expansion names.

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::quote;

/// The path of the `outbox` crate in the user's crate: `::outbox` unless `crate = "…"`
/// overrides it.
pub(crate) fn krate(custom: Option<&syn::Path>) -> TokenStream {
    match custom {
        Some(path) => quote!(#path),
        None => quote!(::outbox),
    }
}

/// `<krate>::__private`.
pub(crate) fn private(custom: Option<&syn::Path>) -> TokenStream {
    let krate = krate(custom);
    quote!(#krate::__private)
}

/// `tokens` with every span set to `span`, so that rustc reports a problem with the generated
/// expression at the user's token instead of at the attribute.
pub(crate) fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut tt| {
            if let TokenTree::Group(g) = &tt {
                let mut group = proc_macro2::Group::new(g.delimiter(), respan(g.stream(), span));
                group.set_span(span);
                tt = TokenTree::Group(group);
            } else {
                tt.set_span(span);
            }
            tt
        })
        .collect()
}
