//! Token helpers: the crate path and the `__private` paths the expansion names.

use proc_macro2::TokenStream;
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
