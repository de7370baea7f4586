//! Deserialize a config and report every key serde rejects, not only the
//! first. serde stops at the first error, so each rejected entry is blanked
//! out (replaced by spaces, so every offset and line number stays) and the
//! text deserialized again, until it goes through or nothing more can be
//! learnt. An operator fixing a file then sees all of its mistakes at once
//! instead of one per run.
//!
//! What is blanked: the lines of a rejected `key = value` (all of a
//! multi-line value), or a rejected table's whole section (an unknown
//! `[table]`). It stops at the first error it cannot blank without making
//! up others: no location, a syntax error (the text cannot be read past
//! it), or no progress; and after 100 errors, saying so. A `missing field`
//! for a key it blanked in that table is its own doing: that table goes
//! too, and the search goes on.

use std::ops::Range;
use std::path::Path;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diagnostic::Diagnostic;

/// More than any real file has; a bound on the retries.
const MAX_ERRORS: usize = 100;

/// What deserializing with every error found gives.
#[derive(Debug)]
pub struct Parsed<T> {
    /// The value, if the text went through once its rejected entries were
    /// blanked (their defaults then apply).
    pub value: Option<T>,
    /// Every rejection, in line order.
    pub errors: Vec<Diagnostic>,
    /// The table sections (1-based line ranges, and their header lines,
    /// "" for the top) that had an entry blanked: what later checks find
    /// there may be a consequence of a default standing in for a rejected
    /// value, not a mistake of its own.
    pub touched: Vec<(Range<usize>, String)>,
}

pub fn deserialize<T: DeserializeOwned>(text: &str, name: &Path) -> Parsed<T> {
    // A syntax error ends it: nothing after it can be read reliably.
    if let Err(e) = toml::from_str::<toml::Table>(text) {
        return Parsed {
            value: None,
            errors: vec![Diagnostic::from_toml(name, text, &e)],
            touched: Vec::new(),
        };
    }
    let mut masked = text.to_string();
    let mut errors: Vec<Diagnostic> = Vec::new();
    // Each blanked entry's key and the section it was in.
    let mut blanked: Vec<(String, Range<usize>)> = Vec::new();
    let mut touched = Vec::new();
    let mut touch = |masked: &str, sect: &Range<usize>| {
        let header = masked[sect.clone()].lines().next().unwrap_or("").trim();
        let header = if header.starts_with('[') { header } else { "" };
        let lines = crate::diagnostic::line_col(text, sect.start).0
            ..crate::diagnostic::line_col(text, sect.end).0 + 1;
        touched.push((lines, header.to_string()));
    };
    let value = loop {
        let err = match toml::from_str::<T>(&masked) {
            Ok(v) => break Some(v),
            Err(e) => e,
        };
        let Some(span) = err.span() else {
            errors.push(Diagnostic::from_toml(name, text, &err));
            break None;
        };
        // A required key this loop blanked (its value was wrong) is not
        // missing too: its table goes instead, and the search goes on.
        let missing = err
            .message()
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next());
        let here = section(&masked, span.start);
        if missing.is_some_and(|k| blanked.iter().any(|(b, s)| b == k && *s == here)) {
            touch(&masked, &here);
            blank(&mut masked, here);
            continue;
        }
        let diagnostic = Diagnostic::from_toml(name, text, &err);
        if errors
            .iter()
            .any(|d| d.line == diagnostic.line && d.message == diagnostic.message)
        {
            break None; // no progress
        }
        errors.push(diagnostic);
        if errors.len() >= MAX_ERRORS {
            errors.sort_by_key(|d| d.line);
            errors.push(Diagnostic::whole_file(
                name,
                format!("stopped after {MAX_ERRORS} errors; fix these and check again"),
            ));
            return Parsed {
                value: None,
                errors,
                touched,
            };
        }
        let range = entry(&masked, span);
        let sect = section(&masked, range.start);
        // An unknown key or table had no value standing in for it; a wrong
        // one has its default now, which later checks must not judge.
        if !err.message().starts_with("unknown field") {
            touch(&masked, &sect);
        }
        blanked.push((key_of(&masked[range.clone()]), sect));
        blank(&mut masked, range);
        // Blanking a line of a multi-line value leaves the rest of it.
        if toml::from_str::<toml::Table>(&masked).is_err() {
            break None;
        }
    };
    errors.sort_by_key(|d| d.line);
    Parsed {
        value,
        errors,
        touched,
    }
}

/// The key an entry sets (`a` of `a = 1`, `x` of `[x]`), as serde names it.
fn key_of(entry: &str) -> String {
    let first = entry.trim_start().lines().next().unwrap_or("");
    let key = match first.strip_prefix('[') {
        Some(header) => header
            .trim_start_matches('[')
            .split(']')
            .next()
            .unwrap_or(""),
        None => first.split('=').next().unwrap_or(""),
    };
    let last = key.rsplit('.').next().unwrap_or(key);
    last.trim().trim_matches('"').trim_matches('\'').to_string()
}

/// The byte range to blank for an error at `span`: the whole `key = value`
/// entry it falls in (all the lines of a multi-line value), else, at a
/// table header, that table's whole section, else the span's lines.
fn entry(text: &str, span: Range<usize>) -> Range<usize> {
    let lines =
        |r: Range<usize>| line_start(text, r.start)..line_end(text, r.end.max(r.start + 1) - 1);
    if let Ok(root) = DeTable::parse(text) {
        let mut found = Vec::new();
        entries(text, root.get_ref(), &mut found);
        if let Some(e) = found.into_iter().find(|e| e.contains(&span.start)) {
            return lines(e);
        }
    }
    if text[line_start(text, span.start)..]
        .trim_start()
        .starts_with('[')
    {
        return section(text, span.start);
    }
    lines(span)
}

/// Every `key = value` entry of the header tables (and the root): from
/// its key to the end of its value. An inline table is one entry.
fn entries(text: &str, table: &DeTable, out: &mut Vec<Range<usize>>) {
    let header = |v: &Spanned<DeValue>| !text[v.span()].starts_with('{');
    for (key, value) in table.iter() {
        match value.get_ref() {
            DeValue::Table(t) if header(value) => entries(text, t, out),
            DeValue::Array(items)
                if items
                    .iter()
                    .all(|i| matches!(i.get_ref(), DeValue::Table(_)) && header(i))
                    && !items.is_empty()
                    && text[value.span()].starts_with("[[") =>
            {
                for i in items.iter() {
                    if let DeValue::Table(t) = i.get_ref() {
                        entries(text, t, out);
                    }
                }
            }
            _ => out.push(key.span().start..value.span().end),
        }
    }
}

/// The table section around `pos`: from its header line (or the file's
/// start) to the next header line (or the end).
fn section(text: &str, pos: usize) -> Range<usize> {
    let header = |l: &str| l.trim_start().starts_with('[');
    let mut start = line_start(text, pos);
    while start > 0 && !header(&text[start..line_end(text, start)]) {
        start = line_start(text, start - 1);
    }
    let mut end = line_end(text, pos);
    while end < text.len() {
        let next = end + 1;
        if header(&text[next..line_end(text, next)]) {
            break;
        }
        end = line_end(text, next);
    }
    start..end
}

fn line_start(text: &str, pos: usize) -> usize {
    text[..pos.min(text.len())].rfind('\n').map_or(0, |i| i + 1)
}

fn line_end(text: &str, pos: usize) -> usize {
    let pos = pos.min(text.len());
    text[pos..].find('\n').map_or(text.len(), |i| pos + i)
}

/// Spaces instead of the bytes in `range` (newlines kept): the same length,
/// so spans and line numbers still point into the original text.
fn blank(text: &mut String, range: Range<usize>) {
    let blanked: String = text[range.clone()]
        .chars()
        .map(|c| match c {
            '\n' => "\n".to_string(),
            c => " ".repeat(c.len_utf8()),
        })
        .collect();
    text.replace_range(range, &blanked);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        a: A,
        #[serde(default)]
        b: Option<B>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct A {
        #[serde(default)]
        n: u32,
        #[serde(default)]
        list: Vec<u32>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct B {
        url: String,
    }

    fn run(text: &str) -> (Option<File>, Vec<(usize, String)>) {
        let p = deserialize::<File>(text, Path::new("f.toml"));
        (
            p.value,
            p.errors.into_iter().map(|d| (d.line, d.message)).collect(),
        )
    }

    #[test]
    fn every_rejected_key_is_reported_in_line_order_and_the_rest_still_loads() {
        let text = "[a]\nn = \"x\"\nbogus = 1\nlist = [\n  1,\n  -2,\n]\n[nope]\nk = 1\n[b]\nurl = \"u\"\n";
        let (v, e) = run(text);
        let lines: Vec<usize> = e.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, vec![2, 3, 6, 8], "{e:#?}");
        assert!(e[1].1.contains("unknown field `bogus`"), "{e:#?}");
        let v = v.expect("the rest loads");
        assert_eq!(v.a.n, 0, "a rejected value gets its default");
        assert!(v.a.list.is_empty(), "so does a rejected list");
        assert_eq!(
            v.b.unwrap().url,
            "u",
            "the table after a blanked one is intact"
        );
    }

    #[test]
    fn a_syntax_error_is_the_only_error_reported() {
        let (v, e) = run("[a]\nn = \"x\"\nlist = [1,\n");
        assert!(v.is_none());
        assert_eq!(e.len(), 1, "{e:#?}");
    }

    #[test]
    fn a_missing_field_caused_by_blanking_is_not_reported_but_a_real_one_is() {
        let (v, e) = run("[b]\nurl = 5\n[a]\nn = \"x\"\n");
        assert_eq!(e.len(), 2, "the bad url, and the search went on: {e:#?}");
        assert_eq!((e[0].0, e[1].0), (2, 4));
        assert!(
            v.unwrap().b.is_none(),
            "the table whose key was refused is gone"
        );
        let (_, e) = run("[b]\nbogus = 1\n");
        assert_eq!(e.len(), 2, "{e:#?}");
        assert!(
            e[0].1.contains("missing field `url`") || e[1].1.contains("missing field `url`"),
            "{e:#?}"
        );
    }

    #[test]
    fn the_sections_touched_are_named_with_their_lines() {
        // A wrong value touches its table (a default stands in for it); an
        // unknown key does not.
        let p = deserialize::<File>(
            "[a]\nn = \"x\"\n[b]\nurl = \"u\"\nbogus = 2\n",
            Path::new("f.toml"),
        );
        assert_eq!(p.errors.len(), 2);
        assert_eq!(p.touched, vec![(1..3, "[a]".to_string())]);
        assert_eq!(key_of("  bogus = 2"), "bogus");
        assert_eq!(key_of("[upstream.cloud]"), "cloud");
        assert_eq!(key_of("a.\"b\" = 1"), "b");
    }

    #[test]
    fn the_search_stops_after_a_hundred_errors_and_says_so() {
        let keys: String = (0..150).map(|i| format!("bad{i:03} = 1\n")).collect();
        let p = deserialize::<File>(&format!("[a]\n{keys}"), Path::new("f.toml"));
        assert_eq!(p.errors.len(), MAX_ERRORS + 1);
        assert!(
            p.errors
                .last()
                .unwrap()
                .message
                .contains("stopped after 100 errors")
        );
        let lines: Vec<usize> = p.errors[..MAX_ERRORS].iter().map(|d| d.line).collect();
        assert!(
            lines.windows(2).all(|w| w[0] < w[1]),
            "in line order: {lines:?}"
        );
    }

    #[test]
    fn blanking_keeps_offsets_even_with_multibyte_text() {
        let mut s = "k = \"é\"\nx = 1\n".to_string();
        let len = s.len();
        blank(&mut s, 0..8);
        assert_eq!(s.len(), len);
        assert!(s.ends_with("\nx = 1\n"));
    }
}
