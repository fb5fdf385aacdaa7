//! Where stages run: `executor:` at the top of a pipeline or profile (`kind: local` or
//! `slurm`, plus default `resources`), and `resources:` on a stage (or under `kinds.K`
//! in a profile). None of it enters a fingerprint: the same stage computes the same
//! bytes on this machine and on a cluster node.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where the stages of a run execute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// On this machine, inside the `trainyard run` process.
    #[default]
    Local,
    /// Each stage that must run is one `sbatch` job running `trainyard exec-stage`.
    Slurm,
}

impl ExecutorKind {
    /// The name used in settings and records.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorKind::Local => "local",
            ExecutorKind::Slurm => "slurm",
        }
    }
}

/// `executor:` of a pipeline or profile.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecutorSettings {
    /// `local` (default) or `slurm`; `--executor` overrides it.
    #[serde(default)]
    pub kind: ExecutorKind,
    /// Resources every Slurm job asks for unless its stage (or `kinds.K.resources` in a
    /// profile) says otherwise.
    #[serde(default)]
    pub resources: Resources,
    /// Refuse to submit when the store is on a filesystem the cluster's other nodes
    /// cannot see (a local disk on a cluster of several nodes). Default true.
    #[serde(default = "yes")]
    pub check_shared_store: bool,
    /// Seconds before a job's time limit at which Slurm sends it SIGUSR1, so a training
    /// stage checkpoints and requeues itself (`--signal=B:USR1@N`). Default 120.
    #[serde(default = "default_signal_lead_s")]
    pub signal_lead_s: u32,
}

fn yes() -> bool {
    true
}

fn default_signal_lead_s() -> u32 {
    120
}

impl ExecutorSettings {
    /// Whether these are the defaults (then the run record leaves them out).
    pub fn is_default(&self) -> bool {
        *self
            == ExecutorSettings {
                check_shared_store: true,
                signal_lead_s: default_signal_lead_s(),
                ..ExecutorSettings::default()
            }
    }
}

/// What a stage's Slurm job asks for. Each field is passed to `sbatch` as its option of
/// the same name; unset fields are left to the cluster's defaults. Ignored by the local
/// executor.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPUs for the job (`--cpus-per-task`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory (`--mem`): a number of megabytes, or with a unit, `16G`, `512M`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<String>,
    /// GPUs (`--gpus`): a count, or `TYPE:COUNT` such as `a100:2`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "count_or_text"
    )]
    #[schemars(with = "Option<CountOrText>")]
    pub gpus: Option<String>,
    /// Time limit (`--time`): `MINUTES`, `HH:MM:SS`, `D-HH:MM`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Partition (`--partition`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Account (`--account`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Quality of service (`--qos`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<String>,
    /// More `sbatch` options, each one whole argument (`--constraint=v100`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<String>,
}

/// A GPU request as written: `2` or `a100:2`.
#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum CountOrText {
    Count(u64),
    Text(String),
}

fn count_or_text<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    Ok(
        Option::<CountOrText>::deserialize(deserializer)?.map(|value| match value {
            CountOrText::Count(count) => count.to_string(),
            CountOrText::Text(text) => text,
        }),
    )
}

impl Resources {
    /// `self` with every field it leaves unset taken from `defaults`.
    pub fn or(&self, defaults: &Resources) -> Resources {
        Resources {
            cpus: self.cpus.or(defaults.cpus),
            mem: self.mem.clone().or_else(|| defaults.mem.clone()),
            gpus: self.gpus.clone().or_else(|| defaults.gpus.clone()),
            time: self.time.clone().or_else(|| defaults.time.clone()),
            partition: self
                .partition
                .clone()
                .or_else(|| defaults.partition.clone()),
            account: self.account.clone().or_else(|| defaults.account.clone()),
            qos: self.qos.clone().or_else(|| defaults.qos.clone()),
            extra: if self.extra.is_empty() {
                defaults.extra.clone()
            } else {
                self.extra.clone()
            },
        }
    }

    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == Resources::default()
    }

    /// The first value that `sbatch` would reject or misread, as (key, problem).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.cpus == Some(0) {
            return Err(("cpus", "must be at least 1".to_string()));
        }
        if let Some(mem) = &self.mem {
            let digits = mem.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
            let unit_len = mem.len() - digits.len();
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || unit_len > 1 {
                return Err((
                    "mem",
                    format!(
                        "`{mem}` is not a memory size: a number of megabytes, or a number with K, M, G or T (`16G`)"
                    ),
                ));
            }
        }
        if let Some(gpus) = &self.gpus {
            let count = gpus.rsplit(':').next().unwrap_or_default();
            if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
                return Err((
                    "gpus",
                    format!("`{gpus}` is not a GPU count: `2`, or `TYPE:COUNT` such as `a100:2`"),
                ));
            }
        }
        if let Some(time) = &self.time {
            let valid = !time.is_empty()
                && time
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b == b':' || b == b'-')
                && time.bytes().next().is_some_and(|b| b.is_ascii_digit())
                && time.bytes().last().is_some_and(|b| b.is_ascii_digit());
            if !valid && time != "UNLIMITED" && time != "INFINITE" {
                return Err((
                    "time",
                    format!(
                        "`{time}` is not a Slurm time limit: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
                    ),
                ));
            }
        }
        for (key, value) in [
            ("partition", &self.partition),
            ("account", &self.account),
            ("qos", &self.qos),
        ] {
            if let Some(value) = value
                && (value.is_empty() || value.chars().any(char::is_whitespace))
            {
                return Err((key, format!("`{value}` is not a name")));
            }
        }
        if let Some(bad) = self.extra.iter().find(|option| !option.starts_with('-')) {
            return Err((
                "extra",
                format!(
                    "`{bad}` is not an sbatch option: each entry is one option such as `--constraint=v100`"
                ),
            ));
        }
        Ok(())
    }

    /// The `sbatch` options these resources ask for.
    pub fn sbatch_options(&self) -> Vec<String> {
        let mut options = Vec::new();
        if let Some(cpus) = self.cpus {
            options.push(format!("--cpus-per-task={cpus}"));
        }
        let named = [
            ("--mem", &self.mem),
            ("--gpus", &self.gpus),
            ("--time", &self.time),
            ("--partition", &self.partition),
            ("--account", &self.account),
            ("--qos", &self.qos),
        ];
        for (flag, value) in named {
            if let Some(value) = value {
                options.push(format!("{flag}={value}"));
            }
        }
        options.extend(self.extra.iter().cloned());
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_resources_win_field_by_field_over_the_defaults() {
        let defaults = Resources {
            cpus: Some(2),
            partition: Some("cpu".to_string()),
            extra: vec!["--constraint=x".to_string()],
            ..Resources::default()
        };
        let stage = Resources {
            cpus: Some(8),
            gpus: Some("a100:1".to_string()),
            ..Resources::default()
        };
        let merged = stage.or(&defaults);
        assert_eq!(
            merged.sbatch_options(),
            [
                "--cpus-per-task=8",
                "--gpus=a100:1",
                "--partition=cpu",
                "--constraint=x"
            ]
        );
    }

    #[test]
    fn values_sbatch_would_reject_are_named() {
        let bad = |resources: Resources| resources.check().err().map(|(key, _)| key);
        let mem = |mem: &str| Resources {
            mem: Some(mem.to_string()),
            ..Resources::default()
        };
        assert_eq!(bad(mem("16G")), None);
        assert_eq!(bad(mem("2048")), None);
        assert_eq!(bad(mem("16GB")), Some("mem"));
        assert_eq!(bad(mem("lots")), Some("mem"));
        let time = |time: &str| Resources {
            time: Some(time.to_string()),
            ..Resources::default()
        };
        assert_eq!(bad(time("1-12:00:00")), None);
        assert_eq!(bad(time("90")), None);
        assert_eq!(bad(time("1h")), Some("time"));
        let gpus = Resources {
            gpus: Some("a100:two".to_string()),
            ..Resources::default()
        };
        assert_eq!(bad(gpus), Some("gpus"));
        let extra = Resources {
            extra: vec!["constraint=v100".to_string()],
            ..Resources::default()
        };
        assert_eq!(bad(extra), Some("extra"));
    }
}
