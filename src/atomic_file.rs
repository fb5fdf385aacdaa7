//! Replacing a file so that a reader sees the old or the new content, never a mix:
//! write a sibling temp file, optionally sync it, rename it over. Used by the store's
//! manifests, the stat cache and run records.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Writes `bytes` to `path` and syncs it to disk before returning.
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Replaces `path` with `bytes` so that readers see the old or the new content, never
/// a mix: write a sibling temp file, sync it, rename it over.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_file(path, bytes, true)
}

/// [`write_atomically`], with the sync optional: without it a crash can lose the new
/// content (the old stays), which is fine for records that are only conveniences.
pub fn replace_file(path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let parent = path
        .parent()
        .ok_or_else(|| io::Error::other(format!("{} has no parent", path.display())))?;
    fs::create_dir_all(parent)?;
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy())
        .unwrap_or_default();
    let temp = parent.join(format!(".{file_name}.{}.tmp", std::process::id()));
    if sync {
        write_synced(&temp, bytes)?;
    } else {
        fs::write(&temp, bytes)?;
    }
    fs::rename(&temp, path)
}
