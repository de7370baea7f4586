//! Operator-facing errors that point into a file: `path:line:column: message`.
//!
//! Config and rule loading collect every problem they find into a list of
//! these and fail once, so that `edgeferry check` shows all of them together.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in one file, located by line and column (both 1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file the problem is in, as the operator named it.
    pub file: PathBuf,
    /// 1-based line; 0 when the problem is about the file as a whole.
    pub line: usize,
    /// 1-based column; 0 when the problem is about the file as a whole.
    pub column: usize,
    /// What is wrong and, where it helps, what to do about it.
    pub message: String,
    /// The file could not be read at all (a different exit code from
    /// "invalid": the fix is permissions or a path, not an edit).
    pub unreadable: bool,
}

impl Diagnostic {
    /// A problem located by a byte span into `source`.
    pub fn at(
        file: &Path,
        source: &str,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> Self {
        let (line, column) = match span {
            Some(span) => line_col(source, span.start),
            None => (0, 0),
        };
        Diagnostic {
            file: file.to_path_buf(),
            line,
            column,
            message: message.into(),
            unreadable: false,
        }
    }

    /// A problem with a file as a whole (unreadable, missing).
    pub fn whole_file(file: &Path, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            message: message.into(),
            unreadable: false,
        }
    }

    /// A file or directory that could not be read.
    pub fn unreadable(file: &Path, message: impl Into<String>) -> Self {
        Diagnostic {
            unreadable: true,
            ..Self::whole_file(file, message)
        }
    }

    /// This one, as the report of a file that could not be read (the
    /// setting that names it keeps the location): exit code 3.
    pub fn of_unreadable_file(self, unreadable: bool) -> Self {
        Diagnostic { unreadable, ..self }
    }

    /// From a TOML parse or deserialize error, keeping its span.
    pub fn from_toml(file: &Path, source: &str, err: &toml::de::Error) -> Self {
        // toml's Display repeats the source excerpt; the message alone reads
        // better next to our own file:line prefix.
        Self::at(file, source, err.span(), err.message().trim().to_string())
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

/// Every problem found while loading, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// Whether some file could not be read at all.
    pub fn any_unreadable(&self) -> bool {
        self.0.iter().any(|d| d.unreadable)
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// 1-based line and column (in characters) of byte offset `pos` in `source`.
pub fn line_col(source: &str, pos: usize) -> (usize, usize) {
    let pos = pos.min(source.len());
    let before = &source[..source.floor_char_boundary(pos)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Where each line of a text starts, for finding many offsets' lines in
/// one file: `line_col` scans from the start, so calling it once per rule
/// made loading 10,000 rules quadratic (29 s in a debug build).
pub struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub fn new(source: &str) -> LineIndex {
        let starts = std::iter::once(0)
            .chain(source.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex { starts }
    }

    /// The 1-based line of byte offset `pos`.
    pub fn line(&self, pos: usize) -> usize {
        self.starts.partition_point(|&s| s <= pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_index_agrees_with_line_col() {
        let src = "a = 1\nbb = 2\n\nc\n";
        let index = LineIndex::new(src);
        for pos in 0..=src.len() + 3 {
            assert_eq!(index.line(pos), line_col(src, pos).0, "at {pos}");
        }
    }

    #[test]
    fn line_col_counts_from_one() {
        let src = "a = 1\nbb = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        assert_eq!(line_col(src, 9), (2, 4));
        assert_eq!(line_col(src, 999), (3, 1));
    }
}
