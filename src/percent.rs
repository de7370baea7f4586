//! Percent-encoding (RFC 3986), one set of rules for every URI edgeferry
//! writes or reads: `tail`'s query string, a schema's base URI and the
//! files its `$ref`s name, a CloudEvent's `source`. The `percent-encoding`
//! crate does the work; the sets say what each place keeps.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// What every part keeps: RFC 3986's unreserved characters.
pub const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A file path (or a value that may hold `/`): unreserved and `/`.
pub const PATH: &AsciiSet = &UNRESERVED.remove(b'/');

/// `text` with every byte outside `keep` as `%XX`.
pub fn encode(text: &str, keep: &'static AsciiSet) -> String {
    utf8_percent_encode(text, keep).to_string()
}

/// `%XX` back to bytes (a URI's path or fragment: `+` is a plus sign).
pub fn decode(text: &str) -> String {
    percent_decode_str(text).decode_utf8_lossy().into_owned()
}

/// A query string's value: `+` is a space, then `%XX` as in [`decode`].
pub fn decode_query(text: &str) -> String {
    decode(&text.replace('+', " "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        assert_eq!(encode("a b/#+ü", PATH), "a%20b/%23%2B%C3%BC");
        assert_eq!(decode("a%20b/%23%2B%C3%BC"), "a b/#+ü");
        assert_eq!(decode("a+b%2Bc"), "a+b+c");
        assert_eq!(decode_query("a+b%2Bc"), "a b+c");
    }
}
