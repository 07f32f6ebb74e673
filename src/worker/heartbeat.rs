//! The worker's heartbeats: a small task wakes four times a second, reads a
//! few counters and clocks, and publishes a [`Heartbeat`] every
//! HEARTBEAT_SECS and at once when the camera's state changes; the last beat
//! (`ended`) goes out when the worker stops. Beats travel with the results'
//! producer (to HEARTBEAT_TOPIC) and, when HEARTBEAT_FILE is set (`runner
//! local` sets it), replace that file, which `runner local list` reads.
//!
//! The capture and detection threads only push one number per frame into
//! [`Samples`]; everything else is read from the metrics they keep anyway.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::heartbeat::{DARK_AFTER_BEATS, Heartbeat, StreamState, p95};
use crate::messages::wire_timestamp;
use crate::worker::metrics::WorkerMetrics;
use crate::worker::sink::ResultSink;

/// How often the task looks at the worker's state.
const TICK: Duration = Duration::from_millis(250);

/// Most per-frame samples kept between two beats (a fast clip at hundreds of
/// frames a second keeps the first ones): bounded memory whatever the rate.
const MAX_SAMPLES: usize = 4096;

/// Per-frame figures between two beats, pushed by the capture and detection
/// threads.
#[derive(Default)]
pub struct Samples {
    decode_ms: Mutex<Vec<f32>>,
    inference_ms: Mutex<Vec<f32>>,
    frame_number: AtomicU64,
}

fn push(samples: &Mutex<Vec<f32>>, value: Duration) {
    let mut s = samples.lock().unwrap_or_else(|e| e.into_inner());
    if s.len() < MAX_SAMPLES {
        s.push(value.as_secs_f32() * 1000.0);
    }
}

fn take(samples: &Mutex<Vec<f32>>) -> Vec<f32> {
    std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()))
}

impl Samples {
    /// The capture thread read and decoded one frame using `cpu` of its own time.
    pub fn decoded(&self, cpu: Duration) {
        push(&self.decode_ms, cpu);
    }

    /// The detector took `inference` for result `frame_number`.
    /// `inference` is `None` for a frame the detector did not run on (detect
    /// on change repeated the last detections): it says nothing of the
    /// detector's speed.
    pub fn processed(&self, inference: Option<Duration>, frame_number: u64) {
        if let Some(inference) = inference {
            push(&self.inference_ms, inference);
        }
        self.frame_number.store(frame_number, Ordering::Relaxed);
    }
}

/// CPU time the calling thread has used so far (Linux `CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The counters a beat reports differences of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub read: u64,
    pub processed: u64,
    pub dropped: u64,
}

impl Counts {
    fn of(m: &WorkerMetrics) -> Counts {
        let stale = m
            .frames_dropped
            .get_or_create(&crate::worker::metrics::DropLabels { reason: "stale" })
            .get();
        Counts {
            read: m.frames_read.get(),
            processed: m.frames_processed.get(),
            dropped: stale + m.frames_corrupt.get() + m.inference_errors.get(),
        }
    }
}

/// The camera's state from whether it is open and how long ago its last
/// frame came; `dark_after` is [`DARK_AFTER_BEATS`] heartbeat intervals.
pub fn stream_state(open: bool, since_last_frame: Duration, dark_after: Duration) -> StreamState {
    if since_last_frame >= dark_after {
        StreamState::CameraDark
    } else if open {
        StreamState::Streaming
    } else {
        StreamState::Reconnecting
    }
}

/// What one look at the worker sees.
#[derive(Debug, Clone)]
pub struct Look {
    /// Time since the worker started.
    pub at: Duration,
    pub state: StreamState,
    pub counts: Counts,
    pub frame_number: u64,
    /// `None` before the first frame.
    pub last_frame_age: Option<Duration>,
    pub decode_ms: Vec<f32>,
    pub inference_ms: Vec<f32>,
}

/// Decides when to beat and what a beat says (pure: no clock, no I/O).
pub struct Beater {
    scenario: Uuid,
    interval: Duration,
    seq: u64,
    last_at: Duration,
    last_state: Option<StreamState>,
    last: Counts,
}

impl Beater {
    pub fn new(scenario: Uuid, interval: Duration) -> Self {
        Beater {
            scenario,
            interval,
            seq: 0,
            last_at: Duration::ZERO,
            last_state: None,
            last: Counts::default(),
        }
    }

    /// A beat is due on a change of state (the first look included) or once
    /// an interval has passed since the last one.
    pub fn due(&self, at: Duration, state: StreamState) -> bool {
        self.last_state != Some(state) || at.saturating_sub(self.last_at) >= self.interval
    }

    /// The beat for `look`, stamped `timestamp`.
    pub fn beat(&mut self, mut look: Look, timestamp: String) -> Heartbeat {
        let span = look.at.saturating_sub(self.last_at).as_secs_f64();
        let rate = |n: u64| {
            if span > 0.0 {
                (n as f64 / span * 100.0).round() / 100.0
            } else {
                0.0
            }
        };
        let frames = look.counts.processed.saturating_sub(self.last.processed);
        let read = look.counts.read.saturating_sub(self.last.read);
        let dropped = look.counts.dropped.saturating_sub(self.last.dropped);
        let round = |v: Option<f64>| v.map(|ms| (ms * 100.0).round() / 100.0);
        self.seq += 1;
        self.last_at = look.at;
        self.last_state = Some(look.state);
        self.last = look.counts;
        Heartbeat {
            scenario_uuid: self.scenario,
            timestamp,
            state: look.state,
            seq: self.seq,
            interval_secs: self.interval.as_secs(),
            fps: rate(frames),
            camera_fps: rate(read),
            frames,
            frame_number: look.frame_number,
            last_frame_age_ms: look.last_frame_age.map(|d| d.as_millis() as u64),
            frames_dropped: dropped,
            decode_p95_ms: round(p95(&mut look.decode_ms)),
            inference_p95_ms: round(p95(&mut look.inference_ms)),
        }
    }
}

/// Where beats go besides the sink.
pub struct Outputs {
    pub sink: Arc<dyn ResultSink>,
    /// HEARTBEAT_FILE: replaced by each beat (write, then rename).
    pub file: Option<PathBuf>,
}

/// The running heartbeat task.
pub struct Heartbeats {
    task: tokio::task::JoinHandle<()>,
    state: Arc<Mutex<(Beater, Instant)>>,
    metrics: Arc<WorkerMetrics>,
    outputs: Arc<Outputs>,
}

fn look(metrics: &WorkerMetrics, started: Instant, dark_after: Duration, ended: bool) -> Look {
    let health = metrics.health();
    let since = health.since_last_frame();
    let state = if ended {
        StreamState::Ended
    } else {
        stream_state(health.is_ready(), since, dark_after)
    };
    let s = &metrics.beats;
    Look {
        at: started.elapsed(),
        state,
        counts: Counts::of(metrics),
        frame_number: s.frame_number.load(Ordering::Relaxed),
        last_frame_age: health.has_frame().then_some(since),
        decode_ms: take(&s.decode_ms),
        inference_ms: take(&s.inference_ms),
    }
}

fn send(beat: &Heartbeat, metrics: &WorkerMetrics, outputs: &Outputs) {
    tracing::debug!(
        state = beat.state.as_str(),
        seq = beat.seq,
        fps = beat.fps,
        "heartbeat"
    );
    if let Err(e) = outputs.sink.heartbeat(beat) {
        metrics.heartbeat_failures.inc();
        tracing::warn!(error = %e, "heartbeat could not be published");
    }
    if let Some(path) = &outputs.file
        && let Err(e) = write_file(path, beat)
    {
        metrics.heartbeat_failures.inc();
        tracing::warn!(file = %path.display(), error = %e, "heartbeat could not be written (HEARTBEAT_FILE)");
    }
}

/// Replaces `path` with `beat` (private to the owner, like the state directory).
fn write_file(path: &std::path::Path, beat: &Heartbeat) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&serde_json::to_vec(beat).map_err(std::io::Error::other)?)?;
    std::fs::rename(tmp, path)
}

impl Heartbeats {
    /// Starts beating for `scenario` every `interval`.
    pub fn start(
        scenario: Uuid,
        interval: Duration,
        metrics: Arc<WorkerMetrics>,
        outputs: Outputs,
    ) -> Heartbeats {
        let started = Instant::now();
        let dark_after = interval * DARK_AFTER_BEATS;
        let state = Arc::new(Mutex::new((Beater::new(scenario, interval), started)));
        let outputs = Arc::new(outputs);
        let task = tokio::spawn({
            let (state, metrics, outputs) = (state.clone(), metrics.clone(), outputs.clone());
            async move {
                let mut tick = tokio::time::interval(TICK);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let beat = {
                        let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
                        let (beater, started) = &mut *guard;
                        let current = stream_state(
                            metrics.health().is_ready(),
                            metrics.health().since_last_frame(),
                            dark_after,
                        );
                        if !beater.due(started.elapsed(), current) {
                            continue;
                        }
                        let look = look(&metrics, *started, dark_after, false);
                        beater.beat(look, wire_timestamp(chrono::Utc::now()))
                    };
                    send(&beat, &metrics, &outputs);
                }
            }
        });
        Heartbeats {
            task,
            state,
            metrics,
            outputs,
        }
    }

    /// Stops beating and hands the last beat (`ended`) to the sink; the
    /// caller's flush delivers it with the last results.
    pub fn finish(self) {
        self.task.abort();
        let beat = {
            let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let (beater, started) = &mut *guard;
            let look = look(&self.metrics, *started, Duration::MAX, true);
            beater.beat(look, wire_timestamp(chrono::Utc::now()))
        };
        send(&beat, &self.metrics, &self.outputs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn look(at: u64, state: StreamState, counts: (u64, u64, u64)) -> Look {
        Look {
            at: S(at),
            state,
            counts: Counts {
                read: counts.0,
                processed: counts.1,
                dropped: counts.2,
            },
            frame_number: counts.1,
            last_frame_age: Some(Duration::from_millis(120)),
            decode_ms: vec![2.0, 3.0, 40.0],
            inference_ms: vec![],
        }
    }

    #[test]
    fn the_state_follows_the_camera() {
        let dark = S(30);
        assert_eq!(stream_state(true, S(1), dark), StreamState::Streaming);
        assert_eq!(stream_state(false, S(1), dark), StreamState::Reconnecting);
        assert_eq!(stream_state(false, S(30), dark), StreamState::CameraDark);
        // Open but silent (a stalled stream before its read timeout).
        assert_eq!(stream_state(true, S(45), dark), StreamState::CameraDark);
    }

    #[test]
    fn beats_come_every_interval_and_at_once_on_a_change() {
        let mut b = Beater::new(Uuid::nil(), S(10));
        assert!(
            b.due(S(0), StreamState::Reconnecting),
            "the first look beats"
        );
        b.beat(look(0, StreamState::Reconnecting, (0, 0, 0)), "t".into());
        assert!(!b.due(S(3), StreamState::Reconnecting));
        assert!(
            b.due(S(3), StreamState::Streaming),
            "a change beats at once"
        );
        b.beat(look(3, StreamState::Streaming, (30, 6, 0)), "t".into());
        assert!(!b.due(S(12), StreamState::Streaming));
        assert!(b.due(S(13), StreamState::Streaming));
    }

    #[test]
    fn a_beat_reports_rates_and_counts_since_the_last_one() {
        let mut b = Beater::new(Uuid::nil(), S(10));
        let first = b.beat(look(5, StreamState::Streaming, (50, 10, 1)), "t1".into());
        assert_eq!((first.seq, first.fps, first.camera_fps), (1, 2.0, 10.0));
        let second = b.beat(look(15, StreamState::Streaming, (300, 30, 4)), "t2".into());
        assert_eq!(second.seq, 2);
        assert_eq!(second.frames, 20);
        assert_eq!(second.frame_number, 30);
        assert_eq!(second.fps, 2.0);
        assert_eq!(second.camera_fps, 25.0);
        assert_eq!(second.frames_dropped, 3);
        assert_eq!(second.last_frame_age_ms, Some(120));
        assert_eq!(second.decode_p95_ms, Some(40.0));
        assert_eq!(second.inference_p95_ms, None);
        assert_eq!(second.interval_secs, 10);
    }

    #[test]
    fn samples_stay_bounded() {
        let s = Samples::default();
        for i in 0..(MAX_SAMPLES + 10) {
            s.decoded(Duration::from_micros(i as u64));
        }
        assert_eq!(take(&s.decode_ms).len(), MAX_SAMPLES);
        assert!(take(&s.decode_ms).is_empty(), "taking empties");
    }

    #[test]
    fn the_thread_cpu_clock_moves() {
        let before = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_time() > before);
    }
}
