//! Shared helpers for tests against the real test bed (`scripts/infra up`).
//! A test that needs a server and finds none fails with a message naming the
//! missing part; nothing is skipped.
#![allow(dead_code)]

pub mod chaos;
pub mod controller;
pub mod fencing;
pub mod lagging_watch;
pub mod local;
pub mod oidc;
pub mod scenario;
pub mod secure_kafka;

use std::future::Future;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

pub const TESTBED_HINT: &str = "start the test bed with `scripts/infra up` and load its settings with `eval \"$(scripts/infra env)\"` (scripts/test does both)";

/// The bootstrap servers of the test bed's Kafka broker, checked to accept connections.
pub fn kafka_bootstrap() -> String {
    let servers = std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| {
        panic!("Kafka is missing: KAFKA_BOOTSTRAP_SERVERS is not set; {TESTBED_HINT}")
    });
    let first = servers.split(',').next().unwrap_or_default().to_string();
    let reachable = first
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .map(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(3)).is_ok())
        .unwrap_or(false);
    assert!(
        reachable,
        "Kafka is missing: nothing accepts connections at KAFKA_BOOTSTRAP_SERVERS={servers}; {TESTBED_HINT}"
    );
    servers
}

/// Creates single-partition topics `names` on the broker at `bootstrap`.
pub async fn create_topics(bootstrap: &str, names: &[&String]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin");
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
        .collect();
    admin
        .create_topics(&topics, &AdminOptions::new())
        .await
        .expect("create topics");
}

/// Deletes topics `names`, as well as it can (for clean-ups).
pub async fn delete_topics(bootstrap: &str, names: &[String]) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    if let Ok(admin) = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create::<AdminClient<rdkafka::client::DefaultClientContext>>()
    {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
    }
}

/// A client for the test bed's kube-apiserver, checked to answer.
pub async fn kube_client() -> kube::Client {
    let path = std::env::var("KUBECONFIG")
        .unwrap_or_else(|_| panic!("Kubernetes is missing: KUBECONFIG is not set; {TESTBED_HINT}"));
    let config = kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| {
            panic!("Kubernetes is missing: cannot load KUBECONFIG={path}: {e}; {TESTBED_HINT}")
        });
    let client = kube::Client::try_from(config).unwrap_or_else(|e| {
        panic!("Kubernetes is missing: cannot build a client from {path}: {e}")
    });
    if let Err(e) = client.apiserver_version().await {
        panic!(
            "Kubernetes is missing: the kube-apiserver in KUBECONFIG={path} does not answer: {e}; {TESTBED_HINT}"
        );
    }
    client
}

/// A name no other test run uses: `prefix-<8 hex chars>`.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..8])
}

/// A test bed's own topic names under `prefix`: to_deploy, to_undeploy, the
/// dead-letter topic, scenario_events, results and scenario_heartbeats.
pub fn bed_topics(prefix: &str) -> [String; 6] {
    [
        "to_deploy",
        "to_undeploy",
        "to_deploy.dlq",
        "scenario_events",
        "results",
        "scenario_heartbeats",
    ]
    .map(|topic| format!("{prefix}.{topic}"))
}

/// An idempotent producer for what a test sends to the broker at `bootstrap`.
pub fn test_producer(bootstrap: &str) -> rdkafka::producer::FutureProducer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer")
}

/// Polls `check` until it yields `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// `runner worker` for `scenario` on `camera`; callers add the rest.
pub fn worker(scenario: &str, camera: &str) -> std::process::Command {
    let mut cmd = runner();
    cmd.args([
        "worker",
        "--scenario-uuid",
        scenario,
        "--camera-url",
        camera,
    ]);
    cmd
}

/// `runner worker` for `scenario` on the sample clip `clip`, paced at its own
/// frame rate, results on stdout (discarded), `/metrics` on a free port;
/// `env` adds settings. Returns the process and its HTTP address.
pub fn spawn_clip_worker(
    scenario: &str,
    clip: &str,
    env: &[(&str, &str)],
) -> (std::process::Child, String) {
    let [port] = free_ports::<1>();
    let addr = format!("127.0.0.1:{port}");
    let child = worker(scenario, &media(clip))
        .env("METRICS_ADDR", &addr)
        .env("VIDEO_FILE_ROOT", MEDIA_DIR)
        .env("SINK", "stdout")
        .env("REALTIME", "true")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the worker");
    (child, addr)
}

/// Waits until the server at `addr` answers `/metrics` with a page that
/// `ready` accepts; returns that page.
pub async fn wait_metrics(addr: &str, what: &str, ready: impl Fn(&str) -> bool) -> String {
    wait_for(what, Duration::from_secs(60), || async {
        tokio::net::TcpStream::connect(addr).await.ok()?;
        let (_, text) = http_get(addr, "/metrics").await;
        ready(&text).then_some(text)
    })
    .await
}

/// Sends SIGTERM to `child` and waits for it to exit.
pub fn terminate(mut child: std::process::Child, what: &str) -> std::process::ExitStatus {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    wait_exit(&mut child, Duration::from_secs(30), what, String::new)
}

/// Runs a command to completion and returns its standard output. Panics
/// with `missing` when it cannot be started, and with its standard error
/// when it fails.
pub fn run_ok(cmd: &mut std::process::Command, missing: &str) -> String {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}); {missing}"));
    let args: Vec<_> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every object `helm template` renders of the chart (release `vap`) with a
/// bootstrap server and the further `args`, as JSON.
pub fn chart_objects(args: &[&str]) -> Vec<serde_json::Value> {
    let chart = format!("{}/charts/vap-runner", env!("CARGO_MANIFEST_DIR"));
    let mut helm = std::process::Command::new("helm");
    helm.args(["template", "vap", chart.as_str()]);
    helm.args(["--set", "kafka.bootstrapServers=kafka.example:9092"]);
    helm.args(args);
    let text = run_ok(
        &mut helm,
        &format!("helm is built by the test bed: {TESTBED_HINT}"),
    );
    text.split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<serde_json::Value>(doc).ok())
        .filter(|doc| doc.is_object())
        .collect()
}

/// Debian's OpenCV sample videos (package opencv-doc, installed by scripts/deps).
pub const MEDIA_DIR: &str = "/usr/share/doc/opencv-doc/examples/data";

/// The path of a sample video, checked to exist.
pub fn media(name: &str) -> String {
    let path = format!("{MEDIA_DIR}/{name}");
    assert!(
        std::path::Path::new(&path).exists(),
        "test video {path} is missing; install Debian's opencv-doc (scripts/deps does)"
    );
    path
}

/// The `runner` binary built for these tests, with an empty environment but
/// `PATH`: a test passes every setting the process gets, so nothing leaks in
/// from the caller's shell and a setting the product forgets to pass on (to a
/// Pod, to a child worker) is missing for real.
pub fn runner() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_runner"));
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.env("METRICS_ADDR", "127.0.0.1:0");
    cmd
}

/// The test bed's admin kubeconfig, as `KUBECONFIG=…` for a process that
/// talks to the kube-apiserver.
pub fn kubeconfig_env() -> (&'static str, String) {
    let path = std::env::var("KUBECONFIG")
        .unwrap_or_else(|_| panic!("Kubernetes is missing: KUBECONFIG is not set; {TESTBED_HINT}"));
    ("KUBECONFIG", path)
}

/// Checks one `results` message against the contract in the design document:
/// field names and types, frame number, timestamp form, and detections inside
/// a `width` × `height` frame with confidence in 0.0–1.0.
pub fn assert_result_schema(
    v: &serde_json::Value,
    scenario: &str,
    frame_number: u64,
    width: i64,
    height: i64,
) {
    let obj = v.as_object().expect("object");
    assert_eq!(obj["scenario_uuid"], scenario);
    assert_eq!(
        obj["frame_number"].as_u64(),
        Some(frame_number),
        "frame numbers go 1, 2, 3… in order: {v}"
    );
    let ts = obj["timestamp"].as_str().expect("timestamp string");
    assert!(ts.ends_with('Z') && ts.len() == 24, "timestamp {ts}");
    chrono::DateTime::parse_from_rfc3339(ts).expect("RFC 3339 timestamp");
    for d in obj["detections"].as_array().expect("detections array") {
        assert!(d["class"].as_str().is_some_and(|c| !c.is_empty()), "{d}");
        let c = d["confidence"].as_f64().expect("confidence");
        assert!((0.0..=1.0).contains(&c), "{d}");
        let b: Vec<i64> = d["bbox"]
            .as_array()
            .expect("bbox")
            .iter()
            .map(|n| n.as_i64().expect("integer bbox"))
            .collect();
        assert_eq!(b.len(), 4);
        assert!(0 <= b[0] && b[0] <= b[2] && b[2] <= width, "{d}");
        assert!(0 <= b[1] && b[1] <= b[3] && b[3] <= height, "{d}");
    }
}

/// How many messages `topic` (partition 0) holds on the broker at
/// `bootstrap`; `None` while the topic does not exist (yet).
pub fn messages_in(bootstrap: &str, topic: &str) -> Option<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("Kafka client");
    consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .ok()
        .map(|(low, high)| high - low)
}

/// The messages of `topic` (partition 0, from its start), checked to be
/// exactly `count` and each keyed by `scenario`; their JSON values in order.
pub async fn read_results(
    bootstrap: &str,
    topic: &str,
    scenario: &str,
    count: i64,
) -> Vec<serde_json::Value> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Message;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("results-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("Kafka consumer");
    assert_eq!(
        messages_in(bootstrap, topic),
        Some(count),
        "messages in {topic}"
    );
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut values = Vec::new();
    for _ in 0..count {
        let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("message within 30 s")
            .expect("message");
        assert_eq!(msg.key(), Some(scenario.as_bytes()));
        values.push(serde_json::from_slice(msg.payload().expect("payload")).expect("JSON"));
    }
    values
}

/// The body of a `to_deploy` message for `scenario` on `camera`.
pub fn deploy_body(scenario: &str, camera: &str) -> Vec<u8> {
    deploy_body_as(scenario, "11223344-5566-7788-99aa-bbccddeeeff0", camera)
}

/// The body of a `to_deploy` message for `scenario` on `camera` from the
/// worker slot `worker_id`.
pub fn deploy_body_as(scenario: &str, worker_id: &str, camera: &str) -> Vec<u8> {
    serde_json::json!({
        "worker_id": worker_id,
        "scenario_uuid": scenario,
        "camera_url": camera,
    })
    .to_string()
    .into_bytes()
}

/// The body of a `to_undeploy` message for `scenario`.
pub fn undeploy_body(scenario: &str) -> Vec<u8> {
    serde_json::json!({ "scenario_uuid": scenario })
        .to_string()
        .into_bytes()
}

/// Sends one record and waits until the broker has it; `at_ms` sets the
/// record's timestamp (ms since the epoch), as a producer with its own clock
/// or a replay would.
pub async fn send_record(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    key: Option<&str>,
    payload: &[u8],
    at_ms: Option<i64>,
) {
    let mut record: rdkafka::producer::FutureRecord<'_, str, [u8]> =
        rdkafka::producer::FutureRecord::to(topic).payload(payload);
    if let Some(key) = key {
        record = record.key(key);
    }
    if let Some(at_ms) = at_ms {
        record = record.timestamp(at_ms);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .expect("deliver a test message");
}

/// Where the kubelet mounts a Pod's ServiceAccount token.
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Every way `pod`, as the kube-apiserver admitted it, carries a
/// ServiceAccount token, in words: a projected `serviceAccountToken`
/// volume (the ServiceAccount admission plugin's `kube-api-access-*`),
/// or a container mount at the token path. Empty when it has none.
pub fn service_account_tokens(pod: &k8s_openapi::api::core::v1::Pod) -> Vec<String> {
    let mut found = Vec::new();
    let Some(spec) = pod.spec.as_ref() else {
        return found;
    };
    for volume in spec.volumes.iter().flatten() {
        let projects_token = volume
            .projected
            .as_ref()
            .and_then(|p| p.sources.as_ref())
            .is_some_and(|s| s.iter().any(|s| s.service_account_token.is_some()));
        if projects_token || volume.name.starts_with("kube-api-access-") {
            found.push(format!("volume {} projects a token", volume.name));
        }
    }
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    for container in containers {
        for mount in container.volume_mounts.iter().flatten() {
            if mount.mount_path.starts_with(TOKEN_MOUNT_PATH) {
                found.push(format!(
                    "container {} mounts {} at {}",
                    container.name, mount.name, mount.mount_path
                ));
            }
        }
    }
    found
}

/// A namespace of the test's own, labelled as the tests' and deleted when
/// dropped, so a failing test leaves it behind no more than a passing one.
pub struct TempNamespace {
    pub name: String,
}

impl TempNamespace {
    pub async fn create(client: &kube::Client, prefix: &str) -> TempNamespace {
        use k8s_openapi::api::core::v1::Namespace;
        let name = unique_name(prefix);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "vap-runner-tests"}}
        }))
        .unwrap();
        kube::Api::<Namespace>::all(client.clone())
            .create(&kube::api::PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        TempNamespace { name }
    }
}

impl Drop for TempNamespace {
    fn drop(&mut self) {
        let name = self.name.clone();
        controller::cleanup(move || async move {
            if let Ok(client) = kube::Client::try_default().await {
                let _ = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
                    .delete(&name, &kube::api::DeleteParams::default())
                    .await;
            }
        });
    }
}

/// Kafka topics and consumer groups a test made, deleted when dropped (also
/// when the test fails). Drop it after the consumers of its groups.
pub struct TempTopics {
    pub bootstrap: String,
    pub topics: Vec<String>,
    pub groups: Vec<String>,
}

impl Drop for TempTopics {
    fn drop(&mut self) {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        let bootstrap = self.bootstrap.clone();
        let topics = std::mem::take(&mut self.topics);
        let groups = std::mem::take(&mut self.groups);
        controller::cleanup(move || async move {
            let Ok(admin) = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .create::<AdminClient<DefaultClientContext>>()
            else {
                return;
            };
            let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
            let names: Vec<&str> = groups.iter().map(String::as_str).collect();
            if !names.is_empty() {
                let _ = admin.delete_groups(&names, &options).await;
            }
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            if !names.is_empty() {
                let _ = admin.delete_topics(&names, &options).await;
            }
        });
    }
}

/// A plain HTTP/1.1 GET to `addr` (`host:port`); returns the status code and
/// the body. Fails after 10 s without an answer.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let (status, body) = http_get_bytes(addr, path).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// [`http_get`] for a binary body (an image).
pub async fn http_get_bytes(addr: &str, path: &str) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("GET http://{addr}{path}: no answer within 10 s"))
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"));
    let not_http = || {
        format!(
            "GET http://{addr}{path}: not an HTTP response: {}",
            String::from_utf8_lossy(&response)
        )
    };
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("{}", not_http()));
    let status = std::str::from_utf8(&response[..head_end])
        .ok()
        .and_then(|head| head.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("{}", not_http()));
    (status, response[head_end + 4..].to_vec())
}

/// The value of one series in Prometheus text format, `None` when absent.
/// `series` is the name with its labels, as exposed:
/// `vap_worker_frames_dropped_total{reason="sampling"}`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The value of one series in Prometheus text format; fails when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    metric_value(text, series)
        .unwrap_or_else(|| panic!("{series} is missing from /metrics:\n{text}"))
}

/// The counts of a worker's last log line, `worker stopped … processed=N
/// read=N corrupt=N published=N publish_failures=N` (text log format).
/// Fails when the line or the field is missing.
pub fn worker_stopped_count(log: &str, field: &str) -> u64 {
    let line = log
        .lines()
        .rfind(|l| l.contains("worker stopped"))
        .unwrap_or_else(|| panic!("no `worker stopped` line in the worker's log:\n{log}"));
    let prefix = format!("{field}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field}=<count> in `{line}`"))
}

/// `N` TCP ports on 127.0.0.1 for servers a test starts, and may stop and
/// start again on the same port. They come from below the kernel's ephemeral
/// range (`net.ipv4.ip_local_port_range`), where no outgoing connection and
/// no `bind(…:0)` on this machine is ever given a port, and each is handed
/// out once per test process, from a random start so that test processes
/// running side by side rarely meet; each is checked to be free.
pub fn free_ports<const N: usize>() -> [u16; N] {
    use std::sync::atomic::{AtomicU32, Ordering};
    const SPAN: u32 = 8000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let base = ephemeral_low.checked_sub(SPAN).unwrap_or_else(|| {
        panic!(
            "the ephemeral port range starts at {ephemeral_low}; tests need {SPAN} ports below it"
        )
    });
    let _ = NEXT.compare_exchange(
        0,
        1 + rand::random::<u32>() % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    std::array::from_fn(|_| {
        for _ in 0..SPAN {
            let port = (base + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
        panic!("no free port on 127.0.0.1 between {base} and {ephemeral_low}")
    })
}

/// Waits up to `within` for `child` (just sent SIGTERM) to exit and returns
/// its status; past that, kills it and fails naming `what` and its log tail.
pub fn wait_exit(
    child: &mut std::process::Child,
    within: Duration,
    what: &str,
    log_tail: impl FnOnce() -> String,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "{what} did not stop within {within:?} of SIGTERM\n{}",
                log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
