//! Pods on the test bed's real node (`scripts/infra.d/node`: containerd, runc
//! and a kubelet), running the image that `scripts/image import` built without
//! a container engine and imported into the node. Unlike kwok's fake node,
//! here a container really starts, exits, logs and is held to its security
//! context.
//!
//! Needs the bed up with the node part and its environment loaded
//! (`scripts/infra up && eval "$(scripts/infra env)"`), and the image imported
//! (`scripts/image import`; `VAP_IMAGE` names it, default `vap-runner:dev`).
//! Without them the tests fail, saying what is missing.

use serde_json::{Value, json};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HINT: &str = "bring the bed up with its real node and load its environment \
    (`scripts/infra up && eval \"$(scripts/infra env)\"`), then import the image \
    (`scripts/image import`)";
/// The label (and the NoSchedule taint) of the real node.
const NODE_SELECTOR: &str = "vap.io/node=real";
const RUNTIME_UID: i64 = 65532;

fn image() -> String {
    std::env::var("VAP_IMAGE").unwrap_or_else(|_| "vap-runner:dev".to_string())
}

/// Runs kubectl with the bed's KUBECONFIG; returns (success, stdout, stderr).
fn kubectl_raw(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "Kubernetes is missing: KUBECONFIG is not set; {HINT}"
    );
    let mut child = Command::new("kubectl")
        .args(args)
        .arg("--request-timeout=20s")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run kubectl ({e}); {HINT}"));
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write to kubectl");
    }
    let out = child.wait_with_output().expect("kubectl output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn kubectl(args: &[&str]) -> String {
    let (ok, out, err) = kubectl_raw(args, None);
    assert!(ok, "kubectl {} failed: {err}", args.join(" "));
    out
}

fn kubectl_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&kubectl(&all)).expect("kubectl -o json")
}

/// The real node: exactly one Node with the label, Ready. Panics otherwise.
fn real_node() -> String {
    let selector = NODE_SELECTOR;
    let nodes = kubectl_json(&["get", "nodes", "-l", selector]);
    let items = nodes["items"].as_array().expect("items");
    assert_eq!(
        items.len(),
        1,
        "the real node is missing: expected one Node labelled {selector}, found {}; {HINT}",
        items.len()
    );
    let node = &items[0];
    let ready = node["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    let name = node["metadata"]["name"].as_str().expect("name").to_string();
    assert!(ready, "the real node {name} is not Ready; {HINT}");
    name
}

/// A namespace of its own, deleted when dropped.
struct Namespace(String);

impl Namespace {
    fn new(test: &str) -> Self {
        let name = format!("real-node-{test}-{}", std::process::id());
        kubectl(&["create", "namespace", &name]);
        let ns = Namespace(name);
        // The ServiceAccount admission plugin admits Pods only once the
        // controller-manager has made the namespace's "default" account.
        wait_for(Duration::from_secs(30), "ServiceAccount default", || {
            kubectl_raw(&["-n", &ns.0, "get", "serviceaccount", "default"], None).0
        });
        ns
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = kubectl_raw(&["delete", "namespace", &self.0, "--wait=false"], None);
    }
}

fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A Pod for the real node: selects it, tolerates its taint, runs the image
/// as it is imported (never pulled), does not restart.
fn pod(name: &str, container: Value, pod_extra: Value) -> Value {
    let mut container = container;
    container["name"] = json!("main");
    container["image"] = json!(image());
    container["imagePullPolicy"] = json!("Never");
    let mut spec = json!({
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 5,
        "nodeSelector": {"vap.io/node": "real"},
        "tolerations": [{"key": "vap.io/node", "operator": "Equal", "value": "real",
                         "effect": "NoSchedule"}],
        "containers": [container],
    });
    if let Value::Object(extra) = pod_extra {
        for (k, v) in extra {
            spec[k] = v;
        }
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})
}

fn create(ns: &Namespace, pod: &Value) {
    let (ok, _, err) = kubectl_raw(&["-n", &ns.0, "create", "-f", "-"], Some(&pod.to_string()));
    assert!(ok, "creating Pod {}: {err}", pod["metadata"]["name"]);
}

/// Waits until the Pod reaches Succeeded or Failed; fails fast when its
/// container cannot start (e.g. the image was never imported). Returns the
/// Pod and the seconds it took from creation.
fn wait_terminal(ns: &Namespace, name: &str) -> (Value, f64) {
    let start = Instant::now();
    loop {
        let pod = kubectl_json(&["-n", &ns.0, "get", "pod", name]);
        let phase = pod["status"]["phase"].as_str().unwrap_or("");
        if phase == "Succeeded" || phase == "Failed" {
            return (pod, start.elapsed().as_secs_f64());
        }
        for status in pod["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let reason = status["state"]["waiting"]["reason"].as_str().unwrap_or("");
            assert!(
                !matches!(
                    reason,
                    "ErrImageNeverPull"
                        | "ErrImagePull"
                        | "ImagePullBackOff"
                        | "CreateContainerConfigError"
                        | "CreateContainerError"
                        | "InvalidImageName"
                ),
                "Pod {name} cannot start: {reason}: {} (image {}); {HINT}",
                status["state"]["waiting"]["message"],
                image()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "Pod {name} still {phase:?} after 120 s: {}",
            pod["status"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs Pod `name` (see [`pod`]) to its end, requires `Succeeded`, and
/// returns its log.
fn run_to_success(ns: &Namespace, name: &str, container: Value, extra: Value) -> String {
    create(ns, &pod(name, container, extra));
    let (pod, secs) = wait_terminal(ns, name);
    eprintln!("{name} Pod: {} after {secs:.1} s", pod["status"]["phase"]);
    let text = logs(ns, name);
    assert_eq!(
        pod["status"]["phase"], "Succeeded",
        "{}\n{text}",
        pod["status"]
    );
    text
}

fn exit_code(pod: &Value) -> i64 {
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"]
        .as_i64()
        .unwrap_or_else(|| panic!("no terminated state in {}", pod["status"]))
}

fn logs(ns: &Namespace, name: &str) -> String {
    kubectl(&["-n", &ns.0, "logs", name])
}

#[test]
fn runner_version_runs_as_a_container_on_the_real_node() {
    let node = real_node();
    let ns = Namespace::new("version");
    create(
        &ns,
        &pod("version", json!({"args": ["--version"]}), json!({})),
    );
    let (pod, secs) = wait_terminal(&ns, "version");
    eprintln!(
        "runner --version: {} after {secs:.1} s",
        pod["status"]["phase"]
    );
    assert_eq!(
        pod["spec"]["nodeName"],
        node.as_str(),
        "scheduled on the real node"
    );
    assert_eq!(pod["status"]["phase"], "Succeeded", "{}", pod["status"]);
    assert_eq!(exit_code(&pod), 0);
    let text = logs(&ns, "version");
    let first = text.lines().next().unwrap_or("");
    assert_eq!(
        first,
        format!("runner {}", env!("CARGO_PKG_VERSION")),
        "the first line of `kubectl logs`:\n{text}"
    );
    assert!(
        text.contains("FFMPEG"),
        "the video stack is in the image's binary:\n{text}"
    );
}

/// The security settings of the controller's worker Pods, taken from the Pod
/// the controller builds (`controller::pod::build`): the Pod's and the
/// container's securityContext, automountServiceAccountToken and
/// enableServiceLinks.
/// A Scenario of a clip, for building its worker Pod.
fn a_scenario() -> vap_runner::controller::crd::Scenario {
    use vap_runner::controller::crd::{Scenario, ScenarioSpec};
    use vap_runner::controller::names::scenario_name;
    let uuid = "550e8400-e29b-41d4-a716-446655440000";
    Scenario::new(
        &scenario_name(uuid),
        ScenarioSpec {
            scenario_uuid: uuid.into(),
            worker_id: "11223344-5566-7788-99aa-bbccddeeeff0".into(),
            camera_url: "http://127.0.0.1/clip.mp4".into(),
            fps: None,
            model: None,
            target: None,
            stopped: false,
            applied: Default::default(),
            run: 0,
        },
    )
}

fn worker_security() -> (Value, Value) {
    use vap_runner::controller::pod::{WorkerTemplate, build};
    let worker = serde_json::to_value(build(&a_scenario(), &WorkerTemplate::default()))
        .expect("worker Pod as JSON");
    let spec = &worker["spec"];
    let pod_level = json!({
        "securityContext": spec["securityContext"],
        "automountServiceAccountToken": spec["automountServiceAccountToken"],
        "enableServiceLinks": spec["enableServiceLinks"],
    });
    let container_level = json!({"securityContext": spec["containers"][0]["securityContext"]});
    (pod_level, container_level)
}

/// The worker Pod's security settings (the restricted Pod Security Standard)
/// are enforced by the runtime: the container runs as 65532, its root
/// filesystem is mounted read-only, it holds no capability and no
/// service-account token, and the runner starts under them.
#[test]
fn the_worker_security_context_is_enforced_and_the_runner_starts() {
    real_node();
    let ns = Namespace::new("restricted");
    let script = r#"set -u
id -u; id -g
awk '$2 == "/" {split($4, o, ","); print "root-" o[1]}' /proc/self/mounts
grep '^CapEff:' /proc/self/status
if [ -e /var/run/secrets/kubernetes.io/serviceaccount ]; then echo token; else echo no-token; fi
exec /usr/local/bin/runner --version"#;
    let (extra, mut container) = worker_security();
    assert_eq!(extra["automountServiceAccountToken"], false, "{extra}");
    assert_eq!(
        container["securityContext"]["readOnlyRootFilesystem"], true,
        "{container}"
    );
    container["command"] = json!(["/bin/sh", "-c", script]);
    let text = run_to_success(&ns, "restricted", container, extra);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 6, "log:\n{text}");
    assert_eq!(lines[0], RUNTIME_UID.to_string(), "uid; log:\n{text}");
    assert_eq!(lines[1], RUNTIME_UID.to_string(), "gid; log:\n{text}");
    assert_eq!(
        lines[2], "root-ro",
        "the root filesystem's mount; log:\n{text}"
    );
    assert_eq!(
        lines[3].split_whitespace().collect::<Vec<_>>(),
        ["CapEff:", "0000000000000000"],
        "log:\n{text}"
    );
    assert_eq!(lines[4], "no-token", "log:\n{text}");
    assert_eq!(lines[5], format!("runner {}", env!("CARGO_PKG_VERSION")));
}

/// Kafka credentials reach a worker as files it can read: the Secrets the
/// controller mounts into worker Pods (user name and password mode 0444, the
/// brokers' CA the default 0644) are readable by the worker's user under its
/// restricted security context on the real kubelet (read-only root
/// filesystem, no capabilities, uid 65532), as the worker needs to log in to
/// a secured Kafka.
#[test]
fn kafka_credential_files_are_readable_by_the_worker_on_the_real_node() {
    use vap_runner::controller::pod::{KafkaCa, WorkerKafka, WorkerTemplate, build};
    real_node();
    let ns = Namespace::new("kafka-files");
    for (name, literals) in [
        (
            "worker-kafka",
            ["username=worker", "password=not-shown"].as_slice(),
        ),
        ("kafka-ca", &["ca.crt=-----BEGIN CERTIFICATE-----"]),
    ] {
        let mut args = vec!["-n", &ns.0, "create", "secret", "generic", name];
        let literals: Vec<String> = literals
            .iter()
            .map(|l| format!("--from-literal={l}"))
            .collect();
        args.extend(literals.iter().map(String::as_str));
        kubectl(&args);
    }
    let template = WorkerTemplate {
        kafka: WorkerKafka {
            protocol: Some("sasl_ssl".into()),
            mechanism: Some("SCRAM-SHA-512".into()),
            sasl: Some(("worker-kafka".into(), "username".into(), "password".into())),
            ca: Some(KafkaCa::Secret {
                name: "kafka-ca".into(),
                key: "ca.crt".into(),
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let worker = serde_json::to_value(build(&a_scenario(), &template)).expect("worker Pod as JSON");
    let spec = &worker["spec"];
    let mut container = spec["containers"][0].clone();
    for drop in [
        "name",
        "image",
        "imagePullPolicy",
        "args",
        "livenessProbe",
        "readinessProbe",
    ] {
        container.as_object_mut().unwrap().remove(drop);
    }
    // The camera's Secret is not what this checks.
    container["env"]
        .as_array_mut()
        .expect("the worker's env")
        .retain(|e| e["name"] != "CAMERA_URL");
    // As the worker's user: each credential file's mode, and whether it reads.
    container["command"] = json!([
        "/bin/sh",
        "-c",
        r#"set -u
id -u
for f in "$KAFKA_SASL_USERNAME_FILE" "$KAFKA_SASL_PASSWORD_FILE" "$KAFKA_SSL_CA_LOCATION"; do
  if head -c1 "$f" >/dev/null; then r=reads; else r=unreadable; fi
  echo "$(stat -L -c %a "$f") $r"
done
echo "user $(cat "$KAFKA_SASL_USERNAME_FILE")""#
    ]);
    let extra = json!({
        "securityContext": spec["securityContext"],
        "automountServiceAccountToken": spec["automountServiceAccountToken"],
        "enableServiceLinks": spec["enableServiceLinks"],
        "volumes": spec["volumes"],
    });
    let text = run_to_success(&ns, "kafka-files", container, extra);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            RUNTIME_UID.to_string().as_str(),
            "444 reads",
            "444 reads",
            "644 reads",
            "user worker",
        ],
        "log:\n{text}"
    );
}

/// The image's own user and entrypoint apply when the Pod sets neither: the
/// container runs `runner` as 65532, which `runAsNonRoot` can verify because
/// the user is numeric.
#[test]
fn the_image_user_satisfies_run_as_non_root() {
    real_node();
    let ns = Namespace::new("imageuser");
    let extra = json!({"securityContext": {"runAsNonRoot": true}});
    create(
        &ns,
        &pod("imageuser", json!({"args": ["--version"]}), extra),
    );
    let (pod, _) = wait_terminal(&ns, "imageuser");
    assert_eq!(pod["status"]["phase"], "Succeeded", "{}", pod["status"]);
}

/// A container's exit status reaches the Pod: exit 3 under restartPolicy
/// Never is phase Failed with exitCode 3.
#[test]
fn a_failing_container_fails_the_pod_with_its_exit_code() {
    real_node();
    let ns = Namespace::new("exit3");
    let container = json!({"command": ["/bin/sh", "-c", "echo bye; exit 3"]});
    create(&ns, &pod("exit3", container, json!({})));
    let (pod, secs) = wait_terminal(&ns, "exit3");
    eprintln!("exit 3: {} after {secs:.1} s", pod["status"]["phase"]);
    assert_eq!(pod["status"]["phase"], "Failed", "{}", pod["status"]);
    assert_eq!(exit_code(&pod), 3);
    assert_eq!(logs(&ns, "exit3").trim(), "bye");
}

/// The kubelet restarts a failed container in place under restartPolicy
/// OnFailure: same Pod, restartCount 1, and the second run's success
/// completes the Pod.
#[test]
fn a_failed_container_is_restarted_in_place_under_on_failure() {
    real_node();
    let ns = Namespace::new("restart");
    let script = "if [ -e /scratch/ran ]; then echo second; exit 0; fi; \
                  touch /scratch/ran; echo first; exit 1";
    let container = json!({
        "command": ["/bin/sh", "-c", script],
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
    });
    let extra = json!({
        "restartPolicy": "OnFailure",
        "volumes": [{"name": "scratch", "emptyDir": {}}],
    });
    create(&ns, &pod("restart", container, extra));
    let (pod, secs) = wait_terminal(&ns, "restart");
    eprintln!("OnFailure: {} after {secs:.1} s", pod["status"]["phase"]);
    assert_eq!(pod["status"]["phase"], "Succeeded", "{}", pod["status"]);
    assert_eq!(pod["status"]["containerStatuses"][0]["restartCount"], 1);
    assert_eq!(logs(&ns, "restart").trim(), "second");
}

/// Deleting a Pod whose process exits 1 on SIGTERM: before the Pod object
/// goes, the kubelet writes the terminal phase Failed on it (Kubernetes 1.27
/// and later). A controller watching Pods sees a failed worker, not only a
/// deletion. kwok's node never shows this.
#[test]
fn a_deleted_pod_is_marked_failed_before_it_goes_when_its_process_exits_1() {
    real_node();
    let ns = Namespace::new("delete");
    let script = "trap 'echo term; exit 1' TERM; echo up; while :; do sleep 0.1; done";
    create(
        &ns,
        &pod(
            "delete",
            json!({"command": ["/bin/sh", "-c", script]}),
            json!({}),
        ),
    );
    wait_for(Duration::from_secs(60), "Pod delete Running", || {
        kubectl_json(&["-n", &ns.0, "get", "pod", "delete"])["status"]["phase"] == "Running"
    });
    wait_for(Duration::from_secs(10), "the process to start", || {
        logs(&ns, "delete").contains("up")
    });
    let mut watch = Command::new("kubectl")
        .args([
            "-n",
            &ns.0,
            "get",
            "pod",
            "delete",
            "--watch",
            "--output-watch-events",
        ])
        .args(["-o", "json", "--request-timeout=90s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl get --watch");
    let stdout = watch.stdout.take().expect("watch stdout");
    // The watch's first event is the Pod as it is; delete it after that.
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let reader = std::thread::spawn(move || {
        for event in serde_json::Deserializer::from_reader(stdout).into_iter::<Value>() {
            let Ok(event) = event else { break };
            let deleted = event["type"] == "DELETED";
            if tx.send(event).is_err() || deleted {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the watch's first event");
    kubectl(&["-n", &ns.0, "delete", "pod", "delete", "--wait=false"]);
    let mut events = vec![first];
    while let Ok(event) = rx.recv_timeout(Duration::from_secs(60)) {
        let deleted = event["type"] == "DELETED";
        events.push(event);
        if deleted {
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let _ = reader.join();
    let seen: Vec<String> = events
        .iter()
        .map(|e| {
            let status = &e["object"]["status"];
            format!(
                "{} {} exit={}",
                e["type"].as_str().unwrap_or("?"),
                status["phase"].as_str().unwrap_or("?"),
                status["containerStatuses"][0]["state"]["terminated"]["exitCode"]
            )
        })
        .collect();
    eprintln!("watch during deletion: {seen:?}");
    assert_eq!(
        events.last().map(|e| e["type"].clone()),
        Some(json!("DELETED")),
        "{seen:?}"
    );
    let failed = events.iter().any(|e| {
        e["type"] == "MODIFIED"
            && e["object"]["metadata"]["deletionTimestamp"].is_string()
            && e["object"]["status"]["phase"] == "Failed"
    });
    assert!(
        failed,
        "the kubelet marks the deleted Pod Failed before it goes: {seen:?}"
    );
}

/// The kind workflow's story (`scripts/e2e`, which `.github/workflows/e2e-kind.yml`
/// runs on kind) on the real node: `helm install --wait` with the imported image
/// and two controller replicas (both Ready, one leading), a clip over HTTP to
/// `Succeeded` with exactly 159 results, a live MJPEG camera that publishes on
/// while `helm upgrade` rolls the controller (the Lease moves to a new replica)
/// and stops on `to_undeploy`, then uninstall. The script checks
/// each step and exits non-zero on the first that fails; its log is shown.
#[test]
fn the_kind_workflow_story_runs_on_the_real_node() {
    let node = real_node();
    for var in ["VAP_KAFKA_POD_BOOTSTRAP", "KAFKA_BOOTSTRAP_SERVERS"] {
        assert!(
            std::env::var_os(var).is_some(),
            "{var} is not set (the bed's Kafka listener for Pods); {HINT}"
        );
    }
    let start = Instant::now();
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/e2e"))
        .arg(image())
        .env("VAP_NODE_NAME", &node)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/e2e");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "scripts/e2e failed ({}):\n{log}",
        out.status
    );
    assert!(log.contains("e2e: passed"), "scripts/e2e said:\n{log}");
    eprintln!("scripts/e2e passed on {node} in {:?}", start.elapsed());
}
