//! Message headers: a small map of strings that travels with a message from the enqueue to its
//! handlers, its dead letter, its replay and the brokers a relay publishes it to.

use std::collections::BTreeMap;
use std::fmt;

use crate::names::{self, HeaderNameProblem};

/// Most headers a message may carry (trace context added by the `opentelemetry` feature comes
/// on top of these).
pub const MAX_HEADERS: usize = names::MAX_HEADERS;

/// Longest header name, in bytes.
pub const MAX_HEADER_NAME_BYTES: usize = names::MAX_HEADER_NAME_BYTES;

/// Longest header value, in bytes (a W3C `tracestate` may be 512).
pub const MAX_HEADER_VALUE_BYTES: usize = 1024;

/// The headers of a message: names mapped to values, in name order.
///
/// Names are 1 to [`MAX_HEADER_NAME_BYTES`] ASCII letters, digits, `-`, `_` and `.` (so that
/// every broker accepts them as header names); they are compared exactly, so `Trace` and
/// `trace` are two headers. Values are UTF-8 text of at most [`MAX_HEADER_VALUE_BYTES`] bytes
/// without NUL, CR or LF. A message carries at most [`MAX_HEADERS`] of them. Inserting does
/// not check these limits; the enqueue does, and refuses the whole batch with
/// [`EnqueueError::InvalidHeaders`](crate::EnqueueError::InvalidHeaders) (nothing written).
/// [`Headers::validate`] runs the same check ahead of time.
///
/// ```
/// use outbox::{Headers, NewMessage};
///
/// let mut headers = Headers::new();
/// headers.insert("request-id", "r-42");
/// let message = NewMessage::new("orders", 0, "{}").headers(headers).header("tenant", "acme");
/// assert_eq!(message.get_headers().get("request-id"), Some("r-42"));
/// assert_eq!(message.get_headers().len(), 2);
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Headers(pub(crate) BTreeMap<String, String>);

/// Why a set of headers was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// More than [`MAX_HEADERS`] headers.
    #[error("{count} headers, at most {limit} allowed")]
    TooMany {
        /// How many there are.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// An empty header name.
    #[error("a header name is empty")]
    EmptyName,
    /// A header name longer than [`MAX_HEADER_NAME_BYTES`].
    #[error("header name `{name}` is {len} bytes, at most {limit} allowed")]
    NameTooLong {
        /// The name, cut to the limit.
        name: String,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A header name with a character other than ASCII letters, digits, `-`, `_` and `.`.
    #[error("header name `{name}` {}", HeaderNameProblem::BadCharacter.rule())]
    BadName {
        /// The name (with the offending characters escaped).
        name: String,
    },
    /// A header value longer than [`MAX_HEADER_VALUE_BYTES`].
    #[error("value of header `{name}` is {len} bytes, at most {limit} allowed")]
    ValueTooLong {
        /// The header name.
        name: String,
        /// The value's length in bytes.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A header value with a NUL, CR or LF character.
    #[error("value of header `{name}` contains a NUL, CR or LF character")]
    BadValue {
        /// The header name.
        name: String,
    },
}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` to `value`; returns the value it replaces. The limits are checked at
    /// enqueue (see [`Headers`]).
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) -> Option<String> {
        self.0.insert(name.into(), value.into())
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Removes `name`; returns its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        self.0.remove(name)
    }

    /// Whether `name` is set.
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The headers as `(name, value)`, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Checks the limits described on [`Headers`].
    pub fn validate(&self) -> Result<(), HeaderError> {
        if self.0.len() > MAX_HEADERS {
            return Err(HeaderError::TooMany {
                count: self.0.len(),
                limit: MAX_HEADERS,
            });
        }
        for (name, value) in &self.0 {
            check_name(name)?;
            check_value(name, value)?;
        }
        Ok(())
    }

    /// The stored form: `None` when empty, otherwise a JSON object of strings.
    pub(crate) fn to_json(&self) -> Option<String> {
        if self.0.is_empty() {
            return None;
        }
        serde_json::to_string(&self.0).ok()
    }

    /// Reads the stored form. A column that is not a JSON object of strings (written by hand)
    /// reads as no headers, with a warning, rather than failing the delivery.
    pub(crate) fn from_json(stored: Option<&str>) -> Headers {
        match stored {
            None | Some("") => Headers::new(),
            Some(text) => match serde_json::from_str(text) {
                Ok(map) => Headers(map),
                Err(e) => {
                    tracing::warn!(error = %e, "stored message headers are not a JSON object of strings; ignored");
                    Headers::new()
                }
            },
        }
    }
}

fn check_name(name: &str) -> Result<(), HeaderError> {
    match names::header_name_problem(name) {
        None => Ok(()),
        Some(HeaderNameProblem::Empty) => Err(HeaderError::EmptyName),
        Some(HeaderNameProblem::TooLong) => {
            let mut cut = MAX_HEADER_NAME_BYTES;
            while !name.is_char_boundary(cut) {
                cut -= 1;
            }
            Err(HeaderError::NameTooLong {
                name: name[..cut].to_owned(),
                len: name.len(),
                limit: MAX_HEADER_NAME_BYTES,
            })
        }
        Some(HeaderNameProblem::BadCharacter) => Err(HeaderError::BadName {
            name: name.escape_default().to_string(),
        }),
    }
}

fn check_value(name: &str, value: &str) -> Result<(), HeaderError> {
    if value.len() > MAX_HEADER_VALUE_BYTES {
        return Err(HeaderError::ValueTooLong {
            name: name.to_owned(),
            len: value.len(),
            limit: MAX_HEADER_VALUE_BYTES,
        });
    }
    if value.contains(['\0', '\r', '\n']) {
        return Err(HeaderError::BadValue {
            name: name.to_owned(),
        });
    }
    Ok(())
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter()).finish()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Headers(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl<K: Into<String>, V: Into<String>> Extend<(K, V)> for Headers {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        self.0
            .extend(iter.into_iter().map(|(k, v)| (k.into(), v.into())));
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        let ok: Headers = [("traceparent", "00-abc-def-01"), ("x.y_z-1", "")]
            .into_iter()
            .collect();
        assert_eq!(ok.validate(), Ok(()));
        let one = |k: &str, v: &str| [(k, v)].into_iter().collect::<Headers>().validate();
        assert_eq!(one("", "v"), Err(HeaderError::EmptyName));
        assert!(matches!(one("a b", "v"), Err(HeaderError::BadName { .. })));
        assert!(matches!(one("a:b", "v"), Err(HeaderError::BadName { .. })));
        assert!(matches!(
            one(&"k".repeat(129), "v"),
            Err(HeaderError::NameTooLong { len: 129, .. })
        ));
        assert!(matches!(
            one("k", &"v".repeat(1025)),
            Err(HeaderError::ValueTooLong { len: 1025, .. })
        ));
        for bad in ["a\0b", "a\rb", "a\nb"] {
            assert!(matches!(one("k", bad), Err(HeaderError::BadValue { .. })));
        }
        assert_eq!(one("k", &"é".repeat(512)), Ok(()));
        let many: Headers = (0..33).map(|i| (format!("h{i}"), "v")).collect();
        assert_eq!(
            many.validate(),
            Err(HeaderError::TooMany {
                count: 33,
                limit: 32
            })
        );
    }

    #[test]
    fn stored_form() {
        assert_eq!(Headers::new().to_json(), None);
        let h: Headers = [("b", "2"), ("a", "\"1\"")].into_iter().collect();
        let json = h.to_json();
        assert_eq!(json.as_deref(), Some(r#"{"a":"\"1\"","b":"2"}"#));
        assert_eq!(Headers::from_json(json.as_deref()), h);
        assert_eq!(Headers::from_json(None), Headers::new());
        assert_eq!(Headers::from_json(Some("[1]")), Headers::new());
    }
}
