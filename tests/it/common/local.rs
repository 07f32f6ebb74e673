//! Running `runner local` against the test bed's Kafka broker: one topic set,
//! consumer group and state directory per test, removed when the test ends;
//! its worker processes are watched through `/proc`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use serde_json::Value;

use super::{create_topics, delete_topics, kafka_bootstrap, unique_name};

/// Everything one local-supervisor test owns.
pub struct LocalBed {
    pub bootstrap: String,
    pub deploy: String,
    pub undeploy: String,
    pub dlq: String,
    pub events: String,
    pub results: String,
    pub heartbeats: String,
    pub group: String,
    pub state: tempfile::TempDir,
    pub logs: tempfile::TempDir,
    producer: FutureProducer,
}

impl LocalBed {
    pub async fn new(prefix: &str) -> LocalBed {
        LocalBed::on(kafka_bootstrap(), prefix).await
    }

    /// A bed on the broker at `bootstrap` (a listener the test's own
    /// clients may use without logging in).
    pub async fn on(bootstrap: String, prefix: &str) -> LocalBed {
        let name = unique_name(prefix);
        let [deploy, undeploy, dlq, events, results, heartbeats] = super::bed_topics(&name);
        let bed = LocalBed {
            deploy,
            undeploy,
            dlq,
            events,
            results,
            heartbeats,
            group: format!("{name}-group"),
            producer: super::test_producer(&bootstrap),
            // The supervisor refuses a state directory other users may open.
            state: tempfile::Builder::new()
                .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .tempdir()
                .expect("state dir"),
            logs: tempfile::tempdir().expect("log dir"),
            bootstrap,
        };
        create_topics(&bed.bootstrap, &bed.topics()).await;
        bed
    }

    fn topics(&self) -> [&String; 6] {
        [
            &self.deploy,
            &self.undeploy,
            &self.dlq,
            &self.events,
            &self.results,
            &self.heartbeats,
        ]
    }

    /// The state directory as workers carry it in their environment.
    pub fn state_dir(&self) -> PathBuf {
        self.state.path().canonicalize().expect("state dir")
    }

    /// Starts `runner local` on this bed; `extra` env overrides the defaults.
    pub fn start(&self, extra: &[(&str, &str)]) -> LocalProcess {
        let run = unique_name("run");
        let log_path = self.logs.path().join(format!("local-{run}.log"));
        let stdout_path = self.logs.path().join(format!("local-{run}.out"));
        let log = std::fs::File::create(&log_path).expect("log file");
        let out = std::fs::File::create(&stdout_path).expect("stdout file");
        let mut env: BTreeMap<&str, String> = BTreeMap::new();
        env.insert("KAFKA_BOOTSTRAP_SERVERS", self.bootstrap.clone());
        env.insert("CONSUMER_GROUP", self.group.clone());
        env.insert("DEPLOY_TOPIC", self.deploy.clone());
        env.insert("UNDEPLOY_TOPIC", self.undeploy.clone());
        env.insert("DLQ_TOPIC", self.dlq.clone());
        env.insert("EVENTS_TOPIC", self.events.clone());
        env.insert("RESULTS_TOPIC", self.results.clone());
        env.insert("HEARTBEAT_TOPIC", self.heartbeats.clone());
        env.insert("VIDEO_FILE_ROOT", super::MEDIA_DIR.to_string());
        env.insert("STATE_DIR", self.state.path().display().to_string());
        env.insert("STOP_GRACE_MS", "5000".to_string());
        env.insert("LOG_LEVEL", "debug".to_string());
        env.insert("RUST_LOG", "rdkafka=info".to_string());
        for (k, v) in extra {
            env.insert(k, v.to_string());
        }
        let mut cmd = super::runner();
        cmd.arg("local")
            .envs(env)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log);
        LocalProcess {
            child: Some(cmd.spawn().expect("start runner local")),
            log_path,
            stdout_path,
            state_dir: self.state_dir(),
        }
    }

    pub async fn send(&self, topic: &str, key: Option<&str>, payload: &[u8]) {
        super::send_record(&self.producer, topic, key, payload, None).await;
    }

    pub async fn deploy(&self, scenario: &str, camera: &str) {
        self.send(
            &self.deploy,
            Some(scenario),
            &super::deploy_body(scenario, camera),
        )
        .await;
    }

    pub async fn undeploy(&self, scenario: &str) {
        self.send(
            &self.undeploy,
            Some(scenario),
            &super::undeploy_body(scenario),
        )
        .await;
    }

    /// `runner local list` for this bed's state directory, as rows keyed by UUID.
    pub fn list(&self) -> HashMap<String, ListRow> {
        if !self.state.path().join("state.db").exists() {
            return HashMap::new(); // the supervisor has not started yet
        }
        let out = super::run_ok(
            super::runner()
                .args(["local", "list"])
                .env("STATE_DIR", self.state.path()),
            "the runner binary is built by cargo test",
        );
        parse_list(&out)
    }

    /// Live worker processes of this bed: (PID, scenario UUID).
    pub fn workers(&self) -> Vec<(u32, String)> {
        workers_of(&self.state_dir())
    }
}

impl Drop for LocalBed {
    fn drop(&mut self) {
        let bootstrap = self.bootstrap.clone();
        let topics: Vec<String> = self.topics().iter().map(|t| t.to_string()).collect();
        super::controller::cleanup(move || async move { delete_topics(&bootstrap, &topics).await });
    }
}

/// The live `runner worker` processes that carry `state_dir` in their
/// environment, as (PID, scenario UUID), found in /proc by the test itself:
/// the program is the runner built for these tests, its first argument is
/// `worker`, and it is not a zombie.
pub fn workers_of(state_dir: &Path) -> Vec<(u32, String)> {
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_runner")).expect("the runner binary");
    let wanted = state_dir.as_os_str().as_encoded_bytes();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let is_worker = std::fs::read_link(dir.join("exe")).is_ok_and(|p| p == exe)
            && std::fs::read(dir.join("cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"worker".as_slice()));
        let alive = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(") ")
                    .map(|(_, rest)| !rest.starts_with('Z'))
            })
            .unwrap_or(false);
        if !(is_worker && alive) {
            continue;
        }
        let Ok(environ) = std::fs::read(dir.join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        let carries_state_dir = vars
            .iter()
            .any(|v| v.splitn(2, |b| *b == b'=').nth(1) == Some(wanted));
        if carries_state_dir {
            let scenario = vars
                .iter()
                .find_map(|v| v.strip_prefix(b"SCENARIO_UUID=".as_slice()))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            found.push((pid, scenario));
        }
    }
    found
}

/// One line of `runner local list`.
#[derive(Debug, Clone, PartialEq)]
pub struct ListRow {
    pub phase: String,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub queue: Option<u32>,
    /// The worker's stream state (`-` without a running worker's heartbeat).
    pub state: String,
    pub fps: Option<f64>,
    /// Age of the camera's last frame, as kubectl shows ages.
    pub last_frame: String,
}

pub fn parse_list(text: &str) -> HashMap<String, ListRow> {
    let mut lines = text.lines();
    // Columns are apart by runs of spaces; a header may hold one space.
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        header,
        [
            "UUID",
            "PHASE",
            "PID",
            "WORKER",
            "RESTARTS",
            "STATE",
            "FPS",
            "LAST FRAME",
            "AGE",
            "QUEUE"
        ],
        "list header: {text}"
    );
    lines
        .map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(c.len(), 10, "list line: {l}");
            (
                c[0].to_string(),
                ListRow {
                    phase: c[1].to_string(),
                    pid: c[2].parse().ok(),
                    restarts: c[4].parse().expect("restarts"),
                    state: c[5].to_string(),
                    fps: c[6].parse().ok(),
                    last_frame: c[7].to_string(),
                    queue: c[9].parse().ok(),
                },
            )
        })
        .collect()
}

/// A running `runner local`; killed (by its own PID) when dropped, and its
/// workers with it.
pub struct LocalProcess {
    child: Option<Child>,
    pub log_path: PathBuf,
    pub stdout_path: PathBuf,
    state_dir: PathBuf,
}

impl LocalProcess {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running supervisor").id()
    }

    /// SIGKILL, as a crash or power loss would; its workers stay behind.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.pid().to_string();
        super::run_ok(
            std::process::Command::new("kill").args([signal, &pid]),
            "kill(1) is part of procps",
        );
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        let mut child = self.child.take().expect("running supervisor");
        super::wait_exit(&mut child, Duration::from_secs(60), "runner local", || {
            self.log_tail()
        })
    }

    /// Waits up to 30 s for the process to exit by itself.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running supervisor");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "runner local did not exit within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The address of its /metrics, /healthz and /readyz, from its log.
    pub fn metrics_addr(&self) -> Option<String> {
        let log = std::fs::read_to_string(&self.log_path).ok()?;
        let line = log.lines().find(|l| l.contains("serving /metrics"))?;
        let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
        Some(addr.to_string())
    }

    /// Everything it (and its workers) logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// Panics with the log tail if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("runner local exited with {status}\n{}", self.log_tail());
        }
    }
}

impl Drop for LocalProcess {
    fn drop(&mut self) {
        self.kill9();
        for (worker, _) in workers_of(&self.state_dir) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &worker.to_string()])
                .status();
        }
    }
}

/// Samples the bed's worker processes every 20 ms on a thread of its own.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Samples>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the samples showed.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    pub taken: usize,
    pub most_alive: usize,
    /// Scenario UUIDs in the order their first worker was seen.
    pub first_seen: Vec<String>,
    /// Every worker PID seen per scenario.
    pub pids: HashMap<String, HashSet<u32>>,
    /// Samples in which one scenario had two workers at once.
    pub doubles: Vec<String>,
    /// When each worker PID was first and last seen.
    pub lifetimes: HashMap<u32, (Instant, Instant)>,
}

impl Sampler {
    pub fn start(state_dir: PathBuf) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Samples::default()));
        let thread = std::thread::spawn({
            let (stop, samples) = (stop.clone(), samples.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let now = workers_of(&state_dir);
                    let mut s = samples.lock().unwrap();
                    s.taken += 1;
                    s.most_alive = s.most_alive.max(now.len());
                    let mut this: HashSet<&str> = HashSet::new();
                    for (pid, uuid) in &now {
                        if !this.insert(uuid) {
                            s.doubles.push(uuid.clone());
                        }
                        if !s.first_seen.contains(uuid) {
                            s.first_seen.push(uuid.clone());
                        }
                        s.pids.entry(uuid.clone()).or_default().insert(*pid);
                        let seen = Instant::now();
                        s.lifetimes.entry(*pid).or_insert((seen, seen)).1 = seen;
                    }
                    drop(s);
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        Sampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.samples.lock().unwrap().clone()
    }
}

/// A message's key and JSON value (`Null` when it is not JSON).
pub type Keyed = (Option<String>, Value);

/// Reads a topic from the beginning on a task of its own.
pub struct TopicLog {
    messages: Arc<Mutex<Vec<Keyed>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TopicLog {
    pub fn start(bootstrap: &str, topic: &str) -> TopicLog {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", unique_name("local-test-reader"))
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let messages = messages.clone();
            async move {
                let mut stream = consumer.stream();
                while let Some(Ok(msg)) = stream.next().await {
                    let key = msg.key().map(|k| String::from_utf8_lossy(k).into_owned());
                    let value = msg
                        .payload()
                        .and_then(|p| serde_json::from_slice(p).ok())
                        .unwrap_or(Value::Null);
                    messages.lock().unwrap().push((key, value));
                }
            }
        });
        TopicLog { messages, task }
    }

    pub fn all(&self) -> Vec<Keyed> {
        self.messages.lock().unwrap().clone()
    }

    /// The phases published for `scenario`, in order.
    pub fn phases(&self, scenario: &str) -> Vec<String> {
        self.all()
            .iter()
            .filter(|(_, v)| v["scenario_uuid"] == scenario)
            .map(|(_, v)| v["phase"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

impl Drop for TopicLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}
