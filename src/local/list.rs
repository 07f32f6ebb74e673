//! `runner local list`: the table `kubectl get scenarios -o wide` shows, read
//! from the state store (also while the supervisor runs).

use chrono::{DateTime, Utc};

use std::collections::HashMap;

use super::process;
use super::state::Record;
use crate::heartbeat::Heartbeat;

const COLUMNS: usize = 10;

/// The table, one line per scenario in queue order, with a header; `beats`
/// are the workers' newest heartbeats by scenario UUID.
pub fn table(records: &[Record], beats: &HashMap<String, Heartbeat>, now: DateTime<Utc>) -> String {
    let mut rows = vec![[
        "UUID".to_string(),
        "PHASE".to_string(),
        "PID".to_string(),
        "WORKER".to_string(),
        "RESTARTS".to_string(),
        "STATE".to_string(),
        "FPS".to_string(),
        "LAST FRAME".to_string(),
        "AGE".to_string(),
        "QUEUE".to_string(),
    ]];
    for r in records {
        let phase = r.phase.map_or("Queued", |p| p.as_str());
        // A PID only while that very process runs (not after a crash of the
        // supervisor, nor for a later process that reused the number).
        let live = r.phase.is_some_and(|p| p.is_live())
            && r.pid
                .is_some_and(|pid| process::is_running(pid, r.pid_start));
        // Stream health only from this run's worker, while it runs.
        let beat = beats.get(&r.uuid).filter(|_| live);
        rows.push([
            r.uuid.clone(),
            phase.to_string(),
            r.pid
                .filter(|_| live)
                .map_or("-".to_string(), |p| p.to_string()),
            r.worker_id.clone().unwrap_or_else(|| "-".into()),
            r.restarts.to_string(),
            beat.map_or("-".to_string(), |b| b.state.as_str().to_string()),
            beat.map_or("-".to_string(), |b| b.fps.to_string()),
            beat.and_then(Heartbeat::last_frame_time)
                .map_or("-".to_string(), |t| age(now - t)),
            age(now - r.created_at),
            r.queue_position
                .filter(|_| r.phase == Some(crate::scenario::Phase::Queued))
                .map_or("-".to_string(), |p| p.to_string()),
        ]);
    }
    let widths: Vec<usize> = (0..COLUMNS)
        .map(|i| rows.iter().map(|row| row[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// An age the way kubectl shows it: `42s`, `5m`, `3h`, `2d`.
pub fn age(d: chrono::Duration) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::state::{Origin, Target};
    use crate::scenario::Phase;

    #[test]
    fn shows_each_scenario_with_its_pid_and_queue_position() {
        let now = Utc::now();
        let target = Target {
            worker_id: Some("w-1".into()),
            camera_url: "rtsp://user:secret@cam/1".into(),
            fps: None,
            model: None,
            origin: Origin::Kafka,
        };
        let mut running = Record::new("aaaa", target.clone(), now - chrono::Duration::seconds(90));
        running.phase = Some(Phase::Running);
        running.pid = Some(std::process::id());
        running.pid_start = process::start_time(std::process::id());
        running.restarts = 1;
        let mut queued = Record::new("bbbb", target, now - chrono::Duration::seconds(5));
        queued.phase = Some(Phase::Queued);
        queued.queue_position = Some(1);
        let beat: Heartbeat = serde_json::from_value(serde_json::json!({
            "scenario_uuid": "550e8400-e29b-41d4-a716-446655440000",
            "timestamp": crate::messages::wire_timestamp(now - chrono::Duration::seconds(3)),
            "state": "streaming", "seq": 4, "interval_secs": 10, "fps": 2.0,
            "camera_fps": 10.0, "frames": 20, "frame_number": 80,
            "last_frame_age_ms": 1000, "frames_dropped": 0,
            "decode_p95_ms": 1.0, "inference_p95_ms": 2.0
        }))
        .unwrap();
        let beats = HashMap::from([
            ("aaaa".to_string(), beat.clone()),
            ("bbbb".to_string(), beat),
        ]);
        let text = table(&[running, queued], &beats, now);
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0],
            [
                "UUID", "PHASE", "PID", "WORKER", "RESTARTS", "STATE", "FPS", "LAST", "FRAME",
                "AGE", "QUEUE"
            ]
        );
        let me = std::process::id().to_string();
        assert_eq!(
            lines[1],
            [
                "aaaa",
                "Running",
                me.as_str(),
                "w-1",
                "1",
                "streaming",
                "2",
                "4s",
                "90s",
                "-"
            ]
        );
        assert_eq!(
            lines[2],
            ["bbbb", "Queued", "-", "w-1", "0", "-", "-", "-", "5s", "1"]
        );
        assert!(!text.contains("secret"), "camera URLs are never listed");
    }

    #[test]
    fn ages_read_like_kubectl() {
        let s = chrono::Duration::seconds;
        assert_eq!(age(s(59)), "59s");
        assert_eq!(age(s(600)), "10m");
        assert_eq!(age(s(3 * 3600)), "3h");
        assert_eq!(age(s(3 * 86400)), "3d");
    }
}
