//! The `Scenario` custom resource: one per scenario UUID. The CRD YAML in
//! `crds/` is generated from these types (`runner crd`); a test fails when it
//! is stale.

use chrono::{DateTime, Utc};
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".status.podName"}"#,
    printcolumn = r#"{"name":"Worker","type":"string","jsonPath":".spec.workerId"}"#,
    printcolumn = r#"{"name":"Queue","type":"integer","jsonPath":".status.queuePosition","priority":1}"#,
    printcolumn = r#"{"name":"Restarts","type":"integer","jsonPath":".status.restartCount","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ScenarioSpec {
    /// The scenario's UUID, as in `to_deploy`; the key of its results.
    pub scenario_uuid: String,
    /// The `worker_id` of the `to_deploy` message: the platform's identifier for
    /// the worker slot that asked for this scenario. Recorded here and as the
    /// `runner.vap.io/worker-id` label of the scenario's Pod; it does not
    /// influence scheduling.
    pub worker_id: String,
    /// Camera URL the worker reads (credentials are never copied into status or events).
    pub camera_url: String,
    /// Frames per second to process; the runner's VIDEO_FPS when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fps: Option<f64>,
    /// Detector model (`mock` or `hog`); the runner's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Set by `to_undeploy`: the worker is stopped and never started again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<ScenarioCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The worker Pod, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// 1-based place in the queue while Queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
    /// Restarts of the worker container.
    #[serde(default)]
    pub restart_count: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<DateTime<Utc>>,
    /// The last error, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The CRD as YAML, as `runner crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&Scenario::crd())
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
        for expected in ["UUID", "Phase", "Pod", "Worker", "Age"] {
            assert!(columns.contains(&expected), "{columns:?}");
        }
    }
}
