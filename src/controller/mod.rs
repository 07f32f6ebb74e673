//! `runner controller`: the Kubernetes operator.
//!
//! Pipeline: Kafka `to_deploy`/`to_undeploy` → the shared [`crate::ingest`] loop, whose
//! Kubernetes store ([`ingest`]) writes Scenarios →
//! [`reconcile`] admits them within MAX_WORKERS ([`admission`]) and creates one
//! worker Pod each ([`pod`]) → Pod state flows back into Scenario status and
//! onto the `scenario_events` topic ([`events`]). Each reconcile handles its own
//! Scenario: the pure [`plan`] decides from the Scenario, its Pod and the
//! admission's answer, and [`reconcile`] carries the steps out. Only the
//! holder of the leader Lease ([`leader`]) ingests and reconciles. The names,
//! labels and annotations they all agree on are in [`names`], which imports
//! none of them.

pub use crate::scenario::admission;
pub mod cluster;
pub mod crd;
pub mod events;
pub mod fencing;
pub mod health;
pub mod ingest;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod plan;
pub mod pod;
pub mod reconcile;
pub mod refusal;
pub mod secret;

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use rdkafka::consumer::StreamConsumer;
use tokio::sync::{Mutex, Notify, watch};

use crate::cli::ControllerArgs;
use crate::config::LogLevel;
use crate::ingest::{Ingest, IngestConfig};
use crate::kafka::{KafkaContext, KafkaProducer, KafkaSettings};
use crate::watchdog::Watchdog;
use crd::Scenario;
use ingest::ScenarioStore;
use leader::{LeaderElector, Leadership, Timing};
use metrics::ControllerMetrics;
use names::{LABEL_RUNNER, label_value};
use plan::Rules;
use pod::WorkerTemplate;
use reconcile::Context;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("cannot connect to Kubernetes: {0}; check KUBECONFIG or the in-cluster ServiceAccount")]
    Kubernetes(#[source] kube::Error),
    #[error("the Scenario CRD is not installed: {0}; apply crds/scenario.yaml (helm install does)")]
    CrdMissing(#[source] kube::Error),
    #[error(transparent)]
    KafkaSetting(#[from] crate::kafka::KafkaSettingError),
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
    #[error(
        "the installed Scenario CRD is not the one this controller was built for ({0}); apply this release's crds/scenario.yaml (kubectl apply -f crds/scenario.yaml, or charts/vap-runner/crds/scenario.yaml)"
    )]
    CrdStale(String),
    #[error("leadership lost; exiting so that a fresh start can compete again")]
    LeadershipLost,
    #[error(
        "cannot read or create the Secret {name} that keeps the camera digest key: {source}; the controller needs get on it and create on Secrets (the chart's Role grants both)"
    )]
    DigestKey {
        name: String,
        source: secret::DigestKeyError,
    },
    #[error("the {0} task ended unexpectedly; exiting rather than running without it")]
    TaskEnded(&'static str),
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
    let kafka = KafkaSettings::resolve(&sup.kafka, |name| std::env::var(name).ok())?;
    if kafka.uses_sasl() && args.worker_kafka.worker_kafka_sasl_secret.is_none() {
        return Err(crate::kafka::KafkaSettingError(format!(
            "KAFKA_SECURITY_PROTOCOL={} needs WORKER_KAFKA_SASL_SECRET: worker Pods log in to Kafka with the user name and password (or, with OAUTHBEARER, the OIDC client id and secret) of that Secret",
            kafka.effective_protocol().as_str()
        ))
        .into());
    }
    let servers = kafka.bootstrap.to_string();
    let namespace = args.namespace.clone();
    let runner = label_value(&args.runner_name);

    let (metrics, mut registry) = ControllerMetrics::new();
    let metrics = Arc::new(metrics);
    let health_metrics = Arc::new(health::HealthMetrics::default());
    health_metrics.register(&mut registry);
    let (bound, server) = crate::http::bind(args.http.metrics_addr, registry, metrics.clone())
        .await
        .map_err(|source| ControllerError::Metrics {
            addr: args.http.metrics_addr,
            source,
        })?;
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    let server = tokio::spawn(server);

    let timing = Timing::for_lease(Duration::from_secs(args.lease_duration_secs.max(3)));
    // Watches keep their long reads; every other call has a deadline, the
    // Lease's shorter than one renew interval.
    let client = kube_client(None).await?;
    let calls = kube_client(Some(API_CALL_TIMEOUT)).await?;
    let lease_client = kube_client(Some(timing.retry)).await?;
    let scenarios: Api<Scenario> = Api::namespaced(calls.clone(), &namespace);
    check_crd(&scenarios).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    // Fired once in-flight work has stopped: the Lease is released only then.
    let (release_tx, release_rx) = watch::channel(false);
    tokio::spawn({
        let stop_tx = stop_tx.clone();
        async move {
            crate::signals::stop_requested().await;
            let _ = stop_tx.send(true);
        }
    });

    // Ready from here on, leading or not: a standby is a healthy replica
    // (so a rolling update and `helm install --wait` with two replicas go
    // through); who leads is the `leader` gauge and the Lease. Once leading,
    // /readyz fails while the Kafka clients report a problem.
    metrics.set_ready();
    let (leadership, holds, lease_keeper) = if args.leader_election {
        let identity = args.identity.clone().unwrap_or_else(default_identity);
        let leases: Api<Lease> = Api::namespaced(lease_client, &namespace);
        let elector = LeaderElector::new(leases, &format!("{runner}-leader"), &identity, timing);
        let mut stop = stop_rx.clone();
        tokio::select! {
            (rx, holds, task) = elector.lead(release_rx) => (rx, holds, Some(task)),
            _ = stop.changed() => return Ok(()),
        }
    } else {
        (watch::channel(true).1, Leadership::always(), None)
    };
    metrics.leader.set(1);

    let kafka_err = |source| ControllerError::Kafka {
        servers: servers.clone(),
        source,
    };
    tracing::info!(kafka = %kafka.summary(), "Kafka clients");
    let kafka_context = kafka.context();
    let producer: KafkaProducer = kafka
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create_with_context(kafka_context.clone())
        .map_err(kafka_err)?;
    let consumer: StreamConsumer<KafkaContext> =
        crate::ingest::consumer_config(kafka.client_config(), &sup.consumer_group)
            .create_with_context(kafka_context.clone())
            .map_err(kafka_err)?;
    // Partitions are assigned, not subscribed: the group is never joined
    // and nothing is committed (librdkafka wants a name all the same).
    let beats_consumer: StreamConsumer<KafkaContext> = kafka
        .client_config()
        .set("group.id", format!("{}.heartbeats", sup.consumer_group))
        .set("enable.auto.commit", "false")
        .set("queued.max.messages.kbytes", "4096")
        .create_with_context(kafka_context.clone())
        .map_err(kafka_err)?;
    metrics.watch_kafka(kafka_context.health.clone());
    let probe = crate::kafka::probe(&producer, &kafka_context);

    let mut camera_policy = args
        .camera_policy
        .policy(crate::host_policy::Mode::Kubernetes);
    camera_policy.add_pod_addresses(
        std::env::var("KUBERNETES_SERVICE_HOST").ok().as_deref(),
        None,
    );
    let (cluster, learner) = if args.camera_learn_cluster {
        let every = Duration::from_secs(args.cluster_refresh_secs.max(1));
        let (rx, task) = cluster::Learner::new(calls.clone(), metrics.clone())
            .start(every)
            .await;
        (rx, Some(task))
    } else {
        tracing::info!("CAMERA_LEARN_CLUSTER=false: the cluster's own addresses are not learned");
        (watch::channel(Vec::new()).1, None)
    };
    let template = WorkerTemplate {
        runner_name: args.runner_name.clone(),
        image: args.worker_image.clone(),
        image_pull_policy: args.worker_image_pull_policy.clone(),
        kafka_bootstrap_servers: servers.clone(),
        kafka: pod::WorkerKafka::new(&kafka, &args.worker_kafka),
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
        tuning_env: args.worker.tuning_env(),
        camera_ca: args
            .worker_camera_ca_configmap
            .clone()
            .map(|name| (name, args.worker_camera_ca_key.clone())),
    };

    // One watch of the runner's Pods feeds both the cache admission counts
    // and the reconciles of their Scenarios. Reconciling waits until the
    // cache holds the complete list, so the live count is never short.
    let queue_changed = Arc::new(Notify::new());
    let (pod_store, pod_writer) = reflector::store();
    let (pod_events, pod_triggers) = futures::channel::mpsc::unbounded();
    let pod_config = watcher::Config::default().labels(&names::runner_selector(&runner));
    let pod_cache = tokio::spawn({
        let queue_changed = queue_changed.clone();
        reflector(
            pod_writer,
            watcher(
                Api::<Pod>::namespaced(client.clone(), &namespace),
                pod_config,
            )
            .modify(|p| *p = pod::cached(std::mem::take(p))),
        )
        .default_backoff()
        .for_each(move |event| {
            let pod = match event {
                Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                    if !plan::holds_slot(&pod) {
                        queue_changed.notify_one();
                    }
                    pod
                }
                Ok(watcher::Event::Delete(pod)) => {
                    queue_changed.notify_one();
                    pod
                }
                // A re-list (after the watch lapsed) ends here: Pods that went
                // meanwhile never had a Delete event, and the cache has just
                // dropped them, so their slots may be free now.
                Ok(watcher::Event::InitDone) => {
                    queue_changed.notify_one();
                    return futures::future::ready(());
                }
                Ok(watcher::Event::Init) => return futures::future::ready(()),
                Err(e) => {
                    tracing::warn!(error = %e, "watching worker Pods failed; retrying");
                    return futures::future::ready(());
                }
            };
            let _ = pod_events.unbounded_send(Ok(pod));
            futures::future::ready(())
        })
    });
    let _ = pod_store.wait_until_ready().await;

    let watchdog = Arc::new(Watchdog::new(
        Duration::from_secs(args.controller_watchdog_secs),
        Some("CONTROLLER_WATCHDOG_SECS"),
    ));
    metrics.watch_steps(watchdog.clone());
    let (wake, wakes) = futures::channel::mpsc::unbounded();
    // The Scenario cache keeps no field-ownership bookkeeping either.
    let (scenario_store, scenario_writer) = reflector::store();
    let scenario_events = reflector(
        scenario_writer,
        watcher(
            Api::<Scenario>::namespaced(client.clone(), &namespace),
            watcher::Config::default().labels(&format!("{LABEL_RUNNER}={runner}")),
        )
        .modify(|s| s.metadata.managed_fields = None),
    )
    .default_backoff()
    .applied_objects();
    let listed = scenario_store.clone();
    let controller = Controller::for_stream(scenario_events, scenario_store)
        .owns_stream(pod_triggers)
        .reconcile_on(wakes);
    let ctx = Arc::new(Context {
        client: calls.clone(),
        namespace: namespace.clone(),
        template,
        max_workers: sup.max_workers.0,
        rules: Rules {
            restart_limit: args.worker_restart_limit,
            finished_ttl: (args.finished_ttl_secs > 0)
                .then(|| Duration::from_secs(args.finished_ttl_secs)),
        },
        pods: pod_store.clone(),
        scenarios: controller.store(),
        admission: Mutex::new(Default::default()),
        wake,
        queue_changed: queue_changed.clone(),
        leadership: holds.clone(),
        recorder: Recorder::new(
            calls.clone(),
            Reporter {
                controller: "vap-runner".into(),
                instance: args.identity.clone(),
            },
        ),
        metrics: metrics.clone(),
        cluster: cluster.clone(),
        phases: events::PhasePublisher::new(producer.clone(), &args.events_topic, metrics.clone()),
        failures: Default::default(),
        health: Arc::new(health::Health::new(
            &args.stream_status,
            args.worker.heartbeat.heartbeat_secs,
            health_metrics,
        )),
        watchdog: watchdog.clone(),
    });
    let heartbeats = tokio::spawn(health::consume(
        beats_consumer,
        args.worker.heartbeat.heartbeat_topic.clone(),
        ctx.health.clone(),
    ));
    let pacer = tokio::spawn(health::pace(
        ctx.health.clone(),
        ctx.scenarios.clone(),
        namespace.clone(),
        ctx.wake.clone(),
        args.stream_status.stream_status_writes,
    ));
    let queue = tokio::spawn({
        let ctx = ctx.clone();
        async move {
            loop {
                queue_changed.notified().await;
                reconcile::wake_queue(&ctx).await;
            }
        }
    });

    let digest_key = secret::digest_key(
        &Api::namespaced(calls.clone(), &namespace),
        &args.runner_name,
        &ctx.leadership,
    )
    .await
    .map_err(|source| ControllerError::DigestKey {
        name: names::digest_key_secret_name(&args.runner_name),
        source,
    })?;
    let ingest = Ingest {
        consumer,
        producer,
        store: ScenarioStore {
            scenarios: scenarios.clone(),
            secrets: Api::namespaced(client.clone(), &namespace),
            runner_name: args.runner_name.clone(),
            queue: ingest::QueueRoom::new(
                ctx.scenarios.clone(),
                pod_store.clone(),
                sup.max_workers.0,
                sup.max_queued,
            ),
            digest_key,
            replay_horizon: ctx.rules.finished_ttl,
            leadership: ctx.leadership.clone(),
            fenced_writes: metrics.fenced_writes.clone(),
        },
        config: IngestConfig {
            deploy_topic: args.deploy_topic.clone(),
            undeploy_topic: args.undeploy_topic.clone(),
            dlq_topic: args.dlq_topic.clone(),
            video_file_root: args.worker.video_file_root.clone(),
            camera_policy,
            cluster: Some(cluster),
            max_clock_skew: std::time::Duration::from_secs(args.max_clock_skew_secs),
        },
        metrics: metrics.ingest.clone(),
        watchdog,
    };
    let mut ingest = tokio::spawn(ingest.run(stop_rx.clone()));

    let controller = controller
        .graceful_shutdown_on({
            let mut stop = stop_rx.clone();
            async move {
                let _ = stop.changed().await;
            }
        })
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    tokio::pin!(controller);
    let mut reconciling = true;
    tracing::info!(namespace = %namespace, runner = %runner, max_workers = sup.max_workers.0, max_queued = sup.max_queued, "controller running");

    // Leadership ends when the Lease keeper says so, or by this replica's
    // own clock once no renewal landed within the renew deadline, whatever
    // the keeper is doing (a keeper stuck in a call must not leave ingest
    // holding the command partitions a new leader needs). Without leader
    // election it never ends.
    let lost = async {
        let mut ticks = tokio::time::interval(timing.retry);
        loop {
            ticks.tick().await;
            if !*leadership.borrow() || !holds.holds() {
                return;
            }
        }
    };
    let mut stopping = stop_rx.clone();
    // Every task runs until shutdown: one that ends early leaves the
    // controller headless, so the process exits non-zero instead.
    // On SIGTERM the tasks wind down in any order: whatever ends first then
    // is a clean stop.
    let result = tokio::select! {
        _ = &mut controller => {
            reconciling = false;
            if *stopping.borrow_and_update() { Ok(()) } else { Err(ControllerError::TaskEnded("reconcile")) }
        },
        _ = lost => if *stopping.borrow_and_update() { Ok(()) } else { Err(ControllerError::LeadershipLost) },
        ended = &mut ingest => match ended {
            Ok(Err(e)) => Err(e.into()),
            _ if *stopping.borrow_and_update() => Ok(()),
            _ => Err(ControllerError::TaskEnded("ingest")),
        },
        _ = pod_cache => if *stopping.borrow_and_update() { Ok(()) } else { Err(ControllerError::TaskEnded("the worker Pod watch")) },
    };
    let _ = stop_tx.send(true);
    // In-flight work stops before the Lease goes: running reconciles finish
    // (the controller's graceful shutdown) and ingest ends its record, so
    // nothing of this replica's lands after a standby took over. Work still
    // running after SHUTDOWN_DRAIN keeps the Lease until it expires.
    //
    // A stop before the Scenario cache's first list ran no reconcile, and
    // its controller never ends: it holds its runner until that list, which
    // the stop has cut off.
    let listed = listed.wait_until_ready().now_or_never().is_some();
    let drained = tokio::time::timeout(SHUTDOWN_DRAIN, async {
        if reconciling && listed {
            controller.await;
        }
        if ingest.is_finished() {
            None
        } else {
            (&mut ingest).await.ok().and_then(Result::err)
        }
    })
    .await;
    if let Some(keeper) = lease_keeper {
        if drained.is_ok() {
            // Releases the Lease (on a clean stop; after a lost leadership
            // the keeper has ended already).
            let _ = release_tx.send(true);
            let _ = keeper.await;
        } else {
            tracing::warn!(
                "in-flight work did not stop within {}s; the Lease is left to expire",
                SHUTDOWN_DRAIN.as_secs()
            );
            keeper.abort();
        }
    }
    ingest.abort();
    if let Ok(Some(e)) = drained {
        return Err(e.into());
    }
    server.abort();
    probe.abort();
    queue.abort();
    heartbeats.abort();
    pacer.abort();
    if let Some(learner) = learner {
        learner.abort();
    }
    result
}

/// Timeout of every Kubernetes API call other than watches and the Lease's.
const API_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a stopping controller waits for its in-flight reconciles and
/// ingest before it gives up releasing the Lease (within the chart's
/// terminationGracePeriodSeconds of 30).
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(20);

/// A client from the environment; `timeout`, when given, bounds each response.
async fn kube_client(timeout: Option<Duration>) -> Result<Client, ControllerError> {
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| ControllerError::Kubernetes(kube::Error::InferConfig(e)))?;
    if let Some(timeout) = timeout {
        config.read_timeout = Some(timeout);
        // Count from when each request is sent, not from when its pooled
        // connection went idle.
        config.reset_reader_on_write = true;
        config.write_timeout = Some(timeout);
        config.connect_timeout = Some(timeout);
    }
    Client::try_from(config).map_err(ControllerError::Kubernetes)
}

/// Checks that the installed Scenario CRD is the one this controller was built
/// for: a server-side dry run of a Scenario with the newest fields must keep
/// them (an older CRD prunes them), and the status schema the API server
/// publishes must have every status field, `status.writer` (the fencing
/// stamp) among them. An answer that says nothing about the CRD
/// (the API server or an admission webhook unreachable, a timeout, a 5xx) is
/// retried with backoff meanwhile `/readyz` says the check is under way.
async fn check_crd(scenarios: &Api<Scenario>) -> Result<(), ControllerError> {
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        match check_crd_once(scenarios).await {
            Err(CrdCheck::Verdict(e)) => return Err(e),
            Err(CrdCheck::Unanswered(e)) => {
                let delay = backoff.next_delay(rand::random::<f64>());
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot check the Scenario CRD yet; retrying");
                tokio::time::sleep(delay).await;
            }
            Ok(()) => return Ok(()),
        }
    }
}

enum CrdCheck {
    Verdict(ControllerError),
    /// No answer about the CRD; worth asking again.
    Unanswered(kube::Error),
}

async fn check_crd_once(scenarios: &Api<Scenario>) -> Result<(), CrdCheck> {
    let unanswered =
        |e: &kube::Error| refusal::classify(e) == refusal::Refusal::Retry && !is_not_found(e);
    if let Err(e) = scenarios
        .list(&kube::api::ListParams::default().limit(1))
        .await
    {
        return Err(if unanswered(&e) {
            CrdCheck::Unanswered(e)
        } else {
            CrdCheck::Verdict(ControllerError::CrdMissing(e))
        });
    }
    let mut probe = Scenario::new(
        &format!(
            "scn-crd-check-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ),
        crd::ScenarioSpec {
            scenario_uuid: uuid::Uuid::nil().to_string(),
            worker_id: String::new(),
            camera_url: String::new(),
            fps: None,
            model: None,
            target: None,
            stopped: true,
            applied: crate::scenario::ordering::Applied {
                deploy: None,
                undeploy: Some(crate::scenario::ordering::Stamp {
                    timestamp_ms: 1,
                    offset: 0,
                }),
            },
            run: 1,
        },
    );
    probe.metadata.labels =
        Some([("runner.vap.io/crd-check".to_string(), "true".to_string())].into());
    let dry = kube::api::PostParams {
        dry_run: true,
        ..Default::default()
    };
    let kept = match scenarios.create(&dry, &probe).await {
        Ok(back) => back.spec.run == 1 && back.spec.applied == probe.spec.applied,
        Err(kube::Error::Api(e)) if e.code == 403 => return Ok(()), // cannot tell; go on
        Err(e) if unanswered(&e) => return Err(CrdCheck::Unanswered(e)),
        Err(e) => return Err(CrdCheck::Verdict(ControllerError::CrdStale(e.to_string()))),
    };
    if !kept {
        return Err(CrdCheck::Verdict(ControllerError::CrdStale(
            "it drops spec.applied and spec.run".into(),
        )));
    }
    // The status schema: a dry-run create carries no status, so it is read
    // from what the API server publishes. Without an answer (not published
    // yet, or not at all) there is nothing to judge by.
    let request = http::Request::get(crd::published_schema_path())
        .body(Vec::new())
        .expect("a GET of a fixed path is a valid request");
    let document = match scenarios
        .clone()
        .into_client()
        .request::<serde_json::Value>(request)
        .await
    {
        Ok(document) => document,
        Err(e) if unanswered(&e) => return Err(CrdCheck::Unanswered(e)),
        Err(_) => return Ok(()),
    };
    match crd::status_fields_missing(&document) {
        Some(missing) if !missing.is_empty() => Err(CrdCheck::Verdict(ControllerError::CrdStale(
            format!("it drops status.{}", missing.join(", status.")),
        ))),
        _ => Ok(()),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 404)
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "runner".into());
    format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}
