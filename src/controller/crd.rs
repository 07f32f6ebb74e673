//! The `Scenario` custom resource: one per scenario UUID. The CRD YAML in
//! `crds/` is generated from these types (`runner crd`); a test fails when it
//! is stale. The apiserver itself refuses specs that break the rules written
//! here (OpenAPI patterns and bounds, CEL rules for immutable fields).

use chrono::{DateTime, Utc};
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::scenario::ordering::Applied;

/// A lowercase or uppercase hyphenated UUID.
pub const UUID_PATTERN: &str =
    "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";
/// A UUID, or empty (a stopped tombstone written by a `to_undeploy` that came
/// before any deploy has no worker).
pub const UUID_OR_EMPTY_PATTERN: &str =
    "^$|^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";
/// Detector models a Scenario may name (`MODEL` of the worker).
pub const MODELS: &[&str] = &["mock", "hog", "yolo"];

/// A request to run one worker for one scenario on one camera.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "runner.vap.io",
    version = "v1alpha1",
    kind = "Scenario",
    plural = "scenarios",
    shortname = "scn",
    namespaced,
    status = "ScenarioStatus",
    printcolumn = r#"{"name":"UUID","type":"string","jsonPath":".spec.scenarioUuid"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"FPS","type":"number","jsonPath":".status.stream.fps"}"#,
    printcolumn = r#"{"name":"Last Frame","type":"date","jsonPath":".status.stream.lastFrameTime"}"#,
    printcolumn = r#"{"name":"Streaming","type":"string","jsonPath":".status.conditions[?(@.type==\"Streaming\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".status.podName","priority":1}"#,
    printcolumn = r#"{"name":"Worker","type":"string","jsonPath":".spec.workerId","priority":1}"#,
    printcolumn = r#"{"name":"Restarts","type":"integer","jsonPath":".status.restartCount","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ScenarioSpec {
    /// The scenario's UUID, as in `to_deploy`; the key of its results. Immutable.
    #[schemars(regex(pattern = UUID_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "scenarioUuid is immutable"}]))]
    pub scenario_uuid: String,
    /// The `worker_id` of the `to_deploy` message: the platform's identifier for
    /// the worker slot that asked for this scenario. Recorded here and as the
    /// `runner.vap.io/worker-id` label of the scenario's Pod; it does not
    /// influence scheduling. Empty on a tombstone (see `applied`).
    #[schemars(regex(pattern = UUID_OR_EMPTY_PATTERN))]
    pub worker_id: String,
    /// Camera URL the worker reads (credentials are never copied into status or events).
    pub camera_url: String,
    /// Frames per second to process (> 0); the runner's VIDEO_FPS when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0, "exclusiveMinimum" = true))]
    pub fps: Option<f64>,
    /// Detector model (`mock`, `hog` or `yolo`); the runner's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["mock", "hog", "yolo"]))]
    pub model: Option<String>,
    /// What the scenario needs (`target_fps`, `max_frame_age_secs` of its
    /// deploy): the `Streaming` condition says when the worker falls short,
    /// and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<crate::scenario::health::StreamTarget>,
    /// Stops the scenario by hand (`kubectl patch`), whatever the commands say.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
    /// The Kafka record stamps of the newest `to_deploy` and `to_undeploy`
    /// applied to this scenario: commands are ordered by them, last writer
    /// wins. The scenario is stopped when its undeploy is not older than its
    /// deploy.
    #[serde(default, skip_serializing_if = "Applied::is_empty")]
    pub applied: Applied,
    /// Counts the scenario's runs: a deploy that runs it again, or replaces its
    /// worker, starts a new run, and a worker of an older run is removed.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub run: u32,
}

impl ScenarioSpec {
    /// Stopped by a `to_undeploy` newer than (or as old as) its last deploy,
    /// or by hand.
    pub fn is_stopped(&self) -> bool {
        self.stopped || self.applied.stopped()
    }
}

pub use crate::scenario::Phase;

/// A standard Kubernetes-style condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScenarioCondition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: DateTime<Utc>,
    pub observed_generation: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScenarioStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// `Ready` (the worker runs and its camera delivers) and `Admitted` (it
    /// holds a worker slot, or why it waits).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<ScenarioCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The run (`spec.run`) this status describes.
    #[serde(default)]
    pub observed_run: u32,
    /// The worker Pod, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// Restarts of this run's worker: container restarts plus workers of a
    /// live camera started again after they exited.
    #[serde(default)]
    pub restart_count: i32,
    /// Workers of this run started again after they exited (counted in
    /// `restartCount`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reruns: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<DateTime<Utc>>,
    /// The last error, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// No new worker Pod before this time: the last one was refused by its
    /// node or, for a live camera, exited, and the next waits out a delay
    /// that doubles per restart (10 s up to 5 min).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_after: Option<DateTime<Utc>>,
    /// The camera as the worker's latest heartbeat told it (refreshed every
    /// STREAM_STATUS_SECS at most while nothing changes; at once when the
    /// state or the `Streaming` condition changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamStatus>,
    /// The leader that wrote this status, as `<holderIdentity>/<leaseTransitions>`
    /// of the leader Lease: with the chart's fencing policy a status write
    /// stamped by anyone but the current holder is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
}

/// The camera's health, from the worker's heartbeats.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamStatus {
    /// `streaming`, `reconnecting`, `camera_dark` or `ended`.
    pub state: String,
    /// Frames processed per second.
    pub fps: f64,
    /// Frames the camera delivered per second.
    pub camera_fps: f64,
    /// Seconds since the camera's last frame, as of `heartbeatTime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// When the camera last delivered a frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_frame_time: Option<DateTime<Utc>>,
    /// Frames lost in the heartbeat's interval.
    pub frames_dropped: u64,
    /// Read-and-decode CPU time per frame, 95th percentile, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_p95_ms: Option<f64>,
    /// Detector time per frame, 95th percentile, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_p95_ms: Option<f64>,
    /// When the worker made the heartbeat shown.
    pub heartbeat_time: DateTime<Utc>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

impl ScenarioStatus {
    /// The condition of `type_`, if set.
    pub fn condition(&self, type_: &str) -> Option<&ScenarioCondition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// A spec for unit tests: deployed at 100 ms, run 1, on `camera`.
#[cfg(test)]
pub(crate) fn example_spec(camera: &str) -> ScenarioSpec {
    use crate::scenario::ordering::Stamp;
    ScenarioSpec {
        scenario_uuid: "550e8400-e29b-41d4-a716-446655440000".into(),
        worker_id: "11223344-5566-7788-99aa-bbccddeeeff0".into(),
        camera_url: camera.into(),
        fps: None,
        model: None,
        target: None,
        stopped: false,
        applied: Applied {
            deploy: Some(Stamp {
                timestamp_ms: 100,
                offset: 0,
            }),
            undeploy: None,
        },
        run: 1,
    }
}

/// The owner reference a worker Pod and a camera Secret carry: `scenario` is
/// their controller, and a foreground delete of it (the TTL's) waits until
/// they are gone (`blockOwnerDeletion`), so a Scenario created again under
/// the same name never meets a Pod or a Secret of the one before. `None`
/// when `scenario` has no UID yet.
pub fn owner_reference(
    scenario: &Scenario,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
    use kube::Resource;
    scenario.controller_owner_ref(&()).map(|mut owner| {
        owner.block_owner_deletion = Some(true);
        owner
    })
}

/// The CRD as YAML, as `runner crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&Scenario::crd())
}

/// Where the API server publishes the OpenAPI v3 schema of the Scenario's
/// group and version (readable by every authenticated user).
pub fn published_schema_path() -> String {
    use kube::Resource;
    format!(
        "/openapi/v3/apis/{}/{}",
        Scenario::group(&()),
        Scenario::version(&())
    )
}

/// The status fields of this controller's Scenario that the installed CRD,
/// as the API server publishes it (`document`, from
/// [`published_schema_path`]), lacks: an older CRD prunes them from every
/// status write, `status.writer` (the fencing stamp) among them. `None` when
/// the document holds no Scenario schema to judge by.
pub fn status_fields_missing(document: &serde_json::Value) -> Option<Vec<String>> {
    use kube::Resource;
    let group = Scenario::group(&());
    let reversed: Vec<&str> = group.split('.').rev().collect();
    let key = format!(
        "{}.{}.{}",
        reversed.join("."),
        Scenario::version(&()),
        Scenario::kind(&())
    );
    let published = document
        .pointer(&format!(
            "/components/schemas/{key}/properties/status/properties"
        ))?
        .as_object()?;
    let crd = serde_json::to_value(Scenario::crd()).ok()?;
    let ours = crd
        .pointer("/spec/versions/0/schema/openAPIV3Schema/properties/status/properties")?
        .as_object()?;
    Some(
        ours.keys()
            .filter(|field| !published.contains_key(*field))
            .cloned()
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_has_the_names_and_columns_operators_expect() {
        let crd = Scenario::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("scenarios.runner.vap.io")
        );
        assert_eq!(crd.spec.names.short_names, Some(vec!["scn".to_string()]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        for expected in [
            "UUID",
            "Phase",
            "Ready",
            "Reason",
            "FPS",
            "Last Frame",
            "Pod",
            "Worker",
            "Age",
        ] {
            assert!(columns.contains(&expected), "{columns:?}");
        }
    }

    #[test]
    fn crd_carries_the_validation_rules() {
        let yaml = crd_yaml().unwrap();
        for needle in [
            UUID_PATTERN,
            "scenarioUuid is immutable",
            "exclusiveMinimum: true",
            "- yolo",
        ] {
            assert!(yaml.contains(needle), "CRD lacks {needle}:\n{yaml}");
        }
    }

    #[test]
    fn a_published_schema_without_the_newest_status_fields_is_told_apart() {
        let crd = serde_json::to_value(Scenario::crd()).unwrap();
        let mut status =
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"].clone();
        let document = |status: &serde_json::Value| {
            serde_json::json!({"components": {"schemas": {
                "io.vap.runner.v1alpha1.Scenario": {"properties": {"status": status}},
            }}})
        };
        assert_eq!(status_fields_missing(&document(&status)), Some(vec![]));
        status["properties"]
            .as_object_mut()
            .unwrap()
            .remove("writer");
        assert_eq!(
            status_fields_missing(&document(&status)),
            Some(vec!["writer".to_string()])
        );
        // Nothing to judge by: another group's document, or none published.
        assert_eq!(
            status_fields_missing(&serde_json::json!({"components": {"schemas": {}}})),
            None
        );
        assert_eq!(
            published_schema_path(),
            "/openapi/v3/apis/runner.vap.io/v1alpha1"
        );
    }
}
