//! A scenario's declared target (wanted fps, oldest acceptable frame) and how
//! a heartbeat is judged against it: the `Streaming` condition's status,
//! reason and words. Pure: the controller folds the result into the
//! Scenario's status.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::heartbeat::{Heartbeat, StreamState};

/// Largest `target_fps` accepted.
pub const MAX_TARGET_FPS: f64 = 240.0;
/// Largest `max_frame_age_secs` accepted (a day).
pub const MAX_FRAME_AGE_SECS: f64 = 86_400.0;

/// A worker keeps up while it processes at least this share of its target fps.
pub const FPS_TOLERANCE: f64 = 0.9;

/// What a scenario declares it needs; either part may be absent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamTarget {
    /// Frames per second the worker should process at least (> 0, at most 240).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0, "exclusiveMinimum" = true, "maximum" = MAX_TARGET_FPS))]
    pub fps: Option<f64>,
    /// Oldest acceptable age of the camera's last frame, in seconds (> 0, at most 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0, "exclusiveMinimum" = true, "maximum" = MAX_FRAME_AGE_SECS))]
    pub max_frame_age_seconds: Option<f64>,
}

impl StreamTarget {
    pub fn is_empty(&self) -> bool {
        self.fps.is_none() && self.max_frame_age_seconds.is_none()
    }
}

/// Why a target value is refused (the text names the value and the fix).
pub fn check_target_value(field: &str, value: f64, max: f64) -> Result<f64, String> {
    if value.is_finite() && value > 0.0 && value <= max {
        Ok(value)
    } else {
        Err(format!(
            "field {field:?} is {value}; give a number greater than 0 and at most {max}, or leave it out"
        ))
    }
}

/// The `Streaming` condition a heartbeat earns.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub streaming: bool,
    pub reason: &'static str,
    pub message: String,
}

fn secs(ms: u64) -> f64 {
    (ms as f64 / 100.0).round() / 10.0
}

/// Judges `beat` against `target`.
pub fn judge(beat: &Heartbeat, target: &StreamTarget) -> Judgement {
    let no = |reason, message: String| Judgement {
        streaming: false,
        reason,
        message,
    };
    let age = beat.last_frame_age_ms.map(secs);
    let age_words = age.map_or("no frame yet".to_string(), |a| {
        format!("last frame {a} s ago")
    });
    match beat.state {
        StreamState::Ended => return no("Ended", "the worker stopped".into()),
        StreamState::CameraDark => {
            return no(
                "CameraDark",
                format!("the camera delivers no frames ({age_words})"),
            );
        }
        StreamState::Reconnecting => {
            return no(
                "Reconnecting",
                format!("opening the camera again ({age_words})"),
            );
        }
        StreamState::Streaming => {}
    }
    if let (Some(max), Some(age)) = (target.max_frame_age_seconds, age)
        && age > max
    {
        return no(
            "CameraTooSlow",
            format!(
                "last frame {age} s old, target at most {max} s: the camera delivers too seldom"
            ),
        );
    }
    if let Some(wanted) = target.fps
        && beat.fps < wanted * FPS_TOLERANCE
    {
        let (reason, cause) = cause_of_lag(beat, wanted);
        return no(
            reason,
            format!("processing {} fps, target {wanted} fps: {cause}", beat.fps),
        );
    }
    Judgement {
        streaming: true,
        reason: "Streaming",
        message: format!("processing {} fps, {age_words}", beat.fps),
    }
}

/// Which part of the worker holds it below `wanted` fps.
fn cause_of_lag(beat: &Heartbeat, wanted: f64) -> (&'static str, String) {
    let budget_ms = 1000.0 / wanted;
    if let Some(inference) = beat.inference_p95_ms
        && inference >= budget_ms
    {
        return (
            "InferenceTooSlow",
            format!(
                "the detector takes {inference} ms per frame (p95); keeping up needs less than {budget_ms:.0} ms"
            ),
        );
    }
    if let Some(decode) = beat.decode_p95_ms
        && decode * beat.camera_fps >= 1000.0
    {
        return (
            "DecodeTooSlow",
            format!(
                "decoding takes {decode} ms per frame (p95) at {} frames per second from the camera: more than one core-second per second",
                beat.camera_fps
            ),
        );
    }
    if beat.camera_fps < wanted {
        return (
            "CameraTooSlow",
            format!("the camera delivers only {} fps", beat.camera_fps),
        );
    }
    (
        "BehindTarget",
        "neither the camera, decoding nor the detector explains it (the worker may be short of CPU)"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(state: StreamState) -> Heartbeat {
        Heartbeat {
            scenario_uuid: uuid::Uuid::nil(),
            timestamp: "2026-01-11T12:30:05.123Z".into(),
            state,
            seq: 3,
            interval_secs: 10,
            fps: 2.0,
            camera_fps: 25.0,
            frames: 20,
            frame_number: 60,
            last_frame_age_ms: Some(40),
            frames_dropped: 0,
            decode_p95_ms: Some(4.0),
            inference_p95_ms: Some(30.0),
        }
    }

    fn target(fps: Option<f64>, age: Option<f64>) -> StreamTarget {
        StreamTarget {
            fps,
            max_frame_age_seconds: age,
        }
    }

    #[test]
    fn each_case_has_its_reason() {
        let none = StreamTarget::default();
        let wants_5 = target(Some(5.0), None);
        let cases: Vec<(Heartbeat, StreamTarget, bool, &str)> = vec![
            (
                beat(StreamState::Streaming),
                none.clone(),
                true,
                "Streaming",
            ),
            (
                beat(StreamState::Streaming),
                target(Some(2.0), Some(1.0)),
                true,
                "Streaming",
            ),
            // Within the tolerance.
            (
                Heartbeat {
                    fps: 1.85,
                    ..beat(StreamState::Streaming)
                },
                target(Some(2.0), None),
                true,
                "Streaming",
            ),
            (
                beat(StreamState::Reconnecting),
                none.clone(),
                false,
                "Reconnecting",
            ),
            (
                beat(StreamState::CameraDark),
                none.clone(),
                false,
                "CameraDark",
            ),
            (beat(StreamState::Ended), none.clone(), false, "Ended"),
            (
                Heartbeat {
                    last_frame_age_ms: Some(7_200),
                    ..beat(StreamState::Streaming)
                },
                target(None, Some(5.0)),
                false,
                "CameraTooSlow",
            ),
            (
                Heartbeat {
                    inference_p95_ms: Some(450.0),
                    ..beat(StreamState::Streaming)
                },
                wants_5.clone(),
                false,
                "InferenceTooSlow",
            ),
            (
                Heartbeat {
                    decode_p95_ms: Some(45.0),
                    ..beat(StreamState::Streaming)
                },
                wants_5.clone(),
                false,
                "DecodeTooSlow",
            ),
            (
                Heartbeat {
                    camera_fps: 3.0,
                    ..beat(StreamState::Streaming)
                },
                wants_5.clone(),
                false,
                "CameraTooSlow",
            ),
            (beat(StreamState::Streaming), wants_5, false, "BehindTarget"),
        ];
        for (b, t, streaming, reason) in cases {
            let j = judge(&b, &t);
            assert_eq!(
                (j.streaming, j.reason),
                (streaming, reason),
                "{b:?} {t:?}: {}",
                j.message
            );
        }
    }

    #[test]
    fn the_words_name_the_figures() {
        let b = Heartbeat {
            fps: 1.2,
            inference_p95_ms: Some(830.0),
            ..beat(StreamState::Streaming)
        };
        let j = judge(&b, &target(Some(2.0), None));
        assert_eq!(
            j.message,
            "processing 1.2 fps, target 2 fps: the detector takes 830 ms per frame (p95); keeping up needs less than 500 ms"
        );
        let dark = Heartbeat {
            last_frame_age_ms: Some(31_250),
            ..beat(StreamState::CameraDark)
        };
        assert_eq!(
            judge(&dark, &StreamTarget::default()).message,
            "the camera delivers no frames (last frame 31.3 s ago)"
        );
    }

    #[test]
    fn target_values_are_checked() {
        assert_eq!(
            check_target_value("target_fps", 2.5, MAX_TARGET_FPS),
            Ok(2.5)
        );
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 241.0] {
            let err = check_target_value("target_fps", bad, MAX_TARGET_FPS).unwrap_err();
            assert!(err.contains("greater than 0 and at most 240"), "{err}");
        }
    }
}
