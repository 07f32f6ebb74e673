//! `runner local`: the runner without Kubernetes. Workers are child processes
//! of the supervisor instead of Pods; what the runner decides (command
//! ordering, admission, lifecycle, events) is the shared [`crate::scenario`].
//!
//! Pipeline: Kafka `to_deploy`/`to_undeploy` (the shared [`crate::ingest`]
//! loop with [`commands::LocalCommands`]) and the scenarios file
//! ([`scenarios_file`]) → the state store in STATE_DIR ([`state`]) →
//! [`supervisor`] starts, restarts and stops `runner worker` processes
//! ([`process`]) → phase changes go to `scenario_events` ([`events`]).

pub mod commands;
pub mod events;
pub mod health;
pub mod list;
pub mod metrics;
pub mod page;
pub mod process;
pub mod scenarios_file;
pub mod state;
pub mod supervisor;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::StreamConsumer;
use tokio::sync::{Notify, watch};

use crate::cli::{LocalAction, LocalArgs};
use crate::config::{LogFormat, LogLevel};
use crate::host_policy::Mode;
use crate::ingest::{Ingest, IngestConfig};
use crate::kafka::{KafkaContext, KafkaProducer, KafkaSettings};
use crate::scenario::lifecycle::RestartPolicy;
use crate::scenario::ordering::Stamp;
use crate::watchdog::Watchdog;
use commands::LocalCommands;
use metrics::{LocalMetrics, ReasonLabels};
use process::WorkerCommand;
use scenarios_file::FileCommand;
use state::StateStore;
use supervisor::{Settings, Supervisor, SupervisorError};

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    ScenariosFile(#[from] scenarios_file::FileError),
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
    #[error("cannot find the runner binary to start workers with: {0}")]
    Program(std::io::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

pub fn main(args: LocalArgs, log_level: LogLevel, log_format: LogFormat) -> Result<(), LocalError> {
    if let Some(LocalAction::List) = args.action {
        let store = StateStore::open_read_only(&args.state_dir)?;
        let beats = health::read_all(&args.state_dir);
        print!("{}", list::table(&store.all()?, &beats, chrono::Utc::now()));
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(LocalError::Runtime)?
        .block_on(run(args, log_level, log_format))
}

async fn run(
    args: LocalArgs,
    log_level: LogLevel,
    log_format: LogFormat,
) -> Result<(), LocalError> {
    let sup = &args.supervisor;
    let kafka = KafkaSettings::resolve(&sup.kafka, |name| std::env::var(name).ok())?;
    let servers = kafka.bootstrap.to_string();
    // Creates the directory; one supervisor per STATE_DIR from here on.
    let _lock = state::DirLock::take(&args.state_dir)?;
    let state_dir = args
        .state_dir
        .canonicalize()
        .map_err(|source| state::StateError::Dir {
            path: args.state_dir.clone(),
            source,
        })?;
    let state = Arc::new(StateStore::open(&state_dir)?);
    let file_root = args.worker.video_file_root.clone();
    // A bad scenarios file stops start-up; on SIGHUP it only logs.
    let initial = match &args.scenarios {
        Some(path) => Some(scenarios_file::load(path, file_root.as_deref())?),
        None => None,
    };

    let (metrics, registry) = LocalMetrics::new();
    let metrics = Arc::new(metrics);
    let page = page::Page::new(state.clone(), args.worker.preview).routes();
    let (bound, server) =
        crate::http::bind_with(args.http.metrics_addr, registry, metrics.clone(), page)
            .await
            .map_err(|source| LocalError::Metrics {
                addr: args.http.metrics_addr,
                source,
            })?;
    tracing::info!(addr = %bound, page = %format!("http://{bound}/"), "serving /metrics, /healthz and /readyz, and the scenarios page");
    if args.worker.preview && !bound.ip().is_loopback() {
        tracing::warn!(addr = %bound, "PREVIEW=true: camera pictures are served without a login on METRICS_ADDR; bind it to 127.0.0.1 unless every host that reaches it may see them");
    }
    let server = tokio::spawn(server);

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn({
        let stop_tx = stop_tx.clone();
        async move {
            crate::signals::stop_requested().await;
            let _ = stop_tx.send(true);
        }
    });

    let use_kafka = args.kafka_ingest.unwrap_or(args.scenarios.is_none());
    let kafka_err = |source| LocalError::Kafka {
        servers: servers.clone(),
        source,
    };
    let kafka_context = kafka.context();
    let producer: Option<KafkaProducer> = if use_kafka {
        tracing::info!(kafka = %kafka.summary(), "Kafka clients");
        Some(
            kafka
                .client_config()
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .create_with_context(kafka_context.clone())
                .map_err(kafka_err)?,
        )
    } else {
        None
    };

    // Workers inherit only the worker settings of this environment; what
    // follows overrides them.
    let mut env = process::inherited(
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        &crate::cli::worker_variables(),
    );
    env.retain(|(k, _)| !crate::kafka::CONNECTION_VARIABLES.contains(&k.as_str()));
    env.extend(kafka.worker_env());
    if let (Some(user), Some(password)) = (
        &args.worker_kafka_sasl_username,
        &args.worker_kafka_sasl_password_file,
    ) {
        if kafka.effective_mechanism().as_deref() == Some("OAUTHBEARER") {
            return Err(crate::kafka::KafkaSettingError(
                "WORKER_KAFKA_SASL_USERNAME is set but KAFKA_SASL_MECHANISM=OAUTHBEARER: workers log in with the supervisor's OIDC client; unset WORKER_KAFKA_SASL_USERNAME and WORKER_KAFKA_SASL_PASSWORD_FILE".into(),
            )
            .into());
        }
        // Workers log in as themselves: none of the supervisor's credentials.
        env.retain(|(k, _)| {
            !k.starts_with("KAFKA_SASL_USERNAME") && !k.starts_with("KAFKA_SASL_PASSWORD")
        });
        std::fs::File::open(password).map_err(|e| {
            crate::kafka::KafkaSettingError(format!(
                "WORKER_KAFKA_SASL_PASSWORD_FILE={}: cannot read it: {e}",
                password.display()
            ))
        })?;
        env.push(("KAFKA_SASL_USERNAME".to_string(), user.clone()));
        env.push((
            "KAFKA_SASL_PASSWORD_FILE".to_string(),
            password.display().to_string(),
        ));
    }
    env.extend([
        (
            "RESULTS_TOPIC".to_string(),
            args.worker.results_topic.clone(),
        ),
        ("LOG_LEVEL".to_string(), log_level.to_string()),
        (
            "LOG_FORMAT".to_string(),
            match log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
            .to_string(),
        ),
        // Each worker serves its own /metrics on a free local port.
        ("METRICS_ADDR".to_string(), "127.0.0.1:0".to_string()),
    ]);
    if let Some(root) = &file_root {
        env.push(("VIDEO_FILE_ROOT".to_string(), root.display().to_string()));
    }
    env.extend(
        args.worker
            .tuning_env()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
    );
    // The camera host policy is checked at ingest and again by each worker
    // after it resolves the camera's name. A camera from Kafka was chosen by
    // whoever may write `to_deploy`: loopback only when allowed explicitly.
    let policies = process::OriginPolicies {
        kafka: args.camera_policy.policy(Mode::LocalIngest),
        file: args.camera_policy.policy(Mode::Local),
    };
    let camera_policy = policies.kafka.clone();
    let settings = Settings {
        max_workers: sup.max_workers.0,
        policy: RestartPolicy {
            budget: args.restart_budget,
            base_delay: args.restart_backoff_ms.0,
            max_delay: args.restart_backoff_max_ms.0,
        },
        stop_grace: args.stop_grace_ms.0,
        worker: WorkerCommand {
            program: std::env::current_exe().map_err(LocalError::Program)?,
            state_dir: state_dir.clone(),
            env,
            policies,
            limits: args.worker_limits.limits(),
            extra_args: args.worker_args.clone(),
        },
        default_fps: sup.video_fps.to_string(),
        default_model: args.worker.model.as_str().to_string(),
        json_logs: log_format == LogFormat::Json,
        state_dir: state_dir.clone(),
        exit_when_done: args.exit_when_done && !use_kafka,
    };
    let wake = Arc::new(Notify::new());
    let events = events::PhaseEvents {
        kafka: producer.clone().map(|p| (p, args.events_topic.clone())),
        metrics: metrics.clone(),
    };
    let mut supervisor = Supervisor::new(
        state.clone(),
        settings,
        events,
        metrics.clone(),
        wake.clone(),
    );
    // Workers a killed predecessor left behind stop before anything starts.
    supervisor.recover().await?;

    if let (Some(path), Some(wanted)) = (&args.scenarios, initial) {
        apply_file(&state, wanted, path)?;
        tokio::spawn(reload_on_sighup(
            path.clone(),
            file_root.clone(),
            state.clone(),
            wake.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ));
    }

    let mut probe = None;
    let ingest = match producer {
        Some(producer) => {
            let consumer: StreamConsumer<KafkaContext> =
                crate::ingest::consumer_config(kafka.client_config(), &sup.consumer_group)
                    .create_with_context(kafka_context.clone())
                    .map_err(kafka_err)?;
            metrics.watch_kafka(kafka_context.health.clone());
            probe = Some(crate::kafka::probe(&producer, &kafka_context));
            // Storing a command writes the local state file: a step that
            // takes a minute is a hang.
            let watchdog = Arc::new(Watchdog::new(Duration::from_secs(60), None));
            metrics.watch_steps(watchdog.clone());
            let ingest = Ingest {
                consumer,
                producer,
                store: LocalCommands {
                    state: state.clone(),
                    wake: wake.clone(),
                    max_workers: sup.max_workers.0,
                    max_queued: sup.max_queued,
                },
                config: IngestConfig {
                    deploy_topic: args.deploy_topic.clone(),
                    undeploy_topic: args.undeploy_topic.clone(),
                    dlq_topic: args.dlq_topic.clone(),
                    video_file_root: file_root.clone(),
                    camera_policy,
                    cluster: None,
                    max_clock_skew: std::time::Duration::from_secs(args.max_clock_skew_secs),
                },
                metrics: metrics.ingest.clone(),
                watchdog,
            };
            Some(tokio::spawn(ingest.run(stop_rx.clone())))
        }
        None => None,
    };

    metrics.set_ready();
    tracing::info!(
        state_dir = %state_dir.display(),
        max_workers = sup.max_workers.0,
        kafka = use_kafka,
        scenarios_file = ?args.scenarios,
        "local supervisor running"
    );
    supervisor.run(stop_rx).await;
    let _ = stop_tx.send(true);
    server.abort();
    if let Some(probe) = probe {
        probe.abort();
    }
    if let Some(ingest) = ingest
        && let Ok(Err(e)) = ingest.await
    {
        return Err(e.into());
    }
    tracing::info!("local supervisor stopped");
    Ok(())
}

/// Stores what the scenarios file calls for, each command stamped with the
/// load time (the entry's index orders commands within one load).
fn apply_file(
    state: &StateStore,
    wanted: Vec<scenarios_file::Wanted>,
    path: &Path,
) -> Result<(), LocalError> {
    let now = chrono::Utc::now();
    let commands = scenarios_file::plan(&wanted, &state.all()?);
    tracing::info!(file = %path.display(), scenarios = wanted.len(), changes = commands.len(), "scenarios file loaded");
    for (i, command) in commands.into_iter().enumerate() {
        let at = Stamp {
            timestamp_ms: now.timestamp_millis(),
            offset: i as i64,
        };
        match command {
            FileCommand::Deploy(w) => {
                state.update(&w.uuid, |r| {
                    commands::apply_deploy(r, &w.uuid, w.target, at, now)
                })?;
            }
            FileCommand::Undeploy(uuid) => {
                state.update(&uuid, |r| commands::apply_undeploy(r, &uuid, at, now))?;
            }
        }
    }
    Ok(())
}

async fn reload_on_sighup(
    path: PathBuf,
    file_root: Option<PathBuf>,
    state: Arc<StateStore>,
    wake: Arc<Notify>,
    metrics: Arc<LocalMetrics>,
    mut stop: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install a SIGHUP handler; the scenarios file is read at start only");
        return;
    };
    loop {
        tokio::select! {
            _ = hangup.recv() => {}
            _ = stop.changed() => return,
        }
        tracing::info!(file = %path.display(), "SIGHUP received; reloading the scenarios file");
        let loaded = scenarios_file::load(&path, file_root.as_deref())
            .map_err(LocalError::from)
            .and_then(|wanted| apply_file(&state, wanted, &path));
        match loaded {
            Ok(()) => wake.notify_one(),
            Err(e) => {
                let reason = match &e {
                    LocalError::ScenariosFile(f) => f.category(),
                    _ => "state",
                };
                metrics
                    .scenarios_file_errors
                    .get_or_create(&ReasonLabels { reason })
                    .inc();
                tracing::error!(
                    "scenarios file not applied, the running scenarios are unchanged: {e}"
                );
            }
        }
    }
}
