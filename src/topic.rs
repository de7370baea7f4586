//! MQTT topic patterns with named captures, and an index over many of them:
//! the rules match with them, the config checks ingest filters with them,
//! the front door and the router match ingest filters with them.
//!
//! A pattern is an MQTT filter whose single-level parts may be named:
//! `sensors/{site}/+/temperature/#`. `{name}` and `+` match exactly one
//! level, `#` matches the rest (including nothing) and must come last.
//! The index is a trie over levels, so matching a topic costs in proportion to
//! the patterns that could match it, not to the number of rules loaded.

use std::collections::HashMap;
use std::fmt;

/// One level of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Level {
    Literal(String),
    /// `+`: any single level, not captured.
    Any,
    /// `{name}`: any single level, captured under `name`.
    Capture(String),
    /// `#`: the remaining levels, zero or more.
    Rest,
}

/// A parsed, valid topic pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    levels: Vec<Level>,
}

/// Why a pattern is not valid; worded for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid topic pattern {pattern:?}: {reason}")]
pub struct PatternError {
    pub pattern: String,
    pub reason: String,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        let err = |reason: String| PatternError {
            pattern: text.to_string(),
            reason,
        };
        if text.is_empty() {
            return Err(err("a pattern cannot be empty".into()));
        }
        let parts: Vec<&str> = text.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        let mut names: Vec<&str> = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let level = match *part {
                "+" => Level::Any,
                "#" if i + 1 == parts.len() => Level::Rest,
                "#" => return Err(err("'#' is only allowed as the last level".into())),
                p if p.starts_with('{') && p.ends_with('}') => {
                    let name = &p[1..p.len() - 1];
                    if !is_identifier(name) {
                        return Err(err(format!(
                            "capture {{{name}}} needs a name of letters, digits and '_' that does not start with a digit"
                        )));
                    }
                    if names.contains(&name) {
                        return Err(err(format!("capture {{{name}}} appears twice")));
                    }
                    names.push(name);
                    Level::Capture(name.to_string())
                }
                p if p.contains(['+', '#']) => {
                    return Err(err(format!(
                        "'+' and '#' must stand alone in a level, not in {p:?}"
                    )));
                }
                p if p.contains(['{', '}']) => {
                    return Err(err(format!(
                        "a capture must be a whole level like {{device}}, not {p:?}"
                    )));
                }
                p => Level::Literal(p.to_string()),
            };
            levels.push(level);
        }
        Ok(Pattern {
            text: text.to_string(),
            levels,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Names of the captures, in order.
    pub fn capture_names(&self) -> impl Iterator<Item = &str> + Clone {
        self.levels.iter().filter_map(|l| match l {
            Level::Capture(n) => Some(n.as_str()),
            _ => None,
        })
    }

    /// The captured values for a topic this pattern matches (same order as
    /// [`capture_names`](Self::capture_names)); `None` if it does not match.
    pub fn captures<'t>(&self, topic: &'t str) -> Option<Vec<(&str, &'t str)>> {
        let mut out = Vec::new();
        let mut parts = topic.split('/');
        for (i, level) in self.levels.iter().enumerate() {
            match level {
                Level::Rest => {
                    // MQTT: wildcards at the first level do not match `$` topics.
                    return (!(i == 0 && topic.starts_with('$'))).then_some(out);
                }
                _ => {
                    let part = parts.next()?;
                    match level {
                        Level::Literal(l) if l != part => return None,
                        Level::Any | Level::Capture(_) if i == 0 && part.starts_with('$') => {
                            return None;
                        }
                        Level::Capture(name) => out.push((name.as_str(), part)),
                        _ => {}
                    }
                }
            }
        }
        parts.next().is_none().then_some(out)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Whether some topic matches both MQTT filters (`+` and `#` wildcards).
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let (mut a, mut b) = (a.split('/'), b.split('/'));
    loop {
        match (a.next(), b.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            // "a/#" also matches "a": one side ending where the other has '#'.
            (None, Some(_)) | (Some(_), None) => return false,
            (Some(x), Some(y)) if x == y || x == "+" || y == "+" => {}
            _ => return false,
        }
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Trie over pattern levels mapping topics to the ids of matching patterns.
#[derive(Debug, Clone, Default)]
pub struct PatternIndex {
    root: Node,
}

#[derive(Debug, Clone, Default)]
struct Node {
    literal: HashMap<String, Node>,
    /// `+` and `{name}` both match one level; captures are taken later.
    any: Option<Box<Node>>,
    /// Patterns that end at this node.
    here: Vec<usize>,
    /// Patterns that end with `#` below this node.
    rest: Vec<usize>,
}

impl PatternIndex {
    pub fn insert(&mut self, pattern: &Pattern, id: usize) {
        let mut node = &mut self.root;
        for level in &pattern.levels {
            node = match level {
                Level::Literal(l) => node.literal.entry(l.clone()).or_default(),
                Level::Any | Level::Capture(_) => node.any.get_or_insert_with(Default::default),
                Level::Rest => {
                    node.rest.push(id);
                    return;
                }
            };
        }
        node.here.push(id);
    }

    /// Ids of all patterns matching `topic`, ascending, each once.
    pub fn matches(&self, topic: &str) -> Vec<usize> {
        let parts: Vec<&str> = topic.split('/').collect();
        let mut out = Vec::new();
        walk(&self.root, &parts, 0, topic.starts_with('$'), &mut out);
        out.sort_unstable();
        out.dedup();
        out
    }
}

fn walk(node: &Node, parts: &[&str], depth: usize, dollar: bool, out: &mut Vec<usize>) {
    let first = depth == 0;
    if !(first && dollar) {
        out.extend_from_slice(&node.rest);
    }
    let Some((part, tail)) = parts.split_first() else {
        out.extend_from_slice(&node.here);
        return;
    };
    if let Some(next) = node.literal.get(*part) {
        walk(next, tail, depth + 1, dollar, out);
    }
    if let Some(next) = &node.any
        && !(first && dollar)
    {
        walk(next, tail, depth + 1, dollar, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn captures_take_one_level_each() {
        let pat = p("sensors/{site}/{device}/temperature");
        assert_eq!(
            pat.captures("sensors/a/t1/temperature"),
            Some(vec![("site", "a"), ("device", "t1")])
        );
        assert_eq!(pat.captures("sensors/a/t1/humidity"), None);
        assert_eq!(pat.captures("sensors/a/t1/temperature/x"), None);
        assert_eq!(pat.captures("sensors/a/temperature"), None);
    }

    #[test]
    fn hash_matches_parent_and_children_but_not_dollar_topics() {
        let pat = p("sensors/#");
        assert!(pat.captures("sensors").is_some());
        assert!(pat.captures("sensors/a/b").is_some());
        assert!(pat.captures("other/a").is_none());
        assert!(p("#").captures("$SYS/x").is_none());
        assert!(p("+/x").captures("$SYS/x").is_none());
    }

    #[test]
    fn overlapping_filters_are_detected() {
        for (a, b) in [
            ("#", "sensors/#"),
            ("a/+", "a/b"),
            ("a/#", "a"),
            ("+/x", "y/+"),
            ("a", "a"),
        ] {
            assert!(filters_overlap(a, b), "{a} {b}");
            assert!(filters_overlap(b, a), "{b} {a}");
        }
        for (a, b) in [
            ("a/#", "b/#"),
            ("a/+", "a"),
            ("a/b", "a/c"),
            ("a/+/c", "a/b/d"),
        ] {
            assert!(!filters_overlap(a, b), "{a} {b}");
            assert!(!filters_overlap(b, a), "{b} {a}");
        }
    }

    #[test]
    fn invalid_patterns_say_why() {
        for bad in ["", "a/#/b", "a/b+/c", "a/{1x}", "a/{d}/{d}", "a/x{d}"] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn index_returns_every_matching_pattern_in_id_order() {
        let mut idx = PatternIndex::default();
        let pats = [
            "sensors/+/t",
            "sensors/#",
            "sensors/{a}/t",
            "other/t",
            "#",
            "sensors/x/t",
        ];
        for (i, s) in pats.iter().enumerate() {
            idx.insert(&p(s), i);
        }
        assert_eq!(idx.matches("sensors/x/t"), vec![0, 1, 2, 4, 5]);
        assert_eq!(idx.matches("other/t"), vec![3, 4]);
        assert_eq!(idx.matches("sensors"), vec![1, 4]);
        assert_eq!(idx.matches("$SYS/t"), Vec::<usize>::new());
        // The index agrees with matching each pattern on its own.
        for topic in [
            "sensors/x/t",
            "sensors/y/t",
            "a",
            "sensors/x/t/z",
            "other/t",
        ] {
            let direct: Vec<usize> = pats
                .iter()
                .enumerate()
                .filter(|(_, s)| p(s).captures(topic).is_some())
                .map(|(i, _)| i)
                .collect();
            assert_eq!(idx.matches(topic), direct, "{topic}");
        }
    }
}
