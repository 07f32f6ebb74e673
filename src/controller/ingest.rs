//! The operator's [`CommandStore`]: commands become `Scenario` objects in the
//! Kubernetes API. The Kafka side (parsing, dead letters, offsets, retries) is
//! the shared [`crate::ingest`].

use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use super::crd::{Scenario, ScenarioSpec};
use super::pod::{self, ANNOTATION_ENQUEUED_AT, LABEL_RUNNER, LABEL_SCENARIO, label_value};
use super::reconcile::FIELD_MANAGER;
use crate::ingest::{CommandStore, Effect, StoreError};
use crate::messages::{DeployRequest, UndeployRequest};
use crate::scenario::ordering::{DeployDecision, Stale, Stamp, UndeployDecision};

pub struct ScenarioStore {
    pub scenarios: Api<Scenario>,
    pub runner_name: String,
}

impl ScenarioStore {
    fn scenario_for(&self, req: &DeployRequest) -> Scenario {
        let uuid = req.scenario_uuid.to_string();
        let mut scenario = Scenario::new(
            &pod::scenario_name(&uuid),
            ScenarioSpec {
                scenario_uuid: uuid.clone(),
                worker_id: req.worker_id.to_string(),
                camera_url: req.camera_url.clone(),
                fps: None,
                model: None,
                stopped: false,
            },
        );
        scenario.metadata.labels = Some(
            [
                (LABEL_RUNNER.to_string(), label_value(&self.runner_name)),
                (LABEL_SCENARIO.to_string(), label_value(&uuid)),
            ]
            .into(),
        );
        scenario.metadata.annotations = Some(
            [(
                ANNOTATION_ENQUEUED_AT.to_string(),
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            )]
            .into(),
        );
        scenario
    }
}

/// Sorts an API error into what ingest does with it: 400 and 422 are the API
/// server refusing the object for good, anything else is worth retrying.
fn store_error(e: kube::Error) -> StoreError {
    match e {
        kube::Error::Api(e) if e.code == 400 || e.code == 422 => StoreError::Rejected(format!(
            "the Kubernetes API refused the Scenario: {}",
            e.message
        )),
        e => StoreError::Transient(e.to_string()),
    }
}

impl CommandStore for ScenarioStore {
    fn rejected_category(&self) -> &'static str {
        "rejected_by_kubernetes"
    }

    /// Creates the Scenario unless it exists: duplicates and replays (also of
    /// a stopped scenario) change nothing.
    async fn deploy(&self, req: &DeployRequest, _at: Stamp) -> Result<Effect, StoreError> {
        let scenario = self.scenario_for(req);
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match self.scenarios.create(&params, &scenario).await {
            Ok(_) => Ok(Effect::Deploy(DeployDecision::Create)),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                Ok(Effect::Deploy(DeployDecision::Ignore(Stale::Replay)))
            }
            Err(e) => Err(store_error(e)),
        }
    }

    async fn undeploy(&self, req: &UndeployRequest, _at: Stamp) -> Result<Effect, StoreError> {
        let name = pod::scenario_name(&req.scenario_uuid.to_string());
        let patch = Patch::Merge(json!({"spec": {"stopped": true}}));
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match self.scenarios.patch(&name, &params, &patch).await {
            Ok(_) => Ok(Effect::Undeploy(UndeployDecision::Stop)),
            Err(kube::Error::Api(e)) if e.code == 404 => {
                let scenario = req.scenario_uuid;
                tracing::warn!(%scenario, "to_undeploy for an unknown scenario; nothing to stop");
                Ok(Effect::Undeploy(UndeployDecision::Ignore(Stale::Overtaken)))
            }
            Err(e) => Err(store_error(e)),
        }
    }
}
