//! Hugging Face model ids (`hf:org/name[@revision]`) resolved offline, through the local
//! Hugging Face cache exactly as `huggingface_hub` lays it out:
//! `<cache>/models--org--name/refs/<branch or tag>` holds a commit hash and
//! `<cache>/models--org--name/snapshots/<commit>/` the files (usually symlinks into
//! `blobs/`). Nothing here touches the network: a model that is not in the cache is an
//! error that says where it was looked for and how to download it.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The prefix that marks a model id in an input (`hf:Qwen/Qwen2.5-0.5B`).
pub const PREFIX: &str = "hf:";

/// The revision `huggingface_hub` uses when none is given.
pub const DEFAULT_REVISION: &str = "main";

/// A parsed `hf:org/name[@revision]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelId {
    /// `org/name` (or just `name` for the few repositories without an organisation).
    pub repo: String,
    /// The revision as written (branch, tag or commit hash), if any.
    pub revision: Option<String>,
}

/// A model found in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The id as written, `hf:` included.
    pub id: String,
    /// `org/name`.
    pub repo: String,
    /// The revision asked for (`main` when none was given).
    pub revision: String,
    /// The commit the revision resolved to.
    pub commit: String,
    /// The snapshot directory (`…/snapshots/<commit>`).
    pub path: PathBuf,
}

/// Where the cache directory was taken from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheDir {
    /// The hub cache directory (the one holding `models--…`).
    pub path: PathBuf,
    /// How it was chosen: `$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`, ….
    pub chosen_by: &'static str,
}

/// Why an id does not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HfError {
    /// The text after `hf:` is not `org/name[@revision]`.
    #[error(
        "`{id}` is not a Hugging Face model id: {reason} (expected hf:org/name or hf:org/name@revision)"
    )]
    InvalidId {
        /// As written.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No cache directory can be named (no `HF_HUB_CACHE`, `HF_HOME` nor home directory).
    #[error(
        "cannot find the Hugging Face cache for `{id}`: none of HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME and HOME is set"
    )]
    NoCacheDir {
        /// As written.
        id: String,
    },
    /// The model, its revision or its snapshot is not in the cache.
    #[error(
        "`{id}` is not in the local Hugging Face cache: {missing} does not exist (the cache is {cache}, from {chosen_by}); trainyard never downloads, so download it first with `hf {download_args}` (older huggingface_hub: `huggingface-cli {download_args}`)"
    )]
    NotCached {
        /// As written.
        id: String,
        /// The cache directory.
        cache: String,
        /// How the cache directory was chosen.
        chosen_by: &'static str,
        /// The exact path that is missing.
        missing: String,
        /// `download org/name [--revision rev]`, after `hf` (or the older `huggingface-cli`).
        download_args: String,
    },
    /// A ref file exists but cannot be read or does not hold a commit hash.
    #[error("`{id}`: cannot read the revision from {path}: {reason}")]
    BadRef {
        /// As written.
        id: String,
        /// The ref file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// Whether an input value names a Hugging Face model rather than a path or stage.
pub fn is_model_id(value: &str) -> bool {
    value.starts_with(PREFIX)
}

fn valid_part(part: &str) -> bool {
    !part.is_empty()
        && part != "."
        && !part.contains("..")
        && !part.contains("--")
        && !part.starts_with(['-', '.'])
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl ModelId {
    /// Parses `hf:org/name[@revision]` (the `hf:` prefix is required).
    pub fn parse(id: &str) -> Result<ModelId, HfError> {
        let invalid = |reason: &str| HfError::InvalidId {
            id: id.to_string(),
            reason: reason.to_string(),
        };
        let rest = id
            .strip_prefix(PREFIX)
            .ok_or_else(|| invalid("it does not start with `hf:`"))?;
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, revision)) => (repo, Some(revision)),
            None => (rest, None),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() > 2 || !parts.iter().all(|part| valid_part(part)) {
            return Err(invalid(
                "the repository must be `org/name` of letters, digits, `-`, `_` and `.`",
            ));
        }
        if let Some(revision) = revision {
            // A revision becomes a path below `refs/`: it must not climb out of it.
            let safe = !revision.is_empty()
                && Path::new(revision)
                    .components()
                    .all(|component| matches!(component, Component::Normal(_)));
            if !safe {
                return Err(invalid(
                    "the revision after `@` is empty or not a plain name",
                ));
            }
        }
        Ok(ModelId {
            repo: repo.to_string(),
            revision: revision.map(str::to_string),
        })
    }

    /// The directory of this repository inside the hub cache (`models--org--name`).
    pub fn folder_name(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }

    /// The revision to look up (`main` when none was given).
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or(DEFAULT_REVISION)
    }

    /// The arguments of the download command, after `hf` / `huggingface-cli`.
    pub fn download_args(&self) -> String {
        match &self.revision {
            Some(revision) => format!("download {} --revision {revision}", self.repo),
            None => format!("download {}", self.repo),
        }
    }
}

/// The hub cache directory as `huggingface_hub` chooses it, with `var` reading the
/// environment: `$HF_HUB_CACHE` (or the older `$HUGGINGFACE_HUB_CACHE`), else
/// `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir_with(var: impl Fn(&str) -> Option<OsString>) -> Option<CacheDir> {
    let set = |name: &str| var(name).filter(|value| !value.is_empty());
    let home = set("HOME").map(PathBuf::from);
    // huggingface_hub expands `~` in these variables; so do we.
    let expand = |value: OsString| -> PathBuf {
        let path = PathBuf::from(value);
        match (path.strip_prefix("~"), &home) {
            (Ok(rest), Some(home)) => home.join(rest),
            _ => path,
        }
    };
    let variables: [(&str, &[&str], &str); 4] = [
        ("HF_HUB_CACHE", &[], "$HF_HUB_CACHE"),
        ("HUGGINGFACE_HUB_CACHE", &[], "$HUGGINGFACE_HUB_CACHE"),
        ("HF_HOME", &["hub"], "$HF_HOME/hub"),
        (
            "XDG_CACHE_HOME",
            &["huggingface", "hub"],
            "$XDG_CACHE_HOME/huggingface/hub",
        ),
    ];
    for (name, below, chosen_by) in variables {
        if let Some(dir) = set(name) {
            let path = below.iter().fold(expand(dir), |path, part| path.join(part));
            return Some(CacheDir { path, chosen_by });
        }
    }
    home.map(|home| CacheDir {
        path: home.join(".cache").join("huggingface").join("hub"),
        chosen_by: "the default ~/.cache/huggingface/hub",
    })
}

/// [`cache_dir_with`] over this process's environment.
pub fn cache_dir() -> Option<CacheDir> {
    cache_dir_with(|name| std::env::var_os(name))
}

fn is_commit_hash(text: &str) -> bool {
    text.len() == 40 && text.bytes().all(|byte| byte.is_ascii_hexdigit())
}

/// Resolves `id` (`hf:org/name[@revision]`) in the cache `cache`: a branch or tag is
/// read from `refs/`, a commit hash is used as is, and the snapshot must exist.
pub fn resolve_in(id: &str, cache: &CacheDir) -> Result<Snapshot, HfError> {
    let model = ModelId::parse(id)?;
    let repo_dir = cache.path.join(model.folder_name());
    let not_cached = |missing: &Path| HfError::NotCached {
        id: id.to_string(),
        cache: cache.path.display().to_string(),
        chosen_by: cache.chosen_by,
        missing: missing.display().to_string(),
        download_args: model.download_args(),
    };
    if !repo_dir.is_dir() {
        return Err(not_cached(&repo_dir));
    }
    let revision = model.revision().to_string();
    // As huggingface_hub does: a name under refs/ wins; otherwise a full commit hash.
    let ref_file = repo_dir.join("refs").join(&revision);
    let commit = if ref_file.is_file() {
        let text = std::fs::read_to_string(&ref_file).map_err(|error| HfError::BadRef {
            id: id.to_string(),
            path: ref_file.display().to_string(),
            reason: error.to_string(),
        })?;
        let commit = text.trim().to_string();
        if !is_commit_hash(&commit) {
            return Err(HfError::BadRef {
                id: id.to_string(),
                path: ref_file.display().to_string(),
                reason: format!("`{commit}` is not a commit hash"),
            });
        }
        commit
    } else if is_commit_hash(&revision) {
        revision.to_ascii_lowercase()
    } else {
        return Err(not_cached(&ref_file));
    };
    let path = repo_dir.join("snapshots").join(&commit);
    if !path.is_dir() {
        return Err(not_cached(&path));
    }
    Ok(Snapshot {
        id: id.to_string(),
        repo: model.repo,
        revision,
        commit,
        path,
    })
}

/// Resolves `id` in the cache this process's environment names (see [`cache_dir`]).
pub fn resolve(id: &str) -> Result<Snapshot, HfError> {
    // A malformed id is reported as such even where no cache directory can be named.
    ModelId::parse(id)?;
    let cache = cache_dir().ok_or_else(|| HfError::NoCacheDir { id: id.to_string() })?;
    resolve_in(id, &cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
    const OTHER: &str = "fedcba9876543210fedcba9876543210fedcba98";

    /// A cache with `models--org--tiny`: refs/main → COMMIT, refs/v1 → OTHER, both
    /// snapshots holding `config.json` as a symlink into `blobs/`.
    fn fake_cache() -> (tempfile::TempDir, CacheDir) {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("models--org--tiny");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
        std::fs::write(repo.join("refs/v1"), format!("{OTHER}\n")).unwrap();
        for (commit, blob) in [(COMMIT, "aaaa"), (OTHER, "bbbb")] {
            std::fs::write(repo.join("blobs").join(blob), "{}").unwrap();
            let snapshot = repo.join("snapshots").join(commit);
            std::fs::create_dir_all(&snapshot).unwrap();
            std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join("config.json"))
                .unwrap();
        }
        let cache = CacheDir {
            path: dir.path().to_path_buf(),
            chosen_by: "$HF_HUB_CACHE",
        };
        (dir, cache)
    }

    #[test]
    fn ids_parse_with_and_without_revision_and_bad_ones_are_refused() {
        let id = ModelId::parse("hf:Qwen/Qwen2.5-0.5B").unwrap();
        assert_eq!(id.repo, "Qwen/Qwen2.5-0.5B");
        assert_eq!(id.revision(), "main");
        assert_eq!(id.folder_name(), "models--Qwen--Qwen2.5-0.5B");
        let id = ModelId::parse("hf:gpt2@v1.0").unwrap();
        assert_eq!((id.repo.as_str(), id.revision()), ("gpt2", "v1.0"));
        for bad in [
            "hf:",
            "hf:a/b/c",
            "hf:../x",
            "hf:org/na me",
            "hf:org/name@",
            "hf:org/name@../../etc",
            "Qwen/x",
        ] {
            assert!(
                matches!(ModelId::parse(bad), Err(HfError::InvalidId { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn cache_dir_follows_huggingface_hub_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| OsString::from(value))
            }
        };
        let all = &[
            ("HF_HUB_CACHE", "/hub"),
            ("HF_HOME", "/hf"),
            ("XDG_CACHE_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(cache_dir_with(env(all)).unwrap().path, Path::new("/hub"));
        let dir = cache_dir_with(env(&all[1..])).unwrap();
        assert_eq!(
            (dir.path.as_path(), dir.chosen_by),
            (Path::new("/hf/hub"), "$HF_HOME/hub")
        );
        assert_eq!(
            cache_dir_with(env(&all[2..])).unwrap().path,
            Path::new("/xdg/huggingface/hub")
        );
        assert_eq!(
            cache_dir_with(env(&all[3..])).unwrap().path,
            Path::new("/home/u/.cache/huggingface/hub")
        );
        assert_eq!(
            cache_dir_with(env(&[("HF_HOME", "~/hf"), ("HOME", "/home/u")]))
                .unwrap()
                .path,
            Path::new("/home/u/hf/hub")
        );
        assert_eq!(cache_dir_with(env(&[])), None);
    }

    #[test]
    fn main_a_named_ref_and_a_commit_hash_resolve_to_their_snapshots() {
        let (_dir, cache) = fake_cache();
        let main = resolve_in("hf:org/tiny", &cache).unwrap();
        assert_eq!(
            (main.revision.as_str(), main.commit.as_str()),
            ("main", COMMIT)
        );
        assert_eq!(
            main.path,
            cache.path.join("models--org--tiny/snapshots").join(COMMIT)
        );
        assert_eq!(
            std::fs::read_to_string(main.path.join("config.json")).unwrap(),
            "{}"
        );
        let tagged = resolve_in("hf:org/tiny@v1", &cache).unwrap();
        assert_eq!(tagged.commit, OTHER);
        let pinned = resolve_in(&format!("hf:org/tiny@{OTHER}"), &cache).unwrap();
        assert_eq!(pinned.path, tagged.path);
    }

    #[test]
    fn a_missing_model_ref_or_snapshot_names_the_path_and_the_download_command() {
        let (_dir, cache) = fake_cache();
        let message = resolve_in("hf:org/absent", &cache).unwrap_err().to_string();
        let expected = cache.path.join("models--org--absent");
        assert!(
            message.contains(&format!("{} does not exist", expected.display())),
            "{message}"
        );
        assert!(message.contains("`hf download org/absent`"), "{message}");
        assert!(
            message.contains("`huggingface-cli download org/absent`"),
            "{message}"
        );

        let message = resolve_in("hf:org/tiny@dev", &cache)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("models--org--tiny/refs/dev does not exist"),
            "{message}"
        );
        assert!(
            message.contains("hf download org/tiny --revision dev"),
            "{message}"
        );

        let absent = "1111111111111111111111111111111111111111";
        let message = resolve_in(&format!("hf:org/tiny@{absent}"), &cache)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(&format!("snapshots/{absent} does not exist")),
            "{message}"
        );

        std::fs::write(cache.path.join("models--org--tiny/refs/main"), "not a hash").unwrap();
        assert!(matches!(
            resolve_in("hf:org/tiny", &cache),
            Err(HfError::BadRef { .. })
        ));
    }
}
