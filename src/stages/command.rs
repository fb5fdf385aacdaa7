//! The `command` kind, like a DVC stage: a shell command over declared inputs that
//! writes into its output directory. Inputs arrive as `TY_IN_<NAME>` environment
//! variables (absolute paths), the output directory as `TY_OUT` and the working directory.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::process::{Command as Process, Stdio};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Artifact, InputRules, STAGE_LOG, StageContext, StageError, StageKind, StageOutcome};

/// Settings of a `command` stage.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
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
            .map_err(|error| StageError::io(format!("opening {}", log_path.display()), error))?;
        let log_err = log
            .try_clone()
            .map_err(|error| StageError::io(format!("opening {}", log_path.display()), error))?;
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
        configure_process_group(&mut process);
        let mut child = process
            .spawn()
            .map_err(|error| StageError::io(format!("starting `sh -c {}`", settings.cmd), error))?;
        let status = loop {
            if context.cancel.is_cancelled() {
                terminate_group(child.id());
                let _ = child.wait();
                return Err(StageError::Interrupted);
            }
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(error) => return Err(StageError::io("waiting for the command", error)),
            }
        };
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
            return Err(StageError::Invalid(format!(
                "the command succeeded but did not create its declared outputs: {}",
                missing.join(", ")
            )));
        }
        Ok(StageOutcome::default())
    }
}

/// `TY_IN_<NAME>`: the input name upper-cased, `-` turned into `_`.
pub fn input_env_var(name: &str) -> String {
    format!("TY_IN_{}", name.to_uppercase().replace('-', "_"))
}

/// Puts the command in its own process group (so that an interrupt can stop all of
/// it) and, on Linux, has the kernel kill it if trainyard itself dies.
fn configure_process_group(process: &mut Process) {
    use std::os::unix::process::CommandExt;
    process.process_group(0);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        process.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn terminate_group(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill() has no memory-safety preconditions; a negative pid addresses
        // the process group this child leads.
        unsafe {
            libc::kill(-pid, libc::SIGTERM);
        }
    }
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
