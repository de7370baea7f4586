//! The embedded broker's access control list, read from a Mosquitto
//! `acl_file`, so an operator moving from Mosquitto keeps the file they have:
//!
//! ```text
//! # Clients without a username (lines before the first `user`).
//! topic read $SYS/#
//!
//! user alice
//! topic readwrite sensors/alice/#
//! topic deny sensors/alice/secret
//!
//! # Every client, wherever the line is: %c is the client id, %u the username.
//! pattern write devices/%c/state
//! pattern read sensors/%u/#
//! ```
//!
//! [`Acl::parse`] compiles the file once; the checks then run per SUBSCRIBE,
//! per PUBLISH and per delivery without allocating. The rules, as Mosquitto
//! 2.x applies them (its `plugins/acl-file` and `lib/util_topic.c`), except
//! where noted:
//!
//! - Default deny: a client may do only what some entry grants.
//! - `topic` lines before the first `user` line are for anonymous clients
//!   only; after `user <name>`, for that username only. `pattern` lines are
//!   for every client. The access word is optional (`readwrite`), and the
//!   filter is everything after it, spaces included.
//! - A matching `deny` refuses, whatever grants the access. Stricter than
//!   Mosquitto, which checks a user's section before the patterns and stops
//!   at the first decision, so a user-section grant beats a `pattern deny`
//!   there; here a deny from any section or pattern wins.
//! - `$` topics (`$SYS/...`) are reached only by a filter whose first level
//!   is literal text starting with `$`: `#`, `+/...` and `%c/...` never
//!   match them (MQTT 4.7.2; Mosquitto 2.1 does the same for patterns).
//! - `%c` and `%u` are replaced wherever they appear in a `pattern` filter
//!   (Mosquitto 2.0 replaces text; 2.1 only whole levels, which this also
//!   covers). A pattern whose client id or username is empty or contains
//!   `+`, `#` or `/` grants that client nothing, because substituting it
//!   would turn the pattern into a wildcard or into other clients' levels
//!   (Mosquitto refuses ids with `+` or `#` the same way). A `deny` pattern
//!   that cannot be filled in that way refuses everything to that client: it
//!   was written to protect something, and which levels it meant cannot be
//!   told. A `%u` pattern does not apply to anonymous clients at all.
//! - SUBSCRIBE: see [`Acl::can_subscribe`]. Mosquitto's `acl_file` does not
//!   check SUBSCRIBE (its check returns "allowed", marked FIXME) and relies on
//!   the per-delivery read check; this refuses up front instead, so a client
//!   is not left with a subscription that silently delivers nothing, and an
//!   embedding that cannot check every delivery is still safe.
//! - `topic read` (an access word and nothing after it) is an error here;
//!   Mosquitto would take it as the topic `read`, which is seldom meant.

use std::collections::HashMap;
use std::path::Path;

use crate::diagnostic::Diagnostic;

/// MQTT's limit on a topic or filter: a two-byte length prefix.
const MAX_TOPIC_LEN: usize = 65_535;

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Receive messages (SUBSCRIBE and delivery).
    Read,
    /// Publish messages.
    Write,
}

/// A compiled ACL file: immutable, cheap to share in an `Arc`.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    /// `topic` lines before the first `user` line, for clients that connect
    /// without a username.
    anonymous: Rules,
    /// `topic` lines after `user <name>`, by name, so one lookup finds a
    /// client's section however many users the file has.
    users: HashMap<String, Rules>,
    /// `pattern` lines, wherever they appear: they apply to every client.
    patterns: Rules,
}

/// The entries of one section (or of all patterns).
#[derive(Debug, Clone, Default)]
struct Rules {
    /// `deny` entries, kept apart because any one that matches refuses
    /// access, whatever the grants say, and so they are checked first.
    denies: Vec<Filter>,
    /// `read`, `write` and `readwrite` entries.
    grants: Vec<Grant>,
}

impl Rules {
    fn add(&mut self, permission: Permission, filter: Filter) {
        let (read, write) = match permission {
            Permission::Deny => return self.denies.push(filter),
            Permission::Read => (true, false),
            Permission::Write => (false, true),
            Permission::ReadWrite => (true, true),
        };
        self.grants.push(Grant {
            filter,
            read,
            write,
        });
    }

    fn len(&self) -> usize {
        self.denies.len() + self.grants.len()
    }
}

/// One granting entry.
#[derive(Debug, Clone)]
struct Grant {
    /// The topics it grants.
    filter: Filter,
    /// It grants subscribing and delivery (`read`, `readwrite`).
    read: bool,
    /// It grants publishing (`write`, `readwrite`).
    write: bool,
}

impl Grant {
    fn grants(&self, access: Access) -> bool {
        match access {
            Access::Read => self.read,
            Access::Write => self.write,
        }
    }
}

/// The access word of a `topic` or `pattern` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Permission {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Permission {
    fn parse(word: &str) -> Option<Permission> {
        match word {
            "read" => Some(Permission::Read),
            "write" => Some(Permission::Write),
            "readwrite" => Some(Permission::ReadWrite),
            "deny" => Some(Permission::Deny),
            _ => None,
        }
    }
}

/// An entry's topic filter, split into levels once at load so that a check
/// compares level by level without building the substituted string.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Filter {
    /// The levels between `/`; a `Multi` can only be last.
    levels: Vec<Level>,
    /// The first level is literal text starting with `$`: only such a
    /// filter reaches `$` topics.
    dollar: bool,
    /// Some level holds `%c`: whether it applies depends on the client id.
    uses_client_id: bool,
    /// Some level holds `%u`: whether it applies depends on the username.
    uses_username: bool,
}

/// One level of a compiled filter.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    /// Text that must equal the topic's level.
    Exact(String),
    /// `+`: any one level.
    Single,
    /// `#`: this level and all below, or none (`a/#` matches `a`).
    Multi,
    /// A `pattern` level holding `%c` or `%u`, equal to the topic's level
    /// once they are replaced.
    Template(Vec<Piece>),
}

/// Part of a [`Level::Template`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Copied from the file.
    Text(String),
    /// `%c`.
    ClientId,
    /// `%u`.
    Username,
}

impl Filter {
    /// A filter from a `topic` line: `%c` and `%u` are plain text there.
    fn literal(text: &str) -> Filter {
        Filter::compile(text, false)
    }

    /// A filter from a `pattern` line.
    fn pattern(text: &str) -> Filter {
        Filter::compile(text, true)
    }

    /// `text` must have passed [`filter_problem`].
    fn compile(text: &str, substitute: bool) -> Filter {
        let levels: Vec<Level> = text
            .split('/')
            .map(|level| match level {
                "+" => Level::Single,
                "#" => Level::Multi,
                _ if substitute && (level.contains("%c") || level.contains("%u")) => {
                    Level::Template(pieces(level))
                }
                _ => Level::Exact(level.to_string()),
            })
            .collect();
        let uses = |wanted: &Piece| {
            levels.iter().any(|level| match level {
                Level::Template(pieces) => pieces.contains(wanted),
                _ => false,
            })
        };
        Filter {
            dollar: text.starts_with('$'),
            uses_client_id: uses(&Piece::ClientId),
            uses_username: uses(&Piece::Username),
            levels,
        }
    }

    /// Does this filter match the topic `topic` (no wildcards in it)?
    fn matches_topic(&self, topic: &str, subst: Subst<'_>) -> bool {
        if topic.starts_with('$') != self.dollar {
            return false;
        }
        let mut topic_levels = topic.split('/');
        for level in &self.levels {
            let Some(part) = topic_levels.next() else {
                // `a/#` also matches `a`.
                return *level == Level::Multi;
            };
            match level {
                Level::Multi => return true,
                Level::Single => {}
                Level::Exact(text) if text == part => {}
                Level::Template(pieces) if template_matches(pieces, part, subst) => {}
                _ => return false,
            }
        }
        topic_levels.next().is_none()
    }

    /// Does this filter match every topic the subscription filter `sub`
    /// can match? A `+` in `sub` is covered only by `+` or `#`, a `#` only
    /// by `#`.
    fn covers(&self, sub: &str, subst: Subst<'_>) -> bool {
        if sub.starts_with('$') != self.dollar {
            return false;
        }
        // No topic has zero levels, so `+/#` matches all that `#` does.
        if let [Level::Single, Level::Multi] = self.levels.as_slice() {
            return true;
        }
        let mut sub_levels = sub.split('/');
        for level in &self.levels {
            if *level == Level::Multi {
                return true;
            }
            let Some(part) = sub_levels.next() else {
                return false;
            };
            match level {
                Level::Single if part != "#" => {}
                Level::Exact(text) if text == part => {}
                // A safe substitution holds no wildcard, so this never
                // matches `+` or `#`.
                Level::Template(pieces) if template_matches(pieces, part, subst) => {}
                _ => return false,
            }
        }
        sub_levels.next().is_none()
    }

    /// Is there a topic that both this filter and the subscription filter
    /// `sub` match?
    fn overlaps(&self, sub: &str, subst: Subst<'_>) -> bool {
        if sub.starts_with('$') != self.dollar {
            return false;
        }
        let mut sub_levels = sub.split('/');
        for level in &self.levels {
            if *level == Level::Multi {
                return true;
            }
            let Some(part) = sub_levels.next() else {
                return false;
            };
            match (level, part) {
                (_, "#") => return true,
                (_, "+") | (Level::Single, _) => {}
                (Level::Exact(text), _) if text == part => {}
                (Level::Template(pieces), _) if template_matches(pieces, part, subst) => {}
                _ => return false,
            }
        }
        // `sub` = `a/#` also matches the `a` this filter ended on.
        matches!(sub_levels.next(), None | Some("#"))
    }
}

/// `level` of a `pattern` filter, split at `%c` and `%u`.
fn pieces(level: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut rest = level;
    while let Some(at) = rest.find("%c").into_iter().chain(rest.find("%u")).min() {
        if at > 0 {
            pieces.push(Piece::Text(rest[..at].to_string()));
        }
        pieces.push(if &rest[at..at + 2] == "%c" {
            Piece::ClientId
        } else {
            Piece::Username
        });
        rest = &rest[at + 2..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_string()));
    }
    pieces
}

/// Does the template, filled in from `subst`, equal `part`?
fn template_matches(pieces: &[Piece], part: &str, subst: Subst<'_>) -> bool {
    let mut rest = part;
    for piece in pieces {
        let text = match piece {
            Piece::Text(text) => text.as_str(),
            Piece::ClientId => subst.client_id,
            Piece::Username => subst.username,
        };
        match rest.strip_prefix(text) {
            Some(after) => rest = after,
            None => return false,
        }
    }
    rest.is_empty()
}

/// The values for a filter's placeholders, known to be safe to substitute.
#[derive(Debug, Clone, Copy)]
struct Subst<'a> {
    /// For `%c`; empty when the filter has none.
    client_id: &'a str,
    /// For `%u`; empty when the filter has none.
    username: &'a str,
}

/// A client id or username as a pattern sees it.
#[derive(Debug, Clone, Copy)]
enum Identity<'a> {
    /// Fills one whole level and nothing more.
    Safe(&'a str),
    /// No username (an anonymous client).
    Absent,
    /// Empty, or holds `+`, `#` or `/`: substituting it would change
    /// which levels the pattern covers.
    Unsafe,
}

impl<'a> Identity<'a> {
    fn of(value: Option<&'a str>) -> Identity<'a> {
        match value {
            None => Identity::Absent,
            Some(v) if v.is_empty() || v.contains(['+', '#', '/']) => Identity::Unsafe,
            Some(v) => Identity::Safe(v),
        }
    }
}

/// Whether a filter applies to a client.
enum Binding<'a> {
    Applies(Subst<'a>),
    /// A `%u` pattern and an anonymous client.
    NotForThisClient,
    /// A placeholder the client's id or username cannot safely fill.
    Unsafe,
}

/// The client of one check, its id and username judged once.
struct Client<'a> {
    /// What `%c` patterns may do with the client id.
    client_id: Identity<'a>,
    /// What `%u` patterns may do with the username.
    username: Identity<'a>,
}

impl<'a> Client<'a> {
    fn new(client_id: &'a str, username: Option<&'a str>) -> Client<'a> {
        Client {
            client_id: Identity::of(Some(client_id)),
            username: Identity::of(username),
        }
    }

    fn bind(&self, filter: &Filter) -> Binding<'a> {
        let unused = Identity::Safe("");
        let client_id = if filter.uses_client_id {
            self.client_id
        } else {
            unused
        };
        let username = if filter.uses_username {
            self.username
        } else {
            unused
        };
        match (client_id, username) {
            (Identity::Absent, _) | (_, Identity::Absent) => Binding::NotForThisClient,
            (Identity::Safe(client_id), Identity::Safe(username)) => Binding::Applies(Subst {
                client_id,
                username,
            }),
            _ => Binding::Unsafe,
        }
    }
}

/// How a check compares an entry's filter with what the client asked for.
type Test = fn(&Filter, &str, Subst<'_>) -> bool;

impl Acl {
    /// Parse the file's text; every problem with file:line:column.
    pub fn parse(file: &Path, text: &str) -> Result<Acl, Vec<Diagnostic>> {
        let mut parser = Parser {
            file,
            acl: Acl::default(),
            user: None,
            errors: Vec::new(),
        };
        // Windows editors may start the file with a byte-order mark.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (index, line) in text.split('\n').enumerate() {
            parser.line(index + 1, line);
        }
        if parser.errors.is_empty() {
            Ok(parser.acl)
        } else {
            Err(parser.errors)
        }
    }

    /// Read and parse; an unreadable file is one [`Diagnostic::unreadable`].
    pub fn load(path: &Path) -> Result<Acl, Vec<Diagnostic>> {
        let bytes = std::fs::read(path).map_err(|e| {
            vec![Diagnostic::unreadable(
                path,
                format!("cannot read ACL file: {e}"),
            )]
        })?;
        match std::str::from_utf8(&bytes) {
            Ok(text) => Acl::parse(path, text),
            Err(e) => Err(vec![not_utf8(path, &bytes, e.valid_up_to())]),
        }
    }

    /// May this client publish on `topic`?
    pub fn can_write(&self, client_id: &str, username: Option<&str>, topic: &str) -> bool {
        self.allows(client_id, username, Access::Write, topic)
    }

    /// May a message on `topic` be delivered to this client?
    pub fn can_read(&self, client_id: &str, username: Option<&str>, topic: &str) -> bool {
        self.allows(client_id, username, Access::Read, topic)
    }

    /// May this client read from or publish on `topic` (a topic name, not a
    /// filter; one with `+` or `#` is refused)? Granted when an entry for
    /// the client with that access matches `topic` and no `deny` entry
    /// does.
    pub fn allows(
        &self,
        client_id: &str,
        username: Option<&str>,
        access: Access,
        topic: &str,
    ) -> bool {
        valid_topic(topic)
            && self.check(
                client_id,
                username,
                access,
                topic,
                Filter::matches_topic,
                Filter::matches_topic,
            )
    }

    /// May this client subscribe to `filter`?
    ///
    /// Granted when a single `read` or `readwrite` entry for the client
    /// covers `filter` (matches every topic `filter` can match: `+` in
    /// `filter` only under `+` or `#`, `#` only under `#`), and no `deny`
    /// entry for the client matches any topic `filter` could match. So a
    /// granted subscription never receives a message that
    /// [`can_read`](Acl::can_read) would refuse: with `topic read
    /// sensors/#` and `topic deny sensors/secret`, `sensors/+/temp` is
    /// granted but `sensors/#` and `sensors/+` are not. A shared
    /// subscription (`$share/<group>/<filter>`) is judged on its `<filter>`.
    pub fn can_subscribe(&self, client_id: &str, username: Option<&str>, filter: &str) -> bool {
        let Some(filter) = subscription_filter(filter) else {
            return false;
        };
        self.check(
            client_id,
            username,
            Access::Read,
            filter,
            Filter::overlaps,
            Filter::covers,
        )
    }

    /// Number of users with a `user` section, for a log line.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Number of `pattern` lines, for a log line.
    pub fn patterns(&self) -> usize {
        self.patterns.len()
    }

    /// Denies first, across the client's section and the patterns, so that
    /// a deny wins whatever grants; then any grant.
    fn check(
        &self,
        client_id: &str,
        username: Option<&str>,
        access: Access,
        asked: &str,
        denied: Test,
        granted: Test,
    ) -> bool {
        let client = Client::new(client_id, username);
        let section = match username {
            Some(name) => self.users.get(name),
            None => Some(&self.anonymous),
        };
        let sets = [section, Some(&self.patterns)];
        let sets = sets.iter().flatten();
        for deny in sets.clone().flat_map(|rules| &rules.denies) {
            match client.bind(deny) {
                Binding::Applies(subst) if denied(deny, asked, subst) => return false,
                Binding::Unsafe => return false,
                _ => {}
            }
        }
        sets.flat_map(|rules| &rules.grants)
            .filter(|grant| grant.grants(access))
            .any(|grant| match client.bind(&grant.filter) {
                Binding::Applies(subst) => granted(&grant.filter, asked, subst),
                _ => false,
            })
    }
}

/// A topic a client may publish on or be sent: not empty, no wildcard.
fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_TOPIC_LEN && !topic.contains(['+', '#', '\0'])
}

/// The filter a SUBSCRIBE asks for, if valid, with a shared
/// subscription's `$share/<group>/` taken off (MQTT 5 4.8.2).
fn subscription_filter(filter: &str) -> Option<&str> {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => {
            let (group, filter) = rest.split_once('/')?;
            if group.is_empty() || group.contains(['+', '#']) {
                return None;
            }
            filter
        }
        None => filter,
    };
    filter_problem(filter).is_none().then_some(filter)
}

/// What makes `filter` an invalid MQTT topic filter: the byte offset to
/// point at, and why.
fn filter_problem(filter: &str) -> Option<(usize, &'static str)> {
    if filter.is_empty() {
        return Some((0, "is empty"));
    }
    if filter.len() > MAX_TOPIC_LEN {
        return Some((0, "is longer than 65535 bytes"));
    }
    if let Some(at) = filter.find('\0') {
        return Some((at, "contains a NUL character"));
    }
    let mut start = 0;
    for level in filter.split('/') {
        if let Some(at) = level.find(['+', '#']) {
            let wildcard = &level[at..at + 1];
            if level.len() > 1 {
                let why = if wildcard == "+" {
                    "`+` must be a whole level, as in a/+/b"
                } else {
                    "`#` must be a whole level, as in a/#"
                };
                return Some((start + at, why));
            }
            if wildcard == "#" && start + 1 < filter.len() {
                return Some((start, "`#` must be the last level"));
            }
        }
        start += level.len() + 1;
    }
    None
}

/// The file is not UTF-8: point at the first bad byte.
fn not_utf8(path: &Path, bytes: &[u8], valid_up_to: usize) -> Diagnostic {
    let valid = std::str::from_utf8(&bytes[..valid_up_to]).unwrap_or_default();
    let line_start = valid.rfind('\n').map_or(0, |at| at + 1);
    Diagnostic {
        file: path.to_path_buf(),
        line: valid.matches('\n').count() + 1,
        column: valid[line_start..].chars().count() + 1,
        message: "not valid UTF-8; save the file as UTF-8".to_string(),
        unreadable: false,
    }
}

/// Parsing state: the section `topic` lines go to, and every error so far.
struct Parser<'a> {
    /// For the diagnostics.
    file: &'a Path,
    /// What the lines so far compiled to.
    acl: Acl,
    /// The latest `user` line's name; `None` before the first, where
    /// `topic` lines are for anonymous clients.
    user: Option<String>,
    /// Every problem, so `edgeferry check` shows them all at once.
    errors: Vec<Diagnostic>,
}

impl Parser<'_> {
    fn line(&mut self, number: usize, raw: &str) {
        // Mosquitto trims trailing whitespace, which also takes CRLF's \r.
        let text = raw.trim_end();
        let line = Line { text, number };
        let Some((start, end)) = line.word(0) else {
            return;
        };
        if text[start..].starts_with('#') {
            return;
        }
        match &text[start..end] {
            "user" => self.user_line(&line, end),
            "topic" => self.entry_line(&line, end, false),
            "pattern" => self.entry_line(&line, end, true),
            keyword => self.error(
                &line,
                start,
                format!("unknown keyword {keyword:?}; expected `user`, `topic` or `pattern`"),
            ),
        }
    }

    /// `user <name>`: the name is the rest of the line, spaces included,
    /// as in Mosquitto.
    fn user_line(&mut self, line: &Line<'_>, after_keyword: usize) {
        let name = line.text[after_keyword..].trim_matches(is_blank);
        if name.is_empty() {
            return self.error(
                line,
                line.text.len(),
                "`user` needs a user name".to_string(),
            );
        }
        self.acl.users.entry(name.to_string()).or_default();
        self.user = Some(name.to_string());
    }

    /// `topic [read|write|readwrite|deny] <filter>`, or `pattern ...`.
    fn entry_line(&mut self, line: &Line<'_>, after_keyword: usize, pattern: bool) {
        let keyword = if pattern { "pattern" } else { "topic" };
        let Some((word_start, word_end)) = line.word(after_keyword) else {
            let message = format!("`{keyword}` needs a topic filter");
            return self.error(line, line.text.len(), message);
        };
        let word = &line.text[word_start..word_end];
        let rest = &line.text[word_end..];
        let filter = rest.trim_start_matches(is_blank);
        let (permission, filter, filter_start) = if filter.is_empty() {
            if Permission::parse(word).is_some() {
                let message = format!(
                    "`{keyword} {word}` needs a topic filter after {word:?} \
                     (for a topic named {word:?}, write `{keyword} readwrite {word}`)"
                );
                return self.error(line, line.text.len(), message);
            }
            (Some(Permission::ReadWrite), word, word_start)
        } else {
            let permission = Permission::parse(word);
            if permission.is_none() {
                let message = format!(
                    "unknown access type {word:?}; expected `read`, `write`, `readwrite` or `deny`"
                );
                self.error(line, word_start, message);
            }
            (permission, filter, line.text.len() - filter.len())
        };
        if let Some((at, why)) = filter_problem(filter) {
            let message = format!("invalid topic filter {filter:?}: {why}");
            return self.error(line, filter_start + at, message);
        }
        let Some(permission) = permission else {
            return;
        };
        if pattern {
            self.acl.patterns.add(permission, Filter::pattern(filter));
        } else {
            let rules = match &self.user {
                Some(name) => self.acl.users.entry(name.clone()).or_default(),
                None => &mut self.acl.anonymous,
            };
            rules.add(permission, Filter::literal(filter));
        }
    }

    fn error(&mut self, line: &Line<'_>, at: usize, message: String) {
        self.errors.push(Diagnostic {
            file: self.file.to_path_buf(),
            line: line.number,
            column: line.column(at),
            message,
            unreadable: false,
        });
    }
}

/// One line of the file, trailing whitespace already gone.
struct Line<'a> {
    text: &'a str,
    /// 1-based, for diagnostics.
    number: usize,
}

impl Line<'_> {
    /// The byte range of the first word at or after byte `from`.
    fn word(&self, from: usize) -> Option<(usize, usize)> {
        let rest = &self.text[from..];
        let start = from + rest.find(|c| !is_blank(c))?;
        let end = self.text[start..]
            .find(is_blank)
            .map_or(self.text.len(), |len| start + len);
        Some((start, end))
    }

    /// The 1-based column, in characters, of byte `at`.
    fn column(&self, at: usize) -> usize {
        self.text[..at].chars().count() + 1
    }
}

/// Separates words on a line. Mosquitto splits on spaces only; tabs are
/// accepted too because an editor may put them there invisibly.
fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn parse(text: &str) -> Acl {
        Acl::parse(Path::new("acl"), text).expect("the test file parses")
    }

    fn errors(text: &str) -> Vec<(usize, usize, String)> {
        Acl::parse(Path::new("acl"), text)
            .expect_err("the test file has errors")
            .into_iter()
            .map(|d| (d.line, d.column, d.message))
            .collect()
    }

    /// Line and column of each error, for tests that check only where.
    fn places(text: &str) -> Vec<(usize, usize)> {
        errors(text).into_iter().map(|(l, c, _)| (l, c)).collect()
    }

    const NONE: Subst<'static> = Subst {
        client_id: "",
        username: "",
    };

    fn matches(filter: &str, topic: &str) -> bool {
        Filter::literal(filter).matches_topic(topic, NONE)
    }

    fn covers(acl_filter: &str, sub: &str) -> bool {
        Filter::literal(acl_filter).covers(sub, NONE)
    }

    fn overlaps(acl_filter: &str, sub: &str) -> bool {
        Filter::literal(acl_filter).overlaps(sub, NONE)
    }

    #[test]
    fn topic_filter_matching_follows_mqtt_rules() {
        let yes = [
            ("foo/bar", "foo/bar"),
            ("foo/+", "foo/bar"),
            ("foo/+/baz", "foo/bar/baz"),
            ("foo/+/#", "foo/bar"),
            ("foo/#", "foo"),
            ("foo/#", "foo/"),
            ("foo/#", "foo/bar/baz"),
            ("foo//bar", "foo//bar"),
            ("foo/+/+/baz", "foo///baz"),
            ("foo/bar/+", "foo/bar/"),
            ("#", "foo/bar/baz"),
            ("#", "/foo"),
            ("/#", "/foo/bar"),
            ("+/+", "/foo"),
            ("a b/c", "a b/c"),
        ];
        for (filter, topic) in yes {
            assert!(matches(filter, topic), "{filter} should match {topic}");
        }
        let no = [
            ("foo/bar", "foo"),
            ("foo", "foo/bar"),
            ("foo/+", "foo/bar/baz"),
            ("foo/+", "foo"),
            ("foo/+/baz", "foo/bar/bar"),
            ("foo/+/#", "fo2/bar/baz"),
            ("foo/+/#", "foo"),
            ("/#", "foo/bar"),
            ("+", "/foo"),
            ("foo/bar", "Foo/bar"),
        ];
        for (filter, topic) in no {
            assert!(!matches(filter, topic), "{filter} should not match {topic}");
        }
    }

    #[test]
    fn wildcards_at_the_first_level_do_not_match_dollar_topics() {
        assert!(!matches("#", "$SYS/broker/uptime"));
        assert!(!matches("+/broker/uptime", "$SYS/broker/uptime"));
        assert!(matches("$SYS/#", "$SYS/broker/uptime"));
        assert!(matches("$SYS/+/uptime", "$SYS/broker/uptime"));
        assert!(!matches("$SYS/#", "SYS/broker"));
        assert!(!matches("$BOB/bar", "$SYS/bar"));
        assert!(!covers("#", "$SYS/#"));
        assert!(!covers("+/#", "$SYS/broker"));
        assert!(covers("$SYS/#", "$SYS/broker/+"));
        assert!(!overlaps("#", "$SYS/#"));
        assert!(!overlaps("$SYS/#", "#"));
        assert!(!overlaps("$SYS/#", "+/broker"));
    }

    #[test]
    fn coverage_requires_every_topic_of_the_subscription_to_match() {
        let yes = [
            ("#", "#"),
            ("#", "a/+/b"),
            ("a/#", "a"),
            ("a/#", "a/#"),
            ("a/#", "a/+/#"),
            ("a/+", "a/+"),
            ("a/+", "a/b"),
            ("a/+/c", "a/+/c"),
            ("+/+", "a/b"),
            ("a/b", "a/b"),
        ];
        for (entry, sub) in yes {
            assert!(covers(entry, sub), "{entry} should cover {sub}");
        }
        let no = [
            ("a/+", "a/#"),
            ("a/+", "a/b/c"),
            ("a/+", "a"),
            ("a/b", "a/+"),
            ("a/b", "a/#"),
            ("a/+/#", "a/#"),
            ("a/b/#", "a/#"),
            ("+", "#"),
            ("a", "a/b"),
            ("a/b", "a"),
        ];
        for (entry, sub) in no {
            assert!(!covers(entry, sub), "{entry} should not cover {sub}");
        }
    }

    #[test]
    fn overlap_means_some_topic_matches_both() {
        let yes = [
            ("a/b", "a/b"),
            ("a/b", "a/+"),
            ("a/b", "a/#"),
            ("a/b", "#"),
            ("a", "a/#"),
            ("a/#", "a"),
            ("a/+/c", "a/b/+"),
            ("+/b", "a/+"),
            ("a/+/b", "a/#"),
            ("#", "x/y"),
        ];
        for (entry, sub) in yes {
            assert!(overlaps(entry, sub), "{entry} should overlap {sub}");
        }
        let no = [
            ("a/b", "a/c"),
            ("a/b", "a"),
            ("a/b", "a/b/+"),
            ("a/+", "a/b/c"),
            ("+", "a/b"),
            ("a/b/c", "a/+"),
            ("b/#", "a/#"),
        ];
        for (entry, sub) in no {
            assert!(!overlaps(entry, sub), "{entry} should not overlap {sub}");
        }
    }

    /// Every filter of up to three levels over `a`, `b`, `+` and `#`, and
    /// every topic of up to four levels over `a`, `b`, `c`: enough to tell
    /// any two of those filters apart.
    fn small_filters_and_topics() -> (Vec<String>, Vec<String>) {
        let grow = |set: &[String], parts: &[&str]| -> Vec<String> {
            let mut out = Vec::new();
            for prefix in set {
                if prefix.ends_with('#') {
                    continue;
                }
                for part in parts {
                    out.push(format!("{prefix}/{part}"));
                }
            }
            out
        };
        let (mut filters, mut topics) = (Vec::new(), Vec::new());
        let mut f: Vec<String> = ["a", "b", "+", "#"].map(String::from).to_vec();
        let mut t: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        for depth in 0..4 {
            if depth < 3 {
                filters.extend(f.iter().cloned());
                f = grow(&f, &["a", "b", "+", "#"]);
            }
            topics.extend(t.iter().cloned());
            t = grow(&t, &["a", "b", "c"]);
        }
        (filters, topics)
    }

    #[test]
    fn coverage_and_overlap_agree_with_matching_every_topic() {
        let (filters, topics) = small_filters_and_topics();
        for entry in &filters {
            for sub in &filters {
                let both = |t: &&String| matches(entry, t) && matches(sub, t);
                let covered = topics.iter().all(|t| !matches(sub, t) || matches(entry, t));
                assert_eq!(covers(entry, sub), covered, "{entry} covers {sub}");
                let shared = topics.iter().any(|t| both(&t));
                assert_eq!(overlaps(entry, sub), shared, "{entry} overlaps {sub}");
            }
        }
    }

    #[test]
    fn a_granted_subscription_never_receives_a_refused_topic() {
        let acl = parse("topic read a/#\ntopic read +/b\ntopic deny a/b/c\ntopic deny b/+/a\n");
        let (filters, topics) = small_filters_and_topics();
        for sub in filters.iter().filter(|f| acl.can_subscribe("c1", None, f)) {
            for topic in topics.iter().filter(|t| matches(sub, t)) {
                assert!(acl.can_read("c1", None, topic), "{sub} receives {topic}");
            }
        }
        assert!(acl.can_subscribe("c1", None, "a/+"));
        assert!(!acl.can_subscribe("c1", None, "a/#"));
    }

    #[test]
    fn templates_fill_in_anywhere_in_a_level() {
        let subst = Subst {
            client_id: "dev1",
            username: "alice",
        };
        let filter = Filter::pattern("site/%u-%c/x");
        assert!(filter.matches_topic("site/alice-dev1/x", subst));
        assert!(!filter.matches_topic("site/alice-dev2/x", subst));
        assert!(!filter.matches_topic("site/alice-dev1x/x", subst));
        assert!(Filter::pattern("%c/%c").matches_topic("dev1/dev1", subst));
        assert!(!Filter::pattern("%c/%c").matches_topic("dev1/dev2", subst));
        // Only `pattern` lines substitute; `%count` has no placeholder level.
        assert!(Filter::literal("a/%c").matches_topic("a/%c", subst));
        assert!(Filter::pattern("a/%count").matches_topic("a/dev1ount", subst));
    }

    #[test]
    fn topic_lines_before_the_first_user_line_are_for_anonymous_clients_only() {
        let acl = parse("topic public/#\nuser alice\ntopic alice/#\n");
        assert!(acl.can_write("c1", None, "public/x"));
        assert!(acl.can_read("c1", None, "public/x"));
        assert!(!acl.can_write("c1", Some("alice"), "public/x"));
        assert!(!acl.can_read("c1", Some("bob"), "public/x"));
    }

    #[test]
    fn a_user_section_applies_only_to_that_user() {
        let acl = parse("user alice\ntopic alice/#\nuser bob\ntopic bob/#\n");
        assert!(acl.can_write("c1", Some("alice"), "alice/x"));
        assert!(!acl.can_write("c1", Some("alice"), "bob/x"));
        assert!(acl.can_write("c1", Some("bob"), "bob/x"));
        assert!(!acl.can_write("c1", None, "alice/x"));
        assert!(!acl.can_write("alice", None, "alice/x"));
        assert!(!acl.can_write("c1", Some("carol"), "alice/x"));
    }

    #[test]
    fn a_user_named_twice_keeps_both_sections() {
        let acl = parse("user alice\ntopic a\nuser bob\ntopic b\nuser alice\ntopic c\n");
        assert!(acl.can_write("c1", Some("alice"), "a"));
        assert!(acl.can_write("c1", Some("alice"), "c"));
        assert!(!acl.can_write("c1", Some("alice"), "b"));
        assert_eq!(acl.users(), 2);
    }

    #[test]
    fn a_user_name_may_contain_spaces() {
        let acl = parse("user  Alice Smith  \ntopic a\n");
        assert!(acl.can_write("c1", Some("Alice Smith"), "a"));
        assert!(!acl.can_write("c1", Some("Alice"), "a"));
    }

    #[test]
    fn access_defaults_to_readwrite() {
        let acl = parse("topic a/b\n");
        assert!(acl.can_write("c1", None, "a/b"));
        assert!(acl.can_read("c1", None, "a/b"));
        assert!(acl.can_subscribe("c1", None, "a/b"));
    }

    #[test]
    fn read_and_write_entries_grant_one_direction_each() {
        let acl = parse("topic read in/#\ntopic write out/#\ntopic readwrite both\n");
        assert!(acl.can_read("c1", None, "in/x"));
        assert!(acl.can_subscribe("c1", None, "in/#"));
        assert!(!acl.can_write("c1", None, "in/x"));
        assert!(acl.can_write("c1", None, "out/x"));
        assert!(!acl.can_read("c1", None, "out/x"));
        assert!(!acl.can_subscribe("c1", None, "out/#"));
        assert!(acl.allows("c1", None, Access::Read, "both"));
        assert!(acl.allows("c1", None, Access::Write, "both"));
    }

    #[test]
    fn a_filter_may_contain_spaces() {
        let acl = parse("topic read my room/temp  \n");
        assert!(acl.can_read("c1", None, "my room/temp"));
        assert!(!acl.can_write("c1", None, "my room/temp"));
        // Without an access word the filter is one word: here `with` is
        // taken as the access type (as Mosquitto does), which is an error.
        assert_eq!(places("topic with space/x\n"), [(1, 7)]);
    }

    #[test]
    fn default_is_deny() {
        let empty = parse("");
        assert!(!empty.can_write("c1", None, "a"));
        assert!(!empty.can_read("c1", Some("alice"), "a"));
        assert!(!empty.can_subscribe("c1", None, "#"));
        let some = parse("topic a\n");
        assert!(!some.can_write("c1", None, "b"));
        assert!(!some.can_write("c1", None, "a/b"));
    }

    #[test]
    fn a_client_id_pattern_grants_the_clients_own_levels() {
        let acl = parse("pattern write devices/%c/state\n");
        assert!(acl.can_write("dev1", None, "devices/dev1/state"));
        assert!(acl.can_write("dev1", Some("alice"), "devices/dev1/state"));
        assert!(!acl.can_write("dev1", None, "devices/dev2/state"));
        assert!(!acl.can_read("dev1", None, "devices/dev1/state"));
        assert!(!acl.can_write("dev1", None, "devices/%c/state"));
    }

    #[test]
    fn a_username_pattern_grants_the_users_own_levels() {
        let acl = parse("pattern read sensors/%u/#\n");
        assert!(acl.can_read("c1", Some("alice"), "sensors/alice/kitchen/temp"));
        assert!(!acl.can_read("c1", Some("alice"), "sensors/bob/kitchen/temp"));
        assert!(!acl.can_write("c1", Some("alice"), "sensors/alice/x"));
    }

    #[test]
    fn a_username_pattern_does_not_apply_to_anonymous_clients() {
        let grant = parse("pattern read u/%u\n");
        assert!(grant.can_read("c1", Some("alice"), "u/alice"));
        assert!(!grant.can_read("c1", None, "u/%u"));
        assert!(!grant.can_read("c1", None, "u/"));
        let deny = parse("topic readwrite #\npattern deny private/%u/#\n");
        assert!(deny.can_write("c1", None, "private/x/y"));
    }

    #[test]
    fn a_pattern_applies_to_every_client_wherever_it_appears() {
        let acl = parse("user alice\ntopic a\npattern readwrite shared/%c\nuser bob\n");
        assert!(acl.can_write("c1", None, "shared/c1"));
        assert!(acl.can_write("c2", Some("alice"), "shared/c2"));
        assert!(acl.can_write("c3", Some("bob"), "shared/c3"));
        assert!(acl.can_write("c4", Some("carol"), "shared/c4"));
        assert_eq!(acl.patterns(), 1);
    }

    #[test]
    fn a_client_id_with_a_wildcard_does_not_widen_a_pattern() {
        let acl = parse("pattern readwrite devices/%c/#\npattern readwrite c/%c\n");
        for id in ["#", "+", "a/b", "a+", "x#", "/", ""] {
            assert!(!acl.can_write(id, None, "devices/a/b"), "client id {id:?}");
            assert!(!acl.can_write(id, None, "devices/x"), "client id {id:?}");
            assert!(!acl.can_read(id, None, "c/a/b"), "client id {id:?}");
            assert!(
                !acl.can_subscribe(id, None, "devices/#"),
                "client id {id:?}"
            );
            assert!(
                !acl.can_subscribe(id, None, "devices/+/x"),
                "client id {id:?}"
            );
            assert!(!acl.can_subscribe(id, None, "c/+"), "client id {id:?}");
        }
        // The same pattern still works for an ordinary id.
        assert!(acl.can_write("a", None, "devices/a/b"));
        assert!(acl.can_subscribe("a", None, "devices/a/#"));
    }

    #[test]
    fn a_username_with_a_wildcard_does_not_widen_a_pattern() {
        let acl = parse("pattern read sensors/%u/#\n");
        for name in ["#", "+", "alice/bob", ""] {
            assert!(
                !acl.can_read("c1", Some(name), "sensors/alice/bob/x"),
                "{name:?}"
            );
            assert!(
                !acl.can_subscribe("c1", Some(name), "sensors/#"),
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_client_id_starting_with_dollar_does_not_reach_dollar_topics() {
        let acl = parse("pattern readwrite %c/#\n");
        assert!(acl.can_write("dev1", None, "dev1/x"));
        assert!(!acl.can_write("$SYS", None, "$SYS/broker/x"));
        assert!(!acl.can_read("$SYS", None, "$SYS/broker/x"));
        assert!(!acl.can_subscribe("$SYS", None, "$SYS/#"));
    }

    #[test]
    fn a_deny_pattern_an_unsafe_client_id_cannot_fill_refuses_everything() {
        let acl = parse("topic readwrite #\npattern deny devices/%c/config\n");
        assert!(acl.can_write("dev1", None, "devices/dev2/config"));
        assert!(!acl.can_write("dev1", None, "devices/dev1/config"));
        for id in ["#", "+", "a/b"] {
            assert!(!acl.can_write(id, None, "other"), "client id {id:?}");
            assert!(!acl.can_read(id, None, "other"), "client id {id:?}");
            assert!(!acl.can_subscribe(id, None, "other"), "client id {id:?}");
        }
        // A deny pattern that does not use %c does not care about the id.
        let by_username = parse("topic readwrite #\npattern deny private/%u/#\n");
        assert!(by_username.can_write("a/b", None, "other"));
    }

    #[test]
    fn a_deny_entry_wins_over_a_grant() {
        for text in [
            "topic readwrite a/#\ntopic deny a/secret\n",
            "topic deny a/secret\ntopic readwrite a/#\n",
            "topic deny a/+\ntopic readwrite a/secret\n",
        ] {
            let acl = parse(text);
            assert!(!acl.can_write("c1", None, "a/secret"), "{text}");
            assert!(!acl.can_read("c1", None, "a/secret"), "{text}");
            assert!(!acl.can_subscribe("c1", None, "a/secret"), "{text}");
        }
        let acl = parse("topic readwrite a/#\ntopic deny a/secret\n");
        assert!(acl.can_write("c1", None, "a/public"));
        assert!(acl.can_write("c1", None, "a/secret/x"));
    }

    #[test]
    fn a_deny_pattern_wins_over_a_user_section_grant() {
        let acl = parse("user alice\ntopic readwrite #\npattern deny devices/%c/config\n");
        assert!(!acl.can_write("dev1", Some("alice"), "devices/dev1/config"));
        assert!(acl.can_write("dev1", Some("alice"), "devices/dev2/config"));
    }

    #[test]
    fn a_user_section_deny_wins_over_a_pattern_grant() {
        let acl =
            parse("user alice\ntopic deny devices/+/config\npattern readwrite devices/%c/#\n");
        assert!(!acl.can_write("dev1", Some("alice"), "devices/dev1/config"));
        assert!(acl.can_write("dev1", Some("alice"), "devices/dev1/state"));
        assert!(acl.can_write("dev1", Some("bob"), "devices/dev1/config"));
    }

    #[test]
    fn a_subscription_needs_one_entry_that_covers_it() {
        let acl = parse("pattern read sensors/%u/#\n");
        let alice = Some("alice");
        assert!(acl.can_subscribe("c1", alice, "sensors/alice/+/temp"));
        assert!(acl.can_subscribe("c1", alice, "sensors/alice/#"));
        assert!(acl.can_subscribe("c1", alice, "sensors/alice"));
        assert!(!acl.can_subscribe("c1", alice, "sensors/#"));
        assert!(!acl.can_subscribe("c1", alice, "sensors/+/temp"));
        assert!(!acl.can_subscribe("c1", alice, "#"));
        assert!(!acl.can_subscribe("c1", alice, "+/alice/#"));
    }

    #[test]
    fn a_subscription_that_could_receive_a_denied_topic_is_refused() {
        let acl = parse("topic read sensors/#\ntopic deny sensors/secret\n");
        assert!(acl.can_subscribe("c1", None, "sensors/+/temp"));
        assert!(acl.can_subscribe("c1", None, "sensors/public/#"));
        assert!(acl.can_subscribe("c1", None, "sensors/secret/x"));
        assert!(!acl.can_subscribe("c1", None, "sensors/#"));
        assert!(!acl.can_subscribe("c1", None, "sensors/+"));
        assert!(!acl.can_subscribe("c1", None, "sensors/secret"));
        // Delivery is checked per topic, so the narrower grants still work.
        assert!(acl.can_read("c1", None, "sensors/public"));
        assert!(!acl.can_read("c1", None, "sensors/secret"));
    }

    #[test]
    fn dollar_topics_need_a_dollar_entry() {
        let acl = parse("topic readwrite #\ntopic read $SYS/broker/#\n");
        assert!(!acl.can_write("c1", None, "$SYS/broker/x"));
        assert!(acl.can_read("c1", None, "$SYS/broker/uptime"));
        assert!(!acl.can_read("c1", None, "$SYS/other"));
        assert!(acl.can_subscribe("c1", None, "$SYS/broker/+"));
        assert!(!acl.can_subscribe("c1", None, "$SYS/#"));
        assert!(acl.can_subscribe("c1", None, "#"));
        let deny_all = parse("topic readwrite $SYS/#\ntopic deny #\n");
        assert!(deny_all.can_read("c1", None, "$SYS/broker/uptime"));
        assert!(!deny_all.can_read("c1", None, "a"));
    }

    #[test]
    fn invalid_topics_and_filters_are_refused() {
        let acl = parse("topic readwrite #\n");
        for topic in ["", "a/+", "a/#", "+", "a\0b"] {
            assert!(!acl.can_write("c1", None, topic), "{topic:?}");
            assert!(!acl.can_read("c1", None, topic), "{topic:?}");
        }
        for filter in ["", "a/#/b", "a+", "#x", "a/b#", "$share/g", "$share//a"] {
            assert!(!acl.can_subscribe("c1", None, filter), "{filter:?}");
        }
    }

    #[test]
    fn a_shared_subscription_is_judged_on_its_topic_filter() {
        let acl = parse("topic read jobs/#\n");
        assert!(acl.can_subscribe("c1", None, "$share/workers/jobs/+"));
        assert!(!acl.can_subscribe("c1", None, "$share/workers/other/+"));
        assert!(!acl.can_subscribe("c1", None, "$share/w+/jobs/+"));
    }

    #[test]
    fn comments_blank_lines_and_indentation_are_ignored() {
        let acl = parse(
            "# header\n\n   \n  # indented comment\n\ttopic\tread\ta/b\n  user alice\n  topic c\n",
        );
        assert!(acl.can_read("c1", None, "a/b"));
        assert!(acl.can_write("c1", Some("alice"), "c"));
    }

    #[test]
    fn crlf_line_endings_are_accepted() {
        let text = "# comment\r\ntopic read a/b\r\n\r\nuser alice\r\ntopic write c\r\npattern read d/%c\r\n";
        let acl = parse(text);
        assert!(acl.can_read("c1", None, "a/b"));
        assert!(acl.can_write("c1", Some("alice"), "c"));
        assert!(acl.can_read("dev1", None, "d/dev1"));
        assert!(!acl.can_write("c1", Some("alice\r"), "c"));
        assert_eq!(places("topic read a/#/b\r\nbogus\r\n"), [(1, 14), (2, 1)]);
    }

    #[test]
    fn a_byte_order_mark_is_ignored() {
        let acl = parse("\u{feff}topic a\n");
        assert!(acl.can_write("c1", None, "a"));
        assert_eq!(places("\u{feff}bogus\n"), [(1, 1)]);
    }

    #[test]
    fn an_unknown_keyword_is_located() {
        assert_eq!(
            errors("topic a\n  users alice\n"),
            [(
                2,
                3,
                "unknown keyword \"users\"; expected `user`, `topic` or `pattern`".to_string()
            )]
        );
    }

    #[test]
    fn a_topic_or_pattern_without_a_filter_is_located() {
        assert_eq!(
            errors("topic\n"),
            [(1, 6, "`topic` needs a topic filter".to_string())]
        );
        assert_eq!(
            errors("\n  pattern   \n"),
            [(2, 10, "`pattern` needs a topic filter".to_string())]
        );
        assert_eq!(
            errors("topic read\n"),
            [(
                1,
                11,
                "`topic read` needs a topic filter after \"read\" \
                 (for a topic named \"read\", write `topic readwrite read`)"
                    .to_string()
            )]
        );
        assert_eq!(places("pattern deny\n"), [(1, 13)]);
    }

    #[test]
    fn an_invalid_access_type_is_located() {
        assert_eq!(
            errors("topic raed a/b\n"),
            [(
                1,
                7,
                "unknown access type \"raed\"; expected `read`, `write`, `readwrite` or `deny`"
                    .to_string()
            )]
        );
        assert_eq!(places("topic READ a/b\n"), [(1, 7)]);
    }

    #[test]
    fn an_invalid_filter_is_located_at_the_wildcard() {
        assert_eq!(
            errors("topic read a/#/b\n"),
            [(
                1,
                14,
                "invalid topic filter \"a/#/b\": `#` must be the last level".to_string()
            )]
        );
        assert_eq!(
            errors("pattern a+\n"),
            [(
                1,
                10,
                "invalid topic filter \"a+\": `+` must be a whole level, as in a/+/b".to_string()
            )]
        );
        assert_eq!(
            errors("topic write #x\n"),
            [(
                1,
                13,
                "invalid topic filter \"#x\": `#` must be a whole level, as in a/#".to_string()
            )]
        );
        assert_eq!(places("topic deny   x/y+/z\n"), [(1, 17)]);
    }

    #[test]
    fn a_user_line_without_a_name_is_located() {
        assert_eq!(
            errors("user   \n"),
            [(1, 5, "`user` needs a user name".to_string())]
        );
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        assert_eq!(places("topic read é/ü/#/x\n"), [(1, 16)]);
    }

    #[test]
    fn every_error_in_a_file_is_reported() {
        let text = "topic a/b\nbogus line\ntopic\nuser alice\ntopic raed a/#/b\npattern #x\nuser\ntopic ok\n";
        assert_eq!(
            places(text),
            [(2, 1), (3, 6), (5, 7), (5, 14), (6, 9), (7, 5)]
        );
    }

    #[test]
    fn users_and_patterns_are_counted() {
        let acl =
            parse("topic a\nuser alice\ntopic b\nuser bob\npattern c/%c\npattern deny d/%u\n");
        assert_eq!(acl.users(), 2);
        assert_eq!(acl.patterns(), 2);
        let empty = parse("");
        assert_eq!((empty.users(), empty.patterns()), (0, 0));
    }

    #[test]
    fn load_reads_and_parses_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl");
        std::fs::write(&path, "topic a\nbogus\n").unwrap();
        let err = Acl::load(&path).unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(
            (err[0].file.clone(), err[0].line, err[0].column),
            (path.clone(), 2, 1)
        );
        assert!(!err[0].unreadable);
        std::fs::write(&path, "topic a\n").unwrap();
        assert!(Acl::load(&path).unwrap().can_write("c1", None, "a"));
    }

    #[test]
    fn load_reports_an_unreadable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing");
        let err = Acl::load(&path).unwrap_err();
        assert_eq!(err.len(), 1);
        assert!(err[0].unreadable);
        assert_eq!((err[0].file.clone(), err[0].line), (path, 0));
        assert!(
            err[0].message.starts_with("cannot read ACL file: "),
            "{}",
            err[0].message
        );
    }

    #[test]
    fn load_locates_bytes_that_are_not_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let path: PathBuf = dir.path().join("acl");
        std::fs::write(&path, b"topic a\ntopic b\xff\n").unwrap();
        let err = Acl::load(&path).unwrap_err();
        assert_eq!(
            (err[0].line, err[0].column, err[0].unreadable),
            (2, 8, false)
        );
    }
}
