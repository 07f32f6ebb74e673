//! The local supervisor's Prometheus metrics (prefix `vap_local_`; names
//! match the controller's where the meaning is the same) and probes.

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::http::Probes;
use crate::ingest::IngestMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Default)]
pub struct LocalMetrics {
    pub queue_length: Gauge,
    pub live_workers: Gauge,
    pub workers_started: Counter,
    pub worker_restarts: Counter,
    pub orphans_stopped: Counter,
    pub phase_changes: Family<PhaseLabels, Counter>,
    pub ingest: IngestMetrics,
    pub event_publish_failures: Counter,
    pub state_errors: Counter,
    pub scenarios_file_errors: Family<ReasonLabels, Counter>,
    ready: AtomicBool,
}

impl LocalMetrics {
    pub fn new() -> (Self, Registry) {
        let metrics = LocalMetrics::default();
        let mut registry = Registry::with_prefix("vap_local");
        let r = &mut registry;
        r.register(
            "queue_length",
            "Scenarios waiting for a worker slot",
            metrics.queue_length.clone(),
        );
        r.register(
            "live_workers",
            "Worker processes holding a slot (running or in restart backoff)",
            metrics.live_workers.clone(),
        );
        r.register(
            "workers_started",
            "Worker processes started",
            metrics.workers_started.clone(),
        );
        r.register(
            "worker_restarts",
            "Workers restarted after a failure",
            metrics.worker_restarts.clone(),
        );
        r.register(
            "orphans_stopped",
            "Workers of a previous supervisor stopped at start-up",
            metrics.orphans_stopped.clone(),
        );
        r.register(
            "phase_changes",
            "Scenario phase changes by new phase",
            metrics.phase_changes.clone(),
        );
        metrics.ingest.register(r, "state_retries");
        r.register(
            "event_publish_failures",
            "scenario_events messages that could not be published",
            metrics.event_publish_failures.clone(),
        );
        r.register(
            "state_errors",
            "State store operations of the supervisor that failed",
            metrics.state_errors.clone(),
        );
        r.register(
            "scenarios_file_errors",
            "Scenarios file loads refused, by reason",
            metrics.scenarios_file_errors.clone(),
        );
        (metrics, registry)
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }
}

impl Probes for LocalMetrics {
    fn healthy(&self) -> Result<(), String> {
        Ok(())
    }

    fn ready(&self) -> Result<(), String> {
        if self.ready.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("stopping the workers of a previous run and loading state".into())
        }
    }
}
