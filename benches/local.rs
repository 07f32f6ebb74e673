//! Local supervisor benchmark against the test bed's Kafka broker
//! (`scripts/infra up`, then `eval "$(scripts/infra env)"`); `scripts/bench-local`
//! runs it with `cargo bench --bench local`.
//!
//! (a) Supervisor overhead: `runner local` with MAX_WORKERS=16 supervising 16
//!     workers on paced sources (Debian's vtest.avi with REALTIME=true, read
//!     frame by frame at its own rate like a live camera): the supervisor's CPU
//!     (% of one core) over a window and its peak RSS, side by side with the
//!     same numbers for the worker processes.
//! (b) Deploy → worker started: 100 deploys one after another (15 workers keep
//!     running meanwhile), each from the moment its record is produced to the
//!     moment the supervisor has started its worker process (`started_at` in
//!     the state store); each is undeployed before the next.
//!
//! Targets: supervisor RSS ≤ 30 MB, p99 ≤ 200 ms. `BENCH_WORKERS`,
//! `BENCH_WINDOW_SECS` and `BENCH_DEPLOYS` scale the runs down for a quick look.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use vap_runner::local::process::find_workers;
use vap_runner::local::state::StateStore;
use vap_runner::scenario::Phase;

const MEDIA: &str = "/usr/share/doc/opencv-doc/examples/data";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What /proc says of a live process: CPU seconds (utime + stime), peak RSS
/// (VmHWM) and private memory now (RssAnon), in MB. Most of the RSS of a
/// `runner` process is the binary and OpenCV's shared libraries, which every
/// worker maps too; RssAnon is what the process adds on its own.
struct Usage {
    cpu: f64,
    peak_mb: f64,
    anon_mb: f64,
}

fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| -> Option<f64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some(Usage {
        cpu: ticks / clock_ticks(),
        peak_mb: kb("VmHWM:")? / 1024.0,
        anon_mb: kb("RssAnon:")? / 1024.0,
    })
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory effects.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

fn uuid(n: u64) -> String {
    format!("550e8400-e29b-41d4-a716-4466554{n:05}")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

struct Bench {
    producer: FutureProducer,
    deploy: String,
    undeploy: String,
    state_dir: PathBuf,
}

impl Bench {
    async fn send(&self, topic: &str, body: serde_json::Value, key: &str) {
        let payload = body.to_string();
        self.producer
            .send(
                FutureRecord::to(topic).key(key).payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .expect("deliver");
    }

    async fn deploy(&self, scenario: &str) {
        let body = serde_json::json!({
            "worker_id": "11223344-5566-7788-99aa-bbccddeeeff0",
            "scenario_uuid": scenario,
            "camera_url": format!("{MEDIA}/vtest.avi"),
        });
        self.send(&self.deploy, body, scenario).await;
    }

    async fn undeploy(&self, scenario: &str) {
        let body = serde_json::json!({ "scenario_uuid": scenario });
        self.send(&self.undeploy, body, scenario).await;
    }
}

async fn wait<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Supervisor(Child, PathBuf);

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        for w in find_workers(&self.1) {
            let _ = Command::new("kill")
                .args(["-KILL", &w.pid.to_string()])
                .status();
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let workers = env_or("BENCH_WORKERS", 16);
    let window = Duration::from_secs(env_or("BENCH_WINDOW_SECS", 30));
    let deploys = env_or("BENCH_DEPLOYS", 100);
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        .expect("KAFKA_BOOTSTRAP_SERVERS: start the test bed (scripts/infra up) and eval \"$(scripts/infra env)\"");
    let name = format!(
        "bench-local-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let topics: Vec<String> = ["to_deploy", "to_undeploy", "dlq", "events", "results"]
        .iter()
        .map(|t| format!("{name}.{t}"))
        .collect();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("admin");
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
        .collect();
    admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .expect("create topics");
    let state = tempfile::tempdir().expect("state dir");
    let state_dir = state.path().canonicalize().unwrap();
    let log = std::fs::File::create(state.path().join("supervisor.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_runner"))
        .arg("local")
        .env("KAFKA_BOOTSTRAP_SERVERS", &bootstrap)
        .env("CONSUMER_GROUP", format!("{name}-group"))
        .env("DEPLOY_TOPIC", &topics[0])
        .env("UNDEPLOY_TOPIC", &topics[1])
        .env("DLQ_TOPIC", &topics[2])
        .env("EVENTS_TOPIC", &topics[3])
        .env("RESULTS_TOPIC", &topics[4])
        .env("STATE_DIR", &state_dir)
        .env("MAX_WORKERS", workers.to_string())
        .env("VIDEO_FILE_ROOT", MEDIA)
        .env("REALTIME", "true")
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("LOG_LEVEL", "WARNING")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start runner local");
    let supervisor = Supervisor(child, state_dir.clone());
    let pid = supervisor.0.id();
    let bench = Bench {
        producer: ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("linger.ms", "0")
            .create()
            .expect("producer"),
        deploy: topics[0].clone(),
        undeploy: topics[1].clone(),
        state_dir,
    };

    // (a) overhead while supervising `workers` workers.
    for n in 0..workers {
        bench.deploy(&uuid(n)).await;
    }
    wait("every worker running", || {
        (find_workers(&bench.state_dir).len() as u64 == workers).then_some(())
    })
    .await;
    let pids: Vec<u32> = find_workers(&bench.state_dir)
        .iter()
        .map(|w| w.pid)
        .collect();
    let sup0 = usage(pid).expect("supervisor running");
    let cpu0: Vec<f64> = pids
        .iter()
        .map(|p| usage(*p).map_or(0.0, |u| u.cpu))
        .collect();
    tokio::time::sleep(window).await;
    let sup1 = usage(pid).expect("supervisor running");
    let mut worker_cpu = Vec::new();
    let mut worker_peak = Vec::new();
    let mut worker_anon = Vec::new();
    for (p, c0) in pids.iter().zip(&cpu0) {
        if let Some(u) = usage(*p) {
            worker_cpu.push((u.cpu - c0) / window.as_secs_f64() * 100.0);
            worker_peak.push(u.peak_mb);
            worker_anon.push(u.anon_mb);
        }
    }
    let sup_pct = (sup1.cpu - sup0.cpu) / window.as_secs_f64() * 100.0;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;

    // (b) deploy → worker started, one slot kept free for the probes.
    let reader = StateStore::open_read_only(&bench.state_dir).expect("state database");
    let record = |uuid: &str| reader.get(uuid).ok().flatten();
    bench.undeploy(&uuid(0)).await;
    wait("a free slot", || {
        (record(&uuid(0))?.phase == Some(Phase::Stopped)).then_some(())
    })
    .await;
    let mut latencies = Vec::new();
    for i in 0..deploys {
        let probe = uuid(50_000 + i);
        let sent = chrono::Utc::now();
        bench.deploy(&probe).await;
        let started = wait("the probe's worker started", || {
            let r = record(&probe)?;
            r.started_at.filter(|_| r.phase == Some(Phase::Running))
        })
        .await;
        latencies.push((started - sent).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        bench.undeploy(&probe).await;
        wait("the probe stopped", || {
            (record(&probe)?.phase == Some(Phase::Stopped)).then_some(())
        })
        .await;
    }
    latencies.sort_by(f64::total_cmp);
    let sup2 = usage(pid).expect("supervisor running");

    println!(
        "runner local, MAX_WORKERS={workers}: {workers} workers on vtest.avi paced in real time (REALTIME=true), CPU over {} s",
        window.as_secs()
    );
    println!(
        "{:<24} {:>11} {:>13} {:>17}",
        "", "CPU % core", "peak RSS MB", "private (anon) MB"
    );
    let row = |name: &str, cpu: f64, peak: f64, anon: f64| {
        println!("{name:<24} {cpu:>11.2} {peak:>13.1} {anon:>17.1}");
    };
    row(
        "supervisor",
        sup_pct,
        sup2.peak_mb,
        sup1.anon_mb.max(sup2.anon_mb),
    );
    row(
        "worker (mean)",
        mean(&worker_cpu),
        mean(&worker_peak),
        mean(&worker_anon),
    );
    row(
        "workers (sum)",
        worker_cpu.iter().sum(),
        worker_peak.iter().sum(),
        worker_anon.iter().sum(),
    );
    println!(
        "to_deploy record produced → worker process started, {} deploys one after another ({} workers running): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        latencies.len(),
        workers - 1,
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0.0)
    );
    println!(
        "targets: supervisor RSS <= 30 MB, p99 <= 200 ms (peak RSS counts the runner binary and OpenCV's shared libraries, mapped by every worker too)"
    );
    drop(supervisor);
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
}
