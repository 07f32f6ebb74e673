//! Scenario → worker Pod.
//!
//! Each reconcile reads the Scenario and its Pod from the watch caches,
//! decides the Scenario's phase, and writes status only when it changed.
//!
//! How MAX_WORKERS stays race-free: only the Lease holder reconciles, and
//! within it every Pod creation happens inside one critical section (the
//! `Admission` mutex). Inside it the live count is the Pods in the cache that
//! hold a slot plus the Pods this process created that the cache has not
//! shown yet ("pending"), so a lagging cache can never make room that is not
//! there. The pure `admission::decide` picks who starts. After a restart the
//! caches are complete before the first reconcile, and the deterministic Pod
//! name turns a repeated creation into a harmless "already exists".

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Mutex;

use super::admission::{self, Waiting};
use super::crd::{Phase, Scenario, ScenarioCondition, ScenarioStatus};
use super::events::PhasePublisher;
use super::metrics::{CategoryLabels, ControllerMetrics, PhaseLabels, ResultLabels};
use super::pod::{self, WorkerTemplate};
use crate::backoff::Backoff;

pub const FIELD_MANAGER: &str = "vap-runner";

/// Errors of one reconcile; all are retried with per-object backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API call failed while {action}: {source}")]
    Kube {
        action: &'static str,
        source: kube::Error,
    },
    #[error("the Scenario has no namespace")]
    NoNamespace,
}

impl ReconcileError {
    /// A low-cardinality label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            ReconcileError::Kube {
                source: kube::Error::Api(e),
                ..
            } if e.code == 409 => "conflict",
            ReconcileError::Kube {
                source: kube::Error::Api(e),
                ..
            } if e.code == 404 => "not_found",
            ReconcileError::Kube {
                source: kube::Error::Api(e),
                ..
            } if e.code == 403 => "forbidden",
            ReconcileError::Kube {
                source: kube::Error::Api(e),
                ..
            } if e.code >= 500 => "server",
            ReconcileError::Kube {
                source: kube::Error::Api(_),
                ..
            } => "rejected",
            ReconcileError::Kube { .. } => "unreachable",
            ReconcileError::NoNamespace => "invalid",
        }
    }
}

fn kube_err(action: &'static str) -> impl FnOnce(kube::Error) -> ReconcileError {
    move |source| ReconcileError::Kube { action, source }
}

/// Pods created by this process and not yet seen in the Pod cache.
#[derive(Default)]
pub struct Admission {
    pending: HashMap<String, Instant>,
}

pub struct Context {
    pub client: Client,
    pub namespace: String,
    pub template: WorkerTemplate,
    pub max_workers: usize,
    pub pods: Store<Pod>,
    pub scenarios: Store<Scenario>,
    pub admission: Mutex<Admission>,
    pub recorder: Recorder,
    pub metrics: Arc<ControllerMetrics>,
    pub phases: PhasePublisher,
    /// Consecutive reconcile failures per Scenario, for exponential backoff.
    pub failures: std::sync::Mutex<HashMap<String, u32>>,
}

/// How long a created Pod counts as live without showing up in the cache.
const PENDING_GRACE: Duration = Duration::from_secs(60);

/// The phase a Pod's state means for its Scenario, with its restart count.
pub fn phase_from_pod(pod: &Pod) -> (Phase, i32) {
    let status = pod.status.as_ref();
    let restarts = status
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| cs.iter().map(|c| c.restart_count).sum())
        .unwrap_or(0);
    let phase = match status.and_then(|s| s.phase.as_deref()) {
        Some("Running") => Phase::Running,
        Some("Succeeded") => Phase::Succeeded,
        Some("Failed") => Phase::Failed,
        _ => Phase::Starting,
    };
    (phase, restarts)
}

/// True while a Pod holds a worker slot (it may still be running).
pub fn holds_slot(pod: &Pod) -> bool {
    !matches!(phase_from_pod(pod).0, Phase::Succeeded | Phase::Failed)
}

/// The Scenario's own worker Pod, read from the API server rather than the
/// cache: the reconcile was triggered by a change of this very Pod, which the
/// cache may not show yet, and a stale phase here would hold the Scenario in
/// its old phase until the next periodic reconcile.
async fn pod_for(ctx: &Context, scenario: &Scenario) -> Result<Option<Pod>, ReconcileError> {
    let name = pod::pod_name(&scenario.spec.scenario_uuid);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let Some(pod) = pods
        .get_opt(&name)
        .await
        .map_err(kube_err("reading the worker Pod"))?
    else {
        return Ok(None);
    };
    // Only a Pod this Scenario owns counts (not a leftover of a deleted one).
    let uid = scenario.metadata.uid.as_deref();
    let owned = pod
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid);
    Ok(owned.then_some(pod))
}

/// When a Scenario joined the queue: the ingest annotation, else its creation time.
pub fn enqueued_at(s: &Scenario) -> chrono::DateTime<Utc> {
    s.annotations()
        .get(pod::ANNOTATION_ENQUEUED_AT)
        .and_then(|v| chrono::DateTime::parse_from_rfc3339(v).ok())
        .map(|t| t.with_timezone(&Utc))
        .or_else(|| {
            s.metadata
                .creation_timestamp
                .as_ref()
                .and_then(|t| chrono::DateTime::from_timestamp_micros(t.0.as_microsecond()))
        })
        .unwrap_or_else(Utc::now)
}

fn current_phase(s: &Scenario) -> Option<Phase> {
    s.status.as_ref().and_then(|st| st.phase)
}

/// Starts Pods for the oldest waiting Scenarios while slots are free, and
/// returns the queue positions of the rest.
async fn admit(ctx: &Context) -> Result<HashMap<String, u32>, ReconcileError> {
    let mut admission = ctx.admission.lock().await;
    let cached: Vec<Arc<Pod>> = ctx.pods.state();
    let cached_names: std::collections::HashSet<String> =
        cached.iter().map(|p| p.name_any()).collect();
    admission
        .pending
        .retain(|name, at| !cached_names.contains(name) && at.elapsed() < PENDING_GRACE);
    let live = cached.iter().filter(|p| holds_slot(p)).count() + admission.pending.len();

    let waiting: Vec<Waiting<String>> = ctx
        .scenarios
        .state()
        .iter()
        .filter(|s| s.namespace().as_deref() == Some(ctx.namespace.as_str()))
        .filter(|s| s.metadata.deletion_timestamp.is_none() && !s.spec.stopped)
        .filter(|s| !current_phase(s).is_some_and(Phase::is_terminal))
        .filter(|s| {
            let name = pod::pod_name(&s.spec.scenario_uuid);
            !cached_names.contains(&name) && !admission.pending.contains_key(&name)
        })
        .map(|s| Waiting {
            key: s.name_any(),
            created: enqueued_at(s),
        })
        .collect();
    let decision = admission::decide(waiting, live, ctx.max_workers);
    ctx.metrics.queue_length.set(decision.queued.len() as i64);
    ctx.metrics
        .live_workers
        .set((live + decision.start.len()) as i64);

    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    for name in &decision.start {
        let Some(scenario) = ctx
            .scenarios
            .get(&ObjectRef::new(name).within(&ctx.namespace))
        else {
            continue;
        };
        let pod = pod::build(&scenario, &ctx.template);
        let pod_name = pod.name_any();
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match pods.create(&params, &pod).await {
            Ok(_) => {
                ctx.metrics.pods_created.inc();
                tracing::info!(scenario = %name, pod = %pod_name, "worker Pod created");
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(kube_err("creating a worker Pod")(e)),
        }
        admission.pending.insert(pod_name, Instant::now());
    }
    Ok(decision.queued.into_iter().collect())
}

/// The status a Scenario should have now; creates or deletes its Pod as needed.
async fn desired_status(
    scenario: &Scenario,
    ctx: &Context,
) -> Result<ScenarioStatus, ReconcileError> {
    let old = scenario.status.clone().unwrap_or_default();
    let mut status = ScenarioStatus {
        observed_generation: scenario.metadata.generation,
        ..old.clone()
    };
    let pod = pod_for(ctx, scenario).await?;

    if scenario.spec.stopped {
        if let Some(pod) = &pod {
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
            match pods.delete(&pod.name_any(), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(kube_err("deleting a stopped worker Pod")(e)),
            }
        }
        status.phase = Some(Phase::Stopped);
        status.queue_position = None;
        if old.phase != Some(Phase::Stopped) {
            status.finish_time = Some(Utc::now());
        }
        // Free the slot for the next in line at once.
        admit(ctx).await?;
        return Ok(status);
    }

    if let Some(pod) = pod {
        // The cache shows it now: it no longer needs counting as pending.
        ctx.admission.lock().await.pending.remove(&pod.name_any());
        let (phase, restarts) = phase_from_pod(&pod);
        status.phase = Some(phase);
        status.pod_name = Some(pod.name_any());
        status.queue_position = None;
        status.restart_count = restarts;
        if status.start_time.is_none() {
            status.start_time = Some(Utc::now());
        }
        if phase.is_terminal() {
            if status.finish_time.is_none() {
                status.finish_time = Some(Utc::now());
            }
            if phase == Phase::Failed {
                status.last_error = Some(pod_failure(&pod));
            }
            // A slot just freed: start the next in line.
            admit(ctx).await?;
        }
        return Ok(status);
    }

    if old.phase.is_some_and(Phase::is_terminal) {
        return Ok(status);
    }
    // No Pod: new, queued, or its Pod was deleted by someone else.
    let queued = admit(ctx).await?;
    match queued.get(&scenario.name_any()) {
        Some(position) => {
            status.phase = Some(Phase::Queued);
            status.queue_position = Some(*position);
        }
        None => {
            status.phase = Some(Phase::Starting);
            status.pod_name = Some(pod::pod_name(&scenario.spec.scenario_uuid));
            status.queue_position = None;
        }
    }
    Ok(status)
}

/// Words for why a worker Pod failed, from its container's last state.
fn pod_failure(pod: &Pod) -> String {
    let terminated = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    match terminated {
        Some(t) => format!(
            "worker exited with code {}{}",
            t.exit_code,
            t.reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ),
        None => "worker Pod failed".to_string(),
    }
}

fn phase_reason(phase: Phase) -> (&'static str, &'static str) {
    match phase {
        Phase::Queued => (
            "WaitingForSlot",
            "all MAX_WORKERS slots are taken; waiting in FIFO order",
        ),
        Phase::Starting => ("PodCreated", "worker Pod created; waiting for it to run"),
        Phase::Running => ("PodRunning", "worker is running"),
        Phase::Succeeded => ("WorkerSucceeded", "worker finished"),
        Phase::Failed => ("WorkerFailed", "worker failed"),
        Phase::Stopped => ("Undeployed", "stopped by to_undeploy"),
    }
}

fn with_condition(mut status: ScenarioStatus, generation: Option<i64>) -> ScenarioStatus {
    let Some(phase) = status.phase else {
        return status;
    };
    let (reason, message) = phase_reason(phase);
    let ready = if phase == Phase::Running {
        "True"
    } else {
        "False"
    };
    let unchanged = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == ready && c.reason == reason);
    if !unchanged {
        status.conditions.retain(|c| c.type_ != "Ready");
        status.conditions.push(ScenarioCondition {
            type_: "Ready".into(),
            status: ready.into(),
            reason: reason.into(),
            message: status.last_error.clone().unwrap_or_else(|| message.into()),
            last_transition_time: Utc::now(),
            observed_generation: generation,
        });
    } else if let Some(c) = status.conditions.iter_mut().find(|c| c.type_ == "Ready") {
        c.observed_generation = generation;
    }
    status
}

pub async fn reconcile(
    scenario: Arc<Scenario>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let result = reconcile_inner(&scenario, &ctx).await;
    ctx.metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    let label = if result.is_ok() { "ok" } else { "error" };
    if result.is_ok() {
        ctx.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&scenario.name_any());
    }
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabels { result: label })
        .inc();
    result
}

#[tracing::instrument(skip_all, fields(scenario = %scenario.name_any()))]
async fn reconcile_inner(scenario: &Scenario, ctx: &Context) -> Result<Action, ReconcileError> {
    let namespace = scenario.namespace().ok_or(ReconcileError::NoNamespace)?;
    if scenario.metadata.deletion_timestamp.is_some() {
        // Its Pod goes with it (ownerReference); the slot frees when it is gone.
        return Ok(Action::await_change());
    }
    let status = desired_status(scenario, ctx).await?;
    let status = with_condition(status, scenario.metadata.generation);
    let old_phase = current_phase(scenario);
    if scenario.status.as_ref() != Some(&status) {
        let api: Api<Scenario> = Api::namespaced(ctx.client.clone(), &namespace);
        api.patch_status(
            &scenario.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .map_err(kube_err("writing Scenario status"))?;
    }
    if let Some(phase) = status.phase
        && old_phase != Some(phase)
    {
        on_phase_change(scenario, phase, &status, ctx).await;
    }
    Ok(match status.phase {
        Some(Phase::Queued) => Action::requeue(Duration::from_secs(5)),
        Some(p) if p.is_terminal() => Action::await_change(),
        Some(Phase::Starting) => Action::requeue(Duration::from_secs(10)),
        _ => Action::requeue(Duration::from_secs(300)),
    })
}

async fn on_phase_change(
    scenario: &Scenario,
    phase: Phase,
    status: &ScenarioStatus,
    ctx: &Context,
) {
    let (reason, message) = phase_reason(phase);
    ctx.metrics
        .phase_changes
        .get_or_create(&PhaseLabels {
            phase: phase.as_str(),
        })
        .inc();
    tracing::info!(scenario = %scenario.spec.scenario_uuid, phase = phase.as_str(), reason, "phase changed");
    let note = status
        .last_error
        .clone()
        .unwrap_or_else(|| message.to_string());
    let event = Event {
        type_: if phase == Phase::Failed {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note.clone()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx
        .recorder
        .publish(&event, &scenario.object_ref(&()))
        .await
    {
        tracing::warn!(error = %e, "cannot record a Kubernetes Event");
    }
    ctx.phases
        .publish(&scenario.spec.scenario_uuid, phase, reason, &note)
        .await;
}

/// Exponential backoff per object: 0.5 s doubling up to 5 min (with jitter),
/// reset by the next successful reconcile.
pub fn error_policy(scenario: Arc<Scenario>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let failures = {
        let mut map = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let count = map.entry(scenario.name_any()).or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    let delay = Backoff::new(Duration::from_millis(500), Duration::from_secs(300))
        .delay(failures - 1, rand::random::<f64>());
    ctx.metrics
        .reconcile_errors
        .get_or_create(&CategoryLabels {
            category: error.category(),
        })
        .inc();
    tracing::warn!(scenario = %scenario.name_any(), error = %error, failures, retry_in_ms = delay.as_millis() as u64, "reconcile failed; retrying");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(phase: &str, restarts: i32) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "status": {"phase": phase, "containerStatuses": [{
                "name": "worker", "image": "i", "imageID": "", "ready": true,
                "restartCount": restarts
            }]}
        }))
        .unwrap()
    }

    #[test]
    fn pod_phase_maps_to_scenario_phase() {
        assert_eq!(phase_from_pod(&pod("Pending", 0)), (Phase::Starting, 0));
        assert_eq!(phase_from_pod(&pod("Running", 2)), (Phase::Running, 2));
        assert_eq!(phase_from_pod(&pod("Succeeded", 0)).0, Phase::Succeeded);
        assert_eq!(phase_from_pod(&pod("Failed", 5)), (Phase::Failed, 5));
        assert!(holds_slot(&pod("Running", 0)));
        assert!(!holds_slot(&pod("Succeeded", 0)));
    }

    #[test]
    fn condition_follows_the_phase() {
        let s = with_condition(
            ScenarioStatus {
                phase: Some(Phase::Running),
                ..Default::default()
            },
            Some(3),
        );
        let c = &s.conditions[0];
        assert_eq!(
            (c.type_.as_str(), c.status.as_str(), c.observed_generation),
            ("Ready", "True", Some(3))
        );
        let again = with_condition(s.clone(), Some(3));
        assert_eq!(again, s, "an unchanged phase keeps its transition time");
    }
}
