//! Replays the fuzz corpus (`fuzz/corpus/<target>/`, seeds and every input a
//! fuzzer once failed on) through the fuzz targets' properties as an
//! ordinary test, so a regression fails `cargo test` without a fuzzer.
//! `scripts/fuzz` runs the fuzzer itself.

use std::path::PathBuf;

#[path = "../../fuzz/src/properties.rs"]
mod properties;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the fuzz corpus {} is missing: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            (path, data)
        })
        .collect();
    inputs.sort();
    assert!(
        !inputs.is_empty(),
        "the fuzz corpus {} is empty",
        dir.display()
    );
    inputs
}

#[test]
fn camera_url_corpus_keeps_its_properties() {
    for (path, data) in corpus("camera_url") {
        if let Ok(text) = std::str::from_utf8(&data) {
            let outcome = std::panic::catch_unwind(|| properties::camera_url(text));
            assert!(outcome.is_ok(), "{} fails: {text:?}", path.display());
        }
    }
}

#[test]
fn request_corpus_keeps_its_properties() {
    for (path, data) in corpus("requests") {
        let outcome = std::panic::catch_unwind(|| properties::requests(&data));
        assert!(
            outcome.is_ok(),
            "{} fails: {:?}",
            path.display(),
            String::from_utf8_lossy(&data)
        );
    }
}

#[test]
fn ffmpeg_log_corpus_keeps_its_properties() {
    for (path, data) in corpus("ffmpeg_log") {
        if let Ok(text) = std::str::from_utf8(&data) {
            let outcome = std::panic::catch_unwind(|| properties::ffmpeg_log(text));
            assert!(outcome.is_ok(), "{} fails: {text:?}", path.display());
        }
    }
}

#[test]
fn ffmpeg_host_splitting_matches_ffmpeg() {
    for (url, host) in [
        ("rtsp://cam/a", "cam"),
        ("rtsp://u:p@cam:554/a", "cam"),
        ("rtsp://u:p@x@cam/a@b", "cam"),
        ("http://[fd00::1]:80/a", "fd00::1"),
        ("http://cam?x=@y", "cam"),
        ("http://cam#@y", "cam"),
        ("rtsp:/cam/a", ""),
    ] {
        assert_eq!(properties::ffmpeg_host(url), host, "{url}");
    }
}
