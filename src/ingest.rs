//! Kafka `to_deploy` / `to_undeploy` → a [`CommandStore`].
//!
//! Shared by the operator (the store writes Scenarios to the Kubernetes API)
//! and the local supervisor (the store is its state directory). At-least-once
//! in, idempotent effect: auto commit is on but offsets are stored only after a
//! message's effect is durable (the store has it, or the message is copied to
//! the dead-letter topic). While the store is unavailable the loop retries the
//! same message with backoff and never moves past it; `max.poll.interval.ms`
//! is raised so that waiting does not evict the consumer from its group.
//!
//! Commands of different scenarios are parsed and have their camera host
//! resolved side by side (at most [`MAX_HELD`] messages at once), those of
//! one scenario one after the other in the order they were read, so a camera
//! name slow to resolve holds up only its own scenario. Effects are written
//! one at a time, in the order commands are ready. Each command carries its
//! record's [`Stamp`]; the store orders commands for one scenario with
//! [`crate::scenario::ordering`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use tokio::sync::watch;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::camera_url::CameraSource;
use crate::host_policy::{ClusterAddress, HostPolicy};
use crate::kafka::{KafkaContext, KafkaProducer};
use crate::messages::{DeployRequest, RequestError, UndeployRequest};
use crate::scenario::ordering::{DeployDecision, Stale, Stamp, UndeployDecision, too_far_ahead};
use crate::watchdog::Watchdog;

/// What a store did with a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Deploy(DeployDecision),
    Undeploy(UndeployDecision),
}

impl Effect {
    /// The `result` label of `ingested_total`.
    pub fn label(self) -> &'static str {
        match self {
            Effect::Deploy(DeployDecision::Create) => "created",
            Effect::Deploy(DeployDecision::Rerun) => "rerun",
            Effect::Deploy(DeployDecision::Replace) => "replaced",
            Effect::Deploy(DeployDecision::Refresh) => "refreshed",
            Effect::Undeploy(UndeployDecision::Tombstone) => "tombstone",
            Effect::Undeploy(UndeployDecision::Stop) => "stopped",
            Effect::Deploy(DeployDecision::Ignore(Stale::Replay))
            | Effect::Undeploy(UndeployDecision::Ignore(Stale::Replay)) => "duplicate",
            Effect::Deploy(DeployDecision::Ignore(Stale::Overtaken))
            | Effect::Undeploy(UndeployDecision::Ignore(Stale::Overtaken)) => "overtaken",
        }
    }
}

/// Why a store did not take a command.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Worth retrying: the store is unreachable or busy. Ingest waits.
    #[error("{0}")]
    Transient(String),
    /// Refused for good (for example, a value the API server's schema
    /// rejects): the message goes to the dead-letter topic.
    #[error("{0}")]
    Rejected(String),
    /// A deploy that would queue one more scenario than MAX_QUEUED allows:
    /// the message goes to the dead-letter topic as [`QUEUE_FULL`].
    #[error(
        "{max_queued} scenarios already wait for a worker (MAX_QUEUED={max_queued}); the deploy is \
         refused. Undeploy scenarios, or raise MAX_WORKERS or MAX_QUEUED"
    )]
    QueueFull { max_queued: usize },
    /// A command the store will not take, for a `reason` of its own (such
    /// as [`QUOTA_EXCEEDED`] or [`STALE`]): the message goes to the
    /// dead-letter topic with that reason, and ingest goes on.
    #[error("{message}")]
    Refused {
        reason: &'static str,
        message: String,
    },
}

/// The dead-letter reason of a deploy refused because the queue is full.
pub const QUEUE_FULL: &str = "queue_full";

/// The dead-letter reason of a command whose write a ResourceQuota refused.
pub const QUOTA_EXCEEDED: &str = "quota_exceeded";

/// The dead-letter reason of a deploy older than anything the runner still
/// remembers, for a scenario it does not know: possibly a replay.
pub const STALE: &str = "stale";

/// Where commands become durable. Each call returns once the effect is stored.
pub trait CommandStore: Send + Sync {
    /// What a refusal is called in the dead-letter `reason` header and the
    /// `dead_lettered_total` metric (for example `rejected_by_kubernetes`).
    fn rejected_category(&self) -> &'static str;

    /// `read_at` is when ingest read the command, strictly increasing in
    /// the order commands are read: a scenario that starts waiting for a
    /// worker takes its place in the FIFO queue by it, however the writes of
    /// commands handled side by side interleave.
    fn deploy(
        &self,
        req: &DeployRequest,
        at: Stamp,
        read_at: DateTime<Utc>,
    ) -> impl Future<Output = Result<Effect, StoreError>> + Send;

    fn undeploy(
        &self,
        req: &UndeployRequest,
        at: Stamp,
    ) -> impl Future<Output = Result<Effect, StoreError>> + Send;
}

/// How long ingest waits for a camera host name to resolve.
const HOST_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Most messages ingest holds at once, being handled (side by side) or
/// waiting behind an earlier command of their scenario. It bounds the host
/// look-ups and store writes under way together.
const MAX_HELD: usize = 32;

#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub deploy_topic: String,
    pub undeploy_topic: String,
    pub dlq_topic: String,
    pub video_file_root: Option<PathBuf>,
    /// The camera host policy, applied to every deploy before it is stored.
    pub camera_policy: HostPolicy,
    /// The cluster's own addresses as the controller last learned them,
    /// added to `camera_policy` (none for `runner local`).
    pub cluster: Option<tokio::sync::watch::Receiver<Vec<ClusterAddress>>>,
    /// How far ahead of this runner's clock a producer-set record timestamp
    /// may be; a command stamped further ahead is dead-lettered.
    pub max_clock_skew: Duration,
}

/// A command whose producer-set timestamp lies too far in the future: taken,
/// it would win over every later command of its scenario until that time.
#[derive(Debug, thiserror::Error)]
#[error(
    "the record is stamped {stamp} by its producer, {ahead_secs} s ahead of this runner's clock \
     (MAX_CLOCK_SKEW_SECS={max_secs}); fix the producer's clock, or have the broker stamp records \
     (topic setting message.timestamp.type=LogAppendTime)"
)]
pub struct StampedAhead {
    stamp: String,
    ahead_secs: i64,
    max_secs: u64,
}

impl StampedAhead {
    pub const CATEGORY: &'static str = "stamped_ahead";
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot subscribe to {topics}: {source}")]
    Subscribe {
        topics: String,
        source: rdkafka::error::KafkaError,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabels {
    pub category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IngestLabels {
    /// `deploy` or `undeploy`.
    pub kind: &'static str,
    /// An [`Effect::label`], or `dead_lettered`.
    pub result: &'static str,
}

/// Ingest's metrics, registered under the caller's prefix.
#[derive(Clone, Default)]
pub struct IngestMetrics {
    pub ingested: Family<IngestLabels, Counter>,
    pub dead_lettered: Family<CategoryLabels, Counter>,
    pub lag_seconds: Gauge<f64, AtomicU64>,
    pub store_retries: Counter,
}

impl IngestMetrics {
    /// Registers the series; `store_retries_name` names the retry counter
    /// after the store (`kubernetes_retries`, `state_retries`).
    pub fn register(&self, r: &mut Registry, store_retries_name: &str) {
        r.register(
            "ingested",
            "to_deploy / to_undeploy messages by outcome",
            self.ingested.clone(),
        );
        r.register(
            "dead_lettered",
            "Messages copied to the dead-letter topic by reason",
            self.dead_lettered.clone(),
        );
        r.register(
            "ingest_lag_seconds",
            "Age of the last ingested message when it was handled",
            self.lag_seconds.clone(),
        );
        r.register(
            store_retries_name,
            "Store writes retried by ingest",
            self.store_retries.clone(),
        );
    }
}

/// The consumer settings ingest relies on (at-least-once, store after effect).
/// `base` is the connection ([`crate::kafka::KafkaSettings::client_config`]).
pub fn consumer_config(base: ClientConfig, group: &str) -> ClientConfig {
    let mut config = base;
    config
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        // Notice topics created after start-up within seconds, not minutes.
        .set("topic.metadata.refresh.interval.ms", "10000")
        // Requests are small and handled one by one: a small prefetch
        // buffer keeps memory flat without slowing ingest.
        .set("queued.max.messages.kbytes", "1024")
        // Ingest may wait a long time on its store for one message without
        // being evicted from its group.
        .set("max.poll.interval.ms", "86400000");
    // A replica that dies leaves its partitions to the group only when its
    // session ends: 10 s (librdkafka's default is 45 s) lets a new leader
    // read commands within seconds of taking over. KAFKA_PROPERTIES may set
    // either.
    for (key, value) in [
        ("session.timeout.ms", SESSION_TIMEOUT_MS),
        ("heartbeat.interval.ms", HEARTBEAT_INTERVAL_MS),
    ] {
        if config.get(key).is_none() {
            config.set(key, value);
        }
    }
    config
}

/// The consumer's default session, and its heartbeat a third of it.
const SESSION_TIMEOUT_MS: &str = "10000";
const HEARTBEAT_INTERVAL_MS: &str = "3000";

pub struct Ingest<S> {
    pub consumer: StreamConsumer<KafkaContext>,
    pub producer: KafkaProducer,
    pub store: S,
    pub config: IngestConfig,
    pub metrics: IngestMetrics,
    /// Each attempt to store a command is a step of liveness.
    pub watchdog: Arc<Watchdog>,
}

/// A message ready to be applied.
enum Prepared {
    Deploy(DeployRequest),
    Undeploy(UndeployRequest),
    /// Dead-lettered with this reason.
    Refused {
        category: &'static str,
        error: String,
    },
}

/// The record's place in time: its timestamp (the ingest time when the
/// record has none) and offset.
fn stamp_of(msg: &OwnedMessage) -> Stamp {
    Stamp {
        timestamp_ms: msg
            .timestamp()
            .to_millis()
            .unwrap_or_else(|| chrono::Utc::now().timestamp_millis()),
        offset: msg.offset(),
    }
}

impl<S: CommandStore> Ingest<S> {
    /// Consumes until `shutdown` turns true, then commits what was stored.
    ///
    /// Up to [`MAX_HELD`] messages are held at once. Commands for one
    /// scenario are handled one at a time, in the order they were read;
    /// commands for different scenarios are checked side by side, so one
    /// whose camera name is slow to resolve holds up only its own scenario
    /// (see [`Ingest::handle`]). A partition's offset moves past a message
    /// only once it and every message before it are durable.
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
        // Held while a message's effect is written (see `handle`).
        let turn = tokio::sync::Mutex::new(());
        let mut running = FuturesUnordered::new();
        // Scenarios with a command being handled, and their commands read
        // since, in order.
        let mut lanes: HashMap<Uuid, VecDeque<(OwnedMessage, DateTime<Utc>)>> = HashMap::new();
        let mut offsets = Offsets::default();
        let mut held = 0usize;
        let mut last_read = DateTime::<Utc>::MIN_UTC;
        let handle = |(msg, read_at): (OwnedMessage, DateTime<Utc>),
                      lane: Option<Uuid>,
                      mut shutdown: watch::Receiver<bool>| {
            let (this, turn) = (&self, &turn);
            async move {
                let result = this.handle(&msg, read_at, turn, &mut shutdown).await;
                (msg, lane, result)
            }
        };
        loop {
            tokio::select! {
                msg = self.consumer.recv(), if held < MAX_HELD => {
                    let msg = match msg {
                        Ok(msg) => msg.detach(),
                        Err(e) => {
                            // The client context has logged what the user can fix.
                            let health = &self.consumer.context().health;
                            match health.explain(e.rdkafka_error_code(), "") {
                                Some(_) => health.record(&e, &e.to_string()),
                                None => tracing::warn!(error = %e, "Kafka consumer error; continuing"),
                            }
                            continue;
                        }
                    };
                    if let Some(ms) = msg.timestamp().to_millis() {
                        let age = (chrono::Utc::now().timestamp_millis() - ms).max(0) as f64 / 1000.0;
                        self.metrics.lag_seconds.set(age);
                    }
                    offsets.read(msg.topic(), msg.partition(), msg.offset());
                    held += 1;
                    last_read = read_after(last_read, Utc::now());
                    let msg = (msg, last_read);
                    let lane = scenario_of(msg.0.payload());
                    match lane.and_then(|id| lanes.get_mut(&id)) {
                        Some(waiting) => waiting.push_back(msg),
                        None => {
                            if let Some(id) = lane {
                                lanes.insert(id, VecDeque::new());
                            }
                            running.push(handle(msg, lane, shutdown.clone()));
                        }
                    }
                }
                Some((msg, lane, result)) = running.next() => {
                    held -= 1;
                    let Some(result) = result else {
                        break; // shutting down before the effect was durable: do not store
                    };
                    self.done(&mut offsets, &msg, result);
                    if let Some(id) = lane {
                        match lanes.get_mut(&id).and_then(VecDeque::pop_front) {
                            Some(next) => running.push(handle(next, lane, shutdown.clone())),
                            None => {
                                lanes.remove(&id);
                            }
                        }
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        // What is being handled finishes (a retry ends on shutdown, leaving
        // its message to be read again); what waits behind it is read again.
        while let Some((msg, _, result)) = running.next().await {
            if let Some(result) = result {
                self.done(&mut offsets, &msg, result);
            }
        }
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::warn!(error = %e, "cannot commit offsets on shutdown");
        }
        Ok(())
    }

    /// Counts a handled message and stores the offset its partition may now
    /// move to.
    fn done(&self, offsets: &mut Offsets, msg: &OwnedMessage, result: &'static str) {
        self.count(msg, result);
        if let Some(upto) = offsets.handled(msg.topic(), msg.partition(), msg.offset())
            && let Err(e) = self
                .consumer
                .store_offset(msg.topic(), msg.partition(), upto)
        {
            tracing::warn!(error = %e, "cannot store a consumed offset");
        }
    }

    fn count(&self, msg: &OwnedMessage, result: &'static str) {
        let kind = if msg.topic() == self.config.undeploy_topic {
            "undeploy"
        } else {
            "deploy"
        };
        self.metrics
            .ingested
            .get_or_create(&IngestLabels { kind, result })
            .inc();
    }

    /// Makes the message's effect durable and returns its `result` label;
    /// `None` when shutdown interrupted it.
    async fn handle(
        &self,
        msg: &OwnedMessage,
        read_at: DateTime<Utc>,
        turn: &tokio::sync::Mutex<()>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<&'static str> {
        let prepared = self.prepare(msg).await;
        // Effects are written one at a time, in the order their commands
        // are ready (the lock is fair): the queue fills in arrival order,
        // and a store that is down holds everything behind it.
        let _turn = turn.lock().await;
        let at = stamp_of(msg);
        let stored = match prepared {
            Prepared::Refused { category, error } => {
                return self.dead_letter(msg, category, &error, shutdown).await;
            }
            Prepared::Undeploy(req) => {
                self.storing("stopping a scenario", shutdown, || {
                    self.store.undeploy(&req, at)
                })
                .await?
            }
            Prepared::Deploy(req) => {
                self.storing("writing a scenario", shutdown, || {
                    self.store.deploy(&req, at, read_at)
                })
                .await?
            }
        };
        match stored {
            Ok(effect) => Some(effect.label()),
            Err(full @ StoreError::QueueFull { .. }) => {
                self.dead_letter(msg, QUEUE_FULL, &full, shutdown).await
            }
            Err(StoreError::Refused { reason, message }) => {
                self.dead_letter(msg, reason, &message, shutdown).await
            }
            Err(rejected) => {
                let category = self.store.rejected_category();
                self.dead_letter(msg, category, &rejected, shutdown).await
            }
        }
    }

    /// What a message asks for, checked (its camera host resolved): the part
    /// of handling a message that runs side by side with others.
    async fn prepare(&self, msg: &OwnedMessage) -> Prepared {
        let refused = |category: &'static str, error: &dyn std::fmt::Display| Prepared::Refused {
            category,
            error: error.to_string(),
        };
        if let Some(ahead) = self.stamped_ahead(msg) {
            return refused(StampedAhead::CATEGORY, &ahead);
        }
        if msg.topic() == self.config.undeploy_topic {
            return match UndeployRequest::parse(msg.payload()) {
                Ok(req) => Prepared::Undeploy(req),
                Err(e) => refused(e.category(), &e),
            };
        }
        let root = self.config.video_file_root.as_deref();
        let parsed = match DeployRequest::parse(msg.payload(), root) {
            Ok(req) => self.check_host(req).await,
            Err(e) => Err(e),
        };
        match parsed {
            Ok(req) => Prepared::Deploy(req),
            Err(e) => refused(e.category(), &e),
        }
    }

    /// A producer-set stamp too far ahead of this runner's clock.
    fn stamped_ahead(&self, msg: &OwnedMessage) -> Option<StampedAhead> {
        let rdkafka::Timestamp::CreateTime(ms) = msg.timestamp() else {
            return None;
        };
        let max = self.config.max_clock_skew;
        let now = chrono::Utc::now().timestamp_millis();
        let ahead = too_far_ahead(ms, now, i64::try_from(max.as_millis()).unwrap_or(i64::MAX))?;
        Some(StampedAhead {
            stamp: chrono::DateTime::from_timestamp_millis(ms)
                .map_or_else(|| format!("{ms} ms"), |t| t.to_rfc3339()),
            ahead_secs: ahead / 1000,
            max_secs: max.as_secs(),
        })
    }

    /// The camera host policy, with the camera's name resolved from here (a
    /// name that does not resolve here passes; the worker checks it again).
    async fn check_host(&self, req: DeployRequest) -> Result<DeployRequest, RequestError> {
        let root = self.config.video_file_root.as_deref();
        let source = CameraSource::parse(&req.camera_url, root)?;
        let learned;
        let policy = match &self.config.cluster {
            Some(cluster) => {
                learned = self.config.camera_policy.with_cluster(&cluster.borrow());
                &learned
            }
            None => &self.config.camera_policy,
        };
        source
            .check_host_at_ingest(policy, HOST_LOOKUP_TIMEOUT)
            .await?;
        Ok(req)
    }

    /// Repeats a store call while it fails transiently; `Some(Err)` carries a
    /// permanent refusal, `None` means shutdown.
    async fn storing<F, Fut>(
        &self,
        what: &str,
        shutdown: &mut watch::Receiver<bool>,
        mut call: F,
    ) -> Option<Result<Effect, StoreError>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Effect, StoreError>>,
    {
        retrying(what, Some(&self.metrics.store_retries), shutdown, || {
            let fut = call();
            let step = self.watchdog.step("storing a command");
            async move {
                let _step = step;
                match fut.await {
                    Err(StoreError::Transient(e)) => Err(e),
                    other => Ok(other),
                }
            }
        })
        .await
    }

    /// Copies the message to the dead-letter topic with its reason in headers,
    /// retrying until the broker has it.
    async fn dead_letter(
        &self,
        msg: &OwnedMessage,
        category: &'static str,
        error: &(dyn std::fmt::Display + Sync),
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<&'static str> {
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
        retrying(&what, None, shutdown, || async {
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
                Ok(_) => Ok(()),
                Err((e, _)) => Err(e),
            }
        })
        .await?;
        self.metrics
            .dead_lettered
            .get_or_create(&CategoryLabels { category })
            .inc();
        Some("dead_lettered")
    }
}

/// The moment a command is read: `now`, or just after the previous one when
/// the clock has not moved on (or went back), so that read order is kept.
fn read_after(previous: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
    if now > previous {
        now
    } else {
        previous + chrono::Duration::nanoseconds(1)
    }
}

/// The scenario a command is for, read leniently from its payload; `None`
/// for a payload that names none (it is dead-lettered, in no order).
fn scenario_of(payload: Option<&[u8]>) -> Option<Uuid> {
    #[derive(serde::Deserialize)]
    struct Named<'a> {
        #[serde(borrow)]
        scenario_uuid: std::borrow::Cow<'a, str>,
    }
    let named: Named<'_> = serde_json::from_slice(payload?).ok()?;
    Uuid::parse_str(&named.scenario_uuid).ok()
}

/// The messages read and not yet handled, per partition: a partition's
/// offset is stored only up to the message before the oldest one not
/// handled, so a message handled early does not commit one still under way.
#[derive(Default)]
struct Offsets {
    partitions: HashMap<(String, i32), Partition>,
}

#[derive(Default)]
struct Partition {
    /// Offsets read and not handled (a count: after a rebalance, a message
    /// may be read again while its first copy is still being handled).
    open: BTreeMap<i64, usize>,
    /// The oldest offset read.
    first: Option<i64>,
    /// The newest offset handled.
    newest: Option<i64>,
    /// The offset last stored.
    stored: Option<i64>,
}

impl Offsets {
    fn read(&mut self, topic: &str, partition: i32, offset: i64) {
        let p = self
            .partitions
            .entry((topic.to_string(), partition))
            .or_default();
        *p.open.entry(offset).or_default() += 1;
        p.first = Some(p.first.map_or(offset, |f| f.min(offset)));
    }

    /// Notes `offset` handled; returns the offset to store when the
    /// partition may move on (it and every message read before it handled).
    fn handled(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let p = self.partitions.get_mut(&(topic.to_string(), partition))?;
        if let Some(n) = p.open.get_mut(&offset) {
            *n -= 1;
            if *n == 0 {
                p.open.remove(&offset);
            }
        }
        p.newest = p.newest.max(Some(offset));
        let newest = p.newest?;
        let upto = p.open.keys().next().map_or(newest, |&oldest| oldest - 1);
        let upto = upto.min(newest);
        if upto < p.first? || p.stored.is_some_and(|s| s >= upto) {
            return None;
        }
        p.stored = Some(upto);
        Some(upto)
    }
}

/// Repeats `call` with backoff until it succeeds, counting each retry in
/// `retries` when given; `None` on shutdown. The message's partition does
/// not commit past it meanwhile.
async fn retrying<T, E, F, Fut>(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_consumer_session_is_short_unless_kafka_properties_set_it() {
        let config = consumer_config(ClientConfig::new(), "g");
        assert_eq!(config.get("session.timeout.ms"), Some("10000"));
        assert_eq!(config.get("heartbeat.interval.ms"), Some("3000"));
        let mut base = ClientConfig::new();
        base.set("session.timeout.ms", "30000");
        let config = consumer_config(base, "g");
        assert_eq!(config.get("session.timeout.ms"), Some("30000"));
        assert_eq!(config.get("max.poll.interval.ms"), Some("86400000"));
    }

    #[test]
    fn a_partition_moves_only_past_messages_handled_with_all_before_them() {
        // Offsets read, then (offset handled, offset stored) in turn.
        for (read, steps) in [
            (
                vec![5, 6, 7],
                vec![(5, Some(5)), (6, Some(6)), (7, Some(7))],
            ),
            (vec![5, 6, 7], vec![(7, None), (6, None), (5, Some(7))]),
            (vec![5, 6, 7], vec![(6, None), (5, Some(6)), (7, Some(7))]),
            // Read again after a rebalance while the first copy is handled.
            (vec![5, 5, 6], vec![(5, None), (6, None), (5, Some(6))]),
        ] {
            let mut offsets = Offsets::default();
            for o in &read {
                offsets.read("t", 0, *o);
            }
            for (handled, stored) in &steps {
                assert_eq!(
                    offsets.handled("t", 0, *handled),
                    *stored,
                    "read {read:?}, steps {steps:?}, at {handled}"
                );
            }
        }
    }

    #[test]
    fn read_times_increase_in_read_order() {
        let t = |ns: i64| DateTime::<Utc>::from_timestamp_nanos(1_800_000_000_000_000_000 + ns);
        assert_eq!(read_after(t(0), t(5)), t(5));
        assert_eq!(read_after(t(5), t(5)), t(6), "the same clock reading");
        assert_eq!(read_after(t(9), t(5)), t(10), "the clock went back");
    }

    #[test]
    fn partitions_move_apart() {
        let mut offsets = Offsets::default();
        offsets.read("t", 0, 1);
        offsets.read("t", 1, 1);
        offsets.read("u", 0, 1);
        assert_eq!(offsets.handled("t", 1, 1), Some(1));
        assert_eq!(offsets.handled("u", 0, 1), Some(1));
        assert_eq!(offsets.handled("t", 0, 1), Some(1));
        assert_eq!(offsets.handled("v", 0, 1), None, "never read");
    }

    #[test]
    fn the_scenario_of_a_command_is_read_leniently() {
        let id = "550e8400-e29b-41d4-a716-446655440000";
        for (payload, lane) in [
            (format!(r#"{{"scenario_uuid":"{id}"}}"#), Some(id)),
            (
                format!(r#"{{"scenario_uuid":"{}","x":1}}"#, id.to_uppercase()),
                Some(id),
            ),
            (r#"{"scenario_uuid":"nope"}"#.to_string(), None),
            (r#"{"scenario_uuid":42}"#.to_string(), None),
            ("not json".to_string(), None),
        ] {
            assert_eq!(
                scenario_of(Some(payload.as_bytes())),
                lane.map(|l| l.parse().unwrap()),
                "{payload}"
            );
        }
        assert_eq!(scenario_of(None), None);
    }
}
