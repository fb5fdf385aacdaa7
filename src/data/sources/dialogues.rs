//! Dialogue files: one text file holding many dialogues separated by a delimiter (by
//! default a `<dialogue>` line between blank lines). Each non-blank block is one text
//! document, trimmed; the file is read in pieces, holding at most one block at a time.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{Document, Location, Position, Problem, SourceError};
use crate::data::records::TextRecord;

/// The delimiter used when a `dialogues` source gives none.
pub const DEFAULT_DELIMITER: &str = "\n\n<dialogue>\n\n";

/// How much of the file is read at once.
const READ_SIZE: usize = 1 << 16;

/// Reads the dialogues of one file.
pub struct DialogueReader {
    path: PathBuf,
    file: std::fs::File,
    delimiter: Vec<u8>,
    /// Bytes read; those from `start` on are not returned yet and start at line `line`.
    buffer: Vec<u8>,
    start: usize,
    line: u64,
    eof: bool,
}

impl DialogueReader {
    /// Opens `path`; `delimiter` must not be empty.
    pub fn open(path: &Path, delimiter: &str) -> Result<DialogueReader, SourceError> {
        if delimiter.is_empty() {
            return Err(SourceError::unreadable(
                path,
                "the dialogue delimiter is empty",
            ));
        }
        let file = std::fs::File::open(path).map_err(|error| SourceError::io(path, error))?;
        Ok(DialogueReader {
            path: path.to_path_buf(),
            file,
            delimiter: delimiter.as_bytes().to_vec(),
            buffer: Vec::new(),
            start: 0,
            line: 1,
            eof: false,
        })
    }

    /// The next raw block and the line it starts on, or `None` at the end of the file.
    fn next_block(&mut self) -> Result<Option<(Vec<u8>, u64)>, SourceError> {
        let finder = memchr::memmem::Finder::new(&self.delimiter);
        let mut searched = self.start;
        loop {
            if let Some(at) = finder.find(&self.buffer[searched..]) {
                let end = searched + at;
                let block = self.buffer[self.start..end].to_vec();
                let line = self.line;
                self.line += newlines(&block) + newlines(&self.delimiter);
                self.start = end + self.delimiter.len();
                return Ok(Some((block, line)));
            }
            if self.eof {
                if self.start >= self.buffer.len() {
                    return Ok(None);
                }
                let block = self.buffer[self.start..].to_vec();
                self.start = self.buffer.len();
                return Ok(Some((block, self.line)));
            }
            // Drop what was returned; the delimiter may straddle the old end of the buffer.
            self.buffer.drain(..self.start);
            self.start = 0;
            searched = self.buffer.len().saturating_sub(self.delimiter.len() - 1);
            let old = self.buffer.len();
            self.buffer.resize(old + READ_SIZE, 0);
            let read = loop {
                match self.file.read(&mut self.buffer[old..]) {
                    Ok(read) => break read,
                    Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(error) => return Err(SourceError::io(&self.path, error)),
                }
            };
            self.buffer.truncate(old + read);
            self.eof = read == 0;
        }
    }
}

fn newlines(bytes: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', bytes).count() as u64
}

impl Iterator for DialogueReader {
    type Item = Result<Document, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (block, line) = match self.next_block() {
                Ok(found) => found?,
                Err(error) => return Some(Err(error)),
            };
            let text = match String::from_utf8(block) {
                Ok(text) => text,
                Err(error) => {
                    return Some(Err(SourceError::record(
                        Location::new(&self.path, Position::Line(line)),
                        Problem::InvalidUtf8 {
                            offset: error.utf8_error().valid_up_to(),
                        },
                    )));
                }
            };
            let trimmed = text.trim();
            if trimmed.is_empty() {
                continue;
            }
            let text = if trimmed.len() == text.len() {
                text
            } else {
                trimmed.to_string()
            };
            return Some(Ok(Document::Text(TextRecord {
                text,
                source_url: None,
                chunk_id: None,
                section_path: None,
            })));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(content: &str, delimiter: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.txt");
        std::fs::write(&path, content).unwrap();
        DialogueReader::open(&path, delimiter)
            .unwrap()
            .map(|doc| match doc.unwrap() {
                Document::Text(record) => record.text,
                Document::Chat(_) => panic!("chat"),
            })
            .collect()
    }

    #[test]
    fn splits_on_the_delimiter_and_drops_empty_blocks() {
        let content = "A: hi\nB: yo\n\n<dialogue>\n\n\n\n<dialogue>\n\nA: bye\n";
        assert_eq!(read(content, DEFAULT_DELIMITER), ["A: hi\nB: yo", "A: bye"]);
        assert_eq!(read("x|||y|||", "|||"), ["x", "y"]);
        assert!(read("", "|||").is_empty());
    }

    #[test]
    fn a_delimiter_across_read_boundaries_is_found() {
        let first = "a".repeat(READ_SIZE - 3);
        let content = format!("{first}{DEFAULT_DELIMITER}second");
        let blocks = read(&content, DEFAULT_DELIMITER);
        assert_eq!(blocks, [first, "second".to_string()]);
    }
}
