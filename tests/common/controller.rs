//! Running `runner controller` against the test bed: one namespace, topic set
//! and consumer group per test, removed again when the test ends.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rdkafka::ClientConfig;
use rdkafka::producer::FutureProducer;
use vap_runner::controller::crd::Scenario;

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
    pub group: String,
    pub logs: tempfile::TempDir,
    producer: FutureProducer,
}

impl Bed {
    pub async fn new(prefix: &str) -> Bed {
        let bootstrap = kafka_bootstrap();
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
        let bed = Bed {
            deploy: format!("{namespace}.to_deploy"),
            undeploy: format!("{namespace}.to_undeploy"),
            dlq: format!("{namespace}.to_deploy.dlq"),
            events: format!("{namespace}.scenario_events"),
            results: format!("{namespace}.results"),
            group: format!("{namespace}-group"),
            producer: ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("enable.idempotence", "true")
                .create()
                .expect("producer"),
            logs: tempfile::tempdir().expect("log dir"),
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
        let log_path = self
            .logs
            .path()
            .join(format!("controller-{}.log", unique_name("run")));
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut env: BTreeMap<&str, String> = BTreeMap::new();
        env.insert("KAFKA_BOOTSTRAP_SERVERS", self.bootstrap.clone());
        env.insert("WATCH_NAMESPACE", self.namespace.clone());
        env.insert("CONSUMER_GROUP", self.group.clone());
        env.insert("DEPLOY_TOPIC", self.deploy.clone());
        env.insert("UNDEPLOY_TOPIC", self.undeploy.clone());
        env.insert("DLQ_TOPIC", self.dlq.clone());
        env.insert("EVENTS_TOPIC", self.events.clone());
        env.insert("RESULTS_TOPIC", self.results.clone());
        env.insert("VIDEO_FILE_ROOT", super::MEDIA_DIR.to_string());
        env.insert("WORKER_IMAGE", "vap-runner:test".to_string());
        env.insert("LOG_LEVEL", "debug".to_string());
        env.insert(
            "RUST_LOG",
            "kube=info,tower=info,hyper=info,rdkafka=info".to_string(),
        );
        env.insert("LEASE_DURATION_SECS", "4".to_string());
        for (k, v) in extra {
            env.insert(k, v.to_string());
        }
        let mut cmd = super::runner();
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
        self.committed_by(&self.group, topic)
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
        let container = &pod.spec.as_ref().expect("Pod spec").containers[0];
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut cmd = super::runner();
        cmd.args(container.args.clone().unwrap_or_default());
        for e in container.env.clone().unwrap_or_default() {
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
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "controller did not stop within 30 s of SIGTERM\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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
    fn drop(&mut self) {
        self.kill9();
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
/// MAX_WORKERS slots: every Pod not Succeeded or Failed (README, Admission).
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

impl Bed {
    /// Writes a Pod's status as the kubelet would.
    pub async fn set_pod_status(&self, name: &str, status: serde_json::Value) {
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
        self.scenarios()
            .get_opt(&format!("scn-{scenario_uuid}"))
            .await
            .ok()??
            .status?
            .phase
    }

    /// The offset consumer group `group` has committed on `topic` (0 if none).
    pub fn committed_by(&self, group: &str, topic: &str) -> i64 {
        let consumer: rdkafka::consumer::StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", group)
            .create()
            .expect("consumer");
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition(topic, 0);
        match rdkafka::consumer::Consumer::committed_offsets(
            &consumer,
            tpl,
            Duration::from_secs(10),
        ) {
            Ok(list) => match list.find_partition(topic, 0).map(|p| p.offset()) {
                Some(rdkafka::Offset::Offset(n)) => n,
                _ => 0,
            },
            Err(_) => 0,
        }
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
