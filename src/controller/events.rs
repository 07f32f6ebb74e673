//! Every phase change is also published to the `scenario_events` topic, so
//! the platform learns what happened without Kubernetes access.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rdkafka::producer::FutureRecord;

use super::crd::Phase;
use super::metrics::ControllerMetrics;
use crate::kafka::KafkaProducer;
use crate::messages::wire_timestamp;

pub use crate::scenario::events::PhaseEvent;

#[derive(Clone)]
pub struct PhasePublisher {
    producer: KafkaProducer,
    topic: String,
    metrics: Arc<ControllerMetrics>,
}

impl PhasePublisher {
    pub fn new(producer: KafkaProducer, topic: &str, metrics: Arc<ControllerMetrics>) -> Self {
        PhasePublisher {
            producer,
            topic: topic.to_string(),
            metrics,
        }
    }

    /// Publishes one event; waits up to 10 s for the broker, then logs and
    /// counts the failure rather than holding up reconciliation.
    pub async fn publish(&self, scenario_uuid: &str, phase: Phase, reason: &str, message: &str) {
        let event = PhaseEvent {
            scenario_uuid,
            phase: phase.as_str(),
            reason,
            message,
            timestamp: wire_timestamp(Utc::now()),
        };
        let payload = match serde_json::to_vec(&event) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a scenario event");
                return;
            }
        };
        let record = FutureRecord::to(&self.topic)
            .key(scenario_uuid)
            .payload(&payload);
        if let Err((e, _)) = self.producer.send(record, Duration::from_secs(10)).await {
            self.metrics.event_publish_failures.inc();
            tracing::warn!(topic = %self.topic, scenario = scenario_uuid, error = %e, "cannot publish a scenario event");
        }
    }
}
