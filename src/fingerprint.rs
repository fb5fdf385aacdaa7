//! Stage fingerprints, and why a stage must run again.
//!
//! A fingerprint is blake3 over, in this order:
//! 1. the stage kind's name and its implementation version ([`crate::stages::StageKind::VERSION`]),
//!    so a change to what a kind computes invalidates its old outputs;
//! 2. canonical JSON (sorted keys, no whitespace) of the pipeline seed and the stage's
//!    resolved `with` settings, defaults included;
//! 3. every input by name, with its content hash: an external file's blake3, an external
//!    directory's tree hash, or the output hash of the upstream stage (or of the file or
//!    folder inside it that the reference names).
//!
//! Not included, on purpose: the stage's name, the paths of external inputs (a moved but
//! identical file changes nothing), timestamps, and the machine. Because upstream
//! outputs enter by content, an upstream rerun that yields identical bytes leaves every
//! downstream stage cached.
//!
//! [`explain`] compares two identities and answers "why is this dirty" in terms a user
//! recognises: which setting changed from what to what, which input file changed.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Where an input comes from, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InputSource {
    /// An upstream stage's output, or a path inside it.
    Stage {
        /// Upstream stage name.
        stage: String,
        /// Path inside its output, if the reference names one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subpath: Option<String>,
    },
    /// A file or directory outside the store, as written in the pipeline.
    Path {
        /// Path as declared (relative to the pipeline file).
        path: String,
    },
}

impl fmt::Display for InputSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InputSource::Stage {
                stage,
                subpath: None,
            } => write!(f, "stage `{stage}`"),
            InputSource::Stage {
                stage,
                subpath: Some(subpath),
            } => write!(f, "`{subpath}` of stage `{stage}`"),
            InputSource::Path { path } => write!(f, "{path}"),
        }
    }
}

/// One input with its content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRecord {
    /// Where it comes from.
    #[serde(flatten)]
    pub source: InputSource,
    /// Its content hash.
    pub hash: String,
}

/// Everything a fingerprint is computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageIdentity {
    /// Kind name.
    pub kind: String,
    /// Kind implementation version.
    pub kind_version: u32,
    /// Pipeline seed.
    pub seed: u64,
    /// Resolved settings.
    pub settings: serde_json::Value,
    /// Inputs by name.
    pub inputs: BTreeMap<String, InputRecord>,
}

impl StageIdentity {
    /// The fingerprint (blake3 hex) of this identity.
    pub fn fingerprint(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"trainyard-fingerprint-v1\0");
        hasher.update(self.kind.as_bytes());
        hasher.update(b"\0");
        hasher.update(&self.kind_version.to_le_bytes());
        let settings = serde_json::json!({ "seed": self.seed, "with": self.settings });
        hasher.update(canonical_json(&settings).as_bytes());
        hasher.update(b"\0");
        for (name, input) in &self.inputs {
            hasher.update(name.as_bytes());
            hasher.update(b"\0");
            hasher.update(input.hash.as_bytes());
            hasher.update(b"\n");
        }
        hasher.finalize().to_hex().to_string()
    }
}

/// `value` as compact JSON with every object's keys sorted (by bytes), whatever order
/// they were built in: the one serialisation a fingerprint may hash.
pub fn canonical_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (index, key) in keys.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// One reason why a stage will run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// No run of this stage was ever recorded.
    NeverRan,
    /// `--force` / `--force-all`.
    Forced,
    /// The kind's implementation changed.
    KindChanged {
        /// Old kind and version.
        old: String,
        /// New kind and version.
        new: String,
    },
    /// The pipeline seed changed.
    SeedChanged {
        /// Before.
        old: u64,
        /// Now.
        new: u64,
    },
    /// A setting changed (or was added or removed: then one side is `null`).
    SettingChanged {
        /// Dotted key path under `with`.
        key: String,
        /// Before.
        old: serde_json::Value,
        /// Now.
        new: serde_json::Value,
    },
    /// An input's content changed.
    InputChanged {
        /// Input name.
        name: String,
        /// Where it comes from now.
        source: InputSource,
    },
    /// An input was added.
    InputAdded {
        /// Input name.
        name: String,
    },
    /// An input was removed.
    InputRemoved {
        /// Input name.
        name: String,
    },
    /// An upstream stage will run first, so this stage's inputs are not known yet.
    UpstreamWillRun {
        /// The upstream stages.
        stages: Vec<String>,
    },
    /// The same fingerprint ran before but its output is gone from the store.
    OutputMissing,
    /// The stored output no longer matches its manifest; it was moved aside.
    OutputCorrupted {
        /// What differs, and where the entry went.
        detail: String,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NeverRan => write!(f, "never ran with these settings and inputs"),
            Reason::Forced => write!(f, "forced"),
            Reason::KindChanged { old, new } => {
                write!(f, "stage implementation changed ({old} → {new})")
            }
            Reason::SeedChanged { old, new } => write!(f, "seed: {old} → {new}"),
            Reason::SettingChanged { key, old, new } => {
                write!(f, "with.{key}: {} → {}", show(old), show(new))
            }
            Reason::InputChanged { name, source } => write!(f, "input `{name}` changed ({source})"),
            Reason::InputAdded { name } => write!(f, "input `{name}` added"),
            Reason::InputRemoved { name } => write!(f, "input `{name}` removed"),
            Reason::UpstreamWillRun { stages } => {
                let names: Vec<String> = stages.iter().map(|stage| format!("`{stage}`")).collect();
                write!(f, "upstream {} will run", names.join(", "))
            }
            Reason::OutputMissing => write!(f, "its output is missing from the store"),
            Reason::OutputCorrupted { detail } => {
                write!(f, "its stored output was corrupted: {detail}")
            }
        }
    }
}

fn show(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "(unset)".to_string(),
        other => other.to_string(),
    }
}

/// Why `current` differs from `previous` (empty when the identities are equal).
pub fn explain(previous: &StageIdentity, current: &StageIdentity) -> Vec<Reason> {
    let mut reasons = Vec::new();
    if previous.kind != current.kind || previous.kind_version != current.kind_version {
        reasons.push(Reason::KindChanged {
            old: format!("{} v{}", previous.kind, previous.kind_version),
            new: format!("{} v{}", current.kind, current.kind_version),
        });
    }
    if previous.seed != current.seed {
        reasons.push(Reason::SeedChanged {
            old: previous.seed,
            new: current.seed,
        });
    }
    diff_values("", &previous.settings, &current.settings, &mut reasons);
    for (name, input) in &current.inputs {
        match previous.inputs.get(name) {
            None => reasons.push(Reason::InputAdded { name: name.clone() }),
            Some(before) if before != input => reasons.push(Reason::InputChanged {
                name: name.clone(),
                source: input.source.clone(),
            }),
            Some(_) => {}
        }
    }
    for name in previous.inputs.keys() {
        if !current.inputs.contains_key(name) {
            reasons.push(Reason::InputRemoved { name: name.clone() });
        }
    }
    reasons
}

fn diff_values(key: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<Reason>) {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(old_map), Value::Object(new_map)) => {
            let keys: std::collections::BTreeSet<&String> =
                old_map.keys().chain(new_map.keys()).collect();
            for child in keys {
                let path = if key.is_empty() {
                    child.clone()
                } else {
                    format!("{key}.{child}")
                };
                diff_values(
                    &path,
                    old_map.get(child).unwrap_or(&Value::Null),
                    new_map.get(child).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if old != new => out.push(Reason::SettingChanged {
            key: key.to_string(),
            old: old.clone(),
            new: new.clone(),
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(steps: u64, input_hash: &str) -> StageIdentity {
        StageIdentity {
            kind: "command".into(),
            kind_version: 1,
            seed: 1,
            settings: serde_json::json!({ "cmd": "train", "opt": { "steps": steps } }),
            inputs: BTreeMap::from([(
                "data".to_string(),
                InputRecord {
                    source: InputSource::Path {
                        path: "data.txt".into(),
                    },
                    hash: input_hash.into(),
                },
            )]),
        }
    }

    #[test]
    fn fingerprint_depends_on_settings_and_input_content_only() {
        assert_eq!(
            identity(10, "h1").fingerprint(),
            identity(10, "h1").fingerprint()
        );
        assert_ne!(
            identity(10, "h1").fingerprint(),
            identity(11, "h1").fingerprint()
        );
        assert_ne!(
            identity(10, "h1").fingerprint(),
            identity(10, "h2").fingerprint()
        );
        let mut moved = identity(10, "h1");
        moved.inputs.get_mut("data").unwrap().source = InputSource::Path {
            path: "elsewhere.txt".into(),
        };
        assert_eq!(moved.fingerprint(), identity(10, "h1").fingerprint());
    }

    #[test]
    fn explain_names_the_setting_with_old_and_new_value() {
        let reasons = explain(&identity(10, "h1"), &identity(20, "h2"));
        let rendered: Vec<String> = reasons.iter().map(ToString::to_string).collect();
        assert_eq!(
            rendered,
            ["with.opt.steps: 10 → 20", "input `data` changed (data.txt)"]
        );
    }
}
