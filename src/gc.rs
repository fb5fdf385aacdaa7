//! `trainyard gc`: removes what no run needs any more.
//!
//! - store entries that no run record (`runs/*/resolved_settings.json`) lists as an
//!   output: nothing can link to them, and a run that wants them again rebuilds them;
//! - scratch directories in `.trainyard/work/` (failed or killed stages, entries
//!   moved aside by `--force` and since replaced), after killing any process a killed
//!   command stage left running. Scratch holding a training checkpoint is kept: it is
//!   the resume point of an interrupted run (`run --no-resume` discards it).
//!
//! An entry a killed `--force` run moved aside and never replaced is the only copy of
//! that output: it is moved back into the store, never removed.
//!
//! It runs under the workspace lock, so it never races a run. Quarantined entries
//! (`.trainyard/quarantine/`) are never touched: they are kept for a person to look at.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use crate::runs::RECORD_FILE;
use crate::store::Workspace;

/// Why a path is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Garbage {
    /// A store entry no run record references.
    Unreferenced,
    /// Scratch of a stage that is not running.
    Scratch,
}

/// What `gc` would remove and keep.
#[derive(Debug, Default)]
pub struct Plan {
    /// Paths to remove, with their size in bytes and why.
    pub remove: Vec<(PathBuf, u64, Garbage)>,
    /// Scratch kept because it holds a checkpoint to resume from.
    pub kept_checkpoints: Vec<PathBuf>,
    /// Store entries a killed `--force` run moved aside and never replaced: moved back.
    pub restored: Vec<PathBuf>,
}

/// Errors of `gc`.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// A run record could not be read, so what it references is unknown.
    #[error(
        "cannot read the run record {path}: {reason}; gc removes nothing while it cannot tell what that run uses"
    )]
    UnreadableRecord {
        /// The record.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Workspace I/O.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> GcError {
    let context = context.into();
    move |source| GcError::Io { context, source }
}

/// What `gc` would remove in `workspace` now. The caller holds the workspace lock.
pub fn plan(workspace: &Workspace) -> Result<Plan, GcError> {
    let referenced = referenced_entries(workspace)?;
    let mut plan = Plan::default();
    let store = workspace.state_dir().join("store");
    for stage_dir in sorted_dirs(&store)? {
        for entry in sorted_dirs(&stage_dir)? {
            if !referenced.contains(&entry) {
                let size =
                    size_of(&entry).map_err(io_error(format!("measuring {}", entry.display())))?;
                plan.remove.push((entry, size, Garbage::Unreferenced));
            }
        }
    }
    let unreplaced: BTreeSet<PathBuf> = workspace
        .unreplaced_entries()
        .map_err(io_error("reading the work folder"))?
        .into_iter()
        .map(|(aside, _)| aside)
        .collect();
    for scratch in sorted_dirs(&workspace.work_dir())? {
        if unreplaced.contains(&scratch) {
            // The only copy of a finished entry: `apply` moves it back into the store.
            plan.restored.push(scratch);
            continue;
        }
        let checkpoints = scratch.join(crate::train::trainer::CHECKPOINTS);
        if crate::train::checkpoint::latest(&checkpoints).is_some() {
            plan.kept_checkpoints.push(scratch);
            continue;
        }
        let size =
            size_of(&scratch).map_err(io_error(format!("measuring {}", scratch.display())))?;
        plan.remove.push((scratch, size, Garbage::Scratch));
    }
    Ok(plan)
}

/// Removes what `plan` lists (after stopping leftover command processes, whose
/// scratch it is). Returns the bytes freed.
pub fn apply(workspace: &Workspace, plan: &Plan) -> Result<u64, GcError> {
    crate::containment::kill_leftovers(&workspace.work_dir())
        .map_err(io_error("stopping processes a killed run left behind"))?;
    workspace
        .restore_unreplaced()
        .map_err(io_error("restoring store entries a killed run moved aside"))?;
    let mut freed = 0;
    for (path, size, _) in &plan.remove {
        std::fs::remove_dir_all(path).map_err(io_error(format!("removing {}", path.display())))?;
        freed += size;
    }
    // Stage folders left empty go too.
    for stage_dir in sorted_dirs(&workspace.state_dir().join("store"))? {
        let _ = std::fs::remove_dir(stage_dir);
    }
    Ok(freed)
}

/// Every store entry some run record lists as a stage output.
fn referenced_entries(workspace: &Workspace) -> Result<BTreeSet<PathBuf>, GcError> {
    let mut referenced = BTreeSet::new();
    for run in sorted_dirs(&workspace.runs_dir())? {
        let path = run.join(RECORD_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            // A run directory without a record (created, then killed at once) uses nothing.
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => {
                return Err(GcError::UnreadableRecord {
                    path,
                    reason: error.to_string(),
                });
            }
        };
        let record: serde_json::Value =
            serde_json::from_str(&text).map_err(|error| GcError::UnreadableRecord {
                path: path.clone(),
                reason: error.to_string(),
            })?;
        let outputs = record
            .get("stages")
            .and_then(|stages| stages.as_object())
            .into_iter()
            .flat_map(|stages| stages.values())
            .filter_map(|stage| stage.get("output")?.as_str());
        for output in outputs {
            referenced.insert(workspace.root.join(output));
        }
    }
    Ok(referenced)
}

/// The subdirectories of `dir` (none if it does not exist), sorted.
fn sorted_dirs(dir: &Path) -> Result<Vec<PathBuf>, GcError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(io_error(format!("reading {}", dir.display()))(error)),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error(format!("reading {}", dir.display())))?;
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Bytes of the regular files below `path` (links are not followed).
fn size_of(path: &Path) -> io::Result<u64> {
    let metadata = std::fs::symlink_metadata(path)?;
    if !metadata.is_dir() {
        return Ok(metadata.len());
    }
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        total += size_of(&entry?.path())?;
    }
    Ok(total)
}
