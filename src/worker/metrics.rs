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
    pub heartbeats_published: Counter,
    pub heartbeat_failures: Counter,
    /// Per-frame figures for the next heartbeat.
    pub beats: crate::worker::heartbeat::Samples,
    health: HealthClock,
    kafka: std::sync::OnceLock<std::sync::Arc<crate::kafka::KafkaHealth>>,
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
            heartbeats_published: Default::default(),
            heartbeat_failures: Default::default(),
            beats: Default::default(),
            kafka: Default::default(),
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
            "Sampled frames turned into a result (with DETECT_ON_CHANGE also those whose detections were repeated; inference_seconds counts only detector runs)",
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
        r.register(
            "heartbeats_published",
            "Heartbeats acknowledged by Kafka",
            metrics.heartbeats_published.clone(),
        );
        r.register(
            "heartbeat_failures",
            "Heartbeats that could not be published or written",
            metrics.heartbeat_failures.clone(),
        );
        (metrics, registry)
    }

    pub fn health(&self) -> &HealthClock {
        &self.health
    }

    /// `/readyz` fails while the Kafka producer reports a problem (a refused
    /// login, a failed TLS handshake, a missing ACL).
    pub fn watch_kafka(&self, health: std::sync::Arc<crate::kafka::KafkaHealth>) {
        let _ = self.kafka.set(health);
    }
}

/// The state behind the probes and the `seconds_since_last_frame` gauge:
/// when the last frame arrived, whether the camera is open (readiness), and
/// when the capture loop and the detector last made progress (liveness).
pub struct HealthClock {
    started: Instant,
    last_frame_ms: AtomicU64,
    opened: AtomicBool,
    capture_beat_ms: AtomicU64,
    capture_waiting: AtomicBool,
    detect_busy_since_ms: AtomicU64,
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
            capture_beat_ms: AtomicU64::new(0),
            capture_waiting: AtomicBool::new(false),
            detect_busy_since_ms: AtomicU64::new(0),
            watchdog,
        }
    }

    /// Milliseconds since start, at least 1 (0 means "never").
    fn now_ms(&self) -> u64 {
        (self.started.elapsed().as_millis() as u64).max(1)
    }

    pub fn frame_arrived(&self) {
        self.last_frame_ms.store(self.now_ms(), Ordering::Relaxed);
        self.capture_progress();
    }

    pub fn camera_opened(&self) {
        self.opened.store(true, Ordering::Relaxed);
    }

    /// The camera connection ended; `/readyz` fails until it is reopened.
    pub fn camera_lost(&self) {
        self.opened.store(false, Ordering::Relaxed);
    }

    /// The capture loop is alive: it read a frame, tried to open the camera,
    /// or is waiting out a reconnect delay.
    pub fn capture_progress(&self) {
        self.capture_beat_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The capture loop waits for the detector to take a frame (files):
    /// meanwhile the detector's progress is what counts.
    pub fn capture_waiting(&self, waiting: bool) {
        self.capture_progress();
        self.capture_waiting.store(waiting, Ordering::Relaxed);
    }

    pub fn detect_started(&self) {
        self.detect_busy_since_ms
            .store(self.now_ms(), Ordering::Relaxed);
    }

    pub fn detect_finished(&self) {
        self.detect_busy_since_ms.store(0, Ordering::Relaxed);
    }

    /// Time since the last frame, or since start when none arrived yet.
    pub fn since_last_frame(&self) -> Duration {
        let last = Duration::from_millis(self.last_frame_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Whether the camera has delivered a frame yet.
    pub fn has_frame(&self) -> bool {
        self.last_frame_ms.load(Ordering::Relaxed) > 0
    }

    pub fn is_ready(&self) -> bool {
        self.opened.load(Ordering::Relaxed)
    }

    pub fn watchdog(&self) -> Duration {
        self.watchdog
    }

    fn snapshot(&self) -> Activity {
        Activity {
            now_ms: self.now_ms(),
            capture_beat_ms: self.capture_beat_ms.load(Ordering::Relaxed),
            capture_waiting: self.capture_waiting.load(Ordering::Relaxed),
            detect_busy_since_ms: self.detect_busy_since_ms.load(Ordering::Relaxed),
        }
    }
}

/// What liveness is judged on (milliseconds since start; 0 = never).
#[derive(Debug, Clone, Copy)]
struct Activity {
    now_ms: u64,
    capture_beat_ms: u64,
    capture_waiting: bool,
    detect_busy_since_ms: u64,
}

/// Alive unless the detector has been on one frame, or the capture loop has
/// made no progress (not even a reconnect attempt or a backoff step), for
/// longer than the watchdog. A camera that is down is not a liveness failure.
fn liveness(a: Activity, watchdog: Duration) -> Result<(), String> {
    let limit = watchdog.as_millis() as u64;
    let secs = |ms: u64| ms as f64 / 1000.0;
    if a.detect_busy_since_ms > 0 {
        let busy = a.now_ms.saturating_sub(a.detect_busy_since_ms);
        if busy > limit {
            return Err(format!(
                "the detector has been on one frame for {:.0} s (WATCHDOG_SECS={})",
                secs(busy),
                watchdog.as_secs()
            ));
        }
    }
    let quiet = a.now_ms.saturating_sub(a.capture_beat_ms);
    if !a.capture_waiting && quiet > limit {
        return Err(format!(
            "the capture loop has made no progress for {:.0} s (WATCHDOG_SECS={})",
            secs(quiet),
            watchdog.as_secs()
        ));
    }
    Ok(())
}

impl Probes for WorkerMetrics {
    fn healthy(&self) -> Result<(), String> {
        liveness(self.health.snapshot(), self.health.watchdog())
    }

    fn ready(&self) -> Result<(), String> {
        if let Some(problem) = self.kafka.get().and_then(|k| k.problem()) {
            return Err(problem);
        }
        if self.health.is_ready() {
            Ok(())
        } else {
            Err(format!(
                "camera not open (starting or reconnecting; last frame {:.0} s ago)",
                self.health.since_last_frame().as_secs_f64()
            ))
        }
    }

    fn before_scrape(&self) {
        self.seconds_since_last_frame
            .set(self.health.since_last_frame().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WATCHDOG: Duration = Duration::from_secs(60);

    fn activity(now_s: u64, beat_s: u64, waiting: bool, busy_since_s: u64) -> Activity {
        Activity {
            now_ms: now_s * 1000,
            capture_beat_ms: beat_s * 1000,
            capture_waiting: waiting,
            detect_busy_since_ms: busy_since_s * 1000,
        }
    }

    #[test]
    fn a_capture_loop_that_keeps_trying_is_alive() {
        // Reconnecting with backoff: no frame for long, but the loop beats.
        assert!(liveness(activity(600, 599, false, 0), WATCHDOG).is_ok());
        assert!(liveness(activity(30, 0, false, 0), WATCHDOG).is_ok());
    }

    #[test]
    fn a_silent_capture_loop_is_stuck() {
        let err = liveness(activity(200, 100, false, 0), WATCHDOG).unwrap_err();
        assert!(
            err.contains("capture loop") && err.contains("100 s"),
            "{err}"
        );
    }

    #[test]
    fn waiting_for_the_detector_is_judged_by_the_detector() {
        assert!(liveness(activity(200, 100, true, 190), WATCHDOG).is_ok());
        let err = liveness(activity(200, 100, true, 120), WATCHDOG).unwrap_err();
        assert!(err.contains("detector") && err.contains("80 s"), "{err}");
    }
}
