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
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::FutureProducer;
use vap_runner::controller::crd::Scenario;

use super::{kafka_bootstrap, kube_client, unique_name, wait_for};

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
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &bed.bootstrap)
            .create()
            .expect("admin");
        let topics: Vec<NewTopic<'_>> = [
            &bed.deploy,
            &bed.undeploy,
            &bed.dlq,
            &bed.events,
            &bed.results,
        ]
        .into_iter()
        .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
        .collect();
        admin
            .create_topics(&topics, &AdminOptions::new())
            .await
            .expect("create topics");
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
        let consumer: rdkafka::consumer::StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", &self.group)
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
            if let Ok(admin) = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .create::<AdminClient<DefaultClientContext>>()
            {
                let names: Vec<&str> = topics.iter().map(String::as_str).collect();
                let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
            }
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
