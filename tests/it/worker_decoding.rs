//! Decoding only what sampling needs (`DECODE_SKIP`) and detecting only on
//! change (`DETECT_ON_CHANGE`), on real clips: H.264 transcodes of
//! vtest.avi with B-frames and a keyframe every 2 s, and a still scene with
//! sensor grain, made by scripts/clips (cached, not in the repository).
//! Each run with frames skipped is compared with a full decode of the same
//! clip: the same number of results, and detections that agree.

use crate::common;
use crate::worker_yolo::model_dir;
use std::process::{Command, Stdio};

use serde_json::Value;

const SCENARIO: &str = "550e8400-e29b-41d4-a716-446655440000";

/// The path of a clip scripts/clips makes (once; later runs find it cached).
fn clip(name: &str) -> String {
    let out = common::run_ok(
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/clips")).arg(name),
        "scripts/clips needs ffmpeg with libx264 (Debian's ffmpeg) and opencv-doc",
    );
    out.trim().to_string()
}

/// Runs the worker on `camera` to the end with results on standard output;
/// returns the results and the worker's log.
fn run(camera: &str, settings: &[(&str, &str)]) -> (Vec<Value>, String) {
    let root = std::path::Path::new(camera).parent().expect("a directory");
    let mut cmd = common::worker(SCENARIO, camera);
    cmd.args(["--sink", "stdout", "--metrics-addr", "127.0.0.1:0"])
        .env("VIDEO_FILE_ROOT", root)
        .env("LOG_LEVEL", "INFO")
        .stdin(Stdio::null());
    for (name, value) in settings {
        cmd.env(name, value);
    }
    let out = cmd.output().expect("run worker");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "worker failed: {log}");
    let results = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (results, log)
}

/// `(class, [x0, y0, x1, y1])` of each detection of a result.
fn boxes(result: &Value) -> Vec<(String, [f64; 4])> {
    result["detections"]
        .as_array()
        .expect("detections")
        .iter()
        .map(|d| {
            let b: Vec<f64> = d["bbox"]
                .as_array()
                .expect("bbox")
                .iter()
                .map(|n| n.as_f64().expect("number"))
                .collect();
            (
                d["class"].as_str().expect("class").to_string(),
                [b[0], b[1], b[2], b[3]],
            )
        })
        .collect()
}

fn iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |r: &[f64; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// How far two runs' detections agree, frame by frame: boxes of one class
/// matched greedily at IoU ≥ 0.5, as an F1 score over the whole clip
/// (2 × matched / all boxes of both runs; 1.0 when neither found anything).
fn agreement(a: &[Value], b: &[Value]) -> f64 {
    let (mut matched, mut total) = (0usize, 0usize);
    for (ra, rb) in a.iter().zip(b) {
        let (xa, mut xb) = (boxes(ra), boxes(rb));
        total += xa.len() + xb.len();
        for (class, bbox) in &xa {
            let best = xb
                .iter()
                .enumerate()
                .filter(|(_, (c, _))| c == class)
                .map(|(i, (_, other))| (i, iou(bbox, other)))
                .filter(|(_, overlap)| *overlap >= 0.5)
                .max_by(|x, y| x.1.total_cmp(&y.1));
            if let Some((i, _)) = best {
                xb.swap_remove(i);
                matched += 1;
            }
        }
    }
    if total == 0 {
        1.0
    } else {
        2.0 * matched as f64 / total as f64
    }
}

/// Runs `camera` with every frame decoded and with DECODE_SKIP=`skip`, checks
/// that the worker decoded as `expected` (as the log names it), that both
/// give the same number of results, and returns the number of boxes a full
/// decode finds and the two runs' agreement.
fn compare(camera: &str, settings: &[(&str, &str)], skip: &str, expected: &str) -> (usize, f64) {
    let with = |skip: &str| {
        let mut all = settings.to_vec();
        all.push(("DECODE_SKIP", skip));
        run(camera, &all)
    };
    let (full, full_log) = with("off");
    let (skipped, log) = with(skip);
    assert!(
        full_log.contains("decode_skip=\"off\""),
        "a full decode: {full_log}"
    );
    assert!(
        log.contains(&format!("decode_skip=\"{expected}\"")),
        "DECODE_SKIP={skip} decoded as {expected}: {log}"
    );
    assert_eq!(
        skipped.len(),
        full.len(),
        "skipping frames keeps every sample"
    );
    for (i, r) in skipped.iter().enumerate() {
        common::assert_result_schema(r, SCENARIO, i as u64 + 1, 1280, 720);
    }
    let found: usize = full.iter().map(|r| boxes(r).len()).sum();
    let agreement = agreement(&full, &skipped);
    eprintln!("{camera} {settings:?}: {found} boxes in a full decode, agreement {agreement:.3}");
    (found, agreement)
}

/// HOG (people) on the 720p clip at VIDEO_FPS=1: non-reference frames
/// skipped. A sample moves by at most one frame (40 ms; this clip has
/// x264's B-pyramid), so detections barely change.
#[test]
fn hog_detections_agree_when_non_reference_frames_are_skipped() {
    let camera = clip("h264-720p");
    let (found, agreement) = compare(
        &camera,
        &[("MODEL", "hog"), ("VIDEO_FPS", "1")],
        "auto",
        "nonref",
    );
    assert!(found >= 40, "HOG finds the people of vtest: {found} boxes");
    assert!(agreement >= 0.85, "agreement {agreement:.3}");
}

/// HOG at VIDEO_FPS=0.5 on the same clip (a keyframe every 2 s): keyframes
/// only, every sample on the keyframe a full decode samples too.
#[test]
fn hog_detections_agree_when_only_keyframes_are_decoded() {
    let camera = clip("h264-720p");
    let (found, agreement) = compare(
        &camera,
        &[("MODEL", "hog"), ("VIDEO_FPS", "0.5")],
        "auto",
        "keyframes",
    );
    assert!(found >= 20, "HOG finds the people of vtest: {found} boxes");
    assert!(agreement >= 0.95, "agreement {agreement:.3}");
}

/// YOLOv4-tiny at VIDEO_FPS=2 on a clip with a keyframe every 0.48 s:
/// keyframes only, each sample at most 0.44 s after a full decode's.
#[test]
fn yolo_detections_agree_when_only_keyframes_are_decoded() {
    let camera = clip("h264-720p-gop12");
    let model = model_dir();
    let (found, agreement) = compare(
        &camera,
        &[("MODEL", "yolo"), ("MODEL_DIR", &model), ("VIDEO_FPS", "2")],
        "auto",
        "keyframes",
    );
    assert!(
        found >= 300,
        "YOLO finds the people of vtest: {found} boxes"
    );
    assert!(agreement >= 0.6, "agreement {agreement:.3}");
}

/// YOLOv4-tiny at VIDEO_FPS=1 with non-reference frames skipped.
#[test]
fn yolo_detections_agree_when_non_reference_frames_are_skipped() {
    let camera = clip("h264-720p");
    let model = model_dir();
    let (found, agreement) = compare(
        &camera,
        &[("MODEL", "yolo"), ("MODEL_DIR", &model), ("VIDEO_FPS", "1")],
        "auto",
        "nonref",
    );
    assert!(
        found >= 150,
        "YOLO finds the people of vtest: {found} boxes"
    );
    assert!(agreement >= 0.85, "agreement {agreement:.3}");
}

/// HOG at VIDEO_FPS=2 with every B-frame skipped (`DECODE_SKIP=bidir`, opt-in).
/// With x264's B-pyramid, P-frames are also predicted from the skipped
/// referenced B-frames, so they decode with small errors until the next
/// keyframe; samples move by at most the B-frame run (three frames). HOG's
/// few boxes, many near its threshold, agree least (0.69 measured).
#[test]
fn hog_detections_agree_when_every_b_frame_is_skipped() {
    let camera = clip("h264-720p");
    let (found, agreement) = compare(
        &camera,
        &[("MODEL", "hog"), ("VIDEO_FPS", "2")],
        "bidir",
        "bidir",
    );
    assert!(found >= 60, "HOG finds the people of vtest: {found} boxes");
    assert!(agreement >= 0.6, "agreement {agreement:.3}");
}

/// YOLOv4-tiny at VIDEO_FPS=2 with every B-frame skipped (0.93 measured).
#[test]
fn yolo_detections_agree_when_every_b_frame_is_skipped() {
    let camera = clip("h264-720p");
    let model = model_dir();
    let (found, agreement) = compare(
        &camera,
        &[("MODEL", "yolo"), ("MODEL_DIR", &model), ("VIDEO_FPS", "2")],
        "bidir",
        "bidir",
    );
    assert!(
        found >= 300,
        "YOLO finds the people of vtest: {found} boxes"
    );
    assert!(agreement >= 0.85, "agreement {agreement:.3}");
}

/// vtest.avi (MS-MPEG4 without B-frames, a keyframe every 20 s or so):
/// nothing to skip at VIDEO_FPS=2, so the 159 results are exactly those of a
/// full decode (MOCK_SEED makes the mock detector's boxes reproducible).
#[test]
fn vtest_results_are_the_same_with_and_without_skipping() {
    let camera = common::media("vtest.avi");
    let seeded = [("MOCK_SEED", "3"), ("VIDEO_FPS", "2")];
    let (full, _) = run(&camera, &[seeded[0], seeded[1], ("DECODE_SKIP", "off")]);
    let (auto, _) = run(&camera, &seeded);
    assert_eq!(full.len(), 159);
    let detections = |r: &[Value]| {
        r.iter()
            .map(|v| v["detections"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(detections(&full), detections(&auto));
}

/// DETECT_ON_CHANGE on a still scene with sensor grain: the detector runs on
/// the first frame and then at least every 10 s; every other result repeats
/// the last detections and says `"unchanged": true`.
#[test]
fn a_still_scene_repeats_detections_marked_unchanged() {
    let camera = clip("static-720p");
    let (results, _) = run(
        &camera,
        &[
            ("MODEL", "hog"),
            ("VIDEO_FPS", "2"),
            ("DETECT_ON_CHANGE", "true"),
        ],
    );
    assert_eq!(results.len(), 160);
    let unchanged = |r: &Value| r.get("unchanged") == Some(&Value::Bool(true));
    assert!(!unchanged(&results[0]), "the first frame is detected");
    let repeated = results.iter().filter(|r| unchanged(r)).count();
    // 80 s at 2 fps with a refresh every 10 s: 8 detected, 152 repeated.
    assert!(repeated >= 150, "{repeated} of 160 repeated");
    let mut last = &results[0]["detections"];
    for (i, r) in results.iter().enumerate() {
        common::assert_result_schema(r, SCENARIO, i as u64 + 1, 1280, 720);
        if unchanged(r) {
            assert_eq!(
                &r["detections"], last,
                "result {i} repeats the last detections"
            );
        } else {
            assert!(r.get("unchanged").is_none(), "absent, not false: {r}");
            last = &r["detections"];
        }
    }
}

/// DETECT_ON_CHANGE on vtest.avi, where people walk through every frame:
/// the detector runs on every frame, and the results are those without it.
#[test]
fn a_busy_scene_is_detected_on_every_frame() {
    let camera = common::media("vtest.avi");
    let (plain, _) = run(&camera, &[("MODEL", "hog")]);
    let (on_change, _) = run(&camera, &[("MODEL", "hog"), ("DETECT_ON_CHANGE", "true")]);
    assert_eq!(on_change.len(), 159);
    assert!(on_change.iter().all(|r| r.get("unchanged").is_none()));
    let detections = |r: &[Value]| {
        r.iter()
            .map(|v| v["detections"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(detections(&plain), detections(&on_change));
}
