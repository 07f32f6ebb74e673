//! What one Scenario needs now, decided from what is observed.
//!
//! [`plan`] is a pure function of the Scenario, its worker Pod (if any) and
//! the admission's answer for it ([`Slot`]); it returns the steps to carry out
//! and the status the Scenario should have. The reconciler
//! ([`super::reconcile`]) is the thin layer that reads the caches, asks
//! admission, calls this, and carries the steps out.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::ResourceExt;

use super::crd::{Phase, Scenario, ScenarioCondition, ScenarioStatus};
use super::names;
use crate::scenario::restart::{self, AfterExit, Exit};

/// Condition types.
pub const READY: &str = "Ready";
pub const ADMITTED: &str = "Admitted";

/// Whether admission lets this Scenario start a worker now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// A slot is free for it (it is at the head of the queue).
    Free,
    /// Every slot is taken, or older Scenarios wait before it.
    Full,
}

/// The runner's settings that decisions depend on.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Restarts of one run's worker before the Scenario fails.
    pub restart_limit: u32,
    /// How long a finished Scenario (and its Pod) is kept; `None`: for ever.
    pub finished_ttl: Option<Duration>,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create the worker Pod of the current run.
    CreatePod,
    /// Delete the worker Pod with this uid (stopped, of an older run, evicted,
    /// given up, or ended and to be started again).
    DeletePod { uid: String },
    /// Delete the Scenario: it finished longer than the TTL ago.
    DeleteScenario,
}

/// What to do and the status to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub status: ScenarioStatus,
    /// When to look again without any event; `None`: only on a change.
    pub requeue: Option<Duration>,
}

/// The worker Pod as the Scenario sees it.
#[derive(Debug, Clone, PartialEq)]
enum Worker {
    /// Not running yet; `waiting` is the container's waiting reason and message.
    Pending {
        waiting: Option<(String, String)>,
    },
    /// Running; `crash` is set while the container is not running (between
    /// restarts), with a reason and words.
    Running {
        ready: bool,
        restarts: i32,
        crash: Option<(String, String)>,
    },
    /// Exited 0, not being deleted: the source ended (a Pod being deleted
    /// that ended is `Disrupted`, whatever its exit code).
    Succeeded,
    Failed {
        error: String,
    },
    /// Refused or evicted by its node (kubelet admission: `OutOfcpu`,
    /// `NodeAffinity`, `UnexpectedAdmissionError`, …; node-pressure eviction):
    /// replaced, and counted against the restart budget, since the next Pod
    /// may meet the same fate.
    Refused {
        reason: String,
        message: String,
    },
    /// Ended by the cluster, not by the worker (node shutdown, preempted,
    /// deleted, evicted through the API by a drain): replace it.
    Disrupted {
        reason: String,
        message: String,
    },
    /// Being deleted, or marked for disruption: it may still run, so it keeps
    /// its slot until it is gone.
    Terminating {
        reason: String,
        message: String,
    },
}

/// Pod `status.reason` values with which the cluster, not the worker, ended a Pod.
const DISRUPTION_REASONS: &[&str] = &[
    "Shutdown",
    "NodeShutdown",
    "Terminated",
    "NodeLost",
    "Preempting",
];

/// Pod `status.reason` values with which the node refused a Pod at admission
/// or evicted it under pressure: `OutOf<resource>` and these.
const NODE_REFUSALS: &[&str] = &[
    "Evicted",
    "NodeAffinity",
    "NodeSelectorMismatching",
    "UnexpectedAdmissionError",
    "PodOSNotSupported",
];

fn refused_by_node(reason: &str) -> bool {
    reason.starts_with("OutOf") || NODE_REFUSALS.contains(&reason)
}

/// Container waiting reasons that are errors worth showing in lastError.
const WAITING_ERRORS: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// When a Scenario joined the queue: the ingest annotation, else its creation time.
pub fn enqueued_at(s: &Scenario) -> chrono::DateTime<Utc> {
    s.annotations()
        .get(names::ANNOTATION_ENQUEUED_AT)
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

/// True when a Scenario wants a worker for its current run: not deleted, not
/// stopped, and its run not over.
pub fn wants_worker(s: &Scenario) -> bool {
    let over = s.status.as_ref().is_some_and(|st| {
        st.observed_run == s.spec.run
            && st
                .phase
                .is_some_and(|p| matches!(p, Phase::Succeeded | Phase::Failed))
    });
    s.metadata.deletion_timestamp.is_none() && !s.spec.is_stopped() && !over
}

/// Whether `scenario`'s source ends on its own, as ingest recorded it; the
/// redacted URL decides for Scenarios written before ingest recorded it.
pub fn finite_source(scenario: &Scenario) -> bool {
    match scenario
        .annotations()
        .get(names::ANNOTATION_SOURCE)
        .map(String::as_str)
    {
        Some("clip") => true,
        Some("live") => false,
        _ => crate::scenario::source::is_finite(&scenario.spec.camera_url),
    }
}

/// The run a Pod belongs to (its `runner.vap.io/run` label; 0 when absent).
pub fn pod_run(pod: &Pod) -> u32 {
    pod.labels()
        .get(names::LABEL_RUN)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// True while a Pod may still run a worker, so it counts against MAX_WORKERS:
/// every Pod not Succeeded or Failed, including one being deleted.
pub fn holds_slot(pod: &Pod) -> bool {
    !matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn worker_container(pod: &Pod) -> Option<&ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == names::WORKER_CONTAINER)
}

fn exit_words(code: i32, reason: Option<&str>) -> String {
    match reason {
        Some(r) => format!("worker exited with code {code} ({r})"),
        None => format!("worker exited with code {code}"),
    }
}

fn observe(pod: &Pod) -> Worker {
    let status = pod.status.clone().unwrap_or_default();
    let disruption = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True");
    let phase = status.phase.as_deref().unwrap_or("Pending");
    let reason = status.reason.clone().unwrap_or_default();
    let message = status.message.clone().unwrap_or_default();
    let container = worker_container(pod);
    if phase == "Failed" && refused_by_node(&reason) {
        return Worker::Refused { reason, message };
    }
    if phase == "Failed" && (disruption.is_some() || DISRUPTION_REASONS.contains(&reason.as_str()))
    {
        let (reason, message) = match disruption {
            Some(c) if reason.is_empty() => (
                c.reason
                    .clone()
                    .unwrap_or_else(|| "DisruptionTarget".into()),
                c.message.clone().unwrap_or_default(),
            ),
            _ => (reason, message),
        };
        return Worker::Disrupted { reason, message };
    }
    if pod.metadata.deletion_timestamp.is_some() && matches!(phase, "Succeeded" | "Failed") {
        // The kubelet (1.27 and later) writes a terminal phase on a Pod being
        // deleted before it goes: a worker stopped by SIGTERM exits 143, or 1
        // when it could not deliver its last results, and one killed after
        // the grace period 137. The deletion ended it, not the end of its
        // source or a fault: replaced, and no restart is counted.
        let words = container
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.as_ref())
            .map(|t| exit_words(t.exit_code, t.reason.as_deref()))
            .unwrap_or_else(|| "worker Pod failed".to_string());
        return Worker::Disrupted {
            reason: "PodDeleted".into(),
            message: format!("the worker Pod was deleted before its source ended ({words})"),
        };
    }
    if pod.metadata.deletion_timestamp.is_some() && !matches!(phase, "Succeeded" | "Failed") {
        return Worker::Terminating {
            reason: "PodTerminating".into(),
            message: "the worker Pod is being deleted".into(),
        };
    }
    if let Some(c) = disruption
        && !matches!(phase, "Succeeded" | "Failed")
    {
        return Worker::Terminating {
            reason: c
                .reason
                .clone()
                .unwrap_or_else(|| "DisruptionTarget".into()),
            message: c.message.clone().unwrap_or_default(),
        };
    }
    match phase {
        "Succeeded" => Worker::Succeeded,
        "Failed" => {
            let terminated = container
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.terminated.as_ref());
            let error = match terminated {
                Some(t) => exit_words(t.exit_code, t.reason.as_deref()),
                None if !message.is_empty() => format!("worker Pod failed: {message}"),
                None => "worker Pod failed".to_string(),
            };
            Worker::Failed { error }
        }
        "Running" => {
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let restarts = container.map(|c| c.restart_count).unwrap_or(0);
            let state = container.and_then(|c| c.state.as_ref());
            let running = state.is_none_or(|s| s.running.is_some());
            let crash = (!running).then(|| {
                let last = container
                    .and_then(|c| c.last_state.as_ref())
                    .and_then(|s| s.terminated.as_ref())
                    .or_else(|| state.and_then(|s| s.terminated.as_ref()));
                let reason = state
                    .and_then(|s| s.waiting.as_ref())
                    .and_then(|w| w.reason.clone())
                    .or_else(|| last.and_then(|t| t.reason.clone()))
                    .unwrap_or_else(|| "WorkerExited".into());
                let words = match last {
                    Some(t) => exit_words(t.exit_code, t.reason.as_deref()),
                    None => "worker is not running".to_string(),
                };
                (reason, words)
            });
            Worker::Running {
                ready,
                restarts,
                crash,
            }
        }
        _ => {
            let waiting = container
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| Some((w.reason.clone()?, w.message.clone().unwrap_or_default())));
            Worker::Pending { waiting }
        }
    }
}

/// Sets a condition; its transition time moves only when its status changes.
pub(crate) fn set_condition(
    status: &mut ScenarioStatus,
    type_: &str,
    value: bool,
    reason: &str,
    message: &str,
    now: DateTime<Utc>,
    generation: Option<i64>,
) {
    let value = if value { "True" } else { "False" };
    let since = status
        .condition(type_)
        .filter(|c| c.status == value)
        .map(|c| c.last_transition_time)
        .unwrap_or(now);
    status.conditions.retain(|c| c.type_ != type_);
    status.conditions.push(ScenarioCondition {
        type_: type_.into(),
        status: value.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: since,
        observed_generation: generation,
    });
    status.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}

/// Builds the status step by step.
struct Draft {
    status: ScenarioStatus,
    steps: Vec<Step>,
    now: DateTime<Utc>,
    generation: Option<i64>,
    /// Look again at this time (a delay runs out), sooner than the safety net.
    wake_at: Option<DateTime<Utc>>,
}

impl Draft {
    fn phase(&mut self, phase: Phase) {
        self.status.phase = Some(phase);
        if phase.is_terminal() {
            self.status.finish_time.get_or_insert(self.now);
        } else {
            self.status.finish_time = None;
        }
        if phase.is_live() {
            self.status.start_time.get_or_insert(self.now);
        }
    }

    fn ready(&mut self, ready: bool, reason: &str, message: &str) {
        let (now, generation) = (self.now, self.generation);
        set_condition(
            &mut self.status,
            READY,
            ready,
            reason,
            message,
            now,
            generation,
        );
    }

    fn admitted(&mut self, admitted: bool, reason: &str, message: &str) {
        let (now, generation) = (self.now, self.generation);
        set_condition(
            &mut self.status,
            ADMITTED,
            admitted,
            reason,
            message,
            now,
            generation,
        );
    }

    fn delete(&mut self, pod: &Pod) {
        if pod.metadata.deletion_timestamp.is_none()
            && let Some(uid) = pod.uid()
        {
            self.steps.push(Step::DeletePod { uid });
        }
    }
}

/// Decides what `scenario` needs, given its worker Pod (owned by it, if any),
/// the admission's answer and the time now.
pub fn plan(
    scenario: &Scenario,
    pod: Option<&Pod>,
    slot: Slot,
    rules: Rules,
    now: DateTime<Utc>,
) -> Plan {
    let spec = &scenario.spec;
    let old = scenario.status.clone().unwrap_or_default();
    // A new run starts from a clean status (the conditions keep their history).
    let mut status = if old.observed_run == spec.run {
        old.clone()
    } else {
        ScenarioStatus {
            conditions: old.conditions.clone(),
            observed_run: spec.run,
            ..Default::default()
        }
    };
    status.observed_generation = scenario.metadata.generation;
    status.pod_name = pod.map(|p| p.name_any());
    let mut d = Draft {
        status,
        steps: Vec::new(),
        now,
        generation: scenario.metadata.generation,
        wake_at: None,
    };
    let current_pod = pod.filter(|p| pod_run(p) == spec.run);

    if spec.is_stopped() {
        if let Some(p) = pod {
            d.delete(p);
        }
        d.phase(Phase::Stopped);
        d.ready(false, "Undeployed", "stopped by to_undeploy");
        d.admitted(false, "Undeployed", "stopped by to_undeploy");
        return finish(d, rules);
    }

    if let Some(p) = pod.filter(|p| pod_run(p) != spec.run) {
        // A worker of an older run (a newer deploy replaced it, or runs the
        // scenario again): it goes first, and keeps its slot until gone.
        d.delete(p);
        d.phase(Phase::Starting);
        d.ready(
            false,
            "ReplacingWorker",
            "a newer deploy replaces the worker; the new one starts once the old one is gone",
        );
        d.admitted(
            holds_slot(p),
            "ReplacingWorker",
            "the old worker Pod goes first",
        );
        return finish(d, rules);
    }

    if d.status.observed_run == spec.run
        && d.status
            .phase
            .is_some_and(|p| matches!(p, Phase::Succeeded | Phase::Failed))
    {
        // This run is over; a worker that still runs (given up) goes.
        if let Some(p) = current_pod.filter(|p| holds_slot(p)) {
            d.delete(p);
        }
        return finish(d, rules);
    }

    let Some(p) = current_pod else {
        return match slot {
            Slot::Free if d.status.replace_after.is_some_and(|t| t > now) => {
                // Holds its place at the head of the queue meanwhile.
                let at = d.status.replace_after.unwrap_or(now);
                d.wake_at = Some(at);
                d.phase(Phase::Starting);
                let message = format!(
                    "starting the next worker at {} (restart {} of at most {})",
                    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    d.status.restart_count,
                    rules.restart_limit
                );
                d.ready(false, "BackOff", &message);
                d.admitted(
                    true,
                    "BackOff",
                    "keeps its slot while the replacement delay runs",
                );
                finish(d, rules)
            }
            Slot::Free => {
                d.status.replace_after = None;
                d.steps.push(Step::CreatePod);
                d.status.pod_name = Some(names::pod_name(&spec.scenario_uuid));
                d.phase(Phase::Starting);
                d.ready(
                    false,
                    "PodCreated",
                    "worker Pod created; waiting for it to run",
                );
                d.admitted(true, "SlotHeld", "holds a worker slot");
                finish(d, rules)
            }
            Slot::Full => {
                d.phase(Phase::Queued);
                d.ready(
                    false,
                    "WaitingForSlot",
                    "all MAX_WORKERS slots are taken; waiting in FIFO order",
                );
                d.admitted(
                    false,
                    "WaitingForSlot",
                    "all MAX_WORKERS slots are taken; waiting in FIFO order",
                );
                finish(d, rules)
            }
        };
    };

    let limit = rules.restart_limit;
    let finite = finite_source(scenario);
    match observe(p) {
        Worker::Pending { waiting } => {
            d.phase(Phase::Starting);
            d.admitted(true, "SlotHeld", "holds a worker slot");
            match waiting {
                Some((reason, message)) if WAITING_ERRORS.contains(&reason.as_str()) => {
                    d.status.last_error = Some(format!("{reason}: {message}"));
                    d.ready(false, &reason, &message);
                }
                Some((reason, message)) => d.ready(false, &reason, &message),
                None => d.ready(
                    false,
                    // The same words as when it was created: no status write
                    // while it is scheduled and its image pulled.
                    "PodCreated",
                    "worker Pod created; waiting for it to run",
                ),
            }
        }
        Worker::Running {
            ready,
            restarts,
            crash,
        } => {
            d.status.restart_count = restarts + d.status.reruns;
            let count = u32::try_from(d.status.restart_count).unwrap_or(0);
            d.admitted(true, "SlotHeld", "holds a worker slot");
            match crash {
                Some((_, words))
                    if restart::after_exit(finite, Exit::Failure, count, limit)
                        == AfterExit::GiveUp =>
                {
                    give_up(&mut d, p, count, &words);
                }
                Some((reason, words)) => {
                    d.phase(Phase::Running);
                    let message = format!("{words}; restarted {count} of at most {limit} times");
                    d.status.last_error = Some(message.clone());
                    d.ready(false, &reason, &message);
                }
                None if ready => {
                    d.phase(Phase::Running);
                    d.status.last_error = None;
                    d.ready(
                        true,
                        "WorkerReady",
                        "worker is running and its camera delivers frames",
                    );
                }
                None => {
                    d.phase(Phase::Running);
                    d.ready(
                        false,
                        "WorkerNotReady",
                        "worker is running but not ready (its /readyz fails: the camera delivers no frames yet)",
                    );
                }
            }
        }
        Worker::Succeeded => {
            let count = u32::try_from(d.status.restart_count).unwrap_or(0);
            match restart::after_exit(finite, Exit::Success, count, limit) {
                AfterExit::Done => {
                    d.phase(Phase::Succeeded);
                    d.ready(
                        false,
                        "WorkerSucceeded",
                        "the source ended and the worker finished",
                    );
                    d.admitted(false, "Finished", "the run is over");
                }
                AfterExit::GiveUp => give_up(
                    &mut d,
                    p,
                    count,
                    "the live camera's worker exited with code 0",
                ),
                AfterExit::Restart => {
                    // A live camera never ends: start its worker again. Counted
                    // once per ended Pod (the reason marks it counted).
                    if d.status
                        .condition(READY)
                        .is_none_or(|c| c.reason != "WorkerExited")
                    {
                        d.status.reruns += 1;
                        d.status.restart_count += 1;
                        d.status.replace_after = Some(replace_after(now, d.status.restart_count));
                    }
                    d.delete(p);
                    d.phase(Phase::Starting);
                    d.admitted(true, "SlotHeld", "holds a worker slot");
                    d.ready(
                        false,
                        "WorkerExited",
                        "the live camera's worker exited with code 0; starting it again",
                    );
                }
            }
        }
        Worker::Failed { error } => {
            d.phase(Phase::Failed);
            d.status.last_error = Some(error.clone());
            d.ready(false, "WorkerFailed", &error);
            d.admitted(false, "Finished", "the run is over");
        }
        Worker::Refused { reason, message } => {
            let count = u32::try_from(d.status.restart_count).unwrap_or(0);
            let words = format!("the node refused or evicted the worker Pod ({reason}): {message}");
            if restart::after_exit(false, Exit::Failure, count, limit) == AfterExit::GiveUp {
                give_up(&mut d, p, count, &words);
            } else {
                // Counted once per refused Pod (the Ready reason marks it
                // counted until the next Pod is created).
                if d.status.condition(READY).is_none_or(|c| c.reason != reason) {
                    d.status.reruns += 1;
                    d.status.restart_count += 1;
                    d.status.replace_after = Some(replace_after(now, d.status.restart_count));
                }
                d.delete(p);
                d.phase(Phase::Starting);
                d.status.last_error = Some(words.clone());
                let n = d.status.restart_count;
                d.ready(
                    false,
                    &reason,
                    &format!("{words}; replacing it (restart {n} of at most {limit})"),
                );
                d.admitted(
                    false,
                    "Replacing",
                    "the old worker Pod is removed; a new one waits for a slot",
                );
            }
        }
        Worker::Disrupted { reason, message } => disrupted(&mut d, p, &reason, &message),
        Worker::Terminating { reason, message } => {
            d.phase(Phase::Starting);
            let words = format!("{message}; a new worker starts once it is gone");
            d.ready(false, &reason, &words);
            d.admitted(
                true,
                "SlotHeld",
                "the old worker Pod holds the slot until it is gone",
            );
        }
    }
    finish(d, rules)
}

/// Not the worker's fault: replace the Pod, without using the restart budget.
fn disrupted(d: &mut Draft, pod: &Pod, reason: &str, message: &str) {
    d.delete(pod);
    d.phase(Phase::Starting);
    let words = format!("worker Pod ended by the cluster ({reason}): {message}; replacing it");
    d.status.last_error = Some(words.clone());
    d.ready(false, reason, &words);
    d.admitted(
        false,
        "Replacing",
        "the old worker Pod is removed; a new one waits for a slot",
    );
}

/// `status` after the API server refused the worker Pod for good: this
/// Scenario fails (and the queue goes on with the next).
pub fn pod_rejected(
    status: ScenarioStatus,
    reason: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> ScenarioStatus {
    let message = format!("the worker Pod was refused: {reason}");
    let mut status = without_pod(
        status,
        Phase::Failed,
        "PodRejected",
        &message,
        generation,
        now,
    );
    status.last_error = Some(message);
    status
}

/// `status` with no Pod, in `phase`, and both conditions false for `reason`.
fn without_pod(
    status: ScenarioStatus,
    phase: Phase,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> ScenarioStatus {
    let mut d = Draft {
        status,
        steps: Vec::new(),
        now,
        generation,
        wake_at: None,
    };
    d.status.pod_name = None;
    d.phase(phase);
    d.ready(false, reason, message);
    d.admitted(false, reason, message);
    d.status
}

/// The conditions' reason while a ResourceQuota refuses the worker Pod.
const QUOTA_EXCEEDED: &str = "QuotaExceeded";

/// `status` after a ResourceQuota refused the worker Pod of the run: the
/// Scenario waits, queued, and its Pod is tried again (the run is not over,
/// and no restart is counted).
pub fn quota_wait(
    status: ScenarioStatus,
    reason: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> ScenarioStatus {
    let message = format!(
        "the namespace's ResourceQuota refused the worker Pod: {reason}; tried again until it fits"
    );
    without_pod(
        status,
        Phase::Queued,
        QUOTA_EXCEEDED,
        &message,
        generation,
        now,
    )
}

/// The status written before the worker Pod a plan asks for is created (the
/// verdict before the act): the plan's own, except while a ResourceQuota
/// keeps refusing the Pod. Then the status on record stays as it is (the
/// write only checks that the Scenario is still the one planned from), so
/// that a refused try does not turn it to Starting and back each time.
pub fn before_create(
    on_record: Option<&ScenarioStatus>,
    planned: &ScenarioStatus,
) -> ScenarioStatus {
    match on_record {
        Some(current) if waits_for_quota(current) => current.clone(),
        _ => planned.clone(),
    }
}

/// Whether `status` is a Scenario queued by a ResourceQuota's refusal.
fn waits_for_quota(status: &ScenarioStatus) -> bool {
    status.phase == Some(Phase::Queued)
        && status
            .condition("Admitted")
            .is_some_and(|c| c.reason == QUOTA_EXCEEDED)
}

fn give_up(d: &mut Draft, pod: &Pod, restarts: u32, words: &str) {
    d.delete(pod);
    d.phase(Phase::Failed);
    let message = format!("gave up after {restarts} restarts (WORKER_RESTART_LIMIT): {words}");
    d.status.last_error = Some(message.clone());
    d.ready(false, "RestartLimitReached", &message);
    d.admitted(false, "Finished", "the run is over");
}

/// Adds the TTL clean-up and the requeue time.
fn finish(mut d: Draft, rules: Rules) -> Plan {
    let terminal = d.status.phase.is_some_and(Phase::is_terminal);
    // Events drive everything; a slow look-again is a safety net only (it
    // costs no API call when nothing changed).
    let mut requeue = match d.status.phase {
        Some(p) if p.is_terminal() => None,
        _ => Some(Duration::from_secs(300)),
    };
    if terminal && let (Some(ttl), Some(finished)) = (rules.finished_ttl, d.status.finish_time) {
        let age = (d.now - finished).to_std().unwrap_or_default();
        if age >= ttl {
            d.steps.push(Step::DeleteScenario);
            requeue = None;
        } else {
            requeue = Some(ttl - age + Duration::from_millis(100));
        }
    }
    if let Some(at) = d.wake_at {
        let wait = (at - d.now).to_std().unwrap_or_default() + Duration::from_millis(100);
        requeue = Some(requeue.map_or(wait, |r| r.min(wait)));
    }
    Plan {
        steps: d.steps,
        status: d.status,
        requeue,
    }
}

/// First delay before a worker Pod replaces one its node refused or a live
/// camera's that exited; it doubles per restart up to [`REPLACE_MAX_DELAY`]
/// (as the kubelet's back-off between container restarts does).
pub const REPLACE_BASE_DELAY: Duration = Duration::from_secs(10);
pub const REPLACE_MAX_DELAY: Duration = Duration::from_secs(300);

/// When the replacement for restart number `restart` (1-based) may start.
fn replace_after(now: DateTime<Utc>, restart: i32) -> DateTime<Utc> {
    let attempt = u32::try_from(restart.saturating_sub(1)).unwrap_or(0);
    let delay =
        crate::backoff::Backoff::new(REPLACE_BASE_DELAY, REPLACE_MAX_DELAY).delay(attempt, 1.0);
    now + chrono::Duration::from_std(delay).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::crd::example_spec;
    use crate::scenario::ordering::Stamp;
    use chrono::TimeZone;
    use serde_json::json;

    const UUID: &str = "550e8400-e29b-41d4-a716-446655440000";
    const RULES: Rules = Rules {
        restart_limit: 5,
        finished_ttl: Some(Duration::from_secs(3600)),
    };

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap()
    }

    fn stamp(ms: i64) -> Stamp {
        Stamp {
            timestamp_ms: ms,
            offset: 0,
        }
    }

    fn scenario(camera: &str) -> Scenario {
        let mut s = Scenario::new(&format!("scn-{UUID}"), example_spec(camera));
        s.metadata.generation = Some(1);
        s.status = Some(ScenarioStatus {
            observed_run: 1,
            ..Default::default()
        });
        s
    }

    const LIVE: &str = "rtsp://cam.example/live";
    const CLIP: &str = "/media/vtest.avi";

    /// A worker Pod of run 1 with `status` merged in.
    fn pod(status: serde_json::Value) -> Pod {
        pod_of_run(1, status)
    }

    fn pod_of_run(run: u32, status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("worker-{UUID}"), "uid": "pod-uid",
                          "labels": {names::LABEL_RUN: run.to_string()}},
            "status": status
        }))
        .unwrap()
    }

    fn deleting(mut p: Pod) -> Pod {
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        p
    }

    fn running(ready: bool) -> serde_json::Value {
        json!({"phase": "Running",
               "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}],
               "containerStatuses": [{"name": "worker", "image": "i", "imageID": "", "ready": ready,
                                      "restartCount": 0, "state": {"running": {}}}]})
    }

    fn crash_loop(restarts: i32) -> serde_json::Value {
        json!({"phase": "Running",
               "conditions": [{"type": "Ready", "status": "False"}],
               "containerStatuses": [{"name": "worker", "image": "i", "imageID": "", "ready": false,
                   "restartCount": restarts,
                   "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                   "lastState": {"terminated": {"exitCode": 3, "reason": "Error"}}}]})
    }

    fn succeeded() -> serde_json::Value {
        json!({"phase": "Succeeded",
               "containerStatuses": [{"name": "worker", "image": "i", "imageID": "", "ready": false,
                   "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]})
    }

    /// A worker Pod whose container exited with `code`, as the kubelet
    /// writes it with `restartPolicy: OnFailure` once it stops restarting.
    fn failed_with(code: i32) -> serde_json::Value {
        json!({"phase": "Failed",
               "containerStatuses": [{"name": "worker", "image": "i", "imageID": "", "ready": false,
                   "restartCount": 0, "state": {"terminated": {"exitCode": code, "reason": "Error"}}}]})
    }

    fn ready_reason(p: &Plan) -> (&str, &str) {
        let c = p.status.condition(READY).expect("a Ready condition");
        (c.status.as_str(), c.reason.as_str())
    }

    fn delete() -> Vec<Step> {
        vec![Step::DeletePod {
            uid: "pod-uid".into(),
        }]
    }

    /// One row: what is observed, and the phase, Ready (status, reason) and steps expected.
    struct Row {
        name: &'static str,
        scenario: Scenario,
        pod: Option<Pod>,
        slot: Slot,
        phase: Phase,
        ready: (&'static str, &'static str),
        steps: Vec<Step>,
    }

    fn row(
        name: &'static str,
        scenario: Scenario,
        pod: Option<Pod>,
        slot: Slot,
        phase: Phase,
        ready: (&'static str, &'static str),
        steps: Vec<Step>,
    ) -> Row {
        Row {
            name,
            scenario,
            pod,
            slot,
            phase,
            ready,
            steps,
        }
    }

    fn stopped(mut s: Scenario) -> Scenario {
        s.spec.applied.undeploy = Some(stamp(200));
        s
    }

    fn with_phase(mut s: Scenario, phase: Phase, run: u32) -> Scenario {
        let st = s.status.get_or_insert_with(Default::default);
        st.phase = Some(phase);
        st.observed_run = run;
        st.finish_time = phase.is_terminal().then(now);
        let reason = match phase {
            Phase::Succeeded => "WorkerSucceeded",
            Phase::Stopped => "Undeployed",
            _ => "WorkerFailed",
        };
        set_condition(st, READY, false, reason, "", now(), Some(1));
        s
    }

    fn next_run(mut s: Scenario) -> Scenario {
        s.spec.run = 2;
        s
    }

    #[test]
    fn plan_table() {
        use Phase::*;
        use Slot::*;
        let evicted = json!({"phase": "Failed", "reason": "Evicted",
                             "message": "The node was low on resource: memory."});
        let disruption_failed = json!({"phase": "Failed", "conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
             "message": "node shutdown"}]});
        let disruption_running = json!({"phase": "Running", "conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]});
        let image_pull = json!({"phase": "Pending", "containerStatuses": [{
            "name": "worker", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}]});
        let failed = failed_with(2);
        let rows = [
            row(
                "new, slot free: create the Pod",
                scenario(LIVE),
                None,
                Free,
                Starting,
                ("False", "PodCreated"),
                vec![Step::CreatePod],
            ),
            row(
                "new, all slots taken: queued",
                scenario(LIVE),
                None,
                Full,
                Queued,
                ("False", "WaitingForSlot"),
                vec![],
            ),
            row(
                "Pod pending",
                scenario(LIVE),
                Some(pod(json!({"phase": "Pending"}))),
                Full,
                Starting,
                ("False", "PodCreated"),
                vec![],
            ),
            row(
                "image cannot be pulled",
                scenario(LIVE),
                Some(pod(image_pull)),
                Full,
                Starting,
                ("False", "ImagePullBackOff"),
                vec![],
            ),
            row(
                "running and ready",
                scenario(LIVE),
                Some(pod(running(true))),
                Full,
                Running,
                ("True", "WorkerReady"),
                vec![],
            ),
            row(
                "running, camera not delivering",
                scenario(LIVE),
                Some(pod(running(false))),
                Full,
                Running,
                ("False", "WorkerNotReady"),
                vec![],
            ),
            row(
                "crash loop under the budget",
                scenario(LIVE),
                Some(pod(crash_loop(2))),
                Full,
                Running,
                ("False", "CrashLoopBackOff"),
                vec![],
            ),
            row(
                "crash loop at the budget: give up, free the slot",
                scenario(LIVE),
                Some(pod(crash_loop(5))),
                Full,
                Failed,
                ("False", "RestartLimitReached"),
                delete(),
            ),
            row(
                "clip ended",
                scenario(CLIP),
                Some(pod(succeeded())),
                Full,
                Succeeded,
                ("False", "WorkerSucceeded"),
                vec![],
            ),
            row(
                "live camera's worker exited 0: start again",
                scenario(LIVE),
                Some(pod(succeeded())),
                Full,
                Starting,
                ("False", "WorkerExited"),
                delete(),
            ),
            row(
                "clip worker stopped by a drain is not done",
                scenario(CLIP),
                Some(deleting(pod(succeeded()))),
                Full,
                Starting,
                ("False", "PodDeleted"),
                vec![],
            ),
            row(
                "live camera's worker stopped by a drain: replaced, no restart counted",
                scenario(LIVE),
                Some(deleting(pod(succeeded()))),
                Full,
                Starting,
                ("False", "PodDeleted"),
                vec![],
            ),
            row(
                "deleted worker that exited 1 (results undelivered at SIGTERM): replaced, not failed",
                scenario(LIVE),
                Some(deleting(pod(failed_with(1)))),
                Full,
                Starting,
                ("False", "PodDeleted"),
                vec![],
            ),
            row(
                "deleted clip worker killed after the grace period: replaced, not failed",
                scenario(CLIP),
                Some(deleting(pod(failed_with(137)))),
                Full,
                Starting,
                ("False", "PodDeleted"),
                vec![],
            ),
            row(
                "worker failed",
                scenario(LIVE),
                Some(pod(failed)),
                Full,
                Failed,
                ("False", "WorkerFailed"),
                vec![],
            ),
            row(
                "evicted: replace",
                scenario(LIVE),
                Some(pod(evicted)),
                Full,
                Starting,
                ("False", "Evicted"),
                delete(),
            ),
            row(
                "ended by a node shutdown: replace",
                scenario(LIVE),
                Some(pod(disruption_failed)),
                Full,
                Starting,
                ("False", "TerminationByKubelet"),
                delete(),
            ),
            row(
                "marked for disruption: wait, keep the slot",
                scenario(LIVE),
                Some(pod(disruption_running)),
                Full,
                Starting,
                ("False", "PreemptionByScheduler"),
                vec![],
            ),
            row(
                "being deleted (drain, lost node): wait, keep the slot",
                scenario(LIVE),
                Some(deleting(pod(running(true)))),
                Full,
                Starting,
                ("False", "PodTerminating"),
                vec![],
            ),
            row(
                "undeployed: delete the Pod",
                stopped(scenario(LIVE)),
                Some(pod(running(true))),
                Full,
                Stopped,
                ("False", "Undeployed"),
                delete(),
            ),
            row(
                "undeployed, Pod already going",
                stopped(scenario(LIVE)),
                Some(deleting(pod(running(true)))),
                Full,
                Stopped,
                ("False", "Undeployed"),
                vec![],
            ),
            row(
                "tombstone: nothing runs",
                stopped(scenario("")),
                None,
                Free,
                Stopped,
                ("False", "Undeployed"),
                vec![],
            ),
            row(
                "replaced: the old run's Pod goes first",
                next_run(scenario(LIVE)),
                Some(pod_of_run(1, running(true))),
                Free,
                Starting,
                ("False", "ReplacingWorker"),
                delete(),
            ),
            row(
                "rerun after a finished run: fresh worker",
                next_run(with_phase(scenario(CLIP), Succeeded, 1)),
                None,
                Free,
                Starting,
                ("False", "PodCreated"),
                vec![Step::CreatePod],
            ),
            row(
                "finished run stays finished",
                with_phase(scenario(CLIP), Succeeded, 1),
                Some(pod(succeeded())),
                Free,
                Succeeded,
                ("False", "WorkerSucceeded"),
                vec![],
            ),
            row(
                "finished run, its Pod gone: no new worker",
                with_phase(scenario(CLIP), Succeeded, 1),
                None,
                Free,
                Succeeded,
                ("False", "WorkerSucceeded"),
                vec![],
            ),
            row(
                "failed run, its Pod gone: no new worker",
                with_phase(scenario(LIVE), Failed, 1),
                None,
                Free,
                Failed,
                ("False", "WorkerFailed"),
                vec![],
            ),
        ];
        for r in rows {
            let s = r.scenario;
            let p = plan(&s, r.pod.as_ref(), r.slot, RULES, now());
            assert_eq!(p.status.phase, Some(r.phase), "{}", r.name);
            assert_eq!(ready_reason(&p), r.ready, "{}", r.name);
            assert_eq!(p.steps, r.steps, "{}", r.name);
            assert_eq!(p.status.observed_run, s.spec.run, "{}", r.name);
            // Planning again from the written status changes nothing: an
            // unchanged Scenario causes no status write.
            let mut again = s.clone();
            again.status = Some(p.status.clone());
            let second = plan(&again, r.pod.as_ref(), r.slot, RULES, now());
            assert_eq!(second.status, p.status, "{}: not stable", r.name);
            // The controller plans from its slimmed Pod cache: what it drops
            // must never change a decision.
            let full = r.pod.clone().map(with_spec_and_bookkeeping);
            let slim = full.clone().map(crate::controller::pod::cached);
            assert_eq!(
                plan(&s, slim.as_ref(), r.slot, RULES, now()),
                plan(&s, full.as_ref(), r.slot, RULES, now()),
                "{}: the cached Pod plans differently",
                r.name
            );
        }
    }

    /// A Pod as the apiserver returns it: with a spec, managed fields and
    /// status fields the plan does not read.
    fn with_spec_and_bookkeeping(mut p: Pod) -> Pod {
        let extra: Pod = serde_json::from_value(json!({
            "metadata": {"managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"nodeName": "node-1", "containers": [{"name": names::WORKER_CONTAINER, "image": "runner"}]},
            "status": {"hostIP": "10.0.0.1", "podIP": "10.1.0.1", "qosClass": "Burstable"}
        }))
        .unwrap();
        p.metadata.managed_fields = extra.metadata.managed_fields;
        p.spec = extra.spec;
        let mut status = p.status.unwrap_or_default();
        let extra_status = extra.status.unwrap();
        status.host_ip = extra_status.host_ip;
        status.pod_ip = extra_status.pod_ip;
        status.qos_class = extra_status.qos_class;
        p.status = Some(status);
        p
    }

    #[test]
    fn the_source_kind_ingest_recorded_wins_over_the_redacted_url() {
        // A clip whose path the redaction hides (`lobby%201.mp4` shows as ***).
        let mut s = scenario("https://cdn.example/clips/***");
        assert!(!finite_source(&s));
        s.annotations_mut()
            .insert(names::ANNOTATION_SOURCE.into(), "clip".into());
        assert!(finite_source(&s));
        let p = plan(&s, Some(&pod(succeeded())), Slot::Full, RULES, now());
        assert_eq!(p.status.phase, Some(Phase::Succeeded));
    }

    #[test]
    fn crash_loop_shows_the_exit_code_and_the_budget() {
        let p = plan(
            &scenario(LIVE),
            Some(&pod(crash_loop(2))),
            Slot::Full,
            RULES,
            now(),
        );
        let error = p.status.last_error.unwrap();
        assert!(
            error.contains("code 3 (Error)") && error.contains("2 of at most 5"),
            "{error}"
        );
        assert_eq!(p.status.restart_count, 2);
        let gave_up = plan(
            &scenario(LIVE),
            Some(&pod(crash_loop(5))),
            Slot::Full,
            RULES,
            now(),
        );
        assert!(
            gave_up
                .status
                .last_error
                .unwrap()
                .contains("gave up after 5 restarts")
        );
        assert!(gave_up.status.finish_time.is_some());
    }

    #[test]
    fn a_live_camera_exit_is_counted_once_per_pod() {
        let s = scenario(LIVE);
        let first = plan(&s, Some(&pod(succeeded())), Slot::Full, RULES, now());
        assert_eq!((first.status.reruns, first.status.restart_count), (1, 1));
        let mut again = s.clone();
        again.status = Some(first.status.clone());
        let second = plan(&again, Some(&pod(succeeded())), Slot::Full, RULES, now());
        assert_eq!(second.status.reruns, 1);
        // The next Pod's own restarts add to the reruns.
        let mut next = again.clone();
        next.status = Some(second.status);
        let p = plan(&next, Some(&pod(crash_loop(2))), Slot::Full, RULES, now());
        assert_eq!(p.status.restart_count, 3);
    }

    #[test]
    fn running_status_carries_no_stale_fields() {
        let mut s = scenario(LIVE);
        s.status = Some(ScenarioStatus {
            phase: Some(Phase::Running),
            observed_run: 1,
            last_error: Some("worker exited with code 1".into()),
            finish_time: Some(now()),
            ..Default::default()
        });
        let p = plan(&s, Some(&pod(running(true))), Slot::Full, RULES, now());
        assert_eq!(p.status.last_error, None);
        assert_eq!(p.status.finish_time, None);
        assert_eq!(
            p.status.pod_name.as_deref(),
            Some(format!("worker-{UUID}").as_str())
        );
        let queued = plan(&scenario(LIVE), None, Slot::Full, RULES, now());
        assert_eq!(queued.status.pod_name, None);
        let c = queued.status.condition(ADMITTED).unwrap();
        assert_eq!(
            (c.status.as_str(), c.observed_generation),
            ("False", Some(1))
        );
    }

    #[test]
    fn a_new_run_starts_from_a_clean_status() {
        let mut s = with_phase(scenario(LIVE), Phase::Failed, 1);
        s.status.as_mut().unwrap().last_error = Some("gave up".into());
        s.status.as_mut().unwrap().restart_count = 5;
        let p = plan(&next_run(s), None, Slot::Full, RULES, now());
        assert_eq!(p.status.phase, Some(Phase::Queued));
        assert_eq!(p.status.last_error, None);
        assert_eq!(p.status.restart_count, 0);
        assert_eq!(p.status.finish_time, None);
        assert_eq!(p.status.observed_run, 2);
    }

    #[test]
    fn finished_scenarios_are_removed_after_the_ttl() {
        let s = with_phase(stopped(scenario(LIVE)), Phase::Stopped, 1);
        let fresh = plan(&s, None, Slot::Full, RULES, now());
        assert!(fresh.steps.is_empty());
        assert!(
            fresh
                .requeue
                .is_some_and(|d| d <= Duration::from_secs(3601))
        );
        let later = now() + chrono::Duration::seconds(3600);
        assert_eq!(
            plan(&s, None, Slot::Full, RULES, later).steps,
            vec![Step::DeleteScenario]
        );
        let keep = Rules {
            finished_ttl: None,
            ..RULES
        };
        let kept = plan(&s, None, Slot::Full, keep, later);
        assert!(kept.steps.is_empty() && kept.requeue.is_none());
    }

    #[test]
    fn the_transition_time_moves_only_when_the_status_changes() {
        let s = scenario(LIVE);
        let first = plan(&s, Some(&pod(running(false))), Slot::Full, RULES, now());
        let mut next = s.clone();
        next.status = Some(first.status.clone());
        let later = now() + chrono::Duration::seconds(30);
        let crash = plan(&next, Some(&pod(crash_loop(1))), Slot::Full, RULES, later);
        let c = crash.status.condition(READY).unwrap();
        assert_eq!(
            (c.reason.as_str(), c.last_transition_time),
            ("CrashLoopBackOff", now())
        );
        next.status = Some(crash.status);
        let ready = plan(&next, Some(&pod(running(true))), Slot::Full, RULES, later);
        assert_eq!(
            ready.status.condition(READY).unwrap().last_transition_time,
            later
        );
    }

    /// The status of a run whose worker Pod is being created.
    fn starting() -> ScenarioStatus {
        ScenarioStatus {
            phase: Some(Phase::Starting),
            pod_name: Some(format!("worker-{UUID}")),
            ..Default::default()
        }
    }

    #[test]
    fn a_refused_pod_fails_the_run_and_says_why() {
        let status = pod_rejected(
            starting(),
            "denied request: a worker Pod runs the runner's image",
            Some(3),
            now(),
        );
        assert_eq!(status.phase, Some(Phase::Failed));
        assert_eq!(status.pod_name, None);
        assert_eq!(status.finish_time, Some(now()));
        assert!(
            status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("denied request")),
            "{status:?}"
        );
        for type_ in [READY, ADMITTED] {
            let c = status.condition(type_).expect("the condition");
            assert_eq!(c.status, "False", "{type_}");
            assert!(c.message.contains("denied request"), "{type_}");
            assert_eq!(c.observed_generation, Some(3), "{type_}");
        }
    }

    #[test]
    fn the_verdict_written_before_a_create_is_the_plans_unless_a_quota_keeps_refusing() {
        let planned = starting();
        let queued = Some(ScenarioStatus {
            phase: Some(Phase::Queued),
            ..Default::default()
        });
        assert_eq!(before_create(None, &planned), planned);
        assert_eq!(before_create(queued.as_ref(), &planned), planned);
        let refused = quota_wait(starting(), "exceeded quota: pods", Some(2), now());
        assert_eq!(
            before_create(Some(&refused), &planned),
            refused,
            "a try after a quota refusal keeps the status on record"
        );
    }

    #[test]
    fn a_pod_a_quota_refuses_waits_queued_without_failing_the_run() {
        let status = quota_wait(
            starting(),
            "exceeded quota: pods, requested: pods=1, used: pods=1, limited: pods=1",
            Some(2),
            now(),
        );
        assert_eq!(status.phase, Some(Phase::Queued));
        assert_eq!(status.pod_name, None);
        assert_eq!(status.finish_time, None);
        assert_eq!(status.last_error, None);
        assert_eq!(status.restart_count, 0);
        for type_ in [READY, ADMITTED] {
            let c = status.condition(type_).expect("the condition");
            assert_eq!(
                (c.status.as_str(), c.reason.as_str()),
                ("False", "QuotaExceeded")
            );
            assert!(c.message.contains("limited: pods=1"), "{type_}");
        }
    }

    #[test]
    fn only_waiting_reasons_that_are_errors_become_the_last_error() {
        let waiting = |reason: &str| {
            json!({"phase": "Pending", "containerStatuses": [{
                "name": "worker", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": "details"}}}]})
        };
        let pulling = plan(
            &scenario(LIVE),
            Some(&pod(waiting("ErrImagePull"))),
            Slot::Full,
            RULES,
            now(),
        );
        assert_eq!(
            pulling.status.last_error.as_deref(),
            Some("ErrImagePull: details")
        );
        let creating = plan(
            &scenario(LIVE),
            Some(&pod(waiting("ContainerCreating"))),
            Slot::Full,
            RULES,
            now(),
        );
        assert_eq!(creating.status.last_error, None);
        assert_eq!(ready_reason(&creating), ("False", "ContainerCreating"));
    }

    #[test]
    fn a_failed_pod_without_an_exit_code_shows_the_pods_words() {
        let failed = |status| {
            plan(
                &scenario(LIVE),
                Some(&pod(status)),
                Slot::Full,
                RULES,
                now(),
            )
            .status
            .last_error
            .unwrap()
        };
        let said = failed(json!({"phase": "Failed", "message": "init container failed"}));
        assert!(said.contains("init container failed"), "{said}");
        let silent = failed(json!({"phase": "Failed"}));
        assert!(!silent.is_empty() && !silent.ends_with(": "), "{silent:?}");
    }

    #[test]
    fn unfinished_scenarios_are_looked_at_again_finished_ones_at_the_ttl() {
        // Running: a slow look-again as a safety net.
        let running = plan(
            &scenario(LIVE),
            Some(&pod(running(true))),
            Slot::Full,
            RULES,
            now(),
        );
        assert!(running.requeue.is_some());
        // Finished ten minutes ago with a one-hour TTL: looked at again when
        // the TTL is over, not before and not much later.
        let s = with_phase(stopped(scenario(LIVE)), Phase::Stopped, 1);
        let later = now() + chrono::Duration::seconds(600);
        let requeue = plan(&s, None, Slot::Full, RULES, later).requeue.unwrap();
        assert!(
            (Duration::from_secs(3000)..=Duration::from_secs(3001)).contains(&requeue),
            "{requeue:?}"
        );
    }

    #[test]
    fn a_new_run_keeps_the_conditions_history() {
        let s = with_phase(scenario(LIVE), Phase::Failed, 1);
        let later = now() + chrono::Duration::seconds(30);
        let p = plan(&next_run(s), None, Slot::Full, RULES, later);
        // Ready was False before and stays False: its transition time stays.
        let ready = p.status.condition(READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.last_transition_time),
            ("False", now())
        );
    }

    #[test]
    fn a_pod_its_node_refuses_is_replaced_within_the_restart_budget() {
        let refused = || {
            pod(json!({"phase": "Failed", "reason": "OutOfcpu",
                "message": "Pod was rejected: Node didn't have enough resource: cpu"}))
        };
        let mut s = scenario(LIVE);
        s.status.get_or_insert_with(Default::default).observed_run = 1;
        let first = plan(&s, Some(&refused()), Slot::Full, RULES, now());
        assert_eq!(first.status.phase, Some(Phase::Starting));
        assert_eq!(first.steps, delete());
        assert_eq!(first.status.restart_count, 1, "a refusal is a restart");
        assert_eq!(ready_reason(&first), ("False", "OutOfcpu"));
        assert!(
            first
                .status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("enough resource: cpu")),
            "{:?}",
            first.status.last_error
        );
        let secs = |n: i64| now() + chrono::Duration::seconds(n);
        assert_eq!(first.status.replace_after, Some(secs(10)));
        // Seen again while it goes: not counted twice, the delay kept.
        s.status = Some(first.status.clone());
        let again = plan(&s, Some(&refused()), Slot::Full, RULES, secs(1));
        assert_eq!(again.status.restart_count, 1);
        assert_eq!(again.status.replace_after, Some(secs(10)));
        // Gone, with a slot: no new Pod before the delay runs out, and a
        // look again when it does.
        let waiting = plan(&s, None, Slot::Free, RULES, secs(4));
        assert!(waiting.steps.is_empty(), "{:?}", waiting.steps);
        assert_eq!(waiting.status.phase, Some(Phase::Starting));
        assert_eq!(ready_reason(&waiting), ("False", "BackOff"));
        assert_eq!(waiting.requeue, Some(Duration::from_millis(6100)));
        // The next Pod created once it has, then refused too: counted, and
        // the next delay is twice as long.
        let created = plan(&s, None, Slot::Free, RULES, secs(10));
        assert_eq!(created.steps, vec![Step::CreatePod]);
        assert_eq!(created.status.replace_after, None);
        s.status = Some(created.status);
        let second = plan(&s, Some(&refused()), Slot::Full, RULES, secs(12));
        assert_eq!(second.status.restart_count, 2);
        assert_eq!(second.status.replace_after, Some(secs(32)));
        // With the budget spent: Failed, the Pod removed, the slot freed.
        s.status.as_mut().unwrap().restart_count = 5;
        let spent = plan(&s, Some(&refused()), Slot::Full, RULES, now());
        assert_eq!(spent.status.phase, Some(Phase::Failed));
        assert_eq!(ready_reason(&spent), ("False", "RestartLimitReached"));
        assert_eq!(spent.steps, delete());
    }

    #[test]
    fn replacement_delays_double_up_to_five_minutes() {
        let after = |restart| (replace_after(now(), restart) - now()).num_seconds();
        let delays: Vec<i64> = (1..=7).map(after).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(after(0), 10, "no restart counted yet: the first delay");
    }

    #[test]
    fn the_pods_own_reason_names_an_eviction_before_the_condition() {
        let evicted = json!({"phase": "Failed", "reason": "Evicted", "message": "low on memory",
            "conditions": [{"type": "DisruptionTarget", "status": "True",
                            "reason": "TerminationByKubelet", "message": "node pressure"}]});
        let p = plan(
            &scenario(LIVE),
            Some(&pod(evicted)),
            Slot::Full,
            RULES,
            now(),
        );
        assert_eq!(ready_reason(&p), ("False", "Evicted"));
        assert!(p.status.last_error.unwrap().contains("low on memory"));
    }

    #[test]
    fn the_start_time_is_when_a_worker_was_first_wanted_running() {
        let queued = plan(&scenario(LIVE), None, Slot::Full, RULES, now());
        assert_eq!(queued.status.start_time, None, "queued: nothing started");
        let created = plan(&scenario(LIVE), None, Slot::Free, RULES, now());
        assert_eq!(created.status.start_time, Some(now()));
        let mut s = scenario(LIVE);
        s.status = Some(created.status);
        let later = now() + chrono::Duration::seconds(30);
        let running = plan(&s, Some(&pod(running(true))), Slot::Full, RULES, later);
        assert_eq!(running.status.start_time, Some(now()), "kept, not moved");
    }

    #[test]
    fn a_pods_run_is_its_label() {
        assert_eq!(pod_run(&pod_of_run(7, running(true))), 7);
        let mut unlabelled = pod(running(true));
        unlabelled.metadata.labels = None;
        assert_eq!(pod_run(&unlabelled), 0, "a Pod without the label");
    }

    #[test]
    fn only_pods_that_may_run_hold_a_slot() {
        assert!(holds_slot(&pod(running(true))));
        assert!(holds_slot(&pod(json!({"phase": "Pending"}))));
        assert!(holds_slot(&deleting(pod(running(true)))));
        assert!(!holds_slot(&pod(succeeded())));
        assert!(!holds_slot(&pod(
            json!({"phase": "Failed", "reason": "Evicted"})
        )));
    }
}
