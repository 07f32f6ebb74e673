//! Phase changes: logged, counted, and published to `scenario_events` when
//! the supervisor uses Kafka. Publishing never holds up supervision: the
//! record is queued in the producer and its delivery checked in the background.

use std::sync::Arc;

use chrono::Utc;
use rdkafka::producer::FutureRecord;

use super::metrics::{LocalMetrics, PhaseLabels};
use crate::kafka::KafkaProducer;
use crate::scenario::Phase;
use crate::scenario::events::PhaseEvent;

pub struct PhaseEvents {
    /// `None` without Kafka: phase changes are only logged.
    pub kafka: Option<(KafkaProducer, String)>,
    pub metrics: Arc<LocalMetrics>,
}

impl PhaseEvents {
    pub fn publish(&self, scenario_uuid: &str, phase: Phase, reason: &str, message: &str) {
        self.metrics
            .phase_changes
            .get_or_create(&PhaseLabels {
                phase: phase.as_str(),
            })
            .inc();
        tracing::info!(
            scenario = scenario_uuid,
            phase = phase.as_str(),
            reason,
            "phase changed: {message}"
        );
        let Some((producer, topic)) = &self.kafka else {
            return;
        };
        let event = PhaseEvent::new(scenario_uuid, phase, reason, message, Utc::now());
        let payload = match serde_json::to_vec(&event) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a scenario event");
                return;
            }
        };
        let record = FutureRecord::to(topic).key(scenario_uuid).payload(&payload);
        let delivery = producer.send_result(record).map_err(|(e, _)| e);
        let metrics = self.metrics.clone();
        let scenario = scenario_uuid.to_string();
        tokio::spawn(async move {
            let error = match delivery {
                Err(e) => e.to_string(),
                Ok(delivery) => match delivery.await {
                    Ok(Ok(_)) => return,
                    Ok(Err((e, _))) => e.to_string(),
                    Err(_) => "the producer was closed".to_string(),
                },
            };
            metrics.event_publish_failures.inc();
            tracing::warn!(scenario, error, "cannot publish a scenario event");
        });
    }
}
