//! Controller benchmark against the local test bed (`scripts/infra up`, then
//! `eval "$(scripts/infra env)"`), run with `cargo bench --bench controller`:
//!
//! (a) a steady 10 `to_deploy` per second for 60 s: p50/p99 from the moment a
//!     message is produced until the watch shows its worker Pod;
//! (b) a burst of 1000 with MAX_WORKERS=1000: time until all 1000 Pods exist;
//! (c) the controller's peak RSS (VmHWM) over both;
//! (d) 1000 Queued scenarios with MAX_WORKERS=1: the apiserver's request rate
//!     for Scenarios, Pods and Leases (watches excluded) over 30 s while the
//!     queue sits idle. The apiserver counts every client, so with other
//!     clients at work the figure is an upper bound for the controller's;
//! (e) 1000 Running scenarios (MAX_WORKERS=1001) whose workers the benchmark
//!     plays: Scenario status writes per second (counted on a watch of the
//!     namespace's Scenarios) over 60 s without heartbeats (the baseline,
//!     once every Scenario has been marked HeartbeatsMissing), then
//!     with a heartbeat per scenario every 10 s: while every Scenario gets its
//!     first `status.stream` (changes, capped at STREAM_STATUS_WRITES=20/s),
//!     and in the steady state after (refreshes every STREAM_STATUS_SECS=60 s:
//!     1000 / 60 ≈ 17/s expected).
//!
//! Targets: p99 ≤ 1 s, burst ≤ 60 s, RSS ≤ 40 MB steady (600 Scenarios) and
//! ≤ 64 MB in the burst, idle queue ≤ 1 request/s, stream health ≤ 20 status
//! writes/s.
//! `BENCH_RATE`, `BENCH_SECONDS`, `BENCH_BURST`, `BENCH_QUEUED` and
//! `BENCH_STREAMING` scale the runs down for a quick look; `BENCH_ONLY=e` runs
//! only (e).
//!
//! Over a secured listener: `BENCH_CONTROLLER_BOOTSTRAP` is the address the
//! controller connects to, and the controller gets the `KAFKA_SECURITY_*`,
//! `KAFKA_SASL_*`, `KAFKA_SSL_*` and `WORKER_KAFKA_*` variables of the
//! benchmark's environment; the benchmark's own clients stay on
//! `KAFKA_BOOTSTRAP_SERVERS` (for example the same broker's plaintext listener).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::mpsc;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Controller(Child);

impl Controller {
    fn peak_rss_kb(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_controller(bootstrap: &str, namespace: &str, max_workers: u64) -> Controller {
    let exe = std::env::var("RUNNER_BIN").unwrap_or_else(|_| {
        let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
        format!("{target}/release/runner")
    });
    let security = std::env::vars().filter(|(k, _)| {
        [
            "KAFKA_SECURITY_",
            "KAFKA_SASL_",
            "KAFKA_SSL_",
            "WORKER_KAFKA_",
        ]
        .iter()
        .any(|p| k.starts_with(p))
    });
    let bootstrap =
        std::env::var("BENCH_CONTROLLER_BOOTSTRAP").unwrap_or_else(|_| bootstrap.to_string());
    let child = Command::new(&exe)
        .arg("controller")
        .envs(security)
        .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        .env("WATCH_NAMESPACE", namespace)
        .env("CONSUMER_GROUP", format!("{namespace}-group"))
        .env("DEPLOY_TOPIC", format!("{namespace}.to_deploy"))
        .env("UNDEPLOY_TOPIC", format!("{namespace}.to_undeploy"))
        .env("DLQ_TOPIC", format!("{namespace}.dlq"))
        .env("EVENTS_TOPIC", format!("{namespace}.events"))
        .env("MAX_WORKERS", max_workers.to_string())
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("HEARTBEAT_TOPIC", format!("{namespace}.heartbeats"))
        .env("LOG_LEVEL", "WARNING")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {exe}: {e}; build it with `cargo build --release`")
        });
    Controller(child)
}

/// Installs this build's Scenario CRD (again: on a shared test bed another
/// checkout may have installed its own meanwhile).
async fn apply_crd(client: &Client) {
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(include_str!("../crds/scenario.yaml")).unwrap();
    Api::<CustomResourceDefinition>::all(client.clone())
        .patch(
            "scenarios.runner.vap.io",
            &PatchParams::apply("vap-runner-bench").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("apply CRD");
}

/// A namespace and topic set of one run.
struct Bed {
    namespace: String,
    topics: Vec<String>,
    admin: AdminClient<DefaultClientContext>,
}

impl Bed {
    async fn new(client: &Client, bootstrap: &str, label: &str) -> Bed {
        apply_crd(client).await;
        let namespace = format!(
            "bench-{label}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()
            .unwrap();
        let topics: Vec<String> = ["to_deploy", "to_undeploy", "dlq", "events", "heartbeats"]
            .iter()
            .map(|t| format!("{namespace}.{t}"))
            .collect();
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
            .collect();
        admin
            .create_topics(&new, &AdminOptions::new())
            .await
            .expect("create topics");
        Bed {
            namespace,
            topics,
            admin,
        }
    }

    async fn remove(self, client: &Client) {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(&self.namespace, &DeleteParams::default())
            .await;
        let names: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        let _ = self.admin.delete_topics(&names, &AdminOptions::new()).await;
    }
}

/// Non-watch requests the apiserver has served for Scenarios, Pods and Leases.
fn apiserver_requests() -> f64 {
    let out = Command::new("kubectl")
        .args(["get", "--raw", "/metrics"])
        .output()
        .expect("kubectl (on PATH after `eval \"$(scripts/infra env)\"`)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| {
            ["\"scenarios\"", "\"pods\"", "\"leases\""]
                .iter()
                .any(|r| l.contains(&format!("resource={r}")))
        })
        .filter(|l| !l.contains("verb=\"WATCH\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// (d): `count` scenarios queued behind MAX_WORKERS=1; the apiserver's
/// request rate over 30 s while nothing changes.
async fn idle_queue(client: &Client, bootstrap: &str, count: usize) -> f64 {
    // The earlier runs' namespaces are still being emptied (a thousand Pods
    // deleted by the garbage collector): those requests are not this run's.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(600);
    while namespaces
        .list(&Default::default())
        .await
        .map(|l| l.items.iter().any(|n| n.name_any().starts_with("bench-")))
        .unwrap_or(true)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let bed = Bed::new(client, bootstrap, "queued").await;
    let _controller = start_controller(bootstrap, &bed.namespace, 1);
    let producer = producer(bootstrap, "5");
    let ids = new_ids(count);
    let (sent, _) = mpsc::unbounded_channel();
    send_all(&producer, &bed.topics[0], &ids, 0, &sent).await;
    let scenarios: Api<vap_runner::controller::crd::Scenario> =
        Api::namespaced(client.clone(), &bed.namespace);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let list = scenarios.list(&Default::default()).await.expect("list");
        let queued = list
            .items
            .iter()
            .filter(|s| {
                s.status.as_ref().and_then(|st| st.phase)
                    == Some(vap_runner::controller::crd::Phase::Queued)
            })
            .count();
        if queued + 1 >= count {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {queued} of {count} scenarios queued within 300 s"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // Let the last status writes settle, then count.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let window = Duration::from_secs(30);
    let before = apiserver_requests();
    tokio::time::sleep(window).await;
    let after = apiserver_requests();
    bed.remove(client).await;
    (after - before) / window.as_secs_f64()
}

/// A producer for the benchmark's own messages.
fn producer(bootstrap: &str, linger_ms: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", linger_ms)
        .create()
        .unwrap()
}

/// `count` fresh scenario UUIDs.
fn new_ids(count: usize) -> Vec<String> {
    (0..count)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect()
}

/// Sends `ids` at `rate` per second (0 = as fast as possible), recording send times.
async fn send_all(
    producer: &FutureProducer,
    topic: &str,
    ids: &[String],
    rate: u64,
    sent: &mpsc::UnboundedSender<(String, Instant)>,
) {
    let started = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        if rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let body = serde_json::json!({
            "worker_id": "11223344-5566-7788-99aa-bbccddeeeff0",
            "scenario_uuid": id,
            "camera_url": "rtsp://camera.invalid/stream",
        })
        .to_string();
        let _ = sent.send((id.clone(), Instant::now()));
        producer
            .send(
                FutureRecord::to(topic).key(id).payload(&body),
                Duration::from_secs(30),
            )
            .await
            .expect("deliver");
    }
}

/// Runs one scenario set (plus one warm-up scenario, which also takes a slot);
/// returns per-scenario latency, the time to the last Pod and peak RSS.
async fn run(
    client: &Client,
    bootstrap: &str,
    label: &str,
    count: usize,
    rate: u64,
    max_workers: u64,
) -> (Vec<Duration>, Duration, u64) {
    let bed = Bed::new(client, bootstrap, label).await;
    let ns = bed.namespace.clone();
    let controller = start_controller(bootstrap, &ns, max_workers);
    let producer = producer(bootstrap, "0");
    let ids = new_ids(count);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let watch = tokio::spawn(async move {
        let mut stream = watcher(pods, watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Some(Ok(pod)) = stream.next().await {
            let _ = seen_tx.send((pod.name_any(), Instant::now()));
        }
    });
    // Start the clock only once the controller has joined its group and
    // turned a first request into a Pod.
    let warm_up = uuid::Uuid::new_v4().to_string();
    let (warm_tx, _) = mpsc::unbounded_channel();
    send_all(
        &producer,
        &format!("{ns}.to_deploy"),
        std::slice::from_ref(&warm_up),
        0,
        &warm_tx,
    )
    .await;
    let warm_pod = format!("worker-{warm_up}");
    loop {
        match tokio::time::timeout(Duration::from_secs(120), seen_rx.recv()).await {
            Ok(Some((name, _))) if name == warm_pod => break,
            Ok(Some(_)) => {}
            _ => panic!("the controller did not create a first Pod within 120 s"),
        }
    }
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    send_all(&producer, &format!("{ns}.to_deploy"), &ids, rate, &sent_tx).await;
    let mut sent: HashMap<String, Instant> = HashMap::new();
    while let Ok((id, at)) = sent_rx.try_recv() {
        sent.insert(format!("worker-{id}"), at);
    }
    let mut latencies = Vec::new();
    let mut last = started;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < count && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), seen_rx.recv()).await {
            Ok(Some((name, at))) => {
                if let Some(sent_at) = sent.get(&name)
                    && seen.insert(name.clone())
                {
                    latencies.push(at.saturating_duration_since(*sent_at));
                    last = last.max(at);
                }
            }
            _ => continue,
        }
    }
    assert_eq!(
        seen.len(),
        count,
        "only {} of {count} Pods appeared within 300 s",
        seen.len()
    );
    let rss = controller.peak_rss_kb();
    drop(controller);
    watch.abort();
    bed.remove(client).await;
    latencies.sort();
    (latencies, last - started, rss)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Scenario watch events (status writes, once all exist) per second over `window`.
async fn writes_per_second(
    changes: &std::sync::Arc<std::sync::atomic::AtomicU64>,
    window: Duration,
) -> (f64, u64) {
    use std::sync::atomic::Ordering;
    let started = changes.load(Ordering::Relaxed);
    let mut peak = 0;
    let mut last = started;
    let until = Instant::now() + window;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = changes.load(Ordering::Relaxed);
        peak = peak.max(now - last);
        last = now;
    }
    ((last - started) as f64 / window.as_secs_f64(), peak)
}

/// (e): `count` Running scenarios; status writes per second without
/// heartbeats, then with them (first folds, then steady).
async fn streaming(client: &Client, bootstrap: &str, count: usize) -> [(f64, u64); 3] {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let bed = Bed::new(client, bootstrap, "streaming").await;
    let ns = bed.namespace.clone();
    let _controller = start_controller(bootstrap, &ns, count as u64 + 1);
    let producer = producer(bootstrap, "20");
    let ids = new_ids(count);
    let (sent, _) = mpsc::unbounded_channel();
    send_all(&producer, &format!("{ns}.to_deploy"), &ids, 0, &sent).await;
    let scenarios: Api<vap_runner::controller::crd::Scenario> =
        Api::namespaced(client.clone(), &ns);
    // All Running, and (no worker beats yet) each marked HeartbeatsMissing
    // once: from then on nothing changes without heartbeats.
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let list = scenarios.list(&Default::default()).await.expect("list");
        let settled = list
            .items
            .iter()
            .filter(|s| {
                s.status.as_ref().is_some_and(|st| {
                    st.phase == Some(vap_runner::controller::crd::Phase::Running)
                        && st.condition("Streaming").is_some()
                })
            })
            .count();
        if settled >= count {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {settled} of {count} scenarios Running and marked silent within 900 s"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // Every change of a Scenario the watch sees from here on.
    let changes = Arc::new(AtomicU64::new(0));
    let watch = tokio::spawn({
        let changes = changes.clone();
        let scenarios = scenarios.clone();
        async move {
            let mut stream = watcher(scenarios, watcher::Config::default()).boxed();
            while let Some(Ok(event)) = stream.next().await {
                if let watcher::Event::Apply(_) = event {
                    changes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    let baseline = writes_per_second(&changes, Duration::from_secs(60)).await;
    // The benchmark plays the workers: one beat per scenario every 10 s,
    // spread over the interval.
    let beats = tokio::spawn({
        let topic = format!("{ns}.heartbeats");
        let ids = ids.clone();
        async move {
            let interval = Duration::from_secs(10);
            let mut seq = 0u64;
            loop {
                seq += 1;
                let round = Instant::now();
                for (i, id) in ids.iter().enumerate() {
                    let due = round + interval.mul_f64(i as f64 / ids.len() as f64);
                    tokio::time::sleep_until(due.into()).await;
                    let beat = serde_json::json!({
                        "scenario_uuid": id,
                        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                        "state": "streaming", "seq": seq, "interval_secs": 10,
                        "fps": 2.0, "camera_fps": 25.0, "frames": 20, "frame_number": seq * 20,
                        "last_frame_age_ms": 40, "frames_dropped": 0,
                        "decode_p95_ms": 5.0, "inference_p95_ms": 30.0
                    })
                    .to_string();
                    let _ = producer.send_result(FutureRecord::to(&topic).key(id).payload(&beat));
                }
                tokio::time::sleep_until((round + interval).into()).await;
            }
        }
    });
    let first = writes_per_second(&changes, Duration::from_secs(60)).await;
    let steady = writes_per_second(&changes, Duration::from_secs(120)).await;
    beats.abort();
    watch.abort();
    bed.remove(client).await;
    [baseline, first, steady]
}

#[tokio::main]
async fn main() {
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        .expect("KAFKA_BOOTSTRAP_SERVERS (run scripts/infra up; eval \"$(scripts/infra env)\")");
    let client = Client::try_default()
        .await
        .expect("KUBECONFIG for the test bed");

    if std::env::var("BENCH_ONLY").as_deref() != Ok("e") {
        others(&client, &bootstrap).await;
    }
    let count = env_or("BENCH_STREAMING", 1000) as usize;
    let [
        (base, base_peak),
        (first, first_peak),
        (steady, steady_peak),
    ] = streaming(&client, &bootstrap, count).await;
    println!(
        "(e) {count} Running scenarios, Scenario status writes/s (peak in one second): no heartbeats {base:.2} ({base_peak}); heartbeats every 10 s, first 60 s {first:.2} ({first_peak}); steady 120 s after {steady:.2} ({steady_peak})   (cap STREAM_STATUS_WRITES=20/s; steady {count}/60 s expected)"
    );
}

async fn others(client: &Client, bootstrap: &str) {
    let (client, bootstrap) = (client.clone(), bootstrap.to_string());
    let rate = env_or("BENCH_RATE", 10);
    let seconds = env_or("BENCH_SECONDS", 60);
    let burst = env_or("BENCH_BURST", 1000) as usize;

    let (lat, _, rss_a) = run(
        &client,
        &bootstrap,
        "steady",
        (rate * seconds) as usize,
        rate,
        1_000_000,
    )
    .await;
    println!(
        "(a) steady {rate}/s for {seconds} s: {} Pods, message→Pod p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms   (target p99 <= 1000 ms)",
        lat.len(),
        pct(&lat, 0.5).as_secs_f64() * 1000.0,
        pct(&lat, 0.99).as_secs_f64() * 1000.0,
        lat.last().unwrap().as_secs_f64() * 1000.0
    );
    let (_, total, rss_b) = run(&client, &bootstrap, "burst", burst, 0, burst as u64 + 1).await;
    println!(
        "(b) burst of {burst} with MAX_WORKERS={burst}: all Pods exist after {:.1} s   (target <= 60 s)",
        total.as_secs_f64()
    );
    println!(
        "(c) controller peak RSS: {:.1} MB steady, {:.1} MB burst   (targets <= 40 MB steady, <= 64 MB burst)",
        rss_a as f64 / 1024.0,
        rss_b as f64 / 1024.0
    );
    let queued = env_or("BENCH_QUEUED", 1000) as usize;
    let rate = idle_queue(&client, &bootstrap, queued).await;
    println!(
        "(d) {queued} scenarios queued behind MAX_WORKERS=1, idle for 30 s: {rate:.2} apiserver requests/s for Scenarios, Pods and Leases, all clients   (target <= 1/s)"
    );
}
