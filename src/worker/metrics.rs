//! The worker's Prometheus metrics and the state behind its probes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::http::Probes;

/// Why a frame read from the source was not processed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// `sampling`: not due at VIDEO_FPS; `stale`: replaced by a newer frame
    /// before detection got to it.
    pub reason: &'static str,
}

pub struct WorkerMetrics {
    pub frames_read: Counter,
    pub frames_processed: Counter,
    pub frames_dropped: Family<DropLabels, Counter>,
    pub frames_corrupt: Counter,
    pub detections: Counter,
    pub reconnects: Counter,
    pub results_published: Counter,
    pub publish_failures: Counter,
    pub inference_errors: Counter,
    pub inference_seconds: Histogram,
    pub publish_seconds: Histogram,
    pub seconds_since_last_frame: Gauge<f64, AtomicU64>,
    health: HealthClock,
}

impl WorkerMetrics {
    pub fn new(watchdog: Duration) -> (Self, Registry) {
        let metrics = WorkerMetrics {
            frames_read: Default::default(),
            frames_processed: Default::default(),
            frames_dropped: Default::default(),
            frames_corrupt: Default::default(),
            detections: Default::default(),
            reconnects: Default::default(),
            results_published: Default::default(),
            publish_failures: Default::default(),
            inference_errors: Default::default(),
            inference_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 14)),
            publish_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
            seconds_since_last_frame: Default::default(),
            health: HealthClock::new(watchdog),
        };
        let mut registry = Registry::with_prefix("vap_worker");
        let r = &mut registry;
        r.register(
            "frames_read",
            "Frames read from the camera",
            metrics.frames_read.clone(),
        );
        r.register(
            "frames_processed",
            "Frames run through the detector",
            metrics.frames_processed.clone(),
        );
        r.register(
            "frames_dropped",
            "Frames read but not processed",
            metrics.frames_dropped.clone(),
        );
        r.register(
            "frames_corrupt",
            "Frames that could not be decoded",
            metrics.frames_corrupt.clone(),
        );
        r.register("detections", "Objects detected", metrics.detections.clone());
        r.register(
            "reconnects",
            "Attempts to reopen the camera",
            metrics.reconnects.clone(),
        );
        r.register(
            "results_published",
            "Result messages acknowledged by the sink",
            metrics.results_published.clone(),
        );
        r.register(
            "publish_failures",
            "Result messages the sink finally failed to deliver",
            metrics.publish_failures.clone(),
        );
        r.register(
            "inference_errors",
            "Frames the detector failed on",
            metrics.inference_errors.clone(),
        );
        r.register(
            "inference_seconds",
            "Detector time per frame",
            metrics.inference_seconds.clone(),
        );
        r.register(
            "publish_seconds",
            "Time from handing a result to the sink until it is acknowledged",
            metrics.publish_seconds.clone(),
        );
        r.register(
            "seconds_since_last_frame",
            "Seconds since the camera last delivered a frame",
            metrics.seconds_since_last_frame.clone(),
        );
        (metrics, registry)
    }

    pub fn health(&self) -> &HealthClock {
        &self.health
    }
}

/// Tracks when the last frame arrived and whether the worker is ready, for
/// `/healthz`, `/readyz` and the `seconds_since_last_frame` gauge.
pub struct HealthClock {
    started: Instant,
    last_frame_ms: AtomicU64,
    opened: AtomicBool,
    watchdog: Duration,
}

impl Default for HealthClock {
    fn default() -> Self {
        HealthClock::new(Duration::from_secs(60))
    }
}

impl HealthClock {
    pub fn new(watchdog: Duration) -> Self {
        HealthClock {
            started: Instant::now(),
            last_frame_ms: AtomicU64::new(0),
            opened: AtomicBool::new(false),
            watchdog,
        }
    }

    pub fn frame_arrived(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_frame_ms.store(ms.max(1), Ordering::Relaxed);
    }

    pub fn camera_opened(&self) {
        self.opened.store(true, Ordering::Relaxed);
    }

    /// The camera connection ended; `/readyz` fails until it is reopened.
    pub fn camera_lost(&self) {
        self.opened.store(false, Ordering::Relaxed);
    }

    /// Time since the last frame, or since start when none arrived yet.
    pub fn since_last_frame(&self) -> Duration {
        let last = Duration::from_millis(self.last_frame_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    pub fn is_ready(&self) -> bool {
        self.opened.load(Ordering::Relaxed)
    }

    pub fn watchdog(&self) -> Duration {
        self.watchdog
    }
}

impl Probes for WorkerMetrics {
    fn healthy(&self) -> Result<(), String> {
        let quiet = self.health.since_last_frame();
        if quiet > self.health.watchdog() {
            Err(format!(
                "no frame for {:.0} s (watchdog {} s)",
                quiet.as_secs_f64(),
                self.health.watchdog().as_secs()
            ))
        } else {
            Ok(())
        }
    }

    fn ready(&self) -> Result<(), String> {
        if self.health.is_ready() {
            Ok(())
        } else {
            Err("camera not open (starting or reconnecting)".to_string())
        }
    }

    fn before_scrape(&self) {
        self.seconds_since_last_frame
            .set(self.health.since_last_frame().as_secs_f64());
    }
}
