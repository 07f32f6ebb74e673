//! Building a worker Pod is a pure function of the Scenario and the runner's
//! configuration; applying it is the reconciler's job.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodStatus, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;
use serde_json::json;

use super::crd::Scenario;
use super::names::*;
use crate::host_policy::{ClusterAddress, List};

/// The worker's setting with the cluster addresses its camera host policy refuses.
pub const CLUSTER_ADDRESSES_ENV: &str = "CAMERA_CLUSTER_ADDRESSES";

/// The worker's setting with its node's address (the downward API's `status.hostIP`).
pub const NODE_IP_ENV: &str = "NODE_IP";

/// Port of the worker's /metrics, /healthz and /readyz.
pub const WORKER_HTTP_PORT: u16 = 8080;

/// Everything about worker Pods that comes from the runner's configuration.
#[derive(Debug, Clone)]
pub struct WorkerTemplate {
    pub runner_name: String,
    pub image: String,
    pub image_pull_policy: String,
    pub kafka_bootstrap_servers: String,
    /// How worker Pods log in to Kafka to produce.
    pub kafka: WorkerKafka,
    pub results_topic: String,
    pub default_fps: f64,
    pub default_model: String,
    pub video_file_root: Option<String>,
    pub log_level: String,
    pub resources: ResourceRequirements,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub service_account: Option<String>,
    /// The camera host policy as worker environment variables.
    pub camera_policy_env: Vec<(&'static str, String)>,
    /// How workers read cameras and detect (RTSP transport, detector
    /// settings) as worker environment variables.
    pub tuning_env: Vec<(&'static str, String)>,
    /// A ConfigMap (name, key) with the CAs of `https://` and `rtsps://`
    /// cameras, mounted into worker Pods as their `CAMERA_CA_FILE`.
    pub camera_ca: Option<(String, String)>,
}

impl Default for WorkerTemplate {
    fn default() -> Self {
        WorkerTemplate {
            runner_name: "vap-runner".into(),
            image: "vap-runner:latest".into(),
            image_pull_policy: "IfNotPresent".into(),
            kafka_bootstrap_servers: "localhost:9092".into(),
            kafka: WorkerKafka::default(),
            results_topic: "results".into(),
            default_fps: 2.0,
            default_model: "mock".into(),
            video_file_root: None,
            log_level: "INFO".into(),
            resources: ResourceRequirements {
                requests: Some(quantities(&[("cpu", "100m"), ("memory", "96Mi")])),
                limits: Some(quantities(&[("cpu", "1"), ("memory", "384Mi")])),
                ..Default::default()
            },
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            service_account: None,
            camera_policy_env: Vec::new(),
            tuning_env: Vec::new(),
            camera_ca: None,
        }
    }
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect()
}

/// Where worker Pods find the Kafka files the controller mounts for them.
pub const KAFKA_FILES_DIR: &str = "/etc/vap-runner/kafka";

/// Where worker Pods find the CAs of their cameras, when the controller mounts them.
pub const CAMERA_CA_DIR: &str = "/etc/vap-runner/camera-ca";

/// Where a worker Pod's CA bundle for Kafka comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KafkaCa {
    Secret { name: String, key: String },
    ConfigMap { name: String, key: String },
}

/// What worker Pods need to produce to a secured Kafka, and nothing more:
/// the protocol and mechanism, the properties given on the command line
/// (which carry no secret), and references to the Secrets (never their
/// values) that hold their own credentials, CA and client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerKafka {
    pub protocol: Option<String>,
    pub mechanism: Option<String>,
    /// `KAFKA_PROPERTIES`: one `key=value` a line.
    pub properties: String,
    /// Secret name, user name key, password key (with OAUTHBEARER: the
    /// OIDC client id key and client secret key).
    pub sasl: Option<(String, String, String)>,
    /// With OAUTHBEARER: the OIDC settings without secrets, as variables.
    pub oidc: Vec<(String, String)>,
    pub ca: Option<KafkaCa>,
    /// A `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`) for mutual TLS.
    pub client_cert: Option<String>,
}

impl WorkerKafka {
    /// The worker Pods' part of the controller's Kafka settings.
    pub fn new(
        kafka: &crate::kafka::KafkaSettings,
        args: &crate::cli::WorkerKafkaArgs,
    ) -> WorkerKafka {
        let protocol = kafka.effective_protocol();
        let oauth = kafka.effective_mechanism().as_deref() == Some("OAUTHBEARER");
        let ca = match (
            &args.worker_kafka_ca_secret,
            &args.worker_kafka_ca_configmap,
        ) {
            (Some(name), _) => Some(KafkaCa::Secret {
                name: name.clone(),
                key: args.worker_kafka_ca_key.clone(),
            }),
            (None, Some(name)) => Some(KafkaCa::ConfigMap {
                name: name.clone(),
                key: args.worker_kafka_ca_key.clone(),
            }),
            (None, None) => None,
        };
        WorkerKafka {
            protocol: (protocol != crate::kafka::SecurityProtocol::Plaintext)
                .then(|| protocol.as_str().to_string()),
            mechanism: kafka.effective_mechanism(),
            properties: kafka.properties_text(),
            sasl: args.worker_kafka_sasl_secret.clone().map(|name| {
                if oauth {
                    (
                        name,
                        args.worker_kafka_sasl_client_id_key.clone(),
                        args.worker_kafka_sasl_client_secret_key.clone(),
                    )
                } else {
                    (
                        name,
                        args.worker_kafka_sasl_username_key.clone(),
                        args.worker_kafka_sasl_password_key.clone(),
                    )
                }
            }),
            oidc: if oauth {
                kafka.oidc.public_env()
            } else {
                Vec::new()
            },
            ca,
            client_cert: args.worker_kafka_client_cert_secret.clone(),
        }
    }

    fn oauth(&self) -> bool {
        self.mechanism.as_deref() == Some("OAUTHBEARER")
    }

    /// Environment variables, volumes and volume mounts of the worker container.
    fn pod_parts(
        &self,
    ) -> (
        Vec<serde_json::Value>,
        Vec<serde_json::Value>,
        Vec<serde_json::Value>,
    ) {
        let (mut env, mut volumes, mut mounts) = (Vec::new(), Vec::new(), Vec::new());
        if let Some(p) = &self.protocol {
            env.push(json!({"name": "KAFKA_SECURITY_PROTOCOL", "value": p}));
        }
        if let Some(m) = &self.mechanism {
            env.push(json!({"name": "KAFKA_SASL_MECHANISM", "value": m}));
        }
        if !self.properties.is_empty() {
            env.push(json!({"name": "KAFKA_PROPERTIES", "value": self.properties}));
        }
        let mut mount = |name: &str, source: serde_json::Value| {
            let dir = format!("{KAFKA_FILES_DIR}/{}", name.trim_start_matches("kafka-"));
            let mut volume = json!({"name": name});
            for (k, v) in source.as_object().into_iter().flatten() {
                volume[k] = v.clone();
            }
            volumes.push(volume);
            mounts.push(json!({"name": name, "mountPath": dir, "readOnly": true}));
            dir
        };
        for (name, value) in &self.oidc {
            env.push(json!({"name": name, "value": value}));
        }
        if let Some((secret, id_key, secret_key)) = self.sasl.as_ref().filter(|_| self.oauth()) {
            let dir = mount(
                "kafka-sasl",
                json!({"secret": {"secretName": secret, "defaultMode": 0o444, "items": [
                    {"key": secret_key, "path": "client-secret"},
                ]}}),
            );
            env.push(
                json!({"name": "KAFKA_SASL_OAUTHBEARER_CLIENT_ID", "valueFrom":
                {"secretKeyRef": {"name": secret, "key": id_key}}}),
            );
            env.push(json!({"name": "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE",
                "value": format!("{dir}/client-secret")}));
        } else if let Some((secret, user_key, password_key)) = &self.sasl {
            let dir = mount(
                "kafka-sasl",
                json!({"secret": {"secretName": secret, "defaultMode": 0o444, "items": [
                    {"key": user_key, "path": "username"},
                    {"key": password_key, "path": "password"},
                ]}}),
            );
            env.push(
                json!({"name": "KAFKA_SASL_USERNAME_FILE", "value": format!("{dir}/username")}),
            );
            env.push(
                json!({"name": "KAFKA_SASL_PASSWORD_FILE", "value": format!("{dir}/password")}),
            );
        }
        if let Some(ca) = &self.ca {
            let items = |key: &str| json!([{"key": key, "path": "ca.crt"}]);
            let source = match ca {
                KafkaCa::Secret { name, key } => {
                    json!({"secret": {"secretName": name, "items": items(key)}})
                }
                KafkaCa::ConfigMap { name, key } => {
                    json!({"configMap": {"name": name, "items": items(key)}})
                }
            };
            let dir = mount("kafka-ca", source);
            env.push(json!({"name": "KAFKA_SSL_CA_LOCATION", "value": format!("{dir}/ca.crt")}));
        }
        if let Some(secret) = &self.client_cert {
            let dir = mount(
                "kafka-client",
                json!({"secret": {"secretName": secret, "defaultMode": 0o444, "items": [
                    {"key": "tls.crt", "path": "tls.crt"},
                    {"key": "tls.key", "path": "tls.key"},
                ]}}),
            );
            env.push(json!({"name": "KAFKA_SSL_CERTIFICATE_LOCATION", "value": format!("{dir}/tls.crt")}));
            env.push(json!({"name": "KAFKA_SSL_KEY_LOCATION", "value": format!("{dir}/tls.key")}));
        }
        (env, volumes, mounts)
    }
}

/// The worker Pod for `scenario`, with no learned cluster address.
pub fn build(scenario: &Scenario, t: &WorkerTemplate) -> Pod {
    build_learned(scenario, t, &[])
}

/// The worker Pod for `scenario`. Its camera host policy refuses the
/// cluster addresses the controller `learned` (in `CAMERA_CLUSTER_ADDRESSES`,
/// beside the configured ones) and its own node's address on the kubelet's
/// ports (`NODE_IP`, from the downward API). Only new Pods get a newer
/// list: the controller never compares a running Pod's spec with this one.
pub fn build_learned(scenario: &Scenario, t: &WorkerTemplate, learned: &[ClusterAddress]) -> Pod {
    let spec = &scenario.spec;
    let name = pod_name(&spec.scenario_uuid);
    let owner = super::crd::owner_reference(scenario);
    let fps = spec.fps.unwrap_or(t.default_fps);
    let model = spec
        .model
        .clone()
        .unwrap_or_else(|| t.default_model.clone());
    let mut env = vec![
        json!({"name": "SCENARIO_UUID", "value": spec.scenario_uuid}),
        json!(super::secret::camera_url_env(&spec.scenario_uuid, spec.run)),
        json!({"name": "VIDEO_FPS", "value": fps.to_string()}),
        json!({"name": "MODEL", "value": model}),
        json!({"name": "KAFKA_BOOTSTRAP_SERVERS", "value": t.kafka_bootstrap_servers}),
        json!({"name": "RESULTS_TOPIC", "value": t.results_topic}),
        json!({"name": "LOG_LEVEL", "value": t.log_level}),
        json!({"name": "METRICS_ADDR", "value": format!("0.0.0.0:{WORKER_HTTP_PORT}")}),
    ];
    if let Some(root) = &t.video_file_root {
        env.push(json!({"name": "VIDEO_FILE_ROOT", "value": root}));
    }
    let (kafka_env, mut volumes, mut mounts) = t.kafka.pod_parts();
    env.extend(kafka_env);
    let mut cluster = List(learned.to_vec()).to_string();
    for (name, value) in t.camera_policy_env.iter().chain(&t.tuning_env) {
        if *name == "CAMERA_CA_FILE" && t.camera_ca.is_some() {
            continue; // the mounted ConfigMap's file instead
        }
        if *name == CLUSTER_ADDRESSES_ENV {
            cluster = [value.as_str(), &cluster]
                .into_iter()
                .filter(|v| !v.is_empty())
                .collect::<Vec<_>>()
                .join(",");
            continue;
        }
        env.push(json!({"name": name, "value": value}));
    }
    env.push(json!({"name": CLUSTER_ADDRESSES_ENV, "value": cluster}));
    env.push(
        json!({"name": NODE_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}),
    );
    if let Some((config_map, key)) = &t.camera_ca {
        volumes.push(json!({"name": "camera-ca", "configMap": {
            "name": config_map, "items": [{"key": key, "path": "ca.crt"}]}}));
        mounts.push(json!({"name": "camera-ca", "mountPath": CAMERA_CA_DIR, "readOnly": true}));
        env.push(json!({"name": "CAMERA_CA_FILE", "value": format!("{CAMERA_CA_DIR}/ca.crt")}));
    }
    let probe = |path: &str, period: u32| {
        json!({
            "httpGet": {"path": path, "port": "http"},
            "periodSeconds": period,
            "failureThreshold": 3,
            "timeoutSeconds": 2
        })
    };
    let mut pod_spec = json!({
        "restartPolicy": "OnFailure",
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "terminationGracePeriodSeconds": 30,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"}
        },
        "containers": [{
            "name": WORKER_CONTAINER,
            "image": t.image,
            "imagePullPolicy": t.image_pull_policy,
            "args": ["worker"],
            "env": env,
            "ports": [{"name": "http", "containerPort": WORKER_HTTP_PORT}],
            "resources": t.resources,
            "livenessProbe": probe("/healthz", 10),
            "readinessProbe": probe("/readyz", 5),
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "runAsNonRoot": true,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"}
            }
        }],
        "nodeSelector": t.node_selector,
        "tolerations": t.tolerations,
    });
    if !volumes.is_empty() {
        pod_spec["volumes"] = json!(volumes);
        pod_spec["containers"][0]["volumeMounts"] = json!(mounts);
    }
    if let Some(sa) = &t.service_account {
        pod_spec["serviceAccountName"] = json!(sa);
    }
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": scenario.namespace(),
            "labels": {
                LABEL_NAME: "vap-runner",
                LABEL_COMPONENT: "worker",
                LABEL_MANAGED_BY: "vap-runner",
                LABEL_RUNNER: label_value(&t.runner_name),
                LABEL_SCENARIO: label_value(&spec.scenario_uuid),
                LABEL_WORKER_ID: label_value(&spec.worker_id),
                LABEL_RUN: spec.run.to_string(),
            },
            "ownerReferences": owner.map(|o| vec![o]).unwrap_or_default(),
        },
        "spec": pod_spec,
    });
    serde_json::from_value(pod).expect("the worker Pod template is valid Pod JSON")
}

/// What the controller's Pod cache keeps of a worker Pod: its identity
/// (name, uid, labels, annotations, owner, deletion mark) and the status the
/// plan reads (phase, reason, message, conditions, container states). The
/// spec and the field-ownership bookkeeping are dropped: with hundreds of
/// workers they are most of the cache and nothing reads them.
pub fn cached(mut pod: Pod) -> Pod {
    pod.metadata.managed_fields = None;
    pod.spec = None;
    pod.status = pod.status.map(|s| PodStatus {
        phase: s.phase,
        reason: s.reason,
        message: s.message,
        conditions: s.conditions,
        container_statuses: s.container_statuses,
        ..PodStatus::default()
    });
    pod
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::crd::ScenarioSpec;
    use serde_json::Value;

    fn scenario() -> Scenario {
        let mut s = Scenario::new(
            &scenario_name("550E8400-e29b-41d4-a716-446655440000"),
            ScenarioSpec {
                scenario_uuid: "550e8400-e29b-41d4-a716-446655440000".into(),
                worker_id: "11223344-5566-7788-99aa-bbccddeeeff0".into(),
                camera_url: "rtsp://user:pw@cam/stream".into(),
                fps: None,
                model: Some("hog".into()),
                target: None,
                stopped: false,
                applied: Default::default(),
                run: 3,
            },
        );
        s.metadata.namespace = Some("vap".into());
        s.metadata.uid = Some("uid-1".into());
        s
    }

    #[test]
    fn pod_is_named_owned_labelled_and_locked_down() {
        let pod = build(&scenario(), &WorkerTemplate::default());
        assert_eq!(
            pod.metadata.name.as_deref(),
            Some("worker-550e8400-e29b-41d4-a716-446655440000")
        );
        assert_eq!(pod.metadata.namespace.as_deref(), Some("vap"));
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "Scenario");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(
            owner.block_owner_deletion,
            Some(true),
            "a foreground delete waits for it"
        );
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(
            labels[LABEL_WORKER_ID],
            "11223344-5566-7788-99aa-bbccddeeeff0"
        );
        assert_eq!(labels[LABEL_RUNNER], "vap-runner");
        assert_eq!(labels[LABEL_RUN], "3");

        let spec = pod.spec.unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("OnFailure"));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let c = &spec.containers[0];
        assert_eq!(c.args.as_ref().unwrap(), &vec!["worker".to_string()]);
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
            &vec!["ALL".to_string()]
        );
        let env: std::collections::BTreeMap<_, _> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.as_str(), e.value.clone().unwrap_or_default()))
            .collect();
        assert_eq!(env["SCENARIO_UUID"], "550e8400-e29b-41d4-a716-446655440000");
        assert_eq!(env["VIDEO_FPS"], "2");
        assert_eq!(env["MODEL"], "hog");
        assert!(!env.contains_key("VIDEO_FILE_ROOT"));
        let camera = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "CAMERA_URL");
        let camera = camera.expect("CAMERA_URL env");
        assert_eq!(
            camera.value, None,
            "the camera URL is never a literal value"
        );
        let from = camera.value_from.as_ref().unwrap().secret_key_ref.as_ref();
        // The Secret of the Scenario's current run (the fixture's run 3).
        assert_eq!(
            from.unwrap().name,
            "scn-550e8400-e29b-41d4-a716-446655440000-camera-r3"
        );
    }

    #[test]
    fn the_workers_camera_and_detector_settings_reach_the_pod() {
        let t = WorkerTemplate {
            tuning_env: vec![
                ("RTSP_TRANSPORT", "udp".into()),
                ("CONFIDENCE_THRESHOLD", "0.3".into()),
            ],
            ..Default::default()
        };
        let pod = build(&scenario(), &t);
        let env = &pod.spec.unwrap().containers[0].env.clone().unwrap();
        let value = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(value("RTSP_TRANSPORT").as_deref(), Some("udp"));
        assert_eq!(value("CONFIDENCE_THRESHOLD").as_deref(), Some("0.3"));
    }

    #[test]
    fn label_values_are_made_safe() {
        assert_eq!(label_value("ok-1.2_3"), "ok-1.2_3");
        assert_eq!(label_value("-a b/c-"), "a_b_c");
        assert_eq!(label_value(&"x".repeat(100)).len(), 63);
    }

    #[test]
    fn worker_pods_get_their_own_kafka_secrets_by_reference_only() {
        let t = WorkerTemplate {
            kafka: WorkerKafka {
                protocol: Some("sasl_ssl".into()),
                mechanism: Some("SCRAM-SHA-512".into()),
                properties: "client.rack=a".into(),
                sasl: Some(("worker-kafka".into(), "user".into(), "pass".into())),
                ca: Some(KafkaCa::ConfigMap {
                    name: "kafka-ca".into(),
                    key: "ca.pem".into(),
                }),
                client_cert: Some("worker-tls".into()),
                oidc: Vec::new(),
            },
            ..WorkerTemplate::default()
        };
        let pod = serde_json::to_value(build(&scenario(), &t)).unwrap();
        let container = &pod["spec"]["containers"][0];
        let env: BTreeMap<String, String> = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| Some((e["name"].as_str()?.into(), e["value"].as_str()?.into())))
            .collect();
        assert_eq!(env["KAFKA_SECURITY_PROTOCOL"], "sasl_ssl");
        assert_eq!(env["KAFKA_SASL_MECHANISM"], "SCRAM-SHA-512");
        assert_eq!(env["KAFKA_PROPERTIES"], "client.rack=a");
        assert_eq!(
            env["KAFKA_SASL_PASSWORD_FILE"],
            "/etc/vap-runner/kafka/sasl/password"
        );
        assert_eq!(
            env["KAFKA_SSL_CA_LOCATION"],
            "/etc/vap-runner/kafka/ca/ca.crt"
        );
        assert_eq!(
            env["KAFKA_SSL_KEY_LOCATION"],
            "/etc/vap-runner/kafka/client/tls.key"
        );
        assert!(!env.contains_key("KAFKA_SASL_PASSWORD"));
        let volumes = pod["spec"]["volumes"].as_array().unwrap();
        assert_eq!(volumes[0]["secret"]["secretName"], "worker-kafka");
        assert_eq!(volumes[0]["secret"]["items"][1]["key"], "pass");
        assert_eq!(volumes[1]["configMap"]["name"], "kafka-ca");
        assert_eq!(volumes[2]["secret"]["secretName"], "worker-tls");
        let mounts = container["volumeMounts"].as_array().unwrap();
        assert!(mounts.iter().all(|m| m["readOnly"] == true));
        // Without secured Kafka, nothing is added.
        let plain = serde_json::to_value(build(&scenario(), &WorkerTemplate::default())).unwrap();
        assert!(plain["spec"].get("volumes").is_none());
    }

    #[test]
    fn worker_pods_with_oauthbearer_get_their_client_id_and_secret_by_reference_only() {
        let t = WorkerTemplate {
            kafka: WorkerKafka {
                protocol: Some("sasl_ssl".into()),
                mechanism: Some("OAUTHBEARER".into()),
                sasl: Some(("worker-oidc".into(), "id".into(), "secret".into())),
                oidc: vec![(
                    "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL".into(),
                    "https://idp.example/token".into(),
                )],
                ..WorkerKafka::default()
            },
            ..WorkerTemplate::default()
        };
        let pod = serde_json::to_value(build(&scenario(), &t)).unwrap();
        let container = &pod["spec"]["containers"][0];
        let env = container["env"].as_array().unwrap();
        let var = |name: &str| env.iter().find(|e| e["name"] == name).cloned();
        assert_eq!(
            var("KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL").unwrap()["value"],
            "https://idp.example/token"
        );
        assert_eq!(
            var("KAFKA_SASL_OAUTHBEARER_CLIENT_ID").unwrap()["valueFrom"]["secretKeyRef"],
            serde_json::json!({"name": "worker-oidc", "key": "id"})
        );
        assert_eq!(
            var("KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE").unwrap()["value"],
            "/etc/vap-runner/kafka/sasl/client-secret"
        );
        assert!(var("KAFKA_SASL_USERNAME_FILE").is_none());
        let volume = &pod["spec"]["volumes"][0]["secret"];
        assert_eq!(volume["secretName"], "worker-oidc");
        assert_eq!(
            volume["items"],
            serde_json::json!([{"key": "secret", "path": "client-secret"}])
        );
    }

    #[test]
    fn worker_pods_mount_the_camera_ca_configmap_as_their_camera_ca_file() {
        let t = WorkerTemplate {
            tuning_env: vec![
                ("CAMERA_CA_FILE", "/controller/path.pem".into()),
                ("CAMERA_TLS_VERIFY", "true".into()),
            ],
            camera_ca: Some(("camera-cas".into(), "bundle.pem".into())),
            ..WorkerTemplate::default()
        };
        let pod = serde_json::to_value(build(&scenario(), &t)).unwrap();
        let container = &pod["spec"]["containers"][0];
        let ca_files: Vec<&Value> = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == "CAMERA_CA_FILE")
            .collect();
        assert_eq!(ca_files.len(), 1);
        assert_eq!(ca_files[0]["value"], "/etc/vap-runner/camera-ca/ca.crt");
        assert_eq!(pod["spec"]["volumes"][0]["configMap"]["name"], "camera-cas");
        assert_eq!(
            pod["spec"]["volumes"][0]["configMap"]["items"][0]["key"],
            "bundle.pem"
        );
        assert_eq!(container["volumeMounts"][0]["mountPath"], CAMERA_CA_DIR);
    }

    #[test]
    fn worker_pods_refuse_the_learned_cluster_addresses_and_their_node() {
        let t = WorkerTemplate {
            camera_policy_env: vec![
                ("CAMERA_ALLOW_LOOPBACK", "false".into()),
                (CLUSTER_ADDRESSES_ENV, "10.0.0.9:8080".into()),
            ],
            ..WorkerTemplate::default()
        };
        let learned: List<ClusterAddress> = "service=10.96.0.1,kubelet=172.18.0.3:10250"
            .parse()
            .unwrap();
        let pod = serde_json::to_value(build_learned(&scenario(), &t, &learned.0)).unwrap();
        let env = pod["spec"]["containers"][0]["env"].as_array().unwrap();
        let of = |name: &str| -> Vec<&Value> { env.iter().filter(|e| e["name"] == name).collect() };
        let cluster = of(CLUSTER_ADDRESSES_ENV);
        assert_eq!(cluster.len(), 1);
        assert_eq!(
            cluster[0]["value"],
            "10.0.0.9:8080,service=10.96.0.1,kubelet=172.18.0.3:10250"
        );
        let node = of(NODE_IP_ENV);
        assert_eq!(node.len(), 1);
        assert_eq!(
            node[0]["valueFrom"]["fieldRef"]["fieldPath"],
            "status.hostIP"
        );
        // The worker reads them back as its policy does.
        assert_eq!(
            cluster[0]["value"]
                .as_str()
                .unwrap()
                .parse::<List<ClusterAddress>>()
                .unwrap()
                .0
                .len(),
            3
        );
        let plain = serde_json::to_value(build(&scenario(), &WorkerTemplate::default())).unwrap();
        let env = plain["spec"]["containers"][0]["env"].as_array().unwrap();
        assert!(
            env.iter()
                .any(|e| e["name"] == CLUSTER_ADDRESSES_ENV && e["value"] == "")
        );
    }
}
