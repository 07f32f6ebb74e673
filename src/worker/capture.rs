//! Reading a camera with OpenCV's FFmpeg backend: open with timeouts, read
//! frames, sample them, hand them to detection, and reconnect with backoff
//! when a live stream is lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use opencv::core::{Mat, Vector};
use opencv::prelude::*;
use opencv::videoio::{self, VideoCapture};

use crate::backoff::Backoff;
use crate::camera_url::{CameraSource, RtspTransport};
use crate::sampler::{MonotonicClock, Sampler};
use crate::worker::camera_tls::TlsCheckError;
use crate::worker::decode_skip::{self, DecodeSkip, Discard};
use crate::worker::handoff::Handoff;
use crate::worker::metrics::{DropLabels, WorkerMetrics};
use crate::worker::transport;
use crate::worker::transport::RtspTransportMode;

/// A sampled frame on its way to detection.
pub struct Frame {
    pub image: Mat,
    pub captured_at: DateTime<Utc>,
}

// SAFETY: a Mat owns its pixel buffer (reference-counted by OpenCV with
// atomic counts); each Frame is moved between threads, never shared.
unsafe impl Send for Frame {}

#[derive(Debug, Clone)]
pub struct CaptureSettings {
    pub source: CameraSource,
    pub period: Duration,
    pub open_timeout: Duration,
    pub read_timeout: Duration,
    pub realtime: bool,
    /// Failed opens or lost streams in a row before giving up; `None` = never.
    pub max_reconnects: Option<u32>,
    pub reconnect_base: Duration,
    pub reconnect_max: Duration,
    pub rtsp_transport: RtspTransportMode,
    /// FFmpeg's decoding threads.
    pub decode_threads: u32,
    /// `DECODE_SKIP`: which frames the decoder may leave out.
    pub decode_skip: DecodeSkip,
    /// `CAMERA_ERROR_DETAIL`: say why a camera did not open (refused, timed
    /// out, not a video) and fail as soon as it is known; off, every such
    /// failure reads the same and takes OPEN_TIMEOUT_MS.
    pub error_detail: bool,
}

/// How reading ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureEnd {
    EndOfFile,
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "cannot open camera {camera}: {reason}; check that the URL is right, the camera is reachable and the codec is supported"
    )]
    Open { camera: String, reason: String },
    #[error(
        "gave up on camera {camera} after {attempts} reconnect attempts in a row (MAX_RECONNECTS); the last: {last}"
    )]
    GaveUp {
        camera: String,
        attempts: u32,
        last: String,
    },
    #[error("no frame of {camera} could be decoded ({read} frames read){}", memory_note(*.address_space))]
    NothingDecoded {
        camera: String,
        read: u64,
        /// The worker's address space limit in bytes, if it has one.
        address_space: Option<u64>,
    },
}

/// What [`CaptureError::NothingDecoded`] adds when the process has an
/// address space limit: a frame that does not fit cannot be decoded.
fn memory_note(address_space: Option<u64>) -> String {
    match address_space {
        Some(bytes) => format!(
            "; this worker may use {} MiB of address space (WORKER_MEMORY_LIMIT_MB of `runner local`), too little for frames this large or for damaged data",
            bytes >> 20
        ),
        None => "; the file is damaged or its frames are too large".to_string(),
    }
}

/// The address space limit of this process, if it has one.
fn address_space_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes into the struct given.
    let known = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } == 0;
    (known && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Why one connection to the source ended.
enum StreamEnd {
    /// No more frames (end of file, stream lost or read timeout). `lasted` is
    /// the time from opening the connection to its last frame; `decoded`
    /// counts the frames handed on to detection.
    Ended {
        frames: u64,
        decoded: u64,
        lasted: Duration,
    },
    Shutdown,
}

/// Reads the source until end of file, shutdown, or too many failed
/// reconnects. Always closes the hand-off before returning.
pub fn run(
    settings: &CaptureSettings,
    handoff: &Handoff<Frame>,
    metrics: &WorkerMetrics,
    shutdown: &Arc<AtomicBool>,
) -> Result<CaptureEnd, CaptureError> {
    let result = read_with_reconnects(settings, handoff, metrics, shutdown);
    handoff.close();
    result
}

fn read_with_reconnects(
    settings: &CaptureSettings,
    handoff: &Handoff<Frame>,
    metrics: &WorkerMetrics,
    shutdown: &Arc<AtomicBool>,
) -> Result<CaptureEnd, CaptureError> {
    let live = settings.source.is_live();
    let shown = settings.source.to_string();
    let max_failures = settings
        .max_reconnects
        .or(if live { None } else { Some(0) });
    let mut backoff = Backoff::new(settings.reconnect_base, settings.reconnect_max);
    let mut sampler = Sampler::new(settings.period);
    let mut transport_worked: Option<RtspTransport> = None;
    let mut discard: Option<Discard> = None;
    let started = Instant::now();

    loop {
        metrics.health().capture_progress();
        if shutdown.load(Ordering::Relaxed) {
            return Ok(CaptureEnd::Shutdown);
        }
        let opened = open_with_transports(settings, &mut transport_worked, metrics, discard)
            .and_then(|(capture, tried)| match discard {
                Some(_) => Ok(capture),
                None => decide_discard(settings, capture, tried, &mut transport_worked, metrics)
                    .map(|(capture, decided)| {
                        discard = Some(decided);
                        capture
                    }),
            });
        let failure = match opened {
            Ok(mut capture) => {
                metrics.health().camera_opened();
                let frame_count = capture.get(videoio::CAP_PROP_FRAME_COUNT).unwrap_or(0.0);
                let mode = read_mode(&settings.source, frame_count);
                tracing::info!(
                    camera = %shown,
                    transport = transport_worked.map(RtspTransport::as_str),
                    finite = mode == ReadMode::File,
                    "camera opened"
                );
                let mut pace = match mode {
                    ReadMode::Live => Pace::Live { started },
                    ReadMode::File => Pace::File {
                        clock: MonotonicClock::new(
                            capture.get(videoio::CAP_PROP_FPS).unwrap_or(0.0),
                        ),
                        paced_from: Instant::now(),
                        realtime: settings.realtime,
                    },
                };
                let end = read_stream(
                    &mut capture,
                    &mut pace,
                    &mut sampler,
                    handoff,
                    metrics,
                    shutdown,
                );
                match end {
                    StreamEnd::Shutdown => return Ok(CaptureEnd::Shutdown),
                    // A file none of whose frames could be decoded did not
                    // run: its frames are too large for the memory the
                    // worker may use, or it is damaged throughout.
                    StreamEnd::Ended {
                        frames, decoded: 0, ..
                    } if mode == ReadMode::File => {
                        return Err(CaptureError::NothingDecoded {
                            camera: shown,
                            read: frames,
                            address_space: address_space_limit(),
                        });
                    }
                    StreamEnd::Ended { .. } if mode == ReadMode::File => {
                        return Ok(CaptureEnd::EndOfFile);
                    }
                    StreamEnd::Ended { frames, lasted, .. } => {
                        metrics.health().camera_lost();
                        // Only a connection that kept delivering frames for at
                        // least READ_TIMEOUT_MS ends a run of failures; one that
                        // stalls or drops right after a frame or two counts as a
                        // failed attempt, so MAX_RECONNECTS still ends a flapping
                        // camera.
                        if frames > 0 && lasted >= settings.read_timeout {
                            backoff.reset();
                        }
                        format!(
                            "stream ended or stalled after {frames} frames in {:.1} s",
                            lasted.as_secs_f64()
                        )
                    }
                }
            }
            Err(reason) => reason,
        };

        if max_failures.is_some_and(|max| backoff.attempts() >= max) {
            if !live {
                return Err(CaptureError::Open {
                    camera: shown,
                    reason: failure,
                });
            }
            return Err(CaptureError::GaveUp {
                camera: shown,
                attempts: backoff.attempts(),
                last: failure,
            });
        }
        let delay = backoff.next_delay(rand::random::<f64>());
        metrics.reconnects.inc();
        tracing::warn!(
            camera = %shown,
            attempt = backoff.attempts(),
            delay_ms = delay.as_millis() as u64,
            reason = %failure,
            "camera lost; reconnecting"
        );
        if sleep_unless_shutdown(delay, shutdown, metrics) {
            return Ok(CaptureEnd::Shutdown);
        }
    }
}

/// How a source that opened is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadMode {
    /// By media time, every sampled frame processed, ending at its end.
    File,
    /// By the wall clock, only the newest sampled frame processed, reopened when lost.
    Live,
}

/// Local files are files; RTSP is live; HTTP(S) is a file when FFmpeg knows
/// how many frames it has (a clip of known duration, such as an MP4 or AVI on
/// a web server) and live otherwise (MJPEG streams, live HLS).
fn read_mode(source: &CameraSource, frame_count: f64) -> ReadMode {
    let finite = frame_count.is_finite() && frame_count >= 1.0;
    match source {
        CameraSource::File(_) => ReadMode::File,
        CameraSource::Network(_) if source.is_rtsp() => ReadMode::Live,
        CameraSource::Network(_) if finite => ReadMode::File,
        CameraSource::Network(_) => ReadMode::Live,
    }
}

/// Once the first capture is open, decides what its decoder leaves out
/// (`DECODE_SKIP`, from the stream's frame rate and, for a local file, its
/// keyframes) and reopens the source when that differs from what `tried`
/// asked for. Returns the capture to read and the decision, which holds for
/// every later reconnect.
fn decide_discard(
    settings: &CaptureSettings,
    capture: VideoCapture,
    tried: Discard,
    worked: &mut Option<RtspTransport>,
    metrics: &WorkerMetrics,
) -> Result<(VideoCapture, Discard), String> {
    let fps = capture.get(videoio::CAP_PROP_FPS).unwrap_or(0.0);
    let period = settings.period.as_secs_f64();
    let cover = match &settings.source {
        CameraSource::File(_) if settings.decode_skip.wants_probe(fps, period) => {
            probe_keyframes(settings, period, metrics)
        }
        _ => None,
    };
    let decided = settings.decode_skip.decide(fps, period, cover);
    tracing::info!(
        camera = %settings.source,
        stream_fps = fps,
        keyframes_cover = cover,
        decode_skip = decided.as_str(),
        "decoding {}",
        match decided {
            Discard::Nothing => "every frame",
            Discard::NonReference => "all but non-reference frames",
            Discard::Bidirectional => "all but B-frames",
            Discard::NonKey => "keyframes only",
        }
    );
    if decided == tried {
        return Ok((capture, decided));
    }
    drop(capture);
    open_with_transports(settings, worked, metrics, Some(decided))
        .map(|(capture, _)| (capture, decided))
}

/// Packets a keyframe probe reads at most (about 5.5 hours at 25 fps);
/// a longer file is judged by its beginning.
const PROBE_PACKETS: u64 = 500_000;

/// Reads a local file's packets without decoding them (OpenCV's demux-only
/// mode) and says whether every sampling period that holds a frame holds a
/// keyframe; `None` when the file cannot be read that way.
fn probe_keyframes(
    settings: &CaptureSettings,
    period: f64,
    metrics: &WorkerMetrics,
) -> Option<bool> {
    let params = Vector::<i32>::from_slice(&[videoio::CAP_PROP_FORMAT, -1]);
    let target = settings.source.backend_target();
    let mut capture =
        VideoCapture::from_file_with_params(&target, videoio::CAP_FFMPEG, &params).ok()?;
    if !capture.is_opened().unwrap_or(false) {
        return None;
    }
    let mut packets = 0;
    let frames = std::iter::from_fn(|| {
        packets += 1;
        metrics.health().capture_progress();
        if packets > PROBE_PACKETS || !capture.grab().unwrap_or(false) {
            return None;
        }
        let at = capture.get(videoio::CAP_PROP_POS_MSEC).ok()? / 1000.0;
        let key = capture.get(videoio::CAP_PROP_LRF_HAS_KEY_FRAME).ok()? != 0.0;
        Some((at, key))
    });
    Some(decode_skip::keyframes_cover(frames, period))
}

/// Opens the source, its decoder leaving out `discard` (before that is
/// decided, what DECODE_SKIP guesses first); an RTSP source tries the
/// transports RTSP_TRANSPORT allows in turn and remembers the one that
/// worked. Returns the capture and what its decoder leaves out.
fn open_with_transports(
    settings: &CaptureSettings,
    worked: &mut Option<RtspTransport>,
    metrics: &WorkerMetrics,
    discard: Option<Discard>,
) -> Result<(VideoCapture, Discard), String> {
    let discard = discard.unwrap_or(settings.decode_skip.first_guess());
    if !settings.source.is_rtsp() {
        // SAFETY: as below.
        unsafe {
            transport::apply(
                &settings.source,
                transport::initial(settings.rtsp_transport),
                discard,
            )
        };
        return open(settings).map(|capture| (capture, discard));
    }
    let mut failures = Vec::new();
    for rtsp in transport::attempt_order(settings.rtsp_transport, *worked) {
        metrics.health().capture_progress();
        // SAFETY: `worker::main` set the variable before any thread started,
        // and only this (the capture) thread opens captures.
        unsafe { transport::apply(&settings.source, rtsp, discard) };
        match open(settings) {
            Ok(capture) => {
                if *worked != Some(rtsp) && !failures.is_empty() {
                    tracing::warn!(
                        camera = %settings.source,
                        transport = rtsp.as_str(),
                        "RTSP over {} failed; using {} (RTSP_TRANSPORT=auto)",
                        other(rtsp).as_str().to_uppercase(),
                        rtsp.as_str().to_uppercase()
                    );
                }
                *worked = Some(rtsp);
                return Ok((capture, discard));
            }
            Err(reason) => {
                failures.push(format!("over {}: {reason}", rtsp.as_str().to_uppercase()))
            }
        }
    }
    Err(failures.join("; "))
}

fn other(rtsp: RtspTransport) -> RtspTransport {
    match rtsp {
        RtspTransport::Tcp => RtspTransport::Udp,
        RtspTransport::Udp => RtspTransport::Tcp,
    }
}

/// Opens the source with the FFmpeg backend; the open/read timeouts and the
/// decoding threads are open parameters (the only way FFmpeg honours them).
fn open(settings: &CaptureSettings) -> Result<VideoCapture, String> {
    let millis = |d: Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
    let params = Vector::<i32>::from_slice(&[
        videoio::CAP_PROP_OPEN_TIMEOUT_MSEC,
        millis(settings.open_timeout),
        videoio::CAP_PROP_READ_TIMEOUT_MSEC,
        millis(settings.read_timeout),
        videoio::CAP_PROP_N_THREADS,
        i32::try_from(settings.decode_threads).unwrap_or(1),
    ]);
    settings.source.recheck_host()?;
    let started = Instant::now();
    let not_opened = |detail: &str| {
        even_out(started, settings);
        settings.source.not_opened(detail, settings.error_detail)
    };
    match super::camera_tls::installed().check(&settings.source, settings.open_timeout) {
        Ok(()) => {}
        Err(TlsCheckError::Untrusted(words)) => return Err(words),
        Err(TlsCheckError::Unreachable(detail)) => return Err(not_opened(&detail)),
    }
    let target = settings.source.backend_target();
    let capture = VideoCapture::from_file_with_params(&target, videoio::CAP_FFMPEG, &params)
        .map_err(|e| {
            not_opened(&redact_backend_error(
                &e.to_string(),
                &target,
                &settings.source,
            ))
        })?;
    match capture.is_opened() {
        Ok(true) => Ok(capture),
        Ok(false) => Err(not_opened(
            "FFmpeg could not open it: refused, timed out, reset, or not a video",
        )),
        Err(e) => Err(not_opened(&redact_backend_error(
            &e.to_string(),
            &target,
            &settings.source,
        ))),
    }
}

/// Without `CAMERA_ERROR_DETAIL`, a network camera's failed open ends no
/// sooner than OPEN_TIMEOUT_MS after it began: a refused connection then
/// takes as long as one never answered, so the time a failure takes tells
/// no more than its words.
fn even_out(started: Instant, settings: &CaptureSettings) {
    if settings.error_detail || !settings.source.is_live() {
        return;
    }
    std::thread::sleep(settings.open_timeout.saturating_sub(started.elapsed()));
}

/// OpenCV errors may quote the URL they were given; never let credentials out.
fn redact_backend_error(message: &str, target: &str, source: &CameraSource) -> String {
    source.scrub(&message.replace(target, &source.to_string()))
}

/// How frames are timed and handed on: files by their media clock (paced or
/// as fast as detection allows, every sampled frame kept), live sources by the
/// wall clock (only the newest sampled frame kept).
enum Pace {
    File {
        clock: MonotonicClock,
        paced_from: Instant,
        realtime: bool,
    },
    Live {
        started: Instant,
    },
}

fn read_stream(
    capture: &mut VideoCapture,
    pace: &mut Pace,
    sampler: &mut Sampler,
    handoff: &Handoff<Frame>,
    metrics: &WorkerMetrics,
    shutdown: &Arc<AtomicBool>,
) -> StreamEnd {
    let mut frames = 0;
    let mut decoded = 0;
    let opened = Instant::now();
    let mut lasted = Duration::ZERO;
    loop {
        if shutdown.load(Ordering::Relaxed) {
            return StreamEnd::Shutdown;
        }
        metrics.health().capture_progress();
        let cpu = super::heartbeat::thread_cpu_time();
        if !capture.grab().unwrap_or(false) {
            return StreamEnd::Ended {
                frames,
                decoded,
                lasted,
            };
        }
        frames += 1;
        lasted = opened.elapsed();
        metrics.frames_read.inc();
        metrics.health().frame_arrived();
        let at = match pace {
            Pace::File {
                clock,
                paced_from,
                realtime,
            } => {
                // A file starts at 0. OpenCV reports a frame whose timestamp
                // is 0 by the stamp of the packet that completed it instead,
                // which for the first keyframe of a decoder that skips frames
                // (DECODE_SKIP) is up to a keyframe interval later.
                let reported = if frames == 1 {
                    0.0
                } else {
                    capture.get(videoio::CAP_PROP_POS_MSEC).unwrap_or(f64::NAN) / 1000.0
                };
                let at = clock.observe(reported);
                let due = *paced_from + Duration::from_secs_f64(at);
                if *realtime
                    && sleep_unless_shutdown(
                        due.saturating_duration_since(Instant::now()),
                        shutdown,
                        metrics,
                    )
                {
                    return StreamEnd::Shutdown;
                }
                at
            }
            Pace::Live { started } => started.elapsed().as_secs_f64(),
        };
        if !sampler.offer(at) {
            metrics.frames_dropped.get_or_create(&SAMPLING).inc();
            continue;
        }
        let Some(frame) = retrieve(capture, metrics) else {
            continue;
        };
        metrics
            .beats
            .decoded(super::heartbeat::thread_cpu_time().saturating_sub(cpu));
        decoded += 1;
        match pace {
            Pace::File { .. } => {
                metrics.health().capture_waiting(true);
                let taken = handoff.put_wait(frame);
                metrics.health().capture_waiting(false);
                if !taken {
                    return StreamEnd::Shutdown;
                }
            }
            Pace::Live { .. } => {
                if handoff.put_latest(frame).is_some() {
                    metrics.frames_dropped.get_or_create(&STALE).inc();
                }
            }
        }
    }
}

const SAMPLING: DropLabels = DropLabels { reason: "sampling" };
const STALE: DropLabels = DropLabels { reason: "stale" };

/// Decodes the grabbed frame; a frame that cannot be decoded is counted as
/// corrupt and skipped.
fn retrieve(capture: &mut VideoCapture, metrics: &WorkerMetrics) -> Option<Frame> {
    let captured_at = Utc::now();
    let mut image = Mat::default();
    match capture.retrieve(&mut image, 0) {
        Ok(true) if !image.empty() => Some(Frame { image, captured_at }),
        Ok(_) => {
            metrics.frames_corrupt.inc();
            tracing::debug!("a frame could not be decoded; skipped");
            None
        }
        Err(e) => {
            metrics.frames_corrupt.inc();
            tracing::debug!(error = %e, "a frame could not be decoded; skipped");
            None
        }
    }
}

/// Sleeps for `total` in short steps (each one capture progress); true when
/// shutdown was requested meanwhile.
fn sleep_unless_shutdown(total: Duration, shutdown: &AtomicBool, metrics: &WorkerMetrics) -> bool {
    let deadline = Instant::now() + total;
    loop {
        metrics.health().capture_progress();
        if shutdown.load(Ordering::Relaxed) {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(raw: &str) -> CameraSource {
        CameraSource::parse(raw, Some(std::path::Path::new("/videos"))).unwrap()
    }

    #[test]
    fn http_clips_of_known_length_are_files_streams_are_live() {
        let clip = source("http://127.0.0.1:8000/vtest.mp4");
        assert_eq!(read_mode(&clip, 795.0), ReadMode::File);
        // FFmpeg reports 0 or a negative count when the length is unknown.
        assert_eq!(read_mode(&clip, 0.0), ReadMode::Live);
        assert_eq!(read_mode(&clip, -9.2e18), ReadMode::Live);
        assert_eq!(read_mode(&clip, f64::NAN), ReadMode::Live);
        let rtsp = source("rtsp://cam/stream");
        assert_eq!(read_mode(&rtsp, 795.0), ReadMode::Live);
        let file = source("/videos/a.mp4");
        assert_eq!(read_mode(&file, 0.0), ReadMode::File);
    }
}
