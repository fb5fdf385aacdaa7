//! An I/O error that names the file it concerned. `std::io::Error` does not carry its
//! path, so every library's error type needs one; this is that one type, shared, with
//! [`AtPath::at`] to attach the path where the error happens:
//! `fs::read(&path).at(&path)?`.

use std::io;
use std::path::{Path, PathBuf};

/// An I/O error and the path it concerned; shown as `path: cause`.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct PathIoError {
    /// The file or directory.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: io::Error,
}

impl PathIoError {
    /// `source` at `path`.
    pub fn new(path: impl Into<PathBuf>, source: io::Error) -> PathIoError {
        PathIoError {
            path: path.into(),
            source,
        }
    }
}

/// Attaches a path to an I/O result.
pub trait AtPath<T> {
    /// The error, if any, as a [`PathIoError`] at `path`.
    fn at(self, path: impl AsRef<Path>) -> Result<T, PathIoError>;
}

impl<T> AtPath<T> for io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T, PathIoError> {
        self.map_err(|source| PathIoError::new(path.as_ref(), source))
    }
}

/// Writes `value` to `path` as pretty-printed JSON with a trailing newline.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), PathIoError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(io::Error::other)
        .at(path)?;
    text.push('\n');
    std::fs::write(path, text).at(path)
}
