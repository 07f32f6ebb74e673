//! `runner worker` on real video files: Debian's OpenCV samples through a real
//! Kafka broker and through the stdout sink.

mod common;

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

#[test]
fn corrupt_file_is_survived() {
    let output = worker(&common::media("Megamind_bugy.avi"))
        .args(["--sink", "stdout"])
        .output()
        .expect("run worker");
    assert!(
        output.status.success(),
        "worker must finish a corrupt file with exit 0: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results = stdout_results(&output);
    assert!(!results.is_empty(), "results for the readable frames");
    for (i, v) in results.iter().enumerate() {
        assert_eq!(v["frame_number"].as_u64(), Some(i as u64 + 1));
    }
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
        stderr.contains("cannot reach Kafka at KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:1"),
        "{stderr}"
    );
}
