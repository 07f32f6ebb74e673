//! Running `runner controller` against the test bed: one namespace, topic set
//! and consumer group per test, removed again when the test ends.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rdkafka::ClientConfig;
use rdkafka::producer::FutureProducer;
use vap_runner::controller::crd::Scenario;

use super::scenario::{phase, scenario_name};
use super::{create_topics, delete_topics, kafka_bootstrap, kube_client, unique_name, wait_for};

/// Installs (or refreshes) the Scenario CRD from `crds/` and waits until it is served.
pub async fn ensure_crd(client: &Client) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds/scenario.yaml");
    let text = std::fs::read_to_string(&path).expect("crds/scenario.yaml");
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("CRD YAML");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "scenarios.runner.vap.io",
        &PatchParams::apply("vap-runner-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("apply CRD");
    wait_for(
        "the Scenario CRD to be established",
        Duration::from_secs(30),
        || {
            let crds = crds.clone();
            async move {
                let crd = crds.get("scenarios.runner.vap.io").await.ok()?;
                let established = crd
                    .status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                established.then_some(())
            }
        },
    )
    .await;
    let probe: Api<Scenario> = Api::namespaced(client.clone(), "default");
    wait_for(
        "the Scenario API to answer",
        Duration::from_secs(30),
        || {
            let probe = probe.clone();
            async move {
                probe
                    .list(&ListParams::default().limit(1))
                    .await
                    .ok()
                    .map(|_| ())
            }
        },
    )
    .await;
}

/// Everything one controller test owns.
pub struct Bed {
    pub client: Client,
    pub namespace: String,
    pub bootstrap: String,
    pub deploy: String,
    pub undeploy: String,
    pub dlq: String,
    pub events: String,
    pub results: String,
    pub heartbeats: String,
    pub group: String,
    pub logs: tempfile::TempDir,
    producer: FutureProducer,
    /// The uids of the Pods whose status the test wrote (after kwok had
    /// finished with them).
    written: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl Bed {
    pub async fn new(prefix: &str) -> Bed {
        Bed::on(kafka_bootstrap(), prefix).await
    }

    /// A bed on the broker at `bootstrap` (a listener the test's own
    /// clients may use without logging in).
    pub async fn on(bootstrap: String, prefix: &str) -> Bed {
        let client = kube_client().await;
        ensure_crd(&client).await;
        let namespace = unique_name(prefix);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": namespace, "labels": {"app.kubernetes.io/part-of": "vap-runner-tests"}}
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        // kube-controller-manager gives every new namespace its `default`
        // ServiceAccount; a Pod created before it exists is refused.
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
        wait_for(
            &format!("the default ServiceAccount of {namespace}"),
            Duration::from_secs(60),
            || async { accounts.get_opt("default").await.ok()?.map(|_| ()) },
        )
        .await;
        let [deploy, undeploy, dlq, events, results, heartbeats] = super::bed_topics(&namespace);
        let bed = Bed {
            deploy,
            undeploy,
            dlq,
            events,
            results,
            heartbeats,
            group: format!("{namespace}-group"),
            producer: super::test_producer(&bootstrap),
            logs: tempfile::tempdir().expect("log dir"),
            written: Default::default(),
            client,
            namespace,
            bootstrap,
        };
        create_topics(
            &bed.bootstrap,
            &[
                &bed.deploy,
                &bed.undeploy,
                &bed.dlq,
                &bed.events,
                &bed.results,
                &bed.heartbeats,
            ],
        )
        .await;
        bed
    }

    pub fn scenarios(&self) -> Api<Scenario> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Starts a controller for this bed; `extra` env overrides the defaults.
    pub fn start_controller(&self, extra: &[(&str, &str)]) -> ControllerProcess {
        self.start_controller_under(&[], extra)
    }

    /// [`Bed::start_controller`], the runner started by the command `under`
    /// (which ends by running the arguments it is given, with its
    /// environment, as the same process).
    pub fn start_controller_under(
        &self,
        under: &[&str],
        extra: &[(&str, &str)],
    ) -> ControllerProcess {
        let log_path = self
            .logs
            .path()
            .join(format!("controller-{}.log", unique_name("run")));
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut env: BTreeMap<&str, String> = BTreeMap::new();
        env.insert("KAFKA_BOOTSTRAP_SERVERS", self.bootstrap.clone());
        let (kubeconfig, path) = super::kubeconfig_env();
        env.insert(kubeconfig, path);
        env.insert("WATCH_NAMESPACE", self.namespace.clone());
        env.insert("CONSUMER_GROUP", self.group.clone());
        env.insert("DEPLOY_TOPIC", self.deploy.clone());
        env.insert("UNDEPLOY_TOPIC", self.undeploy.clone());
        env.insert("DLQ_TOPIC", self.dlq.clone());
        env.insert("EVENTS_TOPIC", self.events.clone());
        env.insert("RESULTS_TOPIC", self.results.clone());
        env.insert("HEARTBEAT_TOPIC", self.heartbeats.clone());
        env.insert("VIDEO_FILE_ROOT", super::MEDIA_DIR.to_string());
        env.insert("WORKER_IMAGE", "vap-runner:test".to_string());
        env.insert("LOG_LEVEL", "debug".to_string());
        env.insert(
            "RUST_LOG",
            "kube=info,tower=info,hyper=info,rdkafka=info".to_string(),
        );
        for (k, v) in extra {
            env.insert(k, v.to_string());
        }
        let mut cmd = super::runner();
        if let Some((program, args)) = under.split_first() {
            let runner = cmd;
            cmd = std::process::Command::new(program);
            cmd.args(args).arg(runner.get_program()).env_clear();
            for (k, v) in runner.get_envs() {
                if let Some(v) = v {
                    cmd.env(k, v);
                }
            }
        }
        cmd.arg("controller")
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        ControllerProcess {
            child: Some(cmd.spawn().expect("start controller")),
            log_path,
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

    /// A `to_deploy` for `scenario` from the worker slot `worker_id`.
    pub async fn deploy_as(&self, scenario: &str, worker_id: &str, camera: &str) {
        let body = super::deploy_body_as(scenario, worker_id, camera);
        self.send(&self.deploy, Some(scenario), &body).await;
    }

    /// Sends a message whose record carries the timestamp `at_ms` (ms since
    /// the epoch), as a producer with its own clock or a replay would.
    pub async fn send_at(&self, topic: &str, key: &str, payload: &[u8], at_ms: i64) {
        super::send_record(&self.producer, topic, Some(key), payload, Some(at_ms)).await;
    }

    /// A `to_deploy` whose record carries the timestamp `at_ms`.
    pub async fn deploy_at(&self, scenario: &str, camera: &str, at_ms: i64) {
        let body = super::deploy_body(scenario, camera);
        self.send_at(&self.deploy, scenario, &body, at_ms).await;
    }

    /// A `to_undeploy` whose record carries the timestamp `at_ms`.
    pub async fn undeploy_at(&self, scenario: &str, at_ms: i64) {
        let body = super::undeploy_body(scenario);
        self.send_at(&self.undeploy, scenario, &body, at_ms).await;
    }

    /// The offset this bed's consumer group has committed on `topic` (0 if none).
    pub fn committed(&self, topic: &str) -> i64 {
        self.committed_offset(topic).unwrap_or(0)
    }

    /// The offset this bed's consumer group has committed on `topic`, if any.
    pub fn committed_offset(&self, topic: &str) -> Option<i64> {
        self.committed_offset_by(&self.group, topic)
    }

    /// The offset consumer group `group` has committed on `topic`, if any.
    /// Blocks a worker thread of the test's (multi-thread) runtime.
    pub fn committed_offset_by(&self, group: &str, topic: &str) -> Option<i64> {
        let consumer: rdkafka::consumer::StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", group)
            .create()
            .expect("consumer");
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition(topic, 0);
        // A blocking call: the runtime's other worker runs the test's watches meanwhile.
        let list = tokio::task::block_in_place(|| {
            rdkafka::consumer::Consumer::committed_offsets(&consumer, tpl, Duration::from_secs(10))
        })
        .ok()?;
        match list.find_partition(topic, 0)?.offset() {
            rdkafka::Offset::Offset(n) => Some(n),
            _ => None,
        }
    }

    /// Waits until `n` offsets are committed on `topic`: ingest has handled them.
    pub async fn wait_committed(&self, topic: &str, n: i64, timeout: Duration) {
        wait_for(
            &format!("{n} offsets committed on {topic}"),
            timeout,
            || async move { (self.committed(topic) >= n).then_some(()) },
        )
        .await;
    }
}

/// Runs a clean-up from a `Drop` on a thread and runtime of its own: the
/// test's runtime is blocked in the `Drop`, so nothing bound to it (such as
/// the test's kube client) can make progress; `work` makes its own clients.
pub fn cleanup<F, Fut>(work: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(work());
    })
    .join();
}

impl Bed {
    /// The command of a worker Pod this bed's controller wrote, with its
    /// environment resolved as the kubelet would (`secretKeyRef`s read as
    /// the admin), ready to run as a local process.
    pub async fn pod_command(&self, pod: &Pod) -> std::process::Command {
        let spec = pod.spec.as_ref().expect("Pod spec");
        let container = &spec.containers[0];
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let mounts = self.materialize_volumes(pod).await;
        let mut cmd = super::runner();
        cmd.args(container.args.clone().unwrap_or_default());
        for mut e in container.env.clone().unwrap_or_default() {
            // A path into a mounted volume points at its copy here.
            if let Some(v) = e.value.as_mut()
                && let Some((from, to)) =
                    mounts.iter().find(|(from, _)| v.starts_with(from.as_str()))
            {
                *v = format!("{}{}", to.display(), &v[from.len()..]);
            }
            let value = match (e.value, e.value_from.and_then(|f| f.secret_key_ref)) {
                (Some(v), _) => v,
                (None, Some(key_ref)) => {
                    let secret = secrets.get(&key_ref.name).await.unwrap_or_else(|err| {
                        panic!("the Secret {} the Pod refers to: {err}", key_ref.name)
                    });
                    let data = secret.data.unwrap_or_default();
                    String::from_utf8_lossy(&data[&key_ref.key].0).into_owned()
                }
                (None, None) => String::new(),
            };
            cmd.env(e.name, value);
        }
        // The Pod's port is only free inside its own network namespace.
        cmd.env("METRICS_ADDR", "127.0.0.1:0");
        cmd
    }

    /// Writes the Secret and ConfigMap volumes the Pod's container mounts
    /// into a directory of the bed, as the kubelet would (only the items
    /// listed); returns each mount path with the directory standing for it.
    async fn materialize_volumes(&self, pod: &Pod) -> Vec<(String, PathBuf)> {
        use k8s_openapi::api::core::v1::ConfigMap;
        let spec = pod.spec.as_ref().expect("Pod spec");
        let volumes = spec.volumes.clone().unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut out = Vec::new();
        for mount in spec.containers[0].volume_mounts.clone().unwrap_or_default() {
            let Some(volume) = volumes.iter().find(|v| v.name == mount.name) else {
                continue;
            };
            let (data, items): (BTreeMap<String, Vec<u8>>, _) =
                match (&volume.secret, &volume.config_map) {
                    (Some(s), _) => {
                        let name = s.secret_name.clone().unwrap_or_default();
                        let secret = secrets
                            .get(&name)
                            .await
                            .unwrap_or_else(|e| panic!("the Secret {name} the Pod mounts: {e}"));
                        let data = secret.data.unwrap_or_default();
                        (
                            data.into_iter().map(|(k, v)| (k, v.0)).collect(),
                            s.items.clone(),
                        )
                    }
                    (None, Some(c)) => {
                        let map = maps.get(&c.name).await.unwrap_or_else(|e| {
                            panic!("the ConfigMap {} the Pod mounts: {e}", c.name)
                        });
                        let data = map.data.unwrap_or_default();
                        (
                            data.into_iter().map(|(k, v)| (k, v.into_bytes())).collect(),
                            c.items.clone(),
                        )
                    }
                    _ => continue,
                };
            let dir = self
                .logs
                .path()
                .join("volumes")
                .join(pod.metadata.name.as_deref().unwrap_or("pod"))
                .join(&mount.name);
            std::fs::create_dir_all(&dir).expect("volume dir");
            let items: Vec<(String, String)> = match items {
                Some(items) => items.into_iter().map(|i| (i.key, i.path)).collect(),
                None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
            };
            for (key, path) in items {
                let bytes = data
                    .get(&key)
                    .unwrap_or_else(|| panic!("key {key} of volume {}", mount.name));
                std::fs::write(dir.join(path), bytes).expect("write volume file");
            }
            out.push((mount.mount_path.clone(), dir));
        }
        out
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let namespace = self.namespace.clone();
        let bootstrap = self.bootstrap.clone();
        let topics = [
            self.deploy.clone(),
            self.undeploy.clone(),
            self.dlq.clone(),
            self.events.clone(),
            self.results.clone(),
            self.heartbeats.clone(),
        ];
        cleanup(move || async move {
            if let Ok(client) = Client::try_default().await {
                let _ = Api::<Namespace>::all(client)
                    .delete(&namespace, &DeleteParams::default())
                    .await;
            }
            delete_topics(&bootstrap, &topics).await;
        });
    }
}

/// A running controller; killed (by its own PID) when dropped.
pub struct ControllerProcess {
    child: Option<Child>,
    pub log_path: PathBuf,
}

impl ControllerProcess {
    /// The process id (to pause it with SIGSTOP, for example).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `signal` (for example `STOP`, `CONT`) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("running controller").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// The exit status once the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok()?
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running controller");
        let pid = child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        super::wait_exit(&mut child, Duration::from_secs(30), "controller", || {
            self.log_tail()
        })
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Panics with the log tail if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("controller exited with {status}\n{}", self.log_tail());
        }
    }
}

impl Drop for ControllerProcess {
    /// Stops the controller; when a test fails, shows its log's tail beside
    /// the failure (the test harness prints what a failed test wrote).
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of the controller's log {} ---\n{}",
                self.log_path.display(),
                self.log_tail()
            );
        }
        self.kill9();
    }
}

// ---------------------------------------------------------------------------
// What a user checks on a running controller: its /metrics, the consumer
// group's offsets, the dead-letter topic, and the identity it runs as.
// ---------------------------------------------------------------------------

/// The value of one sample (`name{labels}` exactly as exposed) in Prometheus
/// text; fails when the series is absent, so that a renamed or dropped
/// metric fails the check instead of reading as 0.
pub fn sample(text: &str, series: &str) -> f64 {
    super::metric(text, series)
}

/// The labelled counter families whose series appear only once a label set
/// has counted (docs/operations.md, "Metrics": ingested messages by kind and outcome,
/// dead-lettered messages by reason); for these alone a series not exposed
/// yet reads as 0 ([`sample_or_zero`]).
pub const COUNTED_BY_LABEL: [&str; 2] = [
    "vap_controller_ingested_total",
    "vap_controller_dead_lettered_total",
];

/// The metric family of a series: its name without labels.
fn family(series: &str) -> &str {
    series.split('{').next().unwrap_or(series)
}

/// Fails unless the controller declares `family` (its `# TYPE` line, which
/// an unlabelled family shows from the start). A labelled family shows no
/// line at all before one of its label sets counts; of those only the
/// families in [`COUNTED_BY_LABEL`] may be absent, and tests that count in
/// them read their series strictly.
fn assert_declared(text: &str, family: &str) {
    if COUNTED_BY_LABEL.contains(&family) {
        return;
    }
    let declared = text.lines().any(|line| {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            return false;
        };
        let name = rest.split_whitespace().next().unwrap_or_default();
        name == family || family.strip_suffix("_total") == Some(name)
    });
    assert!(declared, "/metrics declares no family {family}:\n{text}");
}

/// The value of `series` of a family in [`COUNTED_BY_LABEL`], 0 when that
/// label set has not counted yet; fails for any other family. (A renamed
/// family of those fails the tests that count in it and read it with
/// [`sample`], such as the dead-letter test.)
pub fn sample_or_zero(text: &str, series: &str) -> f64 {
    let family = family(series);
    assert!(
        COUNTED_BY_LABEL.contains(&family),
        "{series}: only the families the README counts by label read as 0 when absent"
    );
    assert_declared(text, family);
    super::metric_value(text, series).unwrap_or(0.0)
}

/// Fails unless none of the series of `family` is exposed: nothing was
/// counted in it. `family` must be declared on /metrics unless it is one of
/// [`COUNTED_BY_LABEL`] (see [`assert_declared`]).
pub fn assert_nothing_counted(text: &str, family: &str) {
    assert_declared(text, family);
    let counted: Vec<&str> = text
        .lines()
        .filter(|l| {
            !l.starts_with('#') && self::family(l.split(' ').next().unwrap_or("")) == family
        })
        .collect();
    assert!(counted.is_empty(), "{family} counted: {counted:?}");
}

/// `vap_controller_ingested_total{kind=…,result=…}`.
pub fn ingested(kind: &str, result: &str) -> String {
    format!("vap_controller_ingested_total{{kind=\"{kind}\",result=\"{result}\"}}")
}

/// `vap_controller_dead_lettered_total{category=…}`.
pub fn dead_lettered(category: &str) -> String {
    format!("vap_controller_dead_lettered_total{{category=\"{category}\"}}")
}

impl ControllerProcess {
    /// The address of its /metrics, from its log (waits until it is served).
    pub async fn metrics_addr(&self) -> String {
        wait_for(
            "the controller to serve /metrics",
            Duration::from_secs(30),
            || async {
                let log = std::fs::read_to_string(&self.log_path).ok()?;
                let line = log.lines().find(|l| l.contains("serving /metrics"))?;
                let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
                Some(addr.to_string())
            },
        )
        .await
    }

    /// Its /metrics, as Prometheus text.
    pub async fn metrics(&self) -> String {
        let addr = self.metrics_addr().await;
        let (status, text) = super::http_get(&addr, "/metrics").await;
        assert_eq!(status, 200, "/metrics: {text}");
        text
    }

    /// The value of one series on its /metrics; fails when it is absent
    /// (see [`sample`]).
    pub async fn metric(&self, series: &str) -> f64 {
        sample(&self.metrics().await, series)
    }

    /// Waits until `series` is exposed and satisfies `ok`; returns its value.
    /// A series not exposed yet is waited for only if its family is
    /// declared; an undeclared family (a renamed metric) fails at once.
    pub async fn wait_metric(
        &self,
        series: &str,
        timeout: Duration,
        ok: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let text = self.metrics().await;
            let value = super::metric_value(&text, series);
            if value.is_none() && !series.contains('{') {
                assert_declared(&text, family(series));
            }
            if let Some(value) = value
                && ok(value)
            {
                return value;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {series} on /metrics; it is {value:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// How often ingest's consumer commits stored offsets
/// (`auto.commit.interval.ms` of [`vap_runner::ingest::consumer_config`],
/// librdkafka's 5 s when it sets none).
pub fn auto_commit_interval() -> Duration {
    let config = vap_runner::ingest::consumer_config(ClientConfig::new(), "unused");
    let ms = config
        .get("auto.commit.interval.ms")
        .map(|v| v.parse().expect("auto.commit.interval.ms"))
        .unwrap_or(5000);
    Duration::from_millis(ms)
}

/// One message read back from a topic: key, value, headers and timestamp.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    /// The record's timestamp (ms since the epoch; 0 when it has none).
    pub timestamp_ms: i64,
}

impl Record {
    /// A header's value; panics naming it when it is missing.
    pub fn header(&self, key: &str) -> &str {
        self.headers.get(key).unwrap_or_else(|| {
            panic!(
                "header {key:?} missing on {:?} (headers {:?})",
                String::from_utf8_lossy(&self.payload),
                self.headers
            )
        })
    }
}

impl Bed {
    /// The first `count` messages of `topic` (partition 0), in order, read
    /// from the partition itself (no group to join: quick to call often).
    pub async fn read_topic(&self, topic: &str, count: usize) -> Vec<Record> {
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::message::{Headers, Message};
        let reader: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", unique_name("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut partition = rdkafka::TopicPartitionList::new();
        partition
            .add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
            .expect("partition 0");
        reader.assign(&partition).expect("assign");
        let mut records = Vec::new();
        while records.len() < count {
            let msg = tokio::time::timeout(Duration::from_secs(60), reader.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "only {} of {count} messages on {topic} within 60 s",
                        records.len()
                    )
                })
                .expect("message");
            let headers = msg
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                            (h.key.to_string(), value.into_owned())
                        })
                        .collect()
                })
                .unwrap_or_default();
            records.push(Record {
                key: msg.key().map(<[u8]>::to_vec),
                payload: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                headers,
                timestamp_ms: msg.timestamp().to_millis().unwrap_or(0),
            });
        }
        records
    }

    /// How many messages `topic` (partition 0) holds. Blocks a worker thread
    /// of the test's (multi-thread) runtime.
    pub fn messages_in(&self, topic: &str) -> i64 {
        tokio::task::block_in_place(|| super::messages_in(&self.bootstrap, topic))
            .unwrap_or_else(|| panic!("topic {topic} does not exist"))
    }

    /// Sets this bed's consumer group back to the start of `topic`, as an
    /// operator replaying a topic would; the group must have no member (no
    /// controller running).
    pub async fn rewind(&self, topic: &str) {
        use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", &self.group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, rdkafka::Offset::Offset(0))
            .unwrap();
        consumer.assign(&tpl).expect("assign");
        tokio::task::block_in_place(|| consumer.commit(&tpl, CommitMode::Sync))
            .expect("commit offset 0: the group must be empty");
        assert_eq!(self.committed(topic), 0, "{topic} rewound");
    }
}

/// The user name a ServiceAccount authenticates as.
pub fn service_account_user(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

/// What `runner controller` needs in its namespace (the chart's Role), less
/// the `(resource, verb)` pairs in `denied`.
pub fn controller_rules(denied: &[(&str, &str)]) -> serde_json::Value {
    let rules = [
        (
            "runner.vap.io",
            "scenarios",
            &["get", "list", "watch", "create", "update", "delete"][..],
        ),
        ("runner.vap.io", "scenarios/status", &["patch"][..]),
        ("runner.vap.io", "scenarios/finalizers", &["update"][..]),
        (
            "",
            "pods",
            &["get", "list", "watch", "create", "delete"][..],
        ),
        ("", "secrets", &["create"][..]),
        ("events.k8s.io", "events", &["create", "patch"][..]),
        (
            "coordination.k8s.io",
            "leases",
            &["get", "create", "update"][..],
        ),
    ];
    let rules: Vec<serde_json::Value> = rules
        .iter()
        .filter_map(|(group, resource, verbs)| {
            let verbs: Vec<&str> = verbs
                .iter()
                .copied()
                .filter(|verb| !denied.contains(&(resource, verb)))
                .collect();
            (!verbs.is_empty()).then(|| {
                serde_json::json!({"apiGroups": [group], "resources": [resource], "verbs": verbs})
            })
        })
        .collect();
    let mut rules = rules;
    // The one Secret it reads: its camera digest key (runner `vap-runner`).
    if !denied.contains(&("secrets", "get")) {
        rules.push(serde_json::json!({
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["vap-runner-camera-digest-key"],
            "verbs": ["get"]
        }));
    }
    serde_json::Value::Array(rules)
}

/// A ServiceAccount identity in a bed's namespace for a controller to run
/// as (through a kubeconfig that impersonates it), with a Role the test
/// changes while the controller runs.
pub struct Identity {
    pub user: String,
    pub role: String,
    /// A kubeconfig like the test bed's whose user acts as [`Identity::user`].
    pub kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

impl Identity {
    /// `KUBECONFIG` for [`Bed::start_controller`].
    pub fn env(&self) -> (&'static str, &str) {
        ("KUBECONFIG", self.kubeconfig.to_str().expect("UTF-8 path"))
    }
}

impl Bed {
    /// Creates a ServiceAccount identity bound to a Role with `rules`
    /// (see [`controller_rules`]); they go with the namespace.
    pub async fn identity(&self, name: &str, rules: serde_json::Value) -> Identity {
        use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
        let ns = &self.namespace;
        let role: Role = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name}, "rules": rules
        }))
        .unwrap();
        Api::<Role>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &role)
            .await
            .expect("create Role");
        let binding: RoleBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]
        }))
        .unwrap();
        Api::<RoleBinding>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &binding)
            .await
            .expect("create RoleBinding");
        let user = service_account_user(ns, name);
        let dir = tempfile::tempdir().expect("kubeconfig dir");
        let kubeconfig = impersonating_kubeconfig(dir.path(), &user);
        Identity {
            user,
            role: name.to_string(),
            kubeconfig,
            _dir: dir,
        }
    }

    /// Replaces the identity's Role rules.
    pub async fn set_rules(&self, identity: &Identity, rules: serde_json::Value) {
        use k8s_openapi::api::rbac::v1::Role;
        let patch = serde_json::json!({"rules": rules});
        Api::<Role>::namespaced(self.client.clone(), &self.namespace)
            .patch(
                &identity.role,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .expect("patch Role");
    }

    /// Whether the identity may `verb` `resource` (of API group `group`;
    /// `scenarios/status` names a subresource) in this namespace, as the
    /// apiserver's authorizer answers now.
    pub async fn may(&self, identity: &Identity, group: &str, resource: &str, verb: &str) -> bool {
        use k8s_openapi::api::authorization::v1::SubjectAccessReview;
        let ns = &self.namespace;
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        let review: SubjectAccessReview = serde_json::from_value(serde_json::json!({
            "spec": {
                "user": identity.user,
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                "resourceAttributes": {"namespace": ns, "group": group, "resource": resource,
                                       "subresource": subresource, "verb": verb}
            }
        }))
        .unwrap();
        let answer = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .expect("SubjectAccessReview");
        answer.status.is_some_and(|s| s.allowed)
    }

    /// Waits until the authorizer gives the identity (`allowed`) or refuses
    /// it `verb` on `resource`: Role changes take effect asynchronously.
    pub async fn wait_access(
        &self,
        identity: &Identity,
        (group, resource, verb): (&str, &str, &str),
        allowed: bool,
    ) {
        let what = if allowed { "granted" } else { "refused" };
        wait_for(
            &format!("{verb} {resource} to be {what} to {}", identity.user),
            Duration::from_secs(30),
            || async { (self.may(identity, group, resource, verb).await == allowed).then_some(()) },
        )
        .await;
    }
}

/// Writes a kubeconfig like the test bed's admin one (`KUBECONFIG`) whose
/// user acts as `user`, and returns its path.
pub fn impersonating_kubeconfig(dir: &std::path::Path, user: &str) -> PathBuf {
    let admin = std::env::var("KUBECONFIG")
        .unwrap_or_else(|_| panic!("KUBECONFIG is not set; {}", super::TESTBED_HINT));
    let text = std::fs::read_to_string(&admin).expect("read KUBECONFIG");
    let mut config: serde_yaml::Value = serde_yaml::from_str(&text).expect("KUBECONFIG YAML");
    let users = config["users"]
        .as_sequence_mut()
        .expect("users in KUBECONFIG");
    for entry in users {
        entry["user"]
            .as_mapping_mut()
            .expect("user entry")
            .insert("as".into(), user.into());
    }
    let path = dir.join("impersonated.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

/// A ValidatingAdmissionPolicy (and its binding) that refuses, in one
/// namespace, creations (or other writes) of `resource` for which `allowed`
/// (CEL) is false, as
/// a platform's policy engine would; removed again when dropped.
pub struct DenyPolicy {
    name: String,
}

impl DenyPolicy {
    /// Creates it and waits until `probe` (an object it must refuse, created
    /// as a dry run through `api`) is refused: policies act asynchronously.
    pub async fn new<K>(
        bed: &Bed,
        resource: (&str, &str),
        allowed: &str,
        message: &str,
        api: &Api<K>,
        probe: &K,
    ) -> DenyPolicy
    where
        K: kube::Resource
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let guard = DenyPolicy::install(bed, resource, "CREATE", allowed, message).await;
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        wait_for(
            "the admission policy to act",
            Duration::from_secs(60),
            || async {
                let refused = api.create(&dry, probe).await.err()?;
                refused.to_string().contains(message).then_some(())
            },
        )
        .await;
        guard
    }

    /// Creates it for `operation` (`CREATE`, `UPDATE`) and returns at once:
    /// the API server applies it within moments.
    pub async fn install(
        bed: &Bed,
        (group, resource): (&str, &str),
        operation: &str,
        allowed: &str,
        message: &str,
    ) -> DenyPolicy {
        use k8s_openapi::api::admissionregistration::v1::{
            ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
        };
        let name = unique_name("vap-runner-test-deny");
        let guard = DenyPolicy { name: name.clone() };
        let policy: ValidatingAdmissionPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{
                    "apiGroups": [group], "apiVersions": ["*"],
                    "operations": [operation], "resources": [resource]}]},
                "validations": [{"expression": allowed, "message": message}]
            }
        }))
        .unwrap();
        let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {
                    "kubernetes.io/metadata.name": bed.namespace}}}
            }
        }))
        .unwrap();
        Api::<ValidatingAdmissionPolicy>::all(bed.client.clone())
            .create(&PostParams::default(), &policy)
            .await
            .expect("create ValidatingAdmissionPolicy");
        Api::<ValidatingAdmissionPolicyBinding>::all(bed.client.clone())
            .create(&PostParams::default(), &binding)
            .await
            .expect("create ValidatingAdmissionPolicyBinding");
        guard
    }
}

impl Drop for DenyPolicy {
    fn drop(&mut self) {
        remove_admission_policy(self.name.clone());
    }
}

/// Removes the ValidatingAdmissionPolicy `name` and its binding of the
/// same name (from a `Drop`).
pub fn remove_admission_policy(name: String) {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    cleanup(move || async move {
        if let Ok(client) = Client::try_default().await {
            let _ = Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
                .delete(&name, &DeleteParams::default())
                .await;
            let _ = Api::<ValidatingAdmissionPolicy>::all(client)
                .delete(&name, &DeleteParams::default())
                .await;
        }
    });
}

/// Every version of the objects a watch of `api` (with `config`) shows, in
/// the apiserver's order, recorded from before the test acts; stops when
/// dropped.
pub struct Versions<K> {
    seen: std::sync::Arc<std::sync::Mutex<Vec<K>>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Versions<K>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    /// Starts recording; returns once the watch has listed what exists.
    pub async fn start(api: Api<K>, config: kube::runtime::watcher::Config) -> Versions<K> {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, watcher};
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (listed, is_listed) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let seen = seen.clone();
            let mut events = watcher(api, config).default_backoff().boxed();
            async move {
                let mut listed = Some(listed);
                while let Some(event) = events.next().await {
                    match event {
                        Ok(watcher::Event::InitDone) => {
                            if let Some(listed) = listed.take() {
                                let _ = listed.send(());
                            }
                        }
                        Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                            seen.lock().unwrap().push(o);
                        }
                        _ => {}
                    }
                }
            }
        });
        tokio::time::timeout(SCENARIO_WITHIN, is_listed)
            .await
            .expect("the watch lists in time")
            .expect("the watch lists");
        Versions { seen, task }
    }

    /// The versions seen so far.
    pub fn seen(&self) -> Vec<K> {
        self.seen.lock().unwrap().clone()
    }

    /// The objects' names in the order they first appeared.
    pub fn first_seen(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for o in self.seen() {
            let name = kube::ResourceExt::name_any(&o);
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }
}

impl<K> Drop for Versions<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A validating webhook that takes each call and never answers, for writes
/// of `resource` in one namespace: the API server completes the TLS
/// handshake, sends its review and waits out the webhook's 30 s timeout, then
/// fails the write, as behind a hung admission webhook. Removed, and every
/// call it holds closed, when dropped.
pub struct HangingWebhook {
    name: String,
    held: Arc<HeldCalls>,
}

/// The calls a [`HangingWebhook`] has taken and that have ended.
#[derive(Default)]
struct HeldCalls {
    taken: std::sync::atomic::AtomicUsize,
    ended: std::sync::atomic::AtomicUsize,
    open: std::sync::Mutex<Vec<std::net::TcpStream>>,
    stop: std::sync::atomic::AtomicBool,
}

impl HangingWebhook {
    pub async fn new(bed: &Bed, resource: (&str, &str)) -> HangingWebhook {
        Self::with_selector(bed, resource, serde_json::json!({})).await
    }

    /// Only for objects whose labels match `labels` (an objectSelector's matchLabels).
    pub async fn for_labels(
        bed: &Bed,
        resource: (&str, &str),
        labels: serde_json::Value,
    ) -> HangingWebhook {
        Self::with_selector(bed, resource, serde_json::json!({ "matchLabels": labels })).await
    }

    async fn with_selector(
        bed: &Bed,
        (group, resource): (&str, &str),
        selector: serde_json::Value,
    ) -> HangingWebhook {
        use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let made = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("the tests make the webhook's certificate with the openssl CLI");
        assert!(made.status.success(), "openssl: {made:?}");
        let held = Arc::new(HeldCalls::default());
        let port = hold_calls(&cert, &key, held.clone());
        let name = unique_name("vap-runner-test-hang");
        let config: ValidatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "webhooks": [{
                "name": "hang.vap-runner.test",
                "clientConfig": {
                    "url": format!("https://127.0.0.1:{port}/"),
                    "caBundle": super::oidc::base64_bytes(&std::fs::read(&cert).unwrap(), false),
                },
                "rules": [{"apiGroups": [group], "apiVersions": ["*"],
                    "operations": ["CREATE", "UPDATE"], "resources": [resource]}],
                "namespaceSelector": {"matchLabels": {
                    "kubernetes.io/metadata.name": bed.namespace}},
                "objectSelector": selector,
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 30
            }]
        }))
        .unwrap();
        Api::<ValidatingWebhookConfiguration>::all(bed.client.clone())
            .create(&PostParams::default(), &config)
            .await
            .expect("create ValidatingWebhookConfiguration");
        HangingWebhook { name, held }
    }

    /// Calls taken so far (the API server's review sent, no answer given).
    pub fn taken(&self) -> usize {
        self.held.taken.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Calls the API server has given up on.
    pub fn ended(&self) -> usize {
        self.held.ended.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Serves TLS on a free port of 127.0.0.1 with `cert` and `key`, taking
/// every call and answering none; returns the port.
fn hold_calls(cert: &Path, key: &Path, held: Arc<HeldCalls>) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::io::Read;
    use std::sync::atomic::Ordering::SeqCst;
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_file(cert).unwrap()],
            PrivateKeyDer::from_pem_file(key).unwrap(),
        )
        .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            if held.stop.load(SeqCst) {
                break;
            }
            let Ok(mut tcp) = tcp else { continue };
            if let Ok(handle) = tcp.try_clone() {
                held.open.lock().unwrap().push(handle);
            }
            let (config, held) = (config.clone(), held.clone());
            std::thread::spawn(move || {
                let mut tls = rustls::ServerConnection::new(config).unwrap();
                let mut buf = [0u8; 4096];
                // The review arrives; no answer goes back. The call ends
                // when the API server closes it.
                let mut counted = false;
                while let Ok(n) = rustls::Stream::new(&mut tls, &mut tcp).read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if !counted {
                        counted = true;
                        held.taken.fetch_add(1, SeqCst);
                    }
                }
                if counted {
                    held.ended.fetch_add(1, SeqCst);
                }
            });
        }
    });
    port
}

impl Drop for HangingWebhook {
    fn drop(&mut self) {
        use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
        let name = self.name.clone();
        cleanup(move || async move {
            if let Ok(client) = Client::try_default().await {
                let _ = Api::<ValidatingWebhookConfiguration>::all(client)
                    .delete(&name, &DeleteParams::default())
                    .await;
            }
        });
        // Ends every held call at once, and the listener with the next one.
        self.held
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for tcp in self.held.open.lock().unwrap().drain(..) {
            let _ = tcp.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// What a watch of Pods reported, in the apiserver's order.
#[derive(Clone, Debug)]
pub enum PodChange {
    /// Created or changed.
    Applied(Pod),
    Deleted(Pod),
}

/// Every change to the Pods of a namespace, recorded by a watch that lists
/// them before the test creates any, so that no Pod goes unseen.
pub struct PodWatch {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<PodChange>>,
}

impl PodWatch {
    /// Starts watching `pods`; returns once the watch has listed what exists.
    pub async fn start(pods: Api<Pod>) -> PodWatch {
        use futures::StreamExt;
        use kube::runtime::watcher;
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let (listed, is_listed) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut listed = Some(listed);
            let mut changes = Vec::new();
            // Pods by uid as this watch knows them; a re-list (after the
            // watch lapsed) is turned into the changes it implies.
            let mut known: BTreeMap<String, Pod> = BTreeMap::new();
            let mut relisted: BTreeMap<String, Pod> = BTreeMap::new();
            let mut events = watcher(pods, watcher::Config::default()).boxed();
            loop {
                let event = tokio::select! {
                    _ = &mut stopped => return changes,
                    event = events.next() => event,
                };
                match event {
                    Some(Ok(watcher::Event::Apply(p))) => {
                        known.insert(p.metadata.uid.clone().unwrap_or_default(), p.clone());
                        changes.push(PodChange::Applied(p));
                    }
                    Some(Ok(watcher::Event::Delete(p))) => {
                        known.remove(&p.metadata.uid.clone().unwrap_or_default());
                        changes.push(PodChange::Deleted(p));
                    }
                    Some(Ok(watcher::Event::Init)) => relisted.clear(),
                    Some(Ok(watcher::Event::InitApply(p))) => {
                        relisted.insert(p.metadata.uid.clone().unwrap_or_default(), p);
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        for (uid, p) in std::mem::take(&mut known) {
                            if !relisted.contains_key(&uid) {
                                changes.push(PodChange::Deleted(p));
                            }
                        }
                        for p in relisted.values() {
                            changes.push(PodChange::Applied(p.clone()));
                        }
                        known = std::mem::take(&mut relisted);
                        if let Some(listed) = listed.take() {
                            let _ = listed.send(());
                        }
                    }
                    Some(Err(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
                    None => return changes,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), is_listed)
            .await
            .expect("the Pod watch lists within 30 s")
            .expect("the Pod watch runs");
        PodWatch { stop, task }
    }

    /// Stops watching and returns everything seen.
    pub async fn finish(self) -> PodHistory {
        let _ = self.stop.send(());
        PodHistory {
            changes: self.task.await.expect("the Pod watch"),
        }
    }
}

/// The changes a [`PodWatch`] saw.
pub struct PodHistory {
    pub changes: Vec<PodChange>,
}

/// True while a Pod may still run a worker, so it takes one of its runner's
/// MAX_WORKERS slots: every Pod not Succeeded or Failed (docs/architecture.md, Admission).
pub fn holds_slot(pod: &Pod) -> bool {
    !matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

impl PodHistory {
    /// Calls `f` with each change and the Pods (by uid) that exist just after it.
    pub fn replay(&self, mut f: impl FnMut(&PodChange, &BTreeMap<String, Pod>)) {
        let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
        for change in &self.changes {
            match change {
                PodChange::Applied(p) => {
                    pods.insert(p.metadata.uid.clone().unwrap_or_default(), p.clone());
                }
                PodChange::Deleted(p) => {
                    pods.remove(&p.metadata.uid.clone().unwrap_or_default());
                }
            }
            f(change, &pods);
        }
    }

    /// The most Pods for which `which` holds that took a slot at once.
    pub fn most_holding_slots(&self, which: impl Fn(&Pod) -> bool) -> usize {
        let mut most = 0;
        self.replay(|_, pods| {
            let n = pods.values().filter(|p| which(p) && holds_slot(p)).count();
            most = most.max(n);
        });
        most
    }

    /// Pod names in the order each first appeared.
    pub fn first_seen(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for change in &self.changes {
            if let PodChange::Applied(p) = change {
                let name = p.metadata.name.clone().unwrap_or_default();
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        names
    }

    /// The uids of every Pod named `name` seen, in order.
    /// The uids of the Pods named `name` that kwok ran (see [`kwok_is_done`]),
    /// in the order seen.
    pub fn uids_that_ran(&self, name: &str) -> Vec<String> {
        let mut uids: Vec<String> = Vec::new();
        for change in &self.changes {
            if let PodChange::Applied(p) = change
                && p.metadata.name.as_deref() == Some(name)
                && kwok_is_done(p)
            {
                let uid = p.metadata.uid.clone().unwrap_or_default();
                if !uids.contains(&uid) {
                    uids.push(uid);
                }
            }
        }
        uids
    }

    pub fn uids_of(&self, name: &str) -> Vec<String> {
        let mut uids: Vec<String> = Vec::new();
        for change in &self.changes {
            if let PodChange::Applied(p) = change
                && p.metadata.name.as_deref() == Some(name)
            {
                let uid = p.metadata.uid.clone().unwrap_or_default();
                if !uids.contains(&uid) {
                    uids.push(uid);
                }
            }
        }
        uids
    }
}

/// True once kwok has finished with a Pod: its last built-in stage has run
/// (phase Running, Ready condition True, a podIP), so nothing kwok does
/// later can overwrite a status a test writes. kwok's readiness stage acts
/// on Pods without a podIP; the podIP is what stops it.
pub fn kwok_is_done(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    pod.metadata.deletion_timestamp.is_none()
        && status.phase.as_deref() == Some("Running")
        && ready
        && status.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty())
}

/// True when `actual` shows everything `expected` says (objects: every key
/// of `expected`, recursively; arrays: the same length, element by element).
fn json_shows(actual: &serde_json::Value, expected: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => e
            .iter()
            .all(|(k, v)| a.get(k).is_some_and(|a| json_shows(a, v))),
        (Value::Array(a), Value::Array(e)) => {
            a.len() == e.len() && a.iter().zip(e).all(|(a, e)| json_shows(a, e))
        }
        (a, e) => a == e,
    }
}

/// How long a scenario may take to reach a state on the shared test bed
/// (parallel runs on two cores): generous, since only a failure waits it.
pub const SCENARIO_WITHIN: Duration = Duration::from_secs(180);

impl Bed {
    /// Waits until kwok has finished with the worker Pod `name` (see
    /// [`kwok_is_done`]) and returns it.
    pub async fn wait_kwok_done(&self, name: &str) -> Pod {
        wait_for(
            &format!("kwok to run Pod {name} (Running, Ready, a podIP)"),
            SCENARIO_WITHIN,
            || async move {
                let pod = self.pods().get_opt(name).await.ok()??;
                kwok_is_done(&pod).then_some(pod)
            },
        )
        .await
    }

    /// Writes a kwok-run Pod's status as its kubelet would: first waits
    /// until kwok has finished with the Pod (unless the test wrote its
    /// status before), then writes, and reads it back
    /// until the write shows (writing it again should kwok have overwritten
    /// it). Done once it shows, or the Pod is gone or replaced.
    pub async fn set_pod_status(&self, name: &str, status: serde_json::Value) {
        let known = |uid: &Option<String>| {
            uid.as_ref()
                .is_some_and(|uid| self.written.lock().unwrap().contains(uid))
        };
        // A Pod whose status the test wrote before was done with by kwok
        // then (its Ready condition may show the test's own write now).
        let uid = match self.pods().get_opt(name).await.ok().flatten() {
            Some(pod) if known(&pod.metadata.uid) => pod.metadata.uid,
            _ => self.wait_kwok_done(name).await.metadata.uid,
        };
        self.written
            .lock()
            .unwrap()
            .insert(uid.clone().unwrap_or_default());
        self.write_pod_status(name, &status).await;
        wait_for(
            &format!("the status written to Pod {name} to stay"),
            SCENARIO_WITHIN,
            || async {
                let pod = match self.pods().get_opt(name).await {
                    Ok(Some(pod)) => pod,
                    Ok(None) => return Some(()),
                    Err(_) => return None,
                };
                if pod.metadata.uid != uid {
                    return Some(());
                }
                let now = serde_json::to_value(pod.status.unwrap_or_default()).ok()?;
                if json_shows(&now, &status) {
                    return Some(());
                }
                // Written again; the Pod may be going meanwhile (then the
                // next read ends the wait), so a refusal is not an error.
                let _ = self
                    .pods()
                    .patch_status(
                        name,
                        &PatchParams::default(),
                        &Patch::Merge(&serde_json::json!({ "status": &status })),
                    )
                    .await;
                None
            },
        )
        .await;
    }

    /// One write of a Pod's status (a merge patch of `status`), as a kubelet
    /// makes it, without waiting for kwok: for Pods kwok does not run
    /// ([`Bed::set_pod_status`] is for those it runs).
    pub async fn write_pod_status(&self, name: &str, status: &serde_json::Value) {
        self.pods()
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(&serde_json::json!({ "status": status })),
            )
            .await
            .unwrap_or_else(|e| panic!("write the status of Pod {name}: {e}"));
    }

    /// The phase of the Scenario of `scenario_uuid`, if it has one.
    pub async fn phase(&self, scenario_uuid: &str) -> Option<vap_runner::controller::crd::Phase> {
        phase(
            &self
                .scenarios()
                .get_opt(&scenario_name(scenario_uuid))
                .await
                .ok()??,
        )
    }

    /// Waits until the Scenario of `scenario_uuid` satisfies `check` (`what`
    /// says what that means) and returns it; fails after
    /// [`SCENARIO_WITHIN`].
    pub async fn wait_scenario(
        &self,
        scenario_uuid: &str,
        what: &str,
        check: impl Fn(&Scenario) -> bool,
    ) -> Scenario {
        let check = &check;
        wait_for(
            &format!("scenario {scenario_uuid}: {what}"),
            SCENARIO_WITHIN,
            || async move {
                let s = self
                    .scenarios()
                    .get_opt(&scenario_name(scenario_uuid))
                    .await
                    .ok()??;
                check(&s).then_some(s)
            },
        )
        .await
    }

    /// Waits until the Scenario of `scenario_uuid` is in `want`.
    pub async fn wait_phase(
        &self,
        scenario_uuid: &str,
        want: vap_runner::controller::crd::Phase,
    ) -> Scenario {
        self.wait_scenario(scenario_uuid, &format!("{want:?}"), |s| {
            phase(s) == Some(want)
        })
        .await
    }

    /// The offset consumer group `group` has committed on `topic` (0 if none).
    pub fn committed_by(&self, group: &str, topic: &str) -> i64 {
        self.committed_offset_by(group, topic).unwrap_or(0)
    }
}

/// Pod status of a worker whose clip ended: exit code 0, as a kubelet writes it.
pub fn worker_exited(code: i32) -> serde_json::Value {
    let (phase, reason) = if code == 0 {
        ("Succeeded", "Completed")
    } else {
        ("Failed", "Error")
    };
    serde_json::json!({
        "phase": phase,
        "containerStatuses": [{
            "name": "worker", "image": "vap-runner:test", "imageID": "", "ready": false,
            "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "reason": reason}}
        }]
    })
}

/// Request topics, dead-letter and events topic and consumer group of one
/// more runner in a bed's namespace; the topics are deleted when dropped.
pub struct RunnerTopics {
    pub runner: String,
    pub deploy: String,
    pub undeploy: String,
    pub dlq: String,
    pub events: String,
    pub group: String,
    bootstrap: String,
}

impl RunnerTopics {
    /// The controller settings that make a runner of these.
    pub fn env(&self) -> Vec<(&'static str, &str)> {
        vec![
            ("RUNNER_NAME", &self.runner),
            ("CONSUMER_GROUP", &self.group),
            ("DEPLOY_TOPIC", &self.deploy),
            ("UNDEPLOY_TOPIC", &self.undeploy),
            ("DLQ_TOPIC", &self.dlq),
            ("EVENTS_TOPIC", &self.events),
        ]
    }

    fn topics(&self) -> [&String; 4] {
        [&self.deploy, &self.undeploy, &self.dlq, &self.events]
    }
}

impl Bed {
    /// Topics and a consumer group for a runner named `runner` beside this
    /// bed's own (which keeps the bed's topics and group).
    pub async fn runner_topics(&self, runner: &str) -> RunnerTopics {
        let prefix = format!("{}.{runner}", self.namespace);
        let topics = RunnerTopics {
            runner: runner.to_string(),
            deploy: format!("{prefix}.to_deploy"),
            undeploy: format!("{prefix}.to_undeploy"),
            dlq: format!("{prefix}.to_deploy.dlq"),
            events: format!("{prefix}.scenario_events"),
            group: format!("{prefix}-group"),
            bootstrap: self.bootstrap.clone(),
        };
        create_topics(&self.bootstrap, &topics.topics()).await;
        topics
    }
}

impl Drop for RunnerTopics {
    fn drop(&mut self) {
        let bootstrap = self.bootstrap.clone();
        let names: Vec<String> = self.topics().into_iter().cloned().collect();
        cleanup(move || async move {
            delete_topics(&bootstrap, &names).await;
        });
    }
}

/// Prints, when the test fails, what its bed showed: every Scenario's phase
/// and conditions, every Pod's phase, and the last lines of the controllers'
/// logs. Create it after the controllers so that it runs before they stop.
pub struct Explain {
    namespace: String,
    logs: Vec<PathBuf>,
}

impl Bed {
    pub fn explain_failure(&self, controllers: &[&ControllerProcess]) -> Explain {
        Explain {
            namespace: self.namespace.clone(),
            logs: controllers.iter().map(|c| c.log_path.clone()).collect(),
        }
    }
}

impl Drop for Explain {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let namespace = self.namespace.clone();
        let logs = self.logs.clone();
        cleanup(move || async move {
            let mut out = format!("--- what namespace {namespace} shows ---\n");
            if let Ok(client) = Client::try_default().await {
                let scenarios: Api<Scenario> = Api::namespaced(client.clone(), &namespace);
                for s in scenarios
                    .list(&ListParams::default())
                    .await
                    .map(|l| l.items)
                    .unwrap_or_default()
                {
                    let status = s.status.clone().unwrap_or_default();
                    let conditions: Vec<String> = status
                        .conditions
                        .iter()
                        .map(|c| format!("{}={} ({})", c.type_, c.status, c.reason))
                        .collect();
                    out += &format!(
                        "Scenario {} run {}: {:?} {}\n",
                        s.spec.scenario_uuid,
                        s.spec.run,
                        status.phase,
                        conditions.join(", ")
                    );
                }
                let pods: Api<Pod> = Api::namespaced(client, &namespace);
                for p in pods
                    .list(&ListParams::default())
                    .await
                    .map(|l| l.items)
                    .unwrap_or_default()
                {
                    out += &format!(
                        "Pod {} ({}): {:?}{}\n",
                        p.metadata.name.unwrap_or_default(),
                        p.metadata.uid.unwrap_or_default(),
                        p.status.and_then(|s| s.phase),
                        if p.metadata.deletion_timestamp.is_some() {
                            ", being deleted"
                        } else {
                            ""
                        }
                    );
                }
            }
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                out += &format!("--- {} ---\n", log.display());
                out += &lines[lines.len().saturating_sub(60)..].join("\n");
                out += "\n";
            }
            eprintln!("{out}");
        });
    }
}
