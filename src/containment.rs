//! Keeping a command stage's processes inside the stage.
//!
//! A shell command may leave processes behind (`sleep 1 && echo late >> out &`), and
//! those may write into the output after it was hashed, or, after trainyard itself was
//! killed, into the scratch of the next run. Two marks find them again:
//!
//! - the process group the command starts in (a child that does not call `setsid` stays
//!   in it), and
//! - a token in the environment of every process the command starts (a child that leaves
//!   the group still inherits it). This is how Jenkins' ProcessTreeKiller finds a
//!   build's leftovers; unlike a cgroup it needs no privileges or delegation.
//!
//! When the command exits, everything carrying either mark is killed before the output
//! is hashed. The token is also written next to the scratch directory
//! (`work/<scratch name>.procs`), so a run that starts after a killed one finds and kills
//! that run's leftovers before any stage runs.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The environment variable holding the token.
pub const TOKEN_VAR: &str = "TRAINYARD_STAGE_TOKEN";
/// File name suffix of the token records in `work/`.
const RECORD_SUFFIX: &str = ".procs";
/// How many kill rounds to try before giving up on a process tree that keeps forking.
const KILL_ROUNDS: usize = 200;

/// The marks of one running command: its token and where the token is recorded.
#[derive(Debug)]
pub struct Containment {
    token: String,
    record: PathBuf,
    group: Option<i32>,
}

/// Where the token of the command running in `scratch` is recorded.
fn record_path(scratch: &Path) -> PathBuf {
    let mut name = scratch.file_name().unwrap_or_default().to_os_string();
    name.push(RECORD_SUFFIX);
    scratch.with_file_name(name)
}

impl Containment {
    /// Makes a fresh token for the command about to run in `scratch` and records it
    /// (synced, so it survives the machine crashing while the command runs).
    pub fn start(scratch: &Path) -> io::Result<Containment> {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&std::process::id().to_le_bytes());
        hasher.update(scratch.as_os_str().as_encoded_bytes());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        hasher.update(&now.as_nanos().to_le_bytes());
        let token = hasher.finalize().to_hex()[..32].to_string();
        let record = record_path(scratch);
        crate::atomic_file::write_synced(&record, token.as_bytes())?;
        Ok(Containment {
            token,
            record,
            group: None,
        })
    }

    /// Marks `process`: its own process group, the token in its environment, and (on
    /// Linux) death with the thread that started it.
    pub fn apply(&self, process: &mut Command) {
        use std::os::unix::process::CommandExt;
        process.env(TOKEN_VAR, &self.token).process_group(0);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches only the child's own state.
        unsafe {
            process.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Remembers the process group the command's first process leads.
    pub fn started(&mut self, pid: u32) {
        self.group = i32::try_from(pid).ok();
    }

    /// Asks the command's process group to stop (SIGTERM), as Ctrl-C does.
    pub fn terminate(&self) {
        if let Some(group) = self.group {
            signal_group(group, libc::SIGTERM);
        }
    }

    /// Kills the command's process group (SIGKILL): for a command that ignored
    /// [`Containment::terminate`].
    pub fn kill(&self) {
        if let Some(group) = self.group {
            signal_group(group, libc::SIGKILL);
        }
    }

    /// Kills everything the command left behind and forgets the token. Returns how
    /// many processes were killed.
    pub fn finish(self) -> io::Result<usize> {
        let killed = kill_marked(&self.token, self.group)?;
        remove_record(&self.record)?;
        Ok(killed)
    }
}

/// Kills the leftovers of commands whose runs died (their token records are still in
/// `work_dir`), and removes the records. Returns how many processes were killed.
pub fn kill_leftovers(work_dir: &Path) -> io::Result<usize> {
    let entries = match std::fs::read_dir(work_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error),
    };
    let mut killed = 0;
    for entry in entries {
        let path = entry?.path();
        if !path
            .file_name()
            .is_some_and(|name| name.to_string_lossy().ends_with(RECORD_SUFFIX))
        {
            continue;
        }
        let token = std::fs::read_to_string(&path)?;
        let token = token.trim();
        if !token.is_empty() {
            killed += kill_marked(token, None)?;
        }
        remove_record(&path)?;
    }
    Ok(killed)
}

fn remove_record(record: &Path) -> io::Result<()> {
    match std::fs::remove_file(record) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

fn signal_group(group: i32, signal: i32) {
    // SAFETY: kill() has no memory-safety preconditions; a negative pid addresses a
    // process group.
    unsafe {
        libc::kill(-group, signal);
    }
}

/// SIGKILLs every process carrying `token`, every member of their process groups (a
/// group holding a marked process cannot have been reused by anyone else) and of
/// `group` (the command's own, whose leader was just reaped), until a scan finds none:
/// processes may fork while they are being killed.
#[cfg(target_os = "linux")]
fn kill_marked(token: &str, group: Option<i32>) -> io::Result<usize> {
    // A process signalled in one round may not have died by the next scan: count each
    // process once.
    let mut killed = std::collections::BTreeSet::new();
    let mut quiet_scans = 0;
    for _ in 0..KILL_ROUNDS {
        let processes = scan_processes(token)?;
        let groups: Vec<i32> = processes
            .iter()
            .filter(|process| process.marked)
            .map(|process| process.group)
            .chain(group)
            .collect();
        let targets: Vec<i32> = processes
            .iter()
            .filter(|process| process.marked || groups.contains(&process.group))
            .map(|process| process.pid)
            .collect();
        if targets.is_empty() {
            // A process in the middle of exec() may briefly show no environment: only
            // two empty scans in a row mean there is nothing left.
            quiet_scans += 1;
            if quiet_scans == 2 {
                return Ok(killed.len());
            }
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        quiet_scans = 0;
        for pid in &targets {
            // SAFETY: as in signal_group.
            unsafe {
                libc::kill(*pid, libc::SIGKILL);
            }
        }
        killed.extend(targets);
        // Killed processes linger as zombies until reaped; give them a moment.
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(io::Error::other(format!(
        "processes of a command stage (token {token}) keep forking after {KILL_ROUNDS} rounds of SIGKILL"
    )))
}

#[cfg(not(target_os = "linux"))]
fn kill_marked(_token: &str, group: Option<i32>) -> io::Result<usize> {
    if let Some(group) = group {
        signal_group(group, libc::SIGKILL);
    }
    Ok(0)
}

#[cfg(target_os = "linux")]
struct ProcessInfo {
    pid: i32,
    group: i32,
    marked: bool,
}

/// Every live (not zombie) process of ours, with its group and whether its environment
/// carries `token`. Processes that vanish mid-scan are skipped.
#[cfg(target_os = "linux")]
fn scan_processes(token: &str) -> io::Result<Vec<ProcessInfo>> {
    let needle = format!("{TOKEN_VAR}={token}");
    let own_pid = std::process::id() as i32;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == own_pid {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may hold spaces.
        let Some(after_name) = stat.rfind(')').map(|end| &stat[end + 1..]) else {
            continue;
        };
        let mut fields = after_name.split_whitespace();
        let state = fields.next().unwrap_or("Z");
        let group = fields.nth(1).and_then(|field| field.parse::<i32>().ok());
        let (Some(group), false) = (group, state == "Z" || state == "X") else {
            continue;
        };
        // Other users' environments are unreadable, and they cannot hold our token.
        let marked = std::fs::read(entry.path().join("environ")).is_ok_and(|environ| {
            environ
                .split(|byte| *byte == 0)
                .any(|variable| variable == needle.as_bytes())
        });
        found.push(ProcessInfo { pid, group, marked });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_outside_the_group_are_found_by_their_token() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("stage-abc");
        std::fs::create_dir(&scratch).unwrap();
        let mut containment = Containment::start(&scratch).unwrap();
        assert!(dir.path().join("stage-abc.procs").exists());
        let mut process = Command::new("sh");
        // One child stays in the group, one leaves it with setsid.
        process
            .arg("-c")
            .arg("sleep 30 & setsid sleep 30 & echo started > marker")
            .current_dir(&scratch);
        containment.apply(&mut process);
        let mut child = process.spawn().unwrap();
        containment.started(child.id());
        child.wait().unwrap();
        assert!(scratch.join("marker").exists());
        let token = containment.token.clone();
        let marked = || {
            scan_processes(&token)
                .unwrap()
                .iter()
                .filter(|process| process.marked)
                .count()
        };
        // A process in the middle of exec() may briefly show no environment, and on a
        // loaded machine `setsid` may not have run yet: wait up to 5 s.
        for _ in 0..500 {
            if marked() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(marked(), 2);
        assert_eq!(containment.finish().unwrap(), 2);
        assert!(
            scan_processes(&token)
                .unwrap()
                .iter()
                .all(|process| !process.marked)
        );
        assert!(!dir.path().join("stage-abc.procs").exists());
    }

    #[test]
    fn a_dead_runs_record_leads_to_its_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("stage-def");
        let mut containment = Containment::start(&scratch).unwrap();
        let mut process = Command::new("sh");
        process.arg("-c").arg("setsid sleep 30 &");
        containment.apply(&mut process);
        let mut child = process.spawn().unwrap();
        containment.started(child.id());
        child.wait().unwrap();
        // As above: on a loaded machine the backgrounded `setsid sleep` may not be
        // running (or be mid-exec, its environment unreadable) when `sh` has exited.
        let token = containment.token.clone();
        for _ in 0..500 {
            let marked = scan_processes(&token)
                .unwrap()
                .iter()
                .filter(|process| process.marked)
                .count();
            if marked == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // The run "dies" here: the record stays, and the next run finds it.
        std::mem::forget(containment);
        assert_eq!(kill_leftovers(dir.path()).unwrap(), 1);
        assert!(!dir.path().join("stage-def.procs").exists());
        assert_eq!(kill_leftovers(dir.path()).unwrap(), 0);
    }
}
