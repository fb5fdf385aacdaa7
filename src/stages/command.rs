//! The `command` kind, like a DVC stage: a shell command over declared inputs that
//! writes into its output directory. Inputs arrive as `TY_IN_<NAME>` environment
//! variables (absolute paths), the output directory as `TY_OUT` and the working directory.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::containment::Containment;

use super::{
    Artifact, InputRules, STAGE_LOG, StageContext, StageError, StageKind, StageOutcome, invalid,
};
use crate::path_error::AtPath;

/// Settings of a `command` stage.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CommandSettings {
    /// Shell command, run by `sh -c` with the output directory as working directory.
    pub cmd: String,
    /// Files or directories (relative to the output directory) the command must create;
    /// the stage fails if one is missing.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Extra environment variables for the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// The `command` stage kind.
pub struct Command;

/// How many lines of output a failure message quotes.
const TAIL_LINES: usize = 20;
/// How long an interrupted command has between SIGTERM and SIGKILL.
const TERMINATE_GRACE: Duration = Duration::from_millis(800);

impl StageKind for Command {
    type Settings = CommandSettings;
    const NAME: &'static str = "command";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "run a shell command over declared inputs (like a DVC stage)";
    const OUTPUT: Artifact = Artifact::Files;
    const INPUTS: InputRules = InputRules::Any;

    fn check(_settings: &CommandSettings, inputs: &[&str]) -> Result<(), String> {
        // Two names that give one variable would silently hand the command one input.
        for (index, name) in inputs.iter().enumerate() {
            if let Some(other) = inputs[..index]
                .iter()
                .find(|other| input_env_var(other) == input_env_var(name))
            {
                return Err(format!(
                    "inputs `{other}` and `{name}` would both be ${}; rename one",
                    input_env_var(name)
                ));
            }
        }
        Ok(())
    }

    fn run(
        settings: &CommandSettings,
        context: &mut StageContext<'_>,
    ) -> Result<StageOutcome, StageError> {
        let log_path = context.out_dir.join(STAGE_LOG);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .at(&log_path)?;
        let log_err = log.try_clone().at(&log_path)?;
        let mut process = Process::new("sh");
        process
            .arg("-c")
            .arg(&settings.cmd)
            .current_dir(context.out_dir)
            .env("TY_OUT", context.out_dir)
            .env("TY_STAGE", context.stage)
            .env("TY_SEED", context.seed.to_string())
            .envs(&settings.env)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        for (name, path) in context.inputs {
            process.env(input_env_var(name), path);
        }
        let mut containment = Containment::start(context.out_dir)
            .map_err(|error| StageError::io("recording the command's process marks", error))?;
        containment.apply(&mut process);
        let mut child = process
            .spawn()
            .map_err(|error| StageError::io(format!("starting `sh -c {}`", settings.cmd), error))?;
        containment.started(child.id());
        let waited = loop {
            if context.cancel.is_cancelled() {
                // The command gets a moment to clean up, then is killed: Ctrl-C stops
                // trainyard in about a second even when the command ignores SIGTERM.
                containment.terminate();
                let deadline = Instant::now() + TERMINATE_GRACE;
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                containment.kill();
                let _ = child.wait();
                break Err(StageError::Interrupted);
            }
            match child.try_wait() {
                Ok(Some(status)) => break Ok(status),
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(error) => break Err(StageError::io("waiting for the command", error)),
            }
        };
        // Whatever the command left running must not write after this point: the
        // output is about to be hashed and published.
        let leftovers = containment.finish().map_err(|error| {
            StageError::io("stopping the processes the command left running", error)
        })?;
        if leftovers > 0 {
            let _ = writeln!(
                context.log,
                "trainyard: killed {leftovers} process(es) the command left running"
            );
        }
        let status = waited?;
        if !status.success() {
            use std::os::unix::process::ExitStatusExt;
            let status = match (status.code(), status.signal()) {
                (Some(code), _) => format!("exited with status {code}"),
                (None, Some(signal)) => format!("was killed by signal {signal}"),
                _ => "failed".to_string(),
            };
            return Err(StageError::CommandFailed {
                status,
                tail: tail_of(&log_path, TAIL_LINES),
            });
        }
        let missing: Vec<&str> = settings
            .outputs
            .iter()
            .filter(|output| !context.out_dir.join(output).exists())
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(invalid(format!(
                "the command succeeded but did not create its declared outputs: {}",
                missing.join(", ")
            )));
        }
        let copied = own_hard_linked_files(context.out_dir)
            .map_err(|error| StageError::io("copying hard-linked output files", error))?;
        if copied > 0 {
            let _ = writeln!(
                context.log,
                "trainyard: copied {copied} hard-linked file(s) so that the output owns its bytes"
            );
        }
        Ok(StageOutcome::default())
    }
}

/// Replaces every file below `dir` that has other hard links (`ln "$TY_IN_X" copy`) by a
/// copy of its own: through another link, an edit outside the store would change a
/// published output. Returns how many were copied.
fn own_hard_linked_files(dir: &std::path::Path) -> std::io::Result<usize> {
    use std::os::unix::fs::MetadataExt;
    let mut copied = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let metadata = std::fs::symlink_metadata(&path)?;
        if metadata.is_dir() {
            copied += own_hard_linked_files(&path)?;
        } else if metadata.is_file() && metadata.nlink() > 1 {
            let mut name = entry.file_name();
            name.push(".trainyard-copy");
            let copy = path.with_file_name(name);
            std::fs::copy(&path, &copy)?;
            std::fs::rename(&copy, &path)?;
            copied += 1;
        }
    }
    Ok(copied)
}

/// `TY_IN_<NAME>`: the input name upper-cased, `-` turned into `_`.
pub fn input_env_var(name: &str) -> String {
    format!("TY_IN_{}", name.to_uppercase().replace('-', "_"))
}

/// The last `lines` lines of a log file (reading at most its last 64 KiB).
pub fn tail_of(path: &std::path::Path, lines: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let length = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(length.saturating_sub(64 * 1024)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
