//! The operator's [`CommandStore`]: commands become `Scenario` objects in the
//! Kubernetes API. The Kafka side (parsing, dead letters, offsets, retries) is
//! the shared [`crate::ingest`].

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::crd::{Scenario, ScenarioSpec};
use super::pod::{self, ANNOTATION_ENQUEUED_AT, LABEL_RUNNER, LABEL_SCENARIO, label_value};
use super::reconcile::FIELD_MANAGER;
use super::secret;
use crate::ingest::{CommandStore, Effect, StoreError};
use crate::messages::{DeployRequest, UndeployRequest};
use crate::scenario::ordering::{DeployDecision, Stale, Stamp, UndeployDecision};

pub struct ScenarioStore {
    pub scenarios: Api<Scenario>,
    /// Where each scenario's camera URL is kept (see [`secret`]).
    pub secrets: Api<Secret>,
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
                camera_url: secret::shown_url(&req.camera_url),
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

    /// Creates the Scenario (with the camera URL redacted) unless it exists:
    /// duplicates and replays (also of a stopped scenario) change nothing.
    /// Then writes the camera Secret it owns; a replay after a crash in
    /// between writes it then, and an existing one is never overwritten.
    async fn deploy(&self, req: &DeployRequest, _at: Stamp) -> Result<Effect, StoreError> {
        let scenario = self.scenario_for(req);
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let (written, effect) = match self.scenarios.create(&params, &scenario).await {
            Ok(created) => (created, Effect::Deploy(DeployDecision::Create)),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let existing = self
                    .scenarios
                    .get(&scenario.name_any())
                    .await
                    .map_err(store_error)?;
                (
                    existing,
                    Effect::Deploy(DeployDecision::Ignore(Stale::Replay)),
                )
            }
            Err(e) => return Err(store_error(e)),
        };
        secret::store(&self.secrets, &written, &req.camera_url)
            .await
            .map_err(store_error)?;
        Ok(effect)
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
