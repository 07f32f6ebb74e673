//! The operator's [`CommandStore`]: commands become `Scenario` objects in the
//! Kubernetes API. The Kafka side (parsing, dead letters, offsets, retries) is
//! the shared [`crate::ingest`].
//!
//! Commands for one scenario are ordered by [`crate::scenario::ordering`]:
//! the Scenario records the stamps of the newest deploy and undeploy applied
//! (`spec.applied`), and each command reads the Scenario, decides, and writes
//! it back with the resourceVersion it read, so two writers never both win.
//! An undeploy for a scenario that does not exist yet leaves a stopped
//! tombstone; a deploy that runs the scenario again, or replaces its worker,
//! starts a new run (`spec.run`), whose worker replaces any older one.
//!
//! The spec shows the camera URL redacted; the URL itself goes into the run's
//! camera Secret ([`secret`]), written right after the Scenario. A replay of
//! the deploy that set the current run writes it then, should the runner
//! have stopped in between.
//!
//! A deploy that would queue one more scenario than MAX_QUEUED allows (a new
//! scenario, or a finished or stopped one run again) is refused
//! ([`QueueRoom`]); ingest dead-letters it as `queue_full`.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::PostParams;
use kube::runtime::reflector::Store;
use kube::{Api, ResourceExt};

use super::crd::{Phase, Scenario, ScenarioSpec};
use super::fencing;
use super::leader::Leadership;
use super::names::{
    self, ANNOTATION_CAMERA_DIGEST, ANNOTATION_ENQUEUED_AT, ANNOTATION_SOURCE, FIELD_MANAGER,
    LABEL_RUNNER, LABEL_SCENARIO, label_value,
};
use super::plan;
use super::refusal::{self, Refusal};
use super::secret;
use crate::ingest::{CommandStore, Effect, StoreError};
use crate::messages::{DeployRequest, UndeployRequest};
use crate::scenario::ordering::{
    self, Applied, Current, DeployDecision, Stale, Stamp, UndeployDecision,
};

/// Read-decide-write rounds before a command is handed back to ingest's
/// retry loop (each lost round means another writer changed the Scenario).
const CONFLICT_ROUNDS: usize = 5;

pub struct ScenarioStore {
    pub scenarios: Api<Scenario>,
    /// Where each run's camera URL is kept (see [`secret`]).
    pub secrets: Api<Secret>,
    pub runner_name: String,
    pub queue: QueueRoom,
    /// The runner's key for camera digests (see [`secret::DigestKey`]).
    pub digest_key: secret::DigestKey,
    /// How long a finished Scenario, and with it what its commands were, is
    /// kept (FINISHED_TTL_SECS); `None` keeps them for ever.
    pub replay_horizon: Option<std::time::Duration>,
    /// The stamp every write carries ([`fencing`]).
    pub leadership: Leadership,
    /// Writes the fencing policy refused (`fenced_writes`).
    pub fenced_writes: prometheus_client::metrics::counter::Counter,
}

/// How many scenarios wait for a worker, as the reconciler's caches show it
/// plus the deploys this process let in that the Scenario cache does not
/// show yet; and the room left under MAX_QUEUED.
pub struct QueueRoom {
    /// The runner's Scenarios (the reconciler's cache).
    scenarios: Store<Scenario>,
    /// The runner's worker Pods (the reconciler's cache).
    pods: Store<Pod>,
    max_workers: usize,
    max_queued: usize,
    /// Scenario name → the generation the admitted write gave it (`None`
    /// while the write is under way); forgotten once the cache shows it.
    admitted: Mutex<HashMap<String, Option<i64>>>,
}

impl QueueRoom {
    pub fn new(
        scenarios: Store<Scenario>,
        pods: Store<Pod>,
        max_workers: usize,
        max_queued: usize,
    ) -> QueueRoom {
        QueueRoom {
            scenarios,
            pods,
            max_workers,
            max_queued,
            admitted: Mutex::new(HashMap::new()),
        }
    }

    fn admitted(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<i64>>> {
        self.admitted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a place in the queue for Scenario `name`; false when the
    /// queue is full.
    async fn take(&self, name: &str) -> Result<bool, StoreError> {
        // The cache's readiness wakes only one of the tasks waiting for it
        // (commands of several scenarios wait side by side): each looks
        // again every 100 ms.
        loop {
            let ready = self.scenarios.wait_until_ready();
            match tokio::time::timeout(std::time::Duration::from_millis(100), ready).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) => {
                    return Err(StoreError::Transient(format!(
                        "the Scenario cache is not available: {e}"
                    )));
                }
                Err(_) => continue,
            }
        }
        let scenarios = self.scenarios.state();
        let holding: HashSet<String> = self
            .pods
            .state()
            .iter()
            .filter(|p| plan::holds_slot(p))
            .map(|p| p.name_any())
            .collect();
        let mut admitted = self.admitted();
        admitted.retain(|name, generation| {
            let shown = generation.is_some_and(|g| {
                scenarios
                    .iter()
                    .any(|s| s.name_any() == *name && s.metadata.generation >= Some(g))
            });
            !shown
        });
        let mut waiting: HashSet<String> = scenarios
            .iter()
            .filter(|s| plan::wants_worker(s))
            .filter(|s| !holding.contains(&names::pod_name(&s.spec.scenario_uuid)))
            .map(|s| s.name_any())
            .collect();
        waiting.extend(admitted.keys().cloned());
        waiting.remove(name);
        let room = crate::scenario::admission::has_room(
            waiting.len(),
            holding.len(),
            self.max_workers,
            self.max_queued,
        );
        if room {
            admitted.entry(name.to_string()).or_insert(None);
        }
        Ok(room)
    }

    /// Settles the place taken for `name` by the outcome of its write.
    fn settle(&self, name: &str, written: Option<&Scenario>) {
        let mut admitted = self.admitted();
        match written {
            Some(s) => {
                admitted.insert(name.to_string(), Some(s.metadata.generation.unwrap_or(0)));
            }
            None => {
                if admitted.get(name) == Some(&None) {
                    admitted.remove(name);
                }
            }
        }
    }

    fn full(&self) -> StoreError {
        StoreError::QueueFull {
            max_queued: self.max_queued,
        }
    }
}

fn now_annotation() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

impl ScenarioStore {
    /// The Scenario a deploy request asks for (its first run).
    fn scenario_for(&self, req: &DeployRequest) -> Scenario {
        requested(req, &self.runner_name, &self.digest_key)
    }

    /// A stopped Scenario with no worker, written by an undeploy read before
    /// any deploy: an older deploy read later cannot start it.
    fn tombstone_for(&self, req: &UndeployRequest) -> Scenario {
        let uuid = req.scenario_uuid.to_string();
        let mut scenario = Scenario::new(
            &names::scenario_name(&uuid),
            ScenarioSpec {
                scenario_uuid: uuid.clone(),
                worker_id: String::new(),
                camera_url: String::new(),
                fps: None,
                model: None,
                target: None,
                stopped: false,
                applied: Applied::default(),
                run: 0,
            },
        );
        label(&mut scenario, &self.runner_name, &uuid);
        scenario
    }

    fn params() -> PostParams {
        PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        }
    }

    /// Sorts an API error (see [`store_error`]), counting and telling a
    /// write the fencing policy refused.
    fn write_error(&self, e: kube::Error) -> StoreError {
        if refusal::classify(&e) == Refusal::Fenced {
            self.fenced_writes.inc();
            tracing::warn!(error = %e, "a write was refused as not the current leader's (fenced): this replica lost the Lease, or the policy has not seen its take-over yet");
        }
        store_error(e)
    }

    /// Creates `scenario`, stamped; `Ok(None)` when another writer created it first.
    async fn create(&self, scenario: &Scenario) -> Result<Option<Scenario>, StoreError> {
        let mut scenario = scenario.clone();
        fencing::stamp_meta(&mut scenario.metadata, self.leadership.stamp());
        tracing::debug!(scenario = %scenario.name_any(), "creating the Scenario");
        match self.scenarios.create(&Self::params(), &scenario).await {
            Ok(written) => Ok(Some(written)),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
            Err(e) => Err(self.write_error(e)),
        }
    }

    /// Writes the camera Secret of `scenario`'s current run (the Scenario as
    /// the API server returned it, so with its UID for the owner reference).
    async fn store_camera_url(
        &self,
        scenario: &Scenario,
        camera_url: &str,
    ) -> Result<(), StoreError> {
        // The Scenario is written already: a quota on Secrets is waited out
        // rather than dead-lettering a deploy whose Scenario exists.
        secret::store(&self.secrets, scenario, camera_url, self.leadership.stamp())
            .await
            .map_err(|e| match self.write_error(e) {
                StoreError::Refused { message, .. } => StoreError::Transient(message),
                other => other,
            })
    }

    /// Writes `scenario` back if nobody changed it since it was read;
    /// `Ok(None)` when someone did.
    async fn replace(&self, scenario: &Scenario) -> Result<Option<Scenario>, StoreError> {
        // The server keeps its own record of field managers.
        let mut scenario = scenario.clone();
        scenario.metadata.managed_fields = None;
        fencing::stamp_meta(&mut scenario.metadata, self.leadership.stamp());
        match self
            .scenarios
            .replace(&scenario.name_any(), &Self::params(), &scenario)
            .await
        {
            Ok(written) => Ok(Some(written)),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
            Err(e) => Err(self.write_error(e)),
        }
    }
}

/// The Scenario a deploy request asks for (its first run) of runner
/// `runner_name`, whose camera digest is made with `key`.
fn requested(req: &DeployRequest, runner_name: &str, key: &secret::DigestKey) -> Scenario {
    let uuid = req.scenario_uuid.to_string();
    let mut scenario = Scenario::new(
        &names::scenario_name(&uuid),
        ScenarioSpec {
            scenario_uuid: uuid.clone(),
            worker_id: req.worker_id.to_string(),
            camera_url: secret::shown_url(&req.camera_url),
            fps: None,
            model: None,
            target: (!req.target.is_empty()).then(|| req.target.clone()),
            stopped: false,
            applied: Applied::default(),
            run: 1,
        },
    );
    label(&mut scenario, runner_name, &uuid);
    // What the camera is, decided here from the URL itself: the spec
    // shows it redacted.
    let source = if crate::scenario::source::is_finite(&req.camera_url) {
        "clip"
    } else {
        "live"
    };
    let annotations = scenario.annotations_mut();
    annotations.insert(ANNOTATION_SOURCE.into(), source.into());
    annotations.insert(
        ANNOTATION_CAMERA_DIGEST.into(),
        key.digest(&uuid, &req.camera_url),
    );
    scenario
}

/// Labels `scenario` as runner `runner_name`'s and stamps the moment it queues.
fn label(scenario: &mut Scenario, runner_name: &str, uuid: &str) {
    scenario.metadata.labels = Some(
        [
            (LABEL_RUNNER.to_string(), label_value(runner_name)),
            (LABEL_SCENARIO.to_string(), label_value(uuid)),
        ]
        .into(),
    );
    scenario.metadata.annotations =
        Some([(ANNOTATION_ENQUEUED_AT.to_string(), now_annotation())].into());
}

/// The runner that owns `s`, when that is not runner `runner_name`: two
/// runners in one namespace share Scenario names, and a command read by one
/// must not change the other's Scenario.
fn other_runner<'a>(s: &'a Scenario, runner_name: &str) -> Option<&'a str> {
    s.labels()
        .get(LABEL_RUNNER)
        .map(String::as_str)
        .filter(|owner| *owner != label_value(runner_name))
}

fn ignored_for(owner: &str, scenario: &impl std::fmt::Display) {
    tracing::warn!(%scenario, owner, "the scenario belongs to another runner; the command changes nothing here (give each runner its own topics)");
}

/// The existing Scenario as a deploy of `wanted`, for camera `camera_url`,
/// sees it. Its camera is compared by the digest it carries: a keyed one,
/// one written before digests were keyed, or none (see
/// [`secret::same_camera`]).
pub fn current(existing: &Scenario, wanted: &Scenario, camera_url: &str) -> Current {
    let finished = existing.status.as_ref().is_some_and(|st| {
        st.observed_run == existing.spec.run
            && st
                .phase
                .is_some_and(|p| matches!(p, Phase::Succeeded | Phase::Failed))
    });
    let same_camera = secret::same_camera(
        existing
            .annotations()
            .get(ANNOTATION_CAMERA_DIGEST)
            .map(String::as_str),
        &existing.spec.camera_url,
        &wanted.spec.scenario_uuid,
        camera_url,
        wanted
            .annotations()
            .get(ANNOTATION_CAMERA_DIGEST)
            .map_or("", String::as_str),
    );
    Current {
        applied: existing.spec.applied,
        finished,
        same_target: same_camera && existing.spec.worker_id == wanted.spec.worker_id,
    }
}

/// `existing` after a deploy of `wanted` decided as `decision` at `at`.
pub fn deployed(
    mut existing: Scenario,
    wanted: &Scenario,
    decision: DeployDecision,
    at: Stamp,
) -> Scenario {
    existing.spec.applied = ordering::after_deploy(existing.spec.applied, decision, at);
    if !matches!(decision, DeployDecision::Ignore(_)) {
        // The newest deploy's target holds (changing it restarts nothing).
        existing.spec.target = wanted.spec.target.clone();
    }
    if matches!(decision, DeployDecision::Rerun | DeployDecision::Replace) {
        existing.spec.camera_url = wanted.spec.camera_url.clone();
        existing.spec.worker_id = wanted.spec.worker_id.clone();
        existing.spec.run += 1;
        for key in [ANNOTATION_SOURCE, ANNOTATION_CAMERA_DIGEST] {
            match wanted.annotations().get(key) {
                Some(value) => existing.annotations_mut().insert(key.into(), value.clone()),
                None => existing.annotations_mut().remove(key),
            };
        }
    }
    if decision == DeployDecision::Rerun {
        // A fresh run queues behind the scenarios waiting now (from when its
        // deploy was read); a replaced worker keeps its place.
        let enqueued = wanted
            .annotations()
            .get(ANNOTATION_ENQUEUED_AT)
            .cloned()
            .unwrap_or_else(now_annotation);
        existing
            .annotations_mut()
            .insert(ANNOTATION_ENQUEUED_AT.to_string(), enqueued);
    }
    existing
}

/// Sorts an API error into what ingest does with it (see [`refusal`]): an
/// invalid or denied Scenario and a used-up quota are dead-lettered, so that
/// one refused command never holds up the others; anything else, an RBAC
/// denial included, is retried.
fn store_error(e: kube::Error) -> StoreError {
    let message = match &e {
        kube::Error::Api(status) => status.message.clone(),
        e => e.to_string(),
    };
    match refusal::classify(&e) {
        Refusal::Invalid => StoreError::Rejected(format!(
            "the Kubernetes API refused the Scenario: {message}"
        )),
        Refusal::Quota => StoreError::Refused {
            reason: crate::ingest::QUOTA_EXCEEDED,
            message: format!(
                "the namespace's ResourceQuota refused the Scenario: {message}; the command is \
                 refused. Raise the quota, or lower FINISHED_TTL_SECS so finished Scenarios go \
                 sooner, then send it again"
            ),
        },
        // A fenced write is this replica's, not the command's: it is never
        // dead-lettered (the leader that took over applies it).
        Refusal::Unauthorized | Refusal::Fenced | Refusal::Retry => {
            StoreError::Transient(e.to_string())
        }
    }
}

/// A deploy older than the replay horizon for a scenario that is not known
/// (see [`ordering::beyond_horizon`]).
fn stale(req: &DeployRequest, at: Stamp, horizon: std::time::Duration) -> StoreError {
    let stamp = chrono::DateTime::from_timestamp_millis(at.timestamp_ms)
        .map_or_else(|| at.timestamp_ms.to_string(), |t| t.to_rfc3339());
    StoreError::Refused {
        reason: crate::ingest::STALE,
        message: format!(
            "the deploy of scenario {} is stamped {stamp}, more than FINISHED_TTL_SECS={} ago, \
             and the scenario is not known: a replay of a run that finished and was removed \
             looks the same, so it is not run. Send a new deploy to run it",
            req.scenario_uuid,
            horizon.as_secs()
        ),
    }
}

fn being_deleted(name: &str) -> StoreError {
    StoreError::Transient(format!(
        "Scenario {name} is being deleted (its TTL ran out, or it was deleted by hand); \
         the deploy is applied once it is gone"
    ))
}

fn conflicted(name: &str) -> StoreError {
    StoreError::Transient(format!(
        "Scenario {name} kept changing while it was written; retrying"
    ))
}

impl CommandStore for ScenarioStore {
    fn rejected_category(&self) -> &'static str {
        "rejected_by_kubernetes"
    }

    async fn deploy(
        &self,
        req: &DeployRequest,
        at: Stamp,
        read_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Effect, StoreError> {
        let mut wanted = self.scenario_for(req);
        // Its place in the queue: when ingest read the command.
        wanted.annotations_mut().insert(
            ANNOTATION_ENQUEUED_AT.into(),
            read_at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        );
        let name = wanted.name_any();
        if let Some(horizon) = self.replay_horizon
            && ordering::beyond_horizon(at, chrono::Utc::now().timestamp_millis(), horizon)
            && self
                .scenarios
                .get_opt(&name)
                .await
                .map_err(store_error)?
                .is_none()
        {
            return Err(stale(req, at, horizon));
        }
        // Most deploys are for new scenarios: try to create first (one call),
        // and read-decide-write only when the Scenario exists.
        let create = ordering::on_deploy(None, at);
        wanted.spec.applied = ordering::after_deploy(Applied::default(), create, at);
        for _ in 0..CONFLICT_ROUNDS {
            let room = self.queue.take(&name).await?;
            if room {
                let created = self.create(&wanted).await;
                self.queue
                    .settle(&name, created.as_ref().ok().and_then(Option::as_ref));
                if let Some(written) = created? {
                    self.store_camera_url(&written, &req.camera_url).await?;
                    return Ok(Effect::Deploy(create));
                }
            }
            let existing = self.scenarios.get_opt(&name).await.map_err(store_error)?;
            let Some(existing) = existing else {
                if !room {
                    return Err(self.queue.full());
                }
                continue; // deleted meanwhile: create it
            };
            if let Some(owner) = other_runner(&existing, &self.runner_name) {
                ignored_for(owner, &req.scenario_uuid);
                return Ok(Effect::Deploy(DeployDecision::Ignore(Stale::Replay)));
            }
            if existing.metadata.deletion_timestamp.is_some() {
                // Written into, it would go with the object: the deploy is
                // kept (not committed) and creates the Scenario anew once
                // the delete, which waits for its Pod and Secrets, is done.
                return Err(being_deleted(&name));
            }
            let decision =
                ordering::on_deploy(Some(current(&existing, &wanted, &req.camera_url)), at);
            if let DeployDecision::Ignore(_) = decision {
                if existing.spec.applied.deploy == Some(at) && existing.spec.run > 0 {
                    // This very deploy set the current run: its Secret may
                    // not have been written before the runner stopped.
                    self.store_camera_url(&existing, &req.camera_url).await?;
                }
                return Ok(Effect::Deploy(decision));
            }
            // A finished or stopped scenario run again queues once more.
            let queues = decision == DeployDecision::Rerun && !plan::wants_worker(&existing);
            if queues && !self.queue.take(&name).await? {
                return Err(self.queue.full());
            }
            let next = deployed(existing, &wanted, decision, at);
            let replaced = self.replace(&next).await;
            if queues {
                self.queue
                    .settle(&name, replaced.as_ref().ok().and_then(Option::as_ref));
            }
            if let Some(written) = replaced? {
                if written.spec.applied.deploy == Some(at) {
                    self.store_camera_url(&written, &req.camera_url).await?;
                }
                return Ok(Effect::Deploy(decision));
            }
        }
        Err(conflicted(&name))
    }

    async fn undeploy(&self, req: &UndeployRequest, at: Stamp) -> Result<Effect, StoreError> {
        let mut tombstone = self.tombstone_for(req);
        let name = tombstone.name_any();
        for _ in 0..CONFLICT_ROUNDS {
            let existing = self.scenarios.get_opt(&name).await.map_err(store_error)?;
            let Some(mut existing) = existing else {
                let decision = ordering::on_undeploy(None, at);
                tombstone.spec.applied = ordering::after_undeploy(Applied::default(), decision, at);
                if self.create(&tombstone).await?.is_some() {
                    let scenario = req.scenario_uuid;
                    tracing::info!(%scenario, "to_undeploy before any deploy: a stopped tombstone keeps older deploys out");
                    return Ok(Effect::Undeploy(decision));
                }
                continue;
            };
            if let Some(owner) = other_runner(&existing, &self.runner_name) {
                ignored_for(owner, &req.scenario_uuid);
                return Ok(Effect::Undeploy(UndeployDecision::Ignore(Stale::Replay)));
            }
            let decision = ordering::on_undeploy(Some(existing.spec.applied), at);
            if let UndeployDecision::Ignore(_) = decision {
                return Ok(Effect::Undeploy(decision));
            }
            existing.spec.applied = ordering::after_undeploy(existing.spec.applied, decision, at);
            if self.replace(&existing).await?.is_some() {
                return Ok(Effect::Undeploy(decision));
            }
        }
        Err(conflicted(&name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::crd::ScenarioStatus;

    fn stamp(ms: i64) -> Stamp {
        Stamp {
            timestamp_ms: ms,
            offset: 0,
        }
    }

    fn spec(camera: &str) -> ScenarioSpec {
        crate::controller::crd::example_spec(camera)
    }

    /// The Scenario ingest asks for on a deploy of `camera`.
    fn wanted(camera: &str) -> Scenario {
        let spec = spec(camera);
        let req = DeployRequest {
            scenario_uuid: spec.scenario_uuid.parse().unwrap(),
            worker_id: spec.worker_id.parse().unwrap(),
            camera_url: camera.into(),
            target: Default::default(),
        };
        requested(&req, "vap-runner", &secret::DigestKey::new(&[7u8; 32]))
    }

    #[test]
    fn a_newer_deploy_with_another_camera_starts_a_new_run() {
        let existing = wanted("rtsp://a/1");
        let wanted = wanted("rtsp://b/2");
        let c = current(&existing, &wanted, "rtsp://b/2");
        assert!(!c.same_target && !c.finished);
        let decision = ordering::on_deploy(Some(c), stamp(200));
        assert_eq!(decision, DeployDecision::Replace);
        let next = deployed(existing, &wanted, decision, stamp(200));
        assert_eq!(next.spec.camera_url, "rtsp://b/2");
        assert_eq!(next.spec.run, 2);
        assert_eq!(next.spec.applied.deploy, Some(stamp(200)));
    }

    #[test]
    fn a_refresh_keeps_the_run_and_a_finished_run_is_rerun() {
        let existing = wanted("rtsp://a/1");
        let wanted = wanted("rtsp://a/1");
        let next = deployed(
            existing.clone(),
            &wanted,
            DeployDecision::Refresh,
            stamp(150),
        );
        assert_eq!(
            (next.spec.run, next.spec.applied.deploy),
            (1, Some(stamp(150)))
        );

        let mut finished = existing;
        finished.status = Some(ScenarioStatus {
            phase: Some(Phase::Succeeded),
            observed_run: 1,
            ..Default::default()
        });
        let c = current(&finished, &wanted, "rtsp://a/1");
        assert!(c.finished);
        assert_eq!(
            ordering::on_deploy(Some(c), stamp(300)),
            DeployDecision::Rerun
        );
        let rerun = deployed(finished, &wanted, DeployDecision::Rerun, stamp(300));
        assert_eq!(rerun.spec.run, 2);
        assert!(rerun.annotations().contains_key(ANNOTATION_ENQUEUED_AT));
    }
}
