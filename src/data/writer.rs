//! Writing JSON Lines files (corpora, questions): one serialised record per line,
//! buffered, with errors that name the file.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// A failed file operation and the file it concerned.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct WriteError {
    /// `creating` or `writing`.
    pub action: &'static str,
    /// The file.
    pub path: PathBuf,
    /// The underlying error.
    pub source: std::io::Error,
}

/// A JSON Lines file being written.
pub struct JsonlWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl JsonlWriter {
    /// Creates (or truncates) the file at `path`.
    pub fn create(path: &Path) -> Result<JsonlWriter, WriteError> {
        let file = File::create(path).map_err(|source| WriteError {
            action: "creating",
            path: path.to_path_buf(),
            source,
        })?;
        Ok(JsonlWriter {
            out: BufWriter::with_capacity(1 << 16, file),
            path: path.to_path_buf(),
        })
    }

    /// Appends one record as a line.
    pub fn write(&mut self, record: &impl Serialize) -> Result<(), WriteError> {
        serde_json::to_writer(&mut self.out, record)
            .map_err(std::io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"))
            .map_err(|source| self.error(source))
    }

    /// Flushes the buffer; dropping the writer without this would lose write errors.
    pub fn finish(mut self) -> Result<(), WriteError> {
        self.out.flush().map_err(|source| self.error(source))
    }

    fn error(&self, source: std::io::Error) -> WriteError {
        WriteError {
            action: "writing",
            path: self.path.clone(),
            source,
        }
    }
}
