//! The heartbeat contract: every worker says how its camera is, on its own
//! topic (`HEARTBEAT_TOPIC`, key = scenario UUID), every `HEARTBEAT_SECS` and
//! at once on each change of state. The controller folds the latest one into
//! the Scenario's status; `runner local list` shows it; a consumer of
//! `results` can tell "no detections" from "camera dark" from "worker gone"
//! (see docs/messages.md). The worker's side is `worker::heartbeat`; how a
//! beat is judged against a scenario's declared target is
//! [`crate::scenario::health`].

use chrono::{DateTime, Utc};
use clap::Args;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where and how often workers publish heartbeats; the controller and
/// `runner local` pass these on to every worker.
#[derive(Debug, Clone, Args)]
pub struct HeartbeatSettings {
    /// Kafka topic for worker heartbeats (one per worker every HEARTBEAT_SECS and on each change of state).
    #[arg(
        long,
        env = "HEARTBEAT_TOPIC",
        value_name = "HEARTBEAT_TOPIC",
        default_value = "scenario_heartbeats"
    )]
    pub heartbeat_topic: String,

    /// Seconds between a worker's heartbeats (1–3600).
    #[arg(
        long,
        env = "HEARTBEAT_SECS",
        value_name = "HEARTBEAT_SECS",
        default_value = "10",
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub heartbeat_secs: u64,
}

impl HeartbeatSettings {
    /// The settings as a worker's environment.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("HEARTBEAT_TOPIC", self.heartbeat_topic.clone()),
            ("HEARTBEAT_SECS", self.heartbeat_secs.to_string()),
        ]
    }
}

/// How a worker's camera is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamState {
    /// The camera delivers frames.
    Streaming,
    /// Opening or reopening the camera, for less than [`DARK_AFTER_BEATS`]
    /// heartbeat intervals since its last frame.
    Reconnecting,
    /// No frame for [`DARK_AFTER_BEATS`] heartbeat intervals or more.
    CameraDark,
    /// The worker stops: its source ended, it was stopped or gave up. The last beat.
    Ended,
}

impl StreamState {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamState::Streaming => "streaming",
            StreamState::Reconnecting => "reconnecting",
            StreamState::CameraDark => "camera_dark",
            StreamState::Ended => "ended",
        }
    }
}

/// A camera without a frame for this many heartbeat intervals is dark.
pub const DARK_AFTER_BEATS: u32 = 3;

/// A worker that has not beaten for this many intervals is silent: stuck,
/// gone, or cut off from Kafka.
pub const SILENT_AFTER_BEATS: u32 = 3;

/// One heartbeat (key = scenario UUID). Counts and figures cover the time
/// since the worker's previous beat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub scenario_uuid: Uuid,
    /// When the beat was made: UTC, RFC 3339, milliseconds, `Z`.
    pub timestamp: String,
    pub state: StreamState,
    /// Beats of this worker run, from 1: a gap means beats were lost, a 1
    /// again means a new worker run (whose `frame_number`s start at 1 again).
    pub seq: u64,
    /// HEARTBEAT_SECS: the next beat comes within this many seconds.
    pub interval_secs: u64,
    /// Frames processed (results published) per second.
    pub fps: f64,
    /// Frames the camera delivered per second (before sampling).
    pub camera_fps: f64,
    /// Results handed to the producer since the previous beat.
    pub frames: u64,
    /// `frame_number` of the last result handed over (0: none yet).
    pub frame_number: u64,
    /// Milliseconds since the camera last delivered a frame; `null` before the first.
    pub last_frame_age_ms: Option<u64>,
    /// Frames read but lost: replaced by a newer one before the detector was
    /// free (live cameras), undecodable, or failed by the detector.
    pub frames_dropped: u64,
    /// 95th percentile of the capture thread's CPU time to read and decode
    /// one frame, in milliseconds; `null` when none was read.
    pub decode_p95_ms: Option<f64>,
    /// 95th percentile of the detector's time per frame, in milliseconds;
    /// `null` when none was processed.
    pub inference_p95_ms: Option<f64>,
}

impl Heartbeat {
    /// When the beat was made (`None` when its timestamp does not parse).
    pub fn time(&self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(&self.timestamp)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// When the camera last delivered a frame.
    pub fn last_frame_time(&self) -> Option<DateTime<Utc>> {
        let age = chrono::Duration::milliseconds(self.last_frame_age_ms? as i64);
        Some(self.time()? - age)
    }
}

/// The 95th percentile (nearest rank) of `samples`, reordering them; `None`
/// when empty.
pub fn p95(samples: &mut [f32]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let rank = ((samples.len() as f64) * 0.95).ceil() as usize;
    let index = rank.clamp(1, samples.len()) - 1;
    let (_, nth, _) = samples.select_nth_unstable_by(index, f32::total_cmp);
    Some(f64::from(*nth))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_is_the_nearest_rank() {
        assert_eq!(p95(&mut []), None);
        assert_eq!(p95(&mut [7.0]), Some(7.0));
        let mut hundred: Vec<f32> = (1..=100).rev().map(|n| n as f32).collect();
        assert_eq!(p95(&mut hundred), Some(95.0));
        let mut twenty: Vec<f32> = (1..=20).map(|n| n as f32).collect();
        assert_eq!(p95(&mut twenty), Some(19.0));
    }

    #[test]
    fn a_heartbeat_has_the_documented_wire_form() {
        let beat = Heartbeat {
            scenario_uuid: "550e8400-e29b-41d4-a716-446655440000".parse().unwrap(),
            timestamp: "2026-01-11T12:30:05.123Z".into(),
            state: StreamState::CameraDark,
            seq: 7,
            interval_secs: 10,
            fps: 0.0,
            camera_fps: 0.0,
            frames: 0,
            frame_number: 118,
            last_frame_age_ms: Some(31_250),
            frames_dropped: 0,
            decode_p95_ms: None,
            inference_p95_ms: None,
        };
        let json = serde_json::to_value(&beat).unwrap();
        assert_eq!(json["state"], "camera_dark");
        assert!(json["decode_p95_ms"].is_null());
        let back: Heartbeat = serde_json::from_value(json).unwrap();
        assert_eq!(back, beat);
    }
}
