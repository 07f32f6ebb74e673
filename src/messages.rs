//! The Kafka message contracts (see the design document). Field names and
//! types here are the wire format and must not drift.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One detected object. `bbox` is `[x_min, y_min, x_max, y_max]` in pixels of
/// the source frame; `confidence` is in 0.0–1.0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub class: String,
    pub confidence: f32,
    pub bbox: [i32; 4],
}

/// One `results` message per processed frame; the Kafka key is the scenario UUID.
/// `frame_number` counts processed frames of this worker run from 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMessage {
    pub scenario_uuid: Uuid,
    pub frame_number: u64,
    pub detections: Vec<Detection>,
    /// UTC, RFC 3339, millisecond precision, `Z` suffix.
    pub timestamp: String,
    /// `DETECT_ON_CHANGE`: true when the frame did not differ from the last
    /// one the detector ran on and `detections` repeats that frame's; the
    /// field is left out otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
}

/// The wire form of a timestamp: `2026-01-11T12:30:05.123Z`.
pub fn wire_timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn result_serializes_exactly_as_the_contract() {
        let at = Utc.with_ymd_and_hms(2026, 1, 11, 12, 30, 5).unwrap()
            + chrono::Duration::milliseconds(123);
        let msg = ResultMessage {
            scenario_uuid: "550e8400-e29b-41d4-a716-446655440000".parse().unwrap(),
            frame_number: 1,
            detections: vec![Detection {
                class: "person".into(),
                confidence: 0.95,
                bbox: [10, 20, 100, 150],
            }],
            timestamp: wire_timestamp(at),
            unchanged: false,
        };
        let json = serde_json::to_string(&msg).unwrap();
        assert_eq!(
            json,
            r#"{"scenario_uuid":"550e8400-e29b-41d4-a716-446655440000","frame_number":1,"detections":[{"class":"person","confidence":0.95,"bbox":[10,20,100,150]}],"timestamp":"2026-01-11T12:30:05.123Z"}"#
        );
        let repeated = ResultMessage {
            unchanged: true,
            ..msg
        };
        let json = serde_json::to_string(&repeated).unwrap();
        assert!(
            json.ends_with(r#""timestamp":"2026-01-11T12:30:05.123Z","unchanged":true}"#),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<ResultMessage>(&json).unwrap(),
            repeated
        );
    }
}

/// Largest `to_deploy` / `to_undeploy` message accepted.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// A valid `to_deploy` message. Its `Debug` form shows the camera URL
/// redacted, like everything else that prints one.
#[derive(Clone, PartialEq)]
pub struct DeployRequest {
    pub worker_id: Uuid,
    pub scenario_uuid: Uuid,
    pub camera_url: String,
    /// The optional `target_fps` and `max_frame_age_secs`.
    pub target: crate::scenario::health::StreamTarget,
}

impl std::fmt::Debug for DeployRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployRequest")
            .field("worker_id", &self.worker_id)
            .field("scenario_uuid", &self.scenario_uuid)
            .field("camera_url", &crate::camera_url::redact(&self.camera_url))
            .field("target", &self.target)
            .finish()
    }
}

/// A valid `to_undeploy` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndeployRequest {
    pub scenario_uuid: Uuid,
}

/// Why a request was refused. `category()` is a fixed label for metrics and
/// for the `reason` header of dead-lettered messages; the text says more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("message has no value")]
    Empty,
    #[error("message is {len} bytes; at most {MAX_REQUEST_BYTES} are accepted")]
    Oversized { len: usize },
    #[error("message is not UTF-8 JSON: {0}")]
    NotJson(String),
    #[error("message is JSON but not an object")]
    NotObject,
    #[error("field {0:?} is missing")]
    MissingField(&'static str),
    #[error("field {field:?} must be a string, got {got}")]
    WrongType {
        field: &'static str,
        got: &'static str,
    },
    #[error("field {field:?} is not a UUID: {value:?}")]
    BadUuid { field: &'static str, value: String },
    #[error("field \"camera_url\" is refused: {0}")]
    CameraUrl(#[from] crate::camera_url::CameraUrlError),
    #[error("{0}")]
    BadTarget(String),
}

impl RequestError {
    pub fn category(&self) -> &'static str {
        match self {
            RequestError::Empty => "empty",
            RequestError::Oversized { .. } => "oversized",
            RequestError::NotJson(_) => "not_json",
            RequestError::NotObject => "not_object",
            RequestError::MissingField(_) => "missing_field",
            RequestError::WrongType { .. } => "wrong_type",
            RequestError::BadUuid { .. } => "bad_uuid",
            RequestError::CameraUrl(_) => "camera_url",
            RequestError::BadTarget(_) => "bad_target",
        }
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn object(
    payload: Option<&[u8]>,
) -> Result<serde_json::Map<String, serde_json::Value>, RequestError> {
    let bytes = payload
        .filter(|b| !b.is_empty())
        .ok_or(RequestError::Empty)?;
    if bytes.len() > MAX_REQUEST_BYTES {
        return Err(RequestError::Oversized { len: bytes.len() });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| RequestError::NotJson(e.to_string()))?;
    match serde_json::from_str(text).map_err(|e| RequestError::NotJson(e.to_string()))? {
        serde_json::Value::Object(map) => Ok(map),
        _ => Err(RequestError::NotObject),
    }
}

fn string_field<'a>(
    map: &'a serde_json::Map<String, serde_json::Value>,
    field: &'static str,
) -> Result<&'a str, RequestError> {
    match map.get(field) {
        None => Err(RequestError::MissingField(field)),
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(RequestError::WrongType {
            field,
            got: json_type(other),
        }),
    }
}

fn uuid_field(
    map: &serde_json::Map<String, serde_json::Value>,
    field: &'static str,
) -> Result<Uuid, RequestError> {
    let raw = string_field(map, field)?;
    // Only the hyphenated form of the contract, any case.
    let bad = || RequestError::BadUuid {
        field,
        value: shown_uuid(raw),
    };
    if raw.len() != 36 {
        return Err(bad());
    }
    Uuid::parse_str(raw).map_err(|_| bad())
}

/// A refused UUID as errors show it: as given when it is made of hex digits
/// and hyphens only (a mistyped UUID), otherwise only its length — it may be
/// anything, a camera URL with a password included.
fn shown_uuid(raw: &str) -> String {
    if raw.len() <= 64 && raw.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        raw.to_string()
    } else {
        format!(
            "<{} characters, not hex digits and hyphens>",
            raw.chars().count()
        )
    }
}

/// An optional positive number of at most `max` (`null` counts as absent).
fn target_field(
    map: &serde_json::Map<String, serde_json::Value>,
    field: &'static str,
    max: f64,
) -> Result<Option<f64>, RequestError> {
    match map.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => {
            let value = n.as_f64().unwrap_or(f64::NAN);
            crate::scenario::health::check_target_value(field, value, max)
                .map(Some)
                .map_err(RequestError::BadTarget)
        }
        Some(other) => Err(RequestError::BadTarget(format!(
            "field {field:?} must be a number, got {}",
            json_type(other)
        ))),
    }
}

impl DeployRequest {
    /// Validates a `to_deploy` value, including the camera URL policy.
    pub fn parse(
        payload: Option<&[u8]>,
        file_root: Option<&std::path::Path>,
    ) -> Result<Self, RequestError> {
        let map = object(payload)?;
        let worker_id = uuid_field(&map, "worker_id")?;
        let scenario_uuid = uuid_field(&map, "scenario_uuid")?;
        let camera_url = string_field(&map, "camera_url")?;
        crate::camera_url::CameraSource::parse(camera_url, file_root)?;
        use crate::scenario::health::{MAX_FRAME_AGE_SECS, MAX_TARGET_FPS, StreamTarget};
        let target = StreamTarget {
            fps: target_field(&map, "target_fps", MAX_TARGET_FPS)?,
            max_frame_age_seconds: target_field(&map, "max_frame_age_secs", MAX_FRAME_AGE_SECS)?,
        };
        Ok(DeployRequest {
            worker_id,
            scenario_uuid,
            camera_url: camera_url.to_string(),
            target,
        })
    }
}

impl UndeployRequest {
    pub fn parse(payload: Option<&[u8]>) -> Result<Self, RequestError> {
        let map = object(payload)?;
        Ok(UndeployRequest {
            scenario_uuid: uuid_field(&map, "scenario_uuid")?,
        })
    }
}

#[cfg(test)]
mod request_tests {
    use super::*;
    use std::path::Path;

    fn root() -> Option<&'static Path> {
        Some(Path::new("/videos"))
    }

    #[test]
    fn the_contract_example_is_valid() {
        let raw = br#"{"worker_id": "11223344-5566-7788-99aa-bbccddeeeff0",
            "scenario_uuid": "550e8400-e29b-41d4-a716-446655440000",
            "camera_url": "rtsp://example.com/stream", "extra": 1}"#;
        let req = DeployRequest::parse(Some(raw), root()).unwrap();
        assert_eq!(
            req.scenario_uuid.to_string(),
            "550e8400-e29b-41d4-a716-446655440000"
        );
        assert_eq!(req.camera_url, "rtsp://example.com/stream");
        let with_password = DeployRequest {
            camera_url: "rtsp://admin:hunter2@example.com/stream".into(),
            ..req.clone()
        };
        let debug = format!("{with_password:?}");
        assert!(debug.contains("rtsp://***@example.com/stream"), "{debug}");
        let undeploy = UndeployRequest::parse(Some(
            br#"{"scenario_uuid": "550e8400-e29b-41d4-a716-446655440000"}"#,
        ))
        .unwrap();
        assert_eq!(undeploy.scenario_uuid, req.scenario_uuid);
    }

    #[test]
    fn each_kind_of_bad_message_has_its_reason() {
        let ok_w = r#""worker_id":"11223344-5566-7788-99aa-bbccddeeeff0""#;
        let ok_s = r#""scenario_uuid":"550e8400-e29b-41d4-a716-446655440000""#;
        let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(MAX_REQUEST_BYTES));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"".to_vec(), "empty"),
            (big.into_bytes(), "oversized"),
            (b"not json".to_vec(), "not_json"),
            (vec![0xff, 0xfe], "not_json"),
            (b"[1,2]".to_vec(), "not_object"),
            (b"\"str\"".to_vec(), "not_object"),
            (format!("{{{ok_s},\"camera_url\":\"rtsp://h/a\"}}").into_bytes(), "missing_field"),
            (format!("{{{ok_w},{ok_s}}}").into_bytes(), "missing_field"),
            (format!("{{{ok_w},\"scenario_uuid\":42,\"camera_url\":\"rtsp://h/a\"}}").into_bytes(), "wrong_type"),
            (format!("{{{ok_w},{ok_s},\"camera_url\":null}}").into_bytes(), "wrong_type"),
            (format!("{{{ok_w},\"scenario_uuid\":\"nope\",\"camera_url\":\"rtsp://h/a\"}}").into_bytes(), "bad_uuid"),
            (format!("{{{ok_w},\"scenario_uuid\":\"550e8400e29b41d4a716446655440000\",\"camera_url\":\"rtsp://h/a\"}}").into_bytes(), "bad_uuid"),
            (format!("{{{ok_w},{ok_s},\"camera_url\":\"ftp://h/a.mp4\"}}").into_bytes(), "camera_url"),
            (format!("{{{ok_w},{ok_s},\"camera_url\":\"/etc/a.mp4\"}}").into_bytes(), "camera_url"),
            (format!("{{{ok_w},{ok_s},\"camera_url\":\"rtsp://h/a\",\"target_fps\":0}}").into_bytes(), "bad_target"),
            (format!("{{{ok_w},{ok_s},\"camera_url\":\"rtsp://h/a\",\"target_fps\":\"2\"}}").into_bytes(), "bad_target"),
            (format!("{{{ok_w},{ok_s},\"camera_url\":\"rtsp://h/a\",\"max_frame_age_secs\":-5}}").into_bytes(), "bad_target"),
            (format!("{{{ok_w},{ok_s},\"camera_url\":\"rtsp://h/a\",\"max_frame_age_secs\":1e9}}").into_bytes(), "bad_target"),
        ];
        for (raw, category) in cases {
            let err = DeployRequest::parse(Some(&raw), root()).unwrap_err();
            assert_eq!(
                err.category(),
                category,
                "{}: {err}",
                String::from_utf8_lossy(&raw)
            );
        }
        assert_eq!(
            DeployRequest::parse(None, root()).unwrap_err().category(),
            "empty"
        );
    }

    #[test]
    fn a_declared_target_is_read() {
        let raw = br#"{"worker_id": "11223344-5566-7788-99aa-bbccddeeeff0",
            "scenario_uuid": "550e8400-e29b-41d4-a716-446655440000",
            "camera_url": "rtsp://example.com/stream", "target_fps": 2, "max_frame_age_secs": 2.5}"#;
        let req = DeployRequest::parse(Some(raw), root()).unwrap();
        assert_eq!(req.target.fps, Some(2.0));
        assert_eq!(req.target.max_frame_age_seconds, Some(2.5));
        let raw = br#"{"worker_id": "11223344-5566-7788-99aa-bbccddeeeff0",
            "scenario_uuid": "550e8400-e29b-41d4-a716-446655440000",
            "camera_url": "rtsp://example.com/stream", "target_fps": 0.0}"#;
        let err = DeployRequest::parse(Some(raw), root()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "field \"target_fps\" is 0; give a number greater than 0 and at most 240, or leave it out"
        );
    }

    #[test]
    fn a_message_with_the_longest_camera_url_fits() {
        let path = "a".repeat(crate::camera_url::MAX_URL_LEN - "rtsp://cam/".len());
        let raw = format!(
            r#"{{"worker_id":"11223344-5566-7788-99aa-bbccddeeeff0","scenario_uuid":"550e8400-e29b-41d4-a716-446655440000","camera_url":"rtsp://cam/{path}"}}"#
        );
        let req = DeployRequest::parse(Some(raw.as_bytes()), root()).unwrap();
        assert_eq!(req.camera_url.len(), crate::camera_url::MAX_URL_LEN);
    }

    #[test]
    fn messages_up_to_the_limit_are_read() {
        let padded = |len: usize| {
            let pad = "x".repeat(len - r#"{"pad":""}"#.len());
            format!(r#"{{"pad":"{pad}"}}"#).into_bytes()
        };
        let at_limit = padded(MAX_REQUEST_BYTES);
        assert_eq!(at_limit.len(), MAX_REQUEST_BYTES);
        let err = UndeployRequest::parse(Some(&at_limit)).unwrap_err();
        assert_eq!(
            err.category(),
            "missing_field",
            "read, not refused for its size"
        );
        let over = padded(MAX_REQUEST_BYTES + 1);
        let err = UndeployRequest::parse(Some(&over)).unwrap_err();
        assert_eq!(err.category(), "oversized");
    }

    #[test]
    fn a_wrong_type_is_named_in_the_refusal() {
        let ok_s = r#""scenario_uuid":"550e8400-e29b-41d4-a716-446655440000""#;
        for (value, named) in [
            ("42", "a number"),
            ("null", "null"),
            ("true", "a boolean"),
            ("[]", "an array"),
            ("{}", "an object"),
        ] {
            let raw = format!(r#"{{"worker_id":{value},{ok_s},"camera_url":"rtsp://h/a"}}"#);
            let err = DeployRequest::parse(Some(raw.as_bytes()), root()).unwrap_err();
            assert_eq!(err.category(), "wrong_type");
            assert!(err.to_string().ends_with(&format!("got {named}")), "{err}");
        }
    }

    #[test]
    fn a_bad_uuid_is_shown_only_when_it_looks_like_one() {
        let w = r#""worker_id":"11223344-5566-7788-99aa-bbccddeeeff0""#;
        let c = r#""camera_url":"rtsp://cam/a""#;
        let typo = format!(r#"{{{w},{c},"scenario_uuid":"550e8400-e29b-41d4-a716-44665544000"}}"#);
        let err = DeployRequest::parse(Some(typo.as_bytes()), root()).unwrap_err();
        assert!(
            err.to_string()
                .contains("550e8400-e29b-41d4-a716-44665544000"),
            "{err}"
        );
        // Found by fuzzing: any text in a UUID field was echoed into the
        // error, and so into logs and the dead-letter `error` header.
        let secret = format!(r#"{{{w},{c},"scenario_uuid":"rtsp://admin:S3cretPw@cam/a"}}"#);
        let err = DeployRequest::parse(Some(secret.as_bytes()), root()).unwrap_err();
        assert_eq!(err.category(), "bad_uuid");
        assert!(!err.to_string().contains("S3cretPw"), "{err}");
        assert!(err.to_string().contains("27 characters"), "{err}");
    }
}
