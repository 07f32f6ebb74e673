//! Worker processes: `runner worker` started as a direct child in a process
//! group of its own, signalled as a group, and found again through `/proc`
//! after the supervisor itself was killed.
//!
//! A worker does not inherit the supervisor's environment: it gets `PATH`,
//! the worker settings the supervisor has (the variables `runner worker`
//! reads), the ones the supervisor sets for it, its scenario's own, and
//! `VAP_LOCAL_STATE_DIR=<state directory>`. A supervisor starting on that
//! directory looks for processes that carry it: they are workers its
//! predecessor left behind, and they are stopped before anything new starts.
//!
//! Before `runner worker` is executed, the child process lowers its resource
//! limits (address space, open files and, for a source that ends, CPU time),
//! so one camera cannot exhaust the machine for the others.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};

use super::state::Origin;
use crate::host_policy::HostPolicy;

/// The environment variable that ties a worker to its supervisor's state directory.
pub const STATE_MARKER: &str = "VAP_LOCAL_STATE_DIR";

/// Variables of a scenario itself, which the supervisor sets for each
/// worker and never passes on from its own environment.
const SCENARIO_VARIABLES: &[&str] = &["SCENARIO_UUID", "CAMERA_URL"];

/// Variables read outside the command line that a worker may inherit.
const INHERITED_EXTRA: &[&str] = &["PATH", "RUST_LOG"];

/// The supervisor's variables a worker inherits: `PATH`, `RUST_LOG`, and the
/// worker settings among `settings` (the variables `runner worker` reads),
/// but never a scenario's own.
pub fn inherited(
    vars: impl IntoIterator<Item = (String, String)>,
    settings: &[String],
) -> Vec<(String, String)> {
    vars.into_iter()
        .filter(|(name, _)| {
            !SCENARIO_VARIABLES.contains(&name.as_str())
                && (INHERITED_EXTRA.contains(&name.as_str()) || settings.contains(name))
        })
        .collect()
}

/// The camera host policy a worker applies, by where its scenario came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPolicies {
    /// A `to_deploy` message: anyone who may write the topic chose the camera.
    pub kafka: HostPolicy,
    /// The scenarios file: the operator chose it.
    pub file: HostPolicy,
}

impl OriginPolicies {
    pub fn of(&self, origin: Origin) -> &HostPolicy {
        match origin {
            Origin::Kafka => &self.kafka,
            Origin::File => &self.file,
        }
    }
}

/// Resource limits of every worker process; `None` leaves the supervisor's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Address space (`RLIMIT_AS`), bytes.
    pub address_space: Option<u64>,
    /// Open file descriptors (`RLIMIT_NOFILE`).
    pub open_files: Option<u64>,
    /// CPU time (`RLIMIT_CPU`), seconds; for workers of a source that ends only.
    pub cpu_seconds: Option<u64>,
}

/// One resource limit as the child sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: libc::__rlimit_resource_t,
    pub soft: u64,
    pub hard: u64,
}

impl Limits {
    /// The limits a worker gets, each at most the hard limit the supervisor
    /// has (`hard_now`), since an unprivileged process cannot raise it. CPU
    /// time only when the source ends (a live camera's worker runs for
    /// ever), with the hard limit a second above the soft one so that the
    /// worker gets SIGXCPU, not SIGKILL.
    pub fn rlimits(
        &self,
        finite: bool,
        hard_now: impl Fn(libc::__rlimit_resource_t) -> u64,
    ) -> Vec<Rlimit> {
        let cpu = self.cpu_seconds.filter(|_| finite);
        [
            (libc::RLIMIT_AS, self.address_space, 0),
            (libc::RLIMIT_NOFILE, self.open_files, 0),
            (libc::RLIMIT_CPU, cpu, 1),
        ]
        .into_iter()
        .filter_map(|(resource, wanted, headroom)| {
            let wanted = wanted?;
            let ceiling = hard_now(resource);
            Some(Rlimit {
                resource,
                soft: wanted.min(ceiling),
                hard: wanted.saturating_add(headroom).min(ceiling),
            })
        })
        .collect()
    }
}

/// The hard limit of `resource` this process has (`RLIM_INFINITY` when unknown).
pub fn hard_limit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes into the struct given.
    if unsafe { libc::getrlimit(resource, &mut limit) } == 0 {
        limit.rlim_max
    } else {
        libc::RLIM_INFINITY
    }
}

/// Everything a worker process needs beyond the scenario itself.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// The `runner` binary.
    pub program: PathBuf,
    /// The state directory (canonical), set as [`STATE_MARKER`].
    pub state_dir: PathBuf,
    /// Environment given to every worker: what it inherits ([`inherited`])
    /// and the settings of `runner local`, later entries winning.
    pub env: Vec<(String, String)>,
    /// The camera host policy, by the scenario's origin.
    pub policies: OriginPolicies,
    pub limits: Limits,
    /// Extra `runner worker` arguments, after the ones the supervisor sets.
    pub extra_args: Vec<String>,
}

/// One scenario as a worker is started for it.
pub struct Launch<'a> {
    /// The scenario's own settings (UUID, camera URL, fps, model).
    pub env: &'a [(&'a str, String)],
    pub origin: Origin,
    /// Its source ends (a file).
    pub finite: bool,
}

impl WorkerCommand {
    /// The whole environment of a worker for `launch`, later entries winning.
    pub fn environment(&self, launch: &Launch<'_>) -> Vec<(String, String)> {
        let policy = self.policies.of(launch.origin).worker_env();
        self.env
            .iter()
            .cloned()
            .chain(policy.into_iter().map(|(k, v)| (k.to_string(), v)))
            .chain(launch.env.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .chain([(
                STATE_MARKER.to_string(),
                self.state_dir.display().to_string(),
            )])
            .collect()
    }

    /// Starts `runner worker` for one scenario with a cleared environment
    /// ([`WorkerCommand::environment`]) and lowered resource limits.
    /// Standard output and error are piped to the supervisor.
    pub fn spawn(&self, launch: &Launch<'_>) -> std::io::Result<Child> {
        let limits = self.limits.rlimits(launch.finite, hard_limit);
        let mut cmd = Command::new(&self.program);
        cmd.arg("worker")
            .args(&self.extra_args)
            .env_clear()
            .envs(self.environment(launch))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        // SAFETY: between fork and exec the closure only calls setrlimit(2),
        // which is async-signal-safe, on values computed before the fork.
        unsafe {
            cmd.pre_exec(move || {
                for limit in &limits {
                    let value = libc::rlimit {
                        rlim_cur: limit.soft,
                        rlim_max: limit.hard,
                    };
                    if libc::setrlimit(limit.resource, &value) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
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
    use crate::host_policy::Mode;
    use std::collections::BTreeMap;

    fn vars(names: &[(&str, &str)]) -> Vec<(String, String)> {
        names
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_worker_inherits_worker_settings_only() {
        let settings: Vec<String> = ["REALTIME", "SINK", "CAMERA_URL", "SCENARIO_UUID"]
            .map(String::from)
            .to_vec();
        let supervisor = vars(&[
            ("PATH", "/usr/bin"),
            ("RUST_LOG", "rdkafka=info"),
            ("REALTIME", "true"),
            ("SINK", "stdout"),
            ("AWS_SECRET_ACCESS_KEY", "x"),
            ("KUBECONFIG", "/root/.kube/config"),
            ("CAMERA_URL", "rtsp://u:pw@cam/a"),
            ("SCENARIO_UUID", "550e8400-e29b-41d4-a716-446655440000"),
            ("HOME", "/root"),
        ]);
        assert_eq!(
            inherited(supervisor, &settings),
            vars(&[
                ("PATH", "/usr/bin"),
                ("RUST_LOG", "rdkafka=info"),
                ("REALTIME", "true"),
                ("SINK", "stdout"),
            ])
        );
    }

    fn command() -> WorkerCommand {
        let mut kafka = HostPolicy::defaults(Mode::LocalIngest);
        kafka.deny_hosts = vec!["bad.example".parse().unwrap()];
        WorkerCommand {
            program: "/usr/bin/runner".into(),
            state_dir: "/var/lib/vap-runner".into(),
            env: vars(&[("REALTIME", "true"), ("LOG_LEVEL", "INFO")]),
            policies: OriginPolicies {
                kafka,
                file: HostPolicy::defaults(Mode::Local),
            },
            limits: Limits::default(),
            extra_args: Vec::new(),
        }
    }

    #[test]
    fn the_environment_follows_the_scenarios_origin() {
        let cmd = command();
        let scenario = [("CAMERA_URL", "rtsp://127.0.0.1/a".to_string())];
        let env_of = |origin| -> BTreeMap<String, String> {
            cmd.environment(&Launch {
                env: &scenario,
                origin,
                finite: false,
            })
            .into_iter()
            .collect()
        };
        let kafka = env_of(Origin::Kafka);
        assert_eq!(kafka["CAMERA_ALLOW_LOOPBACK"], "false");
        assert_eq!(kafka["CAMERA_DENY_HOSTS"], "bad.example");
        assert_eq!(env_of(Origin::File)["CAMERA_ALLOW_LOOPBACK"], "true");
        assert_eq!(kafka["CAMERA_URL"], "rtsp://127.0.0.1/a");
        assert_eq!(kafka[STATE_MARKER], "/var/lib/vap-runner");
        assert_eq!(kafka["REALTIME"], "true");
    }

    #[test]
    fn limits_stay_under_the_hard_limit_and_cpu_is_for_files_only() {
        let limits = Limits {
            address_space: Some(1 << 30),
            open_files: Some(1024),
            cpu_seconds: Some(600),
        };
        let hard = |resource| match resource {
            libc::RLIMIT_NOFILE => 512,
            _ => libc::RLIM_INFINITY,
        };
        assert_eq!(
            limits.rlimits(true, hard),
            [
                Rlimit {
                    resource: libc::RLIMIT_AS,
                    soft: 1 << 30,
                    hard: 1 << 30
                },
                Rlimit {
                    resource: libc::RLIMIT_NOFILE,
                    soft: 512,
                    hard: 512
                },
                Rlimit {
                    resource: libc::RLIMIT_CPU,
                    soft: 600,
                    hard: 601
                },
            ]
        );
        let live = limits.rlimits(false, hard);
        assert!(
            live.iter().all(|l| l.resource != libc::RLIMIT_CPU),
            "{live:?}"
        );
        assert!(Limits::default().rlimits(true, hard).is_empty());
    }

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
