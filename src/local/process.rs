//! Worker processes: `runner worker` started as a direct child in a process
//! group of its own, signalled as a group, and found again through `/proc`
//! after the supervisor itself was killed.
//!
//! Every worker carries `VAP_LOCAL_STATE_DIR=<state directory>` in its
//! environment. A supervisor starting on that directory looks for processes
//! that carry it: they are workers its predecessor left behind, and they are
//! stopped before anything new starts.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};

/// The environment variable that ties a worker to its supervisor's state directory.
pub const STATE_MARKER: &str = "VAP_LOCAL_STATE_DIR";

/// Everything a worker process needs beyond the scenario itself.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// The `runner` binary.
    pub program: PathBuf,
    /// The state directory (canonical), set as [`STATE_MARKER`].
    pub state_dir: PathBuf,
    /// Environment given to every worker (settings of `runner local`).
    pub env: Vec<(String, String)>,
    /// Extra `runner worker` arguments, after the ones the supervisor sets.
    pub extra_args: Vec<String>,
}

impl WorkerCommand {
    /// Starts `runner worker` for one scenario; `env` holds the scenario's
    /// own settings (UUID, camera URL, fps, model). Standard output and
    /// error are piped to the supervisor.
    pub fn spawn(&self, env: &[(&str, String)]) -> std::io::Result<Child> {
        let mut cmd = Command::new(&self.program);
        cmd.arg("worker")
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env(STATE_MARKER, &self.state_dir)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        cmd.spawn()
    }
}

/// Sends `signal` to the process group led by `pid` (each worker leads its own).
pub fn signal_group(pid: u32, signal: i32) -> bool {
    let Ok(pgid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) with a negative PID signals a process group; it has no
    // memory effects.
    unsafe { libc::kill(-pgid, signal) == 0 }
}

/// The start time of a live process in clock ticks since boot; `None` when no
/// such process runs (gone or a zombie).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// Field 3 (state) and field 22 (starttime) of `/proc/PID/stat`; the command
/// name in field 2 may contain spaces and parentheses, so fields are counted
/// from its closing parenthesis.
fn parse_stat(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// True while the process `pid` that started at `started` still runs.
pub fn is_running(pid: u32, started: Option<u64>) -> bool {
    match (start_time(pid), started) {
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// A worker process found through its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundWorker {
    pub pid: u32,
    pub scenario_uuid: Option<String>,
}

/// Live processes whose environment ties them to `state_dir`.
pub fn find_workers(state_dir: &Path) -> Vec<FoundWorker> {
    let marker = format!("{STATE_MARKER}={}", state_dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        if !vars.contains(&marker.as_bytes()) || start_time(pid).is_none() {
            continue;
        }
        let scenario_uuid = vars
            .iter()
            .find_map(|v| v.strip_prefix(b"SCENARIO_UUID="))
            .map(|v| String::from_utf8_lossy(v).into_owned());
        found.push(FoundWorker { pid, scenario_uuid });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "4242 (runner (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 123 456";
        assert_eq!(parse_stat(stat), Some(987654));
        let zombie =
            "4242 (runner) Z 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 0 0";
        assert_eq!(parse_stat(zombie), None);
    }

    #[test]
    fn this_process_is_running_and_keeps_its_start_time() {
        let me = std::process::id();
        let started = start_time(me).expect("own start time");
        assert!(is_running(me, Some(started)));
        assert!(
            !is_running(me, Some(started + 1)),
            "another process with a reused PID"
        );
    }
}
