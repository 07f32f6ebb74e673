//! The scenarios file: a fixed set of cameras, the way edge boxes are
//! configured. A YAML or JSON list of
//! `{scenario_uuid, camera_url, worker_id?, fps?, model?}`, read at start and
//! again on SIGHUP: added entries are deployed, removed ones stopped, changed
//! ones replaced. A file that does not load changes nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::ValueEnum;
use serde::Deserialize;
use uuid::Uuid;

use super::state::{Origin, Record, Target};
use crate::camera_url::CameraSource;
use crate::config::VideoFps;
use crate::detector::Model;

/// One entry as written (no `Debug`: it holds the raw camera URL).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    scenario_uuid: Uuid,
    camera_url: String,
    #[serde(default)]
    worker_id: Option<Uuid>,
    #[serde(default)]
    fps: Option<f64>,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read the scenarios file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the scenarios file {path} is not a list of {{scenario_uuid, camera_url, worker_id?, fps?, model?}}: {source}"
    )]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error(
        "the scenarios file {path} lists scenario {uuid} twice; keep one entry per scenario_uuid"
    )]
    Duplicate { path: PathBuf, uuid: Uuid },
    #[error("the scenarios file {path}: scenario {uuid}: camera_url refused: {reason}")]
    Camera {
        path: PathBuf,
        uuid: Uuid,
        reason: String,
    },
    #[error("the scenarios file {path}: scenario {uuid}: {reason}")]
    Setting {
        path: PathBuf,
        uuid: Uuid,
        reason: String,
    },
}

impl FileError {
    /// A fixed label for the `scenarios_file_errors_total` metric.
    pub fn category(&self) -> &'static str {
        match self {
            FileError::Read { .. } => "unreadable",
            FileError::Parse { .. } => "not_a_scenario_list",
            FileError::Duplicate { .. } => "duplicate",
            FileError::Camera { .. } => "camera_url",
            FileError::Setting { .. } => "setting",
        }
    }
}

/// One scenario the file asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    pub uuid: String,
    pub target: Target,
}

/// Reads and validates the whole file; any bad entry refuses all of it.
pub fn load(path: &Path, file_root: Option<&Path>) -> Result<Vec<Wanted>, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path, file_root)
}

/// YAML is a superset of JSON, so one parser reads both.
pub fn parse(text: &str, path: &Path, file_root: Option<&Path>) -> Result<Vec<Wanted>, FileError> {
    let entries: Vec<Entry> = if text.trim().is_empty() {
        Vec::new()
    } else {
        serde_yaml::from_str(text).map_err(|source| FileError::Parse {
            path: path.to_path_buf(),
            source,
        })?
    };
    let mut seen = HashMap::new();
    let mut wanted = Vec::new();
    for e in entries {
        let uuid = e.scenario_uuid;
        if seen.insert(uuid, ()).is_some() {
            return Err(FileError::Duplicate {
                path: path.to_path_buf(),
                uuid,
            });
        }
        CameraSource::parse(&e.camera_url, file_root).map_err(|err| FileError::Camera {
            path: path.to_path_buf(),
            uuid,
            reason: err.to_string(),
        })?;
        let setting = |reason: String| FileError::Setting {
            path: path.to_path_buf(),
            uuid,
            reason,
        };
        if let Some(fps) = e.fps {
            VideoFps::new(fps).map_err(|r| setting(format!("fps: {r}")))?;
        }
        if let Some(model) = &e.model {
            Model::from_str(model, true).map_err(|_| {
                let allowed: Vec<String> = Model::value_variants()
                    .iter()
                    .filter_map(|m| m.to_possible_value().map(|v| v.get_name().to_string()))
                    .collect();
                setting(format!(
                    "model {model:?} is not known; use one of {}",
                    allowed.join(", ")
                ))
            })?;
        }
        wanted.push(Wanted {
            uuid: uuid.to_string(),
            target: Target {
                worker_id: e.worker_id.map(|w| w.to_string()),
                camera_url: e.camera_url,
                fps: e.fps,
                model: e.model,
                origin: Origin::File,
            },
        });
    }
    Ok(wanted)
}

/// A command the file's contents call for.
#[derive(Debug, Clone, PartialEq)]
pub enum FileCommand {
    Deploy(Wanted),
    Undeploy(String),
}

/// What to change so that the store matches the file: deploy what is new,
/// stopped or changed; stop what the file no longer lists (only scenarios
/// the file started). Unchanged entries are left alone, so a finished clip is
/// not run again by a reload.
pub fn plan(wanted: &[Wanted], records: &[Record]) -> Vec<FileCommand> {
    let stored: HashMap<&str, &Record> = records.iter().map(|r| (r.uuid.as_str(), r)).collect();
    let mut commands = Vec::new();
    for w in wanted {
        let deploy = match stored.get(w.uuid.as_str()) {
            None => true,
            Some(r) => r.applied.stopped() || !r.same_target(&w.target) || r.origin != Origin::File,
        };
        if deploy {
            commands.push(FileCommand::Deploy(w.clone()));
        }
    }
    for r in records {
        if r.origin == Origin::File
            && !r.applied.stopped()
            && !wanted.iter().any(|w| w.uuid == r.uuid)
        {
            commands.push(FileCommand::Undeploy(r.uuid.clone()));
        }
    }
    commands
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::ordering::Stamp;

    const A: &str = "550e8400-e29b-41d4-a716-446655440000";
    const B: &str = "550e8400-e29b-41d4-a716-446655440001";

    fn path() -> &'static Path {
        Path::new("/etc/vap/scenarios.yaml")
    }

    fn root() -> Option<&'static Path> {
        Some(Path::new("/videos"))
    }

    #[test]
    fn yaml_and_json_lists_are_read() {
        let yaml =
            format!("- scenario_uuid: {A}\n  camera_url: rtsp://cam/1\n  fps: 1\n  model: hog\n");
        let json = format!(
            r#"[{{"scenario_uuid": "{A}", "camera_url": "rtsp://cam/1", "fps": 1, "model": "hog"}}]"#
        );
        let a = parse(&yaml, path(), root()).unwrap();
        assert_eq!(a, parse(&json, path(), root()).unwrap());
        assert_eq!(a[0].target.fps, Some(1.0));
        assert!(parse("", path(), root()).unwrap().is_empty());
    }

    #[test]
    fn bad_entries_name_the_file_the_scenario_and_the_rule() {
        let cases = [
            (format!("- scenario_uuid: {A}\n"), "not_a_scenario_list"),
            (
                "- scenario_uuid: nope\n  camera_url: rtsp://c/1\n".to_string(),
                "not_a_scenario_list",
            ),
            (
                format!("- scenario_uuid: {A}\n  camera_url: rtsp://c/1\n  colour: red\n"),
                "not_a_scenario_list",
            ),
            (
                format!("- scenario_uuid: {A}\n  camera_url: ftp://c/1\n"),
                "camera_url",
            ),
            (
                format!("- scenario_uuid: {A}\n  camera_url: rtsp://c/1\n  fps: 0\n"),
                "setting",
            ),
            (
                format!("- scenario_uuid: {A}\n  camera_url: rtsp://c/1\n  model: big\n"),
                "setting",
            ),
            (
                format!(
                    "- scenario_uuid: {A}\n  camera_url: rtsp://c/1\n- scenario_uuid: {A}\n  camera_url: rtsp://c/2\n"
                ),
                "duplicate",
            ),
        ];
        for (text, category) in cases {
            let err = parse(&text, path(), root()).unwrap_err();
            assert_eq!(err.category(), category, "{text}: {err}");
            assert!(err.to_string().contains("/etc/vap/scenarios.yaml"), "{err}");
        }
    }

    fn stored(uuid: &str, camera: &str, stopped: bool) -> Record {
        let mut r = Record::new(
            uuid,
            Target {
                worker_id: None,
                camera_url: camera.into(),
                fps: None,
                model: None,
                origin: Origin::File,
            },
            chrono::Utc::now(),
        );
        r.applied.deploy = Some(Stamp {
            timestamp_ms: 1,
            offset: 0,
        });
        if stopped {
            r.applied.undeploy = Some(Stamp {
                timestamp_ms: 2,
                offset: 0,
            });
        }
        r
    }

    fn wanted(uuid: &str, camera: &str) -> Wanted {
        Wanted {
            uuid: uuid.into(),
            target: stored(uuid, camera, false).into_target(),
        }
    }

    impl Record {
        fn into_target(self) -> Target {
            Target {
                worker_id: self.worker_id,
                camera_url: self.camera_url,
                fps: self.fps,
                model: self.model,
                origin: self.origin,
            }
        }
    }

    #[test]
    fn plan_table() {
        use FileCommand::{Deploy, Undeploy};
        let cases = [
            (
                "added",
                vec![wanted(A, "/a")],
                vec![],
                vec![Deploy(wanted(A, "/a"))],
            ),
            (
                "unchanged",
                vec![wanted(A, "/a")],
                vec![stored(A, "/a", false)],
                vec![],
            ),
            (
                "changed",
                vec![wanted(A, "/b")],
                vec![stored(A, "/a", false)],
                vec![Deploy(wanted(A, "/b"))],
            ),
            (
                "removed",
                vec![],
                vec![stored(A, "/a", false)],
                vec![Undeploy(A.to_string())],
            ),
            (
                "removed before",
                vec![],
                vec![stored(A, "/a", true)],
                vec![],
            ),
            (
                "added again",
                vec![wanted(A, "/a")],
                vec![stored(A, "/a", true)],
                vec![Deploy(wanted(A, "/a"))],
            ),
            (
                "one of two removed",
                vec![wanted(B, "/b")],
                vec![stored(A, "/a", false), stored(B, "/b", false)],
                vec![Undeploy(A.to_string())],
            ),
        ];
        for (name, file, records, want) in cases {
            assert_eq!(plan(&file, &records), want, "{name}");
        }
        let mut from_kafka = stored(A, "/a", false);
        from_kafka.origin = Origin::Kafka;
        assert!(
            plan(&[], &[from_kafka]).is_empty(),
            "the file never stops what Kafka started"
        );
    }
}
