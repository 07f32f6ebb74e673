//! The local supervisor's Prometheus metrics (prefix `vap_local_`; names
//! match the controller's where the meaning is the same) and probes.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

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
    kafka: std::sync::OnceLock<std::sync::Arc<crate::kafka::KafkaHealth>>,
    /// Steps in flight, judged by /healthz.
    watchdog: std::sync::OnceLock<std::sync::Arc<crate::watchdog::Watchdog>>,
    /// When the supervision loop last went round (Unix seconds; 0: not yet).
    loop_seen: AtomicI64,
}

/// The supervision loop goes round at least every few seconds; this long
/// without a round means it is stuck.
const LOOP_STALL_SECS: i64 = 60;

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

    /// Called by the supervision loop on every round.
    pub fn loop_alive(&self) {
        self.loop_seen
            .store(chrono::Utc::now().timestamp(), Ordering::Relaxed);
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// `/readyz` fails while the Kafka clients report a problem.
    pub fn watch_kafka(&self, health: std::sync::Arc<crate::kafka::KafkaHealth>) {
        let _ = self.kafka.set(health);
    }

    /// /healthz fails while one of `watchdog`'s steps runs too long.
    pub fn watch_steps(&self, watchdog: std::sync::Arc<crate::watchdog::Watchdog>) {
        let _ = self.watchdog.set(watchdog);
    }

    fn steps_healthy(&self) -> Result<(), String> {
        self.watchdog.get().map_or(Ok(()), |w| w.check())
    }
}

impl Probes for LocalMetrics {
    fn healthy(&self) -> Result<(), String> {
        self.steps_healthy()?;
        let seen = self.loop_seen.load(Ordering::Relaxed);
        let idle = chrono::Utc::now().timestamp() - seen;
        if seen > 0 && idle > LOOP_STALL_SECS {
            return Err(format!("the supervision loop has not run for {idle} s"));
        }
        Ok(())
    }

    fn ready(&self) -> Result<(), String> {
        if let Some(problem) = self.kafka.get().and_then(|k| k.problem()) {
            return Err(problem);
        }
        if self.ready.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("stopping the workers of a previous run and loading state".into())
        }
    }
}
