//! `runner worker` on real video files: Debian's OpenCV samples through a real
//! Kafka broker and through the stdout sink.

use crate::common;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const SCENARIO: &str = "550e8400-e29b-41d4-a716-446655440000";

fn worker(camera: &str) -> Command {
    let mut cmd = common::worker(SCENARIO, camera);
    cmd.env("VIDEO_FILE_ROOT", common::MEDIA_DIR)
        .env("VIDEO_FPS", "2")
        .stdin(Stdio::null());
    cmd
}

fn stdout_results(output: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn assert_result_schema(v: &Value, frame_number: u64, width: i64, height: i64) {
    common::assert_result_schema(v, SCENARIO, frame_number, width, height);
}

#[tokio::test]
async fn vtest_gives_exactly_159_results_in_kafka() {
    let bootstrap = common::kafka_bootstrap();
    let topic = common::unique_name("results-vtest");
    let _topics = common::TempTopics {
        bootstrap: bootstrap.clone(),
        topics: vec![topic.clone()],
        groups: Vec::new(),
    };
    let output = worker(&common::media("vtest.avi"))
        .env("KAFKA_BOOTSTRAP_SERVERS", &bootstrap)
        .env("RESULTS_TOPIC", &topic)
        .env("MOCK_SEED", "42")
        .output()
        .expect("run worker");
    assert!(
        output.status.success(),
        "worker failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let results = common::read_results(&bootstrap, &topic, SCENARIO, 159).await;
    for (i, v) in results.iter().enumerate() {
        assert_result_schema(v, i as u64 + 1, 768, 576);
    }
}

#[test]
fn stdout_sink_needs_no_kafka_and_is_reproducible() {
    let run = || {
        worker(&common::media("vtest.avi"))
            .args(["--sink", "stdout", "--mock-seed", "7"])
            .env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
            .output()
            .expect("run worker")
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let a = stdout_results(&first);
    assert_eq!(a.len(), 159);
    for (i, v) in a.iter().enumerate() {
        assert_result_schema(v, i as u64 + 1, 768, 576);
    }
    let b = stdout_results(&run());
    let detections = |r: &[Value]| {
        r.iter()
            .map(|v| v["detections"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        detections(&a),
        detections(&b),
        "MOCK_SEED makes detections reproducible"
    );
}

#[test]
fn hog_finds_people_in_most_vtest_frames() {
    let output = worker(&common::media("vtest.avi"))
        .args(["--sink", "stdout", "--model", "hog"])
        .output()
        .expect("run worker");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results = stdout_results(&output);
    assert_eq!(results.len(), 159);
    let with_person = results
        .iter()
        .filter(|v| {
            v["detections"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["class"] == "person")
        })
        .count();
    assert!(
        with_person * 2 > results.len(),
        "HOG found a person in only {with_person} of {} frames",
        results.len()
    );
    for (i, v) in results.iter().enumerate() {
        assert_result_schema(v, i as u64 + 1, 768, 576);
    }
}

/// Runs Debian's ffmpeg or ffprobe; fails with a clear message when missing.
fn ffmpeg_tool(program: &str, args: &[&str]) -> String {
    common::run_ok(
        Command::new(program)
            .args(["-hide_banner", "-loglevel", "error"])
            .args(args),
        "install Debian's ffmpeg (scripts/deps does)",
    )
}

/// What ffprobe finds in `path`: the frames FFmpeg decodes, the duration in
/// seconds, and the frame size.
struct Probe {
    frames: u64,
    duration: f64,
    width: i64,
    height: i64,
}

fn probe(path: &str) -> Probe {
    let text = ffmpeg_tool(
        "ffprobe",
        &[
            "-count_frames",
            "-select_streams",
            "v:0",
            "-of",
            "default=nw=1",
            "-show_entries",
            "stream=width,height,nb_read_frames:format=duration",
            path,
        ],
    );
    let field = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("ffprobe {path}: no {name} in {text}"))
    };
    Probe {
        frames: field("nb_read_frames") as u64,
        duration: field("duration"),
        width: field("width") as i64,
        height: field("height") as i64,
    }
}

/// 10 s of vtest.avi as Motion JPEG with 20 runs of 2000 bytes zeroed in its
/// middle third: frames whose picture data is damaged.
fn damaged_mjpeg_clip(dir: &std::path::Path) -> String {
    let clean = dir.join("clean.avi");
    let clean = clean.to_str().unwrap();
    ffmpeg_tool(
        "ffmpeg",
        &[
            "-nostdin",
            "-y",
            "-i",
            &common::media("vtest.avi"),
            "-t",
            "10",
            "-c:v",
            "mjpeg",
            "-q:v",
            "5",
            clean,
        ],
    );
    let mut bytes = std::fs::read(clean).expect("read the clip");
    let (from, span) = (bytes.len() / 3, bytes.len() / 3);
    for i in 0..20 {
        let at = from + span * i / 20;
        bytes[at..at + 2000].fill(0);
    }
    let damaged = dir.join("damaged.avi");
    std::fs::write(&damaged, bytes).expect("write the damaged clip");
    damaged.to_str().unwrap().to_string()
}

#[test]
fn corrupt_files_are_read_to_their_end() {
    let dir = tempfile::tempdir().expect("temp dir");
    let damaged = damaged_mjpeg_clip(dir.path());
    for (clip, root) in [
        (common::media("Megamind_bugy.avi"), common::MEDIA_DIR),
        (damaged, dir.path().to_str().unwrap()),
    ] {
        let probe = probe(&clip);
        // Every frame decoded (DECODE_SKIP=off), to count them against
        // ffprobe's.
        let output = worker(&clip)
            .env("VIDEO_FILE_ROOT", root)
            .env("DECODE_SKIP", "off")
            .args(["--sink", "stdout"])
            .output()
            .expect("run worker");
        let log = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && log.contains("end of file reached"),
            "{clip}: the worker reads a corrupt file to its end and exits 0:\n{log}"
        );
        let results = stdout_results(&output);
        for (i, v) in results.iter().enumerate() {
            assert_result_schema(v, i as u64 + 1, probe.width, probe.height);
        }
        // Every frame FFmpeg can decode is read; none is lost to the damage.
        assert_eq!(
            common::worker_stopped_count(&log, "read"),
            probe.frames,
            "{clip}: frames read\n{log}"
        );
        assert_eq!(
            common::worker_stopped_count(&log, "processed"),
            results.len() as u64,
            "{clip}: one result per processed frame"
        );
        let due = (probe.duration * 2.0).floor() as usize;
        assert!(
            results.len() >= due,
            "{clip}: {} results for {} s at VIDEO_FPS=2; expected at least {due}",
            results.len(),
            probe.duration
        );
    }
}

#[test]
fn json_logs_stay_json_on_a_damaged_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let damaged = damaged_mjpeg_clip(dir.path());
    let output = worker(&damaged)
        .env("VIDEO_FILE_ROOT", dir.path())
        .env("LOG_FORMAT", "json")
        .args(["--sink", "stdout"])
        .output()
        .expect("run worker");
    assert!(output.status.success());
    assert_eq!(stdout_results(&output).len(), 20);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let not_json: Vec<&&str> = lines
        .iter()
        .filter(|l| serde_json::from_str::<Value>(l).is_err())
        .collect();
    assert!(
        not_json.is_empty(),
        "{} of {} log lines are not JSON, for example {:?}",
        not_json.len(),
        lines.len(),
        not_json.iter().take(3).collect::<Vec<_>>()
    );
    assert!(stderr.contains("end of file reached"), "{stderr}");
}

#[test]
fn refused_sources_give_a_clear_error() {
    let cases = [
        (
            format!("{}/no-such-clip.avi", common::MEDIA_DIR),
            "does not exist",
        ),
        ("/etc/hostname.mp4".to_string(), "outside VIDEO_FILE_ROOT"),
        (
            "ftp://example.com/clip.mp4".to_string(),
            "scheme \"ftp\" is not allowed",
        ),
        (
            format!("concat:{}/vtest.avi|/etc/passwd", common::MEDIA_DIR),
            "scheme \"concat\" is not allowed",
        ),
        (
            "videotestsrc ! videoconvert ! appsink".to_string(),
            "whitespace or control characters",
        ),
        (
            "videotestsrc!appsink".to_string(),
            "not a URL or an absolute path",
        ),
    ];
    for (camera, rule) in cases {
        let output = worker(&camera)
            .args(["--sink", "stdout"])
            .output()
            .expect("run worker");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{camera} must be refused");
        assert!(output.stdout.is_empty(), "{camera}: no results");
        assert!(
            stderr.contains(rule),
            "{camera}: expected {rule:?} in {stderr}"
        );
    }
}

#[test]
fn unreachable_kafka_is_a_clear_error() {
    let output = worker(&common::media("vtest.avi"))
        .env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
        .env("OPEN_TIMEOUT_MS", "3000")
        .output()
        .expect("run worker");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("no Kafka broker can be reached at KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:1"),
        "{stderr}"
    );
}
