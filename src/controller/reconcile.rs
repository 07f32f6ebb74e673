//! Scenario → worker Pod: the thin I/O layer around [`plan`].
//!
//! Each reconcile handles its own Scenario: it reads the Scenario's Pod from
//! the shared Pod cache, asks admission for a slot when it needs one, lets the
//! pure [`plan`] decide, writes the status it decided (a merge patch that
//! also clears what is no longer set, guarded by the resourceVersion the plan
//! was made from) and only then carries out the steps.
//!
//! How MAX_WORKERS stays race-free: only the Lease holder reconciles, and
//! within it the admission answer and the Pod creation happen inside one
//! critical section (the `Admission` mutex). The live count is the Pods in
//! the cache that may still run (every Pod not Succeeded/Failed, also one
//! being deleted) plus the Pods this process created that the cache has not
//! shown yet ("pending"), so a lagging cache can never make room that is not
//! there. Likewise a run this process saw end (a clip that ended, a worker
//! that failed or was given up) stops waiting at once ("ended"), though the
//! Scenario cache may show it wanting a worker a moment longer: the slot it
//! frees goes to the next in line, not back to it. The pure
//! `admission::decide` picks who starts. After a restart the Pod cache is
//! complete before the first reconcile, and the deterministic Pod name turns
//! a repeated creation into a harmless "already exists".
//!
//! The queue is event-driven: a Queued Scenario is served from the caches and
//! looked at again when something frees a slot (a Pod ends or disappears, a
//! Scenario stops or finishes): then [`wake_queue`] wakes just the Scenarios
//! that may start. (A five-minute look-again is only a safety net; with
//! nothing changed it makes no API call.)

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::{Mutex, Notify};

use super::admission::{self, Waiting};
use super::crd::{Phase, Scenario, ScenarioStatus};
use super::events::PhasePublisher;
use super::fencing;
use super::leader::Leadership;
use super::metrics::{CategoryLabels, ControllerMetrics, PhaseLabels, ResultLabels};
use super::names::{self, FIELD_MANAGER};
use super::plan::{self, Plan, Rules, Slot, Step, enqueued_at, wants_worker};
use super::pod::{self, WorkerTemplate};
use super::refusal::{self, Refusal};
use crate::backoff::Backoff;

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
    #[error("the Pod cache stopped")]
    PodCacheGone,
    #[error("leadership lapsed (no Lease renewal within the renew deadline); not acting")]
    NotLeader,
}

impl ReconcileError {
    /// Whether the fencing policy refused a write: this replica no longer
    /// holds the leader Lease.
    pub fn is_fenced(&self) -> bool {
        matches!(self, ReconcileError::Kube { source, .. } if refusal::classify(source) == Refusal::Fenced)
    }

    /// A low-cardinality label for metrics.
    pub fn category(&self) -> &'static str {
        if self.is_fenced() {
            return "fenced";
        }
        match self {
            ReconcileError::Kube {
                source: kube::Error::Api(e),
                ..
            } => match e.code {
                409 => "conflict",
                404 => "not_found",
                403 => "forbidden",
                c if c >= 500 => "server",
                _ => "rejected",
            },
            ReconcileError::Kube { .. } => "unreachable",
            ReconcileError::NoNamespace => "invalid",
            ReconcileError::PodCacheGone => "cache",
            ReconcileError::NotLeader => "not_leader",
        }
    }
}

/// The API server's own words for a refusal.
fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(e) => e.message.clone(),
        e => e.to_string(),
    }
}

fn kube_err(action: &'static str) -> impl FnOnce(kube::Error) -> ReconcileError {
    move |source| ReconcileError::Kube { action, source }
}

/// How long a worker Pod a ResourceQuota refused waits before it is tried
/// again (a Pod that ends frees quota sooner: that event reconciles too).
const QUOTA_RETRY: Duration = Duration::from_secs(30);

/// What this process did that its caches may not show yet.
#[derive(Default)]
pub struct Admission {
    /// Pods created and not yet seen in the Pod cache.
    pending: HashMap<String, Instant>,
    /// Scenarios (by name) whose run (the value) this process saw end, while
    /// the Scenario cache may still show it wanting a worker: a worker whose
    /// clip ended or that failed leaves a slot that must go to the next in
    /// line, not back to it.
    ended: HashMap<String, u32>,
}

impl Admission {
    /// Notes that `scenario` no longer wants a worker once its status is
    /// `status`, if so.
    fn note_end(&mut self, scenario: &Scenario, status: &ScenarioStatus) {
        let mut after = scenario.clone();
        after.status = Some(status.clone());
        if !wants_worker(&after) {
            self.ended.insert(scenario.name_any(), scenario.spec.run);
        }
    }

    /// Forgets an end noted for `scenario`'s run whose status write did not
    /// land.
    fn forget_end(&mut self, scenario: &Scenario) {
        let name = scenario.name_any();
        if self.ended.get(&name) == Some(&scenario.spec.run) {
            self.ended.remove(&name);
        }
    }
}

pub struct Context {
    pub client: Client,
    pub namespace: String,
    pub template: WorkerTemplate,
    pub max_workers: usize,
    pub rules: Rules,
    pub pods: Store<Pod>,
    pub scenarios: Store<Scenario>,
    pub admission: Mutex<Admission>,
    /// Reconciles a Scenario now (the controller's `reconcile_on` stream).
    pub wake: UnboundedSender<ObjectRef<Scenario>>,
    /// Signals that a slot may have freed ([`wake_queue`] runs on it).
    pub queue_changed: Arc<Notify>,
    /// Whether this replica may still act (its Lease is fresh).
    pub leadership: Leadership,
    pub recorder: Recorder,
    pub metrics: Arc<ControllerMetrics>,
    /// The cluster's own addresses as last learned, for new worker Pods
    /// (running ones keep the list they started with).
    pub cluster: tokio::sync::watch::Receiver<Vec<crate::host_policy::ClusterAddress>>,
    pub phases: PhasePublisher,
    /// Consecutive reconcile failures per Scenario, for exponential backoff.
    pub failures: std::sync::Mutex<HashMap<String, u32>>,
    /// The workers' newest heartbeats, folded into the status written.
    pub health: Arc<super::health::Health>,
    /// Each reconcile is a step of liveness (/healthz).
    pub watchdog: Arc<crate::watchdog::Watchdog>,
}

/// How long a created Pod counts as live without showing up in the cache.
const PENDING_GRACE: Duration = Duration::from_secs(60);

/// How soon a reconcile whose status write met a newer Scenario plans again
/// (the watch brings the newer one within milliseconds).
const STATUS_CONFLICT_RETRY: Duration = Duration::from_millis(500);

/// The Scenario's own worker Pod from the cache (only one it controls; not a
/// leftover of a deleted Scenario of the same name).
fn pod_of(ctx: &Context, scenario: &Scenario) -> Option<Arc<Pod>> {
    let name = names::pod_name(&scenario.spec.scenario_uuid);
    let pod = ctx
        .pods
        .get(&ObjectRef::new(&name).within(&ctx.namespace))?;
    let uid = scenario.metadata.uid.as_deref();
    let owned = pod
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid);
    owned.then_some(pod)
}

/// The admission decision over the whole cache, with the live count.
fn decide(ctx: &Context, adm: &mut Admission) -> (admission::Decision<String>, usize) {
    let cached = ctx.pods.state();
    let cached_names: HashSet<String> = cached.iter().map(|p| p.name_any()).collect();
    adm.pending
        .retain(|name, at| !cached_names.contains(name) && at.elapsed() < PENDING_GRACE);
    let holding: HashSet<String> = cached
        .iter()
        .filter(|p| plan::holds_slot(p))
        .map(|p| p.name_any())
        .collect();
    let live = holding.len() + adm.pending.len();
    // An end noted here counts until the cache shows it (or a new run).
    let scenarios = ctx.scenarios.state();
    adm.ended.retain(|name, run| {
        scenarios
            .iter()
            .any(|s| s.name_any() == *name && s.spec.run == *run && wants_worker(s))
    });
    // A Scenario whose ended Pod is still being replaced waits too, in its
    // place: the slot it frees is not handed to a younger one meanwhile.
    let waiting: Vec<Waiting<String>> = scenarios
        .iter()
        .filter(|s| s.namespace().as_deref() == Some(ctx.namespace.as_str()))
        .filter(|s| wants_worker(s))
        .filter(|s| adm.ended.get(&s.name_any()) != Some(&s.spec.run))
        .filter(|s| {
            let name = names::pod_name(&s.spec.scenario_uuid);
            !holding.contains(&name) && !adm.pending.contains_key(&name)
        })
        .map(|s| Waiting {
            key: s.name_any(),
            created: enqueued_at(s),
        })
        .collect();
    let decision = admission::decide(waiting, live, ctx.max_workers);
    ctx.metrics.queue_length.set(decision.queued.len() as i64);
    ctx.metrics.live_workers.set(live as i64);
    (decision, live)
}

/// Wakes the Scenarios that may start now (at most the free slots).
pub async fn wake_queue(ctx: &Context) {
    let _step = ctx.watchdog.step("waking the queue");
    let mut adm = ctx.admission.lock().await;
    let (decision, _) = decide(ctx, &mut adm);
    for name in decision.start {
        let _ = ctx
            .wake
            .unbounded_send(ObjectRef::new(&name).within(&ctx.namespace));
    }
}

/// A JSON merge patch that turns `old` into `new`: fields no longer set are
/// sent as `null`, so they are really cleared.
pub fn status_patch(old: Option<&ScenarioStatus>, new: &ScenarioStatus) -> Value {
    let mut patch = serde_json::to_value(new).unwrap_or_else(|_| json!({}));
    if let (Some(old), Some(fields)) = (
        old.and_then(|o| serde_json::to_value(o).ok()),
        patch.as_object_mut(),
    ) && let Some(old_fields) = old.as_object()
    {
        for key in old_fields.keys() {
            fields.entry(key.clone()).or_insert(Value::Null);
        }
    }
    json!({ "status": patch })
}

pub async fn reconcile(
    scenario: Arc<Scenario>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let step = ctx.watchdog.step("a reconcile");
    let result = reconcile_inner(&scenario, &ctx).await;
    drop(step);
    ctx.metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = &result
        && e.is_fenced()
    {
        ctx.metrics.fenced_writes.inc();
        tracing::warn!(scenario = %scenario.name_any(), error = %e, "a write was refused as not the current leader's (fenced): this replica lost the Lease, or the policy has not seen its take-over yet");
    }
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
    if !ctx.leadership.holds() {
        return Err(ReconcileError::NotLeader);
    }
    ctx.pods
        .wait_until_ready()
        .await
        .map_err(|_| ReconcileError::PodCacheGone)?;
    if scenario.metadata.deletion_timestamp.is_some() {
        // Its Pod goes with it (ownerReference); the slot frees when it is gone.
        return Ok(Action::await_change());
    }
    let pod = pod_of(ctx, scenario);
    if let Some(pod) = &pod {
        // The cache shows it now: it no longer needs counting as pending
        // (and must not be once it is gone).
        ctx.admission.lock().await.pending.remove(&pod.name_any());
    }
    let (plan, reserved) = if pod.is_none() && wants_worker(scenario) {
        // Admission, and the slot reserved (as a pending Pod) in one
        // critical section; the Pod is created outside it, so that one slow
        // API call holds up no other admission.
        let mut adm = ctx.admission.lock().await;
        let me = scenario.name_any();
        if adm.ended.get(&me) == Some(&scenario.spec.run) {
            // This run ended and the cache does not show it yet: the
            // status change brings it back here.
            return Ok(Action::await_change());
        }
        let (decision, _) = decide(ctx, &mut adm);
        let slot = if decision.start.contains(&me) {
            Slot::Free
        } else {
            Slot::Full
        };
        let plan = plan::plan(scenario, None, slot, ctx.rules, Utc::now());
        let reserved = plan.steps.contains(&Step::CreatePod).then(|| {
            let name = names::pod_name(&scenario.spec.scenario_uuid);
            adm.pending.insert(name.clone(), Instant::now());
            name
        });
        if reserved.is_none() {
            adm.note_end(scenario, &plan.status);
        }
        (plan, reserved)
    } else {
        let plan = plan::plan(scenario, pod.as_deref(), Slot::Full, ctx.rules, Utc::now());
        // Noted before its Pod goes, so that the slot it frees goes to the next in line.
        ctx.admission.lock().await.note_end(scenario, &plan.status);
        (plan, None)
    };

    // The newest heartbeat goes into the status: free when the status is
    // written anyway, otherwise within STREAM_STATUS_WRITES a second.
    let mut plan = plan;
    let mut folded = plan.status.clone();
    ctx.health.fold_into(&mut folded, scenario, Utc::now());
    let written_anyway = scenario.status.as_ref() != Some(&plan.status);
    if folded != plan.status && (written_anyway || ctx.health.take_write()) {
        plan.status = folded;
    }

    // The verdict first: the status the plan decided is written, guarded by
    // the resourceVersion the plan was made from, before the Pod it implies
    // is created or deleted. A write that fails, or finds the Scenario
    // changed since it was read (an undeploy the cache has not shown yet),
    // acts on nothing: the next reconcile plans again from what the cluster
    // holds, so a verdict is never lost after its act, and a stale copy
    // starts no worker.
    let old_phase = scenario.status.as_ref().and_then(|s| s.phase);
    let mut on_record = Record {
        status: scenario.status.clone(),
        version: scenario.resource_version(),
    };
    if let Some(name) = reserved {
        let before = plan::before_create(on_record.status.as_ref(), &plan.status);
        let written = write_status(ctx, scenario, &mut on_record, before).await;
        let created = match written {
            Ok(true) => create_pod(ctx, scenario, plan).await.map(Some),
            Ok(false) => Ok(None),
            Err(e) => Err(e),
        };
        let mut adm = ctx.admission.lock().await;
        plan = match created {
            Ok(Some(plan)) if plan.steps.contains(&Step::CreatePod) => {
                // The gauges count the new Pod now, not only at the next
                // decision (after the last Pod of a burst there may be none
                // for a long time).
                let _ = decide(ctx, &mut adm);
                plan
            }
            created => {
                // Not created: the reserved slot is free again.
                adm.pending.remove(&name);
                match created? {
                    Some(plan) => plan,
                    None => return Ok(Action::requeue(STATUS_CONFLICT_RETRY)),
                }
            }
        };
        // A Pod refused for good ends the run before the queue moves on.
        adm.note_end(scenario, &plan.status);
    }
    if on_record.status.as_ref() != Some(&plan.status) {
        let landed = write_status(ctx, scenario, &mut on_record, plan.status.clone()).await;
        if !matches!(landed, Ok(true)) {
            // An end noted above is not on record: it is decided again.
            ctx.admission.lock().await.forget_end(scenario);
            landed?;
            return Ok(Action::requeue(STATUS_CONFLICT_RETRY));
        }
    }

    let mut slot_freed = false;
    for step in &plan.steps {
        match step {
            Step::CreatePod => {} // done above, after the verdict was written
            Step::DeletePod { uid } => {
                delete_pod(ctx, scenario, uid).await?;
                slot_freed = true;
            }
            Step::DeleteScenario => {
                let api: Api<Scenario> = Api::namespaced(ctx.client.clone(), &namespace);
                // Foreground: the Scenario goes only after its Pods and
                // camera Secrets, so a new Scenario of the same uuid never
                // meets a Secret left from this one.
                let params = DeleteParams {
                    preconditions: scenario.uid().map(|uid| Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    propagation_policy: Some(PropagationPolicy::Foreground),
                    ..Default::default()
                };
                match api.delete(&scenario.name_any(), &params).await {
                    Ok(_) => tracing::info!("finished Scenario removed after its TTL"),
                    Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => {}
                    Err(e) => return Err(kube_err("deleting a finished Scenario")(e)),
                }
                ctx.metrics.scenarios_expired.inc();
                return Ok(Action::await_change());
            }
        }
    }

    let new_phase = plan.status.phase;
    // The next in line is woken first: handing the slot on waits for
    // nothing else, least of all for the Kubernetes Event and the Kafka
    // phase event below (a slow broker holds those up to their timeouts).
    if slot_freed
        || (old_phase.is_some_and(Phase::is_live) && !new_phase.is_some_and(Phase::is_live))
    {
        ctx.queue_changed.notify_one();
    }
    if let Some(phase) = new_phase
        && old_phase != Some(phase)
    {
        on_phase_change(scenario, phase, &plan.status, ctx).await;
    }
    Ok(match plan.requeue {
        Some(after) => Action::requeue(after),
        None => Action::await_change(),
    })
}

/// The Scenario's status as this reconcile last read or wrote it, with the
/// resourceVersion that goes with it.
struct Record {
    status: Option<ScenarioStatus>,
    version: Option<String>,
}

/// Writes `status` as the Scenario's status, guarded by the resourceVersion
/// on record, and records the result; `false` when the Scenario changed
/// since (nothing was written). A status equal to the one on record is
/// written too: the write then only checks that the Scenario is unchanged.
async fn write_status(
    ctx: &Context,
    scenario: &Scenario,
    on_record: &mut Record,
    status: ScenarioStatus,
) -> Result<bool, ReconcileError> {
    let changed = on_record.status.as_ref() != Some(&status);
    let namespace = scenario
        .namespace()
        .unwrap_or_else(|| ctx.namespace.clone());
    let api: Api<Scenario> = Api::namespaced(ctx.client.clone(), &namespace);
    // Every status write names its writer, for the fencing policy.
    let mut written = status.clone();
    written.writer = ctx.leadership.stamp().map(str::to_string);
    let mut patch = status_patch(on_record.status.as_ref(), &written);
    if let Some(version) = &on_record.version {
        patch["metadata"] = json!({ "resourceVersion": version });
    }
    match api
        .patch_status(
            &scenario.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
    {
        Ok(now) => {
            on_record.version = now.resource_version();
            on_record.status = Some(status);
            if changed {
                ctx.metrics.status_writes.inc();
            }
            Ok(true)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            ctx.metrics.status_conflicts.inc();
            tracing::debug!("the Scenario changed since it was read; planning again");
            Ok(false)
        }
        Err(e) => Err(kube_err("writing Scenario status")(e)),
    }
}

/// Creates the worker Pod `plan` asks for; a refusal for good turns the
/// plan into its verdict (no Pod), anything else worth retrying is an error.
async fn create_pod(
    ctx: &Context,
    scenario: &Scenario,
    mut plan: Plan,
) -> Result<Plan, ReconcileError> {
    if !ctx.leadership.holds() {
        return Err(ReconcileError::NotLeader);
    }
    let mut pod = {
        let learned = ctx.cluster.borrow();
        pod::build_learned(scenario, &ctx.template, &learned)
    };
    fencing::stamp_meta(&mut pod.metadata, ctx.leadership.stamp());
    let pod_name = pod.name_any();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    tracing::debug!(pod = %pod_name, "creating the worker Pod");
    match pods.create(&params, &pod).await {
        Ok(_) => {
            ctx.metrics.pods_created.inc();
            tracing::info!(pod = %pod_name, "worker Pod created");
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => {
            let refused = refusal::classify(&e);
            let category = match refused {
                Refusal::Invalid => "pod_rejected",
                Refusal::Quota => "quota_exceeded",
                Refusal::Unauthorized | Refusal::Fenced | Refusal::Retry => {
                    return Err(kube_err("creating a worker Pod")(e));
                }
            };
            ctx.metrics
                .reconcile_errors
                .get_or_create(&CategoryLabels { category })
                .inc();
            let (reason, generation) = (api_message(&e), scenario.metadata.generation);
            plan.steps.clear();
            if refused == Refusal::Quota {
                tracing::warn!(pod = %pod_name, error = %reason, "a ResourceQuota refused the worker Pod; the Scenario stays queued and is tried again");
                plan.status = plan::quota_wait(plan.status, &reason, generation, Utc::now());
                plan.requeue = Some(QUOTA_RETRY);
            } else {
                tracing::warn!(pod = %pod_name, error = %reason, "the worker Pod was refused; the Scenario fails and the queue goes on");
                plan.status = plan::pod_rejected(plan.status, &reason, generation, Utc::now());
                plan.requeue = None;
                ctx.queue_changed.notify_one();
            }
            return Ok(plan);
        }
    }
    Ok(plan)
}

async fn delete_pod(ctx: &Context, scenario: &Scenario, uid: &str) -> Result<(), ReconcileError> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match pods
        .delete(&names::pod_name(&scenario.spec.scenario_uuid), &params)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => Ok(()),
        Err(e) => Err(kube_err("deleting a worker Pod")(e)),
    }
}

async fn on_phase_change(
    scenario: &Scenario,
    phase: Phase,
    status: &ScenarioStatus,
    ctx: &Context,
) {
    let (reason, message) = status
        .condition(plan::READY)
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_else(|| (phase.as_str().to_string(), String::new()));
    ctx.metrics
        .phase_changes
        .get_or_create(&PhaseLabels {
            phase: phase.as_str(),
        })
        .inc();
    tracing::info!(scenario = %scenario.spec.scenario_uuid, phase = phase.as_str(), reason, "phase changed");
    let event = Event {
        type_: if phase == Phase::Failed {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.clone(),
        note: Some(message.clone()),
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
        .publish(&scenario.spec.scenario_uuid, phase, &reason, &message)
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

    #[test]
    fn a_status_patch_clears_what_is_no_longer_set() {
        let old = ScenarioStatus {
            phase: Some(Phase::Queued),
            last_error: Some("boom".into()),
            ..Default::default()
        };
        let new = ScenarioStatus {
            phase: Some(Phase::Running),
            ..Default::default()
        };
        let patch = status_patch(Some(&old), &new);
        assert_eq!(patch["status"]["phase"], "Running");
        assert!(patch["status"]["lastError"].is_null());
        assert!(
            patch["status"]
                .as_object()
                .unwrap()
                .contains_key("lastError")
        );
    }
}
