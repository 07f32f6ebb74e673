//! Stream health in local mode: each worker replaces its own heartbeat file
//! (`HEARTBEAT_FILE`, set by the supervisor) under `STATE_DIR/heartbeats/`,
//! and `runner local list` reads them for its STATE, FPS and LAST FRAME columns.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::heartbeat::Heartbeat;

/// The folder of the heartbeat files.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("heartbeats")
}

/// The heartbeat file of scenario `uuid`.
pub fn file(state_dir: &Path, uuid: &str) -> PathBuf {
    dir(state_dir).join(format!("{uuid}.json"))
}

/// The newest beat of every scenario that has one; unreadable files are skipped.
pub fn read_all(state_dir: &Path) -> HashMap<String, Heartbeat> {
    let Ok(entries) = std::fs::read_dir(dir(state_dir)) else {
        return HashMap::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|bytes| serde_json::from_slice::<Heartbeat>(&bytes).ok())
        .map(|b| (b.scenario_uuid.to_string(), b))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_are_read_back_by_scenario() {
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir(state.path())).unwrap();
        let uuid = "550e8400-e29b-41d4-a716-446655440000";
        let beat = serde_json::json!({
            "scenario_uuid": uuid, "timestamp": "2026-01-11T12:30:05.123Z",
            "state": "streaming", "seq": 1, "interval_secs": 10, "fps": 2.0,
            "camera_fps": 10.0, "frames": 20, "frame_number": 20,
            "last_frame_age_ms": 123, "frames_dropped": 0,
            "decode_p95_ms": 1.0, "inference_p95_ms": 2.0
        });
        std::fs::write(file(state.path(), uuid), beat.to_string()).unwrap();
        std::fs::write(dir(state.path()).join("junk.json"), "{").unwrap();
        let beats = read_all(state.path());
        assert_eq!(beats.len(), 1);
        assert_eq!(
            beats[uuid].last_frame_time().unwrap().to_rfc3339(),
            "2026-01-11T12:30:05+00:00"
        );
    }
}
