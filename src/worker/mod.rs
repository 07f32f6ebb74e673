//! `runner worker`: runs one scenario. A capture thread reads the camera and
//! samples frames at VIDEO_FPS; a detection thread runs the detector on each
//! sampled frame and hands one result per frame to the sink; the async side
//! serves `/metrics`, `/healthz`, `/readyz` and turns SIGTERM/SIGINT into an
//! orderly stop (stop reading, flush pending results with a bounded wait, exit
//! [`STOPPED_EXIT_CODE`]); exit 0 means the source ended and every result was
//! delivered.

pub mod camera_tls;
pub mod capture;
pub mod decode_skip;
pub mod ffmpeg_log;
pub mod handoff;
pub mod heartbeat;
pub mod metrics;
pub mod motion;
pub mod preview;
pub mod sink;
pub mod transport;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::camera_url::{CameraSource, CameraUrlError};
use crate::cli::WorkerArgs;
use crate::detector::{self, DetectError, Detector, DetectorConfig, YoloConfig};
use crate::kafka::KafkaSettings;
use crate::messages::{ResultMessage, wire_timestamp};
use crate::worker::sink::SinkKind;
use capture::{CaptureEnd, CaptureError, CaptureSettings, Frame};
use handoff::Handoff;
use metrics::WorkerMetrics;
use sink::{KafkaSink, ResultSink, SinkError, StdoutSink};

/// Exit code of a worker stopped by SIGTERM or SIGINT before its source ended
/// (128 + SIGTERM, as shells report it). Not 0: a stop is not the end of a
/// clip, so a worker the kubelet stops (a liveness kill) is restarted in place
/// under `restartPolicy: OnFailure`, and a clip stopped halfway is never taken
/// for finished.
pub const STOPPED_EXIT_CODE: u8 = 143;

/// Everything that stops a worker with a non-zero exit.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("CAMERA_URL refused: {0}")]
    CameraUrl(#[from] CameraUrlError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("cannot start the {model} detector: {source}")]
    Detector { model: String, source: DetectError },
    #[error("cannot serve metrics on METRICS_ADDR={addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    KafkaSetting(String),
    #[error("{0}")]
    CameraTls(String),
    #[error("a worker thread stopped unexpectedly: {0}")]
    Thread(String),
    #[error("cannot relay FFmpeg's log lines: {0}")]
    Relay(std::io::Error),
}

/// Validates the camera URL, limits FFmpeg to the protocols it needs, and runs
/// the worker to completion: the source's end, or a stop on request. Call
/// before any other thread starts: it sets a process-wide environment variable
/// that OpenCV reads on first open.
pub fn main(args: WorkerArgs) -> Result<CaptureEnd, WorkerError> {
    let root = args.settings.video_file_root.as_deref();
    let source = CameraSource::parse(&args.camera_url.0, root)?.resolve(root)?;
    let mut policy = args
        .camera_policy
        .policy(crate::host_policy::Mode::detect());
    policy.add_pod_addresses(
        std::env::var("KUBERNETES_SERVICE_HOST").ok().as_deref(),
        args.node_ip.as_deref(),
    );
    source.check_host(&policy)?;
    crate::host_policy::install(policy);
    let tls = camera_tls::CameraTls::new(
        args.settings.camera_ca_file.as_deref(),
        args.settings.camera_tls_verify,
    )
    .map_err(WorkerError::CameraTls)?;
    camera_tls::install(tls);
    // SAFETY: no other thread exists yet; the relay and the async runtime
    // start below.
    unsafe {
        transport::apply(
            &source,
            transport::initial(args.settings.rtsp_transport),
            args.decode_skip.first_guess(),
        )
    };
    // FFmpeg's own lines quote URLs with the camera's credentials: from here
    // on they reach standard error only scrubbed, as log events.
    let _relay = ffmpeg_log::StderrRelay::start(source.clone(), args.settings.camera_error_detail)
        .map_err(WorkerError::Relay)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(WorkerError::Runtime)?;
    runtime.block_on(run(args, source))
}

async fn run(args: WorkerArgs, source: CameraSource) -> Result<CaptureEnd, WorkerError> {
    let scenario = args.scenario_uuid;
    tracing::info!(%scenario, camera = %source, fps = %args.video_fps, model = ?args.settings.model, sink = ?args.sink, "worker starting");

    let (metrics, mut registry) =
        WorkerMetrics::new(Duration::from_secs(args.settings.stream.watchdog_secs));
    let metrics = Arc::new(metrics);
    let preview = args
        .settings
        .preview
        .then(|| Arc::new(preview::Preview::new(&mut registry)));
    let routes = preview
        .clone()
        .map_or_else(preview::disabled_routes, preview::Preview::routes);
    let (bound, server) =
        crate::http::bind_with(args.http.metrics_addr, registry, metrics.clone(), routes)
            .await
            .map_err(|source| WorkerError::Metrics {
                addr: args.http.metrics_addr,
                source,
            })?;
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    let server = tokio::spawn(server);

    let detector =
        detector::build(&detector_config(&args)).map_err(|source| WorkerError::Detector {
            model: args.settings.model.as_str().to_string(),
            source,
        })?;

    let sink: Arc<dyn ResultSink> = match args.sink {
        SinkKind::Stdout => Arc::new(StdoutSink::new(metrics.clone())),
        SinkKind::Kafka => {
            let kafka = KafkaSettings::resolve(&args.kafka, |name| std::env::var(name).ok())
                .map_err(|e| WorkerError::KafkaSetting(e.0))?;
            tracing::info!(kafka = %kafka.summary(), "Kafka producer");
            let topic = args.settings.results_topic.clone();
            let m = metrics.clone();
            let timeout = args
                .settings
                .stream
                .open_timeout_ms
                .0
                .max(Duration::from_secs(10));
            let beats = args.settings.heartbeat.heartbeat_topic.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || KafkaSink::connect(&kafka, &topic, m, timeout))
                    .await
                    .map_err(|e| WorkerError::Thread(e.to_string()))??
                    .with_heartbeats(&beats),
            )
        }
    };

    let shutdown = Arc::new(AtomicBool::new(false));
    let handoff = Arc::new(Handoff::<Frame>::default());
    let settings = CaptureSettings {
        source,
        period: args.video_fps.period(),
        open_timeout: args.settings.stream.open_timeout_ms.0,
        read_timeout: args.settings.stream.read_timeout_ms.0,
        realtime: args.realtime,
        max_reconnects: args.settings.stream.max_reconnects,
        reconnect_base: args.settings.stream.reconnect_base_ms.0,
        reconnect_max: args.settings.stream.reconnect_max_ms.0,
        rtsp_transport: args.settings.rtsp_transport,
        decode_threads: args.decode_threads.0,
        decode_skip: args.decode_skip,
        error_detail: args.settings.camera_error_detail,
    };

    let capture = {
        let (handoff, metrics, shutdown) = (handoff.clone(), metrics.clone(), shutdown.clone());
        std::thread::Builder::new()
            .name("capture".into())
            .spawn(move || capture::run(&settings, &handoff, &metrics, &shutdown))
            .map_err(|e| WorkerError::Thread(e.to_string()))?
    };
    let change = args.detect_on_change.then(|| {
        motion::ChangeTest::new((CHANGE_REFRESH_SECS * args.video_fps.get()).ceil() as u32)
    });
    let detection = {
        let (handoff, metrics, sink) = (handoff.clone(), metrics.clone(), sink.clone());
        std::thread::Builder::new()
            .name("detect".into())
            .spawn(move || {
                let (sink, preview) = (sink.as_ref(), preview.as_deref());
                detect_loop(
                    scenario, detector, change, &handoff, &metrics, sink, preview,
                )
            })
            .map_err(|e| WorkerError::Thread(e.to_string()))?
    };

    let beats = heartbeat::Heartbeats::start(
        scenario,
        Duration::from_secs(args.settings.heartbeat.heartbeat_secs),
        metrics.clone(),
        heartbeat::Outputs {
            sink: sink.clone(),
            file: args.heartbeat_file.clone(),
        },
    );
    let stop_signal = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            crate::signals::stop_requested().await;
            shutdown.store(true, Ordering::Relaxed);
        }
    });
    let captured = tokio::task::spawn_blocking(move || {
        let captured = capture.join();
        let processed = detection.join();
        (captured, processed)
    })
    .await
    .map_err(|e| WorkerError::Thread(e.to_string()))?;
    stop_signal.abort();

    let (captured, processed) = captured;
    let processed = processed.map_err(|_| WorkerError::Thread("detection panicked".into()))?;
    let outcome = captured.map_err(|_| WorkerError::Thread("capture panicked".into()))?;
    beats.finish();

    let flush_timeout = args.flush_timeout_ms.0;
    let flushed = {
        let sink = sink.clone();
        tokio::task::spawn_blocking(move || sink.flush(flush_timeout))
            .await
            .map_err(|e| WorkerError::Thread(e.to_string()))?
    };
    server.abort();
    tracing::info!(
        %scenario,
        processed,
        read = metrics.frames_read.get(),
        corrupt = metrics.frames_corrupt.get(),
        published = metrics.results_published.get(),
        publish_failures = metrics.publish_failures.get(),
        "worker stopped"
    );
    let end = outcome?;
    flushed?;
    match end {
        CaptureEnd::EndOfFile => tracing::info!(%scenario, "end of file reached"),
        CaptureEnd::Shutdown => tracing::info!(
            %scenario,
            exit_code = STOPPED_EXIT_CODE,
            "stopped on request before the source ended"
        ),
    }
    Ok(end)
}

fn detector_config(args: &WorkerArgs) -> DetectorConfig {
    let d = &args.settings.detector;
    DetectorConfig {
        model: args.settings.model,
        mock_seed: args.mock_seed,
        yolo: YoloConfig {
            model_dir: d.model_dir.clone(),
            confidence: d.confidence_threshold,
            nms: d.nms_threshold,
            input_size: d.model_input_size,
            classes: d.detect_classes.clone(),
        },
        threads: d.inference_threads.0,
    }
}

/// With `DETECT_ON_CHANGE`, the detector runs at least once in this many
/// seconds of sampled frames, however still the scene.
const CHANGE_REFRESH_SECS: f64 = 10.0;

/// Takes sampled frames until the hand-off closes; one result per frame to
/// the sink and, with PREVIEW on, the frame itself to the preview. With a
/// change test, a frame that does not differ from the last one the detector
/// ran on repeats its detections, marked unchanged. Returns the number of
/// frames processed.
fn detect_loop(
    scenario: Uuid,
    mut detector: Box<dyn Detector>,
    mut change: Option<motion::ChangeTest>,
    handoff: &Handoff<Frame>,
    metrics: &WorkerMetrics,
    sink: &dyn ResultSink,
    preview: Option<&preview::Preview>,
) -> u64 {
    let mut frame_number = 0;
    let mut last: Option<Vec<crate::messages::Detection>> = None;
    while let Some(frame) = handoff.take() {
        let started = Instant::now();
        let must_detect = change
            .as_mut()
            .is_none_or(|test| test.must_detect(&frame.image));
        let repeated = if must_detect { None } else { last.clone() };
        let unchanged = repeated.is_some();
        let detected = match repeated {
            Some(detections) => Ok(detections),
            None => {
                metrics.health().detect_started();
                let detected = detector.detect(&frame.image);
                metrics.health().detect_finished();
                if detected.is_ok() {
                    metrics
                        .inference_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
                detected
            }
        };
        let detections = match detected {
            Ok(d) => d,
            Err(e) => {
                metrics.inference_errors.inc();
                tracing::warn!(%scenario, error = %e, "detector failed on a frame; skipped");
                continue;
            }
        };
        let inference = started.elapsed();
        frame_number += 1;
        metrics
            .beats
            .processed((!unchanged).then_some(inference), frame_number);
        tracing::debug!(
            %scenario,
            frame_number,
            detections = detections.len(),
            inference_ms = inference.as_secs_f64() * 1000.0,
            unchanged,
            "frame processed"
        );
        metrics.frames_processed.inc();
        metrics.detections.inc_by(detections.len() as u64);
        if change.is_some() {
            last = Some(detections.clone());
        }
        if let Some(preview) = preview {
            preview.keep(frame.image, &detections);
        }
        let result = ResultMessage {
            scenario_uuid: scenario,
            frame_number,
            detections,
            timestamp: wire_timestamp(frame.captured_at),
            unchanged,
        };
        if let Err(e) = sink.publish(&result) {
            metrics.publish_failures.inc();
            tracing::error!(%scenario, frame_number, error = %e, "result could not be published");
        }
    }
    frame_number
}
