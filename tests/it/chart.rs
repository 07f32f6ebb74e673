//! The Helm chart (`charts/vap-runner`) and the GitHub Actions workflows.
//!
//! Static checks run `helm lint` / `helm template` and `actionlint` (both on
//! the PATH that `scripts/infra env` prints), and `scripts/chart-docs --check`
//! for the chart README (helm-docs from the same tool cache, built on first
//! use). The install test puts the chart on the test bed's real
//! kube-apiserver and runs `runner controller` as a local process with the
//! chart's environment, authenticated as the chart's ServiceAccount by
//! impersonation: the Role must be enough for a deploy and
//! an undeploy, and everything outside it must be refused. On the cluster
//! the chart's ServiceAccounts exist, the controller Pod runs as its own with
//! a token, and the worker Pods it creates run as the workers' one without.

use crate::common;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::controller::Bed;
use crate::common::wait_for;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role, RoleBinding};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};
use serde::Deserialize;
use serde_json::{Value, json};
use vap_runner::controller::crd::{Phase, Scenario, ScenarioSpec};
use vap_runner::controller::pod::{self as worker_pod, WorkerTemplate};

const KUBE_VERSION: &str = "1.34.0";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> String {
    repo().join("charts/vap-runner").display().to_string()
}

/// Runs a tool found on PATH; panics naming the tool when it is missing.
fn tool(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{program} is missing ({e}); it is built by the test bed: {}",
                common::TESTBED_HINT
            )
        })
}

fn helm_ok(args: &[&str]) -> String {
    common::run_ok(
        Command::new("helm").args(args).current_dir(repo()),
        &format!("it is built by the test bed: {}", common::TESTBED_HINT),
    )
}

/// The one value without a default: the chart refuses to render without it.
const BOOTSTRAP: &[&str] = &["--set", "kafka.bootstrapServers=kafka.example:9092"];

/// The Prometheus Operator's kinds, for `helm template` (an install asks the
/// cluster): the monitors render only where the cluster serves them.
const WITH_MONITORING: &[&str] = &[
    "--api-versions",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "--api-versions",
    "monitoring.coreos.com/v1/PodMonitor",
];

/// Every optional part of the chart switched on.
const ALL_FEATURES: &[&str] = &[
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "metrics.podMonitor.enabled=true",
    "--set",
    "networkPolicy.enabled=true",
    "--set",
    "networkPolicy.kafka.cidrs={10.20.0.0/24}",
    "--set",
    "networkPolicy.cameras.cidrs={0.0.0.0/0,169.254.0.0/16,192.168.10.0/24}",
    "--set",
    "videoFileRoot=/media",
    "--set",
    "imagePullSecrets[0].name=registry",
];

/// `helm template` output as JSON documents, with a bootstrap server (`extra`
/// comes after it and may set another).
fn template(release: &str, namespace: &str, extra: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec![
        "template",
        release,
        chart.as_str(),
        "--namespace",
        namespace,
        "--kube-version",
        KUBE_VERSION,
    ];
    args.extend_from_slice(BOOTSTRAP);
    args.extend_from_slice(extra);
    documents(&helm_ok(&args))
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("helm renders valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The object of `kind` named `name`.
fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    of_kind(docs, kind)
        .into_iter()
        .find(|d| d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

fn env_of(deployment: &Value) -> BTreeMap<String, Value> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("controller env")
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

fn env_value(env: &BTreeMap<String, Value>, name: &str) -> String {
    env.get(name)
        .unwrap_or_else(|| panic!("the controller has no {name}"))["value"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} has no literal value"))
        .to_string()
}

/// Restricted Pod Security Standard (plus a read-only root filesystem) for a
/// Pod spec; returns every violation in words.
fn restricted_violations(what: &str, spec: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let pod_sc = &spec["securityContext"];
    for field in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[field] == true {
            problems.push(format!("{what}: {field} is set"));
        }
    }
    const ALLOWED_VOLUMES: &[&str] = &[
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        for key in volume.as_object().unwrap().keys() {
            if key != "name" && !ALLOWED_VOLUMES.contains(&key.as_str()) {
                problems.push(format!("{what}: volume type {key} is not allowed"));
            }
        }
    }
    if pod_sc["runAsUser"] == 0 {
        problems.push(format!("{what}: pod runAsUser is 0"));
    }
    let containers: Vec<&Value> = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|k| spec[*k].as_array().into_iter().flatten())
        .collect();
    if containers.is_empty() {
        problems.push(format!("{what}: no containers"));
    }
    for c in containers {
        let name = format!(
            "{what} container {}",
            c["name"].as_str().unwrap_or_default()
        );
        let sc = &c["securityContext"];
        if sc["allowPrivilegeEscalation"] != false {
            problems.push(format!("{name}: allowPrivilegeEscalation is not false"));
        }
        if sc["readOnlyRootFilesystem"] != true {
            problems.push(format!("{name}: readOnlyRootFilesystem is not true"));
        }
        if sc["privileged"] == true {
            problems.push(format!("{name}: privileged"));
        }
        let drops: Vec<&str> = sc["capabilities"]["drop"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !drops.contains(&"ALL") {
            problems.push(format!("{name}: capabilities.drop lacks ALL"));
        }
        for added in sc["capabilities"]["add"].as_array().into_iter().flatten() {
            if added != "NET_BIND_SERVICE" {
                problems.push(format!("{name}: adds capability {added}"));
            }
        }
        let non_root = sc["runAsNonRoot"] == true
            || (sc["runAsNonRoot"].is_null() && pod_sc["runAsNonRoot"] == true);
        if !non_root {
            problems.push(format!("{name}: runAsNonRoot is not true"));
        }
        if sc["runAsUser"] == 0 {
            problems.push(format!("{name}: runAsUser is 0"));
        }
        let seccomp = if sc["seccompProfile"]["type"].is_null() {
            &pod_sc["seccompProfile"]["type"]
        } else {
            &sc["seccompProfile"]["type"]
        };
        if seccomp != "RuntimeDefault" && seccomp != "Localhost" {
            problems.push(format!("{name}: seccompProfile is not RuntimeDefault"));
        }
        for port in c["ports"].as_array().into_iter().flatten() {
            if !port["hostPort"].is_null() && port["hostPort"] != 0 {
                problems.push(format!("{name}: uses a hostPort"));
            }
        }
    }
    problems
}

fn pod_templates(docs: &[Value]) -> Vec<(String, &Value)> {
    let mut found = Vec::new();
    for d in docs {
        let what = format!(
            "{} {}",
            d["kind"].as_str().unwrap_or_default(),
            d["metadata"]["name"].as_str().unwrap_or_default()
        );
        let spec = match d["kind"].as_str().unwrap_or_default() {
            "Pod" => &d["spec"],
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                &d["spec"]["template"]["spec"]
            }
            "CronJob" => &d["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            _ => continue,
        };
        found.push((what, spec));
    }
    found
}

// ---------------------------------------------------------------------------
// Static checks: helm lint, helm template, actionlint
// ---------------------------------------------------------------------------

#[test]
fn chart_lints_clean() {
    let chart = chart();
    let mut base = vec![
        "lint",
        "--strict",
        chart.as_str(),
        "--kube-version",
        KUBE_VERSION,
    ];
    base.extend_from_slice(BOOTSTRAP);
    helm_ok(&base);
    let mut all = base.clone();
    all.extend_from_slice(ALL_FEATURES);
    helm_ok(&all);
    all.extend_from_slice(SECURED_KAFKA);
    helm_ok(&all);
}

#[test]
fn chart_crd_is_the_crds_directory_copy() {
    let top = std::fs::read(repo().join("crds/scenario.yaml")).expect("crds/scenario.yaml");
    let chart = std::fs::read(repo().join("charts/vap-runner/crds/scenario.yaml"))
        .expect("charts/vap-runner/crds/scenario.yaml");
    assert!(
        top == chart,
        "charts/vap-runner/crds/scenario.yaml differs from crds/scenario.yaml; copy it: \
         cp crds/scenario.yaml charts/vap-runner/crds/scenario.yaml"
    );
}

#[test]
fn every_pod_meets_the_restricted_pod_security_standard() {
    let docs = template("vap", "video", ALL_FEATURES);
    let templates = pod_templates(&docs);
    assert!(
        templates.iter().any(|(w, _)| w.starts_with("Deployment")),
        "the chart renders no controller Deployment"
    );
    let mut problems = Vec::new();
    for (what, spec) in &templates {
        problems.extend(restricted_violations(what, spec));
    }

    // Worker Pods are not in the chart: the controller builds them. Check the
    // Pod it builds with the chart's worker settings.
    let deployment = one(&docs, "Deployment");
    let env = env_of(deployment);
    let template = WorkerTemplate {
        runner_name: env_value(&env, "RUNNER_NAME"),
        image: env_value(&env, "WORKER_IMAGE"),
        resources: serde_json::from_str(&env_value(&env, "WORKER_RESOURCES")).unwrap(),
        node_selector: serde_json::from_str(&env_value(&env, "WORKER_NODE_SELECTOR")).unwrap(),
        tolerations: serde_json::from_str(&env_value(&env, "WORKER_TOLERATIONS")).unwrap(),
        service_account: Some(env_value(&env, "WORKER_SERVICE_ACCOUNT")),
        ..WorkerTemplate::default()
    };
    let worker = worker_pod_json(&template, "video", 1);
    problems.extend(restricted_violations("worker Pod", &worker["spec"]));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The worker Pod the controller builds with `template` for run `run` of
/// scenario 550e8400-e29b-41d4-a716-446655440000 in `namespace`.
fn worker_pod_json(template: &WorkerTemplate, namespace: &str, run: u32) -> Value {
    let id = "550e8400-e29b-41d4-a716-446655440000";
    let mut scenario = Scenario::new(
        &format!("scn-{id}"),
        ScenarioSpec {
            scenario_uuid: id.into(),
            worker_id: "11223344-5566-7788-99aa-bbccddeeeff0".into(),
            camera_url: "rtsp://camera.example/stream".into(),
            fps: None,
            model: None,
            target: None,
            stopped: false,
            applied: Default::default(),
            run,
        },
    );
    scenario.metadata.namespace = Some(namespace.into());
    scenario.metadata.uid = Some("uid-1".into());
    serde_json::to_value(worker_pod::build(&scenario, template)).unwrap()
}

/// (apiGroup, resource, verb, resourceName or "")
type Grant = (String, String, String, String);

#[test]
fn rbac_is_namespaced_exact_and_has_no_wildcards() {
    let docs = template("vap", "video", ALL_FEATURES);
    cluster_policy_grants_only_reads_of_nodes_and_the_kubernetes_service(&docs);
    let in_release = |kind: &str| -> Vec<Value> {
        of_kind(&docs, kind)
            .into_iter()
            .filter(|d| d["metadata"]["namespace"] == "video")
            .cloned()
            .collect()
    };
    let roles = in_release("Role");
    assert_eq!(roles.len(), 1, "{roles:?}");
    let role = &roles[0];
    let mut grants: BTreeSet<Grant> = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        let list = |key: &str| -> Vec<String> {
            rule[key]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        for key in ["apiGroups", "resources", "verbs", "resourceNames"] {
            let values = list(key);
            assert!(
                !values.iter().any(|v| v.contains('*')),
                "RBAC rule with a wildcard in {key}: {rule}"
            );
        }
        assert!(
            rule["nonResourceURLs"].is_null(),
            "a Role rule with nonResourceURLs: {rule}"
        );
        let mut names = list("resourceNames");
        if names.is_empty() {
            names.push(String::new());
        }
        for group in list("apiGroups") {
            for resource in list("resources") {
                for verb in list("verbs") {
                    for name in &names {
                        grants.insert((
                            group.clone(),
                            resource.clone(),
                            verb.clone(),
                            name.clone(),
                        ));
                    }
                }
            }
        }
    }
    let lease = "vap-vap-runner-leader";
    let expected: BTreeSet<Grant> = [
        ("runner.vap.io", "scenarios", "get", ""),
        ("runner.vap.io", "scenarios", "list", ""),
        ("runner.vap.io", "scenarios", "watch", ""),
        ("runner.vap.io", "scenarios", "create", ""),
        ("runner.vap.io", "scenarios", "get", ""),
        ("runner.vap.io", "scenarios", "update", ""),
        ("runner.vap.io", "scenarios", "delete", ""),
        ("runner.vap.io", "scenarios/status", "patch", ""),
        ("runner.vap.io", "scenarios/finalizers", "update", ""),
        ("", "pods", "get", ""),
        ("", "pods", "list", ""),
        ("", "pods", "watch", ""),
        ("", "pods", "create", ""),
        ("", "pods", "delete", ""),
        ("", "secrets", "create", ""),
        ("", "secrets", "get", "vap-vap-runner-camera-digest-key"),
        ("events.k8s.io", "events", "create", ""),
        ("events.k8s.io", "events", "patch", ""),
        ("coordination.k8s.io", "leases", "get", lease),
        ("coordination.k8s.io", "leases", "update", lease),
    ]
    .into_iter()
    .map(|(g, r, v, n)| (g.into(), r.into(), v.into(), n.into()))
    .collect();
    assert_eq!(
        grants, expected,
        "the Role must grant exactly what the controller uses"
    );

    let bindings = in_release("RoleBinding");
    assert_eq!(bindings.len(), 1, "{bindings:?}");
    let binding = &bindings[0];
    assert_eq!(binding["roleRef"]["kind"], "Role");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let deployment = one(&docs, "Deployment");
    let sa = &deployment["spec"]["template"]["spec"]["serviceAccountName"];
    let subjects = binding["subjects"].as_array().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0]["kind"], "ServiceAccount");
    assert_eq!(&subjects[0]["name"], sa);
    assert_eq!(subjects[0]["namespace"], "video");

    // The workers' ServiceAccount has no binding and never mounts a token.
    let worker_sa = of_kind(&docs, "ServiceAccount")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "vap-vap-runner-worker")
        .expect("the workers' ServiceAccount");
    assert_eq!(worker_sa["automountServiceAccountToken"], false);
    assert_eq!(worker_sa["imagePullSecrets"], json!([{"name": "registry"}]));
}

/// What the camera host policy's learning of the cluster is granted
/// (rbac-cluster-policy.yaml): get, list and watch on nodes cluster-wide,
/// and get on the Service, Endpoints and EndpointSlice `kubernetes` in
/// `default`; nothing when `cameraPolicy.learnCluster` is false.
fn cluster_policy_grants_only_reads_of_nodes_and_the_kubernetes_service(docs: &[Value]) {
    let cluster_role = one(docs, "ClusterRole");
    assert_eq!(
        cluster_role["rules"],
        json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}])
    );
    let cluster_binding = one(docs, "ClusterRoleBinding");
    assert_eq!(
        cluster_binding["roleRef"]["name"],
        cluster_role["metadata"]["name"]
    );
    assert_eq!(cluster_binding["subjects"][0]["namespace"], "video");
    let in_default: Vec<&Value> = of_kind(docs, "Role")
        .into_iter()
        .filter(|r| r["metadata"]["namespace"] == "default")
        .collect();
    assert_eq!(in_default.len(), 1);
    assert_eq!(
        in_default[0]["rules"],
        json!([
            {"apiGroups": [""], "resources": ["services", "endpoints"],
             "resourceNames": ["kubernetes"], "verbs": ["get"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
             "resourceNames": ["kubernetes"], "verbs": ["get"]}
        ])
    );
    let off = template(
        "vap",
        "video",
        &["--set", "cameraPolicy.learnCluster=false"],
    );
    for kind in ["ClusterRole", "ClusterRoleBinding"] {
        assert!(
            of_kind(&off, kind).is_empty(),
            "{kind} without learnCluster"
        );
    }
    assert!(
        of_kind(&off, "Role")
            .iter()
            .all(|r| r["metadata"]["namespace"] != "default")
    );
    assert_eq!(
        env_value(&env_of(one(&off, "Deployment")), "CAMERA_LEARN_CLUSTER"),
        "false"
    );
}

#[test]
fn controller_environment_is_complete_and_read_by_the_binary() {
    let docs = template(
        "vap",
        "video",
        &[
            "--set",
            "kafka.bootstrapServers=kafka-0:9092\\,kafka-1:9092",
            "--set",
            "maxWorkers=12",
            "--set",
            "maxQueued=500",
            "--set",
            "videoFps=0.5",
            "--set",
            "videoFileRoot=/media",
            "--set",
            "worker.nodeSelector.gpu=yes",
            "--set",
            "worker.tolerations[0].key=video",
            "--set",
            "worker.tolerations[0].operator=Exists",
            "--set",
            "image.repository=registry.example/vap-runner",
            "--set",
            "image.tag=1.2.3",
        ],
    );
    let deployment = one(&docs, "Deployment");
    let spec = &deployment["spec"]["template"]["spec"];
    assert_eq!(spec["containers"][0]["args"], json!(["controller"]));
    assert_eq!(
        spec["containers"][0]["image"],
        "registry.example/vap-runner:1.2.3"
    );
    let env = env_of(deployment);
    let field = |name: &str| env[name]["valueFrom"]["fieldRef"]["fieldPath"].clone();
    assert_eq!(field("WATCH_NAMESPACE"), "metadata.namespace");
    assert_eq!(field("POD_NAME"), "metadata.name");
    for (name, value) in [
        ("RUNNER_NAME", "vap-vap-runner"),
        ("CONSUMER_GROUP", "vap-vap-runner"),
        ("LEADER_ELECTION", "true"),
        ("KAFKA_BOOTSTRAP_SERVERS", "kafka-0:9092,kafka-1:9092"),
        ("MAX_WORKERS", "12"),
        ("MAX_QUEUED", "500"),
        ("VIDEO_FPS", "0.5"),
        ("DEPLOY_TOPIC", "to_deploy"),
        ("UNDEPLOY_TOPIC", "to_undeploy"),
        ("DLQ_TOPIC", "to_deploy.dlq"),
        ("EVENTS_TOPIC", "scenario_events"),
        ("RESULTS_TOPIC", "results"),
        ("HEARTBEAT_TOPIC", "scenario_heartbeats"),
        ("HEARTBEAT_SECS", "10"),
        ("STREAM_STATUS_SECS", "60"),
        ("STREAM_STATUS_WRITES", "20"),
        ("LOG_LEVEL", "INFO"),
        ("LOG_FORMAT", "text"),
        ("VIDEO_FILE_ROOT", "/media"),
        ("WORKER_IMAGE", "registry.example/vap-runner:1.2.3"),
        ("WORKER_SERVICE_ACCOUNT", "vap-vap-runner-worker"),
    ] {
        assert_eq!(env_value(&env, name), value, "{name}");
    }
    let json_env = |name: &str| -> Value {
        serde_json::from_str(&env_value(&env, name))
            .unwrap_or_else(|e| panic!("{name} is not JSON: {e}"))
    };
    assert_eq!(
        json_env("WORKER_RESOURCES"),
        json!({"requests": {"cpu": "100m", "memory": "96Mi"}, "limits": {"cpu": "1", "memory": "384Mi"}})
    );
    assert_eq!(json_env("WORKER_NODE_SELECTOR"), json!({"gpu": "yes"}));
    assert_eq!(
        json_env("WORKER_TOLERATIONS"),
        json!([{"key": "video", "operator": "Exists"}])
    );

    // Every variable the chart sets is one `runner controller` reads.
    let out = common::runner()
        .args(["controller", "--help"])
        .output()
        .expect("runner controller --help");
    let help = String::from_utf8_lossy(&out.stdout);
    for name in env.keys() {
        assert!(
            help.contains(&format!("[env: {name}=")) || help.contains(&format!("[env: {name}]")),
            "the chart sets {name}, which `runner controller` does not read"
        );
    }
}

/// A SASL_SSL cluster with mutual TLS, the workers with their own principal.
const SECURED_KAFKA: &[&str] = &[
    "--set",
    "kafka.tls.enabled=true",
    "--set",
    "kafka.tls.ca.configMap=kafka-ca",
    "--set",
    "kafka.tls.ca.key=ca.pem",
    "--set",
    "kafka.tls.clientCertSecret=runner-tls",
    "--set",
    "kafka.tls.workerClientCertSecret=worker-tls",
    "--set",
    "kafka.sasl.enabled=true",
    "--set",
    "kafka.sasl.mechanism=SCRAM-SHA-256",
    "--set",
    "kafka.sasl.existingSecret=runner-kafka",
    "--set",
    "kafka.sasl.passwordKey=pw",
    "--set",
    "kafka.sasl.worker.existingSecret=worker-kafka",
    "--set",
    "kafka.properties.client\\.rack=eu-1a",
    "--set",
    "cameraTls.caConfigMap=camera-cas",
];

#[test]
fn secured_kafka_reaches_the_controller_as_files_and_the_workers_by_reference() {
    let docs = template("vap", "video", SECURED_KAFKA);
    let deployment = one(&docs, "Deployment");
    let env = env_of(deployment);
    for (name, value) in [
        ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
        ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-256"),
        (
            "KAFKA_SASL_USERNAME_FILE",
            "/etc/vap-runner/kafka/sasl/username",
        ),
        (
            "KAFKA_SASL_PASSWORD_FILE",
            "/etc/vap-runner/kafka/sasl/password",
        ),
        ("KAFKA_SSL_CA_LOCATION", "/etc/vap-runner/kafka/ca/ca.crt"),
        (
            "KAFKA_SSL_CERTIFICATE_LOCATION",
            "/etc/vap-runner/kafka/client/tls.crt",
        ),
        (
            "KAFKA_SSL_KEY_LOCATION",
            "/etc/vap-runner/kafka/client/tls.key",
        ),
        ("KAFKA_PROPERTIES", "client.rack=eu-1a"),
        ("WORKER_KAFKA_SASL_SECRET", "worker-kafka"),
        ("WORKER_KAFKA_SASL_USERNAME_KEY", "username"),
        ("WORKER_KAFKA_SASL_PASSWORD_KEY", "password"),
        ("WORKER_KAFKA_CA_CONFIGMAP", "kafka-ca"),
        ("WORKER_KAFKA_CA_KEY", "ca.pem"),
        ("WORKER_KAFKA_CLIENT_CERT_SECRET", "worker-tls"),
        ("CAMERA_TLS_VERIFY", "true"),
        ("WORKER_CAMERA_CA_CONFIGMAP", "camera-cas"),
        ("WORKER_CAMERA_CA_KEY", "ca.crt"),
    ] {
        assert_eq!(env_value(&env, name), value, "{name}");
    }
    assert!(!env.contains_key("KAFKA_SASL_PASSWORD"));
    let spec = &deployment["spec"]["template"]["spec"];
    let volumes: BTreeMap<String, Value> = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_string(), v.clone()))
        .collect();
    assert_eq!(
        volumes["kafka-sasl"]["secret"],
        json!({"secretName": "runner-kafka", "defaultMode": 0o444, "items": [
            {"key": "username", "path": "username"}, {"key": "pw", "path": "password"}]})
    );
    assert_eq!(volumes["kafka-ca"]["configMap"]["name"], "kafka-ca");
    assert_eq!(
        volumes["kafka-ca"]["configMap"]["items"][0]["key"],
        "ca.pem"
    );
    assert_eq!(
        volumes["kafka-client"]["secret"]["secretName"],
        "runner-tls"
    );
    let mounts = spec["containers"][0]["volumeMounts"].as_array().unwrap();
    for name in ["kafka-sasl", "kafka-ca", "kafka-client"] {
        let mount = mounts.iter().find(|m| m["name"] == name).unwrap();
        assert_eq!(mount["readOnly"], true, "{name}");
    }
    // Still within the restricted Pod Security Standard.
    let violations = restricted_violations("controller", spec);
    assert!(violations.is_empty(), "{violations:?}");

    // Every variable is one `runner controller` reads, and the values parse.
    let out = common::runner()
        .args(["controller", "--help"])
        .output()
        .expect("runner controller --help");
    let help = String::from_utf8_lossy(&out.stdout);
    for name in env
        .keys()
        .filter(|n| n.contains("KAFKA") || n.contains("CAMERA"))
    {
        assert!(
            help.contains(&format!("[env: {name}=")) || help.contains(&format!("[env: {name}]")),
            "the chart sets {name}, which `runner controller` does not read"
        );
    }

    // TLS alone is ssl; the default is plaintext, with no Kafka mounts.
    let tls_only = template("vap", "video", &["--set", "kafka.tls.enabled=true"]);
    assert_eq!(
        env_value(
            &env_of(one(&tls_only, "Deployment")),
            "KAFKA_SECURITY_PROTOCOL"
        ),
        "ssl"
    );
    let plain = template("vap", "video", &[]);
    let plain_env = env_of(one(&plain, "Deployment"));
    assert!(
        !plain_env
            .keys()
            .any(|k| k.starts_with("KAFKA_S") || k.starts_with("WORKER_KAFKA"))
    );

    // Refused: SASL without a Secret, a secret among the plain properties.
    let chart = chart();
    for (args, says) in [
        (
            vec!["--set", "kafka.sasl.enabled=true"],
            "kafka.sasl.existingSecret",
        ),
        (
            vec!["--set", "kafka.properties.sasl\\.password=x"],
            "sasl.password",
        ),
        (vec!["--set", "kafka.sasl.mechanism=GSSAPI"], "mechanism"),
    ] {
        let mut all = vec!["template", "vap", chart.as_str()];
        all.extend_from_slice(BOOTSTRAP);
        all.extend(args.iter().copied());
        let out = tool("helm", &all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn several_releases_have_separate_names_groups_and_leases() {
    let a = template("team-a", "video", &[]);
    let b = template("team-b", "video", &["--set", "consumerGroup=runner-group"]);
    let names = |docs: &[Value]| -> BTreeSet<(String, String)> {
        docs.iter()
            .map(|d| {
                (
                    d["kind"].as_str().unwrap().to_string(),
                    d["metadata"]["name"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let shared: Vec<_> = names(&a).intersection(&names(&b)).cloned().collect();
    assert!(
        shared.is_empty(),
        "two releases in one namespace would collide on {shared:?}"
    );
    let env_a = env_of(one(&a, "Deployment"));
    let env_b = env_of(one(&b, "Deployment"));
    assert_eq!(env_value(&env_a, "RUNNER_NAME"), "team-a-vap-runner");
    assert_eq!(env_value(&env_b, "RUNNER_NAME"), "team-b-vap-runner");
    assert_eq!(env_value(&env_a, "CONSUMER_GROUP"), "team-a-vap-runner");
    assert_eq!(env_value(&env_b, "CONSUMER_GROUP"), "runner-group");
    // Each release's Role reaches only its own Lease.
    // (The other Role, in `default`, reads the `kubernetes` Service.)
    let lease_names = |docs: &[Value]| {
        of_kind(docs, "Role")
            .into_iter()
            .find(|r| r["metadata"]["namespace"] != "default")
            .expect("the release's Role")["rules"]
            .to_string()
    };
    assert!(lease_names(&a).contains("team-a-vap-runner-leader"));
    assert!(!lease_names(&a).contains("team-b"));
}

#[test]
fn optional_parts_are_off_by_default() {
    let docs = template("vap", "video", &[]);
    for kind in ["ServiceMonitor", "PodMonitor"] {
        assert!(
            of_kind(&docs, kind).is_empty(),
            "{kind} must be off by default"
        );
    }
    let service = one(&docs, "Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    let on = template("vap", "video", &[ALL_FEATURES, WITH_MONITORING].concat());
    let monitor = one(&on, "ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http-metrics");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"]
    );
    let pod_monitor = one(&on, "PodMonitor");
    assert_eq!(
        pod_monitor["spec"]["selector"]["matchLabels"],
        json!({"app.kubernetes.io/component": "worker", "runner.vap.io/runner": "vap-vap-runner"})
    );
}

/// The API version `helm template` must be told the cluster serves for the
/// admission policy to render (an install asks the cluster).
const WITH_ADMISSION_POLICY: &[&str] = &[
    "--api-versions",
    "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy",
];

#[test]
fn the_admission_policy_lease_and_namespace_are_rendered_as_asked() {
    let docs = template("vap", "video", WITH_ADMISSION_POLICY);
    let name = "vap-vap-runner.video.worker-pods.runner.vap.io";
    let policy = named(&docs, "ValidatingAdmissionPolicy", name);
    assert_eq!(
        policy["spec"]["matchConditions"][0]["expression"],
        "request.userInfo.username == \"system:serviceaccount:video:vap-vap-runner\""
    );
    let rules = policy["spec"]["validations"].to_string();
    for expected in [
        "c.image == 'ghcr.io/vap-runner/vap-runner:0.1.0'",
        "object.spec.serviceAccountName == 'vap-vap-runner-worker'",
        "'runner.vap.io/runner'].orValue('') == 'vap-vap-runner'",
        "size(object.spec.volumes) == 0",
    ] {
        assert!(rules.contains(expected), "{expected} in {rules}");
    }
    let binding = named(&docs, "ValidatingAdmissionPolicyBinding", name);
    assert_eq!(binding["spec"]["policyName"], name);
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    assert_eq!(
        binding["spec"]["matchResources"]["namespaceSelector"]["matchLabels"],
        json!({"kubernetes.io/metadata.name": "video"})
    );
    // Only where the cluster serves the API, and only when enabled.
    assert_policy_absent(name, &["admissionPolicy.enabled=false"]);

    // The chart creates the leader Lease (the Role has no create on Leases).
    let lease = one(&docs, "Lease");
    assert_eq!(lease["metadata"]["name"], "vap-vap-runner-leader");
    assert_eq!(lease["metadata"]["namespace"], "video");
    let off = template("vap", "video", &["--set", "leaderElection.enabled=false"]);
    assert!(of_kind(&off, "Lease").is_empty());

    // The namespace only when asked, with the Pod Security labels.
    assert!(of_kind(&docs, "Namespace").is_empty());
    let created = template(
        "vap",
        "default",
        &[
            "--set",
            "namespace.create=true",
            "--set",
            "namespace.name=video",
        ],
    );
    let namespace = one(&created, "Namespace");
    assert_eq!(namespace["metadata"]["name"], "video");
    // (Besides what reads the `kubernetes` Service in `default` and the
    // nodes, for the camera host policy.)
    let cluster_policy = |doc: &Value| {
        doc["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.ends_with("-cluster-policy"))
    };
    for doc in &created {
        if doc["kind"] != "Namespace" && !cluster_policy(doc) {
            assert_eq!(doc["metadata"]["namespace"], "video", "{doc}");
        }
    }
    for mode in ["enforce", "audit", "warn"] {
        assert_eq!(
            namespace["metadata"]["labels"][format!("pod-security.kubernetes.io/{mode}")],
            "restricted"
        );
    }
}

#[test]
fn the_fencing_policy_takes_the_release_lease_as_its_parameter() {
    use vap_runner::controller::fencing::{ANNOTATION_LEADER, POLICY_SUFFIX, REFUSAL_MARKER};
    let docs = template("vap", "video", WITH_ADMISSION_POLICY);
    let name = format!("vap-vap-runner.video{POLICY_SUFFIX}");
    let policy = named(&docs, "ValidatingAdmissionPolicy", &name);
    assert_eq!(
        policy["spec"]["paramKind"],
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease"})
    );
    assert_eq!(policy["spec"]["failurePolicy"], "Fail");
    let conditions = policy["spec"]["matchConditions"].to_string();
    for expected in [
        "request.userInfo.username == \\\"system:serviceaccount:video:vap-vap-runner\\\"",
        "'runner.vap.io/runner'].orValue('') == 'vap-vap-runner'",
    ] {
        assert!(conditions.contains(expected), "{expected} in {conditions}");
    }
    // The stamp the controller writes, compared with the holder's.
    let text = policy["spec"].to_string();
    for expected in [
        ANNOTATION_LEADER,
        "object.status.writer",
        "params.spec.holderIdentity",
        "params.spec.leaseTransitions",
    ] {
        assert!(text.contains(expected), "{expected} in {text}");
    }
    let validation = &policy["spec"]["validations"][0];
    for message in ["message", "messageExpression"] {
        let words = validation[message].as_str().unwrap();
        assert!(words.contains(REFUSAL_MARKER), "{message}: {words}");
        assert!(words.contains("video/vap-vap-runner-leader"), "{words}");
    }
    let binding = named(&docs, "ValidatingAdmissionPolicyBinding", &name);
    assert_eq!(binding["spec"]["policyName"], name.as_str());
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    assert_eq!(
        binding["spec"]["paramRef"],
        json!({"name": "vap-vap-runner-leader", "namespace": "video", "parameterNotFoundAction": "Deny"})
    );
    assert_eq!(
        binding["spec"]["matchResources"]["objectSelector"]["matchLabels"],
        json!({"runner.vap.io/runner": "vap-vap-runner"})
    );
    // Only with leader election, where the cluster serves the API, when enabled.
    assert_policy_absent(
        &name,
        &[
            "leaderElection.enabled=false",
            "leaderElection.fencing=false",
        ],
    );
}

/// Asserts that the admission policy `name` and its binding are rendered
/// neither where the cluster does not serve the API nor with any one of
/// `sets`.
fn assert_policy_absent(name: &str, sets: &[&str]) {
    let mut variants = vec![template("vap", "video", &[])];
    for set in sets {
        variants.push(template(
            "vap",
            "video",
            &[WITH_ADMISSION_POLICY, &["--set", set]].concat(),
        ));
    }
    for docs in variants {
        for kind in [
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ] {
            assert!(
                !of_kind(&docs, kind)
                    .iter()
                    .any(|d| d["metadata"]["name"] == name),
                "{kind} {name} rendered with one of {sets:?}"
            );
        }
    }
}

/// Removes a release (and the namespace it created and keeps) when dropped.
struct Release {
    name: String,
    namespace: String,
    delete_namespace: Option<String>,
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = Command::new("helm")
            .args(["uninstall", &self.name, "--namespace", &self.namespace])
            .output();
        if let Some(namespace) = &self.delete_namespace {
            let _ = Command::new("kubectl")
                .args(["delete", "namespace", namespace, "--wait=false"])
                .output();
        }
    }
}

/// `helm install` on the test bed with the test image `vap-runner:test` and
/// `sets`; no controller runs, so the bootstrap server is a placeholder.
fn install(release: &str, namespace: &str, sets: &[&str]) {
    let chart = chart();
    let mut args = vec!["install", release, chart.as_str(), "--namespace", namespace];
    args.extend_from_slice(BOOTSTRAP);
    for s in ["image.repository=vap-runner", "image.tag=test"]
        .iter()
        .chain(sets)
    {
        args.extend(["--set", *s]);
    }
    helm_ok(&args);
}

/// Whether `result` is a refusal by the admission policy `policy`.
fn refused_by<T: std::fmt::Debug>(result: &Result<T, kube::Error>, policy: &str) -> bool {
    matches!(result, Err(kube::Error::Api(e)) if e.message.contains(policy))
}

/// On the real apiserver, with the controller's own credentials (its
/// ServiceAccount, impersonated): the worker Pod the controller builds with
/// the chart's settings is admitted, and each Pod shape the chart's
/// admission policy forbids is refused by it. An administrator is not
/// bound by it. A namespace the chart creates carries the Pod Security
/// labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controllers_account_creates_only_worker_pods_of_the_expected_shape() {
    let bed = Bed::new("chart-vap").await;
    let ns = bed.namespace.clone();
    let release = common::unique_name("vr");
    let fullname = format!("{release}-vap-runner");
    let _release = Release {
        name: release.clone(),
        namespace: ns.clone(),
        delete_namespace: None,
    };
    // Without the fencing policy, which refuses every write of the
    // controller's account while no one holds the chart's Lease (it has
    // tests of its own, in controller_resilience.rs).
    install(&release, &ns, &["leaderElection.fencing=false"]);
    let policy = format!("{fullname}.{ns}.worker-pods.runner.vap.io");
    let user = format!("system:serviceaccount:{ns}:{fullname}");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = common::controller::impersonating_kubeconfig(dir.path(), &user);
    let as_controller: Api<Pod> = Api::namespaced(client_from(&kubeconfig).await, &ns);
    let as_admin: Api<Pod> = Api::namespaced(bed.client.clone(), &ns);

    let template = WorkerTemplate {
        runner_name: fullname.clone(),
        image: "vap-runner:test".into(),
        service_account: Some(format!("{fullname}-worker")),
        ..WorkerTemplate::default()
    };
    let worker = worker_pod_json(&template, &ns, 3);
    let create = |api: &Api<Pod>, pod: &Value| {
        let api = api.clone();
        let pod: Pod = serde_json::from_value(pod.clone()).expect("a Pod");
        async move { api.create(&dry_params(), &pod).await }
    };

    // The policy takes effect once the apiserver has loaded it.
    let mut other_image = worker.clone();
    other_image["spec"]["containers"][0]["image"] = json!("busybox:latest");
    wait_for(
        "the admission policy in effect",
        Duration::from_secs(60),
        || {
            let attempt = create(&as_controller, &other_image);
            let policy = policy.clone();
            async move { refused_by(&attempt.await, &policy).then_some(()) }
        },
    )
    .await;

    let admitted = create(&as_controller, &worker).await;
    assert!(
        admitted.is_ok(),
        "the worker Pod the controller builds is refused: {admitted:?}"
    );

    fn c(pod: &mut Value) -> &mut Value {
        &mut pod["spec"]["containers"][0]
    }
    type Shape = (&'static str, Box<dyn Fn(&mut Value)>);
    let shapes: Vec<Shape> = vec![
        (
            "another image",
            Box::new(|p| c(p)["image"] = json!("busybox:latest")),
        ),
        (
            "another ServiceAccount",
            Box::new(|p| p["spec"]["serviceAccountName"] = json!("default")),
        ),
        (
            "a token",
            Box::new(|p| p["spec"]["automountServiceAccountToken"] = json!(true)),
        ),
        (
            "a hostPath volume",
            Box::new(|p| {
                p["spec"]["volumes"] = json!([{"name": "host", "hostPath": {"path": "/"}}]);
                c(p)["volumeMounts"] = json!([{"name": "host", "mountPath": "/host"}]);
            }),
        ),
        (
            "a Secret volume",
            Box::new(|p| {
                p["spec"]["volumes"] =
                    json!([{"name": "s", "secret": {"secretName": "kafka-admin"}}]);
                c(p)["volumeMounts"] = json!([{"name": "s", "mountPath": "/s"}]);
            }),
        ),
        (
            "another scenario's camera Secret",
            Box::new(|p| {
                c(p)["env"][1]["valueFrom"]["secretKeyRef"]["name"] =
                    json!("scn-11111111-2222-3333-4444-555555555555-camera");
            }),
        ),
        (
            "another Secret by env",
            Box::new(|p| {
                c(p)["env"][1]["valueFrom"]["secretKeyRef"]["name"] = json!("kafka-admin");
            }),
        ),
        (
            "envFrom a Secret",
            Box::new(|p| c(p)["envFrom"] = json!([{"secretRef": {"name": "kafka-admin"}}])),
        ),
        (
            "a downward API field other than the node's address",
            Box::new(|p| {
                let env = c(p)["env"].as_array_mut().unwrap();
                let node = env.iter_mut().find(|e| e["name"] == "NODE_IP").unwrap();
                node["valueFrom"]["fieldRef"]["fieldPath"] = json!("spec.serviceAccountName");
            }),
        ),
        (
            // (the apiserver itself refuses privileged without escalation)
            "privileged",
            Box::new(|p| {
                let sc = &mut c(p)["securityContext"];
                sc["privileged"] = json!(true);
                sc.as_object_mut()
                    .unwrap()
                    .remove("allowPrivilegeEscalation");
            }),
        ),
        (
            "privilege escalation",
            Box::new(|p| c(p)["securityContext"]["allowPrivilegeEscalation"] = json!(true)),
        ),
        (
            "an added capability",
            Box::new(|p| c(p)["securityContext"]["capabilities"]["add"] = json!(["NET_ADMIN"])),
        ),
        (
            "root",
            Box::new(|p| {
                p["spec"]["securityContext"]["runAsUser"] = json!(0);
                p["spec"]["securityContext"]["runAsNonRoot"] = json!(false);
            }),
        ),
        (
            "a writable root filesystem",
            Box::new(|p| c(p)["securityContext"]["readOnlyRootFilesystem"] = json!(false)),
        ),
        (
            "the host network",
            Box::new(|p| p["spec"]["hostNetwork"] = json!(true)),
        ),
        (
            "the host PID namespace",
            Box::new(|p| p["spec"]["hostPID"] = json!(true)),
        ),
        (
            "a host port",
            Box::new(|p| c(p)["ports"][0]["hostPort"] = json!(8080)),
        ),
        (
            "a chosen node",
            Box::new(|p| p["spec"]["nodeName"] = json!("kwok-node-0")),
        ),
        (
            "a second container",
            Box::new(|p| {
                let mut sidecar = c(p).clone();
                sidecar["name"] = json!("sidecar");
                p["spec"]["containers"]
                    .as_array_mut()
                    .unwrap()
                    .push(sidecar);
            }),
        ),
        (
            "an init container",
            Box::new(|p| {
                let mut init = c(p).clone();
                init["name"] = json!("init");
                init.as_object_mut().unwrap().remove("livenessProbe");
                init.as_object_mut().unwrap().remove("readinessProbe");
                p["spec"]["initContainers"] = json!([init]);
            }),
        ),
        (
            "another name",
            Box::new(|p| p["metadata"]["name"] = json!("not-a-worker")),
        ),
        (
            "another runner",
            Box::new(|p| p["metadata"]["labels"]["runner.vap.io/runner"] = json!("other-runner")),
        ),
    ];
    let mut admitted_shapes = Vec::new();
    for (what, change) in &shapes {
        let mut pod = worker.clone();
        change(&mut pod);
        let result = create(&as_controller, &pod).await;
        if !refused_by(&result, &policy) {
            admitted_shapes.push(format!("{what}: {result:?}"));
        }
    }
    assert!(
        admitted_shapes.is_empty(),
        "Pod shapes the controller's account could create:\n{}",
        admitted_shapes.join("\n")
    );
    // Other users are not bound by it.
    let by_admin = create(&as_admin, &other_image).await;
    assert!(by_admin.is_ok(), "{by_admin:?}");

    // Nor may the controller's account create Leases: the chart made its own.
    let leases: Api<Lease> = Api::namespaced(client_from(&kubeconfig).await, &ns);
    let lease: Lease =
        serde_json::from_value(json!({"metadata": {"name": "another-runner-leader"}})).unwrap();
    assert!(forbidden(leases.create(&dry_params(), &lease).await));
    assert!(
        leases
            .get(&format!("{fullname}-leader"))
            .await
            .is_ok_and(|l| l.spec.is_some_and(|s| s.holder_identity.is_none())),
        "the chart's Lease exists, held by no one yet"
    );

    // A namespace the chart creates enforces the restricted standard.
    let own_ns = common::unique_name("chart-ns");
    let own_release = common::unique_name("vr");
    let _own = Release {
        name: own_release.clone(),
        namespace: ns.clone(),
        delete_namespace: Some(own_ns.clone()),
    };
    install(
        &own_release,
        &ns,
        &[
            "namespace.create=true",
            &format!("namespace.name={own_ns}"),
            "leaderElection.fencing=false",
        ],
    );
    let created = Api::<Namespace>::all(bed.client.clone())
        .get(&own_ns)
        .await
        .expect("the namespace the chart created");
    let labels = created.labels();
    for mode in ["enforce", "audit", "warn"] {
        assert_eq!(
            labels
                .get(&format!("pod-security.kubernetes.io/{mode}"))
                .map(String::as_str),
            Some("restricted"),
            "{labels:?}"
        );
    }
}

fn dry_params() -> PostParams {
    PostParams {
        dry_run: true,
        ..Default::default()
    }
}

/// Whether IPv4 range `cidr` contains address `ip`.
fn contains(cidr: &str, ip: [u8; 4]) -> bool {
    let (net, bits) = cidr.split_once('/').unwrap();
    let bits: u32 = bits.parse().unwrap();
    let net: std::net::Ipv4Addr = net.parse().unwrap();
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    (u32::from(net) & mask) == (u32::from(std::net::Ipv4Addr::from(ip)) & mask)
}

/// Every `ipBlock` peer of a NetworkPolicy's egress rules, in order: its
/// CIDR and its `except` list (empty when it has none).
fn ip_blocks(policy: &Value) -> Vec<(String, Vec<String>)> {
    policy["spec"]["egress"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|rule| rule["to"].as_array().cloned().unwrap_or_default())
        .filter_map(|peer| {
            let block = &peer["ipBlock"];
            let except = block["except"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect();
            Some((block["cidr"].as_str()?.to_string(), except))
        })
        .collect()
}

#[test]
fn network_policy_limits_worker_egress_and_blocks_the_metadata_endpoint() {
    let docs = template("vap", "video", ALL_FEATURES);
    let policy = one(&docs, "NetworkPolicy");
    let spec = &policy["spec"];
    assert_eq!(
        spec["podSelector"]["matchLabels"],
        json!({"app.kubernetes.io/component": "worker", "runner.vap.io/runner": "vap-vap-runner"})
    );
    assert_eq!(spec["policyTypes"], json!(["Egress"]));
    let metadata = [169, 254, 169, 254];
    let mut cidrs = BTreeSet::new();
    for rule in spec["egress"].as_array().unwrap() {
        let to = rule["to"].as_array().cloned().unwrap_or_default();
        if to.is_empty() {
            // Only DNS may go anywhere.
            let ports: Vec<&Value> = rule["ports"].as_array().unwrap().iter().collect();
            assert!(
                !ports.is_empty() && ports.iter().all(|p| p["port"] == 53),
                "an egress rule without destinations allows more than DNS: {rule}"
            );
        }
    }
    for (cidr, except) in ip_blocks(policy) {
        if contains(&cidr, metadata) {
            assert!(
                except.iter().any(|e| e == "169.254.169.254/32"),
                "{cidr} lets workers reach the metadata endpoint: {except:?}"
            );
        } else {
            assert!(
                except.is_empty(),
                "{cidr} has a needless except: {except:?}"
            );
        }
        cidrs.insert(cidr);
    }
    for expected in [
        "10.20.0.0/24",
        "0.0.0.0/0",
        "169.254.0.0/16",
        "192.168.10.0/24",
    ] {
        assert!(
            cidrs.contains(expected),
            "{expected} missing from {cidrs:?}"
        );
    }

    // Allowing the metadata endpoint itself is refused.
    let chart = chart();
    let out = tool(
        "helm",
        &[
            "template",
            "vap",
            chart.as_str(),
            "--set",
            "kafka.bootstrapServers=kafka.example:9092",
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "networkPolicy.cameras.cidrs={169.254.169.254/32}",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("blocked range"));
}

/// The NetworkPolicy is on without any setting: workers may reach DNS and
/// every IPv4 and IPv6 address (cameras and a Kafka outside the cluster)
/// except the metadata endpoints; `networkPolicy.enabled=false` removes it,
/// and in-cluster camera peers are added to the camera rule.
#[test]
fn the_network_policy_is_on_by_default_and_allows_cameras_anywhere_but_metadata() {
    let docs = template("vap", "video", &[]);
    let policy = one(&docs, "NetworkPolicy");
    let blocks = ip_blocks(policy);
    let expected = json!([
        [
            "0.0.0.0/0",
            [
                "169.254.169.254/32",
                "169.254.170.2/32",
                "169.254.170.23/32",
                "100.100.100.200/32"
            ]
        ],
        ["::/0", ["fd00:ec2::254/128", "fd00:ec2::23/128"]],
    ]);
    assert_eq!(json!(blocks), expected, "{policy}");
    let off = template("vap", "video", &["--set", "networkPolicy.enabled=false"]);
    assert!(of_kind(&off, "NetworkPolicy").is_empty());

    let proxy = json!({"podSelector": {"matchLabels": {"app": "rtsp-proxy"}}});
    let with_peer = template(
        "vap",
        "video",
        &[
            "--set-json",
            &format!("networkPolicy.cameras.peers=[{proxy}]"),
        ],
    );
    let policy = one(&with_peer, "NetworkPolicy");
    let camera_rule = policy["spec"]["egress"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["to"].as_array().is_some_and(|to| to.contains(&proxy)))
        .unwrap_or_else(|| panic!("no rule allows the camera peer: {policy}"));
    assert!(
        camera_rule["to"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["ipBlock"]["cidr"] == "0.0.0.0/0"),
        "the camera peer replaced the camera ranges: {camera_rule}"
    );
}

#[test]
fn values_are_documented_in_the_chart_readme() {
    fn leaves(prefix: &str, value: &serde_yaml::Value, out: &mut Vec<String>) {
        match value {
            serde_yaml::Value::Mapping(map) if !map.is_empty() => {
                for (k, v) in map {
                    let key = k.as_str().unwrap();
                    let path = if prefix.is_empty() {
                        key.to_string()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    // Kubernetes objects passed through as a whole are documented as one.
                    if [
                        "resources",
                        "podSecurityContext",
                        "securityContext",
                        "strategy",
                    ]
                    .contains(&key)
                    {
                        out.push(path);
                    } else {
                        leaves(&path, v, out);
                    }
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let text = std::fs::read_to_string(repo().join("charts/vap-runner/values.yaml")).unwrap();
    let values: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut paths = Vec::new();
    leaves("", &values, &mut paths);
    let readme = std::fs::read_to_string(repo().join("charts/vap-runner/README.md"))
        .expect("charts/vap-runner/README.md; run scripts/chart-docs");
    let missing: Vec<&String> = paths
        .iter()
        .filter(|p| !readme.contains(&format!("\n| `{p}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "values missing from the chart README's values table (document them with `# --` \
         in values.yaml, then run scripts/chart-docs): {missing:?}"
    );
}

/// Panics naming the first of `expected` that `text` (`what`) lacks.
fn says_all(what: &str, text: &str, expected: &[&str]) {
    for e in expected {
        assert!(text.contains(e), "{e:?} not in {what}:\n{text}");
    }
}

/// `helm template` with `args` after the chart, expected to fail: its stderr.
fn template_error(args: &[&str]) -> String {
    let chart = chart();
    let mut all = vec!["template", "vap", chart.as_str()];
    all.extend_from_slice(args);
    let out = tool("helm", &all);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "helm template {args:?} rendered");
    err
}

#[test]
fn a_missing_bootstrap_server_is_refused_with_the_fix() {
    let text = std::fs::read_to_string(repo().join("charts/vap-runner/values.yaml")).unwrap();
    let values: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(
        values["kafka"]["bootstrapServers"], "",
        "kafka.bootstrapServers must have no default: localhost in a Pod is the Pod itself"
    );
    for args in [
        vec![],
        vec!["--set", "kafka.bootstrapServers="],
        vec!["--set", "kafka.bootstrapServers=  "],
    ] {
        says_all(
            &format!("the error of {args:?}"),
            &template_error(&args),
            &[
                "kafka.bootstrapServers is required",
                "--set kafka.bootstrapServers=kafka.example:9092",
            ],
        );
    }
}

#[test]
fn a_misspelt_value_fails_the_schema_at_every_level() {
    for (set, typo) in [
        ("imageTag=1.0", "imageTag"),
        ("image.tags=1.0", "tags"),
        ("kafka.bootstrapServer=kafka:9092", "bootstrapServer"),
        ("kafka.tls.ca.keys=x", "keys"),
        ("kafka.sasl.worker.existingSecrets=x", "existingSecrets"),
        ("topics.result=x", "result"),
        ("controller.resources.limit.cpu=1", "limit"),
        ("controller.serviceAccount.annotation.a=b", "annotation"),
        (
            "controller.strategy.rollingupdate.maxSurge=1",
            "rollingupdate",
        ),
        ("worker.image.repo=x", "repo"),
        ("worker.resources.request.cpu=1", "request"),
        ("metrics.serviceMonitor.enable=true", "enable"),
        ("metrics.service.ports=80", "ports"),
        ("networkPolicy.kafka.cidr=10.0.0.0/8", "cidr"),
        ("networkPolicy.dns.ports[0].protocols=TCP", "protocols"),
        ("admissionPolicy.enable=false", "enable"),
    ] {
        let err = template_error(&["--set", "kafka.bootstrapServers=k:9092", "--set", set]);
        assert!(
            err.contains(&format!("additional properties '{typo}' not allowed")),
            "--set {set}: {err}"
        );
    }

    // Every object of the schema that lists its properties is closed, so a
    // new setting cannot reopen a level by accident.
    fn open_levels(path: &str, schema: &Value, out: &mut Vec<String>) {
        match schema {
            Value::Object(map) => {
                if map.get("properties").is_some_and(Value::is_object)
                    && map.get("additionalProperties") != Some(&Value::Bool(false))
                {
                    out.push(path.to_string());
                }
                for (k, v) in map {
                    // The children of "properties" are names, not schemas.
                    if k == "properties" || k == "definitions" {
                        for (name, child) in v.as_object().into_iter().flatten() {
                            open_levels(&format!("{path}/{k}/{name}"), child, out);
                        }
                    } else {
                        open_levels(&format!("{path}/{k}"), v, out);
                    }
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    open_levels(&format!("{path}/{i}"), v, out);
                }
            }
            _ => {}
        }
    }
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("charts/vap-runner/values.schema.json")).unwrap(),
    )
    .unwrap();
    let mut open = Vec::new();
    open_levels("", &schema, &mut open);
    assert!(
        open.is_empty(),
        "values.schema.json levels without \"additionalProperties\": false: {open:?}"
    );
}

/// Whether `path` (dotted) is declared in the schema: each step a property
/// (following `$ref`), or a level that takes any key.
fn declared(schema: &Value, node: &Value, path: &[&str]) -> bool {
    let node = match node["$ref"].as_str() {
        Some(r) => &schema["definitions"][r.trim_start_matches("#/definitions/")],
        None => node,
    };
    let Some((first, rest)) = path.split_first() else {
        return true;
    };
    match &node["properties"][*first] {
        Value::Null => {
            node["properties"].is_null()
                && node["type"] == "object"
                && node["additionalProperties"] != Value::Bool(false)
        }
        child => declared(schema, child, rest),
    }
}

#[test]
fn every_value_the_templates_read_is_declared_in_the_schema() {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("charts/vap-runner/values.schema.json")).unwrap(),
    )
    .unwrap();
    let mut undeclared = BTreeSet::new();
    let templates = repo().join("charts/vap-runner/templates");
    for entry in std::fs::read_dir(&templates).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, _) in text.match_indices(".Values.") {
            let rest = &text[i + ".Values.".len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_'))
                .unwrap_or(rest.len());
            let value = rest[..end].trim_end_matches('.');
            let steps: Vec<&str> = value.split('.').collect();
            if !declared(&schema, &schema, &steps) {
                undeclared.insert(format!(
                    "{}: .Values.{value}",
                    path.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }
    assert!(
        undeclared.is_empty(),
        "the templates read values the schema refuses: {undeclared:?}"
    );
}

#[test]
fn monitors_render_only_where_the_cluster_serves_their_kinds() {
    let on = [
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.podMonitor.enabled=true",
    ];
    let kinds = |docs: &[Value]| {
        (
            of_kind(docs, "ServiceMonitor").len(),
            of_kind(docs, "PodMonitor").len(),
        )
    };
    // Enabled, but the cluster has no Prometheus Operator: skipped, and said.
    assert_eq!(kinds(&template("vap", "video", &on)), (0, 0));
    let said = notes(&on);
    for kind in ["ServiceMonitor", "PodMonitor"] {
        assert!(
            said.contains(&format!("NOT CREATED: the {kind}"))
                && said.contains(&format!("does not serve monitoring.coreos.com/v1 {kind}")),
            "{said}"
        );
    }
    // Served: both, or only the one the cluster has.
    let all = template("vap", "video", &[&on[..], WITH_MONITORING].concat());
    assert_eq!(kinds(&all), (1, 1));
    let only_service = [
        &on[..],
        &["--api-versions", "monitoring.coreos.com/v1/ServiceMonitor"],
    ]
    .concat();
    assert_eq!(kinds(&template("vap", "video", &only_service)), (1, 0));
    let said = notes(&only_service);
    assert!(!said.contains("NOT CREATED: the ServiceMonitor"), "{said}");
    assert!(said.contains("NOT CREATED: the PodMonitor"), "{said}");
    // Not enabled: nothing, whatever the cluster serves, and nothing said.
    assert_eq!(kinds(&template("vap", "video", WITH_MONITORING)), (0, 0));
    assert!(!notes(&[]).contains("NOT CREATED"));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The chart's NOTES.txt as `helm install` prints it, for release `vap` in
/// namespace `video` with a bootstrap server and `extra`. `helm template`
/// leaves NOTES out and `helm install --dry-run` needs a cluster, so a copy of
/// the chart renders the same file through `tpl` with the same values and
/// capabilities, as a ConfigMap.
fn notes(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("vap-runner");
    copy_dir(&repo().join("charts/vap-runner"), &copy);
    std::fs::rename(
        copy.join("templates/NOTES.txt"),
        copy.join("notes-under-test.txt"),
    )
    .unwrap();
    std::fs::write(
        copy.join("templates/notes-under-test.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-under-test\ndata:\n  \
         notes: {{ tpl (.Files.Get \"notes-under-test.txt\") . | toJson }}\n",
    )
    .unwrap();
    let copy = copy.display().to_string();
    let mut args = vec![
        "template",
        "vap",
        copy.as_str(),
        "--namespace",
        "video",
        "--kube-version",
        KUBE_VERSION,
        "--show-only",
        "templates/notes-under-test.yaml",
    ];
    args.extend_from_slice(BOOTSTRAP);
    args.extend_from_slice(extra);
    let docs = documents(&helm_ok(&args));
    one(&docs, "ConfigMap")["data"]["notes"]
        .as_str()
        .expect("the notes")
        .to_string()
}

/// The `to_deploy` example in `text` (the JSON object on an `echo '...'`
/// line), checked as the controller checks it.
fn deploy_example(text: &str) -> vap_runner::messages::DeployRequest {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("echo '{"))
        .unwrap_or_else(|| panic!("no `echo '{{...}}'` to_deploy example in:\n{text}"));
    let json = line.split('\'').nth(1).unwrap();
    vap_runner::messages::DeployRequest::parse(Some(json.as_bytes()), None)
        .unwrap_or_else(|e| panic!("the example {json} is not a valid to_deploy: {e:?}"))
}

#[test]
fn notes_tell_the_deployed_image_the_model_and_how_to_start() {
    let text = notes(&[]);
    says_all(
        "the notes",
        &text,
        &[
            "Image:          ghcr.io/vap-runner/vap-runner:0.1.0\n",
            "Model:          mock",
            "WARNING: worker.model is \"mock\": workers publish RANDOM detections",
            "--bootstrap-server kafka.example:9092 --topic to_deploy",
            "kubectl get scenarios -n video",
            "on to_undeploy",
        ],
    );
    assert!(!text.contains("Worker image:"), "{text}");
    assert!(!text.contains("loopback"), "{text}");
    let example = deploy_example(&text);
    assert_eq!(
        example.scenario_uuid.to_string(),
        "550e8400-e29b-41d4-a716-446655440000"
    );

    // The tag deployed, not the appVersion; the worker image when it differs;
    // the model in use without the warning; the topic and namespace in use.
    let text = notes(&[
        "--set",
        "image.repository=registry.example/vap-runner",
        "--set",
        "image.tag=1.2.3",
        "--set",
        "worker.image.tag=1.2.4",
        "--set",
        "worker.model=yolo",
        "--set",
        "topics.deploy=cams.deploy",
    ]);
    says_all(
        "the notes",
        &text,
        &[
            "Image:          registry.example/vap-runner:1.2.3\n",
            "Worker image:   registry.example/vap-runner:1.2.4\n",
            "Model:          yolo",
            "--topic cams.deploy",
        ],
    );
    assert!(
        !text.contains(":0.1.0"),
        "the appVersion is not deployed:\n{text}"
    );
    assert!(!text.contains("WARNING"), "{text}");

    // A loopback broker is the Pod itself: said loudly.
    for servers in [
        "localhost:9092",
        "kafka:9092\\,127.0.0.1:9092",
        "[::1]:9092",
    ] {
        let text = notes(&["--set", &format!("kafka.bootstrapServers={servers}")]);
        assert!(
            text.contains("names a\nloopback address"),
            "{servers}: no loopback warning in:\n{text}"
        );
    }
}

#[test]
fn the_chart_readme_is_current_and_its_example_valid() {
    let out = Command::new(repo().join("scripts/chart-docs"))
        .arg("--check")
        .current_dir(repo())
        .output()
        .expect("run scripts/chart-docs --check");
    assert!(
        out.status.success(),
        "charts/vap-runner/README.md is not what scripts/chart-docs generates; \
         run scripts/chart-docs and commit the result:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let readme = std::fs::read_to_string(repo().join("charts/vap-runner/README.md")).unwrap();
    deploy_example(&readme);
    says_all(
        "the chart README",
        &readme,
        &[
            "helm install vap oci://ghcr.io/vap-runner/charts/vap-runner --version 0.1.0",
            "--set kafka.bootstrapServers=",
            "kubectl get scenarios -n video",
            "--reset-then-reuse-values",
        ],
    );
    assert!(
        !readme.contains("--reuse-values"),
        "use --reset-then-reuse-values"
    );
}

#[test]
fn chart_metadata_points_at_the_project_and_its_image() {
    let chart: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("charts/vap-runner/Chart.yaml")).unwrap(),
    )
    .unwrap();
    let values: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("charts/vap-runner/values.yaml")).unwrap(),
    )
    .unwrap();
    let project = "https://github.com/vap-runner/vap-runner";
    assert_eq!(chart["home"], project);
    assert_eq!(chart["sources"][0], project);
    assert_eq!(chart["maintainers"][0]["name"], "vap-runner maintainers");
    let icon = chart["icon"].as_str().expect("an icon");
    let in_repo = icon
        .strip_prefix("https://raw.githubusercontent.com/vap-runner/vap-runner/main/")
        .expect("the icon is a file of this repository");
    assert!(repo().join(in_repo).is_file(), "{in_repo} is missing");

    // The default image is the published one, at the chart's appVersion, and
    // Artifact Hub is told the same.
    let app_version = chart["appVersion"].as_str().unwrap();
    assert_eq!(
        values["image"]["repository"],
        "ghcr.io/vap-runner/vap-runner"
    );
    assert_eq!(values["image"]["tag"], "");
    let annotations = &chart["annotations"];
    let images: serde_yaml::Value =
        serde_yaml::from_str(annotations["artifacthub.io/images"].as_str().unwrap()).unwrap();
    assert_eq!(
        images[0]["image"].as_str(),
        Some(format!("ghcr.io/vap-runner/vap-runner:{app_version}").as_str())
    );
    let deployment = one(&template("vap", "video", &[]), "Deployment").clone();
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("ghcr.io/vap-runner/vap-runner:{app_version}")
    );

    // The licence is the image's (LICENSE and THIRD_PARTY_NOTICES.md).
    let license = annotations["artifacthub.io/license"].as_str().unwrap();
    assert_eq!(license, "Apache-2.0 AND LGPL-2.1-or-later AND BSD-2-Clause");
    assert!(repo().join("LICENSE").is_file());
    let notices = std::fs::read_to_string(repo().join("THIRD_PARTY_NOTICES.md")).unwrap();
    for licence in ["Lesser General Public License 2.1 or later", "BSD 2-Clause"] {
        assert!(
            notices.contains(licence),
            "{licence} not in THIRD_PARTY_NOTICES.md"
        );
    }
}

#[test]
fn workflows_pass_actionlint() {
    let workflows = repo().join(".github/workflows");
    for name in ["ci.yml", "e2e-kind.yml"] {
        assert!(
            workflows.join(name).exists(),
            ".github/workflows/{name} is missing"
        );
    }
    let out = tool("actionlint", &["-no-color"]);
    assert!(
        out.status.success(),
        "actionlint found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// On the test bed: install, run the controller as the chart's identity,
// uninstall
// ---------------------------------------------------------------------------

async fn client_from(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    Client::try_from(config).expect("client")
}

fn forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(e)) if e.code == 403)
}

/// Runs a helm command against the test bed (KUBECONFIG from the environment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_run_as_the_charts_identity_and_uninstall() {
    let bed = Bed::new("chart").await;
    let ns = bed.namespace.clone();
    let admin = bed.client.clone();

    // Pods in the namespace must meet the restricted Pod Security Standard:
    // the chart's controller Pod and the worker Pods the controller creates.
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest"
            }}})),
        )
        .await
        .expect("label the namespace");

    let release = common::unique_name("vr");
    let fullname = format!("{release}-vap-runner");
    let chart = chart();
    let sets = [
        format!("kafka.bootstrapServers={}", bed.bootstrap),
        format!("consumerGroup={}", bed.group),
        format!("topics.deploy={}", bed.deploy),
        format!("topics.undeploy={}", bed.undeploy),
        format!("topics.dlq={}", bed.dlq),
        format!("topics.events={}", bed.events),
        format!("topics.results={}", bed.results),
        format!("videoFileRoot={}", common::MEDIA_DIR),
        "image.repository=vap-runner".to_string(),
        "image.tag=test".to_string(),
        "log.level=DEBUG".to_string(),
        // The API server must accept the NetworkPolicy (except ⊂ cidr).
        "networkPolicy.enabled=true".to_string(),
        "networkPolicy.kafka.cidrs={127.0.0.1/32}".to_string(),
        "networkPolicy.cameras.cidrs={0.0.0.0/0,169.254.0.0/16}".to_string(),
    ];
    let mut args = vec![
        "install",
        release.as_str(),
        chart.as_str(),
        "--namespace",
        ns.as_str(),
    ];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    helm_ok(&args);

    // The ServiceAccounts the release rendered exist on the cluster; the
    // workers' one opts out of tokens there too.
    let manifest = documents(&helm_ok(&[
        "get",
        "manifest",
        release.as_str(),
        "--namespace",
        ns.as_str(),
    ]));
    let rendered: BTreeSet<String> = of_kind(&manifest, "ServiceAccount")
        .iter()
        .map(|a| a["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    let worker_account = format!("{fullname}-worker");
    assert_eq!(
        rendered,
        BTreeSet::from([fullname.clone(), worker_account.clone()]),
        "the chart renders the controller's and the workers' ServiceAccounts"
    );
    let accounts = Api::<ServiceAccount>::namespaced(admin.clone(), &ns);
    for name in &rendered {
        assert!(
            accounts.get_opt(name).await.unwrap().is_some(),
            "the ServiceAccount {name} the chart renders is not on the cluster"
        );
    }
    let live_worker_account = accounts.get(&worker_account).await.unwrap();
    assert_eq!(
        live_worker_account.automount_service_account_token,
        Some(false),
        "the workers' ServiceAccount on the cluster must opt out of tokens"
    );

    // The Deployment's Pod is created (so it passed restricted admission) and
    // lands on the fake Node, where no container runs: it never acts.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let instance = format!("app.kubernetes.io/instance={release}");
    let controller_pod = wait_for(
        "the chart's controller Pod to be admitted",
        Duration::from_secs(90),
        || {
            let pods = pods.clone();
            let instance = instance.clone();
            let ns = ns.clone();
            let admin = admin.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels(&instance))
                    .await
                    .ok()?;
                if list.items.is_empty() {
                    let events: Api<k8s_openapi::api::core::v1::Event> =
                        Api::namespaced(admin, &ns);
                    if let Ok(events) = events.list(&ListParams::default()).await {
                        for e in events.items {
                            if e.reason.as_deref() == Some("FailedCreate") {
                                panic!(
                                    "the controller Pod was refused: {}",
                                    e.message.unwrap_or_default()
                                );
                            }
                        }
                    }
                    return None;
                }
                list.items.into_iter().next()
            }
        },
    )
    .await;

    // The controller Pod runs as the chart's controller ServiceAccount and,
    // as admitted by the apiserver, has its token mounted: the controller
    // needs it, and it shows the ServiceAccount admission plugin is on, so
    // the worker Pod's missing token below is the chart's and the
    // controller's doing.
    assert_eq!(
        controller_pod
            .spec
            .as_ref()
            .unwrap()
            .service_account_name
            .as_deref(),
        Some(fullname.as_str()),
        "the controller Pod must run as the chart's controller ServiceAccount"
    );
    let controller_tokens = common::service_account_tokens(&controller_pod);
    assert!(
        controller_tokens
            .iter()
            .any(|t| t.starts_with("container controller mounts")),
        "the controller Pod was admitted without a token: {controller_tokens:?}"
    );

    // The controller's identity, as the chart wires it.
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    let deployment = deployments.get(&fullname).await.expect("the Deployment");
    let deployment = serde_json::to_value(&deployment).unwrap();
    let sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .expect("serviceAccountName")
        .to_string();
    let user = format!("system:serviceaccount:{ns}:{sa}");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = common::controller::impersonating_kubeconfig(dir.path(), &user);
    let as_controller = client_from(&kubeconfig).await;

    // Inside the Role: reading Scenarios works.
    let scenarios: Api<Scenario> = Api::namespaced(as_controller.clone(), &ns);
    scenarios
        .list(&ListParams::default().limit(1))
        .await
        .expect("the controller's identity may list Scenarios");
    // Outside it: refused.
    assert!(
        forbidden(
            Api::<Secret>::namespaced(as_controller.clone(), &ns)
                .list(&ListParams::default())
                .await
        ),
        "the controller's identity must not read Secrets"
    );
    let cluster_role: ClusterRole = serde_json::from_value(
        json!({"metadata": {"name": format!("{release}-escalate")}, "rules": []}),
    )
    .unwrap();
    assert!(
        forbidden(
            Api::<ClusterRole>::all(as_controller.clone())
                .create(&PostParams::default(), &cluster_role)
                .await
        ),
        "the controller's identity must not create ClusterRoles"
    );
    assert!(
        forbidden(
            Api::<Pod>::namespaced(as_controller.clone(), "default")
                .list(&ListParams::default())
                .await
        ),
        "the controller's identity must not see other namespaces"
    );
    assert!(
        forbidden(
            scenarios
                .delete_collection(&DeleteParams::default(), &ListParams::default())
                .await
        ),
        "the controller deletes finished Scenarios one by one, never in bulk, so its identity must not"
    );
    assert!(
        forbidden(
            Api::<Lease>::namespaced(as_controller.clone(), &ns)
                .get("another-runner-leader")
                .await
        ),
        "the controller's identity must reach only its own Lease"
    );

    // Run the controller locally with the Deployment's environment and the
    // impersonating kubeconfig.
    let pod_name = format!("{fullname}-local");
    let mut env: Vec<(String, String)> = Vec::new();
    for var in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
    {
        let name = var["name"].as_str().unwrap().to_string();
        if name == "METRICS_ADDR" {
            continue; // a free local port instead
        }
        let value = if let Some(v) = var["value"].as_str() {
            v.to_string()
        } else {
            match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.namespace") => ns.clone(),
                Some("metadata.name") => pod_name.clone(),
                other => panic!("unexpected env source for {name}: {other:?}"),
            }
        };
        env.push((name, value));
    }
    env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut controller = bed.start_controller(&env_refs);
    let _explain = bed.explain_failure(&[&controller]);

    let id = common::scenario::uuid();
    let scenario_name = common::scenario::scenario_name(&id);
    let camera = format!("{}/vtest.avi", common::MEDIA_DIR);
    bed.deploy(&id, &camera).await;
    let admin_scenarios: Api<Scenario> = Api::namespaced(admin.clone(), &ns);
    let running = bed.wait_phase(&id, Phase::Running).await;
    controller.assert_running();
    assert_eq!(
        running.labels().get("runner.vap.io/runner"),
        Some(&fullname)
    );

    let worker = pods
        .get(&common::scenario::pod_name(&id))
        .await
        .expect("the worker Pod");
    let worker_spec = worker.spec.as_ref().unwrap();
    assert_eq!(
        worker_spec.service_account_name.as_deref(),
        Some(worker_account.as_str()),
        "the worker Pod must run as the workers' ServiceAccount"
    );
    // As admitted by the apiserver: no token, opted out by the Pod itself.
    assert_eq!(
        worker_spec.automount_service_account_token,
        Some(false),
        "the worker Pod must opt out of the ServiceAccount token"
    );
    let worker_tokens = common::service_account_tokens(&worker);
    assert!(
        worker_tokens.is_empty(),
        "the worker Pod was admitted with a token: {worker_tokens:?}"
    );
    // The workers' ServiceAccount alone keeps the token out too, and a Pod
    // under it that opts in does get one: the check above can fail.
    let without_opt_out = admitted_dry_run(&pods, &worker, None).await;
    assert!(
        common::service_account_tokens(&without_opt_out).is_empty(),
        "the workers' ServiceAccount lets a Pod that does not opt out have a token: {:?}",
        common::service_account_tokens(&without_opt_out)
    );
    let opted_in = admitted_dry_run(&pods, &worker, Some(true)).await;
    assert!(
        !common::service_account_tokens(&opted_in).is_empty(),
        "a Pod opting in under the workers' ServiceAccount got no token: the ServiceAccount admission plugin is off"
    );
    assert_eq!(worker.labels().get("runner.vap.io/runner"), Some(&fullname));
    assert_eq!(
        worker_spec.containers[0].image.as_deref(),
        Some("vap-runner:test")
    );

    // Leader election went through the Role's Lease grants.
    let lease = Api::<Lease>::namespaced(admin.clone(), &ns)
        .get(&format!("{fullname}-leader"))
        .await
        .expect("the leader Lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some(pod_name.as_str())
    );

    // Events were recorded (events.k8s.io).
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), &ns);
    wait_for("an Event on the Scenario", Duration::from_secs(30), || {
        let events = events.clone();
        let scenario_name = scenario_name.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.regarding.as_ref().and_then(|r| r.name.as_deref())
                        == Some(scenario_name.as_str())
                })
                .then_some(())
        }
    })
    .await;

    // Undeploy: patching the Scenario and deleting its Pod are allowed too.
    let body = json!({"scenario_uuid": id}).to_string();
    bed.send(&bed.undeploy, Some(&id), body.as_bytes()).await;
    bed.wait_phase(&id, Phase::Stopped).await;
    controller.assert_running();
    wait_for(
        "the stopped worker Pod to be gone",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            let name = common::scenario::pod_name(&id);
            async move { matches!(pods.get_opt(&name).await, Ok(None)).then_some(()) }
        },
    )
    .await;

    // A second scenario is running when the runner is removed.
    let second = common::scenario::uuid();
    bed.deploy(&second, &camera).await;
    bed.wait_phase(&second, Phase::Running).await;

    controller.assert_running();
    let log = std::fs::read_to_string(&controller.log_path).unwrap_or_default();
    assert!(
        !log.to_ascii_lowercase().contains("forbidden"),
        "the controller hit an RBAC refusal:\n{}",
        controller.log_tail()
    );

    // Uninstall as the README says: delete the runner's Scenarios (their
    // Pods go with them), then `helm uninstall`.
    admin_scenarios
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!("runner.vap.io/runner={fullname}")),
        )
        .await
        .expect("delete the runner's Scenarios");
    let status = controller.terminate();
    assert!(
        status.success(),
        "controller exit: {status}\n{}",
        controller.log_tail()
    );
    helm_ok(&[
        "uninstall",
        release.as_str(),
        "--namespace",
        ns.as_str(),
        "--wait",
        "--timeout",
        "120s",
    ]);

    let selectors = [
        format!("app.kubernetes.io/instance={release}"),
        format!("runner.vap.io/runner={fullname}"),
    ];
    wait_for(
        "no Pod of the release to be left",
        Duration::from_secs(120),
        || {
            let pods = pods.clone();
            let selectors = selectors.clone();
            async move {
                for selector in &selectors {
                    let list = pods
                        .list(&ListParams::default().labels(selector))
                        .await
                        .ok()?;
                    if !list.items.is_empty() {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
    assert!(deployments.get_opt(&fullname).await.unwrap().is_none());
    assert!(
        Api::<Role>::namespaced(admin.clone(), &ns)
            .get_opt(&fullname)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        Api::<RoleBinding>::namespaced(admin.clone(), &ns)
            .get_opt(&fullname)
            .await
            .unwrap()
            .is_none()
    );
    assert!(accounts.get_opt(&sa).await.unwrap().is_none());
    assert!(accounts.get_opt(&worker_account).await.unwrap().is_none());
}

/// `pod`'s spec as the apiserver would admit it in a new Pod (a server-side
/// dry run: nothing is created) with `automountServiceAccountToken` set to
/// `automount`.
async fn admitted_dry_run(pods: &Api<Pod>, pod: &Pod, automount: Option<bool>) -> Pod {
    let mut spec = pod.spec.clone().expect("Pod spec");
    spec.automount_service_account_token = automount;
    spec.node_name = None;
    let copy = Pod {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("{}-probe", pod.name_any())),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    };
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    pods.create(&params, &copy)
        .await
        .unwrap_or_else(|e| panic!("dry-run create of a copy of {}: {e}", pod.name_any()))
}

/// The dashboard as the chart ships it.
fn dashboard() -> Value {
    let path = repo().join("charts/vap-runner/dashboards/vap-runner.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

const WITH_RULES: &[&str] = &[
    "--set",
    "metrics.prometheusRule.enabled=true",
    "--api-versions",
    "monitoring.coreos.com/v1/PrometheusRule",
];

#[test]
fn the_dashboard_and_alert_rules_are_off_by_default_and_gated_on_the_operator() {
    let docs = template("vap", "video", WITH_MONITORING);
    assert!(of_kind(&docs, "PrometheusRule").is_empty());
    assert!(
        of_kind(&docs, "ConfigMap").is_empty(),
        "no dashboard unless asked"
    );
    assert_eq!(
        env_value(&env_of(one(&docs, "Deployment")), "PREVIEW"),
        "false",
        "previews are off unless asked"
    );

    // Asked, but the cluster serves no PrometheusRule: skipped, and said.
    let asked = ["--set", "metrics.prometheusRule.enabled=true"];
    assert!(of_kind(&template("vap", "video", &asked), "PrometheusRule").is_empty());
    let said = notes(&asked);
    assert!(
        said.contains("NOT CREATED: the PrometheusRule")
            && said.contains("does not serve monitoring.coreos.com/v1 PrometheusRule"),
        "{said}"
    );
    assert!(!notes(WITH_RULES).contains("NOT CREATED"));

    let on = template(
        "vap",
        "video",
        &[
            WITH_RULES,
            &[
                "--set",
                "grafanaDashboard.enabled=true",
                "--set",
                "worker.preview=true",
            ],
        ]
        .concat(),
    );
    let rule = one(&on, "PrometheusRule");
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    assert_eq!(
        alerts,
        [
            "VapRunnerCameraDark",
            "VapRunnerWorkerBehind",
            "VapRunnerQueueGrowing",
            "VapRunnerDeadLetters"
        ]
    );
    let map = one(&on, "ConfigMap");
    assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(map["metadata"]["namespace"], "video");
    let shipped: Value =
        serde_json::from_str(map["data"]["vap-runner.json"].as_str().unwrap()).unwrap();
    assert_eq!(
        shipped,
        dashboard(),
        "the ConfigMap carries the dashboard file"
    );
    assert_eq!(
        env_value(&env_of(one(&on, "Deployment")), "PREVIEW"),
        "true"
    );
    // Per-scenario series need the scenario's Pod label on the worker's metrics.
    let pod_monitor = one(
        &template(
            "vap",
            "video",
            &[
                WITH_MONITORING,
                &["--set", "metrics.podMonitor.enabled=true"],
            ]
            .concat(),
        ),
        "PodMonitor",
    )
    .clone();
    assert_eq!(
        pod_monitor["spec"]["podTargetLabels"],
        json!([vap_runner::controller::names::LABEL_SCENARIO])
    );
}

/// The metric names a PromQL expression reads: identifiers outside label
/// matchers, ranges, strings and grouping clauses that are not functions,
/// keywords or Grafana variables. `label_values(metric, label)` reads `metric`.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    let expr = match expr.strip_prefix("label_values(") {
        Some(rest) => rest.rsplit_once(',').map_or(rest, |(m, _)| m),
        None => expr,
    };
    // Drop "strings", {matchers} and [ranges].
    let mut plain = String::new();
    let mut close = None;
    for c in expr.chars() {
        match (close, c) {
            (None, '"') => close = Some('"'),
            (None, '{') => close = Some('}'),
            (None, '[') => close = Some(']'),
            (Some(end), c) if c == end => close = None,
            (None, c) => plain.push(c),
            _ => {}
        }
    }
    // Drop the label lists of by (…), without (…), on (…), ignoring (…).
    let mut text = plain;
    for clause in [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        while let Some(at) = find_word(&text, clause) {
            let rest = &text[at + clause.len()..];
            let open = rest.len() - rest.trim_start().len();
            let end = if rest.trim_start().starts_with('(') {
                at + clause.len() + rest.find(')').map_or(rest.len(), |i| i + 1)
            } else {
                at + clause.len() + open
            };
            text.replace_range(at..end, " ");
        }
    }
    let keywords = ["and", "or", "unless", "bool", "offset"];
    let mut names = BTreeSet::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            let variable = start > 0 && chars[start - 1] == '$';
            let number = start > 0 && chars[start - 1].is_ascii_digit();
            if next != Some(&'(') && !variable && !number && !keywords.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Where `word` stands alone in `text`.
fn find_word(text: &str, word: &str) -> Option<usize> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word).map(|(i, _)| i).find(|&i| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}

#[test]
fn promql_metric_names_are_found_outside_labels_ranges_and_clauses() {
    let names = |e: &str| promql_metrics(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.95, sum by (scenario, le) (rate(a_bucket{namespace=~"$ns", x="y{"}[$__rate_interval])))"#
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names("min by (namespace) (q{n=\"v\"}) > 0 and deriv(q[15m]) > 1e3"),
        ["q"]
    );
    assert_eq!(
        names("sum(rate(b_total[5m])) * 60 / on (pod) group_left c"),
        ["b_total", "c"]
    );
    assert_eq!(
        names(r#"label_values(m_total{namespace=~"$namespace"}, runner_vap_io_scenario)"#),
        ["m_total"]
    );
}

/// The metric names a `/metrics` page exports, counting families that have
/// no series yet (a counter family `x` exports `x_total`, a histogram `x`
/// exports `x_bucket`, `x_sum` and `x_count`).
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') {
            if let Some(name) = line.split(['{', ' ']).next().filter(|n| !n.is_empty()) {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// Every query of the dashboard (panels and variables) and of the alert
/// rules names metrics that a live worker's or a live controller's
/// `/metrics` really exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alerts_query_only_metrics_the_runner_exports() {
    // A live worker.
    let (worker, addr) = common::spawn_clip_worker(&common::scenario::uuid(), "vtest.avi", &[]);
    let worker_metrics = common::wait_metrics(&addr, "a frame processed and one dropped", |text| {
        common::metric_value(text, "vap_worker_frames_processed_total").is_some_and(|n| n > 0.0)
            && text.contains("vap_worker_frames_dropped_total{")
    })
    .await;
    common::terminate(worker, "the worker");

    // A live controller.
    let bed = Bed::new("dashboard").await;
    let controller = bed.start_controller(&[]);
    // A deploy (phase changes) and a dead letter, so that the families
    // that show only once counted are on the page.
    bed.deploy(&common::scenario::uuid(), &common::media("vtest.avi"))
        .await;
    bed.send(&bed.deploy, Some("not-a-uuid"), b"not JSON").await;
    let controller_metrics = wait_for(
        "a phase change and a dead letter counted",
        Duration::from_secs(60),
        || async {
            let text = controller.metrics().await;
            (text.contains("vap_controller_phase_changes_total{")
                && text.contains("vap_controller_dead_lettered_total{"))
            .then_some(text)
        },
    )
    .await;

    let mut known = exported(&worker_metrics);
    known.extend(exported(&controller_metrics));
    assert!(
        known.contains("vap_worker_frames_processed_total"),
        "{known:?}"
    );
    assert!(known.contains("vap_controller_queue_length"), "{known:?}");

    let board = dashboard();
    let mut queries: Vec<(String, String)> = Vec::new();
    for panel in board["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push((
                format!("panel {:?}", panel["title"]),
                target["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    for var in board["templating"]["list"].as_array().unwrap() {
        if var["type"] == "query" {
            queries.push((
                format!("variable {:?}", var["name"]),
                var["query"]["query"].as_str().unwrap().to_string(),
            ));
        }
    }
    let rules = template("vap", "video", WITH_RULES);
    for rule in one(&rules, "PrometheusRule")["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
    {
        queries.push((
            format!("alert {:?}", rule["alert"]),
            rule["expr"].as_str().unwrap().to_string(),
        ));
    }
    assert!(queries.len() >= 20, "{queries:?}");
    for (what, expr) in &queries {
        let names = promql_metrics(expr);
        assert!(!names.is_empty(), "{what} names no metric: {expr}");
        for name in names {
            assert!(
                known.contains(&name),
                "{what} reads {name}, which neither a worker nor the controller exports: {expr}"
            );
        }
    }
}
