//! `runner controller`: the Kubernetes operator.
//!
//! Pipeline: Kafka `to_deploy`/`to_undeploy` → the shared [`crate::ingest`] loop, whose
//! Kubernetes store ([`ingest`]) writes Scenarios →
//! [`reconcile`] admits them within MAX_WORKERS ([`admission`]) and creates one
//! worker Pod each ([`pod`]) → Pod state flows back into Scenario status and
//! onto the `scenario_events` topic ([`events`]). Only the holder of the
//! leader Lease ([`leader`]) ingests and reconciles.

pub use crate::scenario::admission;
pub mod crd;
pub mod events;
pub mod ingest;
pub mod leader;
pub mod metrics;
pub mod pod;
pub mod reconcile;
pub mod secret;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use rdkafka::ClientConfig;
use rdkafka::consumer::StreamConsumer;
use rdkafka::producer::FutureProducer;
use tokio::sync::{Mutex, watch};

use crate::cli::ControllerArgs;
use crate::config::LogLevel;
use crate::ingest::{Ingest, IngestConfig};
use crd::Scenario;
use ingest::ScenarioStore;
use leader::LeaderElector;
use metrics::ControllerMetrics;
use pod::{LABEL_RUNNER, WorkerTemplate, label_value};
use reconcile::Context;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("cannot connect to Kubernetes: {0}; check KUBECONFIG or the in-cluster ServiceAccount")]
    Kubernetes(#[source] kube::Error),
    #[error("the Scenario CRD is not installed: {0}; apply crds/scenario.yaml (helm install does)")]
    CrdMissing(#[source] kube::Error),
    #[error("cannot configure Kafka at KAFKA_BOOTSTRAP_SERVERS={servers}: {source}")]
    Kafka {
        servers: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("cannot serve metrics on METRICS_ADDR={addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Ingest(#[from] crate::ingest::IngestError),
    #[error("leadership lost; exiting so that a fresh start can compete again")]
    LeadershipLost,
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

pub fn main(args: ControllerArgs, log_level: LogLevel) -> Result<(), ControllerError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ControllerError::Runtime)?
        .block_on(run(args, log_level))
}

async fn run(args: ControllerArgs, log_level: LogLevel) -> Result<(), ControllerError> {
    let sup = &args.supervisor;
    let servers = sup.kafka.kafka_bootstrap_servers.to_string();
    let namespace = args.namespace.clone();
    let runner = label_value(&args.runner_name);

    let (metrics, registry) = ControllerMetrics::new();
    let metrics = Arc::new(metrics);
    let (bound, server) = crate::http::bind(args.http.metrics_addr, registry, metrics.clone())
        .await
        .map_err(|source| ControllerError::Metrics {
            addr: args.http.metrics_addr,
            source,
        })?;
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    let server = tokio::spawn(server);

    let client = Client::try_default()
        .await
        .map_err(ControllerError::Kubernetes)?;
    let scenarios: Api<Scenario> = Api::namespaced(client.clone(), &namespace);
    scenarios
        .list(&kube::api::ListParams::default().limit(1))
        .await
        .map_err(ControllerError::CrdMissing)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn({
        let stop_tx = stop_tx.clone();
        async move {
            crate::signals::stop_requested().await;
            let _ = stop_tx.send(true);
        }
    });

    let mut leadership = if args.leader_election {
        let identity = args.identity.clone().unwrap_or_else(default_identity);
        let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
        let elector = LeaderElector::new(
            leases,
            &format!("{runner}-leader"),
            &identity,
            Duration::from_secs(args.lease_duration_secs.max(3)),
        );
        let mut stop = stop_rx.clone();
        tokio::select! {
            rx = elector.lead() => rx,
            _ = stop.changed() => return Ok(()),
        }
    } else {
        watch::channel(true).1
    };
    metrics.leader.set(1);

    let kafka_err = |source| ControllerError::Kafka {
        servers: servers.clone(),
        source,
    };
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .map_err(kafka_err)?;
    let consumer: StreamConsumer = crate::ingest::consumer_config(&servers, &sup.consumer_group)
        .create()
        .map_err(kafka_err)?;

    let camera_policy = args
        .camera_policy
        .policy(crate::host_policy::Mode::Kubernetes);
    let template = WorkerTemplate {
        runner_name: args.runner_name.clone(),
        image: args.worker_image.clone(),
        image_pull_policy: args.worker_image_pull_policy.clone(),
        kafka_bootstrap_servers: servers.clone(),
        results_topic: args.worker.results_topic.clone(),
        default_fps: sup.video_fps.get(),
        default_model: args.worker.model.as_str().into(),
        video_file_root: args
            .worker
            .video_file_root
            .as_ref()
            .map(|p| p.display().to_string()),
        log_level: log_level.to_string(),
        resources: args.worker_resources.0.clone(),
        node_selector: args.worker_node_selector.0.clone(),
        tolerations: args.worker_tolerations.0.clone(),
        service_account: args.worker_service_account.clone(),
        camera_policy_env: camera_policy.worker_env(),
    };

    let selector = format!("{LABEL_RUNNER}={runner}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pod_config = watcher::Config::default().labels(&pod::runner_selector(&runner));
    let controller = Controller::new(
        scenarios.clone(),
        watcher::Config::default().labels(&selector),
    )
    .owns(pods.clone(), pod_config.clone());
    let scenario_store = controller.store();
    // A second cache of the runner's Pods, read by admission. Reconciling
    // starts only once it holds the complete list, so the live count after a
    // restart is never short.
    let (pod_store, pod_writer) = reflector::store();
    let pod_cache = tokio::spawn(
        reflector(pod_writer, watcher(pods, pod_config))
            .default_backoff()
            .applied_objects()
            .for_each(|_| futures::future::ready(())),
    );
    let _ = pod_store.wait_until_ready().await;

    let ctx = Arc::new(Context {
        client: client.clone(),
        namespace: namespace.clone(),
        template,
        max_workers: sup.max_workers.0,
        pods: pod_store.clone(),
        scenarios: scenario_store.clone(),
        admission: Mutex::new(Default::default()),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "vap-runner".into(),
                instance: args.identity.clone(),
            },
        ),
        metrics: metrics.clone(),
        phases: events::PhasePublisher::new(producer.clone(), &args.events_topic, metrics.clone()),
        failures: Default::default(),
    });

    let ingest = Ingest {
        consumer,
        producer,
        store: ScenarioStore {
            scenarios: scenarios.clone(),
            secrets: Api::namespaced(client.clone(), &namespace),
            runner_name: args.runner_name.clone(),
        },
        config: IngestConfig {
            deploy_topic: args.deploy_topic.clone(),
            undeploy_topic: args.undeploy_topic.clone(),
            dlq_topic: args.dlq_topic.clone(),
            video_file_root: args.worker.video_file_root.clone(),
            camera_policy,
        },
        metrics: metrics.ingest.clone(),
    };
    let ingest = tokio::spawn(ingest.run(stop_rx.clone()));

    let controller = controller
        .graceful_shutdown_on({
            let mut stop = stop_rx.clone();
            async move {
                let _ = stop.changed().await;
            }
        })
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    metrics.set_ready();
    tracing::info!(namespace = %namespace, runner = %runner, max_workers = sup.max_workers.0, "controller running");

    let lost = async {
        while *leadership.borrow() {
            if leadership.changed().await.is_err() {
                return;
            }
        }
    };
    let result = tokio::select! {
        _ = controller => Ok(()),
        _ = lost => Err(ControllerError::LeadershipLost),
    };
    let _ = stop_tx.send(true);
    if let Ok(Err(e)) = ingest.await {
        return Err(e.into());
    }
    server.abort();
    pod_cache.abort();
    result
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "runner".into());
    format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}
