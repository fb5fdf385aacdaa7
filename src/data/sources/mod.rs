//! Streaming corpus readers, one submodule per format: text JSONL, chat JSONL, globs of
//! text files, delimiter-separated dialogue files, Parquet columns and the built-in
//! synthetic world. Each reader yields one [`Document`] at a time and holds at most one
//! line, file, dialogue or batch of Parquet values, never the whole corpus.
//!
//! This module owns what they share: the document type, the errors (a bad record carries
//! its file and line and a [`Problem`] that names the key; the ingest stage may skip it),
//! and the sorted, glob-filtered directory walk.

pub mod chat;
pub mod dialogues;
pub mod files;
pub mod jsonl;
pub mod parquet;
pub mod synthetic;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::data::records::{ChatRecord, TextRecord};

/// One document as read from a source; it serialises as its record, a corpus line.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum Document {
    /// A plain-text document.
    Text(TextRecord),
    /// A validated conversation.
    Chat(ChatRecord),
}

/// A stream of documents, or the error that stopped or spoiled one of them.
pub type DocumentStream<'a> = Box<dyn Iterator<Item = Result<Document, SourceError>> + 'a>;

/// Where in a file a record sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// 1-based line (JSONL, or the first line of a dialogue).
    Line(u64),
    /// 0-based row (Parquet).
    Row(u64),
    /// The file as a whole (one document per file).
    File,
}

/// A record's file and position, displayed as `path:line`, `path: row N` or `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file, as displayed (relative to the working directory when inside it).
    pub path: String,
    /// Where in it.
    pub position: Position,
}

impl Location {
    /// A location in `path`.
    pub fn new(path: &Path, position: Position) -> Location {
        Location {
            path: display_path(path),
            position,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Position::Line(line) => write!(f, "{}:{line}", self.path),
            Position::Row(row) => write!(f, "{}: row {row}", self.path),
            Position::File => write!(f, "{}", self.path),
        }
    }
}

/// `path` relative to the working directory when it lies inside it, else as is.
pub fn display_path(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

/// What is wrong with one record. Its [`Problem::key`] is how `stats.json` counts it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The line is not JSON.
    #[error("invalid JSON at column {column}: {message}")]
    JsonSyntax {
        /// 1-based column of the error.
        column: usize,
        /// What the JSON parser expected.
        message: String,
    },
    /// The line is JSON, but not an object.
    #[error("expected a JSON object, found {found}")]
    NotAnObject {
        /// What it is instead.
        found: &'static str,
    },
    /// The bytes are not UTF-8.
    #[error("not valid UTF-8 (byte {offset})")]
    InvalidUtf8 {
        /// Offset of the first bad byte.
        offset: usize,
    },
    /// No field to take the text from.
    #[error("{expected}")]
    MissingText {
        /// What was looked for, e.g. `expected a "text", "body_text" or "chunks" field`.
        expected: String,
    },
    /// A field that should hold text holds something else.
    #[error("\"{key}\" must be text, found {found}")]
    NotText {
        /// The key, with its path (`chunks[2].text`).
        key: String,
        /// What it holds instead.
        found: &'static str,
    },
    /// A metadata field has the wrong type.
    #[error("\"{key}\" must be {expected}, found {found}")]
    BadMetadata {
        /// The key.
        key: String,
        /// The accepted types.
        expected: &'static str,
        /// What it holds instead.
        found: &'static str,
    },
    /// A chat line without a `messages` array.
    #[error("expected a \"messages\" array, {found}")]
    MissingMessages {
        /// `found none` or `found a string`.
        found: String,
    },
    /// `messages` is empty.
    #[error("empty conversation: \"messages\" has no turns")]
    EmptyConversation,
    /// A turn whose role is not one of the four.
    #[error(
        "messages[{index}].role: unknown role {role} (expected system, user, assistant or tool)"
    )]
    UnknownRole {
        /// Index of the turn.
        index: usize,
        /// The role as written (JSON).
        role: String,
    },
    /// A turn that is malformed otherwise.
    #[error("messages[{index}]: {reason}")]
    BadMessage {
        /// Index of the turn.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A tool call that cannot be normalised.
    #[error("messages[{index}].tool_calls[{call}]: {reason}")]
    BadToolCall {
        /// Index of the turn.
        index: usize,
        /// Index of the call in the turn.
        call: usize,
        /// What is wrong.
        reason: String,
    },
    /// The last turn is not the assistant's, so there is nothing to learn from.
    #[error(
        "the conversation ends on a {last} turn (messages[{index}]); it must end on an assistant turn"
    )]
    NotEndingOnAssistant {
        /// Index of the last turn.
        index: usize,
        /// Its role.
        last: &'static str,
    },
    /// A Parquet value that is null.
    #[error("column \"{column}\" is null")]
    Null {
        /// The column.
        column: String,
    },
}

impl Problem {
    /// The short reason under which `stats.json` counts skipped records.
    pub fn key(&self) -> &'static str {
        match self {
            Problem::JsonSyntax { .. } => "json_syntax",
            Problem::NotAnObject { .. } => "not_an_object",
            Problem::InvalidUtf8 { .. } => "invalid_utf8",
            Problem::MissingText { .. } => "missing_text",
            Problem::NotText { .. } => "not_text",
            Problem::BadMetadata { .. } => "bad_metadata",
            Problem::MissingMessages { .. } => "missing_messages",
            Problem::EmptyConversation => "empty_conversation",
            Problem::UnknownRole { .. } => "unknown_role",
            Problem::BadMessage { .. } => "bad_message",
            Problem::BadToolCall { .. } => "bad_tool_call",
            Problem::NotEndingOnAssistant { .. } => "not_ending_on_assistant",
            Problem::Null { .. } => "null",
        }
    }

    /// A [`Problem::JsonSyntax`] from a serde_json error, without serde_json's "at line 1".
    pub fn json(error: &serde_json::Error) -> Problem {
        let text = error.to_string();
        let suffix = format!(" at line {} column {}", error.line(), error.column());
        Problem::JsonSyntax {
            column: error.column(),
            message: text.strip_suffix(&suffix).unwrap_or(&text).to_string(),
        }
    }
}

/// Why a source could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// One record is bad; the rest of the source is still readable (may be skipped).
    #[error("{location}: {problem}")]
    Record {
        /// Where.
        location: Location,
        /// What is wrong.
        problem: Problem,
    },
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file, as displayed.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The source cannot be read at all (wrong kind of input, a Parquet file without the
    /// column, a corrupt file): never skipped.
    #[error("{path}: {message}")]
    Unreadable {
        /// The file or directory, as displayed.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The synthetic source's settings cannot build a world.
    #[error("synthetic source: {0}")]
    Synthetic(#[from] crate::data::synthetic::WorldError),
}

impl SourceError {
    /// An I/O error about `path`.
    pub fn io(path: &Path, source: std::io::Error) -> SourceError {
        SourceError::Io {
            path: display_path(path),
            source,
        }
    }

    /// A source that cannot be read at all.
    pub fn unreadable(path: &Path, message: impl Into<String>) -> SourceError {
        SourceError::Unreadable {
            path: display_path(path),
            message: message.into(),
        }
    }

    /// A bad record at `location`.
    pub fn record(location: Location, problem: Problem) -> SourceError {
        SourceError::Record { location, problem }
    }
}

/// What a JSON value is, for messages ("found a number").
pub fn json_type(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The files under `root` whose path relative to it matches `glob`, lazily, in sorted
/// order (byte order of the names, so the order never depends on the file system).
/// `root` may also be a single file, which is returned whatever the glob. Only the
/// listings of the directories on the current path are held; symbolic links to
/// directories are not followed (so there are no cycles).
pub fn walk(root: &Path, glob: globset::GlobMatcher) -> Result<Walk, SourceError> {
    let metadata = std::fs::metadata(root).map_err(|error| SourceError::io(root, error))?;
    let mut walk = Walk {
        root: root.to_path_buf(),
        glob,
        stack: Vec::new(),
        single: None,
    };
    if metadata.is_dir() {
        walk.stack
            .push((String::new(), list_dir(root)?.into_iter()));
    } else {
        let name = root
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        walk.single = Some(WalkedFile {
            path: root.to_path_buf(),
            relative: name,
        });
    }
    Ok(walk)
}

/// A file found by [`walk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalkedFile {
    /// Its path.
    pub path: PathBuf,
    /// Its path relative to the walked directory, `/`-separated.
    pub relative: String,
}

/// The lazy iterator of [`walk`].
pub struct Walk {
    root: PathBuf,
    glob: globset::GlobMatcher,
    /// Per open directory: its relative path and the rest of its sorted listing.
    stack: Vec<(String, std::vec::IntoIter<DirChild>)>,
    single: Option<WalkedFile>,
}

struct DirChild {
    name: String,
    path: PathBuf,
    is_dir: bool,
    is_file: bool,
}

fn list_dir(dir: &Path) -> Result<Vec<DirChild>, SourceError> {
    let entries = std::fs::read_dir(dir).map_err(|error| SourceError::io(dir, error))?;
    let mut children = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| SourceError::io(dir, error))?;
        let path = entry.path();
        let file_type = entry
            .file_type()
            .map_err(|error| SourceError::io(&path, error))?;
        children.push(DirChild {
            name: entry.file_name().to_string_lossy().into_owned(),
            is_dir: file_type.is_dir(),
            is_file: file_type.is_file() || (file_type.is_symlink() && path.is_file()),
            path,
        });
    }
    children.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(children)
}

impl Iterator for Walk {
    type Item = Result<WalkedFile, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(single) = self.single.take() {
            return Some(Ok(single));
        }
        loop {
            let (prefix, listing) = self.stack.last_mut()?;
            let Some(child) = listing.next() else {
                self.stack.pop();
                continue;
            };
            let relative = if prefix.is_empty() {
                child.name
            } else {
                format!("{prefix}/{}", child.name)
            };
            if child.is_dir {
                match list_dir(&child.path) {
                    Ok(children) => self.stack.push((relative, children.into_iter())),
                    Err(error) => return Some(Err(error)),
                }
            } else if child.is_file && self.glob.is_match(&relative) {
                return Some(Ok(WalkedFile {
                    path: child.path,
                    relative,
                }));
            }
        }
    }
}

/// Compiles a glob (`**/*.{md,txt}`); `*` does not cross `/`, `**` does.
pub fn compile_glob(glob: &str) -> Result<globset::GlobMatcher, String> {
    globset::GlobBuilder::new(glob)
        .literal_separator(true)
        .build()
        .map(|glob| glob.compile_matcher())
        .map_err(|error| format!("invalid glob {glob:?}: {error}"))
}

/// A JSON object, as read from one line.
pub type JsonObject = serde_json::Map<String, serde_json::Value>;

/// Opens the document stream of one file found by a [`Walk`].
pub type OpenFile<'a> = Box<dyn FnMut(&WalkedFile) -> Result<DocumentStream<'a>, SourceError> + 'a>;

/// The JSON objects of a JSONL file, one per non-blank line, with their line numbers.
/// Holds one line at a time.
pub struct JsonLines {
    path: PathBuf,
    reader: std::io::BufReader<std::fs::File>,
    line: u64,
    buf: Vec<u8>,
}

impl JsonLines {
    /// Opens `path`.
    pub fn open(path: &Path) -> Result<JsonLines, SourceError> {
        let file = std::fs::File::open(path).map_err(|error| SourceError::io(path, error))?;
        Ok(JsonLines {
            path: path.to_path_buf(),
            reader: std::io::BufReader::with_capacity(1 << 16, file),
            line: 0,
            buf: Vec::new(),
        })
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The location of line `line` of this file.
    pub fn location(&self, line: u64) -> Location {
        Location::new(&self.path, Position::Line(line))
    }

    /// The next object and its 1-based line number; a line that is not a JSON object is a
    /// [`SourceError::Record`] and reading may go on after it.
    pub fn next_object(&mut self) -> Option<Result<(u64, JsonObject), SourceError>> {
        use std::io::BufRead;
        loop {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(error) => return Some(Err(SourceError::io(&self.path, error))),
            }
            self.line += 1;
            let mut bytes = self.buf.as_slice();
            if self.line == 1 {
                bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
            }
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let location = || self.location(self.line);
            let text = match std::str::from_utf8(bytes) {
                Ok(text) => text,
                Err(error) => {
                    let problem = Problem::InvalidUtf8 {
                        offset: error.valid_up_to(),
                    };
                    return Some(Err(SourceError::record(location(), problem)));
                }
            };
            return Some(match serde_json::from_str::<serde_json::Value>(text) {
                Ok(serde_json::Value::Object(object)) => Ok((self.line, object)),
                Ok(other) => Err(SourceError::record(
                    location(),
                    Problem::NotAnObject {
                        found: json_type(&other),
                    },
                )),
                Err(error) => Err(SourceError::record(location(), Problem::json(&error))),
            });
        }
    }
}

/// Documents of every file a [`Walk`] finds, each file read by `open`, one after another.
/// A walk that finds no file at all is an error (a wrong glob or an empty directory).
pub struct PerFile<'a> {
    files: Walk,
    open: OpenFile<'a>,
    current: Option<DocumentStream<'a>>,
    found_any: bool,
}

impl<'a> PerFile<'a> {
    /// Reads the files under `root` that match `glob` (or `root` itself if it is a file)
    /// with `open`.
    pub fn new(
        root: &Path,
        glob: &str,
        open: impl FnMut(&WalkedFile) -> Result<DocumentStream<'a>, SourceError> + 'a,
    ) -> Result<PerFile<'a>, SourceError> {
        let matcher =
            compile_glob(glob).map_err(|message| SourceError::unreadable(root, message))?;
        Ok(PerFile {
            files: walk(root, matcher)?,
            open: Box::new(open),
            current: None,
            found_any: false,
        })
    }
}

impl Iterator for PerFile<'_> {
    type Item = Result<Document, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(current) = &mut self.current {
                match current.next() {
                    Some(item) => return Some(item),
                    None => self.current = None,
                }
            }
            match self.files.next() {
                Some(Ok(file)) => {
                    self.found_any = true;
                    match (self.open)(&file) {
                        Ok(stream) => self.current = Some(stream),
                        Err(error) => return Some(Err(error)),
                    }
                }
                Some(Err(error)) => return Some(Err(error)),
                None if !self.found_any => {
                    self.found_any = true;
                    return Some(Err(SourceError::unreadable(
                        &self.files.root,
                        format!(
                            "no file matches the glob {:?}",
                            self.files.glob.glob().glob()
                        ),
                    )));
                }
                None => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_is_sorted_recursive_and_glob_filtered() {
        let dir = tempfile::tempdir().unwrap();
        for file in ["b.md", "a/z.txt", "a/c/d.md", "a/skip.json", "B.md"] {
            let path = dir.path().join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "x").unwrap();
        }
        let glob = compile_glob("**/*.{md,txt}").unwrap();
        let found: Vec<String> = walk(dir.path(), glob)
            .unwrap()
            .map(|file| file.unwrap().relative)
            .collect();
        assert_eq!(found, ["B.md", "a/c/d.md", "a/z.txt", "b.md"]);
        let top = compile_glob("*.md").unwrap();
        let found: Vec<String> = walk(dir.path(), top)
            .unwrap()
            .map(|file| file.unwrap().relative)
            .collect();
        assert_eq!(found, ["B.md", "b.md"]);
    }

    #[test]
    fn json_problem_names_the_column_without_serde_noise() {
        let error = serde_json::from_str::<serde_json::Value>("{\"a\": tru}").unwrap_err();
        let problem = Problem::json(&error);
        assert_eq!(
            problem.to_string(),
            "invalid JSON at column 10: expected ident"
        );
        assert_eq!(problem.key(), "json_syntax");
    }
}
