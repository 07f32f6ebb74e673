//! Where results go: a Kafka topic (idempotent producer, acks=all) or standard
//! output (one JSON object per line).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};

use crate::heartbeat::Heartbeat;
use crate::kafka::{KafkaContext, KafkaSettings};
use crate::messages::ResultMessage;
use crate::worker::metrics::WorkerMetrics;

/// Where a worker writes its results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkKind {
    /// The Kafka topic RESULTS_TOPIC.
    Kafka,
    /// Standard output, one JSON object per line (no Kafka needed).
    Stdout,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(
        "cannot reach Kafka at KAFKA_BOOTSTRAP_SERVERS={servers}: {reason}; check that the brokers run and the address is right"
    )]
    Unreachable { servers: String, reason: String },
    #[error("{0}")]
    Refused(String),
    #[error("cannot configure the Kafka producer: {0}")]
    Config(String),
    #[error("cannot write a result: {0}")]
    Io(#[from] std::io::Error),
    #[error("{pending} results were still undelivered after waiting {waited:?}")]
    FlushTimeout { pending: i32, waited: Duration },
}

pub trait ResultSink: Send + Sync {
    /// Hands one result to the sink. Delivery may complete later; failures
    /// are logged and counted.
    fn publish(&self, result: &ResultMessage) -> Result<(), SinkError>;
    /// Waits up to `timeout` for everything handed over to be delivered.
    fn flush(&self, timeout: Duration) -> Result<(), SinkError>;
    /// Hands one heartbeat over; never waits (a beat that finds no room is
    /// an error: the next one follows). Standard output carries results
    /// only, so by default beats go nowhere.
    fn heartbeat(&self, _beat: &Heartbeat) -> Result<(), SinkError> {
        Ok(())
    }
}

/// What a delivery report is about.
pub struct Sent {
    at: Instant,
    heartbeat: bool,
}

/// Writes results to standard output.
pub struct StdoutSink {
    metrics: Arc<WorkerMetrics>,
}

impl StdoutSink {
    pub fn new(metrics: Arc<WorkerMetrics>) -> Self {
        StdoutSink { metrics }
    }
}

impl ResultSink for StdoutSink {
    fn publish(&self, result: &ResultMessage) -> Result<(), SinkError> {
        let started = Instant::now();
        let line = serde_json::to_string(result).map_err(std::io::Error::other)?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
        self.metrics.results_published.inc();
        self.metrics
            .publish_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    fn flush(&self, _timeout: Duration) -> Result<(), SinkError> {
        std::io::stdout().flush()?;
        Ok(())
    }
}

/// Counts deliveries and their latency; logs the ones that finally failed.
pub struct DeliveryReport {
    metrics: Arc<WorkerMetrics>,
    kafka: KafkaContext,
}

impl ClientContext for DeliveryReport {
    fn error(&self, error: KafkaError, reason: &str) {
        self.kafka.error(error, reason);
    }
}

impl ProducerContext for DeliveryReport {
    type DeliveryOpaque = Box<Sent>;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: Self::DeliveryOpaque) {
        match result {
            Ok(_) if sent.heartbeat => {
                self.kafka.health.connected();
                self.metrics.heartbeats_published.inc();
            }
            Err((err, msg)) if sent.heartbeat => {
                self.metrics.heartbeat_failures.inc();
                tracing::warn!(topic = msg.topic(), error = %err, "heartbeat could not be delivered to Kafka");
            }
            Ok(_) => {
                // A delivery is the producer's proof that it can write.
                self.kafka.health.connected();
                self.metrics.results_published.inc();
                self.metrics
                    .publish_seconds
                    .observe(sent.at.elapsed().as_secs_f64());
            }
            Err((err, msg)) => {
                self.metrics.publish_failures.inc();
                // A missing ACL on the results topic fails /readyz too.
                self.kafka.health.record(err, &err.to_string());
                tracing::error!(
                    topic = msg.topic(),
                    key = ?msg.key().map(String::from_utf8_lossy),
                    error = %err,
                    "result could not be delivered to Kafka"
                );
            }
        }
    }
}

/// Publishes results to a Kafka topic, keyed by scenario UUID.
pub struct KafkaSink {
    producer: ThreadedProducer<DeliveryReport>,
    topic: String,
    heartbeat_topic: Option<String>,
}

impl KafkaSink {
    /// Creates the producer and checks that the cluster answers within
    /// `timeout`, so an unreachable Kafka is reported at start.
    pub fn connect(
        kafka: &KafkaSettings,
        topic: &str,
        metrics: Arc<WorkerMetrics>,
        timeout: Duration,
    ) -> Result<Self, SinkError> {
        let context = kafka.context();
        let health = context.health.clone();
        metrics.watch_kafka(health.clone());
        let producer: ThreadedProducer<DeliveryReport> = kafka
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            // Keep retrying through broker restarts for up to 10 minutes.
            .set("message.timeout.ms", "600000")
            .create_with_context(DeliveryReport {
                metrics,
                kafka: context,
            })
            .map_err(|e| SinkError::Config(e.to_string()))?;
        producer
            .client()
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| match health.problem() {
                // The brokers answered but refused: say what to check.
                Some(problem) => SinkError::Refused(problem),
                None => SinkError::Unreachable {
                    servers: kafka.bootstrap.to_string(),
                    reason: e.to_string(),
                },
            })?;
        Ok(KafkaSink {
            producer,
            topic: topic.to_string(),
            heartbeat_topic: None,
        })
    }

    /// Publishes heartbeats to `topic` too.
    pub fn with_heartbeats(mut self, topic: &str) -> Self {
        self.heartbeat_topic = Some(topic.to_string());
        self
    }
}

impl ResultSink for KafkaSink {
    fn publish(&self, result: &ResultMessage) -> Result<(), SinkError> {
        let payload = serde_json::to_vec(result).map_err(std::io::Error::other)?;
        let key = result.scenario_uuid.to_string();
        let sent = Box::new(Sent {
            at: Instant::now(),
            heartbeat: false,
        });
        let mut record = BaseRecord::with_opaque_to(&self.topic, sent)
            .key(&key)
            .payload(&payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                // The local queue is full (Kafka is slow or away): wait for
                // room rather than drop a result.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err((err, _)) => {
                    return Err(SinkError::Config(format!(
                        "Kafka refused result {} for topic {}: {err}",
                        result.frame_number, self.topic
                    )));
                }
            }
        }
    }

    fn heartbeat(&self, beat: &Heartbeat) -> Result<(), SinkError> {
        let Some(topic) = &self.heartbeat_topic else {
            return Ok(());
        };
        let payload = serde_json::to_vec(beat).map_err(std::io::Error::other)?;
        let key = beat.scenario_uuid.to_string();
        let sent = Box::new(Sent {
            at: Instant::now(),
            heartbeat: true,
        });
        let record = BaseRecord::with_opaque_to(topic, sent)
            .key(&key)
            .payload(&payload);
        self.producer.send(record).map_err(|(err, _)| {
            SinkError::Config(format!(
                "Kafka refused heartbeat {} for topic {topic}: {err}",
                beat.seq
            ))
        })
    }

    fn flush(&self, timeout: Duration) -> Result<(), SinkError> {
        let started = Instant::now();
        let _ = self.producer.flush(timeout);
        let pending = self.producer.in_flight_count();
        if pending > 0 {
            return Err(SinkError::FlushTimeout {
                pending,
                waited: started.elapsed(),
            });
        }
        Ok(())
    }
}
