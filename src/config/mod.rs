//! Pipeline configuration: reads a pipeline file (YAML or TOML), stacks profiles,
//! `TRAINYARD_*` environment variables and `--set` overrides over it with figment
//! (in that order: later wins), substitutes pipeline variables (`${vars.NAME}`, see
//! [`vars`]), validates every stage's typed settings, and remembers where each resolved
//! value came from (file:line, environment variable, CLI flag, or the variable and where
//! that was set).

pub mod diagnostic;
pub mod executor;
pub mod key_lines;
pub mod schema;
pub mod source;
pub mod vars;
pub mod yaml;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

pub use diagnostic::{Diagnostic, Location};
pub use executor::{ExecutorKind, ExecutorSettings, Resources};
pub use source::SourceFile;

use crate::stages::{self, KindEntry};
use crate::suggest::did_you_mean;

/// Prefix of environment variables that override settings (`TRAINYARD_SEED=3`,
/// `TRAINYARD_STAGES__BASE__WITH__STEPS=100`).
pub const ENV_PREFIX: &str = "TRAINYARD_";
/// Separator of key path components inside an environment variable name.
pub const ENV_SEPARATOR: &str = "__";
const TOP_LEVEL_KEYS: &[&str] = &["name", "seed", "description", "vars", "executor", "stages"];

/// How to resolve a pipeline: which profiles, overrides and environment to apply.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Profile names, applied in order (`--profile dev,cpu` gives `["dev", "cpu"]`).
    pub profiles: Vec<String>,
    /// `key.path=value` overrides from `--set`, applied last, in order.
    pub overrides: Vec<String>,
    /// Environment variables to consider (only `TRAINYARD_*` settings keys are used).
    pub env: Vec<(String, String)>,
    /// Directories searched for `NAME.yaml|yml|toml` profile files, in order, after the
    /// `profiles/` directory beside the pipeline file.
    pub profile_dirs: Vec<PathBuf>,
}

/// Where a resolved value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum Origin {
    /// A pipeline or profile file.
    File {
        /// The file.
        path: PathBuf,
        /// 1-based line of the key, when known.
        line: Option<usize>,
        /// The profile the file (or inline section) belongs to, if any.
        profile: Option<String>,
    },
    /// An environment variable.
    Env {
        /// Its name.
        var: String,
    },
    /// A `--set` flag.
    Cli {
        /// The flag's argument as given.
        arg: String,
    },
    /// The kind's default.
    Default,
    /// A value that came through `${vars.NAME}`: where each variable it used was set.
    Var {
        /// The variables, in order of use.
        uses: Vec<VarOrigin>,
    },
}

/// One variable behind a value, and where it was set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VarOrigin {
    /// Its name after `vars.` (dotted for a key inside a map variable).
    pub name: String,
    /// Where `vars.NAME` was set.
    pub set_by: Origin,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File {
                path,
                line,
                profile,
            } => {
                write!(f, "{}", path.display())?;
                if let Some(line) = line {
                    write!(f, ":{line}")?;
                }
                if let Some(profile) = profile {
                    write!(f, " (profile {profile})")?;
                }
                Ok(())
            }
            Origin::Env { var } => write!(f, "env {var}"),
            Origin::Cli { arg } => write!(f, "--set {arg}"),
            Origin::Default => write!(f, "default"),
            Origin::Var { uses } => {
                for (index, used) in uses.iter().enumerate() {
                    let lead = if index == 0 { "from" } else { ";" };
                    write!(f, "{lead} ${{vars.{}}} set by {}", used.name, used.set_by)?;
                }
                Ok(())
            }
        }
    }
}

/// A file that went into the resolution, with its content hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceRecord {
    /// Path as given.
    pub path: PathBuf,
    /// blake3 of its bytes.
    pub hash: String,
}

/// A profile that was applied.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProfileRecord {
    /// Its name.
    pub name: String,
    /// The file that defines it (the pipeline file itself for an inline profile).
    pub file: SourceRecord,
    /// Whether it sits under `profiles:` inside the pipeline file.
    pub inline: bool,
    /// Its `description`, if it has one.
    pub description: Option<String>,
}

/// One stage after resolution.
#[derive(Debug, Clone)]
pub struct ResolvedStage {
    /// Its name in the pipeline.
    pub name: String,
    /// Its kind.
    pub kind: &'static KindEntry,
    /// Declared inputs, name → path or stage reference, as written.
    pub inputs: BTreeMap<String, String>,
    /// Typed settings with defaults filled in, as canonical JSON.
    pub settings: serde_json::Value,
    /// Optional description.
    pub description: Option<String>,
    /// What its Slurm job asks for, as the stage (or `kinds.K.resources` of a profile)
    /// sets it; [`ResolvedPipeline::resources_of`] adds the executor's defaults.
    pub resources: Resources,
}

/// A fully resolved pipeline: everything needed to plan and run it, and to audit it.
#[derive(Debug, Clone)]
pub struct ResolvedPipeline {
    /// `name:`.
    pub name: String,
    /// `seed:` (0 when not given).
    pub seed: u64,
    /// `description:`.
    pub description: Option<String>,
    /// The pipeline file.
    pub file: SourceRecord,
    /// Directory of the pipeline file; relative input paths resolve against it.
    pub base_dir: PathBuf,
    /// Profiles applied, in order.
    pub profiles: Vec<ProfileRecord>,
    /// Stages in file order.
    pub stages: Vec<ResolvedStage>,
    /// `executor:`: where stages run.
    pub executor: ExecutorSettings,
    /// `vars:` after merging and resolving (an empty object when there are none).
    pub vars: serde_json::Value,
    /// Origin of every resolved leaf value, by dotted key path.
    pub origins: BTreeMap<String, Origin>,
}

impl ResolvedPipeline {
    /// The stage called `name`.
    pub fn stage(&self, name: &str) -> Option<&ResolvedStage> {
        self.stages.iter().find(|stage| stage.name == name)
    }

    /// What the Slurm job of `stage` asks for: its own resources over the executor's.
    pub fn resources_of(&self, stage: &ResolvedStage) -> Resources {
        stage.resources.or(&self.executor.resources)
    }

    /// The resolved values as one JSON document (`name`, `seed`, `stages`, and `vars`,
    /// `executor` and a stage's `resources` when there are any), keys sorted.
    pub fn values_json(&self) -> serde_json::Value {
        let stages: serde_json::Map<String, serde_json::Value> = self
            .stages
            .iter()
            .map(|stage| {
                let mut values = serde_json::json!({
                    "kind": stage.kind.name,
                    "inputs": stage.inputs,
                    "with": stage.settings,
                });
                if !stage.resources.is_empty() {
                    values["resources"] =
                        serde_json::to_value(&stage.resources).unwrap_or(serde_json::Value::Null);
                }
                (stage.name.clone(), values)
            })
            .collect();
        let mut values =
            serde_json::json!({ "name": self.name, "seed": self.seed, "stages": stages });
        if self.vars.as_object().is_some_and(|vars| !vars.is_empty()) {
            values["vars"] = self.vars.clone();
        }
        if !self.executor.is_default() {
            values["executor"] =
                serde_json::to_value(&self.executor).unwrap_or(serde_json::Value::Null);
        }
        values
    }
}

/// Names of the profiles available to a pipeline: inline ones, then files beside it and
/// in `profile_dirs`, each with its description.
pub fn available_profiles(
    pipeline: &Path,
    profile_dirs: &[PathBuf],
) -> Result<Vec<ProfileRecord>, Diagnostic> {
    let file = SourceFile::load(pipeline)?;
    let mut found = inline_profiles(&file);
    found.extend(profile_files(
        &profile_search_dirs(pipeline, profile_dirs),
        &found,
    )?);
    Ok(found)
}

/// The profile files in `dirs` (`NAME.yaml|yml|toml`), each with its description; a
/// name already in `known` or met in an earlier directory is skipped.
pub fn profile_files(
    dirs: &[PathBuf],
    known: &[ProfileRecord],
) -> Result<Vec<ProfileRecord>, Diagnostic> {
    let mut found: Vec<ProfileRecord> = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|entry| Some(entry.ok()?.path()))
            .collect();
        paths.sort();
        for path in paths {
            let Some(name) = path.file_stem().and_then(|stem| stem.to_str()) else {
                continue;
            };
            if source::Format::from_path(&path).is_none()
                || known.iter().chain(&found).any(|record| record.name == name)
            {
                continue;
            }
            let profile = SourceFile::load(&path)?;
            found.push(ProfileRecord {
                name: name.to_string(),
                file: SourceRecord {
                    path: path.clone(),
                    hash: profile.hash.clone(),
                },
                inline: false,
                description: profile
                    .values
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            });
        }
    }
    Ok(found)
}

/// The profiles written under `profiles:` in the pipeline `file`.
fn inline_profiles(file: &SourceFile) -> Vec<ProfileRecord> {
    let mut found: Vec<ProfileRecord> = Vec::new();
    if let Some(Value::Dict(_, inline)) = file.values.get("profiles") {
        for (name, overlay) in inline {
            found.push(ProfileRecord {
                name: name.clone(),
                file: SourceRecord {
                    path: file.path.clone(),
                    hash: file.hash.clone(),
                },
                inline: true,
                description: overlay
                    .as_dict()
                    .and_then(|dict| dict.get("description"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
            });
        }
    }
    found
}

/// Where profile files are looked for, in order: `profiles/` beside the pipeline file,
/// `profiles/` beside its directory (a project with `pipelines/` and `profiles/` side by
/// side), then `profile_dirs` (the workspace's `profiles/`).
fn profile_search_dirs(pipeline: &Path, profile_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let dir = parent_dir(pipeline);
    let beside_dir = match dir.parent() {
        Some(parent) if dir != Path::new(".") => parent.join("profiles"),
        _ => dir.join("..").join("profiles"),
    };
    let mut dirs = vec![dir.join("profiles"), beside_dir];
    for dir in profile_dirs {
        if !dirs.iter().any(|known| same_dir(known, dir)) {
            dirs.push(dir.clone());
        }
    }
    dirs
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::path::absolute(a), std::path::absolute(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// One layer of the merge, with enough to tell where each of its values came from.
struct Layer {
    name: String,
    values: Dict,
    source: LayerSource,
    /// Key paths of this layer whose value came through `${vars.…}`, with the
    /// variables used, so their origin can name where each variable was set.
    through_vars: BTreeMap<String, Vec<String>>,
}

enum LayerSource {
    File {
        file: Arc<SourceFile>,
        /// Key prefix of this layer inside the file (`profiles.dev` for an inline profile).
        prefix: String,
        profile: Option<String>,
        /// Stage name → kind, for mapping `kinds.K.x` overlays back to their lines.
        stage_kinds: Arc<HashMap<String, String>>,
        /// The pipeline's name, for mapping a profile's `pipelines.NAME.x` back to its lines.
        pipeline_name: Option<String>,
    },
    Env(BTreeMap<String, String>),
    Cli(BTreeMap<String, String>),
}

impl Provider for &Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.values.clone()))
    }
}

impl Layer {
    /// Where `key_path` of this layer came from.
    fn origin(&self, key_path: &str) -> Origin {
        match &self.source {
            LayerSource::File { file, profile, .. } => Origin::File {
                path: file.path.clone(),
                line: self.file_position(key_path).map(|(line, _)| line),
                profile: profile.clone(),
            },
            LayerSource::Env(vars) => Origin::Env {
                var: lookup_prefix(vars, key_path).unwrap_or_else(|| format!("{ENV_PREFIX}…")),
            },
            LayerSource::Cli(args) => Origin::Cli {
                arg: lookup_prefix(args, key_path).unwrap_or_default(),
            },
        }
    }

    fn file_position(&self, key_path: &str) -> Option<(usize, usize)> {
        let LayerSource::File {
            file,
            prefix,
            stage_kinds,
            pipeline_name,
            ..
        } = &self.source
        else {
            return None;
        };
        let in_file = |path: &str| {
            if prefix.is_empty() {
                path.to_string()
            } else {
                format!("{prefix}.{path}")
            }
        };
        if let Some(position) = file.lines.exact(&in_file(key_path)) {
            return Some(position);
        }
        if let Some(position) = pipeline_name.as_deref().and_then(|name| {
            file.lines
                .exact(&in_file(&format!("pipelines.{name}.{key_path}")))
        }) {
            return Some(position);
        }
        let mut parts = key_path.splitn(4, '.');
        if let (Some("stages"), Some(stage), Some(section @ ("with" | "resources"))) =
            (parts.next(), parts.next(), parts.next())
            && let Some(kind) = stage_kinds.get(stage)
        {
            let rest = parts
                .next()
                .map(|rest| format!(".{rest}"))
                .unwrap_or_default();
            // `kinds.K.x` is `with.x` of each such stage; `kinds.K.resources` its resources.
            let section = if section == "resources" {
                ".resources"
            } else {
                ""
            };
            if let Some(position) = file
                .lines
                .find(&in_file(&format!("kinds.{kind}{section}{rest}")))
            {
                return Some(position);
            }
        }
        file.lines.find(&in_file(key_path))
    }

    /// A diagnostic location for `key_path`, with the file text to quote.
    fn locate(&self, key_path: &str, diagnostic: Diagnostic) -> Diagnostic {
        match &self.source {
            LayerSource::File { file, .. } => match self.file_position(key_path) {
                Some((line, column)) => {
                    diagnostic.at(Location::new(&file.path, line, column), Some(&file.text))
                }
                None => diagnostic,
            },
            LayerSource::Env(_) | LayerSource::Cli(_) => {
                let origin = self.origin(key_path);
                Diagnostic {
                    message: format!("{} (set by {origin})", diagnostic.message),
                    ..diagnostic
                }
            }
        }
    }
}

fn lookup_prefix(map: &BTreeMap<String, String>, key_path: &str) -> Option<String> {
    let mut candidate = key_path;
    loop {
        if let Some(found) = map.get(candidate) {
            return Some(found.clone());
        }
        let Some(dot) = candidate.rfind('.') else {
            break;
        };
        candidate = &candidate[..dot];
    }
    // An error about a map (`stages.x` lacks `kind`) comes from a variable below it.
    let below = format!("{key_path}.");
    map.iter()
        .find(|(key, _)| key.starts_with(&below))
        .map(|(_, found)| found.clone())
}

/// Builds the nested dictionary `{a: {b: {c: value}}}` for the path `a.b.c`.
fn nest(path: &[&str], value: Value) -> Dict {
    let mut value = value;
    for key in path[1..].iter().rev() {
        let mut dict = Dict::new();
        dict.insert(key.to_string(), value);
        value = Value::from(dict);
    }
    let mut root = Dict::new();
    root.insert(path[0].to_string(), value);
    root
}

/// Deep-merges `overlay` into `base` (maps merge, everything else replaces).
fn deep_merge(base: &mut Dict, overlay: Dict) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(Value::Dict(_, existing)), Value::Dict(_, incoming)) => {
                deep_merge(existing, incoming)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Parses an override value the way YAML would (`100`, `true`, `[a, b]`, `text`).
fn parse_scalar(raw: &str) -> Value {
    if raw.is_empty() {
        return Value::from(String::new());
    }
    match yaml::parse_value(raw) {
        Some(Value::Empty(..)) | None => Value::from(raw.to_string()),
        Some(value) => value,
    }
}

fn valid_key_path(path: &str) -> bool {
    !path.is_empty() && path.split('.').all(|part| !part.is_empty())
}

/// Resolves the pipeline at `path` with `options`.
pub fn load(path: &Path, options: &LoadOptions) -> Result<ResolvedPipeline, Diagnostic> {
    let mut file = SourceFile::load(path)?;
    let inline_profiles = match file.values.remove("profiles") {
        None => Dict::new(),
        Some(Value::Dict(_, dict)) => dict,
        Some(_) => {
            return Err(
                Diagnostic::new("`profiles` must be a map of profile name → overlay").at(
                    file.location_of("profiles")
                        .unwrap_or(Location::new(path, 1, 1)),
                    Some(&file.text),
                ),
            );
        }
    };
    // The pipeline layer owns the values: a copy of a ten-thousand-stage tree costs
    // more than the rest of resolution.
    let values = std::mem::take(&mut file.values);
    let pipeline_name = values
        .get("name")
        .and_then(Value::as_str)
        .map(str::to_string);
    let file = Arc::new(file);
    let stage_kinds: HashMap<String, String> = values
        .get("stages")
        .and_then(Value::as_dict)
        .map(|stages| {
            stages
                .iter()
                .filter_map(|(name, stage)| {
                    let kind = stage.as_dict()?.get("kind")?.as_str()?;
                    Some((name.clone(), kind.to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    let stage_kinds = Arc::new(stage_kinds);

    let mut layers = vec![Layer {
        name: format!("pipeline {}", file.path.display()),
        values,
        source: LayerSource::File {
            file: Arc::clone(&file),
            prefix: String::new(),
            profile: None,
            stage_kinds: Arc::clone(&stage_kinds),
            pipeline_name: None,
        },
        through_vars: BTreeMap::new(),
    }];
    let mut profile_records = Vec::new();
    for name in options
        .profiles
        .iter()
        .flat_map(|list| list.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
    {
        let (layer, record) = load_profile(
            name,
            &file,
            pipeline_name.as_deref(),
            &inline_profiles,
            &stage_kinds,
            options,
        )?;
        layers.push(layer);
        profile_records.push(record);
    }
    // The merged layers only serve to spell environment keys like the pipeline does.
    if options
        .env
        .iter()
        .any(|(var, _)| var.starts_with(ENV_PREFIX))
    {
        let mut reference = Dict::new();
        for layer in &layers {
            deep_merge(&mut reference, layer.values.clone());
        }
        if let Some(layer) = env_layer(&options.env, &reference) {
            layers.push(layer);
        }
    }
    for (index, raw) in options.overrides.iter().enumerate() {
        let (key, value) = raw.split_once('=').ok_or_else(|| {
            Diagnostic::new(format!(
                "--set {raw}: expected KEY=VALUE, e.g. --set stages.train.with.steps=100"
            ))
        })?;
        let key = key.trim();
        if !valid_key_path(key) {
            return Err(Diagnostic::new(format!(
                "--set {raw}: `{key}` is not a dotted key path"
            )));
        }
        let parts: Vec<&str> = key.split('.').collect();
        layers.push(Layer {
            name: format!("--set #{index} {raw}"),
            values: nest(&parts, parse_scalar(value)),
            source: LayerSource::Cli(BTreeMap::from([(key.to_string(), raw.clone())])),
            through_vars: BTreeMap::new(),
        });
    }

    let mut variables = Variables::collect(&layers)?;
    let substituted = layers
        .iter()
        .map(|layer| variables.substitute_layer(layer))
        .collect::<Result<Vec<_>, _>>()?;
    let resolved_vars = variables.resolve_all()?;
    let var_origins = variables.used_origins();
    for (layer, (replaced, through_vars)) in layers.iter_mut().zip(substituted) {
        if let Some(Value::Dict(_, stages)) = layer.values.get_mut("stages") {
            for (name, section, value) in replaced {
                if let Some(Value::Dict(_, stage)) = stages.get_mut(&name) {
                    stage.insert(section.to_string(), value);
                }
            }
        }
        layer.through_vars = through_vars;
    }

    let mut figment = Figment::new();
    for layer in &layers {
        figment = figment.merge(Skeleton(layer));
    }
    let resolver = Resolver {
        figment,
        layers,
        file: Arc::clone(&file),
        var_origins,
        vars: serde_json::to_value(&resolved_vars).unwrap_or_default(),
    };
    resolver.resolve(profile_records)
}

fn load_profile(
    name: &str,
    pipeline: &Arc<SourceFile>,
    pipeline_name: Option<&str>,
    inline_profiles: &Dict,
    stage_kinds: &Arc<HashMap<String, String>>,
    options: &LoadOptions,
) -> Result<(Layer, ProfileRecord), Diagnostic> {
    // A profile is a name, never a path: `--profile ../../x` must not reach a file
    // outside the profile folders.
    let is_name = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !is_name {
        return Err(Diagnostic::new(format!(
            "`{name}` is not a profile name: profiles are names of letters, digits, `-`, `_` and `.` \
             (a file `profiles/NAME.yaml` or an entry under `profiles:` in {}), not paths",
            pipeline.path.display()
        )));
    }
    let (file, prefix, overlay, inline) = if let Some(overlay) = inline_profiles.get(name) {
        let Value::Dict(_, overlay) = overlay else {
            return Err(
                Diagnostic::new(format!("profile `{name}` must be a map")).at(
                    pipeline
                        .location_of(&format!("profiles.{name}"))
                        .unwrap_or(Location::new(&pipeline.path, 1, 1)),
                    Some(&pipeline.text),
                ),
            );
        };
        (
            Arc::clone(pipeline),
            format!("profiles.{name}"),
            overlay.clone(),
            true,
        )
    } else {
        let dirs = profile_search_dirs(&pipeline.path, &options.profile_dirs);
        let found = dirs.iter().find_map(|dir| {
            ["yaml", "yml", "toml"]
                .iter()
                .map(|extension| dir.join(format!("{name}.{extension}")))
                .find(|candidate| candidate.is_file())
        });
        let Some(path) = found else {
            let known =
                available_profiles(&pipeline.path, &options.profile_dirs).unwrap_or_default();
            let names: Vec<&str> = known.iter().map(|record| record.name.as_str()).collect();
            let searched: Vec<String> = dirs.iter().map(|dir| dir.display().to_string()).collect();
            let mut diagnostic = Diagnostic::new(format!(
                "unknown profile `{name}`: not under `profiles:` in {} nor a file {name}.yaml|yml|toml in {}",
                pipeline.path.display(),
                searched.join(", ")
            ));
            diagnostic = match did_you_mean(name, names.iter().copied()) {
                Some(help) => diagnostic.help(help),
                None if names.is_empty() => diagnostic.help("this pipeline has no profiles"),
                None => diagnostic.help(format!("available profiles: {}", names.join(", "))),
            };
            return Err(diagnostic);
        };
        let file = Arc::new(SourceFile::load(&path)?);
        let overlay = file.values.clone();
        (file, String::new(), overlay, false)
    };
    let mut overlay = overlay;
    let description = match overlay.remove("description") {
        Some(value) => Some(value.into_string().ok_or_else(|| {
            Diagnostic::new(format!("profile `{name}`: `description` must be text"))
        })?),
        None => None,
    };
    let mut expanded = Dict::new();
    if let Some(kinds) = overlay.remove("kinds") {
        let Value::Dict(_, kinds) = kinds else {
            return Err(Diagnostic::new(format!(
                "profile `{name}`: `kinds` must be a map of stage kind → settings"
            )));
        };
        for (kind, settings) in kinds {
            if stages::kind(&kind).is_none() {
                let names = stages::KINDS.iter().map(|entry| entry.name);
                let key = if prefix.is_empty() {
                    format!("kinds.{kind}")
                } else {
                    format!("{prefix}.kinds.{kind}")
                };
                let mut diagnostic = Diagnostic::new(format!(
                    "profile `{name}`: unknown stage kind `{kind}` under `kinds`"
                ));
                if let Some(location) = file.location_of(&key) {
                    diagnostic = diagnostic.at(location, Some(&file.text));
                }
                if let Some(help) = did_you_mean(&kind, names) {
                    diagnostic = diagnostic.help(help);
                }
                return Err(diagnostic);
            }
            // Applies to every stage of that kind, as if written under each one's `with`.
            let mut stage_names: Vec<&String> = stage_kinds
                .iter()
                .filter(|(_, k)| **k == kind)
                .map(|(s, _)| s)
                .collect();
            stage_names.sort();
            // `resources` is the stage's (where its Slurm job runs), not a setting.
            let (resources, settings) = match settings {
                Value::Dict(tag, mut dict) => {
                    let resources = dict.remove("resources");
                    (resources, Value::Dict(tag, dict))
                }
                other => (None, other),
            };
            for stage in stage_names {
                deep_merge(
                    &mut expanded,
                    nest(&["stages", stage, "with"], settings.clone()),
                );
                if let Some(resources) = &resources {
                    deep_merge(
                        &mut expanded,
                        nest(&["stages", stage, "resources"], resources.clone()),
                    );
                }
            }
        }
    }
    if let Some(pipelines) = overlay.remove("pipelines") {
        let key = |rest: &str| match prefix.is_empty() {
            true => format!("pipelines{rest}"),
            false => format!("{prefix}.pipelines{rest}"),
        };
        let at = |diagnostic: Diagnostic, key: &str| match file.location_of(key) {
            Some(location) => diagnostic.at(location, Some(&file.text)),
            None => diagnostic,
        };
        let Value::Dict(_, pipelines) = pipelines else {
            return Err(at(
                Diagnostic::new(format!(
                    "profile `{name}`: `pipelines` must be a map of pipeline name → overlay"
                )),
                &key(""),
            ));
        };
        if let Some(own) = pipeline_name.and_then(|pipeline_name| pipelines.get(pipeline_name)) {
            let Value::Dict(_, own) = own else {
                return Err(at(
                    Diagnostic::new(format!(
                        "profile `{name}`: `pipelines.{}` must be a map",
                        pipeline_name.unwrap_or_default()
                    )),
                    &key(&format!(".{}", pipeline_name.unwrap_or_default())),
                ));
            };
            // This pipeline's own entries win over the profile's `kinds` defaults.
            deep_merge(&mut expanded, own.clone());
        }
    }
    // Top-level entries of the profile win over both.
    deep_merge(&mut expanded, overlay);
    let overlay = expanded;
    let record = ProfileRecord {
        name: name.to_string(),
        file: SourceRecord {
            path: file.path.clone(),
            hash: file.hash.clone(),
        },
        inline,
        description,
    };
    let layer = Layer {
        name: format!("profile {name} ({})", file.path.display()),
        values: overlay,
        source: LayerSource::File {
            file,
            prefix,
            profile: Some(name.to_string()),
            stage_kinds: Arc::clone(stage_kinds),
            pipeline_name: pipeline_name.map(str::to_string),
        },
        through_vars: BTreeMap::new(),
    };
    Ok((layer, record))
}

/// Spells an environment key path the way the pipeline does: variable names are
/// upper-case and cannot hold `-`, so `STAGES__MY_STAGE__WITH__LR` must find the stage
/// `my-stage` and a key `LR` or `lr`, whichever exists.
fn match_known_keys(reference: &Dict, parts: &[String]) -> Vec<String> {
    let normalise = |key: &str| key.to_ascii_lowercase().replace('-', "_");
    let mut level = Some(reference);
    parts
        .iter()
        .map(|part| {
            let known = level.and_then(|dict| {
                dict.get_key_value(part.as_str()).or_else(|| {
                    dict.iter()
                        .find(|(key, _)| normalise(key) == normalise(part))
                })
            });
            level = known.and_then(|(_, value)| value.as_dict());
            known.map_or_else(|| part.to_ascii_lowercase(), |(key, _)| key.clone())
        })
        .collect()
}

fn env_layer(env: &[(String, String)], reference: &Dict) -> Option<Layer> {
    let mut values = Dict::new();
    let mut vars = BTreeMap::new();
    let mut sorted: Vec<&(String, String)> = env.iter().collect();
    sorted.sort();
    for (var, value) in sorted {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let parts: Vec<String> = rest.split(ENV_SEPARATOR).map(str::to_string).collect();
        let key = match_known_keys(reference, &parts).join(".");
        // Other TRAINYARD_* variables (TRAINYARD_LOG, …) configure the tool, not the pipeline.
        let top = key.split('.').next().unwrap_or_default();
        if !TOP_LEVEL_KEYS.contains(&top) || !valid_key_path(&key) {
            continue;
        }
        let parts: Vec<&str> = key.split('.').collect();
        deep_merge(&mut values, nest(&parts, parse_scalar(value)));
        vars.insert(key, var.clone());
    }
    (!vars.is_empty()).then(|| Layer {
        name: "environment".to_string(),
        values,
        source: LayerSource::Env(vars),
        through_vars: BTreeMap::new(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineSpec {
    name: String,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    description: Option<String>,
    // Already substituted into the stages; only its shape is checked here.
    #[serde(default, rename = "vars")]
    _vars: Option<Dict>,
    #[serde(default)]
    executor: ExecutorSettings,
    #[serde(default)]
    stages: BTreeMap<String, StageSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StageSpec {
    kind: String,
    #[serde(default)]
    inputs: BTreeMap<String, String>,
    #[serde(default, rename = "with")]
    _with: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    resources: Resources,
}

/// Where `key_path` stands in one layer's values.
enum Presence<'v> {
    /// The layer has a value there.
    Set(&'v Value),
    /// The layer has something other than a map above it, which replaces whatever
    /// earlier layers had below.
    Replaced,
    /// The layer says nothing about it.
    Absent,
}

fn presence<'v>(values: &'v Dict, key_path: &str) -> Presence<'v> {
    let mut keys = key_path.split('.');
    let Some(first) = keys.next() else {
        return Presence::Absent;
    };
    let Some(mut value) = values.get(first) else {
        return Presence::Absent;
    };
    for key in keys {
        let Value::Dict(_, dict) = value else {
            return Presence::Replaced;
        };
        match dict.get(key) {
            Some(child) => value = child,
            None => return Presence::Absent,
        }
    }
    Presence::Set(value)
}

/// The layer whose value is at `key_path` once all `layers` are merged (figment
/// merges maps key by key, anything else replaces): the last layer that has it,
/// unless a later one replaced a map above it.
fn setting_layer<'l>(layers: &'l [Layer], key_path: &str) -> Option<&'l Layer> {
    for layer in layers.iter().rev() {
        match presence(&layer.values, key_path) {
            Presence::Set(_) => return Some(layer),
            Presence::Replaced => return None,
            Presence::Absent => {}
        }
    }
    None
}

/// The value at `key_path` once all `layers` are merged, as far as its type goes: a
/// map there is the last layer's map (earlier maps merge into it).
fn merged_value_at<'l>(layers: &'l [Layer], key_path: &str) -> Option<&'l Value> {
    let layer = setting_layer(layers, key_path)?;
    match presence(&layer.values, key_path) {
        Presence::Set(value) => Some(value),
        _ => None,
    }
}

/// The keys of the map at `key_path` once all `layers` are merged.
fn merged_keys(layers: &[Layer], key_path: &str) -> Vec<String> {
    let mut keys = std::collections::BTreeSet::new();
    for layer in layers {
        match presence(&layer.values, key_path) {
            Presence::Set(Value::Dict(_, dict)) => keys.extend(dict.keys().cloned()),
            Presence::Set(_) | Presence::Replaced => keys.clear(),
            Presence::Absent => {}
        }
    }
    keys.into_iter().collect()
}

/// The layer that set `key_path`, or else its nearest ancestor that is set.
fn nearest_layer<'l>(layers: &'l [Layer], key_path: &str) -> Option<&'l Layer> {
    let mut candidate = key_path;
    loop {
        if let Some(layer) = setting_layer(layers, candidate) {
            return Some(layer);
        }
        candidate = &candidate[..candidate.rfind('.')?];
    }
}

/// A layer with each stage's `with` map emptied, for extracting the pipeline's shape:
/// settings are extracted stage by stage (see [`focus`]), so the whole-pipeline figment
/// need not hold (and clone, on every extraction) all of them.
struct Skeleton<'a>(&'a Layer);

impl Provider for Skeleton<'_> {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.0.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut values = Dict::new();
        for (key, value) in &self.0.values {
            let value = match (key.as_str(), value) {
                ("stages", Value::Dict(tag, stages)) => {
                    let stages = stages
                        .iter()
                        .map(|(name, stage)| {
                            let stage = match stage {
                                Value::Dict(tag, stage) => Value::Dict(
                                    *tag,
                                    stage
                                        .iter()
                                        .map(|(key, value)| match (key.as_str(), value) {
                                            ("with", Value::Dict(tag, _)) => {
                                                (key.clone(), Value::Dict(*tag, Dict::new()))
                                            }
                                            _ => (key.clone(), value.clone()),
                                        })
                                        .collect(),
                                ),
                                other => other.clone(),
                            };
                            (name.clone(), stage)
                        })
                        .collect();
                    Value::Dict(*tag, stages)
                }
                _ => value.clone(),
            };
            values.insert(key.clone(), value);
        }
        Ok(Profile::Default.collect(values))
    }
}

/// One layer's map at some key path, as a figment provider named like the layer.
struct FocusedLayer<'a> {
    name: &'a str,
    values: Dict,
}

impl Provider for FocusedLayer<'_> {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.to_string())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.values.clone()))
    }
}

/// The map at `path` of all `layers` merged, as its own figment: what
/// `Figment::focus` gives, but built from each layer's value at `path` alone rather
/// than from a clone of every layer's whole tree. Figment merges maps key by key and
/// lets anything else replace what was there, so a layer with something other than a
/// map at `path` (or above it) drops the layers before it.
fn focus(layers: &[Layer], path: &str) -> Figment {
    let mut parts: Vec<FocusedLayer<'_>> = Vec::new();
    for layer in layers {
        let mut current = &layer.values;
        let mut keys = path.split('.').peekable();
        while let Some(key) = keys.next() {
            match current.get(key) {
                None => break,
                Some(Value::Dict(_, dict)) if keys.peek().is_none() => {
                    parts.push(FocusedLayer {
                        name: &layer.name,
                        values: dict.clone(),
                    });
                }
                Some(Value::Dict(_, dict)) => current = dict,
                Some(_) => {
                    parts.clear();
                    break;
                }
            }
        }
    }
    parts
        .into_iter()
        .fold(Figment::new(), |figment, part| figment.merge(part))
}

/// What [`Resolver`] needs to know about values and where they came from, answered
/// from the layers themselves: figment's own look-ups (`find_value`, `find_metadata`,
/// `focus`) each clone the whole merged tree, which made resolution quadratic in the
/// number of stages. Each stage's settings are extracted from a figment of that stage
/// alone ([`focus`]); the whole-pipeline figment holds the pipeline without settings
/// ([`Skeleton`]).
struct Resolver {
    /// Every layer merged, without the stages' settings.
    figment: Figment,
    layers: Vec<Layer>,
    file: Arc<SourceFile>,
    /// Where each variable that was used was set.
    var_origins: BTreeMap<String, Origin>,
    /// Every variable, resolved.
    vars: serde_json::Value,
}

fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl Resolver {
    /// The layer that set `key_path`, or else its nearest ancestor that is set.
    fn layer_of(&self, key_path: &str) -> Option<&Layer> {
        nearest_layer(&self.layers, key_path)
    }

    fn origin(&self, key_path: &str) -> Origin {
        let Some(layer) = setting_layer(&self.layers, key_path) else {
            return Origin::Default;
        };
        // A value that came through variables (itself, or a map it sits in) is shown by
        // where the variables were set: that is where a user would change it.
        let mut candidate = key_path;
        loop {
            if let Some(names) = layer.through_vars.get(candidate) {
                let uses = names
                    .iter()
                    .map(|name| VarOrigin {
                        name: name.clone(),
                        set_by: self
                            .var_origins
                            .get(name)
                            .cloned()
                            .unwrap_or(Origin::Default),
                    })
                    .collect();
                return Origin::Var { uses };
            }
            match candidate.rfind('.') {
                Some(dot) => candidate = &candidate[..dot],
                None => return layer.origin(key_path),
            }
        }
    }

    /// A diagnostic for `key_path`, located in whichever layer set it.
    fn error_at(&self, key_path: &str, diagnostic: Diagnostic) -> Diagnostic {
        match self.layer_of(key_path) {
            Some(layer) => layer.locate(key_path, diagnostic),
            None => diagnostic,
        }
    }

    fn figment_error(&self, error: figment::Error, prefix: &str) -> Diagnostic {
        use figment::error::Kind;
        let mut path: Vec<String> = prefix
            .split('.')
            .filter(|part| !part.is_empty())
            .map(str::to_string)
            .collect();
        path.extend(error.path.iter().cloned());
        let at = path.join(".");
        let whole = format!("the pipeline {}", self.file.path.display());
        let within = if at.is_empty() {
            whole.clone()
        } else {
            format!("`{at}`")
        };
        let (message, key, help) = match &error.kind {
            Kind::UnknownField(field, expected) => {
                let key = if path.last() == Some(field) {
                    at.clone()
                } else {
                    format!("{at}.{field}").trim_start_matches('.').to_string()
                };
                let within = match path.last() == Some(field) {
                    true if path.len() == 1 => whole.clone(),
                    true => format!("`{}`", path[..path.len() - 1].join(".")),
                    false => within,
                };
                let help = did_you_mean(field, expected.iter().copied())
                    .or_else(|| Some(format!("expected one of: {}", expected.join(", "))));
                (format!("unknown key `{field}` in {within}"), key, help)
            }
            Kind::MissingField(field) => (
                format!("missing key `{field}` in {within}"),
                at.clone(),
                None,
            ),
            Kind::InvalidType(actual, expected) => (
                format!("{within} has the wrong type: found {actual}, expected {expected}"),
                at.clone(),
                None,
            ),
            Kind::InvalidValue(actual, expected) => (
                format!("{within} has an invalid value: found {actual}, expected {expected}"),
                at.clone(),
                None,
            ),
            Kind::UnknownVariant(variant, expected) => {
                let help = did_you_mean(variant, expected.iter().copied())
                    .or_else(|| Some(format!("expected one of: {}", expected.join(", "))));
                (
                    format!("{within}: unknown value `{variant}`"),
                    at.clone(),
                    help,
                )
            }
            other => (format!("{within}: {other}"), at.clone(), None),
        };
        let mut diagnostic = Diagnostic::new(message);
        if let Some(help) = help {
            diagnostic = diagnostic.help(help);
        }
        let layer = error
            .metadata
            .as_ref()
            .and_then(|metadata| self.layers.iter().find(|layer| layer.name == metadata.name))
            .or_else(|| self.layer_of(&key));
        match layer {
            Some(layer) => {
                if matches!(layer.source, LayerSource::Env(_) | LayerSource::Cli(_))
                    && matches!(error.kind, Kind::InvalidType(..))
                {
                    diagnostic = diagnostic.help("values from --set and TRAINYARD_* variables are read as YAML; quote text that looks like a number or boolean, e.g. --set 'key=\"true\"'");
                }
                layer.locate(&key, diagnostic)
            }
            None => diagnostic,
        }
    }

    fn resolve(&self, profiles: Vec<ProfileRecord>) -> Result<ResolvedPipeline, Diagnostic> {
        // Overlays may only change existing stages: a stage that only a profile, variable
        // or flag names is a typo, reported before anything else about it.
        let declared_in_file: Vec<String> = match self.layers[0].values.get("stages") {
            Some(Value::Dict(_, stages)) => stages.keys().cloned().collect(),
            _ => Vec::new(),
        };
        let merged_stages = merged_keys(&self.layers, "stages");
        let declared: std::collections::HashSet<&str> =
            declared_in_file.iter().map(String::as_str).collect();
        for name in merged_stages {
            if !declared.contains(name.as_str()) {
                let names = declared_in_file.iter().map(String::as_str);
                let mut diagnostic = Diagnostic::new(format!(
                    "stage `{name}` is not in pipeline {}; profiles and overrides can only change existing stages",
                    self.file.path.display()
                ));
                if let Some(help) = did_you_mean(&name, names) {
                    diagnostic = diagnostic.help(help);
                }
                return Err(self.error_at(&format!("stages.{name}"), diagnostic));
            }
        }
        let spec: PipelineSpec = self
            .figment
            .extract()
            .map_err(|error| self.figment_error(error, ""))?;
        if spec.stages.is_empty() {
            return Err(Diagnostic::new(format!(
                "{}: the pipeline declares no stages",
                self.file.path.display()
            )));
        }
        // Stage order is the pipeline file's.
        let order: Vec<String> = self
            .file
            .lines
            .children_in_order("stages")
            .map(str::to_string)
            .collect();
        let mut ordered: Vec<&String> = order
            .iter()
            .filter(|name| spec.stages.contains_key(*name))
            .collect();
        let placed: std::collections::HashSet<&String> = ordered.iter().copied().collect();
        let unplaced: Vec<&String> = spec
            .stages
            .keys()
            .filter(|name| !placed.contains(name))
            .collect();
        ordered.extend(unplaced);

        if let Err((key, problem)) = spec.executor.resources.check() {
            let key = format!("executor.resources.{key}");
            return Err(self.error_at(&key, Diagnostic::new(format!("`{key}`: {problem}"))));
        }
        let mut origins = BTreeMap::new();
        if let Ok(executor) = serde_json::to_value(&spec.executor) {
            collect_origins(&executor, "executor", &mut |key| {
                if setting_layer(&self.layers, key).is_some() {
                    origins.insert(key.to_string(), self.origin(key));
                }
            });
        }
        for key in ["name", "seed", "description"] {
            if setting_layer(&self.layers, key).is_some() {
                origins.insert(key.to_string(), self.origin(key));
            }
        }
        collect_origins(&self.vars, "vars", &mut |key| {
            if key != "vars" {
                origins.insert(key.to_string(), self.origin(key));
            }
        });
        let mut stages = Vec::new();
        for name in ordered {
            let spec_stage = &spec.stages[name];
            let prefix = format!("stages.{name}");
            if !is_name(name) {
                return Err(self.error_at(
                    &prefix,
                    Diagnostic::new(format!(
                        "stage name `{name}` may only use letters, digits, `_` and `-`"
                    )),
                ));
            }
            let kind = stages::kind(&spec_stage.kind).ok_or_else(|| {
                let mut diagnostic = Diagnostic::new(format!(
                    "stage `{name}`: unknown kind `{}`",
                    spec_stage.kind
                ));
                diagnostic = match did_you_mean(
                    &spec_stage.kind,
                    stages::KINDS.iter().map(|entry| entry.name),
                ) {
                    Some(help) => diagnostic.help(help),
                    None => diagnostic.help(format!(
                        "known kinds: {}",
                        stages::KINDS
                            .iter()
                            .map(|entry| entry.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                };
                self.error_at(&format!("{prefix}.kind"), diagnostic)
            })?;
            for input in spec_stage.inputs.keys() {
                if !is_name(input) {
                    return Err(self.error_at(
                        &format!("{prefix}.inputs.{input}"),
                        Diagnostic::new(format!("stage `{name}`: input name `{input}` may only use letters, digits, `_` and `-`")),
                    ));
                }
            }
            let with_path = format!("{prefix}.with");
            if let Some(value) = merged_value_at(&self.layers, &with_path)
                && !matches!(value, Value::Dict(..) | Value::Empty(..))
            {
                return Err(self.error_at(
                    &with_path,
                    Diagnostic::new(format!("`{with_path}` must be a map of settings")),
                ));
            }
            let known = kind.setting_keys();
            if let Some(key) = merged_keys(&self.layers, &with_path)
                .into_iter()
                .find(|key| !known.contains(key))
            {
                let help = did_you_mean(&key, known.iter().map(String::as_str))
                    .unwrap_or_else(|| format!("expected one of: {}", known.join(", ")));
                return Err(self.error_at(
                    &format!("{with_path}.{key}"),
                    Diagnostic::new(format!("unknown key `{key}` in `{with_path}`")).help(help),
                ));
            }
            let settings = kind
                .extract(&focus(&self.layers, &with_path))
                .map_err(|error| self.figment_error(*error, &with_path))?;
            let input_names: Vec<&str> = spec_stage.inputs.keys().map(String::as_str).collect();
            kind.check(&settings, &input_names).map_err(|message| {
                self.error_at(
                    &with_path,
                    Diagnostic::new(format!("stage `{name}` ({}): {message}", kind.name)),
                )
            })?;
            origins.insert(
                format!("{prefix}.kind"),
                self.origin(&format!("{prefix}.kind")),
            );
            for input in spec_stage.inputs.keys() {
                let key = format!("{prefix}.inputs.{input}");
                origins.insert(key.clone(), self.origin(&key));
            }
            collect_origins(&settings, &with_path, &mut |key| {
                origins.insert(key.to_string(), self.origin(key));
            });
            if let Err((key, problem)) = spec_stage.resources.check() {
                let key = format!("{prefix}.resources.{key}");
                return Err(self.error_at(&key, Diagnostic::new(format!("`{key}`: {problem}"))));
            }
            if let Ok(resources) = serde_json::to_value(&spec_stage.resources) {
                collect_origins(&resources, &format!("{prefix}.resources"), &mut |key| {
                    if setting_layer(&self.layers, key).is_some() {
                        origins.insert(key.to_string(), self.origin(key));
                    }
                });
            }
            stages.push(ResolvedStage {
                name: name.clone(),
                kind,
                inputs: spec_stage.inputs.clone(),
                settings,
                description: spec_stage.description.clone(),
                resources: spec_stage.resources.clone(),
            });
        }
        Ok(ResolvedPipeline {
            name: spec.name,
            seed: spec.seed,
            description: spec.description,
            file: SourceRecord {
                path: self.file.path.clone(),
                hash: self.file.hash.clone(),
            },
            base_dir: parent_dir(&self.file.path),
            profiles,
            stages,
            executor: spec.executor,
            vars: self.vars.clone(),
            origins,
        })
    }
}

/// Calls `visit` with the dotted path of every leaf of `value` (arrays count as leaves).
fn collect_origins(value: &serde_json::Value, prefix: &str, visit: &mut dyn FnMut(&str)) {
    match value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                collect_origins(child, &format!("{prefix}.{key}"), visit);
            }
        }
        _ => visit(prefix),
    }
}

/// Whether any text inside `value` uses (or escapes) a variable.
fn mentions_vars(value: &Value) -> bool {
    match value {
        Value::String(_, text) => vars::mentions(text),
        Value::Dict(_, dict) => dict.values().any(mentions_vars),
        Value::Array(_, items) => items.iter().any(mentions_vars),
        _ => false,
    }
}

/// The merged `vars:` of all layers, resolved on demand, and the substitution of
/// `${vars.NAME}` into each layer's stage settings and inputs (see [`vars`]).
///
/// Substitution happens per layer, before the final merge, so that every value keeps
/// the layer (and so the file line or flag) where it was written; only the variables'
/// values come from the merge of all layers, so `--set vars.x=…` reaches every use.
struct Variables<'a> {
    layers: &'a [Layer],
    /// The merged `vars` map, as written (untagged, so figment tags a substituted value
    /// with the layer it is substituted into).
    raw: Dict,
    /// Variables resolved so far.
    resolved: BTreeMap<String, Value>,
    /// Variables used by some stage, in name order.
    used: std::collections::BTreeSet<String>,
    /// The layer being substituted, where errors about a use are located.
    current: Option<&'a Layer>,
}

/// Why a variable could not be given a value.
enum VarFailure {
    /// No such variable; to be reported where it is used.
    Unknown,
    /// Anything else, already located.
    Located(Diagnostic),
}

impl<'a> Variables<'a> {
    fn collect(layers: &'a [Layer]) -> Result<Variables<'a>, Diagnostic> {
        let mut raw = Dict::new();
        for layer in layers {
            match layer.values.get("vars") {
                None => {}
                Some(Value::Dict(_, vars)) => deep_merge(&mut raw, vars.clone()),
                Some(_) => {
                    return Err(layer.locate(
                        "vars",
                        Diagnostic::new("`vars` must be a map of variable name → value")
                            .help("e.g. `vars: { base_model: ../models/base }`, used as `${vars.base_model}`"),
                    ));
                }
            }
        }
        Ok(Variables {
            layers,
            raw,
            resolved: BTreeMap::new(),
            used: std::collections::BTreeSet::new(),
            current: None,
        })
    }

    /// The layer that set `key_path` (or its nearest set ancestor).
    fn layer_of(&self, key_path: &str) -> Option<&'a Layer> {
        nearest_layer(self.layers, key_path)
    }

    /// Every dotted name a `${vars.…}` could use, for suggestions.
    fn known_names(&self) -> Vec<String> {
        fn walk(dict: &Dict, prefix: &str, out: &mut Vec<String>) {
            for (key, value) in dict {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                if let Value::Dict(_, inner) = value {
                    walk(inner, &name, out);
                }
                out.push(name);
            }
        }
        let mut names = Vec::new();
        walk(&self.raw, "", &mut names);
        names
    }

    /// The resolved value of `vars.NAME`; `stack` holds the variables being resolved,
    /// to catch a variable that refers to itself.
    fn value(&mut self, name: &str, stack: &mut Vec<String>) -> Result<Value, VarFailure> {
        if let Some(value) = self.resolved.get(name) {
            return Ok(value.clone());
        }
        let key = format!("vars.{name}");
        if let Some(start) = stack.iter().position(|entry| entry == name) {
            let mut cycle: Vec<String> = stack[start..].to_vec();
            cycle.push(name.to_string());
            let diagnostic = Diagnostic::new(format!(
                "variable `{}` refers to itself: {}",
                stack[start],
                cycle.join(" → ")
            ));
            return Err(VarFailure::Located(self.locate(&key, diagnostic)));
        }
        let raw = vars::lookup(&self.raw, name)
            .cloned()
            .ok_or(VarFailure::Unknown)?;
        stack.push(name.to_string());
        // A variable's value may use other variables; errors in it are located at the
        // variable, in whichever layer set it.
        let current = self.current.take();
        let result = self.substitute(&raw, &key, stack, &mut BTreeMap::new());
        self.current = current;
        stack.pop();
        let value = result.map_err(VarFailure::Located)?;
        self.resolved.insert(name.to_string(), value.clone());
        Ok(value)
    }

    fn locate(&self, key_path: &str, diagnostic: Diagnostic) -> Diagnostic {
        match self.layer_of(key_path) {
            Some(layer) => layer.locate(key_path, diagnostic),
            None => diagnostic,
        }
    }

    /// `value` (found at `key_path`) with every `${vars.…}` replaced; records in
    /// `through` the key paths that used variables.
    fn substitute(
        &mut self,
        value: &Value,
        key_path: &str,
        stack: &mut Vec<String>,
        through: &mut BTreeMap<String, Vec<String>>,
    ) -> Result<Value, Diagnostic> {
        match value {
            Value::Dict(tag, dict) => {
                let mut out = Dict::new();
                for (key, child) in dict {
                    let child =
                        self.substitute(child, &format!("{key_path}.{key}"), stack, through)?;
                    out.insert(key.clone(), child);
                }
                Ok(Value::Dict(*tag, out))
            }
            Value::Array(tag, items) => {
                let mut out = Vec::with_capacity(items.len());
                for (index, item) in items.iter().enumerate() {
                    out.push(self.substitute(
                        item,
                        &format!("{key_path}.{index}"),
                        stack,
                        through,
                    )?);
                }
                Ok(Value::Array(*tag, out))
            }
            Value::String(_, text) if vars::mentions(text) => {
                let located = |this: &Self, message: String| {
                    this.locate_use(key_path, Diagnostic::new(message))
                };
                let pieces = vars::parse(text).map_err(|message| located(self, message))?;
                let mut names = Vec::new();
                let mut values = Vec::with_capacity(pieces.len());
                for piece in &pieces {
                    values.push(match piece {
                        vars::Piece::Text(_) => None,
                        vars::Piece::Var(name) => {
                            names.push(name.clone());
                            let value =
                                self.value(name, stack).map_err(|failure| match failure {
                                    VarFailure::Located(diagnostic) => diagnostic,
                                    VarFailure::Unknown => self.unknown(name, key_path),
                                })?;
                            Some(value)
                        }
                    });
                }
                if stack.is_empty() {
                    self.used.extend(names.iter().cloned());
                }
                if !names.is_empty() {
                    through.insert(key_path.to_string(), names);
                }
                // The whole value is one variable: it keeps the variable's type.
                if let [vars::Piece::Var(_)] = pieces.as_slice()
                    && let Some(Some(value)) = values.pop()
                {
                    return Ok(value);
                }
                let mut joined = String::new();
                for (piece, value) in pieces.iter().zip(&values) {
                    match (piece, value) {
                        (vars::Piece::Text(text), _) => joined.push_str(text),
                        (vars::Piece::Var(name), Some(value)) => {
                            let text = vars::as_text(value).ok_or_else(|| {
                                located(
                                    self,
                                    format!(
                                        "`${{vars.{name}}}` is {} and cannot be part of the text \"{text}\"; use it as the whole value",
                                        vars::type_name(value)
                                    ),
                                )
                            })?;
                            joined.push_str(&text);
                        }
                        (vars::Piece::Var(_), None) => {}
                    }
                }
                Ok(Value::from(joined))
            }
            other => Ok(other.clone()),
        }
    }

    /// A diagnostic at the use `key_path`: the layer being substituted is the one that
    /// wrote it, and `layer_of` finds it unless a later layer replaced the value.
    fn locate_use(&self, key_path: &str, diagnostic: Diagnostic) -> Diagnostic {
        match self.current {
            Some(layer) => layer.locate(key_path, diagnostic),
            None => self.locate(key_path, diagnostic),
        }
    }

    fn unknown(&self, name: &str, key_path: &str) -> Diagnostic {
        let known = self.known_names();
        let mut diagnostic = Diagnostic::new(format!(
            "unknown variable `${{vars.{name}}}` in `{key_path}`"
        ));
        diagnostic = match did_you_mean(name, known.iter().map(String::as_str)) {
            Some(help) => diagnostic.help(help),
            None if known.is_empty() => diagnostic.help(
                "no variables are defined: add `vars: { NAME: value }` at the top of the pipeline, or --set vars.NAME=value",
            ),
            None => diagnostic.help(format!(
                "defined variables: {}",
                self.raw.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
        };
        self.locate_use(key_path, diagnostic)
    }

    /// The `with` and `inputs` sections of `layer`'s stages that use `${vars.…}`, with
    /// the variables substituted (stage name, section, new value), and the key paths
    /// that used variables. Sections without variables are left alone, uncopied.
    #[allow(clippy::type_complexity)]
    fn substitute_layer(
        &mut self,
        layer: &'a Layer,
    ) -> Result<
        (
            Vec<(String, &'static str, Value)>,
            BTreeMap<String, Vec<String>>,
        ),
        Diagnostic,
    > {
        let mut replaced = Vec::new();
        let mut through = BTreeMap::new();
        self.current = Some(layer);
        if let Some(Value::Dict(_, stages)) = layer.values.get("stages") {
            for (name, stage) in stages {
                let Value::Dict(_, stage) = stage else {
                    continue;
                };
                for section in ["with", "inputs"] {
                    if let Some(value) = stage.get(section)
                        && mentions_vars(value)
                    {
                        let key = format!("stages.{name}.{section}");
                        let value = self.substitute(value, &key, &mut Vec::new(), &mut through)?;
                        replaced.push((name.clone(), section, value));
                    }
                }
            }
        }
        self.current = None;
        Ok((replaced, through))
    }

    /// Every variable resolved (so that a broken one is reported even when unused).
    fn resolve_all(&mut self) -> Result<Dict, Diagnostic> {
        let names: Vec<String> = self.raw.keys().cloned().collect();
        let mut out = Dict::new();
        for name in names {
            let value = self
                .value(&name, &mut Vec::new())
                .map_err(|failure| match failure {
                    VarFailure::Located(diagnostic) => diagnostic,
                    VarFailure::Unknown => Diagnostic::new(format!("variable `{name}` vanished")),
                })?;
            out.insert(name, value);
        }
        Ok(out)
    }

    /// Where each variable that a stage used was set.
    fn used_origins(&self) -> BTreeMap<String, Origin> {
        self.used
            .iter()
            .map(|name| {
                let key = format!("vars.{name}");
                let origin = self
                    .layer_of(&key)
                    .map_or(Origin::Default, |layer| layer.origin(&key));
                (name.clone(), origin)
            })
            .collect()
    }
}
