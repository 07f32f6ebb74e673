//! The `runner` command line. Every flag can also be given as an environment
//! variable (shown in `--help`), which is how the Helm chart configures Pods.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};

use crate::config::{LogFormat, LogLevel, MaxWorkers, Millis, VideoFps};
use crate::detector::Model;
use crate::detector::settings::{ClassFilter, InputSize, Threads, Threshold};
use crate::host_policy::{Cidr, ClusterAddress, HostPattern, HostPolicy, List, Mode};
use crate::worker::sink::SinkKind;
use crate::worker::transport::RtspTransportMode;

#[derive(Debug, Parser)]
#[command(
    name = "runner",
    version,
    about = "Runs video-inference workers on camera streams, one per scenario",
    long_about = "vap-runner turns \"deploy scenario X on camera Y\" messages from Kafka into \
                  running video-inference workers and streams per-frame detections back to Kafka."
)]
pub struct Cli {
    /// Log verbosity: DEBUG, INFO, WARNING or ERROR (any case).
    #[arg(
        long,
        env = "LOG_LEVEL",
        value_name = "LOG_LEVEL",
        default_value = "INFO",
        global = true
    )]
    pub log_level: LogLevel,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the Kubernetes operator: Kafka `to_deploy` → Scenario resources → worker Pods.
    Controller(Box<ControllerArgs>),
    /// Run one scenario: read a camera, sample frames, detect, publish results.
    Worker(Box<WorkerArgs>),
    /// Supervise workers as local processes (no Kubernetes), with the controller's admission rules.
    Local(Box<LocalArgs>),
    /// Print the Scenario CustomResourceDefinition as YAML.
    Crd,
    /// Print the settings reference of docs/configuration.md (Markdown).
    #[command(hide = true)]
    Docs,
}

pub use crate::kafka::KafkaArgs;

/// Settings shared by the two supervisors (`controller` and `local`).
#[derive(Debug, Clone, Args)]
pub struct SupervisorArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Kafka consumer group for `to_deploy` and `to_undeploy`.
    #[arg(
        long,
        env = "CONSUMER_GROUP",
        value_name = "CONSUMER_GROUP",
        default_value = "runner-group"
    )]
    pub consumer_group: String,

    /// Most workers this runner keeps alive at once; the rest wait in FIFO order.
    #[arg(
        long,
        env = "MAX_WORKERS",
        value_name = "MAX_WORKERS",
        default_value = "4"
    )]
    pub max_workers: MaxWorkers,

    /// Most scenarios that wait for a worker beyond the free slots; a
    /// `to_deploy` that would queue one more goes to the dead-letter topic
    /// with reason `queue_full`.
    #[arg(
        long,
        env = "MAX_QUEUED",
        value_name = "MAX_QUEUED",
        default_value = "10000"
    )]
    pub max_queued: usize,

    /// Frames per second each worker processes unless a scenario says otherwise.
    #[arg(long, env = "VIDEO_FPS", value_name = "VIDEO_FPS", default_value = "2")]
    pub video_fps: VideoFps,
}

/// Worker settings that the controller passes on to every worker Pod.
#[derive(Debug, Clone, Args)]
pub struct WorkerSettings {
    /// Kafka topic for per-frame results.
    #[arg(
        long,
        env = "RESULTS_TOPIC",
        value_name = "RESULTS_TOPIC",
        default_value = "results"
    )]
    pub results_topic: String,

    /// Detector to run.
    #[arg(long, env = "MODEL", value_enum, default_value_t = Model::Mock)]
    pub model: Model,

    /// Directory local video files must be under; without it local files are refused.
    #[arg(long, env = "VIDEO_FILE_ROOT", value_name = "VIDEO_FILE_ROOT")]
    pub video_file_root: Option<PathBuf>,

    /// PEM file of the CAs that sign https:// and rtsps:// cameras' certificates (default: the system's store).
    #[arg(long, env = "CAMERA_CA_FILE", value_name = "CAMERA_CA_FILE")]
    pub camera_ca_file: Option<PathBuf>,

    /// Check https:// and rtsps:// cameras' certificates and host names; false accepts any certificate (for cameras with self-signed ones), for every camera of this runner.
    #[arg(long, env = "CAMERA_TLS_VERIFY", value_name = "CAMERA_TLS_VERIFY", default_value_t = true, action = clap::ArgAction::Set)]
    pub camera_tls_verify: bool,

    /// Say in logs and errors why a camera did not open (refused, timed out, reset, not a video) and fail as soon as it is known. Off, every such failure reads "camera unreachable or not a video at host:port" and takes OPEN_TIMEOUT_MS, and FFmpeg's lines about its network connections are not logged, so that deploys cannot scan a network's ports; turn on to debug one camera.
    #[arg(long, env = "CAMERA_ERROR_DETAIL", value_name = "CAMERA_ERROR_DETAIL", default_value_t = false, action = clap::ArgAction::Set)]
    pub camera_error_detail: bool,

    /// Serve /preview.jpg on each worker's METRICS_ADDR (and show it on runner local's scenarios page): the latest processed frame, at most 640 pixels on its longer side, with its detections drawn, encoded only when asked. Off by default: the picture is camera content and that port has no login (docs/security.md, "Preview").
    #[arg(long, env = "PREVIEW", value_name = "PREVIEW", default_value_t = false, action = clap::ArgAction::Set)]
    pub preview: bool,

    /// How RTSP carries the video: tcp, udp, or auto (TCP, and UDP when the server refuses TCP).
    #[arg(long, env = "RTSP_TRANSPORT", value_enum, default_value_t = RtspTransportMode::Auto)]
    pub rtsp_transport: RtspTransportMode,

    #[command(flatten)]
    pub detector: DetectorArgs,

    #[command(flatten)]
    pub stream: StreamTuning,

    #[command(flatten)]
    pub heartbeat: crate::heartbeat::HeartbeatSettings,
}

impl WorkerSettings {
    /// How workers read cameras and detect, as the environment variables a
    /// worker started by the controller (a Pod) or by `runner local` (a
    /// process) reads them.
    pub fn tuning_env(&self) -> Vec<(&'static str, String)> {
        let d = &self.detector;
        let transport = self
            .rtsp_transport
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default();
        let mut env = vec![
            ("CAMERA_TLS_VERIFY", self.camera_tls_verify.to_string()),
            ("CAMERA_ERROR_DETAIL", self.camera_error_detail.to_string()),
            ("PREVIEW", self.preview.to_string()),
            ("RTSP_TRANSPORT", transport),
            ("MODEL_DIR", d.model_dir.display().to_string()),
            ("CONFIDENCE_THRESHOLD", d.confidence_threshold.to_string()),
            ("NMS_THRESHOLD", d.nms_threshold.to_string()),
            ("MODEL_INPUT_SIZE", d.model_input_size.to_string()),
            ("DETECT_CLASSES", d.detect_classes.to_string()),
            ("INFERENCE_THREADS", d.inference_threads.to_string()),
        ];
        if let Some(ca) = &self.camera_ca_file {
            env.push(("CAMERA_CA_FILE", ca.display().to_string()));
        }
        env.extend(self.stream.env());
        env.extend(self.heartbeat.env());
        env
    }
}

/// How a worker waits for, reconnects to and judges the progress of its
/// camera; the controller and `runner local` pass these on to every worker.
#[derive(Debug, Clone, Args)]
pub struct StreamTuning {
    /// Milliseconds to wait for a camera to open.
    #[arg(
        long,
        env = "OPEN_TIMEOUT_MS",
        value_name = "OPEN_TIMEOUT_MS",
        default_value = "5000"
    )]
    pub open_timeout_ms: Millis,

    /// Milliseconds to wait for a frame before treating the stream as stalled.
    #[arg(
        long,
        env = "READ_TIMEOUT_MS",
        value_name = "READ_TIMEOUT_MS",
        default_value = "5000"
    )]
    pub read_timeout_ms: Millis,

    /// Failed opens or lost streams in a row before giving up (default: never for live sources, 0 for files); a connection counts as good only if it delivered frames for at least READ_TIMEOUT_MS.
    #[arg(long, env = "MAX_RECONNECTS", value_name = "MAX_RECONNECTS")]
    pub max_reconnects: Option<u32>,

    /// First reconnect delay in milliseconds; it doubles per attempt, with jitter.
    #[arg(
        long,
        env = "RECONNECT_BASE_MS",
        value_name = "RECONNECT_BASE_MS",
        default_value = "500"
    )]
    pub reconnect_base_ms: Millis,

    /// Longest reconnect delay in milliseconds.
    #[arg(
        long,
        env = "RECONNECT_MAX_MS",
        value_name = "RECONNECT_MAX_MS",
        default_value = "30000"
    )]
    pub reconnect_max_ms: Millis,

    /// Seconds the capture loop or the detector may make no progress before /healthz fails, so Kubernetes restarts a stuck worker (a camera outage only fails /readyz).
    #[arg(
        long,
        env = "WATCHDOG_SECS",
        value_name = "WATCHDOG_SECS",
        default_value = "60"
    )]
    pub watchdog_secs: u64,
}

impl StreamTuning {
    fn env(&self) -> Vec<(&'static str, String)> {
        let ms = |m: &Millis| m.0.as_millis().to_string();
        let mut env = vec![
            ("OPEN_TIMEOUT_MS", ms(&self.open_timeout_ms)),
            ("READ_TIMEOUT_MS", ms(&self.read_timeout_ms)),
            ("RECONNECT_BASE_MS", ms(&self.reconnect_base_ms)),
            ("RECONNECT_MAX_MS", ms(&self.reconnect_max_ms)),
            ("WATCHDOG_SECS", self.watchdog_secs.to_string()),
        ];
        if let Some(n) = self.max_reconnects {
            env.push(("MAX_RECONNECTS", n.to_string()));
        }
        env
    }
}

/// Which hosts camera URLs may point at (see docs/security.md, "Camera host policy").
#[derive(Debug, Clone, Args)]
pub struct CameraPolicyArgs {
    /// Address ranges cameras must be in, comma-separated CIDRs (empty: anywhere not refused).
    #[arg(
        long,
        env = "CAMERA_ALLOW_CIDRS",
        value_name = "CAMERA_ALLOW_CIDRS",
        default_value = ""
    )]
    pub camera_allow_cidrs: List<Cidr>,

    /// Address ranges cameras must not be in, comma-separated CIDRs.
    #[arg(
        long,
        env = "CAMERA_DENY_CIDRS",
        value_name = "CAMERA_DENY_CIDRS",
        default_value = ""
    )]
    pub camera_deny_cidrs: List<Cidr>,

    /// Camera host names allowed whatever their address, comma-separated (`cam1.example.com`, `*.cams.example.com`).
    #[arg(
        long,
        env = "CAMERA_ALLOW_HOSTS",
        value_name = "CAMERA_ALLOW_HOSTS",
        default_value = ""
    )]
    pub camera_allow_hosts: List<HostPattern>,

    /// Camera host names refused, comma-separated (`cam1.example.com`, `*.internal.example.com`).
    #[arg(
        long,
        env = "CAMERA_DENY_HOSTS",
        value_name = "CAMERA_DENY_HOSTS",
        default_value = ""
    )]
    pub camera_deny_hosts: List<HostPattern>,

    /// Allow cameras on loopback addresses (default: false in Kubernetes and for `runner local`'s deploys from Kafka, true elsewhere).
    #[arg(
        long,
        env = "CAMERA_ALLOW_LOOPBACK",
        value_name = "CAMERA_ALLOW_LOOPBACK"
    )]
    pub camera_allow_loopback: Option<bool>,

    /// The cluster's Service address ranges, comma-separated CIDRs (kube-apiserver's --service-cluster-ip-range): cameras there are refused unless CAMERA_ALLOW_CIDRS contains them (an in-cluster camera proxy).
    #[arg(
        long,
        env = "CAMERA_SERVICE_CIDRS",
        value_name = "CAMERA_SERVICE_CIDRS",
        default_value = ""
    )]
    pub camera_service_cidrs: List<Cidr>,

    /// Addresses of the cluster itself that are never a camera, comma-separated `ip` (every port) or `ip:port`, optionally after `service=`, `apiserver=` or `kubelet=`; the controller gives worker Pods the ones it learned.
    #[arg(
        long,
        env = "CAMERA_CLUSTER_ADDRESSES",
        value_name = "CAMERA_CLUSTER_ADDRESSES",
        default_value = ""
    )]
    pub camera_cluster_addresses: List<ClusterAddress>,
}

impl CameraPolicyArgs {
    /// The policy these settings give in `mode`.
    pub fn policy(&self, mode: Mode) -> HostPolicy {
        let defaults = HostPolicy::defaults(mode);
        HostPolicy {
            allow_cidrs: self.camera_allow_cidrs.0.clone(),
            deny_cidrs: self.camera_deny_cidrs.0.clone(),
            allow_hosts: self.camera_allow_hosts.0.clone(),
            deny_hosts: self.camera_deny_hosts.0.clone(),
            allow_loopback: self
                .camera_allow_loopback
                .unwrap_or(defaults.allow_loopback),
            service_cidrs: self.camera_service_cidrs.0.clone(),
            cluster: self.camera_cluster_addresses.0.clone(),
        }
    }
}

/// The operational HTTP endpoint.
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// Address of /metrics, /healthz and /readyz (port 0 picks a free port).
    #[arg(
        long,
        env = "METRICS_ADDR",
        value_name = "METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub metrics_addr: SocketAddr,
}

#[derive(Debug, Clone, Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub supervisor: SupervisorArgs,

    #[command(flatten)]
    pub worker: WorkerSettings,

    #[command(flatten)]
    pub stream_status: crate::controller::health::StreamStatusArgs,

    #[command(flatten)]
    pub http: HttpArgs,

    #[command(flatten)]
    pub camera_policy: CameraPolicyArgs,

    /// Namespace of the Scenarios and worker Pods this runner manages.
    #[arg(
        long,
        env = "WATCH_NAMESPACE",
        value_name = "WATCH_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,

    /// Name of this runner: labels its Scenarios and Pods and names its Lease,
    /// so several runners can share a namespace.
    #[arg(
        long,
        env = "RUNNER_NAME",
        value_name = "RUNNER_NAME",
        default_value = "vap-runner"
    )]
    pub runner_name: String,

    /// Image of worker Pods (the same image as the controller's).
    #[arg(
        long,
        env = "WORKER_IMAGE",
        value_name = "WORKER_IMAGE",
        default_value = "vap-runner:latest"
    )]
    pub worker_image: String,

    /// imagePullPolicy of worker Pods.
    #[arg(long, env = "WORKER_IMAGE_PULL_POLICY", default_value = "IfNotPresent")]
    pub worker_image_pull_policy: String,

    /// `resources` of the worker container, as JSON.
    #[arg(
        long,
        env = "WORKER_RESOURCES",
        value_name = "WORKER_RESOURCES",
        default_value = r#"{"requests":{"cpu":"100m","memory":"96Mi"},"limits":{"cpu":"1","memory":"384Mi"}}"#
    )]
    pub worker_resources: WorkerResources,

    /// nodeSelector of worker Pods, as a JSON object.
    #[arg(
        long,
        env = "WORKER_NODE_SELECTOR",
        value_name = "WORKER_NODE_SELECTOR",
        default_value = "{}"
    )]
    pub worker_node_selector: WorkerNodeSelector,

    /// tolerations of worker Pods, as a JSON array.
    #[arg(
        long,
        env = "WORKER_TOLERATIONS",
        value_name = "WORKER_TOLERATIONS",
        default_value = "[]"
    )]
    pub worker_tolerations: WorkerTolerations,

    /// ServiceAccount of worker Pods (they need no API access; its token is not mounted).
    #[arg(
        long,
        env = "WORKER_SERVICE_ACCOUNT",
        value_name = "WORKER_SERVICE_ACCOUNT"
    )]
    pub worker_service_account: Option<String>,

    #[command(flatten)]
    pub worker_kafka: WorkerKafkaArgs,

    /// ConfigMap with the CAs that sign https:// and rtsps:// cameras' certificates, mounted into worker Pods as their CAMERA_CA_FILE.
    #[arg(
        long,
        env = "WORKER_CAMERA_CA_CONFIGMAP",
        value_name = "WORKER_CAMERA_CA_CONFIGMAP"
    )]
    pub worker_camera_ca_configmap: Option<String>,

    /// Key of the CA bundle in WORKER_CAMERA_CA_CONFIGMAP.
    #[arg(long, env = "WORKER_CAMERA_CA_KEY", default_value = "ca.crt")]
    pub worker_camera_ca_key: String,

    /// Topic of deploy requests.
    #[arg(long, env = "DEPLOY_TOPIC", default_value = "to_deploy")]
    pub deploy_topic: String,

    /// Topic of undeploy requests.
    #[arg(long, env = "UNDEPLOY_TOPIC", default_value = "to_undeploy")]
    pub undeploy_topic: String,

    /// Topic invalid requests are copied to, with the reason in a header.
    #[arg(long, env = "DLQ_TOPIC", default_value = "to_deploy.dlq")]
    pub dlq_topic: String,

    /// Seconds a command's producer-set record timestamp may lie ahead of this runner's clock; one stamped further ahead is dead-lettered (stamped_ahead), since it would win over every later command of its scenario until then.
    #[arg(
        long,
        env = "MAX_CLOCK_SKEW_SECS",
        value_name = "MAX_CLOCK_SKEW_SECS",
        default_value = "300"
    )]
    pub max_clock_skew_secs: u64,

    /// Topic every phase change is published to.
    #[arg(long, env = "EVENTS_TOPIC", default_value = "scenario_events")]
    pub events_topic: String,

    /// Take a coordination Lease before acting, so only one replica acts at a time.
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Seconds a Lease stays valid without renewal.
    #[arg(long, env = "LEASE_DURATION_SECS", default_value = "15")]
    pub lease_duration_secs: u64,

    /// This replica's identity in the Lease (defaults to POD_NAME or the host name).
    #[arg(long, env = "POD_NAME", value_name = "POD_NAME")]
    pub identity: Option<String>,

    /// Restarts of one run's worker (container restarts, and live-camera
    /// workers started again after they exited) before the scenario is Failed
    /// and its slot frees.
    #[arg(
        long,
        env = "WORKER_RESTART_LIMIT",
        value_name = "WORKER_RESTART_LIMIT",
        default_value_t = crate::scenario::restart::DEFAULT_RESTART_LIMIT
    )]
    pub worker_restart_limit: u32,

    /// Seconds a finished Scenario (Succeeded, Failed or Stopped) is kept before
    /// it and its Pod are deleted; 0 keeps them. A deploy stamped longer ago for a
    /// scenario the runner does not know is dead-lettered (stale): it cannot be
    /// told from a replay of a run already removed.
    #[arg(
        long,
        env = "FINISHED_TTL_SECS",
        value_name = "FINISHED_TTL_SECS",
        default_value = "86400"
    )]
    pub finished_ttl_secs: u64,

    /// Learn the cluster's own addresses from the API (the `kubernetes` Service's ClusterIP, the API server's endpoints, the nodes' addresses on the kubelet's ports), refuse them as cameras and pass them to worker Pods; needs get on the Service and EndpointSlice `kubernetes` in `default` and list on nodes.
    #[arg(long, env = "CAMERA_LEARN_CLUSTER", value_name = "CAMERA_LEARN_CLUSTER", default_value_t = true, action = clap::ArgAction::Set)]
    pub camera_learn_cluster: bool,

    /// Seconds between two readings of the cluster's own addresses.
    #[arg(
        long,
        env = "CLUSTER_REFRESH_SECS",
        value_name = "CLUSTER_REFRESH_SECS",
        default_value = "300"
    )]
    pub cluster_refresh_secs: u64,

    /// Seconds one reconcile, or one attempt to store a command, may run before /healthz fails and Kubernetes restarts the controller (a hung loop). Waiting for a message or out a backoff delay never counts, so an outage of Kafka or the API server does not trip it.
    #[arg(
        long,
        env = "CONTROLLER_WATCHDOG_SECS",
        value_name = "CONTROLLER_WATCHDOG_SECS",
        default_value = "300"
    )]
    pub controller_watchdog_secs: u64,
}

/// How worker Pods log in to a secured Kafka: references to Secrets the
/// controller mounts into each worker Pod (it never reads their values).
/// Worker Pods get their own credentials, so that a worker can be granted
/// write on `results` only.
#[derive(Debug, Clone, Args)]
pub struct WorkerKafkaArgs {
    /// Secret with the worker Pods' SASL user name and password, or with OAUTHBEARER their OIDC client id and secret (needed when KAFKA_SECURITY_PROTOCOL uses SASL).
    #[arg(
        long,
        env = "WORKER_KAFKA_SASL_SECRET",
        value_name = "WORKER_KAFKA_SASL_SECRET"
    )]
    pub worker_kafka_sasl_secret: Option<String>,

    /// Key of the user name in WORKER_KAFKA_SASL_SECRET.
    #[arg(
        long,
        env = "WORKER_KAFKA_SASL_USERNAME_KEY",
        default_value = "username"
    )]
    pub worker_kafka_sasl_username_key: String,

    /// Key of the password in WORKER_KAFKA_SASL_SECRET.
    #[arg(
        long,
        env = "WORKER_KAFKA_SASL_PASSWORD_KEY",
        default_value = "password"
    )]
    pub worker_kafka_sasl_password_key: String,

    /// With OAUTHBEARER: key of the worker Pods' OIDC client id in WORKER_KAFKA_SASL_SECRET.
    #[arg(
        long,
        env = "WORKER_KAFKA_SASL_CLIENT_ID_KEY",
        default_value = "client-id"
    )]
    pub worker_kafka_sasl_client_id_key: String,

    /// With OAUTHBEARER: key of the worker Pods' OIDC client secret in WORKER_KAFKA_SASL_SECRET.
    #[arg(
        long,
        env = "WORKER_KAFKA_SASL_CLIENT_SECRET_KEY",
        default_value = "client-secret"
    )]
    pub worker_kafka_sasl_client_secret_key: String,

    /// Secret holding the CA bundle that signs the brokers' certificates, for worker Pods.
    #[arg(
        long,
        env = "WORKER_KAFKA_CA_SECRET",
        value_name = "WORKER_KAFKA_CA_SECRET",
        conflicts_with = "worker_kafka_ca_configmap"
    )]
    pub worker_kafka_ca_secret: Option<String>,

    /// ConfigMap holding that CA bundle instead.
    #[arg(
        long,
        env = "WORKER_KAFKA_CA_CONFIGMAP",
        value_name = "WORKER_KAFKA_CA_CONFIGMAP"
    )]
    pub worker_kafka_ca_configmap: Option<String>,

    /// Key of the CA bundle in that Secret or ConfigMap.
    #[arg(long, env = "WORKER_KAFKA_CA_KEY", default_value = "ca.crt")]
    pub worker_kafka_ca_key: String,

    /// kubernetes.io/tls Secret (tls.crt, tls.key) with the worker Pods' client certificate, for mutual TLS.
    #[arg(
        long,
        env = "WORKER_KAFKA_CLIENT_CERT_SECRET",
        value_name = "WORKER_KAFKA_CLIENT_CERT_SECRET"
    )]
    pub worker_kafka_client_cert_secret: Option<String>,
}

/// A worker Pod setting given as JSON, parsed into its Kubernetes type when the
/// controller starts, so a wrong shape stops start-up with one line instead of
/// failing at the first Pod.
fn kube_json<T>(var: &str, shape: &str, example: &str, raw: &str) -> Result<T, String>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let refused =
        |why: String| format!("{var}={raw:?} is not {shape} ({why}); use JSON such as {example}");
    let value: serde_json::Value = serde_json::from_str(raw).map_err(|e| refused(e.to_string()))?;
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| refused(e.to_string()))?;
    // Kubernetes types skip fields they do not know: a misspelt key would be
    // dropped silently, so the value must survive the round trip unchanged.
    let back = serde_json::to_value(&typed).map_err(|e| refused(e.to_string()))?;
    if back != value {
        return Err(refused(format!(
            "it has fields the type does not know; it reads as {back}"
        )));
    }
    Ok(typed)
}

/// `resources` of the worker container.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerResources(pub ResourceRequirements);

/// `nodeSelector` of worker Pods.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerNodeSelector(pub BTreeMap<String, String>);

/// `tolerations` of worker Pods.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerTolerations(pub Vec<Toleration>);

impl std::str::FromStr for WorkerResources {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        kube_json(
            "WORKER_RESOURCES",
            "container resources",
            r#"{"requests":{"cpu":"250m","memory":"128Mi"},"limits":{"memory":"256Mi"}}"#,
            s,
        )
        .map(WorkerResources)
    }
}

impl std::str::FromStr for WorkerNodeSelector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        kube_json(
            "WORKER_NODE_SELECTOR",
            "a node selector (an object of label: value strings)",
            r#"{"kubernetes.io/arch":"amd64"}"#,
            s,
        )
        .map(WorkerNodeSelector)
    }
}

impl std::str::FromStr for WorkerTolerations {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        kube_json(
            "WORKER_TOLERATIONS",
            "a list of tolerations",
            r#"[{"key":"gpu","operator":"Exists","effect":"NoSchedule"}]"#,
            s,
        )
        .map(WorkerTolerations)
    }
}

#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    #[command(flatten)]
    pub supervisor: SupervisorArgs,

    #[command(flatten)]
    pub worker: WorkerSettings,

    #[command(flatten)]
    pub http: HttpArgs,

    #[command(flatten)]
    pub camera_policy: CameraPolicyArgs,

    /// Directory of the supervisor's state database (created if missing).
    #[arg(
        long,
        env = "STATE_DIR",
        value_name = "STATE_DIR",
        default_value = "/var/lib/vap-runner",
        global = true
    )]
    pub state_dir: PathBuf,

    /// A YAML or JSON list of scenarios to run ({scenario_uuid, camera_url, worker_id?, fps?, model?}); re-read on SIGHUP.
    #[arg(long, env = "SCENARIOS_FILE", value_name = "SCENARIOS_FILE")]
    pub scenarios: Option<PathBuf>,

    /// Consume to_deploy / to_undeploy and publish scenario_events (default: true without a scenarios file, false with one).
    #[arg(long, env = "KAFKA_INGEST", value_name = "KAFKA_INGEST", action = clap::ArgAction::Set)]
    pub kafka_ingest: Option<bool>,

    /// Exit with status 0 once every scenario has ended (only without Kafka ingest): for batch runs over files.
    #[arg(long, env = "EXIT_WHEN_DONE")]
    pub exit_when_done: bool,

    /// Topic of deploy requests.
    #[arg(long, env = "DEPLOY_TOPIC", default_value = "to_deploy")]
    pub deploy_topic: String,

    /// Topic of undeploy requests.
    #[arg(long, env = "UNDEPLOY_TOPIC", default_value = "to_undeploy")]
    pub undeploy_topic: String,

    /// Topic invalid requests are copied to, with the reason in a header.
    #[arg(long, env = "DLQ_TOPIC", default_value = "to_deploy.dlq")]
    pub dlq_topic: String,

    /// Seconds a command's producer-set record timestamp may lie ahead of this runner's clock; one stamped further ahead is dead-lettered (stamped_ahead), since it would win over every later command of its scenario until then.
    #[arg(
        long,
        env = "MAX_CLOCK_SKEW_SECS",
        value_name = "MAX_CLOCK_SKEW_SECS",
        default_value = "300"
    )]
    pub max_clock_skew_secs: u64,

    /// Topic every phase change is published to.
    #[arg(long, env = "EVENTS_TOPIC", default_value = "scenario_events")]
    pub events_topic: String,

    /// Restarts of a failing worker before its scenario is Failed.
    #[arg(
        long,
        env = "RESTART_BUDGET",
        value_name = "RESTART_BUDGET",
        default_value = "5"
    )]
    pub restart_budget: u32,

    /// First restart delay in milliseconds; it doubles per restart, with jitter.
    #[arg(
        long,
        env = "RESTART_BACKOFF_MS",
        value_name = "RESTART_BACKOFF_MS",
        default_value = "1000"
    )]
    pub restart_backoff_ms: Millis,

    /// Longest restart delay in milliseconds.
    #[arg(
        long,
        env = "RESTART_BACKOFF_MAX_MS",
        value_name = "RESTART_BACKOFF_MAX_MS",
        default_value = "60000"
    )]
    pub restart_backoff_max_ms: Millis,

    /// Milliseconds a worker gets to stop after SIGTERM before SIGKILL.
    #[arg(
        long,
        env = "STOP_GRACE_MS",
        value_name = "STOP_GRACE_MS",
        default_value = "15000"
    )]
    pub stop_grace_ms: Millis,

    #[command(flatten)]
    pub worker_limits: WorkerLimitsArgs,

    /// SASL user name of the workers, when they log in to Kafka with credentials of their own (so that they may write `results` only); default: the supervisor's.
    #[arg(
        long,
        env = "WORKER_KAFKA_SASL_USERNAME",
        value_name = "WORKER_KAFKA_SASL_USERNAME",
        requires = "worker_kafka_sasl_password_file"
    )]
    pub worker_kafka_sasl_username: Option<String>,

    /// File holding the workers' own SASL password.
    #[arg(
        long,
        env = "WORKER_KAFKA_SASL_PASSWORD_FILE",
        value_name = "WORKER_KAFKA_SASL_PASSWORD_FILE",
        requires = "worker_kafka_sasl_username"
    )]
    pub worker_kafka_sasl_password_file: Option<PathBuf>,

    /// Extra `runner worker` arguments for every worker, after `--` (for example `-- --model hog --realtime`).
    #[arg(last = true, value_name = "WORKER_ARGS")]
    pub worker_args: Vec<String>,

    #[command(subcommand)]
    pub action: Option<LocalAction>,
}

/// Resource limits of `runner local`'s worker processes.
#[derive(Debug, Clone, Args)]
pub struct WorkerLimitsArgs {
    /// Address space of each worker process in MiB (RLIMIT_AS); a worker that needs more fails alone. 0: no limit.
    #[arg(
        long,
        env = "WORKER_MEMORY_LIMIT_MB",
        value_name = "WORKER_MEMORY_LIMIT_MB",
        default_value = "4096"
    )]
    pub worker_memory_limit_mb: u64,

    /// Open files and sockets of each worker process (RLIMIT_NOFILE). 0: the supervisor's own limit.
    #[arg(
        long,
        env = "WORKER_OPEN_FILES",
        value_name = "WORKER_OPEN_FILES",
        default_value = "1024"
    )]
    pub worker_open_files: u64,

    /// CPU seconds of each worker of a source that ends (a file; RLIMIT_CPU). 0: no limit. Live cameras run for ever and have none.
    #[arg(
        long,
        env = "WORKER_CPU_SECONDS",
        value_name = "WORKER_CPU_SECONDS",
        default_value = "0"
    )]
    pub worker_cpu_seconds: u64,
}

impl WorkerLimitsArgs {
    pub fn limits(&self) -> crate::local::process::Limits {
        let set = |v: u64| (v > 0).then_some(v);
        crate::local::process::Limits {
            address_space: set(self.worker_memory_limit_mb).map(|mb| mb.saturating_mul(1 << 20)),
            open_files: set(self.worker_open_files),
            cpu_seconds: set(self.worker_cpu_seconds),
        }
    }
}

/// Variables that carry secrets: their values never show in `--help`.
pub const SECRET_VARIABLES: &[&str] = &["CAMERA_URL"];

/// The variables `runner worker` reads its settings from.
pub fn worker_variables() -> Vec<String> {
    use clap::CommandFactory;
    let cli = Cli::command();
    let worker = cli
        .find_subcommand("worker")
        .map(|w| w.get_arguments().collect::<Vec<_>>())
        .unwrap_or_default();
    cli.get_arguments()
        .chain(worker)
        .filter_map(|a| a.get_env()?.to_str().map(str::to_string))
        .collect()
}

#[derive(Debug, Clone, Subcommand)]
pub enum LocalAction {
    /// Print the scenarios in STATE_DIR (UUID, phase, PID, worker, restarts, age, queue position).
    List,
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// The scenario this worker runs (a UUID); the key of every result message.
    #[arg(long, env = "SCENARIO_UUID", value_name = "SCENARIO_UUID")]
    pub scenario_uuid: uuid::Uuid,

    /// Camera to read: rtsp://, rtsps://, http://, https://, file:///abs/path or /abs/path.
    #[arg(
        long,
        env = "CAMERA_URL",
        value_name = "CAMERA_URL",
        hide_env_values = true
    )]
    pub camera_url: CameraUrlArg,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub settings: WorkerSettings,

    #[command(flatten)]
    pub http: HttpArgs,

    #[command(flatten)]
    pub camera_policy: CameraPolicyArgs,

    /// Address of this worker's node (worker Pods get it from the downward API, status.hostIP): refused as a camera on the kubelet's ports.
    #[arg(long, env = "NODE_IP", value_name = "NODE_IP")]
    pub node_ip: Option<String>,

    /// Frames per second to process: the first frame at or after each multiple of 1/VIDEO_FPS s.
    #[arg(long, env = "VIDEO_FPS", value_name = "VIDEO_FPS", default_value = "2")]
    pub video_fps: VideoFps,

    /// Seed for the mock detector, for a reproducible sequence of detections.
    #[arg(long, env = "MOCK_SEED", value_name = "MOCK_SEED")]
    pub mock_seed: Option<u64>,

    /// Where results go.
    #[arg(long, env = "SINK", value_enum, default_value_t = SinkKind::Kafka)]
    pub sink: SinkKind,

    /// FFmpeg threads decoding the camera. One is the cheapest in CPU per frame (frame-parallel decoding of H.264 costs about a fifth more); raise it only for a stream one core cannot decode in real time.
    #[arg(
        long,
        env = "DECODE_THREADS",
        value_name = "DECODE_THREADS",
        default_value = "1"
    )]
    pub decode_threads: Threads,

    /// Frames the decoder leaves out when VIDEO_FPS needs fewer than the camera sends; a sample then lands on the first decoded frame at or after its time (docs/detectors-and-cameras.md states how far it may move).
    #[arg(long, env = "DECODE_SKIP", value_enum, default_value_t = crate::worker::decode_skip::DecodeSkip::Auto)]
    pub decode_skip: crate::worker::decode_skip::DecodeSkip,

    /// Run the detector only on frames that differ from the last one it ran on (a motion test on a small grey image, and at least every 10 s); other frames repeat its detections and their results carry "unchanged": true.
    #[arg(long, env = "DETECT_ON_CHANGE", value_name = "DETECT_ON_CHANGE", default_value_t = false, action = clap::ArgAction::Set)]
    pub detect_on_change: bool,

    /// Pace files at their own frame rate instead of as fast as the CPU allows.
    #[arg(long, env = "REALTIME")]
    pub realtime: bool,

    /// File each heartbeat replaces (`runner local` sets it for `runner local list`).
    #[arg(long, env = "HEARTBEAT_FILE", value_name = "HEARTBEAT_FILE")]
    pub heartbeat_file: Option<PathBuf>,

    /// Milliseconds to wait for pending results on shutdown.
    #[arg(
        long,
        env = "FLUSH_TIMEOUT_MS",
        value_name = "FLUSH_TIMEOUT_MS",
        default_value = "10000"
    )]
    pub flush_timeout_ms: Millis,
}

/// A camera URL as given, credentials included: the worker parses it and
/// hands it to the capture backend. Its `Debug` form is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct CameraUrlArg(pub String);

impl std::str::FromStr for CameraUrlArg {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(CameraUrlArg(s.to_string()))
    }
}

impl std::fmt::Debug for CameraUrlArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&crate::camera_url::Redacted(&self.0), f)
    }
}

/// Settings of the detector models that load files (`MODEL=yolo`).
#[derive(Debug, Clone, Args)]
pub struct DetectorArgs {
    /// Directory with yolov4-tiny.cfg, coco.names, yolov4-tiny-int8.onnx and libonnxruntime.so.1.22.1, as scripts/fetch-model prepares it (the image has them here).
    #[arg(
        long,
        env = "MODEL_DIR",
        value_name = "MODEL_DIR",
        default_value = DEFAULT_MODEL_DIR
    )]
    pub model_dir: PathBuf,

    /// Lowest confidence (0-1) of a reported detection.
    #[arg(
        long,
        env = "CONFIDENCE_THRESHOLD",
        value_name = "CONFIDENCE_THRESHOLD",
        default_value = "0.5"
    )]
    pub confidence_threshold: Threshold,

    /// Overlap (IoU, 0-1) above which the weaker of two boxes of one class is dropped.
    #[arg(
        long,
        env = "NMS_THRESHOLD",
        value_name = "NMS_THRESHOLD",
        default_value = "0.45"
    )]
    pub nms_threshold: Threshold,

    /// Side of the network input in pixels: 416 or 320 (faster, fewer small objects).
    #[arg(
        long,
        env = "MODEL_INPUT_SIZE",
        value_name = "MODEL_INPUT_SIZE",
        default_value = "416"
    )]
    pub model_input_size: InputSize,

    /// Only these classes are reported, comma-separated (for example person,car); empty = all.
    #[arg(
        long,
        env = "DETECT_CLASSES",
        value_name = "DETECT_CLASSES",
        default_value = ""
    )]
    pub detect_classes: ClassFilter,

    /// Threads for inference (ONNX Runtime's for YOLO, OpenCV's for HOG; one worker per scenario, many per node: keep it low).
    #[arg(
        long,
        env = "INFERENCE_THREADS",
        value_name = "INFERENCE_THREADS",
        default_value = "1"
    )]
    pub inference_threads: Threads,
}

/// Where the container image keeps YOLOv4-tiny's files and ONNX Runtime.
pub const DEFAULT_MODEL_DIR: &str = "/usr/local/share/vap-runner/models/yolov4-tiny";

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_controller_passes_worker_tuning_on_as_the_workers_read_it() {
        let cli = Cli::try_parse_from([
            "runner",
            "controller",
            "--rtsp-transport",
            "udp",
            "--confidence-threshold",
            "0.3",
            "--detect-classes",
            "person, car",
            "--inference-threads",
            "2",
        ])
        .unwrap();
        let Command::Controller(args) = cli.command else {
            panic!("not the controller");
        };
        let env = args.worker.tuning_env();
        let get = |name: &str| {
            env.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
                .unwrap_or_else(|| panic!("{name} is not passed on"))
        };
        assert_eq!(get("RTSP_TRANSPORT"), "udp");
        assert_eq!(get("WATCHDOG_SECS"), "60");
        assert_eq!(get("READ_TIMEOUT_MS"), "5000");
        assert!(
            !env.iter().any(|(n, _)| *n == "MAX_RECONNECTS"),
            "MAX_RECONNECTS is passed on only when set"
        );
        assert_eq!(get("CONFIDENCE_THRESHOLD"), "0.3");
        assert_eq!(get("NMS_THRESHOLD"), "0.45");
        assert_eq!(get("MODEL_INPUT_SIZE"), "416");
        assert_eq!(get("DETECT_CLASSES"), "person,car");
        assert_eq!(get("INFERENCE_THREADS"), "2");
        assert_eq!(get("MODEL_DIR"), DEFAULT_MODEL_DIR);
        // Each value parses back to itself, as a worker reads it.
        for (name, value) in &env {
            let flag = format!("--{}", name.to_ascii_lowercase().replace('_', "-"));
            Cli::try_parse_from([
                "runner",
                "worker",
                "--scenario-uuid",
                "550e8400-e29b-41d4-a716-446655440000",
                "--camera-url",
                "rtsp://cam/a",
                &flag,
                value,
            ])
            .unwrap_or_else(|e| panic!("{name}={value}: {e}"));
        }
    }

    #[test]
    fn supervisor_defaults_match_the_original_service() {
        // Read the declared defaults (the environment of the test run must not matter).
        let cli = Cli::command();
        let controller = cli.find_subcommand("controller").unwrap();
        let default = |env: &str| {
            let arg = controller
                .get_arguments()
                .chain(cli.get_arguments())
                .find(|a| a.get_env().and_then(|e| e.to_str()) == Some(env))
                .unwrap_or_else(|| panic!("no flag reads {env}"));
            arg.get_default_values()[0].to_str().unwrap().to_string()
        };
        assert_eq!(default("KAFKA_BOOTSTRAP_SERVERS"), "localhost:9092");
        assert_eq!(default("CONSUMER_GROUP"), "runner-group");
        assert_eq!(default("MAX_WORKERS"), "4");
        assert_eq!(default("MAX_QUEUED"), "10000");
        assert_eq!(default("VIDEO_FPS"), "2");
        assert_eq!(default("LOG_LEVEL"), "INFO");
    }

    #[test]
    fn worker_pod_settings_of_the_wrong_shape_fail_with_one_line() {
        for (flag, value, var) in [
            ("--worker-tolerations", "{}", "WORKER_TOLERATIONS"),
            ("--worker-node-selector", "[1]", "WORKER_NODE_SELECTOR"),
            (
                "--worker-resources",
                r#"{"request":{"cpu":"1"}}"#,
                "WORKER_RESOURCES",
            ),
            ("--worker-resources", "not json", "WORKER_RESOURCES"),
        ] {
            let err = Cli::try_parse_from(["runner", "controller", flag, value]).unwrap_err();
            let text = err.to_string();
            let first = text.lines().next().unwrap();
            assert!(
                first.contains(var) && first.contains("use JSON such as"),
                "{first}"
            );
        }
        let ok = Cli::try_parse_from([
            "runner",
            "controller",
            "--worker-tolerations",
            r#"[{"key":"gpu","operator":"Exists","effect":"NoSchedule"}]"#,
        ])
        .unwrap();
        let Command::Controller(args) = ok.command else {
            panic!("controller")
        };
        assert_eq!(args.worker_tolerations.0[0].key.as_deref(), Some("gpu"));
        assert!(args.worker_resources.0.limits.is_some());
    }

    #[test]
    fn debug_of_the_worker_settings_shows_the_camera_url_redacted() {
        let cli = Cli::try_parse_from([
            "runner",
            "worker",
            "--scenario-uuid",
            "550e8400-e29b-41d4-a716-446655440000",
            "--camera-url",
            "rtsp://admin:S3cretPw@cam.example/live?token=T0ken",
        ])
        .unwrap();
        let shown = format!("{cli:?}");
        assert!(
            shown.contains("rtsp://***@cam.example/live?token=***")
                && !shown.contains("S3cretPw")
                && !shown.contains("T0ken"),
            "{shown}"
        );
    }

    #[test]
    fn secret_values_never_show_in_help() {
        let cli = Cli::command();
        let mut commands = vec![&cli];
        commands.extend(cli.get_subcommands());
        let mut seen = 0;
        for command in commands {
            for arg in command.get_arguments() {
                let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
                if SECRET_VARIABLES.contains(&env) {
                    seen += 1;
                    assert!(
                        arg.is_hide_env_values_set(),
                        "{env} of {}",
                        command.get_name()
                    );
                }
            }
        }
        assert!(seen > 0);
    }

    #[test]
    fn worker_limits_default_to_bounded_memory_and_files() {
        let Command::Local(args) = Cli::try_parse_from(["runner", "local"]).unwrap().command else {
            panic!("local")
        };
        let limits = args.worker_limits.limits();
        assert_eq!(limits.address_space, Some(4096 << 20));
        assert_eq!(limits.open_files, Some(1024));
        assert_eq!(limits.cpu_seconds, None);
        let names = worker_variables();
        for name in ["CAMERA_URL", "SINK", "REALTIME", "LOG_LEVEL", "LOG_FORMAT"] {
            assert!(names.contains(&name.to_string()), "{name}: {names:?}");
        }
        assert!(!names.contains(&"STATE_DIR".to_string()));
    }

    #[test]
    fn invalid_values_name_the_variable() {
        let err = Cli::try_parse_from(["runner", "controller", "--max-workers", "0"]).unwrap_err();
        let first = err.to_string().lines().next().unwrap().to_string();
        assert!(
            first.contains("MAX_WORKERS") && first.contains("\"0\""),
            "{first}"
        );
    }
}
