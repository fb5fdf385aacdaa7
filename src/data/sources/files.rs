//! Text files: every `.txt`/`.md` file (by default) under a directory, recursively, as one
//! document each, with its path relative to the directory as `source_url` — the shape of
//! a Roam, Obsidian or Logseq export. Files are read one at a time, in sorted order.

use std::path::Path;

use super::{Document, Location, PerFile, Position, Problem, SourceError, WalkedFile};
use crate::data::records::TextRecord;

/// The glob used when a `files` source gives none.
pub const DEFAULT_GLOB: &str = "**/*.{md,txt}";

/// The documents of the files under `root` whose relative path matches `glob`.
pub fn read_files(root: &Path, glob: &str) -> Result<PerFile<'static>, SourceError> {
    PerFile::new(root, glob, |file| {
        Ok(Box::new(std::iter::once(read_file(file))))
    })
}

/// One file as one document.
pub fn read_file(file: &WalkedFile) -> Result<Document, SourceError> {
    let bytes = std::fs::read(&file.path).map_err(|error| SourceError::io(&file.path, error))?;
    match String::from_utf8(bytes) {
        Ok(mut text) => {
            if text.starts_with('\u{feff}') {
                text.drain(..3);
            }
            Ok(Document::Text(TextRecord {
                text,
                source_url: Some(file.relative.clone()),
                chunk_id: None,
                section_path: None,
            }))
        }
        Err(error) => Err(SourceError::record(
            Location::new(&file.path, Position::File),
            Problem::InvalidUtf8 {
                offset: error.utf8_error().valid_up_to(),
            },
        )),
    }
}
