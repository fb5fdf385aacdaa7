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

/// Gives `path` the mode a newly created file gets (0666 less the process's umask).
/// Writers that go through a temporary file (the safetensors crate's) create it 0600,
/// which would leave model weights unreadable to the rest of a team.
pub fn use_default_permissions(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o666 & !umask()))
}

/// The process's umask, read from `/proc/self/status` (setting and restoring it with
/// `umask(2)` would race with other threads creating files); 022 where unavailable.
fn umask() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Umask:"))
                .and_then(|value| u32::from_str_radix(value.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}
