//! Errors about configuration that point at the offending line, rustc-style:
//!
//! ```text
//! error: unknown key `stpes` in stage `train`
//!   --> pipeline.yaml:12:7
//!    |
//! 12 |       stpes: 100
//!    |       ^
//!    = help: did you mean `steps`?
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

/// A place in a file; lines and columns are 1-based.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl Location {
    /// A location at `line:column` of `file`.
    pub fn new(file: &Path, line: usize, column: usize) -> Location {
        Location {
            file: file.to_path_buf(),
            line,
            column,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// A configuration error: a message, optionally a location with the quoted line, and help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// What is wrong, in one sentence.
    pub message: String,
    /// Where, when known.
    pub location: Option<Location>,
    /// The text of the offending line, when the file is at hand.
    pub quoted_line: Option<String>,
    /// A suggestion (`did you mean …`) or a hint at the fix.
    pub help: Option<String>,
}

impl Diagnostic {
    /// A diagnostic with only a message.
    pub fn new(message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            message: message.into(),
            location: None,
            quoted_line: None,
            help: None,
        }
    }

    /// Attaches a location and, when `text` is the file's content, quotes the line.
    pub fn at(mut self, location: Location, text: Option<&str>) -> Diagnostic {
        self.quoted_line = text
            .and_then(|text| text.lines().nth(location.line.saturating_sub(1)))
            .map(str::to_string);
        self.location = Some(location);
        self
    }

    /// Attaches a help line.
    pub fn help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(location) = &self.location {
            let gutter = location.line.to_string().len();
            write!(f, "\n{:gutter$}--> {location}", "")?;
            if let Some(line) = &self.quoted_line {
                let (line, column) = excerpt(line, location.column);
                write!(f, "\n{:gutter$} |", "")?;
                write!(f, "\n{} | {line}", location.line)?;
                let caret_offset: usize = line
                    .chars()
                    .take(column.saturating_sub(1))
                    .map(|c| if c == '\t' { 4 } else { 1 })
                    .sum();
                write!(f, "\n{:gutter$} | {:caret_offset$}^", "", "")?;
            }
        }
        if let Some(help) = &self.help {
            write!(f, "\n  = help: {help}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostic {}

/// Characters of a quoted line shown before and after the column; a longer line (a
/// generated or malicious file can hold a megabyte on one line) is cut around it.
const QUOTE_CONTEXT: usize = 60;

/// The part of `line` worth quoting for `column` (1-based, in characters), and the
/// column within that part.
fn excerpt(line: &str, column: usize) -> (std::borrow::Cow<'_, str>, usize) {
    let length = line.chars().count();
    if length <= 2 * QUOTE_CONTEXT {
        return (line.into(), column);
    }
    let start = column.saturating_sub(1).saturating_sub(QUOTE_CONTEXT);
    let end = (column + QUOTE_CONTEXT).min(length);
    let mut cut: String = line.chars().skip(start).take(end - start).collect();
    let mut column = column - start;
    if start > 0 {
        cut.insert(0, '…');
        column += 1;
    }
    if end < length {
        cut.push('…');
    }
    (cut.into(), column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_location_quote_caret_and_help() {
        let text = "a: 1\n  stpes: 100\n";
        let rendered = Diagnostic::new("unknown key `stpes`")
            .at(Location::new(Path::new("p.yaml"), 2, 3), Some(text))
            .help("did you mean `steps`?")
            .to_string();
        assert_eq!(
            rendered,
            "unknown key `stpes`\n --> p.yaml:2:3\n  |\n2 |   stpes: 100\n  |   ^\n  = help: did you mean `steps`?"
        );
    }

    #[test]
    fn a_long_line_is_quoted_around_the_column() {
        let text = format!("a: {}\n", "[".repeat(10_000));
        let rendered = Diagnostic::new("too deep")
            .at(Location::new(Path::new("p.yaml"), 1, 5_000), Some(&text))
            .to_string();
        assert!(rendered.len() < 400, "{rendered}");
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(
            lines[3],
            format!("1 | …{}…", "[".repeat(2 * QUOTE_CONTEXT + 1))
        );
        let caret = lines[4].find('^').unwrap();
        assert_eq!(caret, "1 | ".len() + 1 + QUOTE_CONTEXT);
    }
}
