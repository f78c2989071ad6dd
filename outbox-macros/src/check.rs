//! Checks that need no types: names, ranges, and the errors collected along the way.

use proc_macro2::Span;

/// Collects every error of one expansion, to be reported at once (serde's `Ctxt`).
#[derive(Default)]
pub(crate) struct Errors {
    combined: Option<syn::Error>,
    count: usize,
}

impl Errors {
    /// How many errors were recorded so far.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    pub(crate) fn push(&mut self, error: syn::Error) {
        self.count += 1;
        match &mut self.combined {
            Some(e) => e.combine(error),
            None => self.combined = Some(error),
        }
    }

    pub(crate) fn at(&mut self, span: Span, message: impl std::fmt::Display) {
        self.push(syn::Error::new(span, message));
    }

    /// An error spanning all of `tokens` (first to last token, also on stable).
    pub(crate) fn spanned(
        &mut self,
        tokens: impl quote::ToTokens,
        message: impl std::fmt::Display,
    ) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    pub(crate) fn into_result(self) -> Option<syn::Error> {
        self.combined
    }
}

/// `OrderPlaced` → `order_placed`, `HTTPRequest` → `http_request`, `V2Event` → `v2_event`.
pub(crate) fn snake_case(ident: &str) -> String {
    let chars: Vec<char> = ident.chars().collect();
    let mut out = String::with_capacity(ident.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let prev = i.checked_sub(1).map(|p| chars[p]);
            let next = chars.get(i + 1).copied();
            let boundary = match prev {
                None | Some('_') => false,
                Some(p) => {
                    p.is_lowercase()
                        || p.is_ascii_digit()
                        || (p.is_uppercase() && next.is_some_and(char::is_lowercase))
                }
            };
            if boundary {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case_of_type_names() {
        for (from, to) in [
            ("OrderPlaced", "order_placed"),
            ("HTTPRequest", "http_request"),
            ("Email", "email"),
            ("V2Event", "v2_event"),
            ("ABC", "abc"),
            ("already_snake", "already_snake"),
            ("Event2Sent", "event2_sent"),
        ] {
            assert_eq!(snake_case(from), to, "{from}");
        }
    }
}
