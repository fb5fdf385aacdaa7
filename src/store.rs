//! The workspace on disk: the content-addressed store of finished stage outputs, the
//! scratch directories stages write into, the record of each stage's last identity
//! (for `status`), and the workspace lock.
//!
//! ```text
//! .trainyard/
//!   lock                      advisory lock; holds the pid and command of its owner
//!   stat-cache.json           see crate::hashing
//!   store/<stage>/<fp>/       finished outputs, immutable, manifest.json written last
//!   work/<stage>-<fp>/        scratch; renamed into the store when the stage succeeds
//!   last/<stage>.json         identity of the stage as last used by a run
//! runs/<run-id>/              see crate::runs
//! ```
//!
//! An output becomes visible only through `rename(work/…, store/…)` after its manifest
//! is written and synced, so a crash at any moment leaves either nothing or a complete
//! output: never a half-written one that looks finished.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fingerprint::StageIdentity;
use crate::hashing::{ContentHasher, FileDigest, Links, dir_hash};

/// Prefix of a store entry [`Workspace::publish`] moves aside into the work folder
/// while it replaces it.
const REPLACED_PREFIX: &str = "replaced-";

/// Name of the manifest in every store entry.
pub const MANIFEST: &str = "manifest.json";
/// Characters of the fingerprint used in directory names (128 bits).
const FINGERPRINT_DIR_CHARS: usize = 32;

/// The record written last into a finished output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    /// Stage name that produced it.
    pub stage: String,
    /// The full fingerprint.
    pub fingerprint: String,
    /// What the fingerprint was computed from.
    pub identity: StageIdentity,
    /// Every output file (relative path) with its hash and size, the log included.
    pub files: BTreeMap<String, FileDigest>,
    /// Hash of the output as downstream stages see it (all files but the manifest and log).
    pub output_hash: String,
    /// RFC 3339 start time.
    pub started_at: String,
    /// RFC 3339 end time.
    pub finished_at: String,
    /// Wall time in seconds.
    pub duration_s: f64,
    /// Always `succeeded`: failed stages never reach the store.
    pub exit_status: String,
    /// Metrics the stage reported.
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// trainyard version that produced it.
    pub trainyard_version: String,
}

/// The digest of every file of the output in `dir` but `manifest.json`, as its manifest
/// records them.
pub fn output_files(
    hasher: &ContentHasher,
    dir: &Path,
) -> io::Result<BTreeMap<String, FileDigest>> {
    Ok(hasher.hash_dir(dir, &[MANIFEST], Links::KeepInside)?.1)
}

/// Hashes the output in `dir` as its manifest records it: [`output_files`] and the
/// output hash over them without `unhashed` (see [`output_hash`]). The executor calls
/// this before publishing; `trainyard audit` calls it again later.
pub fn hash_output(
    hasher: &ContentHasher,
    dir: &Path,
    unhashed: &[&str],
) -> io::Result<(String, BTreeMap<String, FileDigest>)> {
    let files = output_files(hasher, dir)?;
    Ok((output_hash(&files, unhashed), files))
}

/// The hash of an output as downstream stages see it: the directory hash of its files
/// but those named in `unhashed` (the stages' rule: logs and training metrics hold
/// timings, see `stages::UNHASHED_OUTPUTS`).
pub fn output_hash(files: &BTreeMap<String, FileDigest>, unhashed: &[&str]) -> String {
    dir_hash(
        files
            .iter()
            .filter(|(path, _)| !unhashed.contains(&path.as_str()))
            .map(|(path, digest)| (path.as_str(), digest.hash.as_str())),
    )
}

/// Hash of a file or folder inside an output, from its file digests (no re-reading):
/// what a downstream stage reading `<stage>/<subpath>` depends on.
pub fn subpath_hash(files: &BTreeMap<String, FileDigest>, subpath: &str) -> Option<String> {
    if let Some(digest) = files.get(subpath) {
        return Some(digest.hash.clone());
    }
    let prefix = format!("{subpath}/");
    let inside: Vec<(&str, &str)> = files
        .iter()
        .filter_map(|(path, digest)| Some((path.strip_prefix(&prefix)?, digest.hash.as_str())))
        .collect();
    (!inside.is_empty()).then(|| dir_hash(inside))
}

/// How a store entry no longer matches its manifest, if it does not: the first file
/// that differs, is missing or was added, or why the entry cannot be read.
pub fn check_entry(
    hasher: &ContentHasher,
    dir: &Path,
    manifest: &Manifest,
) -> Result<Option<String>, crate::interrupt::Interrupted> {
    let files = match output_files(hasher, dir) {
        Ok(files) => files,
        Err(error) if error.kind() == io::ErrorKind::Interrupted => {
            return Err(crate::interrupt::Interrupted);
        }
        Err(error) => return Ok(Some(format!("it cannot be read ({error})"))),
    };
    for (path, recorded) in &manifest.files {
        match files.get(path) {
            None => return Ok(Some(format!("`{path}` is missing"))),
            Some(found) if found != recorded => {
                return Ok(Some(format!(
                    "`{path}` differs from its manifest (blake3 {} instead of {})",
                    &found.hash[..12],
                    &recorded.hash[..recorded.hash.len().min(12)]
                )));
            }
            Some(_) => {}
        }
    }
    Ok(files
        .keys()
        .find(|path| !manifest.files.contains_key(*path))
        .map(|path| format!("`{path}` was added after it was published")))
}

/// Paths of one workspace.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// The workspace root (holds `.trainyard/` and `runs/`).
    pub root: PathBuf,
}

impl Workspace {
    /// The workspace rooted at `root` (made absolute; nothing is created yet).
    pub fn new(root: &Path) -> io::Result<Workspace> {
        Ok(Workspace {
            root: std::path::absolute(root)?,
        })
    }

    /// `.trainyard/`.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join(".trainyard")
    }

    /// `runs/`.
    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    /// `.trainyard/work/`: scratch directories (and the process marks of commands).
    pub fn work_dir(&self) -> PathBuf {
        self.state_dir().join("work")
    }

    /// The stat cache file.
    pub fn stat_cache(&self) -> PathBuf {
        self.state_dir().join("stat-cache.json")
    }

    /// Where the output of `stage` with `fingerprint` lives once finished.
    pub fn entry_dir(&self, stage: &str, fingerprint: &str) -> PathBuf {
        self.state_dir()
            .join("store")
            .join(stage)
            .join(short(fingerprint))
    }

    /// The scratch directory of `stage` with `fingerprint`. Its name is fixed by the
    /// fingerprint so that a resumable stage finds its checkpoints after a crash.
    pub fn scratch_dir(&self, stage: &str, fingerprint: &str) -> PathBuf {
        self.work_dir()
            .join(format!("{stage}-{}", short(fingerprint)))
    }

    /// A new scratch directory name for one attempt at a stage that does not resume:
    /// `<stage>-<fingerprint>.<attempt>`. A process a killed attempt left behind (one
    /// that escaped containment) still holds the old path, so it can never write into
    /// the scratch of a later attempt.
    pub fn attempt_scratch_dir(&self, stage: &str, fingerprint: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        self.work_dir().join(format!(
            "{stage}-{}.{:x}{:x}",
            short(fingerprint),
            std::process::id(),
            nanos & 0xffff_ffff
        ))
    }

    /// Earlier attempts' scratch directories of `stage` with `fingerprint` (see
    /// [`Workspace::attempt_scratch_dir`]) and the fixed one of a resumable stage.
    pub fn earlier_scratch_dirs(&self, stage: &str, fingerprint: &str) -> Vec<PathBuf> {
        let fixed = format!("{stage}-{}", short(fingerprint));
        let attempt = format!("{fixed}.");
        let Ok(entries) = fs::read_dir(self.work_dir()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|entry| {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                (name == fixed.as_str() || name.starts_with(&attempt))
                    && entry.file_type().is_ok_and(|kind| kind.is_dir())
            })
            .map(|entry| entry.path())
            .collect()
    }

    /// The manifest of the finished output of `stage` with `fingerprint`: `Ok(None)`
    /// when there is no entry, `Err` with what is wrong when there is an entry whose
    /// manifest is missing, unreadable or for another fingerprint (such an entry is
    /// damaged, and must be moved aside rather than replaced).
    pub fn lookup(&self, stage: &str, fingerprint: &str) -> Result<Option<Manifest>, String> {
        let path = self.entry_dir(stage, fingerprint).join(MANIFEST);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return match self.entry_dir(stage, fingerprint).exists() {
                    true => Err(format!("its `{MANIFEST}` is missing")),
                    false => Ok(None),
                };
            }
            Err(error) => return Err(format!("its `{MANIFEST}` cannot be read ({error})")),
        };
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|error| format!("its `{MANIFEST}` is not a valid manifest ({error})"))?;
        if manifest.fingerprint != fingerprint || manifest.stage != stage {
            return Err(format!(
                "its `{MANIFEST}` is for another stage or fingerprint (`{}` {})",
                manifest.stage,
                short(&manifest.fingerprint)
            ));
        }
        Ok(Some(manifest))
    }

    /// Makes `scratch` the finished output for `manifest.fingerprint`: writes the
    /// manifest, syncs, and renames it into the store. An existing entry (from `--force`)
    /// is moved aside first and deleted afterwards.
    pub fn publish(&self, scratch: &Path, manifest: &Manifest) -> io::Result<PathBuf> {
        for relative in manifest.files.keys() {
            let path = scratch.join(relative);
            // Links are kept as links (see hashing::Links): there is nothing to sync.
            if !fs::symlink_metadata(&path)?.file_type().is_symlink() {
                File::open(path)?.sync_all()?;
            }
        }
        let bytes = serde_json::to_vec_pretty(manifest).map_err(io::Error::other)?;
        crate::atomic_file::write_synced(&scratch.join(MANIFEST), &bytes)?;
        let target = self.entry_dir(&manifest.stage, &manifest.fingerprint);
        let parent = target
            .parent()
            .ok_or_else(|| io::Error::other("store entry has no parent"))?;
        fs::create_dir_all(parent)?;
        let replaced = if target.exists() {
            let aside = self.work_dir().join(format!(
                "{REPLACED_PREFIX}{}-{}-{}",
                manifest.stage,
                short(&manifest.fingerprint),
                std::process::id()
            ));
            fs::rename(&target, &aside)?;
            Some(aside)
        } else {
            None
        };
        // The files move into a fresh folder that becomes the entry, rather than the
        // scratch folder itself: a process the command left behind that escaped
        // containment still has the scratch as its working directory, and what it writes
        // there later lands in the abandoned scratch, not in the published output.
        let fresh = scratch.with_extension("publishing");
        if fresh.exists() {
            fs::remove_dir_all(&fresh)?;
        }
        fs::create_dir(&fresh)?;
        for entry in fs::read_dir(scratch)? {
            let entry = entry?;
            fs::rename(entry.path(), fresh.join(entry.file_name()))?;
        }
        File::open(&fresh)?.sync_all()?;
        fs::rename(&fresh, &target)?;
        File::open(parent)?.sync_all()?;
        // Empty unless a leftover wrote into it meanwhile; gc removes it then.
        let _ = fs::remove_dir(scratch);
        if let Some(aside) = replaced {
            fs::remove_dir_all(aside)?;
        }
        Ok(target)
    }

    /// Moves the entry of `stage` with `fingerprint` aside into `.trainyard/quarantine/`
    /// (never deleting it: it may be all there is of a week of training) and returns
    /// where it went.
    pub fn quarantine(&self, stage: &str, fingerprint: &str) -> io::Result<PathBuf> {
        let quarantine = self.state_dir().join("quarantine");
        fs::create_dir_all(&quarantine)?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut target = quarantine.join(format!("{stage}-{}-{stamp}", short(fingerprint)));
        let mut attempt = 1;
        while target.exists() {
            attempt += 1;
            target = quarantine.join(format!("{stage}-{}-{stamp}-{attempt}", short(fingerprint)));
        }
        fs::rename(self.entry_dir(stage, fingerprint), &target)?;
        Ok(target)
    }

    /// The identity `stage` had when a run last used it.
    pub fn last_identity(&self, stage: &str) -> Option<StageIdentity> {
        let bytes = fs::read(self.last_path(stage)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records the identity `stage` (with `fingerprint`) had in this run. Unchanged
    /// records are not rewritten, and none is synced: they only feed `status`
    /// explanations, so a no-op run stays free of disk flushes.
    ///
    /// Beside `last/<stage>.json`, a link `last/<stage>.fp` holds the fingerprint as its
    /// target text: checking it is one `readlink`, where reading and comparing the
    /// identity cost five system calls and a serialization per stage of a no-op run.
    pub fn record_last_identity(
        &self,
        stage: &str,
        fingerprint: &str,
        identity: &StageIdentity,
    ) -> io::Result<()> {
        let marker = self.last_marker_path(stage);
        let recorded = short(fingerprint);
        if fs::read_link(&marker).is_ok_and(|target| target.as_os_str() == recorded) {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(identity).map_err(io::Error::other)?;
        crate::atomic_file::replace_file(&self.last_path(stage), &bytes, false)?;
        // The marker is written last: it never vouches for an identity not yet written.
        let temp = marker.with_extension(format!("fp.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&temp);
        std::os::unix::fs::symlink(recorded, &temp)?;
        fs::rename(&temp, &marker)
    }

    /// Entries a `--force` publish moved aside but never replaced: a run killed between
    /// the two renames of [`Workspace::publish`] leaves the only copy of a finished output
    /// in `.trainyard/work/replaced-*`. Returns `(moved aside, store entry)` pairs whose
    /// store entry is missing; entries already replaced are plain leftovers.
    pub fn unreplaced_entries(&self) -> io::Result<Vec<(PathBuf, PathBuf)>> {
        let entries = match fs::read_dir(self.work_dir()) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        let mut found = Vec::new();
        for entry in entries {
            let aside = entry?.path();
            let is_replaced = aside
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(REPLACED_PREFIX));
            if !is_replaced {
                continue;
            }
            // A manifest that cannot be read means the entry was never complete.
            let Some(manifest) = fs::read(aside.join(MANIFEST))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Manifest>(&bytes).ok())
            else {
                continue;
            };
            let target = self.entry_dir(&manifest.stage, &manifest.fingerprint);
            if !target.exists() {
                found.push((aside, target));
            }
        }
        found.sort();
        Ok(found)
    }

    /// Moves back every entry [`Workspace::unreplaced_entries`] finds, and returns the
    /// store entries restored. The caller holds the workspace lock.
    pub fn restore_unreplaced(&self) -> io::Result<Vec<PathBuf>> {
        let mut restored = Vec::new();
        for (aside, target) in self.unreplaced_entries()? {
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::rename(&aside, &target)?;
            restored.push(target);
        }
        Ok(restored)
    }

    fn last_path(&self, stage: &str) -> PathBuf {
        self.state_dir().join("last").join(format!("{stage}.json"))
    }

    fn last_marker_path(&self, stage: &str) -> PathBuf {
        self.state_dir().join("last").join(format!("{stage}.fp"))
    }
}

fn short(fingerprint: &str) -> &str {
    &fingerprint[..fingerprint.len().min(FINGERPRINT_DIR_CHARS)]
}

/// Holds the workspace lock until dropped (the OS releases it if the process dies).
#[derive(Debug)]
pub struct WorkspaceLock {
    _file: File,
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds it and we were told not to wait.
    #[error(
        "the workspace {workspace} is locked by another trainyard run ({holder}); wait for it to finish or stop it"
    )]
    Busy {
        /// Workspace root.
        workspace: String,
        /// Who holds it: pid and command line, as it wrote them.
        holder: String,
    },
    /// Ctrl-C or SIGTERM arrived while waiting for the lock.
    #[error("interrupted while waiting for the workspace lock")]
    Interrupted,
    /// The lock file could not be opened or written.
    #[error("cannot lock {path}: {source}")]
    Io {
        /// Lock file.
        path: String,
        /// Underlying error.
        source: io::Error,
    },
}

impl Workspace {
    /// Takes the workspace lock. When another process holds it, either fails with
    /// [`LockError::Busy`] naming that process, or (with `wait`) calls `on_wait` with its
    /// description once and waits until it is released, or until `cancel` is set
    /// (checked every 50 ms: Ctrl-C must not wait for another run to finish). A lock
    /// whose owner died is free: advisory locks die with their process.
    pub fn lock(
        &self,
        wait: bool,
        on_wait: &mut dyn FnMut(&str),
        cancel: Option<&crate::interrupt::CancelFlag>,
    ) -> Result<WorkspaceLock, LockError> {
        let path = self.state_dir().join("lock");
        let io_error = |source: io::Error| LockError::Io {
            path: path.display().to_string(),
            source,
        };
        fs::create_dir_all(self.state_dir()).map_err(io_error)?;
        let mut file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&path)
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                let holder = if holder.is_empty() {
                    "unknown process".to_string()
                } else {
                    holder
                };
                if !wait {
                    return Err(LockError::Busy {
                        workspace: self.root.display().to_string(),
                        holder,
                    });
                }
                on_wait(&holder);
                loop {
                    if cancel.is_some_and(crate::interrupt::CancelFlag::is_cancelled) {
                        return Err(LockError::Interrupted);
                    }
                    match file.try_lock() {
                        Ok(()) => break,
                        Err(fs::TryLockError::WouldBlock) => {
                            std::thread::sleep(std::time::Duration::from_millis(50));
                        }
                        Err(fs::TryLockError::Error(error)) => return Err(io_error(error)),
                    }
                }
            }
            Err(fs::TryLockError::Error(error)) => return Err(io_error(error)),
        }
        let command: Vec<String> = std::env::args().collect();
        file.set_len(0).map_err(io_error)?;
        writeln!(file, "pid {}: {}", std::process::id(), command.join(" ")).map_err(io_error)?;
        Ok(WorkspaceLock { _file: file })
    }
}
