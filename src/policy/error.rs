//! Policy errors: each one names `file:line:column` and says how to fix it.
//!
//! Loading collects every error of every file before failing, so that an operator fixes a
//! policy directory in one pass instead of one restart per mistake.

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

/// What went wrong, for callers and tests that branch on it; the text is in `message`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    Io,
    Syntax,
    UnknownField,
    MissingField,
    InvalidValue,
    BadCidr,
    BadPort,
    UnknownName,
    AmbiguousName,
    ScitagMismatch,
    DuplicateRule,
    UnknownUser,
    UnknownGroup,
    ProcessTooLong,
    RelativeExe,
    BadCgroup,
    Conflict,
}

/// One error at one place. Lines and columns are 1-based; columns count characters.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}:{line}:{col}: {message}", path.display())]
pub struct PolicyError {
    pub path: PathBuf,
    pub line: usize,
    pub col: usize,
    pub kind: ErrorKind,
    pub message: String,
}

/// Every error found while loading a policy set, in file order then position order.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Maps byte offsets of one source text to 1-based line and column.
pub(crate) struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub(crate) fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    /// Line and column of `offset`; an offset past the end maps to the last position.
    pub(crate) fn locate(&self, text: &str, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.starts.partition_point(|&s| s <= offset);
        let start = self.starts[line - 1];
        let col = text[start..offset].chars().count() + 1;
        (line, col)
    }
}

#[cfg(test)]
mod tests {
    use super::LineIndex;

    #[test]
    fn line_index_is_one_based_and_counts_characters() {
        let text = "ab\nçd\n\nx";
        let idx = LineIndex::new(text);
        assert_eq!(idx.locate(text, 0), (1, 1));
        assert_eq!(idx.locate(text, 2), (1, 3));
        assert_eq!(idx.locate(text, 3), (2, 1));
        assert_eq!(idx.locate(text, 5), (2, 2)); // after the 2-byte 'ç'
        assert_eq!(idx.locate(text, 4), (2, 1)); // inside 'ç': snaps back
        assert_eq!(idx.locate(text, 7), (3, 1));
        assert_eq!(idx.locate(text, 99), (4, 2));
    }
}
