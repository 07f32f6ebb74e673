//! Kafka → Scenario.
//!
//! At-least-once in, idempotent effect: auto commit is on but offsets are
//! stored only after a message's effect is durable (its Scenario written, or
//! the message copied to the dead-letter topic). While the Kubernetes API is
//! unreachable the loop retries the same message with backoff and never moves
//! past it; `max.poll.interval.ms` is raised so that waiting does not evict the
//! consumer from its group.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use tokio::sync::watch;

use super::crd::{Scenario, ScenarioSpec};
use super::metrics::{CategoryLabels, ControllerMetrics, IngestLabels};
use super::pod::{self, ANNOTATION_ENQUEUED_AT, LABEL_RUNNER, LABEL_SCENARIO, label_value};
use super::reconcile::FIELD_MANAGER;
use super::secret;
use crate::backoff::Backoff;
use crate::camera_url::CameraSource;
use crate::host_policy::HostPolicy;
use crate::messages::{DeployRequest, RequestError, UndeployRequest};

/// How long ingest waits for a camera host name to resolve.
const HOST_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub deploy_topic: String,
    pub undeploy_topic: String,
    pub dlq_topic: String,
    pub runner_name: String,
    pub video_file_root: Option<PathBuf>,
    /// The camera host policy, applied here and passed on to workers.
    pub camera_policy: HostPolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot subscribe to {topics}: {source}")]
    Subscribe {
        topics: String,
        source: rdkafka::error::KafkaError,
    },
}

/// What became of one message.
enum Outcome {
    Created,
    Duplicate,
    Stopped,
    Unknown,
    DeadLettered(&'static str),
}

pub struct Ingest {
    pub consumer: StreamConsumer,
    pub producer: FutureProducer,
    pub scenarios: Api<Scenario>,
    pub secrets: Api<Secret>,
    pub config: IngestConfig,
    pub metrics: Arc<ControllerMetrics>,
}

impl Ingest {
    /// Consumes until `shutdown` turns true, then commits what was stored.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), IngestError> {
        let topics = [
            self.config.deploy_topic.as_str(),
            self.config.undeploy_topic.as_str(),
        ];
        self.consumer
            .subscribe(&topics)
            .map_err(|source| IngestError::Subscribe {
                topics: topics.join(","),
                source,
            })?;
        tracing::info!(topics = %topics.join(","), "ingesting");
        loop {
            let msg = tokio::select! {
                msg = self.consumer.recv() => msg,
                _ = shutdown.changed() => break,
            };
            let msg = match msg {
                Ok(msg) => msg,
                Err(e) => {
                    tracing::warn!(error = %e, "Kafka consumer error; continuing");
                    continue;
                }
            };
            if let Some(ms) = msg.timestamp().to_millis() {
                let age = (chrono::Utc::now().timestamp_millis() - ms).max(0) as f64 / 1000.0;
                self.metrics.ingest_lag_seconds.set(age);
            }
            let Some(outcome) = self.handle(&msg, &mut shutdown).await else {
                break; // shutting down before the effect was durable: do not store
            };
            self.count(&msg, &outcome);
            if let Err(e) = self.consumer.store_offset_from_message(&msg) {
                tracing::warn!(error = %e, "cannot store a consumed offset");
            }
        }
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::warn!(error = %e, "cannot commit offsets on shutdown");
        }
        Ok(())
    }

    fn count(&self, msg: &BorrowedMessage<'_>, outcome: &Outcome) {
        let kind = if msg.topic() == self.config.undeploy_topic {
            "undeploy"
        } else {
            "deploy"
        };
        let result = match outcome {
            Outcome::Created => "created",
            Outcome::Duplicate => "duplicate",
            Outcome::Stopped => "stopped",
            Outcome::Unknown => "unknown",
            Outcome::DeadLettered(category) => {
                self.metrics
                    .dead_lettered
                    .get_or_create(&CategoryLabels { category })
                    .inc();
                "dead_lettered"
            }
        };
        self.metrics
            .ingested
            .get_or_create(&IngestLabels { kind, result })
            .inc();
    }

    /// Makes the message's effect durable; `None` when shutdown interrupted it.
    async fn handle(
        &self,
        msg: &BorrowedMessage<'_>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Outcome> {
        if msg.topic() == self.config.undeploy_topic {
            match UndeployRequest::parse(msg.payload()) {
                Ok(req) => self.undeploy(&req, shutdown).await,
                Err(e) => self.dead_letter(msg, &e, shutdown).await,
            }
        } else {
            let root = self.config.video_file_root.as_deref();
            let parsed = match DeployRequest::parse(msg.payload(), root) {
                Ok(req) => self.check_host(req).await,
                Err(e) => Err(e),
            };
            match parsed {
                Ok(req) => match self.deploy(&req, shutdown).await? {
                    Ok(outcome) => Some(outcome),
                    Err(rejected) => self.dead_letter(msg, &rejected, shutdown).await,
                },
                Err(e) => self.dead_letter(msg, &e, shutdown).await,
            }
        }
    }

    /// The camera host policy, with the name resolved from here.
    async fn check_host(&self, req: DeployRequest) -> Result<DeployRequest, RequestError> {
        let root = self.config.video_file_root.as_deref();
        CameraSource::parse(&req.camera_url, root)?
            .check_host_at_ingest(&self.config.camera_policy, HOST_LOOKUP_TIMEOUT)
            .await?;
        Ok(req)
    }

    fn scenario_for(&self, req: &DeployRequest) -> Scenario {
        let uuid = req.scenario_uuid.to_string();
        let mut scenario = Scenario::new(
            &pod::scenario_name(&uuid),
            ScenarioSpec {
                scenario_uuid: uuid.clone(),
                worker_id: req.worker_id.to_string(),
                camera_url: secret::shown_url(&req.camera_url),
                fps: None,
                model: None,
                stopped: false,
            },
        );
        scenario.metadata.labels = Some(
            [
                (
                    LABEL_RUNNER.to_string(),
                    label_value(&self.config.runner_name),
                ),
                (LABEL_SCENARIO.to_string(), label_value(&uuid)),
            ]
            .into(),
        );
        scenario.metadata.annotations = Some(
            [(
                ANNOTATION_ENQUEUED_AT.to_string(),
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            )]
            .into(),
        );
        scenario
    }

    /// Creates the Scenario unless it exists: duplicates and replays (also of
    /// a stopped scenario) change nothing. The inner `Err` is a permanent
    /// refusal by the API server, which sends the message to the DLQ.
    async fn deploy(
        &self,
        req: &DeployRequest,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Result<Outcome, RejectedByApi>> {
        let scenario = self.scenario_for(req);
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        self.retrying(
            "creating a Scenario in Kubernetes",
            Some(&self.metrics.kubernetes_retries),
            shutdown,
            || async {
                // The Secret is written after its owner exists; a replay
                // after a crash in between writes it then.
                let (written, outcome) = match self.scenarios.create(&params, &scenario).await {
                    Ok(created) => (created, Outcome::Created),
                    Err(kube::Error::Api(e)) if e.code == 409 => (
                        self.scenarios.get(&scenario.name_any()).await?,
                        Outcome::Duplicate,
                    ),
                    Err(kube::Error::Api(e)) if e.code == 400 || e.code == 422 => {
                        return Ok(Err(RejectedByApi(e.message)));
                    }
                    Err(e) => return Err(e),
                };
                secret::store(&self.secrets, &written, &req.camera_url).await?;
                Ok(Ok(outcome))
            },
        )
        .await
    }

    async fn undeploy(
        &self,
        req: &UndeployRequest,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Outcome> {
        let name = pod::scenario_name(&req.scenario_uuid.to_string());
        let patch = Patch::Merge(json!({"spec": {"stopped": true}}));
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        self.retrying(
            "stopping a Scenario in Kubernetes",
            Some(&self.metrics.kubernetes_retries),
            shutdown,
            || async {
                match self.scenarios.patch(&name, &params, &patch).await {
                    Ok(_) => Ok(Outcome::Stopped),
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        let scenario = req.scenario_uuid;
                        tracing::warn!(%scenario, "to_undeploy for an unknown scenario; nothing to stop");
                        Ok(Outcome::Unknown)
                    }
                    Err(e) => Err(e),
                }
            },
        )
        .await
    }

    /// Repeats `call` with backoff until it succeeds, counting each retry in
    /// `retries` when given; `None` on shutdown. Ingest does not move past
    /// the message meanwhile.
    async fn retrying<T, E, F, Fut>(
        &self,
        what: &str,
        retries: Option<&Counter>,
        shutdown: &mut watch::Receiver<bool>,
        mut call: F,
    ) -> Option<T>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            match call().await {
                Ok(value) => return Some(value),
                Err(e) => {
                    let delay = backoff.next_delay(rand::random::<f64>());
                    if let Some(retries) = retries {
                        retries.inc();
                    }
                    tracing::warn!(error = %e, attempt = backoff.attempts(), retry_in_ms = delay.as_millis() as u64, "{what} failed; ingest paused, retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return None,
                    }
                }
            }
        }
    }

    /// Copies the message to the dead-letter topic with its reason in headers,
    /// retrying until the broker has it.
    async fn dead_letter(
        &self,
        msg: &BorrowedMessage<'_>,
        error: &(dyn Refusal + Sync),
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Outcome> {
        let category = error.category();
        let text = error.to_string();
        tracing::warn!(
            topic = msg.topic(),
            partition = msg.partition(),
            offset = msg.offset(),
            reason = category,
            "invalid message sent to {}: {text}",
            self.config.dlq_topic
        );
        let offset = msg.offset().to_string();
        let partition = msg.partition().to_string();
        let what = format!("writing to the dead-letter topic {}", self.config.dlq_topic);
        self.retrying(&what, None, shutdown, || async {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "reason",
                    value: Some(category),
                })
                .insert(Header {
                    key: "error",
                    value: Some(text.as_str()),
                })
                .insert(Header {
                    key: "source_topic",
                    value: Some(msg.topic()),
                })
                .insert(Header {
                    key: "source_partition",
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: "source_offset",
                    value: Some(offset.as_str()),
                });
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.config.dlq_topic).headers(headers);
            if let Some(key) = msg.key() {
                record = record.key(key);
            }
            if let Some(payload) = msg.payload() {
                record = record.payload(payload);
            }
            match self.producer.send(record, Duration::from_secs(30)).await {
                Ok(_) => Ok(Outcome::DeadLettered(category)),
                Err((e, _)) => Err(e),
            }
        })
        .await
    }
}

/// The API server refused a Scenario for good (for example, a value its
/// schema rejects).
#[derive(Debug, thiserror::Error)]
#[error("the Kubernetes API refused the Scenario: {0}")]
pub struct RejectedByApi(String);

/// Anything that sends a message to the dead-letter topic.
trait Refusal: std::fmt::Display + Sync {
    fn category(&self) -> &'static str;
}

impl Refusal for RequestError {
    fn category(&self) -> &'static str {
        RequestError::category(self)
    }
}

impl Refusal for RejectedByApi {
    fn category(&self) -> &'static str {
        "rejected_by_kubernetes"
    }
}
