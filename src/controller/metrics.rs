//! The controller's Prometheus metrics (bounded label sets only) and probes.

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::http::Probes;
use crate::ingest::IngestMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

pub use crate::ingest::CategoryLabels;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// What was read: `service`, `apiserver` or `nodes`.
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

pub struct ControllerMetrics {
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_errors: Family<CategoryLabels, Counter>,
    pub reconcile_seconds: Histogram,
    pub queue_length: Gauge,
    pub live_workers: Gauge,
    pub pods_created: Counter,
    pub status_writes: Counter,
    pub status_conflicts: Counter,
    /// Writes the fencing policy refused: made by this replica after it
    /// lost the leader Lease.
    pub fenced_writes: Counter,
    pub scenarios_expired: Counter,
    pub phase_changes: Family<PhaseLabels, Counter>,
    pub ingest: IngestMetrics,
    pub event_publish_failures: Counter,
    pub leader: Gauge,
    /// Failed reads of the cluster's addresses for the camera host policy.
    pub cluster_learning_failures: Family<SourceLabels, Counter>,
    /// Cluster addresses the camera host policy refuses, as last learned.
    pub cluster_addresses: Gauge,
    ready: AtomicBool,
    kafka: std::sync::OnceLock<std::sync::Arc<crate::kafka::KafkaHealth>>,
    /// Steps in flight, judged by /healthz.
    watchdog: std::sync::OnceLock<std::sync::Arc<crate::watchdog::Watchdog>>,
}

impl ControllerMetrics {
    pub fn new() -> (Self, Registry) {
        let metrics = ControllerMetrics {
            reconciles: Default::default(),
            reconcile_errors: Default::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            queue_length: Default::default(),
            live_workers: Default::default(),
            pods_created: Default::default(),
            status_writes: Default::default(),
            status_conflicts: Default::default(),
            fenced_writes: Default::default(),
            scenarios_expired: Default::default(),
            phase_changes: Default::default(),
            ingest: Default::default(),
            event_publish_failures: Default::default(),
            leader: Default::default(),
            cluster_learning_failures: Default::default(),
            cluster_addresses: Default::default(),
            ready: AtomicBool::new(false),
            kafka: Default::default(),
            watchdog: Default::default(),
        };
        let mut registry = Registry::with_prefix("vap_controller");
        let r = &mut registry;
        r.register(
            "reconciles",
            "Reconciles by result",
            metrics.reconciles.clone(),
        );
        r.register(
            "reconcile_errors",
            "Reconcile errors by category",
            metrics.reconcile_errors.clone(),
        );
        r.register(
            "reconcile_seconds",
            "Time per reconcile",
            metrics.reconcile_seconds.clone(),
        );
        r.register(
            "queue_length",
            "Scenarios waiting for a worker slot",
            metrics.queue_length.clone(),
        );
        r.register(
            "live_workers",
            "Worker Pods holding a slot",
            metrics.live_workers.clone(),
        );
        r.register(
            "pods_created",
            "Worker Pods created",
            metrics.pods_created.clone(),
        );
        r.register(
            "status_writes",
            "Scenario status writes (only when the status changed)",
            metrics.status_writes.clone(),
        );
        r.register(
            "status_conflicts",
            "Scenario status writes refused because the Scenario changed since it was read (planned again, nothing acted on)",
            metrics.status_conflicts.clone(),
        );
        r.register(
            "fenced_writes",
            "Writes the fencing admission policy refused because this replica no longer held the leader Lease (made by a deposed leader; nothing was changed)",
            metrics.fenced_writes.clone(),
        );
        r.register(
            "scenarios_expired",
            "Finished Scenarios deleted after FINISHED_TTL_SECS",
            metrics.scenarios_expired.clone(),
        );
        r.register(
            "phase_changes",
            "Scenario phase changes by new phase",
            metrics.phase_changes.clone(),
        );
        metrics.ingest.register(r, "kubernetes_retries");
        r.register(
            "event_publish_failures",
            "scenario_events messages that could not be published",
            metrics.event_publish_failures.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the leader Lease",
            metrics.leader.clone(),
        );
        r.register(
            "cluster_learning_failures",
            "Failed reads of the cluster's own addresses (the kubernetes Service, the API server's endpoints, the nodes) for the camera host policy, by source",
            metrics.cluster_learning_failures.clone(),
        );
        r.register(
            "cluster_addresses",
            "Cluster addresses (with their ports) the camera host policy refuses, as last learned",
            metrics.cluster_addresses.clone(),
        );
        (metrics, registry)
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

impl Probes for ControllerMetrics {
    fn healthy(&self) -> Result<(), String> {
        self.steps_healthy()
    }

    fn ready(&self) -> Result<(), String> {
        if let Some(problem) = self.kafka.get().and_then(|k| k.problem()) {
            return Err(problem);
        }
        if self.ready.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("checking the Scenario CRD".into())
        }
    }
}
