//! Content hashing of files and directories with blake3, behind a stat cache.
//!
//! A file's hash is blake3 of its bytes. A directory's hash is blake3 over the sorted
//! list of (relative path, file hash) of every file below it, so it changes exactly when
//! a file is added, removed, renamed or edited. The stat cache maps (path, size, mtime in
//! ns, inode) to the hash, so a no-op run never re-reads an unchanged file; touching a
//! file (new mtime, same bytes) costs one re-read and still yields the same hash.
//!
//! Only regular files and directories hold content: a FIFO, device or socket is an
//! error (reading one could block forever or never end). Symbolic links are followed
//! in inputs (a Hugging Face snapshot is a folder of links into its blob store), but an
//! output is self-contained: a link in an output must be relative and stay inside it,
//! and it is hashed as a link (its target text), never followed ([`Links`]).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::interrupt::CancelFlag;

/// A cached hash is trusted only if the file's mtime was at least this long before the
/// hash was taken: a write within the same timestamp tick as the hashing could otherwise
/// go unnoticed (git's "racy" problem).
const RACY_WINDOW_NS: i128 = 1_000_000_000;

/// Hash and size of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// blake3 hex.
    pub hash: String,
    /// Bytes.
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StatEntry {
    size: u64,
    mtime_ns: i128,
    inode: u64,
    hashed_at_ns: i128,
    hash: String,
}

/// Hashes files and directories, remembering what it has hashed across runs.
#[derive(Debug)]
pub struct ContentHasher {
    cache_file: Option<PathBuf>,
    entries: Mutex<BTreeMap<String, StatEntry>>,
    changed: AtomicBool,
    cancel: Option<CancelFlag>,
    trust_cache: bool,
}

/// What a directory walk does with a symbolic link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links {
    /// Hash what it points to (inputs: the content a stage would read).
    Follow,
    /// Hash the link itself, and refuse links that are absolute or leave the directory
    /// (stage outputs: they move into the store and must not depend on anything else).
    KeepInside,
}

/// Why a path cannot be hashed as content.
fn not_content(path: &Path, file_type: &std::fs::FileType) -> io::Error {
    use std::os::unix::fs::FileTypeExt;
    let what = if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() || file_type.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    };
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{} is {what}; only regular files and directories can be inputs or outputs",
            path.display()
        ),
    )
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as i128)
}

fn mtime_ns(metadata: &std::fs::Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt;
    metadata.mtime() as i128 * 1_000_000_000 + metadata.mtime_nsec() as i128
}

impl ContentHasher {
    /// A hasher whose stat cache lives in `cache_file` (a missing or unreadable cache
    /// just starts empty: it is only an optimisation).
    pub fn open(cache_file: &Path) -> ContentHasher {
        let entries = std::fs::read(cache_file)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        ContentHasher {
            cache_file: Some(cache_file.to_path_buf()),
            entries: Mutex::new(entries),
            changed: AtomicBool::new(false),
            cancel: None,
            trust_cache: true,
        }
    }

    /// This hasher, stopping with [`io::ErrorKind::Interrupted`] within one read of
    /// `cancel` being set (hashing a large model must not hold up Ctrl-C).
    pub fn with_cancel(mut self, cancel: &CancelFlag) -> ContentHasher {
        self.cancel = Some(cancel.clone());
        self
    }

    /// This hasher, re-reading every file however unchanged it looks (`run --verify`);
    /// what it reads still refreshes the cache.
    pub fn rehashing_everything(mut self) -> ContentHasher {
        self.trust_cache = false;
        self
    }

    /// Records `digest` as the content of `path` as it is now, hashed (elsewhere) from
    /// `hashed_at` on: a file just moved into the store keeps its inode and mtime, so
    /// the next run need not read it again.
    pub fn remember(&self, path: &Path, digest: &FileDigest, hashed_at: SystemTime) {
        use std::os::unix::fs::MetadataExt;
        let (Ok(metadata), Ok(absolute)) =
            (std::fs::symlink_metadata(path), std::path::absolute(path))
        else {
            return;
        };
        if !metadata.is_file() || metadata.len() != digest.size {
            return;
        }
        let hashed_at_ns = hashed_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos() as i128);
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(
                normalize(&absolute).to_string_lossy().into_owned(),
                StatEntry {
                    size: metadata.len(),
                    mtime_ns: mtime_ns(&metadata),
                    inode: metadata.ino(),
                    hashed_at_ns,
                    hash: digest.hash.clone(),
                },
            );
            self.changed.store(true, Ordering::Relaxed);
        }
    }

    /// A hasher without a persistent cache.
    pub fn uncached() -> ContentHasher {
        ContentHasher {
            cache_file: None,
            entries: Mutex::new(BTreeMap::new()),
            changed: AtomicBool::new(false),
            cancel: None,
            trust_cache: true,
        }
    }

    /// Writes the stat cache back if anything changed (atomically: temp file + rename).
    pub fn save(&self) -> io::Result<()> {
        let Some(cache_file) = &self.cache_file else {
            return Ok(());
        };
        if !self.changed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let bytes = {
            let entries = self
                .entries
                .lock()
                .map_err(|_| io::Error::other("stat cache lock poisoned"))?;
            serde_json::to_vec(&*entries).map_err(io::Error::other)?
        };
        crate::atomic_file::write_atomically(cache_file, &bytes)
    }

    /// Hash of a file or directory.
    pub fn hash_path(&self, path: &Path) -> io::Result<String> {
        let metadata = std::fs::metadata(path).map_err(|error| {
            io::Error::new(error.kind(), format!("{}: {error}", path.display()))
        })?;
        if metadata.is_dir() {
            Ok(self.hash_dir(path, &[], Links::Follow)?.0)
        } else {
            Ok(self.hash_file(path)?.hash)
        }
    }

    /// Hash and size of one file, from the stat cache when it is still valid.
    pub fn hash_file(&self, path: &Path) -> io::Result<FileDigest> {
        let metadata = std::fs::metadata(path).map_err(|error| with_path(path, error))?;
        match self.cached_digest(path, metadata)? {
            Lookup::Cached(digest) => Ok(digest),
            Lookup::Stale(stale) => self.hash_stale(path, stale),
        }
    }

    /// The digest of `path` (whose `metadata` the caller just read, following links) if
    /// the stat cache still holds it, or what hashing it needs.
    fn cached_digest(&self, path: &Path, metadata: std::fs::Metadata) -> io::Result<Lookup> {
        use std::os::unix::fs::MetadataExt;
        if !metadata.is_file() {
            return Err(not_content(path, &metadata.file_type()));
        }
        let key = normalize(&std::path::absolute(path).map_err(|error| with_path(path, error))?)
            .to_string_lossy()
            .into_owned();
        let (size, mtime_ns, inode) = (metadata.len(), mtime_ns(&metadata), metadata.ino());
        if self.trust_cache
            && let Ok(entries) = self.entries.lock()
            && let Some(entry) = entries.get(&key)
            && entry.size == size
            && entry.mtime_ns == mtime_ns
            && entry.inode == inode
            && entry.hashed_at_ns - entry.mtime_ns >= RACY_WINDOW_NS
        {
            return Ok(Lookup::Cached(FileDigest {
                hash: entry.hash.clone(),
                size,
            }));
        }
        Ok(Lookup::Stale(Stale {
            key,
            size,
            mtime_ns,
            inode,
        }))
    }

    /// Reads and hashes a file the stat cache does not hold, and remembers it.
    fn hash_stale(&self, path: &Path, stale: Stale) -> io::Result<FileDigest> {
        let hashed_at_ns = now_ns();
        let hash =
            hash_contents(path, self.cancel.as_ref()).map_err(|error| with_path(path, error))?;
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(
                stale.key,
                StatEntry {
                    size: stale.size,
                    mtime_ns: stale.mtime_ns,
                    inode: stale.inode,
                    hashed_at_ns,
                    hash: hash.clone(),
                },
            );
            self.changed.store(true, Ordering::Relaxed);
        }
        Ok(FileDigest {
            hash,
            size: stale.size,
        })
    }

    /// Hash of a directory and the digest of every file below it (relative paths with
    /// `/`), skipping top-level entries named in `exclude`.
    pub fn hash_dir(
        &self,
        dir: &Path,
        exclude: &[&str],
        links: Links,
    ) -> io::Result<(String, BTreeMap<String, FileDigest>)> {
        let mut files = Vec::new();
        list_files(dir, dir, "", exclude, links, &mut files)?;
        // Stat-cache hits first, on this thread: handing a few files to the thread pool
        // costs more than statting them (a no-op run of 10,000 one-file stages spent a
        // third of its time waking workers). Only files to read go to the pool.
        let mut digests = Vec::with_capacity(files.len());
        let mut stale = Vec::new();
        for (relative, entry) in files {
            match entry {
                Entry::Link(target) => digests.push((relative, link_digest(&target))),
                Entry::File(metadata) => {
                    match self.cached_digest(&dir.join(&relative), metadata)? {
                        Lookup::Cached(digest) => digests.push((relative, digest)),
                        Lookup::Stale(lookup) => stale.push((relative, lookup)),
                    }
                }
            }
        }
        let hash_one = |(relative, lookup): (String, Stale)| {
            let digest = self.hash_stale(&dir.join(&relative), lookup)?;
            Ok((relative, digest))
        };
        let hashed: Vec<(String, FileDigest)> = if stale.len() > 1 {
            stale
                .into_par_iter()
                .map(hash_one)
                .collect::<io::Result<_>>()?
        } else {
            stale.into_iter().map(hash_one).collect::<io::Result<_>>()?
        };
        digests.extend(hashed);
        let digests: BTreeMap<String, FileDigest> = digests.into_iter().collect();
        Ok((
            dir_hash(
                digests
                    .iter()
                    .map(|(path, digest)| (path.as_str(), digest.hash.as_str())),
            ),
            digests,
        ))
    }
}

/// What the stat cache knows of a file.
enum Lookup {
    /// Its digest is still valid.
    Cached(FileDigest),
    /// It must be read; what to remember once it is.
    Stale(Stale),
}

/// A file the stat cache does not vouch for, with its stat-cache key and signature.
struct Stale {
    key: String,
    size: u64,
    mtime_ns: i128,
    inode: u64,
}

/// `error` with the path it concerns in front.
fn with_path(path: &Path, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

/// Bytes read per step when hashing a file.
const HASH_CHUNK: usize = 8 << 20;

/// `path` with `.` and `..` components resolved lexically, so one file reached through
/// differently spelled paths shares one stat-cache entry.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// The digest of a symbolic link kept as a link: its target's text, in a domain of
/// its own so that it never equals a file holding the same bytes.
fn link_digest(target: &str) -> FileDigest {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"trainyard-symlink-v1\0");
    hasher.update(target.as_bytes());
    FileDigest {
        hash: hasher.finalize().to_hex().to_string(),
        size: target.len() as u64,
    }
}

/// blake3 of a file's bytes, multi-threaded over fixed-size reads. Reading into one
/// buffer (rather than memory-mapping) keeps the process's resident memory flat however
/// large the inputs are.
pub fn hash_file_contents(path: &Path) -> io::Result<String> {
    hash_contents(path, None)
}

fn hash_contents(path: &Path, cancel: Option<&CancelFlag>) -> io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking, so that a FIFO swapped in after the type check cannot hang open().
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(not_content(path, &metadata.file_type()));
    }
    let length = metadata.len();
    let mut buffer = vec![0u8; HASH_CHUNK.min(length as usize).max(1)];
    let mut hasher = blake3::Hasher::new();
    loop {
        let mut filled = 0;
        while filled < buffer.len() {
            match file.read(&mut buffer[filled..]) {
                Ok(0) => break,
                Ok(read) => filled += read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        if filled == 0 {
            break;
        }
        if cancel.is_some_and(CancelFlag::is_cancelled) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
        }
        if filled >= 128 << 10 {
            hasher.update_rayon(&buffer[..filled]);
        } else {
            hasher.update(&buffer[..filled]);
        }
        if filled < buffer.len() {
            break;
        }
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// The directory hash of a sorted list of (relative path, file hash).
pub fn dir_hash<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"trainyard-dir-v1\n");
    for (path, hash) in entries {
        hasher.update(path.as_bytes());
        hasher.update(b"\0");
        hasher.update(hash.as_bytes());
        hasher.update(b"\n");
    }
    hasher.finalize().to_hex().to_string()
}

/// What a directory walk found at a path.
enum Entry {
    /// A regular file, with the metadata the listing read (of the file itself, or of
    /// what a followed link points at): hashing needs it again.
    File(std::fs::Metadata),
    /// A link kept as a link, with its target.
    Link(String),
}

/// Lists the files below `dir` (`root`, or a folder inside it at `prefix`).
fn list_files(
    root: &Path,
    dir: &Path,
    prefix: &str,
    exclude: &[&str],
    links: Links,
    out: &mut Vec<(String, Entry)>,
) -> io::Result<()> {
    let with_path =
        |error: io::Error| io::Error::new(error.kind(), format!("{}: {error}", dir.display()));
    let mut entries: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map_err(with_path)?
        .map(|entry| {
            let entry = entry.map_err(with_path)?;
            Ok((
                entry.file_name().to_string_lossy().into_owned(),
                entry.path(),
            ))
        })
        .collect::<io::Result<_>>()?;
    entries.sort();
    for (name, path) in entries {
        if prefix.is_empty() && exclude.contains(&name.as_str()) {
            continue;
        }
        let relative = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let with_path =
            |error: io::Error| io::Error::new(error.kind(), format!("{}: {error}", path.display()));
        let mut metadata = std::fs::symlink_metadata(&path).map_err(with_path)?;
        if metadata.file_type().is_symlink() {
            if links == Links::KeepInside {
                let target = std::fs::read_link(&path).map_err(with_path)?;
                check_link_stays_inside(root, &path, &relative, &target)?;
                out.push((relative, Entry::Link(target.to_string_lossy().into_owned())));
                continue;
            }
            metadata = std::fs::metadata(&path).map_err(with_path)?;
        }
        if metadata.is_dir() {
            list_files(root, &path, &relative, &[], links, out)?;
        } else if metadata.is_file() {
            out.push((relative, Entry::File(metadata)));
        } else {
            return Err(not_content(&path, &metadata.file_type()));
        }
    }
    Ok(())
}

/// Refuses a link at `relative` (inside the output `root`) whose `target` is absolute or
/// climbs out of the output, by its text or through other links (`x -> b/..` with
/// `b -> .` climbs out although its text does not).
fn check_link_stays_inside(
    root: &Path,
    path: &Path,
    relative: &str,
    target: &Path,
) -> io::Result<()> {
    use std::path::Component;
    let mut depth = relative.matches('/').count() as i64;
    let mut inside = true;
    for component in target.components() {
        match component {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => inside = false,
        }
        inside &= depth >= 0;
    }
    if inside && resolves_inside(root, path, target) {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{} is a symbolic link to {}, outside the output; an output must hold its files (copy them, or link relatively inside the output)",
            path.display(),
            target.display()
        ),
    ))
}

/// Whether the link at `path` to `target` resolves inside `root` on disk: the deepest
/// part of the target that exists, with every link on the way followed, must be inside
/// (a dangling link is judged by the folder it would land in).
fn resolves_inside(root: &Path, path: &Path, target: &Path) -> bool {
    let Ok(root) = std::fs::canonicalize(root) else {
        return false;
    };
    let joined = path.parent().unwrap_or(&root).join(target);
    let mut probe = joined.as_path();
    loop {
        if let Ok(real) = std::fs::canonicalize(probe) {
            return real.starts_with(&root);
        }
        match probe.parent() {
            Some(parent) => probe = parent,
            None => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_hash_changes_with_content_names_and_membership() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a.txt"), "alpha").unwrap();
        std::fs::write(dir.path().join("sub/b.txt"), "beta").unwrap();
        let hasher = ContentHasher::uncached();
        let (first, files) = hasher.hash_dir(dir.path(), &[], Links::Follow).unwrap();
        assert_eq!(files.keys().collect::<Vec<_>>(), ["a.txt", "sub/b.txt"]);
        std::fs::write(dir.path().join("sub/b.txt"), "BETA").unwrap();
        let (edited, _) = hasher.hash_dir(dir.path(), &[], Links::Follow).unwrap();
        assert_ne!(first, edited);
        std::fs::rename(dir.path().join("a.txt"), dir.path().join("c.txt")).unwrap();
        let (renamed, _) = hasher.hash_dir(dir.path(), &[], Links::Follow).unwrap();
        assert_ne!(edited, renamed);
        let (excluded, files) = hasher
            .hash_dir(dir.path(), &["c.txt"], Links::Follow)
            .unwrap();
        assert_eq!(files.len(), 1);
        assert_ne!(renamed, excluded);
    }

    #[test]
    fn stat_cache_survives_a_reopen_and_notices_edits() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data.bin");
        std::fs::write(&file, vec![7u8; 1000]).unwrap();
        let cache = dir.path().join("cache.json");
        let hasher = ContentHasher::open(&cache);
        let first = hasher.hash_file(&file).unwrap();
        hasher.save().unwrap();
        assert_eq!(first.hash, blake3::hash(&[7u8; 1000]).to_hex().to_string());
        std::fs::write(&file, vec![8u8; 1000]).unwrap();
        let reopened = ContentHasher::open(&cache);
        let second = reopened.hash_file(&file).unwrap();
        assert_eq!(second.hash, blake3::hash(&[8u8; 1000]).to_hex().to_string());
    }
}
